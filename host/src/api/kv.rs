//! `/v1/kv/{key}`: the data path. Each handler checks the request, turns
//! it into one operation of the key's policy, hands it to the core
//! ([`submit`]) and maps the outcome to an answer.

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use ballot_core::register::Command;
use ballot_core::{Completion, Consistency, FailureReason, Operation, Outcome};
use serde::Deserialize;
use tokio::sync::oneshot;

use super::body::{current_json, etag, parse_etag, read_body};
use super::{starting, ApiError, App, REQUEST_TIMEOUT};
use crate::node::{ClientRequest, KEY_MAX};

type KeyPath = Result<Path<String>, PathRejection>;

fn key_of(path: KeyPath) -> Result<Vec<u8>, ApiError> {
    let Path(key) = path.map_err(|e| ApiError::bad_request("bad-key", e.body_text()))?;
    if key.is_empty() || key.len() > KEY_MAX {
        return Err(ApiError::bad_request(
            "bad-key",
            format!("keys must be 1 to {KEY_MAX} bytes, got {}", key.len()),
        ));
    }
    if key.starts_with('\0') {
        return Err(ApiError::bad_request(
            "bad-key",
            "keys beginning with a NUL byte belong to the cluster",
        ));
    }
    Ok(key.into_bytes())
}

/// Names the key's leader on every `/v1/kv` answer of a replica that
/// forwards the key's commands (see `node::Leaders`): a client that sends
/// the key's next requests there saves a hop between replicas each way.
pub(super) async fn leader_hint(
    State(app): State<App>,
    path: KeyPath,
    request: Request,
    next: axum::middleware::Next,
) -> Response {
    let mut response = next.run(request).await;
    // A key the data path refuses (the cluster's own, beginning with NUL)
    // gets no hint.
    let Ok(key) = key_of(path) else {
        return response;
    };
    let url = app
        .leaders
        .get(&key)
        .and_then(|id| app.membership.http_of(id))
        .filter(|url| crate::membership::client_url_ok(url))
        .and_then(|url| HeaderValue::from_str(&url).ok());
    if let Some(url) = url {
        response.headers_mut().insert(
            header::HeaderName::from_static(crate::client::LEADER_HEADER),
            url,
        );
    }
    response
}

/// PUT and DELETE speak the register's commands; a key bound to another
/// policy takes its own commands through POST.
fn register_only(app: &App, key: &[u8]) -> Result<(), ApiError> {
    match app.registry.binding_for(key) {
        None => Ok(()),
        Some((binding, record)) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "policy-bound",
            format!(
                "keys under {:?} are governed by policy {} {}: send its commands with POST",
                binding.prefix, record.name, record.version
            ),
        )),
    }
}

/// Hands one operation to the core and waits for its completion, at most
/// [`REQUEST_TIMEOUT`].
async fn submit(app: &App, key: Vec<u8>, op: Operation) -> Result<Completion, ApiError> {
    if let Some(reason) = app.health.fatal() {
        return Err(ApiError::unavailable(
            "replica-stopped",
            format!("this replica stopped answering: {reason}"),
        ));
    }
    if !app.registry.started() {
        return Err(starting());
    }
    if !matches!(op, Operation::Read(Consistency::Local)) && !app.membership.reaches_quorum() {
        return Err(ApiError::unavailable(
            "no-quorum",
            "this replica reaches no quorum of the voters: its links to them are down",
        )
        .with("maybe_applied", false)
        .header(header::RETRY_AFTER, HeaderValue::from_static("1")));
    }
    let overloaded = |what: &str| {
        ApiError::unavailable(
            "overloaded",
            format!("too many {what} queued on this replica"),
        )
        .header(header::RETRY_AFTER, HeaderValue::from_static("1"))
    };
    let Some(charge) = app.request_bytes.charge(crate::node::op_bytes(&key, &op)) else {
        return Err(overloaded("bytes of requests"));
    };
    let (reply, done) = oneshot::channel();
    let request = ClientRequest {
        key,
        op,
        reply,
        charge: Some(charge),
    };
    if app.requests.try_send(request).is_err() {
        return Err(overloaded("requests"));
    }
    match tokio::time::timeout(REQUEST_TIMEOUT, done).await {
        Ok(Ok(c)) => Ok(c),
        // The core had the request: it may have taken effect.
        Ok(Err(_)) => Err(ApiError::unavailable(
            "replica-stopped",
            "the replica stopped before answering; the write may still take effect",
        )
        .with("maybe_applied", true)),
        Err(_) => Err(ApiError::unavailable(
            "timeout",
            "no answer from the cluster in time; the write may still take effect",
        )
        .with("maybe_applied", true)),
    }
}

