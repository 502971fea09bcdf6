//! `Session`, the per-connection state that commands read and change, and `Context`, what a
//! keyspace command needs besides its arguments.

use bytes::Bytes;

use super::multi::Multi;
use crate::versions::Watches;
use crate::view::KeyView;

/// Per-connection state the commands read and change.
#[derive(Debug)]
pub(crate) struct Session {
    /// Protocol version of replies (2 or 3).
    pub(crate) proto: u8,
    /// Whether the client has authenticated (or no secret is set).
    pub(crate) authed: bool,
    /// `CLIENT SETNAME`.
    pub(crate) name: Option<Bytes>,
    /// Connection id.
    pub(crate) id: u64,
    /// Set by `QUIT`: close after replying.
    pub(crate) quit: bool,
    /// Commands run on this connection (for sampling their latency).
    pub(crate) commands: u64,
    /// Set by `READONLY`: in a cluster, reads are served from this member's state even when it
    /// does not lead (they may be stale) instead of waiting for a linearizable read.
    pub(crate) stale_reads: bool,
    /// A command another member forwarded: never forwarded again (an election in between
    /// could otherwise send it back and forth).
    pub(crate) forwarded: bool,
    /// Between `MULTI` and `EXEC`/`DISCARD`: the queued commands.
    pub(crate) multi: Option<Multi>,
    /// The keys `WATCH`ed (until `EXEC`, `DISCARD` or `UNWATCH`).
    pub(crate) watches: Watches,
}

impl Session {
    /// A new connection's state: RESP2, authenticated unless a secret is set.
    pub(crate) fn new(id: u64, needs_auth: bool) -> Session {
        Session {
            proto: 2,
            authed: !needs_auth,
            name: None,
            id,
            quit: false,
            commands: 0,
            stale_reads: false,
            forwarded: false,
            multi: None,
            watches: Watches::default(),
        }
    }
}

/// What a keyspace command needs besides its arguments.
#[derive(Debug)]
pub(crate) struct Context<'a> {
    /// The keyspace (under `EXEC`, with the transaction's writes so far).
    pub(crate) keys: KeyView<'a>,
    /// The shared secret, if any.
    pub(crate) secret: Option<&'a str>,
    /// The largest value accepted.
    pub(crate) max_value: usize,
    /// Connected clients now.
    pub(crate) clients: usize,
    /// The stream store's backend (`local`, `s3`), for INFO.
    pub(crate) stream_store: &'static str,
}
