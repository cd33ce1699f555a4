//! A Rust client for Ballot's HTTP API.
//!
//! ```no_run
//! use ballot_client::{Client, Error};
//!
//! # async fn demo() -> Result<(), Error> {
//! // Any replicas of the cluster; requests go to the first that answers.
//! let store = Client::new(["http://127.0.0.1:8001", "http://127.0.0.1:8002"]);
//!
//! let written = store.put("greeting", "hello").await?;
//! let entry = store.get("greeting").await?.expect("just written");
//! assert_eq!(entry.value, "hello");
//!
//! // Compare and swap on the version (the ETag): fails if someone wrote since.
//! match store.cas("greeting", written.version, "hello again").await {
//!     Ok(w) => println!("now at version {}", w.version),
//!     Err(Error::Refused { code, current, .. }) => {
//!         println!("refused ({code}): the key is at version {:?}", current.map(|c| c.version))
//!     }
//!     Err(e) => return Err(e),
//! }
//!
//! // Create only if absent; retried safely, since the same value again succeeds.
//! store.create("lock", "owner-a").await?;
//! store.delete("lock").await?;
//! # Ok(())
//! # }
//! ```
//!
//! `client/examples/kv.rs` runs the same against `ballot dev`
//! (`cargo run --release -p ballot-client --example kv`).
//!
//! **Retries.** A request that certainly did not apply (the connection was
//! refused, or the API answered 503 with `maybe_applied: false`) is retried
//! on the next endpoint, with backoff, up to [`Retry::attempts`] times. One
//! that may have applied (a timeout, a lost connection, 503 with
//! `maybe_applied: true`) is retried only when doing it twice is the same as
//! doing it once: reads and `create` (which succeeds unchanged when the key
//! already holds the same value). `put`, `cas`, `delete` and `apply` return
//! [`Error::Unavailable`] with `maybe_applied: true` instead: read the key to
//! learn what happened.
//!
//! **Routing.** A replica that forwards a key's command to the key's leader
//! names the leader's URL in the `Ballot-Leader` header; the client sends
//! that key's next requests to the endpoint with that URL, if it has one
//! ([`Routes`]). A 503 that names a leader sends the retry, if any, there.
//!
//! An admin token is sent with [`Client::with_token`]; `https://`
//! endpoints need [`Client::with_tls`].

pub mod http;
pub mod views;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hyper::{Method, StatusCode};

pub use http::Precondition;

/// A key's value and version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub value: Bytes,
    /// Starts at 1 and grows by one with every change (the `ETag`).
    pub version: u64,
}

/// One page of a listing (`Client::list`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Page {
    /// Keys with a value, in key order.
    pub items: Vec<(String, Entry)>,
    /// Give this as `after` for the next page; `None` after the last.
    pub next: Option<String>,
}

/// What a write did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Written {
    /// The key's version after the write.
    pub version: u64,
    /// False when the write changed nothing (a `create` of the value the
    /// key already holds).
    pub changed: bool,
    /// The key had no value before (HTTP 201).
    pub created: bool,
}

/// The key's state a refusal reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Current {
    /// `None` when the key has no value (or it is not valid UTF-8 and came
    /// as `value_hex`, which is decoded).
    pub value: Option<Bytes>,
    pub version: u64,
}

/// A lease (`Client::grant_lease`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    /// 16 hex digits.
    pub id: String,
    pub ttl_ms: u64,
}

/// A lease as `Client::show_lease` reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseState {
    pub lease: Lease,
    /// Revoked or expired; its keys are being deleted.
    pub ended: bool,
    /// The keys attached, with the version each was written at (`None`
    /// while its write is under way).
    pub keys: Vec<(String, Option<u64>)>,
}

/// What a policy command did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Applied {
    pub current: Current,
    pub changed: bool,
}

