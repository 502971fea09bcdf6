//! Maintenance of a store, every `Options::maintenance_interval` or on
//! [`Streams::maintain`](crate::Streams::maintain): retention (truncating streams by age and
//! size, unless `Options::apply_retention` leaves that to the caller), garbage collection of
//! objects no metadata refers to, and merging of small fragments of sealed segments.
//!
//! Invariants: metadata first, objects after: a merge records its new fragment before it deletes
//! the old ones, and garbage collection deletes only objects that no record names and that no
//! live writer of this process may still record. Readers see the same entries before, during and
//! after a merge.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;

use crate::error::{Error, Result};
use crate::fragment;
use crate::meta::{now_ms, FragmentMeta, StreamMeta};
use crate::shared::{forget, object_id, truncate, Shared};
use crate::store::is_not_found;

pub(crate) async fn maintain_every(shared: Weak<Shared>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        let Some(sh) = shared.upgrade() else { return };
        if let Err(e) = maintain(&sh).await {
            if matches!(e, Error::Kv(timber_kv::Error::Closed)) {
                return;
            }
            tracing::warn!(error = %e, "stream maintenance failed");
        }
    }
}

pub(crate) async fn maintain(sh: &Arc<Shared>) -> Result<()> {
    if sh.opts.apply_retention {
        for (name, cut) in retention_cuts(sh)? {
            truncate(sh, &name, cut).await?;
        }
    }
    collect_garbage(sh).await?;
    merge_small(sh).await
}

/// Where retention cuts each stream now: the names of the streams whose oldest fragments are
/// past their age or beyond their size, each with the id its first remaining fragment starts
/// at. Whole fragments only, oldest first; by size, a fragment goes only if what stays after
/// it still holds the stream's `retention_bytes` (a fragment larger than that is never the
/// reason the newest entries go).
pub(crate) fn retention_cuts(sh: &Shared) -> Result<Vec<(String, u64)>> {
    let now = now_ms();
    let mut cuts = Vec::new();
    for s in sh.meta.streams()? {
        let (age, max_bytes) = (s.config.retention_age, s.config.retention_bytes);
        if age.is_none() && max_bytes.is_none() {
            continue;
        }
        let mut cut = s.first_id;
        let mut bytes = s.bytes;
        for f in sh.meta.fragments(s.id, s.first_id)? {
            let old = age.is_some_and(|a| f.created_ms.saturating_add(a.as_millis() as u64) < now);
            let big = max_bytes.is_some_and(|m| bytes.checked_sub(f.bytes).is_some_and(|r| r >= m));
            if !(old || big) {
                break;
            }
            bytes -= f.bytes.min(bytes);
            cut = f.end_id;
        }
        if cut > s.first_id {
            cuts.push((s.name, cut));
        }
    }
    Ok(cuts)
}

/// Deletes objects no metadata refers to: of deleted streams, below a truncation point, or
/// written but never recorded (a crash or a fenced writer between the put and the metadata
/// write). Objects a live writer of this process may still record are left alone. Returns the
/// number of objects deleted.
pub(crate) async fn collect_garbage(sh: &Shared) -> Result<u64> {
    let _g = sh.maintenance.lock().await;
    // List first, then read metadata: an object listed before its stream's records were read
    // is judged against records at least as new as the object.
    let objects = sh.store.list(None).await?;
    let streams: HashMap<u64, StreamMeta> =
        sh.meta.streams()?.into_iter().map(|s| (s.id, s)).collect();
    let mut deleted = 0;
    for o in objects {
        let Some(id) = sh.store.parse(&o.location) else { continue };
        let orphan = match streams.get(&id.stream) {
            None => true,
            Some(s) if id.end_id <= s.first_id => true,
            Some(s) => {
                let recorded = sh
                    .meta
                    .fragment_for(s.id, id.first_id)?
                    .is_some_and(|f| object_id(s.id, &f) == id);
                let live = sh.writers.lock().get(&s.id).is_some_and(|&epoch| id.epoch == epoch);
                !recorded && !live
            }
        };
        if orphan {
            tracing::info!(object = %o.location, "deleting unrecorded fragment");
            sh.store.delete(&o.location).await?;
            deleted += 1;
        }
    }
    metrics::counter!("timber_stream_gc_deleted_total").increment(deleted);
    Ok(deleted)
}

/// Merges runs of small fragments of sealed segments into larger ones (W6). Readers see the
/// same entries before, during and after.
async fn merge_small(sh: &Arc<Shared>) -> Result<()> {
    let (below, target) = (sh.opts.merge_below, sh.opts.merge_target);
    if below == 0 {
        return Ok(());
    }
    let _g = sh.maintenance.lock().await;
    let lz4 = sh.opts.writer_options().lz4;
    for s in sh.meta.streams()? {
        let sealed: Vec<u64> =
            sh.meta.segments(s.id)?.iter().filter(|g| g.sealed).map(|g| g.id).collect();
        if sealed.is_empty() {
            continue;
        }
        let frags = sh.meta.fragments(s.id, s.first_id)?;
        let mut groups: Vec<Vec<FragmentMeta>> = Vec::new();
        let mut run: Vec<FragmentMeta> = Vec::new();
        let mut flush = |run: &mut Vec<FragmentMeta>| {
            if run.len() >= 2 {
                groups.push(std::mem::take(run));
            }
            run.clear();
        };
        for f in frags {
            if !(sealed.contains(&f.segment) && f.bytes < below) {
                flush(&mut run);
                continue;
            }
            let run_bytes: u64 = run.iter().map(|r| r.bytes).sum();
            if run.last().is_some_and(|l| l.segment != f.segment || run_bytes + f.bytes > target) {
                flush(&mut run);
            }
            run.push(f);
        }
        flush(&mut run);
        for g in groups {
            merge_group(sh, s.id, &g, lz4).await?;
        }
    }
    Ok(())
}

async fn merge_group(
    sh: &Arc<Shared>,
    stream: u64,
    group: &[FragmentMeta],
    lz4: bool,
) -> Result<()> {
    let mut entries: Vec<Bytes> = Vec::new();
    for f in group {
        let frag = match sh.fragment(stream, f).await {
            Ok(frag) => frag,
            Err(e) if is_not_found(&e) => return Ok(()), // truncated meanwhile
            Err(e) => return Err(e),
        };
        for id in frag.first_id..frag.end_id() {
            entries.push(frag.get(id).expect("id in range"));
        }
    }
    let (Some(&first), Some(&last)) = (group.first(), group.last()) else {
        return Ok(());
    };
    let data = fragment::encode(stream, first.segment, first.first_id, &entries, lz4);
    let new = FragmentMeta {
        segment: first.segment,
        first_id: first.first_id,
        end_id: last.end_id,
        bytes: data.len() as u64,
        created_ms: last.created_ms,
        epoch: 0,
    };
    let path = sh.store.path(&object_id(stream, &new));
    if sh.store.put(&path, data).await? == crate::store::Put::Taken {
        return Err(Error::Corrupt {
            object: path.to_string(),
            reason: "a different object already holds the key of a merged fragment".into(),
        });
    }
    let old = group.to_vec();
    let replaced = sh.blocking(move |sh| sh.meta.replace(stream, &old, new)).await?;
    if replaced {
        metrics::counter!("timber_stream_merged_fragments_total").increment(group.len() as u64);
        forget(sh, stream, group).await;
    } else {
        sh.store.delete(&path).await?;
    }
    Ok(())
}
