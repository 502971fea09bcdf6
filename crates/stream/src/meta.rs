//! Stream metadata in the timber KV engine: streams, segments, the fragment index, truncation
//! points and writer epochs (layout in `docs/format/stream.md`).
//!
//! Keys: `n<name>` → stream id; `c` → next stream id; `s<id>` → [`StreamMeta`];
//! `g<id><segment>` → [`SegmentMeta`]; `f<id><first entry id>` → [`FragmentMeta`]; integers are
//! big-endian u64 so keys sort numerically. Values start with a format version byte.
//!
//! Invariants: every mutation is one synced write batch made under `lock`, so metadata moves
//! from one consistent state to the next and survives kill -9 once acknowledged; fragments of a
//! stream tile `[first_id, next_id)` without gaps or overlaps (the first may start below
//! `first_id` after truncation); a fragment is recorded only after its object is durable, and
//! only by the writer whose epoch is the stream's current one, into the stream's open segment.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use parking_lot::Mutex;
use timber_kv::{Db, Durability, WriteBatch};

use crate::error::{Error, Result};
use crate::options::StreamConfig;

const FORMAT: u8 = 1;
/// Longest stream name accepted.
pub(crate) const MAX_NAME: usize = 1024;

pub(crate) fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// One stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StreamMeta {
    pub(crate) id: u64,
    pub(crate) name: String,
    /// Epoch of the current writer (0: never had one).
    pub(crate) epoch: u64,
    /// Entries below this id are truncated.
    pub(crate) first_id: u64,
    /// One past the last durable entry.
    pub(crate) next_id: u64,
    pub(crate) next_segment: u64,
    /// The segment new fragments go to, if a writer has one open.
    pub(crate) open_segment: Option<u64>,
    pub(crate) created_ms: u64,
    /// Bytes of the recorded fragments.
    pub(crate) bytes: u64,
    pub(crate) config: StreamConfig,
}

/// One segment of a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SegmentMeta {
    pub(crate) id: u64,
    pub(crate) first_id: u64,
    pub(crate) end_id: u64,
    pub(crate) sealed: bool,
    pub(crate) epoch: u64,
    pub(crate) created_ms: u64,
    pub(crate) bytes: u64,
}

/// One recorded fragment: entries `[first_id, end_id)` of `segment`, an object of `bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct FragmentMeta {
    pub(crate) segment: u64,
    pub(crate) first_id: u64,
    pub(crate) end_id: u64,
    pub(crate) bytes: u64,
    pub(crate) created_ms: u64,
    /// Epoch of the writer that wrote it (0: made by merging); part of the object key.
    pub(crate) epoch: u64,
}

fn key(tag: u8, a: u64, b: Option<u64>) -> Vec<u8> {
    let mut k = Vec::with_capacity(17);
    k.push(tag);
    k.extend_from_slice(&a.to_be_bytes());
    if let Some(b) = b {
        k.extend_from_slice(&b.to_be_bytes());
    }
    k
}

fn name_key(name: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + name.len());
    k.push(b'n');
    k.extend_from_slice(name.as_bytes());
    k
}

/// A little-endian reader of a metadata value that reports corruption instead of panicking.
struct Reader<'a> {
    key: &'a [u8],
    buf: &'a [u8],
}

impl Reader<'_> {
    fn corrupt(&self, reason: &str) -> Error {
        Error::Corrupt {
            object: format!("metadata key {:?}", Bytes::copy_from_slice(self.key)),
            reason: reason.into(),
        }
    }
    fn u64(&mut self) -> Result<u64> {
        let (h, t) =
            self.buf.split_first_chunk::<8>().ok_or_else(|| self.corrupt("value too short"))?;
        self.buf = t;
        Ok(u64::from_le_bytes(*h))
    }
    fn u8(&mut self) -> Result<u8> {
        let (h, t) = self.buf.split_first().ok_or_else(|| self.corrupt("value too short"))?;
        self.buf = t;
        Ok(*h)
    }
    fn bytes(&mut self, n: usize) -> Result<&[u8]> {
        if self.buf.len() < n {
            return Err(self.corrupt("value too short"));
        }
        let (h, t) = self.buf.split_at(n);
        self.buf = t;
        Ok(h)
    }
    fn version(&mut self) -> Result<()> {
        let v = self.u8()?;
        if v != FORMAT {
            return Err(self.corrupt(&format!("unknown metadata format {v}")));
        }
        Ok(())
    }
}

