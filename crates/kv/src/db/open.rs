//! Opening a database: the manifest names the tables, the WAL records after its `log_number`
//! are replayed into memtables, a new manifest is written, and only then is anything removed
//! (tables no manifest names, old manifests, temporary files). Then the flush thread and the
//! compaction threads start.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;

use arc_swap::ArcSwap;
use parking_lot::{Condvar, Mutex};
use timber_wal::{SyncMode, Wal};

use crate::arena::Spares;
use crate::batch;
use crate::cache::BlockCache;
use crate::error::{Error, Result};
use crate::manifest::{self, Manifest};
use crate::memtable::Memtable;
use crate::metrics::Metrics;
use crate::options::{Options, NUM_LEVELS};
use crate::stats::Counters;
use crate::table::{self, Table};
use crate::version::{TableFile, Version};
use crate::view::View;

use super::inner::{Bg, Inner, Tree, Writer};
use super::throttle::Pace;

/// Opens (or creates) the database in `dir` and starts its background threads.
pub(super) fn open(dir: &Path, opts: Options) -> Result<(Arc<Inner>, Vec<JoinHandle<()>>)> {
    opts.validate()?;
    let opts = opts.effective();
    let dir = dir.to_path_buf();
    let existed = dir.join(manifest::CURRENT).exists();
    if !existed && !opts.create_if_missing {
        return Err(Error::InvalidParam(format!("no database in {}", dir.display())));
    }
    fs::create_dir_all(&dir).map_err(|e| Error::io("create", &dir, e))?;
    let wal_opts = wal_options(&opts)
        .sync(opts.wal_sync_interval.map_or(SyncMode::Manual, SyncMode::Interval))
        .bytes_per_sync(Some(WAL_BYTES_PER_WRITEBACK))
        // Writes hand their records to the OS themselves: `flush` for buffered ones (copied
        // through the WAL's map), `sync` for synced ones (written before the fsync).
        .write_buffer(WAL_WRITE_BUFFER);
    let wal = Wal::open(dir.join("wal"), wal_opts)?;
    let (state, old_manifest) = match manifest::current(&dir)? {
        Some((id, path)) => (manifest::load(&path)?, Some((id, path))),
        None => {
            let stray = list_tables(&dir)?;
            if !stray.is_empty() || !wal.is_empty() {
                return Err(Error::corrupt(
                    dir.join(manifest::CURRENT),
                    0,
                    "CURRENT is missing but the directory holds tables or WAL records",
                ));
            }
            let mut s = manifest::State::new();
            s.log_number = wal.first_seq();
            (s, None)
        }
    };
    let manifest_path =
        old_manifest.as_ref().map_or_else(|| dir.join(manifest::CURRENT), |(_, p)| p.clone());
    if state.log_number < wal.first_seq() || state.log_number > wal.next_seq() {
        return Err(Error::corrupt(
            &manifest_path,
            0,
            format!(
                "manifest replays the WAL from record {} but the WAL holds records {}..{}: \
                     version edits or log records are missing",
                state.log_number,
                wal.first_seq(),
                wal.next_seq()
            ),
        ));
    }
    let cache = Arc::new(BlockCache::new(opts.cache_limit(0, 0)));
    let mut version = Version::empty();
    version.log_number = state.log_number;
    for (level, tables) in version.levels.iter_mut().zip(&state.levels) {
        for meta in tables.values() {
            let path = dir.join(table::file_name(meta.id));
            let t = Table::open(&path, meta.id, cache.clone(), opts.caches_index_and_filters())
                .map_err(|e| match e {
                    Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                        Error::corrupt(
                            &manifest_path,
                            0,
                            format!("table {} is missing", path.display()),
                        )
                    }
                    e => e,
                })?;
            level.push(Arc::new(TableFile::new(meta.clone(), t)));
        }
    }
    version.sort();

    // Replay the WAL into memtables.
    let mut last_seq = state.last_seq;
    let spares = Arc::new(Spares::new(opts.memtable_size));
    let mut mems = vec![Arc::new(Memtable::new(
        state.log_number,
        opts.memtable_hash_index,
        opts.memtable_size,
        &spares,
    ))];
    for rec in wal.iter(state.log_number..) {
        let (wseq, rec) = rec?;
        let (seq, ops) = batch::decode(&rec).ok_or_else(|| {
            Error::corrupt(dir.join("wal"), wseq, format!("WAL record {wseq} is not a valid batch"))
        })?;
        let mem = mems.last().expect("one memtable");
        mem.insert_batch(&ops, seq);
        last_seq = last_seq.max(seq + ops.len() as u64 - 1);
        if mem.size() >= opts.memtable_size {
            mem.seal(wseq + 1);
            mems.push(Arc::new(Memtable::new(
                wseq + 1,
                opts.memtable_hash_index,
                opts.memtable_size,
                &spares,
            )));
        }
    }
    let mem = mems.pop().expect("one memtable");
    mems.reverse();
    let next_file = state.next_file;
    let mut fresh = version.state(last_seq, next_file);
    fresh.log_number = state.log_number;
    let manifest_id = old_manifest.as_ref().map_or(1, |(id, _)| id + 1);
    let manifest = Manifest::create(&dir, manifest_id, &fresh)?;
    // Only now, with everything verified and the new manifest in place, is anything removed.
    remove_orphans(&dir, &state, manifest_id)?;
    manifest::sync_dir(&dir)?;
    let metrics = Metrics::new(&opts.name);
    let inner = Arc::new(Inner {
        dir,
        wal,
        spares,
        cache,
        view: ArcSwap::from_pointee(View { mem, imms: mems, version: Arc::new(version) }),
        view_lock: Mutex::new(()),
        retired: Mutex::new(Vec::new()),
        write: Mutex::new(Writer { last_seq }),
        visible: AtomicU64::new(last_seq),
        freezes: Default::default(),
        tree: Mutex::new(Tree {
            manifest,
            next_file,
            busy: HashSet::new(),
            cursors: vec![Vec::new(); NUM_LEVELS],
        }),
        snapshots: Mutex::new(BTreeMap::new()),
        oracle: Mutex::new(crate::oracle::Oracle::default()),
        write_hints: Default::default(),
        locks: crate::locks::Locks::default(),
        next_txn: AtomicU64::new(1),
        wal_pins: Mutex::new(BTreeMap::new()),
        bg: Mutex::new(Bg::default()),
        bg_cv: Condvar::new(),
        done_cv: Condvar::new(),
        poison: OnceLock::new(),
        closed: AtomicBool::new(false),
        counters: Counters::default(),
        pace: Mutex::new(Pace::new(opts.delayed_write_rate)),
        pacing: AtomicBool::new(false),
        metrics,
        opts,
    });
    inner.update_cache_limit();
    inner.publish_gauges();
    let mut threads = Vec::new();
    let spawn = |name: String, f: fn(&Inner)| {
        let worker = inner.clone();
        std::thread::Builder::new()
            .name(name)
            .spawn(move || f(&worker))
            .map_err(|e| Error::io("spawn", &inner.dir, e))
    };
    threads.push(spawn("timber-kv-flush".into(), Inner::flush_loop)?);
    for i in 0..inner.opts.compaction_threads {
        threads.push(spawn(format!("timber-kv-compact-{i}"), Inner::compaction_loop)?);
    }
    Ok((inner, threads))
}

