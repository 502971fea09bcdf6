//! Backups of a server's data: what `Admin.Backup` streams (a snapshot of the engine and the
//! extent of every stream, taken when the call begins, while the server goes on serving) and
//! what `timberd --restore-from` loads into a new data directory. Format:
//! `docs/format/backup.md`.
//!
//! Invariants: a backup holds exactly the engine's pairs at one snapshot and each stream's
//! entries from its first id to the end it had at that moment (on a cluster member both are
//! taken between two applies, at the applied log id the position names; on a single node the
//! streams' ends are read just after the snapshot), with its retention; a restore verifies the
//! whole file (magic, version, checksum, counts) before it writes anything, and writes into a
//! keyspace directory that did not exist (the streams first, the keyspace's rename last).

use std::io::Read;
use std::path::{Path, PathBuf};

use timber_kv::{Db, Durability, WriteBatch};
use timber_stream::StreamConfig;

/// The file a backup directory holds.
pub(crate) const FILE: &str = "keyspace.backup";
const MAGIC: &[u8; 8] = b"TMBRBKUP";
const STREAMS: &[u8; 8] = b"TMBRSTRM";
const END: &[u8; 8] = b"TMBREND.";
/// 2 adds the streams; version 1 (pairs only) is still read.
const VERSION: u32 = 2;
/// A retention field that is not set.
const NONE: u64 = u64::MAX;
/// Bytes of pairs per streamed chunk.
pub(crate) const CHUNK: usize = 1 << 20;
/// Bytes of pairs per write batch of a restore.
const RESTORE_BATCH: usize = 4 << 20;

/// Builds a backup's bytes as chunks: the header, the pairs, the streams, the trailer.
pub(crate) struct Writer {
    buf: Vec<u8>,
    crc: u32,
    count: u64,
    /// Streams begun, once the streams section began.
    streams: Option<u64>,
}

/// One stream of a backup: what it is restored as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StreamHeader {
    pub(crate) name: String,
    pub(crate) config: StreamConfig,
    /// The id of its first entry.
    pub(crate) first: u64,
    /// How many entries follow.
    pub(crate) entries: u64,
}

impl Writer {
    /// Starts a backup at `position` (`seq:<n>` or `raft:<term>-<node>-<index>`).
    pub(crate) fn new(position: &str) -> Writer {
        let mut buf = Vec::with_capacity(CHUNK + 1024);
        buf.extend_from_slice(MAGIC);
        buf.extend_from_slice(&VERSION.to_le_bytes());
        buf.extend_from_slice(&(position.len() as u32).to_le_bytes());
        buf.extend_from_slice(position.as_bytes());
        Writer { buf, crc: 0, count: 0, streams: None }
    }

    /// Adds a pair; returns a chunk to send once enough bytes gathered.
    pub(crate) fn pair(&mut self, key: &[u8], value: &[u8]) -> Option<Vec<u8>> {
        self.buf.extend_from_slice(&(key.len() as u32).to_le_bytes());
        self.buf.extend_from_slice(&(value.len() as u32).to_le_bytes());
        self.buf.extend_from_slice(key);
        self.buf.extend_from_slice(value);
        self.count += 1;
        (self.buf.len() >= CHUNK).then(|| self.take())
    }

    /// Starts a stream (after the last pair): exactly `h.entries` calls of [`Writer::entry`]
    /// follow.
    pub(crate) fn stream(&mut self, h: &StreamHeader) -> Option<Vec<u8>> {
        let n = self.streams.get_or_insert_with(|| {
            self.buf.extend_from_slice(STREAMS);
            0
        });
        *n += 1;
        let ms = |d: std::time::Duration| u64::try_from(d.as_millis()).unwrap_or(NONE - 1);
        self.buf.extend_from_slice(&(h.name.len() as u32).to_le_bytes());
        self.buf.extend_from_slice(h.name.as_bytes());
        self.buf.extend_from_slice(&h.config.retention_age.map_or(NONE, ms).to_le_bytes());
        self.buf.extend_from_slice(&h.config.retention_bytes.unwrap_or(NONE).to_le_bytes());
        self.buf.extend_from_slice(&h.first.to_le_bytes());
        self.buf.extend_from_slice(&h.entries.to_le_bytes());
        (self.buf.len() >= CHUNK).then(|| self.take())
    }

