//! The HTTP endpoint (axum): a REST/JSON API over the keyspace and the log streams, a WebSocket
//! that pushes new stream entries as they become durable, `/metrics` (Prometheus), `/healthz`
//! and `/readyz`.
//!
//! Routes (`{key}` and `{name}` are URL path segments, percent-decoded):
//! - `GET|PUT|DELETE /v1/kv/{key}`: the value as the raw body; `PUT ?ttl_ms=` sets a deadline.
//! - `GET /v1/kv?prefix=&start=&end=&limit=`: `{"items": [{"key", "value"}], "more": bool}`.
//! - `POST /v1/txn`: a conditional transaction (`crate::txn`) from `{"compare": [{"key",
//!   "op": "equal"|"not_equal"|"less"|"greater", "value" | "exists"}], "success": [ops],
//!   "failure": [ops]}`, an op being `{"put": {"key", "value", "ttl_ms"?}}`, `{"delete":
//!   {"key"}}` or `{"get": {"key"}}`; replies `{"succeeded", "results": [{"put": {}} |
//!   {"delete": {"existed"}} | {"get": {"value"}}]}`.
//! - Interactive transactions (`crate::open_txns`): `POST /v1/txns` from `{"isolation":
//!   "snapshot"|"read_committed"|"serializable", "pessimistic"?, "lock_timeout_ms"?}` replies
//!   `{"id"}`; under `/v1/txns/{id}`: `GET|PUT|DELETE kv/{key}` (`?for_update=true`,
//!   `?ttl_ms=`) and `GET kv?prefix=&start=&end=&limit=` as for `/v1/kv`, `POST commit`
//!   (409 on a conflict: run the transaction again), `DELETE` (rollback).
//! - `GET|POST /v1/streams`: list; create from `{"name", "retention_ms"?, "retention_bytes"?}`.
//! - `GET|DELETE /v1/streams/{name}`, `POST /v1/streams/{name}/truncate?before=`.
//! - `POST /v1/streams/{name}/entries`: the raw body is one entry, or a JSON
//!   `{"entries": [..]}` (with `Content-Type: application/json`) several; replies once durable.
//! - `GET /v1/streams/{name}/entries?from=&limit=`: `{"entries": [{"id", "data"}], "next"}`.
//! - `GET /v1/streams/{name}/ws?from=earliest|latest|<id>`: WebSocket, one text message
//!   `{"id", "data"}` per entry, in order, until the client closes.
//!
//! Keys, values and entries appear in JSON as `"value"`/`"data"` when they are UTF-8 and as
//! `"value_base64"`/`"data_base64"` otherwise. Errors are `{"error": "..."}` with a fitting
//! status (400, 401, 404, 409, 413, 416, 500). With a shared secret, `/v1` requires
//! `Authorization: Bearer <secret>`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use serde::Deserialize;
use serde_json::{json, Value as Json_};
use timber_stream::{Start, StreamConfig};
use tokio::sync::watch;

use crate::keyspace::{now_ms, Value};
use crate::replication::Answer;
use crate::txn::{CmpOp, Compare, Op, OpResult, Target, Txn};
use crate::Engines;
use timber_proto::v1 as pb;

#[derive(Clone)]
struct App {
    engines: Arc<Engines>,
    prometheus: Option<metrics_exporter_prometheus::PrometheusHandle>,
    stop: watch::Receiver<bool>,
}

/// An error reply.
struct Failure(StatusCode, String);

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

type Result<T> = std::result::Result<T, Failure>;

