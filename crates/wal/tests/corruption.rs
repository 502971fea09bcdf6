//! Damaged logs: each kind of damage gives the outcome documented in docs/format/wal.md,
//! "Recovery". Offsets follow the format: a 32-byte segment header, then frames of a 20-byte
//! header plus the payload.

mod common;

use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use common::{collect, payload, segments, small};
use proptest::prelude::*;
use timber_wal::{Error, Wal};

const SEG_HEADER: u64 = 32;
const FRAME_HEADER: u64 = 20;
const LEN: usize = 100;

/// Offset of record `i` in a segment starting at `start` holding only `LEN`-byte records.
fn offset(i: u64, start: u64) -> u64 {
    SEG_HEADER + (i - start) * (FRAME_HEADER + LEN as u64)
}

fn flip(path: &Path, at: u64) {
    let f = OpenOptions::new().read(true).write(true).open(path).unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0x40], at).unwrap();
}

fn write_zeros(path: &Path, at: u64, n: usize) {
    let f = OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&vec![0u8; n], at).unwrap();
}

/// Makes a cleanly closed log look like one whose process was killed after its last sync: the
/// meta file forgets the durable point that `close` stored in it (`synced_below`, bytes 40..48,
/// CRC at 48..52). Damage to the tail after that is what a power loss can leave.
fn as_if_killed(dir: &Path) {
    let path = dir.join("wal.meta");
    let Ok(mut b) = fs::read(&path) else { return };
    assert_eq!(b.len(), 56, "meta format version 2");
    b[40..48].fill(0);
    let crc = crc32c::crc32c(&b[..48]);
    b[48..52].copy_from_slice(&crc.to_le_bytes());
    fs::write(&path, b).unwrap();
}

/// A log of `n` records of `LEN` bytes in segments of 4 KiB (32 records each), killed after its
/// last sync (see `as_if_killed`).
fn killed_log(n: u64) -> (tempfile::TempDir, Vec<PathBuf>) {
    let (dir, segs) = log(n);
    as_if_killed(dir.path());
    (dir, segs)
}

/// A log of `n` records of `LEN` bytes in segments of 4 KiB (32 records each), closed cleanly.
fn log(n: u64) -> (tempfile::TempDir, Vec<PathBuf>) {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path(), small(4096)).unwrap();
    for i in 0..n {
        wal.append(&payload(i, LEN)).unwrap();
    }
    drop(wal);
    let segs = segments(dir.path());
    (dir, segs)
}

fn open(dir: &Path) -> Result<Wal, Error> {
    Wal::open(dir, small(4096))
}

/// Opening the log in `dir` reports `file` corrupt for `what`, and leaves the file as it was.
fn assert_corrupt_untouched(dir: &Path, file: &Path, what: &str) {
    let before = fs::read(file).unwrap();
    assert_corrupt(open(dir), file, what);
    assert_eq!(fs::read(file).unwrap(), before, "a corrupt log must be left as it was");
}

fn assert_corrupt(r: Result<Wal, Error>, file: &Path, what: &str) {
    match r {
        Err(Error::Corrupt { segment, reason, .. }) => {
            assert_eq!(segment, file, "{reason}");
            assert!(reason.contains(what), "reason {reason:?} lacks {what:?}");
        }
        other => panic!("expected Corrupt in {}, got {other:?}", file.display()),
    }
}

#[test]
fn torn_tail_is_cut_and_appends_continue() {
    let (dir, segs) = killed_log(40); // records 0..32 sealed in the first segment, 32..40 in the tail
    let tail = segs.last().unwrap();
    let len = fs::metadata(tail).unwrap().len();
    fs::OpenOptions::new().write(true).open(tail).unwrap().set_len(offset(39, 32) + 50).unwrap();
    assert!(len > offset(39, 32) + 50);
    let wal = open(dir.path()).unwrap();
    assert_eq!(wal.next_seq(), 39);
    assert_eq!(wal.read(38).unwrap().to_vec(), payload(38, LEN));
    assert_eq!(wal.append(b"new").unwrap(), 39);
    drop(wal);
    assert_eq!(&open(dir.path()).unwrap().read(39).unwrap()[..], b"new");
}

