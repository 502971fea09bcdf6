//! The manifest: a log of version edits saying which SSTables form the tree, from which WAL record
//! replay starts, the last sequence number and the next file number (docs/format/sstable.md).
//!
//! `MANIFEST-<id>` starts with a 16-byte header (`"TMBRMAN\0" | version u32 | 0 u32`) and a base
//! record describing the whole tree; every later record is an edit, `crc32c u32 | len u32 |
//! payload`, fsynced before the change it describes takes effect. `CURRENT` names the live
//! manifest and is replaced atomically (write, fsync, rename, fsync the directory), which is how
//! the manifest is switched to a fresh, compact one on every open.
//!
//! Recovery: a record cut short at the end of the file, or a bad record followed only by zeros,
//! is a torn append that was never acknowledged and is ignored; any other bad record is
//! `Corrupt`. A manifest without its base record is `Corrupt`.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use bytes::Bytes;

use crate::error::{Error, Result};
use crate::key::{self, get_slice, get_u64, get_varint, put_varint};
use crate::options::NUM_LEVELS;

const MAGIC: [u8; 8] = *b"TMBRMAN\0";
const VERSION: u32 = 1;
const HEADER_LEN: usize = 16;
pub(crate) const CURRENT: &str = "CURRENT";

pub(crate) fn file_name(id: u64) -> String {
    format!("MANIFEST-{id:06}")
}

/// One SSTable as the manifest records it. Keys are internal keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TableMeta {
    pub(crate) id: u64,
    pub(crate) size: u64,
    pub(crate) entries: u64,
    pub(crate) smallest: Bytes,
    pub(crate) largest: Bytes,
}

impl TableMeta {
    pub(crate) fn smallest_user(&self) -> &[u8] {
        key::user(&self.smallest)
    }

    pub(crate) fn largest_user(&self) -> &[u8] {
        key::user(&self.largest)
    }
}

/// A change to the tree.
#[derive(Debug, Clone, Default)]
pub(crate) struct Edit {
    pub(crate) log_number: Option<u64>,
    pub(crate) last_seq: Option<u64>,
    pub(crate) next_file: Option<u64>,
    pub(crate) added: Vec<(usize, TableMeta)>,
    pub(crate) deleted: Vec<(usize, u64)>,
}

impl Edit {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for (tag, v) in [(1u8, self.log_number), (2, self.last_seq), (3, self.next_file)] {
            if let Some(v) = v {
                out.push(tag);
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
        for (level, t) in &self.added {
            out.push(4);
            out.push(*level as u8);
            for v in [t.id, t.size, t.entries] {
                out.extend_from_slice(&v.to_le_bytes());
            }
            for k in [&t.smallest, &t.largest] {
                put_varint(&mut out, k.len() as u64);
                out.extend_from_slice(k);
            }
        }
        for (level, id) in &self.deleted {
            out.push(5);
            out.push(*level as u8);
            out.extend_from_slice(&id.to_le_bytes());
        }
        out
    }

    fn decode(buf: &[u8]) -> Option<Edit> {
        let mut e = Edit::default();
        let mut pos = 0;
        while let Some(&tag) = buf.get(pos) {
            pos += 1;
            match tag {
                1 => e.log_number = Some(get_u64(buf, &mut pos)?),
                2 => e.last_seq = Some(get_u64(buf, &mut pos)?),
                3 => e.next_file = Some(get_u64(buf, &mut pos)?),
                4 => {
                    let level = *buf.get(pos)? as usize;
                    pos += 1;
                    let (id, size, entries) =
                        (get_u64(buf, &mut pos)?, get_u64(buf, &mut pos)?, get_u64(buf, &mut pos)?);
                    let mut keys = [Bytes::new(), Bytes::new()];
                    for k in &mut keys {
                        let len = usize::try_from(get_varint(buf, &mut pos)?).ok()?;
                        *k = Bytes::copy_from_slice(get_slice(buf, &mut pos, len)?);
                        if !key::valid(k) {
                            return None;
                        }
                    }
                    let [smallest, largest] = keys;
                    if level >= NUM_LEVELS {
                        return None;
                    }
                    e.added.push((level, TableMeta { id, size, entries, smallest, largest }));
                }
                5 => {
                    let level = *buf.get(pos)? as usize;
                    pos += 1;
                    if level >= NUM_LEVELS {
                        return None;
                    }
                    e.deleted.push((level, get_u64(buf, &mut pos)?));
                }
                _ => return None,
            }
        }
        Some(e)
    }
}

/// The tree as the manifest describes it.
#[derive(Debug, Clone, Default)]
pub(crate) struct State {
    pub(crate) levels: Vec<BTreeMap<u64, TableMeta>>,
    pub(crate) log_number: u64,
    pub(crate) last_seq: u64,
    pub(crate) next_file: u64,
}

impl State {
    pub(crate) fn new() -> State {
        State {
            levels: vec![BTreeMap::new(); NUM_LEVELS],
            log_number: 0,
            last_seq: 0,
            next_file: 1,
        }
    }

