//! Who is calling the management API: the `CurrentUser` / `AdminUser` extractors.
//!
//! A token is accepted only while its session row is unrevoked and unexpired and its user active,
//! so logout, password changes and disabling a user take effect on the very next request.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use chrono::{DateTime, Utc};
use entity::users;

use crate::error::ApiError;
use crate::state::AppState;
use crate::store;

#[derive(Debug, Clone)]
pub struct CurrentUser {
    pub user: users::Model,
    pub session_id: String,
    pub expires_at: DateTime<Utc>,
}

impl CurrentUser {
    pub fn id(&self) -> &str {
        &self.user.id
    }

    pub fn is_admin(&self) -> bool {
        self.user.role == "admin"
    }
}

/// A `CurrentUser` whose role is `admin`; anyone else gets 403.
#[derive(Debug, Clone)]
pub struct AdminUser(pub CurrentUser);

impl std::ops::Deref for AdminUser {
    type Target = CurrentUser;
    fn deref(&self) -> &CurrentUser {
        &self.0
    }
}

/// The bearer token from `Authorization`.
pub fn bearer(parts: &Parts) -> Option<&str> {
    let v = parts
        .headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// The signed-in user an access token stands for (its session unrevoked and unexpired, its user
/// active): what the `CurrentUser` extractor checks, for callers that got the token elsewhere
/// (the WebSocket's first message).
pub async fn authenticate_token(state: &AppState, token: &str) -> Result<CurrentUser, ApiError> {
    let claims = state.jwt.verify(token).map_err(|e| match e {
        crate::accounts::tokens::TokenError::Expired => ApiError::unauthorized(
            "token_expired",
            "The access token has expired; sign in again.",
        ),
        crate::accounts::tokens::TokenError::Invalid => invalid_token(),
    })?;
    let session = store::sessions::find(&state.db, &claims.sid)
        .await?
        .filter(|s| s.user_id == claims.sub && s.revoked_at.is_none())
        .ok_or_else(invalid_token)?;
    if session.expires_at <= Utc::now() {
        return Err(ApiError::unauthorized(
            "token_expired",
            "The access token has expired; sign in again.",
        ));
    }
    let user = store::users::find(&state.db, &claims.sub)
        .await?
        .ok_or_else(invalid_token)?;
    match user.status.as_str() {
        "active" => {}
        "disabled" => {
            return Err(ApiError::forbidden(
                "account_disabled",
                "This account is disabled.",
            ));
        }
        _ => return Err(invalid_token()),
    }
    Ok(CurrentUser {
        user,
        session_id: session.id,
        expires_at: session.expires_at,
    })
}

fn invalid_token() -> ApiError {
    ApiError::unauthorized("invalid_token", "Invalid or revoked access token.")
}

impl FromRequestParts<AppState> for CurrentUser {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        if let Some(u) = parts.extensions.get::<CurrentUser>() {
            return Ok(u.clone());
        }
        let token = bearer(parts).ok_or_else(|| {
            ApiError::unauthorized(
                "missing_token",
                "Missing access token: send `Authorization: Bearer <token>` from /api/auth/login.",
            )
        })?;
        let current = authenticate_token(state, token).await?;
        parts.extensions.insert(current.clone());
        Ok(current)
    }
}

impl FromRequestParts<AppState> for AdminUser {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let user = CurrentUser::from_request_parts(parts, state).await?;
        if !user.is_admin() {
            return Err(ApiError::forbidden(
                "forbidden",
                "This route is for administrators.",
            ));
        }
        Ok(AdminUser(user))
    }
}
