//! The commands of the Redis-protocol endpoint: argument parsing, arity and type checks, and
//! their effect on the [`Keyspace`], with Redis's error replies.

use bytes::Bytes;

use crate::keyspace::{now_ms, Keyspace, Kind, Value};
use crate::resp::glob;
use crate::resp::reply::Reply;

/// Per-connection state the commands read and change.
#[derive(Debug)]
pub struct Session {
    /// Protocol version of replies (2 or 3).
    pub proto: u8,
    /// Whether the client has authenticated (or no secret is set).
    pub authed: bool,
    /// `CLIENT SETNAME`.
    pub name: Option<Bytes>,
    /// Connection id.
    pub id: u64,
    /// Set by `QUIT`: close after replying.
    pub quit: bool,
    /// Commands run on this connection (for sampling their latency).
    pub commands: u64,
}

/// What a command needs besides its arguments.
#[derive(Debug)]
pub struct Context<'a> {
    /// The keyspace.
    pub keys: &'a Keyspace,
    /// The shared secret, if any.
    pub secret: Option<&'a str>,
    /// The largest value accepted.
    pub max_value: usize,
    /// Connected clients now.
    pub clients: usize,
}

/// The commands `COMMAND COUNT` and `COMMAND` report: (name, arity as Redis defines it).
const COMMANDS: &[(&str, i64)] = &[
    ("ping", -1),
    ("echo", 2),
    ("hello", -1),
    ("auth", -2),
    ("select", 2),
    ("quit", -1),
    ("command", -1),
    ("client", -2),
    ("info", -1),
    ("dbsize", 1),
    ("get", 2),
    ("set", -3),
    ("getdel", 2),
    ("del", -2),
    ("exists", -2),
    ("mget", -2),
    ("mset", -3),
    ("incr", 2),
    ("decr", 2),
    ("incrby", 3),
    ("decrby", 3),
    ("append", 3),
    ("strlen", 2),
    ("expire", 3),
    ("pexpire", 3),
    ("ttl", 2),
    ("pttl", 2),
    ("persist", 2),
    ("scan", -2),
    ("keys", 2),
    ("type", 2),
    ("flushdb", -1),
    ("flushall", -1),
    ("config", -2),
    ("xadd", -5),
    ("xlen", 2),
    ("xrange", -4),
    ("xrevrange", -4),
    ("xread", -4),
    ("xtrim", -4),
    ("xdel", -3),
    ("xgroup", -2),
    ("xreadgroup", -7),
    ("xack", -4),
    ("xpending", -3),
    ("xinfo", -2),
];

/// Whether a command may change the keyspace (and so needs a sync before its reply under
/// `--sync always`).
pub fn is_write(name: &[u8]) -> bool {
    const WRITES: &[&str] = &[
        "set", "getdel", "del", "mset", "incr", "decr", "incrby", "decrby", "append", "expire",
        "pexpire", "persist", "flushdb", "flushall",
    ];
    WRITES.iter().any(|w| w.as_bytes().eq_ignore_ascii_case(name))
}

fn arity_ok(arity: i64, n: usize) -> bool {
    if arity >= 0 {
        n as i64 == arity
    } else {
        n as i64 >= -arity
    }
}

/// A Redis integer argument (no sign prefix `+`, no leading zeros).
pub(crate) fn int(b: &[u8]) -> Option<i64> {
    let s = std::str::from_utf8(b).ok()?;
    if s.is_empty()
        || s.starts_with('+')
        || (s.len() > 1 && s.starts_with('0'))
        || s.starts_with("-0")
    {
        return None;
    }
    s.parse().ok()
}

fn not_int() -> Reply {
    Reply::err("value is not an integer or out of range")
}

fn syntax() -> Reply {
    Reply::err("syntax error")
}

fn storage(e: crate::keyspace::Error) -> Reply {
    if let crate::keyspace::Error::WrongType = e {
        return Reply::Error(e.to_string());
    }
    tracing::error!(error = %e, "storage error");
    Reply::err(format!("storage error: {e}"))
}

/// An argument in upper case, for option names.
pub(crate) fn upper(b: &[u8]) -> String {
    String::from_utf8_lossy(b).to_ascii_uppercase()
}

