//! Configuration of `timberd`: flags, then environment variables, then a TOML file (`--config`),
//! then defaults, in that order of precedence. Every problem is reported as one message naming
//! the option and the source it came from.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use serde::Deserialize;

/// When acknowledged writes are durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sync {
    /// Every acknowledged write is on disk (fdatasync, group-committed).
    Always,
    /// Writes are in the OS when acknowledged and synced every interval.
    Interval(Duration),
    /// Writes are synced only when the engine syncs for its own reasons (and at shutdown).
    Manual,
}

impl std::fmt::Display for Sync {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Sync::Always => f.write_str("always"),
            Sync::Interval(d) => write!(f, "interval:{}", d.as_millis()),
            Sync::Manual => f.write_str("manual"),
        }
    }
}

impl std::str::FromStr for Sync {
    type Err = String;

    fn from_str(s: &str) -> Result<Sync, String> {
        match s {
            "always" => Ok(Sync::Always),
            "manual" => Ok(Sync::Manual),
            _ => match s.strip_prefix("interval:").map(str::parse::<u64>) {
                Some(Ok(ms)) if ms > 0 => Ok(Sync::Interval(Duration::from_millis(ms))),
                _ => Err(format!(
                    "{s:?} is not a sync mode: use always, interval:<ms> (ms > 0) or manual"
                )),
            },
        }
    }
}

/// A secret (a password, a credential): shown as `<redacted>` by `Debug`, never displayed.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }

    /// The value, for the one place that uses it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Where stream fragments are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamStore {
    /// Files under the data directory.
    Local,
    /// An S3-compatible object store.
    S3(S3Store),
}

/// An S3-compatible bucket (and prefix) for stream fragments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Store {
    /// The bucket.
    pub bucket: String,
    /// Key prefix within the bucket (without slashes at either end; may be empty).
    pub prefix: String,
    /// Endpoint URL (`None`: AWS); path-style addressing when set.
    pub endpoint: Option<String>,
    /// Region.
    pub region: String,
    /// Access key id.
    pub access_key_id: String,
    /// Secret access key.
    pub secret_access_key: Secret,
}

impl std::fmt::Display for StreamStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StreamStore::Local => f.write_str("local"),
            StreamStore::S3(s) => {
                write!(f, "s3://{}/{}", s.bucket, s.prefix)?;
                match &s.endpoint {
                    Some(e) => write!(f, " at {e}"),
                    None => write!(f, " ({})", s.region),
                }
            }
        }
    }
}

