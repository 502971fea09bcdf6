//! The one error type of timber-stream.

use std::sync::Arc;

/// Errors of log streams.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An argument or option is out of range: empty or oversized name, oversized entry, bad option.
    #[error("invalid parameter: {0}")]
    InvalidParam(String),

    /// No stream has this name (or it was deleted).
    #[error("stream {stream:?} does not exist")]
    NotFound {
        /// The stream name.
        stream: String,
    },

    /// `create` of a stream that already exists.
    #[error("stream {stream:?} already exists")]
    AlreadyExists {
        /// The stream name.
        stream: String,
    },

    /// The entry was removed by truncation or retention.
    #[error("entry was truncated; the first available entry is {first_available}")]
    Truncated {
        /// The smallest id still readable.
        first_available: u64,
    },

    /// A newer writer opened the stream: this one can never write again.
    #[error("writer of stream {stream:?} at epoch {epoch} was fenced by a newer writer")]
    Fenced {
        /// The stream name.
        stream: String,
        /// The epoch of the fenced writer.
        epoch: u64,
    },

    /// The writer, reader or stream store was closed.
    #[error("closed")]
    Closed,

    /// A fragment or a metadata record failed verification. Nothing is skipped or repaired.
    #[error("corrupt {object}: {reason}")]
    Corrupt {
        /// The object key or metadata key.
        object: String,
        /// What did not hold.
        reason: String,
    },

    /// An object storage call failed (after the retries the options allow).
    #[error("object store {op} {key}: {source}")]
    Store {
        /// The operation (put, get, delete, list).
        op: &'static str,
        /// The object key.
        key: String,
        /// The object store's error.
        #[source]
        source: object_store::Error,
    },

    /// The object store has failed for longer than the outage limit, or more journaled bytes
    /// wait for it than the backlog limit allows (`Options::outage_limits`): the append was
    /// refused. Everything acknowledged before is durable in the journal and is uploaded when
    /// the store is back; retry later.
    #[error(
        "object store {store} unavailable for {}s ({backlog_bytes} bytes waiting in the journal): {reason}",
        since.as_secs()
    )]
    StoreUnavailable {
        /// The store (backend, bucket and prefix; never a credential).
        store: String,
        /// How long it has been failing.
        since: std::time::Duration,
        /// Bytes journaled and not yet in the store.
        backlog_bytes: u64,
        /// The last error.
        reason: String,
    },

    /// The object store cannot be used at all: checked when the stream store opens, with a
    /// create-only probe object that is then removed.
    #[error("object store {store}: {problem}")]
    StoreUnusable {
        /// The store (backend, endpoint, bucket and prefix; never a credential).
        store: String,
        /// What failed, in words (unreachable endpoint, missing bucket, refused credentials).
        problem: String,
        /// The object store's error.
        #[source]
        source: object_store::Error,
    },

    /// The journal failed.
    #[error("journal: {0}")]
    Journal(#[source] timber_wal::Error),
    /// The metadata engine failed.
    #[error("metadata: {0}")]
    Kv(#[from] timber_kv::Error),

    /// An earlier write of this writer failed, so this one (later in id order) fails too.
    #[error("an earlier write failed: {0}")]
    WriteFailed(Arc<Error>),
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A copy to hand to every pending append after a writer failed: errors without a source keep
    /// their variant; the others are wrapped once in `WriteFailed`.
    pub(crate) fn for_pending(err: &Arc<Error>) -> Error {
        match &**err {
            Error::Fenced { stream, epoch } => {
                Error::Fenced { stream: stream.clone(), epoch: *epoch }
            }
            Error::Closed => Error::Closed,
            Error::NotFound { stream } => Error::NotFound { stream: stream.clone() },
            Error::Truncated { first_available } => {
                Error::Truncated { first_available: *first_available }
            }
            Error::InvalidParam(m) => Error::InvalidParam(m.clone()),
            Error::WriteFailed(inner) => Error::WriteFailed(inner.clone()),
            _ => Error::WriteFailed(err.clone()),
        }
    }
}
