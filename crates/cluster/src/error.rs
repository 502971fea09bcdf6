//! The crate's error type.

use std::path::PathBuf;

/// What can go wrong in the replication layer's storage.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The Raft log (a timber WAL) failed.
    #[error("raft log: {0}")]
    Wal(#[from] timber_wal::Error),

    /// A file system call failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// The call.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },

    /// Stored data failed verification; nothing was modified.
    #[error("corrupt {}: {reason}", path.display())]
    Corrupt {
        /// The damaged file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// A log entry could not be encoded or decoded.
    #[error("raft log entry {index}: {reason}")]
    Entry {
        /// The entry's index (its sequence number in the log).
        index: u64,
        /// What failed.
        reason: String,
    },

    /// The log was asked for something that would leave a hole in it.
    #[error("raft log: {0}")]
    Hole(String),
}

impl Error {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Error {
        Error::Io { op, path: path.into(), source }
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
