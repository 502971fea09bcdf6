//! The bank test with real processes: a child (this test binary, re-executed) runs transfer
//! transactions between accounts from four threads, two optimistic and two pessimistic, each
//! reporting the transfers it committed, and is killed with SIGKILL at random moments. After
//! every kill the parent reopens the database: the total of the accounts is unchanged (no
//! transfer is half applied) and every acknowledged transfer is there.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use timber_kv::{Db, Durability, Error, Isolation, Mode, Options, TxnOptions};

const ENV_DIR: &str = "TIMBER_KV_BANK_DIR";
const ACCOUNTS: u64 = 16;
const THREADS: u64 = 4;
const START: i64 = 1000;

fn opts() -> Options {
    Options::default()
        .memtable_size(32 << 10)
        .l0_compaction_trigger(2)
        .l1_target_bytes(64 << 10)
        .target_file_size(32 << 10)
        .durability(Durability::Synced)
}

fn num(v: Option<bytes::Bytes>) -> i64 {
    v.map_or(0, |b| std::str::from_utf8(&b).unwrap().parse().unwrap())
}

fn account(a: u64) -> String {
    format!("acct/{a:02}")
}

#[test]
#[ignore = "run only as a child process of the test below"]
fn child() {
    let Ok(dir) = std::env::var(ENV_DIR) else { return };
    let db = Arc::new(Db::open(&dir, opts()).unwrap());
    if db.get(account(0)).unwrap().is_none() {
        let mut t = db.transaction(TxnOptions::default());
        for a in 0..ACCOUNTS {
            t.put(account(a), START.to_string()).unwrap();
        }
        t.commit().unwrap();
    }
    let out = Arc::new(std::sync::Mutex::new(std::io::stdout()));
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            let (db, out) = (db.clone(), out.clone());
            std::thread::spawn(move || {
                let mode = if t % 2 == 0 { Mode::Optimistic } else { Mode::Pessimistic };
                let isolation = if t < 2 { Isolation::Snapshot } else { Isolation::Serializable };
                let mut rng = rand::rngs::StdRng::seed_from_u64(t);
                loop {
                    let (from, to) = (rng.random_range(0..ACCOUNTS), rng.random_range(0..ACCOUNTS));
                    if from == to {
                        continue;
                    }
                    let amount = rng.random_range(1..50);
                    let opts = TxnOptions {
                        mode,
                        lock_timeout: Duration::from_secs(10),
                        ..TxnOptions::isolation(isolation)
                    };
                    let mut txn = db.transaction(opts);
                    let done = format!("done/{t}");
                    let r = (|| {
                        let a = num(txn.get_for_update(account(from))?);
                        let b = num(txn.get_for_update(account(to))?);
                        let n = num(txn.get_for_update(&done)?);
                        txn.put(account(from), (a - amount).to_string())?;
                        txn.put(account(to), (b + amount).to_string())?;
                        txn.put(&done, (n + 1).to_string())?;
                        Ok::<_, Error>(n + 1)
                    })();
                    let n = match r {
                        Ok(n) => n,
                        Err(Error::Conflict { .. } | Error::Deadlock { .. }) => continue,
                        Err(e) => panic!("{e}"),
                    };
                    match txn.commit() {
                        Ok(_) => {
                            let mut o = out.lock().unwrap();
                            writeln!(o, "A {t} {n}").unwrap();
                            o.flush().unwrap();
                        }
                        Err(Error::Conflict { .. }) => {}
                        Err(e) => panic!("{e}"),
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

#[test]
fn transfers_survive_sigkill_whole_in_both_modes() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0xba2c);
    let mut acked = [0i64; THREADS as usize];
    let mut total_acked = 0;
    for cycle in 1..=15 {
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
        // The kill's moment is what varies; nothing waits on it.
        std::thread::sleep(Duration::from_millis(rng.random_range(50..300)));
        child.kill().unwrap();
        child.wait().unwrap();
        for line in reader.join().unwrap() {
            let f: Vec<i64> = line.split(' ').skip(1).filter_map(|x| x.parse().ok()).collect();
            if let (Some(b'A'), &[t, n]) = (line.as_bytes().first(), f.as_slice()) {
                acked[t as usize] = acked[t as usize].max(n);
                total_acked += 1;
            }
        }
        let db = Db::open(dir.path(), opts()).unwrap_or_else(|e| panic!("cycle {cycle}: {e}"));
        if db.get(account(0)).unwrap().is_none() {
            continue; // killed before the accounts were made
        }
        let balances: Vec<i64> = (0..ACCOUNTS).map(|a| num(db.get(account(a)).unwrap())).collect();
        assert_eq!(
            balances.iter().sum::<i64>(),
            START * ACCOUNTS as i64,
            "cycle {cycle}: {balances:?}"
        );
        for t in 0..THREADS {
            let done = num(db.get(format!("done/{t}")).unwrap());
            let a = acked[t as usize];
            assert!(
                done >= a,
                "cycle {cycle}: thread {t} acknowledged {a} transfers, {done} survived"
            );
            assert!(done <= a + 1, "cycle {cycle}: thread {t}: {done} transfers, {a} acknowledged");
            acked[t as usize] = done;
        }
    }
    assert!(total_acked > 100, "only {total_acked} transfers acknowledged: the test did little");
    eprintln!("{total_acked} transfers acknowledged");
}