#[test]
fn partial_header_at_end_of_file_is_cut() {
    let (dir, segs) = killed_log(40);
    let tail = segs.last().unwrap();
    fs::OpenOptions::new().write(true).open(tail).unwrap().set_len(offset(39, 32) + 7).unwrap();
    assert_eq!(open(dir.path()).unwrap().next_seq(), 39);
}

#[test]
fn damaged_last_record_of_the_tail_counts_as_torn() {
    let (dir, segs) = killed_log(40);
    flip(segs.last().unwrap(), offset(39, 32) + FRAME_HEADER + 10);
    let wal = open(dir.path()).unwrap();
    assert_eq!(wal.next_seq(), 39);
}

/// A log closed cleanly recorded how far it was durable: any of those records missing or
/// damaged at the tail is corruption, not a torn write, and nothing is cut.
#[test]
fn records_synced_at_close_are_never_cut() {
    let (dir, segs) = log(40);
    let tail = segs.last().unwrap();
    flip(tail, offset(39, 32) + FRAME_HEADER + 10);
    assert_corrupt_untouched(dir.path(), tail, "durable when the log was last closed");

    let (dir, segs) = log(40);
    let tail = segs.last().unwrap();
    OpenOptions::new().write(true).open(tail).unwrap().set_len(offset(37, 32)).unwrap();
    assert_corrupt(open(dir.path()), tail, "records end before record 37");

    let (dir, segs) = log(40);
    write_zeros(segs.last().unwrap(), offset(36, 32), FRAME_HEADER as usize);
    assert_corrupt(open(dir.path()), segs.last().unwrap(), "records end before record 36");

    // The whole tail segment lost: the sealed one before it is now the last.
    let (dir, segs) = log(40);
    fs::remove_file(segs.last().unwrap()).unwrap();
    assert_corrupt(open(dir.path()), &segs[0], "a segment after this one is missing");
}

/// Damage to records that later records say were synced is corruption even after a crash.
#[test]
fn damage_to_records_claimed_synced_is_corruption_after_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path(), small(4096)).unwrap();
    for i in 0..40 {
        wal.append(&payload(i, LEN)).unwrap();
        wal.sync().unwrap();
    }
    drop(wal);
    as_if_killed(dir.path());
    let tail = segments(dir.path()).pop().unwrap();
    flip(&tail, offset(37, 32) + FRAME_HEADER + 3);
    assert_corrupt_untouched(dir.path(), &tail, "were synced");
}

#[test]
fn damaged_record_inside_the_tail_is_corruption_and_files_are_untouched() {
    let (dir, segs) = log(40);
    let tail = segs.last().unwrap();
    flip(tail, offset(35, 32) + FRAME_HEADER + 3);
    assert_corrupt_untouched(dir.path(), tail, "checksum mismatch");
    // After a crash, records 33..40 (appended in `Manual` mode, never synced: their frames claim
    // only records below 32 durable) are an unsynced write, torn by the damage, and cut there.
    let (dir, segs) = killed_log(40);
    let tail = segs.last().unwrap();
    flip(tail, offset(35, 32) + FRAME_HEADER + 3);
    assert_eq!(open(dir.path()).unwrap().next_seq(), 35);
    // A damaged length field is caught too (the record would claim bytes of its successors).
    let (dir, segs) = log(40);
    flip(segs.last().unwrap(), offset(35, 32) + 5);
    assert!(matches!(open(dir.path()), Err(Error::Corrupt { .. })));
}

