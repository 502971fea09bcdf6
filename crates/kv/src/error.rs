//! The one error type of timber-kv. Every variant carries enough context (path, block offset,
//! limit) to act on it without a debugger.

use std::io;
use std::path::{Path, PathBuf};

/// Errors of the key-value engine.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An argument or option is out of range: empty or oversized key, oversized value, bad option.
    #[error("invalid parameter: {0}")]
    InvalidParam(String),

    /// Another `Db` (in this process or another) has the database open.
    #[error("database {dir} is locked by another process or handle")]
    Locked {
        /// The database directory.
        dir: PathBuf,
    },

    /// The database was closed.
    #[error("database is closed")]
    Closed,

    /// A transaction's commit found that something it depends on was written by another since
    /// it began; nothing was written. Retry the transaction.
    #[error("transaction conflict: {what}")]
    Conflict {
        /// What changed.
        what: String,
    },

    /// A pessimistic transaction's lock request would close a cycle of transactions waiting
    /// for each other; it holds its other locks until it ends. Roll it back and retry.
    #[error("deadlock: waiting for the lock of key {key:?} would close a cycle")]
    Deadlock {
        /// The key it asked for.
        key: bytes::Bytes,
    },

    /// A pessimistic transaction waited `TxnOptions::lock_timeout` for a key's lock.
    #[error("lock of key {key:?} not granted within {after:?}")]
    LockTimeout {
        /// The key it asked for.
        key: bytes::Bytes,
        /// How long it waited.
        after: std::time::Duration,
    },

    /// A transaction's writes would exceed `TxnOptions::max_bytes`.
    #[error("transaction of {bytes} bytes exceeds its limit of {max} bytes")]
    TxnTooLarge {
        /// Bytes of keys and values it would hold.
        bytes: usize,
        /// The limit.
        max: usize,
    },

    /// A transaction stayed open past `TxnOptions::max_age`; roll it back and retry.
    #[error("transaction open for {age:?}, past its limit of {max:?}")]
    TxnExpired {
        /// How long it has been open.
        age: std::time::Duration,
        /// The limit.
        max: std::time::Duration,
    },

    /// Stored data failed verification: a checksum, a length, a magic number or a reference does
    /// not hold. Nothing is repaired or skipped; the files are left as found.
    #[error("corrupt {path} at offset {offset}: {reason}")]
    Corrupt {
        /// The file that failed verification.
        path: PathBuf,
        /// Byte offset of the block or record that failed.
        offset: u64,
        /// What did not hold.
        reason: String,
    },

    /// An I/O call failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The operation (`open`, `read`, `fsync`, ...).
        op: &'static str,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },

    /// A background flush or compaction, or a WAL sync, failed: nothing is known about what
    /// reached the disk, so every later write is refused. Reads keep working. Reopen to recover.
    #[error("database refuses writes after a failure: {cause}")]
    Poisoned {
        /// The first failure.
        cause: String,
    },

    /// The write-ahead log reported an error.
    #[error(transparent)]
    Wal(timber_wal::Error),
}

/// `Result` with [`enum@Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(op: &'static str, path: impl AsRef<Path>, source: io::Error) -> Error {
        Error::Io { path: path.as_ref().to_path_buf(), op, source }
    }

    /// The error a failpoint injects in place of the operating system's (feature `failpoints`).
    #[cfg(feature = "failpoints")]
    pub(crate) fn injected(op: &'static str, path: impl AsRef<Path>) -> Error {
        Error::io(op, path, io::Error::other("injected by a failpoint"))
    }

    pub(crate) fn corrupt(path: impl AsRef<Path>, offset: u64, reason: impl Into<String>) -> Error {
        Error::Corrupt { path: path.as_ref().to_path_buf(), offset, reason: reason.into() }
    }
}

impl From<timber_wal::Error> for Error {
    fn from(e: timber_wal::Error) -> Error {
        match e {
            timber_wal::Error::Locked { dir } => {
                Error::Locked { dir: dir.parent().map(Path::to_path_buf).unwrap_or(dir) }
            }
            timber_wal::Error::Closed => Error::Closed,
            timber_wal::Error::Poisoned { cause } => Error::Poisoned { cause },
            timber_wal::Error::InvalidParam(m) => Error::InvalidParam(m),
            e => Error::Wal(e),
        }
    }
}
