//! The signed-in user's own account: `/api/me` profile, password, TOTP rotation, login history,
//! IP records and audit log. Also `UserView`, the one JSON shape of a user on every route.

use axum::extract::State;
use axum::http::StatusCode;
use entity::users;
use serde::{Deserialize, Deserializer, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::accounts::session::CurrentUser;
use crate::accounts::signin::{self, Credentials, Purpose};
use crate::accounts::signup::normalize_email;
use crate::accounts::totp::{self, Enrolment};
use crate::accounts::{password, signup};
use crate::error::{ApiError, ApiResult, Json, Query};
use crate::routes::{ClientIp, PageParams, Paginated, UserAgent, rfc3339};
use crate::state::AppState;
use crate::store;
use crate::store::audit::AuditEntry;
use crate::validate;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(get_me, patch_me))
        .routes(routes!(change_password))
        .routes(routes!(rotate_totp))
        .routes(routes!(confirm_totp))
        .routes(routes!(login_history))
        .routes(routes!(ip_records))
        .routes(routes!(audit_log))
}

/// A user as every `/api` route shows it. Never carries a secret.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct UserView {
    pub id: String,
    pub username: String,
    pub email: Option<String>,
    /// `admin` | `user`.
    pub role: String,
    /// `pending_totp` | `active` | `disabled`.
    pub status: String,
    pub balance_usd: f64,
    pub plan: Option<String>,
    pub plan_expires_at: Option<String>,
    /// Requests per minute; `null` = the default (`default_user_rpm`).
    pub rpm_limit: Option<i32>,
    pub created_at: String,
    pub last_login_at: Option<String>,
}

impl From<&users::Model> for UserView {
    fn from(u: &users::Model) -> Self {
        Self {
            id: u.id.clone(),
            username: u.username.clone(),
            email: u.email.clone(),
            role: u.role.clone(),
            status: u.status.clone(),
            balance_usd: store::nanos_to_usd(u.balance_nanos),
            plan: u.plan.clone(),
            plan_expires_at: u.plan_expires_at.map(rfc3339),
            rpm_limit: u.rpm_limit,
            created_at: rfc3339(u.created_at),
            last_login_at: u.last_login_at.map(rfc3339),
        }
    }
}

/// `{"user": ...}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct UserEnvelope {
    pub user: UserView,
}

impl UserEnvelope {
    pub fn of(u: &users::Model) -> Json<Self> {
        Json(Self { user: u.into() })
    }
}

/// For PATCH bodies: a missing field is `None`, an explicit `null` is `Some(None)`.
pub fn double_option<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

/// The user as stored now (after a change).
pub async fn reload(state: &AppState, id: &str) -> ApiResult<users::Model> {
    store::users::find(&state.db, id)
        .await?
        .ok_or_else(|| ApiError::not_found("user"))
}

pub fn user_target(id: &str) -> String {
    format!("user:{id}")
}

#[utoipa::path(get, path = "/api/me", tag = "me", security(("access_token" = [])),
    responses((status = 200, body = UserView), (status = 401, body = crate::error::ErrorBody)))]
async fn get_me(me: CurrentUser) -> Json<UserView> {
    Json((&me.user).into())
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PatchMe {
    /// New e-mail address; `null` or `""` removes it.
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<String>)]
    pub email: Option<Option<String>>,
}

#[utoipa::path(patch, path = "/api/me", tag = "me", security(("access_token" = [])),
    request_body = PatchMe,
    responses((status = 200, body = UserView), (status = 400, body = crate::error::ErrorBody)))]
async fn patch_me(
    State(state): State<AppState>,
    me: CurrentUser,
    ip: ClientIp,
    Json(body): Json<PatchMe>,
) -> ApiResult<Json<UserView>> {
    let Some(email) = body.email else {
        return Ok(Json((&me.user).into()));
    };
    let email = normalize_email(email.as_deref())?;
    store::users::update(
        &state.db,
        me.id(),
        store::users::UserChanges {
            email: Some(email),
            ..Default::default()
        },
    )
    .await?;
    store::audit::record(
        &state.db,
        AuditEntry {
            actor_id: Some(me.id()),
            action: "me.update",
            target: Some(user_target(me.id())),
            ip: ip.string().as_deref(),
            detail: Some(serde_json::json!({ "fields": ["email"] })),
        },
    )
    .await?;
    Ok(Json((&reload(&state, me.id()).await?).into()))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChangePassword {
    pub current_password: String,
    /// 8–128 characters.
    pub new_password: String,
}

/// Changes the password; every other session of the user is revoked, this one survives.
#[utoipa::path(post, path = "/api/me/password", tag = "me", security(("access_token" = [])),
    request_body = ChangePassword,
    responses((status = 204, description = "Changed"), (status = 400, body = crate::error::ErrorBody),
              (status = 401, body = crate::error::ErrorBody), (status = 429, body = crate::error::ErrorBody)))]
