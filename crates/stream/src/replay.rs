//! Replay of the journal at open: whatever the journal holds beyond each stream's recorded
//! entries is written out as fragments (cut as a writer would cut them) and recorded, journaled
//! truncations are applied, and the journal is emptied, all before the store is used.
//!
//! Invariant: replay records only entries that continue a stream's recorded end; a journal record
//! that starts past it is corruption, and records of deleted streams are skipped.

use std::sync::Arc;

use bytes::Bytes;

use crate::error::{Error, Result};
use crate::fragment;
use crate::journal::Record;
use crate::meta::{now_ms, FragmentMeta};
use crate::shared::{object_id, truncate, Shared};

/// Writes out as fragments whatever the journal holds beyond each stream's recorded entries,
/// records them, applies journaled truncations, and empties the journal.
pub(crate) async fn replay_journal(sh: &Arc<Shared>) -> Result<()> {
    if sh.journal.is_none() {
        return Ok(());
    }
    struct Replay {
        name: String,
        next: u64,
        entries: Vec<Bytes>,
        truncate: u64,
    }
    let records = sh.blocking(|sh| sh.journal.as_ref().expect("checked").records()).await?;
    let mut streams: std::collections::BTreeMap<u64, Replay> = Default::default();
    for (seq, r) in records {
        let id = match &r {
            Record::Entries { stream, .. } | Record::Truncate { stream, .. } => *stream,
        };
        let st = match streams.entry(id) {
            std::collections::btree_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::btree_map::Entry::Vacant(v) => {
                // Ids are never reused: records of a deleted stream are skipped.
                let Some(s) = sh.meta.stream(id)? else { continue };
                v.insert(Replay { name: s.name, next: s.next_id, entries: Vec::new(), truncate: 0 })
            }
        };
        match r {
            Record::Entries { first, entries, .. } => {
                let end = first + entries.len() as u64;
                if end <= st.next {
                    continue;
                }
                if first > st.next {
                    return Err(Error::Corrupt {
                        object: format!("stream journal record {seq}"),
                        reason: format!(
                            "entries of stream {:?} start at {first}, but the stream ends at {}",
                            st.name, st.next
                        ),
                    });
                }
                let skip = (st.next - first) as usize;
                st.entries.extend(entries.into_iter().skip(skip));
                st.next = end;
            }
            Record::Truncate { before, .. } => st.truncate = st.truncate.max(before),
        }
    }
    let wo = sh.opts.writer_options();
    for (id, r) in streams {
        if !r.entries.is_empty() {
            let name = r.name.clone();
            let s = sh.blocking(move |sh| sh.meta.open_writer(&name)).await?;
            let segment = s.open_segment.expect("a new writer has an open segment");
            let mut first = s.next_id;
            let mut metas = Vec::new();
            for chunk in chunks(&r.entries, wo.max_entries, wo.max_bytes) {
                let data = fragment::encode(id, segment, first, chunk, wo.lz4);
                let meta = FragmentMeta {
                    segment,
                    first_id: first,
                    end_id: first + chunk.len() as u64,
                    bytes: data.len() as u64,
                    created_ms: now_ms(),
                    epoch: s.epoch,
                };
                let path = sh.store.path(&object_id(id, &meta));
                if sh.store.put(&path, data).await? == crate::store::Put::Taken {
                    return Err(Error::Fenced { stream: r.name.clone(), epoch: s.epoch });
                }
                first = meta.end_id;
                metas.push(meta);
            }
            let (name, epoch) = (r.name.clone(), s.epoch);
            let s = sh
                .blocking(move |sh| {
                    let s = sh.meta.commit(id, &name, epoch, &metas)?;
                    sh.meta.close_writer(id, &name, epoch)?;
                    Ok(s)
                })
                .await?;
            sh.publish(&s);
            tracing::info!(stream = %r.name, entries = r.entries.len(), "journaled entries written out as fragments");
        }
        if r.truncate > 0 {
            truncate(sh, &r.name, r.truncate).await?;
        }
    }
    sh.blocking(|sh| {
        let j = sh.journal.as_ref().expect("checked");
        j.release(j.next_seq(), true)?;
        j.sync()
    })
    .await
}

/// Splits entries into the runs the writer would cut them into.
fn chunks(entries: &[Bytes], max_entries: usize, max_bytes: usize) -> Vec<&[Bytes]> {
    let mut out = Vec::new();
    let mut rest = entries;
    while !rest.is_empty() {
        let n = crate::journal::fragment_len(rest.iter(), max_entries, max_bytes);
        let (run, tail) = rest.split_at(n);
        out.push(run);
        rest = tail;
    }
    out
}