impl StreamStore {
    /// The name of the backend: `local` or `s3`.
    pub fn backend(&self) -> &'static str {
        match self {
            StreamStore::Local => "local",
            StreamStore::S3(_) => "s3",
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Human,
    /// One JSON object per line.
    Json,
}

/// Command-line flags; each can also come from the environment variable named beside it.
#[derive(Debug, Parser)]
#[command(
    name = "timberd",
    version,
    about = "The timber server: durable keys and log streams over the Redis protocol, gRPC and HTTP"
)]
pub struct Flags {
    /// TOML configuration file; flags and environment variables override its values.
    #[arg(long, env = "TIMBER_CONFIG")]
    pub config: Option<PathBuf>,
    /// Directory for all data [default: ./timber-data].
    #[arg(long, env = "TIMBER_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Starts from a backup (a directory `timber backup` wrote): its keyspace is loaded into
    /// --data-dir, which must not hold a keyspace yet. A single node, or the first member of a
    /// new cluster (--initial-cluster listing only itself), which the others then join.
    #[arg(long)]
    pub restore_from: Option<PathBuf>,
    /// Redis-protocol listen address, host:port; port 0 picks a free port [default: 127.0.0.1:6379].
    #[arg(long, env = "TIMBER_RESP_ADDR")]
    pub resp_addr: Option<SocketAddr>,
    /// gRPC listen address, host:port; port 0 picks a free port [default: 127.0.0.1:50051].
    #[arg(long, env = "TIMBER_GRPC_ADDR")]
    pub grpc_addr: Option<SocketAddr>,
    /// HTTP listen address (REST, WebSocket, /metrics), host:port; port 0 picks a free port
    /// [default: 127.0.0.1:8080].
    #[arg(long, env = "TIMBER_HTTP_ADDR")]
    pub http_addr: Option<SocketAddr>,
    /// Durability of acknowledged writes: always, interval:<ms> or manual [default: interval:1000].
    #[arg(long, env = "TIMBER_SYNC")]
    pub sync: Option<String>,
    /// Log format [default: human].
    #[arg(long, env = "TIMBER_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Most client connections at once, all endpoints together; more are refused with an error
    /// [default: 10000].
    #[arg(long, env = "TIMBER_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Largest request (one command with its arguments), in bytes [default: 536870912].
    #[arg(long, env = "TIMBER_MAX_REQUEST_BYTES")]
    pub max_request_bytes: Option<usize>,
    /// Memory the keyspace engine's memtables, index and filter blocks and block cache may
    /// hold together, in MiB (at least 1) [default: none: 3 memtables of 64 MiB at most and a
    /// 64 MiB block cache].
    #[arg(long, env = "TIMBER_MEMORY_BUDGET_MB")]
    pub memory_budget_mb: Option<usize>,
    /// Seconds a connection (any endpoint) may stay idle before it is closed; 0 never. gRPC
    /// peers that stop answering HTTP/2 pings are dropped regardless [default: 0].
    #[arg(long, env = "TIMBER_IDLE_TIMEOUT_SECS")]
    pub idle_timeout_secs: Option<u64>,
    /// Shared secret clients must present (Redis AUTH / HELLO AUTH) [default: none].
    #[arg(long, env = "TIMBER_AUTH_SECRET", hide_env_values = true)]
    pub auth_secret: Option<String>,
    /// Threads that serve connections (the async runtime's workers); the engines' background
    /// threads come on top. Fewer than the cores leaves the rest to other processes, such as
    /// clients on the same machine; with 1, connections are served from a current-thread
    /// runtime, on the main thread [default: the number of cores].
    #[arg(long, env = "TIMBER_WORKERS")]
    pub workers: Option<usize>,
    /// Microseconds a runtime worker keeps polling for Redis-protocol requests after the last
    /// one before it sleeps; 0 never. Under steady load this spares the client the wake-up of a
    /// sleeping server thread per request, for at most this much CPU per quiet spell; at most
    /// 1000. Under --sync always it stops whenever an fsync round is due, since idle workers
    /// run those [default: 10].
    #[arg(long, env = "TIMBER_IDLE_SPIN_US")]
    pub idle_spin_us: Option<u64>,
    /// Where stream fragments are kept: local (files under --data-dir) or
    /// s3://<bucket>[/<prefix>] (any S3-compatible store; credentials from AWS_ACCESS_KEY_ID and
    /// AWS_SECRET_ACCESS_KEY, or s3_access_key_id and s3_secret_access_key in the config file).
    /// Acknowledged entries are durable in a local journal until their fragments are stored
    /// [default: local].
    #[arg(long, env = "TIMBER_STREAM_STORE")]
    pub stream_store: Option<String>,
    /// S3 endpoint URL, e.g. http://127.0.0.1:9000 for MinIO; path-style addressing when set
    /// [default: AWS].
    #[arg(long, env = "TIMBER_S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,
    /// S3 region [default: us-east-1].
    #[arg(long, env = "TIMBER_S3_REGION")]
    pub s3_region: Option<String>,
    /// Seconds the object store may fail before stream appends are refused; until then they are
    /// acknowledged from the local journal and uploaded when the store is back [default: 30].
    #[arg(long, env = "TIMBER_STORE_OUTAGE_SECS")]
    pub store_outage_secs: Option<u64>,
    /// MiB of acknowledged entries that may wait in the journal for the object store before
    /// appends are refused [default: 1024].
    #[arg(long, env = "TIMBER_STORE_BACKLOG_MB")]
    pub store_backlog_mb: Option<u64>,
    /// Milliseconds between rounds of stream maintenance: retention, garbage collection of
    /// fragments, merging of small ones (in a cluster the leader decides the retention cuts
    /// each round and replicates them) [default: 10000].
    #[arg(long, env = "TIMBER_STREAM_MAINTENANCE_MS")]
    pub stream_maintenance_ms: Option<u64>,
    /// This member's id in a cluster (1 or more); with --raft-addr, runs timberd as a member of
    /// a Raft cluster [default: single node].
    #[arg(long, env = "TIMBER_NODE_ID")]
    pub node_id: Option<u64>,
    /// Where this member's Raft endpoint listens, host:port; the address the others reach it at
    /// in --initial-cluster.
    #[arg(long, env = "TIMBER_RAFT_ADDR")]
    pub raft_addr: Option<SocketAddr>,
    /// The members a new cluster starts with, as id=host:port of their Raft endpoints, comma
    /// separated (every member is started with the same list); used on the first start only.
    #[arg(long, env = "TIMBER_INITIAL_CLUSTER")]
    pub initial_cluster: Option<String>,
    /// Joins a running cluster through the member at this host:port, its gRPC address (Admin
    /// service) or its Raft address: this member is added as a learner (it catches up from the
    /// leader), to be promoted with `timber cluster promote <id>`. Instead of
    /// --initial-cluster.
    #[arg(long, env = "TIMBER_JOIN")]
    pub join: Option<String>,
    /// Raft heartbeat period in milliseconds [default: 50].
    #[arg(long, env = "TIMBER_RAFT_HEARTBEAT_MS")]
    pub raft_heartbeat_ms: Option<u64>,
    /// Range the election timeout is drawn from, `<min>-<max>` milliseconds: a follower that
    /// hears no leader for that long stands for election [default: 3 to 6 heartbeats,
    /// 150-300].
    #[arg(long, env = "TIMBER_RAFT_ELECTION_MS")]
    pub raft_election_ms: Option<String>,
    /// Applied entries after which a member snapshots its state and purges its log up to a
    /// tenth of them behind (at most 1000) [default: 10000]. A member further behind than the
    /// log reaches catches up from a snapshot.
    #[arg(long, env = "TIMBER_RAFT_SNAPSHOT_ENTRIES")]
    pub raft_snapshot_entries: Option<u64>,
    /// Milliseconds a write or linearizable read waits for a quorum before it fails with
    /// CLUSTERDOWN (gRPC UNAVAILABLE, HTTP 503) [default: 2000].
    #[arg(long, env = "TIMBER_RAFT_TIMEOUT_MS")]
    pub raft_timeout_ms: Option<u64>,
}

