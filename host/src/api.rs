//! The client API: HTTP/1.1 and JSON, conventional semantics.
//!
//! | request | meaning |
//! |---|---|
//! | `GET /v1/kv/{key}` | value and `ETag: "<version>"`; 404 if absent. `?consistency=local` reads this replica's copy |
//! | `PUT /v1/kv/{key}` | set; `If-None-Match: *` creates only, `If-Match: "<v>"` compares and swaps |
//! | `DELETE /v1/kv/{key}` | delete; `If-Match: "<v>"` only at that version |
//! | `POST /v1/kv/{key}` | run the body as a command of the key's policy; the new value and ETag, 409 if the policy refuses |
//! | `GET /v1/components`, `POST /v1/components` | list the stored components; push one (the body is the `.wasm`) |
//! | `GET /v1/policies`, `POST /v1/policies`, `DELETE /v1/policies?prefix=P` | bindings this replica runs; bind `{"prefix","component"}`; unbind |
//! | `GET /v1/protocol` | the protocol this replica runs, the cluster's active one, the swap history |
//! | `POST /v1/protocol/activate`, `POST /v1/protocol/rollback` | swap the cluster's protocol `{"component"}`; go back to the previous one |
//! | `GET /v1/cluster` | this replica's view of the cluster |
//! | `GET /v1/cluster/members` | the membership record and every member's epoch, sweep and catch-up progress |
//! | `POST /v1/cluster/members`, `DELETE /v1/cluster/members/{id}` | queue adding `{"id","peer","http"}`; queue removing a replica |
//! | `GET /metrics`, `GET /healthz`, `GET /readyz` | Prometheus metrics, liveness, readiness |
//!
//! Errors are `{"error":{"code":..., "message":...}}` with a status that says
//! who must act: 4xx the client, 503 the cluster (no quorum, overloaded,
//! stopped). A request never waits longer than [`REQUEST_TIMEOUT`].

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use ballot_core::register::Command;
use ballot_core::{Completion, Consistency, Current, FailureReason, Operation, Outcome};
use serde::Deserialize;
use tokio::sync::{mpsc, oneshot};

use crate::membership::{Action, Change, ChangeError, Membership};
use crate::metrics::Metrics;
use crate::node::{ClientRequest, Health, KEY_MAX};
use crate::registry::{Registry, RegistryError, Swap, COMPONENT_MAX};
pub use crate::runtime::VALUE_MAX;
/// Longest a request waits for the cluster.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

pub use ballot_client::views::{ClusterView, ComponentView, ReplicaView};

/// What the handlers share.
#[derive(Clone)]
pub struct App {
    pub requests: mpsc::Sender<ClientRequest>,
    pub health: Arc<Health>,
    pub metrics: Arc<Metrics>,
    /// Builds the cluster view on demand (link states change).
    pub cluster: Arc<dyn Fn() -> ClusterView + Send + Sync>,
    pub registry: Arc<Registry>,
    pub membership: Arc<Membership>,
    /// Required of component, policy and protocol changes when set.
    pub admin_token: Option<Arc<str>>,
}

/// The router.
pub fn router(app: App) -> Router {
    Router::new()
        .route(
            "/v1/kv/{*key}",
            get(get_kv).put(put_kv).delete(delete_kv).post(post_kv),
        )
        .route("/v1/components", get(list_components).post(push_component))
        .route(
            "/v1/policies",
            get(list_policies).post(bind_policy).delete(unbind_policy),
        )
        .route("/v1/protocol", get(protocol_status))
        .route(
            "/v1/protocol/activate",
            axum::routing::post(activate_protocol),
        )
        .route(
            "/v1/protocol/rollback",
            axum::routing::post(rollback_protocol),
        )
        .route("/v1/cluster", get(cluster))
        .route("/v1/cluster/members", get(members).post(add_member))
        .route(
            "/v1/cluster/members/{id}",
            axum::routing::delete(remove_member),
        )
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "not-found", "no such endpoint") })
        .with_state(app)
}

