//! Account lifecycle over HTTP: register, TOTP enrolment, login, lockout, logout, tokens,
//! password reset and the `/api/me` routes.

mod common;

use std::sync::Arc;

use chrono::{Duration, Utc};
use common::accounts::{
    PASSWORD, TestUser, create_user, fresh_code, login, login_response, session_token, user_token,
};
use common::{TestApp, assert_error};
use sea_orm::sea_query::Expr;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
use serde_json::{Value, json};
use tollgate::accounts::signup::Role;
use tollgate::accounts::totp;
use tollgate::store;

fn unix_now() -> u64 {
    Utc::now().timestamp() as u64
}

/// Registers `username` over HTTP; returns (user id, TOTP secret).
async fn register(app: &TestApp, username: &str) -> (String, String) {
    let (s, b) = app
        .post(
            "/api/auth/register",
            None,
            json!({ "username": username, "password": PASSWORD, "email": format!("{username}@example.com") }),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    (
        b["user"]["id"].as_str().expect("id").to_owned(),
        b["totp"]["secret"].as_str().expect("secret").to_owned(),
    )
}

/// Registers and confirms `username`; returns it as a `TestUser`.
async fn register_confirmed(app: &TestApp, username: &str) -> TestUser {
    let (id, secret) = register(app, username).await;
    let code = fresh_code(app, &id, &secret).await;
    let (s, b) = app
        .post(
            "/api/auth/totp/confirm",
            None,
            json!({ "username": username, "password": PASSWORD, "code": code }),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    TestUser {
        id,
        username: username.to_owned(),
        password: PASSWORD.to_owned(),
        totp_secret: secret,
    }
}

/// Confirming the enrolment signs the user in: the answer carries an access token (as login's
/// does) that works on `/api` at once, because the confirming code cannot be used to log in again.
#[tokio::test]
async fn totp_confirm_signs_in() {
    let app = TestApp::spawn().await;
    let (id, secret) = register(&app, "carol").await;
    let code = fresh_code(&app, &id, &secret).await;
    let (s, b) = app
        .post(
            "/api/auth/totp/confirm",
            None,
            json!({ "username": "carol", "password": PASSWORD, "code": code }),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["user"]["status"], "active");
    assert_eq!(b["user"]["username"], "carol");
    assert_eq!(b["token_type"], "Bearer");
    assert_eq!(
        b["expires_in"].as_u64(),
        Some(app.state.config.auth.access_token_ttl_secs),
        "{b}"
    );
    assert!(b["user"]["last_login_at"].is_string(), "{b}");
    let token = b["access_token"].as_str().expect("access_token").to_owned();
    let (s, me) = app.get("/api/me", Some(&token)).await;
    assert_eq!(s, 200, "{me}");
    assert_eq!(me["id"], id.as_str());
    let (s, v) = app.get("/api/auth/verify", Some(&token)).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["valid"], true);
    let actions = audit_actions(&app, &id).await;
    assert!(
        actions.iter().any(|a| a == "totp.confirm") && actions.iter().any(|a| a == "login"),
        "{actions:?}"
    );
    // Signing out ends that session like any other.
    let (s, _) = app.post("/api/auth/logout", Some(&token), json!({})).await;
    assert_eq!(s, 204);
    let (s, e) = app.get("/api/me", Some(&token)).await;
    assert_eq!(s, 401, "{e}");
    // A second confirmation is refused and issues nothing.
    let code = fresh_code(&app, &id, &secret).await;
    let (s, e) = app
        .post(
            "/api/auth/totp/confirm",
            None,
            json!({ "username": "carol", "password": PASSWORD, "code": code }),
        )
        .await;
    assert_ne!(s, 200, "{e}");
    assert!(e.get("access_token").is_none(), "{e}");
}

async fn login_with(app: &TestApp, username: &str, password: &str, code: &str) -> (u16, Value) {
    app.post(
        "/api/auth/login",
        None,
        json!({ "username": username, "password": password, "totp_code": code }),
    )
    .await
}

/// A six-digit code that is not valid for `secret` anywhere near now.
fn wrong_code(secret: &str) -> String {
    let now = unix_now();
    let valid: Vec<String> = (0..5)
        .map(|i| totp::code_at(secret, now - 60 + i * 30).expect("code"))
        .collect();
    (0..1_000_000)
        .map(|n| format!("{n:06}"))
        .find(|c| !valid.contains(c))
        .expect("some code is wrong")
}

async fn audit_actions(app: &TestApp, user_id: &str) -> Vec<String> {
    let page = store::audit::list(
        &app.state.db,
        Some(user_id),
        None,
        store::PageReq::new(None, Some(100)),
    )
    .await
    .expect("audit");
    page.items.into_iter().map(|e| e.action).collect()
}

#[tokio::test]
async fn register_confirm_login_verify() {
    let app = TestApp::spawn().await;
    let (s, b) = app
        .post(
            "/api/auth/register",
            None,
            json!({ "username": "alice", "password": PASSWORD, "email": "alice@example.com" }),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    let user = &b["user"];
    for field in [
        "id",
        "username",
        "email",
        "role",
        "status",
        "balance_usd",
        "plan",
        "plan_expires_at",
        "rpm_limit",
        "created_at",
        "last_login_at",
    ] {
        assert!(user.get(field).is_some(), "user.{field} missing in {b}");
    }
    assert_eq!(user["username"], "alice");
    assert_eq!(user["email"], "alice@example.com");
    assert_eq!(user["role"], "user");
    assert_eq!(user["status"], "pending_totp");
    assert_eq!(user["balance_usd"], 0.0);
    assert!(user["created_at"].as_str().unwrap().ends_with('Z'));
    assert!(user.get("password_hash").is_none() && user.get("totp_secret_enc").is_none());
    let secret = b["totp"]["secret"].as_str().unwrap().to_owned();
    let url = b["totp"]["otpauth_url"].as_str().unwrap();
    assert!(
        url.starts_with("otpauth://totp/") && url.contains(&secret),
        "{url}"
    );
    assert!(b["totp"]["qr_png_base64"].as_str().unwrap().len() > 100);
    let id = user["id"].as_str().unwrap().to_owned();

    // The secret is stored sealed, bound to the user id.
    let row = store::users::find(&app.state.db, &id)
        .await
        .unwrap()
        .unwrap();
    assert!(!row.totp_secret_enc.contains(&secret));
    assert_eq!(
        app.state
            .keyring
            .open_string(&row.totp_secret_enc, &id)
            .unwrap(),
        secret
    );
    assert!(
        app.state
            .keyring
            .open_string(&row.totp_secret_enc, "other")
            .is_err()
    );

    // Pending accounts cannot sign in, with the usual message.
    let code = totp::current_code(&secret).unwrap();
    let (s, pending) = login_with(&app, "alice", PASSWORD, &code).await;
    assert_error(s, &pending, 401, "invalid_credentials");

    // Confirmation: wrong password and wrong code are refused, then the right one activates.
    let (s, e) = app
        .post(
            "/api/auth/totp/confirm",
            None,
            json!({ "username": "alice", "password": "wrong-password", "code": code }),
        )
        .await;
    assert_error(s, &e, 401, "invalid_credentials");
    let (s, e) = app
        .post(
            "/api/auth/totp/confirm",
            None,
            json!({ "username": "alice", "password": PASSWORD, "code": wrong_code(&secret) }),
        )
        .await;
    assert_error(s, &e, 401, "invalid_credentials");
    let code = fresh_code(&app, &id, &secret).await;
    let (s, b) = app
        .post(
            "/api/auth/totp/confirm",
            None,
            json!({ "username": "alice", "password": PASSWORD, "code": code }),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["user"]["status"], "active");

    // The code used for confirmation cannot sign in (single use).
    let (s, e) = login_with(&app, "alice", PASSWORD, &code).await;
    assert_error(s, &e, 401, "invalid_credentials");

    let alice = TestUser {
        id: id.clone(),
        username: "alice".into(),
        password: PASSWORD.into(),
        totp_secret: secret,
    };
    let (s, b) = login_response(&app, &alice).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["token_type"], "Bearer");
    assert_eq!(b["expires_in"], 3600);
    assert_eq!(b["user"]["id"], id.as_str());
    assert!(b["user"]["last_login_at"].is_string(), "{b}");
    let token = b["access_token"].as_str().unwrap();

    let (s, v) = app.get("/api/auth/verify", Some(token)).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["valid"], true);
    assert_eq!(v["user"]["username"], "alice");
    let exp = chrono::DateTime::parse_from_rfc3339(v["expires_at"].as_str().unwrap()).unwrap();
    let left = exp.timestamp() - Utc::now().timestamp();
    assert!((3500..=3600).contains(&left), "expires in {left}s");
    let (s, me) = app.get("/api/me", Some(token)).await;
    assert_eq!(s, 200);
    assert_eq!(me["id"], id.as_str());
    assert_eq!(me["status"], "active");

    let actions = audit_actions(&app, &id).await;
    for a in ["totp.confirm", "login"] {
        assert!(
            actions.iter().any(|x| x == a),
            "{a} not audited: {actions:?}"
        );
    }
    let all = store::audit::list(
        &app.state.db,
        None,
        Some("register"),
        store::PageReq::new(None, None),
    )
    .await
    .unwrap();
    assert_eq!(all.total, 1);
    assert_eq!(
        all.items[0].target.as_deref(),
        Some(format!("user:{id}").as_str())
    );
}