/// Checks a request before it runs: a known command, its arity, authentication. Returns the
/// command's name in lower case, or the error reply.
pub fn prepare(s: &Session, args: &[Bytes]) -> Result<(usize, &'static str), Reply> {
    let Some(name) = args.first() else { return Err(Reply::err("empty command")) };
    let found = COMMANDS.iter().position(|(n, _)| n.as_bytes().eq_ignore_ascii_case(name));
    let Some(index) = found else {
        let shown: String = args[1..]
            .iter()
            .take(8)
            .map(|a| format!("'{}' ", String::from_utf8_lossy(a)))
            .collect();
        return Err(Reply::err(format!(
            "unknown command '{}', with args beginning with: {shown}",
            String::from_utf8_lossy(name)
        )));
    };
    let (cname, arity) = COMMANDS[index];
    if !arity_ok(arity, args.len()) {
        return Err(Reply::err(format!("wrong number of arguments for '{cname}' command")));
    }
    if !s.authed && !matches!(cname, "auth" | "hello" | "quit" | "ping") {
        return Err(Reply::Error("NOAUTH Authentication required.".into()));
    }
    Ok((index, cname))
}

/// The names of the commands, in the order of the indexes [`prepare`] returns.
pub fn names() -> impl Iterator<Item = &'static str> {
    COMMANDS.iter().map(|(n, _)| *n)
}

