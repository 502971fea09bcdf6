//! `timber`, the command-line client of timberd over gRPC: keys, conditional transactions,
//! streams, status, and a load generator (`bench`). Human output by default, `--json` for
//! scripts; exit code 0 on success, 1 on errors, 2 on bad usage, 3 when a key or stream does
//! not exist, 4 when a transaction's comparisons failed.

mod bench;
mod txn;

use std::io::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use clap::{Parser, Subcommand};
use serde_json::json;
use timber_client::{Client, Options, Scan, Start};

#[derive(Debug, Parser)]
#[command(name = "timber", version, about = "Command-line client of timberd (gRPC)")]
struct Cli {
    /// gRPC address of the server.
    #[arg(long, env = "TIMBER_ADDR", default_value = "http://127.0.0.1:50051", global = true)]
    addr: String,
    /// Shared secret of the server, sent as a bearer token.
    #[arg(long, env = "TIMBER_AUTH_SECRET", hide_env_values = true, global = true)]
    token: Option<String>,
    /// Time limit of each call, e.g. 10s or 500ms.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration, global = true)]
    timeout: Duration,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Keys and values.
    #[command(subcommand)]
    Kv(Kv),
    /// A conditional transaction: if every --if holds, the --then operations run, else the
    /// --else ones, atomically. Exit code 4 when the --else branch ran.
    ///
    /// Example: timber txn --if 'lock missing' --then 'put lock me' --else 'get lock'
    Txn {
        /// A comparison: `KEY = VALUE` (or `!=`, `<`, `>`: byte order), `KEY exists`,
        /// `KEY missing`, `KEY version = N` (or `!=`, `<`, `>`; see `kv get --json`).
        #[arg(long = "if", value_name = "COMPARISON")]
        compare: Vec<String>,
        /// An operation when every comparison holds: `put KEY VALUE`, `del KEY`, `get KEY`.
        #[arg(long = "then", value_name = "OPERATION")]
        success: Vec<String>,
        /// An operation otherwise.
        #[arg(long = "else", value_name = "OPERATION")]
        failure: Vec<String>,
    },
    /// Log streams.
    #[command(subcommand)]
    Stream(Stream),
    /// The server's status.
    Status,
    /// The Raft cluster the server is a member of.
    #[command(subcommand)]
    Cluster(Cluster),
    /// Takes a consistent backup of the server's keyspace into a new directory, while it
    /// serves; `timberd --restore-from <dir>` starts a server from it.
    Backup {
        /// Where to write it (created; must not exist or be empty).
        dir: std::path::PathBuf,
    },
    /// Load generator against a running server.
    Bench(bench::Args),
}

#[derive(Debug, Subcommand)]
enum Cluster {
    /// Each member's role, term, log and applied indexes and lag, as the server asked sees them.
    Status,
    /// Adds a member as a learner (receives the log, does not vote); ask the leader.
    AddLearner {
        /// Its --node-id.
        id: u64,
        /// Its --raft-addr, host:port.
        raft_addr: String,
    },
    /// Makes a learner a voter; ask the leader.
    Promote {
        /// Its --node-id.
        id: u64,
    },
    /// Removes a member from the cluster; ask the leader.
    Remove {
        /// Its --node-id.
        id: u64,
    },
    /// Hands the leadership to a voter; returns once it leads (writes pause meanwhile).
    TransferLeader {
        /// Its --node-id.
        id: u64,
    },
}

#[derive(Debug, Subcommand)]
enum Kv {
    /// Prints a value.
    Get { key: String },
    /// Stores a value.
    Put {
        key: String,
        value: String,
        /// Expire after this long, e.g. 30s.
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
    },
    /// Deletes a key.
    Del { key: String },
    /// Lists keys and values in order.
    Scan {
        /// Keys starting with this.
        #[arg(long, default_value = "")]
        prefix: String,
        /// Keys at or after this.
        #[arg(long, default_value = "")]
        start: String,
        /// Keys before this.
        #[arg(long, default_value = "")]
        end: String,
        /// Most pairs.
        #[arg(long, default_value_t = 100)]
        limit: u64,
    },
}

