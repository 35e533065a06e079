//! `/api/auth`: registration, TOTP enrolment confirmation, login, logout, token check and the
//! self-service password reset by second factor.

use axum::extract::State;
use axum::http::StatusCode;
use chrono::{Duration, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::accounts::session::CurrentUser;
use crate::accounts::signin::{self, Credentials, Purpose};
use crate::accounts::signup::{self, NewUser, Role};
use crate::accounts::{password, totp::Enrolment};
use crate::error::{ApiError, ApiResult, Json};
use crate::routes::me::{UserView, reload, user_target};
use crate::routes::{ClientIp, UserAgent, rfc3339};
use crate::state::AppState;
use crate::store;
use crate::store::audit::AuditEntry;
use crate::{settings, validate};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(register))
        .routes(routes!(confirm_totp))
        .routes(routes!(login))
        .routes(routes!(logout))
        .routes(routes!(verify))
        .routes(routes!(reset_password))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Register {
    /// 3–32 of `[A-Za-z0-9_.-]`.
    pub username: String,
    /// 8–128 characters.
    pub password: String,
    pub email: Option<String>,
}

/// A new account and its TOTP enrolment (shown once).
#[derive(Debug, Serialize, ToSchema)]
pub struct Registered {
    pub user: UserView,
    pub totp: Enrolment,
}

/// Creates an account in `pending_totp`; confirm it with `POST /api/auth/totp/confirm`.
#[utoipa::path(post, path = "/api/auth/register", tag = "auth", request_body = Register,
    responses((status = 201, body = Registered), (status = 400, body = crate::error::ErrorBody),
              (status = 403, description = "Registration is closed", body = crate::error::ErrorBody),
              (status = 409, description = "Username taken", body = crate::error::ErrorBody)))]
async fn register(
    State(state): State<AppState>,
    ip: ClientIp,
    Json(body): Json<Register>,
) -> ApiResult<(StatusCode, Json<Registered>)> {
    if !settings::registration_open(&state.db, &state.config).await? {
        return Err(ApiError::forbidden(
            "registration_closed",
            "Registration is closed; ask an administrator for an account.",
        ));
    }
    let created = signup::create(
        &state.db,
        &state.keyring,
        &state.config,
        NewUser {
            username: &body.username,
            password: &body.password,
            email: body.email.as_deref(),
            role: Role::User,
            active: false,
        },
    )
    .await?;
    store::audit::record(
        &state.db,
        AuditEntry {
            actor_id: None,
            action: "register",
            target: Some(user_target(&created.user.id)),
            ip: ip.string().as_deref(),
            detail: Some(serde_json::json!({ "username": created.user.username })),
        },
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

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ConfirmEnrolment {
    pub username: String,
    pub password: String,
    /// The first code from the authenticator app.
    pub code: String,
}

/// Proves the TOTP enrolment with a first code; the account becomes `active` and is signed in
/// (the code is single-use, so an immediate `login` with it would fail until the next one).
#[utoipa::path(post, path = "/api/auth/totp/confirm", tag = "auth", request_body = ConfirmEnrolment,
    responses((status = 200, body = LoginResponse), (status = 401, body = crate::error::ErrorBody),
              (status = 409, description = "Already confirmed", body = crate::error::ErrorBody),
              (status = 429, body = crate::error::ErrorBody)))]
async fn confirm_totp(
    State(state): State<AppState>,
    ip: ClientIp,
    ua: UserAgent,
    Json(body): Json<ConfirmEnrolment>,
) -> ApiResult<Json<LoginResponse>> {
    let ip = ip.string();
    let user = signin::check(
        &state,
        Purpose::ConfirmEnrolment,
        Credentials {
            username: &body.username,
            password: Some(&body.password),
            totp_code: Some(&body.code),
            ip: ip.as_deref(),
            user_agent: ua.0.as_deref(),
        },
    )
    .await?;
    store::users::activate_pending(&state.db, &user.id).await?;
    store::audit::record(
        &state.db,
        AuditEntry {
            actor_id: Some(&user.id),
            action: "totp.confirm",
            target: Some(user_target(&user.id)),
            ip: ip.as_deref(),
            detail: None,
        },
    )
    .await?;
    start_session(&state, &user.id, ip.as_deref(), ua.0.as_deref()).await
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Login {
    pub username: String,
    pub password: String,
    pub totp_code: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct LoginResponse {
    pub access_token: String,
    /// Always `Bearer`.
    pub token_type: &'static str,
    /// Seconds until the token expires.
    pub expires_in: u64,
    pub user: UserView,
}

/// Signs in with password and TOTP code; returns an access token for `/api`.
#[utoipa::path(post, path = "/api/auth/login", tag = "auth", request_body = Login,
    responses((status = 200, body = LoginResponse),
              (status = 401, description = "Any part wrong: invalid_credentials", body = crate::error::ErrorBody),
              (status = 403, description = "Account disabled", body = crate::error::ErrorBody),
              (status = 429, description = "Locked after 5 failures (retry-after)", body = crate::error::ErrorBody)))]