/// Why a request failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Error {
    /// The key's precondition or policy refused the write (HTTP 409 or 412):
    /// nothing changed. `current` is the state it was refused against.
    Refused {
        code: String,
        message: String,
        current: Option<Current>,
    },
    /// The request itself is wrong (4xx): retrying will not help.
    Invalid {
        status: u16,
        code: String,
        message: String,
    },
    /// No replica could serve it (every attempt failed). With
    /// `maybe_applied` the last attempt may have taken effect.
    Unavailable {
        code: String,
        message: String,
        maybe_applied: bool,
    },
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Refused { code, message, .. } => write!(f, "refused ({code}): {message}"),
            Error::Invalid {
                status,
                code,
                message,
            } => write!(f, "invalid request ({status} {code}): {message}"),
            Error::Unavailable {
                code,
                message,
                maybe_applied,
            } => {
                write!(f, "unavailable ({code}): {message}")?;
                if *maybe_applied {
                    write!(f, " (it may have been applied)")?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for Error {}

/// How often and how patiently a request is retried.
#[derive(Clone, Copy, Debug)]
pub struct Retry {
    /// Attempts in all, at least 1.
    pub attempts: u32,
    /// The first pause; each later one doubles, up to `max_backoff`.
    pub backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Retry {
            attempts: 6,
            backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(1),
        }
    }
}

/// Whether sending a request twice is the same as sending it once.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Idempotent {
    Yes,
    No,
}

/// Keys whose leader a [`Routes`] remembers, at most; past it the table
/// starts over.
pub const ROUTES_MAX: usize = 4096;

/// Per key, which of a client's endpoints leads it, learned from the
/// `Ballot-Leader` header: a replica that forwarded a key's command to the
/// key's leader names the leader's URL there. Sending the key's next
/// requests to that endpoint saves a hop between replicas each way. A
/// route is a hint: a replica that no longer leads the key forwards the
/// request and names the new leader.
#[derive(Default)]
pub struct Routes {
    keys: std::sync::Mutex<std::collections::HashMap<String, usize>>,
}

impl Routes {
    /// The endpoint `key`'s requests go to first, if one leads it.
    pub fn get(&self, key: &str) -> Option<usize> {
        self.keys.lock().expect("routes lock").get(key).copied()
    }

    /// Learns from an answer for `key` whose `Ballot-Leader` header was
    /// `leader`: the key goes to the endpoint of that URL (a URL none of
    /// `endpoints` has drops the route). An answer without the header
    /// changes nothing.
    pub fn learn(&self, key: &str, leader: Option<&str>, endpoints: &[http::Client]) {
        let Some(leader) = leader else {
            return;
        };
        match Routes::endpoint_of(leader, endpoints) {
            Some(at) => self.set(key, at),
            None => self.forget(key),
        }
    }

    /// Sends `key`'s requests to endpoint `at` first.
    fn set(&self, key: &str, at: usize) {
        let mut keys = self.keys.lock().expect("routes lock");
        if keys.get(key) != Some(&at) {
            if keys.len() >= ROUTES_MAX {
                keys.clear();
            }
            keys.insert(key.to_string(), at);
        }
    }

    /// Drops `key`'s route (its endpoint failed).
    pub fn forget(&self, key: &str) {
        self.keys.lock().expect("routes lock").remove(key);
    }

    /// Which of `endpoints` has the URL `leader` (up to a trailing slash).
    fn endpoint_of(leader: &str, endpoints: &[http::Client]) -> Option<usize> {
        let leader = leader.trim_end_matches('/');
        endpoints
            .iter()
            .position(|e| e.endpoint().trim_end_matches('/') == leader)
    }
}

/// A client of a Ballot cluster: typed key-value calls over any of its
/// replicas, with retries and failover. Cheap to clone.
///
/// **Routing.** A key's requests go first to the endpoint that leads it,
/// once an answer named it ([`Routes`]); the others start at the endpoint
/// that answered last.
#[derive(Clone)]
pub struct Client {
    endpoints: Arc<[http::Client]>,
    /// The endpoint that answered last; requests start there.
    preferred: Arc<AtomicUsize>,
    routes: Arc<Routes>,
    retry: Retry,
}

