//! The response cache (spec §11) end to end: the real app against the mock upstream. Opt-in per
//! gateway key (`cache_ttl_secs`) or per request (`x-tollgate-cache-ttl`); a hit makes no upstream
//! call and is metered with its tokens at cost 0 (`cache_hit: true`); scoped to the user;
//! streams never cached; TTLs expire and are capped; large answers are not kept; with Redis one
//! replica's answer is the other's hit.
//!
//! The Redis test needs `TOLLGATE_TEST_REDIS_URL` (e.g. `redis://127.0.0.1:6379`) and says why it
//! does not run without it.

mod common;

use std::time::{Duration, Instant};

use common::accounts::user_token;
use common::gateway::{Gateway, PROVIDER_SECRET, new_key, setup, wait_records};
use common::{TestApp, assert_error};
use reqwest::header::HeaderMap;
use secrecy::SecretString;
use serde_json::{Value, json};
use tollgate::metering::leases::Holder;

const TTL: &str = "x-tollgate-cache-ttl";

struct Answer {
    status: u16,
    headers: HeaderMap,
    body: String,
}

impl Answer {
    fn cache(&self) -> Option<&str> {
        self.headers
            .get("x-tollgate-cache")
            .and_then(|v| v.to_str().ok())
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|_| panic!("not JSON: {}", self.body))
    }
}

/// One request to `path` with `key`, `body` and (when given) the TTL header.
async fn send(app: &TestApp, key: &str, path: &str, body: &Value, ttl: Option<&str>) -> Answer {
    let mut req = app.client.post(app.url(path)).bearer_auth(key).json(body);
    if let Some(t) = ttl {
        req = req.header(TTL, t);
    }
    let r = req.send().await.expect("send");
    let (status, headers) = (r.status().as_u16(), r.headers().clone());
    Answer {
        status,
        headers,
        body: r.text().await.expect("body"),
    }
}

fn chat_body(text: &str) -> Value {
    json!({"model": "gpt-test", "messages": [{"role": "user", "content": text}]})
}

async fn chat(app: &TestApp, key: &str, text: &str, ttl: Option<&str>) -> Answer {
    send(app, key, "/v1/chat/completions", &chat_body(text), ttl).await
}

fn upstream_calls(gw: &Gateway) -> usize {
    gw.mock.count("normal")
}

