//! Plans: the configured list, renewal paid from the balance, and the plan's limits on `/v1`
//! until it expires.
#![allow(clippy::unwrap_used)]

mod common;

use chrono::{DateTime, Duration, Utc};
use common::accounts::{admin_token, user_token};
use common::gateway::setup;
use common::{TestApp, assert_error};
use serde_json::{Value, json};
use tollgate::config::{Config, PlanConfig};

fn plans(c: &mut Config) {
    c.plans = vec![
        PlanConfig {
            name: "pro".into(),
            rpm_limit: 2,
            tpm_limit: 0,
            price_usd_per_month: 5.0,
        },
        PlanConfig {
            name: "team".into(),
            rpm_limit: 100,
            tpm_limit: 100_000,
            price_usd_per_month: 12.25,
        },
    ];
}

async fn user_id(app: &TestApp, name: &str) -> String {
    tollgate::store::users::find_by_username(&app.state.db, name)
        .await
        .unwrap()
        .unwrap()
        .id
}

async fn grant(app: &TestApp, admin: &str, user: &str, usd: f64) {
    let (s, b) = app
        .post(
            &format!("/api/admin/users/{user}/balance"),
            Some(admin),
            json!({"amount_usd": usd, "note": "credit"}),
        )
        .await;
    assert_eq!(s, 200, "{b}");
}

fn at(v: &Value) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(v.as_str().unwrap_or_else(|| panic!("not a time: {v}")))
        .unwrap()
        .with_timezone(&Utc)
}

fn nanos(v: &Value) -> i64 {
    (v.as_f64().unwrap() * 1e9).round() as i64
}

/// The balance equals the sum of the ledger entries and the newest entry's balance after.
async fn assert_ledger_matches(app: &TestApp, token: &str) -> i64 {
    let (_, me) = app.get("/api/me", Some(token)).await;
    let (s, tx) = app
        .get("/api/me/balance/transactions?per_page=100", Some(token))
        .await;
    assert_eq!(s, 200, "{tx}");
    let entries = tx["data"].as_array().unwrap();
    let sum: i64 = entries.iter().map(|e| nanos(&e["amount_usd"])).sum();
    assert_eq!(sum, nanos(&me["balance_usd"]), "{tx} vs {me}");
    if let Some(newest) = entries.first() {
        assert_eq!(nanos(&newest["balance_after_usd"]), sum);
    }
    sum
}

#[tokio::test]
async fn plans_come_from_the_config() {
    let app = TestApp::spawn_with(plans).await;
    let token = user_token(&app, "alice").await;
    let (s, b) = app.get("/api/plans", Some(&token)).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(
        b["data"],
        json!([
            {"name": "pro", "rpm_limit": 2, "tpm_limit": 0, "price_usd_per_month": 5.0},
            {"name": "team", "rpm_limit": 100, "tpm_limit": 100000, "price_usd_per_month": 12.25},
        ])
    );
}