/// Runs one command that [`prepare`] accepted as `lname` and that is not a stream command.
/// `args[0]` is the command name.
pub fn execute(ctx: &Context<'_>, s: &mut Session, lname: &str, args: &[Bytes]) -> Reply {
    let a = &args[1..];
    match lname {
        "ping" => match a {
            [] => Reply::Status("PONG"),
            [m] => Reply::Bulk(m.clone()),
            _ => Reply::err("wrong number of arguments for 'ping' command"),
        },
        "echo" => Reply::Bulk(a[0].clone()),
        "quit" => {
            s.quit = true;
            Reply::Ok
        }
        "auth" => {
            // AUTH <password> or AUTH <username> <password>; the username is not checked.
            let pass = a.last().expect("arity");
            if a.len() > 2 {
                return syntax();
            }
            auth(ctx, s, pass)
        }
        "hello" => hello(ctx, s, a),
        "select" => match int(&a[0]) {
            Some(0) => Reply::Ok,
            Some(_) => Reply::err("DB index is out of range"),
            None => not_int(),
        },
        "command" => command(a),
        "config" => config(ctx, a),
        "client" => client(s, a),
        "info" => info(ctx),
        "dbsize" => match ctx.keys.len() {
            Ok(n) => Reply::Int(n as i64),
            Err(e) => storage(e),
        },
        "get" => match ctx.keys.get_string(&a[0]) {
            Ok(Some(v)) => Reply::Bulk(v.data),
            Ok(None) => Reply::Nil,
            Err(e) => storage(e),
        },
        "set" => set(ctx, a),
        "getdel" => {
            let _g = ctx.keys.lock(&a[0]);
            match ctx.keys.get_string(&a[0]) {
                Ok(Some(v)) => match ctx.keys.delete(&[&a[0]]) {
                    Ok(_) => Reply::Bulk(v.data),
                    Err(e) => storage(e),
                },
                Ok(None) => Reply::Nil,
                Err(e) => storage(e),
            }
        }
        "del" => {
            let keys: Vec<&[u8]> = a.iter().map(|k| &k[..]).collect();
            match ctx.keys.delete(&keys) {
                Ok(n) => Reply::Int(n as i64),
                Err(e) => storage(e),
            }
        }
        "exists" => {
            let mut n = 0;
            for k in a {
                match ctx.keys.get(k) {
                    Ok(Some(_)) => n += 1,
                    Ok(None) => {}
                    Err(e) => return storage(e),
                }
            }
            Reply::Int(n)
        }
        "mget" => {
            let mut out = Vec::with_capacity(a.len());
            for k in a {
                match ctx.keys.get(k) {
                    Ok(Some(v)) if v.kind == Kind::String => out.push(Reply::Bulk(v.data)),
                    Ok(_) => out.push(Reply::Nil),
                    Err(e) => return storage(e),
                }
            }
            Reply::Array(out)
        }
        "mset" => {
            if !a.len().is_multiple_of(2) {
                return Reply::err("wrong number of arguments for 'mset' command");
            }
            if let Some(v) = a.chunks(2).find(|kv| kv[1].len() > ctx.max_value) {
                return too_big(v[1].len(), ctx.max_value);
            }
            let items: Vec<(&[u8], Value)> =
                a.chunks(2).map(|kv| (&kv[0][..], Value::string(kv[1].clone()))).collect();
            match ctx.keys.set_many(&items) {
                Ok(()) => Reply::Ok,
                Err(e) => storage(e),
            }
        }
        "incr" => incr_by(ctx, &a[0], 1),
        "decr" => incr_by(ctx, &a[0], -1),
        "incrby" => match int(&a[1]) {
            Some(d) => incr_by(ctx, &a[0], d),
            None => not_int(),
        },
        "decrby" => match int(&a[1]).and_then(|d| d.checked_neg()) {
            Some(d) => incr_by(ctx, &a[0], d),
            None => not_int(),
        },
        "append" => {
            let _g = ctx.keys.lock(&a[0]);
            let cur = match ctx.keys.get_string(&a[0]) {
                Ok(v) => v,
                Err(e) => return storage(e),
            };
            let (mut data, expire_at) =
                cur.map_or((Vec::new(), None), |v| (v.data.to_vec(), v.expire_at));
            if data.len() + a[1].len() > ctx.max_value {
                return too_big(data.len() + a[1].len(), ctx.max_value);
            }
            data.extend_from_slice(&a[1]);
            let n = data.len();
            match ctx.keys.set(&a[0], &Value { expire_at, ..Value::string(data) }) {
                Ok(()) => Reply::Int(n as i64),
                Err(e) => storage(e),
            }
        }
        "strlen" => match ctx.keys.get_string(&a[0]) {
            Ok(v) => Reply::Int(v.map_or(0, |v| v.data.len() as i64)),
            Err(e) => storage(e),
        },
        "expire" | "pexpire" => {
            let Some(n) = int(&a[1]) else { return not_int() };
            let ms = if lname == "expire" { n.checked_mul(1000) } else { Some(n) };
            let Some(at) = ms.and_then(|ms| (now_ms() as i64).checked_add(ms)) else {
                return Reply::err(format!("invalid expire time in '{lname}' command"));
            };
            let _g = ctx.keys.lock(&a[0]);
            match ctx.keys.get(&a[0]) {
                Ok(Some(_)) if at <= now_ms() as i64 => match ctx.keys.delete(&[&a[0]]) {
                    Ok(_) => Reply::Int(1),
                    Err(e) => storage(e),
                },
                Ok(Some(v2)) => {
                    match ctx.keys.set(&a[0], &Value { expire_at: Some(at as u64), ..v2 }) {
                        Ok(()) => Reply::Int(1),
                        Err(e) => storage(e),
                    }
                }
                Ok(None) => Reply::Int(0),
                Err(e) => storage(e),
            }
        }
        "ttl" | "pttl" => match ctx.keys.get(&a[0]) {
            Ok(None) => Reply::Int(-2),
            Ok(Some(Value { expire_at: None, .. })) => Reply::Int(-1),
            Ok(Some(Value { expire_at: Some(at), .. })) => {
                let ms = at.saturating_sub(now_ms()) as i64;
                Reply::Int(if lname == "ttl" { (ms + 500) / 1000 } else { ms })
            }
            Err(e) => storage(e),
        },
        "persist" => {
            let _g = ctx.keys.lock(&a[0]);
            match ctx.keys.get(&a[0]) {
                Ok(Some(v)) if v.expire_at.is_some() => {
                    match ctx.keys.set(&a[0], &Value { expire_at: None, ..v }) {
                        Ok(()) => Reply::Int(1),
                        Err(e) => storage(e),
                    }
                }
                Ok(_) => Reply::Int(0),
                Err(e) => storage(e),
            }
        }
        "scan" => scan(ctx, a),
        "keys" => {
            let mut out = Vec::new();
            match ctx.keys.each_key(|k| {
                if glob::matches(&a[0], &k) {
                    out.push(Reply::Bulk(k));
                }
            }) {
                Ok(()) => Reply::Array(out),
                Err(e) => storage(e),
            }
        }
        "type" => match ctx.keys.get(&a[0]) {
            Ok(Some(v)) => Reply::Status(v.kind.name()),
            Ok(None) => Reply::Status("none"),
            Err(e) => storage(e),
        },
        "flushdb" | "flushall" => match a.first().map(|m| upper(m)) {
            None => flush(ctx),
            Some(m) if m == "SYNC" || m == "ASYNC" => flush(ctx),
            Some(_) => syntax(),
        },
        _ => unreachable!("every listed command is handled"),
    }
}

