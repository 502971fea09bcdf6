//! One Redis-protocol connection: read what the client sent, run every complete request in the
//! buffer as one batch (`pipeline`), write all their replies in one write, repeat.
//!
//! Invariants: a malformed frame or an oversized request gets one error reply and closes only
//! this connection; nothing a bad request sends reaches the keyspace; a connection ends when
//! the client closes, sends QUIT, or the server stops (after the batch it is running).

use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use super::pipeline;
use super::reply::Reply;
use super::request::{parse, Parsed};
use super::session::Session;
use super::Endpoint;
use crate::limit::Counted;

pub(crate) async fn serve(
    ep: Arc<Endpoint>,
    mut sock: Counted,
    stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let mut s = Session::new(ep.next_id(), ep.secret.is_some());
    let mut buf = BytesMut::with_capacity(16 << 10);
    let mut out = BytesMut::with_capacity(16 << 10);
    let mut requests = Vec::new();
    // One wait for the stop signal for the whole connection, rather than one per read.
    let mut stop_signal = stop.clone();
    let stopping = crate::shutdown::stopped(&mut stop_signal);
    tokio::pin!(stopping);
    loop {
        requests.clear();
        let mut bad = None;
        loop {
            match parse(&mut buf, ep.max_request) {
                Parsed::Request(r) => requests.push(r),
                Parsed::Incomplete => break,
                Parsed::Bad(e) => {
                    bad = Some(e);
                    break;
                }
            }
        }
        let mut hold = false;
        if !requests.is_empty() {
            hold = pipeline::hold_replies(&ep);
            pipeline::run(&ep, &mut s, &requests, &mut out, &stop).await;
        }
        if let Some(e) = &bad {
            Reply::err(e).encode(s.proto, &mut out);
        } else if buf.len() > ep.max_request {
            Reply::err(format!("Protocol error: request larger than {} bytes", ep.max_request))
                .encode(s.proto, &mut out);
            bad = Some(String::new());
        }
        if !out.is_empty() {
            if hold {
                // Behind the other ready connections, until the worker next polls for I/O.
                tokio::task::yield_now().await;
            }
            sock.write_all(&out).await?;
            out.clear();
        }
        if bad.is_some() || s.quit {
            return Ok(());
        }
        let read = sock.read_buf(&mut buf);
        let n = tokio::select! {
            n = read => n?,
            () = &mut stopping => return Ok(()),
        };
        if n == 0 {
            return Ok(());
        }
    }
}