/// A JSON error response.
pub fn error(status: StatusCode, code: &str, message: &str) -> Response {
    error_with(status, code, message, serde_json::Map::new())
}

fn error_with(
    status: StatusCode,
    code: &str,
    message: &str,
    mut extra: serde_json::Map<String, serde_json::Value>,
) -> Response {
    extra.insert("code".into(), code.into());
    extra.insert("message".into(), message.into());
    // Every server-side failure tells whether retrying could apply a write
    // twice; unless the caller said otherwise, it did not reach the core.
    if status.is_server_error() {
        extra.entry("maybe_applied").or_insert(false.into());
    }
    let body = serde_json::json!({ "error": extra });
    let mut response = (status, axum::Json(body)).into_response();
    if status == StatusCode::SERVICE_UNAVAILABLE {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}

fn etag(version: u64) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{version}\"")).expect("digits are a valid header")
}

/// Parses an entity tag `"<version>"` (quotes optional).
fn parse_etag(raw: &str) -> Option<u64> {
    let raw = raw.trim();
    let inner = raw
        .strip_prefix('"')
        .and_then(|r| r.strip_suffix('"'))
        .unwrap_or(raw);
    inner.parse().ok()
}

fn key_of(
    path: Result<Path<String>, axum::extract::rejection::PathRejection>,
) -> Result<Vec<u8>, Response> {
    let Path(key) = path.map_err(|e| error(StatusCode::BAD_REQUEST, "bad-key", &e.body_text()))?;
    if key.is_empty() || key.len() > KEY_MAX {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "bad-key",
            &format!("keys must be 1 to {KEY_MAX} bytes, got {}", key.len()),
        ));
    }
    if key.starts_with('\0') {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "bad-key",
            "keys beginning with a NUL byte belong to the cluster",
        ));
    }
    Ok(key.into_bytes())
}

/// PUT and DELETE speak the register's commands; a key bound to another
/// policy takes its own commands through POST.
fn register_only(app: &App, key: &[u8]) -> Result<(), Response> {
    match app.registry.binding_for(key) {
        None => Ok(()),
        Some((binding, record)) => Err(error(
            StatusCode::CONFLICT,
            "policy-bound",
            &format!(
                "keys under {:?} are governed by policy {} {}: send its commands with POST",
                binding.prefix, record.name, record.version
            ),
        )),
    }
}

async fn submit(app: &App, key: Vec<u8>, op: Operation) -> Result<Completion, Response> {
    if let Some(reason) = app.health.fatal() {
        return Err(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "replica-stopped",
            &format!("this replica stopped answering: {reason}"),
        ));
    }
    if !app.registry.started() {
        return Err(starting());
    }
    let (reply, done) = oneshot::channel();
    if app
        .requests
        .try_send(ClientRequest { key, op, reply })
        .is_err()
    {
        return Err(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            "too many requests queued on this replica",
        ));
    }
    match tokio::time::timeout(REQUEST_TIMEOUT, done).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(_)) => {
            // The core had the request: it may have taken effect.
            let mut extra = serde_json::Map::new();
            extra.insert("maybe_applied".into(), true.into());
            Err(error_with(
                StatusCode::SERVICE_UNAVAILABLE,
                "replica-stopped",
                "the replica stopped before answering; the write may still take effect",
                extra,
            ))
        }
        Err(_) => {
            let mut extra = serde_json::Map::new();
            extra.insert("maybe_applied".into(), true.into());
            Err(error_with(
                StatusCode::SERVICE_UNAVAILABLE,
                "timeout",
                "no answer from the cluster in time; the write may still take effect",
                extra,
            ))
        }
    }
}

fn current_json(current: &Current) -> serde_json::Value {
    let mut obj = serde_json::Map::new();
    obj.insert("version".into(), current.version.into());
    match &current.value {
        None => {
            obj.insert("value".into(), serde_json::Value::Null);
        }
        Some(v) => match std::str::from_utf8(v) {
            Ok(s) => {
                obj.insert("value".into(), s.into());
            }
            Err(_) => {
                let hex: String = v.iter().map(|b| format!("{b:02x}")).collect();
                obj.insert("value_hex".into(), hex.into());
            }
        },
    }
    obj.into()
}

