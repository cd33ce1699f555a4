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
