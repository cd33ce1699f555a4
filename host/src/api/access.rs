//! Who may do what: credentials (a bearer token, or the verified client
//! certificate of the connection) mapped to roles, optionally limited to key
//! prefixes.
//!
//! | role | may |
//! |---|---|
//! | `read` | `GET` keys under its prefixes; read the cluster, component, policy, protocol and member views |
//! | `write` | what `read` may, and `PUT`, `DELETE`, `POST` keys under its prefixes |
//! | `admin` | everything: every key, and the admin plane (components, policies, protocol, membership) |
//!
//! With no grant configured the data plane is open (any client that
//! reaches the port reads and writes every key, as etcd without auth); with
//! one or more, every key request and every view needs a credential that a
//! grant covers. The admin plane is always closed without an admin
//! credential: the admin token and `admin_clients` are admin grants. Tokens
//! are held as their SHA-256 only and compared in constant time; no
//! credential is ever logged or echoed.

use axum::extract::{ConnectInfo, Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::body::discard_body;
use super::conn::Activity;
use super::{ApiError, App};
use crate::registry::COMPONENT_MAX;

/// What a grant lets its holder do; each role includes the ones before it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Read,
    Write,
    Admin,
}

/// One `[[grants]]` entry of a replica's configuration.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grant {
    /// A client certificate name (`ballot cert client NAME`); needs
    /// `api_tls.client_ca`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
    /// The SHA-256 of a bearer token, 64 hex digits (`ballot token`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_sha256: Option<String>,
    pub role: Role,
    /// Keys this grant covers: those beginning with one of these. Empty
    /// (the default) is every key. Not allowed with `admin`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prefixes: Vec<String>,
}

/// Who a grant is for.
#[derive(Clone, Debug)]
enum Holder {
    Client(String),
    Token([u8; 32]),
}

#[derive(Clone, Debug)]
struct Rule {
    holder: Holder,
    role: Role,
    prefixes: Vec<String>,
}

/// The grants a replica enforces, checked and compiled from its
/// configuration.
#[derive(Clone, Debug, Default)]
pub struct Access {
    rules: Vec<Rule>,
    /// No `[[grants]]` configured: keys and views need no credential.
    open: bool,
}