#[test]
fn damaged_record_in_a_sealed_segment_is_reported_on_read() {
    let (dir, segs) = log(100);
    flip(&segs[1], offset(40, 32) + FRAME_HEADER + 1);
    let wal = open(dir.path()).unwrap();
    match wal.read(40) {
        Err(Error::Corrupt { segment, offset: at, reason }) => {
            assert_eq!(segment, segs[1]);
            assert_eq!(at, offset(40, 32));
            assert!(reason.contains("record 40"), "{reason}");
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    assert_eq!(wal.read(39).unwrap().to_vec(), payload(39, LEN));
    assert_eq!(wal.read(41).unwrap().to_vec(), payload(41, LEN));
    let results: Vec<_> = wal.iter(..).collect();
    assert!(results.iter().any(|r| matches!(r, Err(Error::Corrupt { .. }))));
    assert!(results
        .iter()
        .filter_map(|r| r.as_ref().ok())
        .all(|(s, b)| b.to_vec() == payload(*s, LEN)));
}

#[test]
fn damaged_index_of_a_sealed_segment_is_reported_on_read() {
    let (dir, segs) = log(100);
    let len = fs::metadata(&segs[0]).unwrap().len();
    flip(&segs[0], len - 32 - 8); // inside the index, just before the trailer
    let wal = open(dir.path()).unwrap();
    assert!(
        matches!(wal.read(3), Err(Error::Corrupt { reason, .. }) if reason.contains("index checksum"))
    );
}

#[test]
fn damaged_trailer_or_header_is_corruption_at_open() {
    let (dir, segs) = log(100);
    let len = fs::metadata(&segs[0]).unwrap().len();
    flip(&segs[0], len - 10);
    assert_corrupt(open(dir.path()), &segs[0], "no valid trailer");

    let (dir, segs) = log(100);
    flip(&segs[1], 3);
    assert_corrupt(open(dir.path()), &segs[1], "magic");

    let (dir, segs) = log(100);
    flip(&segs[1], 17);
    assert_corrupt(open(dir.path()), &segs[1], "header checksum");
}

#[test]
fn truncated_sealed_segment_is_corruption() {
    let (dir, segs) = log(100);
    fs::OpenOptions::new().write(true).open(&segs[1]).unwrap().set_len(500).unwrap();
    assert_corrupt(open(dir.path()), &segs[1], "no valid trailer");
}

#[test]
fn zeroed_preallocated_tail_opens_cleanly() {
    let (dir, segs) = log(40);
    let tail = segs.last().unwrap();
    let f = OpenOptions::new().write(true).open(tail).unwrap();
    f.set_len(1 << 20).unwrap(); // as if preallocated and never written
    drop(f);
    let wal = open(dir.path()).unwrap();
    assert_eq!(wal.next_seq(), 40);
    assert_eq!(wal.read(39).unwrap().to_vec(), payload(39, LEN));
}

#[test]
fn zeroed_record_header_in_the_tail_ends_the_log_there() {
    // Power loss can leave a page of the last unsynced write unwritten (zeros) while a later one
    // reached the disk: a header of zeros marks space never written, and the log ends there.
    let (dir, segs) = killed_log(40);
    write_zeros(segs.last().unwrap(), offset(36, 32), FRAME_HEADER as usize);
    let wal = open(dir.path()).unwrap();
    assert_eq!(wal.next_seq(), 36);
    assert_eq!(wal.append(b"after").unwrap(), 36);
    drop(wal);
    let wal = open(dir.path()).unwrap();
    assert_eq!(wal.next_seq(), 37, "stale records behind the cut must not come back");
}

#[test]
fn unfinished_batch_at_the_tail_is_cut_whole() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path(), small(1 << 20)).unwrap();
    wal.append(&payload(0, LEN)).unwrap();
    wal.append_batch(&[payload(1, LEN), payload(2, LEN), payload(3, LEN)]).unwrap();
    drop(wal);
    as_if_killed(dir.path());
    let tail = segments(dir.path()).pop().unwrap();
    OpenOptions::new().write(true).open(&tail).unwrap().set_len(offset(3, 0) + 40).unwrap();
    let wal = Wal::open(dir.path(), small(1 << 20)).unwrap();
    assert_eq!(wal.next_seq(), 1, "records 1 and 2 belong to the torn batch");
}

#[test]
fn missing_segment_is_corruption() {
    let (dir, segs) = log(100);
    fs::remove_file(&segs[1]).unwrap();
    assert_corrupt(open(dir.path()), &segs[2], "missing");

    let (dir, segs) = log(100);
    fs::remove_file(&segs[0]).unwrap();
    assert_corrupt(open(dir.path()), &segs[1], "missing");
}

#[test]
fn corrupt_meta_file_is_corruption() {
    let (dir, _) = log(100);
    let wal = open(dir.path()).unwrap();
    wal.truncate_front(50).unwrap();
    drop(wal);
    let meta = dir.path().join("wal.meta");
    flip(&meta, 18);
    assert_corrupt(open(dir.path()), &meta, "checksum");
}

#[test]
fn short_meta_file_is_corruption() {
    let (dir, _) = log(10);
    let meta = dir.path().join("wal.meta");
    let b = fs::read(&meta).unwrap();
    for len in [0, 7, 8, 47, 55] {
        fs::write(&meta, &b[..len]).unwrap();
        assert_corrupt(open(dir.path()), &meta, &format!("meta file is {len} bytes"));
    }
}

