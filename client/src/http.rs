//! One replica's HTTP API, request by request: what [`crate::Client`] is
//! built on, and what the CLI's admin commands, `ballot bench` and the
//! cluster tests use where they need the raw status and body.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::{connect::HttpConnector, Client as HyperClient};
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// A client of one replica's HTTP API.
#[derive(Clone)]
pub struct Client {
    endpoint: String,
    http: HyperClient<HttpsConnector<HttpConnector>, Full<Bytes>>,
    timeout: Duration,
    /// Sent as `Authorization: Bearer` with every request when set.
    token: Option<String>,
}

/// What a client trusts for `https://` endpoints (the cluster CA, never
/// the system's roots: a replica's API certificate is issued by the
/// cluster CA) and the certificate it presents, if any. Cheap to clone.
#[derive(Clone)]
pub struct Tls(Arc<rustls::ClientConfig>);

impl Tls {
    /// From PEM bytes: the CA certificate(s), and optionally a client
    /// certificate chain and its private key.
    pub fn from_pem(ca: &[u8], identity: Option<(&[u8], &[u8])>) -> Result<Tls, String> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(ca) {
            let cert = cert.map_err(|e| format!("reading the CA certificate: {e}"))?;
            roots
                .add(cert)
                .map_err(|e| format!("the CA certificate is not usable: {e}"))?;
        }
        if roots.is_empty() {
            return Err("the CA file holds no certificate".into());
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots);
        let config = match identity {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => {
                let chain = CertificateDer::pem_slice_iter(cert)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| format!("reading the client certificate: {e}"))?;
                let key = PrivateKeyDer::from_pem_slice(key)
                    .map_err(|e| format!("reading the client key: {e}"))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| format!("the client certificate is not usable: {e}"))?
            }
        };
        // hyper-rustls sets ALPN (http/1.1) itself.
        Ok(Tls(Arc::new(config)))
    }

    /// [`Tls::from_pem`] from files.
    pub fn from_files(ca: &Path, identity: Option<(&Path, &Path)>) -> Result<Tls, String> {
        let read = |p: &Path| std::fs::read(p).map_err(|e| format!("reading {}: {e}", p.display()));
        let ca = read(ca)?;
        match identity {
            None => Tls::from_pem(&ca, None),
            Some((cert, key)) => Tls::from_pem(&ca, Some((&read(cert)?, &read(key)?))),
        }
    }

    /// Trusts nothing: for `http://` endpoints (`https://` ones fail with
    /// an unknown issuer).
    pub fn plain() -> Tls {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("ring supports the default versions")
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        Tls(Arc::new(config))
    }
}

/// The answer header in which a replica that forwarded a key's command
/// names the client URL of the key's leader.
pub const LEADER_HEADER: &str = "ballot-leader";

/// A response, whole.
#[derive(Clone, Debug)]
pub struct Response {
    pub status: StatusCode,
    /// The version in the `ETag` header, if any.
    pub version: Option<u64>,
    /// The client URL of the replica that leads the key, from the
    /// [`LEADER_HEADER`] of a replica that forwarded the request there.
    pub leader: Option<String>,
    pub body: Bytes,
}

impl Response {
    /// The `error.code` of a JSON error body.
    pub fn error_code(&self) -> Option<String> {
        let v: serde_json::Value = serde_json::from_slice(&self.body).ok()?;
        v.get("error")?.get("code")?.as_str().map(str::to_string)
    }

    /// The `error.message` of a JSON error body, or the body as text.
    pub fn error_message(&self) -> String {
        serde_json::from_slice::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|v| v.get("error")?.get("message")?.as_str().map(str::to_string))
            .unwrap_or_else(|| String::from_utf8_lossy(&self.body).into_owned())
    }
}

/// A request that got no response.
#[derive(Clone, Debug)]
pub struct SendError {
    pub message: String,
    /// False only when the request certainly never reached the replica
    /// (the connection was refused or failed): then a retry is safe.
    pub sent: bool,
}

/// Precondition of a write.
#[derive(Clone, Copy, Debug)]
pub enum Precondition {
    None,
    /// `If-None-Match: *`
    Absent,
    /// `If-Match: "<version>"`
    Version(u64),
}