/// What a request needs.
#[derive(Clone, Copy, Debug)]
pub enum Need<'a> {
    /// Reading this key.
    Read(&'a str),
    /// Changing this key.
    Write(&'a str),
    /// Reading a view of the cluster, its components, policies or members.
    View,
    /// A change to components, policies, the protocol or the membership.
    Admin,
    /// Granting, keeping alive, revoking or reading a lease: any grant
    /// that may write some key (attaching a key needs its write grant too).
    Lease,
}

/// The SHA-256 of a token, as a grant holds it.
pub fn token_sha256(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

fn parse_hex32(text: &str) -> Option<[u8; 32]> {
    let text = text.trim();
    if text.len() != 64 || !text.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// Equal in time that depends on the length only.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Access {
    /// Compiles the configuration's grants, with the admin token and the
    /// `admin_clients` as admin grants. `client_certificates` says whether
    /// the client listener verifies client certificates.
    pub fn new(
        grants: &[Grant],
        admin_token: Option<&str>,
        admin_clients: &[String],
        client_certificates: bool,
    ) -> Result<Access, String> {
        let mut rules = Vec::new();
        for (i, grant) in grants.iter().enumerate() {
            let at = format!("grants[{i}]");
            let holder = match (&grant.client, &grant.token_sha256) {
                (Some(name), None) => {
                    if name.is_empty() {
                        return Err(format!("{at}: client is empty"));
                    }
                    if !client_certificates {
                        return Err(format!(
                            "{at}: a grant to a client certificate needs api_tls.client_ca \
                             to verify client certificates against"
                        ));
                    }
                    Holder::Client(name.clone())
                }
                (None, Some(hash)) => Holder::Token(parse_hex32(hash).ok_or_else(|| {
                    format!("{at}: token_sha256 must be 64 hex digits (`ballot token` prints it)")
                })?),
                _ => return Err(format!("{at}: give exactly one of client or token_sha256")),
            };
            if grant.role == Role::Admin && !grant.prefixes.is_empty() {
                return Err(format!(
                    "{at}: an admin grant covers every key; prefixes apply to read and write"
                ));
            }
            rules.push(Rule {
                holder,
                role: grant.role,
                prefixes: grant.prefixes.clone(),
            });
        }
        let open = rules.is_empty();
        if let Some(token) = admin_token.map(str::trim).filter(|t| !t.is_empty()) {
            rules.push(Rule {
                holder: Holder::Token(token_sha256(token)),
                role: Role::Admin,
                prefixes: Vec::new(),
            });
        }
        for name in admin_clients {
            rules.push(Rule {
                holder: Holder::Client(name.clone()),
                role: Role::Admin,
                prefixes: Vec::new(),
            });
        }
        Ok(Access { rules, open })
    }

    /// Whether any credential may make admin changes.
    pub fn has_admin(&self) -> bool {
        self.rules.iter().any(|r| r.role == Role::Admin)
    }

    /// Whether keys and views need no credential (no grant configured).
    pub fn is_open(&self) -> bool {
        self.open
    }

    /// Decides a request from its headers and its connection.
    pub fn check(
        &self,
        need: Need<'_>,
        headers: &HeaderMap,
        client: Option<&Activity>,
    ) -> Result<(), ApiError> {
        if matches!(need, Need::Admin) && !self.has_admin() {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "admin-disabled",
                "this replica has no admin credential configured (--admin-token, \
                 BALLOT_ADMIN_TOKEN, admin_clients or an admin grant), so it refuses every \
                 change to components, policies, the protocol and the membership",
            ));
        }
        if self.open && !matches!(need, Need::Admin) {
            return Ok(());
        }
        let bearer = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(|t| token_sha256(t.trim()));
        let holds = |rule: &Rule| match &rule.holder {
            Holder::Token(hash) => bearer.as_ref().is_some_and(|b| same(b, hash)),
            Holder::Client(name) => client.is_some_and(|c| c.client_is(name)),
        };
        let mut recognised = false;
        for rule in self.rules.iter().filter(|r| holds(r)) {
            recognised = true;
            let allowed = match need {
                Need::Admin => rule.role == Role::Admin,
                Need::View => true,
                Need::Read(key) => covers(rule, key),
                Need::Write(key) => rule.role >= Role::Write && covers(rule, key),
                Need::Lease => rule.role >= Role::Write,
            };
            if allowed {
                return Ok(());
            }
        }
        if recognised {
            let what = match need {
                Need::Admin => "this change needs an admin grant".to_string(),
                Need::Read(key) => format!("no grant of this credential lets it read {key:?}"),
                Need::Write(key) => format!("no grant of this credential lets it write {key:?}"),
                Need::Lease => "leases need a grant that may write".to_string(),
                Need::View => unreachable!("any grant may read the views"),
            };
            return Err(ApiError::new(StatusCode::FORBIDDEN, "forbidden", what));
        }
        let message = match need {
            Need::Admin => {
                "this change needs the replicas' admin token (--admin-token or \
                 BALLOT_ADMIN_TOKEN), a granted token, or a client certificate the replicas \
                 grant the admin role (admin_clients)"
            }
            _ => {
                "this replica grants access per credential: send a granted token \
                 (Authorization: Bearer, BALLOT_TOKEN) or a granted client certificate"
            }
        };
        Err(
            ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
                .header(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer")),
        )
    }
}

fn covers(rule: &Rule, key: &str) -> bool {
    rule.role == Role::Admin
        || rule.prefixes.is_empty()
        || rule.prefixes.iter().any(|p| key.starts_with(p.as_str()))
}

/// The connection a request came over, if the listener recorded it.
fn connection(request: &Request) -> Option<&Activity> {
    request
        .extensions()
        .get::<ConnectInfo<Activity>>()
        .map(|info| &info.0)
}

/// Decides a request from its headers and the connection it came over.
pub(super) fn check_request(app: &App, need: Need<'_>, request: &Request) -> Result<(), ApiError> {
    app.access
        .check(need, request.headers(), connection(request))
}

/// Runs the request if `need` is granted; refuses it otherwise.
async fn gate(
    app: &App,
    need: Need<'_>,
    request: Request,
    next: axum::middleware::Next,
) -> Response {
    match check_request(app, need, &request) {
        Ok(()) => next.run(request).await,
        Err(e) => refuse(request, e).await,
    }
}

/// Answers a refused request. A body the client may still be sending is
/// read and dropped (bounded in bytes and time), never parsed nor kept, so
/// the client sees the answer; the connection is then closed, as it cannot
/// carry another request.
async fn refuse(request: Request, e: ApiError) -> Response {
    let mut response = e.into_response();
    let has_body = request.headers().contains_key(header::TRANSFER_ENCODING)
        || request
            .headers()
            .get(header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0");
    if has_body {
        discard_body(request, COMPONENT_MAX, std::time::Duration::from_secs(5)).await;
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// Middleware on the admin plane: a change (any method but GET and HEAD)
/// needs an admin grant, a view any grant (none while the data plane is
/// open). It runs before the handler, so a refused request's body is never
/// read.
pub(super) async fn admin(
    State(app): State<App>,
    request: Request,
    next: axum::middleware::Next,
) -> Response {
    let need = if matches!(*request.method(), Method::GET | Method::HEAD) {
        Need::View
    } else {
        Need::Admin
    };
    gate(&app, need, request, next).await
}

/// Middleware on `/v1/leases`.
pub(super) async fn lease(
    State(app): State<App>,
    request: Request,
    next: axum::middleware::Next,
) -> Response {
    gate(&app, Need::Lease, request, next).await
}

/// Middleware on views outside the admin plane (`/v1/cluster`).
pub(super) async fn view(
    State(app): State<App>,
    request: Request,
    next: axum::middleware::Next,
) -> Response {
    gate(&app, Need::View, request, next).await
}

/// Middleware on `/v1/kv/{key}`: GET and HEAD read the key, every other
/// method writes it. A path that is not a key passes on to the handler,
/// which refuses it.
pub(super) async fn data(
    State(app): State<App>,
    request: Request,
    next: axum::middleware::Next,
) -> Response {
    if app.access.is_open() {
        return next.run(request).await;
    }
    let (mut parts, body) = request.into_parts();
    let key = <Path<String> as axum::extract::FromRequestParts<App>>::from_request_parts(
        &mut parts, &app,
    )
    .await
    .ok();
    let request = Request::from_parts(parts, body);
    let Some(Path(key)) = key else {
        return next.run(request).await;
    };
    let need = if matches!(*request.method(), Method::GET | Method::HEAD) {
        Need::Read(&key)
    } else {
        Need::Write(&key)
    };
    gate(&app, need, request, next).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bearer(token: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
        );
        h
    }

    fn hex(bytes: [u8; 32]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn grant(token: &str, role: Role, prefixes: &[&str]) -> Grant {
        Grant {
            client: None,
            token_sha256: Some(hex(token_sha256(token))),
            role,
            prefixes: prefixes.iter().map(|p| p.to_string()).collect(),
        }
    }

    fn code(r: Result<(), ApiError>) -> Option<u16> {
        r.err().map(|e| e.status().as_u16())
    }

    #[test]
    fn roles_and_prefixes_decide_each_request() {
        let access = Access::new(
            &[
                grant("reader", Role::Read, &["a/"]),
                grant("writer", Role::Write, &["a/", "b/"]),
            ],
            Some("root"),
            &[],
            false,
        )
        .unwrap();
        let none = HeaderMap::new();
        let (reader, writer, root) = (bearer("reader"), bearer("writer"), bearer("root"));
        assert_eq!(code(access.check(Need::Read("a/1"), &reader, None)), None);
        assert_eq!(
            code(access.check(Need::Read("b/1"), &reader, None)),
            Some(403)
        );
        assert_eq!(
            code(access.check(Need::Write("a/1"), &reader, None)),
            Some(403)
        );
        assert_eq!(code(access.check(Need::Write("b/1"), &writer, None)), None);
        assert_eq!(
            code(access.check(Need::Write("c/1"), &writer, None)),
            Some(403)
        );
        assert_eq!(code(access.check(Need::Admin, &writer, None)), Some(403));
        assert_eq!(code(access.check(Need::View, &reader, None)), None);
        assert_eq!(code(access.check(Need::Write("z"), &root, None)), None);
        assert_eq!(code(access.check(Need::Admin, &root, None)), None);
        for need in [Need::Read("a/1"), Need::View, Need::Admin] {
            assert_eq!(code(access.check(need, &none, None)), Some(401));
            assert_eq!(code(access.check(need, &bearer("guess"), None)), Some(401));
        }
    }

    #[test]
    fn without_grants_keys_are_open_and_the_admin_plane_closed() {
        let access = Access::new(&[], None, &[], true).unwrap();
        let none = HeaderMap::new();
        assert_eq!(code(access.check(Need::Write("k"), &none, None)), None);
        assert_eq!(code(access.check(Need::View, &none, None)), None);
        assert_eq!(
            code(access.check(Need::Admin, &bearer(""), None)),
            Some(403)
        );
        // The admin token alone does not close the data plane.
        let access = Access::new(&[], Some("root"), &[], true).unwrap();
        assert_eq!(code(access.check(Need::Write("k"), &none, None)), None);
        assert_eq!(code(access.check(Need::Admin, &none, None)), Some(401));
    }

    #[test]
    fn malformed_grants_are_refused_at_start() {
        let bad = |g: Grant, certs: bool| Access::new(&[g], None, &[], certs).unwrap_err();
        let mut g = grant("t", Role::Admin, &["a/"]);
        assert!(bad(g.clone(), true).contains("every key"));
        g.prefixes.clear();
        g.token_sha256 = Some("abc".into());
        assert!(bad(g.clone(), true).contains("64 hex"));
        g.client = Some("ops".into());
        assert!(bad(g.clone(), true).contains("exactly one"));
        g.token_sha256 = None;
        assert!(bad(g.clone(), false).contains("client_ca"));
        assert!(Access::new(&[g], None, &[], true).is_ok());
    }
}