    /// Adds an entry of the stream begun last.
    pub(crate) fn entry(&mut self, data: &[u8]) -> Option<Vec<u8>> {
        self.buf.extend_from_slice(&(data.len() as u32).to_le_bytes());
        self.buf.extend_from_slice(data);
        (self.buf.len() >= CHUNK).then(|| self.take())
    }

    fn take(&mut self) -> Vec<u8> {
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK + 1024));
        self.crc = crc32c::crc32c_append(self.crc, &chunk);
        chunk
    }

    /// The last chunk: what is left, and the trailer (counts and checksum of every byte
    /// before).
    pub(crate) fn finish(mut self) -> Vec<u8> {
        let mut last = std::mem::take(&mut self.buf);
        if self.streams.is_none() {
            last.extend_from_slice(STREAMS);
        }
        last.extend_from_slice(END);
        last.extend_from_slice(&self.count.to_le_bytes());
        last.extend_from_slice(&self.streams.unwrap_or(0).to_le_bytes());
        let crc = crc32c::crc32c_append(self.crc, &last);
        last.extend_from_slice(&crc.to_le_bytes());
        last
    }
}

/// Why a backup cannot be restored.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}: not a timber backup ({reason})", path.display())]
    Invalid { path: PathBuf, reason: String },
    #[error("{} already holds a keyspace: restore into a new data directory", path.display())]
    Exists { path: PathBuf },
    #[error("restoring into {}: {source}", path.display())]
    Kv { path: PathBuf, source: timber_kv::Error },
    #[error("restoring stream {name:?}: {source}")]
    Stream { name: String, source: Box<timber_stream::Error> },
}

/// A verified backup, in memory.
pub(crate) struct Backup {
    pub(crate) position: String,
    bytes: Vec<u8>,
    /// Where the pairs start and end in `bytes`.
    pairs: std::ops::Range<usize>,
    pub(crate) count: u64,
    /// Each stream, and where its entries start and end in `bytes`.
    streams: Vec<(StreamHeader, std::ops::Range<usize>)>,
}

/// Reads length-prefixed fields off the front of a byte range.
struct Cursor<'a> {
    rest: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = (self.rest.get(..n)?, self.rest.get(n..)?);
        self.rest = rest;
        Some(head)
    }

    fn u32(&mut self) -> Option<u32> {
        self.take(4).and_then(|b| b.try_into().ok()).map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Option<u64> {
        self.take(8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes)
    }

    /// A `u32` length, then that many bytes.
    fn field(&mut self) -> Option<&'a [u8]> {
        let n = self.u32()? as usize;
        self.take(n)
    }

    fn pair(&mut self) -> Option<(&'a [u8], &'a [u8])> {
        let (k, v) = (self.u32()? as usize, self.u32()? as usize);
        Some((self.take(k)?, self.take(v)?))
    }
}

