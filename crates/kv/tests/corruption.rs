//! Corruption: flipped bytes in every part of an SSTable, damaged manifests and CURRENT files.
//! Each is reported as `Error::Corrupt` naming the file (and the block's offset), never as wrong
//! data, and the files are left as found.

use std::fs;
use std::path::{Path, PathBuf};

use timber_kv::{Db, Error, Options};

fn opts() -> Options {
    Options::default().memtable_size(1 << 20).block_size(1024)
}

fn key(i: u32) -> Vec<u8> {
    format!("key{i:06}").into_bytes()
}

/// A database with one table holding keys 0..2000, and nothing in the WAL.
fn one_table(dir: &Path) -> PathBuf {
    let db = Db::open(dir, opts()).unwrap();
    for i in 0..2000 {
        db.put(key(i), format!("value{i}")).unwrap();
    }
    db.flush().unwrap();
    drop(db);
    let mut t = tables(dir);
    assert_eq!(t.len(), 1);
    t.pop().unwrap()
}

fn tables(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "sst"))
        .collect();
    v.sort();
    v
}

fn flip(path: &Path, offset: u64) {
    let mut b = fs::read(path).unwrap();
    b[offset as usize] ^= 0x40;
    fs::write(path, b).unwrap();
}

/// (index offset, filter offset, file length) from the footer.
fn layout(path: &Path) -> (u64, u64, u64) {
    let b = fs::read(path).unwrap();
    let f = &b[b.len() - 48..];
    let le64 = |s: &[u8]| u64::from_le_bytes(s.try_into().unwrap());
    (le64(&f[0..8]), le64(&f[12..20]), b.len() as u64)
}

fn assert_corrupt<T: std::fmt::Debug>(r: timber_kv::Result<T>, file: &Path) -> u64 {
    match r {
        Err(Error::Corrupt { path, offset, reason }) => {
            assert_eq!(path, file, "names the file ({reason})");
            offset
        }
        other => panic!("expected Corrupt naming {}, got {other:?}", file.display()),
    }
}

#[test]
fn flipped_byte_in_a_data_block_is_reported_on_read() {
    let dir = tempfile::tempdir().unwrap();
    let t = one_table(dir.path());
    let before = fs::read(&t).unwrap();
    flip(&t, 10);
    let db = Db::open(dir.path(), opts()).unwrap();
    let off = assert_corrupt(db.get(key(0)), &t);
    assert_eq!(off, 0, "the first data block");
    let results: Vec<_> = db.iter().collect();
    assert!(matches!(results.last(), Some(Err(Error::Corrupt { .. }))));
    assert_eq!(results.len(), 1, "no data from the corrupt block is returned");
    // A key in another block still reads, and the file was not touched.
    assert_eq!(db.get(key(1999)).unwrap().as_deref(), Some(&b"value1999"[..]));
    drop(db);
    let mut after = fs::read(&t).unwrap();
    after[10] ^= 0x40;
    assert_eq!(after, before);
}

#[test]
fn malformed_entry_under_a_valid_checksum_is_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let t = one_table(dir.path());
    let mut b = fs::read(&t).unwrap();
    // The first data block ends where a raw-block trailer (type 0, crc32c) matches what precedes
    // it.
    let len = (1..4096)
        .find(|&n| {
            let crc = crc32c::crc32c_append(crc32c::crc32c(&b[..n]), &[0]);
            b[n] == 0 && crc.to_le_bytes() == b[n + 1..n + 5]
        })
        .expect("the first block's trailer");
    // The first entry claims to share a byte with a key before it; the checksum is made to
    // match, so only the block's own checks can catch it.
    b[0] = 1;
    let crc = crc32c::crc32c_append(crc32c::crc32c(&b[..len]), &[0]);
    b[len + 1..len + 5].copy_from_slice(&crc.to_le_bytes());
    fs::write(&t, &b).unwrap();
    let db = Db::open(dir.path(), opts()).unwrap();
    assert_eq!(assert_corrupt(db.get(key(0)), &t), 0);
    let mut it = db.iter();
    assert_eq!(assert_corrupt(it.next_ref().unwrap(), &t), 0);
    assert!(it.next_ref().is_none(), "an error ends the iteration");
    let back: Vec<_> = db.iter().rev().collect();
    assert!(matches!(back.last(), Some(Err(Error::Corrupt { .. }))), "{back:?}");
    assert_eq!(db.get(key(1999)).unwrap().as_deref(), Some(&b"value1999"[..]));
}