/// How a command reached the policy.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Via {
    /// PUT or DELETE: register commands built from HTTP preconditions.
    Http,
    /// POST: the client's own command for the key's policy.
    Command,
}

/// The current value of a completion that succeeded; the error answer of
/// one that did not.
fn done(c: &Completion, via: Via) -> Result<&ballot_core::Current, ApiError> {
    match &c.outcome {
        Outcome::Done(current) => Ok(current),
        Outcome::Rejected(rejection, current) => {
            let status = match (rejection.code.as_str(), via) {
                (crate::runtime::POLICY_FAILED, _) => StatusCode::INTERNAL_SERVER_ERROR,
                (_, Via::Command) => StatusCode::CONFLICT,
                ("version-mismatch" | "conflict", Via::Http) => StatusCode::PRECONDITION_FAILED,
                ("invalid-command", Via::Http) => StatusCode::BAD_REQUEST,
                (_, Via::Http) => StatusCode::CONFLICT,
            };
            Err(
                ApiError::new(status, &rejection.code, rejection.message.clone())
                    .with("current", current_json(current))
                    .etag(current.version),
            )
        }
        Outcome::Failed(f) => {
            let (status, code) = match f.reason {
                FailureReason::NoQuorum => (StatusCode::SERVICE_UNAVAILABLE, "no-quorum"),
                FailureReason::Contention => (StatusCode::SERVICE_UNAVAILABLE, "contention"),
                FailureReason::Overloaded => (StatusCode::SERVICE_UNAVAILABLE, "overloaded"),
                FailureReason::Invalid => (StatusCode::BAD_REQUEST, "invalid"),
                FailureReason::Interrupted => (StatusCode::SERVICE_UNAVAILABLE, "interrupted"),
            };
            Err(ApiError::new(status, code, f.message.clone())
                .with("maybe_applied", f.maybe_applied))
        }
    }
}

#[derive(Deserialize)]
pub(super) struct ReadParams {
    consistency: Option<String>,
}

