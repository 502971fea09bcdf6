//! Connection and server commands: PING, ECHO, QUIT, AUTH, HELLO, SELECT, CLIENT, CONFIG, INFO,
//! DBSIZE. (COMMAND, which describes the command table, lives beside it in `resp::table`.)

use super::{int, not_int, storage, syntax, upper, R};
use crate::resp::args::Args;
use crate::resp::glob;
use crate::resp::reply::Reply;
use crate::resp::session::{Context, Session};

pub(crate) fn ping(_: &Context<'_>, _: &mut Session, a: Args<'_>) -> R {
    match a.all() {
        [] => Ok(Reply::Status("PONG")),
        [m] => Ok(Reply::Bulk(m.clone())),
        _ => Err(a.arity_error()),
    }
}

pub(crate) fn echo(_: &Context<'_>, _: &mut Session, a: Args<'_>) -> R {
    Ok(Reply::Bulk(a.arg(0)?.clone()))
}

pub(crate) fn quit(_: &Context<'_>, s: &mut Session, _: Args<'_>) -> R {
    s.quit = true;
    Ok(Reply::Ok)
}

/// AUTH <password> or AUTH <username> <password>; the username is not checked.
pub(crate) fn auth(ctx: &Context<'_>, s: &mut Session, a: Args<'_>) -> R {
    match a.all() {
        [pass] | [_, pass] => Ok(check_password(ctx, s, pass)),
        [] => Err(a.arity_error()),
        _ => Err(syntax()),
    }
}

fn check_password(ctx: &Context<'_>, s: &mut Session, pass: &[u8]) -> Reply {
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

pub(crate) fn hello(ctx: &Context<'_>, s: &mut Session, a: Args<'_>) -> R {
    let mut proto = s.proto;
    let mut rest = a.all();
    if let Some(v) = a.get(0) {
        match int(v) {
            Some(2) => proto = 2,
            Some(3) => proto = 3,
            Some(_) => return Err(Reply::Error("NOPROTO unsupported protocol version".into())),
            None => return Err(Reply::err("Protocol version is not an integer or out of range")),
        }
        rest = a.from(1);
    }
    while let Some(opt) = rest.first() {
        match (upper(opt).as_str(), rest) {
            ("AUTH", [_, _user, pass, tail @ ..]) => {
                let r = check_password(ctx, s, pass);
                if r != Reply::Ok {
                    return Err(r);
                }
                rest = tail;
            }
            ("SETNAME", [_, name, tail @ ..]) => {
                s.name = Some(name.clone());
                rest = tail;
            }
            _ => return Err(syntax()),
        }
    }
    if !s.authed {
        return Err(Reply::Error("NOAUTH HELLO must be called with the client already authenticated, otherwise the HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client and select the RESP protocol version at the same time".into()));
    }
    s.proto = proto;
    Ok(Reply::Map(vec![
        (Reply::text("server"), Reply::text("timber")),
        (Reply::text("version"), Reply::text(env!("CARGO_PKG_VERSION"))),
        (Reply::text("proto"), Reply::Int(proto as i64)),
        (Reply::text("id"), Reply::Int(s.id as i64)),
        (Reply::text("mode"), Reply::text("standalone")),
        (Reply::text("role"), Reply::text("master")),
        (Reply::text("modules"), Reply::Array(vec![])),
    ]))
}

pub(crate) fn select(_: &Context<'_>, _: &mut Session, a: Args<'_>) -> R {
    match int(a.arg(0)?) {
        Some(0) => Ok(Reply::Ok),
        Some(_) => Err(Reply::err("DB index is out of range")),
        None => Err(not_int()),
    }
}

/// `CONFIG GET` reports the few settings tools ask for (redis-benchmark asks for `save` and
/// `appendonly`); `CONFIG SET` is refused: timberd is configured by flags, environment and file.
pub(crate) fn config(ctx: &Context<'_>, _: &mut Session, a: Args<'_>) -> R {
    match upper(a.arg(0)?).as_str() {
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
                if a.from(1).iter().any(|p| glob::matches(&p.to_ascii_lowercase(), name.as_bytes()))
                {
                    out.push((Reply::text(name), Reply::text(value)));
                }
            }
            Ok(Reply::Map(out))
        }
        "SET" => Err(Reply::err(
            "CONFIG SET is not supported: timberd is configured by flags, environment variables and its config file",
        )),
        "RESETSTAT" => Ok(Reply::Ok),
        sub => Err(Reply::err(format!("unknown subcommand or wrong number of arguments for '{sub}'"))),
    }
}