/// How a command reached the policy.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Via {
    /// PUT or DELETE: register commands built from HTTP preconditions.
    Http,
    /// POST: the client's own command for the key's policy.
    Command,
}

/// Maps a non-success outcome to its response.
fn unsuccessful(outcome: &Outcome, via: Via) -> Option<Response> {
    match outcome {
        Outcome::Done(_) => None,
        Outcome::Rejected(rejection, current) => {
            let status = match (rejection.code.as_str(), via) {
                (crate::runtime::POLICY_FAILED, _) => StatusCode::INTERNAL_SERVER_ERROR,
                (_, Via::Command) => StatusCode::CONFLICT,
                ("version-mismatch" | "conflict", Via::Http) => StatusCode::PRECONDITION_FAILED,
                ("invalid-command", Via::Http) => StatusCode::BAD_REQUEST,
                (_, Via::Http) => StatusCode::CONFLICT,
            };
            let mut extra = serde_json::Map::new();
            extra.insert("current".into(), current_json(current));
            let mut r = error_with(status, &rejection.code, &rejection.message, extra);
            r.headers_mut().insert(header::ETAG, etag(current.version));
            Some(r)
        }
        Outcome::Failed(f) => {
            let (status, code) = match f.reason {
                FailureReason::NoQuorum => (StatusCode::SERVICE_UNAVAILABLE, "no-quorum"),
                FailureReason::Contention => (StatusCode::SERVICE_UNAVAILABLE, "contention"),
                FailureReason::Overloaded => (StatusCode::SERVICE_UNAVAILABLE, "overloaded"),
                FailureReason::Invalid => (StatusCode::BAD_REQUEST, "invalid"),
                FailureReason::Interrupted => (StatusCode::SERVICE_UNAVAILABLE, "interrupted"),
            };
            let mut extra = serde_json::Map::new();
            extra.insert("maybe_applied".into(), f.maybe_applied.into());
            Some(error_with(status, code, &f.message, extra))
        }
    }
}

#[derive(Deserialize)]
struct ReadParams {
    consistency: Option<String>,
}

async fn get_kv(
    State(app): State<App>,
    path: Result<Path<String>, axum::extract::rejection::PathRejection>,
    params: Result<Query<ReadParams>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let key = match key_of(path) {
        Ok(k) => k,
        Err(r) => return r,
    };
    let consistency = match params.as_ref().map(|q| q.consistency.as_deref()) {
        Ok(None | Some("linearizable")) => Consistency::Linearizable,
        Ok(Some("local")) => Consistency::Local,
        Ok(Some(other)) => {
            return error(
                StatusCode::BAD_REQUEST,
                "bad-parameter",
                &format!("consistency must be linearizable or local, not {other:?}"),
            )
        }
        Err(e) => return error(StatusCode::BAD_REQUEST, "bad-parameter", &e.body_text()),
    };
    let c = match submit(&app, key, Operation::Read(consistency)).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    if let Some(r) = unsuccessful(&c.outcome, Via::Http) {
        return r;
    }
    let Outcome::Done(current) = c.outcome else {
        unreachable!()
    };
    match current.value {
        Some(value) => (
            StatusCode::OK,
            [
                (header::ETAG, etag(current.version)),
                (
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/octet-stream"),
                ),
            ],
            value,
        )
            .into_response(),
        None => {
            let mut r = error(StatusCode::NOT_FOUND, "not-found", "the key has no value");
            if current.version > 0 {
                r.headers_mut().insert(header::ETAG, etag(current.version));
            }
            r
        }
    }
}

enum Precondition {
    None,
    Absent,
    Version(u64),
}

