//! Backups of the keyspace: what `Admin.Backup` streams (a snapshot of the engine taken when
//! the call begins, while the server goes on serving) and what `timberd --restore-from` loads
//! into a new data directory. Format: `docs/format/backup.md`.
//!
//! Invariants: a backup holds exactly the keyspace's pairs at one engine snapshot, with the
//! position of that snapshot (the engine's sequence number on a single node, the applied Raft
//! log id on a cluster member); a restore verifies the whole file (magic, version, checksum,
//! count) before it writes anything, and writes into a keyspace directory that did not exist.

use std::io::Read;
use std::path::{Path, PathBuf};

use timber_kv::{Db, Durability, WriteBatch};

/// The file a backup directory holds.
pub(crate) const FILE: &str = "keyspace.backup";
const MAGIC: &[u8; 8] = b"TMBRBKUP";
const END: &[u8; 8] = b"TMBREND.";
const VERSION: u32 = 1;
/// Bytes of pairs per streamed chunk.
pub(crate) const CHUNK: usize = 1 << 20;
/// Bytes of pairs per write batch of a restore.
const RESTORE_BATCH: usize = 4 << 20;

/// Builds a backup's bytes as chunks: the header, the pairs, the trailer.
pub(crate) struct Writer {
    buf: Vec<u8>,
    crc: u32,
    count: u64,
}

impl Writer {
    /// Starts a backup at `position` (`seq:<n>` or `raft:<term>-<node>-<index>`).
    pub(crate) fn new(position: &str) -> Writer {
        let mut buf = Vec::with_capacity(CHUNK + 1024);
        buf.extend_from_slice(MAGIC);
        buf.extend_from_slice(&VERSION.to_le_bytes());
        buf.extend_from_slice(&(position.len() as u32).to_le_bytes());
        buf.extend_from_slice(position.as_bytes());
        Writer { buf, crc: 0, count: 0 }
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

    fn take(&mut self) -> Vec<u8> {
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK + 1024));
        self.crc = crc32c::crc32c_append(self.crc, &chunk);
        chunk
    }

    /// The last chunk: what is left, and the trailer (count and checksum of every byte before).
    pub(crate) fn finish(mut self) -> Vec<u8> {
        let mut last = std::mem::take(&mut self.buf);
        last.extend_from_slice(END);
        last.extend_from_slice(&self.count.to_le_bytes());
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
}

/// A verified backup, in memory.
pub(crate) struct Backup {
    pub(crate) position: String,
    bytes: Vec<u8>,
    /// Where the pairs start and end in `bytes`.
    pairs: std::ops::Range<usize>,
    pub(crate) count: u64,
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
        let u32_at = |at: usize| -> u32 {
            let mut b = [0u8; 4];
            b.copy_from_slice(bytes.get(at..at + 4).unwrap_or(&[0; 4]));
            u32::from_le_bytes(b)
        };
        if u32_at(8) != VERSION {
            return Err(bad(&format!("unknown version {}", u32_at(8))));
        }
        let trailer = bytes.len() - 20;
        let stored_crc = u32_at(bytes.len() - 4);
        if crc32c::crc32c(bytes.get(..bytes.len() - 4).unwrap_or_default()) != stored_crc {
            return Err(bad("checksum mismatch: the file is damaged or incomplete"));
        }
        if bytes.get(trailer..trailer + 8) != Some(&END[..]) {
            return Err(bad("no trailer"));
        }
        let mut count = [0u8; 8];
        count.copy_from_slice(bytes.get(trailer + 8..trailer + 16).unwrap_or(&[0; 8]));
        let count = u64::from_le_bytes(count);
        let plen = u32_at(12) as usize;
        if 16 + plen > trailer {
            return Err(bad("the position runs past the pairs"));
        }
        let position = bytes
            .get(16..16 + plen)
            .and_then(|p| std::str::from_utf8(p).ok())
            .ok_or_else(|| bad("bad position"))?
            .to_string();
        let b = Backup { position, pairs: 16 + plen..trailer, bytes, count };
        // Every pair must parse, and there must be as many as the trailer says.
        let mut n = 0u64;
        for p in b.iter() {
            p.map_err(|reason| bad(&reason))?;
            n += 1;
        }
        if n != count {
            return Err(bad(&format!("{n} pairs where the trailer says {count}")));
        }
        Ok(b)
    }

    fn iter(&self) -> impl Iterator<Item = Result<(&[u8], &[u8]), String>> {
        let mut rest = self.bytes.get(self.pairs.clone()).unwrap_or_default();
        std::iter::from_fn(move || {
            if rest.is_empty() {
                return None;
            }
            let len = |at: usize| {
                rest.get(at..at + 4)
                    .and_then(|b| <[u8; 4]>::try_from(b).ok())
                    .map(|b| u32::from_le_bytes(b) as usize)
            };
            let (Some(k), Some(v)) = (len(0), len(4)) else {
                rest = &[];
                return Some(Err("a pair is cut short".into()));
            };
            match (rest.get(8..8 + k), rest.get(8 + k..8 + k + v)) {
                (Some(key), Some(value)) => {
                    rest = rest.get(8 + k + v..).unwrap_or_default();
                    Some(Ok((key, value)))
                }
                _ => {
                    rest = &[];
                    Some(Err("a pair is cut short".into()))
                }
            }
        })
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
        for p in self.iter() {
            let Ok((k, v)) = p else { continue }; // verified by `read`
            batch.put(k, v);
            if batch.size() >= RESTORE_BATCH {
                db.write_with(std::mem::take(&mut batch), Durability::Buffered).map_err(kv)?;
            }
        }
        db.write_with(batch, Durability::Synced).map_err(kv)?;
        db.close().map_err(kv)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;

    fn write(dir: &Path, pairs: &[(Vec<u8>, Vec<u8>)]) {
        let mut w = Writer::new("seq:7");
        let mut bytes = Vec::new();
        for (k, v) in pairs {
            if let Some(chunk) = w.pair(k, v) {
                bytes.extend(chunk);
            }
        }
        bytes.extend(w.finish());
        std::fs::write(dir.join(FILE), bytes).unwrap();
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
            b.iter().map(|p| p.map(|(k, v)| (k.to_vec(), v.to_vec())).unwrap()).collect();
        assert_eq!(read, pairs);
        let kv = dir.path().join("kv");
        b.restore(&kv).unwrap();
        let db = Db::open(&kv, timber_kv::Options::default()).unwrap();
        assert_eq!(db.get(b"k02999").unwrap().unwrap().len(), 1000);
        assert_eq!(db.iter().count(), 3000);
        drop(db);
        assert!(matches!(b.restore(&kv), Err(Error::Exists { .. })));
    }

    #[test]
    fn a_cut_or_damaged_backup_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), &[(b"a".to_vec(), b"1".to_vec()), (b"b".to_vec(), b"2".to_vec())]);
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