pub(crate) fn client(_: &Context<'_>, s: &mut Session, a: Args<'_>) -> R {
    match (upper(a.arg(0)?).as_str(), a.from(1)) {
        ("SETNAME", [name]) => {
            if name.iter().any(|c| *c <= b' ' || *c > b'~') {
                return Err(Reply::err(
                    "Client names cannot contain spaces, newlines or special characters.",
                ));
            }
            s.name = (!name.is_empty()).then(|| name.clone());
            Ok(Reply::Ok)
        }
        ("GETNAME", []) => Ok(s.name.clone().map_or(Reply::Nil, Reply::Bulk)),
        ("ID", []) => Ok(Reply::Int(s.id as i64)),
        ("SETINFO", [_, _]) => Ok(Reply::Ok),
        ("INFO", []) => Ok(Reply::text(format!(
            "id={} name={} resp={}\n",
            s.id,
            s.name.as_ref().map(|n| String::from_utf8_lossy(n).into_owned()).unwrap_or_default(),
            s.proto
        ))),
        (sub, _) => {
            Err(Reply::err(format!("unknown subcommand or wrong number of arguments for '{sub}'")))
        }
    }
}

pub(crate) fn info(ctx: &Context<'_>, _: &mut Session, _: Args<'_>) -> R {
    let keys = ctx.keys.len().unwrap_or(0);
    Ok(Reply::text(format!(
        "# Server\r\nredis_version:7.2.0\r\ntimber_version:{}\r\nredis_mode:standalone\r\nprocess_id:{}\r\n\r\n# Clients\r\nconnected_clients:{}\r\n\r\n# Persistence\r\nloading:0\r\nstream_store:{}\r\n\r\n{}# Keyspace\r\ndb0:keys={keys},expires=0,avg_ttl=0\r\n",
        env!("CARGO_PKG_VERSION"),
        std::process::id(),
        ctx.clients,
        ctx.stream_store,
        replication_info(ctx),
    )))
}

/// `INFO`'s replication section: the role as Redis tools read it (`master` on the leader,
/// `slave` on the others), then the Raft view.
fn replication_info(ctx: &Context<'_>) -> String {
    let Some(r) = ctx.keys.replication() else {
        return "# Replication\r\nrole:master\r\nconnected_slaves:0\r\n\r\n".into();
    };
    let st = r.status();
    let mut out = String::from("# Replication\r\n");
    if st.leader {
        out.push_str(&format!("role:master\r\nconnected_slaves:{}\r\n", st.members.len() - 1));
    } else {
        // The leader's RESP address once it announced it, else its Raft address.
        let announced = st.leader_id.and_then(|l| r.resp_addr_of(l));
        let (host, port) = announced
            .as_deref()
            .or(st.leader_addr.as_deref())
            .and_then(|a| a.rsplit_once(':'))
            .unwrap_or(("", "0"));
        let link = if st.leader_id.is_some() { "up" } else { "down" };
        out.push_str(&format!(
            "role:slave\r\nmaster_host:{host}\r\nmaster_port:{port}\r\nmaster_link_status:{link}\r\n"
        ));
    }
    let idx = |i: Option<u64>| i.map_or(-1, |i| i as i64);
    out.push_str(&format!(
        "raft_node_id:{}\r\nraft_term:{}\r\nraft_leader_id:{}\r\nraft_last_log_index:{}\r\nraft_commit_index:{}\r\nraft_applied_index:{}\r\nraft_members:{}\r\n\r\n",
        st.id,
        st.term,
        st.leader_id.map_or(0, |l| l),
        idx(st.last_log_index),
        idx(st.committed_index),
        idx(st.applied_index),
        st.members.iter().map(|(id, a)| format!("{id}={a}")).collect::<Vec<_>>().join(","),
    ));
    out
}

/// `READONLY`: in a cluster, serve this connection's reads from this member's state, even
/// stale, instead of linearizable reads through the leader.
pub(crate) fn readonly(_: &Context<'_>, s: &mut Session, _: Args<'_>) -> R {
    s.stale_reads = true;
    Ok(Reply::Ok)
}

/// `READWRITE`: back to linearizable reads.
pub(crate) fn readwrite(_: &Context<'_>, s: &mut Session, _: Args<'_>) -> R {
    s.stale_reads = false;
    Ok(Reply::Ok)
}

pub(crate) fn dbsize(ctx: &Context<'_>, _: &mut Session, _: Args<'_>) -> R {
    ctx.keys.len().map(|n| Reply::Int(n as i64)).map_err(storage)
}