fn opt(v: u64) -> Option<u64> {
    (v != u64::MAX).then_some(v)
}

impl StreamMeta {
    fn encode(&self) -> Vec<u8> {
        let mut v = vec![FORMAT];
        for x in [
            self.id,
            self.epoch,
            self.first_id,
            self.next_id,
            self.next_segment,
            self.open_segment.unwrap_or(u64::MAX),
            self.created_ms,
            self.bytes,
            self.config.retention_age.map_or(u64::MAX, |d| d.as_millis() as u64),
            self.config.retention_bytes.unwrap_or(u64::MAX),
            self.name.len() as u64,
        ] {
            v.extend_from_slice(&x.to_le_bytes());
        }
        v.extend_from_slice(self.name.as_bytes());
        v
    }

    fn decode(key: &[u8], buf: &[u8]) -> Result<StreamMeta> {
        let mut r = Reader { key, buf };
        r.version()?;
        let id = r.u64()?;
        let epoch = r.u64()?;
        let first_id = r.u64()?;
        let next_id = r.u64()?;
        let next_segment = r.u64()?;
        let open_segment = opt(r.u64()?);
        let created_ms = r.u64()?;
        let bytes = r.u64()?;
        let retention_age = opt(r.u64()?).map(std::time::Duration::from_millis);
        let retention_bytes = opt(r.u64()?);
        let n = r.u64()? as usize;
        let name =
            String::from_utf8(r.bytes(n)?.to_vec()).map_err(|_| r.corrupt("name is not UTF-8"))?;
        if first_id > next_id {
            return Err(r.corrupt("first id above next id"));
        }
        Ok(StreamMeta {
            id,
            name,
            epoch,
            first_id,
            next_id,
            next_segment,
            open_segment,
            created_ms,
            bytes,
            config: StreamConfig { retention_age, retention_bytes },
        })
    }
}

impl SegmentMeta {
    fn encode(&self) -> Vec<u8> {
        let mut v = vec![FORMAT, self.sealed as u8];
        for x in [self.first_id, self.end_id, self.epoch, self.created_ms, self.bytes] {
            v.extend_from_slice(&x.to_le_bytes());
        }
        v
    }

    fn decode(key: &[u8], buf: &[u8]) -> Result<SegmentMeta> {
        let id = key.get(9..17).map(|b| u64::from_be_bytes(b.try_into().expect("8")));
        let mut r = Reader { key, buf };
        let id = id.ok_or_else(|| r.corrupt("segment key too short"))?;
        r.version()?;
        let sealed = r.u8()? != 0;
        Ok(SegmentMeta {
            id,
            sealed,
            first_id: r.u64()?,
            end_id: r.u64()?,
            epoch: r.u64()?,
            created_ms: r.u64()?,
            bytes: r.u64()?,
        })
    }
}

impl FragmentMeta {
    fn encode(&self) -> Vec<u8> {
        let mut v = vec![FORMAT];
        for x in [self.segment, self.end_id, self.bytes, self.created_ms, self.epoch] {
            v.extend_from_slice(&x.to_le_bytes());
        }
        v
    }

    fn decode(key: &[u8], buf: &[u8]) -> Result<FragmentMeta> {
        let first = key.get(9..17).map(|b| u64::from_be_bytes(b.try_into().expect("8")));
        let mut r = Reader { key, buf };
        let first_id = first.ok_or_else(|| r.corrupt("fragment key too short"))?;
        r.version()?;
        let f = FragmentMeta {
            first_id,
            segment: r.u64()?,
            end_id: r.u64()?,
            bytes: r.u64()?,
            created_ms: r.u64()?,
            epoch: r.u64()?,
        };
        if f.end_id <= f.first_id {
            return Err(r.corrupt("empty fragment range"));
        }
        Ok(f)
    }
}

/// The metadata store.
#[derive(Debug)]
pub(crate) struct Meta {
    db: Db,
    lock: Mutex<()>,
}

