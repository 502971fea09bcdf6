use std::time::Instant;
use timber_stream::*;
#[tokio::main]
async fn main() {
    let d = tempfile::tempdir().unwrap();
    let opts = || Options::default().maintenance_interval(None).merge(4096, 64 << 10);
    let t = Instant::now();
    let s = Streams::open(d.path(), opts()).await.unwrap();
    println!("open {:?}", t.elapsed());
    s.create("x", StreamConfig::default()).await.unwrap();
    let wo = WriterOptions {
        max_segment_bytes: 8 << 10,
        lz4: true,
        max_interval: std::time::Duration::from_millis(1),
        ..WriterOptions::local()
    };
    let w = s.writer_with("x", wo).await.unwrap();
    let t = Instant::now();
    for i in 0..300u32 {
        w.append(vec![i as u8; 50]).await.unwrap();
    }
    println!("300 sequential appends: {:?}", t.elapsed());
    let t = Instant::now();
    w.close().await.unwrap();
    println!("writer close {:?}", t.elapsed());
    let t = Instant::now();
    s.maintain().await.unwrap();
    println!("maintain {:?}", t.elapsed());
    let t = Instant::now();
    s.close().await.unwrap();
    println!("close {:?}", t.elapsed());
    let t = Instant::now();
    let _s = Streams::open(d.path(), opts()).await.unwrap();
    println!("open {:?}", t.elapsed());
}
