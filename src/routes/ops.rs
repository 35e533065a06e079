//! Operations: `/health`, `/ready`, `/info`, `/metrics`.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::{ApiError, Json};
use crate::state::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(health))
        .routes(routes!(ready))
        .routes(routes!(info))
        .routes(routes!(metrics))
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct Health {
    status: &'static str,
    version: &'static str,
}

/// Liveness: answers without touching the database.
#[utoipa::path(get, path = "/health", tag = "operations", responses((status = 200, body = Health)))]
async fn health() -> Json<Health> {
    Json(Health {
        status: "healthy",
        version: env!("CARGO_PKG_VERSION"),
    })
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct Ready {
    status: &'static str,
}

/// Readiness: 200 when the database answers, else 503.
#[utoipa::path(get, path = "/ready", tag = "operations",
    responses((status = 200, body = Ready), (status = 503, body = crate::error::ErrorBody)))]
async fn ready(State(state): State<AppState>) -> Result<Json<Ready>, ApiError> {
    match tokio::time::timeout(std::time::Duration::from_secs(3), state.db.ping()).await {
        Ok(Ok(())) => Ok(Json(Ready { status: "ready" })),
        _ => Err(ApiError::Unavailable {
            message: "The database is not answering.".into(),
        }),
    }
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct Info {
    version: &'static str,
    uptime_secs: u64,
    /// `sqlite` | `postgres` | `mysql`.
    database: &'static str,
}

#[utoipa::path(get, path = "/info", tag = "operations", responses((status = 200, body = Info)))]
async fn info(State(state): State<AppState>) -> Json<Info> {
    Json(Info {
        version: env!("CARGO_PKG_VERSION"),
        uptime_secs: state.started_at.elapsed().as_secs(),
        database: state.db_kind.as_str(),
    })
}

/// Prometheus text exposition; requires `Authorization: Bearer <server.metrics_token>` when set.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain"),
              (status = 401, body = crate::error::ErrorBody)))]
async fn metrics(State(state): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    if let Some(expected) = state.config.metrics_token() {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default();
        if !constant_time_eq(given.as_bytes(), expected.as_bytes()) {
            return Err(ApiError::unauthorized(
                "invalid_api_key",
                "The metrics endpoint needs the configured bearer token.",
            ));
        }
    }
    // Read at scrape time: events queued plus slots reserved by requests still in flight.
    state
        .metrics
        .usage_queue_depth
        .set(i64::try_from(state.usage.depth()).unwrap_or(i64::MAX));
    Ok((
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response())
}

/// Compares without an early exit, so timing does not reveal a token's prefix.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
