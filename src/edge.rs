//! What every request passes through: access log (once, with any internal error detail), HTTP
//! metrics, and the management-call timeout.

use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::{ApiError, ErrorDetail};
use crate::state::AppState;

fn surface(path: &str) -> &'static str {
    if path.starts_with("/v1/") || path == "/v1" {
        "openai"
    } else if path.starts_with("/api/") {
        "api"
    } else {
        "ops"
    }
}

pub async fn edge(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let surface = surface(&path);
    let request_id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();

    // `/v1` streams may legitimately run for minutes; their bounds are the upstream timeouts.
    let resp = if surface == "openai" {
        next.run(req).await
    } else {
        let limit = Duration::from_secs(state.config.server.request_timeout_secs.max(1));
        match tokio::time::timeout(limit, next.run(req)).await {
            Ok(r) => r,
            Err(_) => ApiError::Timeout.into_response(),
        }
    };

    let status = resp.status();
    let elapsed = start.elapsed();
    let class = match status.as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    };
    state
        .metrics
        .http_requests_total
        .with_label_values(&[surface, class])
        .inc();
    if surface != "openai" {
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
        && !crate::telemetry::access_line(&method, &path, status.as_u16(), latency_ms, &request_id)
    {
        tracing::info!(%method, %path, status = status.as_u16(), latency_ms, request_id, "request");
    }
    resp
}
