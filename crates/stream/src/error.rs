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
