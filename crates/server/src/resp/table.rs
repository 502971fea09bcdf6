//! The command table: every Redis-protocol command declared once, with its name, arity, flags,
//! key positions and handler. Requests are resolved against it ([`resolve`]) before they run;
//! `COMMAND` describes it; per-command metrics are indexed by its order.
//!
//! Invariant: a handler runs only for a request whose argument count fits the command's arity
//! (checked by [`resolve`]), and only on an authenticated connection unless the command is
//! flagged [`NO_AUTH`] (checked by [`authorize`]); handlers still reach arguments only through
//! [`Args`], so a wrong table entry gives an arity error, not a panic.

use bytes::Bytes;

use super::args::Args;
use super::cmd::streams::StreamCommand as S;
use super::cmd::{keys, server, R};
use super::multi::TxnCommand as T;
use super::reply::Reply;
use super::session::{Context, Session};

/// What a command does, as flags (combined with `|`).
pub(crate) type Flags = u8;
/// May change the keyspace or a stream (under `--sync always`, a keyspace write is synced
/// before its reply).
pub(crate) const WRITE: Flags = 1;
/// Only reads.
pub(crate) const READONLY: Flags = 1 << 1;
/// May wait (`BLOCK`) for other clients' writes.
pub(crate) const BLOCKING: Flags = 1 << 2;
/// Administers the server rather than the data.
pub(crate) const ADMIN: Flags = 1 << 3;
/// Allowed before the client authenticated.
pub(crate) const NO_AUTH: Flags = 1 << 4;
/// Appends to a stream and replies once the entry is durable: queued behind the appends before
/// it in a pipeline without waiting for them (not reported by `COMMAND`).
pub(crate) const APPEND: Flags = 1 << 5;

/// The flag names `COMMAND` reports, as Redis spells them.
const FLAG_NAMES: [(Flags, &str); 5] = [
    (WRITE, "write"),
    (READONLY, "readonly"),
    (BLOCKING, "blocking"),
    (ADMIN, "admin"),
    (NO_AUTH, "no-auth"),
];

/// A keyspace or connection command: runs to completion on the connection's task.
pub(crate) type KeyHandler = fn(&Context<'_>, &mut Session, Args<'_>) -> R;

/// How a command runs.
#[derive(Clone, Copy)]
pub(crate) enum Handler {
    Keys(KeyHandler),
    /// A stream command: may wait (for durability, or for entries).
    Streams(S),
    /// `COMMAND`, which describes this table.
    Describe,
    /// A transaction command (`MULTI`, `EXEC`...): runs between the runs of other commands.
    Txn(T),
}

/// One command.
pub(crate) struct Command {
    /// The name, lower case.
    pub(crate) name: &'static str,
    /// Redis's arity: the exact argument count including the name, or, negative, its minimum.
    pub(crate) arity: i8,
    pub(crate) flags: Flags,
    /// Key positions as `COMMAND` reports them: first, last (negative: from the end), step;
    /// zeros for commands without keys or whose keys move (XREAD).
    pub(crate) keys: (i8, i8, i8),
    pub(crate) handler: Handler,
}

impl Command {
    pub(crate) fn is(&self, flag: Flags) -> bool {
        self.flags & flag != 0
    }

    /// Whether it runs as a stream command (ends a run of keyspace commands in a pipeline).
    pub(crate) fn is_stream(&self) -> bool {
        matches!(self.handler, Handler::Streams(_))
    }

    /// Whether it is a transaction command (ends a run of keyspace commands in a pipeline).
    pub(crate) fn is_txn(&self) -> bool {
        matches!(self.handler, Handler::Txn(_))
    }

    fn arity_ok(&self, n: usize) -> bool {
        let arity = i64::from(self.arity);
        let n = n as i64;
        if arity >= 0 {
            n == arity
        } else {
            n >= -arity
        }
    }
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Command").field("name", &self.name).finish_non_exhaustive()
    }
}

const fn cmd(
    name: &'static str,
    arity: i8,
    flags: Flags,
    keys: (i8, i8, i8),
    handler: Handler,
) -> Command {
    Command { name, arity, flags, keys, handler }
}

const NONE: (i8, i8, i8) = (0, 0, 0);
const ONE: (i8, i8, i8) = (1, 1, 1);
const ALL: (i8, i8, i8) = (1, -1, 1);