    #[expect(
        clippy::indexing_slicing,
        reason = "levels holds NUM_LEVELS maps, and edits name levels below NUM_LEVELS \
                  (`Edit::decode` rejects others)"
    )]
    pub(crate) fn apply(&mut self, e: &Edit) {
        if let Some(v) = e.log_number {
            self.log_number = self.log_number.max(v);
        }
        if let Some(v) = e.last_seq {
            self.last_seq = self.last_seq.max(v);
        }
        if let Some(v) = e.next_file {
            self.next_file = self.next_file.max(v);
        }
        for (level, id) in &e.deleted {
            self.levels[*level].remove(id);
        }
        for (level, t) in &e.added {
            self.next_file = self.next_file.max(t.id + 1);
            self.levels[*level].insert(t.id, t.clone());
        }
    }

    /// An edit that recreates this state from nothing (the base record of a new manifest).
    pub(crate) fn base_edit(&self) -> Edit {
        Edit {
            log_number: Some(self.log_number),
            last_seq: Some(self.last_seq),
            next_file: Some(self.next_file),
            added: self
                .levels
                .iter()
                .enumerate()
                .flat_map(|(l, ts)| ts.values().map(move |t| (l, t.clone())))
                .collect(),
            deleted: vec![],
        }
    }
}

/// An open manifest file accepting edits.
#[derive(Debug)]
pub(crate) struct Manifest {
    file: File,
    path: PathBuf,
    len: u64,
    pub(crate) id: u64,
}

#[expect(clippy::indexing_slicing, reason = "`r` holds the 8-byte head, then the payload")]
fn record(payload: &[u8]) -> Vec<u8> {
    let mut r = Vec::with_capacity(payload.len() + 8);
    r.extend_from_slice(&[0; 4]);
    r.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    r.extend_from_slice(payload);
    let crc = crc32c::crc32c(&r[4..]);
    r[..4].copy_from_slice(&crc.to_le_bytes());
    r
}

pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    fail::fail_point!("kv::manifest::sync_dir", |_| Err(Error::injected("fsync", dir)));
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| Error::io("fsync", dir, e))
}

impl Manifest {
    /// Writes `MANIFEST-<id>` holding `state` as its base record and points `CURRENT` at it.
    pub(crate) fn create(dir: &Path, id: u64, state: &State) -> Result<Manifest> {
        let path = dir.join(file_name(id));
        let mut buf = Vec::with_capacity(4096);
        buf.extend_from_slice(&MAGIC);
        buf.extend_from_slice(&VERSION.to_le_bytes());
        buf.extend_from_slice(&[0; 4]);
        buf.extend_from_slice(&record(&state.base_edit().encode()));
        let mut file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(|e| Error::io("create", &path, e))?;
        fail::fail_point!("kv::manifest::create", |_| Err(Error::injected("write", &path)));
        file.write_all(&buf).map_err(|e| Error::io("write", &path, e))?;
        file.sync_all().map_err(|e| Error::io("fsync", &path, e))?;
        let tmp = dir.join("CURRENT.tmp");
        let mut cur = File::create(&tmp).map_err(|e| Error::io("create", &tmp, e))?;
        cur.write_all(format!("{}\n", file_name(id)).as_bytes())
            .and_then(|()| cur.sync_all())
            .map_err(|e| Error::io("write", &tmp, e))?;
        fail::fail_point!("kv::manifest::current", |_| Err(Error::injected("rename", &tmp)));
        fs::rename(&tmp, dir.join(CURRENT)).map_err(|e| Error::io("rename", &tmp, e))?;
        sync_dir(dir)?;
        Ok(Manifest { file, path, len: buf.len() as u64, id })
    }

    /// Appends an edit and makes it durable.
    pub(crate) fn append(&mut self, e: &Edit) -> Result<()> {
        let r = record(&e.encode());
        fail::fail_point!("kv::manifest::append", |_| Err(Error::injected("write", &self.path)));
        self.file.write_all_at(&r, self.len).map_err(|e| Error::io("write", &self.path, e))?;
        fail::fail_point!("kv::manifest::fsync", |_| Err(Error::injected("fdatasync", &self.path)));
        self.file.sync_data().map_err(|e| Error::io("fdatasync", &self.path, e))?;
        self.len += r.len() as u64;
        Ok(())
    }

    pub(crate) fn len(&self) -> u64 {
        self.len
    }
}

/// The manifest `CURRENT` names, if there is a `CURRENT`.
pub(crate) fn current(dir: &Path) -> Result<Option<(u64, PathBuf)>> {
    let path = dir.join(CURRENT);
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io("read", &path, e)),
    };
    let name = text.trim_end_matches('\n');
    let id = name
        .strip_prefix("MANIFEST-")
        .and_then(|s| s.parse::<u64>().ok())
        .filter(|&id| file_name(id) == name)
        .ok_or_else(|| Error::corrupt(&path, 0, format!("{name:?} is not a manifest name")))?;
    Ok(Some((id, dir.join(name))))
}

