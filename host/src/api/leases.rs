//! `/v1/leases`: grant, keep alive, revoke and show leases
//! (`crate::leases`). Keys are attached with `PUT /v1/kv/{key}?lease=ID`
//! (`kv::put_kv`).

use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use ballot_control::lease::{TTL_MAX_MS, TTL_MIN_MS};
use serde::Deserialize;

use super::admin::admin_body;
use super::{starting, ApiError, App};
use crate::leases::{attached_version, parse_id, LeaseError, Shown};

impl From<LeaseError> for ApiError {
    fn from(e: LeaseError) -> ApiError {
        match e {
            LeaseError::Gone(_) => {
                ApiError::new(StatusCode::NOT_FOUND, "lease-not-found", e.to_string())
            }
            LeaseError::Full(_) => ApiError::new(StatusCode::CONFLICT, "lease-full", e.to_string()),
            LeaseError::NotAttached(..) => {
                ApiError::new(StatusCode::CONFLICT, "not-attached", e.to_string())
            }
            LeaseError::Damaged(_) => ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "lease-damaged",
                e.to_string(),
            ),
            // A grant, keepalive or revoke that failed this way may still
            // have taken effect.
            LeaseError::Unavailable(m) => {
                ApiError::unavailable("unavailable", m).with("maybe_applied", true)
            }
        }
    }
}

/// A lease id from a path or a query: 16 hex digits.
pub(super) fn lease_id(text: &str) -> Result<u64, ApiError> {
    parse_id(text).ok_or_else(|| {
        ApiError::bad_request(
            "bad-lease",
            format!("a lease id is 16 hex digits, not {text:?}"),
        )
    })
}

fn id_of(path: Result<Path<String>, PathRejection>) -> Result<u64, ApiError> {
    let Path(id) = path.map_err(|e| ApiError::bad_request("bad-lease", e.body_text()))?;
    lease_id(&id)
}

fn ready(app: &App) -> Result<(), ApiError> {
    if !app.registry.started() {
        return Err(starting());
    }
    Ok(())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Grant {
    ttl_ms: u64,
}

fn shown(s: &Shown) -> serde_json::Value {
    serde_json::json!({ "id": format!("{:016x}", s.id), "ttl_ms": s.lease.ttl_ms })
}

/// `POST /v1/leases {"ttl_ms":N}`: 201 `{"id","ttl_ms"}`.
pub(super) async fn grant(
    State(app): State<App>,
    body: Result<axum::Json<Grant>, JsonRejection>,
) -> Result<Response, ApiError> {
    let ttl_ms = admin_body(body)?.ttl_ms;
    if !(TTL_MIN_MS..=TTL_MAX_MS).contains(&ttl_ms) {
        return Err(ApiError::bad_request(
            "bad-ttl",
            format!("ttl_ms must be {TTL_MIN_MS} to {TTL_MAX_MS}, not {ttl_ms}"),
        ));
    }
    ready(&app)?;
    let s = app.leases.grant(ttl_ms).await?;
    Ok((StatusCode::CREATED, axum::Json(shown(&s))).into_response())
}

/// `POST /v1/leases/{id}/keepalive`: `{"id","ttl_ms"}`; 404 once ended.
pub(super) async fn keepalive(
    State(app): State<App>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let id = id_of(path)?;
    ready(&app)?;
    let s = app.leases.keepalive(id).await?;
    Ok(axum::Json(shown(&s)).into_response())
}

/// `GET /v1/leases/{id}`: `{"id","ttl_ms","ended","keys":[{"key","version"}]}`
/// (`version` null while the key's write is under way).
pub(super) async fn show(
    State(app): State<App>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let id = id_of(path)?;
    ready(&app)?;
    let s = app.leases.show(id).await?;
    let mut body = shown(&s);
    body["ended"] = s.lease.ended.into();
    body["keys"] = s
        .lease
        .keys
        .iter()
        .map(|(key, a)| {
            serde_json::json!({
                "key": String::from_utf8_lossy(key),
                "version": attached_version(a),
            })
        })
        .collect();
    Ok(axum::Json(body).into_response())
}

/// `DELETE /v1/leases/{id}`: ends it and deletes its keys;
/// `{"id","deleted":N}`.
pub(super) async fn revoke(
    State(app): State<App>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let id = id_of(path)?;
    ready(&app)?;
    let deleted = app.leases.revoke(id).await?;
    Ok(
        axum::Json(serde_json::json!({ "id": format!("{id:016x}"), "deleted": deleted }))
            .into_response(),
    )
}
