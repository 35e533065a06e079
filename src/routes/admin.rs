//! `/api/admin` user administration, the audit log and runtime settings (role `admin`; others 403).

use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::accounts::session::AdminUser;
use crate::accounts::signup::{self, NewUser, Role, normalize_email};
use crate::accounts::{password, totp::Enrolment};
use crate::error::{ApiError, ApiResult, Json, Path, Query};
use crate::routes::auth::Registered;
use crate::routes::me::{UserView, double_option, parse_detail, reload, user_target};
use crate::routes::{ClientIp, Paginated, rfc3339};
use crate::settings::{self, SettingView, SettingsError};
use crate::state::AppState;
use crate::store;
use crate::store::ledger::{self, LedgerError};
use crate::validate;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_users, create_user))
        .routes(routes!(get_user, patch_user, delete_user))
        .routes(routes!(reset_password))
        .routes(routes!(reset_totp))
        .routes(routes!(adjust_balance))
        .routes(routes!(audit_log))
        .routes(routes!(list_settings))
        .routes(routes!(put_setting))
}

const STATUSES: [&str; 3] = ["pending_totp", "active", "disabled"];

async fn find_user(state: &AppState, id: &str) -> ApiResult<entity::users::Model> {
    store::users::find(&state.db, id)
        .await?
        .ok_or_else(|| ApiError::not_found("user"))
}

/// `?page=&per_page=&search=&role=&status=`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct UserListQuery {
    pub page: Option<u64>,
    pub per_page: Option<u64>,
    /// Case-insensitive substring of the username or e-mail.
    pub search: Option<String>,
    /// `admin` | `user`.
    pub role: Option<String>,
    /// `pending_totp` | `active` | `disabled`.
    pub status: Option<String>,
}

#[utoipa::path(get, path = "/api/admin/users", tag = "admin", security(("access_token" = [])),
    params(UserListQuery),
    responses((status = 200, body = Paginated<UserView>), (status = 400, body = crate::error::ErrorBody),
              (status = 403, body = crate::error::ErrorBody)))]
async fn list_users(
    State(state): State<AppState>,
    _admin: AdminUser,
    Query(q): Query<UserListQuery>,
) -> ApiResult<Json<Paginated<UserView>>> {
    let role = q.role.as_deref().filter(|r| !r.is_empty());
    if role.is_some_and(|r| Role::parse(r).is_none()) {
        return Err(ApiError::invalid_param(
            "role",
            "role must be \"admin\" or \"user\"",
        ));
    }
    let status = q.status.as_deref().filter(|s| !s.is_empty());
    if status.is_some_and(|s| !STATUSES.contains(&s)) {
        return Err(ApiError::invalid_param(
            "status",
            "status must be \"pending_totp\", \"active\" or \"disabled\"",
        ));
    }
    let req = crate::routes::page_req(q.page, q.per_page)?;
    let page = store::users::list(
        &state.db,
        store::users::UserFilter {
            search: q.search.as_deref(),
            role,
            status,
        },
        req,
    )
    .await?;
    Ok(Json(Paginated::new(page, req, |u| (&u).into())))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateUser {
    pub username: String,
    pub password: String,
    pub email: Option<String>,
    /// `user` (default) | `admin`.
    pub role: Option<String>,
}

/// Creates an account in `pending_totp`: the user still confirms the TOTP enrolment.
#[utoipa::path(post, path = "/api/admin/users", tag = "admin", security(("access_token" = [])),
    request_body = CreateUser,
    responses((status = 201, body = Registered), (status = 400, body = crate::error::ErrorBody),
              (status = 403, body = crate::error::ErrorBody), (status = 409, body = crate::error::ErrorBody)))]
async fn create_user(
    State(state): State<AppState>,
    admin: AdminUser,
    ip: ClientIp,
    Json(body): Json<CreateUser>,
) -> ApiResult<(StatusCode, Json<Registered>)> {
    let role = match body.role.as_deref() {
        None => Role::User,
        Some(r) => Role::parse(r)
            .ok_or_else(|| ApiError::invalid_param("role", "role must be \"admin\" or \"user\""))?,
    };
    let created = signup::create(
        &state.db,
        &state.keyring,
        &state.config,
        NewUser {
            username: &body.username,
            password: &body.password,
            email: body.email.as_deref(),
            role,
            active: false,
        },
    )
    .await?;
    super::audit(
        &state,
        &admin,
        &ip,
        "admin.user.create",
        user_target(&created.user.id),
        Some(serde_json::json!({ "username": created.user.username, "role": role.as_str() })),
    )
    .await?;
    Ok((
        StatusCode::CREATED,
        Json(Registered {
            user: (&created.user).into(),
            totp: created.totp,
        }),
    ))
}