#[tokio::test]
async fn register_validates_input() {
    let app = TestApp::spawn().await;
    let cases = [
        (
            json!({ "username": "ab", "password": PASSWORD }),
            "username",
        ),
        (
            json!({ "username": "a".repeat(33), "password": PASSWORD }),
            "username",
        ),
        (
            json!({ "username": "bad name", "password": PASSWORD }),
            "username",
        ),
        (
            json!({ "username": "bad:name", "password": PASSWORD }),
            "username",
        ),
        (
            json!({ "username": "bob", "password": "short12" }),
            "password",
        ),
        (
            json!({ "username": "bob", "password": "x".repeat(129) }),
            "password",
        ),
        (
            json!({ "username": "bob", "password": PASSWORD, "email": "not-an-email" }),
            "email",
        ),
    ];
    for (body, param) in cases {
        let (s, e) = app.post("/api/auth/register", None, body.clone()).await;
        assert_error(s, &e, 400, "invalid_value");
        assert_eq!(e["error"]["param"], param, "{body} → {e}");
    }
    // Limits are inclusive: 3 and 32 characters, 8 and 128 (characters, not bytes).
    for (u, p) in [
        ("abc".to_owned(), "12345678".to_owned()),
        ("b".repeat(32), "é".repeat(128)),
    ] {
        let (s, b) = app
            .post(
                "/api/auth/register",
                None,
                json!({ "username": u, "password": p }),
            )
            .await;
        assert_eq!(s, 201, "{u}: {b}");
    }
    let (s, e) = app
        .post(
            "/api/auth/register",
            None,
            json!({ "username": "bob", "password": PASSWORD, "admin": true }),
        )
        .await;
    assert_error(s, &e, 400, "unknown_field");
    let (s, e) = app
        .post("/api/auth/register", None, json!({ "username": "bob" }))
        .await;
    assert_error(s, &e, 400, "missing_field");
    let (s, _) = app
        .post(
            "/api/auth/register",
            None,
            json!({ "username": "bob", "password": PASSWORD }),
        )
        .await;
    assert_eq!(s, 201);
    let (s, e) = app
        .post(
            "/api/auth/register",
            None,
            json!({ "username": "bob", "password": "another-password" }),
        )
        .await;
    assert_error(s, &e, 409, "conflict");
    // Nothing about the failed attempts reached the database.
    let users = store::users::list(
        &app.state.db,
        Default::default(),
        store::PageReq::new(None, None),
    )
    .await
    .unwrap();
    assert_eq!(users.total, 3);
}