impl Meta {
    pub(crate) fn open(dir: &Path) -> Result<Meta> {
        let opts = timber_kv::Options::default()
            .memtable_size(8 << 20)
            .block_cache_bytes(16 << 20)
            .durability(Durability::Synced)
            .name("stream-meta");
        let db = Db::open(dir, opts)?;
        match db.get(b"v")? {
            None => db.put(b"v", [FORMAT])?,
            Some(v) if v.as_ref() == [FORMAT] => {}
            Some(v) => {
                return Err(Error::Corrupt {
                    object: dir.display().to_string(),
                    reason: format!("unknown stream metadata format {v:?}"),
                })
            }
        }
        Ok(Meta { db, lock: Mutex::new(()) })
    }

    pub(crate) fn close(&self) -> Result<()> {
        Ok(self.db.close()?)
    }

    pub(crate) fn stream_id(&self, name: &str) -> Result<Option<u64>> {
        let Some(v) = self.db.get(name_key(name))? else { return Ok(None) };
        let b: [u8; 8] = v.as_ref().try_into().map_err(|_| Error::Corrupt {
            object: format!("metadata of stream {name:?}"),
            reason: "bad id".into(),
        })?;
        Ok(Some(u64::from_be_bytes(b)))
    }

    pub(crate) fn stream(&self, id: u64) -> Result<Option<StreamMeta>> {
        let k = key(b's', id, None);
        self.db.get(&k)?.map(|v| StreamMeta::decode(&k, &v)).transpose()
    }

    pub(crate) fn stream_by_name(&self, name: &str) -> Result<StreamMeta> {
        let not_found = || Error::NotFound { stream: name.to_string() };
        let id = self.stream_id(name)?.ok_or_else(not_found)?;
        self.stream(id)?.ok_or_else(not_found)
    }

    pub(crate) fn streams(&self) -> Result<Vec<StreamMeta>> {
        self.db
            .prefix(b"s")
            .map(|kv| {
                let (k, v) = kv?;
                StreamMeta::decode(&k, &v)
            })
            .collect()
    }

    pub(crate) fn segments(&self, id: u64) -> Result<Vec<SegmentMeta>> {
        self.db
            .prefix(key(b'g', id, None))
            .map(|kv| {
                let (k, v) = kv?;
                SegmentMeta::decode(&k, &v)
            })
            .collect()
    }

    /// Recorded fragments of a stream whose ranges end after `from`, in id order.
    pub(crate) fn fragments(&self, id: u64, from: u64) -> Result<Vec<FragmentMeta>> {
        let mut out = Vec::new();
        if let Some(f) = self.fragment_for(id, from)? {
            out.push(f);
        }
        let lo = key(b'f', id, Some(from.saturating_add(1)));
        let hi = key(b'f', id, Some(u64::MAX));
        for kv in self.db.scan(lo..=hi) {
            let (k, v) = kv?;
            out.push(FragmentMeta::decode(&k, &v)?);
        }
        Ok(out)
    }

    /// The recorded fragment holding entry `entry`, if any.
    pub(crate) fn fragment_for(&self, id: u64, entry: u64) -> Result<Option<FragmentMeta>> {
        let lo = key(b'f', id, Some(0));
        let hi = key(b'f', id, Some(entry));
        match self.db.scan(lo..=hi).next_back() {
            None => Ok(None),
            Some(kv) => {
                let (k, v) = kv?;
                let f = FragmentMeta::decode(&k, &v)?;
                Ok((f.end_id > entry).then_some(f))
            }
        }
    }

    /// Records a new, empty stream whose first entry will get id `first_id`.
    pub(crate) fn create(
        &self,
        name: &str,
        config: StreamConfig,
        first_id: u64,
    ) -> Result<StreamMeta> {
        if name.is_empty() || name.len() > MAX_NAME {
            return Err(Error::InvalidParam(format!("stream names are 1 to {MAX_NAME} bytes")));
        }
        let _g = self.lock.lock();
        if self.stream_id(name)?.is_some() {
            return Err(Error::AlreadyExists { stream: name.to_string() });
        }
        let id = match self.db.get(b"c")? {
            Some(v) => u64::from_be_bytes(v.as_ref().try_into().map_err(|_| Error::Corrupt {
                object: "metadata key c".into(),
                reason: "bad stream counter".into(),
            })?),
            None => 0,
        };
        let meta = StreamMeta {
            id,
            name: name.to_string(),
            epoch: 0,
            first_id,
            next_id: first_id,
            next_segment: 0,
            open_segment: None,
            created_ms: now_ms(),
            bytes: 0,
            config,
        };
        let mut b = WriteBatch::new();
        b.put(b"c", (id + 1).to_be_bytes());
        b.put(name_key(name), id.to_be_bytes());
        b.put(key(b's', id, None), meta.encode());
        self.db.write_with(b, Durability::Synced)?;
        Ok(meta)
    }