fn too_big(len: usize, max: usize) -> Reply {
    Reply::err(format!("value of {len} bytes exceeds the limit of {max} bytes"))
}

fn flush(ctx: &Context<'_>) -> Reply {
    match ctx.keys.clear() {
        Ok(()) => Reply::Ok,
        Err(e) => storage(e),
    }
}

fn auth(ctx: &Context<'_>, s: &mut Session, pass: &[u8]) -> Reply {
    match ctx.secret {
        None => Reply::err(
            "AUTH <password> called without any password configured for the default user. Are you sure your configuration is correct?",
        ),
        Some(secret) if secret.as_bytes() == pass => {
            s.authed = true;
            Reply::Ok
        }
        Some(_) => Reply::Error("WRONGPASS invalid username-password pair or user is disabled.".into()),
    }
}

fn hello(ctx: &Context<'_>, s: &mut Session, a: &[Bytes]) -> Reply {
    let mut proto = s.proto;
    let mut rest = a;
    if let Some(v) = a.first() {
        match int(v) {
            Some(2) => proto = 2,
            Some(3) => proto = 3,
            Some(_) => return Reply::Error("NOPROTO unsupported protocol version".into()),
            None => return Reply::err("Protocol version is not an integer or out of range"),
        }
        rest = &a[1..];
    }
    while let Some(opt) = rest.first() {
        match (upper(opt).as_str(), rest) {
            ("AUTH", [_, _user, pass, tail @ ..]) => {
                let r = auth(ctx, s, pass);
                if r != Reply::Ok {
                    return r;
                }
                rest = tail;
            }
            ("SETNAME", [_, name, tail @ ..]) => {
                s.name = Some(name.clone());
                rest = tail;
            }
            _ => return syntax(),
        }
    }
    if !s.authed {
        return Reply::Error("NOAUTH HELLO must be called with the client already authenticated, otherwise the HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client and select the RESP protocol version at the same time".into());
    }
    s.proto = proto;
    Reply::Map(vec![
        (Reply::text("server"), Reply::text("timber")),
        (Reply::text("version"), Reply::text(env!("CARGO_PKG_VERSION"))),
        (Reply::text("proto"), Reply::Int(proto as i64)),
        (Reply::text("id"), Reply::Int(s.id as i64)),
        (Reply::text("mode"), Reply::text("standalone")),
        (Reply::text("role"), Reply::text("master")),
        (Reply::text("modules"), Reply::Array(vec![])),
    ])
}

fn command(a: &[Bytes]) -> Reply {
    match a.first().map(|s| upper(s)).as_deref() {
        None => Reply::Array(
            COMMANDS
                .iter()
                .map(|(n, ar)| {
                    Reply::Array(vec![
                        Reply::text(*n),
                        Reply::Int(*ar),
                        Reply::Array(vec![]),
                        Reply::Int(0),
                        Reply::Int(0),
                        Reply::Int(0),
                    ])
                })
                .collect(),
        ),
        Some("COUNT") => Reply::Int(COMMANDS.len() as i64),
        Some("DOCS") => Reply::Map(vec![]),
        Some("INFO") => Reply::Array(vec![]),
        Some(_) => syntax(),
    }
}

