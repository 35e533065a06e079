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

/// The longest client-sent `x-request-id` kept; a longer one is replaced by a new id.
pub const MAX_REQUEST_ID_LEN: usize = 128;

/// Is this client-sent `x-request-id` fit to echo, forward upstream and log? 1 to
/// [`MAX_REQUEST_ID_LEN`] visible ASCII characters (0x21–0x7E); anything else is replaced.
pub fn valid_request_id(v: &HeaderValue) -> bool {
    let b = v.as_bytes();
    (1..=MAX_REQUEST_ID_LEN).contains(&b.len()) && b.iter().all(|c| (0x21..=0x7e).contains(c))
}

/// The request's id: the client's single valid `x-request-id`, else a new one (written into the
/// request in place of whatever the client sent).
fn request_id_of(headers: &mut http::HeaderMap) -> HeaderValue {
    let mut sent = headers.get_all(X_REQUEST_ID).iter();
    if let (Some(v), None) = (sent.next(), sent.next())
        && valid_request_id(v)
    {
        return v.clone();
    }
    let v = new_request_id();
    headers.insert(X_REQUEST_ID, v.clone());
    v
}

/// For the router: drops a client's `x-request-id` that [`valid_request_id`] refuses (or one sent
/// twice), so the request-id layer after it makes a new one.
pub fn drop_bad_request_id<B>(mut req: http::Request<B>) -> http::Request<B> {
    let mut sent = req.headers().get_all(X_REQUEST_ID).iter();
    let keep = match (sent.next(), sent.next()) {
        (None, _) => true,
        (Some(v), None) => valid_request_id(v),
        _ => false,
    };
    if !keep {
        req.headers_mut().remove(X_REQUEST_ID);
    }
    req
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
    let request_id = request_id_of(req.headers_mut());
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
    } else if surface == Surface::OpenAi || path.starts_with("/api/chat") {
        // A chat answer is as long as a `/v1` stream's, and bounded the same way.
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

/// `/api/auth/*` routes that need a valid access token and check no password or code (the
/// console verifies its session on every page load): they cost what any signed-in `/api` call
/// costs, so they do not use up an address's sign-in budget.
const AUTH_UNTHROTTLED: [&str; 2] = ["/api/auth/verify", "/api/auth/logout"];

/// The 429 of an anonymous `/api/auth/*` request (register, confirm, login, password reset)
/// past its address's `auth.ip_rpm`, if it is one.
fn throttle_auth(state: &AppState, path: &str, req: &Request) -> Option<Response> {
    if !path.starts_with("/api/auth/") || AUTH_UNTHROTTLED.contains(&path) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_bounded_visible_ascii() {
        for ok in ["a", "req-1", &"x".repeat(MAX_REQUEST_ID_LEN), "!~{}"] {
            assert!(
                valid_request_id(&HeaderValue::from_str(ok).expect("hv")),
                "{ok}"
            );
        }
        for bad in ["", "a b", "tab\there", &"x".repeat(MAX_REQUEST_ID_LEN + 1)] {
            assert!(
                !valid_request_id(&HeaderValue::from_str(bad).expect("hv")),
                "{bad}"
            );
        }
        assert!(!valid_request_id(
            &HeaderValue::from_bytes(b"caf\xc3\xa9").expect("hv")
        ));
        let mut h = http::HeaderMap::new();
        h.append(X_REQUEST_ID, HeaderValue::from_static("one"));
        h.append(X_REQUEST_ID, HeaderValue::from_static("two"));
        let id = request_id_of(&mut h);
        assert_ne!(id, "one");
        assert_eq!(h.get_all(X_REQUEST_ID).iter().count(), 1);
    }
}
