//! Opening a log directory: its lock, and the recovery that rebuilds the log's [`State`] from
//! the files (see `docs/format/wal.md`, "Recovery"). `tail` decides where the records of the
//! last, unsealed segment end.
//!
//! Policy: every segment but the last must be sealed and the segments contiguous; whole segments
//! below the meta file's first live record go (a crash may have left them); the torn tail of the
//! last segment is cut and what is kept is synced; damage anywhere else is `Error::Corrupt`,
//! with the files left untouched. An interrupted `truncate_back` is finished.

mod tail;

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions, TryLockError};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::active::Active;
use crate::error::{Error, Result};
use crate::meta::{Meta, META_FILE, META_TMP};
use crate::options::Options;
use crate::segment::{
    self, open_options_rw, preallocate_tail, remove_file, sync_dir, Sealed, SEGMENT_HEADER_LEN,
    TRAILER_LEN,
};
use crate::state::State;

use self::tail::{scan_tail, Scan};

const LOCK_FILE: &str = "LOCK";

pub(crate) fn lock_dir(dir: &Path, mode: u32) -> Result<File> {
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(mode)
        .open(&path)
        .map_err(|e| Error::io("open", &path, e))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(TryLockError::WouldBlock) => Err(Error::Locked { dir: dir.to_path_buf() }),
        Err(TryLockError::Error(e)) => Err(Error::io("lock", &path, e)),
    }
}