fn list_tables(dir: &Path) -> Result<Vec<u64>> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).map_err(|e| Error::io("list", dir, e))? {
        let e = e.map_err(|e| Error::io("list", dir, e))?;
        if let Some(id) = e.file_name().to_str().and_then(table::parse_file_name) {
            out.push(id);
        }
    }
    Ok(out)
}

/// Bytes of records the WAL buffers before it hands them to the OS on its own. Buffered and
/// synced writes flush or sync their records before they return, so this bounds a single large
/// batch and a run of deferred writes between syncs.
const WAL_WRITE_BUFFER: usize = 1 << 20;

/// Bytes appended between two starts of the WAL's writeback (`bytes_per_sync`), so that a sync
/// or a seal finds little left to write. Each start replaces the WAL's map window and writes
/// back pages on the other core while the writer appends: a MiB at a time, that cost showed in
/// the slowest writes; a window's worth (4 MiB) at a time, much less.
const WAL_BYTES_PER_WRITEBACK: u64 = 4 << 20;

/// The WAL settings of a database: segments of `wal_segment_size`, larger batches in segments of
/// their own.
pub(super) fn wal_options(opts: &Options) -> timber_wal::Options {
    // No recycled segments (the WAL recycles by default): a flush drops several WAL segments at
    // once, and a kept one would be a segment of disk beside the tables for a saving (no
    // zero-filling) that is small at the WAL's rate here.
    timber_wal::Options::default()
        .segment_capacity(opts.wal_segment_size)
        .oversized_records(true)
        .recycle_segments(false)
        .name(opts.name.clone())
}

/// Removes tables no manifest names (left by a crash in a flush or compaction), old manifests and
/// temporary files.
fn remove_orphans(dir: &Path, state: &manifest::State, current: u64) -> Result<()> {
    let live: HashSet<u64> = state.levels.iter().flat_map(|l| l.keys().copied()).collect();
    for e in fs::read_dir(dir).map_err(|e| Error::io("list", dir, e))? {
        let e = e.map_err(|e| Error::io("list", dir, e))?;
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        let orphan = match table::parse_file_name(name) {
            Some(id) => !live.contains(&id),
            None => {
                name == "CURRENT.tmp"
                    || (name.starts_with("MANIFEST-") && name != manifest::file_name(current))
            }
        };
        if orphan {
            let p = e.path();
            fs::remove_file(&p).map_err(|e| Error::io("remove", &p, e))?;
            tracing::info!(path = %p.display(), "removed orphan file");
        }
    }
    Ok(())
}
