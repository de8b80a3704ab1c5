//! `ApiError`, the one HTTP error type: a status and a message for the client (as
//! `{"error": ...}`), with the header the status calls for. The detail is logged where the
//! error arises, once; the client's message never carries secrets.

use actix_web::http::{header, StatusCode};
use actix_web::{web, HttpResponse, ResponseError};

use crate::auth::AuthError;
use crate::bus::BusError;
use crate::telemetry::stats::Stats;

/// A clear status and message for the client; the detail is logged where it arises.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    /// A header the status calls for (`Allow` with 405, `WWW-Authenticate` with 401 and 403).
    header: Option<(header::HeaderName, &'static str)>,
    /// A batch publish's outcome per event, when Redis took only part of it.
    results: Option<Vec<serde_json::Value>>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            header: None,
            results: None,
        }
    }

    pub(crate) fn with_results(self, results: Vec<serde_json::Value>) -> ApiError {
        ApiError {
            results: Some(results),
            ..self
        }
    }

    /// 503: the request may succeed later, here or on another replica.
    pub(crate) fn unavailable(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, message)
    }

    pub(crate) fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }

    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// What the client is told.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status);
        if let Some(extra) = &self.header {
            response.insert_header(extra.clone());
        }
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            // Spread the retries of many refused clients over a few seconds.
            response.insert_header((header::RETRY_AFTER, fastrand::u8(1..=5).to_string()));
        }
        match &self.results {
            None => response.json(serde_json::json!({ "error": self.message })),
            Some(results) => {
                response.json(serde_json::json!({ "error": self.message, "results": results }))
            }
        }
    }
}

impl ApiError {
    /// 401 or 403, with the `WWW-Authenticate` challenge of RFC 6750; counted in `stats`.
    pub(crate) fn auth(e: AuthError, stats: &Stats) -> ApiError {
        let (status, challenge, counter) = match &e {
            AuthError::Missing(_) => (
                StatusCode::UNAUTHORIZED,
                r#"Bearer realm="sse-gateway""#,
                &stats.unauthorized,
            ),
            AuthError::Invalid(_) => (
                StatusCode::UNAUTHORIZED,
                r#"Bearer realm="sse-gateway", error="invalid_token""#,
                &stats.unauthorized,
            ),
            AuthError::Forbidden(_) => (
                StatusCode::FORBIDDEN,
                r#"Bearer realm="sse-gateway", error="insufficient_scope""#,
                &stats.forbidden,
            ),
        };
        stats.record(counter);
        ApiError {
            header: Some((header::WWW_AUTHENTICATE, challenge)),
            ..ApiError::new(status, e.to_string())
        }
    }
}

impl From<BusError> for ApiError {
    fn from(e: BusError) -> ApiError {
        match e {
            BusError::Rejected(message) => ApiError::bad_request(message),
            BusError::TooLarge(message) => ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, message),
            // The IETF idempotency-key draft's answer to a key reused with another payload.
            BusError::KeyReused(message) => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, message)
            }
            unconfirmed @ BusError::Unconfirmed { .. } => {
                tracing::warn!(%unconfirmed, "publish not confirmed by enough replicas");
                ApiError::unavailable(unconfirmed.to_string())
            }
            BusError::Unavailable(detail) => {
                tracing::warn!(%detail, "bus unavailable");
                ApiError::unavailable("event store unavailable, retry later")
            }
        }
    }
}

/// A resource that answers other methods with 405 and an `Allow` header.
pub(crate) fn only(resource: actix_web::Resource, method: &'static str) -> actix_web::Resource {
    resource.default_service(web::to(move || async move {
        Err::<HttpResponse, _>(ApiError {
            header: Some((header::ALLOW, method)),
            ..ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("method not allowed; use {method}"),
            )
        })
    }))
}