async fn change_password(
    State(state): State<AppState>,
    me: CurrentUser,
    ip: ClientIp,
    ua: UserAgent,
    Json(body): Json<ChangePassword>,
) -> ApiResult<StatusCode> {
    if !validate::password(&body.new_password) {
        return Err(ApiError::invalid_param(
            "new_password",
            "new_password must be 8–128 characters",
        ));
    }
    let ip = ip.string();
    signin::check(
        &state,
        Purpose::Reauthenticate,
        Credentials {
            username: &me.user.username,
            password: Some(&body.current_password),
            totp_code: None,
            ip: ip.as_deref(),
            user_agent: ua.0.as_deref(),
        },
    )
    .await?;
    let hash = password::hash(&body.new_password).await?;
    store::users::update(
        &state.db,
        me.id(),
        store::users::UserChanges {
            password_hash: Some(hash),
            ..Default::default()
        },
    )
    .await?;
    let revoked = store::sessions::revoke_all(&state.db, me.id(), Some(&me.session_id)).await?;
    store::audit::record(
        &state.db,
        AuditEntry {
            actor_id: Some(me.id()),
            action: "password.change",
            target: Some(user_target(me.id())),
            ip: ip.as_deref(),
            detail: Some(serde_json::json!({ "sessions_revoked": revoked })),
        },
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RotateTotp {
    pub password: String,
    /// A current code of the active secret.
    pub totp_code: String,
}

/// Starts a TOTP rotation: the new secret takes effect after `POST /api/me/totp/confirm`.
#[utoipa::path(post, path = "/api/me/totp/rotate", tag = "me", security(("access_token" = [])),
    request_body = RotateTotp,
    responses((status = 200, body = Enrolment), (status = 401, body = crate::error::ErrorBody),
              (status = 429, body = crate::error::ErrorBody)))]
async fn rotate_totp(
    State(state): State<AppState>,
    me: CurrentUser,
    ip: ClientIp,
    ua: UserAgent,
    Json(body): Json<RotateTotp>,
) -> ApiResult<Json<Enrolment>> {
    let ip = ip.string();
    signin::check(
        &state,
        Purpose::Reauthenticate,
        Credentials {
            username: &me.user.username,
            password: Some(&body.password),
            totp_code: Some(&body.totp_code),
            ip: ip.as_deref(),
            user_agent: ua.0.as_deref(),
        },
    )
    .await?;
    let (sealed, enrolment) = signup::new_enrolment(&state.keyring, me.id(), &me.user.username)
        .map_err(ApiError::internal)?;
    store::users::update(
        &state.db,
        me.id(),
        store::users::UserChanges {
            totp_pending_enc: Some(Some(sealed)),
            ..Default::default()
        },
    )
    .await?;
    store::audit::record(
        &state.db,
        AuditEntry {
            actor_id: Some(me.id()),
            action: "totp.rotate",
            target: Some(user_target(me.id())),
            ip: ip.as_deref(),
            detail: None,
        },
    )
    .await?;
    Ok(Json(enrolment))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ConfirmRotation {
    /// A current code of the NEW (pending) secret.
    pub code: String,
}

/// Makes the pending secret from `/api/me/totp/rotate` the active one.
#[utoipa::path(post, path = "/api/me/totp/confirm", tag = "me", security(("access_token" = [])),
    request_body = ConfirmRotation,
    responses((status = 200, body = UserEnvelope), (status = 400, body = crate::error::ErrorBody),
              (status = 401, body = crate::error::ErrorBody)))]