fn precondition(headers: &HeaderMap) -> Result<Precondition, Response> {
    let bad = |m: &str| error(StatusCode::BAD_REQUEST, "bad-precondition", m);
    let one = |name: header::HeaderName| -> Result<Option<String>, Response> {
        let mut values = headers.get_all(&name).iter();
        let Some(first) = values.next() else {
            return Ok(None);
        };
        if values.next().is_some() {
            return Err(bad(&format!("give {name} once")));
        }
        first
            .to_str()
            .map(|s| Some(s.trim().to_string()))
            .map_err(|_| bad(&format!("{name} is not text")))
    };
    match (one(header::IF_NONE_MATCH)?, one(header::IF_MATCH)?) {
        (Some(_), Some(_)) => Err(bad("give If-None-Match or If-Match, not both")),
        (Some(v), None) if v == "*" => Ok(Precondition::Absent),
        (Some(_), None) => Err(bad("only If-None-Match: * is supported (create if absent)")),
        (None, Some(v)) => match parse_etag(&v) {
            Some(version) => Ok(Precondition::Version(version)),
            None => Err(bad("If-Match takes one version tag, like \"3\"")),
        },
        (None, None) => Ok(Precondition::None),
    }
}

async fn read_body(request: Request) -> Result<Bytes, Response> {
    read_body_max(request, VALUE_MAX, "values").await
}

async fn read_body_max(request: Request, max: usize, what: &str) -> Result<Bytes, Response> {
    let too_large = || {
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too-large",
            &format!("{what} are at most {max} bytes"),
        )
    };
    if let Some(len) = request.headers().get(header::CONTENT_LENGTH) {
        match len.to_str().ok().and_then(|l| l.parse::<u64>().ok()) {
            Some(len) if len > max as u64 => {
                // A client that is still sending would see the connection
                // reset instead of this answer: take a body up to a few
                // times the limit and drop it (as servers' lingering close
                // does); a larger one is cut off.
                if len <= 4 * max as u64 {
                    let _ = axum::body::to_bytes(request.into_body(), 4 * max).await;
                }
                return Err(too_large());
            }
            Some(_) => {}
            None => {
                return Err(error(
                    StatusCode::BAD_REQUEST,
                    "bad-request",
                    "bad Content-Length",
                ))
            }
        }
    }
    let body: Body = request.into_body();
    axum::body::to_bytes(body, max).await.map_err(|e| {
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
        while let Some(s) = source {
            if s.is::<http_body_util::LengthLimitError>() {
                return too_large();
            }
            source = s.source();
        }
        error(
            StatusCode::BAD_REQUEST,
            "bad-request",
            &format!("reading the body: {e}"),
        )
    })
}

