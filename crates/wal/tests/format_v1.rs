//! Logs written in format version 1 (frames without synced claims, a 48-byte meta file) still
//! open and read, keep version 1's recovery rule, and take new appends.

mod common;

use std::fs;
use std::path::Path;

use common::{collect, payload, small};
use timber_wal::{Error, Wal};

const LEN: usize = 100;

/// A version 1 segment header for a segment starting at `start`.
fn header_v1(start: u64) -> Vec<u8> {
    let mut h = vec![0u8; 32];
    h[0..8].copy_from_slice(b"TMBRWAL\0");
    h[8..12].copy_from_slice(&1u32.to_le_bytes());
    h[16..24].copy_from_slice(&start.to_le_bytes());
    let crc = crc32c::crc32c(&h[..28]);
    h[28..32].copy_from_slice(&crc.to_le_bytes());
    h
}

/// A version 1 frame: flags hold only `LAST`.
fn frame_v1(buf: &mut Vec<u8>, seq: u64, payload: &[u8]) {
    let start = buf.len();
    buf.extend_from_slice(&[0; 4]);
    buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    buf.extend_from_slice(&seq.to_le_bytes());
    buf.extend_from_slice(&1u32.to_le_bytes());
    buf.extend_from_slice(payload);
    let crc = crc32c::crc32c(&buf[start + 4..]);
    buf[start..start + 4].copy_from_slice(&crc.to_le_bytes());
}

/// A version 1 meta file with `first_seq` and nothing pending.
fn meta_v1(dir: &Path, first_seq: u64) {
    let mut b = vec![0u8; 48];
    b[0..8].copy_from_slice(b"TMBRMETA");
    b[8..12].copy_from_slice(&1u32.to_le_bytes());
    b[16..24].copy_from_slice(&first_seq.to_le_bytes());
    b[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
    let crc = crc32c::crc32c(&b[..40]);
    b[40..44].copy_from_slice(&crc.to_le_bytes());
    fs::write(dir.join("wal.meta"), b).unwrap();
}

/// A version 1 log of one unsealed segment holding records 10..20, the first of them dropped.
fn log_v1(damage: Option<u64>) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let mut seg = header_v1(10);
    for seq in 10..20 {
        let at = seg.len();
        frame_v1(&mut seg, seq, &payload(seq, LEN));
        if damage == Some(seq) {
            seg[at + 27] ^= 1; // a payload byte, after the checksum was computed
        }
    }
    fs::write(dir.path().join("wal_00000000000000000010.log"), seg).unwrap();
    meta_v1(dir.path(), 12);
    dir
}

#[test]
fn a_version_1_log_opens_reads_and_takes_appends() {
    let dir = log_v1(None);
    let wal = Wal::open(dir.path(), small(1 << 20)).unwrap();
    assert_eq!((wal.first_seq(), wal.next_seq()), (12, 20));
    assert_eq!(collect(&wal, 12..20), (12..20).map(|i| (i, payload(i, LEN))).collect::<Vec<_>>());
    assert_eq!(wal.append(b"new").unwrap(), 20);
    wal.truncate_front(14).unwrap(); // rewrites the meta file in the current version
    drop(wal);
    let wal = Wal::open(dir.path(), small(1 << 20)).unwrap();
    assert_eq!((wal.first_seq(), wal.next_seq()), (14, 21));
    assert_eq!(wal.read(19).unwrap().to_vec(), payload(19, LEN));
    assert_eq!(&wal.read(20).unwrap()[..], b"new");
}

/// Version 1 frames carry no claims: damage followed by any valid record is corruption, as
/// version 1 decided, and damage to the last record is a torn tail.
#[test]
fn a_version_1_tail_keeps_the_version_1_recovery_rule() {
    let dir = log_v1(Some(15));
    match Wal::open(dir.path(), small(1 << 20)) {
        Err(Error::Corrupt { reason, .. }) => {
            assert!(reason.contains("a valid record 16 follows"), "{reason}")
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    let dir = log_v1(Some(19));
    let wal = Wal::open(dir.path(), small(1 << 20)).unwrap();
    assert_eq!(wal.next_seq(), 19);
}
