//! Crash and multi-process tests with real processes: the test binary re-executes itself as a
//! child (the `#[ignore]`d `child` test, selected by an environment variable), which works on a
//! log and is killed with SIGKILL.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use timber_wal::{Error, Options, SyncMode, Wal};

const ENV_DIR: &str = "TIMBER_WAL_TEST_DIR";
const ENV_ROLE: &str = "TIMBER_WAL_TEST_ROLE";
const ENV_CYCLE: &str = "TIMBER_WAL_TEST_CYCLE";
const THREADS: u64 = 4;

fn opts() -> Options {
    // Recycled segments on: a SIGKILL must not make their stale records matter either.
    Options::default().segment_capacity(64 << 10).sync(SyncMode::Always).recycle_segments(true)
}

/// The options of a role: `append` acknowledges durable records (`SyncMode::Always`),
/// `append-flushed` records handed to the OS by `flush` (`SyncMode::Manual`, through the map of
/// the preallocated segment), which must survive a crash of the process, and
/// `append-flushed-kicked` the same in `SyncMode::Interval` with `bytes_per_sync`;
/// `append-overlapping` acknowledges durable records with three group commits allowed on the
/// disk at once.
fn role_opts(role: &str) -> Options {
    match role {
        "append-flushed" => opts().sync(SyncMode::Manual),
        // The sync thread syncs every few ms and starts writeback every 4 KiB, replacing the
        // map's window each time, while the appenders copy records through it.
        "append-flushed-kicked" => {
            opts().sync(SyncMode::Interval(Duration::from_millis(3))).bytes_per_sync(Some(4096))
        }
        "append-overlapping" => opts().syncs_in_flight(3),
        _ => opts(),
    }
}

/// Identity of a record: (writer, counter, index in batch, batch size).
type Id = (u64, u64, u32, u32);

fn encode(id: Id) -> Vec<u8> {
    let (w, c, i, k) = id;
    let mut v = Vec::new();
    v.extend_from_slice(&w.to_le_bytes());
    v.extend_from_slice(&c.to_le_bytes());
    v.extend_from_slice(&i.to_le_bytes());
    v.extend_from_slice(&k.to_le_bytes());
    let filler = ((w * 31 + c * 7 + u64::from(i)) % 300) as usize;
    v.extend(common::payload(w ^ (c << 20) ^ u64::from(i), filler));
    v
}

fn decode(b: &[u8]) -> Option<Id> {
    if b.len() < 24 {
        return None;
    }
    let id = (
        u64::from_le_bytes(b[0..8].try_into().ok()?),
        u64::from_le_bytes(b[8..16].try_into().ok()?),
        u32::from_le_bytes(b[16..20].try_into().ok()?),
        u32::from_le_bytes(b[20..24].try_into().ok()?),
    );
    (encode(id) == b).then_some(id)
}

/// The child: appends from several threads and reports every acknowledged batch on stdout as
/// `A start end writer counter`, and every completed front truncation as `T seq`. In the role
/// `append-flushed` a batch is acknowledged once `flush` returns.
#[test]
#[ignore = "run only as a child process of the tests below"]
fn child() {
    let Ok(dir) = std::env::var(ENV_DIR) else { return };
    match std::env::var(ENV_ROLE).as_deref() {
        Ok("hold-lock") => {
            let _wal = Wal::open(&dir, opts()).unwrap();
            println!("locked");
            std::thread::sleep(Duration::from_secs(600));
        }
        Ok("try-open") => match Wal::open(&dir, opts()) {
            Ok(_) => std::process::exit(0),
            Err(e @ Error::Locked { .. }) => {
                println!("{e}");
                std::process::exit(3)
            }
            Err(e) => panic!("unexpected error {e}"),
        },
        Ok(role) => append_until_killed(&dir, role),
        Err(_) => panic!("{ENV_ROLE} not set"),
    }
}