/// Replays a manifest file into the state it describes.
pub(crate) fn load(path: &Path) -> Result<State> {
    let buf = fs::read(path).map_err(|e| Error::io("read", path, e))?;
    let Some(header) = buf.first_chunk::<HEADER_LEN>().filter(|h| h[..8] == MAGIC) else {
        return Err(Error::corrupt(path, 0, "missing manifest header"));
    };
    let version = u32::from_le_bytes(header[8..12].try_into().expect("4 bytes"));
    if version != VERSION {
        return Err(Error::corrupt(path, 8, format!("unsupported manifest version {version}")));
    }
    let mut state = State::new();
    let mut pos = HEADER_LEN;
    let mut records = 0u64;
    while pos < buf.len() {
        let torn = |end: usize| buf.get(end..).is_none_or(|rest| rest.iter().all(|&b| b == 0));
        let Some(head) = buf.get(pos..).and_then(<[u8]>::first_chunk::<8>) else { break };
        let crc = u32::from_le_bytes(head[..4].try_into().expect("4 bytes"));
        let len = u32::from_le_bytes(head[4..].try_into().expect("4 bytes")) as usize;
        let end = pos + 8 + len;
        // The record but its checksum: its length, then its payload.
        let Some(covered) = buf.get(pos + 4..end) else {
            if torn(pos) || records > 0 {
                break;
            }
            return Err(Error::corrupt(path, pos as u64, "record runs past the end"));
        };
        if crc32c::crc32c(covered) != crc {
            if torn(end) && records > 0 {
                break;
            }
            return Err(Error::corrupt(path, pos as u64, "record checksum mismatch"));
        }
        let edit = covered
            .get(4..)
            .and_then(Edit::decode)
            .ok_or_else(|| Error::corrupt(path, pos as u64, "malformed version edit"))?;
        state.apply(&edit);
        records += 1;
        pos = end;
    }
    if records == 0 {
        return Err(Error::corrupt(path, HEADER_LEN as u64, "manifest has no base record"));
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::{make, Kind};

    fn meta(id: u64) -> TableMeta {
        TableMeta {
            id,
            size: 100 * id,
            entries: id,
            smallest: Bytes::from(make(b"a", id, Kind::Put)),
            largest: Bytes::from(make(b"z", id, Kind::Delete)),
        }
    }

    #[test]
    fn edits_replay_and_torn_tail_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = Manifest::create(dir.path(), 1, &State::new()).unwrap();
        m.append(&Edit {
            added: vec![(0, meta(3)), (0, meta(4))],
            log_number: Some(9),
            ..Edit::default()
        })
        .unwrap();
        m.append(&Edit {
            added: vec![(1, meta(5))],
            deleted: vec![(0, 3)],
            last_seq: Some(77),
            ..Edit::default()
        })
        .unwrap();
        let (id, path) = current(dir.path()).unwrap().unwrap();
        assert_eq!(id, 1);
        let s = load(&path).unwrap();
        assert_eq!(s.levels[0].keys().copied().collect::<Vec<_>>(), vec![4]);
        assert_eq!(s.levels[1][&5], meta(5));
        assert_eq!((s.log_number, s.last_seq, s.next_file), (9, 77, 6));

        let len = fs::metadata(&path).unwrap().len();
        let f = File::options().write(true).open(&path).unwrap();
        f.set_len(len - 3).unwrap();
        let s = load(&path).unwrap();
        assert!(s.levels[1].is_empty(), "the torn last edit is ignored");
        assert_eq!(s.levels[0].len(), 2);
        f.set_len(20).unwrap();
        assert!(matches!(load(&path), Err(Error::Corrupt { .. })));
    }

    /// A manifest cut anywhere (inside its header, a record's head or a payload) loads what its
    /// whole records say or is `Corrupt`; it never panics.
    #[test]
    fn every_cut_loads_or_is_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = Manifest::create(dir.path(), 1, &State::new()).unwrap();
        m.append(&Edit { added: vec![(2, meta(3))], last_seq: Some(5), ..Edit::default() })
            .unwrap();
        let path = dir.path().join(file_name(1));
        let full = fs::read(&path).unwrap();
        for len in 0..full.len() {
            fs::write(&path, &full[..len]).unwrap();
            match load(&path) {
                Ok(s) => assert!(s.levels[2].is_empty(), "a cut edit is never applied"),
                Err(Error::Corrupt { .. }) => {}
                Err(e) => panic!("cut at {len}: {e}"),
            }
        }
        // Every prefix of an edit's payload decodes to nothing or to an edit, never panics.
        let payload = Edit { added: vec![(2, meta(3))], ..Edit::default() }.encode();
        for len in 0..payload.len() {
            assert!(Edit::decode(&payload[..len]).is_none_or(|e| e.added.is_empty()));
        }
    }
}
