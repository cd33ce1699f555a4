//! Reading request bodies under a byte limit, and the small encodings the
//! answers share (entity tags, a value as JSON).

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::{header, HeaderValue, StatusCode};
use ballot_core::Current;

use super::ApiError;
use crate::runtime::VALUE_MAX;

/// The entity tag of a version: `"<version>"`.
pub fn etag(version: u64) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{version}\"")).expect("digits are a valid header")
}

/// Parses an entity tag `"<version>"` (quotes optional).
pub fn parse_etag(raw: &str) -> Option<u64> {
    let raw = raw.trim();
    let inner = raw
        .strip_prefix('"')
        .and_then(|r| r.strip_suffix('"'))
        .unwrap_or(raw);
    inner.parse().ok()
}

/// A key's value and version as JSON: `value` when it is UTF-8,
/// `value_hex` otherwise, `null` when absent.
pub fn current_json(current: &Current) -> serde_json::Value {
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

/// How long a request's body may take to arrive, from the end of its
/// head, by default. While a request is in flight its connection is never
/// idle, so without this a client that sends a head and then a byte a
/// minute would hold a connection and a task for ever.
pub const BODY: std::time::Duration = std::time::Duration::from_secs(60);
/// The range the body deadline is held to.
pub const BODY_RANGE: (std::time::Duration, std::time::Duration) = (
    std::time::Duration::from_secs(1),
    std::time::Duration::from_secs(3_600),
);

/// The error a body past its deadline ends with.
#[derive(Debug)]
struct BodyTimedOut;

impl std::fmt::Display for BodyTimedOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the request body did not arrive in time")
    }
}

impl std::error::Error for BodyTimedOut {}

/// A request body that fails with [`BodyTimedOut`] once its deadline
/// passes before its end.
struct Deadline {
    inner: Body,
    timer: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl hyper::body::Body for Deadline {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, axum::Error>>> {
        use std::future::Future;
        use std::task::Poll;
        if let Poll::Ready(frame) = std::pin::Pin::new(&mut self.inner).poll_frame(cx) {
            return Poll::Ready(frame);
        }
        match self.timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(axum::Error::new(BodyTimedOut)))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// Middleware: every request body must arrive within the deadline (the
/// state) from the moment its head was read; past it, reading the body
/// fails and the request is answered 408 `body-timeout`.
pub async fn deadline(
    axum::extract::State(within): axum::extract::State<std::time::Duration>,
    request: Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let request = request.map(|inner| {
        Body::new(Deadline {
            inner,
            timer: Box::pin(tokio::time::sleep(within)),
        })
    });
    next.run(request).await
}

/// Whether an error (or one of its sources) is a body past its deadline.
pub fn timed_out(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(e);
    while let Some(s) = source {
        if s.is::<BodyTimedOut>() {
            return true;
        }
        source = s.source();
    }
    false
}

/// The answer to a body that did not arrive in time.
pub fn body_timeout() -> ApiError {
    ApiError::new(
        StatusCode::REQUEST_TIMEOUT,
        "body-timeout",
        "the request body did not arrive in time",
    )
    .header(header::CONNECTION, HeaderValue::from_static("close"))
}

/// A value or command body, at most [`VALUE_MAX`] bytes.
pub async fn read_body(request: Request) -> Result<Bytes, ApiError> {
    read_body_max(request, VALUE_MAX, "values").await
}

/// A body of at most `max` bytes; `what` names it in the 413 answer.
/// Reads and drops a body that will not be used, up to `max` bytes and for
/// `within` at most, holding none of it: a client still sending a refused
/// request then reads the answer instead of a reset connection (a lingering
/// close).
pub async fn discard_body(request: Request, max: usize, within: std::time::Duration) {
    use http_body_util::BodyExt;
    let mut body = request.into_body();
    let mut seen = 0usize;
    let drain = async {
        while let Some(Ok(frame)) = body.frame().await {
            seen += frame.data_ref().map_or(0, |d| d.len());
            if seen > max {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(within, drain).await;
}

pub async fn read_body_max(request: Request, max: usize, what: &str) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too-large",
            format!("{what} are at most {max} bytes"),
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
            None => return Err(ApiError::bad_request("bad-request", "bad Content-Length")),
        }
    }
    let body: Body = request.into_body();
    axum::body::to_bytes(body, max).await.map_err(|e| {
        if timed_out(&e) {
            return body_timeout();
        }
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
        while let Some(s) = source {
            if s.is::<http_body_util::LengthLimitError>() {
                return too_large();
            }
            source = s.source();
        }
        ApiError::bad_request("bad-request", format!("reading the body: {e}"))
    })
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