/// Every command. The most frequent come first: [`resolve`] searches in order.
pub(crate) static COMMANDS: &[Command] = &[
    cmd("get", 2, READONLY, ONE, Handler::Keys(keys::get)),
    cmd("set", -3, WRITE, ONE, Handler::Keys(keys::set)),
    cmd("incr", 2, WRITE, ONE, Handler::Keys(keys::incr)),
    cmd("xadd", -5, WRITE | APPEND, ONE, Handler::Streams(S::Add)),
    cmd("ping", -1, NO_AUTH, NONE, Handler::Keys(server::ping)),
    cmd("echo", 2, 0, NONE, Handler::Keys(server::echo)),
    cmd("hello", -1, NO_AUTH, NONE, Handler::Keys(server::hello)),
    cmd("auth", -2, NO_AUTH, NONE, Handler::Keys(server::auth)),
    cmd("select", 2, 0, NONE, Handler::Keys(server::select)),
    cmd("quit", -1, NO_AUTH, NONE, Handler::Keys(server::quit)),
    cmd("command", -1, 0, NONE, Handler::Describe),
    cmd("client", -2, 0, NONE, Handler::Keys(server::client)),
    cmd("info", -1, 0, NONE, Handler::Keys(server::info)),
    cmd("readonly", 1, 0, NONE, Handler::Keys(server::readonly)),
    cmd("readwrite", 1, 0, NONE, Handler::Keys(server::readwrite)),
    cmd("config", -2, ADMIN, NONE, Handler::Keys(server::config)),
    cmd("dbsize", 1, READONLY, NONE, Handler::Keys(server::dbsize)),
    cmd("getdel", 2, WRITE, ONE, Handler::Keys(keys::getdel)),
    cmd("del", -2, WRITE, ALL, Handler::Keys(keys::del)),
    cmd("exists", -2, READONLY, ALL, Handler::Keys(keys::exists)),
    cmd("mget", -2, READONLY, ALL, Handler::Keys(keys::mget)),
    cmd("mset", -3, WRITE, (1, -1, 2), Handler::Keys(keys::mset)),
    cmd("decr", 2, WRITE, ONE, Handler::Keys(keys::decr)),
    cmd("incrby", 3, WRITE, ONE, Handler::Keys(keys::incrby)),
    cmd("decrby", 3, WRITE, ONE, Handler::Keys(keys::decrby)),
    cmd("append", 3, WRITE, ONE, Handler::Keys(keys::append)),
    cmd("strlen", 2, READONLY, ONE, Handler::Keys(keys::strlen)),
    cmd("expire", 3, WRITE, ONE, Handler::Keys(keys::expire)),
    cmd("pexpire", 3, WRITE, ONE, Handler::Keys(keys::expire)),
    cmd("ttl", 2, READONLY, ONE, Handler::Keys(keys::ttl)),
    cmd("pttl", 2, READONLY, ONE, Handler::Keys(keys::ttl)),
    cmd("persist", 2, WRITE, ONE, Handler::Keys(keys::persist)),
    cmd("scan", -2, READONLY, NONE, Handler::Keys(keys::scan)),
    cmd("keys", 2, READONLY, NONE, Handler::Keys(keys::keys)),
    cmd("type", 2, READONLY, ONE, Handler::Keys(keys::type_of)),
    cmd("flushdb", -1, WRITE, NONE, Handler::Keys(keys::flush)),
    cmd("flushall", -1, WRITE, NONE, Handler::Keys(keys::flush)),
    cmd("xlen", 2, READONLY, ONE, Handler::Streams(S::Len)),
    cmd("xrange", -4, READONLY, ONE, Handler::Streams(S::Range)),
    cmd("xrevrange", -4, READONLY, ONE, Handler::Streams(S::RevRange)),
    cmd("xread", -4, READONLY | BLOCKING, NONE, Handler::Streams(S::Read)),
    cmd("xtrim", -4, WRITE, ONE, Handler::Streams(S::Trim)),
    cmd("xdel", -3, WRITE, ONE, Handler::Streams(S::Del)),
    cmd("xgroup", -2, WRITE, NONE, Handler::Streams(S::Group)),
    cmd("xreadgroup", -7, WRITE | BLOCKING, NONE, Handler::Streams(S::ReadGroup)),
    cmd("xack", -4, WRITE, ONE, Handler::Streams(S::Ack)),
    cmd("xpending", -3, READONLY, ONE, Handler::Streams(S::Pending)),
    cmd("xinfo", -2, READONLY, NONE, Handler::Streams(S::Info)),
    cmd("multi", 1, 0, NONE, Handler::Txn(T::Multi)),
    cmd("exec", 1, 0, NONE, Handler::Txn(T::Exec)),
    cmd("discard", 1, 0, NONE, Handler::Txn(T::Discard)),
    cmd("watch", -2, 0, ALL, Handler::Txn(T::Watch)),
    cmd("unwatch", 1, 0, NONE, Handler::Txn(T::Unwatch)),
];

/// The longest command name (a longer request name is unknown without a search).
const LONGEST: usize = 10;

