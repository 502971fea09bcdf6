//! `timberd`: starts the timber server; SIGTERM or SIGINT shut it down gracefully.

use clap::Parser;
use timber_server::{Config, Flags, IdleWork, LogFormat, Server};

// Many small allocations per request (frames, keys, replies): mimalloc serves them faster than
// glibc's allocator under concurrency.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `purge_delay` option: its place in mimalloc's `mi_option_e` (v2 and v3).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// How long mimalloc keeps freed memory before giving it back to the OS. Its default, a second,
/// kept a flushed memtable or two beyond what the engine used; at 0 every freed page is given
/// back and faulted in again when reused, which cost about a tenth of the write throughput.
const PURGE_DELAY_MS: std::ffi::c_long = 100;

/// Sets mimalloc's purge delay to [`PURGE_DELAY_MS`].
#[allow(unsafe_code)]
fn return_freed_memory_soon() {
    // mimalloc's own variable still decides when set.
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return;
    }
    // SAFETY: called first thing in main, before any other thread exists (mimalloc's option
    // setters are not thread-safe); the option index is a valid `mi_option_t`.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS) };
}

fn main() {
    return_freed_memory_soon();
    let cfg = match Config::resolve(Flags::parse()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("timberd: {e}");
            std::process::exit(2);
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("TIMBER_LOG")
        // openraft narrates every vote and replication change at info.
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match cfg.log_format {
        LogFormat::Human => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
    let workers =
        cfg.workers.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let idle = IdleWork::new();
    let rt = match timber_server::runtime(workers, &cfg, &idle) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("timberd: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(run(cfg, &idle)) {
        eprintln!("timberd: {e:#}");
        std::process::exit(1);
    }
}

async fn run(cfg: Config, idle: &IdleWork) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let server = Server::start_on(cfg, idle).await?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
    server.shutdown().await
}
