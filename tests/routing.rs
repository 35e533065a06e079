//! Routing (spec §11) end to end: the real app, a fault-injecting mock upstream behind two
//! providers, real HTTP on loopback. One test per rule, then the scenario: two deployments, one
//! failing half its requests (5xx, resets, 429) — every client request succeeds, the failing
//! deployment's breaker opens and closes again once it heals, one usage record per client
//! request, and the balance is charged once per request.

mod common;

use common::accounts::{admin_token, user_token};
use common::gateway::{new_key, wait_records};
use common::mock::Mock;
use common::{TestApp, assert_error};
use serde_json::{Value, json};

struct Env {
    mock: Mock,
    admin: String,
    user: String,
    key: String,
}

/// Providers `p1` and `p2` (both the mock), one key of the user's for each.
async fn env(app: &TestApp) -> Env {
    let mock = Mock::start().await;
    let admin = admin_token(app).await;
    for p in ["p1", "p2", "p3"] {
        let (s, b) = app
            .post(
                "/api/admin/providers",
                Some(&admin),
                json!({"key": p, "display_name": p, "base_url": mock.base_url(), "kind": "openai"}),
            )
            .await;
        assert_eq!(s, 201, "{b}");
    }
    let user = user_token(app, "alice").await;
    for p in ["p1", "p2", "p3"] {
        let (s, b) = app
            .post(
                "/api/provider-keys",
                Some(&user),
                json!({"provider": p, "api_key": format!("sk-{p}-0123456789abcdef")}),
            )
            .await;
        assert_eq!(s, 201, "{b}");
    }
    let (key, _) = new_key(app, &user, json!({"name": "t"})).await;
    Env {
        mock,
        admin,
        user,
        key,
    }
}

async fn model(app: &TestApp, e: &Env, body: Value) -> Value {
    let mut body = body;
    if body.get("input_price_per_1m").is_none() {
        body["input_price_per_1m"] = json!(1.0);
    }
    body["output_price_per_1m"] = json!(2.0);
    let (s, b) = app.post("/api/admin/models", Some(&e.admin), body).await;
    assert_eq!(s, 201, "{b}");
    b
}

fn dep(provider: &str, upstream: &str, priority: i32) -> Value {
    json!({"provider": provider, "upstream_model": upstream, "priority": priority})
}

