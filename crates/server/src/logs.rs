//! The log streams the gRPC and HTTP endpoints serve: timber streams by user-chosen name, with
//! one writer per stream shared by every client of this server.
//!
//! Invariants: the entries of one `send` call get consecutive ids (the stream's writer is held
//! for the whole call); names starting with `redis.` are refused (they hold Redis streams, see
//! [`crate::streams`]) and never listed; a writer that failed is replaced on the next call.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;
use timber_stream::{
    Ack, Error, Start, StreamConfig, StreamInfo, StreamReader, StreamWriter, Streams,
};

const RESERVED: &str = "redis.";

/// The served log streams.
#[derive(Debug)]
pub(crate) struct Logs {
    streams: Streams,
    writers: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Slot>>>>,
}

/// The writer of one stream, opened on first use.
#[derive(Debug, Default)]
struct Slot {
    writer: Option<StreamWriter>,
    used: Option<std::time::Instant>,
}

fn check(name: &str) -> Result<(), Error> {
    if name.starts_with(RESERVED) {
        return Err(Error::InvalidParam(format!(
            "stream names starting with {RESERVED:?} are reserved for Redis streams"
        )));
    }
    Ok(())
}

impl Logs {
    /// Serves the streams of `streams`.
    pub(crate) fn new(streams: Streams) -> Logs {
        Logs { streams, writers: Mutex::default() }
    }

    /// Creates a stream.
    pub(crate) async fn create(
        &self,
        name: &str,
        config: StreamConfig,
    ) -> Result<StreamInfo, Error> {
        check(name)?;
        self.streams.create(name, config).await
    }

    /// A stream's figures.
    pub(crate) fn info(&self, name: &str) -> Result<StreamInfo, Error> {
        check(name)?;
        self.streams.info(name)
    }

    /// Every stream.
    pub(crate) fn list(&self) -> Result<Vec<StreamInfo>, Error> {
        Ok(self.streams.list()?.into_iter().filter(|s| !s.name.starts_with(RESERVED)).collect())
    }

    /// Buffers `entries` for appending with consecutive ids; the acks resolve once each is
    /// durable.
    pub(crate) async fn send(&self, name: &str, entries: Vec<Bytes>) -> Result<Vec<Ack>, Error> {
        check(name)?;
        let slot = self.writers.lock().entry(name.to_string()).or_default().clone();
        let mut slot = slot.lock().await;
        slot.used = Some(std::time::Instant::now());
        let w = &mut slot.writer;
        let mut acks = Vec::with_capacity(entries.len());
        let mut retried = false;
        let mut pending = entries.into_iter().peekable();
        while let Some(entry) = pending.peek() {
            let writer = match w {
                Some(w) => w,
                None => w.insert(self.streams.writer(name).await?),
            };
            match writer.send(entry.clone()).await {
                Ok(a) => {
                    acks.push(a);
                    pending.next();
                }
                // Refused while the object store is out: the writer is fine.
                Err(e @ timber_stream::Error::StoreUnavailable { .. }) => return Err(e),
                // A writer that failed refuses everything: replace it once, before any entry
                // of this call went to it.
                Err(e) => {
                    *w = None;
                    if retried || !acks.is_empty() {
                        return Err(e);
                    }
                    retried = true;
                }
            }
        }
        Ok(acks)
    }

    /// Appends `entries` and waits until they are durable; returns the first id.
    pub(crate) async fn append(
        &self,
        name: &str,
        entries: Vec<Bytes>,
    ) -> Result<Option<u64>, Error> {
        let mut first = None;
        for a in self.send(name, entries).await? {
            let id = a.await?;
            first.get_or_insert(id);
        }
        Ok(first)
    }

    /// A reader of a stream.
    pub(crate) fn reader(&self, name: &str, start: Start) -> Result<StreamReader, Error> {
        check(name)?;
        self.streams.reader(name, start)
    }

    /// Drops every entry below `before`.
    pub(crate) async fn truncate(&self, name: &str, before: u64) -> Result<StreamInfo, Error> {
        check(name)?;
        self.streams.truncate(name, before).await
    }

    /// Deletes a stream.
    pub(crate) async fn delete(&self, name: &str) -> Result<(), Error> {
        check(name)?;
        let slot = self.writers.lock().remove(name);
        if let Some(slot) = slot {
            slot.lock().await.writer.take();
        }
        self.streams.delete(name).await
    }

    /// Closes the writers not used for `idle`; returns how many.
    pub(crate) async fn close_idle(&self, idle: std::time::Duration) -> u64 {
        let mut idle_slots = Vec::new();
        self.writers.lock().retain(|_, s| match s.try_lock() {
            Ok(g) if g.used.is_none_or(|t| t.elapsed() >= idle) => {
                idle_slots.push(s.clone());
                false
            }
            _ => true,
        });
        let mut closed = 0;
        for s in idle_slots {
            if let Some(w) = s.lock().await.writer.take() {
                if let Err(e) = w.close().await {
                    tracing::warn!(error = %e, "closing an idle stream writer failed");
                }
                closed += 1;
            }
        }
        closed
    }

    /// Flushes and closes every writer.
    pub(crate) async fn close(&self) -> Result<(), Error> {
        let slots: Vec<_> = self.writers.lock().drain().map(|(_, s)| s).collect();
        for s in slots {
            if let Some(w) = s.lock().await.writer.take() {
                close_writer(w).await;
            }
        }
        Ok(())
    }
}

/// Closes a writer at shutdown. A failure is logged, not returned: the entries the writer
/// acknowledged are in the journal (with the object store out, for instance), and the next
/// open records them; the server goes on closing the rest.
pub(crate) async fn close_writer(w: timber_stream::StreamWriter) {
    let stream = w.stream().to_string();
    if let Err(e) = w.close().await {
        tracing::warn!(%stream, error = %e, "closing a stream writer failed; its acknowledged entries stay in the journal");
    }
}