#[utoipa::path(get, path = "/api/admin/users/{id}", tag = "admin", security(("access_token" = [])),
    params(("id" = String, Path, description = "User id")),
    responses((status = 200, body = UserView), (status = 404, body = crate::error::ErrorBody)))]
async fn get_user(
    State(state): State<AppState>,
    _admin: AdminUser,
    Path(id): Path<String>,
) -> ApiResult<Json<UserView>> {
    Ok(Json((&find_user(&state, &id).await?).into()))
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PatchUser {
    /// `null` or `""` removes it.
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<String>)]
    pub email: Option<Option<String>>,
    /// `admin` | `user`.
    pub role: Option<String>,
    /// `active` | `disabled` (a `pending_totp` account becomes active by confirming its TOTP).
    pub status: Option<String>,
    /// A configured plan's name; `null` removes the plan. A paid plan then expires one month on
    /// (extending the same unexpired plan, as a renewal does); a free plan or none never expires.
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<String>)]
    pub plan: Option<Option<String>>,
    /// Requests per minute (0 = no limit); `null` = the default (`default_user_rpm`).
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<i64>)]
    pub rpm_limit: Option<Option<i64>>,
}

#[utoipa::path(patch, path = "/api/admin/users/{id}", tag = "admin", security(("access_token" = [])),
    params(("id" = String, Path, description = "User id")),
    request_body = PatchUser,
    responses((status = 200, body = UserView), (status = 400, body = crate::error::ErrorBody),
              (status = 404, body = crate::error::ErrorBody)))]
async fn patch_user(
    State(state): State<AppState>,
    admin: AdminUser,
    ip: ClientIp,
    Path(id): Path<String>,
    Json(body): Json<PatchUser>,
) -> ApiResult<Json<UserView>> {
    let user = find_user(&state, &id).await?;
    let is_self = user.id == admin.id();
    let mut changes = store::users::UserChanges::default();
    let mut detail = serde_json::Map::new();

    if let Some(email) = body.email {
        changes.email = Some(normalize_email(email.as_deref())?);
        detail.insert("email".into(), serde_json::json!(changes.email));
    }
    if let Some(role) = body.role.as_deref() {
        let role = Role::parse(role)
            .ok_or_else(|| ApiError::invalid_param("role", "role must be \"admin\" or \"user\""))?;
        if is_self && role.as_str() != user.role {
            return Err(ApiError::invalid_param(
                "role",
                "You cannot change your own role; ask another administrator.",
            ));
        }
        changes.role = Some(role.as_str().to_owned());
        detail.insert("role".into(), role.as_str().into());
    }
    if let Some(status) = body.status.as_deref() {
        let new_status = match (status, user.status.as_str()) {
            ("disabled", _) if is_self => {
                return Err(ApiError::invalid_param(
                    "status",
                    "You cannot disable your own account.",
                ));
            }
            ("disabled", _) => "disabled",
            ("active", "pending_totp") => {
                return Err(ApiError::invalid_param(
                    "status",
                    "This account has not confirmed its TOTP enrolment yet; it becomes active when the user does.",
                ));
            }
            ("active", _) => "active",
            _ => {
                return Err(ApiError::invalid_param(
                    "status",
                    "status must be \"active\" or \"disabled\"",
                ));
            }
        };
        changes.status = Some(new_status.to_owned());
        detail.insert("status".into(), new_status.into());
    }
    if let Some(plan) = body.plan {
        // The expiry moves with the plan, as a renewal moves it: a paid plan runs one month
        // (`store::plans::new_expiry`: from the current expiry when it is the same unexpired
        // plan, else from now), a free plan and no plan never expire.
        let expires = match plan.as_deref() {
            None => None,
            Some(name) => {
                let cfg = state
                    .config
                    .plans
                    .iter()
                    .find(|p| p.name == name)
                    .ok_or_else(|| {
                        ApiError::invalid_param(
                            "plan",
                            format!("no plan named {name:?} is configured (see GET /api/plans)"),
                        )
                    })?;
                (cfg.price_usd_per_month > 0.0).then(|| {
                    store::plans::new_expiry(
                        user.plan.as_deref(),
                        user.plan_expires_at,
                        name,
                        1,
                        chrono::Utc::now(),
                    )
                })
            }
        };
        changes.plan_expires_at = Some(expires);
        detail.insert("plan".into(), serde_json::json!(plan));
        detail.insert("plan_expires_at".into(), serde_json::json!(expires));
        changes.plan = Some(plan);
    }
    if let Some(rpm) = body.rpm_limit {
        let rpm = match rpm {
            None => None,
            Some(n) => Some(i32::try_from(n).ok().filter(|n| *n >= 0).ok_or_else(|| {
                ApiError::invalid_param(
                    "rpm_limit",
                    "rpm_limit must be a whole number ≥ 0 (0 = no limit) or null",
                )
            })?),
        };
        changes.rpm_limit = Some(rpm);
        detail.insert("rpm_limit".into(), serde_json::json!(rpm));
    }
    if detail.is_empty() {
        return Ok(Json((&user).into()));
    }

    let disabling = changes.status.as_deref() == Some("disabled") && user.status != "disabled";
    let limits_changed = changes.role.is_some()
        || changes.status.is_some()
        || changes.plan.is_some()
        || changes.rpm_limit.is_some();
    store::users::update(&state.db, &id, changes).await?;
    if disabling {
        store::sessions::revoke_all(&state.db, &id, None).await?;
    }
    if limits_changed {
        state.caches.invalidate_user(&id).await;
    }
    super::audit(
        &state,
        &admin,
        &ip,
        if disabling {
            "admin.user.disable"
        } else {
            "admin.user.update"
        },
        user_target(&id),
        Some(serde_json::Value::Object(detail)),
    )
    .await?;
    Ok(Json((&reload(&state, &id).await?).into()))
}

