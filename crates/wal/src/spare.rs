//! Spare segments: files ready to become the next segment, so that a roll need not write a
//! whole segment of zeros while appenders wait. Segments that `truncate_front` dropped are kept
//! for reuse (`recycled`, at most `MAX_RECYCLED`) and used first: their blocks are written
//! already. When there is none, the preparer thread zero-fills one (`zeroed`) while appends go
//! on, once the log asks for it (`run_preparer`).
//!
//! Invariant: the zero-filled spare is created under the spares lock, which a roll holds until
//! it has renamed the spare it took, so a new spare never reuses the name of one being renamed.

use std::collections::VecDeque;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;

use parking_lot::{Condvar, Mutex};

use crate::options::Options;
use crate::segment;

/// Files ready to become the next segment: segments that truncation dropped, recycled, and
/// when there is none, one that the preparer thread fills with zeros while appends go on.
pub(crate) struct Spares {
    pub(crate) recycled: VecDeque<(File, PathBuf)>,
    pub(crate) zeroed: Zeroed,
}

pub(crate) enum Zeroed {
    None,
    Filling,
    Ready(File),
}

/// Dropped segments kept for reuse at most; more are deleted. One is what a log that drops a
/// segment at a time needs; each one kept is a segment of disk space beyond the live records.
pub(crate) const MAX_RECYCLED: usize = 1;

impl Spares {
    pub(crate) fn new() -> Spares {
        Spares { recycled: VecDeque::new(), zeroed: Zeroed::None }
    }

    /// Deletes every spare file of the log in `dir` (on close).
    pub(crate) fn remove_all(&mut self, dir: &Path) {
        if let Zeroed::Ready(_) = std::mem::replace(&mut self.zeroed, Zeroed::None) {
            let _ = fs::remove_file(dir.join(segment::SPARE_FILE));
        }
        for (_, path) in self.recycled.drain(..) {
            let _ = fs::remove_file(path);
        }
    }
}

/// The preparer thread of the log in `dir`: for each request on `rx`, until every sender is
/// gone, zero-fills a spare unless one is ready, being filled or recycled, or the log is
/// `closed`, and signals `filled` when a fill ends.
pub(crate) fn run_preparer(
    rx: &mpsc::Receiver<()>,
    dir: &Path,
    opts: &Options,
    spare: &Mutex<Spares>,
    filled: &Condvar,
    closed: &AtomicBool,
) {
    while rx.recv().is_ok() {
        let prepared =
            segment::prepare_spare(dir, opts.segment_capacity, opts.file_mode, |create| {
                let mut spares = spare.lock();
                if !matches!(spares.zeroed, Zeroed::None)
                    || !spares.recycled.is_empty()
                    || closed.load(Ordering::Acquire)
                {
                    return None;
                }
                let file = create();
                if file.is_ok() {
                    spares.zeroed = Zeroed::Filling;
                }
                Some(file)
            });
        let Some(prepared) = prepared else { continue };
        let mut spares = spare.lock();
        match prepared {
            Ok(file) if matches!(spares.zeroed, Zeroed::Filling) => {
                spares.zeroed = Zeroed::Ready(file)
            }
            // Nobody waits for it any more: it must not stay behind on disk.
            Ok(_) => {
                let _ = std::fs::remove_file(dir.join(segment::SPARE_FILE));
            }
            Err(e) => {
                spares.zeroed = Zeroed::None;
                tracing::warn!(error = %e, "preparing a spare WAL segment failed; the next roll creates one itself");
            }
        }
        filled.notify_all();
    }
}
