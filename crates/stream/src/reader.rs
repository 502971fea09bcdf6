//! [`StreamReader`]: reads a stream from an id onwards, following the tail.
//!
//! A reader holds the fragment it is in, finds the next one through the fragment index, loads it
//! through the shared cache, and prefetches the one after. Entries that are journaled but in no
//! recorded fragment yet come from the stream's tail in memory. At the tail it waits on the
//! stream's watch channel for the writer to record more.
//!
//! Invariants: a reader returns only durable entries (recorded, or journaled and published),
//! each once, in id order, with no gaps; an id below the truncation point gives `Truncated`
//! rather than stale data.

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::error::{Error, Result};
use crate::fragment::Fragment;
use crate::meta::StreamMeta;
use crate::shared::{object_id, Bounds, Shared};

/// Where a new reader starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// At the first entry not truncated.
    Earliest,
    /// After the last durable entry: only entries appended from now on.
    Latest,
    /// At this id.
    At(u64),
}

/// One entry of a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The entry id: dense, from 0.
    pub id: u64,
    /// The payload.
    pub data: Bytes,
}

/// A reader of one stream.
#[derive(Debug)]
pub struct StreamReader {
    shared: Arc<Shared>,
    name: String,
    stream: u64,
    pos: u64,
    current: Option<Arc<Fragment>>,
    reader: u64,
    bounds: watch::Receiver<Bounds>,
    prefetch: Option<JoinHandle<()>>,
}

impl StreamReader {
    pub(crate) fn open(shared: Arc<Shared>, s: &StreamMeta, start: Start) -> Result<StreamReader> {
        let bounds =
            shared.watch(s.id).ok_or_else(|| Error::NotFound { stream: s.name.clone() })?;
        let b = *bounds.borrow();
        let pos = match start {
            Start::Earliest => b.first,
            Start::Latest => b.next,
            Start::At(id) => id,
        };
        let reader = shared.cache.register_reader(s.id, pos);
        Ok(StreamReader {
            shared,
            name: s.name.clone(),
            stream: s.id,
            pos,
            current: None,
            reader,
            bounds,
            prefetch: None,
        })
    }

    /// The id the next call to `next` returns.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Moves the reader to `id`.
    pub fn seek(&mut self, id: u64) {
        self.pos = id;
        if self.current.as_ref().is_some_and(|f| f.get(id).is_none()) {
            self.current = None;
        }
        self.shared.cache.move_reader(self.reader, self.stream, id);
    }

    /// Whether `next` would return without waiting for the writer.
    pub fn has_next(&self) -> bool {
        self.pos < self.bounds.borrow().next
    }

    /// The next entry, waiting for the writer at the tail.
    pub async fn next(&mut self) -> Result<Entry> {
        loop {
            let b = *self.bounds.borrow_and_update();
            if self.pos < b.first {
                return Err(Error::Truncated { first_available: b.first });
            }
            if let Some(data) = self.current.as_ref().and_then(|f| f.get(self.pos)) {
                let e = Entry { id: self.pos, data };
                self.pos += 1;
                metrics::counter!("timber_stream_read_entries_total").increment(1);
                return Ok(e);
            }
            if self.pos >= b.next {
                if self.bounds.changed().await.is_err() {
                    return Err(Error::NotFound { stream: self.name.clone() });
                }
                continue;
            }
            self.load().await?;
        }
    }

    /// Up to `max` entries: waits for the first, then takes what is readable without waiting.
    pub async fn next_batch(&mut self, max: usize) -> Result<Vec<Entry>> {
        let mut out = Vec::new();
        if max == 0 {
            return Ok(out);
        }
        out.push(self.next().await?);
        while out.len() < max && self.has_next() {
            out.push(self.next().await?);
        }
        Ok(out)
    }

    async fn load(&mut self) -> Result<()> {
        self.current = None;
        let start = std::time::Instant::now();
        let mut found = self.shared.fragment_for(self.stream, self.pos).await?;
        if found.is_none() {
            // Journaled, and not yet in a recorded fragment?
            let limit = self.bounds.borrow().next;
            if let Some(f) = self.shared.tail_chunk(self.stream, self.pos, limit) {
                self.current = Some(Arc::new(f));
                return Ok(());
            }
            // Or recorded, and released from the tail, since the first lookup.
            found = self.shared.fragment_for(self.stream, self.pos).await?;
        }
        metrics::histogram!("timber_stream_read_seconds").record(start.elapsed().as_secs_f64());
        match found {
            Some((meta, frag)) => {
                self.current = Some(frag);
                self.shared.cache.move_reader(self.reader, self.stream, self.pos);
                self.prefetch(meta.end_id);
                Ok(())
            }
            None => {
                let s = self.shared.meta.stream(self.stream)?;
                match s {
                    None => Err(Error::NotFound { stream: self.name.clone() }),
                    Some(s) if self.pos < s.first_id => {
                        Err(Error::Truncated { first_available: s.first_id })
                    }
                    Some(_) => Err(Error::Corrupt {
                        object: format!("stream {:?}", self.name),
                        reason: format!("no fragment records entry {}", self.pos),
                    }),
                }
            }
        }
    }

    /// Loads the fragment starting at `next` into the cache in the background.
    fn prefetch(&mut self, next: u64) {
        if next >= self.bounds.borrow().next
            || self.prefetch.as_ref().is_some_and(|h| !h.is_finished())
        {
            return;
        }
        let (sh, stream) = (self.shared.clone(), self.stream);
        self.prefetch = Some(tokio::spawn(async move {
            let Ok(Some(f)) = sh.meta.fragment_for(stream, next) else { return };
            if !sh.cache.contains(&object_id(stream, &f)) {
                let _ = sh.fragment(stream, &f).await;
            }
        }));
    }
}

impl Drop for StreamReader {
    fn drop(&mut self) {
        self.shared.cache.unregister_reader(self.reader);
    }
}
