//! ① auth: the gateway key from `Authorization: Bearer`, `api-key` or `x-api-key` → its [`KeyCtx`], from the
//! cache (a hit never touches the database), looked up by SHA-256 of the secret.

use std::sync::Arc;

use http::HeaderMap;

use crate::cache::KeyCtx;
use crate::crypto::{mask, sha256_hex};
use crate::error::ApiError;
use crate::state::AppState;

/// The gateway key a request presents, if any.
pub fn presented_key(headers: &HeaderMap) -> Option<&str> {
    if let Some(v) = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        let (scheme, token) = v.split_once(' ')?;
        if scheme.eq_ignore_ascii_case("bearer") {
            return Some(token.trim()).filter(|t| !t.is_empty());
        }
    }
    // `api-key` (Azure-style clients), `x-api-key` (Anthropic's SDKs and Claude Code).
    ["api-key", "x-api-key"].into_iter().find_map(|h| {
        headers
            .get(h)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|t| !t.is_empty())
    })
}

fn invalid(message: String) -> ApiError {
    ApiError::unauthorized("invalid_api_key", message)
}

/// Authenticates the request: valid, active, unexpired key of an active user.
pub async fn authenticate(state: &AppState, headers: &HeaderMap) -> Result<Arc<KeyCtx>, ApiError> {
    let key = presented_key(headers).ok_or_else(|| {
        invalid(
            "You didn't provide an API key. Send your gateway key as `Authorization: Bearer sk-tg-…`."
                .into(),
        )
    })?;
    let wrong = || invalid(format!("Incorrect API key provided: {}.", mask(key)));
    if !key.starts_with("sk-tg-") {
        return Err(wrong());
    }
    let ctx = state
        .caches
        .gateway_key(&state.db, &state.metrics, &sha256_hex(key))
        .await?
        .ok_or_else(wrong)?;
    if !ctx.is_active {
        return Err(invalid("This API key has been disabled.".into()));
    }
    if ctx.is_expired_at(chrono::Utc::now()) {
        return Err(invalid("This API key has expired.".into()));
    }
    if !ctx.user_is_active() {
        return Err(ApiError::forbidden(
            "account_disabled",
            "The account that owns this API key is disabled.",
        ));
    }
    Ok(ctx)
}
