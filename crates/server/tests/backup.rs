//! Online backups (`Admin.Backup`, `Client::backup`) of a real `timberd` under write load, and
//! `timberd --restore-from`: the restored server holds exactly the prefix of the writes its
//! position names (every write acknowledged before the backup began and none begun after it
//! ended); a damaged backup and a data directory in use are refused without changing anything.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::Timberd;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// Writes `w:<i>` = i for i = 0, 1, ... through member `port`, one after the other; `acked` is
/// how many were acknowledged, `begun` how many were sent, `refused` how many attempts failed.
fn writer(port: u16, stop: Arc<AtomicBool>, counts: [Arc<AtomicU64>; 3]) {
    let [acked, begun, refused] = counts;
    let c = redis::Client::open(format!("redis://127.0.0.1:{port}/")).unwrap();
    let mut con = c.get_connection_with_timeout(Duration::from_secs(10)).unwrap();
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        begun.store(i + 1, Ordering::SeqCst);
        let r: redis::RedisResult<()> =
            redis::cmd("SET").arg(format!("w:{i:08}")).arg(i).query(&mut con);
        if r.is_err() {
            // A refusal (an election in a cluster): the same key again.
            refused.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        i += 1;
        acked.store(i, Ordering::SeqCst);
    }
}

/// A backup position's term (0 for a single node's `seq:<n>`) and index.
fn position_index(p: &str) -> (u64, u64) {
    if let Some(seq) = p.strip_prefix("seq:") {
        return (0, seq.parse().unwrap());
    }
    let mut parts = p.strip_prefix("raft:").unwrap().split('-');
    let term = parts.next().unwrap().parse().unwrap();
    (term, parts.next_back().unwrap().parse().unwrap())
}

/// Backs up through `backup_via` while a writer writes through `write_via`; restores into a new
/// single node and checks the writes it holds (with `current`, every write acknowledged before
/// the backup began too: not so on a follower, which backs up what it applied). Returns the
/// backup's position.
fn backup_under_load(write_via: &Timberd, backup_via: &Timberd, current: bool) -> String {
    backup_under_load_then(write_via, backup_via, current, |_, _| {})
}

