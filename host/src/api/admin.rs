//! The admin plane: membership (`/v1/cluster/members`), components
//! (`/v1/components`), policy bindings (`/v1/policies`) and protocol swaps
//! (`/v1/protocol`). Every change needs an admin credential
//! ([`super::access`]), and is refused outright on a replica that has none
//! configured (fail closed).

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::body::{body_timeout, read_body_max, timed_out};
use super::error::registry;
use super::{ApiError, App, REQUEST_TIMEOUT};
use crate::membership::{Action, MemberChange};
use crate::registry::{RegistryError, Swap, COMPONENT_MAX};

/// The JSON body of an admin request (authorised by [`super::access::admin`]).
pub(super) fn admin_body<T>(body: Result<axum::Json<T>, JsonRejection>) -> Result<T, ApiError> {
    body.map(|axum::Json(b)| b).map_err(|e| {
        if timed_out(&e) {
            body_timeout()
        } else {
            ApiError::bad_request("bad-request", e.body_text())
        }
    })
}

pub(super) async fn members(State(app): State<App>) -> Result<Response, ApiError> {
    Ok(axum::Json(app.membership.view().await?).into_response())
}

/// A request to add a replica.
#[derive(Debug, Deserialize)]
pub(super) struct AddMember {
    id: u32,
    /// Its QUIC address.
    peer: std::net::SocketAddr,
    /// Its client URL, shown in the status and named to clients in
    /// `Ballot-Leader`.
    #[serde(default)]
    http: Option<String>,
}

pub(super) async fn add_member(
    State(app): State<App>,
    body: Result<axum::Json<AddMember>, JsonRejection>,
) -> Result<Response, ApiError> {
    let add = admin_body(body)?;
    if add.id == 0 {
        return Err(ApiError::bad_request(
            "invalid-change",
            "replica ids start at 1",
        ));
    }
    if let Some(http) = add
        .http
        .as_deref()
        .filter(|u| !crate::membership::client_url_ok(u))
    {
        return Err(ApiError::bad_request(
            "invalid-change",
            format!(
                "http must be an http:// or https:// URL of at most {} visible ASCII bytes without credentials, not {:?}",
                crate::membership::CLIENT_URL_MAX,
                http.chars().take(64).collect::<String>()
            ),
        ));
    }
    let change = MemberChange {
        action: Action::Add,
        id: add.id,
        addr: Some(add.peer),
        http: add.http,
        requested_ms: crate::system::now_ms(),
    };
    queue_change(&app, change).await
}

/// Queues a membership change: 202 with the change as queued.
async fn queue_change(app: &App, change: MemberChange) -> Result<Response, ApiError> {
    let queued = app.membership.request(change).await?;
    Ok((StatusCode::ACCEPTED, axum::Json(queued)).into_response())
}

pub(super) async fn remove_member(
    State(app): State<App>,
    Path(id): Path<u32>,
) -> Result<Response, ApiError> {
    let change = MemberChange {
        action: Action::Remove,
        id,
        addr: None,
        http: None,
        requested_ms: crate::system::now_ms(),
    };
    queue_change(&app, change).await
}

pub(super) async fn list_components(State(app): State<App>) -> Result<Response, ApiError> {
    let (version, config) = app
        .registry
        .config()
        .await
        .map_err(|e| registry(e, "invalid"))?;
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
    Ok(axum::Json(serde_json::json!({
        "config_version": version,
        "components": components,
    }))
    .into_response())
}

pub(super) async fn push_component(
    State(app): State<App>,
    request: Request,
) -> Result<Response, ApiError> {
    let bytes = read_body_max(request, COMPONENT_MAX, "components")
        .await?
        .to_vec();
    let (record, created) = app
        .registry
        .push(bytes)
        .await
        .map_err(|e| registry(e, "invalid-component"))?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let body = serde_json::json!({ "component": record, "created": created });
    Ok((status, axum::Json(body)).into_response())
}

pub(super) async fn list_policies(State(app): State<App>) -> Response {
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
pub(super) struct BindRequest {
    prefix: String,
    component: String,
}

pub(super) async fn bind_policy(
    State(app): State<App>,
    body: Result<axum::Json<BindRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let req = admin_body(body)?;
    let (version, binding, record) = app
        .registry
        .bind(&req.prefix, &req.component)
        .await
        .map_err(|e| registry(e, "invalid-binding"))?;
    let applied = app.registry.wait_applied(version, REQUEST_TIMEOUT).await;
    Ok(axum::Json(serde_json::json!({
        "config_version": version,
        "applied_here": applied,
        "binding": binding,
        "name": record.name,
        "version": record.version,
    }))
    .into_response())
}

#[derive(Deserialize)]
pub(super) struct UnbindParams {
    prefix: String,
}

pub(super) async fn unbind_policy(
    State(app): State<App>,
    params: Result<Query<UnbindParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(params) =
        params.map_err(|e| ApiError::bad_request("bad-parameter", e.body_text()))?;
    let version = app
        .registry
        .unbind(&params.prefix)
        .await
        .map_err(|e| registry(e, "invalid-binding"))?;
    let applied = app.registry.wait_applied(version, REQUEST_TIMEOUT).await;
    Ok(
        axum::Json(serde_json::json!({ "config_version": version, "applied_here": applied }))
            .into_response(),
    )
}

pub(super) async fn protocol_status(State(app): State<App>) -> Response {
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
pub(super) struct ActivateRequest {
    component: String,
}

/// The answer to an activation or rollback: the agreed configuration
/// version, and whether this replica runs the new protocol yet.
async fn swapped(
    app: &App,
    result: Result<(u64, String), RegistryError>,
) -> Result<Response, ApiError> {
    let (version, label) = result.map_err(|e| registry(e, "activation-refused"))?;
    let here = app.registry.wait_running(&label, REQUEST_TIMEOUT).await;
    Ok(axum::Json(serde_json::json!({
        "config_version": version,
        "active": label,
        "running_here": here,
    }))
    .into_response())
}

pub(super) async fn activate_protocol(
    State(app): State<App>,
    body: Result<axum::Json<ActivateRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let req = admin_body(body)?;
    let target = (req.component != "embedded").then_some(req.component.as_str());
    let result = app.registry.activate(target, Swap::Activate).await;
    swapped(&app, result).await
}

pub(super) async fn rollback_protocol(State(app): State<App>) -> Result<Response, ApiError> {
    let result = app.registry.rollback().await;
    swapped(&app, result).await
}