/// The `--config` file: the same options as the flags, in snake_case.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    data_dir: Option<PathBuf>,
    resp_addr: Option<SocketAddr>,
    grpc_addr: Option<SocketAddr>,
    http_addr: Option<SocketAddr>,
    sync: Option<String>,
    log_format: Option<LogFormat>,
    max_connections: Option<usize>,
    max_request_bytes: Option<usize>,
    memory_budget_mb: Option<usize>,
    idle_timeout_secs: Option<u64>,
    auth_secret: Option<String>,
    workers: Option<usize>,
    idle_spin_us: Option<u64>,
    stream_store: Option<String>,
    s3_endpoint: Option<String>,
    s3_region: Option<String>,
    s3_access_key_id: Option<String>,
    s3_secret_access_key: Option<Secret>,
    store_outage_secs: Option<u64>,
    store_backlog_mb: Option<u64>,
    stream_maintenance_ms: Option<u64>,
    node_id: Option<u64>,
    raft_addr: Option<SocketAddr>,
    initial_cluster: Option<String>,
    join: Option<String>,
    raft_heartbeat_ms: Option<u64>,
    raft_election_ms: Option<String>,
    raft_snapshot_entries: Option<u64>,
    raft_timeout_ms: Option<u64>,
}

/// Membership of a Raft cluster (`--node-id`, `--raft-addr`, `--initial-cluster`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cluster {
    /// This member's id.
    pub node_id: u64,
    /// Where its Raft endpoint listens.
    pub raft_addr: SocketAddr,
    /// id → Raft address of the members a new cluster starts with (empty: join later).
    pub initial: std::collections::BTreeMap<u64, String>,
    /// Raft heartbeat period.
    pub heartbeat: Duration,
    /// Range the election timeout is drawn from.
    pub election: (Duration, Duration),
    /// Applied entries between snapshots.
    pub snapshot_entries: u64,
    /// How long a write or linearizable read waits for a quorum.
    pub timeout: Duration,
    /// The gRPC or Raft address of a member to join through (`--join`).
    pub join: Option<String>,
}

/// Parses `--raft-election-ms` (`<min>-<max>`): above the heartbeat (a leader must be heard
/// before a follower gives up on it), min below max (so that candidates rarely tie).
fn parse_election(text: &str, heartbeat: u64) -> Result<(u64, u64), String> {
    let bad = || format!("raft_election_ms: {text:?} is not <min>-<max> milliseconds");
    let (lo, hi) = text.split_once('-').ok_or_else(bad)?;
    let (lo, hi): (u64, u64) =
        (lo.trim().parse().map_err(|_| bad())?, hi.trim().parse().map_err(|_| bad())?);
    if lo < 2 * heartbeat || hi <= lo || hi > 60_000 {
        return Err(format!(
            "raft_election_ms: {text:?} must have min at least 2 heartbeats ({} ms) and below \
             max, and max at most 60000",
            2 * heartbeat
        ));
    }
    Ok((lo, hi))
}

