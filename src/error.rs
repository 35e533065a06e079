//! The one error type at the HTTP edge and its one renderer: OpenAI's
//! `{"error": {"message", "type", "param", "code"}}` on every route.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Internal detail of a 5xx, handed to the logging middleware through response extensions so that
/// it is logged once and never sent.
#[derive(Clone, Debug)]
pub struct ErrorDetail(pub String);

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400 `invalid_request_error`.
    #[error("{message}")]
    BadRequest {
        message: String,
        code: &'static str,
        param: Option<String>,
    },
    /// 401 `authentication_error`.
    #[error("{message}")]
    Unauthorized { message: String, code: &'static str },
    /// 403 `permission_error`.
    #[error("{message}")]
    Forbidden { message: String, code: &'static str },
    /// 404 `invalid_request_error`.
    #[error("{message}")]
    NotFound { message: String, code: &'static str },
    /// 405: the path exists with another method.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// 409 `invalid_request_error`.
    #[error("{message}")]
    Conflict { message: String },
    /// 413 `invalid_request_error`.
    #[error("The request body is larger than this server accepts (server.max_body_bytes).")]
    PayloadTooLarge,
    /// 429 `rate_limit_error` with `retry-after`.
    #[error("{message}")]
    RateLimited {
        message: String,
        code: &'static str,
        retry_after_secs: u64,
    },
    /// 429 `insufficient_quota` with `x-should-retry: false`.
    #[error("{message}")]
    InsufficientQuota { message: String },
    /// 502 / 504 `upstream_error`.
    #[error("{message}")]
    Upstream {
        status: StatusCode,
        message: String,
        code: &'static str,
    },
    /// 503 `server_error`.
    #[error("{message}")]
    Unavailable { message: String },
    /// 503 `server_error` with `retry-after`: a bounded resource (password hashing) is full.
    #[error("{message}")]
    Busy {
        message: String,
        retry_after_secs: u64,
    },
    /// 415: a request body in a `content-encoding` the gateway does not decode.
    #[error(
        "The request body's content-encoding `{0}` is not supported; send identity, gzip, deflate, br or zstd."
    )]
    UnsupportedEncoding(String),
    /// 408: the request body did not arrive within `server.body_read_timeout_secs`.
    #[error("The request body did not arrive within {0} seconds (server.body_read_timeout_secs).")]
    RequestTimeout(u64),
    /// 504 for a management call that ran past `server.request_timeout_secs`.
    #[error("request timed out")]
    Timeout,
    /// 500 `server_error`; the detail is logged, never sent.
    #[error("internal error: {0:#}")]
    Internal(anyhow::Error),
}

pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::BadRequest {
            message: message.into(),
            code,
            param: None,
        }
    }

    pub fn invalid_param(param: &str, message: impl Into<String>) -> Self {
        Self::BadRequest {
            message: message.into(),
            code: "invalid_value",
            param: Some(param.to_owned()),
        }
    }

    pub fn unauthorized(code: &'static str, message: impl Into<String>) -> Self {
        Self::Unauthorized {
            message: message.into(),
            code,
        }
    }

    pub fn forbidden(code: &'static str, message: impl Into<String>) -> Self {
        Self::Forbidden {
            message: message.into(),
            code,
        }
    }

    pub fn not_found(what: &str) -> Self {
        Self::NotFound {
            message: format!("{what} not found"),
            code: "not_found",
        }
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        Self::Conflict {
            message: message.into(),
        }
    }

    pub fn quota(message: impl Into<String>) -> Self {
        Self::InsufficientQuota {
            message: message.into(),
        }
    }

    pub fn internal(e: impl Into<anyhow::Error>) -> Self {
        Self::Internal(e.into())
    }

    /// Status, OpenAI `type`, `code`.
    pub fn parts(&self) -> (StatusCode, &'static str, Option<&'static str>) {
        use ApiError::*;
        match self {
            BadRequest { code, .. } => {
                (StatusCode::BAD_REQUEST, "invalid_request_error", Some(code))
            }
            Unauthorized { code, .. } => {
                (StatusCode::UNAUTHORIZED, "authentication_error", Some(code))
            }
            Forbidden { code, .. } => (StatusCode::FORBIDDEN, "permission_error", Some(code)),
            NotFound { code, .. } => (StatusCode::NOT_FOUND, "invalid_request_error", Some(code)),
            MethodNotAllowed => (
                StatusCode::METHOD_NOT_ALLOWED,
                "invalid_request_error",
                Some("method_not_allowed"),
            ),
            Conflict { .. } => (
                StatusCode::CONFLICT,
                "invalid_request_error",
                Some("conflict"),
            ),
            PayloadTooLarge => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                Some("payload_too_large"),
            ),
            RateLimited { code, .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                Some(code),
            ),
            InsufficientQuota { .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                "insufficient_quota",
                Some("insufficient_quota"),
            ),
            Upstream { status, code, .. } => (*status, "upstream_error", Some(code)),
            Unavailable { .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                Some("unavailable"),
            ),
            Busy { .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                Some("unavailable"),
            ),
            UnsupportedEncoding(_) => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "invalid_request_error",
                Some("unsupported_encoding"),
            ),
            RequestTimeout(_) => (
                StatusCode::REQUEST_TIMEOUT,
                "invalid_request_error",
                Some("request_timeout"),
            ),
            Timeout => (StatusCode::GATEWAY_TIMEOUT, "server_error", Some("timeout")),
            Internal(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                Some("internal_error"),
            ),
        }
    }

    pub fn public_message(&self) -> String {
        match self {
            ApiError::Internal(_) => {
                "The server had an error while processing your request.".into()
            }
            other => other.to_string(),
        }
    }

    fn param(&self) -> Option<&str> {
        match self {
            ApiError::BadRequest { param, .. } => param.as_deref(),
            _ => None,
        }
    }

    /// The JSON body, also used for the final SSE event of a stream that fails mid-way.
    pub fn body(&self) -> ErrorBody {
        let (_, kind, code) = self.parts();
        ErrorBody {
            error: ErrorObject {
                message: self.public_message(),
                r#type: kind.to_owned(),
                param: self.param().map(str::to_owned),
                code: code.map(str::to_owned),
            },
        }
    }
}