/// [`backup_under_load`], then `check` of the restored server and how many writes it holds.
fn backup_under_load_then(
    write_via: &Timberd,
    backup_via: &Timberd,
    current: bool,
    check: impl FnOnce(&Timberd, u64),
) -> String {
    // Where the backup source stands before the load: a linearizable read through it first,
    // so that it applied everything acknowledged before (a follower asks the leader).
    let _: Option<String> =
        redis::cmd("GET").arg("w:none").query(&mut backup_via.client()).unwrap();
    let base = {
        let out = tempfile::tempdir().unwrap();
        let dir = out.path().join("base");
        rt().block_on(async { backup_via.grpc().await.backup(&dir).await }).unwrap().0
    };
    let stop = Arc::new(AtomicBool::new(false));
    let counts: [Arc<AtomicU64>; 3] = Default::default();
    let [acked, begun, refused] = counts.clone();
    let w = {
        let (port, s) = (write_via.port, stop.clone());
        std::thread::spawn(move || writer(port, s, counts))
    };
    while acked.load(Ordering::SeqCst) < 300 {
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("backup");
    let before = acked.load(Ordering::SeqCst);
    let (position, bytes) =
        rt().block_on(async { backup_via.grpc().await.backup(&dir).await }).unwrap();
    let after = begun.load(Ordering::SeqCst);
    // The writer goes on past the backup: the backup must not see what came after.
    while acked.load(Ordering::SeqCst) < after + 100 {
        std::thread::sleep(Duration::from_millis(10));
    }
    stop.store(true, Ordering::Relaxed);
    w.join().unwrap();
    assert!(bytes > 0);

    let data = tempfile::tempdir().unwrap();
    let restore = dir.to_str().unwrap();
    let restored = Timberd::start(data.path(), &["--restore-from", restore]);
    let mut con = restored.client();
    let keys: Vec<String> = redis::cmd("KEYS").arg("w:*").query(&mut con).unwrap();
    let mut held: Vec<u64> = keys.iter().map(|k| k[2..].parse().unwrap()).collect();
    held.sort_unstable();
    let n = held.len() as u64;
    assert_eq!(held, (0..n).collect::<Vec<_>>(), "a backup holds a prefix of the writes");
    if current {
        assert!(n >= before, "{n} writes restored, {before} were acknowledged before the backup");
    }
    assert!(n <= after, "{n} writes restored, only {after} had begun when the backup returned");
    // Exactly the state at the position: each SET is one entry of the log (one sequence
    // number of the engine on a single node, one Raft entry in a cluster) and nothing else
    // writes, so the backup holds as many writes as its position is past the base one. Not
    // checkable if an election came between (its leader's blank entry) or a write was retried
    // (a refused proposal may have been committed).
    let ((t0, i0), (t1, i1)) = (position_index(&base), position_index(&position));
    if t0 == t1 && refused.load(Ordering::SeqCst) == 0 {
        assert_eq!(n, i1 - i0, "{n} writes restored from {position}, the load began after {base}");
    } else {
        eprintln!("an election or a refusal during the load: the position is not checked exactly");
    }
    for i in [0, n / 2, n - 1] {
        let v: u64 = redis::cmd("GET").arg(format!("w:{i:08}")).query(&mut con).unwrap();
        assert_eq!(v, i);
    }
    check(&restored, n);
    position
}

#[test]
fn a_backup_under_load_restores_to_one_point_with_ttls_and_refuses_damage() {
    let dir = tempfile::tempdir().unwrap();
    let server = Timberd::start(dir.path(), &["--sync", "always"]);
    let mut con = server.client();
    let _: () = redis::cmd("SET").arg("ttl").arg("v").arg("EX").arg(1000).query(&mut con).unwrap();
    let _: i64 = redis::cmd("INCRBY").arg("n").arg(41).query(&mut con).unwrap();

    let position = backup_under_load(&server, &server, true);
    let seq: u64 = position.strip_prefix("seq:").unwrap().parse().unwrap();
    assert!(seq > 300, "position {position}");

    // Keys of every kind come back, with their deadlines.
    let out = tempfile::tempdir().unwrap();
    let bdir = out.path().join("b");
    rt().block_on(async { server.grpc().await.backup(&bdir).await }).unwrap();
    // Versions the source stamps after the backup are never stamped again by the restored data
    // on the same key (a compare-and-swap holding one must not succeed there).
    let version = |t: &Timberd| {
        rt().block_on(async { t.grpc().await.get_versioned("n").await }).unwrap().unwrap().1
    };
    let before = version(&server);
    for _ in 0..3 {
        let _: i64 = redis::cmd("INCRBY").arg("n").arg(0).query(&mut con).unwrap();
    }
    let after_backup = version(&server);
    assert!(after_backup > before);
    let data = tempfile::tempdir().unwrap();
    let restored = Timberd::start(data.path(), &["--restore-from", bdir.to_str().unwrap()]);
    let mut r = restored.client();
    let ttl: i64 = redis::cmd("TTL").arg("ttl").query(&mut r).unwrap();
    assert!((900..=1000).contains(&ttl), "ttl {ttl}");
    let n: i64 = redis::cmd("GET").arg("n").query(&mut r).unwrap();
    assert_eq!(n, 41);
    assert_eq!(version(&restored), before, "restored as it was");
    let _: i64 = redis::cmd("INCRBY").arg("n").arg(0).query(&mut r).unwrap();
    let restored_write = version(&restored);
    assert!(restored_write > after_backup, "{restored_write} after {after_backup}");
    drop(restored);

    // Restoring into a data directory that holds a keyspace is refused, and the keyspace is
    // left as it was.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_timberd"))
        .args(["--data-dir", data.path().to_str().unwrap(), "--restore-from"])
        .arg(&bdir)
        .args(["--resp-addr", "127.0.0.1:0", "--grpc-addr", "127.0.0.1:0"])
        .args(["--http-addr", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already holds a keyspace"), "{err}");
    let again = Timberd::start(data.path(), &[]);
    let n: i64 = redis::cmd("GET").arg("n").query(&mut again.client()).unwrap();
    assert_eq!(n, 41);
    drop(again);

    // A damaged backup is refused before anything is written.
    let file = bdir.join("keyspace.backup");
    let mut bytes = std::fs::read(&file).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&file, &bytes).unwrap();
    let fresh = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_timberd"))
        .args(["--data-dir", fresh.path().to_str().unwrap(), "--restore-from"])
        .arg(&bdir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("checksum mismatch"), "{err}");
    assert!(!fresh.path().join("kv").exists());

    // A backup into a directory that is not empty is refused.
    let e = rt().block_on(async { server.grpc().await.backup(&bdir).await }).unwrap_err();
    assert!(e.to_string().contains("not empty"), "{e}");
}

type Entries = Vec<(String, Vec<(String, String)>)>;

#[test]
fn redis_streams_their_groups_and_log_streams_are_backed_up_and_restored() {
    let dir = tempfile::tempdir().unwrap();
    let server = Timberd::start(dir.path(), &["--sync", "always"]);
    let mut con = server.client();
    for i in 0..50 {
        let _: String =
            redis::cmd("XADD").arg("s").arg("*").arg("f").arg(i).query(&mut con).unwrap();
    }
    let _: () =
        redis::cmd("XGROUP").arg("CREATE").arg("s").arg("g").arg("0").query(&mut con).unwrap();
    let read: Vec<(String, Entries)> = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("g")
        .arg("c")
        .arg("COUNT")
        .arg(10)
        .arg("STREAMS")
        .arg("s")
        .arg(">")
        .query(&mut con)
        .unwrap();
    let delivered: Vec<String> = read[0].1.iter().map(|(id, _)| id.clone()).collect();
    let _: i64 = redis::cmd("XACK").arg("s").arg("g").arg(&delivered[..3]).query(&mut con).unwrap();
    let _: () = redis::cmd("SET").arg("k").arg("v").query(&mut con).unwrap();
    let entries: Entries = redis::cmd("XRANGE").arg("s").arg("-").arg("+").query(&mut con).unwrap();
    rt().block_on(async {
        let c = server.grpc().await;
        c.create_stream("events", Some(Duration::from_secs(3600)), None).await.unwrap();
        for i in 0..100 {
            c.append("events", vec![bytes::Bytes::from(format!("e{i}"))]).await.unwrap();
        }
        c.truncate("events", 10).await.unwrap();
    });
    let out = tempfile::tempdir().unwrap();
    let bdir = out.path().join("b");
    rt().block_on(async { server.grpc().await.backup(&bdir).await }).unwrap();
    drop(server);

    let data = tempfile::tempdir().unwrap();
    let restored = Timberd::start(data.path(), &["--restore-from", bdir.to_str().unwrap()]);
    let mut con = restored.client();
    let got: Entries = redis::cmd("XRANGE").arg("s").arg("-").arg("+").query(&mut con).unwrap();
    assert_eq!(got, entries);
    let pending: (i64, String, String, Vec<(String, String)>) =
        redis::cmd("XPENDING").arg("s").arg("g").query(&mut con).unwrap();
    assert_eq!((pending.0, &pending.1, &pending.2), (7, &delivered[3], &delivered[9]));
    let v: String = redis::cmd("GET").arg("k").query(&mut con).unwrap();
    assert_eq!(v, "v");
    // The group goes on where it was; new entries come after the restored ones.
    let next: String =
        redis::cmd("XADD").arg("s").arg("*").arg("f").arg("new").query(&mut con).unwrap();
    assert!(next > entries.last().unwrap().0, "{next}");
    let read: Vec<(String, Entries)> = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("g")
        .arg("c")
        .arg("COUNT")
        .arg(1)
        .arg("STREAMS")
        .arg("s")
        .arg(">")
        .query(&mut con)
        .unwrap();
    assert_eq!(read[0].1[0].0, entries[10].0);
    rt().block_on(async {
        let c = restored.grpc().await;
        let info = c.stream_info("events").await.unwrap();
        assert_eq!((info.first_id, info.next_id), (10, 100));
        let mut r = c.reader("events", timber_client::Start::Earliest, false).await.unwrap();
        let mut got = Vec::new();
        while let Some(e) = r.next().await.unwrap() {
            got.push((e.id, String::from_utf8(e.data.to_vec()).unwrap()));
        }
        let want: Vec<(u64, String)> = (10..100).map(|i| (i, format!("e{i}"))).collect();
        assert_eq!(got, want);
        assert_eq!(c.append("events", vec![bytes::Bytes::from("more")]).await.unwrap(), 100);
    });
    drop(restored);
    // A restore into a directory that holds data is refused, and the data stays.
    let e = Timberd::fails(data.path(), &["--restore-from", bdir.to_str().unwrap()]);
    assert!(e.contains("already holds a keyspace"), "{e}");
    // A marker left beside the keyspace (a crash just after the restore's last step) is that
    // of a finished restore: the server starts, without it.
    std::fs::write(data.path().join("restore-in-progress"), b"").unwrap();
    let restored = Timberd::start(data.path(), &[]);
    let v: String = redis::cmd("GET").arg("k").query(&mut restored.client()).unwrap();
    assert_eq!(v, "v");
    assert!(!data.path().join("restore-in-progress").exists());
    // A restore cut short (its marker left behind) is refused without --restore-from and
    // started over with it.
    let cut = tempfile::tempdir().unwrap();
    std::fs::write(cut.path().join("restore-in-progress"), b"").unwrap();
    let e = Timberd::fails(cut.path(), &[]);
    assert!(e.contains("did not finish"), "{e}");
    let again = Timberd::start(cut.path(), &["--restore-from", bdir.to_str().unwrap()]);
    let len: i64 = redis::cmd("XLEN").arg("s").query(&mut again.client()).unwrap();
    assert_eq!(len, 50);
    assert!(!cut.path().join("restore-in-progress").exists());
}

#[test]
fn a_cluster_member_backs_up_at_its_applied_log_position() {
    let free = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let ports: Vec<u16> = (0..3).map(|_| free()).collect();
    let initial: Vec<String> =
        ports.iter().enumerate().map(|(i, p)| format!("{}=127.0.0.1:{p}", i + 1)).collect();
    let initial = initial.join(",");
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let members: Vec<Timberd> = (0..3)
        .map(|i| {
            let (id, raft) = ((i + 1).to_string(), format!("127.0.0.1:{}", ports[i]));
            let flags = ["--node-id", &id, "--raft-addr", &raft, "--initial-cluster", &initial];
            let mut flags = flags.to_vec();
            flags.extend(["--sync", "always", "--raft-heartbeat-ms", "100"]);
            Timberd::start(dirs[i].path(), &flags)
        })
        .collect();
    // A stream, written before the load: the backup holds it whole.
    let mut con = members[0].client();
    for i in 0..20 {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let r: redis::RedisResult<String> = redis::cmd("XADD")
                .arg("s")
                .arg(format!("1-{}", i + 1))
                .arg("f")
                .arg(i)
                .query(&mut con);
            match r {
                Ok(_) => break,
                // A retry of an entry that was added.
                Err(e) if e.to_string().contains("equal or smaller") => break,
                // Refused during an election: again.
                Err(e) => {
                    assert!(std::time::Instant::now() < deadline, "{e}");
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }
    // Writes go through member 1 (forwarded if it does not lead); the backup comes from 2,
    // which may follow: its backup stands at what it applied.
    let position = backup_under_load_then(&members[0], &members[1], false, |restored, n| {
        let len: i64 = redis::cmd("XLEN").arg("s").query(&mut restored.client()).unwrap();
        assert_eq!(len, 20);
        // The first key written after the backup: the cluster stamped it with the backup's
        // counter. The restored data writing it again must not reuse that version.
        let key = format!("w:{n:08}");
        let version = |t: &Timberd| {
            let k = key.clone();
            rt().block_on(async { t.grpc().await.get_versioned(k).await }).unwrap().unwrap().1
        };
        let cluster = version(&members[0]);
        let _: () = redis::cmd("SET").arg(&key).arg(n).query(&mut restored.client()).unwrap();
        let again = version(restored);
        assert!(again > cluster, "restored wrote {key} at {again}, the cluster at {cluster}");
    });
    let index: u64 = position.rsplit('-').next().unwrap().parse().unwrap();
    assert!(position.starts_with("raft:") && index > 300, "position {position}");
}

#[test]
fn a_backup_seeds_a_new_cluster_whose_joining_members_receive_it() {
    let free = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    // A backup of a single node with some data.
    let src = tempfile::tempdir().unwrap();
    let server = Timberd::start(src.path(), &[]);
    let mut con = server.client();
    for i in 0..200 {
        let _: () = redis::cmd("SET").arg(format!("r{i:03}")).arg(i).query(&mut con).unwrap();
    }
    let out = tempfile::tempdir().unwrap();
    let bdir = out.path().join("b");
    rt().block_on(async { server.grpc().await.backup(&bdir).await }).unwrap();
    drop(server);

    // Member 1 restores it and forms a cluster of its own; a member that joins as a learner
    // receives the data (as the cluster's first snapshot), and is promoted.
    let raft1 = format!("127.0.0.1:{}", free());
    let initial = format!("1={raft1}");
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let restore = bdir.to_str().unwrap();
    let flags = ["--node-id", "1", "--raft-addr", &raft1, "--initial-cluster", &initial];
    let mut flags = flags.to_vec();
    flags.extend(["--restore-from", restore, "--sync", "always"]);
    let first = Timberd::start(dirs[0].path(), &flags);
    // Member 2 asks to join at once: it is let in only once the data is in a snapshot.
    let raft2 = format!("127.0.0.1:{}", free());
    let second = Timberd::start(
        dirs[1].path(),
        &["--node-id", "2", "--raft-addr", &raft2, "--join", &raft1, "--sync", "always"],
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while dirs[0].path().join("restored-not-replicated").exists() {
        assert!(std::time::Instant::now() < deadline, "the restored data was not snapshotted");
        std::thread::sleep(Duration::from_millis(20));
    }
    let _: () = redis::cmd("SET").arg("after").arg("seed").query(&mut first.client()).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut local = second.client();
    let _: () = redis::cmd("READONLY").query(&mut local).unwrap();
    loop {
        let n: i64 = redis::cmd("DBSIZE").query(&mut local).unwrap();
        if n == 201 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "member 2 holds {n} keys, not 201");
        std::thread::sleep(Duration::from_millis(50));
    }
    let v: i64 = redis::cmd("GET").arg("r123").query(&mut local).unwrap();
    assert_eq!(v, 123);
    rt().block_on(async { first.grpc().await.promote(2).await }).unwrap();
    let v: String = redis::cmd("GET").arg("after").query(&mut second.client()).unwrap();
    assert_eq!(v, "seed");
}