async fn chat(app: &TestApp, key: &str, model: &str) -> (u16, reqwest::header::HeaderMap, Value) {
    let r = app
        .client
        .post(app.url("/v1/chat/completions"))
        .bearer_auth(key)
        .json(&json!({"model": model, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .expect("send");
    let (s, h) = (r.status().as_u16(), r.headers().clone());
    (s, h, r.json().await.unwrap_or(Value::Null))
}

fn attempts(h: &reqwest::header::HeaderMap) -> u32 {
    h["x-tollgate-attempts"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("a number")
}

#[tokio::test]
async fn deployments_and_fallbacks_are_checked_at_save() {
    let app = TestApp::spawn().await;
    let e = env(&app).await;
    let (s, _) = app
        .patch(
            "/api/admin/providers/p3",
            Some(&e.admin),
            json!({"is_active": false}),
        )
        .await;
    assert_eq!(s, 200);
    let post = |body: Value| app.post("/api/admin/models", Some(&e.admin), body);
    let (s, b) = post(json!({"name": "x", "deployments": [dep("nope", "a", 0)]})).await;
    assert_error(s, &b, 400, "invalid_value");
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("unknown provider"),
        "{b}"
    );
    let (s, b) = post(json!({"name": "x", "deployments": [dep("p3", "a", 0)]})).await;
    assert_error(s, &b, 400, "invalid_value");
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not active"),
        "{b}"
    );
    let (s, b) = post(json!({"name": "x", "provider": "p3"})).await;
    assert_error(s, &b, 400, "invalid_value");
    for w in [0, 101] {
        let (s, b) =
            post(json!({"name": "x", "deployments": [{"provider": "p1", "weight": w}]})).await;
        assert_error(s, &b, 400, "invalid_value");
    }
    let (s, b) =
        post(json!({"name": "x", "provider": "p1", "deployments": [dep("p1", "a", 0)]})).await;
    assert_error(s, &b, 400, "invalid_value");
    // a → b, then b → a is a cycle.
    let a = model(&app, &e, json!({"name": "a", "deployments": [dep("p1", "normal", 0), {"provider": "p2", "upstream_model": "normal", "weight": 100, "priority": 1}]})).await;
    assert_eq!(a["deployments"].as_array().unwrap().len(), 2, "{a}");
    assert_eq!(a["provider"], "p1");
    let b_model = model(
        &app,
        &e,
        json!({"name": "b", "provider": "p2", "fallbacks": ["a"]}),
    )
    .await;
    assert_eq!(b_model["fallbacks"], json!(["a"]));
    let a_id = a["id"].as_str().unwrap();
    let (s, b) = app
        .patch(
            &format!("/api/admin/models/{a_id}"),
            Some(&e.admin),
            json!({"fallbacks": ["b"]}),
        )
        .await;
    assert_error(s, &b, 400, "invalid_value");
    assert!(
        b["error"]["message"].as_str().unwrap().contains("cycle"),
        "{b}"
    );
    let (s, b) = app
        .patch(
            &format!("/api/admin/models/{a_id}"),
            Some(&e.admin),
            json!({"fallbacks": ["a"]}),
        )
        .await;
    assert_error(s, &b, 400, "invalid_value");
    let (s, b) = app
        .patch(
            &format!("/api/admin/models/{a_id}"),
            Some(&e.admin),
            json!({"fallbacks": ["ghost"]}),
        )
        .await;
    assert_error(s, &b, 400, "invalid_value");
    // Nothing changed.
    let (_, list) = app.get("/api/models?active_only=false", None).await;
    let a_now = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "a")
        .unwrap()
        .clone();
    assert_eq!(a_now["fallbacks"], json!([]));
    // A provider key weight outside 1–100 is refused too.
    let (s, b) = app
        .post(
            "/api/provider-keys",
            Some(&e.user),
            json!({"provider": "p1", "api_key": "sk-0123456789", "weight": 0}),
        )
        .await;
    assert_error(s, &b, 400, "invalid_value");
}

#[tokio::test]
async fn a_5xx_a_reset_and_a_stall_are_retried_on_the_next_tier() {
    let app = TestApp::spawn_with(|c| c.upstream.first_byte_timeout_secs = 1).await;
    let e = env(&app).await;
    for (name, bad) in [
        ("m5xx", "fail503"),
        ("mreset", "reset"),
        ("mstall", "stall"),
    ] {
        model(
            &app,
            &e,
            json!({"name": name, "deployments": [dep("p1", bad, 0), dep("p2", "normal", 1)]}),
        )
        .await;
        let (s, h, b) = chat(&app, &e.key, name).await;
        assert_eq!(s, 200, "{name}: {b}");
        assert_eq!(attempts(&h), 2, "{name}");
        assert_eq!(h["x-tollgate-model"], name);
        assert_eq!(b["model"], name);
        assert_eq!(e.mock.count(bad), 1, "{name}");
    }
    let records = wait_records(&app, &e.user, 3).await;
    assert_eq!(records.len(), 3);
    for r in &records {
        assert_eq!(
            (
                r["attempts"].as_i64(),
                r["provider"].as_str(),
                r["status"].as_i64()
            ),
            (Some(2), Some("p2"), Some(200)),
            "{r}"
        );
        assert_eq!(r["fallback_from"], Value::Null);
    }
}

#[tokio::test]
async fn a_4xx_is_the_answer_and_the_budgets_bound_retries() {
    let app = TestApp::spawn_with(|c| c.routing.max_attempts = 2).await;
    let e = env(&app).await;
    model(
        &app,
        &e,
        json!({"name": "m400", "deployments": [dep("p1", "err400", 0), dep("p2", "normal", 1)]}),
    )
    .await;
    let (s, h, b) = chat(&app, &e.key, "m400").await;
    assert_eq!(s, 400, "{b}");
    assert_eq!(b["error"]["code"], "upstream_says_no");
    assert_eq!(attempts(&h), 1);
    assert_eq!(e.mock.count("normal"), 0);
    // Three failing deployments, two attempts at most: the last failure is the answer.
    model(&app, &e, json!({"name": "mall", "deployments": [dep("p1", "fail503", 0), dep("p2", "fail500", 0), dep("p3", "fail502", 0)]})).await;
    let (s, h, _) = chat(&app, &e.key, "mall").await;
    assert!(s >= 500, "{s}");
    assert_eq!(attempts(&h), 2);
    let tried = e.mock.count("fail503") + e.mock.count("fail500") + e.mock.count("fail502");
    assert_eq!(tried, 2);
    let records = wait_records(&app, &e.user, 2).await;
    assert!(
        records
            .iter()
            .any(|r| r["attempts"] == 2 && r["status"].as_i64() == Some(s as i64)),
        "{records:?}"
    );

    // No budget: no retry.
    let app = TestApp::spawn_with(|c| c.routing.retry_budget_secs = 0).await;
    let e = env(&app).await;
    model(
        &app,
        &e,
        json!({"name": "m5xx", "deployments": [dep("p1", "fail503", 0), dep("p2", "normal", 1)]}),
    )
    .await;
    let (s, h, _) = chat(&app, &e.key, "m5xx").await;
    assert_eq!((s, attempts(&h)), (503, 1));
    assert_eq!(e.mock.count("normal"), 0);
}

#[tokio::test]
async fn a_429_cools_the_pair_down_and_a_401_invalidates_the_key() {
    let app = TestApp::spawn().await;
    let e = env(&app).await;
    model(
        &app,
        &e,
        json!({"name": "m429", "deployments": [dep("p1", "r429", 0), dep("p2", "normal", 1)]}),
    )
    .await;
    let (s, h, _) = chat(&app, &e.key, "m429").await;
    assert_eq!((s, attempts(&h)), (200, 2));
    // Cooling down for its retry-after: the next request skips it.
    let (s, h, _) = chat(&app, &e.key, "m429").await;
    assert_eq!((s, attempts(&h)), (200, 1));
    assert_eq!(e.mock.count("r429"), 1);

    model(
        &app,
        &e,
        json!({"name": "m401", "deployments": [dep("p3", "auth401", 0), dep("p2", "normal", 1)]}),
    )
    .await;
    let (s, h, _) = chat(&app, &e.key, "m401").await;
    assert_eq!((s, attempts(&h)), (200, 2));
    // The owner sees the key invalid, and an audit entry says why.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let p3 = loop {
        let (_, keys) = app.get("/api/provider-keys", Some(&e.user)).await;
        let k = keys["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["provider"] == "p3")
            .unwrap()
            .clone();
        if k["status"] == "invalid" {
            break k;
        }
        assert!(std::time::Instant::now() < deadline, "{k}");
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    };
    let (_, log) = app
        .get(
            "/api/me/audit-log?action=provider_key.invalid",
            Some(&e.user),
        )
        .await;
    assert_eq!(log["total"], 1, "{log}");
    assert!(!log.to_string().contains("sk-p3-0123456789abcdef"));
    let (s, h, _) = chat(&app, &e.key, "m401").await;
    assert_eq!((s, attempts(&h)), (200, 1));
    assert_eq!(
        e.mock.count("auth401"),
        1,
        "an invalid key is not used again"
    );
    // The owner edits it: back in use.
    let id = p3["id"].as_str().unwrap();
    let (s, k) = app
        .patch(
            &format!("/api/provider-keys/{id}"),
            Some(&e.user),
            json!({"label": "fixed"}),
        )
        .await;
    assert_eq!((s, k["status"].as_str()), (200, Some("active")), "{k}");
    let (s, h, _) = chat(&app, &e.key, "m401").await;
    assert_eq!((s, attempts(&h)), (200, 2));
    assert_eq!(e.mock.count("auth401"), 2);
    // Verify asks the upstream's models list: the mock takes the key.
    let (s, v) = app
        .post(
            &format!("/api/provider-keys/{id}/verify"),
            Some(&e.user),
            json!({}),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        (v["ok"].as_bool(), v["status"].as_u64()),
        (Some(true), Some(200)),
        "{v}"
    );
    assert!(e.mock.requests().iter().any(|r| r.path == "/v1/models"));
    let (s, b) = app
        .post("/api/provider-keys/nope/verify", Some(&e.user), json!({}))
        .await;
    assert_error(s, &b, 404, "not_found");
}

#[tokio::test]
async fn fallbacks_answer_in_order_when_allowed() {
    let app = TestApp::spawn().await;
    let e = env(&app).await;
    model(&app, &e, json!({"name": "backup", "provider": "p2", "upstream_model": "normal", "input_price_per_1m": 3.0}))
        .await;
    model(&app, &e, json!({"name": "main", "provider": "p1", "upstream_model": "fail503", "fallbacks": ["backup"]})).await;
    model(&app, &e, json!({"name": "small", "provider": "p1", "upstream_model": "ctx400", "fallbacks": ["backup"]})).await;
    for name in ["main", "small"] {
        let (s, h, b) = chat(&app, &e.key, name).await;
        assert_eq!(s, 200, "{b}");
        assert_eq!(b["model"], "backup");
        assert_eq!(h["x-tollgate-model"], "backup");
        assert_eq!(attempts(&h), 2);
    }
    let records = wait_records(&app, &e.user, 2).await;
    for r in &records {
        assert_eq!(r["model"], "backup", "{r}");
        assert_eq!(r["attempts"], 2);
        assert!(
            matches!(r["fallback_from"].as_str(), Some("main" | "small")),
            "{r}"
        );
        // Priced at the model that answered: 11 × 3 + 7 × 2 per 1M.
        assert!(
            (r["cost_usd"].as_f64().unwrap() - 47e-6).abs() < 1e-12,
            "{r}"
        );
    }
    // A key that may not use the fallback gets the failure.
    let (key, _) = new_key(
        &app,
        &e.user,
        json!({"name": "narrow", "allowed_models": ["main"]}),
    )
    .await;
    let (s, h, _) = chat(&app, &key, "main").await;
    assert_eq!((s, attempts(&h)), (503, 1));
}

#[tokio::test]
async fn a_stream_is_never_retried_after_its_first_event() {
    let app = TestApp::spawn().await;
    let e = env(&app).await;
    model(
        &app,
        &e,
        json!({"name": "mcut", "deployments": [dep("p1", "cut", 0), dep("p2", "normal", 1)]}),
    )
    .await;
    let r = app
        .client
        .post(app.url("/v1/chat/completions"))
        .bearer_auth(&e.key)
        .json(&json!({"model": "mcut", "stream": true, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-tollgate-attempts"], "1");
    let text = r.text().await.unwrap_or_default();
    assert!(text.contains("Hello"), "{text}");
    assert!(
        text.contains("error"),
        "the cut stream ends with an error event: {text}"
    );
    assert_eq!(
        e.mock.count("normal"),
        0,
        "no second attempt after bytes went out"
    );
    let records = wait_records(&app, &e.user, 1).await;
    assert_eq!(records[0]["attempts"], 1);
}

#[tokio::test]
async fn routing_health_is_for_admins_and_masks_keys() {
    let app = TestApp::spawn().await;
    let e = env(&app).await;
    model(
        &app,
        &e,
        json!({"name": "m", "deployments": [dep("p1", "fail503", 0), dep("p2", "normal", 1)]}),
    )
    .await;
    let (s, _, _) = chat(&app, &e.key, "m").await;
    assert_eq!(s, 200);
    let (s, b) = app.get("/api/admin/routing/health", Some(&e.user)).await;
    assert_error(s, &b, 403, "forbidden");
    let (s, b) = app.get("/api/admin/routing/health", Some(&e.admin)).await;
    assert_eq!(s, 200, "{b}");
    let data = b["data"].as_array().unwrap();
    let bad = data
        .iter()
        .find(|d| d["upstream_model"] == "fail503")
        .unwrap();
    assert_eq!(
        (bad["requests"].as_u64(), bad["failures"].as_u64()),
        (Some(1), Some(1)),
        "{bad}"
    );
    assert_eq!(
        bad["state"], "healthy",
        "one failure is below the threshold"
    );
    let good = data
        .iter()
        .find(|d| d["upstream_model"] == "normal")
        .unwrap();
    assert_eq!(good["failures"], 0);
    assert!(good["p50_latency_ms"].is_u64(), "{good}");
    assert!(
        !b.to_string().contains("0123456789abcdef"),
        "keys are masked: {b}"
    );
}

/// The scenario of the issue: two deployments, one failing half its requests with mixed 5xx,
/// resets and 429s; 500 client requests all succeed.
#[tokio::test]
async fn five_hundred_requests_through_a_flaky_deployment() {
    let app = TestApp::spawn_with(|c| {
        c.routing.cooldown_secs = 1;
        // A burst holds four connect errors and 5xx around one 429.
        c.routing.failure_threshold = 3;
        c.billing.enforce_balance = true;
        c.billing.initial_balance_usd = 10.0;
    })
    .await;
    let e = env(&app).await;
    model(
        &app,
        &e,
        json!({"name": "duo", "deployments": [
        {"provider": "p1", "upstream_model": "flaky", "weight": 1},
        {"provider": "p2", "upstream_model": "normal", "weight": 1}]}),
    )
    .await;
    let (_, before) = app.get("/api/me/balance", Some(&e.user)).await;
    const N: usize = 500;
    let mut done = 0;
    let mut retried = 0;
    while done < N {
        let batch: Vec<_> = (0..10).map(|_| chat(&app, &e.key, "duo")).collect();
        for (s, h, b) in futures_util::future::join_all(batch).await {
            assert_eq!(s, 200, "{b}");
            assert_eq!(b["choices"][0]["message"]["content"], "Hello from mock");
            if attempts(&h) > 1 {
                retried += 1;
            }
            done += 1;
        }
    }
    assert!(retried > 0);
    assert!(e.mock.count("flaky") > 0);
    // The breaker opens after three failures in a row, and its metric says so. Ten requests at a
    // time can finish a burst's answers between its failures (and the burst's 429 can keep the
    // pair out of the 500 altogether), so one request at a time until it has opened: the mock's
    // next burst then fails three in a row in this order.
    let flaky_health = || async {
        let (_, health) = app.get("/api/admin/routing/health", Some(&e.admin)).await;
        health["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["upstream_model"] == "flaky")
            .unwrap()
            .clone()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut extra = 0;
    loop {
        let flaky = flaky_health().await;
        if flaky["breaker_opens"].as_u64().unwrap() >= 1 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never opened: {flaky}"
        );
        let (s, _, b) = chat(&app, &e.key, "duo").await;
        assert_eq!(s, 200, "{b}");
        extra += 1;
    }
    let metrics = app
        .client
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("tollgate_routing_retries_total{provider="),
        "{metrics}"
    );
    assert!(
        metrics.contains("tollgate_routing_attempts_total{outcome=\"failed\",provider=\"p1\"}")
    );
    assert!(!metrics.contains("sk-p1"), "no key in metrics");

    // It heals: a probe after the cool-down closes the breaker, and it takes requests again.
    e.mock.heal();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let (s, _, _) = chat(&app, &e.key, "duo").await;
        assert_eq!(s, 200);
        extra += 1;
        let f = flaky_health().await;
        if f["state"] == "healthy" && f["consecutive_failures"] == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the breaker never closed: {f}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let served = e.mock.count("flaky");
    for _ in 0..40 {
        let (s, _, _) = chat(&app, &e.key, "duo").await;
        assert_eq!(s, 200);
    }
    extra += 40;
    assert!(
        e.mock.count("flaky") > served,
        "the healed deployment takes requests again"
    );

    // One usage record per client request, each priced once: 11 × 1 + 7 × 2 per 1M.
    let total = N + extra;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let records = loop {
        let (_, b) = app.get("/api/me/usage?group_by=model", Some(&e.user)).await;
        if b["totals"]["requests"].as_u64() == Some(total as u64) {
            break b;
        }
        assert!(std::time::Instant::now() < deadline, "{b}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(records["totals"]["errors"], 0, "{records}");
    let want = total as f64 * 25e-6;
    let cost = records["totals"]["cost_usd"].as_f64().unwrap();
    assert!((cost - want).abs() < 1e-9, "{cost} vs {want}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let (_, after) = app.get("/api/me/balance", Some(&e.user)).await;
        let spent =
            before["balance_usd"].as_f64().unwrap() - after["balance_usd"].as_f64().unwrap();
        if (spent - want).abs() < 1e-9 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "charged {spent}, want {want}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// With two replicas and Redis, health one replica learned reaches the other within a second: a
/// key refused on one is not tried by the other, a pair cooling down on one is skipped by both.
#[tokio::test]
async fn health_reaches_the_other_replica() {
    let Ok(url) = std::env::var("TOLLGATE_TEST_REDIS_URL") else {
        eprintln!(
            "health_reaches_the_other_replica: skipped: set TOLLGATE_TEST_REDIS_URL=redis://127.0.0.1:6379 to run it"
        );
        return;
    };
    let prefix = format!("tgtest:{}:", uuid::Uuid::new_v4().simple());
    let redis = |c: &mut tollgate::config::Config| {
        c.redis.url = Some(secrecy::SecretString::from(url.clone()));
        c.redis.key_prefix = prefix.clone();
    };
    let a = TestApp::spawn_with(redis).await;
    let b = TestApp::spawn_on(a.db.clone(), redis).await;
    let e = env(&a).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while !(a.state.cluster.is_listening() && b.state.cluster.is_listening()) {
        assert!(std::time::Instant::now() < deadline, "listeners");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    model(
        &a,
        &e,
        json!({"name": "m401", "deployments": [dep("p3", "auth401", 0), dep("p2", "normal", 1)]}),
    )
    .await;
    model(
        &a,
        &e,
        json!({"name": "m429", "deployments": [dep("p1", "r429bare", 0), dep("p2", "normal", 1)]}),
    )
    .await;
    for m in ["m401", "m429"] {
        let (s, h, _) = chat(&a, &e.key, m).await;
        assert_eq!((s, attempts(&h)), (200, 2), "{m}");
    }
    // b hears of both within a second.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
    loop {
        let (_, h) = b.get("/api/admin/routing/health", Some(&e.admin)).await;
        let state = |up: &str| {
            h["data"]
                .as_array()
                .and_then(|d| d.iter().find(|x| x["upstream_model"] == up))
                .map(|x| x["state"].clone())
        };
        if state("auth401") == Some(json!("invalid"))
            && state("r429bare") == Some(json!("cooling_down"))
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not on b within a second: {h}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    for m in ["m401", "m429"] {
        let (s, h, _) = chat(&b, &e.key, m).await;
        assert_eq!((s, attempts(&h)), (200, 1), "{m} on b");
    }
    assert_eq!(e.mock.count("auth401"), 1, "b never tried the refused key");
    assert_eq!(
        e.mock.count("r429bare"),
        1,
        "b skipped the pair cooling down"
    );
}
