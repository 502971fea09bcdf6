//! Databases written by format version 1 (docs/format/sstable.md) open and read the same.

use std::path::Path;

use bytes::Bytes;
use timber_kv::{Db, Options};

/// What the fixture holds: keys with one to three versions, a key with 200 versions across
/// data blocks, and every seventh key deleted.
fn model() -> std::collections::BTreeMap<Vec<u8>, Vec<u8>> {
    let mut m = std::collections::BTreeMap::new();
    for i in 0..3000u32 {
        let versions = i % 3 + 1;
        m.insert(format!("key{i:05}").into_bytes(), format!("v{i}-{versions}").into_bytes());
    }
    m.insert(b"key01500hot".to_vec(), b"hot-199".to_vec());
    for i in (0..3000u32).step_by(7) {
        m.remove(format!("key{i:05}").as_bytes());
    }
    m
}

fn copy(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

fn check(db: &Db) {
    let want = model();
    let got: Vec<(Bytes, Bytes)> = db.iter().map(|r| r.unwrap()).collect();
    assert!(got
        .iter()
        .map(|(k, v)| (&k[..], &v[..]))
        .eq(want.iter().map(|(k, v)| (&k[..], &v[..]))));
    let back: Vec<(Bytes, Bytes)> = db.iter().rev().map(|r| r.unwrap()).collect();
    assert_eq!(back.len(), want.len());
    for i in 0..3000u32 {
        let k = format!("key{i:05}");
        assert_eq!(db.get(&k).unwrap().as_deref(), want.get(k.as_bytes()).map(|v| &v[..]), "{k}");
    }
    assert_eq!(db.get(b"key01500hot").unwrap().as_deref(), Some(&b"hot-199"[..]));
    assert_eq!(db.get(b"key01500hou").unwrap(), None);
}

/// A version 1 database (`tests/fixtures/v1`: one table of 256-byte blocks, written with every
/// version kept) reads as it was written, compacts into tables of the current version, and
/// reads the same after that and after a reopen.
#[test]
fn a_version_1_database_reads_compacts_and_reopens() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v1");
    copy(&fixture, dir.path());
    let opts = || Options::default().block_size(256);
    {
        let db = Db::open(dir.path(), opts()).unwrap();
        check(&db);
        db.put(b"key00000", b"new").unwrap();
        db.delete(b"key00000").unwrap();
        db.compact_range::<&[u8]>(..).unwrap();
        check(&db);
        db.close().unwrap();
    }
    let db = Db::open(dir.path(), opts()).unwrap();
    check(&db);
    // Every table left is of the current version (the footer's bytes 32..36).
    let mut tables = 0;
    for e in std::fs::read_dir(dir.path()).unwrap() {
        let path = e.unwrap().path();
        if path.extension().is_some_and(|x| x == "sst") {
            let bytes = std::fs::read(&path).unwrap();
            let footer = &bytes[bytes.len() - 48..];
            assert_eq!(footer[32..36], 2u32.to_le_bytes(), "{}", path.display());
            tables += 1;
        }
    }
    assert!(tables > 0);
}
