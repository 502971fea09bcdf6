//! Early writeback, a file-system utility shared by the engines: [`start`] asks the kernel to
//! begin writing a range of a file's dirty pages to the disk (`sync_file_range(2)` with
//! `SYNC_FILE_RANGE_WRITE`) and returns without waiting.
//!
//! Why: a file written in full and fsynced at the end (a zero-filled WAL segment here, an
//! SSTable in timber-kv) otherwise reaches the disk in one burst at that fsync, and the small
//! fsyncs of synced appends queue behind it. Started a MiB at a time as the file is written, its
//! pages trickle out instead.
//!
//! Why here: timber-wal is the bottom of the engine crates and timber-kv already depends on it,
//! so one public function spares a crate of its own and keeps this `unsafe` (with `mapped`, the
//! only `unsafe` of the log) in one place. Advisory only: the fsync that follows is what makes
//! the data durable, so a failure here is ignored.
#![allow(unsafe_code)]

use std::fs::File;
use std::os::fd::AsRawFd;

/// Starts writeback of `len` bytes of `file` from `offset`, without waiting for it. Errors are
/// ignored: only the fsync that follows makes the data durable.
pub fn start(file: &File, offset: u64, len: u64) {
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else { return };
    // SAFETY: `sync_file_range` takes a file descriptor and integers and touches no memory of
    // this process; `file` keeps the descriptor open for the duration of the call.
    let _ = unsafe {
        libc::sync_file_range(file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE)
    };
}
