//! The one error type of the crate. Variants a caller can handle (`Full`, `Locked`, `NotFound`,
//! `InvalidParam`) are kept apart from the fatal ones (`Corrupt`, `Poisoned`, `Io`).

use std::io;
use std::path::PathBuf;

/// Result alias for WAL operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in a [`Wal`](crate::Wal).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An argument or option is out of its allowed range; nothing was written.
    #[error("invalid parameter: {0}")]
    InvalidParam(String),

    /// Another open `Wal` (in this process or another) holds the directory's lock.
    #[error("WAL directory {} is locked by another open log", dir.display())]
    Locked {
        /// The locked directory.
        dir: PathBuf,
    },

    /// The configured size limit would be exceeded. Nothing was written and the log stays
    /// usable: truncate the front and retry.
    #[error("WAL is full: {used} bytes used, {needed} more needed, limit {limit} bytes; truncate the front and retry")]
    Full {
        /// Bytes the log uses now.
        used: u64,
        /// Bytes the refused append needed.
        needed: u64,
        /// The configured limit.
        limit: u64,
    },

    /// The log was closed.
    #[error("WAL is closed")]
    Closed,

    /// The sequence number is outside the live range `first..next`.
    #[error("record {seq} not found: the live range is {first}..{next}")]
    NotFound {
        /// The requested sequence number.
        seq: u64,
        /// First live sequence number.
        first: u64,
        /// Sequence number the next append will get.
        next: u64,
    },

    /// Stored data failed verification. The files are left untouched for inspection.
    #[error("corrupt WAL segment {}: at offset {offset}: {reason}", segment.display())]
    Corrupt {
        /// The file holding the bad data.
        segment: PathBuf,
        /// Byte offset of the bad data in that file.
        offset: u64,
        /// What failed.
        reason: String,
    },

    /// An operating system call failed.
    #[error("I/O error: {op} {}: {source}", path.display())]
    Io {
        /// The file or directory the call was about.
        path: PathBuf,
        /// What was being done (`"open"`, `"write"`, `"fdatasync"`, ...).
        op: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// An earlier write or fsync failed, so the state of the files is unknown (the page cache may
    /// have dropped the data). Every later write is refused; reopen the log to recover.
    #[error("WAL is poisoned by an earlier failure ({cause}); reopen it to recover")]
    Poisoned {
        /// The failure that poisoned the log.
        cause: String,
    },
}

impl Error {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Error::Io { path: path.into(), op, source }
    }

    /// The error a failpoint injects in place of the operating system's (feature `failpoints`).
    #[cfg(feature = "failpoints")]
    pub(crate) fn injected(op: &'static str, path: impl Into<PathBuf>) -> Self {
        Error::io(op, path, io::Error::other("injected by a failpoint"))
    }

    pub(crate) fn corrupt(
        segment: impl Into<PathBuf>,
        offset: u64,
        reason: impl Into<String>,
    ) -> Self {
        Error::Corrupt { segment: segment.into(), offset, reason: reason.into() }
    }
}
