//! Crash test with real processes: the test binary re-executes itself as a child (the ignored
//! `child` test) that appends pipelined entries and prints every acknowledged id, while
//! maintenance merges small fragments and collects garbage every few milliseconds. The child is
//! killed with SIGKILL at random moments. After each kill the parent reopens the store and checks
//! that every acknowledged entry is readable and byte-exact, ids are dense and carry their own
//! sequence number (nothing duplicated or reordered), and garbage collection has removed every
//! fragment a kill left unrecorded. Runs on local files and on a real S3 server that outlives the
//! children, and on local files with a journal (synced, and interval-synced: a process kill
//! loses nothing that was handed to the operating system).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use common::{Backend, Place};
use rand::{Rng, SeedableRng};
use timber_stream::{
    Journal, Options, S3Options, Start, Storage, StreamConfig, Streams, WriterOptions,
};

const ENV_DIR: &str = "TIMBER_STREAM_CRASH_DIR";
const ENV_S3: &str = "TIMBER_STREAM_CRASH_S3";
const ENV_JOURNAL: &str = "TIMBER_STREAM_CRASH_JOURNAL";

fn payload(k: u64) -> Bytes {
    let mut v = format!("entry {k} ").into_bytes();
    v.resize(20 + (k * 37 % 1500) as usize, b'a' + (k % 26) as u8);
    Bytes::from(v)
}

fn journal_from(name: &str) -> Journal {
    match name {
        "always" => Journal::Always,
        "interval" => Journal::Interval(Duration::from_millis(50)),
        _ => Journal::Off,
    }
}

fn options(s3: Option<S3Options>, journal: &str) -> Options {
    let storage = s3.map_or(Storage::Local, Storage::S3);
    Options::default()
        .journal(journal_from(journal))
        .storage(storage)
        .maintenance_interval(Some(Duration::from_millis(20)))
        .merge(8 << 10, 64 << 10)
        .retries(3, Duration::from_millis(5))
}

fn writer_options() -> WriterOptions {
    WriterOptions {
        max_entries: 40,
        max_interval: Duration::from_millis(1),
        max_flush_inflight: 4,
        max_buffered_bytes: 1 << 20,
        max_entry_bytes: 64 << 10,
        max_segment_bytes: 64 << 10,
        lz4: true,
        ..WriterOptions::local()
    }
}

fn s3_from_env() -> Option<S3Options> {
    let v = std::env::var(ENV_S3).ok()?;
    let (endpoint, bucket) = v.split_once('|')?;
    Some(S3Options {
        endpoint: Some(endpoint.to_string()),
        bucket: bucket.to_string(),
        region: "us-east-1".into(),
        access_key_id: common::ACCESS_KEY.into(),
        secret_access_key: common::SECRET_KEY.into(),
        allow_http: true,
        path_style: true,
    })
}

#[test]
#[ignore = "run only as a child process of the test below"]
fn child() {
    let Ok(dir) = std::env::var(ENV_DIR) else { return };
    common::runtime().block_on(async move {
        let s = Streams::open(
            &dir,
            options(s3_from_env(), &std::env::var(ENV_JOURNAL).unwrap_or_default()),
        )
        .await
        .unwrap();
        if s.info("c").is_err() {
            s.create("c", StreamConfig::default()).await.unwrap();
        }
        let w = s.writer_with("c", writer_options()).await.unwrap();
        let start = s.info("c").unwrap().next_id;
        let (tx, mut rx) = tokio::sync::mpsc::channel::<(u64, timber_stream::Ack)>(1024);
        let printer = tokio::spawn(async move {
            let mut out = std::io::stdout();
            while let Some((k, ack)) = rx.recv().await {
                let id = ack.await.unwrap();
                assert_eq!(id, k);
                writeln!(out, "A {id}").unwrap();
                out.flush().unwrap();
            }
        });
        for k in start.. {
            let ack = w.send(payload(k)).await.unwrap();
            if tx.send((k, ack)).await.is_err() {
                break;
            }
        }
        printer.await.unwrap();
    });
}

