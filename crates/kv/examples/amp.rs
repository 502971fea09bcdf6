//! Space amplification after an overwrite-heavy load: fills N keys, overwrites N random keys,
//! waits for compaction to catch up, and prints the tree and the files on disk.
//! `cargo run --release -p timber-kv --example amp -- [N]`

use std::time::{Duration, Instant};

fn main() -> timber_kv::Result<()> {
    let n: u64 = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(1_000_000);
    let dir = tempfile::tempdir().map_err(|e| timber_kv::Error::Io {
        path: "tmp".into(),
        op: "mkdtemp",
        source: e,
    })?;
    let db = timber_kv::Db::open(dir.path(), timber_kv::Options::default())?;
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut rnd = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let value = [7u8; 100];
    for i in 0..n {
        db.put(format!("{i:016}"), value)?;
    }
    for _ in 0..n {
        db.put(format!("{:016}", rnd() % n), value)?;
    }
    db.flush()?;
    let t = Instant::now();
    while (db.stats().levels[0].files > 0 || db.stats().pending_compaction_bytes > 0)
        && t.elapsed() < Duration::from_secs(120)
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    let s = db.stats();
    println!("settled in {:?}; levels {:?}", t.elapsed(), s.levels);
    let logical = n as f64 * 116.0;
    println!(
        "tables {} bytes = {:.2}x of {} logical; wal {} bytes",
        s.table_bytes(),
        s.table_bytes() as f64 / logical,
        logical,
        s.wal_bytes
    );
    let mut files: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap())
        .map(|e| (e.file_name(), e.metadata().unwrap().len()))
        .collect();
    files.sort();
    for (name, len) in files {
        println!("  {name:?} {len}");
    }
    Ok(())
}