/// OpenAI's error envelope.
#[derive(Debug, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: ErrorObject,
}

#[derive(Debug, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct ErrorObject {
    pub message: String,
    pub r#type: String,
    pub param: Option<String>,
    pub code: Option<String>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, _, _) = self.parts();
        let mut resp = (status, axum::Json(self.body())).into_response();
        // Routes of another protocol (Anthropic's) re-render the body in their own shape.
        resp.extensions_mut()
            .insert(crate::pivot::UpstreamError::from(&self));
        let headers = resp.headers_mut();
        match &self {
            ApiError::RateLimited {
                retry_after_secs, ..
            }
            | ApiError::Busy {
                retry_after_secs, ..
            } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_secs));
            }
            ApiError::InsufficientQuota { .. } => {
                headers.insert("x-should-retry", HeaderValue::from_static("false"));
            }
            ApiError::Internal(e) => {
                resp.extensions_mut().insert(ErrorDetail(format!("{e:#}")));
            }
            _ => {}
        }
        resp
    }
}

impl From<sea_orm::DbErr> for ApiError {
    fn from(e: sea_orm::DbErr) -> Self {
        ApiError::Internal(e.into())
    }
}

impl From<crate::accounts::password::HashError> for ApiError {
    fn from(e: crate::accounts::password::HashError) -> Self {
        use crate::accounts::password::{BUSY_RETRY_AFTER_SECS, HashError};
        match e {
            HashError::Busy => ApiError::Busy {
                message: "The server is checking too many passwords at once; retry in a moment."
                    .into(),
                retry_after_secs: BUSY_RETRY_AFTER_SECS,
            },
            HashError::Failed(_) => ApiError::internal(anyhow::anyhow!(e)),
        }
    }
}

impl From<sea_orm::TransactionError<ApiError>> for ApiError {
    fn from(e: sea_orm::TransactionError<ApiError>) -> Self {
        match e {
            sea_orm::TransactionError::Connection(db) => db.into(),
            sea_orm::TransactionError::Transaction(api) => api,
        }
    }
}

/// Pulls `field` out of serde's "unknown field `field`" / "missing field `field`".
fn backticked(msg: &str) -> Option<String> {
    let start = msg.find('`')? + 1;
    let len = msg[start..].find('`')?;
    Some(msg[start..start + len].to_owned())
}

impl From<JsonRejection> for ApiError {
    fn from(rej: JsonRejection) -> Self {
        match rej {
            JsonRejection::JsonDataError(e) => {
                let msg = std::error::Error::source(&e)
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| e.body_text());
                let code = if msg.contains("unknown field") {
                    "unknown_field"
                } else if msg.contains("missing field") {
                    "missing_field"
                } else {
                    "invalid_value"
                };
                let param = backticked(&msg).or_else(|| {
                    // "name: invalid type ..." — serde_path_to_error style prefix.
                    msg.split_once(": ")
                        .map(|(p, _)| p.to_owned())
                        .filter(|p| !p.contains(' '))
                });
                ApiError::BadRequest {
                    message: format!("Invalid request body: {msg}"),
                    code,
                    param,
                }
            }
            JsonRejection::JsonSyntaxError(e) => ApiError::bad_request(
                "invalid_json",
                format!(
                    "We could not parse the JSON body of your request: {}",
                    std::error::Error::source(&e)
                        .map(|s| s.to_string())
                        .unwrap_or_default()
                ),
            ),
            JsonRejection::MissingJsonContentType(_) => ApiError::bad_request(
                "invalid_json",
                "Expected a JSON body with `Content-Type: application/json`.",
            ),
            JsonRejection::BytesRejection(e) => {
                if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::PayloadTooLarge
                } else {
                    ApiError::bad_request("invalid_body", e.body_text())
                }
            }
            other => ApiError::bad_request("invalid_json", other.body_text()),
        }
    }
}

/// `axum::Json` whose rejections render as OpenAI-shaped errors.
pub struct Json<T>(pub T);

impl<S, T> FromRequest<S> for Json<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let axum::Json(v) = axum::Json::<T>::from_request(req, state).await?;
        Ok(Json(v))
    }
}

impl<T: Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

/// `axum::extract::Query` with OpenAI-shaped rejections.
pub struct Query<T>(pub T);

impl<S, T> FromRequestParts<S> for Query<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| Query(q.0))
            .map_err(|e: QueryRejection| {
                let text = e.body_text();
                ApiError::BadRequest {
                    param: query_param(&text),
                    message: format!("Invalid query string: {text}"),
                    code: "invalid_value",
                }
            })
    }
}

/// The parameter a query rejection names: axum says "…query string: page: invalid digit…".
fn query_param(text: &str) -> Option<String> {
    let (_, rest) = text.split_once("query string: ")?;
    let (param, _) = rest.split_once(": ")?;
    (!param.is_empty() && !param.contains(' ')).then(|| param.to_owned())
}

/// `axum::extract::Path` with OpenAI-shaped rejections.
pub struct Path<T>(pub T);

impl<S, T> FromRequestParts<S> for Path<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| Path(p.0))
            .map_err(|e: PathRejection| {
                ApiError::bad_request("invalid_value", format!("Invalid path: {}", e.body_text()))
            })
    }
}