impl Client {
    /// `endpoints` like `http://127.0.0.1:8001`; at least one.
    ///
    /// # Panics
    /// If `endpoints` is empty.
    pub fn new<I, S>(endpoints: I) -> Client
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let endpoints: Arc<[http::Client]> = endpoints
            .into_iter()
            .map(|e| http::Client::new(e.as_ref()))
            .collect();
        assert!(!endpoints.is_empty(), "a client needs an endpoint");
        Client {
            endpoints,
            preferred: Arc::new(AtomicUsize::new(0)),
            routes: Arc::default(),
            retry: Retry::default(),
        }
    }

    /// The same client with another retry policy.
    pub fn with_retry(mut self, retry: Retry) -> Client {
        self.retry = Retry {
            attempts: retry.attempts.max(1),
            ..retry
        };
        self
    }

    /// The same client, reaching `https://` endpoints with `tls`.
    pub fn with_tls(mut self, tls: &http::Tls) -> Client {
        self.endpoints = self
            .endpoints
            .iter()
            .map(|c| {
                http::Client::with_tls(c.endpoint(), tls)
                    .with_token(c.token().cloned())
                    .with_timeout(c.timeout())
            })
            .collect();
        self
    }

    /// The same client, giving up on each attempt's answer after `timeout`
    /// (30 s by default). An attempt that timed out may have applied.
    pub fn with_timeout(mut self, timeout: Duration) -> Client {
        self.endpoints = self
            .endpoints
            .iter()
            .map(|c| c.clone().with_timeout(timeout))
            .collect();
        self
    }

    /// The same client, sending `Authorization: Bearer <token>`.
    pub fn with_token(mut self, token: Option<String>) -> Client {
        self.endpoints = self
            .endpoints
            .iter()
            .map(|c| c.clone().with_token(token.clone()))
            .collect();
        self
    }

    /// The endpoint requests go to first.
    pub fn endpoint(&self) -> &str {
        self.endpoints[self.preferred.load(Ordering::Relaxed) % self.endpoints.len()].endpoint()
    }

    /// A linearizable read: `None` if the key has no value.
    pub async fn get(&self, key: &str) -> Result<Option<Entry>, Error> {
        self.read(key, false).await
    }

    /// The replica's own committed copy: fast, possibly stale.
    pub async fn get_local(&self, key: &str) -> Result<Option<Entry>, Error> {
        self.read(key, true).await
    }

    async fn read(&self, key: &str, local: bool) -> Result<Option<Entry>, Error> {
        let query = if local { "?consistency=local" } else { "" };
        let path = format!("/v1/kv/{}{query}", http::escape_key(key));
        let r = self
            .call(Method::GET, &path, &[], Bytes::new(), Idempotent::Yes)
            .await?;
        match r.status {
            StatusCode::OK => Ok(Some(Entry {
                value: r.body,
                version: r.version.unwrap_or(0),
            })),
            StatusCode::NOT_FOUND => Ok(None),
            _ => Err(refusal(&r)),
        }
    }

    /// Sets the value, whatever it was.
    pub async fn put(&self, key: &str, value: impl Into<Bytes>) -> Result<Written, Error> {
        self.write(key, value.into(), Precondition::None, None, Idempotent::No)
            .await
    }

    /// Sets the value and attaches the key to lease `lease`: the key is
    /// deleted when the lease ends, unless written again first.
    /// `create_only` writes only if the key has no value (a lock).
    pub async fn put_with_lease(
        &self,
        key: &str,
        value: impl Into<Bytes>,
        lease: &str,
        create_only: bool,
    ) -> Result<Written, Error> {
        let (pre, idempotent) = if create_only {
            (Precondition::Absent, Idempotent::Yes)
        } else {
            (Precondition::None, Idempotent::No)
        };
        self.write(key, value.into(), pre, Some(lease), idempotent)
            .await
    }

    /// Sets the value only if the key has none. The same value again
    /// succeeds with `changed: false`, so this one is retried even when an
    /// attempt may have applied.
    pub async fn create(&self, key: &str, value: impl Into<Bytes>) -> Result<Written, Error> {
        self.write(
            key,
            value.into(),
            Precondition::Absent,
            None,
            Idempotent::Yes,
        )
        .await
    }

    /// Sets the value only if the key is at `version`
    /// ([`Error::Refused`] with code `version-mismatch` otherwise).
    pub async fn cas(
        &self,
        key: &str,
        version: u64,
        value: impl Into<Bytes>,
    ) -> Result<Written, Error> {
        self.write(
            key,
            value.into(),
            Precondition::Version(version),
            None,
            Idempotent::No,
        )
        .await
    }

    async fn write(
        &self,
        key: &str,
        value: Bytes,
        pre: Precondition,
        lease: Option<&str>,
        idempotent: Idempotent,
    ) -> Result<Written, Error> {
        let mut path = format!("/v1/kv/{}", http::escape_key(key));
        if let Some(lease) = lease {
            path.push_str(&format!("?lease={}", http::escape_key(lease)));
        }
        let r = self
            .call(
                Method::PUT,
                &path,
                &http::precondition_headers(pre),
                value,
                idempotent,
            )
            .await?;
        if !r.status.is_success() {
            return Err(refusal(&r));
        }
        let changed = serde_json::from_slice::<serde_json::Value>(&r.body)
            .ok()
            .and_then(|v| v.get("changed")?.as_bool())
            .unwrap_or(true);
        Ok(Written {
            version: r.version.unwrap_or(0),
            changed,
            created: r.status == StatusCode::CREATED,
        })
    }

    /// Deletes the key: the version it is at afterwards, or `None` if it
    /// had no value.
    pub async fn delete(&self, key: &str) -> Result<Option<u64>, Error> {
        self.remove(key, Precondition::None).await
    }

    /// Deletes the key only if it is at `version`.
    pub async fn delete_if(&self, key: &str, version: u64) -> Result<Option<u64>, Error> {
        self.remove(key, Precondition::Version(version)).await
    }

    async fn remove(&self, key: &str, pre: Precondition) -> Result<Option<u64>, Error> {
        let path = format!("/v1/kv/{}", http::escape_key(key));
        let headers = http::precondition_headers(pre);
        let r = self
            .call(
                Method::DELETE,
                &path,
                &headers,
                Bytes::new(),
                Idempotent::No,
            )
            .await?;
        match r.status {
            s if s.is_success() => Ok(Some(r.version.unwrap_or(0))),
            StatusCode::NOT_FOUND => Ok(None),
            _ => Err(refusal(&r)),
        }
    }

    /// Runs `command` through the policy bound to the key (`POST`).
    pub async fn apply(&self, key: &str, command: impl Into<Bytes>) -> Result<Applied, Error> {
        let path = format!("/v1/kv/{}", http::escape_key(key));
        let (r, at) = self
            .call_at(Method::POST, &path, &[], command.into(), Idempotent::No)
            .await?;
        if !r.status.is_success() {
            return Err(refusal(&r));
        }
        let body: serde_json::Value =
            serde_json::from_slice(&r.body).map_err(|e| Error::Unavailable {
                code: "bad-response".into(),
                message: format!(
                    "{}: the answer is not JSON: {e}",
                    self.endpoints[at].endpoint()
                ),
                maybe_applied: true,
            })?;
        Ok(Applied {
            current: current_of(&body).unwrap_or(Current {
                value: None,
                version: r.version.unwrap_or(0),
            }),
            changed: body
                .get("changed")
                .and_then(|c| c.as_bool())
                .unwrap_or(true),
        })
    }

    /// Up to `limit` keys under `prefix` after `after`, with their
    /// values: every key written before the call began and its newest
    /// value, or (`local`) the replica's own copy.
    pub async fn list(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
        local: bool,
    ) -> Result<Page, Error> {
        let mut path = format!("/v1/kv?prefix={}&limit={limit}", http::escape_key(prefix));
        if let Some(after) = after {
            path.push_str(&format!("&after={}", http::escape_key(after)));
        }
        if local {
            path.push_str("&consistency=local");
        }
        let r = self
            .call(Method::GET, &path, &[], Bytes::new(), Idempotent::Yes)
            .await?;
        if r.status != StatusCode::OK {
            return Err(refusal(&r));
        }
        let bad = |message: String| Error::Unavailable {
            code: "bad-response".into(),
            message,
            maybe_applied: false,
        };
        let body: serde_json::Value = serde_json::from_slice(&r.body)
            .map_err(|e| bad(format!("{}: the answer is not JSON: {e}", self.endpoint())))?;
        let mut items = Vec::new();
        for item in body["items"].as_array().into_iter().flatten() {
            let (Some(key), Some(current)) = (item["key"].as_str(), current_of(item)) else {
                return Err(bad(format!(
                    "{}: a malformed item: {item}",
                    self.endpoint()
                )));
            };
            let value = current.value.unwrap_or_default();
            items.push((
                key.to_string(),
                Entry {
                    value,
                    version: current.version,
                },
            ));
        }
        Ok(Page {
            items,
            next: body["next"].as_str().map(str::to_string),
        })
    }

    /// A new lease of `ttl_ms` (1 s to a day).
    pub async fn grant_lease(&self, ttl_ms: u64) -> Result<Lease, Error> {
        let body = serde_json::json!({ "ttl_ms": ttl_ms }).to_string();
        let v = self
            .lease_call(Method::POST, "/v1/leases", body.into(), Idempotent::No)
            .await?;
        self.lease_of(&v)
    }

    /// Keeps lease `id` alive for another `ttl_ms` from now
    /// ([`Error::Invalid`] with code `lease-not-found` once it has ended).
    pub async fn keepalive(&self, id: &str) -> Result<Lease, Error> {
        let path = format!("/v1/leases/{}/keepalive", http::escape_key(id));
        let v = self
            .lease_call(Method::POST, &path, Bytes::new(), Idempotent::Yes)
            .await?;
        self.lease_of(&v)
    }

    /// Ends lease `id` and deletes its keys: how many were deleted.
    pub async fn revoke(&self, id: &str) -> Result<u64, Error> {
        let path = format!("/v1/leases/{}", http::escape_key(id));
        let v = self
            .lease_call(Method::DELETE, &path, Bytes::new(), Idempotent::No)
            .await?;
        Ok(v["deleted"].as_u64().unwrap_or(0))
    }

    /// Lease `id`, read linearizably; `None` once ended and swept.
    pub async fn show_lease(&self, id: &str) -> Result<Option<LeaseState>, Error> {
        let path = format!("/v1/leases/{}", http::escape_key(id));
        let v = match self
            .lease_call(Method::GET, &path, Bytes::new(), Idempotent::Yes)
            .await
        {
            Err(Error::Invalid { status: 404, .. }) => return Ok(None),
            other => other?,
        };
        let keys = v["keys"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|k| Some((k["key"].as_str()?.to_string(), k["version"].as_u64())))
            .collect();
        Ok(Some(LeaseState {
            lease: self.lease_of(&v)?,
            ended: v["ended"].as_bool().unwrap_or(false),
            keys,
        }))
    }

    async fn lease_call(
        &self,
        method: Method,
        path: &str,
        body: Bytes,
        idempotent: Idempotent,
    ) -> Result<serde_json::Value, Error> {
        let headers = [("content-type", "application/json".to_string())];
        let r = self.call(method, path, &headers, body, idempotent).await?;
        if !r.status.is_success() {
            return Err(refusal(&r));
        }
        serde_json::from_slice(&r.body).map_err(|e| Error::Unavailable {
            code: "bad-response".into(),
            message: format!("{}: the answer is not JSON: {e}", self.endpoint()),
            maybe_applied: true,
        })
    }

    fn lease_of(&self, v: &serde_json::Value) -> Result<Lease, Error> {
        match (v["id"].as_str(), v["ttl_ms"].as_u64()) {
            (Some(id), Some(ttl_ms)) => Ok(Lease {
                id: id.to_string(),
                ttl_ms,
            }),
            _ => Err(Error::Unavailable {
                code: "bad-response".into(),
                message: format!("{}: not a lease: {v}", self.endpoint()),
                maybe_applied: true,
            }),
        }
    }

    /// `GET /v1/cluster` of the first replica that answers.
    pub async fn cluster(&self) -> Result<views::ClusterView, Error> {
        let r = self
            .call(
                Method::GET,
                "/v1/cluster",
                &[],
                Bytes::new(),
                Idempotent::Yes,
            )
            .await?;
        if r.status != StatusCode::OK {
            return Err(refusal(&r));
        }
        serde_json::from_slice(&r.body).map_err(|e| Error::Unavailable {
            code: "bad-response".into(),
            message: format!("{}: bad cluster view: {e}", self.endpoint()),
            maybe_applied: false,
        })
    }

    /// Sends one request with retries and failover; returns the first
    /// answer that is not a retryable failure.
    async fn call(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, String)],
        body: Bytes,
        idempotent: Idempotent,
    ) -> Result<http::Response, Error> {
        let (r, _) = self
            .call_at(method, path, headers, body, idempotent)
            .await?;
        Ok(r)
    }

    /// [`Client::call`], with the index of the endpoint that answered.
    async fn call_at(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, String)],
        body: Bytes,
        idempotent: Idempotent,
    ) -> Result<(http::Response, usize), Error> {
        let n = self.endpoints.len();
        // A key's path (without the query) names its route.
        let route = path
            .strip_prefix("/v1/kv/")
            .map(|k| k.split('?').next().unwrap_or(k));
        let mut routed = route.and_then(|k| self.routes.get(k)).filter(|&at| at < n);
        let mut at = routed.unwrap_or_else(|| self.preferred.load(Ordering::Relaxed) % n);
        let mut pause = self.retry.backoff;
        let mut last = None;
        let mut tried = vec![false; n];
        for attempt in 0..self.retry.attempts {
            if attempt > 0 {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(self.retry.max_backoff);
            }
            tried[at] = true;
            let endpoint = &self.endpoints[at];
            let outcome = endpoint
                .send(method.clone(), path, headers, body.clone())
                .await;
            // A 503 that names the key's leader sends the retry there, once:
            // a leader already tried in this call is not tried again.
            let mut named = None;
            let (error, retry) = match outcome {
                Ok(r) if r.status == StatusCode::SERVICE_UNAVAILABLE => {
                    named = r
                        .leader
                        .as_deref()
                        .and_then(|l| Routes::endpoint_of(l, &self.endpoints))
                        .filter(|&l| !tried[l]);
                    let maybe_applied = maybe_applied(&r);
                    let error = Error::Unavailable {
                        code: r.error_code().unwrap_or_else(|| "unavailable".into()),
                        message: format!("{}: {}", endpoint.endpoint(), r.error_message()),
                        maybe_applied,
                    };
                    (error, !maybe_applied || idempotent == Idempotent::Yes)
                }
                Ok(r) => {
                    if let Some(key) = route {
                        self.routes.learn(key, r.leader.as_deref(), &self.endpoints);
                    }
                    if routed != Some(at) {
                        self.preferred.store(at, Ordering::Relaxed);
                    }
                    return Ok((r, at));
                }
                Err(e) => {
                    let error = Error::Unavailable {
                        code: if e.sent { "no-response" } else { "unreachable" }.into(),
                        message: e.message,
                        maybe_applied: e.sent,
                    };
                    (error, !e.sent || idempotent == Idempotent::Yes)
                }
            };
            // A retry of something that may have applied keeps the doubt.
            let doubt = matches!(
                last,
                Some(Error::Unavailable {
                    maybe_applied: true,
                    ..
                })
            );
            last = Some(match error {
                Error::Unavailable {
                    code,
                    message,
                    maybe_applied,
                } => Error::Unavailable {
                    code,
                    message,
                    maybe_applied: maybe_applied || doubt,
                },
                other => other,
            });
            if let Some(key) = route.filter(|_| routed == Some(at)) {
                self.routes.forget(key);
            }
            if let (Some(key), Some(leader)) = (route, named) {
                self.routes.set(key, leader);
                routed = Some(leader);
            }
            if !retry {
                break;
            }
            at = named.unwrap_or((at + 1) % n);
        }
        Err(last.expect("at least one attempt"))
    }
}