#[test]
fn flipped_byte_in_index_filter_or_footer_fails_open() {
    for part in ["index", "filter", "footer", "magic"] {
        let dir = tempfile::tempdir().unwrap();
        let t = one_table(dir.path());
        let (index, filter, len) = layout(&t);
        let at = match part {
            "index" => index + 3,
            "filter" => filter + 5,
            "footer" => len - 40,
            _ => len - 2,
        };
        flip(&t, at);
        assert_corrupt(Db::open(dir.path(), opts()), &t);
    }
}

/// Index and filter blocks kept in a cache that holds nothing are read again by every lookup:
/// one damaged after the table was opened is reported when it is read, naming the file and the
/// block, and a lookup that needs no damaged block still answers.
#[test]
fn index_or_filter_damaged_after_open_is_reported_when_read_again() {
    for part in ["index", "filter"] {
        let dir = tempfile::tempdir().unwrap();
        let t = one_table(dir.path());
        let (index, filter, _) = layout(&t);
        let db =
            Db::open(dir.path(), opts().block_cache_bytes(0).cache_index_and_filter_blocks(true))
                .unwrap();
        assert_eq!(db.get(key(5)).unwrap().as_deref(), Some(&b"value5"[..]));
        flip(&t, if part == "index" { index + 3 } else { filter + 5 });
        let off = assert_corrupt(db.get(key(5)), &t);
        assert_eq!(off, if part == "index" { index } else { filter }, "{part}");
        if part == "index" {
            let results: Vec<_> = db.iter().collect();
            assert!(matches!(results[..], [Err(Error::Corrupt { .. })]), "{results:?}");
        } else {
            // A scan reads no filter.
            assert_eq!(db.iter().count(), 2000);
        }
    }
}

/// An index block under a valid checksum whose key is shorter than the 8-byte tag of an
/// internal key: open reports it instead of panicking on the key.
#[test]
fn index_key_shorter_than_a_tag_fails_open() {
    let dir = tempfile::tempdir().unwrap();
    let t = one_table(dir.path());
    let (index, _, _) = layout(&t);
    let b = fs::read(&t).unwrap();
    let mut footer = b[b.len() - 48..].to_vec();
    // One entry (no shared bytes, a 3-byte key, a 12-byte handle), one restart point at 0.
    let mut block = vec![0, 3, 12];
    block.extend_from_slice(b"abc");
    block.extend_from_slice(&[0; 12]);
    block.extend_from_slice(&0u32.to_le_bytes());
    block.extend_from_slice(&1u32.to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&block), &[0]);
    footer[8..12].copy_from_slice(&(block.len() as u32).to_le_bytes());
    let footer_crc = crc32c::crc32c(&footer[..36]);
    footer[36..40].copy_from_slice(&footer_crc.to_le_bytes());
    let mut file = b[..index as usize].to_vec();
    file.extend_from_slice(&block);
    file.push(0);
    file.extend_from_slice(&crc.to_le_bytes());
    file.extend_from_slice(&footer);
    fs::write(&t, file).unwrap();
    assert_eq!(assert_corrupt(Db::open(dir.path(), opts()), &t), index);
}

#[test]
fn truncated_table_fails_open() {
    let dir = tempfile::tempdir().unwrap();
    let t = one_table(dir.path());
    let len = fs::metadata(&t).unwrap().len();
    fs::File::options().write(true).open(&t).unwrap().set_len(len - 10).unwrap();
    assert_corrupt(Db::open(dir.path(), opts()), &t);
}