/// Soft delete: the account is disabled, its sessions revoked and its gateway keys stop working.
#[utoipa::path(delete, path = "/api/admin/users/{id}", tag = "admin", security(("access_token" = [])),
    params(("id" = String, Path, description = "User id")),
    responses((status = 204, description = "Disabled"), (status = 400, body = crate::error::ErrorBody),
              (status = 404, body = crate::error::ErrorBody)))]
async fn delete_user(
    State(state): State<AppState>,
    admin: AdminUser,
    ip: ClientIp,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let user = find_user(&state, &id).await?;
    if user.id == admin.id() {
        return Err(ApiError::bad_request(
            "invalid_value",
            "You cannot delete your own account.",
        ));
    }
    store::users::update(
        &state.db,
        &id,
        store::users::UserChanges {
            status: Some("disabled".into()),
            ..Default::default()
        },
    )
    .await?;
    let revoked = store::sessions::revoke_all(&state.db, &id, None).await?;
    state.caches.invalidate_user(&id).await;
    super::audit(
        &state,
        &admin,
        &ip,
        "admin.user.disable",
        user_target(&id),
        Some(serde_json::json!({ "via": "delete", "sessions_revoked": revoked })),
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AdminResetPassword {
    /// 8–128 characters.
    pub new_password: String,
}

/// Sets a new password; every session of the user is revoked.
#[utoipa::path(post, path = "/api/admin/users/{id}/reset-password", tag = "admin",
    security(("access_token" = [])),
    params(("id" = String, Path, description = "User id")),
    request_body = AdminResetPassword,
    responses((status = 204, description = "Replaced"), (status = 400, body = crate::error::ErrorBody),
              (status = 404, body = crate::error::ErrorBody)))]