pub(super) async fn get_kv(
    State(app): State<App>,
    path: KeyPath,
    params: Result<Query<ReadParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let key = key_of(path)?;
    let consistency = match params.as_ref().map(|q| q.consistency.as_deref()) {
        Ok(None | Some("linearizable")) => Consistency::Linearizable,
        Ok(Some("local")) => Consistency::Local,
        Ok(Some(other)) => {
            return Err(ApiError::bad_request(
                "bad-parameter",
                format!("consistency must be linearizable or local, not {other:?}"),
            ))
        }
        Err(e) => return Err(ApiError::bad_request("bad-parameter", e.body_text())),
    };
    let c = submit(&app, key, Operation::Read(consistency)).await?;
    done(&c, Via::Http)?;
    let Outcome::Done(current) = c.outcome else {
        unreachable!("done() passed it")
    };
    match current.value {
        Some(value) => Ok((
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
            .into_response()),
        None => {
            let absent = ApiError::not_found("the key has no value");
            Err(if current.version > 0 {
                absent.etag(current.version)
            } else {
                absent
            })
        }
    }
}

enum Precondition {
    None,
    Absent,
    Version(u64),
}

fn precondition(headers: &HeaderMap) -> Result<Precondition, ApiError> {
    let bad = |m: &str| ApiError::bad_request("bad-precondition", m);
    let one = |name: header::HeaderName| -> Result<Option<String>, ApiError> {
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

/// 201 when the write created the key, else 200; `{"version","changed"}`.
fn written(c: &Completion, current: &ballot_core::Current) -> Response {
    let status = if c.trace.changed && c.trace.prior_absent {
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

pub(super) async fn put_kv(
    State(app): State<App>,
    path: KeyPath,
    request: Request,
) -> Result<Response, ApiError> {
    let key = key_of(path)?;
    register_only(&app, &key)?;
    let pre = precondition(request.headers())?;
    let lease = Query::<PutParams>::try_from_uri(request.uri())
        .map_err(|e| ApiError::bad_request("bad-parameter", e.body_text()))?
        .0
        .lease
        .as_deref()
        .map(super::leases::lease_id)
        .transpose()?;
    let value = read_body(request).await?.to_vec();
    let lease = match lease {
        None => None,
        Some(id) => {
            if !app.registry.started() {
                return Err(starting());
            }
            Some((id, app.leases.begin_attach(id, &key, &value).await?))
        }
    };
    let command = match pre {
        Precondition::None => Command::Put(value),
        Precondition::Absent => Command::Create(value),
        Precondition::Version(expected) => Command::Cas { expected, value },
    };
    let c = match submit(&app, key.clone(), Operation::Command(command.encode())).await {
        Ok(c) => c,
        Err(e) => {
            // The write certainly did not happen: the key leaves the lease.
            if let Some((id, write)) = lease.filter(|_| !e.maybe_applied()) {
                app.leases.abandon(id, &key, write).await;
            }
            return Err(e);
        }
    };
    if let Some((id, write)) = lease {
        attach(&app, id, &key, write, &c).await?;
    }
    let current = done(&c, Via::Http)?;
    Ok(written(&c, current))
}

#[derive(Deserialize)]
pub(super) struct PutParams {
    lease: Option<String>,
}

/// After a write with `?lease=ID`: the key stays attached at the version
/// written, or leaves the lease if the write was refused or certainly did
/// not happen. If the lease ended meanwhile, the write is undone and the
/// answer is 404; a create that found the key holding its value at a
/// version another write made is 409 `not-attached`; if the lease could
/// not be updated, 503 with `maybe_applied` (the write took effect; the
/// sweep deletes the key at the lease's end if it holds the value). A write
/// whose fate is unknown stays attached by its value's digest.
async fn attach(
    app: &App,
    id: u64,
    key: &[u8],
    write: crate::leases::Pending,
    c: &Completion,
) -> Result<(), ApiError> {
    use crate::leases::LeaseError;
    match &c.outcome {
        Outcome::Done(current) => {
            let attached = app
                .leases
                .attached(id, key, write, current.version, c.trace.changed)
                .await;
            match attached {
                Ok(()) => Ok(()),
                Err(LeaseError::Gone(_)) => Err(ApiError::new(
                    StatusCode::NOT_FOUND,
                    "lease-not-found",
                    if c.trace.changed {
                        format!(
                            "lease {id:016x} ended before the write was attached to it; \
                             the write was undone"
                        )
                    } else {
                        format!(
                            "lease {id:016x} ended before the key was attached to it; the key \
                             already held this value and keeps it"
                        )
                    },
                )),
                Err(LeaseError::Unavailable(m)) => Err(ApiError::unavailable(
                    "unavailable",
                    format!(
                        "the write took effect at version {}, but attaching it to lease \
                         {id:016x} could not be confirmed ({m}); read the key and the lease",
                        current.version
                    ),
                )
                .with("maybe_applied", true)),
                Err(e) => Err(e.into()),
            }
        }
        Outcome::Rejected(..) => {
            app.leases.abandon(id, key, write).await;
            Ok(())
        }
        Outcome::Failed(f) if !f.maybe_applied => {
            app.leases.abandon(id, key, write).await;
            Ok(())
        }
        Outcome::Failed(_) => Ok(()),
    }
}

pub(super) async fn delete_kv(
    State(app): State<App>,
    path: KeyPath,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let key = key_of(path)?;
    register_only(&app, &key)?;
    let command = match precondition(&headers)? {
        Precondition::None => Command::Delete,
        Precondition::Version(expected) => Command::DeleteIf { expected },
        Precondition::Absent => {
            return Err(ApiError::bad_request(
                "bad-precondition",
                "If-None-Match has no meaning on DELETE",
            ))
        }
    };
    let c = submit(&app, key, Operation::Command(command.encode())).await?;
    let current = done(&c, Via::Http)?;
    if !c.trace.changed {
        return Err(ApiError::not_found("the key has no value to delete").etag(current.version));
    }
    Ok((
        StatusCode::NO_CONTENT,
        [(header::ETAG, etag(current.version))],
    )
        .into_response())
}

pub(super) async fn post_kv(
    State(app): State<App>,
    path: KeyPath,
    request: Request,
) -> Result<Response, ApiError> {
    let key = key_of(path)?;
    let command = read_body(request).await?.to_vec();
    let c = submit(&app, key, Operation::Command(command)).await?;
    let current = done(&c, Via::Command)?;
    let mut body = current_json(current);
    body["changed"] = c.trace.changed.into();
    let status = if c.trace.changed && c.trace.prior_absent {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((
        status,
        [(header::ETAG, etag(current.version))],
        axum::Json(body),
    )
        .into_response())
}

/// A key prefix from a query: the cluster's own keys (beginning with NUL)
/// are not the clients'.
pub(super) fn check_prefix(prefix: &str) -> Result<(), ApiError> {
    if prefix.starts_with('\0') || prefix.len() > KEY_MAX {
        return Err(ApiError::bad_request(
            "bad-parameter",
            format!("a prefix is at most {KEY_MAX} bytes and does not begin with a NUL byte"),
        ));
    }
    Ok(())
}

/// Keys a listing returns per page, by default and at most.
const LIST_DEFAULT: usize = 100;
const LIST_MAX: usize = 1000;
/// Reads one listing keeps in flight.
const LIST_READS: usize = 32;

#[derive(Deserialize)]
pub(super) struct ListParams {
    #[serde(default)]
    prefix: String,
    after: Option<String>,
    limit: Option<usize>,
    consistency: Option<String>,
}

/// `GET /v1/kv?prefix=P&limit=N&after=K`: the keys under a prefix that
/// have a value, in key order, with their values and versions, a page at a
/// time. By default every key written before the request began is listed
/// (the keys a classic quorum of voters hold, `membership::listing`) with
/// its value read linearizably; `consistency=local` lists this replica's
/// own copy. Keys with no value (deleted, or never written) are left out.
pub(super) async fn list_kv(
    State(app): State<App>,
    request: Request,
) -> Result<Response, ApiError> {
    let params = Query::<ListParams>::try_from_uri(request.uri())
        .map_err(|e| ApiError::bad_request("bad-parameter", e.body_text()))?
        .0;
    super::access::check_request(&app, super::access::Need::Read(&params.prefix), &request)?;
    check_prefix(&params.prefix)?;
    let consistency = match params.consistency.as_deref() {
        None | Some("linearizable") => Consistency::Linearizable,
        Some("local") => Consistency::Local,
        Some(other) => {
            return Err(ApiError::bad_request(
                "bad-parameter",
                format!("consistency must be linearizable or local, not {other:?}"),
            ))
        }
    };
    let limit = params.limit.unwrap_or(LIST_DEFAULT).clamp(1, LIST_MAX);
    if !app.registry.started() {
        return Err(starting());
    }
    let (prefix, after) = (
        params.prefix.as_bytes(),
        params.after.as_deref().map(str::as_bytes),
    );
    let page = match consistency {
        Consistency::Local => app.membership.list_local_keys(prefix, after, limit),
        Consistency::Linearizable => app.membership.list_keys(prefix, after, limit).await,
    }
    .map_err(|e| ApiError::unavailable("no-quorum", format!("listing the keys: {e}")))?;
    // At most LIST_READS reads in flight per listing, so one listing does
    // not fill the request queue every client shares.
    let mut reads = tokio::task::JoinSet::new();
    let mut keys = page.keys.iter().cloned().enumerate();
    let mut found: Vec<Option<serde_json::Value>> = vec![None; page.keys.len()];
    loop {
        while reads.len() < LIST_READS {
            let Some((i, key)) = keys.next() else { break };
            let app = app.clone();
            reads.spawn(async move { (i, submit(&app, key, Operation::Read(consistency)).await) });
        }
        let Some(read) = reads.join_next().await else {
            break;
        };
        let (i, c) = read.map_err(|e| ApiError::unavailable("interrupted", e.to_string()))?;
        let c = c?;
        let current = done(&c, Via::Http)?;
        if current.value.is_some() {
            let mut item = current_json(current);
            item["key"] = String::from_utf8_lossy(&page.keys[i]).into_owned().into();
            found[i] = Some(item);
        }
    }
    let next = page
        .next
        .map(|k| serde_json::Value::from(String::from_utf8_lossy(&k).into_owned()));
    Ok(axum::Json(serde_json::json!({
        "items": found.into_iter().flatten().collect::<Vec<_>>(),
        "next": next,
    }))
    .into_response())
}