/// Parses `1=host:port,2=host:port`.
fn parse_initial_cluster(text: &str) -> Result<std::collections::BTreeMap<u64, String>, String> {
    let mut out = std::collections::BTreeMap::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, addr) = part
            .split_once('=')
            .ok_or_else(|| format!("initial_cluster: {part:?} is not id=host:port"))?;
        let id: u64 = id
            .trim()
            .parse()
            .ok()
            .filter(|&i| i > 0)
            .ok_or_else(|| format!("initial_cluster: {id:?} is not a member id (1 or more)"))?;
        let addr = addr.trim();
        if addr.rsplit_once(':').and_then(|(_, p)| p.parse::<u16>().ok()).is_none() {
            return Err(format!("initial_cluster: {addr:?} is not host:port"));
        }
        if out.insert(id, addr.to_string()).is_some() {
            return Err(format!("initial_cluster: member {id} is listed twice"));
        }
    }
    Ok(out)
}

/// The resolved configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Directory for all data.
    pub data_dir: PathBuf,
    /// A backup to load into a new data directory before starting.
    pub restore_from: Option<PathBuf>,
    /// Redis-protocol listen address.
    pub resp_addr: SocketAddr,
    /// gRPC listen address.
    pub grpc_addr: SocketAddr,
    /// HTTP listen address.
    pub http_addr: SocketAddr,
    /// Durability of acknowledged writes.
    pub sync: Sync,
    /// Log format.
    pub log_format: LogFormat,
    /// Most connections at once.
    pub max_connections: usize,
    /// Largest request in bytes.
    pub max_request_bytes: usize,
    /// The keyspace engine's memory budget in bytes (`None`: its own limits).
    pub memory_budget: Option<usize>,
    /// Idle connection timeout (`None`: never).
    pub idle_timeout: Option<Duration>,
    /// Shared secret for AUTH.
    pub auth_secret: Option<Secret>,
    /// Runtime worker threads (`None`: one per core).
    pub workers: Option<usize>,
    /// How long a worker polls for requests after the last one before it sleeps (zero: never).
    pub idle_spin: Duration,
    /// Where stream fragments are kept.
    pub stream_store: StreamStore,
    /// How long the object store may fail before stream appends are refused.
    pub store_outage: Duration,
    /// Bytes of acknowledged entries that may wait in the journal for the object store.
    pub store_backlog_bytes: u64,
    /// Time between rounds of stream maintenance (and of a cluster leader's retention cuts).
    pub stream_maintenance: Duration,
    /// Membership of a Raft cluster (`None`: a single node).
    pub cluster: Option<Cluster>,
}

impl Config {
    /// A configuration for embedding and tests: data in `dir`, a free port on 127.0.0.1.
    pub fn for_dir(dir: impl Into<PathBuf>) -> Config {
        Config {
            data_dir: dir.into(),
            restore_from: None,
            resp_addr: "127.0.0.1:0".parse().expect("valid address"),
            grpc_addr: "127.0.0.1:0".parse().expect("valid address"),
            http_addr: "127.0.0.1:0".parse().expect("valid address"),
            sync: Sync::Interval(Duration::from_secs(1)),
            log_format: LogFormat::Human,
            max_connections: 10_000,
            max_request_bytes: 512 << 20,
            memory_budget: None,
            idle_timeout: None,
            auth_secret: None,
            workers: None,
            idle_spin: Duration::from_micros(DEFAULT_IDLE_SPIN_US),
            stream_store: StreamStore::Local,
            store_outage: Duration::from_secs(DEFAULT_STORE_OUTAGE_SECS),
            store_backlog_bytes: DEFAULT_STORE_BACKLOG_MB << 20,
            stream_maintenance: Duration::from_millis(DEFAULT_STREAM_MAINTENANCE_MS),
            cluster: None,
        }
    }

    /// Resolves flags, environment (folded into the flags by clap, and the AWS credentials),
    /// file and defaults.
    pub fn resolve(flags: Flags) -> Result<Config, String> {
        Config::resolve_with(flags, |k| std::env::var(k).ok().filter(|v| !v.is_empty()))
    }

