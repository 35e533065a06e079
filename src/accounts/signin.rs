//! Checking credentials: the one path shared by login, enrolment confirmation and the
//! self-service password reset — the attempt recorded and counted by the lockout first, then
//! password and TOTP, then the attempt's outcome recorded.
//!
//! Whatever part is wrong, the caller gets the same `invalid_credentials`; an unknown username is
//! still verified against a dummy hash so timing does not tell whether an account exists. A
//! disabled account is reported only after every factor was right.

use entity::users;

use crate::accounts::{lockout, password, totp};
use crate::error::ApiError;
use crate::state::AppState;
use crate::store;
use crate::store::login_history::{self, Attempt};

/// Why credentials are being checked; decides which factors and statuses apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// Password + TOTP of an active account.
    Login,
    /// Password + first TOTP code of a `pending_totp` account.
    ConfirmEnrolment,
    /// TOTP only (the password is what is being replaced), active account.
    PasswordReset,
    /// A signed-in user proving again who they are before a sensitive change (password, TOTP
    /// rotation): whichever factors are given, active account.
    Reauthenticate,
}

impl Purpose {
    /// The `reason` recorded with a successful attempt.
    fn success_reason(self) -> Option<&'static str> {
        match self {
            Purpose::Login => None,
            Purpose::ConfirmEnrolment => Some("totp_confirm"),
            Purpose::PasswordReset => Some("password_reset"),
            Purpose::Reauthenticate => Some("reauthenticate"),
        }
    }
}

/// One attempt as the client made it.
#[derive(Debug, Clone, Copy)]
pub struct Credentials<'a> {
    pub username: &'a str,
    /// `None` for a password reset.
    pub password: Option<&'a str>,
    /// `None` only when re-authenticating with the password alone.
    pub totp_code: Option<&'a str>,
    pub ip: Option<&'a str>,
    pub user_agent: Option<&'a str>,
}

/// The one message for every wrong part.
pub fn invalid_credentials() -> ApiError {
    ApiError::unauthorized(
        "invalid_credentials",
        "Invalid username, password or TOTP code.",
    )
}

/// A locked username's refusal.
pub fn locked_error(retry_after_secs: u64) -> ApiError {
    ApiError::RateLimited {
        message: format!(
            "Too many failed sign-in attempts for this account; try again in {retry_after_secs} seconds."
        ),
        code: "account_locked",
        retry_after_secs,
    }
}

/// Is `code` a valid, never used code of `user`'s active secret? Records the step when it is.
pub async fn consume_code(
    state: &AppState,
    user: &users::Model,
    code: &str,
) -> Result<Result<(), &'static str>, ApiError> {
    let secret = state
        .keyring
        .open_string(&user.totp_secret_enc, &user.id)
        .map_err(|e| ApiError::internal(anyhow::anyhow!("opening the TOTP secret: {e}")))?;
    let Some(step) = totp::check(&secret, code) else {
        return Ok(Err("bad_totp"));
    };
    if !store::users::consume_totp_step(&state.db, &user.id, step).await? {
        return Ok(Err("totp_replayed"));
    }
    Ok(Ok(()))
}

/// Checks `c` for `purpose`; returns the account when every factor is right (the TOTP step is
/// then used up). Refusals: 429 `account_locked`, 401 `invalid_credentials`, 403
/// `account_disabled`, 503 when password hashing is at capacity; for `ConfirmEnrolment` of an
/// account that is already active, 409.
///
/// The attempt is recorded before anything is checked and counted by the lockout (see
/// `lockout`), then finished with its outcome.
pub async fn check(
    state: &AppState,
    purpose: Purpose,
    c: Credentials<'_>,
) -> Result<users::Model, ApiError> {
    let user = store::users::find_by_username(&state.db, c.username).await?;
    // Lower-cased, as usernames are unique regardless of case: `Alice` and `ALICE` are one
    // account's attempts.
    let username = c.username.to_ascii_lowercase();
    let attempt = login_history::begin(
        &state.db,
        Attempt {
            user_id: user.as_ref().map(|u| u.id.as_str()),
            username: &username,
            ip: c.ip,
            user_agent: c.user_agent,
            success: false,
            reason: Some(login_history::REASON_PENDING),
        },
    )
    .await?;
    let finish = |success: bool, reason: Option<&'static str>| {
        login_history::finish(&state.db, attempt, success, reason)
    };
    let locked = lockout::retry_after(
        &state.db,
        lockout::Attempt {
            username: &username,
            user_id: user.as_ref().map(|u| u.id.as_str()),
            ip: c.ip,
            attempt,
        },
    )
    .await?;
    if let Some(secs) = locked {
        finish(false, Some(login_history::REASON_LOCKED)).await?;
        state
            .metrics
            .rate_limited_total
            .with_label_values(&["login"])
            .inc();
        return Err(locked_error(secs));
    }
    let password_ok = match c.password {
        Some(pw) => {
            let hash = user.as_ref().map(|u| u.password_hash.as_str());
            match password::verify(pw, hash).await {
                Ok(ok) => ok,
                Err(e) => {
                    finish(false, Some(login_history::REASON_BUSY)).await?;
                    return Err(e.into());
                }
            }
        }
        None => true,
    };
    let fail = |reason: &'static str| async move {
        finish(false, Some(reason)).await?;
        Err::<users::Model, _>(invalid_credentials())
    };
    let Some(user) = user else {
        return fail("unknown_user").await;
    };
    if !password_ok {
        return fail("bad_password").await;
    }
    let pending = user.status == "pending_totp";
    if pending != (purpose == Purpose::ConfirmEnrolment) && user.status != "disabled" {
        if pending {
            // A login or reset before the enrolment was confirmed.
            return fail("pending_totp").await;
        }
        // Confirming an enrolment that is already confirmed: the code is still checked first.
        if let Err(reason) = consume_code(state, &user, c.totp_code.unwrap_or_default()).await? {
            return fail(reason).await;
        }
        finish(false, Some(login_history::REASON_ALREADY_CONFIRMED)).await?;
        return Err(ApiError::conflict(
            "This account's TOTP enrolment is already confirmed.",
        ));
    }
    let code_required = purpose != Purpose::Reauthenticate || c.totp_code.is_some();
    if code_required
        && let Err(reason) = consume_code(state, &user, c.totp_code.unwrap_or_default()).await?
    {
        return fail(reason).await;
    }
    if user.status == "disabled" {
        finish(false, Some(login_history::REASON_DISABLED)).await?;
        return Err(ApiError::forbidden(
            "account_disabled",
            "This account is disabled.",
        ));
    }
    finish(true, purpose.success_reason()).await?;
    Ok(user)
}