impl Backup {
    /// Reads and verifies the backup in directory `dir`.
    pub(crate) fn read(dir: &Path) -> Result<Backup, Error> {
        let path = dir.join(FILE);
        let io = |source| Error::Io { path: path.clone(), source };
        let mut bytes = Vec::new();
        std::fs::File::open(&path).and_then(|mut f| f.read_to_end(&mut bytes)).map_err(io)?;
        let bad = |reason: &str| Error::Invalid { path: path.clone(), reason: reason.into() };
        if bytes.len() < 16 + 20 || !bytes.starts_with(MAGIC) {
            return Err(bad("no backup header"));
        }
        let mut head = Cursor { rest: bytes.get(8..).unwrap_or_default() };
        let version = head.u32().unwrap_or_default();
        let trailer_len = match version {
            1 => 20,
            2 => 28,
            v => return Err(bad(&format!("unknown version {v}"))),
        };
        let (body, crc) = bytes.split_at(bytes.len() - 4);
        let stored_crc = u32::from_le_bytes(crc.try_into().unwrap_or_default());
        if crc32c::crc32c(body) != stored_crc {
            return Err(bad("checksum mismatch: the file is damaged or incomplete"));
        }
        let trailer = bytes.len().checked_sub(trailer_len).ok_or_else(|| bad("no trailer"))?;
        let mut tail = Cursor { rest: bytes.get(trailer..).unwrap_or_default() };
        if tail.take(8) != Some(&END[..]) {
            return Err(bad("no trailer"));
        }
        let count = tail.u64().unwrap_or_default();
        let stream_count = if version == 1 { 0 } else { tail.u64().unwrap_or_default() };
        let position = head
            .field()
            .and_then(|p| std::str::from_utf8(p).ok())
            .ok_or_else(|| bad("bad position"))?
            .to_string();
        let start = 16 + position.len();
        if start > trailer {
            return Err(bad("the position runs past the pairs"));
        }
        let at = |c: &Cursor<'_>| trailer - c.rest.len();
        let mut c = Cursor { rest: bytes.get(start..trailer).unwrap_or_default() };
        // Every pair must parse, and there must be as many as the trailer says.
        let mut n = 0u64;
        while n < count || (version == 1 && !c.rest.is_empty()) {
            c.pair().ok_or_else(|| bad("a pair is cut short"))?;
            n += 1;
        }
        if n != count {
            return Err(bad(&format!("{n} pairs where the trailer says {count}")));
        }
        let pairs = start..at(&c);
        let mut streams = Vec::new();
        if version >= 2 {
            if c.take(8) != Some(&STREAMS[..]) {
                return Err(bad("no streams section after the pairs"));
            }
            for _ in 0..stream_count {
                let h = stream_header(&mut c).ok_or_else(|| bad("a stream is cut short"))?;
                let from = at(&c);
                for _ in 0..h.entries {
                    c.field().ok_or_else(|| bad("a stream's entries are cut short"))?;
                }
                streams.push((h, from..at(&c)));
            }
            if !c.rest.is_empty() {
                return Err(bad("bytes after the last stream"));
            }
        }
        Ok(Backup { position, pairs, bytes, count, streams })
    }

    fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        let mut c = Cursor { rest: self.bytes.get(self.pairs.clone()).unwrap_or_default() };
        // Verified by `read`.
        std::iter::from_fn(move || c.pair())
    }

    /// The streams, each with its entries.
    pub(crate) fn streams(
        &self,
    ) -> impl Iterator<Item = (&StreamHeader, impl Iterator<Item = &[u8]>)> {
        self.streams.iter().map(|(h, range)| {
            let mut c = Cursor { rest: self.bytes.get(range.clone()).unwrap_or_default() };
            (h, std::iter::from_fn(move || c.field()))
        })
    }

    /// How many streams it holds.
    pub(crate) fn stream_count(&self) -> usize {
        self.streams.len()
    }

    /// Creates the streams in `store` (which holds none of them) with their entries, durable
    /// when it returns.
    pub(crate) async fn restore_streams(
        &self,
        store: &timber_stream::Streams,
    ) -> Result<(), Error> {
        for (h, entries) in self.streams() {
            let failed = |source| Error::Stream { name: h.name.clone(), source: Box::new(source) };
            store.create_at(&h.name, h.config, h.first).await.map_err(failed)?;
            let w = store.writer(&h.name).await.map_err(failed)?;
            for e in entries {
                drop(w.send(bytes::Bytes::copy_from_slice(e)).await.map_err(failed)?);
            }
            w.flush().await.map_err(failed)?;
            w.close().await.map_err(failed)?;
        }
        Ok(())
    }

    /// Writes the pairs into a new keyspace directory `kv_dir`, synced: built beside it and
    /// renamed into place once complete, so a crash leaves either no keyspace or all of it.
    pub(crate) fn restore(&self, kv_dir: &Path) -> Result<(), Error> {
        if kv_dir.exists() {
            return Err(Error::Exists { path: kv_dir.to_path_buf() });
        }
        let building = kv_dir.with_extension("restoring");
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| Error::Io { path, source }
        };
        if building.exists() {
            // A restore that stopped half way: start over.
            std::fs::remove_dir_all(&building).map_err(io(&building))?;
        }
        self.write_into(&building)?;
        std::fs::rename(&building, kv_dir).map_err(io(kv_dir))?;
        let parent = kv_dir.parent().unwrap_or(Path::new("."));
        std::fs::File::open(parent).and_then(|d| d.sync_all()).map_err(io(parent))
    }

    fn write_into(&self, kv_dir: &Path) -> Result<(), Error> {
        let kv = |source| Error::Kv { path: kv_dir.to_path_buf(), source };
        let db = Db::open(kv_dir, timber_kv::Options::default()).map_err(kv)?;
        let mut batch = WriteBatch::new();
        let mut counter = None;
        for (k, v) in self.iter() {
            if k == timber_cluster::REVISION_KEY {
                counter = Some(v);
                continue;
            }
            batch.put(k, v);
            if batch.size() >= RESTORE_BATCH {
                db.write_with(std::mem::take(&mut batch), Durability::Buffered).map_err(kv)?;
            }
        }
        let counter = crate::revisions::restored(counter).ok_or_else(|| Error::Invalid {
            path: kv_dir.to_path_buf(),
            reason: "its revision counter is not 8 bytes".into(),
        })?;
        batch.put(timber_cluster::REVISION_KEY, counter.to_le_bytes());
        db.write_with(batch, Durability::Synced).map_err(kv)?;
        db.close().map_err(kv)
    }
}

