//! The meta file `wal.meta`: the first live sequence number (set by `truncate_front`), a
//! pending `truncate_back` point, so that both truncations are atomic under a crash, and how far
//! the log was durable when it was last closed.
//!
//! Format (little-endian, version 2, 56 bytes):
//! `{ magic: "TMBRMETA" | version: u32 | reserved: u32 | first_seq: u64 | cut_from: u64 | complete_below: u64 | synced_below: u64 | crc32c: u32 | reserved: u32 }`,
//! `cut_from == u64::MAX` meaning no truncation pending; the CRC covers bytes 0..48.
//! `complete_below` is the point of the last `truncate_back`: records below it are whole even if
//! the record before the cut was not the last of its batch. `synced_below`: every record below
//! it was durable when the log was closed (lowered by `truncate_back`). Version 1 (48 bytes) has
//! no `synced_below` (read as 0) and its CRC at bytes 40..44.
//!
//! Invariant: the file is replaced only by writing `wal.meta.tmp`, fsyncing it, renaming it over
//! `wal.meta` and fsyncing the directory, so it is always wholly old or wholly new.

use std::fs;
use std::io::ErrorKind;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::error::{Error, Result};
use crate::segment::{create_file, sync_dir, FORMAT_VERSION};

pub(crate) const META_FILE: &str = "wal.meta";
pub(crate) const META_TMP: &str = "wal.meta.tmp";
const MAGIC: &[u8; 8] = b"TMBRMETA";
const LEN: usize = 56;
const LEN_V1: usize = 48;
const NONE: u64 = u64::MAX;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Meta {
    /// Records before this sequence number are not part of the log.
    pub first_seq: u64,
    /// A `truncate_back` to this sequence number was started and must be finished.
    pub cut_from: Option<u64>,
    /// Records below this sequence number are never part of an unfinished batch.
    pub complete_below: u64,
    /// Records below this sequence number were durable when the log was last closed: recovery
    /// reports damage to them as corruption, never cuts it as a torn write.
    pub synced_below: u64,
}

impl Meta {
    fn encode(&self) -> [u8; LEN] {
        let mut b = [0u8; LEN];
        b[0..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        b[16..24].copy_from_slice(&self.first_seq.to_le_bytes());
        b[24..32].copy_from_slice(&self.cut_from.unwrap_or(NONE).to_le_bytes());
        b[32..40].copy_from_slice(&self.complete_below.to_le_bytes());
        b[40..48].copy_from_slice(&self.synced_below.to_le_bytes());
        let crc = crc32c::crc32c(&b[..48]);
        b[48..52].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub(crate) fn decode(b: &[u8]) -> Result<Meta, String> {
        // Every field but the CRC lies in the first 48 bytes of both versions.
        let (Some(h), Some((covered, crc)), LEN | LEN_V1) =
            (b.first_chunk::<LEN_V1>(), b.split_last_chunk::<8>(), b.len())
        else {
            return Err(format!("meta file is {} bytes, expected {LEN} (or {LEN_V1})", b.len()));
        };
        if &h[0..8] != MAGIC {
            return Err("bad meta magic".into());
        }
        let word = |w: &[u8]| u64::from_le_bytes(w.try_into().expect("8 bytes"));
        let stored = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
        let computed = crc32c::crc32c(covered);
        if stored != computed {
            return Err(format!(
                "meta checksum mismatch: stored {stored:#010x}, computed {computed:#010x}"
            ));
        }
        let version = u32::from_le_bytes(h[8..12].try_into().expect("4 bytes"));
        let expected = if b.len() == LEN { FORMAT_VERSION } else { 1 };
        if version != expected {
            return Err(format!(
                "unsupported meta format version {version} in a file of {} bytes",
                b.len()
            ));
        }
        let cut = word(&h[24..32]);
        Ok(Meta {
            first_seq: word(&h[16..24]),
            cut_from: (cut != NONE).then_some(cut),
            complete_below: word(&h[32..40]),
            synced_below: if b.len() == LEN { word(&h[40..48]) } else { 0 },
        })
    }

    /// Reads the meta file of `dir`; a missing file is the meta of a new log.
    pub(crate) fn load(dir: &Path) -> Result<Meta> {
        let path = dir.join(META_FILE);
        match fs::read(&path) {
            Ok(bytes) => Meta::decode(&bytes).map_err(|r| Error::corrupt(&path, 0, r)),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(Meta::default()),
            Err(e) => Err(Error::io("read", &path, e)),
        }
    }

    /// Atomically replaces the meta file of `dir`.
    pub(crate) fn store(&self, dir: &Path, mode: u32) -> Result<()> {
        let tmp = dir.join(META_TMP);
        let file = create_file(&tmp, mode)?;
        fail::fail_point!("wal::meta::write", |_| Err(Error::injected("write", &tmp)));
        file.write_all_at(&self.encode(), 0).map_err(|e| Error::io("write", &tmp, e))?;
        file.sync_all().map_err(|e| Error::io("fsync", &tmp, e))?;
        let path = dir.join(META_FILE);
        fail::fail_point!("wal::meta::rename", |_| Err(Error::injected("rename", &tmp)));
        fs::rename(&tmp, &path).map_err(|e| Error::io("rename", &tmp, e))?;
        sync_dir(dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn roundtrip() {
        let full = Meta { first_seq: 5, cut_from: Some(9), complete_below: 9, synced_below: 7 };
        for m in [Meta::default(), full] {
            assert_eq!(Meta::decode(&m.encode()), Ok(m));
        }
        let mut b = Meta { first_seq: 5, ..Meta::default() }.encode();
        b[20] ^= 0x10;
        assert!(Meta::decode(&b).unwrap_err().contains("checksum"));
        let mut b = full.encode();
        b[44] ^= 0x10;
        assert!(Meta::decode(&b).unwrap_err().contains("checksum"));
    }

    /// A meta file of format version 1 (48 bytes, no `synced_below`) is still read.
    #[test]
    fn version_1_is_read() {
        let mut b = [0u8; LEN_V1];
        b[0..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&1u32.to_le_bytes());
        b[16..24].copy_from_slice(&5u64.to_le_bytes());
        b[24..32].copy_from_slice(&NONE.to_le_bytes());
        b[32..40].copy_from_slice(&3u64.to_le_bytes());
        let crc = crc32c::crc32c(&b[..40]);
        b[40..44].copy_from_slice(&crc.to_le_bytes());
        let want = Meta { first_seq: 5, cut_from: None, complete_below: 3, synced_below: 0 };
        assert_eq!(Meta::decode(&b), Ok(want));
        b[8..12].copy_from_slice(&2u32.to_le_bytes());
        let crc = crc32c::crc32c(&b[..40]);
        b[40..44].copy_from_slice(&crc.to_le_bytes());
        assert!(Meta::decode(&b).unwrap_err().contains("version 2"));
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = Meta::decode(&bytes);
        }
    }
}