#[test]
fn unknown_files_are_ignored_and_stale_temporaries_removed() {
    let (dir, segs) = log(10);
    fs::write(dir.path().join("notes.txt"), b"hello").unwrap();
    let tmp = dir.path().join("wal_00000000000000000010.log.tmp");
    fs::write(&tmp, b"half-created segment").unwrap();
    fs::write(dir.path().join("wal_spare.tmp"), b"half-zeroed spare").unwrap();
    let wal = Wal::open(dir.path(), small(4096).preallocate(false)).unwrap();
    assert_eq!(wal.next_seq(), 10);
    assert!(!tmp.exists());
    assert!(!dir.path().join("wal_spare.tmp").exists());
    assert!(dir.path().join("notes.txt").exists());
    assert_eq!(segments(dir.path()), segs);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Random damage anywhere in a log never panics and never yields a wrong record: every read
    /// either returns the original bytes or an error.
    #[test]
    fn random_damage_never_yields_wrong_data(
        damage in proptest::collection::vec((any::<prop::sample::Index>(), any::<prop::sample::Index>(), any::<u8>()), 1..6),
        truncate in proptest::option::of(any::<prop::sample::Index>()),
    ) {
        let (dir, segs) = log(70);
        for (file, pos, byte) in damage {
            let path = file.get(&segs);
            let len = fs::metadata(path).unwrap().len() as usize;
            let f = OpenOptions::new().write(true).open(path).unwrap();
            f.write_all_at(&[byte], pos.index(len) as u64).unwrap();
        }
        if let Some(t) = truncate {
            let path = segs.last().unwrap();
            let len = fs::metadata(path).unwrap().len() as usize;
            OpenOptions::new().write(true).open(path).unwrap().set_len(t.index(len) as u64).unwrap();
        }
        if let Ok(wal) = open(dir.path()) {
            for seq in wal.first_seq()..wal.next_seq() {
                if let Ok(b) = wal.read(seq) {
                    prop_assert_eq!(b.to_vec(), payload(seq, LEN));
                }
            }
            for (seq, b) in wal.iter(..).flatten() {
                prop_assert_eq!(b.to_vec(), payload(seq, LEN));
            }
        }
    }
}

/// A log whose tail segment is a recycled one (a segment that `truncate_front` dropped, reused):
/// records 0..32 went, 32..64 are sealed, 64..72 are in the recycled file, which still holds
/// stale records of its previous life after them. Records below `synced` are synced one by
/// one; the rest only by the close.
fn recycled_log(synced: u64) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path(), small(4096).recycle_segments(true)).unwrap();
    for i in 0..64 {
        wal.append(&payload(i, LEN)).unwrap();
    }
    wal.truncate_front(32).unwrap(); // the segment of records 0..32 is kept for reuse
    for i in 64..72 {
        wal.append(&payload(i, LEN)).unwrap(); // record 64 rolls into the recycled file
        if i < synced {
            wal.sync().unwrap();
        }
    }
    drop(wal);
    let tail = segments(dir.path()).pop().unwrap();
    let mut flags = [0u8; 4];
    fs::File::open(&tail).unwrap().read_exact_at(&mut flags, 12).unwrap();
    assert_eq!(u32::from_le_bytes(flags), 1, "the tail segment should be a recycled one");
    (dir, tail)
}

/// Damage in a recycled segment is judged like anywhere else: corruption where the records were
/// synced, a torn tail where they were not.
#[test]
fn damage_in_a_recycled_segment_is_found_like_anywhere_else() {
    let (dir, tail) = recycled_log(64);
    flip(&tail, offset(66, 64) + FRAME_HEADER + 3);
    assert_corrupt(open(dir.path()), &tail, "durable when the log was last closed");

    let (dir, tail) = recycled_log(72);
    as_if_killed(dir.path());
    flip(&tail, offset(66, 64) + FRAME_HEADER + 3);
    assert_corrupt(open(dir.path()), &tail, "were synced");

    let (dir, tail) = recycled_log(72);
    as_if_killed(dir.path());
    flip(&tail, offset(71, 64) + FRAME_HEADER + 3);
    let wal = open(dir.path()).unwrap();
    assert_eq!(wal.next_seq(), 71);
    assert_eq!(wal.read(70).unwrap().to_vec(), payload(70, LEN));

    let (dir, _) = recycled_log(64);
    let wal = open(dir.path()).unwrap();
    assert_eq!((wal.first_seq(), wal.next_seq()), (32, 72));
    assert_eq!(collect(&wal, 64..72), (64..72).map(|i| (i, payload(i, LEN))).collect::<Vec<_>>());
}