fn keys_failed(e: crate::keyspace::Error) -> Failure {
    use crate::keyspace::Error;
    match e {
        Error::NotLeader { .. } => Failure(StatusCode::MISDIRECTED_REQUEST, e.to_string()),
        Error::ClusterDown(_) => Failure(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        Error::TooLarge(m) => Failure(StatusCode::PAYLOAD_TOO_LARGE, m),
        Error::Refused(_) => Failure(StatusCode::CONFLICT, e.to_string()),
        // Retryable: the whole transaction.
        Error::Kv(timber_kv::Error::Conflict { .. }) => {
            Failure(StatusCode::CONFLICT, e.to_string())
        }
        e => {
            tracing::error!(error = %e, "keyspace error");
            Failure(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
        }
    }
}

/// On a cluster member that does not lead: the reply of the Redis-protocol command `args` run
/// on the leader. `None` on a single node and on the leader.
async fn on_leader(app: &App, args: &[&[u8]]) -> Result<Option<Answer>> {
    let Some(r) = app.engines.keys.replication() else { return Ok(None) };
    let args = args.iter().map(|a| Bytes::copy_from_slice(a)).collect();
    r.on_leader(args).await.transpose().map_err(keys_failed)
}

/// A reply of the leader that a forwarded call cannot have.
fn unexpected(a: Answer) -> Failure {
    Failure(StatusCode::INTERNAL_SERVER_ERROR, format!("unexpected reply from the leader: {a:?}"))
}

fn stream_failed(e: impl Into<crate::logs::Error>) -> Failure {
    use crate::logs::Code;
    let e = e.into();
    let code = match e.code() {
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Fenced => StatusCode::CONFLICT,
        Code::Invalid => StatusCode::BAD_REQUEST,
        Code::OutOfRange => StatusCode::RANGE_NOT_SATISFIABLE,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::Internal => {
            tracing::error!(error = %e, "stream storage error");
            StatusCode::INTERNAL_SERVER_ERROR
        }
    };
    Failure(code, e.to_string())
}

/// `{"<field>": text}` if UTF-8, else `{"<field>_base64": ...}`.
fn put_bytes(obj: &mut serde_json::Map<String, Json_>, field: &str, b: &[u8]) {
    match std::str::from_utf8(b) {
        Ok(s) => obj.insert(field.into(), Json_::String(s.into())),
        Err(_) => obj.insert(
            format!("{field}_base64"),
            Json_::String(base64::engine::general_purpose::STANDARD.encode(b)),
        ),
    };
}

fn entry_json(id: u64, data: &[u8]) -> Json_ {
    let mut o = serde_json::Map::new();
    o.insert("id".into(), json!(id));
    put_bytes(&mut o, "data", data);
    Json_::Object(o)
}

/// What a connection over `--max-connections` gets before it is closed.
const REFUSAL: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: 45\r\nconnection: close\r\n\r\n{\"error\":\"max number of connections reached\"}";

/// Serves the HTTP endpoint on `listener` until `stop` fires.
pub(crate) async fn serve(
    engines: Arc<Engines>,
    prometheus: Option<metrics_exporter_prometheus::PrometheusHandle>,
    listener: tokio::net::TcpListener,
    stop: watch::Receiver<bool>,
) {
    let max = engines.max_value;
    let listener =
        crate::limit::Limited::new(listener, engines.connections.clone(), REFUSAL, engines.idle);
    let app = App { engines, prometheus, stop: stop.clone() };
    let v1 = Router::new()
        .route("/kv", get(kv_list))
        .route("/kv/{key}", get(kv_get).put(kv_put).delete(kv_delete))
        .route("/txn", post(txn))
        .route("/txns", post(txns_begin))
        .route("/txns/{id}", axum::routing::delete(txns_rollback))
        .route("/txns/{id}/commit", post(txns_commit))
        .route("/txns/{id}/kv", get(txns_scan))
        .route("/txns/{id}/kv/{key}", get(txns_get).put(txns_put).delete(txns_delete))
        .route("/streams", get(streams_list).post(stream_create))
        .route("/streams/{name}", get(stream_info).delete(stream_delete))
        .route("/streams/{name}/truncate", post(stream_truncate))
        .route("/streams/{name}/entries", get(entries_read).post(entries_append))
        .route("/streams/{name}/ws", get(entries_ws))
        .layer(middleware::from_fn_with_state(app.clone(), authorize));
    let router = Router::new()
        .nest("/v1", v1)
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .layer(middleware::from_fn(measure))
        .layer(DefaultBodyLimit::max(max))
        .with_state(app);
    let mut stopping = stop;
    let r = axum::serve(listener, router)
        .with_graceful_shutdown(async move { crate::shutdown::stopped(&mut stopping).await })
        .await;
    if let Err(e) = r {
        tracing::error!(error = %e, "HTTP endpoint failed");
    }
}

async fn authorize(State(app): State<App>, req: Request, next: Next) -> Response {
    if let Some(secret) = &app.engines.secret {
        let ok = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|t| t == secret);
        if !ok {
            return Failure(StatusCode::UNAUTHORIZED, "missing or wrong bearer token".into())
                .into_response();
        }
    }
    next.run(req).await
}

/// Counts requests and their latency per route and status.
async fn measure(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let method = req.method().to_string();
    let start = Instant::now();
    let resp = next.run(req).await;
    let status = resp.status().as_u16().to_string();
    metrics::counter!("timber_http_requests_total", "route" => route.clone(), "method" => method.clone(), "status" => status)
        .increment(1);
    metrics::histogram!("timber_http_request_seconds", "route" => route, "method" => method)
        .record(start.elapsed().as_secs_f64());
    resp
}

async fn metrics_text(State(app): State<App>) -> Response {
    match &app.prometheus {
        Some(h) => {
            // Sets the stream store's gauges (backlog, outage) before they are rendered.
            let store = app.engines.redis_streams.store().store_status();
            metrics::gauge!("timber_stream_store_info", "backend" => store.backend).set(1.0);
            let mut text = h.render();
            text.push_str(&format!(
                "# TYPE timber_uptime_seconds gauge\ntimber_uptime_seconds {}\n",
                app.engines.started.elapsed().as_secs()
            ));
            if let Some(r) = app.engines.keys.replication() {
                text.push_str(&r.status().prometheus());
            }
            ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
        }
        None => Failure(StatusCode::SERVICE_UNAVAILABLE, "metrics recorder not installed".into())
            .into_response(),
    }
}

async fn ready(State(app): State<App>) -> Response {
    if *app.stop.borrow() {
        return (StatusCode::SERVICE_UNAVAILABLE, "stopping\n").into_response();
    }
    if let Some(r) = app.engines.keys.replication() {
        if let Err(why) = r.status().ready() {
            return (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")).into_response();
        }
    }
    match app.engines.keys.get(b"") {
        Ok(_) => (StatusCode::OK, "ready\n").into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")).into_response(),
    }
}

async fn blocking<T: Send + 'static>(
    app: &App,
    f: impl FnOnce(&crate::keyspace::Keyspace) -> std::result::Result<T, crate::keyspace::Error>
        + Send
        + 'static,
) -> Result<T> {
    settled(app.engines.keys.write_durably(f).await)
}

/// The outcome of a keyspace write task (`None`: the task died).
fn settled<T>(r: Option<std::result::Result<T, crate::keyspace::Error>>) -> Result<T> {
    match r {
        Some(r) => r.map_err(keys_failed),
        None => Err(Failure(StatusCode::INTERNAL_SERVER_ERROR, "write task failed".into())),
    }
}

/// The response header of a key's version (`GET /v1/kv/{key}`).
const VERSION_HEADER: &str = "x-timber-version";

async fn kv_get(
    State(app): State<App>,
    Path(key): Path<String>,
    Query(q): Query<StaleQuery>,
) -> Result<Response> {
    let missing = || Failure(StatusCode::NOT_FOUND, format!("key {key:?} does not exist"));
    let stream = || Failure(StatusCode::CONFLICT, "the key holds a Redis stream".into());
    let got = match q.stale {
        true => crate::forwarded::get_here(&app.engines.keys, key.as_bytes()),
        false => crate::forwarded::get(&app.engines, Bytes::from(key.clone())).await,
    };
    match got {
        Ok(pb::GetResponse { value: Some(v), version }) => Ok(versioned(v, version)),
        Ok(_) => Err(missing()),
        Err(crate::keyspace::Error::WrongType) => Err(stream()),
        Err(e) => Err(keys_failed(e)),
    }
}

/// A value as a response, with its version in a header.
fn versioned(v: Bytes, version: u64) -> Response {
    (
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::HeaderName::from_static(VERSION_HEADER), version.to_string()),
        ],
        v,
    )
        .into_response()
}