/// The command a request names, with its index in [`COMMANDS`], if its arity fits; the error
/// reply otherwise (unknown command, wrong number of arguments).
pub(crate) fn resolve(request: &[Bytes]) -> Result<(usize, &'static Command), Reply> {
    let Some(name) = request.first() else { return Err(Reply::err("empty command")) };
    let Some((index, command)) = lookup(name) else {
        let shown: String = request
            .iter()
            .skip(1)
            .take(8)
            .map(|a| format!("'{}' ", String::from_utf8_lossy(a)))
            .collect();
        return Err(Reply::err(format!(
            "unknown command '{}', with args beginning with: {shown}",
            String::from_utf8_lossy(name)
        )));
    };
    if !command.arity_ok(request.len()) {
        return Err(Reply::err(format!(
            "wrong number of arguments for '{}' command",
            command.name
        )));
    }
    Ok((index, command))
}

/// The command named `name` (any case), with its index in [`COMMANDS`].
fn lookup(name: &[u8]) -> Option<(usize, &'static Command)> {
    if name.len() > LONGEST {
        return None;
    }
    COMMANDS.iter().enumerate().find(|(_, c)| c.name.as_bytes().eq_ignore_ascii_case(name))
}

/// Whether the session may run `command`: the NOAUTH error otherwise.
#[inline]
pub(crate) fn authorize(s: &Session, command: &Command) -> Result<(), Reply> {
    if s.authed || command.is(NO_AUTH) {
        Ok(())
    } else {
        Err(Reply::Error("NOAUTH Authentication required.".into()))
    }
}

/// `COMMAND`, `COMMAND COUNT`, `COMMAND DOCS`, `COMMAND INFO`.
pub(crate) fn describe(a: Args<'_>) -> Reply {
    match a.get(0).map(|s| super::cmd::upper(s)).as_deref() {
        None => Reply::Array(COMMANDS.iter().map(info).collect()),
        Some("COUNT") => Reply::Int(COMMANDS.len() as i64),
        Some("DOCS") => Reply::Map(vec![]),
        Some("INFO") => Reply::Array(
            a.from(1).iter().map(|n| lookup(n).map_or(Reply::Nil, |(_, c)| info(c))).collect(),
        ),
        Some(_) => super::cmd::syntax(),
    }
}

/// A command as `COMMAND` describes it: name, arity, flags, first key, last key, step.
fn info(c: &Command) -> Reply {
    let flags =
        FLAG_NAMES.iter().filter(|(f, _)| c.is(*f)).map(|(_, n)| Reply::Status(n)).collect();
    Reply::Array(vec![
        Reply::text(c.name),
        Reply::Int(c.arity.into()),
        Reply::Array(flags),
        Reply::Int(c.keys.0.into()),
        Reply::Int(c.keys.1.into()),
        Reply::Int(c.keys.2.into()),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_lower_case_and_short() {
        let mut names: Vec<&str> = COMMANDS.iter().map(|c| c.name).collect();
        assert!(names.iter().all(|n| n.len() <= LONGEST && *n == n.to_ascii_lowercase()));
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), COMMANDS.len());
    }

    #[test]
    fn every_command_has_a_sensible_declaration() {
        for c in COMMANDS {
            assert!(c.arity != 0, "{}", c.name);
            assert!(!(c.is(WRITE) && c.is(READONLY)), "{}", c.name);
            // A command with keys has room for its first key within its arity.
            if c.keys.0 > 0 {
                assert!(c.arity.unsigned_abs() > c.keys.0.unsigned_abs(), "{}", c.name);
            }
        }
    }

    #[test]
    fn requests_resolve_case_insensitively_with_arity_checked() {
        let req = |parts: &[&str]| {
            parts.iter().map(|p| Bytes::copy_from_slice(p.as_bytes())).collect::<Vec<_>>()
        };
        let (_, c) = resolve(&req(&["GeT", "k"])).unwrap();
        assert_eq!(c.name, "get");
        assert_eq!(
            resolve(&req(&["get"])).unwrap_err(),
            Reply::err("wrong number of arguments for 'get' command")
        );
        assert_eq!(
            resolve(&req(&["nosuch", "a"])).unwrap_err(),
            Reply::err("unknown command 'nosuch', with args beginning with: 'a' ")
        );
        assert!(resolve(&req(&["averyveryverylongname"])).is_err());
        assert!(resolve(&[]).is_err());
        // Variadic: at least |arity|.
        assert!(resolve(&req(&["del", "a", "b", "c"])).is_ok());
        assert!(resolve(&req(&["xadd", "s", "*", "f"])).is_err());
    }

    #[test]
    fn only_no_auth_commands_run_before_auth() {
        let s = Session::new(1, true);
        for c in COMMANDS {
            assert_eq!(
                authorize(&s, c).is_ok(),
                matches!(c.name, "auth" | "hello" | "quit" | "ping")
            );
        }
        assert!(COMMANDS.iter().all(|c| authorize(&Session::new(1, false), c).is_ok()));
    }
}
