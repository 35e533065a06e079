//! Usage the signed-in user can see: the metered records of their own requests.

use axum::extract::State;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::accounts::session::CurrentUser;
use crate::error::{ApiError, ApiResult, Json, Query};
use crate::routes::{Paginated, rfc3339};
use crate::state::AppState;
use crate::store::{self, PageReq, nanos_to_usd, usage::UsageFilter};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(my_records))
}

/// A usage record as users see it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct UsageRecordView {
    pub id: String,
    pub at: String,
    pub key_id: String,
    pub model: String,
    pub provider: String,
    pub endpoint: String,
    pub stream: bool,
    pub status: i32,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub cached_tokens: i64,
    pub cost_usd: f64,
    pub latency_ms: i64,
    pub ttft_ms: Option<i64>,
    /// The upstream reported no usage; the gateway counted the tokens itself.
    pub tokens_estimated: bool,
    pub request_id: String,
}

impl From<entity::usage_records::Model> for UsageRecordView {
    fn from(r: entity::usage_records::Model) -> Self {
        Self {
            id: r.id.to_string(),
            at: rfc3339(r.at),
            key_id: r.key_id,
            model: r.model,
            provider: r.provider,
            endpoint: r.endpoint,
            stream: r.stream,
            status: r.status,
            prompt_tokens: r.prompt_tokens,
            completion_tokens: r.completion_tokens,
            cached_tokens: r.cached_tokens,
            cost_usd: nanos_to_usd(r.cost_nanos),
            latency_ms: r.latency_ms,
            ttft_ms: r.ttft_ms,
            tokens_estimated: r.tokens_estimated,
            request_id: r.request_id,
        }
    }
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct RecordsQuery {
    /// RFC 3339; records at or after.
    pub from: Option<String>,
    /// RFC 3339; records before.
    pub to: Option<String>,
    pub model: Option<String>,
    pub key_id: Option<String>,
    pub page: Option<u64>,
    pub per_page: Option<u64>,
}

/// Parses an RFC 3339 bound (a bare `YYYY-MM-DD` means midnight UTC).
pub fn parse_time(param: &str, s: &str) -> ApiResult<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|d| d.and_utc())
        .ok_or_else(|| {
            ApiError::invalid_param(
                param,
                format!("`{param}` must be an RFC 3339 time or YYYY-MM-DD."),
            )
        })
}

impl RecordsQuery {
    pub fn filter(&self, user_id: Option<String>) -> ApiResult<UsageFilter> {
        Ok(UsageFilter {
            user_id,
            from: self
                .from
                .as_deref()
                .map(|s| parse_time("from", s))
                .transpose()?,
            to: self
                .to
                .as_deref()
                .map(|s| parse_time("to", s))
                .transpose()?,
            model: self.model.clone(),
            key_id: self.key_id.clone(),
        })
    }
}

/// The signed-in user's usage records, newest first.
#[utoipa::path(get, path = "/api/me/usage/records", tag = "usage", security(("access_token" = [])),
    params(RecordsQuery),
    responses((status = 200, body = Paginated<UsageRecordView>), (status = 400, body = crate::error::ErrorBody),
              (status = 401, body = crate::error::ErrorBody)))]
async fn my_records(
    State(state): State<AppState>,
    user: CurrentUser,
    Query(q): Query<RecordsQuery>,
) -> ApiResult<Json<Paginated<UsageRecordView>>> {
    let filter = q.filter(Some(user.id().to_owned()))?;
    let req = PageReq::new(q.page, q.per_page);
    let page = store::usage::records(&state.db, &filter, req).await?;
    Ok(Json(Paginated::new(page, req, UsageRecordView::from)))
}
