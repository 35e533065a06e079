//! What every request passes through: a request id, the access log (once, with any internal
//! error detail), HTTP metrics, and the management-call timeout.
//!
//! Two doors lead here. Most routes go through the router, where [`edge`] is a middleware and
//! tower-http sets and propagates `x-request-id`. The proxied `/v1` POST routes take [`proxy`],
//! straight from the connection (`server::serve`): the same request id, log line and metrics, and
//! then `proxy::forward`, without the router's layers (~7% of a worker's time per request at one
//! connection, by perf). CORS lives in the router, so with `server.cors_origins` set every request
//! takes the router.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::{HeaderName, HeaderValue, Method};

use crate::error::{ApiError, ErrorDetail};
use crate::providers::Endpoint;
use crate::state::AppState;
use crate::telemetry::Surface;

pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// A new request id: a UUIDv7, so ids sort by time and the usage records' request-id index grows
/// at its end instead of at random pages (a v4 made every usage batch dirty pages all over it).
pub fn new_request_id() -> HeaderValue {
    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
    let id = uuid::Uuid::now_v7().hyphenated().encode_lower(&mut buf);
    HeaderValue::from_str(id).expect("a UUID is a valid header value")
}

/// The proxied route a request takes without the router, if any.
pub fn proxied(req: &http::Request<hyper::body::Incoming>) -> Option<Endpoint> {
    if req.method() != Method::POST {
        return None;
    }
    Endpoint::from_v1_path(req.uri().path())
}

/// A proxied `/v1` request from the connection: what the router's layers and `edge` do for it,
/// then `proxy::forward`.
pub async fn proxy(
    state: AppState,
    endpoint: Endpoint,
    peer: SocketAddr,
    req: http::Request<hyper::body::Incoming>,
) -> Response {
    let start = Instant::now();
    let mut req = req.map(axum::body::Body::new);
    let request_id = match req.headers().get(X_REQUEST_ID) {
        Some(v) => v.clone(),
        None => {
            let v = new_request_id();
            req.headers_mut().insert(X_REQUEST_ID, v.clone());
            v
        }
    };
    let ip = crate::routes::client_ip_of(
        req.headers(),
        Some(peer),
        state.config.server.trust_forwarded_for,
    );
    let mut resp = crate::proxy::forward(state.clone(), endpoint, ip, req).await;
    let id = request_id.to_str().unwrap_or_default();
    record(
        &state,
        Surface::OpenAi,
        &Method::POST,
        endpoint.v1_path(),
        id,
        start.elapsed(),
        &resp,
    );
    if !resp.headers().contains_key(X_REQUEST_ID) {
        resp.headers_mut().insert(X_REQUEST_ID, request_id);
    }
    resp
}

pub async fn edge(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let surface = Surface::of(&path);
    let request_id = req
        .headers()
        .get(X_REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();

    // `/v1` streams may legitimately run for minutes; their bounds are the upstream timeouts.
    let resp = if let Some(refusal) = throttle_auth(&state, &path, &req) {
        refusal
    } else if surface == Surface::OpenAi {
        next.run(req).await
    } else {
        let limit = Duration::from_secs(state.config.server.request_timeout_secs.max(1));
        match tokio::time::timeout(limit, next.run(req)).await {
            Ok(r) => r,
            Err(_) => ApiError::Timeout.into_response(),
        }
    };
    record(
        &state,
        surface,
        &method,
        &path,
        &request_id,
        start.elapsed(),
        &resp,
    );
    resp
}

/// The 429 of an `/api/auth/*` request past its address's `auth.ip_rpm`, if it is one.
fn throttle_auth(state: &AppState, path: &str, req: &Request) -> Option<Response> {
    if !path.starts_with("/api/auth/") {
        return None;
    }
    let peer = req
        .extensions()
        .get::<axum::extract::ConnectInfo<SocketAddr>>()
        .map(|c| c.0);
    let ip =
        crate::routes::client_ip_of(req.headers(), peer, state.config.server.trust_forwarded_for);
    let retry_after_secs = state.auth_throttle.check(ip).err()?;
    state
        .metrics
        .rate_limited_total
        .with_label_values(&["auth_ip"])
        .inc();
    Some(
        ApiError::RateLimited {
            message: format!(
                "Too many requests to /api/auth from this address; retry in {retry_after_secs} seconds."
            ),
            code: "rate_limit_exceeded",
            retry_after_secs,
        }
        .into_response(),
    )
}

/// Counts the answer and logs its line (with the internal error detail, if any).
fn record(
    state: &AppState,
    surface: Surface,
    method: &Method,
    path: &str,
    request_id: &str,
    elapsed: Duration,
    resp: &Response,
) {
    let status = resp.status();
    state.metrics.http_requests(surface, status.as_u16()).inc();
    if surface != Surface::OpenAi {
        state
            .metrics
            .management_duration
            .observe(elapsed.as_secs_f64());
    }
    let latency_ms = elapsed.as_secs_f64() * 1000.0;
    if let Some(ErrorDetail(detail)) = resp.extensions().get::<ErrorDetail>() {
        tracing::error!(%method, %path, status = status.as_u16(), latency_ms, request_id, error = %detail, "request failed");
    } else if path != "/health"
        && path != "/metrics"
        && !crate::telemetry::access_line(method, path, status.as_u16(), latency_ms, request_id)
    {
        tracing::info!(%method, %path, status = status.as_u16(), latency_ms, request_id, "request");
    }
}