#[derive(Deserialize)]
struct PutQuery {
    ttl_ms: Option<u64>,
}

async fn kv_put(
    State(app): State<App>,
    Path(key): Path<String>,
    Query(q): Query<PutQuery>,
    body: Bytes,
) -> Result<StatusCode> {
    let ttl = q.ttl_ms.filter(|t| *t > 0);
    let px = ttl.map(|t| t.to_string());
    let mut args: Vec<&[u8]> = vec![b"SET", key.as_bytes(), &body];
    if let Some(px) = &px {
        args.extend([&b"PX"[..], px.as_bytes()]);
    }
    if let Some(a) = on_leader(&app, &args).await? {
        return match a {
            Answer::Ok => Ok(StatusCode::NO_CONTENT),
            other => Err(unexpected(other)),
        };
    }
    let expire_at = ttl.map(|t| now_ms().saturating_add(t));
    let v = Value { expire_at, ..Value::string(body) };
    settled(app.engines.keys.write_values(vec![(Bytes::from(key), Some(v))]).await)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn kv_delete(State(app): State<App>, Path(key): Path<String>) -> Result<Json<Json_>> {
    if let Some(a) = on_leader(&app, &[b"DEL", key.as_bytes()]).await? {
        return match a {
            Answer::Int(n) => Ok(Json(json!({ "existed": n > 0 }))),
            other => Err(unexpected(other)),
        };
    }
    let n = blocking(&app, move |k| {
        let _g = k.lock(key.as_bytes());
        k.delete(&[key.as_bytes()])
    })
    .await?;
    Ok(Json(json!({ "existed": n > 0 })))
}

#[derive(Deserialize)]
struct ListQuery {
    #[serde(default)]
    prefix: String,
    #[serde(default)]
    start: String,
    #[serde(default)]
    end: String,
    limit: Option<usize>,
    /// In a cluster: read this member's state, even stale.
    #[serde(default)]
    stale: bool,
}

/// `?stale=true`: in a cluster, read this member's state even if it does not lead.
#[derive(Deserialize)]
struct StaleQuery {
    #[serde(default)]
    stale: bool,
}

async fn kv_list(State(app): State<App>, Query(q): Query<ListQuery>) -> Result<Json<Json_>> {
    let limit = q.limit.unwrap_or(1000).min(100_000);
    let (prefix, end) = (Bytes::from(q.prefix.clone()), Bytes::from(q.end.clone()));
    let forwarded = match app.engines.keys.replication().filter(|_| !q.stale) {
        Some(r) => crate::forwarded::scan(r, &prefix, q.start.as_bytes(), &end, limit + 1).await,
        None => None,
    };
    let mut items = match forwarded {
        Some(items) => items.map_err(keys_failed)?,
        None if !q.stale => {
            app.engines.keys.linearizable_async().await.map_err(keys_failed)?;
            app.engines
                .keys
                .range(q.prefix.as_bytes(), q.start.as_bytes(), q.end.as_bytes(), limit + 1)
                .map_err(keys_failed)?
        }
        None => app
            .engines
            .keys
            .range(q.prefix.as_bytes(), q.start.as_bytes(), q.end.as_bytes(), limit + 1)
            .map_err(keys_failed)?,
    };
    let more = items.len() > limit;
    items.truncate(limit);
    let items: Vec<Json_> = items
        .iter()
        .map(|(k, v)| {
            let mut o = serde_json::Map::new();
            put_bytes(&mut o, "key", k);
            put_bytes(&mut o, "value", v);
            Json_::Object(o)
        })
        .collect();
    Ok(Json(json!({ "items": items, "more": more })))
}

async fn txn(State(app): State<App>, Json(body): Json<Json_>) -> Result<Json<Json_>> {
    let bad = |m: String| Failure(StatusCode::BAD_REQUEST, m);
    let t = txn_of(&body).map_err(bad)?;
    t.check(app.engines.max_value).map_err(bad)?;
    let o = crate::txn::run(&app.engines, t).await.map_err(keys_failed)?;
    let results: Vec<Json_> = o
        .results
        .into_iter()
        .map(|r| match r {
            OpResult::Put => json!({ "put": {} }),
            OpResult::Delete { existed } => json!({ "delete": { "existed": existed } }),
            OpResult::Get { value: None, .. } => {
                json!({ "get": { "value": null, "version": 0 } })
            }
            OpResult::Get { value: Some(v), version } => {
                let mut o = serde_json::Map::new();
                put_bytes(&mut o, "value", &v);
                o.insert("version".into(), json!(version));
                json!({ "get": o })
            }
        })
        .collect();
    Ok(Json(json!({ "succeeded": o.succeeded, "results": results })))
}

fn txn_failed(e: crate::open_txns::Error) -> Failure {
    use crate::open_txns::Error as E;
    match e {
        E::Aborted(m) => Failure(StatusCode::CONFLICT, format!("aborted: {m}")),
        E::Invalid(m) => Failure(StatusCode::BAD_REQUEST, m),
        E::Unavailable(m) => Failure(StatusCode::SERVICE_UNAVAILABLE, m),
        E::Internal(m) => Failure(StatusCode::INTERNAL_SERVER_ERROR, m),
    }
}

/// Runs a call of an interactive transaction.
async fn txn_call(app: &App, call: pb::txn_call::Call) -> Result<pb::txn_reply::Reply> {
    crate::open_txns::call(&app.engines, call).await.map_err(txn_failed)
}

fn mismatched() -> Failure {
    Failure(StatusCode::INTERNAL_SERVER_ERROR, "a transaction reply of the wrong kind".into())
}

#[derive(Deserialize)]
struct BeginBody {
    #[serde(default)]
    isolation: Option<String>,
    #[serde(default)]
    pessimistic: bool,
    lock_timeout_ms: Option<u64>,
}

async fn txns_begin(State(app): State<App>, Json(b): Json<BeginBody>) -> Result<Json<Json_>> {
    let isolation = match b.isolation.as_deref() {
        None | Some("snapshot") => pb::Isolation::Snapshot,
        Some("read_committed") => pb::Isolation::ReadCommitted,
        Some("serializable") => pb::Isolation::Serializable,
        Some(other) => {
            return Err(Failure(StatusCode::BAD_REQUEST, format!("unknown isolation {other:?}")))
        }
    };
    let req = pb::BeginRequest {
        isolation: isolation as i32,
        pessimistic: b.pessimistic,
        lock_timeout_ms: b.lock_timeout_ms,
    };
    match txn_call(&app, pb::txn_call::Call::Begin(req)).await? {
        pb::txn_reply::Reply::Begin(r) => Ok(Json(json!({ "id": r.id }))),
        _ => Err(mismatched()),
    }
}

#[derive(Deserialize)]
struct ForUpdate {
    #[serde(default)]
    for_update: bool,
}

async fn txns_get(
    State(app): State<App>,
    Path((id, key)): Path<(u64, String)>,
    Query(q): Query<ForUpdate>,
) -> Result<Response> {
    let req = pb::TxnGetRequest { id, key: Bytes::from(key.clone()), for_update: q.for_update };
    match txn_call(&app, pb::txn_call::Call::Get(req)).await? {
        pb::txn_reply::Reply::Get(pb::GetResponse { value: Some(v), version }) => {
            Ok(versioned(v, version))
        }
        pb::txn_reply::Reply::Get(_) => {
            Err(Failure(StatusCode::NOT_FOUND, format!("key {key:?} does not exist")))
        }
        _ => Err(mismatched()),
    }
}

async fn txns_put(
    State(app): State<App>,
    Path((id, key)): Path<(u64, String)>,
    Query(q): Query<PutQuery>,
    body: Bytes,
) -> Result<StatusCode> {
    let req = pb::TxnPutRequest { id, key: Bytes::from(key), value: body, ttl_ms: q.ttl_ms };
    match txn_call(&app, pb::txn_call::Call::Put(req)).await? {
        pb::txn_reply::Reply::Put(_) => Ok(StatusCode::NO_CONTENT),
        _ => Err(mismatched()),
    }
}

async fn txns_delete(
    State(app): State<App>,
    Path((id, key)): Path<(u64, String)>,
) -> Result<Json<Json_>> {
    let req = pb::TxnDeleteRequest { id, key: Bytes::from(key) };
    match txn_call(&app, pb::txn_call::Call::Delete(req)).await? {
        pb::txn_reply::Reply::Delete(r) => Ok(Json(json!({ "existed": r.existed }))),
        _ => Err(mismatched()),
    }
}

async fn txns_scan(
    State(app): State<App>,
    Path(id): Path<u64>,
    Query(q): Query<ListQuery>,
) -> Result<Json<Json_>> {
    let req = pb::TxnScanRequest {
        id,
        prefix: Bytes::from(q.prefix),
        start: Bytes::from(q.start),
        end: Bytes::from(q.end),
        limit: q.limit.unwrap_or(1000).min(100_000) as u64,
    };
    match txn_call(&app, pb::txn_call::Call::Scan(req)).await? {
        pb::txn_reply::Reply::Scan(page) => {
            let items: Vec<Json_> = page
                .items
                .iter()
                .map(|kv| {
                    let mut o = serde_json::Map::new();
                    put_bytes(&mut o, "key", &kv.key);
                    put_bytes(&mut o, "value", &kv.value);
                    Json_::Object(o)
                })
                .collect();
            Ok(Json(json!({ "items": items })))
        }
        _ => Err(mismatched()),
    }
}

async fn txns_commit(State(app): State<App>, Path(id): Path<u64>) -> Result<StatusCode> {
    match txn_call(&app, pb::txn_call::Call::Commit(pb::TxnRef { id })).await? {
        pb::txn_reply::Reply::Commit(_) => Ok(StatusCode::NO_CONTENT),
        _ => Err(mismatched()),
    }
}

async fn txns_rollback(State(app): State<App>, Path(id): Path<u64>) -> Result<Json<Json_>> {
    match txn_call(&app, pb::txn_call::Call::Rollback(pb::TxnRef { id })).await? {
        pb::txn_reply::Reply::Rollback(r) => Ok(Json(json!({ "existed": r.existed }))),
        _ => Err(mismatched()),
    }
}

/// The bytes of `field` in `o`: `"<field>"` as text or `"<field>_base64"`.
fn bytes_of(o: &Json_, field: &str) -> std::result::Result<Option<Bytes>, String> {
    if let Some(v) = o.get(field) {
        return match v.as_str() {
            Some(s) => Ok(Some(Bytes::copy_from_slice(s.as_bytes()))),
            None => Err(format!("\"{field}\" must be a string")),
        };
    }
    match o.get(format!("{field}_base64")) {
        None => Ok(None),
        Some(v) => {
            let s = v.as_str().ok_or_else(|| format!("\"{field}_base64\" must be a string"))?;
            let b = base64::engine::general_purpose::STANDARD
                .decode(s)
                .map_err(|e| format!("\"{field}_base64\": {e}"))?;
            Ok(Some(Bytes::from(b)))
        }
    }
}

/// A conditional transaction from its JSON form.
fn txn_of(body: &Json_) -> std::result::Result<Txn, String> {
    let key = |o: &Json_| bytes_of(o, "key")?.ok_or_else(|| "a part without \"key\"".to_string());
    let list = |name: &str| -> std::result::Result<Vec<Json_>, String> {
        match body.get(name) {
            None => Ok(Vec::new()),
            Some(Json_::Array(a)) => Ok(a.clone()),
            Some(_) => Err(format!("\"{name}\" must be an array")),
        }
    };
    let compare = list("compare")?
        .iter()
        .map(|c| {
            let op = match c.get("op").map(|o| o.as_str()) {
                None | Some(Some("equal")) => CmpOp::Equal,
                Some(Some("not_equal")) => CmpOp::NotEqual,
                Some(Some("less")) => CmpOp::Less,
                Some(Some("greater")) => CmpOp::Greater,
                Some(other) => return Err(format!("unknown comparison operator {other:?}")),
            };
            let target = match (bytes_of(c, "value")?, c.get("exists"), c.get("version")) {
                (Some(v), None, None) => Target::Value(v),
                (None, Some(Json_::Bool(e)), None) => Target::Exists(*e),
                (None, None, Some(v)) if v.is_u64() => Target::Version(v.as_u64().unwrap_or(0)),
                _ => {
                    return Err("a comparison needs one of \"value\", \"exists\" (a boolean) \
                                and \"version\" (a non-negative integer)"
                        .into())
                }
            };
            Ok(Compare { key: key(c)?, op, target })
        })
        .collect::<std::result::Result<_, String>>()?;
    let ops = |name: &str| -> std::result::Result<Vec<Op>, String> {
        list(name)?
            .iter()
            .map(|o| {
                if let Some(p) = o.get("put") {
                    let value = bytes_of(p, "value")?.ok_or("a put without \"value\"")?;
                    let ttl_ms = match p.get("ttl_ms") {
                        None | Some(Json_::Null) => None,
                        Some(t) => Some(t.as_u64().ok_or("\"ttl_ms\" must be a whole number")?),
                    };
                    Ok(Op::Put { key: key(p)?, value, ttl_ms })
                } else if let Some(d) = o.get("delete") {
                    Ok(Op::Delete { key: key(d)? })
                } else if let Some(g) = o.get("get") {
                    Ok(Op::Get { key: key(g)? })
                } else {
                    Err("an operation is one of \"put\", \"delete\" and \"get\"".to_string())
                }
            })
            .collect()
    };
    Ok(Txn { compare, success: ops("success")?, failure: ops("failure")? })
}

fn info_json(s: &timber_stream::StreamInfo) -> Json_ {
    json!({
        "name": s.name,
        "first_id": s.first_id,
        "next_id": s.next_id,
        "bytes": s.bytes,
        "created_ms": s.created_ms,
    })
}

async fn streams_list(State(app): State<App>) -> Result<Json<Json_>> {
    let all = app.engines.logs.list(false).await.map_err(stream_failed)?;
    Ok(Json(json!({ "streams": all.iter().map(info_json).collect::<Vec<_>>() })))
}

#[derive(Deserialize)]
struct CreateBody {
    name: String,
    retention_ms: Option<u64>,
    retention_bytes: Option<u64>,
}

async fn stream_create(
    State(app): State<App>,
    Json(b): Json<CreateBody>,
) -> Result<(StatusCode, Json<Json_>)> {
    let cfg = StreamConfig {
        retention_age: b.retention_ms.map(Duration::from_millis),
        retention_bytes: b.retention_bytes,
    };
    let s = app.engines.logs.create(&b.name, cfg).await.map_err(stream_failed)?;
    Ok((StatusCode::CREATED, Json(info_json(&s))))
}

async fn stream_info(State(app): State<App>, Path(name): Path<String>) -> Result<Json<Json_>> {
    Ok(Json(info_json(&app.engines.logs.info(&name, false).await.map_err(stream_failed)?)))
}

async fn stream_delete(State(app): State<App>, Path(name): Path<String>) -> Result<StatusCode> {
    app.engines.logs.delete(&name).await.map_err(stream_failed)?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
struct TruncateQuery {
    before: u64,
}

async fn stream_truncate(
    State(app): State<App>,
    Path(name): Path<String>,
    Query(q): Query<TruncateQuery>,
) -> Result<Json<Json_>> {
    let s = app.engines.logs.truncate(&name, q.before).await.map_err(stream_failed)?;
    Ok(Json(info_json(&s)))
}

#[derive(Deserialize)]
struct AppendBody {
    entries: Vec<String>,
}

async fn entries_append(
    State(app): State<App>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, Json<Json_>)> {
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    let entries: Vec<Bytes> = if is_json {
        let b: AppendBody = serde_json::from_slice(&body)
            .map_err(|e| Failure(StatusCode::BAD_REQUEST, format!("bad JSON body: {e}")))?;
        b.entries.into_iter().map(Bytes::from).collect()
    } else {
        vec![body]
    };
    let count = entries.len();
    let first = app.engines.logs.append(&name, entries).await.map_err(stream_failed)?;
    Ok((StatusCode::CREATED, Json(json!({ "first_id": first, "count": count }))))
}

#[derive(Deserialize)]
struct ReadQuery {
    from: Option<String>,
    limit: Option<usize>,
    /// In a cluster: read this member's own copy, which may lag the leader's.
    #[serde(default)]
    stale: bool,
}

fn parse_start(from: Option<&str>) -> Result<Start> {
    match from {
        None | Some("earliest") => Ok(Start::Earliest),
        Some("latest") => Ok(Start::Latest),
        Some(n) => n.parse().map(Start::At).map_err(|_| {
            Failure(StatusCode::BAD_REQUEST, format!("from={n:?}: use earliest, latest or an id"))
        }),
    }
}

async fn entries_read(
    State(app): State<App>,
    Path(name): Path<String>,
    Query(q): Query<ReadQuery>,
) -> Result<Json<Json_>> {
    let start = parse_start(q.from.as_deref())?;
    let limit = q.limit.unwrap_or(1000).min(100_000);
    let mut r = app.engines.logs.reader(&name, start, q.stale).await.map_err(stream_failed)?;
    let mut out = Vec::new();
    while out.len() < limit && r.has_next() {
        let e = r.next().await.map_err(stream_failed)?;
        out.push(entry_json(e.id, &e.data));
    }
    Ok(Json(json!({ "entries": out, "next": r.position() })))
}

async fn entries_ws(
    State(app): State<App>,
    Path(name): Path<String>,
    Query(q): Query<ReadQuery>,
    ws: WebSocketUpgrade,
) -> Result<Response> {
    let start = parse_start(q.from.as_deref())?;
    let reader = app.engines.logs.reader(&name, start, q.stale).await.map_err(stream_failed)?;
    let stop = app.stop.clone();
    Ok(ws.on_upgrade(move |socket| push(socket, reader, stop)))
}

/// Pushes entries to a WebSocket until the client goes away or the server stops.
async fn push(
    mut socket: WebSocket,
    mut reader: timber_stream::StreamReader,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            e = reader.next() => {
                let msg = match e {
                    Ok(e) => entry_json(e.id, &e.data).to_string(),
                    Err(e) => {
                        let _ = socket.send(Message::Text(json!({ "error": e.to_string() }).to_string().into())).await;
                        return;
                    }
                };
                if socket.send(Message::Text(msg.into())).await.is_err() {
                    return;
                }
            }
            m = socket.recv() => match m {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            },
            () = crate::shutdown::stopped(&mut stop) => {
                let _ = socket.send(Message::Close(None)).await;
                return;
            }
        }
    }
}