async fn reset_password(
    State(state): State<AppState>,
    admin: AdminUser,
    ip: ClientIp,
    Path(id): Path<String>,
    Json(body): Json<AdminResetPassword>,
) -> ApiResult<StatusCode> {
    let user = find_user(&state, &id).await?;
    if !validate::password(&body.new_password) {
        return Err(ApiError::invalid_param(
            "new_password",
            "new_password must be 8–128 characters",
        ));
    }
    let hash = password::hash(&body.new_password).await?;
    store::users::update(
        &state.db,
        &user.id,
        store::users::UserChanges {
            password_hash: Some(hash),
            ..Default::default()
        },
    )
    .await?;
    let revoked = store::sessions::revoke_all(&state.db, &user.id, None).await?;
    super::audit(
        &state,
        &admin,
        &ip,
        "admin.user.reset_password",
        user_target(&user.id),
        Some(serde_json::json!({ "sessions_revoked": revoked })),
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Issues a new TOTP secret; the account goes back to `pending_totp` (a disabled one stays
/// disabled) and every session is revoked.
#[utoipa::path(post, path = "/api/admin/users/{id}/reset-totp", tag = "admin",
    security(("access_token" = [])),
    params(("id" = String, Path, description = "User id")),
    responses((status = 200, body = Enrolment), (status = 404, body = crate::error::ErrorBody)))]
async fn reset_totp(
    State(state): State<AppState>,
    admin: AdminUser,
    ip: ClientIp,
    Path(id): Path<String>,
) -> ApiResult<Json<Enrolment>> {
    let user = find_user(&state, &id).await?;
    let (sealed, enrolment) = signup::new_enrolment(&state.keyring, &user.id, &user.username)
        .map_err(ApiError::internal)?;
    let status = if user.status == "disabled" {
        "disabled"
    } else {
        "pending_totp"
    };
    store::users::update(
        &state.db,
        &user.id,
        store::users::UserChanges {
            status: Some(status.into()),
            totp_secret_enc: Some(sealed),
            totp_pending_enc: Some(None),
            totp_last_step: Some(None),
            ..Default::default()
        },
    )
    .await?;
    let revoked = store::sessions::revoke_all(&state.db, &user.id, None).await?;
    state.caches.invalidate_user(&user.id).await;
    super::audit(
        &state,
        &admin,
        &ip,
        "admin.user.reset_totp",
        user_target(&user.id),
        Some(serde_json::json!({ "status": status, "sessions_revoked": revoked })),
    )
    .await?;
    Ok(Json(enrolment))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BalanceAdjustment {
    /// USD; negative debits. Refused when the balance would become negative.
    pub amount_usd: f64,
    pub note: String,
}

/// A balance ledger entry.
#[derive(Debug, Serialize, ToSchema)]
pub struct LedgerEntryView {
    pub id: i64,
    pub at: String,
    pub amount_usd: f64,
    /// `grant` | `usage` | `adjustment` | `renewal`.
    pub kind: String,
    pub note: Option<String>,
    pub balance_after_usd: f64,
}

impl From<entity::balance_ledger::Model> for LedgerEntryView {
    fn from(e: entity::balance_ledger::Model) -> Self {
        Self {
            id: e.id,
            at: rfc3339(e.at),
            amount_usd: store::nanos_to_usd(e.amount_nanos),
            kind: e.kind,
            note: e.note,
            balance_after_usd: store::nanos_to_usd(e.balance_after_nanos),
        }
    }
}

/// Credits or debits a user's balance (ledger kind `adjustment`).
#[utoipa::path(post, path = "/api/admin/users/{id}/balance", tag = "admin",
    security(("access_token" = [])),
    params(("id" = String, Path, description = "User id")),
    request_body = BalanceAdjustment,
    responses((status = 200, body = LedgerEntryView), (status = 400, body = crate::error::ErrorBody),
              (status = 404, body = crate::error::ErrorBody)))]
async fn adjust_balance(
    State(state): State<AppState>,
    admin: AdminUser,
    ip: ClientIp,
    Path(id): Path<String>,
    Json(body): Json<BalanceAdjustment>,
) -> ApiResult<Json<LedgerEntryView>> {
    let user = find_user(&state, &id).await?;
    // ≤ 1e9 USD keeps nano-dollars far from i64 overflow.
    if !body.amount_usd.is_finite() || body.amount_usd.abs() > 1e9 {
        return Err(ApiError::invalid_param(
            "amount_usd",
            "amount_usd must be a number between -1e9 and 1e9",
        ));
    }
    let amount = store::usd_to_nanos(body.amount_usd);
    if amount == 0 {
        return Err(ApiError::invalid_param(
            "amount_usd",
            "amount_usd must not be zero",
        ));
    }
    if body.note.chars().count() > 255 {
        return Err(ApiError::invalid_param(
            "note",
            "note must be at most 255 characters",
        ));
    }
    let entry = ledger::apply(
        &state.db,
        ledger::Change {
            user_id: &user.id,
            amount_nanos: amount,
            kind: ledger::Kind::Adjustment,
            note: Some(&body.note),
            actor_id: Some(admin.id()),
            refuse_negative: true,
        },
    )
    .await
    .map_err(|e| match e {
        LedgerError::Insufficient => {
            ApiError::invalid_param("amount_usd", "This debit would make the balance negative.")
        }
        LedgerError::UserNotFound => ApiError::not_found("user"),
        LedgerError::Db(e) => e.into(),
    })?;
    super::audit(
        &state,
        &admin,
        &ip,
        "admin.user.balance",
        user_target(&user.id),
        Some(serde_json::json!({
            "amount_usd": store::nanos_to_usd(amount),
            "balance_after_usd": store::nanos_to_usd(entry.balance_after_nanos),
            "ledger_id": entry.id,
        })),
    )
    .await?;
    Ok(Json(entry.into()))
}

