//! `timber-s3-server`: serves a directory over S3 on 127.0.0.1 for benchmarks and manual tests.
//!
//! Usage: `timber-s3-server <root> [addr] [bucket...]`; the keys come from `AWS_ACCESS_KEY_ID`
//! and `AWS_SECRET_ACCESS_KEY` (default: timber-s3-server's test keys). Prints the endpoint,
//! then serves until SIGTERM or SIGINT.

use timber_s3_server::{S3Server, ACCESS_KEY, SECRET_KEY};

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let Some(root) = args.next() else {
        eprintln!("usage: timber-s3-server <root> [addr] [bucket...]");
        std::process::exit(2);
    };
    let addr = match args.next() {
        Some(a) => a.parse().map_err(|e| std::io::Error::other(format!("address {a}: {e}")))?,
        None => std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
    };
    let key = std::env::var("AWS_ACCESS_KEY_ID").unwrap_or_else(|_| ACCESS_KEY.into());
    let secret = std::env::var("AWS_SECRET_ACCESS_KEY").unwrap_or_else(|_| SECRET_KEY.into());
    let server = S3Server::start_at(root.as_ref(), addr, &key, &secret).await?;
    for bucket in args {
        server.create_bucket(&bucket)?;
    }
    println!("{}", server.endpoint());
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    Ok(())
}