/// WAL records that decode as batches but hold no write, or number their writes at 0 or past the
/// largest sequence number, are corrupt (replay computed the batch's last number from them).
#[test]
fn wal_batches_numbered_out_of_range_are_corrupt() {
    let empty_at_0 = vec![0u8; 12];
    let mut past_the_last = (u64::MAX - 1).to_le_bytes().to_vec();
    past_the_last.extend_from_slice(&2u32.to_le_bytes());
    for k in [b'a', b'b'] {
        past_the_last.extend_from_slice(&[0, 1, k]); // a delete of a one-byte key
    }
    for (i, rec) in [empty_at_0, past_the_last].iter().enumerate() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path(), opts()).unwrap();
        db.put(key(1), "v").unwrap();
        drop(db);
        let wal =
            timber_wal::Wal::open(dir.path().join("wal"), timber_wal::Options::default()).unwrap();
        wal.append(rec).unwrap();
        drop(wal);
        match Db::open(dir.path(), opts()) {
            Err(Error::Corrupt { reason, .. }) => assert!(reason.contains("not a valid batch")),
            other => panic!("record {i}: expected Corrupt, got {other:?}"),
        }
    }
}

fn manifest(dir: &Path) -> PathBuf {
    let name = fs::read_to_string(dir.join("CURRENT")).unwrap();
    dir.join(name.trim())
}

#[test]
fn manifest_cut_inside_its_header_or_base_record() {
    for keep in [5u64, 20] {
        let dir = tempfile::tempdir().unwrap();
        one_table(dir.path());
        let m = manifest(dir.path());
        fs::File::options().write(true).open(&m).unwrap().set_len(keep).unwrap();
        assert_corrupt(Db::open(dir.path(), opts()), &m);
    }
}

#[test]
fn manifest_that_lost_a_flush_edit_is_detected_through_the_wal() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path(), opts().wal_segment_size(16 << 10)).unwrap();
    let m = manifest(dir.path());
    let base_len = fs::metadata(&m).unwrap().len();
    for i in 0..2000 {
        db.put(key(i), format!("value{i}")).unwrap();
    }
    db.flush().unwrap();
    drop(db);
    // Cut the manifest back to its base record: the flush edit (and the WAL records it let go) are
    // gone.
    fs::File::options().write(true).open(&m).unwrap().set_len(base_len).unwrap();
    let err = Db::open(dir.path(), opts()).unwrap_err();
    assert!(matches!(&err, Error::Corrupt { reason, .. } if reason.contains("missing")), "{err:?}");
}

#[test]
fn manifest_naming_a_missing_table_and_bad_current() {
    let dir = tempfile::tempdir().unwrap();
    let t = one_table(dir.path());
    fs::remove_file(&t).unwrap();
    let err = Db::open(dir.path(), opts()).unwrap_err();
    assert!(matches!(&err, Error::Corrupt { reason, .. } if reason.contains("missing")), "{err:?}");

    let dir = tempfile::tempdir().unwrap();
    one_table(dir.path());
    fs::write(dir.path().join("CURRENT"), "garbage\n").unwrap();
    assert_corrupt(Db::open(dir.path(), opts()), &dir.path().join("CURRENT"));

    let dir = tempfile::tempdir().unwrap();
    one_table(dir.path());
    fs::remove_file(dir.path().join("CURRENT")).unwrap();
    assert!(matches!(Db::open(dir.path(), opts()), Err(Error::Corrupt { .. })));
}

#[test]
fn flipped_byte_in_a_manifest_edit_is_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path(), opts()).unwrap();
    for round in 0..3 {
        for i in 0..500 {
            db.put(key(i), format!("value{i}-{round}")).unwrap();
        }
        db.flush().unwrap();
    }
    let m = manifest(dir.path());
    drop(db);
    // The reopen rewrote the manifest: one base record. Damage a byte inside it.
    flip(&m, 30);
    assert_corrupt(Db::open(dir.path(), opts()), &m);
}