fn crash_cycles(backend: Backend, cycles: u64, seed: u64, journal: &str) {
    let place = Place::new(backend);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut acked_max: Option<u64> = None;
    let mut verified = 0u64;
    let mut collected = 0usize;
    for cycle in 1..=cycles {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args(["child", "--exact", "--ignored", "--nocapture", "--test-threads=1", "-q"])
            .env(ENV_DIR, place.dir.path())
            .env(ENV_JOURNAL, journal)
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        if let Some(o) = &place.s3 {
            cmd.env(ENV_S3, format!("{}|{}", o.endpoint.as_ref().unwrap(), o.bucket));
        }
        let mut child = cmd.spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let lines = std::thread::spawn(move || {
            BufReader::new(stdout).lines().map_while(Result::ok).collect::<Vec<String>>()
        });
        std::thread::sleep(Duration::from_millis(rng.random_range(150..500)));
        child.kill().unwrap();
        child.wait().unwrap();
        for line in lines.join().unwrap() {
            if let Some(id) = line.strip_prefix("A ").and_then(|x| x.parse::<u64>().ok()) {
                acked_max = Some(acked_max.map_or(id, |m| m.max(id)));
            }
        }

        let before = place.fragment_files().len();
        let last = cycle == cycles;
        let s3 = place.s3.clone();
        let (next, after, recorded) = common::runtime().block_on(async {
            let s =
                Streams::open(place.dir.path(), options(s3, journal).maintenance_interval(None))
                    .await
                    .unwrap_or_else(|e| panic!("{backend:?} cycle {cycle}: {e}"));
            let Ok(info) = s.info("c") else { return (0, 0, 0) };
            // Whatever was journaled is in recorded fragments once the store is open.
            assert_eq!(
                s.segments("c").unwrap().iter().map(|g| g.end_id).max().unwrap_or(0),
                info.next_id,
                "{backend:?} cycle {cycle}: journaled entries not written out at open"
            );
            if let Some(a) = acked_max {
                assert!(
                    info.next_id > a,
                    "{backend:?} cycle {cycle}: entry {a} was acked but the stream ends at {}",
                    info.next_id
                );
            }
            // Everything from the last verified point (all of it in the last cycle), byte-exact.
            let from = if last { 0 } else { verified };
            let mut r = s.reader("c", Start::At(from)).unwrap();
            for k in from..info.next_id {
                let e = r
                    .next()
                    .await
                    .unwrap_or_else(|e| panic!("{backend:?} cycle {cycle}: entry {k}: {e}"));
                assert_eq!(e.id, k);
                assert!(e.data == payload(k), "{backend:?} cycle {cycle}: entry {k} differs");
            }
            assert!(!r.has_next());
            let recorded: u64 = s.segments("c").unwrap().iter().map(|g| g.fragments).sum();
            s.close().await.unwrap();
            (info.next_id, place.fragment_files().len(), recorded)
        });
        assert_eq!(
            after as u64, recorded,
            "{backend:?} cycle {cycle}: unrecorded fragments left after reopen"
        );
        // With a journal, reopening also writes out journaled entries as new fragments.
        collected += before.saturating_sub(after);
        verified = next;
    }
    let acked = acked_max.map_or(0, |a| a + 1);
    assert!(acked > 1000, "{backend:?}: only {acked} entries acknowledged: the test did little");
    if journal == "off" {
        assert!(collected > 0, "{backend:?}: no kill left an orphaned fragment in {cycles} cycles");
    }
    eprintln!(
        "{backend:?}: {acked} entries acked over {cycles} kills; {collected} orphans collected"
    );
}

fn cycles() -> u64 {
    std::env::var("TIMBER_CRASH_CYCLES").ok().and_then(|s| s.parse().ok()).unwrap_or(12)
}

#[test]
fn acknowledged_entries_survive_sigkill_on_local_files() {
    crash_cycles(Backend::Local, cycles(), 0x5eed, "off");
}

#[test]
fn acknowledged_entries_survive_sigkill_with_a_synced_journal() {
    crash_cycles(Backend::Local, cycles(), 0x10a1, "always");
}

#[test]
fn acknowledged_entries_survive_sigkill_with_an_interval_journal() {
    crash_cycles(Backend::Local, cycles(), 0x10b2, "interval");
}

#[test]
fn acknowledged_entries_survive_sigkill_on_s3() {
    crash_cycles(Backend::S3, cycles(), 0xbeef, "off");
}
