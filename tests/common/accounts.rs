//! Account helpers for tests: users created directly through the signup module, signed in over
//! HTTP with TOTP codes that are never reused (so repeated sign-ins in one 30 s step never flake).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use tollgate::accounts::signup::{self, NewUser, Role};
use tollgate::accounts::totp;
use tollgate::store;

use super::TestApp;

/// The password every helper-made account has.
pub const PASSWORD: &str = "correct-horse-battery";

/// An account a test can sign in as.
#[derive(Debug, Clone)]
pub struct TestUser {
    pub id: String,
    pub username: String,
    pub password: String,
    pub totp_secret: String,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

/// Creates an ACTIVE account (TOTP enrolled) directly, without HTTP.
pub async fn create_user(app: &TestApp, username: &str, role: Role) -> TestUser {
    let created = signup::create(
        &app.state.db,
        &app.state.keyring,
        &app.state.config,
        NewUser {
            username,
            password: PASSWORD,
            email: None,
            role,
            active: true,
        },
    )
    .await
    .unwrap_or_else(|e| panic!("create user {username}: {e}"));
    TestUser {
        id: created.user.id,
        username: username.to_owned(),
        password: PASSWORD.to_owned(),
        totp_secret: created.totp.secret,
    }
}

/// The helper-made account `username`, created on first use.
pub async fn ensure_user(app: &TestApp, username: &str, role: Role) -> TestUser {
    match store::users::find_by_username(&app.state.db, username)
        .await
        .expect("find user")
    {
        Some(u) => TestUser {
            totp_secret: app
                .state
                .keyring
                .open_string(&u.totp_secret_enc, &u.id)
                .expect("open TOTP secret"),
            id: u.id,
            username: u.username,
            password: PASSWORD.to_owned(),
        },
        None => create_user(app, username, role).await,
    }
}

/// A code for `secret` that the server will accept for `user_id` now: its step is the current
/// one or the next (both valid at ±1 even if the clock ticks before the server checks) and newer
/// than the last step the account used. Waits for the clock when both were used already.
pub async fn fresh_code(app: &TestApp, user_id: &str, secret: &str) -> String {
    loop {
        let last = store::users::find(&app.state.db, user_id)
            .await
            .expect("find user")
            .expect("user exists")
            .totp_last_step;
        let now = unix_now();
        let current = (now / 30) as i64;
        let step = last.map_or(current, |l| (l + 1).max(current));
        if step <= current + 1 {
            return totp::code_at(secret, step as u64 * 30).expect("totp code");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Signs `user` in over HTTP with its password and a fresh code; returns the access token.
pub async fn login(app: &TestApp, user: &TestUser) -> String {
    let (status, body) = login_response(app, user).await;
    assert_eq!(status, 200, "login {}: {body}", user.username);
    body["access_token"]
        .as_str()
        .expect("access_token")
        .to_owned()
}

/// The raw login answer for `user` with a fresh code.
pub async fn login_response(app: &TestApp, user: &TestUser) -> (u16, Value) {
    let code = fresh_code(app, &user.id, &user.totp_secret).await;
    app.post(
        "/api/auth/login",
        None,
        json!({ "username": user.username, "password": user.password, "totp_code": code }),
    )
    .await
}

/// An access token of the administrator `admin` (created on first use).
pub async fn admin_token(app: &TestApp) -> String {
    let admin = ensure_user(app, "admin", Role::Admin).await;
    login(app, &admin).await
}

/// An access token of the ordinary user `name` (created on first use).
pub async fn user_token(app: &TestApp, name: &str) -> String {
    let user = ensure_user(app, name, Role::User).await;
    login(app, &user).await
}

/// A token for a session created directly (as if signed in on another device), without spending
/// a TOTP step — for tests that need more sessions than one 30 s step allows sign-ins.
pub async fn session_token(app: &TestApp, user: &TestUser) -> String {
    let expires_at = chrono::Utc::now() + chrono::Duration::hours(1);
    let session = store::sessions::create(&app.state.db, &user.id, expires_at, None, None)
        .await
        .expect("create session");
    app.state
        .jwt
        .issue(&user.id, &session.id, expires_at)
        .expect("issue token")
}
