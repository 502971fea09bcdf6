//! Crash test with real processes: the test binary re-executes itself as a child (the ignored
//! `child` test), which writes synced batches from two threads while flushes and compactions run
//! constantly (tiny memtables and levels), and reports every acknowledged batch. It is killed with
//! SIGKILL at random moments; the parent reopens the database and checks it against the model of
//! acknowledged batches.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use timber_kv::{Db, Durability, Options, WriteBatch};

const ENV_DIR: &str = "TIMBER_KV_TEST_DIR";
const THREADS: u64 = 3;
const KEEP: u64 = 40;

fn opts() -> Options {
    Options::default()
        .memtable_size(32 << 10)
        .block_size(512)
        .l0_compaction_trigger(2)
        .l1_target_bytes(64 << 10)
        .level_multiplier(4)
        .target_file_size(32 << 10)
        .wal_segment_size(64 << 10)
        .durability(Durability::Synced)
}

/// Durabilities of the writers: synced, buffered (through the WAL's map), and deferred then
/// synced.
const DURABILITIES: [Durability; 3] =
    [Durability::Synced, Durability::Buffered, Durability::Deferred];

fn parts(i: u64) -> u64 {
    1 + i % 4
}

fn key(t: u64, i: u64, j: u64) -> Vec<u8> {
    format!("t{t}/{i:08}/{j}").into_bytes()
}

fn value(t: u64, i: u64, j: u64) -> Vec<u8> {
    let len = if i.is_multiple_of(13) { 2000 } else { 50 + ((i * 7 + j * 31) % 250) as usize };
    let mut v = format!("{t}:{i}:{j}:").into_bytes();
    v.resize(len, b'a' + ((i + j) % 26) as u8);
    v
}

fn next_of(db: &Db, t: u64) -> u64 {
    db.get(format!("meta/next/{t}"))
        .unwrap()
        .map_or(0, |v| std::str::from_utf8(&v).unwrap().parse().unwrap())
}

/// Batch `i` of writer `t`: its own keys, the deletion of batch `i - KEEP`'s keys, and the
/// writer's next counter.
fn batch(t: u64, i: u64) -> WriteBatch {
    let mut b = WriteBatch::new();
    for j in 0..parts(i) {
        b.put(key(t, i, j), value(t, i, j));
    }
    if i >= KEEP {
        for j in 0..parts(i - KEEP) {
            b.delete(key(t, i - KEEP, j));
        }
    }
    b.put(format!("meta/next/{t}"), (i + 1).to_string());
    b
}

#[test]
#[ignore = "run only as a child process of the test below"]
fn child() {
    let Ok(dir) = std::env::var(ENV_DIR) else { return };
    let db = Arc::new(Db::open(&dir, opts()).unwrap());
    let out = Arc::new(std::sync::Mutex::new(std::io::stdout()));
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            let (db, out) = (db.clone(), out.clone());
            std::thread::spawn(move || {
                // Each writer acknowledges at another durability; all of them survive a crash
                // of the process (buffered writes are in the page cache).
                let durability = DURABILITIES[t as usize % DURABILITIES.len()];
                for i in next_of(&db, t).. {
                    db.write_with(batch(t, i), durability).unwrap();
                    if durability == Durability::Deferred {
                        db.sync().unwrap();
                    }
                    let mut o = out.lock().unwrap();
                    writeln!(o, "A {t} {i}").unwrap();
                    o.flush().unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

fn tables(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".sst"))
        .collect()
}

#[test]
fn every_acknowledged_batch_survives_sigkill_during_flush_and_compaction() {
    let dir = tempfile::tempdir().unwrap();
    let cycles: u64 =
        std::env::var("TIMBER_CRASH_CYCLES").ok().and_then(|s| s.parse().ok()).unwrap_or(40);
    let mut rng = rand::rngs::StdRng::seed_from_u64(0xc0ffee);
    let mut floor = [0u64; THREADS as usize];
    let mut acked_total = 0u64;
    let mut interrupted = 0u64;
    for cycle in 1..=cycles {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["child", "--exact", "--ignored", "--nocapture", "--test-threads=1", "-q"])
            .env(ENV_DIR, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            BufReader::new(stdout).lines().map_while(Result::ok).collect::<Vec<String>>()
        });
        std::thread::sleep(Duration::from_millis(rng.random_range(20..200)));
        child.kill().unwrap();
        child.wait().unwrap();
        let mut acked = floor;
        for line in reader.join().unwrap() {
            let f: Vec<u64> = line.split(' ').skip(1).filter_map(|x| x.parse().ok()).collect();
            if let (Some(b'A'), &[t, i]) = (line.as_bytes().first(), f.as_slice()) {
                acked[t as usize] = acked[t as usize].max(i + 1);
                acked_total += 1;
            }
        }

        let before = tables(dir.path());
        let db = Db::open(dir.path(), opts()).unwrap_or_else(|e| panic!("cycle {cycle}: {e}"));
        if !before.is_subset(&tables(dir.path())) {
            interrupted += 1; // the kill left a table of an unfinished flush or compaction
        }
        for t in 0..THREADS {
            let next = next_of(&db, t);
            let a = acked[t as usize];
            assert!(
                next >= a,
                "cycle {cycle}: writer {t} acked batch {} but next is {next}",
                a - 1
            );
            assert!(
                next <= a + 1,
                "cycle {cycle}: writer {t} next {next} beyond one in-flight batch"
            );
            let want: Vec<(Vec<u8>, Vec<u8>)> = (next.saturating_sub(KEEP)..next)
                .flat_map(|i| (0..parts(i)).map(move |j| (key(t, i, j), value(t, i, j))))
                .collect();
            let got: Vec<(Vec<u8>, Vec<u8>)> = db
                .prefix(format!("t{t}/"))
                .map(|r| r.map(|(k, v)| (k.to_vec(), v.to_vec())))
                .collect::<Result<_, _>>()
                .unwrap_or_else(|e| panic!("cycle {cycle}: {e}"));
            assert_eq!(got.len(), want.len(), "cycle {cycle}: writer {t} at {next}");
            assert!(got == want, "cycle {cycle}: writer {t}: contents differ from the model");
            let rev: Vec<Vec<u8>> =
                db.prefix(format!("t{t}/")).rev().map(|r| r.unwrap().0.to_vec()).collect();
            assert!(
                rev.iter().rev().eq(want.iter().map(|(k, _)| k)),
                "cycle {cycle}: reverse scan"
            );
            floor[t as usize] = next;
        }
    }
    assert!(acked_total > 200, "only {acked_total} acknowledged batches: the test did little");
    assert!(interrupted > 0, "no kill landed inside a flush or compaction in {cycles} cycles");
    eprintln!("{acked_total} acked batches, {interrupted} kills inside flush/compaction");
}