fn written(c: &Completion, created_status: bool) -> Response {
    let Outcome::Done(current) = &c.outcome else {
        unreachable!()
    };
    let status = if created_status && c.trace.changed && c.trace.prior_absent {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let body = serde_json::json!({ "version": current.version, "changed": c.trace.changed });
    (
        status,
        [(header::ETAG, etag(current.version))],
        axum::Json(body),
    )
        .into_response()
}

async fn put_kv(
    State(app): State<App>,
    path: Result<Path<String>, axum::extract::rejection::PathRejection>,
    request: Request,
) -> Response {
    let key = match key_of(path) {
        Ok(k) => k,
        Err(r) => return r,
    };
    if let Err(r) = register_only(&app, &key) {
        return r;
    }
    let pre = match precondition(request.headers()) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let value = match read_body(request).await {
        Ok(b) => b.to_vec(),
        Err(r) => return r,
    };
    let command = match pre {
        Precondition::None => Command::Put(value),
        Precondition::Absent => Command::Create(value),
        Precondition::Version(expected) => Command::Cas { expected, value },
    };
    let c = match submit(&app, key, Operation::Command(command.encode())).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    unsuccessful(&c.outcome, Via::Http).unwrap_or_else(|| written(&c, true))
}

async fn delete_kv(
    State(app): State<App>,
    path: Result<Path<String>, axum::extract::rejection::PathRejection>,
    headers: HeaderMap,
) -> Response {
    let key = match key_of(path) {
        Ok(k) => k,
        Err(r) => return r,
    };
    if let Err(r) = register_only(&app, &key) {
        return r;
    }
    let command = match precondition(&headers) {
        Ok(Precondition::None) => Command::Delete,
        Ok(Precondition::Version(expected)) => Command::DeleteIf { expected },
        Ok(Precondition::Absent) => {
            return error(
                StatusCode::BAD_REQUEST,
                "bad-precondition",
                "If-None-Match has no meaning on DELETE",
            )
        }
        Err(r) => return r,
    };
    let c = match submit(&app, key, Operation::Command(command.encode())).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    if let Some(r) = unsuccessful(&c.outcome, Via::Http) {
        return r;
    }
    let Outcome::Done(current) = &c.outcome else {
        unreachable!()
    };
    if !c.trace.changed {
        let mut r = error(
            StatusCode::NOT_FOUND,
            "not-found",
            "the key has no value to delete",
        );
        r.headers_mut().insert(header::ETAG, etag(current.version));
        return r;
    }
    (
        StatusCode::NO_CONTENT,
        [(header::ETAG, etag(current.version))],
    )
        .into_response()
}

async fn post_kv(
    State(app): State<App>,
    path: Result<Path<String>, axum::extract::rejection::PathRejection>,
    request: Request,
) -> Response {
    let key = match key_of(path) {
        Ok(k) => k,
        Err(r) => return r,
    };
    let command = match read_body(request).await {
        Ok(b) => b.to_vec(),
        Err(r) => return r,
    };
    let c = match submit(&app, key, Operation::Command(command)).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    if let Some(r) = unsuccessful(&c.outcome, Via::Command) {
        return r;
    }
    let Outcome::Done(current) = &c.outcome else {
        unreachable!()
    };
    let mut body = current_json(current);
    body["changed"] = c.trace.changed.into();
    let status = if c.trace.changed && c.trace.prior_absent {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    (
        status,
        [(header::ETAG, etag(current.version))],
        axum::Json(body),
    )
        .into_response()
}

/// Checks the admin token of a request that changes components, bindings
/// or the protocol.
fn authorize(app: &App, headers: &HeaderMap) -> Result<(), Response> {
    let Some(expected) = &app.admin_token else {
        return Ok(());
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    // Compared in constant time: the token is a secret.
    let matches = given.is_some_and(|g| {
        g.len() == expected.len()
            && g.bytes()
                .zip(expected.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    });
    if matches {
        return Ok(());
    }
    let mut r = error(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "this change needs the replicas' admin token (--admin-token or BALLOT_ADMIN_TOKEN)",
    );
    r.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    Err(r)
}

/// The JSON body of an admin request, once its token checks out.
fn admin_body<T>(
    app: &App,
    headers: &HeaderMap,
    body: Result<axum::Json<T>, axum::extract::rejection::JsonRejection>,
) -> Result<T, Response> {
    authorize(app, headers)?;
    body.map(|axum::Json(b)| b)
        .map_err(|e| error(StatusCode::BAD_REQUEST, "bad-request", &e.body_text()))
}

fn change_error(e: ChangeError) -> Response {
    match e {
        ChangeError::Invalid(m) => error(StatusCode::BAD_REQUEST, "invalid-change", &m),
        ChangeError::Unavailable(m) => error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", &m),
    }
}

async fn members(State(app): State<App>) -> Response {
    match app.membership.view().await {
        Ok(view) => axum::Json(view).into_response(),
        Err(e) => change_error(e),
    }
}

/// A request to add a replica.
#[derive(Debug, Deserialize)]
struct AddMember {
    id: u32,
    /// Its QUIC address.
    peer: std::net::SocketAddr,
    /// Its client URL, for status displays.
    #[serde(default)]
    http: Option<String>,
}

async fn add_member(
    State(app): State<App>,
    headers: HeaderMap,
    body: Result<axum::Json<AddMember>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let add = match admin_body(&app, &headers, body) {
        Ok(a) => a,
        Err(r) => return r,
    };
    if add.id == 0 {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid-change",
            "replica ids start at 1",
        );
    }
    let change = Change {
        action: Action::Add,
        id: add.id,
        addr: Some(add.peer),
        http: add.http,
        requested_ms: crate::system::now_ms(),
    };
    queue_change(&app, change).await
}

/// Queues a membership change: 202 with the change as queued.
async fn queue_change(app: &App, change: Change) -> Response {
    match app.membership.request(change).await {
        Ok(queued) => (StatusCode::ACCEPTED, axum::Json(queued)).into_response(),
        Err(e) => change_error(e),
    }
}

async fn remove_member(
    State(app): State<App>,
    headers: HeaderMap,
    Path(id): Path<u32>,
) -> Response {
    if let Err(r) = authorize(&app, &headers) {
        return r;
    }
    let change = Change {
        action: Action::Remove,
        id,
        addr: None,
        http: None,
        requested_ms: crate::system::now_ms(),
    };
    queue_change(&app, change).await
}

fn registry_error(e: RegistryError, invalid_code: &str) -> Response {
    match e {
        RegistryError::Invalid(m) => error(StatusCode::BAD_REQUEST, invalid_code, &m),
        RegistryError::NotFound(m) => error(StatusCode::NOT_FOUND, "not-found", &m),
        RegistryError::Unavailable(m) => error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", &m),
    }
}

async fn list_components(State(app): State<App>) -> Response {
    match app.registry.config().await {
        Ok((version, config)) => {
            let components: Vec<serde_json::Value> = config
                .components
                .iter()
                .map(|c| {
                    let mut v = serde_json::to_value(c).expect("a record serialises");
                    let bound: Vec<&str> = config
                        .bindings
                        .iter()
                        .filter(|b| b.component == c.id)
                        .map(|b| b.prefix.as_str())
                        .collect();
                    v["bound"] = bound.into();
                    v
                })
                .collect();
            axum::Json(serde_json::json!({
                "config_version": version,
                "components": components,
            }))
            .into_response()
        }
        Err(e) => registry_error(e, "invalid"),
    }
}

async fn push_component(State(app): State<App>, request: Request) -> Response {
    if let Err(r) = authorize(&app, request.headers()) {
        return r;
    }
    let bytes = match read_body_max(request, COMPONENT_MAX, "components").await {
        Ok(b) => b.to_vec(),
        Err(r) => return r,
    };
    match app.registry.push(bytes).await {
        Ok((record, created)) => {
            let status = if created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            let body = serde_json::json!({ "component": record, "created": created });
            (status, axum::Json(body)).into_response()
        }
        Err(e) => registry_error(e, "invalid-component"),
    }
}

async fn list_policies(State(app): State<App>) -> Response {
    let applied = app.registry.applied();
    let bindings: Vec<serde_json::Value> = applied
        .config
        .bindings
        .iter()
        .map(|b| {
            let record = applied
                .config
                .components
                .iter()
                .find(|c| c.id == b.component);
            serde_json::json!({
                "prefix": b.prefix,
                "component": b.component,
                "name": record.map(|r| r.name.as_str()),
                "version": record.map(|r| r.version.as_str()),
                "bound_ms": b.bound_ms,
            })
        })
        .collect();
    axum::Json(serde_json::json!({
        "replica": (app.cluster)().id,
        "applied_version": applied.version,
        "error": applied.error,
        "bindings": bindings,
    }))
    .into_response()
}

#[derive(Deserialize)]
struct BindRequest {
    prefix: String,
    component: String,
}

async fn bind_policy(
    State(app): State<App>,
    headers: HeaderMap,
    body: Result<axum::Json<BindRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let req = match admin_body(&app, &headers, body) {
        Ok(b) => b,
        Err(r) => return r,
    };
    match app.registry.bind(&req.prefix, &req.component).await {
        Ok((version, binding, record)) => {
            let applied = app.registry.wait_applied(version, REQUEST_TIMEOUT).await;
            axum::Json(serde_json::json!({
                "config_version": version,
                "applied_here": applied,
                "binding": binding,
                "name": record.name,
                "version": record.version,
            }))
            .into_response()
        }
        Err(e) => registry_error(e, "invalid-binding"),
    }
}

#[derive(Deserialize)]
struct UnbindParams {
    prefix: String,
}

async fn unbind_policy(
    State(app): State<App>,
    headers: HeaderMap,
    params: Result<Query<UnbindParams>, axum::extract::rejection::QueryRejection>,
) -> Response {
    if let Err(r) = authorize(&app, &headers) {
        return r;
    }
    let Query(params) = match params {
        Ok(p) => p,
        Err(e) => return error(StatusCode::BAD_REQUEST, "bad-parameter", &e.body_text()),
    };
    match app.registry.unbind(&params.prefix).await {
        Ok(version) => {
            let applied = app.registry.wait_applied(version, REQUEST_TIMEOUT).await;
            axum::Json(serde_json::json!({ "config_version": version, "applied_here": applied }))
                .into_response()
        }
        Err(e) => registry_error(e, "invalid-binding"),
    }
}

async fn protocol_status(State(app): State<App>) -> Response {
    let running = app.registry.running();
    let mut body = serde_json::json!({
        "replica": (app.cluster)().id,
        "running": running,
        "embedded": app.registry.embedded_id(),
    });
    match app.registry.config().await {
        Ok((version, config)) => {
            body["config_version"] = version.into();
            body["active"] = config
                .protocol
                .active
                .clone()
                .unwrap_or_else(|| app.registry.embedded_id().to_string())
                .into();
            body["previous"] = serde_json::to_value(&config.protocol.previous).unwrap_or_default();
            body["pending"] = serde_json::to_value(&config.protocol.pending).unwrap_or_default();
            body["history"] = serde_json::to_value(&config.history).unwrap_or_default();
            body["components"] = serde_json::to_value(&config.components).unwrap_or_default();
        }
        Err(e) => body["config_error"] = e.to_string().into(),
    }
    axum::Json(body).into_response()
}

#[derive(Deserialize)]
struct ActivateRequest {
    component: String,
}

async fn swapped(app: &App, result: Result<(u64, String), RegistryError>) -> Response {
    match result {
        Ok((version, label)) => {
            let here = app.registry.wait_running(&label, REQUEST_TIMEOUT).await;
            axum::Json(serde_json::json!({
                "config_version": version,
                "active": label,
                "running_here": here,
            }))
            .into_response()
        }
        Err(e) => registry_error(e, "activation-refused"),
    }
}

async fn activate_protocol(
    State(app): State<App>,
    headers: HeaderMap,
    body: Result<axum::Json<ActivateRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let req = match admin_body(&app, &headers, body) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let target = (req.component != "embedded").then_some(req.component.as_str());
    let result = app.registry.activate(target, Swap::Activate).await;
    swapped(&app, result).await
}

async fn rollback_protocol(State(app): State<App>, headers: HeaderMap) -> Response {
    if let Err(r) = authorize(&app, &headers) {
        return r;
    }
    let result = app.registry.rollback().await;
    swapped(&app, result).await
}

async fn cluster(State(app): State<App>) -> Response {
    axum::Json((app.cluster)()).into_response()
}

async fn metrics(State(app): State<App>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
        )],
        app.metrics.render(),
    )
        .into_response()
}

fn starting() -> Response {
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "starting",
        "this replica is loading the cluster's component configuration (it needs a quorum)",
    )
}

/// Liveness: the process answers, and has not stopped on a fatal error.
async fn healthz(State(app): State<App>) -> Response {
    match app.health.fatal() {
        Some(reason) => error(StatusCode::SERVICE_UNAVAILABLE, "replica-stopped", &reason),
        None => (StatusCode::OK, "ok\n").into_response(),
    }
}

/// Readiness: the replica serves clients.
async fn readyz(State(app): State<App>) -> Response {
    match app.health.fatal() {
        Some(reason) => error(StatusCode::SERVICE_UNAVAILABLE, "replica-stopped", &reason),
        None if !app.registry.started() => starting(),
        None => (StatusCode::OK, "ready\n").into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etags_parse_quoted_or_bare() {
        assert_eq!(parse_etag("\"12\""), Some(12));
        assert_eq!(parse_etag(" 7 "), Some(7));
        assert_eq!(parse_etag("W/\"1\""), None);
        assert_eq!(parse_etag("\"x\""), None);
    }
}
