//! `/api/admin` usage reports, usage records across users, and the headline stats (role `admin`).

use axum::extract::State;
use chrono::Utc;
use serde::{Deserialize, Serialize};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::accounts::session::AdminUser;
use crate::error::{ApiResult, Json, Query};
use crate::routes::Paginated;
use crate::routes::usage::{
    UsageRecordView, UsageReport, build_report, parse_group_by, usage_filter,
};
use crate::state::AppState;
use crate::store::{self, nanos_to_usd};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(usage_report))
        .routes(routes!(usage_records))
        .routes(routes!(stats))
        .routes(routes!(routing_health))
}

/// `?from=&to=&group_by=&user_id=&model=&key_id=`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct AdminUsageQuery {
    /// RFC 3339 or YYYY-MM-DD; records at or after.
    pub from: Option<String>,
    /// RFC 3339 or YYYY-MM-DD; records before.
    pub to: Option<String>,
    /// `model` (default) | `provider` | `day` | `key` | `user`.
    pub group_by: Option<String>,
    /// Only this user's records.
    pub user_id: Option<String>,
    pub model: Option<String>,
    pub key_id: Option<String>,
}

fn non_empty(s: Option<String>) -> Option<String> {
    s.filter(|s| !s.is_empty())
}

/// Usage across users (or one, with `user_id`), grouped and summed.
#[utoipa::path(get, path = "/api/admin/usage", tag = "admin", security(("access_token" = [])),
    params(AdminUsageQuery),
    responses((status = 200, body = UsageReport), (status = 400, body = crate::error::ErrorBody),
              (status = 403, body = crate::error::ErrorBody)))]
async fn usage_report(
    State(state): State<AppState>,
    _admin: AdminUser,
    Query(q): Query<AdminUsageQuery>,
) -> ApiResult<Json<UsageReport>> {
    let group = parse_group_by(q.group_by.as_deref(), true)?;
    let filter = usage_filter(
        q.from.as_deref(),
        q.to.as_deref(),
        q.model,
        q.key_id,
        non_empty(q.user_id),
    )?;
    Ok(Json(build_report(&state, &filter, group).await?))
}

/// `?from=&to=&user_id=&model=&key_id=&page=&per_page=`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct AdminRecordsQuery {
    /// RFC 3339; records at or after.
    pub from: Option<String>,
    /// RFC 3339; records before.
    pub to: Option<String>,
    /// Only this user's records.
    pub user_id: Option<String>,
    pub model: Option<String>,
    pub key_id: Option<String>,
    pub page: Option<u64>,
    pub per_page: Option<u64>,
}

/// A usage record with the user it belongs to.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AdminUsageRecordView {
    pub user_id: String,
    #[serde(flatten)]
    pub record: UsageRecordView,
}

/// Usage records of every user (or one, with `user_id`), newest first.
#[utoipa::path(get, path = "/api/admin/usage/records", tag = "admin", security(("access_token" = [])),
    params(AdminRecordsQuery),
    responses((status = 200, body = Paginated<AdminUsageRecordView>), (status = 400, body = crate::error::ErrorBody),
              (status = 403, body = crate::error::ErrorBody)))]
async fn usage_records(
    State(state): State<AppState>,
    _admin: AdminUser,
    Query(q): Query<AdminRecordsQuery>,
) -> ApiResult<Json<Paginated<AdminUsageRecordView>>> {
    let req = crate::routes::page_req(q.page, q.per_page)?;
    let filter = usage_filter(
        q.from.as_deref(),
        q.to.as_deref(),
        q.model,
        q.key_id,
        non_empty(q.user_id),
    )?;
    let page = store::usage::records(&state.db, &filter, req).await?;
    Ok(Json(Paginated::new(page, req, |r| AdminUsageRecordView {
        user_id: r.user_id.clone(),
        record: r.into(),
    })))
}

/// Headline numbers; the `_24h` ones cover the last 24 hours of usage records.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Stats {
    /// Every account, whatever its status.
    pub users: u64,
    /// Gateway keys that are switched on and not expired.
    pub active_keys: u64,
    pub requests_24h: i64,
    /// Prompt + completion tokens.
    pub tokens_24h: i64,
    pub cost_usd_24h: f64,
    /// Stored responses, conversations and stored chat completions of every user (counts only:
    /// admins never see their content).
    pub stored_responses: u64,
    pub conversations: u64,
    pub stored_completions: u64,
}

#[utoipa::path(get, path = "/api/admin/stats", tag = "admin", security(("access_token" = [])),
    responses((status = 200, body = Stats), (status = 403, body = crate::error::ErrorBody)))]
async fn stats(State(state): State<AppState>, _admin: AdminUser) -> ApiResult<Json<Stats>> {
    let now = Utc::now();
    let o = store::stats::overview(&state.db, now, now - chrono::Duration::hours(24)).await?;
    Ok(Json(Stats {
        users: o.users,
        active_keys: o.active_keys,
        requests_24h: o.usage.requests,
        tokens_24h: o
            .usage
            .prompt_tokens
            .saturating_add(o.usage.completion_tokens),
        cost_usd_24h: nanos_to_usd(o.usage.cost_nanos),
        stored_responses: o.stored_responses,
        conversations: o.conversations,
        stored_completions: o.stored_completions,
    }))
}

/// Routing health as this replica sees it (spec §11).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct RoutingHealth {
    /// One entry per deployment (provider, upstream model) and provider key (masked) this
    /// replica has routed to; counts and p50 over the last five minutes.
    pub data: Vec<crate::routing::health::PairReport>,
}

/// Per deployment and provider key: `healthy` | `cooling_down` | `open` | `invalid`, requests,
/// failures and p50 latency over the last five minutes, as this replica saw them.
#[utoipa::path(get, path = "/api/admin/routing/health", tag = "admin", security(("access_token" = [])),
    responses((status = 200, body = RoutingHealth), (status = 403, body = crate::error::ErrorBody)))]
async fn routing_health(
    State(state): State<AppState>,
    _admin: AdminUser,
) -> ApiResult<Json<RoutingHealth>> {
    Ok(Json(RoutingHealth {
        data: state.health.report(),
    }))
}