#[tokio::test]
async fn closed_registration_is_refused() {
    let app =
        TestApp::spawn_with(|c| c.auth.registration = tollgate::config::Registration::Closed).await;
    let (s, e) = app
        .post(
            "/api/auth/register",
            None,
            json!({ "username": "carol", "password": PASSWORD }),
        )
        .await;
    assert_error(s, &e, 403, "registration_closed");
    assert!(
        store::users::find_by_username(&app.state.db, "carol")
            .await
            .unwrap()
            .is_none()
    );
    // The runtime setting overrides the config.
    let admin = common::accounts::admin_token(&app).await;
    let (s, b) = app
        .put(
            "/api/admin/settings/registration",
            Some(&admin),
            json!({ "value": "open" }),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    let (s, b) = app
        .post(
            "/api/auth/register",
            None,
            json!({ "username": "carol", "password": PASSWORD }),
        )
        .await;
    assert_eq!(s, 201, "{b}");
}

#[tokio::test]
async fn new_users_get_the_initial_balance_as_a_grant() {
    let app = TestApp::spawn_with(|c| c.billing.initial_balance_usd = 2.5).await;
    let (id, _) = register(&app, "dave").await;
    let row = store::users::find(&app.state.db, &id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row.balance_nanos, 2_500_000_000);
    let ledger = store::ledger::list_for_user(&app.state.db, &id, store::PageReq::new(None, None))
        .await
        .unwrap();
    assert_eq!(ledger.total, 1);
    let e = &ledger.items[0];
    assert_eq!(
        (e.kind.as_str(), e.amount_nanos, e.balance_after_nanos),
        ("grant", 2_500_000_000, 2_500_000_000)
    );

    // Without an initial balance: no ledger entry.
    let app = TestApp::spawn().await;
    let (id, _) = register(&app, "erin").await;
    let ledger = store::ledger::list_for_user(&app.state.db, &id, store::PageReq::new(None, None))
        .await
        .unwrap();
    assert_eq!(ledger.total, 0);
}

#[tokio::test]
async fn every_wrong_part_gets_the_same_answer() {
    let app = TestApp::spawn().await;
    let u = create_user(&app, "frank", Role::User).await;
    // A fresh code for each attempt keeps "wrong password" from also being "replayed code".
    let mut messages = Vec::new();
    let code = fresh_code(&app, &u.id, &u.totp_secret).await;
    for (name, pw, code) in [
        ("frank", "wrong-password", code.clone()),
        ("frank", PASSWORD, wrong_code(&u.totp_secret)),
        ("nobody", PASSWORD, code.clone()),
        ("frank", PASSWORD, "12345".to_owned()),
    ] {
        let (s, e) = login_with(&app, name, pw, &code).await;
        assert_error(s, &e, 401, "invalid_credentials");
        assert_eq!(e["error"]["type"], "authentication_error");
        messages.push(e["error"]["message"].as_str().unwrap().to_owned());
    }
    messages.dedup();
    assert_eq!(messages.len(), 1, "{messages:?}");
    // Missing parts and unknown fields are request errors, not credential errors.
    let (s, e) = app
        .post(
            "/api/auth/login",
            None,
            json!({ "username": "frank", "password": PASSWORD }),
        )
        .await;
    assert_error(s, &e, 400, "missing_field");
    let (s, e) = app
        .post("/api/auth/login", None, json!({ "username": "frank", "password": PASSWORD, "totp_code": "000000", "remember": true }))
        .await;
    assert_error(s, &e, 400, "unknown_field");

    // Each attempt is in the login history with its reason.
    let history =
        store::login_history::list_for_user(&app.state.db, &u.id, store::PageReq::new(None, None))
            .await
            .unwrap();
    let reasons: Vec<_> = history
        .items
        .iter()
        .map(|h| (h.success, h.reason.clone()))
        .collect();
    assert!(
        reasons.contains(&(false, Some("bad_password".into()))),
        "{reasons:?}"
    );
    assert!(
        reasons.contains(&(false, Some("bad_totp".into()))),
        "{reasons:?}"
    );
}

#[tokio::test]
async fn a_totp_code_is_single_use() {
    let app = TestApp::spawn().await;
    let u = create_user(&app, "gina", Role::User).await;
    let code = fresh_code(&app, &u.id, &u.totp_secret).await;
    let (s, b) = login_with(&app, "gina", PASSWORD, &code).await;
    assert_eq!(s, 200, "{b}");
    let (s, e) = login_with(&app, "gina", PASSWORD, &code).await;
    assert_error(s, &e, 401, "invalid_credentials");
    // An older code (the previous step) is refused too once a newer one was used.
    let newer = fresh_code(&app, &u.id, &u.totp_secret).await;
    let (s, b) = login_with(&app, "gina", PASSWORD, &newer).await;
    assert_eq!(s, 200, "{b}");
    let (s, e) = login_with(&app, "gina", PASSWORD, &code).await;
    assert_error(s, &e, 401, "invalid_credentials");
    let row =
        store::login_history::list_for_user(&app.state.db, &u.id, store::PageReq::new(None, None))
            .await
            .unwrap();
    assert!(
        row.items
            .iter()
            .any(|h| h.reason.as_deref() == Some("totp_replayed"))
    );
}

async fn raw_login(app: &TestApp, body: Value) -> reqwest::Response {
    app.client
        .post(app.url("/api/auth/login"))
        .json(&body)
        .send()
        .await
        .expect("request")
}

#[tokio::test]
async fn five_failures_lock_the_username_for_fifteen_minutes() {
    let app = TestApp::spawn().await;
    let u = create_user(&app, "hank", Role::User).await;
    let other = create_user(&app, "ivan", Role::User).await;
    for _ in 0..5 {
        let (s, e) = login_with(&app, "hank", "wrong-password", "000000").await;
        assert_error(s, &e, 401, "invalid_credentials");
    }
    // Locked: even the right credentials are refused, with retry-after.
    let code = fresh_code(&app, &u.id, &u.totp_secret).await;
    let resp = raw_login(
        &app,
        json!({ "username": "hank", "password": PASSWORD, "totp_code": code }),
    )
    .await;
    assert_eq!(resp.status(), 429);
    let retry: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((890..=900).contains(&retry), "retry-after {retry}");
    let e: Value = resp.json().await.unwrap();
    assert_error(429, &e, 429, "account_locked");
    assert_eq!(e["error"]["type"], "rate_limit_error");
    // The refused correct code was not consumed: it still works once the lock is over.
    let row = store::users::find(&app.state.db, &u.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row.totp_last_step, None);
    // The refusal is in the account's own login history.
    let history =
        store::login_history::list_for_user(&app.state.db, &u.id, store::PageReq::new(None, None))
            .await
            .unwrap();
    assert_eq!(history.items[0].reason.as_deref(), Some("locked"));
    assert!(!history.items[0].success);

    // Other usernames are not affected; a second replica on the same database sees the lock.
    login(&app, &other).await;
    let replica = TestApp::spawn_on(Arc::clone(&app.db), |_| {}).await;
    let (s, e) = login_with(&replica, "hank", PASSWORD, &code).await;
    assert_error(s, &e, 429, "account_locked");
    // Password reset is locked too.
    let (s, e) = app
        .post(
            "/api/auth/password/reset",
            None,
            json!({ "username": "hank", "totp_code": code, "new_password": "brand-new-password" }),
        )
        .await;
    assert_error(s, &e, 429, "account_locked");

    // Sixteen minutes later (moved in the database) the lock is over, and refused attempts made
    // while locked did not extend it.
    entity::login_history::Entity::update_many()
        .col_expr(
            entity::login_history::Column::At,
            Expr::value(Utc::now() - Duration::minutes(16)),
        )
        .filter(entity::login_history::Column::Username.eq("hank"))
        .filter(entity::login_history::Column::Reason.ne("locked"))
        .exec(&app.state.db)
        .await
        .unwrap();
    let (s, b) = login_with(&app, "hank", PASSWORD, &code).await;
    assert_eq!(s, 200, "{b}");
    // A success clears the count: four new failures do not lock.
    for _ in 0..4 {
        let (s, _) = login_with(&app, "hank", "wrong-password", "000000").await;
        assert_eq!(s, 401);
    }
    let (s, b) = login_response(&app, &u).await;
    assert_eq!(s, 200, "{b}");
}

#[tokio::test]
async fn unknown_usernames_lock_too() {
    let app = TestApp::spawn().await;
    for _ in 0..5 {
        let (s, _) = login_with(&app, "ghost", PASSWORD, "123456").await;
        assert_eq!(s, 401);
    }
    let (s, e) = login_with(&app, "ghost", PASSWORD, "123456").await;
    assert_error(s, &e, 429, "account_locked");
}

#[tokio::test]
async fn disabled_accounts_are_told_only_after_correct_credentials() {
    let app = TestApp::spawn().await;
    let u = create_user(&app, "judy", Role::User).await;
    let token = login(&app, &u).await;
    store::users::update(
        &app.state.db,
        &u.id,
        store::users::UserChanges {
            status: Some("disabled".into()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let (s, e) = login_with(&app, "judy", "wrong-password", "000000").await;
    assert_error(s, &e, 401, "invalid_credentials");
    let (s, e) = login_with(&app, "judy", PASSWORD, &wrong_code(&u.totp_secret)).await;
    assert_error(s, &e, 401, "invalid_credentials");
    let (s, e) = login_response(&app, &u).await;
    assert_error(s, &e, 403, "account_disabled");
    // Existing tokens stop working too.
    let (s, e) = app.get("/api/me", Some(&token)).await;
    assert_error(s, &e, 403, "account_disabled");
}

#[tokio::test]
async fn logout_revokes_only_that_token() {
    let app = TestApp::spawn().await;
    let u = create_user(&app, "kate", Role::User).await;
    let first = login(&app, &u).await;
    let second = login(&app, &u).await;
    let (s, b) = app.post("/api/auth/logout", Some(&first), json!({})).await;
    assert_eq!(s, 204, "{b}");
    let (s, e) = app.get("/api/auth/verify", Some(&first)).await;
    assert_error(s, &e, 401, "invalid_token");
    let (s, e) = app.post("/api/auth/logout", Some(&first), json!({})).await;
    assert_error(s, &e, 401, "invalid_token");
    let (s, _) = app.get("/api/auth/verify", Some(&second)).await;
    assert_eq!(s, 200);
    assert!(
        audit_actions(&app, &u.id)
            .await
            .contains(&"logout".to_owned())
    );
}

#[tokio::test]
async fn missing_garbage_and_expired_tokens_are_refused() {
    let app = TestApp::spawn().await;
    let u = create_user(&app, "liam", Role::User).await;
    let (s, e) = app.get("/api/me", None).await;
    assert_error(s, &e, 401, "missing_token");
    let (s, e) = app.get("/api/auth/verify", Some("not-a-jwt")).await;
    assert_error(s, &e, 401, "invalid_token");

    // A token past its own expiry.
    let session = store::sessions::create(
        &app.state.db,
        &u.id,
        Utc::now() + Duration::hours(1),
        None,
        None,
    )
    .await
    .unwrap();
    let old = app
        .state
        .jwt
        .issue(&u.id, &session.id, Utc::now() - Duration::minutes(1))
        .unwrap();
    let (s, e) = app.get("/api/auth/verify", Some(&old)).await;
    assert_error(s, &e, 401, "token_expired");
    // A valid token whose session has expired.
    let ended = store::sessions::create(
        &app.state.db,
        &u.id,
        Utc::now() - Duration::seconds(1),
        None,
        None,
    )
    .await
    .unwrap();
    let t = app
        .state
        .jwt
        .issue(&u.id, &ended.id, Utc::now() + Duration::hours(1))
        .unwrap();
    let (s, e) = app.get("/api/me", Some(&t)).await;
    assert_error(s, &e, 401, "token_expired");
    // A token naming another user's session is not accepted.
    let other = create_user(&app, "mia", Role::User).await;
    let forged = app
        .state
        .jwt
        .issue(&other.id, &session.id, Utc::now() + Duration::hours(1))
        .unwrap();
    let (s, e) = app.get("/api/me", Some(&forged)).await;
    assert_error(s, &e, 401, "invalid_token");
    // And the matching pair works, which is what makes the refusals above meaningful.
    let good = app
        .state
        .jwt
        .issue(&u.id, &session.id, Utc::now() + Duration::hours(1))
        .unwrap();
    let (s, _) = app.get("/api/me", Some(&good)).await;
    assert_eq!(s, 200);
}

#[tokio::test]
async fn password_reset_by_second_factor() {
    let app = TestApp::spawn().await;
    let u = create_user(&app, "nina", Role::User).await;
    let token = session_token(&app, &u).await;
    let reset = |username: &str, code: String, pw: &str| json!({ "username": username, "totp_code": code, "new_password": pw });
    let (s, e) = app
        .post(
            "/api/auth/password/reset",
            None,
            reset(
                "nina",
                fresh_code(&app, &u.id, &u.totp_secret).await,
                "short",
            ),
        )
        .await;
    assert_error(s, &e, 400, "invalid_value");
    assert_eq!(e["error"]["param"], "new_password");
    let (s, e) = app
        .post(
            "/api/auth/password/reset",
            None,
            reset("nina", wrong_code(&u.totp_secret), "brand-new-password"),
        )
        .await;
    assert_error(s, &e, 401, "invalid_credentials");
    let (s, e) = app
        .post(
            "/api/auth/password/reset",
            None,
            reset("nobody", "123456".into(), "brand-new-password"),
        )
        .await;
    assert_error(s, &e, 401, "invalid_credentials");
    let (s, e) = app
        .post("/api/auth/password/reset", None, json!({ "username": "nina", "totp_code": "1", "new_password": "brand-new-password", "x": 1 }))
        .await;
    assert_error(s, &e, 400, "unknown_field");

    let code = fresh_code(&app, &u.id, &u.totp_secret).await;
    let (s, b) = app
        .post(
            "/api/auth/password/reset",
            None,
            reset("nina", code.clone(), "brand-new-password"),
        )
        .await;
    assert_eq!(s, 204, "{b}");
    // The code is used up; every session is revoked; only the new password works.
    let (s, e) = app
        .post(
            "/api/auth/password/reset",
            None,
            reset("nina", code, "another-password"),
        )
        .await;
    assert_error(s, &e, 401, "invalid_credentials");
    let (s, e) = app.get("/api/me", Some(&token)).await;
    assert_error(s, &e, 401, "invalid_token");
    let (s, e) = login_with(&app, "nina", PASSWORD, "000000").await;
    assert_error(s, &e, 401, "invalid_credentials");
    let renewed = TestUser {
        password: "brand-new-password".into(),
        ..u.clone()
    };
    login(&app, &renewed).await;
    assert!(
        audit_actions(&app, &u.id)
            .await
            .contains(&"password.reset".to_owned())
    );
}

#[tokio::test]
async fn failed_resets_count_towards_the_lockout() {
    let app = TestApp::spawn().await;
    let u = create_user(&app, "olga", Role::User).await;
    for _ in 0..5 {
        let (s, _) = app
            .post("/api/auth/password/reset", None, json!({ "username": "olga", "totp_code": wrong_code(&u.totp_secret), "new_password": "brand-new-password" }))
            .await;
        assert_eq!(s, 401);
    }
    let (s, e) = login_response(&app, &u).await;
    assert_error(s, &e, 429, "account_locked");
}

#[tokio::test]
async fn me_profile_update() {
    let app = TestApp::spawn().await;
    let token = user_token(&app, "paul").await;
    let (s, b) = app
        .patch(
            "/api/me",
            Some(&token),
            json!({ "email": "paul@example.org" }),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["email"], "paul@example.org");
    let (s, b) = app.get("/api/me", Some(&token)).await;
    assert_eq!((s, b["email"].clone()), (200, json!("paul@example.org")));
    let (s, e) = app
        .patch("/api/me", Some(&token), json!({ "email": "nope" }))
        .await;
    assert_error(s, &e, 400, "invalid_value");
    assert_eq!(e["error"]["param"], "email");
    let (s, e) = app
        .patch("/api/me", Some(&token), json!({ "role": "admin" }))
        .await;
    assert_error(s, &e, 400, "unknown_field");
    let (s, b) = app.get("/api/me", Some(&token)).await;
    assert_eq!((s, b["role"].clone()), (200, json!("user")));
    // An empty patch changes nothing; null removes the address.
    let (s, b) = app.patch("/api/me", Some(&token), json!({})).await;
    assert_eq!((s, b["email"].clone()), (200, json!("paul@example.org")));
    let (s, b) = app
        .patch("/api/me", Some(&token), json!({ "email": null }))
        .await;
    assert_eq!((s, b["email"].clone()), (200, Value::Null));
    let (s, log) = app
        .get("/api/me/audit-log?action=me.update", Some(&token))
        .await;
    assert_eq!(s, 200);
    assert_eq!(log["total"], 2, "{log}");
    let (s, e) = app.patch("/api/me", None, json!({ "email": null })).await;
    assert_error(s, &e, 401, "missing_token");
}

#[tokio::test]
async fn me_password_change_keeps_only_this_session() {
    let app = TestApp::spawn().await;
    let u = create_user(&app, "quinn", Role::User).await;
    let current = login(&app, &u).await;
    let other = session_token(&app, &u).await;
    let (s, e) = app
        .post(
            "/api/me/password",
            Some(&current),
            json!({ "current_password": "wrong-password", "new_password": "brand-new-password" }),
        )
        .await;
    assert_error(s, &e, 401, "invalid_credentials");
    let (s, e) = app
        .post(
            "/api/me/password",
            Some(&current),
            json!({ "current_password": PASSWORD, "new_password": "short" }),
        )
        .await;
    assert_error(s, &e, 400, "invalid_value");
    // Nothing changed so far: both sessions live.
    assert_eq!(app.get("/api/me", Some(&other)).await.0, 200);
    let (s, b) = app
        .post(
            "/api/me/password",
            Some(&current),
            json!({ "current_password": PASSWORD, "new_password": "brand-new-password" }),
        )
        .await;
    assert_eq!(s, 204, "{b}");
    assert_eq!(app.get("/api/me", Some(&current)).await.0, 200);
    let (s, e) = app.get("/api/me", Some(&other)).await;
    assert_error(s, &e, 401, "invalid_token");
    let (s, e) = login_with(&app, "quinn", PASSWORD, "000000").await;
    assert_error(s, &e, 401, "invalid_credentials");
    login(
        &app,
        &TestUser {
            password: "brand-new-password".into(),
            ..u.clone()
        },
    )
    .await;
    let (_, log) = app
        .get("/api/me/audit-log?action=password.change", Some(&current))
        .await;
    assert_eq!(log["total"], 1, "{log}");
    assert!(!log.to_string().contains("brand-new-password"));
}

#[tokio::test]
async fn me_totp_rotation() {
    let app = TestApp::spawn().await;
    let u = create_user(&app, "rosa", Role::User).await;
    let token = login(&app, &u).await;
    let (s, e) = app
        .post(
            "/api/me/totp/confirm",
            Some(&token),
            json!({ "code": "123456" }),
        )
        .await;
    assert_error(s, &e, 400, "no_pending_totp");
    let code = fresh_code(&app, &u.id, &u.totp_secret).await;
    let (s, e) = app
        .post(
            "/api/me/totp/rotate",
            Some(&token),
            json!({ "password": "wrong-password", "totp_code": code }),
        )
        .await;
    assert_error(s, &e, 401, "invalid_credentials");
    let (s, e) = app
        .post(
            "/api/me/totp/rotate",
            Some(&token),
            json!({ "password": PASSWORD, "totp_code": wrong_code(&u.totp_secret) }),
        )
        .await;
    assert_error(s, &e, 401, "invalid_credentials");
    let (s, b) = app
        .post(
            "/api/me/totp/rotate",
            Some(&token),
            json!({ "password": PASSWORD, "totp_code": code }),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    let new_secret = b["secret"].as_str().unwrap().to_owned();
    assert_ne!(new_secret, u.totp_secret);
    assert!(b["otpauth_url"].as_str().unwrap().contains(&new_secret));
    assert!(b["qr_png_base64"].is_string());
    // Not in effect yet: the active secret is still the old one, and the new one is sealed.
    let row = store::users::find(&app.state.db, &u.id)
        .await
        .unwrap()
        .unwrap();
    let pending = row.totp_pending_enc.as_deref().expect("pending secret");
    assert!(!pending.contains(&new_secret));
    assert_eq!(
        app.state.keyring.open_string(pending, &u.id).unwrap(),
        new_secret
    );
    assert_eq!(
        app.state
            .keyring
            .open_string(&row.totp_secret_enc, &u.id)
            .unwrap(),
        u.totp_secret
    );

    // Confirmation checks the PENDING secret.
    let old_code = totp::current_code(&u.totp_secret).unwrap();
    let (s, e) = app
        .post(
            "/api/me/totp/confirm",
            Some(&token),
            json!({ "code": old_code }),
        )
        .await;
    assert_error(s, &e, 401, "invalid_credentials");
    let new_code = totp::current_code(&new_secret).unwrap();
    let (s, b) = app
        .post(
            "/api/me/totp/confirm",
            Some(&token),
            json!({ "code": new_code }),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["user"]["status"], "active");
    let (s, e) = app
        .post(
            "/api/me/totp/confirm",
            Some(&token),
            json!({ "code": new_code }),
        )
        .await;
    assert_error(s, &e, 400, "no_pending_totp");

    // Now only the new secret signs in.
    let rotated = TestUser {
        totp_secret: new_secret,
        ..u.clone()
    };
    let (s, e) = login_with(
        &app,
        "rosa",
        PASSWORD,
        &totp::current_code(&u.totp_secret).unwrap(),
    )
    .await;
    assert_error(s, &e, 401, "invalid_credentials");
    login(&app, &rotated).await;
    let (_, log) = app.get("/api/me/audit-log", Some(&token)).await;
    let actions: Vec<_> = log["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        actions.contains(&"totp.rotate".to_owned())
            && actions.contains(&"totp.rotate.confirm".to_owned()),
        "{actions:?}"
    );
    assert!(
        !log.to_string().contains(&rotated.totp_secret),
        "secret in audit log"
    );
}

#[tokio::test]
async fn me_login_history_ip_records_and_audit_log() {
    let app = TestApp::spawn().await;
    let u = create_user(&app, "sam", Role::User).await;
    let (s, _) = login_with(&app, "sam", "wrong-password", "000000").await;
    assert_eq!(s, 401);
    let token = login(&app, &u).await;
    login(&app, &u).await;

    let (s, h) = app.get("/api/me/login-history", Some(&token)).await;
    assert_eq!(s, 200, "{h}");
    assert_eq!(
        (h["total"].clone(), h["page"].clone(), h["per_page"].clone()),
        (json!(3), json!(1), json!(20))
    );
    let rows = h["data"].as_array().unwrap();
    // Newest first: two successes, then the failure.
    assert_eq!(rows[0]["success"], true);
    assert_eq!(rows[2]["success"], false);
    assert_eq!(rows[2]["reason"], "bad_password");
    assert_eq!(rows[0]["ip"], "127.0.0.1");
    assert!(rows[0]["at"].as_str().unwrap().ends_with('Z'));
    for k in ["at", "ip", "user_agent", "success", "reason"] {
        assert!(rows[0].get(k).is_some(), "{k} missing");
    }
    let (_, p2) = app
        .get("/api/me/login-history?page=2&per_page=2", Some(&token))
        .await;
    assert_eq!(p2["data"].as_array().unwrap().len(), 1);
    assert_eq!(p2["data"][0]["success"], false);

    let (s, ips) = app.get("/api/me/ip-records", Some(&token)).await;
    assert_eq!(s, 200, "{ips}");
    assert_eq!(ips["total"], 1);
    assert_eq!(ips["data"][0]["ip"], "127.0.0.1");
    assert_eq!(ips["data"][0]["count"], 2);
    assert!(ips["data"][0]["first_seen"].is_string() && ips["data"][0]["last_seen"].is_string());

    let (s, log) = app
        .get("/api/me/audit-log?action=login", Some(&token))
        .await;
    assert_eq!(s, 200);
    assert_eq!(log["total"], 2);
    assert_eq!(log["data"][0]["action"], "login");
    assert_eq!(log["data"][0]["target"], format!("user:{}", u.id));
    assert_eq!(log["data"][0]["ip"], "127.0.0.1");
    let (_, none) = app
        .get("/api/me/audit-log?action=nothing.like.this", Some(&token))
        .await;
    assert_eq!(none["total"], 0);

    // Another user sees none of it.
    let other = user_token(&app, "tina").await;
    let (_, h) = app.get("/api/me/login-history", Some(&other)).await;
    assert_eq!(h["total"], 1);
    let (_, log) = app.get("/api/me/audit-log", Some(&other)).await;
    assert!(
        log["data"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["target"] != format!("user:{}", u.id))
    );
    for path in [
        "/api/me/login-history",
        "/api/me/ip-records",
        "/api/me/audit-log",
    ] {
        let (s, e) = app.get(path, None).await;
        assert_error(s, &e, 401, "missing_token");
    }
}

#[tokio::test]
async fn pending_users_cannot_reset_or_use_tokens() {
    let app = TestApp::spawn().await;
    let (id, secret) = register(&app, "uma").await;
    let code = fresh_code(&app, &id, &secret).await;
    let (s, e) = app
        .post(
            "/api/auth/password/reset",
            None,
            json!({ "username": "uma", "totp_code": code, "new_password": "brand-new-password" }),
        )
        .await;
    assert_error(s, &e, 401, "invalid_credentials");
    // A confirmed user registered over HTTP signs in like any other.
    let u = register_confirmed(&app, "vera").await;
    login(&app, &u).await;
}

#[tokio::test]
async fn confirming_twice_is_a_conflict_and_needs_the_code() {
    let app = TestApp::spawn().await;
    let u = register_confirmed(&app, "walt").await;
    // Without a right code the state of the account is not revealed.
    let (s, e) = app
        .post(
            "/api/auth/totp/confirm",
            None,
            json!({ "username": "walt", "password": PASSWORD, "code": wrong_code(&u.totp_secret) }),
        )
        .await;
    assert_error(s, &e, 401, "invalid_credentials");
    let code = fresh_code(&app, &u.id, &u.totp_secret).await;
    let (s, e) = app
        .post(
            "/api/auth/totp/confirm",
            None,
            json!({ "username": "walt", "password": PASSWORD, "code": code }),
        )
        .await;
    assert_error(s, &e, 409, "conflict");
    let (s, e) = app
        .post(
            "/api/auth/totp/confirm",
            None,
            json!({ "username": "walt", "code": code }),
        )
        .await;
    assert_error(s, &e, 400, "missing_field");
}

#[test]
fn openapi_documents_every_account_route() {
    let doc = serde_json::to_value(tollgate::app::openapi()).unwrap();
    for (path, methods) in [
        ("/api/auth/register", &["post"][..]),
        ("/api/auth/totp/confirm", &["post"]),
        ("/api/auth/login", &["post"]),
        ("/api/auth/logout", &["post"]),
        ("/api/auth/verify", &["get"]),
        ("/api/auth/password/reset", &["post"]),
        ("/api/me", &["get", "patch"]),
        ("/api/me/password", &["post"]),
        ("/api/me/totp/rotate", &["post"]),
        ("/api/me/totp/confirm", &["post"]),
        ("/api/me/login-history", &["get"]),
        ("/api/me/ip-records", &["get"]),
        ("/api/me/audit-log", &["get"]),
        ("/api/admin/users", &["get", "post"]),
        ("/api/admin/users/{id}", &["get", "patch", "delete"]),
        ("/api/admin/users/{id}/reset-password", &["post"]),
        ("/api/admin/users/{id}/reset-totp", &["post"]),
        ("/api/admin/users/{id}/balance", &["post"]),
        ("/api/admin/audit-log", &["get"]),
        ("/api/admin/settings", &["get"]),
        ("/api/admin/settings/{key}", &["put"]),
    ] {
        for m in methods {
            assert!(
                doc["paths"][path][m].is_object(),
                "{m} {path} missing from the OpenAPI document"
            );
        }
    }
    // Authenticated routes say so; login does not.
    assert!(doc["paths"]["/api/me"]["get"]["security"].is_array());
    assert!(doc["paths"]["/api/auth/login"]["post"]["security"].is_null());
    assert!(doc["components"]["schemas"]["UserView"].is_object());
}

/// Usernames are one account whatever their case, on every database: a second `ALICE` is refused,
/// `Alice` signs in as `alice`, and failures in any case count towards one lockout.
#[tokio::test]
async fn usernames_are_unique_and_sign_in_regardless_of_case() {
    let app = TestApp::spawn().await;
    let alice = create_user(&app, "alice", Role::User).await;
    for other in ["ALICE", "Alice", "aLiCe"] {
        let err = tollgate::accounts::signup::create(
            &app.state.db,
            &app.state.keyring,
            &app.state.config,
            tollgate::accounts::signup::NewUser {
                username: other,
                password: PASSWORD,
                email: None,
                role: Role::User,
                active: true,
            },
        )
        .await
        .expect_err("taken in another case");
        assert!(
            matches!(err, tollgate::accounts::signup::SignupError::Duplicate(_)),
            "{other}: {err}"
        );
    }
    let found = store::users::find_by_username(&app.state.db, "ALICE")
        .await
        .unwrap()
        .expect("found in any case");
    assert_eq!(
        (found.id.as_str(), found.username.as_str()),
        (alice.id.as_str(), "alice")
    );

    let code = fresh_code(&app, &alice.id, &alice.totp_secret).await;
    let (s, b) = login_with(&app, "Alice", PASSWORD, &code).await;
    assert_eq!(s, 200, "{b}");

    // Five failures spread over spellings lock the one account.
    for name in ["ALICE", "Alice", "alice", "aLICE", "alicE"] {
        let (s, e) = login_with(&app, name, "wrong-password", "000000").await;
        assert_error(s, &e, 401, "invalid_credentials");
    }
    let (s, e) = login_with(&app, "alice", PASSWORD, "000000").await;
    assert_error(s, &e, 429, "account_locked");
}

/// The migration to case-insensitive usernames keeps every account: in a group equal but for
/// case the oldest keeps its name, later ones get a free `-N` suffix (on MySQL/MariaDB such
/// groups cannot exist; its collation already compared without case).
#[tokio::test]
async fn the_username_migration_renames_case_duplicates_and_drops_none() {
    use migration::{Migrator, MigratorTrait};
    use sea_orm::ConnectionTrait;
    let db = common::TestDb::new().await;
    let conn = store::connect(&db.url, 1).await.unwrap();
    Migrator::up(&conn, Some(1)).await.unwrap();
    let backend = conn.get_database_backend();
    let mysql = backend == sea_orm::DbBackend::MySql;
    let names: &[&str] = if mysql {
        &["alice", "bob"]
    } else {
        &["alice", "ALICE", "bob", "Alice", "alice-2"]
    };
    for (i, name) in names.iter().enumerate() {
        let created = format!("2026-01-0{} 00:00:00", i + 1);
        conn.execute_unprepared(&format!(
            "INSERT INTO users (id, username, password_hash, role, status, totp_secret_enc, \
             balance_nanos, reserved_nanos, created_at, updated_at) \
             VALUES ('u{i}', '{name}', 'x', 'user', 'active', 'x', 0, 0, '{created}', '{created}')"
        ))
        .await
        .unwrap();
    }
    Migrator::up(&conn, None).await.unwrap();
    let mut got: Vec<(String, String)> = conn
        .query_all_raw(sea_orm::Statement::from_string(
            backend,
            "SELECT id, username FROM users",
        ))
        .await
        .unwrap()
        .iter()
        .map(|r| {
            (
                r.try_get_by_index(0).unwrap(),
                r.try_get_by_index(1).unwrap(),
            )
        })
        .collect();
    got.sort();
    let want: Vec<(String, String)> = if mysql {
        vec![("u0".into(), "alice".into()), ("u1".into(), "bob".into())]
    } else {
        vec![
            ("u0".into(), "alice".into()),
            ("u1".into(), "ALICE-3".into()),
            ("u2".into(), "bob".into()),
            ("u3".into(), "Alice-4".into()),
            ("u4".into(), "alice-2".into()),
        ]
    };
    assert_eq!(got, want);
    // And from now on the database itself refuses a name taken in another case.
    let dup = conn
        .execute_unprepared(
            "INSERT INTO users (id, username, password_hash, role, status, totp_secret_enc, \
             balance_nanos, reserved_nanos, created_at, updated_at) \
             VALUES ('u9', 'BOB', 'x', 'user', 'active', 'x', 0, 0, \
             '2026-02-01 00:00:00', '2026-02-01 00:00:00')",
        )
        .await;
    assert!(dup.is_err(), "BOB next to bob must be refused");
}