/// After a power loss, a page of a write that was never synced can hold a recycled file's old
/// bytes while later pages of the same write reached the disk. Those later records claim only
/// what was synced before them, so recovery cuts the write where it is torn instead of reporting
/// corruption, and keeps every synced record.
#[test]
fn power_loss_inside_an_unsynced_write_to_a_recycled_segment_is_a_torn_tail() {
    let (dir, tail) = recycled_log(68); // 64..68 synced, 68..72 one unsynced write
    as_if_killed(dir.path());
    let f = OpenOptions::new().write(true).open(&tail).unwrap();
    f.write_all_at(&[0xEE; 60], offset(69, 64) + FRAME_HEADER + 10).unwrap(); // old bytes
    drop(f);
    let wal = open(dir.path()).unwrap();
    assert_eq!(wal.next_seq(), 69, "the write is cut where it is torn");
    assert_eq!(collect(&wal, 32..69), (32..69).map(|i| (i, payload(i, LEN))).collect::<Vec<_>>());
    assert_eq!(wal.append(b"after").unwrap(), 69);
    drop(wal);
    let wal = open(dir.path()).unwrap();
    assert_eq!(wal.next_seq(), 70, "records behind the cut must not come back");
    assert_eq!(&wal.read(69).unwrap()[..], b"after");

    // The same damage to a synced record is corruption.
    let (dir, tail) = recycled_log(72);
    as_if_killed(dir.path());
    let f = OpenOptions::new().write(true).open(&tail).unwrap();
    f.write_all_at(&[0xEE; 60], offset(69, 64) + FRAME_HEADER + 10).unwrap();
    drop(f);
    assert_corrupt(open(dir.path()), &tail, "were synced");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// A power loss during a write that was never synced leaves each sector of it either as it was
    /// before the write (zeros, or a recycled file's old bytes) or as written, in any mix. The log
    /// must open without reporting corruption, keep every synced record, and return nothing but
    /// whole, byte-exact records.
    #[test]
    fn power_loss_keeps_synced_records_and_never_raises_a_false_alarm(
        recycle in any::<bool>(),
        synced in 0u64..16,
        more in 1u64..16,
        sectors in proptest::collection::vec(any::<bool>(), 8),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let wal = Wal::open(dir.path(), small(4096).recycle_segments(recycle)).unwrap();
        for i in 0..64 {
            wal.append(&payload(i, LEN)).unwrap();
        }
        wal.truncate_front(32).unwrap();
        for i in 64..64 + synced {
            wal.append(&payload(i, LEN)).unwrap();
            wal.sync().unwrap();
        }
        wal.append(&payload(64 + synced, LEN)).unwrap(); // rolls if nothing was synced yet
        wal.sync().unwrap();
        let tail = segments(dir.path()).pop().unwrap();
        let before = fs::read(&tail).unwrap();
        for i in 65 + synced..65 + synced + more {
            wal.append(&payload(i, LEN)).unwrap();
        }
        wal.flush().unwrap();
        let after = fs::read(&tail).unwrap();
        drop(wal);
        as_if_killed(dir.path());
        // A segment made without preallocation (a roll that did not wait for the zero-filled
        // spare) grows with the write: its sectors past the old end read back as zeros.
        let mut image = after.clone();
        for (k, &old) in sectors.iter().enumerate() {
            let range = k * 512..((k + 1) * 512).min(image.len());
            if old && range.start < image.len() {
                for (at, b) in range.clone().zip(image[range].iter_mut()) {
                    *b = before.get(at).copied().unwrap_or(0);
                }
            }
        }
        fs::write(&tail, &image).unwrap();
        let wal = open(dir.path()).unwrap();
        let next = wal.next_seq();
        prop_assert!(next >= 65 + synced, "synced records lost: next {}", next);
        prop_assert!(next <= 65 + synced + more);
        for (seq, b) in wal.iter(32..next).map(Result::unwrap) {
            prop_assert_eq!(b.to_vec(), payload(seq, LEN));
        }
    }
}