async fn login(
    State(state): State<AppState>,
    ip: ClientIp,
    ua: UserAgent,
    Json(body): Json<Login>,
) -> ApiResult<Json<LoginResponse>> {
    let ip = ip.string();
    let user = signin::check(
        &state,
        Purpose::Login,
        Credentials {
            username: &body.username,
            password: Some(&body.password),
            totp_code: Some(&body.totp_code),
            ip: ip.as_deref(),
            user_agent: ua.0.as_deref(),
        },
    )
    .await?;
    start_session(&state, &user.id, ip.as_deref(), ua.0.as_deref()).await
}

/// Opens a session for a user whose credentials were just checked: the access token, the
/// last-login time, the IP record and the `login` audit entry. Login and the enrolment
/// confirmation both end here.
async fn start_session(
    state: &AppState,
    user_id: &str,
    ip: Option<&str>,
    user_agent: Option<&str>,
) -> ApiResult<Json<LoginResponse>> {
    let now = Utc::now();
    let ttl = state.config.auth.access_token_ttl_secs;
    // Config validation keeps the TTL sane; the clamp only guards the arithmetic (≤ 10 years).
    let ttl_secs = i64::try_from(ttl)
        .unwrap_or(i64::MAX)
        .min(10 * 365 * 86_400);
    let expires_at = now + Duration::seconds(ttl_secs);
    let session = store::sessions::create(&state.db, user_id, expires_at, ip, user_agent).await?;
    let access_token = state
        .jwt
        .issue(user_id, &session.id, expires_at)
        .map_err(ApiError::internal)?;
    store::users::update(
        &state.db,
        user_id,
        store::users::UserChanges {
            last_login_at: Some(now),
            ..Default::default()
        },
    )
    .await?;
    if let Some(ip) = ip {
        store::ip_records::touch(&state.db, user_id, ip, now).await?;
    }
    store::audit::record(
        &state.db,
        AuditEntry {
            actor_id: Some(user_id),
            action: "login",
            target: Some(user_target(user_id)),
            ip,
            detail: None,
        },
    )
    .await?;
    let user = reload(state, user_id).await?;
    Ok(Json(LoginResponse {
        access_token,
        token_type: "Bearer",
        expires_in: ttl,
        user: (&user).into(),
    }))
}

/// Revokes the caller's session: this token stops working at once.
#[utoipa::path(post, path = "/api/auth/logout", tag = "auth", security(("access_token" = [])),
    responses((status = 204, description = "Signed out"), (status = 401, body = crate::error::ErrorBody)))]
async fn logout(
    State(state): State<AppState>,
    me: CurrentUser,
    ip: ClientIp,
) -> ApiResult<StatusCode> {
    store::sessions::revoke(&state.db, &me.session_id).await?;
    store::audit::record(
        &state.db,
        AuditEntry {
            actor_id: Some(me.id()),
            action: "logout",
            target: Some(user_target(me.id())),
            ip: ip.string().as_deref(),
            detail: None,
        },
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Verified {
    /// Always `true` (an invalid token gets 401).
    pub valid: bool,
    pub user: UserView,
    pub expires_at: String,
}

/// Whether the access token is good, for whom, and until when.
#[utoipa::path(get, path = "/api/auth/verify", tag = "auth", security(("access_token" = [])),
    responses((status = 200, body = Verified), (status = 401, body = crate::error::ErrorBody)))]
async fn verify(me: CurrentUser) -> Json<Verified> {
    Json(Verified {
        valid: true,
        user: (&me.user).into(),
        expires_at: rfc3339(me.expires_at),
    })
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResetPassword {
    pub username: String,
    /// A current code of the account's TOTP secret.
    pub totp_code: String,
    /// 8–128 characters.
    pub new_password: String,
}

/// Self-service reset by second factor; revokes every session of the account.
#[utoipa::path(post, path = "/api/auth/password/reset", tag = "auth", request_body = ResetPassword,
    responses((status = 204, description = "Password replaced"), (status = 400, body = crate::error::ErrorBody),
              (status = 401, body = crate::error::ErrorBody), (status = 429, body = crate::error::ErrorBody)))]
async fn reset_password(
    State(state): State<AppState>,
    ip: ClientIp,
    ua: UserAgent,
    Json(body): Json<ResetPassword>,
) -> ApiResult<StatusCode> {
    if !validate::password(&body.new_password) {
        return Err(ApiError::invalid_param(
            "new_password",
            "new_password must be 8–128 characters",
        ));
    }
    let ip = ip.string();
    let user = signin::check(
        &state,
        Purpose::PasswordReset,
        Credentials {
            username: &body.username,
            password: None,
            totp_code: Some(&body.totp_code),
            ip: ip.as_deref(),
            user_agent: ua.0.as_deref(),
        },
    )
    .await?;
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
    store::audit::record(
        &state.db,
        AuditEntry {
            actor_id: Some(&user.id),
            action: "password.reset",
            target: Some(user_target(&user.id)),
            ip: ip.as_deref(),
            detail: Some(serde_json::json!({ "sessions_revoked": revoked })),
        },
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}
