//! User administration, the audit log and runtime settings over HTTP (`/api/admin`).
#![allow(clippy::unwrap_used)]

mod common;

use common::accounts::{
    PASSWORD, TestUser, admin_token, create_user, ensure_user, fresh_code, login, login_response,
    session_token, user_token,
};
use common::{TestApp, assert_error};
use serde_json::{Value, json};
use tollgate::accounts::signup::Role;
use tollgate::accounts::totp;
use tollgate::config::PlanConfig;
use tollgate::store;

async fn user_id(app: &TestApp, username: &str) -> String {
    store::users::find_by_username(&app.state.db, username)
        .await
        .expect("find user")
        .expect("user")
        .id
}

#[tokio::test]
async fn admin_routes_refuse_ordinary_users_and_anonymous_callers() {
    let app = TestApp::spawn().await;
    let user = user_token(&app, "ursula").await;
    let id = user_id(&app, "ursula").await;
    let calls: Vec<(reqwest::Method, String, Option<Value>)> = vec![
        (reqwest::Method::GET, "/api/admin/users".into(), None),
        (
            reqwest::Method::POST,
            "/api/admin/users".into(),
            Some(json!({ "username": "mallory", "password": PASSWORD })),
        ),
        (reqwest::Method::GET, format!("/api/admin/users/{id}"), None),
        (
            reqwest::Method::PATCH,
            format!("/api/admin/users/{id}"),
            Some(json!({ "role": "admin" })),
        ),
        (
            reqwest::Method::DELETE,
            format!("/api/admin/users/{id}"),
            None,
        ),
        (
            reqwest::Method::POST,
            format!("/api/admin/users/{id}/reset-password"),
            Some(json!({ "new_password": "brand-new-password" })),
        ),
        (
            reqwest::Method::POST,
            format!("/api/admin/users/{id}/reset-totp"),
            Some(json!({})),
        ),
        (
            reqwest::Method::POST,
            format!("/api/admin/users/{id}/balance"),
            Some(json!({ "amount_usd": 100, "note": "free money" })),
        ),
        (reqwest::Method::GET, "/api/admin/audit-log".into(), None),
        (reqwest::Method::GET, "/api/admin/settings".into(), None),
        (
            reqwest::Method::PUT,
            "/api/admin/settings/registration".into(),
            Some(json!({ "value": "closed" })),
        ),
    ];
    for (method, path, body) in &calls {
        let (s, e) = app
            .call(method.clone(), path, Some(&user), body.clone())
            .await;
        assert_error(s, &e, 403, "forbidden");
        let (s, e) = app.call(method.clone(), path, None, body.clone()).await;
        assert_error(s, &e, 401, "missing_token");
    }
    // Nothing happened.
    let row = store::users::find(&app.state.db, &id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (row.role.as_str(), row.status.as_str(), row.balance_nanos),
        ("user", "active", 0)
    );
    assert!(
        store::users::find_by_username(&app.state.db, "mallory")
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(app.get("/api/me", Some(&user)).await.0, 200);
}

#[tokio::test]
async fn admin_creates_a_user_who_confirms_totp() {
    let app = TestApp::spawn().await;
    let admin = admin_token(&app).await;
    let (s, b) = app
        .post(
            "/api/admin/users",
            Some(&admin),
            json!({ "username": "victor", "password": PASSWORD, "email": "victor@example.com", "role": "admin" }),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    assert_eq!(b["user"]["status"], "pending_totp");
    assert_eq!(b["user"]["role"], "admin");
    assert_eq!(b["user"]["email"], "victor@example.com");
    let secret = b["totp"]["secret"].as_str().unwrap().to_owned();
    assert!(b["totp"]["otpauth_url"].is_string() && b["totp"]["qr_png_base64"].is_string());
    let id = b["user"]["id"].as_str().unwrap().to_owned();

    // Pending until the user confirms.
    let victor = TestUser {
        id: id.clone(),
        username: "victor".into(),
        password: PASSWORD.into(),
        totp_secret: secret.clone(),
    };
    let (s, e) = login_response(&app, &victor).await;
    assert_error(s, &e, 401, "invalid_credentials");
    let code = fresh_code(&app, &id, &secret).await;
    let (s, b) = app
        .post(
            "/api/auth/totp/confirm",
            None,
            json!({ "username": "victor", "password": PASSWORD, "code": code }),
        )
        .await;
    assert_eq!(
        (s, b["user"]["status"].clone()),
        (200, json!("active")),
        "{b}"
    );
    let token = login(&app, &victor).await;
    assert_eq!(app.get("/api/admin/users", Some(&token)).await.0, 200);

    // Defaults to role user; validation; duplicates; unknown fields.
    let (s, b) = app
        .post(
            "/api/admin/users",
            Some(&admin),
            json!({ "username": "wendy", "password": PASSWORD }),
        )
        .await;
    assert_eq!((s, b["user"]["role"].clone()), (201, json!("user")), "{b}");
    let (s, e) = app
        .post(
            "/api/admin/users",
            Some(&admin),
            json!({ "username": "wendy", "password": PASSWORD }),
        )
        .await;
    assert_error(s, &e, 409, "conflict");
    for (body, param) in [
        (
            json!({ "username": "xena", "password": PASSWORD, "role": "root" }),
            "role",
        ),
        (json!({ "username": "x", "password": PASSWORD }), "username"),
        (
            json!({ "username": "xena", "password": "short" }),
            "password",
        ),
        (
            json!({ "username": "xena", "password": PASSWORD, "email": "@" }),
            "email",
        ),
    ] {
        let (s, e) = app.post("/api/admin/users", Some(&admin), body).await;
        assert_error(s, &e, 400, "invalid_value");
        assert_eq!(e["error"]["param"], param);
    }
    let (s, e) = app
        .post(
            "/api/admin/users",
            Some(&admin),
            json!({ "username": "xena", "password": PASSWORD, "status": "active" }),
        )
        .await;
    assert_error(s, &e, 400, "unknown_field");
    let (_, log) = app
        .get(
            "/api/admin/audit-log?action=admin.user.create",
            Some(&admin),
        )
        .await;
    assert_eq!(log["total"], 2, "{log}");
    assert!(!log.to_string().contains(PASSWORD));
    assert!(!log.to_string().contains(&secret));
}

#[tokio::test]
async fn list_users_filters_and_pages() {
    let app = TestApp::spawn().await;
    let admin = admin_token(&app).await;
    for (name, email) in [
        ("Yara_one", "yara@corp.example"),
        ("yusuf", "y.usuf@home.example"),
        ("zed", "zed@corp.example"),
        ("percy", "50%off@else.example"),
    ] {
        let (s, b) = app
            .post(
                "/api/admin/users",
                Some(&admin),
                json!({ "username": name, "password": PASSWORD, "email": email }),
            )
            .await;
        assert_eq!(s, 201, "{b}");
    }
    let names = |b: &Value| -> Vec<String> {
        b["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|u| u["username"].as_str().unwrap().to_owned())
            .collect()
    };
    let (s, b) = app.get("/api/admin/users", Some(&admin)).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["total"], 5);
    // Newest first.
    assert_eq!(names(&b)[0], "percy");
    assert_eq!(names(&b)[4], "admin");

    let (_, b) = app.get("/api/admin/users?search=YAR", Some(&admin)).await;
    assert_eq!(names(&b), ["Yara_one"]);
    let (_, b) = app
        .get("/api/admin/users?search=corp.example", Some(&admin))
        .await;
    assert_eq!(names(&b), ["zed", "Yara_one"]);
    // `%` and `_` are literal characters, not wildcards.
    let (_, b) = app.get("/api/admin/users?search=%25", Some(&admin)).await;
    assert_eq!(names(&b), ["percy"]);
    let (_, b) = app.get("/api/admin/users?search=r_", Some(&admin)).await;
    assert_eq!(names(&b), Vec::<String>::new());
    let (_, b) = app.get("/api/admin/users?search=a_one", Some(&admin)).await;
    assert_eq!(names(&b), ["Yara_one"]);

    let (_, b) = app.get("/api/admin/users?role=admin", Some(&admin)).await;
    assert_eq!(names(&b), ["admin"]);
    let (_, b) = app
        .get("/api/admin/users?status=pending_totp", Some(&admin))
        .await;
    assert_eq!(b["total"], 4);
    let (_, b) = app
        .get("/api/admin/users?status=active&role=user", Some(&admin))
        .await;
    assert_eq!(b["total"], 0);
    let (_, b) = app
        .get("/api/admin/users?page=2&per_page=2", Some(&admin))
        .await;
    assert_eq!(
        (b["page"].clone(), b["per_page"].clone(), b["total"].clone()),
        (json!(2), json!(2), json!(5))
    );
    assert_eq!(names(&b), ["yusuf", "Yara_one"]);
    let (s, e) = app.get("/api/admin/users?role=owner", Some(&admin)).await;
    assert_error(s, &e, 400, "invalid_value");
    let (s, e) = app.get("/api/admin/users?status=gone", Some(&admin)).await;
    assert_error(s, &e, 400, "invalid_value");
    let (s, e) = app.get("/api/admin/users?page=x", Some(&admin)).await;
    assert_error(s, &e, 400, "invalid_value");
}

#[tokio::test]
async fn get_and_patch_a_user() {
    let app = TestApp::spawn_with(|c| {
        c.plans = vec![PlanConfig {
            name: "pro".into(),
            rpm_limit: 600,
            tpm_limit: 100_000,
            price_usd_per_month: 20.0,
        }]
    })
    .await;
    let admin = admin_token(&app).await;
    let admin_id = user_id(&app, "admin").await;
    let target = create_user(&app, "yvonne", Role::User).await;
    let path = format!("/api/admin/users/{}", target.id);

    let (s, b) = app.get(&path, Some(&admin)).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["username"], "yvonne");
    assert_eq!(b["rpm_limit"], Value::Null);
    let (s, e) = app.get("/api/admin/users/nope", Some(&admin)).await;
    assert_error(s, &e, 404, "not_found");
    let (s, e) = app
        .patch(
            "/api/admin/users/nope",
            Some(&admin),
            json!({ "role": "admin" }),
        )
        .await;
    assert_error(s, &e, 404, "not_found");

    let (s, b) = app
        .patch(
            &path,
            Some(&admin),
            json!({ "email": "y@example.com", "role": "admin", "plan": "pro", "rpm_limit": 30 }),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(
        (
            b["email"].clone(),
            b["role"].clone(),
            b["plan"].clone(),
            b["rpm_limit"].clone()
        ),
        (
            json!("y@example.com"),
            json!("admin"),
            json!("pro"),
            json!(30)
        )
    );
    let (s, b) = app
        .patch(
            &path,
            Some(&admin),
            json!({ "plan": null, "rpm_limit": null, "email": null }),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(
        (
            b["plan"].clone(),
            b["rpm_limit"].clone(),
            b["email"].clone()
        ),
        (Value::Null, Value::Null, Value::Null)
    );
    for (body, param) in [
        (json!({ "plan": "enterprise" }), "plan"),
        (json!({ "rpm_limit": -1 }), "rpm_limit"),
        (json!({ "rpm_limit": 5_000_000_000u64 }), "rpm_limit"),
        (json!({ "role": "root" }), "role"),
        (json!({ "status": "pending_totp" }), "status"),
        (json!({ "status": "deleted" }), "status"),
        (json!({ "email": "nope" }), "email"),
    ] {
        let (s, e) = app.patch(&path, Some(&admin), body.clone()).await;
        assert_error(s, &e, 400, "invalid_value");
        assert_eq!(e["error"]["param"], param, "{body}");
    }
    let (s, e) = app
        .patch(&path, Some(&admin), json!({ "balance_usd": 5 }))
        .await;
    assert_error(s, &e, 400, "unknown_field");
    let (s, e) = app
        .patch(&path, Some(&admin), json!({ "rpm_limit": "ten" }))
        .await;
    assert_error(s, &e, 400, "invalid_value");

    // An administrator cannot disable or demote themself.
    let me = format!("/api/admin/users/{admin_id}");
    let (s, e) = app
        .patch(&me, Some(&admin), json!({ "status": "disabled" }))
        .await;
    assert_error(s, &e, 400, "invalid_value");
    let (s, e) = app
        .patch(&me, Some(&admin), json!({ "role": "user" }))
        .await;
    assert_error(s, &e, 400, "invalid_value");
    assert_eq!(app.get("/api/me", Some(&admin)).await.1["role"], "admin");

    // A pending account cannot be activated by an administrator.
    let (_, created) = app
        .post(
            "/api/admin/users",
            Some(&admin),
            json!({ "username": "zoe", "password": PASSWORD }),
        )
        .await;
    let zoe = format!(
        "/api/admin/users/{}",
        created["user"]["id"].as_str().unwrap()
    );
    let (s, e) = app
        .patch(&zoe, Some(&admin), json!({ "status": "active" }))
        .await;
    assert_error(s, &e, 400, "invalid_value");

    let (_, log) = app
        .get(
            &format!("/api/admin/audit-log?action=admin.user.update&actor_id={admin_id}"),
            Some(&admin),
        )
        .await;
    assert_eq!(log["total"], 2, "{log}");
    assert_eq!(log["data"][1]["detail"]["plan"], "pro");
    assert_eq!(log["data"][1]["target"], format!("user:{}", target.id));
}

#[tokio::test]
async fn disabling_revokes_sessions_and_re_enabling_restores_sign_in() {
    let app = TestApp::spawn().await;
    let admin = admin_token(&app).await;
    let u = create_user(&app, "aaron", Role::User).await;
    let token = session_token(&app, &u).await;
    let path = format!("/api/admin/users/{}", u.id);
    let (s, b) = app
        .patch(&path, Some(&admin), json!({ "status": "disabled" }))
        .await;
    assert_eq!((s, b["status"].clone()), (200, json!("disabled")), "{b}");
    let (s, e) = app.get("/api/me", Some(&token)).await;
    assert_eq!(s, 401, "{e}");
    let (s, e) = login_response(&app, &u).await;
    assert_error(s, &e, 403, "account_disabled");
    let (s, b) = app
        .patch(&path, Some(&admin), json!({ "status": "active" }))
        .await;
    assert_eq!((s, b["status"].clone()), (200, json!("active")), "{b}");
    login(&app, &u).await;
    let (_, log) = app
        .get(
            "/api/admin/audit-log?action=admin.user.disable",
            Some(&admin),
        )
        .await;
    assert_eq!(log["total"], 1);
}

#[tokio::test]
async fn delete_is_a_soft_disable() {
    let app = TestApp::spawn().await;
    let admin = admin_token(&app).await;
    let admin_id = user_id(&app, "admin").await;
    let u = create_user(&app, "bella", Role::User).await;
    let token = login(&app, &u).await;
    let (s, b) = app
        .delete(&format!("/api/admin/users/{}", u.id), Some(&admin))
        .await;
    assert_eq!(s, 204, "{b}");
    let (s, e) = app.get("/api/auth/verify", Some(&token)).await;
    assert_error(s, &e, 401, "invalid_token");
    let (s, b) = app
        .get(&format!("/api/admin/users/{}", u.id), Some(&admin))
        .await;
    assert_eq!((s, b["status"].clone()), (200, json!("disabled")));
    let (s, e) = login_response(&app, &u).await;
    assert_error(s, &e, 403, "account_disabled");
    let (s, e) = app
        .delete(&format!("/api/admin/users/{admin_id}"), Some(&admin))
        .await;
    assert_error(s, &e, 400, "invalid_value");
    assert_eq!(app.get("/api/me", Some(&admin)).await.0, 200);
    let (s, e) = app.delete("/api/admin/users/nope", Some(&admin)).await;
    assert_error(s, &e, 404, "not_found");
    let (_, log) = app
        .get(
            "/api/admin/audit-log?action=admin.user.disable",
            Some(&admin),
        )
        .await;
    assert_eq!(log["data"][0]["target"], format!("user:{}", u.id));
    assert_eq!(log["data"][0]["actor_id"], admin_id.as_str());
}

#[tokio::test]
async fn admin_resets_a_password() {
    let app = TestApp::spawn().await;
    let admin = admin_token(&app).await;
    let u = create_user(&app, "carl", Role::User).await;
    let token = login(&app, &u).await;
    let path = format!("/api/admin/users/{}/reset-password", u.id);
    let (s, e) = app
        .post(&path, Some(&admin), json!({ "new_password": "short" }))
        .await;
    assert_error(s, &e, 400, "invalid_value");
    assert_eq!(app.get("/api/me", Some(&token)).await.0, 200);
    let (s, e) = app
        .post(
            "/api/admin/users/nope/reset-password",
            Some(&admin),
            json!({ "new_password": "brand-new-password" }),
        )
        .await;
    assert_error(s, &e, 404, "not_found");
    let (s, b) = app
        .post(
            &path,
            Some(&admin),
            json!({ "new_password": "brand-new-password" }),
        )
        .await;
    assert_eq!(s, 204, "{b}");
    let (s, e) = app.get("/api/me", Some(&token)).await;
    assert_error(s, &e, 401, "invalid_token");
    let (s, e) = login_response(&app, &u).await;
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
        .get(
            "/api/admin/audit-log?action=admin.user.reset_password",
            Some(&admin),
        )
        .await;
    assert_eq!(log["total"], 1);
    assert!(!log.to_string().contains("brand-new-password"));
}

#[tokio::test]
async fn admin_resets_totp() {
    let app = TestApp::spawn().await;
    let admin = admin_token(&app).await;
    let u = create_user(&app, "dora", Role::User).await;
    let token = login(&app, &u).await;
    let (s, b) = app
        .post(
            &format!("/api/admin/users/{}/reset-totp", u.id),
            Some(&admin),
            json!({}),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    let secret = b["secret"].as_str().unwrap().to_owned();
    assert_ne!(secret, u.totp_secret);
    assert!(b["otpauth_url"].as_str().unwrap().contains(&secret));
    assert!(b["qr_png_base64"].is_string());
    let (s, e) = app.get("/api/me", Some(&token)).await;
    assert_error(s, &e, 401, "invalid_token");
    let (_, view) = app
        .get(&format!("/api/admin/users/{}", u.id), Some(&admin))
        .await;
    assert_eq!(view["status"], "pending_totp");
    // Neither the old nor the new secret signs in until the new one is confirmed.
    let (s, e) = login_response(&app, &u).await;
    assert_error(s, &e, 401, "invalid_credentials");
    let renewed = TestUser {
        totp_secret: secret.clone(),
        ..u.clone()
    };
    let (s, e) = login_response(&app, &renewed).await;
    assert_error(s, &e, 401, "invalid_credentials");
    let code = totp::current_code(&secret).unwrap();
    let (s, b) = app
        .post(
            "/api/auth/totp/confirm",
            None,
            json!({ "username": "dora", "password": PASSWORD, "code": code }),
        )
        .await;
    assert_eq!(
        (s, b["user"]["status"].clone()),
        (200, json!("active")),
        "{b}"
    );
    login(&app, &renewed).await;
    let (s, e) = app
        .post("/api/admin/users/nope/reset-totp", Some(&admin), json!({}))
        .await;
    assert_error(s, &e, 404, "not_found");
    let (_, log) = app
        .get(
            "/api/admin/audit-log?action=admin.user.reset_totp",
            Some(&admin),
        )
        .await;
    assert_eq!(log["total"], 1);
    assert!(!log.to_string().contains(&secret));
}

#[tokio::test]
async fn balance_adjustments_go_through_the_ledger() {
    let app = TestApp::spawn().await;
    let admin = admin_token(&app).await;
    let u = create_user(&app, "eli", Role::User).await;
    let path = format!("/api/admin/users/{}/balance", u.id);
    let (s, b) = app
        .post(
            &path,
            Some(&admin),
            json!({ "amount_usd": 10.25, "note": "welcome" }),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    for k in [
        "id",
        "at",
        "amount_usd",
        "kind",
        "note",
        "balance_after_usd",
    ] {
        assert!(b.get(k).is_some(), "{k} missing in {b}");
    }
    assert_eq!(
        (
            b["amount_usd"].clone(),
            b["kind"].clone(),
            b["note"].clone(),
            b["balance_after_usd"].clone()
        ),
        (
            json!(10.25),
            json!("adjustment"),
            json!("welcome"),
            json!(10.25)
        )
    );
    let (s, b) = app
        .post(
            &path,
            Some(&admin),
            json!({ "amount_usd": -3, "note": "refund reversal" }),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["balance_after_usd"], 7.25);
    // A debit past zero is refused and changes nothing.
    let (s, e) = app
        .post(
            &path,
            Some(&admin),
            json!({ "amount_usd": -7.26, "note": "too much" }),
        )
        .await;
    assert_error(s, &e, 400, "invalid_value");
    assert_eq!(e["error"]["param"], "amount_usd");
    for body in [
        json!({ "amount_usd": 0, "note": "nothing" }),
        json!({ "amount_usd": 1e12, "note": "too much" }),
        json!({ "amount_usd": 1, "note": "x".repeat(256) }),
    ] {
        let (s, e) = app.post(&path, Some(&admin), body).await;
        assert_error(s, &e, 400, "invalid_value");
    }
    let (s, e) = app
        .post(&path, Some(&admin), json!({ "amount_usd": 1 }))
        .await;
    assert_error(s, &e, 400, "missing_field");
    let (s, e) = app
        .post(
            "/api/admin/users/nope/balance",
            Some(&admin),
            json!({ "amount_usd": 1, "note": "x" }),
        )
        .await;
    assert_error(s, &e, 404, "not_found");

    let (_, view) = app
        .get(&format!("/api/admin/users/{}", u.id), Some(&admin))
        .await;
    assert_eq!(view["balance_usd"], 7.25);
    let ledger =
        store::ledger::list_for_user(&app.state.db, &u.id, store::PageReq::new(None, None))
            .await
            .unwrap();
    assert_eq!(ledger.total, 2);
    let sum: i64 = ledger.items.iter().map(|e| e.amount_nanos).sum();
    assert_eq!(sum, 7_250_000_000);
    assert_eq!(ledger.items[0].balance_after_nanos, 7_250_000_000);
    let admin_id = user_id(&app, "admin").await;
    assert_eq!(ledger.items[0].actor_id.as_deref(), Some(admin_id.as_str()));
    let (_, log) = app
        .get(
            "/api/admin/audit-log?action=admin.user.balance",
            Some(&admin),
        )
        .await;
    assert_eq!(log["total"], 2);
}

#[tokio::test]
async fn audit_log_covers_everyone_and_filters() {
    let app = TestApp::spawn().await;
    let admin = admin_token(&app).await;
    let admin_id = user_id(&app, "admin").await;
    let u = ensure_user(&app, "fay", Role::User).await;
    let token = login(&app, &u).await;
    app.patch(
        "/api/me",
        Some(&token),
        json!({ "email": "fay@example.com" }),
    )
    .await;
    let (s, log) = app.get("/api/admin/audit-log", Some(&admin)).await;
    assert_eq!(s, 200, "{log}");
    let rows = log["data"].as_array().unwrap();
    // Newest first: fay's update, fay's login, the admin's login.
    assert_eq!(rows[0]["action"], "me.update");
    assert_eq!(rows[0]["actor_id"], u.id.as_str());
    assert!(rows.iter().any(|r| r["actor_id"] == admin_id.as_str()));
    for k in ["id", "at", "actor_id", "action", "target", "ip", "detail"] {
        assert!(rows[0].get(k).is_some(), "{k} missing");
    }
    let (_, only) = app
        .get(
            &format!("/api/admin/audit-log?actor_id={}", u.id),
            Some(&admin),
        )
        .await;
    assert_eq!(only["total"], 2, "{only}");
    let (_, logins) = app
        .get("/api/admin/audit-log?action=login&per_page=1", Some(&admin))
        .await;
    assert_eq!(
        (
            logins["total"].clone(),
            logins["data"].as_array().unwrap().len()
        ),
        (json!(2), 1)
    );
    // The user's own view has only their entries.
    let (_, mine) = app.get("/api/me/audit-log", Some(&token)).await;
    assert_eq!(mine["total"], 2);
    // No secret anywhere in the log.
    let everything = app
        .get("/api/admin/audit-log?per_page=100", Some(&admin))
        .await
        .1
        .to_string();
    assert!(!everything.contains(PASSWORD));
    assert!(!everything.contains(&u.totp_secret));
}

#[tokio::test]
async fn runtime_settings() {
    let app = TestApp::spawn_with(|c| {
        c.limits.default_user_rpm = 7;
        c.limits.default_key_rpm = 0;
    })
    .await;
    let admin = admin_token(&app).await;
    let (s, b) = app.get("/api/admin/settings", Some(&admin)).await;
    assert_eq!(s, 200, "{b}");
    let data = b["data"].as_array().unwrap();
    let get = |data: &[Value], key: &str| -> Value {
        data.iter()
            .find(|d| d["key"] == key)
            .unwrap_or_else(|| panic!("{key} missing"))
            .clone()
    };
    assert_eq!(data.len(), 3);
    assert_eq!(get(data, "registration")["value"], "open");
    assert_eq!(get(data, "default_user_rpm")["value"], 7);
    assert_eq!(get(data, "default_key_rpm")["value"], 0);
    assert!(
        data.iter()
            .all(|d| d["description"].as_str().is_some_and(|s| !s.is_empty()))
    );

    let (s, b) = app
        .put(
            "/api/admin/settings/default_key_rpm",
            Some(&admin),
            json!({ "value": 60, "description": "per key" }),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(
        b,
        json!({ "key": "default_key_rpm", "value": 60, "description": "per key" })
    );
    // A value-only update keeps the description.
    let (_, b) = app
        .put(
            "/api/admin/settings/default_key_rpm",
            Some(&admin),
            json!({ "value": 61 }),
        )
        .await;
    assert_eq!(b["description"], "per key");
    assert_eq!(
        tollgate::settings::default_key_rpm(&app.state.db, &app.state.config)
            .await
            .unwrap(),
        61
    );
    let (_, b) = app.get("/api/admin/settings", Some(&admin)).await;
    assert_eq!(
        get(b["data"].as_array().unwrap(), "default_key_rpm")["value"],
        61
    );

    for (key, body, param, code) in [
        ("nope", json!({ "value": 1 }), Some("key"), "invalid_value"),
        (
            "registration",
            json!({ "value": "maybe" }),
            Some("value"),
            "invalid_value",
        ),
        (
            "registration",
            json!({ "value": true }),
            Some("value"),
            "invalid_value",
        ),
        (
            "default_user_rpm",
            json!({ "value": -5 }),
            Some("value"),
            "invalid_value",
        ),
        (
            "default_user_rpm",
            json!({ "value": "10" }),
            Some("value"),
            "invalid_value",
        ),
        ("default_user_rpm", json!({}), None, "missing_field"),
        (
            "default_user_rpm",
            json!({ "value": 1, "extra": 1 }),
            None,
            "unknown_field",
        ),
    ] {
        let (s, e) = app
            .put(&format!("/api/admin/settings/{key}"), Some(&admin), body)
            .await;
        assert_error(s, &e, 400, code);
        if let Some(p) = param {
            assert_eq!(e["error"]["param"], p);
        }
    }

    // Closing registration takes effect at once.
    let (s, _) = app
        .put(
            "/api/admin/settings/registration",
            Some(&admin),
            json!({ "value": "closed" }),
        )
        .await;
    assert_eq!(s, 200);
    let (s, e) = app
        .post(
            "/api/auth/register",
            None,
            json!({ "username": "gail", "password": PASSWORD }),
        )
        .await;
    assert_error(s, &e, 403, "registration_closed");
    let (_, log) = app
        .get("/api/admin/audit-log?action=settings.update", Some(&admin))
        .await;
    assert_eq!(log["total"], 3);
    assert_eq!(log["data"][0]["target"], "setting:registration");
    assert_eq!(log["data"][0]["detail"]["value"], "closed");
}

#[tokio::test]
async fn disabling_a_user_stops_their_gateway_keys_at_once() {
    let app = TestApp::spawn().await;
    let admin = admin_token(&app).await;
    let u = create_user(&app, "gus", Role::User).await;
    let token = login(&app, &u).await;
    let (s, k) = app
        .post("/api/keys", Some(&token), json!({ "name": "laptop" }))
        .await;
    assert_eq!(s, 201, "{k}");
    let key = k["key"].as_str().expect("gateway key").to_owned();
    // The first use puts the key in the auth cache; the disable must evict it.
    let (s, b) = app.get("/v1/models", Some(&key)).await;
    assert_eq!(s, 200, "{b}");
    let (s, _) = app
        .delete(&format!("/api/admin/users/{}", u.id), Some(&admin))
        .await;
    assert_eq!(s, 204);
    let (s, e) = app.get("/v1/models", Some(&key)).await;
    assert_error(s, &e, 403, "account_disabled");
}