fn append_until_killed(dir: &str, role: &str) {
    let cycle: u64 = std::env::var(ENV_CYCLE).unwrap().parse().unwrap();
    let flushed = role.starts_with("append-flushed");
    let wal = Arc::new(Wal::open(dir, role_opts(role)).unwrap());
    let out = Arc::new(std::sync::Mutex::new(std::io::stdout()));
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            let (wal, out) = (wal.clone(), out.clone());
            std::thread::spawn(move || {
                let writer = cycle * 100 + t;
                let mut rng = rand::rngs::StdRng::seed_from_u64(writer);
                for counter in 0.. {
                    let k: u32 = if rng.random_bool(0.25) { rng.random_range(2..=4) } else { 1 };
                    let batch: Vec<Vec<u8>> =
                        (0..k).map(|i| encode((writer, counter, i, k))).collect();
                    let r = wal.append_batch(&batch).unwrap();
                    if flushed {
                        wal.flush().unwrap();
                    }
                    let mut o = out.lock().unwrap();
                    writeln!(o, "A {} {} {writer} {counter}", r.start, r.end).unwrap();
                    o.flush().unwrap();
                    drop(o);
                    if t == 0 && counter % 150 == 149 {
                        let to = wal.next_seq().saturating_sub(300);
                        wal.truncate_front(to).unwrap();
                        let mut o = out.lock().unwrap();
                        writeln!(o, "T {to}").unwrap();
                        o.flush().unwrap();
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

/// Held (shared) by every spawn of a child. A child forked while this process holds a log open
/// inherits the lock's descriptor until it execs, so a test that closes its log and then needs
/// another process to take the lock first waits for the spawns in flight ([`spawns_settled`]).
static SPAWNS: std::sync::RwLock<()> = std::sync::RwLock::new(());

/// Returns once no spawn (by any test of this process) that began before the call is in
/// flight: none still holds a copy of a lock this process has since released.
fn spawns_settled() {
    drop(SPAWNS.write().unwrap());
}

fn spawn_child(dir: &Path, role: &str, cycle: u64) -> Child {
    let _spawning = SPAWNS.read().unwrap();
    Command::new(std::env::current_exe().unwrap())
        .args(["child", "--exact", "--ignored", "--nocapture", "--test-threads=1", "-q"])
        .env(ENV_DIR, dir)
        .env(ENV_ROLE, role)
        .env(ENV_CYCLE, cycle.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

#[test]
fn every_acknowledged_record_survives_sigkill() {
    survives_sigkill("append", 60);
}

/// Overlapping group commits acknowledge only what is durable, in order.
#[test]
fn every_record_acknowledged_by_overlapping_syncs_survives_sigkill() {
    survives_sigkill("append-overlapping", 30);
}

/// Records copied into the page cache (through the map of the active segment) survive a crash of
/// the process: only a crash of the machine needs the fsync.
#[test]
fn every_flushed_record_survives_sigkill() {
    survives_sigkill("append-flushed", 30);
}

/// The same while the log's sync thread replaces the map's window, starts writeback and syncs
/// beside the appenders, and rolls write new segments by `pwrite` until they are fsynced.
#[test]
fn every_flushed_record_survives_sigkill_amid_background_writeback() {
    survives_sigkill("append-flushed-kicked", 30);
}

/// Runs `cycles` (or `TIMBER_CRASH_CYCLES`) cycles of a child in `role` killed at a random moment,
/// checking after each that every batch it acknowledged is there whole.
fn survives_sigkill(role: &str, cycles: u64) {
    let dir = tempfile::tempdir().unwrap();
    let cycles: u64 =
        std::env::var("TIMBER_CRASH_CYCLES").ok().and_then(|s| s.parse().ok()).unwrap_or(cycles);
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    // Everything seen in the log after a recovery must stay there (unless truncated away).
    let mut known: BTreeMap<u64, Id> = BTreeMap::new();
    let mut truncated_to = 0u64;
    let mut total_acked = 0usize;
    for cycle in 1..=cycles {
        let mut child = spawn_child(dir.path(), role, cycle);
        let stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            BufReader::new(stdout).lines().map_while(Result::ok).collect::<Vec<String>>()
        });
        std::thread::sleep(Duration::from_millis(rng.random_range(0..60)));
        child.kill().unwrap();
        child.wait().unwrap();
        let lines = reader.join().unwrap();

        let mut acked: Vec<(u64, u64, u64, u64)> = Vec::new();
        for line in &lines {
            let f: Vec<u64> = line.split(' ').skip(1).filter_map(|x| x.parse().ok()).collect();
            match (line.as_bytes().first(), f.as_slice()) {
                (Some(b'A'), &[s, e, w, c]) => acked.push((s, e, w, c)),
                (Some(b'T'), &[t]) => truncated_to = truncated_to.max(t),
                _ => {} // a line cut short by the kill was never complete, so never an ack
            }
        }
        total_acked += acked.len();

        let wal = Wal::open(dir.path(), role_opts(role)).unwrap();
        let (first, next) = (wal.first_seq(), wal.next_seq());
        assert!(
            first >= truncated_to,
            "cycle {cycle}: acknowledged truncation to {truncated_to} lost (first {first})"
        );
        let mut present: BTreeMap<u64, Id> = BTreeMap::new();
        let mut expect_seq = first;
        for item in wal.iter(..) {
            let (seq, bytes) = item.unwrap_or_else(|e| panic!("cycle {cycle}: {e}"));
            assert_eq!(seq, expect_seq, "cycle {cycle}: sequence numbers not dense");
            expect_seq += 1;
            let id = decode(&bytes).unwrap_or_else(|| {
                panic!("cycle {cycle}: record {seq} is not a whole record written by a child")
            });
            present.insert(seq, id);
        }
        assert_eq!(expect_seq, next);
        for (&seq, &id) in known.range(first..) {
            assert_eq!(
                present.get(&seq),
                Some(&id),
                "cycle {cycle}: record {seq} present before this cycle is gone"
            );
        }
        for &(s, e, w, c) in &acked {
            for seq in s.max(first)..e {
                let (pw, pc, i, k) = present
                    .get(&seq)
                    .copied()
                    .unwrap_or_else(|| panic!("cycle {cycle}: acknowledged record {seq} lost"));
                assert_eq!(
                    (pw, pc, u64::from(i), u64::from(k)),
                    (w, c, seq - s, e - s),
                    "cycle {cycle}: record {seq} has other content"
                );
            }
        }
        // Batches are atomic: every batch that starts in the live range is there whole.
        for (&seq, &(w, c, i, k)) in &present {
            if i == 0 {
                for j in 1..k {
                    let next_id = present.get(&(seq + u64::from(j)));
                    assert_eq!(
                        next_id,
                        Some(&(w, c, j, k)),
                        "cycle {cycle}: batch at {seq} is not whole"
                    );
                }
            }
        }
        known = present;
        drop(wal);
        spawns_settled();
    }
    assert!(
        total_acked > 100,
        "children acknowledged only {total_acked} batches: the test did not exercise much"
    );
}

#[test]
fn lock_is_exclusive_across_processes_and_freed_by_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    // This process holds the lock: a child cannot open.
    let wal = Wal::open(dir.path(), opts()).unwrap();
    let child = spawn_child(dir.path(), "try-open", 0).wait_with_output().unwrap();
    assert_eq!(child.status.code(), Some(3));
    let msg = String::from_utf8_lossy(&child.stdout);
    assert!(msg.contains("locked") && msg.contains(&*dir.path().to_string_lossy()), "{msg}");
    drop(wal);
    spawns_settled();
    assert_eq!(spawn_child(dir.path(), "try-open", 0).wait().unwrap().code(), Some(0));

    // A child holds the lock: this process cannot open until the child is killed.
    let mut holder = spawn_child(dir.path(), "hold-lock", 0);
    // The test harness prints its own lines first; wait for the child's.
    let lines = BufReader::new(holder.stdout.take().unwrap()).lines();
    assert!(lines.map_while(Result::ok).any(|l| l.trim() == "locked"), "child never took the lock");
    assert!(matches!(Wal::open(dir.path(), opts()), Err(Error::Locked { .. })));
    holder.kill().unwrap();
    holder.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let wal = loop {
        match Wal::open(dir.path(), opts()) {
            Ok(w) => break w,
            Err(Error::Locked { .. }) if Instant::now() < deadline => std::thread::yield_now(),
            Err(e) => panic!("{e}"),
        }
    };
    wal.append(b"after the holder died").unwrap();
}