    /// [`Config::resolve`] with the environment variables that clap does not read (the AWS
    /// credentials) looked up by `env`.
    fn resolve_with(flags: Flags, env: impl Fn(&str) -> Option<String>) -> Result<Config, String> {
        let file = match &flags.config {
            None => File::default(),
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .map_err(|e| format!("cannot read config file {}: {e}", p.display()))?;
                toml::from_str(&text)
                    .map_err(|e| format!("config file {}: {}", p.display(), e.message()))?
            }
        };
        let sync = match flags.sync.or(file.sync) {
            None => Sync::Interval(Duration::from_secs(1)),
            Some(s) => s.parse().map_err(|e| format!("sync: {e}"))?,
        };
        let max_connections = flags.max_connections.or(file.max_connections).unwrap_or(10_000);
        if max_connections == 0 {
            return Err("max_connections must be at least 1".into());
        }
        let max_request_bytes =
            flags.max_request_bytes.or(file.max_request_bytes).unwrap_or(512 << 20);
        if max_request_bytes < 1024 {
            return Err("max_request_bytes must be at least 1024".into());
        }
        let memory_budget = match flags.memory_budget_mb.or(file.memory_budget_mb) {
            Some(0) => return Err("memory_budget_mb must be at least 1".into()),
            Some(mb) => Some(mb.checked_mul(1 << 20).ok_or("memory_budget_mb is too large")?),
            None => None,
        };
        let idle = flags.idle_timeout_secs.or(file.idle_timeout_secs).unwrap_or(0);
        let workers = flags.workers.or(file.workers);
        if workers == Some(0) {
            return Err("workers must be at least 1".into());
        }
        let idle_spin = flags.idle_spin_us.or(file.idle_spin_us).unwrap_or(DEFAULT_IDLE_SPIN_US);
        if idle_spin > MAX_IDLE_SPIN_US {
            return Err(format!(
                "idle_spin_us must be at most {MAX_IDLE_SPIN_US} (got {idle_spin})"
            ));
        }
        let store_outage_secs =
            flags.store_outage_secs.or(file.store_outage_secs).unwrap_or(DEFAULT_STORE_OUTAGE_SECS);
        let store_backlog_mb =
            flags.store_backlog_mb.or(file.store_backlog_mb).unwrap_or(DEFAULT_STORE_BACKLOG_MB);
        if store_backlog_mb == 0 {
            return Err("store_backlog_mb must be at least 1".into());
        }
        let stream_maintenance_ms = flags
            .stream_maintenance_ms
            .or(file.stream_maintenance_ms)
            .unwrap_or(DEFAULT_STREAM_MAINTENANCE_MS);
        if !(10..=86_400_000).contains(&stream_maintenance_ms) {
            return Err(format!(
                "stream_maintenance_ms must be 10 to 86400000 (got {stream_maintenance_ms})"
            ));
        }
        let mut stream_store = match flags.stream_store.or(file.stream_store).as_deref() {
            None | Some("local") => StreamStore::Local,
            Some(url) => {
                let Some(rest) = url.strip_prefix("s3://") else {
                    return Err(format!(
                        "stream_store: {url:?} is not local or s3://<bucket>[/<prefix>]"
                    ));
                };
                let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
                if bucket.is_empty() {
                    return Err(format!("stream_store: {url:?} names no bucket"));
                }
                let access_key_id = env("AWS_ACCESS_KEY_ID").or(file.s3_access_key_id);
                let secret =
                    env("AWS_SECRET_ACCESS_KEY").map(Secret::new).or(file.s3_secret_access_key);
                let (Some(access_key_id), Some(secret_access_key)) = (access_key_id, secret) else {
                    return Err("stream_store s3:// needs credentials: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the environment, or s3_access_key_id and s3_secret_access_key in the config file".into());
                };
                let endpoint = flags.s3_endpoint.or(file.s3_endpoint).filter(|e| !e.is_empty());
                if let Some(e) = &endpoint {
                    if !(e.starts_with("http://") || e.starts_with("https://")) {
                        return Err(format!(
                            "s3_endpoint: {e:?} is not an http:// or https:// URL"
                        ));
                    }
                }
                StreamStore::S3(S3Store {
                    bucket: bucket.to_string(),
                    prefix: prefix.trim_matches('/').to_string(),
                    endpoint,
                    region: flags
                        .s3_region
                        .or(file.s3_region)
                        .unwrap_or_else(|| "us-east-1".into()),
                    access_key_id,
                    secret_access_key,
                })
            }
        };
        let cluster = match (flags.node_id.or(file.node_id), flags.raft_addr.or(file.raft_addr)) {
            (None, None) => {
                if flags.initial_cluster.is_some()
                    || file.initial_cluster.is_some()
                    || flags.join.is_some()
                    || file.join.is_some()
                {
                    return Err("initial_cluster and join need node_id and raft_addr".into());
                }
                None
            }
            (Some(0), _) => return Err("node_id must be at least 1".into()),
            (Some(node_id), Some(raft_addr)) => {
                let initial = match flags.initial_cluster.or(file.initial_cluster) {
                    Some(t) => parse_initial_cluster(&t)?,
                    None => Default::default(),
                };
                if !initial.is_empty() && !initial.contains_key(&node_id) {
                    return Err(format!("initial_cluster does not list this member ({node_id})"));
                }
                let join = flags.join.or(file.join).filter(|j| !j.is_empty());
                if join.is_some() && !initial.is_empty() {
                    return Err("join and initial_cluster exclude each other".into());
                }
                let heartbeat = flags.raft_heartbeat_ms.or(file.raft_heartbeat_ms).unwrap_or(50);
                if !(10..=10_000).contains(&heartbeat) {
                    return Err(format!("raft_heartbeat_ms must be 10 to 10000 (got {heartbeat})"));
                }
                let election = match flags.raft_election_ms.or(file.raft_election_ms) {
                    None => (3 * heartbeat, 6 * heartbeat),
                    Some(text) => parse_election(&text, heartbeat)?,
                };
                let snapshot_entries = flags
                    .raft_snapshot_entries
                    .or(file.raft_snapshot_entries)
                    .unwrap_or(DEFAULT_SNAPSHOT_ENTRIES);
                if !(10..=10_000_000).contains(&snapshot_entries) {
                    return Err(format!(
                        "raft_snapshot_entries must be 10 to 10000000 (got {snapshot_entries})"
                    ));
                }
                let timeout = flags.raft_timeout_ms.or(file.raft_timeout_ms).unwrap_or(2000);
                if timeout < 10 * heartbeat {
                    return Err(format!(
                        "raft_timeout_ms must be at least 10 heartbeats ({} ms)",
                        10 * heartbeat
                    ));
                }
                Some(Cluster {
                    node_id,
                    raft_addr,
                    initial,
                    heartbeat: Duration::from_millis(heartbeat),
                    election: (
                        Duration::from_millis(election.0),
                        Duration::from_millis(election.1),
                    ),
                    snapshot_entries,
                    timeout: Duration::from_millis(timeout),
                    join,
                })
            }
            _ => return Err("node_id and raft_addr go together".into()),
        };
        // Each member writes its own fragments (their names and contents are its own): under a
        // prefix of its own when members share a bucket.
        if let (StreamStore::S3(s3), Some(c)) = (&mut stream_store, &cluster) {
            let node = format!("node-{}", c.node_id);
            s3.prefix = match s3.prefix.as_str() {
                "" => node,
                p => format!("{p}/{node}"),
            };
        }
        if let (Some(_), Some(c)) = (&flags.restore_from, &cluster) {
            // The restored data is not in any log: only a member that forms a new cluster on
            // its own can take it in (the others join it and receive it as a snapshot).
            if c.join.is_some() || c.initial.len() != 1 {
                return Err("restore_from seeds a new cluster from one member: its \
                            initial_cluster lists only itself, and the others join it"
                    .into());
            }
        }
        Ok(Config {
            cluster,
            data_dir: flags.data_dir.or(file.data_dir).unwrap_or_else(|| "timber-data".into()),
            restore_from: flags.restore_from,
            resp_addr: flags
                .resp_addr
                .or(file.resp_addr)
                .unwrap_or_else(|| "127.0.0.1:6379".parse().expect("valid address")),
            grpc_addr: flags
                .grpc_addr
                .or(file.grpc_addr)
                .unwrap_or_else(|| "127.0.0.1:50051".parse().expect("valid address")),
            http_addr: flags
                .http_addr
                .or(file.http_addr)
                .unwrap_or_else(|| "127.0.0.1:8080".parse().expect("valid address")),
            sync,
            log_format: flags.log_format.or(file.log_format).unwrap_or(LogFormat::Human),
            max_connections,
            max_request_bytes,
            memory_budget,
            idle_timeout: (idle > 0).then(|| Duration::from_secs(idle)),
            auth_secret: flags
                .auth_secret
                .or(file.auth_secret)
                .filter(|s| !s.is_empty())
                .map(Secret::new),
            workers,
            idle_spin: Duration::from_micros(idle_spin),
            stream_store,
            store_outage: Duration::from_secs(store_outage_secs),
            store_backlog_bytes: store_backlog_mb.saturating_mul(1 << 20),
            stream_maintenance: Duration::from_millis(stream_maintenance_ms),
        })
    }
}

