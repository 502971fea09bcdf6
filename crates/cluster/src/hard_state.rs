//! `HardState`: what a node must remember of Raft beyond its log — the vote it cast, the last
//! log id it purged, and the last committed log id it learned — in one small file, `raft.state`
//! (format: `docs/format/raft.md`).
//!
//! Invariant: the file is replaced atomically (written to `raft.state.tmp`, fsynced, renamed,
//! directory fsynced), so after any crash it holds either the old or the new state, never a mix.
//! A file that fails its checksum is reported, never taken for a fresh node: forgetting a vote
//! could let a node vote twice in one term.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use openraft::{LogId, Vote};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

pub(crate) const FILE: &str = "raft.state";
const TMP: &str = "raft.state.tmp";
const MAGIC: &[u8; 8] = b"TMBRRAFT";
const VERSION: u32 = 1;
/// magic, version, payload length.
const HEADER_LEN: usize = 16;
/// The payload is a handful of ids; anything near this is damage, not state.
const MAX_PAYLOAD: u32 = 1 << 16;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct HardState {
    pub(crate) vote: Option<Vote<u64>>,
    pub(crate) purged: Option<LogId<u64>>,
    pub(crate) committed: Option<LogId<u64>>,
}

impl HardState {
    /// Reads the state of `dir`; a directory without the file is a fresh node.
    pub(crate) fn load(dir: &Path) -> Result<HardState> {
        let path = dir.join(FILE);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(HardState::default()),
            Err(e) => return Err(Error::io("read", path, e)),
        };
        let corrupt = |reason: &str| Error::Corrupt { path: path.clone(), reason: reason.into() };
        let (header, rest) = bytes
            .split_first_chunk::<HEADER_LEN>()
            .ok_or_else(|| corrupt("shorter than its header"))?;
        let (magic, fields) = header.split_at(8);
        if magic != MAGIC {
            return Err(corrupt("no raft state magic number"));
        }
        let le32 = |b: &[u8]| u32::from_le_bytes(b.try_into().unwrap_or_default());
        let version = le32(&fields[..4]);
        if version != VERSION {
            return Err(corrupt(&format!("unsupported version {version}")));
        }
        let len = le32(&fields[4..]);
        if len > MAX_PAYLOAD || rest.len() != len as usize + 4 {
            return Err(corrupt("length does not match the file"));
        }
        let (payload, crc) = rest.split_at(len as usize);
        if crc32c::crc32c(&bytes[..HEADER_LEN + len as usize]) != le32(crc) {
            return Err(corrupt("checksum mismatch"));
        }
        postcard::from_bytes(payload).map_err(|e| corrupt(&format!("undecodable state: {e}")))
    }

    /// Replaces the state of `dir` durably.
    pub(crate) fn store(&self, dir: &Path) -> Result<()> {
        let payload = postcard::to_stdvec(self)
            .map_err(|e| Error::Corrupt { path: dir.join(FILE), reason: e.to_string() })?;
        let mut bytes = Vec::with_capacity(HEADER_LEN + payload.len() + 4);
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&VERSION.to_le_bytes());
        bytes.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&payload);
        let crc = crc32c::crc32c(&bytes);
        bytes.extend_from_slice(&crc.to_le_bytes());

        let tmp = dir.join(TMP);
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(|e| Error::io("create", &tmp, e))?;
        f.write_all(&bytes).map_err(|e| Error::io("write", &tmp, e))?;
        f.sync_all().map_err(|e| Error::io("fsync", &tmp, e))?;
        let path = dir.join(FILE);
        fs::rename(&tmp, &path).map_err(|e| Error::io("rename", &tmp, e))?;
        sync_dir(dir)
    }
}

pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| Error::io("fsync directory", dir, e))
}

/// Removes a `raft.state.tmp` left by a crash during `store`.
pub(crate) fn remove_leftover(dir: &Path) -> Result<()> {
    let tmp: PathBuf = dir.join(TMP);
    match fs::remove_file(&tmp) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("remove", tmp, e)),
    }
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, LogId, Vote};

    use super::*;

    fn sample() -> HardState {
        HardState {
            vote: Some(Vote::new_committed(7, 2)),
            purged: Some(LogId::new(CommittedLeaderId::new(3, 1), 40)),
            committed: Some(LogId::new(CommittedLeaderId::new(7, 2), 99)),
        }
    }

    #[test]
    fn round_trips_and_a_missing_file_is_a_fresh_node() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(HardState::load(dir.path()).unwrap(), HardState::default());
        sample().store(dir.path()).unwrap();
        assert_eq!(HardState::load(dir.path()).unwrap(), sample());
        assert!(!dir.path().join(TMP).exists());
    }

    #[test]
    fn every_damaged_byte_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        sample().store(dir.path()).unwrap();
        let path = dir.path().join(FILE);
        let good = fs::read(&path).unwrap();
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x10;
            fs::write(&path, &bad).unwrap();
            assert!(matches!(HardState::load(dir.path()), Err(Error::Corrupt { .. })), "byte {i}");
        }
        for len in [0, 5, HEADER_LEN, good.len() - 1] {
            fs::write(&path, &good[..len]).unwrap();
            assert!(matches!(HardState::load(dir.path()), Err(Error::Corrupt { .. })));
        }
    }
}
