//! Writes the seed corpus, `fuzz/seeds/<target>/`, with the real encoders: WAL frames, SSTable
//! blocks, stream fragments, and Redis requests as a Redis client packs them.
//!
//! `cargo run --manifest-path fuzz/Cargo.toml --example seeds`

use std::path::Path;

use bytes::Bytes;

fn write(target: &str, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds").join(target);
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join(name), bytes)
}

fn main() -> std::io::Result<()> {
    use timber_wal::fuzz::encode_frame;
    write("wal_frame", "empty", &encode_frame(0, true, 0, b""))?;
    write("wal_frame", "claim", &encode_frame(41, true, 40, b"a record of the log"))?;
    write("wal_frame", "batch_part", &encode_frame(7, false, 0, &[0xAB; 100]))?;
    let mut two = encode_frame(9, false, 9, b"first");
    two.extend_from_slice(&encode_frame(10, true, 9, b"second"));
    write("wal_frame", "two_frames", &two)?;

    use timber_kv::fuzz::encode_block;
    write("kv_block", "one", &encode_block(&[(b"key", b"value")], 16, false))?;
    let keys: Vec<Vec<u8>> = (0..40).map(|i| format!("user/{i:04}").into_bytes()).collect();
    let pairs: Vec<(&[u8], &[u8])> = keys.iter().map(|k| (&k[..], &b"v"[..])).collect();
    write("kv_block", "restarts", &encode_block(&pairs, 4, false))?;
    write("kv_block", "lz4", &encode_block(&pairs, 16, true))?;
    write("kv_block", "empty", &encode_block(&[], 16, false))?;

    use timber_stream::fuzz::encode_fragment;
    let entries: Vec<Bytes> = (0..12).map(|i| Bytes::from(vec![b'e'; i * 5])).collect();
    write("stream_fragment", "plain", &encode_fragment(1, 2, 100, &entries, false))?;
    write("stream_fragment", "lz4", &encode_fragment(1, 2, 100, &entries, true))?;
    write("stream_fragment", "empty", &encode_fragment(3, 0, 0, &[], false))?;
    let one = [Bytes::from_static(b"one entry")];
    write("stream_fragment", "one", &encode_fragment(u64::MAX - 1, 7, 5, &one, false))?;

    let set = redis::cmd("SET").arg("key").arg("value").arg("PX").arg(1000).get_packed_command();
    write("resp_request", "set", &set)?;
    let mut pipeline = redis::cmd("GET").arg("key").get_packed_command();
    pipeline.extend(redis::cmd("XADD").arg("s").arg("*").arg("f").arg("v").get_packed_command());
    pipeline.extend(redis::cmd("PING").get_packed_command());
    write("resp_request", "pipeline", &pipeline)?;
    write("resp_request", "inline", b"SET k v\r\nGET k\n\r\n")?;
    write(
        "resp_request",
        "binary",
        &redis::cmd("SET").arg(&b"\r\n\0\xff"[..]).arg(&[0u8; 64][..]).get_packed_command(),
    )?;
    Ok(())
}