/// `CONFIG GET` reports the few settings tools ask for (redis-benchmark asks for `save` and
/// `appendonly`); `CONFIG SET` is refused: timberd is configured by flags, environment and file.
fn config(ctx: &Context<'_>, a: &[Bytes]) -> Reply {
    match upper(&a[0]).as_str() {
        "GET" if a.len() >= 2 => {
            let appendfsync = if ctx.keys.synced() { "always" } else { "everysec" };
            let known = [
                ("appendonly", "yes"),
                ("appendfsync", appendfsync),
                ("save", ""),
                ("databases", "1"),
            ];
            let mut out = Vec::new();
            for (name, value) in known {
                if a[1..].iter().any(|p| glob::matches(&p.to_ascii_lowercase(), name.as_bytes())) {
                    out.push((Reply::text(name), Reply::text(value)));
                }
            }
            Reply::Map(out)
        }
        "SET" => Reply::err(
            "CONFIG SET is not supported: timberd is configured by flags, environment variables and its config file",
        ),
        "RESETSTAT" => Reply::Ok,
        sub => Reply::err(format!("unknown subcommand or wrong number of arguments for '{sub}'")),
    }
}

fn client(s: &mut Session, a: &[Bytes]) -> Reply {
    match (upper(&a[0]).as_str(), &a[1..]) {
        ("SETNAME", [name]) => {
            if name.iter().any(|c| *c <= b' ' || *c > b'~') {
                return Reply::err(
                    "Client names cannot contain spaces, newlines or special characters.",
                );
            }
            s.name = (!name.is_empty()).then(|| name.clone());
            Reply::Ok
        }
        ("GETNAME", []) => s.name.clone().map_or(Reply::Nil, Reply::Bulk),
        ("ID", []) => Reply::Int(s.id as i64),
        ("SETINFO", [_, _]) => Reply::Ok,
        ("INFO", []) => Reply::text(format!(
            "id={} name={} resp={}\n",
            s.id,
            s.name.as_ref().map(|n| String::from_utf8_lossy(n).into_owned()).unwrap_or_default(),
            s.proto
        )),
        (sub, _) => {
            Reply::err(format!("unknown subcommand or wrong number of arguments for '{sub}'"))
        }
    }
}

fn info(ctx: &Context<'_>) -> Reply {
    let keys = ctx.keys.len().unwrap_or(0);
    Reply::text(format!(
        "# Server\r\nredis_version:7.2.0\r\ntimber_version:{}\r\nredis_mode:standalone\r\nprocess_id:{}\r\n\r\n# Clients\r\nconnected_clients:{}\r\n\r\n# Persistence\r\nloading:0\r\n\r\n# Keyspace\r\ndb0:keys={keys},expires=0,avg_ttl=0\r\n",
        env!("CARGO_PKG_VERSION"),
        std::process::id(),
        ctx.clients
    ))
}

fn set(ctx: &Context<'_>, a: &[Bytes]) -> Reply {
    let (key, data) = (&a[0], &a[1]);
    if data.len() > ctx.max_value {
        return too_big(data.len(), ctx.max_value);
    }
    let (mut nx, mut xx, mut get, mut keepttl) = (false, false, false, false);
    let mut expire_at: Option<u64> = None;
    let mut i = 2;
    while i < a.len() {
        let opt = upper(&a[i]);
        match opt.as_str() {
            "NX" => nx = true,
            "XX" => xx = true,
            "GET" => get = true,
            "KEEPTTL" => keepttl = true,
            "EX" | "PX" | "EXAT" | "PXAT" => {
                if expire_at.is_some() || i + 1 >= a.len() {
                    return syntax();
                }
                let Some(n) = int(&a[i + 1]) else { return not_int() };
                let at = match opt.as_str() {
                    "EX" => n.checked_mul(1000).and_then(|ms| ms.checked_add(now_ms() as i64)),
                    "PX" => n.checked_add(now_ms() as i64),
                    "EXAT" => n.checked_mul(1000),
                    _ => Some(n),
                };
                match at {
                    Some(at) if n > 0 => expire_at = Some(at as u64),
                    _ => return Reply::err("invalid expire time in 'set' command"),
                }
                i += 1;
            }
            _ => return syntax(),
        }
        i += 1;
    }
    if (nx && xx) || (keepttl && expire_at.is_some()) {
        return syntax();
    }
    let _g = ctx.keys.lock(key);
    let old = if nx || xx || get || keepttl {
        // SET overwrites a key of any kind, but SET ... GET needs the old value to be a string.
        match if get { ctx.keys.get_string(key) } else { ctx.keys.get(key) } {
            Ok(v) => v,
            Err(e) => return storage(e),
        }
    } else {
        None
    };
    let old_reply = || old.as_ref().map_or(Reply::Nil, |v| Reply::Bulk(v.data.clone()));
    if (nx && old.is_some()) || (xx && old.is_none()) {
        return if get { old_reply() } else { Reply::Nil };
    }
    if keepttl {
        expire_at = old.as_ref().and_then(|v| v.expire_at);
    }
    match ctx.keys.set(key, &Value { expire_at, ..Value::string(data.clone()) }) {
        Ok(()) if get => old_reply(),
        Ok(()) => Reply::Ok,
        Err(e) => storage(e),
    }
}

