//! The one shape of every error the API answers:
//! `{"error":{"code":..., "message":..., ...}}`, with a status that says who
//! must act (4xx the client, 5xx the cluster). Handlers return
//! `Result<Response, ApiError>` and use `?`.

use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::membership::ChangeError;
use crate::registry::RegistryError;

/// An error answer, built up and then turned into a response.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: String,
    message: String,
    /// Fields beside `code` and `message` in the error object.
    extra: serde_json::Map<String, serde_json::Value>,
    headers: Vec<(HeaderName, HeaderValue)>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code: code.to_string(),
            message: message.into(),
            extra: serde_json::Map::new(),
            headers: Vec::new(),
        }
    }

    /// 400: the request itself is wrong.
    pub fn bad_request(code: &str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// 503: the cluster cannot answer now; `Retry-After` is set.
    pub fn unavailable(code: &str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, code, message)
    }

    /// 404.
    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not-found", message)
    }

    /// Adds a field to the error object.
    pub fn with(mut self, field: &str, value: impl Into<serde_json::Value>) -> ApiError {
        self.extra.insert(field.to_string(), value.into());
        self
    }

    /// Adds a header to the answer.
    pub fn header(mut self, name: HeaderName, value: HeaderValue) -> ApiError {
        self.headers.push((name, value));
        self
    }

    /// Adds the key's current version as its `ETag`.
    pub fn etag(self, version: u64) -> ApiError {
        self.header(header::ETAG, super::body::etag(version))
    }

    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// Whether the request may have taken effect although it failed.
    pub fn maybe_applied(&self) -> bool {
        self.extra.get("maybe_applied") == Some(&serde_json::Value::Bool(true))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut object = self.extra;
        object.insert("code".into(), self.code.into());
        object.insert("message".into(), self.message.into());
        // Every server-side failure tells whether retrying could apply a
        // write twice; unless the caller said otherwise, it did not reach
        // the core.
        if self.status.is_server_error() {
            object.entry("maybe_applied").or_insert(false.into());
        }
        let body = serde_json::json!({ "error": object });
        let mut response = (self.status, axum::Json(body)).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        for (name, value) in self.headers {
            response.headers_mut().insert(name, value);
        }
        response
    }
}

impl From<ChangeError> for ApiError {
    fn from(e: ChangeError) -> ApiError {
        match e {
            ChangeError::Invalid(m) => ApiError::bad_request("invalid-change", m),
            ChangeError::Unavailable(m) => ApiError::unavailable("unavailable", m),
        }
    }
}

/// A registry failure; `invalid_code` names what was invalid (a component,
/// a binding, an activation).
pub fn registry(e: RegistryError, invalid_code: &str) -> ApiError {
    match e {
        RegistryError::Invalid(m) => ApiError::bad_request(invalid_code, m),
        RegistryError::NotFound(m) => ApiError::not_found(m),
        RegistryError::Unavailable(m) => ApiError::unavailable("unavailable", m),
    }
}