/// Rebuilds the state of a log from its directory: see `docs/format/wal.md`, "Recovery".
pub(crate) fn recover(dir: &Path, opts: &Options) -> Result<State> {
    let meta = Meta::load(dir)?;
    let mut starts = Vec::new();
    let mut begun = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| Error::io("list", dir, e))? {
        let entry = entry.map_err(|e| Error::io("list", dir, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(start) = name.strip_suffix(".tmp").and_then(segment::parse_file_name) {
            begun.push(start);
        } else if name.ends_with(".tmp") && (name == META_TMP || name.starts_with("wal_")) {
            remove_file(&entry.path())?;
        } else if let Some(start) = segment::parse_file_name(name) {
            starts.push(start);
        }
    }
    starts.sort_unstable();

    let mut sealed = VecDeque::new();
    let mut active = None;
    for (i, &start) in starts.iter().enumerate() {
        let path = dir.join(segment::file_name(start));
        let seg = segment::inspect(&path, start)?;
        let file_len = seg.file_len;
        match seg.trailer {
            Some(t) => sealed.push_back(Sealed { start, count: t.count, path, file_len }),
            None if i + 1 == starts.len() => {
                active = Some(recover_tail(seg, &path, start, opts, &meta)?)
            }
            None => {
                return Err(Error::corrupt(
                    &path,
                    file_len.saturating_sub(TRAILER_LEN as u64),
                    "segment is followed by another but has no valid trailer",
                ))
            }
        }
    }
    // A roll not finished when the process stopped leaves the next segment under its temporary
    // name, after a sealed last segment that it continues: it is the log's last segment. Any
    // other segment under a temporary name holds nothing durable and goes.
    let continues = sealed.back().filter(|_| active.is_none()).map(Sealed::end);
    for start in begun {
        let tmp = dir.join(segment::tmp_name(start));
        if continues == Some(start) {
            // A header not written yet (or not durable) means nothing was written after it.
            match segment::inspect(&tmp, start) {
                Ok(seg) if seg.trailer.is_none() => {
                    let path = dir.join(segment::file_name(start));
                    fs::rename(&tmp, &path).map_err(|e| Error::io("rename", &tmp, e))?;
                    sync_dir(dir)?;
                    active = Some(recover_tail(seg, &path, start, opts, &meta)?);
                    continue;
                }
                Ok(_) | Err(Error::Corrupt { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        remove_file(&tmp)?;
    }
    check_contiguous(&sealed, active.as_ref())?;

    // Apply the persisted front truncation: whole segments below `first` go (a crash may have
    // left them behind).
    let first = meta.first_seq;
    let mut removed = false;
    while sealed.front().is_some_and(|s| s.end() <= first) && (sealed.len() > 1 || active.is_some())
    {
        let s = sealed.pop_front().expect("front exists");
        remove_file(&s.path)?;
        removed = true;
    }
    if let Some(a) = active.as_ref().filter(|a| a.end() < first) {
        // The log was emptied past its end: it restarts at `first`.
        remove_file(&a.path)?;
        active = None;
        removed = true;
    }
    if let Some(s) =
        sealed.front().filter(|s| sealed.len() == 1 && active.is_none() && s.end() < first)
    {
        remove_file(&s.path)?;
        sealed.clear();
        removed = true;
    }
    if removed {
        sync_dir(dir)?;
    }
    if let Some((start, path)) =
        sealed.front().map(|s| (s.start, &s.path)).or(active.as_ref().map(|a| (a.start, &a.path)))
    {
        if start > first {
            return Err(Error::corrupt(
                path,
                0,
                format!("log starts at record {first} but its first segment starts at {start}: a segment is missing"),
            ));
        }
    }
    let active = match active {
        Some(a) => a,
        None => {
            let start = sealed.back().map_or(first, |s| s.end().max(first));
            if start < meta.synced_below {
                let (path, at) = sealed
                    .back()
                    .map_or_else(|| (dir.join(META_FILE), 0), |s| (s.path.clone(), s.file_len));
                return Err(Error::corrupt(
                    &path,
                    at,
                    format!(
                        "the log ends at record {start}, but records below {} were durable when \
                         it was last closed: a segment after this one is missing",
                        meta.synced_below
                    ),
                ));
            }
            let (file, path) = segment::create(
                dir,
                start,
                opts.segment_capacity,
                opts.preallocate,
                opts.file_mode,
                None,
                false,
            )?;
            Active::new(start, path, file, Vec::new(), SEGMENT_HEADER_LEN as u64, opts)?
        }
    };
    let mut state = State {
        meta,
        next: active.end(),
        sealed_bytes: sealed.iter().map(|s| s.file_len).sum(),
        sealed,
        active,
        unsynced: 0,
        kicked: false,
        spare_asked: false,
    };
    if let Some(cut) = meta.cut_from {
        // A truncate_back was interrupted: finish it.
        if cut < state.next && cut >= first {
            state.truncate_back(cut, dir, opts)?;
        } else {
            state.store_meta(Meta { cut_from: None, ..meta }, dir, opts)?;
        }
    }
    Ok(state)
}

/// Opens the last, unsealed segment, cuts what recovery discards, and makes the rest durable.
fn recover_tail(
    seg: segment::Inspected,
    path: &Path,
    start: u64,
    opts: &Options,
    meta: &Meta,
) -> Result<Active> {
    let file =
        open_options_rw(opts.file_mode).open(path).map_err(|e| Error::io("open", path, e))?;
    let file_len = seg.file_len;
    let scan = Scan {
        start,
        file_len,
        complete_below: meta.complete_below,
        synced_below: meta.synced_below,
        recycled: seg.header.recycled,
        claims: seg.header.claims,
    };
    let tail = scan_tail(&seg.file, path, scan)?;
    if let Some(reason) = &tail.cut {
        tracing::warn!(segment = %path.display(), offset = tail.data_end, %reason, "cutting the torn tail of the WAL");
        metrics::counter!("timber_wal_torn_tails_cut_total", "wal" => opts.name.clone())
            .increment(1);
    }
    // Whatever follows the good data is discarded for good, so that no stale bytes can be read as
    // records later; the records kept, possibly never synced before the crash, are synced now.
    if file_len > tail.data_end {
        file.set_len(tail.data_end).map_err(|e| Error::io("truncate", path, e))?;
    }
    if opts.preallocate {
        preallocate_tail(&file, path, tail.data_end, opts.segment_capacity)?;
    }
    file.sync_data().map_err(|e| Error::io("fdatasync", path, e))?;
    Active::new(start, path.to_path_buf(), file, tail.offsets, tail.data_end, opts)
}

fn check_contiguous(sealed: &VecDeque<Sealed>, active: Option<&Active>) -> Result<()> {
    let starts =
        sealed.iter().map(|s| (s.start, &s.path)).chain(active.map(|a| (a.start, &a.path)));
    let ends = sealed.iter().map(Sealed::end);
    for ((start, path), prev_end) in starts.skip(1).zip(ends) {
        if start != prev_end {
            return Err(Error::corrupt(
                path,
                0,
                format!("segment starts at record {start} but the one before it ends at {prev_end}: a segment is missing or damaged"),
            ));
        }
    }
    Ok(())
}