/// Escapes a key for the URL path, or any text for a query value (slashes
/// are kept: keys may be paths).
pub fn escape_key(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for b in key.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

impl Client {
    /// `endpoint` like `http://127.0.0.1:8001`; an `https://` endpoint
    /// needs [`Client::with_tls`].
    pub fn new(endpoint: &str) -> Client {
        Client::with_tls(endpoint, &Tls::plain())
    }

    /// `endpoint` like `https://127.0.0.1:8001`, trusting and presenting
    /// what `tls` says (plain `http://` endpoints work too).
    pub fn with_tls(endpoint: &str, tls: &Tls) -> Client {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.enforce_http(false);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config((*tls.0).clone())
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        Client {
            endpoint: endpoint.trim_end_matches('/').to_string(),
            http: HyperClient::builder(TokioExecutor::new()).build(connector),
            timeout: Duration::from_secs(30),
            token: None,
        }
    }

    /// The same client, sending an admin token.
    pub fn with_token(mut self, token: Option<String>) -> Client {
        self.token = token;
        self
    }

    /// The same client, giving up on an answer after `timeout` (30 s by
    /// default).
    pub fn with_timeout(mut self, timeout: Duration) -> Client {
        self.timeout = timeout;
        self
    }

    /// How long it waits for an answer.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The endpoint this client talks to.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// A client of another replica of the same cluster (a URL its
    /// membership lists), with the same TLS settings and no token.
    pub fn at(&self, endpoint: &str) -> Client {
        Client {
            endpoint: endpoint.trim_end_matches('/').to_string(),
            token: None,
            ..self.clone()
        }
    }

    /// The admin token it sends, if any.
    pub fn token(&self) -> Option<&String> {
        self.token.as_ref()
    }

    /// Sends one request and reads the whole response.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, String)],
        body: Bytes,
    ) -> Result<Response, String> {
        self.send(method, path, headers, body)
            .await
            .map_err(|e| e.message)
    }

    /// [`Client::request`], saying on failure whether the request may have
    /// reached the replica.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, String)],
        body: Bytes,
    ) -> Result<Response, SendError> {
        let url = format!("{}{}", self.endpoint, path);
        let mut builder = Request::builder().method(method).uri(&url);
        for (name, value) in headers {
            builder = builder.header(*name, value);
        }
        if let Some(token) = &self.token {
            builder = builder.header("authorization", format!("Bearer {token}"));
        }
        let request = builder.body(Full::new(body)).map_err(|e| SendError {
            message: format!("{url}: {e}"),
            sent: false,
        })?;
        let send = async {
            let response = self.http.request(request).await.map_err(|e| {
                let mut msg = e.to_string();
                let mut source = std::error::Error::source(&e);
                while let Some(s) = source {
                    msg = format!("{msg}: {s}");
                    source = s.source();
                }
                SendError {
                    message: format!("{url}: {msg}"),
                    // A refused or failed connection carried no request.
                    sent: !e.is_connect(),
                }
            })?;
            let status = response.status();
            let version = response
                .headers()
                .get(hyper::header::ETAG)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim_matches('"').parse().ok());
            let leader = response
                .headers()
                .get(LEADER_HEADER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| SendError {
                    message: format!("{url}: reading the response: {e}"),
                    sent: true,
                })?
                .to_bytes();
            Ok(Response {
                status,
                version,
                leader,
                body,
            })
        };
        tokio::time::timeout(self.timeout, send)
            .await
            .map_err(|_| SendError {
                message: format!("{url}: no response in {:?}", self.timeout),
                sent: true,
            })?
    }

    /// `GET /v1/kv/{key}`.
    pub async fn get(&self, key: &str, local: bool) -> Result<Response, String> {
        let query = if local { "?consistency=local" } else { "" };
        let path = format!("/v1/kv/{}{query}", escape_key(key));
        self.request(Method::GET, &path, &[], Bytes::new()).await
    }

    /// `PUT /v1/kv/{key}`.
    pub async fn put(
        &self,
        key: &str,
        value: Bytes,
        pre: Precondition,
    ) -> Result<Response, String> {
        let headers = precondition_headers(pre);
        let path = format!("/v1/kv/{}", escape_key(key));
        self.request(Method::PUT, &path, &headers, value).await
    }

    /// `DELETE /v1/kv/{key}`.
    pub async fn delete(&self, key: &str, pre: Precondition) -> Result<Response, String> {
        let headers = precondition_headers(pre);
        let path = format!("/v1/kv/{}", escape_key(key));
        self.request(Method::DELETE, &path, &headers, Bytes::new())
            .await
    }

    /// `POST /v1/kv/{key}`: a command for the key's policy.
    pub async fn apply(&self, key: &str, command: Bytes) -> Result<Response, String> {
        let path = format!("/v1/kv/{}", escape_key(key));
        self.request(Method::POST, &path, &[], command).await
    }

    /// A JSON API call: the parsed body on success, else the response.
    pub async fn json(
        &self,
        method: Method,
        path: &str,
        body: Bytes,
    ) -> Result<Result<serde_json::Value, Response>, String> {
        let headers = [("content-type", "application/json".to_string())];
        let r = self.request(method, path, &headers, body).await?;
        if !r.status.is_success() {
            return Ok(Err(r));
        }
        serde_json::from_slice(&r.body)
            .map(Ok)
            .map_err(|e| format!("{}{path}: bad JSON: {e}", self.endpoint))
    }

    /// `GET /v1/cluster`.
    pub async fn cluster(&self) -> Result<crate::views::ClusterView, String> {
        let r = self
            .request(Method::GET, "/v1/cluster", &[], Bytes::new())
            .await?;
        if r.status != StatusCode::OK {
            return Err(format!(
                "{}: {} {}",
                self.endpoint,
                r.status,
                r.error_message()
            ));
        }
        serde_json::from_slice(&r.body)
            .map_err(|e| format!("{}: bad cluster view: {e}", self.endpoint))
    }

    /// `GET /readyz`: true when the replica serves clients.
    pub async fn ready(&self) -> bool {
        matches!(
            self.request(Method::GET, "/readyz", &[], Bytes::new()).await,
            Ok(r) if r.status == StatusCode::OK
        )
    }

    /// `GET /healthz`: true when the replica's process answers 200.
    pub async fn healthy(&self) -> bool {
        matches!(
            self.request(Method::GET, "/healthz", &[], Bytes::new()).await,
            Ok(r) if r.status == StatusCode::OK
        )
    }
}