#[tokio::test]
async fn renewal_without_enough_balance_changes_nothing() {
    let app = TestApp::spawn_with(plans).await;
    let admin = admin_token(&app).await;
    let token = user_token(&app, "alice").await;
    let alice = user_id(&app, "alice").await;
    grant(&app, &admin, &alice, 9.99).await;
    let r = app
        .client
        .post(app.url("/api/me/plan/renew"))
        .bearer_auth(&token)
        .json(&json!({"plan": "pro", "months": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-should-retry"], "false");
    let s = r.status().as_u16();
    let b: Value = r.json().await.unwrap();
    assert_error(s, &b, 429, "insufficient_quota");
    assert_eq!(b["error"]["type"], "insufficient_quota");
    let (_, me) = app.get("/api/me", Some(&token)).await;
    assert_eq!(me["balance_usd"], 9.99);
    assert_eq!(me["plan"], Value::Null);
    assert_eq!(me["plan_expires_at"], Value::Null);
    let (_, tx) = app.get("/api/me/balance/transactions", Some(&token)).await;
    assert_eq!(tx["total"], 1, "only the grant: {tx}");

    // Bad requests.
    for (body, param) in [
        (json!({"plan": "gold", "months": 1}), "plan"),
        (json!({"plan": "pro", "months": 0}), "months"),
        (json!({"plan": "pro", "months": 37}), "months"),
        (json!({"plan": "pro", "months": -1}), "months"),
    ] {
        let (s, b) = app.post("/api/me/plan/renew", Some(&token), body).await;
        assert_error(s, &b, 400, "invalid_value");
        assert_eq!(b["error"]["param"], param, "{b}");
    }
    let (s, _) = app
        .post(
            "/api/me/plan/renew",
            Some(&token),
            json!({"plan": "pro", "months": 1, "user_id": alice}),
        )
        .await;
    assert_eq!(s, 400, "unknown fields are refused");
    let (s, _) = app
        .post(
            "/api/me/plan/renew",
            None,
            json!({"plan": "pro", "months": 1}),
        )
        .await;
    assert_eq!(s, 401);
    assert_ledger_matches(&app, &token).await;
}

#[tokio::test]
async fn renewal_debits_the_balance_and_extends_the_same_plan() {
    let app = TestApp::spawn_with(plans).await;
    let admin = admin_token(&app).await;
    let token = user_token(&app, "alice").await;
    let alice = user_id(&app, "alice").await;
    grant(&app, &admin, &alice, 30.0).await;

    let t0 = Utc::now();
    let (s, b) = app
        .post(
            "/api/me/plan/renew",
            Some(&token),
            json!({"plan": "pro", "months": 2}),
        )
        .await;
    let t1 = Utc::now();
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["user"]["plan"], "pro");
    assert_eq!(b["user"]["balance_usd"], 20.0);
    assert_eq!(b["transaction"]["kind"], "renewal");
    assert_eq!(b["transaction"]["amount_usd"], -10.0);
    assert_eq!(b["transaction"]["balance_after_usd"], 20.0);
    let first = at(&b["user"]["plan_expires_at"]);
    // RFC 3339 has whole seconds: allow the truncation.
    assert!(
        first >= t0 + Duration::days(60) - Duration::seconds(1) && first <= t1 + Duration::days(60),
        "{first}"
    );

    // The same plan again: from the current expiry, not from now.
    let (s, b) = app
        .post(
            "/api/me/plan/renew",
            Some(&token),
            json!({"plan": "pro", "months": 1}),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    let second = at(&b["user"]["plan_expires_at"]);
    assert!(
        (second - (first + Duration::days(30))).num_seconds().abs() <= 1,
        "{first} → {second}"
    );
    assert_eq!(b["user"]["balance_usd"], 15.0);

    // Another plan replaces it, counted from now.
    let t2 = Utc::now();
    let (s, b) = app
        .post(
            "/api/me/plan/renew",
            Some(&token),
            json!({"plan": "team", "months": 1}),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["user"]["plan"], "team");
    let third = at(&b["user"]["plan_expires_at"]);
    assert!(
        third >= t2 + Duration::days(30) - Duration::seconds(1)
            && third <= Utc::now() + Duration::days(30),
        "{third}"
    );
    assert_eq!(b["user"]["balance_usd"], 2.75);

    let (_, me) = app.get("/api/me", Some(&token)).await;
    assert_eq!(me["plan"], "team");
    assert_eq!(at(&me["plan_expires_at"]), third);
    let balance = assert_ledger_matches(&app, &token).await;
    assert_eq!(balance, 2_750_000_000);
    let (_, tx) = app.get("/api/me/balance/transactions", Some(&token)).await;
    let kinds: Vec<&str> = tx["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["renewal", "renewal", "renewal", "adjustment"]);

    // Audited, without anything secret.
    let (_, log) = app
        .get("/api/me/audit-log?action=plan.renew", Some(&token))
        .await;
    assert_eq!(log["total"], 3, "{log}");
    assert_eq!(log["data"][0]["detail"]["plan"], "team");
    assert_eq!(log["data"][0]["target"], format!("user:{alice}"));
}

#[tokio::test]
async fn parallel_renewals_cannot_overdraw_or_lose_a_month() {
    let app = TestApp::spawn_with(plans).await;
    let admin = admin_token(&app).await;
    let token = user_token(&app, "alice").await;
    let alice = user_id(&app, "alice").await;
    // Three months of "pro", not four.
    grant(&app, &admin, &alice, 17.5).await;
    let t0 = Utc::now();
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let (client, url, token) = (
            app.client.clone(),
            app.url("/api/me/plan/renew"),
            token.clone(),
        );
        tasks.push(tokio::spawn(async move {
            client
                .post(url)
                .bearer_auth(token)
                .json(&json!({"plan": "pro", "months": 1}))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }));
    }
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 200, 200, 429, 429, 429]);
    let (_, me) = app.get("/api/me", Some(&token)).await;
    assert_eq!(me["balance_usd"], 2.5);
    let expiry = at(&me["plan_expires_at"]);
    assert!(
        expiry >= t0 + Duration::days(90) - Duration::seconds(1)
            && expiry <= Utc::now() + Duration::days(90),
        "every paid month counts once: {expiry}"
    );
    assert_ledger_matches(&app, &token).await;
}

async fn chat(app: &TestApp, key: &str) -> reqwest::Response {
    app.client
        .post(app.url("/v1/chat/completions"))
        .bearer_auth(key)
        .json(&json!({"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_plans_limits_apply_at_once_and_end_with_it() {
    let app = TestApp::spawn_with(plans).await;
    let gw = setup(&app).await;
    let alice = user_id(&app, "alice").await;
    grant(&app, &gw.admin, &alice, 5.0).await;

    // No plan, default limits (none): no rate-limit headers.
    let r = chat(&app, &gw.key).await;
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("x-ratelimit-limit-requests").is_none());
    r.text().await.unwrap();

    let (s, b) = app
        .post(
            "/api/me/plan/renew",
            Some(&gw.user),
            json!({"plan": "pro", "months": 1}),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    // The plan's 2 requests per minute apply to the very next request (the cached key was dropped).
    for remaining in ["1", "0"] {
        let r = chat(&app, &gw.key).await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-ratelimit-limit-requests"], "2");
        assert_eq!(r.headers()["x-ratelimit-remaining-requests"], remaining);
        r.text().await.unwrap();
    }
    let r = chat(&app, &gw.key).await;
    let s = r.status().as_u16();
    assert!(r.headers().get("retry-after").is_some());
    let b: Value = r.json().await.unwrap();
    assert_error(s, &b, 429, "rate_limit_exceeded");

    // Once the plan has expired, the defaults apply again.
    tollgate::store::users::update(
        &app.state.db,
        &alice,
        tollgate::store::users::UserChanges {
            plan_expires_at: Some(Some(Utc::now() - Duration::minutes(1))),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    app.state.caches.invalidate_user(&alice).await;
    for _ in 0..3 {
        let r = chat(&app, &gw.key).await;
        assert_eq!(r.status(), 200, "an expired plan's limit no longer applies");
        assert!(r.headers().get("x-ratelimit-limit-requests").is_none());
        r.text().await.unwrap();
    }
}

/// An admin setting a plan sets its expiry the way a one-month renewal would (without the debit):
/// a paid plan runs 30 days, extending the same unexpired plan; a free plan or none never expires.
#[tokio::test]
async fn an_admin_setting_a_plan_sets_its_expiry_as_a_renewal_does() {
    let app = TestApp::spawn_with(|c| {
        plans(c);
        c.plans.push(PlanConfig {
            name: "free".into(),
            rpm_limit: 5,
            tpm_limit: 0,
            price_usd_per_month: 0.0,
        });
    })
    .await;
    let admin = admin_token(&app).await;
    let token = user_token(&app, "alice").await;
    let id = user_id(&app, "alice").await;
    let path = format!("/api/admin/users/{id}");
    let expiry = |me: &Value| me["plan_expires_at"].clone();

    let before = Utc::now();
    let (s, b) = app.patch(&path, Some(&admin), json!({"plan": "pro"})).await;
    assert_eq!(s, 200, "{b}");
    let (_, me) = app.get("/api/me", Some(&token)).await;
    assert_eq!(me["plan"], "pro");
    let first = at(&expiry(&me));
    // Stored to the second: `before` may carry a fraction the stored expiry does not.
    assert!(
        first >= before + Duration::days(30) - Duration::seconds(1)
            && first <= Utc::now() + Duration::days(30),
        "{first} vs {before}"
    );

    // The same unexpired plan again: a month more on top.
    let (s, _) = app.patch(&path, Some(&admin), json!({"plan": "pro"})).await;
    assert_eq!(s, 200);
    let (_, me) = app.get("/api/me", Some(&token)).await;
    assert_eq!(at(&expiry(&me)), first + Duration::days(30));

    // Another paid plan starts from now.
    let before = Utc::now();
    let (s, _) = app
        .patch(&path, Some(&admin), json!({"plan": "team"}))
        .await;
    assert_eq!(s, 200);
    let (_, me) = app.get("/api/me", Some(&token)).await;
    let team = at(&expiry(&me));
    assert!(
        team >= before + Duration::days(30) - Duration::seconds(1)
            && team <= Utc::now() + Duration::days(30)
    );

    // A free plan, then none: no expiry.
    let (s, _) = app
        .patch(&path, Some(&admin), json!({"plan": "free"}))
        .await;
    assert_eq!(s, 200);
    let (_, me) = app.get("/api/me", Some(&token)).await;
    assert_eq!(
        (me["plan"].as_str(), expiry(&me)),
        (Some("free"), Value::Null)
    );
    let (s, _) = app.patch(&path, Some(&admin), json!({"plan": "pro"})).await;
    assert_eq!(s, 200);
    let (s, _) = app.patch(&path, Some(&admin), json!({"plan": null})).await;
    assert_eq!(s, 200);
    let (_, me) = app.get("/api/me", Some(&token)).await;
    assert_eq!(
        (me["plan"].clone(), expiry(&me)),
        (Value::Null, Value::Null)
    );

    // An unknown plan changes nothing.
    let (s, b) = app
        .patch(&path, Some(&admin), json!({"plan": "gold"}))
        .await;
    assert_error(s, &b, 400, "invalid_value");
    let (_, me) = app.get("/api/me", Some(&token)).await;
    assert_eq!(me["plan"], Value::Null);
}
