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

/// An OpenAI-compatible upstream that answers by the provider key it is given: every request's
/// bearer key is recorded in order, a key in `refused` is answered 401 (`/models` included, so
/// verify sees the refusal too), any other gets a chat completion (11 + 7 tokens).
#[derive(Clone, Default)]
struct KeyMock {
    base: String,
    /// (path, key) per request, in arrival order.
    seen: std::sync::Arc<std::sync::Mutex<Vec<(String, String)>>>,
    refused: std::sync::Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
}

impl KeyMock {
    async fn start() -> Self {
        use axum::http::{HeaderMap, StatusCode, Uri};
        use axum::response::IntoResponse;
        let mut mock = KeyMock::default();
        let state = mock.clone();
        let app = axum::Router::new().fallback(move |uri: Uri, headers: HeaderMap| {
            let state = state.clone();
            async move {
                let key = headers
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer "))
                    .unwrap_or_default()
                    .to_owned();
                state
                    .seen
                    .lock()
                    .expect("lock")
                    .push((uri.path().to_owned(), key.clone()));
                if state.refused.lock().expect("lock").contains(&key) {
                    return (
                        StatusCode::UNAUTHORIZED,
                        axum::Json(json!({"error": {"message": "Incorrect API key provided", "type": "invalid_request_error", "param": null, "code": "invalid_api_key"}})),
                    )
                        .into_response();
                }
                if uri.path().ends_with("/models") {
                    return axum::Json(json!({"object": "list", "data": [{"id": "m", "object": "model"}]}))
                        .into_response();
                }
                axum::Json(json!({
                    "id": "chatcmpl-keymock", "object": "chat.completion", "created": 1_700_000_000, "model": "m",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}
                }))
                .into_response()
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        mock.base = format!("http://{}/v1", listener.local_addr().expect("addr"));
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        mock
    }

    fn refuse(&self, key: &str, yes: bool) {
        let mut r = self.refused.lock().expect("lock");
        if yes {
            r.insert(key.to_owned());
        } else {
            r.remove(key);
        }
    }

    /// Chat requests (not verify's `/models`) that reached it with `key`.
    fn chats_with(&self, key: &str) -> usize {
        self.seen
            .lock()
            .expect("lock")
            .iter()
            .filter(|(p, k)| p.ends_with("/chat/completions") && k == key)
            .count()
    }

    fn chats(&self) -> Vec<String> {
        self.seen
            .lock()
            .expect("lock")
            .iter()
            .filter(|(p, _)| p.ends_with("/chat/completions"))
            .map(|(_, k)| k.clone())
            .collect()
    }
}

/// A provider on `mock` and a catalog model `pm` on it (11 × 1 + 7 × 2 per 1M = 25e-6 a request).
async fn key_mock_provider(app: &TestApp, admin: &str, mock: &KeyMock) {
    let (s, b) = app
        .post(
            "/api/admin/providers",
            Some(admin),
            json!({"key": "pool", "display_name": "pool", "base_url": mock.base, "kind": "openai"}),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    let (s, b) = app
        .post(
            "/api/admin/models",
            Some(admin),
            json!({"name": "pm", "provider": "pool", "upstream_model": "m",
                   "input_price_per_1m": 1.0, "output_price_per_1m": 2.0}),
        )
        .await;
    assert_eq!(s, 201, "{b}");
}

/// Stores a provider key for `pool`; returns its id.
async fn pool_key(app: &TestApp, token: &str, secret: &str, extra: Value) -> String {
    let mut body = json!({"provider": "pool", "api_key": secret});
    if let Value::Object(m) = extra {
        body.as_object_mut().expect("an object").extend(m);
    }
    let (s, b) = app.post("/api/provider-keys", Some(token), body).await;
    assert_eq!(s, 201, "{b}");
    assert_eq!(b["status"], "active", "{b}");
    b["id"].as_str().expect("id").to_owned()
}

/// `n` chat requests to `pm`, ten at a time; every one must be answered 200. Returns how many
/// needed more than one attempt.
async fn chat_many(app: &TestApp, key: &str, n: usize) -> usize {
    let mut retried = 0;
    let mut done = 0;
    while done < n {
        let batch: Vec<_> = (0..(n - done).min(10))
            .map(|_| chat(app, key, "pm"))
            .collect();
        for (s, h, b) in futures_util::future::join_all(batch).await {
            assert_eq!(s, 200, "{b}");
            assert_eq!(b["choices"][0]["message"]["content"], "ok", "{b}");
            if attempts(&h) > 1 {
                retried += 1;
            }
            done += 1;
        }
    }
    retried
}

/// Every usage record of the user behind `token`, once `n` exist.
async fn all_records(app: &TestApp, token: &str, n: usize) -> Vec<Value> {
    wait_records(app, token, n).await;
    let mut all = Vec::new();
    for page in 1.. {
        let (s, b) = app
            .get(
                &format!("/api/me/usage/records?per_page=100&page={page}"),
                Some(token),
            )
            .await;
        assert_eq!(s, 200, "{b}");
        let data = b["data"].as_array().expect("data");
        if data.is_empty() {
            break;
        }
        all.extend(data.iter().cloned());
    }
    all
}

/// The status of one of the user's provider keys, as the owner sees it.
async fn key_status(app: &TestApp, token: &str, id: &str) -> String {
    let (s, keys) = app
        .get("/api/provider-keys?per_page=100", Some(token))
        .await;
    assert_eq!(s, 200, "{keys}");
    let listed = keys["data"].as_array().expect("data");
    let Some(k) = listed.iter().find(|k| k["id"] == id) else {
        panic!("key {id} not listed: {keys}");
    };
    k["status"].as_str().expect("status").to_owned()
}

/// Issue 21's key pools end to end: one user, three keys for one provider weighted 60/30/10.
/// Requests spread by weight; the heaviest key then gets a 401 upstream: the client still gets
/// its 200 (retried on another key of the pool), the owner sees the key `invalid`, it is never
/// sent upstream again — until a verify the upstream accepts puts it back. One usage record per
/// client request, `attempts: 2` only on the one that met the 401.
#[tokio::test]
async fn a_key_pool_is_weighted_and_a_refused_key_leaves_it() {
    let app = TestApp::spawn().await;
    let mock = KeyMock::start().await;
    let admin = admin_token(&app).await;
    key_mock_provider(&app, &admin, &mock).await;
    let user = user_token(&app, "alice").await;
    const HEAVY: &str = "sk-pool-heavy-0123456789";
    const MID: &str = "sk-pool-mid-0123456789";
    const LIGHT: &str = "sk-pool-light-0123456789";
    let heavy = pool_key(&app, &user, HEAVY, json!({"weight": 60})).await;
    let mid = pool_key(&app, &user, MID, json!({"weight": 30})).await;
    let light = pool_key(&app, &user, LIGHT, json!({"weight": 10})).await;
    let (key, _) = new_key(&app, &user, json!({"name": "t"})).await;
    let mut sent = 0usize;

    // (a) Weighted: 400 requests, one attempt each, each reaching upstream exactly once. Expected
    // shares 60/30/10 %; the bounds below sit six or more standard deviations out.
    const N: usize = 400;
    assert_eq!(
        chat_many(&app, &key, N).await,
        0,
        "a healthy pool needs no retry"
    );
    sent += N;
    assert_eq!(mock.chats().len(), N, "one upstream call per request");
    let (h, m, l) = (
        mock.chats_with(HEAVY),
        mock.chats_with(MID),
        mock.chats_with(LIGHT),
    );
    assert_eq!(h + m + l, N);
    assert!(h > m && m > l && l > 0, "heavy {h}, mid {m}, light {l}");
    let share = |c: usize| c as f64 / N as f64;
    assert!((0.45..=0.75).contains(&share(h)), "heavy {h} of {N}");
    assert!((0.15..=0.45).contains(&share(m)), "mid {m} of {N}");
    assert!((0.02..=0.20).contains(&share(l)), "light {l} of {N}");

    // (b) The heavy key is revoked upstream. One request at a time until one meets it: that
    // request still succeeds, on a second attempt with another key of the pool.
    mock.refuse(HEAVY, true);
    let before = mock.chats().len();
    let mut met = None;
    for i in 0..200 {
        let (s, hd, b) = chat(&app, &key, "pm").await;
        sent += 1;
        assert_eq!(s, 200, "{b}");
        assert_eq!(hd["x-tollgate-model"], "pm");
        if attempts(&hd) > 1 {
            met = Some(i);
            break;
        }
        assert_ne!(mock.chats().last().unwrap(), HEAVY);
    }
    assert!(
        met.is_some(),
        "the heavy key was never picked in 200 requests"
    );
    let calls = mock.chats();
    let tail = &calls[before..];
    assert_eq!(
        tail.iter().filter(|k| *k == HEAVY).count(),
        1,
        "the refused key was tried once: {tail:?}"
    );
    assert_eq!(tail[tail.len() - 2], HEAVY);
    assert!(
        [MID, LIGHT].contains(&tail[tail.len() - 1].as_str()),
        "retried on another key of the pool: {tail:?}"
    );
    // The owner sees it invalid (the database write runs in the background); the others stay.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while key_status(&app, &user, &heavy).await != "invalid" {
        assert!(std::time::Instant::now() < deadline, "never marked invalid");
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    assert_eq!(key_status(&app, &user, &mid).await, "active");
    assert_eq!(key_status(&app, &user, &light).await, "active");
    let (_, log) = app
        .get("/api/me/audit-log?action=provider_key.invalid", Some(&user))
        .await;
    assert_eq!(log["total"], 1, "{log}");
    assert!(log.to_string().contains(&heavy), "{log}");
    assert!(
        !log.to_string().contains(HEAVY),
        "no secret in the audit log"
    );

    // Never used again: 100 more requests, all on the first attempt, none reaching upstream with
    // it, and the rest of the pool still shared by weight (30:10 — both used).
    let heavy_calls = mock.chats_with(HEAVY);
    let (m0, l0) = (mock.chats_with(MID), mock.chats_with(LIGHT));
    assert_eq!(chat_many(&app, &key, 100).await, 0);
    sent += 100;
    assert_eq!(
        mock.chats_with(HEAVY),
        heavy_calls,
        "an invalid key is not used"
    );
    let (m1, l1) = (mock.chats_with(MID) - m0, mock.chats_with(LIGHT) - l0);
    assert_eq!(m1 + l1, 100);
    assert!(m1 > l1 && l1 > 0, "mid {m1}, light {l1}");

    // A verify the upstream still refuses leaves it invalid; one it accepts puts it back.
    let verify = format!("/api/provider-keys/{heavy}/verify");
    let (s, v) = app.post(&verify, Some(&user), json!({})).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        (v["ok"].as_bool(), v["status"].as_u64()),
        (Some(false), Some(401)),
        "{v}"
    );
    assert_eq!(key_status(&app, &user, &heavy).await, "invalid");
    assert_eq!(chat_many(&app, &key, 20).await, 0);
    sent += 20;
    assert_eq!(mock.chats_with(HEAVY), heavy_calls);
    mock.refuse(HEAVY, false);
    let (s, v) = app.post(&verify, Some(&user), json!({})).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(key_status(&app, &user, &heavy).await, "active");
    let mut back = false;
    for _ in 0..50 {
        let (s, hd, _) = chat(&app, &key, "pm").await;
        sent += 1;
        assert_eq!((s, attempts(&hd)), (200, 1));
        if mock.chats_with(HEAVY) > heavy_calls {
            back = true;
            break;
        }
    }
    assert!(back, "the verified key is back in the pool");

    // (c) One usage record per client request; only the request that met the 401 took two
    // attempts, and every record is the pool provider's, answered 200.
    let records = all_records(&app, &user, sent).await;
    assert_eq!(records.len(), sent, "usage records = client requests");
    let twice: Vec<_> = records.iter().filter(|r| r["attempts"] != 1).collect();
    assert_eq!(twice.len(), 1, "{twice:?}");
    assert_eq!(twice[0]["attempts"], 2);
    for r in &records {
        assert_eq!(
            (
                r["provider"].as_str(),
                r["status"].as_i64(),
                r["model"].as_str()
            ),
            (Some("pool"), Some(200), Some("pm")),
            "{r}"
        );
    }
}

async fn balance(app: &TestApp, token: &str) -> f64 {
    let (s, b) = app.get("/api/me/balance", Some(token)).await;
    assert_eq!(s, 200, "{b}");
    b["balance_usd"].as_f64().expect("balance_usd")
}

/// The shared platform pool: keys an admin marked `shared` serve a user with no key of their own
/// for the provider (every shared key of the pool, by weight), charged to that user's balance; a
/// user with a key uses only their own, uncharged; once the first user adds a key, theirs wins.
#[tokio::test]
async fn the_platform_pool_serves_users_without_a_key() {
    let app = TestApp::spawn_with(|c| c.billing.initial_balance_usd = 1.0).await;
    let mock = KeyMock::start().await;
    let admin = admin_token(&app).await;
    key_mock_provider(&app, &admin, &mock).await;
    const SHARED_A: &str = "sk-platform-a-0123456789";
    const SHARED_B: &str = "sk-platform-b-0123456789";
    const ALICE: &str = "sk-alice-own-0123456789";
    const BOB: &str = "sk-bob-own-0123456789";
    pool_key(&app, &admin, SHARED_A, json!({"shared": true})).await;
    pool_key(&app, &admin, SHARED_B, json!({"shared": true})).await;
    let alice = user_token(&app, "alice").await;
    pool_key(&app, &alice, ALICE, json!({})).await;
    let bob = user_token(&app, "bob").await;
    let (alice_key, _) = new_key(&app, &alice, json!({"name": "a"})).await;
    let (bob_key, _) = new_key(&app, &bob, json!({"name": "b"})).await;
    assert_eq!(balance(&app, &bob).await, 1.0);

    // Alice has her own key: only it is used, and nothing is charged.
    chat_many(&app, &alice_key, 10).await;
    assert_eq!(mock.chats_with(ALICE), 10);
    assert_eq!(mock.chats().len(), 10);
    // Bob has none: the platform pool serves him, both of its keys (equal weights; 40 requests).
    chat_many(&app, &bob_key, 40).await;
    let (a, b) = (mock.chats_with(SHARED_A), mock.chats_with(SHARED_B));
    assert_eq!(a + b, 40, "bob's requests went to the shared keys only");
    assert!(a > 0 && b > 0, "both shared keys used: {a} / {b}");
    assert_eq!(mock.chats_with(ALICE), 10, "bob never borrows alice's key");
    // Bob is charged 25e-6 a request; alice, on her own key, is not.
    let want = 1.0 - 40.0 * 25e-6;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let got = balance(&app, &bob).await;
        if (got - want).abs() < 1e-9 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "bob at {got}, want {want}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(balance(&app, &alice).await, 1.0);
    let records = all_records(&app, &bob, 40).await;
    assert_eq!(records.len(), 40);
    assert!(
        records
            .iter()
            .all(|r| r["provider"] == "pool" && r["attempts"] == 1)
    );

    // Bob stores a key of his own: from now on it is his pool, and he is not charged.
    pool_key(&app, &bob, BOB, json!({})).await;
    let shared_before = mock.chats_with(SHARED_A) + mock.chats_with(SHARED_B);
    chat_many(&app, &bob_key, 10).await;
    assert_eq!(mock.chats_with(BOB), 10);
    assert_eq!(
        mock.chats_with(SHARED_A) + mock.chats_with(SHARED_B),
        shared_before
    );
    all_records(&app, &bob, 50).await;
    assert!((balance(&app, &bob).await - want).abs() < 1e-9);
}

/// The value of the sample `name{labels}` in a Prometheus text exposition.
fn sample(metrics: &str, name_and_labels: &str) -> Option<f64> {
    metrics.lines().find_map(|l| {
        l.strip_prefix(name_and_labels)
            .and_then(|rest| rest.strip_prefix(' '))
            .map(|v| v.trim().parse().expect("a number"))
    })
}

async fn metrics(app: &TestApp) -> String {
    let r = app
        .client
        .get(app.url("/metrics"))
        .send()
        .await
        .expect("GET /metrics");
    assert_eq!(r.status(), 200);
    r.text().await.expect("metrics text")
}

/// `tollgate_routing_breakers_open{provider}` follows one deployment's breaker: 0 below the
/// threshold, 1 once it opened (for its provider only), 0 again after a probe closed it; and no
/// metric carries a provider key (id, secret or masked form) in any label.
#[tokio::test]
async fn the_breaker_gauge_opens_and_closes_per_provider() {
    let app = TestApp::spawn_with(|c| {
        c.routing.failure_threshold = 2;
        c.routing.cooldown_secs = 1;
    })
    .await;
    let e = env(&app).await;
    // `flaky` fails its first five requests (503, reset, 500, 502, 429) until healed.
    model(
        &app,
        &e,
        json!({"name": "duo", "deployments": [dep("p1", "flaky", 0), dep("p2", "normal", 1)]}),
    )
    .await;
    const P1: &str = "tollgate_routing_breakers_open{provider=\"p1\"}";
    const P2: &str = "tollgate_routing_breakers_open{provider=\"p2\"}";
    let open = |m: &str, which: &str| sample(m, which).unwrap_or(0.0);

    // One failure: below the threshold, nothing open.
    let (s, h, _) = chat(&app, &e.key, "duo").await;
    assert_eq!((s, attempts(&h)), (200, 2));
    let m = metrics(&app).await;
    assert_eq!(open(&m, P1), 0.0, "{m}");
    // The second in a row opens p1's breaker: the gauge says 1 for p1, nothing for p2.
    let (s, h, _) = chat(&app, &e.key, "duo").await;
    assert_eq!((s, attempts(&h)), (200, 2));
    let m = metrics(&app).await;
    assert_eq!(sample(&m, P1), Some(1.0), "{m}");
    assert_eq!(open(&m, P2), 0.0, "{m}");
    // While open, p1 is skipped.
    let flaky = e.mock.count("flaky");
    let (s, h, _) = chat(&app, &e.key, "duo").await;
    assert_eq!((s, attempts(&h)), (200, 1));
    assert_eq!(e.mock.count("flaky"), flaky);
    assert_eq!(sample(&metrics(&app).await, P1), Some(1.0));

    // No label of any metric names a provider key.
    let (_, keys) = app.get("/api/provider-keys", Some(&e.user)).await;
    let mut secrets: Vec<String> = vec![];
    for k in keys["data"].as_array().unwrap() {
        secrets.push(k["id"].as_str().unwrap().to_owned());
        secrets.push(k["masked"].as_str().unwrap().to_owned());
    }
    for p in ["p1", "p2", "p3"] {
        secrets.push(format!("sk-{p}-0123456789abcdef"));
    }
    assert!(secrets.len() >= 9, "{keys}");
    for line in m.lines().filter(|l| !l.starts_with('#')) {
        for s in &secrets {
            assert!(!line.contains(s.as_str()), "a key in a metric: {line}");
        }
        let Some(labels) = line.split_once('{').and_then(|(_, r)| r.split_once('}')) else {
            continue;
        };
        for pair in labels.0.split(',').filter(|p| !p.is_empty()) {
            let name = pair.split('=').next().unwrap();
            assert!(!name.contains("key"), "a per-key label: {line}");
        }
    }
    let breaker_lines: Vec<_> = m
        .lines()
        .filter(|l| l.starts_with("tollgate_routing_breakers_open{"))
        .collect();
    assert!(
        breaker_lines.iter().all(
            |l| l.starts_with("tollgate_routing_breakers_open{provider=\"") && !l.contains(',')
        ),
        "by provider only: {breaker_lines:?}"
    );

    // It heals: after the cool-down a probe goes to p1, succeeds, and the gauge is back to 0.
    e.mock.heal();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let (s, _, _) = chat(&app, &e.key, "duo").await;
        assert_eq!(s, 200);
        let m = metrics(&app).await;
        if sample(&m, P1) == Some(0.0) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never closed: {m}");
    }
    assert!(e.mock.count("flaky") > flaky, "the probe went to p1");
    let (s, h, _) = chat(&app, &e.key, "duo").await;
    assert_eq!((s, attempts(&h)), (200, 1));
    assert_eq!(
        sample(&metrics(&app).await, P1),
        Some(0.0),
        "closed stays closed"
    );
}