/// The headers that state a precondition.
pub fn precondition_headers(pre: Precondition) -> Vec<(&'static str, String)> {
    match pre {
        Precondition::None => Vec::new(),
        Precondition::Absent => vec![("if-none-match", "*".to_string())],
        Precondition::Version(v) => vec![("if-match", format!("\"{v}\""))],
    }
}

/// One server-sent event (`/v1/watch`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SseEvent {
    /// `message` unless the server named it (`gone`, `error`).
    pub event: String,
    pub id: Option<String>,
    pub data: String,
}

/// A stream of server-sent events, read as they arrive.
pub struct EventStream {
    body: hyper::body::Incoming,
    buf: Vec<u8>,
}

impl EventStream {
    /// The next event; `None` when the server ends the stream.
    pub async fn next(&mut self) -> Option<Result<SseEvent, String>> {
        loop {
            if let Some(end) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = self.buf.drain(..end + 2).collect();
                let mut event = SseEvent {
                    event: "message".into(),
                    ..SseEvent::default()
                };
                let mut any = false;
                for line in String::from_utf8_lossy(&block).lines() {
                    let (field, value) = line.split_once(':').unwrap_or((line, ""));
                    let value = value.strip_prefix(' ').unwrap_or(value);
                    match field {
                        "event" => event.event = value.to_string(),
                        "id" => event.id = Some(value.to_string()),
                        "data" => {
                            if any {
                                event.data.push('\n');
                            }
                            event.data.push_str(value);
                            any = true;
                        }
                        _ => {} // a comment (the heartbeat) or unknown
                    }
                }
                if any {
                    return Some(Ok(event));
                }
                continue;
            }
            match self.body.frame().await? {
                Ok(frame) => {
                    if let Some(data) = frame.data_ref() {
                        self.buf.extend_from_slice(data);
                    }
                }
                Err(e) => return Some(Err(e.to_string())),
            }
        }
    }
}

impl Client {
    /// `GET path` answered as a stream of server-sent events; an answer
    /// that is not 200 is returned whole, as an error.
    pub async fn events(
        &self,
        path: &str,
        headers: &[(&str, String)],
    ) -> Result<Result<EventStream, Response>, String> {
        let url = format!("{}{}", self.endpoint, path);
        let mut builder = Request::builder().method(Method::GET).uri(&url);
        for (name, value) in headers {
            builder = builder.header(*name, value);
        }
        if let Some(token) = &self.token {
            builder = builder.header("authorization", format!("Bearer {token}"));
        }
        let request = builder
            .body(Full::new(Bytes::new()))
            .map_err(|e| format!("{url}: {e}"))?;
        let response = tokio::time::timeout(self.timeout, self.http.request(request))
            .await
            .map_err(|_| format!("{url}: no answer in {:?}", self.timeout))?
            .map_err(|e| format!("{url}: {e}"))?;
        let (parts, body) = response.into_parts();
        if parts.status != StatusCode::OK {
            let bytes = body
                .collect()
                .await
                .map_err(|e| format!("{url}: {e}"))?
                .to_bytes();
            let version = None;
            return Ok(Err(Response {
                status: parts.status,
                version,
                leader: None,
                body: bytes,
            }));
        }
        Ok(Ok(EventStream {
            body,
            buf: Vec::new(),
        }))
    }
}