/// `?page=&per_page=&action=&actor_id=`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AdminAuditQuery {
    pub page: Option<u64>,
    pub per_page: Option<u64>,
    pub action: Option<String>,
    /// Only what this user did.
    pub actor_id: Option<String>,
}

/// An audit entry as administrators see it.
#[derive(Debug, Serialize, ToSchema)]
pub struct AuditEntryView {
    pub id: i64,
    pub at: String,
    /// `null` for anonymous calls (register) and the CLI.
    pub actor_id: Option<String>,
    pub action: String,
    pub target: Option<String>,
    pub ip: Option<String>,
    #[schema(value_type = Option<Object>)]
    pub detail: Option<serde_json::Value>,
}

#[utoipa::path(get, path = "/api/admin/audit-log", tag = "admin", security(("access_token" = [])),
    params(AdminAuditQuery),
    responses((status = 200, body = Paginated<AuditEntryView>), (status = 403, body = crate::error::ErrorBody)))]
async fn audit_log(
    State(state): State<AppState>,
    _admin: AdminUser,
    Query(q): Query<AdminAuditQuery>,
) -> ApiResult<Json<Paginated<AuditEntryView>>> {
    let req = crate::routes::page_req(q.page, q.per_page)?;
    let page = store::audit::list(
        &state.db,
        q.actor_id.as_deref().filter(|a| !a.is_empty()),
        q.action.as_deref().filter(|a| !a.is_empty()),
        req,
    )
    .await?;
    Ok(Json(Paginated::new(page, req, |e| AuditEntryView {
        id: e.id,
        at: rfc3339(e.at),
        actor_id: e.actor_id,
        action: e.action,
        target: e.target,
        ip: e.ip,
        detail: parse_detail(e.detail),
    })))
}

/// Every known runtime setting with its effective value (stored, else the config default).
#[utoipa::path(get, path = "/api/admin/settings", tag = "admin", security(("access_token" = [])),
    responses((status = 200, body = Paginated<SettingView>), (status = 403, body = crate::error::ErrorBody)))]
async fn list_settings(
    State(state): State<AppState>,
    _admin: AdminUser,
) -> ApiResult<Json<Paginated<SettingView>>> {
    let data = settings::list(&state.db, &state.config).await?;
    let n = data.len() as u64;
    Ok(Json(Paginated {
        data,
        page: 1,
        per_page: n.max(1),
        total: n,
    }))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PutSetting {
    /// Typed per key: `registration` = "open" | "closed"; `default_*_rpm` = integer ≥ 0.
    #[schema(value_type = Object)]
    pub value: serde_json::Value,
    pub description: Option<String>,
}

#[utoipa::path(put, path = "/api/admin/settings/{key}", tag = "admin", security(("access_token" = [])),
    params(("key" = String, Path, description = "Setting key")),
    request_body = PutSetting,
    responses((status = 200, body = SettingView), (status = 400, body = crate::error::ErrorBody),
              (status = 403, body = crate::error::ErrorBody)))]
async fn put_setting(
    State(state): State<AppState>,
    admin: AdminUser,
    ip: ClientIp,
    Path(key): Path<String>,
    Json(body): Json<PutSetting>,
) -> ApiResult<Json<SettingView>> {
    let view = settings::put(
        &state.db,
        &state.config,
        &key,
        &body.value,
        body.description.as_deref(),
    )
    .await
    .map_err(|e| match e {
        SettingsError::UnknownKey(_) => ApiError::invalid_param("key", e.to_string()),
        SettingsError::InvalidValue(_) => ApiError::invalid_param("value", e.to_string()),
        SettingsError::Db(e) => e.into(),
    })?;
    // Every replica's hot path reads the default limits from its cache.
    state
        .caches
        .apply(&crate::cache::Invalidation::Settings)
        .await;
    super::audit(
        &state,
        &admin,
        &ip,
        "settings.update",
        format!("setting:{key}"),
        Some(serde_json::json!({ "key": key, "value": view.value })),
    )
    .await?;
    Ok(Json(view))
}