/// A command a pipelined write run can batch: a plain SET or an INCR-family command.
#[derive(Debug, Clone, Copy)]
pub enum RunOp<'a> {
    /// `SET key value`.
    Set(&'a Bytes, &'a Bytes),
    /// `INCR`, `DECR`, `INCRBY`, `DECRBY` (the delta; `None` if the argument is not a valid
    /// integer, which replies with the error and writes nothing).
    Add(&'a Bytes, Option<i64>),
}

impl<'a> RunOp<'a> {
    /// The op a request is, if it is one, with a value within `max`.
    pub fn of(r: &'a [Bytes], max: usize) -> Option<RunOp<'a>> {
        let name = r.first()?;
        let is = |n: &str| name.eq_ignore_ascii_case(n.as_bytes());
        match r.len() {
            3 if is("set") && r[2].len() <= max => Some(RunOp::Set(&r[1], &r[2])),
            2 if is("incr") => Some(RunOp::Add(&r[1], Some(1))),
            2 if is("decr") => Some(RunOp::Add(&r[1], Some(-1))),
            3 if is("incrby") => Some(RunOp::Add(&r[1], int(&r[2]))),
            3 if is("decrby") => Some(RunOp::Add(&r[1], int(&r[2]).and_then(|d| d.checked_neg()))),
            _ => None,
        }
    }

    fn key(&self) -> &'a [u8] {
        match self {
            RunOp::Set(k, _) | RunOp::Add(k, _) => k,
        }
    }
}

/// The key of a request that is a plain `GET key`.
pub fn get_of(r: &[Bytes]) -> Option<&[u8]> {
    match r {
        [name, key] if name.eq_ignore_ascii_case(b"get") => Some(key),
        _ => None,
    }
}

/// Runs consecutive pipelined GETs as one read of all their keys, whose cache misses overlap
/// (see `Keyspace::get_strings`). The replies are those the GETs would give one by one.
pub fn execute_gets(keys: &Keyspace, gets: &[&[u8]]) -> Vec<Reply> {
    match keys.get_strings(gets) {
        Ok(values) => values
            .into_iter()
            .map(|v| match v {
                Ok(Some(v)) => Reply::Bulk(v.data),
                Ok(None) => Reply::Nil,
                Err(e) => storage(e),
            })
            .collect(),
        Err(e) => {
            let r = storage(e);
            gets.iter().map(|_| r.clone()).collect()
        }
    }
}