/// The `maybe_applied` of a 503 body; true when it cannot be read.
fn maybe_applied(r: &http::Response) -> bool {
    serde_json::from_slice::<serde_json::Value>(&r.body)
        .ok()
        .and_then(|v| v.get("error")?.get("maybe_applied")?.as_bool())
        .unwrap_or(true)
}

/// `{"value": ..., "value_hex": ..., "version": ...}` as the API writes it.
fn current_of(v: &serde_json::Value) -> Option<Current> {
    let version = v.get("version")?.as_u64()?;
    let value = match (v.get("value").and_then(|s| s.as_str()), v.get("value_hex")) {
        (Some(s), _) => Some(Bytes::copy_from_slice(s.as_bytes())),
        (None, Some(h)) => h.as_str().and_then(unhex).map(Bytes::from),
        (None, None) => None,
    };
    Some(Current { value, version })
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// A non-success answer that is not a retryable failure.
fn refusal(r: &http::Response) -> Error {
    let code = r.error_code().unwrap_or_else(|| "error".into());
    let message = r.error_message();
    match r.status {
        StatusCode::CONFLICT | StatusCode::PRECONDITION_FAILED => Error::Refused {
            code,
            message,
            current: serde_json::from_slice::<serde_json::Value>(&r.body)
                .ok()
                .and_then(|v| current_of(v.get("error")?.get("current")?)),
        },
        s if s.is_server_error() => Error::Unavailable {
            code,
            message,
            maybe_applied: maybe_applied(r),
        },
        s => Error::Invalid {
            status: s.as_u16(),
            code,
            message,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_carries_the_current_state() {
        let r = http::Response {
            status: StatusCode::PRECONDITION_FAILED,
            version: Some(3),
            leader: None,
            body: Bytes::from_static(
                br#"{"error":{"code":"version-mismatch","message":"at 3","current":{"version":3,"value_hex":"00ff"}}}"#,
            ),
        };
        assert_eq!(
            refusal(&r),
            Error::Refused {
                code: "version-mismatch".into(),
                message: "at 3".into(),
                current: Some(Current {
                    value: Some(Bytes::from_static(&[0, 0xff])),
                    version: 3
                }),
            }
        );
    }

    #[test]
    fn routes_follow_the_named_leader_among_the_endpoints() {
        let endpoints: Vec<http::Client> = ["http://a:1", "http://b:2/"]
            .into_iter()
            .map(http::Client::new)
            .collect();
        let routes = Routes::default();
        routes.learn("k", None, &endpoints);
        assert_eq!(routes.get("k"), None, "no header, no route");
        routes.learn("k", Some("http://b:2"), &endpoints);
        assert_eq!(routes.get("k"), Some(1), "a trailing slash is the same URL");
        routes.learn("k", None, &endpoints);
        assert_eq!(routes.get("k"), Some(1), "the leader itself names nobody");
        routes.learn("k", Some("http://a:1/"), &endpoints);
        assert_eq!(routes.get("k"), Some(0));
        routes.learn("k", Some("http://elsewhere:3"), &endpoints);
        assert_eq!(routes.get("k"), None, "a leader the client cannot reach");
        routes.learn("k", Some("http://a:1"), &endpoints);
        routes.forget("k");
        assert_eq!(routes.get("k"), None);
        for i in 0..ROUTES_MAX + 5 {
            routes.learn(&format!("k{i}"), Some("http://a:1"), &endpoints);
        }
        assert!(routes.keys.lock().unwrap().len() <= ROUTES_MAX);
        assert_eq!(routes.get(&format!("k{}", ROUTES_MAX + 4)), Some(0));
    }

    #[test]
    fn an_unreadable_503_may_have_applied() {
        let r = http::Response {
            status: StatusCode::SERVICE_UNAVAILABLE,
            version: None,
            leader: None,
            body: Bytes::from_static(b"upstream gone"),
        };
        assert!(maybe_applied(&r));
        let r = http::Response {
            body: Bytes::from_static(
                br#"{"error":{"code":"no-quorum","message":"m","maybe_applied":false}}"#,
            ),
            ..r
        };
        assert!(!maybe_applied(&r));
    }

    /// Serves every connection with `answer`, counting the requests.
    async fn answering(answer: String) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let seen = count.clone();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let (answer, seen) = (answer.clone(), seen.clone());
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut got = Vec::new();
                    // Requests one after another: a head, then its body.
                    while let Ok(n) = conn.read(&mut buf).await {
                        if n == 0 {
                            return;
                        }
                        got.extend_from_slice(&buf[..n]);
                        let text = String::from_utf8_lossy(&got).to_lowercase();
                        let Some(head) = text.find("\r\n\r\n") else {
                            continue;
                        };
                        let body = text[..head]
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        if got.len() >= head + 4 + body {
                            seen.fetch_add(1, Ordering::SeqCst);
                            let _ = conn.write_all(answer.as_bytes()).await;
                            got.clear();
                        }
                    }
                });
            }
        });
        (url, count)
    }

    /// A retry policy that does not keep a test waiting.
    fn quick(attempts: u32) -> Retry {
        Retry {
            attempts,
            backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(2),
        }
    }

    const OK: &str = "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}";

    /// A 503 `no-quorum` that certainly did not apply and names `leader`.
    fn unavailable_naming(leader: &str) -> String {
        let body = r#"{"error":{"code":"no-quorum","message":"m","maybe_applied":false}}"#;
        format!(
            "HTTP/1.1 503 Service Unavailable\r\n{}: {leader}\r\n\
             content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            http::LEADER_HEADER,
            body.len()
        )
    }

    /// A URL where nothing listens (a listener's port, just closed).
    fn nobody() -> String {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    }

    /// A replica that answers 503 and names the key's leader sends the
    /// retry to that leader, not to the next endpoint, and the key's next
    /// requests go there first.
    #[tokio::test]
    async fn a_503_that_names_the_leader_sends_the_retry_there() {
        let (leader, at_leader) = answering(OK.into()).await;
        let (follower, at_follower) = answering(unavailable_naming(&leader)).await;
        // Between them, an endpoint where nothing listens.
        let client = Client::new([follower, nobody(), leader]).with_retry(quick(2));
        client
            .put("k", "v")
            .await
            .expect("the retry goes to the named leader");
        assert_eq!(at_follower.load(Ordering::SeqCst), 1);
        assert_eq!(at_leader.load(Ordering::SeqCst), 1);
        client.put("k", "w").await.unwrap();
        assert_eq!(
            at_follower.load(Ordering::SeqCst),
            1,
            "the key's route is the leader"
        );
        assert_eq!(at_leader.load(Ordering::SeqCst), 2);
    }

    /// A 503 that names a leader this call already tried (a stale hint
    /// naming a dead replica) does not send the retry back there: the
    /// call goes on to the endpoints it has not tried.
    #[tokio::test]
    async fn a_named_leader_already_tried_is_not_tried_again() {
        let dead = nobody();
        let (stale, _) = answering(unavailable_naming(&dead)).await;
        let (healthy, at_healthy) = answering(OK.into()).await;
        let client = Client::new([dead, stale, healthy]).with_retry(quick(3));
        client
            .put("k", "v")
            .await
            .expect("the third endpoint answers");
        assert_eq!(at_healthy.load(Ordering::SeqCst), 1);
    }

    /// A routed endpoint that takes the request and never answers: a read
    /// goes on to the next endpoint, a put fails as maybe applied, and
    /// either way the key's route is dropped.
    #[tokio::test]
    async fn a_routed_endpoint_that_never_answers_loses_the_route() {
        // Accepts connections and reads, never answers.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let silent_url = format!("http://{}", silent.local_addr().unwrap());
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((conn, _)) = silent.accept().await {
                held.push(conn);
            }
        });
        let (healthy, at_healthy) = answering(OK.into()).await;
        let client = Client::new([silent_url.clone(), healthy])
            .with_timeout(Duration::from_millis(200))
            .with_retry(quick(2));
        let route = |client: &Client| {
            client
                .routes
                .learn("k", Some(&silent_url), &client.endpoints);
            assert_eq!(client.routes.get("k"), Some(0));
        };
        route(&client);
        client
            .get("k")
            .await
            .expect("the read goes on to the next endpoint");
        assert_eq!(at_healthy.load(Ordering::SeqCst), 1);
        assert_eq!(client.routes.get("k"), None);
        route(&client);
        match client.put("k", "v").await {
            Err(Error::Unavailable {
                code,
                maybe_applied,
                ..
            }) => {
                assert_eq!(code, "no-response");
                assert!(maybe_applied);
            }
            other => panic!("expected unavailable, got {other:?}"),
        }
        assert_eq!(at_healthy.load(Ordering::SeqCst), 1, "a put is not retried");
        assert_eq!(client.routes.get("k"), None);
    }

    /// No replica listens: every attempt is refused, certainly unapplied,
    /// and every endpoint is tried.
    #[tokio::test]
    async fn refused_connections_fail_over_and_report_nothing_applied() {
        let dead = |p| format!("http://127.0.0.1:{p}");
        // Ports from a listener just closed: nothing listens there now.
        let ports: Vec<u16> = (0..2)
            .map(|_| {
                let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
                l.local_addr().unwrap().port()
            })
            .collect();
        let client = Client::new(ports.iter().map(|&p| dead(p))).with_retry(quick(3));
        match client.put("k", "v").await {
            Err(Error::Unavailable {
                code,
                maybe_applied,
                ..
            }) => {
                assert_eq!(code, "unreachable");
                assert!(!maybe_applied);
            }
            other => panic!("expected unavailable, got {other:?}"),
        }
    }
}