async fn confirm_totp(
    State(state): State<AppState>,
    me: CurrentUser,
    ip: ClientIp,
    Json(body): Json<ConfirmRotation>,
) -> ApiResult<Json<UserEnvelope>> {
    let Some(pending) = me.user.totp_pending_enc.as_deref() else {
        return Err(ApiError::bad_request(
            "no_pending_totp",
            "There is no TOTP rotation to confirm; start one with POST /api/me/totp/rotate.",
        ));
    };
    let secret = state
        .keyring
        .open_string(pending, me.id())
        .map_err(|e| ApiError::internal(anyhow::anyhow!("opening the pending TOTP secret: {e}")))?;
    let step = totp::check(&secret, &body.code).ok_or_else(signin::invalid_credentials)?;
    if !store::users::promote_pending_totp(&state.db, me.id(), pending, step).await? {
        // Another confirmation (or rotation) got there first.
        return Err(signin::invalid_credentials());
    }
    store::audit::record(
        &state.db,
        AuditEntry {
            actor_id: Some(me.id()),
            action: "totp.rotate.confirm",
            target: Some(user_target(me.id())),
            ip: ip.string().as_deref(),
            detail: None,
        },
    )
    .await?;
    Ok(UserEnvelope::of(&reload(&state, me.id()).await?))
}

/// One sign-in attempt.
#[derive(Debug, Serialize, ToSchema)]
pub struct LoginHistoryEntry {
    pub at: String,
    pub ip: Option<String>,
    pub user_agent: Option<String>,
    pub success: bool,
    /// Why it failed (`bad_password`, `bad_totp`, `totp_replayed`, `locked`, ...), or what a
    /// successful non-login check was (`totp_confirm`, `password_reset`, `reauthenticate`).
    pub reason: Option<String>,
}

#[utoipa::path(get, path = "/api/me/login-history", tag = "me", security(("access_token" = [])),
    params(PageParams),
    responses((status = 200, body = Paginated<LoginHistoryEntry>)))]
async fn login_history(
    State(state): State<AppState>,
    me: CurrentUser,
    Query(p): Query<PageParams>,
) -> ApiResult<Json<Paginated<LoginHistoryEntry>>> {
    let req = p.req()?;
    let page = store::login_history::list_for_user(&state.db, me.id(), req).await?;
    Ok(Json(Paginated::new(page, req, |r| LoginHistoryEntry {
        at: rfc3339(r.at),
        ip: r.ip,
        user_agent: r.user_agent,
        success: r.success,
        reason: r.reason,
    })))
}

/// An address the user signed in from.
#[derive(Debug, Serialize, ToSchema)]
pub struct IpRecordView {
    pub ip: String,
    pub first_seen: String,
    pub last_seen: String,
    pub count: i64,
}

#[utoipa::path(get, path = "/api/me/ip-records", tag = "me", security(("access_token" = [])),
    params(PageParams),
    responses((status = 200, body = Paginated<IpRecordView>)))]
async fn ip_records(
    State(state): State<AppState>,
    me: CurrentUser,
    Query(p): Query<PageParams>,
) -> ApiResult<Json<Paginated<IpRecordView>>> {
    let req = p.req()?;
    let page = store::ip_records::list_for_user(&state.db, me.id(), req).await?;
    Ok(Json(Paginated::new(page, req, |r| IpRecordView {
        ip: r.ip,
        first_seen: rfc3339(r.first_seen),
        last_seen: rfc3339(r.last_seen),
        count: r.count,
    })))
}

/// `?page=&per_page=&action=`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AuditQuery {
    pub page: Option<u64>,
    pub per_page: Option<u64>,
    /// Only entries with this action (e.g. `login`).
    pub action: Option<String>,
}

/// One audit entry of the user's own actions.
#[derive(Debug, Serialize, ToSchema)]
pub struct MyAuditEntry {
    pub at: String,
    pub action: String,
    pub target: Option<String>,
    pub ip: Option<String>,
    #[schema(value_type = Option<Object>)]
    pub detail: Option<serde_json::Value>,
}

/// A stored `detail` back as JSON (it was written as JSON).
pub fn parse_detail(d: Option<String>) -> Option<serde_json::Value> {
    d.map(|s| serde_json::from_str(&s).unwrap_or(serde_json::Value::String(s)))
}

#[utoipa::path(get, path = "/api/me/audit-log", tag = "me", security(("access_token" = [])),
    params(AuditQuery),
    responses((status = 200, body = Paginated<MyAuditEntry>)))]
async fn audit_log(
    State(state): State<AppState>,
    me: CurrentUser,
    Query(q): Query<AuditQuery>,
) -> ApiResult<Json<Paginated<MyAuditEntry>>> {
    let req = crate::routes::page_req(q.page, q.per_page)?;
    let action = q.action.as_deref().filter(|a| !a.is_empty());
    let page = store::audit::list(&state.db, Some(me.id()), action, req).await?;
    Ok(Json(Paginated::new(page, req, |e| MyAuditEntry {
        at: rfc3339(e.at),
        action: e.action,
        target: e.target,
        ip: e.ip,
        detail: parse_detail(e.detail),
    })))
}