/// `--raft-snapshot-entries` unless set.
pub const DEFAULT_SNAPSHOT_ENTRIES: u64 = 10_000;

/// `--store-outage-secs` unless set.
const DEFAULT_STORE_OUTAGE_SECS: u64 = 30;
/// `--store-backlog-mb` unless set.
const DEFAULT_STORE_BACKLOG_MB: u64 = 1024;
/// `--stream-maintenance-ms` unless set.
const DEFAULT_STREAM_MAINTENANCE_MS: u64 = 10_000;
/// `--idle-spin-us` unless set.
const DEFAULT_IDLE_SPIN_US: u64 = 10;
/// The largest `--idle-spin-us`.
const MAX_IDLE_SPIN_US: u64 = 1000;

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(args: &[&str]) -> Flags {
        Flags::try_parse_from(std::iter::once("timberd").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn a_restore_seeds_a_single_node_or_a_cluster_of_one_member() {
        let member = ["--node-id", "1", "--raft-addr", "127.0.0.1:7001", "--restore-from", "b"];
        let c = Config::resolve(flags(&member)).unwrap_err();
        assert!(c.contains("lists only itself"), "{c}");
        let mut alone = member.to_vec();
        alone.extend(["--initial-cluster", "1=127.0.0.1:7001"]);
        assert!(Config::resolve(flags(&alone)).is_ok());
        let mut three = member.to_vec();
        three.extend(["--initial-cluster", "1=127.0.0.1:7001,2=127.0.0.1:7002,3=127.0.0.1:7003"]);
        assert!(Config::resolve(flags(&three)).unwrap_err().contains("lists only itself"));
        let single = Config::resolve(flags(&["--restore-from", "b"])).unwrap();
        assert_eq!(single.restore_from, Some(PathBuf::from("b")));
    }

    #[test]
    fn election_timeouts_default_to_3_to_6_heartbeats_or_take_a_range() {
        let member = ["--node-id", "1", "--raft-addr", "127.0.0.1:7001"];
        let election = |extra: &[&str]| {
            let args: Vec<&str> = member.iter().chain(extra).copied().collect();
            Config::resolve(flags(&args)).map(|c| c.cluster.unwrap().election)
        };
        let ms = Duration::from_millis;
        assert_eq!(election(&[]).unwrap(), (ms(150), ms(300)));
        assert_eq!(election(&["--raft-heartbeat-ms", "20"]).unwrap(), (ms(60), ms(120)));
        assert_eq!(election(&["--raft-election-ms", "500-900"]).unwrap(), (ms(500), ms(900)));
        for bad in ["300", "300-200", "50-400", "a-b", "200-70000"] {
            let e = election(&["--raft-election-ms", bad]).unwrap_err();
            assert!(e.contains("raft_election_ms"), "{bad}: {e}");
        }
    }

    #[test]
    fn precedence_is_flags_then_file_then_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("t.toml");
        std::fs::write(
            &f,
            "data_dir = \"/from/file\"\nsync = \"manual\"\nmax_connections = 7\nworkers = 3\n",
        )
        .unwrap();
        let c = Config::resolve(flags(&[
            "--config",
            f.to_str().unwrap(),
            "--sync",
            "always",
            "--workers",
            "1",
        ]))
        .unwrap();
        assert_eq!(c.sync, Sync::Always);
        assert_eq!(c.data_dir, PathBuf::from("/from/file"));
        assert_eq!(c.max_connections, 7);
        assert_eq!(c.workers, Some(1));
        assert_eq!(c.resp_addr.port(), 6379);
        let c = Config::resolve(flags(&["--config", f.to_str().unwrap()])).unwrap();
        assert_eq!(c.workers, Some(3));
        let c = Config::resolve(flags(&[])).unwrap();
        assert_eq!(c.data_dir, PathBuf::from("timber-data"));
        assert_eq!(c.sync, Sync::Interval(Duration::from_secs(1)));
        assert_eq!(c.workers, None);
        assert_eq!(c.idle_spin, Duration::from_micros(DEFAULT_IDLE_SPIN_US));
        let c = Config::resolve(flags(&["--sync", "always"])).unwrap();
        assert_eq!(c.idle_spin, Duration::from_micros(DEFAULT_IDLE_SPIN_US));
        let c = Config::resolve(flags(&["--sync", "always", "--idle-spin-us", "0"])).unwrap();
        assert_eq!(c.idle_spin, Duration::ZERO);
        let c = Config::resolve(flags(&["--sync", "always", "--idle-spin-us", "50"])).unwrap();
        assert_eq!(c.idle_spin, Duration::from_micros(50));
    }

    #[test]
    fn bad_config_gives_one_clear_message() {
        let e = Config::resolve(flags(&["--sync", "sometimes"])).unwrap_err();
        assert!(e.contains("sometimes") && e.contains("interval:<ms>"), "{e}");
        let e = Config::resolve(flags(&["--workers", "0"])).unwrap_err();
        assert!(e.contains("workers must be at least 1"), "{e}");
        let e = Config::resolve(flags(&["--idle-spin-us", "5000"])).unwrap_err();
        assert!(e.contains("idle_spin_us must be at most 1000"), "{e}");
        let e = Config::resolve(flags(&["--memory-budget-mb", "0"])).unwrap_err();
        assert!(e.contains("memory_budget_mb must be at least 1"), "{e}");
        let c = Config::resolve(flags(&["--memory-budget-mb", "256"])).unwrap();
        assert_eq!(c.memory_budget, Some(256 << 20));
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("t.toml");
        std::fs::write(&f, "colour = \"blue\"\n").unwrap();
        let e = Config::resolve(flags(&["--config", f.to_str().unwrap()])).unwrap_err();
        assert!(e.contains("colour"), "{e}");
        assert!(Flags::try_parse_from(["timberd", "--resp-addr", "nohost"]).is_err());
    }

    #[test]
    fn s3_stream_store_takes_credentials_from_the_environment_or_the_file() {
        let env = |k: &str| match k {
            "AWS_ACCESS_KEY_ID" => Some("AKID".to_string()),
            "AWS_SECRET_ACCESS_KEY" => Some("s3cr3t-from-env".to_string()),
            _ => None,
        };
        let c = Config::resolve_with(
            flags(&[
                "--stream-store",
                "s3://bkt/some/prefix/",
                "--s3-endpoint",
                "http://127.0.0.1:9000",
            ]),
            env,
        )
        .unwrap();
        let StreamStore::S3(s3) = &c.stream_store else { panic!("{:?}", c.stream_store) };
        assert_eq!((s3.bucket.as_str(), s3.prefix.as_str()), ("bkt", "some/prefix"));
        assert_eq!(
            (s3.access_key_id.as_str(), s3.secret_access_key.expose()),
            ("AKID", "s3cr3t-from-env")
        );
        assert_eq!(s3.region, "us-east-1");
        // No secret in Debug or Display (what logs print).
        let shown = format!("{c:?} {}", c.stream_store);
        assert!(!shown.contains("s3cr3t"), "{shown}");
        assert_eq!(c.stream_store.to_string(), "s3://bkt/some/prefix at http://127.0.0.1:9000");

        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("t.toml");
        std::fs::write(
            &f,
            "stream_store = \"s3://filebkt\"\ns3_access_key_id = \"FILEID\"\ns3_secret_access_key = \"file-s3cr3t\"\ns3_region = \"eu-west-1\"\nauth_secret = \"pw-s3cr3t\"\n",
        )
        .unwrap();
        let c = Config::resolve_with(flags(&["--config", f.to_str().unwrap()]), |_| None).unwrap();
        let StreamStore::S3(s3) = &c.stream_store else { panic!() };
        assert_eq!(
            (s3.bucket.as_str(), s3.prefix.as_str(), s3.region.as_str()),
            ("filebkt", "", "eu-west-1")
        );
        assert_eq!(s3.secret_access_key.expose(), "file-s3cr3t");
        assert!(!format!("{c:?}").contains("s3cr3t"));
        // The environment wins over the file.
        let c = Config::resolve_with(flags(&["--config", f.to_str().unwrap()]), env).unwrap();
        let StreamStore::S3(s3) = &c.stream_store else { panic!() };
        assert_eq!(s3.access_key_id, "AKID");
        // A cluster member's fragments go under a prefix of its own.
        for (url, want) in [("s3://bkt/shared", "shared/node-2"), ("s3://bkt", "node-2")] {
            let member = ["--node-id", "2", "--raft-addr", "127.0.0.1:7002", "--stream-store", url];
            let c = Config::resolve_with(flags(&member), env).unwrap();
            let StreamStore::S3(s3) = &c.stream_store else { panic!() };
            assert_eq!(s3.prefix, want);
        }
        let c = Config::resolve_with(flags(&[]), env).unwrap();
        assert_eq!(c.stream_store, StreamStore::Local);
    }

    #[test]
    fn bad_stream_store_settings_are_refused_clearly() {
        let none = |_: &str| None;
        let e = Config::resolve_with(flags(&["--stream-store", "s3://b"]), none).unwrap_err();
        assert!(e.contains("AWS_ACCESS_KEY_ID") && e.contains("s3_secret_access_key"), "{e}");
        let e = Config::resolve_with(flags(&["--stream-store", "gs://b"]), none).unwrap_err();
        assert!(e.contains("gs://b") && e.contains("s3://"), "{e}");
        let e = Config::resolve_with(flags(&["--stream-store", "s3://"]), none).unwrap_err();
        assert!(e.contains("no bucket"), "{e}");
        let env = |_: &str| Some("x".to_string());
        let e = Config::resolve_with(
            flags(&["--stream-store", "s3://b", "--s3-endpoint", "127.0.0.1:9000"]),
            env,
        )
        .unwrap_err();
        assert!(e.contains("http://"), "{e}");
        let e = Config::resolve_with(flags(&["--store-backlog-mb", "0"]), none).unwrap_err();
        assert!(e.contains("store_backlog_mb"), "{e}");
    }
}