    /// Seals the open segment of `s` into `b` (dropping it if empty).
    fn seal_open(&self, s: &mut StreamMeta, b: &mut WriteBatch) -> Result<()> {
        if let Some(seg) = s.open_segment.take() {
            let k = key(b'g', s.id, Some(seg));
            if let Some(v) = self.db.get(&k)? {
                let mut m = SegmentMeta::decode(&k, &v)?;
                if m.first_id == m.end_id {
                    b.delete(&k);
                } else {
                    m.sealed = true;
                    b.put(&k, m.encode());
                }
            }
        }
        Ok(())
    }

    /// A new writer: bumps the epoch (fencing the previous writer), seals the open segment and
    /// opens a new one. Returns the stream as the new writer sees it.
    pub(crate) fn open_writer(&self, name: &str) -> Result<StreamMeta> {
        let _g = self.lock.lock();
        let mut s = self.stream_by_name(name)?;
        let mut b = WriteBatch::new();
        self.seal_open(&mut s, &mut b)?;
        s.epoch += 1;
        let seg = SegmentMeta {
            id: s.next_segment,
            first_id: s.next_id,
            end_id: s.next_id,
            sealed: false,
            epoch: s.epoch,
            created_ms: now_ms(),
            bytes: 0,
        };
        s.open_segment = Some(seg.id);
        s.next_segment += 1;
        b.put(key(b'g', s.id, Some(seg.id)), seg.encode());
        b.put(key(b's', s.id, None), s.encode());
        self.db.write_with(b, Durability::Synced)?;
        Ok(s)
    }

    /// Checks that the writer at `epoch` still owns stream `id`.
    fn owned(&self, id: u64, name: &str, epoch: u64) -> Result<StreamMeta> {
        match self.stream(id)? {
            Some(s) if s.epoch == epoch => Ok(s),
            Some(_) => Err(Error::Fenced { stream: name.to_string(), epoch }),
            None => Err(Error::NotFound { stream: name.to_string() }),
        }
    }

    /// Records durable fragments of the writer at `epoch`, in id order. A fragment in a segment
    /// other than the open one seals the open segment and opens that one (a roll).
    pub(crate) fn commit(
        &self,
        id: u64,
        name: &str,
        epoch: u64,
        frags: &[FragmentMeta],
    ) -> Result<StreamMeta> {
        let _g = self.lock.lock();
        let mut s = self.owned(id, name, epoch)?;
        let mut b = WriteBatch::new();
        let mut seg: Option<SegmentMeta> = None;
        for f in frags {
            if f.first_id != s.next_id {
                return Err(Error::Corrupt {
                    object: format!("stream {name:?}"),
                    reason: format!(
                        "fragment starts at {} but the stream ends at {}",
                        f.first_id, s.next_id
                    ),
                });
            }
            if s.open_segment != Some(f.segment) {
                if let Some(done) = seg.take() {
                    b.put(
                        key(b'g', id, Some(done.id)),
                        SegmentMeta { sealed: true, ..done }.encode(),
                    );
                    s.open_segment = None;
                } else {
                    self.seal_open(&mut s, &mut b)?;
                }
                seg = Some(SegmentMeta {
                    id: f.segment,
                    first_id: f.first_id,
                    end_id: f.first_id,
                    sealed: false,
                    epoch,
                    created_ms: now_ms(),
                    bytes: 0,
                });
                s.open_segment = Some(f.segment);
                s.next_segment = s.next_segment.max(f.segment + 1);
            } else if seg.is_none() {
                let k = key(b'g', id, Some(f.segment));
                let v = self.db.get(&k)?.ok_or_else(|| Error::Corrupt {
                    object: format!("stream {name:?}"),
                    reason: format!("open segment {} has no record", f.segment),
                })?;
                seg = Some(SegmentMeta::decode(&k, &v)?);
            }
            let m = seg.as_mut().expect("segment set above");
            m.end_id = f.end_id;
            m.bytes += f.bytes;
            s.next_id = f.end_id;
            s.bytes += f.bytes;
            b.put(key(b'f', id, Some(f.first_id)), f.encode());
        }
        if let Some(m) = seg {
            b.put(key(b'g', id, Some(m.id)), m.encode());
        }
        b.put(key(b's', id, None), s.encode());
        fail::fail_point!("stream::meta::commit", |_| Err(Error::Kv(timber_kv::Error::Io {
            path: self.db.path().to_path_buf(),
            op: "write",
            source: std::io::Error::other("injected by a failpoint"),
        })));
        self.db.write_with(b, Durability::Synced)?;
        Ok(s)
    }