/// Runs consecutive pipelined writes as one: under the stripe locks of all their keys, each
/// sees the ones before it, and their final values go to the engine in one write batch. The
/// replies are those the commands would give one by one.
pub fn execute_run(keys: &Keyspace, ops: &[RunOp<'_>]) -> Vec<Reply> {
    let all: Vec<&[u8]> = ops.iter().map(RunOp::key).collect();
    let _guards = keys.lock_many(&all);
    // foldhash (seeded per process), not SipHash: a run holds at most one pipeline of keys,
    // and SipHash with the table's regrowth was 4% of timberd's CPU under pipelined INCRs.
    let mut overlay: hashbrown::HashMap<&[u8], Value> =
        hashbrown::HashMap::with_capacity(ops.len());
    // The stored values the additions start from, read together (their cache misses overlap);
    // a key written earlier in the run starts from the overlay instead.
    let added: Vec<&[u8]> = ops
        .iter()
        .filter_map(|op| match *op {
            RunOp::Add(k, Some(_)) => Some(&k[..]),
            _ => None,
        })
        .collect();
    let stored = match keys.get_strings(&added) {
        Ok(v) => v,
        Err(e) => {
            let r = storage(e);
            return ops.iter().map(|_| r.clone()).collect();
        }
    };
    let mut stored = stored.into_iter();
    let mut replies = Vec::with_capacity(ops.len());
    for op in ops {
        let reply = match *op {
            RunOp::Set(k, v) => {
                overlay.insert(&k[..], Value::string(v.clone()));
                Reply::Ok
            }
            RunOp::Add(_, None) => not_int(),
            RunOp::Add(k, Some(delta)) => {
                let read = stored.next().expect("one stored value per addition");
                let cur = match overlay.get(&k[..]) {
                    Some(v) => Ok(Some(v.clone())),
                    None => read,
                };
                match cur {
                    Err(e) => storage(e),
                    Ok(cur) => {
                        let (n, expire_at) = match &cur {
                            None => (Some(0), None),
                            Some(v) => (int(&v.data), v.expire_at),
                        };
                        match n.map(|n| n.checked_add(delta)) {
                            None => not_int(),
                            Some(None) => Reply::err("increment or decrement would overflow"),
                            Some(Some(n)) => {
                                let v = Value { expire_at, ..Value::string(n.to_string()) };
                                overlay.insert(&k[..], v);
                                Reply::Int(n)
                            }
                        }
                    }
                }
            }
        };
        replies.push(reply);
    }
    let items: Vec<(&[u8], Value)> = overlay.into_iter().collect();
    if let Err(e) = keys.set_many(&items) {
        let r = storage(e);
        return ops.iter().map(|_| r.clone()).collect();
    }
    replies
}

fn incr_by(ctx: &Context<'_>, key: &Bytes, delta: i64) -> Reply {
    let _g = ctx.keys.lock(key);
    let (cur, expire_at) = match ctx.keys.get_string(key) {
        Ok(None) => (0, None),
        Ok(Some(v)) => match int(&v.data) {
            Some(n) => (n, v.expire_at),
            None => return not_int(),
        },
        Err(e) => return storage(e),
    };
    let Some(n) = cur.checked_add(delta) else {
        return Reply::err("increment or decrement would overflow");
    };
    match ctx.keys.set(key, &Value { expire_at, ..Value::string(n.to_string()) }) {
        Ok(()) => Reply::Int(n),
        Err(e) => storage(e),
    }
}

fn scan(ctx: &Context<'_>, a: &[Bytes]) -> Reply {
    let Some(cursor) = std::str::from_utf8(&a[0]).ok().and_then(|s| s.parse::<u64>().ok()) else {
        return Reply::err("invalid cursor");
    };
    let mut pattern: Option<&Bytes> = None;
    let mut count = 10usize;
    let mut i = 1;
    while i < a.len() {
        match (upper(&a[i]).as_str(), a.get(i + 1)) {
            ("MATCH", Some(p)) => pattern = Some(p),
            ("COUNT", Some(c)) => match int(c) {
                Some(c) if c > 0 => count = c as usize,
                Some(_) => return syntax(),
                None => return not_int(),
            },
            ("TYPE", Some(_)) => {}
            _ => return syntax(),
        }
        i += 2;
    }
    let after = match cursor {
        0 => None,
        c => match ctx.keys.cursor(c) {
            Some(k) => Some(k),
            None => return Reply::err("invalid cursor"),
        },
    };
    match ctx.keys.keys(after.as_deref(), count) {
        Ok((keys, next)) => {
            let next = next.map_or(0, |k| ctx.keys.cursor_for(k));
            let keys = keys
                .into_iter()
                .filter(|k| pattern.is_none_or(|p| glob::matches(p, k)))
                .map(Reply::Bulk)
                .collect();
            Reply::Array(vec![Reply::text(next.to_string()), Reply::Array(keys)])
        }
        Err(e) => storage(e),
    }
}
