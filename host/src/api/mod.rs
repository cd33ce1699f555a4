//! The client API: HTTP/1.1 and JSON, conventional semantics.
//!
//! | request | meaning |
//! |---|---|
//! | `GET /v1/kv?prefix=P&limit=N&after=K` | the keys under `P` that have a value, with values and versions, a page at a time; `?consistency=local` lists this replica's copy |
//! | `GET /v1/watch?prefix=P&from=SEQ` (or `key=K`) | commits this replica learns, as Server-Sent Events (see `watch`) |
//! | `GET /v1/kv/{key}` | value and `ETag: "<version>"`; 404 if absent. `?consistency=local` reads this replica's copy |
//! | `PUT /v1/kv/{key}` | set; `If-None-Match: *` creates only, `If-Match: "<v>"` compares and swaps; `?lease=ID` attaches the key to a lease |
//! | `POST /v1/leases`, `GET`/`DELETE /v1/leases/{id}`, `POST /v1/leases/{id}/keepalive` | grant `{"ttl_ms"}`, show, revoke, keep alive a lease (see `leases`) |
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
//!
//! `kv` holds the data path, `admin` the admin plane, `error` the one error
//! shape ([`ApiError`]), `body` the byte limits on bodies, `conn` the bounds
//! on connections (how many, how long idle), `access` who may do what
//! (roles, key prefixes); the health endpoints are here.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::Router;
use tokio::sync::mpsc;

use crate::membership::Membership;
use crate::metrics::Metrics;
use crate::node::{Budget, ClientRequest, Health};
use crate::registry::Registry;

pub mod access;
mod admin;
mod body;
pub mod conn;
mod error;
mod kv;
mod leases;
pub mod watch;

pub use crate::runtime::VALUE_MAX;
pub use access::{Access, Grant, Role};
pub use body::BODY as BODY_DEADLINE;
pub use error::ApiError;
/// Longest a request waits for the cluster.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

pub use ballot_client::views::{ClusterView, ComponentView, ReplicaView};

/// What the handlers share: a handle on [`AppState`], cheap to clone
/// (axum clones it for every extractor and middleware of every request).
#[derive(Clone)]
pub struct App(Arc<AppState>);

impl App {
    pub fn new(state: AppState) -> App {
        App(Arc::new(state))
    }
}

impl std::ops::Deref for App {
    type Target = AppState;

    fn deref(&self) -> &AppState {
        &self.0
    }
}

/// The handlers' shared state.
pub struct AppState {
    pub requests: mpsc::Sender<ClientRequest>,
    /// The byte budget of `requests`.
    pub request_bytes: Budget,
    pub health: Arc<Health>,
    pub metrics: Arc<Metrics>,
    /// Builds the cluster view on demand (link states change).
    pub cluster: Arc<dyn Fn() -> ClusterView + Send + Sync>,
    pub registry: Arc<Registry>,
    pub membership: Arc<Membership>,
    /// Who may read and write which keys, read the views, and make admin
    /// changes.
    pub access: Arc<Access>,
    /// How long a request body may take to arrive after its head.
    pub body_deadline: Duration,
    /// The replica's storage, read by watchers (its changelog).
    pub storage: crate::storage::Storage,
    /// Watchers served at once, at most [`watch::WATCHERS_MAX`].
    pub watchers: Arc<tokio::sync::Semaphore>,
    /// How often a watcher's stream sends a heartbeat: under the idle
    /// limit, so a quiet watcher is not closed as idle.
    pub heartbeat: Duration,
    /// Set when the replica begins to shut down: watchers end.
    pub closing: Arc<std::sync::atomic::AtomicBool>,
    /// Lease requests, through this replica's core.
    pub leases: Arc<crate::leases::Leases>,
    /// Which replica leads a key, as far as this one can tell.
    pub leaders: Arc<crate::node::Leaders>,
}

/// The router.
pub fn router(app: App) -> Router {
    Router::new()
        .route(
            "/v1/kv/{*key}",
            get(kv::get_kv)
                .put(kv::put_kv)
                .delete(kv::delete_kv)
                .post(kv::post_kv)
                // Inside the access check: only a client the key is open
                // to learns who leads it.
                .route_layer(axum::middleware::from_fn_with_state(
                    app.clone(),
                    kv::leader_hint,
                ))
                .route_layer(axum::middleware::from_fn_with_state(
                    app.clone(),
                    access::data,
                )),
        )
        .route("/v1/kv", get(kv::list_kv))
        .route("/v1/watch", get(watch::watch))
        .merge(lease_routes(app.clone()))
        .merge(admin_routes(app.clone()))
        .route(
            "/v1/cluster",
            get(cluster).route_layer(axum::middleware::from_fn_with_state(
                app.clone(),
                access::view,
            )),
        )
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .fallback(|| async { ApiError::not_found("no such endpoint") })
        .layer(axum::middleware::from_fn_with_state(
            app.body_deadline
                .clamp(body::BODY_RANGE.0, body::BODY_RANGE.1),
            body::deadline,
        ))
        .with_state(app)
}

/// Leases, behind [`access::lease`].
fn lease_routes(app: App) -> Router<App> {
    Router::new()
        .route("/v1/leases", post(leases::grant))
        .route("/v1/leases/{id}", get(leases::show).delete(leases::revoke))
        .route("/v1/leases/{id}/keepalive", post(leases::keepalive))
        .route_layer(axum::middleware::from_fn_with_state(app, access::lease))
}

/// The admin plane, behind [`access::admin`].
fn admin_routes(app: App) -> Router<App> {
    Router::new()
        .route(
            "/v1/components",
            get(admin::list_components).post(admin::push_component),
        )
        .route(
            "/v1/policies",
            get(admin::list_policies)
                .post(admin::bind_policy)
                .delete(admin::unbind_policy),
        )
        .route("/v1/protocol", get(admin::protocol_status))
        .route("/v1/protocol/activate", post(admin::activate_protocol))
        .route("/v1/protocol/rollback", post(admin::rollback_protocol))
        .route(
            "/v1/cluster/members",
            get(admin::members).post(admin::add_member),
        )
        .route("/v1/cluster/members/{id}", delete(admin::remove_member))
        .route_layer(axum::middleware::from_fn_with_state(app, access::admin))
}

async fn cluster(State(app): State<App>) -> Response {
    axum::Json((app.cluster)()).into_response()
}

async fn metrics(State(app): State<App>) -> Response {
    let (records, bytes) = app.storage.log_backlog();
    app.metrics.log_unapplied_records.set(records as i64);
    app.metrics.log_unapplied_bytes.set(bytes as i64);
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
        )],
        app.metrics.render(),
    )
        .into_response()
}

fn starting() -> ApiError {
    ApiError::unavailable(
        "starting",
        "this replica is loading the cluster's component configuration (it needs a quorum)",
    )
}

/// Liveness: the process answers, and has not stopped on a fatal error.
async fn healthz(State(app): State<App>) -> Response {
    match app.health.fatal() {
        Some(reason) => ApiError::unavailable("replica-stopped", reason).into_response(),
        None => (StatusCode::OK, "ok\n").into_response(),
    }
}

/// Readiness: the replica serves clients.
async fn readyz(State(app): State<App>) -> Response {
    match app.health.fatal() {
        Some(reason) => ApiError::unavailable("replica-stopped", reason).into_response(),
        None if !app.registry.started() => starting().into_response(),
        None => (StatusCode::OK, "ready\n").into_response(),
    }
}