    /// A writer closes: its open segment is sealed. Fenced writers change nothing.
    pub(crate) fn close_writer(&self, id: u64, name: &str, epoch: u64) -> Result<()> {
        let _g = self.lock.lock();
        let mut s = self.owned(id, name, epoch)?;
        let mut b = WriteBatch::new();
        self.seal_open(&mut s, &mut b)?;
        b.put(key(b's', id, None), s.encode());
        self.db.write_with(b, Durability::Synced)?;
        Ok(())
    }

    /// Moves the truncation point up to `before` (clamped to the end) and unrecords every
    /// fragment that ends at or below it. Returns the stream and the unrecorded fragments.
    pub(crate) fn truncate(
        &self,
        name: &str,
        before: u64,
    ) -> Result<(StreamMeta, Vec<FragmentMeta>)> {
        let _g = self.lock.lock();
        let mut s = self.stream_by_name(name)?;
        let before = before.min(s.next_id);
        if before <= s.first_id {
            return Ok((s, Vec::new()));
        }
        s.first_id = before;
        let mut b = WriteBatch::new();
        let mut gone = Vec::new();
        let lo = key(b'f', s.id, Some(0));
        let hi = key(b'f', s.id, Some(before));
        for kv in self.db.scan(lo..hi) {
            let (k, v) = kv?;
            let f = FragmentMeta::decode(&k, &v)?;
            if f.end_id > before {
                break;
            }
            b.delete(&k);
            s.bytes = s.bytes.saturating_sub(f.bytes);
            gone.push(f);
        }
        for g in self.segments(s.id)? {
            if g.end_id <= before && g.sealed {
                b.delete(key(b'g', s.id, Some(g.id)));
            }
        }
        b.put(key(b's', s.id, None), s.encode());
        self.db.write_with(b, Durability::Synced)?;
        Ok((s, gone))
    }

    /// Removes a stream and all its records; returns its id.
    pub(crate) fn delete(&self, name: &str) -> Result<u64> {
        let _g = self.lock.lock();
        let s = self.stream_by_name(name)?;
        let mut b = WriteBatch::new();
        for tag in [b'g', b'f'] {
            for kv in self.db.prefix(key(tag, s.id, None)) {
                b.delete(kv?.0);
            }
        }
        b.delete(key(b's', s.id, None));
        b.delete(name_key(name));
        self.db.write_with(b, Durability::Synced)?;
        Ok(s.id)
    }

    /// Replaces adjacent recorded fragments `old` (of one sealed segment) by `new`, which covers
    /// exactly their range. Returns false, changing nothing, if `old` is no longer recorded as
    /// given (truncated or deleted meanwhile).
    pub(crate) fn replace(&self, id: u64, old: &[FragmentMeta], new: FragmentMeta) -> Result<bool> {
        let _g = self.lock.lock();
        let Some(mut s) = self.stream(id)? else { return Ok(false) };
        let mut b = WriteBatch::new();
        for f in old {
            let k = key(b'f', id, Some(f.first_id));
            match self.db.get(&k)? {
                Some(v) if FragmentMeta::decode(&k, &v)? == *f => b.delete(&k),
                _ => return Ok(false),
            };
        }
        let old_bytes: u64 = old.iter().map(|f| f.bytes).sum();
        s.bytes = s.bytes - old_bytes.min(s.bytes) + new.bytes;
        let gk = key(b'g', id, Some(new.segment));
        if let Some(v) = self.db.get(&gk)? {
            let mut g = SegmentMeta::decode(&gk, &v)?;
            g.bytes = g.bytes - old_bytes.min(g.bytes) + new.bytes;
            b.put(&gk, g.encode());
        }
        b.put(key(b'f', id, Some(new.first_id)), new.encode());
        b.put(key(b's', id, None), s.encode());
        self.db.write_with(b, Durability::Synced)?;
        Ok(true)
    }
}