#[derive(Debug, Subcommand)]
enum Stream {
    /// Creates a stream.
    Create {
        name: String,
        /// Drop entries older than this, e.g. 7d.
        #[arg(long, value_parser = humantime::parse_duration)]
        retention: Option<Duration>,
        /// Drop the oldest entries while the stream holds more bytes.
        #[arg(long)]
        retention_bytes: Option<u64>,
    },
    /// Appends entries (the arguments, or stdin lines with `-`).
    Append {
        name: String,
        #[arg(required = true)]
        entries: Vec<String>,
    },
    /// Prints entries.
    Read {
        name: String,
        /// First id (default: the earliest).
        #[arg(long)]
        from: Option<u64>,
        /// Most entries.
        #[arg(long, default_value_t = 100)]
        limit: u64,
    },
    /// Prints new entries as they arrive, until interrupted.
    Tail {
        name: String,
        /// Follow the stream (the only mode; accepted for familiarity).
        #[arg(short = 'f', long)]
        follow: bool,
        /// Start at this id instead of the end.
        #[arg(long)]
        from: Option<u64>,
    },
    /// Lists streams.
    Ls,
    /// Drops every entry below an id.
    Truncate { name: String, before: u64 },
    /// Deletes a stream.
    Delete { name: String },
}

/// An error that means "not there" (exit code 3).
fn not_found(e: &anyhow::Error) -> bool {
    e.downcast_ref::<timber_client::Error>()
        .and_then(|e| e.code())
        .is_some_and(|c| c == timber_client::Code::NotFound)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let json = cli.json;
    match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            if json {
                println!("{}", json!({ "error": format!("{e:#}") }));
            } else {
                eprintln!("error: {e:#}");
            }
            if not_found(&e) {
                ExitCode::from(3)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let opts = Options { timeout: cli.timeout, token: cli.token.clone(), ..Options::default() };
    let client = Client::connect_with(cli.addr.clone(), opts)
        .await
        .with_context(|| format!("cannot reach timberd at {}", cli.addr))?;
    let json = cli.json;
    let mut out = std::io::stdout().lock();
    match cli.cmd {
        Cmd::Kv(Kv::Get { key }) => match client.get_versioned(key.clone()).await? {
            Some((v, version)) if json => {
                writeln!(out, "{}", json!({ "key": key, "value": text(&v), "version": version }))?
            }
            Some((v, _)) => {
                out.write_all(&v)?;
                writeln!(out)?;
            }
            None => {
                return Err(timber_client::Error::Server {
                    op: "get",
                    code: timber_client::Code::NotFound,
                    message: format!("key {key:?} does not exist"),
                }
                .into())
            }
        },
        Cmd::Txn { compare, success, failure } => {
            let mut t = timber_client::Txn::new();
            for c in &compare {
                t = txn::compare(t, c).map_err(anyhow::Error::msg)?;
            }
            for o in &success {
                t = txn::operation(t, o, true).map_err(anyhow::Error::msg)?;
            }
            for o in &failure {
                t = txn::operation(t, o, false).map_err(anyhow::Error::msg)?;
            }
            let done = client.txn(t).await?;
            let results: Vec<serde_json::Value> = done
                .results
                .iter()
                .map(|r| match r {
                    timber_client::TxnOpResult::Put => json!({ "put": {} }),
                    timber_client::TxnOpResult::Delete { existed } => {
                        json!({ "delete": { "existed": existed } })
                    }
                    timber_client::TxnOpResult::Get(v) => {
                        json!({ "get": { "value": v.as_deref().map(text) } })
                    }
                })
                .collect();
            if json {
                writeln!(out, "{}", json!({ "succeeded": done.succeeded, "results": results }))?;
            } else {
                writeln!(out, "{}", if done.succeeded { "SUCCESS" } else { "FAILURE" })?;
                for r in &done.results {
                    match r {
                        timber_client::TxnOpResult::Put => writeln!(out, "OK")?,
                        timber_client::TxnOpResult::Delete { existed: true } => {
                            writeln!(out, "deleted")?
                        }
                        timber_client::TxnOpResult::Delete { existed: false } => {
                            writeln!(out, "not found")?
                        }
                        timber_client::TxnOpResult::Get(Some(v)) => {
                            out.write_all(v)?;
                            writeln!(out)?;
                        }
                        timber_client::TxnOpResult::Get(None) => writeln!(out, "(nil)")?,
                    }
                }
            }
            if !done.succeeded {
                return Ok(ExitCode::from(4));
            }
        }
        Cmd::Kv(Kv::Put { key, value, ttl }) => {
            match ttl {
                Some(t) => client.put_with_ttl(key, value, t).await?,
                None => client.put(key, value).await?,
            }
            if json {
                writeln!(out, "{}", json!({ "ok": true }))?;
            } else {
                writeln!(out, "OK")?;
            }
        }
        Cmd::Kv(Kv::Del { key }) => {
            let existed = client.delete(key).await?;
            if json {
                writeln!(out, "{}", json!({ "existed": existed }))?;
            } else {
                writeln!(out, "{}", if existed { "deleted" } else { "not found" })?;
            }
        }
        Cmd::Kv(Kv::Scan { prefix, start, end, limit }) => {
            let scan = Scan {
                prefix: prefix.into(),
                start: start.into(),
                end: end.into(),
                limit,
                stale: false,
            };
            let items = client.scan(scan).await?;
            if json {
                let items: Vec<_> = items
                    .iter()
                    .map(|(k, v)| json!({ "key": text(k), "value": text(v) }))
                    .collect();
                writeln!(out, "{}", json!({ "items": items }))?;
            } else {
                for (k, v) in items {
                    writeln!(out, "{}\t{}", text(&k), text(&v))?;
                }
            }
        }
        Cmd::Stream(Stream::Create { name, retention, retention_bytes }) => {
            let s = client.create_stream(&name, retention, retention_bytes).await?;
            if json {
                writeln!(out, "{}", info_json(&s))?;
            } else {
                writeln!(out, "created {}", s.name)?;
            }
        }
        Cmd::Stream(Stream::Append { name, entries }) => {
            let entries: Vec<Bytes> = if entries == ["-"] {
                std::io::stdin().lines().map(|l| l.map(Bytes::from)).collect::<Result<_, _>>()?
            } else {
                entries.into_iter().map(Bytes::from).collect()
            };
            let n = entries.len();
            let first = client.append(&name, entries).await?;
            if json {
                writeln!(out, "{}", json!({ "first_id": first, "count": n }))?;
            } else {
                writeln!(out, "appended {n} entries from id {first}")?;
            }
        }
        Cmd::Stream(Stream::Read { name, from, limit }) => {
            let start = from.map_or(Start::Earliest, Start::At);
            let mut r = client.reader(&name, start, false).await?;
            let mut n = 0;
            while n < limit {
                let Some(e) = r.next().await? else { break };
                print_entry(&mut out, json, e.id, &e.data)?;
                n += 1;
            }
        }
        Cmd::Stream(Stream::Tail { name, follow: _, from }) => {
            let start = from.map_or(Start::Latest, Start::At);
            let mut r = client.reader(&name, start, true).await?;
            loop {
                tokio::select! {
                    e = r.next() => match e? {
                        Some(e) => {
                            print_entry(&mut out, json, e.id, &e.data)?;
                            out.flush()?;
                        }
                        None => break,
                    },
                    _ = tokio::signal::ctrl_c() => break,
                }
            }
        }
        Cmd::Stream(Stream::Ls) => {
            let all = client.list_streams().await?;
            if json {
                let all: Vec<_> = all.iter().map(info_json).collect();
                writeln!(out, "{}", json!({ "streams": all }))?;
            } else {
                writeln!(out, "{:<32} {:>12} {:>12} {:>14}", "NAME", "FIRST", "NEXT", "BYTES")?;
                for s in all {
                    writeln!(
                        out,
                        "{:<32} {:>12} {:>12} {:>14}",
                        s.name, s.first_id, s.next_id, s.bytes
                    )?;
                }
            }
        }
        Cmd::Stream(Stream::Truncate { name, before }) => {
            let s = client.truncate(&name, before).await?;
            if json {
                writeln!(out, "{}", info_json(&s))?;
            } else {
                writeln!(out, "{} now starts at {}", s.name, s.first_id)?;
            }
        }
        Cmd::Stream(Stream::Delete { name }) => {
            client.delete_stream(&name).await?;
            if json {
                writeln!(out, "{}", json!({ "ok": true }))?;
            } else {
                writeln!(out, "deleted {name}")?;
            }
        }
        Cmd::Status => {
            let s = client.status().await?;
            if json {
                writeln!(
                    out,
                    "{}",
                    json!({
                        "version": s.version, "uptime_ms": s.uptime.as_millis() as u64, "keys": s.keys,
                        "streams": s.streams, "data_dir": s.data_dir, "sync": s.sync,
                        "stream_store": s.stream_store,
                        "store_unavailable_ms": s.store_unavailable.map(|d| d.as_millis() as u64),
                        "store_last_error": s.store_last_error,
                        "journal_backlog_bytes": s.journal_backlog_bytes,
                    })
                )?;
            } else {
                writeln!(out, "timberd {} up {}s", s.version, s.uptime.as_secs())?;
                writeln!(out, "data dir  {}", s.data_dir)?;
                writeln!(out, "sync      {}", s.sync)?;
                writeln!(out, "keys      {}", s.keys)?;
                writeln!(out, "streams   {}", s.streams)?;
                writeln!(out, "store     {}", s.stream_store)?;
                match (&s.store_unavailable, &s.store_last_error) {
                    (Some(d), e) => writeln!(
                        out,
                        "          unavailable for {}s: {}",
                        d.as_secs(),
                        e.as_deref().unwrap_or("")
                    )?,
                    (None, _) => writeln!(out, "          available")?,
                }
                writeln!(out, "backlog   {} bytes in the journal", s.journal_backlog_bytes)?;
            }
        }
        Cmd::Backup { dir } => {
            let (position, bytes) = client.backup(&dir).await?;
            writeln!(out, "backed up {bytes} bytes at {position} into {}", dir.display())?;
        }
        Cmd::Cluster(Cluster::Status) => {
            let s = client.status().await?;
            let Some(c) = s.cluster else {
                return Err(anyhow::anyhow!("the server is a single node, not a cluster member"));
            };
            if json {
                let members: Vec<_> = c
                    .members
                    .iter()
                    .map(|m| {
                        json!({
                            "id": m.id, "raft_addr": m.raft_addr, "role": member_role(&c, m),
                            "matched_index": m.matched_index, "lag": m.lag,
                        })
                    })
                    .collect();
                writeln!(
                    out,
                    "{}",
                    json!({
                        "node_id": c.node_id, "role": c.role, "term": c.term,
                        "leader_id": c.leader_id, "last_log_index": c.last_log_index,
                        "commit_index": c.commit_index, "applied_index": c.applied_index,
                        "members": members,
                    })
                )?;
            } else {
                let opt = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
                writeln!(
                    out,
                    "member {} ({}), term {}, leader {}, log {}, committed {}, applied {}",
                    c.node_id,
                    c.role,
                    c.term,
                    opt(c.leader_id),
                    opt(c.last_log_index),
                    opt(c.commit_index),
                    opt(c.applied_index)
                )?;
                writeln!(
                    out,
                    "{:>4}  {:<8}  {:<22}  {:>8}  lag",
                    "id", "role", "raft address", "matched"
                )?;
                for m in &c.members {
                    writeln!(
                        out,
                        "{:>4}  {:<8}  {:<22}  {:>8}  {}",
                        m.id,
                        member_role(&c, m),
                        m.raft_addr,
                        opt(m.matched_index),
                        opt(m.lag)
                    )?;
                }
            }
        }
        Cmd::Cluster(change) => {
            let what = match change {
                Cluster::AddLearner { id, raft_addr } => {
                    client.add_learner(id, &raft_addr).await?;
                    format!("member {id} added as a learner")
                }
                Cluster::Promote { id } => {
                    client.promote(id).await?;
                    format!("member {id} promoted to voter")
                }
                Cluster::Remove { id } => {
                    client.remove_member(id).await?;
                    format!("member {id} removed")
                }
                Cluster::TransferLeader { id } => {
                    client.transfer_leader(id).await?;
                    format!("member {id} leads")
                }
                Cluster::Status => unreachable!("handled above"),
            };
            if json {
                writeln!(out, "{}", json!({ "ok": true }))?;
            } else {
                writeln!(out, "{what}")?;
            }
        }
        Cmd::Bench(args) => {
            drop(out);
            bench::run(client, args, json).await?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A member's role as the member asked sees it: the leader, a voter following it, or a learner.
fn member_role(c: &timber_client::ClusterStatus, m: &timber_client::ClusterMember) -> &'static str {
    match (Some(m.id) == c.leader_id, m.learner) {
        (true, _) => "leader",
        (false, true) => "learner",
        (false, false) => "follower",
    }
}

fn info_json(s: &timber_client::StreamInfo) -> serde_json::Value {
    json!({
        "name": s.name, "first_id": s.first_id, "next_id": s.next_id,
        "bytes": s.bytes, "created_ms": millis_since_epoch(s.created),
    })
}

fn millis_since_epoch(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn print_entry(
    out: &mut impl std::io::Write,
    json: bool,
    id: u64,
    data: &[u8],
) -> anyhow::Result<()> {
    if json {
        writeln!(out, "{}", json!({ "id": id, "data": text(data) }))?;
    } else {
        writeln!(out, "{id}\t{}", text(data))?;
    }
    Ok(())
}