async fn metric(app: &TestApp, name: &str) -> f64 {
    let text = app
        .client
        .get(app.url("/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics body");
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// A key with `cache_ttl_secs: 60`: the first request is a kept miss, the second an identical
/// answer with no upstream call, metered with the first's tokens at cost 0, nothing left
/// reserved against the key's budget.
#[tokio::test]
async fn a_hit_makes_no_upstream_call_and_costs_nothing() {
    let app = TestApp::spawn().await;
    let gw = setup(&app).await;
    let (key, key_id) = new_key(
        &app,
        &gw.user,
        json!({"name": "cached", "cache_ttl_secs": 60, "budget_usd": 5.0}),
    )
    .await;

    let first = chat(&app, &key, "hi", None).await;
    assert_eq!(first.status, 200, "{}", first.body);
    assert_eq!(first.cache(), Some("miss"));
    assert_eq!(upstream_calls(&gw), 1);
    // The miss reserved against the key's budget until its record was written.
    let in_use = || app.state.leases.held(Holder::Key, &key_id).1;
    let deadline = Instant::now() + Duration::from_secs(15);
    while in_use() != 0 {
        assert!(Instant::now() < deadline, "the miss's reservation stayed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let second = chat(&app, &key, "hi", None).await;
    assert_eq!(second.status, 200, "{}", second.body);
    assert_eq!(second.cache(), Some("hit"));
    assert_eq!(upstream_calls(&gw), 1, "a hit must not reach the upstream");
    assert_eq!(second.body, first.body, "the hit is the answer as it was");
    assert_eq!(
        second.json()["choices"][0]["message"]["content"],
        "Hello from mock"
    );
    assert_eq!(second.headers["x-tollgate-model"], "gpt-test");
    assert_eq!(second.headers["x-tollgate-attempts"], "0");
    assert_eq!(in_use(), 0, "a hit reserves nothing");
    assert!(
        second.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json")
    );

    // Another body is another key.
    let other = chat(&app, &key, "hello", None).await;
    assert_eq!(other.cache(), Some("miss"));
    assert_eq!(upstream_calls(&gw), 2);

    let records = wait_records(&app, &gw.user, 3).await;
    let hits: Vec<&Value> = records.iter().filter(|r| r["cache_hit"] == true).collect();
    assert_eq!(hits.len(), 1, "{records:?}");
    let hit = hits[0];
    assert_eq!(hit["cost_usd"].as_f64(), Some(0.0));
    assert_eq!(hit["prompt_tokens"], 11);
    assert_eq!(hit["completion_tokens"], 7);
    assert_eq!(hit["status"], 200);
    assert_eq!(hit["attempts"], 0);
    assert_eq!(hit["key_id"], key_id.as_str());
    assert_eq!(hit["model"], "gpt-test");
    for miss in records.iter().filter(|r| r["cache_hit"] == false) {
        assert!(miss["cost_usd"].as_f64().unwrap() > 0.0, "{miss}");
        assert_eq!(miss["attempts"], 1);
    }
    let miss_cost: f64 = records
        .iter()
        .map(|r| r["cost_usd"].as_f64().unwrap())
        .sum();

    // The key paid for the two misses only.
    let row = tollgate::store::gateway_keys::find_by_hash(
        &app.state.db,
        &tollgate::crypto::sha256_hex(&key),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(row.cache_ttl_secs, 60);
    let (s, k) = app
        .get(&format!("/api/keys/{key_id}"), Some(&gw.user))
        .await;
    assert_eq!(s, 200, "{k}");
    assert!(
        (k["spent_usd"].as_f64().unwrap() - miss_cost).abs() < 1e-12,
        "{k}"
    );
    assert_eq!(k["cache_ttl_secs"], 60);

    assert_eq!(metric(&app, "tollgate_cache_hits_total").await, 1.0);
    assert_eq!(metric(&app, "tollgate_cache_misses_total").await, 2.0);
}

/// Another user's identical request is a miss; the first user's still hits.
#[tokio::test]
async fn the_cache_is_scoped_to_the_user() {
    let app = TestApp::spawn().await;
    let gw = setup(&app).await;
    let bob = user_token(&app, "bob").await;
    let (s, b) = app
        .post(
            "/api/provider-keys",
            Some(&bob),
            json!({"provider": "mock", "api_key": PROVIDER_SECRET}),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    let (bob_key, _) = new_key(&app, &bob, json!({"name": "b"})).await;

    assert_eq!(
        chat(&app, &gw.key, "hi", Some("60")).await.cache(),
        Some("miss")
    );
    let theirs = chat(&app, &bob_key, "hi", Some("60")).await;
    assert_eq!(theirs.status, 200);
    assert_eq!(
        theirs.cache(),
        Some("miss"),
        "bob must not get alice's answer"
    );
    assert_eq!(upstream_calls(&gw), 2);
    assert_eq!(
        chat(&app, &gw.key, "hi", Some("60")).await.cache(),
        Some("hit")
    );
    assert_eq!(
        chat(&app, &bob_key, "hi", Some("60")).await.cache(),
        Some("hit")
    );
    assert_eq!(upstream_calls(&gw), 2);
}

/// `stream: true` is never served from the cache nor kept; the key's other endpoints are.
#[tokio::test]
async fn streams_are_never_cached() {
    let app = TestApp::spawn().await;
    let gw = setup(&app).await;
    let (key, _) = new_key(&app, &gw.user, json!({"name": "c", "cache_ttl_secs": 60})).await;
    let body = json!({"model": "gpt-test", "stream": true,
                      "messages": [{"role": "user", "content": "hi"}]});
    for _ in 0..2 {
        let a = send(&app, &key, "/v1/chat/completions", &body, Some("60")).await;
        assert_eq!(a.status, 200, "{}", a.body);
        assert_eq!(a.cache(), None);
        assert!(a.body.contains("data: [DONE]"), "{}", a.body);
    }
    assert_eq!(upstream_calls(&gw), 2);

    // Embeddings and completions are cached like chat.
    let e = json!({"model": "embed-test", "input": "hi"});
    assert_eq!(
        send(&app, &key, "/v1/embeddings", &e, None).await.cache(),
        Some("miss")
    );
    let again = send(&app, &key, "/v1/embeddings", &e, None).await;
    assert_eq!(again.cache(), Some("hit"));
    assert_eq!(again.json()["data"][0]["embedding"], json!([0.1, 0.2, 0.3]));
    assert_eq!(gw.mock.count("embed"), 1);
    let c = json!({"model": "text-test", "prompt": "hi"});
    assert_eq!(
        send(&app, &key, "/v1/completions", &c, None).await.cache(),
        Some("miss")
    );
    assert_eq!(
        send(&app, &key, "/v1/completions", &c, None).await.cache(),
        Some("hit")
    );
    // Same body, other endpoint: not the same request.
    let as_chat = send(&app, &key, "/v1/chat/completions", &c, None).await;
    assert_ne!(as_chat.cache(), Some("hit"));

    // Only 200s are kept.
    let bad = json!({"model": "gpt-400", "messages": [{"role": "user", "content": "hi"}]});
    for _ in 0..2 {
        let a = send(&app, &key, "/v1/chat/completions", &bad, None).await;
        assert_eq!(a.status, 400);
        assert_eq!(a.cache(), None);
    }
    assert_eq!(gw.mock.count("err400"), 2);
}

/// An answer is served only within the TTL; a request's own TTL bounds the age it takes.
#[tokio::test]
async fn entries_expire_with_their_ttl() {
    let app = TestApp::spawn().await;
    let gw = setup(&app).await;
    assert_eq!(
        chat(&app, &gw.key, "a", Some("1")).await.cache(),
        Some("miss")
    );
    assert_eq!(
        chat(&app, &gw.key, "a", Some("1")).await.cache(),
        Some("hit")
    );
    assert_eq!(
        chat(&app, &gw.key, "b", Some("60")).await.cache(),
        Some("miss")
    );
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(
        chat(&app, &gw.key, "a", Some("1")).await.cache(),
        Some("miss"),
        "expired after its 1 s"
    );
    // "b" lives 60 s, but a request allowing 1 s does not take a 1.2 s old answer …
    assert_eq!(
        chat(&app, &gw.key, "b", Some("1")).await.cache(),
        Some("miss")
    );
    // … and one allowing 60 s takes the newest.
    assert_eq!(
        chat(&app, &gw.key, "b", Some("60")).await.cache(),
        Some("hit")
    );
    assert_eq!(upstream_calls(&gw), 4);
    // No header and no key TTL: the cache is not used at all.
    let plain = chat(&app, &gw.key, "b", None).await;
    assert_eq!(plain.cache(), None);
    assert_eq!(upstream_calls(&gw), 5);
}

/// A TTL above `routing.max_cache_ttl_secs` is capped, not refused; a malformed header is a 400
/// before anything is sent; `0` turns a key's cache off for one request.
#[tokio::test]
async fn the_ttl_header_is_capped_and_checked() {
    let app = TestApp::spawn_with(|c| c.routing.max_cache_ttl_secs = 1).await;
    let gw = setup(&app).await;
    assert_eq!(
        chat(&app, &gw.key, "a", Some("86400")).await.cache(),
        Some("miss")
    );
    assert_eq!(
        chat(&app, &gw.key, "a", Some("86400")).await.cache(),
        Some("hit")
    );
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(
        chat(&app, &gw.key, "a", Some("86400")).await.cache(),
        Some("miss"),
        "kept 1 s (the cap), not a day"
    );
    assert_eq!(upstream_calls(&gw), 2);

    for bad in ["soon", "-5", "1.5"] {
        let a = chat(&app, &gw.key, "a", Some(bad)).await;
        assert_error(a.status, &a.json(), 400, "invalid_value");
        assert_eq!(a.json()["error"]["param"], TTL);
    }
    assert_eq!(
        upstream_calls(&gw),
        2,
        "a refused request reaches no upstream"
    );

    let (key, _) = new_key(&app, &gw.user, json!({"name": "c", "cache_ttl_secs": 600})).await;
    assert_eq!(chat(&app, &key, "z", None).await.cache(), Some("miss"));
    assert_eq!(chat(&app, &key, "z", Some("0")).await.cache(), None);
    assert_eq!(chat(&app, &key, "z", None).await.cache(), Some("hit"));
    assert_eq!(upstream_calls(&gw), 4);
}

/// An answer above `routing.cache_max_entry_bytes` is not kept.
#[tokio::test]
async fn an_oversize_answer_is_not_cached() {
    let app = TestApp::spawn_with(|c| c.routing.cache_max_entry_bytes = 64).await;
    let gw = setup(&app).await;
    for _ in 0..2 {
        let a = chat(&app, &gw.key, "hi", Some("60")).await;
        assert_eq!(a.status, 200);
        assert!(a.body.len() > 64);
        assert_eq!(a.cache(), None, "not kept, so not a miss that was stored");
    }
    assert_eq!(upstream_calls(&gw), 2);
    assert_eq!(app.state.responses.local_entries(), 0);
    // A small answer (an embedding) still fits.
    let app2 = TestApp::spawn_with(|c| c.routing.cache_max_entry_bytes = 4096).await;
    let gw2 = setup(&app2).await;
    assert_eq!(
        chat(&app2, &gw2.key, "hi", Some("60")).await.cache(),
        Some("miss")
    );
    assert_eq!(app2.state.responses.local_entries(), 1);
}

/// Rate limits still apply to a hit.
#[tokio::test]
async fn admission_applies_to_hits() {
    let app = TestApp::spawn().await;
    let gw = setup(&app).await;
    let (key, _) = new_key(
        &app,
        &gw.user,
        json!({"name": "c", "cache_ttl_secs": 60, "rpm_limit": 2}),
    )
    .await;
    assert_eq!(chat(&app, &key, "hi", None).await.cache(), Some("miss"));
    assert_eq!(chat(&app, &key, "hi", None).await.cache(), Some("hit"));
    let third = chat(&app, &key, "hi", None).await;
    assert_eq!(third.status, 429, "{}", third.body);
    assert_eq!(third.cache(), None);
    // A model the key may not use is refused though its answer is cached for another key.
    let (narrow, _) = new_key(
        &app,
        &gw.user,
        json!({"name": "n", "cache_ttl_secs": 60, "allowed_models": ["embed-test"]}),
    )
    .await;
    let refused = chat(&app, &narrow, "hi", None).await;
    assert_eq!(refused.status, 403, "{}", refused.body);
    assert_eq!(upstream_calls(&gw), 1);
}

/// `cache_ttl_secs` on the key: set at create, changed and cleared by PATCH, checked.
#[tokio::test]
async fn the_key_field_is_validated_and_editable() {
    let app = TestApp::spawn().await;
    let gw = setup(&app).await;
    let (s, b) = app
        .post(
            "/api/keys",
            Some(&gw.user),
            json!({"name": "x", "cache_ttl_secs": -1}),
        )
        .await;
    assert_error(s, &b, 400, "invalid_value");
    let (s, b) = app
        .get(&format!("/api/keys/{}", gw.key_id), Some(&gw.user))
        .await;
    assert_eq!(s, 200);
    assert_eq!(b["cache_ttl_secs"], 0);

    let path = format!("/api/keys/{}", gw.key_id);
    let (s, b) = app
        .patch(&path, Some(&gw.user), json!({"cache_ttl_secs": 30}))
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["cache_ttl_secs"], 30);
    // Takes effect on the next request (the key's cache entry was invalidated).
    assert_eq!(chat(&app, &gw.key, "q", None).await.cache(), Some("miss"));
    assert_eq!(chat(&app, &gw.key, "q", None).await.cache(), Some("hit"));
    let (s, b) = app
        .patch(&path, Some(&gw.user), json!({"cache_ttl_secs": "x"}))
        .await;
    assert_eq!(s, 400, "{b}");
    let (s, b) = app
        .patch(&path, Some(&gw.user), json!({"cache_ttl_secs": null}))
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["cache_ttl_secs"], 0);
    assert_eq!(chat(&app, &gw.key, "q", None).await.cache(), None);
}

/// Two replicas on one Redis: the answer one kept is the other's hit, with no upstream call.
#[tokio::test]
async fn a_miss_kept_by_one_replica_is_a_hit_on_the_other() {
    let Some(url) = std::env::var("TOLLGATE_TEST_REDIS_URL")
        .ok()
        .filter(|u| !u.trim().is_empty())
    else {
        eprintln!(
            "a_miss_kept_by_one_replica_is_a_hit_on_the_other: skipped: set TOLLGATE_TEST_REDIS_URL=redis://127.0.0.1:6379 to run it"
        );
        return;
    };
    let prefix = format!("tgtest:{}:", uuid::Uuid::new_v4().simple());
    let with_redis = |c: &mut tollgate::config::Config| {
        c.redis.url = Some(SecretString::from(url.trim().to_owned()));
        c.redis.key_prefix = prefix.clone();
    };
    let a = TestApp::spawn_with(with_redis).await;
    let b = TestApp::spawn_on(a.db.clone(), with_redis).await;
    let gw = setup(&a).await;

    let first = chat(&a, &gw.key, "shared", Some("60")).await;
    assert_eq!(first.status, 200, "{}", first.body);
    assert_eq!(first.cache(), Some("miss"));
    let other = chat(&b, &gw.key, "shared", Some("60")).await;
    assert_eq!(other.status, 200, "{}", other.body);
    assert_eq!(other.cache(), Some("hit"), "replica b must find a's answer");
    assert_eq!(other.body, first.body);
    assert_eq!(upstream_calls(&gw), 1);
    // Now held by b itself too.
    assert_eq!(b.state.responses.local_entries(), 1);

    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let records = wait_records(&a, &gw.user, 2).await;
        if let Some(hit) = records.iter().find(|r| r["cache_hit"] == true) {
            assert_eq!(hit["cost_usd"].as_f64(), Some(0.0));
            assert_eq!(hit["completion_tokens"], 7);
            break;
        }
        assert!(Instant::now() < deadline, "no hit record: {records:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        metric(&b, "tollgate_redis_errors_total{op=\"cache\"}").await,
        0.0
    );
}

/// Redis unreachable: the cache is a miss (or a local hit), never an error.
#[tokio::test]
async fn redis_down_is_a_miss_not_an_error() {
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let app = TestApp::spawn_with(|c| {
        c.redis.url = Some(SecretString::from(format!("redis://{closed}")));
    })
    .await;
    let gw = setup(&app).await;
    let first = chat(&app, &gw.key, "hi", Some("60")).await;
    assert_eq!(first.status, 200, "{}", first.body);
    assert_eq!(first.cache(), Some("miss"));
    let second = chat(&app, &gw.key, "hi", Some("60")).await;
    assert_eq!(second.status, 200);
    assert_eq!(second.cache(), Some("hit"), "the local copy still serves");
    assert_eq!(upstream_calls(&gw), 1);
    let link = app.state.cluster.redis.as_ref().expect("redis link");
    assert!(link.is_down(), "the link knows Redis is down");
}

/// A hit held by this replica is found from the request's bytes before they are parsed again:
/// the same bytes are a hit (admitted and metered with what the request asked), other bytes
/// meaning the same are a miss, and an entry that does not say what its request asked (one a
/// replica of an earlier version shared through Redis) is served the usual way, after parsing.
#[tokio::test]
async fn a_hit_is_found_from_the_bytes_and_metered_with_what_they_asked() {
    let app = TestApp::spawn().await;
    let gw = setup(&app).await;
    let (key, _) = new_key(&app, &gw.user, json!({"name": "c", "cache_ttl_secs": 60})).await;
    let raw = |body: &'static str| {
        app.client
            .post(app.url("/v1/chat/completions"))
            .bearer_auth(&key)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    const BODY: &str = r#"{"model":"gpt-test","max_tokens":5,"n":2,"messages":[{"role":"user","content":"bytes"}]}"#;
    const SPACED: &str = r#"{"model": "gpt-test","max_tokens":5,"n":2,"messages":[{"role":"user","content":"bytes"}]}"#;
    let first = raw(BODY).await.expect("send");
    assert_eq!(first.headers()["x-tollgate-cache"], "miss");
    let first = first.text().await.expect("body");
    let second = raw(BODY).await.expect("send");
    assert_eq!(second.status(), 200);
    assert_eq!(second.headers()["x-tollgate-cache"], "hit");
    assert_eq!(second.headers()["x-tollgate-model"], "gpt-test");
    assert_eq!(second.text().await.expect("body"), first);
    let spaced = raw(SPACED).await.expect("send");
    assert_eq!(spaced.headers()["x-tollgate-cache"], "miss", "other bytes");
    assert_eq!(upstream_calls(&gw), 2);
    assert_eq!(metric(&app, "tollgate_cache_hits_total").await, 1.0);
    assert_eq!(metric(&app, "tollgate_cache_misses_total").await, 2.0);

    // The hit's record: the model the client named, the answer's tokens, cost 0, and its
    // token bounds from what the request asked (max_tokens 5 × n 2 leaves the mock's 7).
    let records = wait_records(&app, &gw.user, 3).await;
    let miss = records
        .iter()
        .find(|r| r["cache_hit"] == false && r["request_id"].is_string())
        .expect("a miss");
    let hit = records
        .iter()
        .find(|r| r["cache_hit"] == true)
        .expect("the hit");
    assert_eq!(hit["model"], "gpt-test", "{hit}");
    assert_eq!(hit["cost_usd"].as_f64(), Some(0.0));
    assert_eq!(hit["attempts"], 0);
    for field in ["prompt_tokens", "completion_tokens"] {
        assert_eq!(hit[field], miss[field], "{field}: {hit} vs {miss}");
    }

    // An entry that does not say what its request asked: still a hit, after parsing.
    let (s, me) = app.get("/api/me", Some(&gw.user)).await;
    assert_eq!(s, 200);
    const OLD: &str =
        r#"{"model":"gpt-test","messages":[{"role":"user","content":"from an older replica"}]}"#;
    let k = tollgate::routing::cache::CacheKey::of(
        me["id"].as_str().expect("id"),
        tollgate::providers::Endpoint::ChatCompletions,
        "",
        OLD.as_bytes(),
    );
    let now = tollgate::routing::cache::now_ms();
    let kept = app
        .state
        .responses
        .put(
            k,
            tollgate::routing::cache::CachedAnswer {
                body: bytes::Bytes::from_static(
                    br#"{"id":"old","object":"chat.completion","choices":[]}"#,
                ),
                content_type: None,
                model: "gpt-test".into(),
                provider: "mock".into(),
                usage: None,
                stored_ms: now,
                expires_ms: now + 60_000,
                asked: None,
            },
        )
        .await;
    assert!(kept);
    let old = raw(OLD).await.expect("send");
    assert_eq!(old.headers()["x-tollgate-cache"], "hit");
    assert_eq!(
        old.text().await.expect("body"),
        r#"{"id":"old","object":"chat.completion","choices":[]}"#
    );
    assert_eq!(upstream_calls(&gw), 2, "no upstream call for either hit");
    assert_eq!(metric(&app, "tollgate_cache_hits_total").await, 2.0);
}