fn stream_header(c: &mut Cursor<'_>) -> Option<StreamHeader> {
    let name = std::str::from_utf8(c.field()?).ok()?.to_string();
    let (age, bytes, first, entries) = (c.u64()?, c.u64()?, c.u64()?, c.u64()?);
    // Ids must stay below `u64::MAX` once restored.
    first.checked_add(entries)?;
    let config = StreamConfig {
        retention_age: (age != NONE).then(|| std::time::Duration::from_millis(age)),
        retention_bytes: (bytes != NONE).then_some(bytes),
    };
    Some(StreamHeader { name, config, first, entries })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;

    fn write(dir: &Path, pairs: &[(Vec<u8>, Vec<u8>)]) {
        write_with(dir, pairs, &[]);
    }

    fn write_with(
        dir: &Path,
        pairs: &[(Vec<u8>, Vec<u8>)],
        streams: &[(StreamHeader, Vec<Vec<u8>>)],
    ) {
        let mut w = Writer::new("seq:7");
        let mut bytes = Vec::new();
        for (k, v) in pairs {
            bytes.extend(w.pair(k, v).unwrap_or_default());
        }
        for (h, entries) in streams {
            bytes.extend(w.stream(h).unwrap_or_default());
            for e in entries {
                bytes.extend(w.entry(e).unwrap_or_default());
            }
        }
        bytes.extend(w.finish());
        std::fs::write(dir.join(FILE), bytes).unwrap();
    }

    fn header(name: &str, first: u64, entries: u64) -> StreamHeader {
        let config = StreamConfig {
            retention_age: Some(std::time::Duration::from_secs(3600)),
            retention_bytes: None,
        };
        StreamHeader { name: name.into(), config, first, entries }
    }

    #[tokio::test]
    async fn streams_read_back_and_restore_at_their_first_id() {
        let dir = tempfile::tempdir().unwrap();
        let big: Vec<Vec<u8>> =
            (0..2000u32).map(|i| vec![(i % 7) as u8; 700 + i as usize % 3]).collect();
        let streams = vec![
            (header("empty", 5, 0), vec![]),
            (header("big", 40, big.len() as u64), big.clone()),
        ];
        write_with(dir.path(), &[(b"k".to_vec(), b"v".to_vec())], &streams);
        let b = Backup::read(dir.path()).unwrap();
        assert_eq!((b.count, b.stream_count()), (1, 2));
        let read: Vec<(StreamHeader, Vec<Vec<u8>>)> =
            b.streams().map(|(h, e)| (h.clone(), e.map(<[u8]>::to_vec).collect())).collect();
        assert_eq!(read, streams);

        let store = timber_stream::Streams::open(dir.path().join("streams"), Default::default())
            .await
            .unwrap();
        b.restore_streams(&store).await.unwrap();
        let info = store.info("big").unwrap();
        assert_eq!((info.first_id, info.next_id, info.config), (40, 2040, streams[1].0.config));
        let mut r = store.reader("big", timber_stream::Start::At(40)).unwrap();
        for want in &big {
            assert_eq!(&r.next().await.unwrap().data[..], &want[..]);
        }
        let info = store.info("empty").unwrap();
        assert_eq!((info.first_id, info.next_id), (5, 5));
    }

    #[test]
    fn a_version_one_backup_still_reads() {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = MAGIC.to_vec();
        bytes.extend(1u32.to_le_bytes());
        bytes.extend(5u32.to_le_bytes());
        bytes.extend(b"seq:1");
        bytes.extend(1u32.to_le_bytes());
        bytes.extend(2u32.to_le_bytes());
        bytes.extend(b"ab1");
        bytes.extend(END);
        bytes.extend(1u64.to_le_bytes());
        let crc = crc32c::crc32c(&bytes);
        bytes.extend(crc.to_le_bytes());
        std::fs::write(dir.path().join(FILE), bytes).unwrap();
        let b = Backup::read(dir.path()).unwrap();
        assert_eq!((b.position.as_str(), b.count, b.stream_count()), ("seq:1", 1, 0));
        assert_eq!(b.iter().collect::<Vec<_>>(), [(&b"a"[..], &b"b1"[..])]);
    }

    #[test]
    fn a_backup_of_many_chunks_reads_back_and_restores() {
        let dir = tempfile::tempdir().unwrap();
        let pairs: Vec<(Vec<u8>, Vec<u8>)> = (0..3000u32)
            .map(|i| (format!("k{i:05}").into_bytes(), vec![(i % 251) as u8; 1000]))
            .collect();
        write(dir.path(), &pairs);
        let b = Backup::read(dir.path()).unwrap();
        assert_eq!((b.position.as_str(), b.count), ("seq:7", 3000));
        let read: Vec<(Vec<u8>, Vec<u8>)> =
            b.iter().map(|(k, v)| (k.to_vec(), v.to_vec())).collect();
        assert_eq!(read, pairs);
        let kv = dir.path().join("kv");
        b.restore(&kv).unwrap();
        let db = Db::open(&kv, timber_kv::Options::default()).unwrap();
        assert_eq!(db.get(b"k02999").unwrap().unwrap().len(), 1000);
        // And the revision counter, raised past what the source may have stamped since.
        assert_eq!(db.iter().count(), 3001);
        let counter = db.get(timber_cluster::REVISION_KEY).unwrap().unwrap();
        assert!(u64::from_le_bytes(counter[..].try_into().unwrap()) > 1 << 40);
        drop(db);
        assert!(matches!(b.restore(&kv), Err(Error::Exists { .. })));
    }

    #[test]
    fn a_cut_or_damaged_backup_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let streams = [(header("s", 0, 2), vec![b"x".to_vec(), b"yz".to_vec()])];
        write_with(
            dir.path(),
            &[(b"a".to_vec(), b"1".to_vec()), (b"b".to_vec(), b"2".to_vec())],
            &streams,
        );
        let file = dir.path().join(FILE);
        let whole = std::fs::read(&file).unwrap();
        for cut in [0, 10, whole.len() / 2, whole.len() - 1] {
            std::fs::write(&file, &whole[..cut]).unwrap();
            assert!(matches!(Backup::read(dir.path()), Err(Error::Invalid { .. })), "cut {cut}");
        }
        let mut bad = whole.clone();
        bad[20] ^= 1;
        std::fs::write(&file, &bad).unwrap();
        assert!(matches!(Backup::read(dir.path()), Err(Error::Invalid { .. })));
    }
}
