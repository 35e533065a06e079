//! Plans: the configured catalog (`GET /api/plans`) and self-service renewal paid from the
//! balance (`POST /api/me/plan/renew`).

use axum::extract::State;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::accounts::session::CurrentUser;
use crate::error::{ApiError, ApiResult, Json};
use crate::routes::admin::LedgerEntryView;
use crate::routes::me::{UserView, user_target};
use crate::routes::{ClientIp, rfc3339};
use crate::state::AppState;
use crate::store;
use crate::store::audit::AuditEntry;
use crate::store::ledger::LedgerError;
use crate::store::plans::{Renew, Renewed};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_plans))
        .routes(routes!(renew))
}

/// A plan: its limits replace the defaults while it has not expired (a per-user limit an
/// administrator set still wins).
#[derive(Debug, Serialize, ToSchema)]
pub struct PlanView {
    pub name: String,
    /// Requests per minute for the user; 0 = no limit.
    pub rpm_limit: u32,
    /// Tokens per minute for the user; 0 = no limit.
    pub tpm_limit: u32,
    pub price_usd_per_month: f64,
}

/// `{"data": [plans]}` in configuration order.
#[derive(Debug, Serialize, ToSchema)]
pub struct PlanList {
    pub data: Vec<PlanView>,
}

/// The configured plans (any signed-in user).
#[utoipa::path(get, path = "/api/plans", tag = "plans", security(("access_token" = [])),
    responses((status = 200, body = PlanList), (status = 401, body = crate::error::ErrorBody)))]
async fn list_plans(State(state): State<AppState>, _user: CurrentUser) -> Json<PlanList> {
    Json(PlanList {
        data: state
            .config
            .plans
            .iter()
            .map(|p| PlanView {
                name: p.name.clone(),
                rpm_limit: p.rpm_limit,
                tpm_limit: p.tpm_limit,
                price_usd_per_month: p.price_usd_per_month,
            })
            .collect(),
    })
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RenewPlan {
    /// A configured plan's name.
    pub plan: String,
    /// 1–36.
    pub months: i64,
}

/// The renewed account and the ledger entry that paid for it.
#[derive(Debug, Serialize, ToSchema)]
pub struct RenewalView {
    pub user: UserView,
    pub transaction: LedgerEntryView,
}

/// Buys `months` × 30 days of `plan` from the balance (ledger kind `renewal`). Renewing the plan
/// one already has extends it from its current expiry; another plan starts now and replaces it.
/// 429 `insufficient_quota` when the balance does not cover the price.
#[utoipa::path(post, path = "/api/me/plan/renew", tag = "plans", security(("access_token" = [])),
    request_body = RenewPlan,
    responses((status = 200, body = RenewalView), (status = 400, body = crate::error::ErrorBody),
              (status = 401, body = crate::error::ErrorBody), (status = 429, body = crate::error::ErrorBody)))]
async fn renew(
    State(state): State<AppState>,
    me: CurrentUser,
    ip: ClientIp,
    Json(body): Json<RenewPlan>,
) -> ApiResult<Json<RenewalView>> {
    let plan = state
        .config
        .plans
        .iter()
        .find(|p| p.name == body.plan)
        .ok_or_else(|| {
            ApiError::invalid_param(
                "plan",
                format!(
                    "no plan named {:?} is configured (see GET /api/plans)",
                    body.plan
                ),
            )
        })?;
    let months = u32::try_from(body.months)
        .ok()
        .filter(|m| (1..=36).contains(m))
        .ok_or_else(|| ApiError::invalid_param("months", "months must be between 1 and 36"))?;
    let price_nanos =
        store::usd_to_nanos(plan.price_usd_per_month).saturating_mul(i64::from(months));
    let Renewed { user, entry } = store::plans::renew(
        &state.db,
        Renew {
            user_id: me.id(),
            plan: &plan.name,
            months,
            price_nanos,
        },
    )
    .await
    .map_err(|e| match e {
        LedgerError::Insufficient => ApiError::quota(format!(
            "Your balance does not cover {months} month(s) of the {} plan (${:.2}); add credit first.",
            plan.name,
            store::nanos_to_usd(price_nanos)
        )),
        LedgerError::UserNotFound => ApiError::not_found("user"),
        LedgerError::Db(e) => e.into(),
    })?;
    // The new limits apply to the next request, on every replica.
    state.caches.invalidate_user(me.id()).await;
    store::audit::record(
        &state.db,
        AuditEntry {
            actor_id: Some(me.id()),
            action: "plan.renew",
            target: Some(user_target(me.id())),
            ip: ip.string().as_deref(),
            detail: Some(serde_json::json!({
                "plan": plan.name,
                "months": months,
                "amount_usd": store::nanos_to_usd(price_nanos),
                "plan_expires_at": user.plan_expires_at.map(rfc3339),
                "ledger_id": entry.id,
            })),
        },
    )
    .await?;
    Ok(Json(RenewalView {
        user: (&user).into(),
        transaction: entry.into(),
    }))
}
