//! The hot path end to end: the real app, a mock upstream, real HTTP on loopback. Each test
//! asserts what the client got, what the upstream received, and what was metered.

mod common;

use std::time::Duration;

use common::gateway::{PROVIDER_SECRET, new_key, setup, wait_records};
use common::{TestApp, assert_error};
use futures_util::StreamExt;
use serde_json::{Value, json};

async fn chat(app: &TestApp, key: &str, body: Value) -> reqwest::Response {
    app.client
        .post(app.url("/v1/chat/completions"))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .expect("send")
}

/// `data:` payloads of an SSE body.
fn sse_data(text: &str) -> Vec<String> {
    text.split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn non_stream_swaps_key_and_model_and_meters() {
    let app = TestApp::spawn().await;
    let gw = setup(&app).await;
    let r = chat(&app, &gw.key, json!({"model": "gpt-cached", "messages": [{"role": "user", "content": "hi"}], "temperature": 0.3, "x_unknown": {"a": 1}})).await;
    assert_eq!(r.status(), 200);
    let request_id = r.headers()["x-request-id"].to_str().unwrap().to_owned();
    let body: Value = r.json().await.unwrap();
    assert_eq!(
        body["model"], "gpt-cached",
        "model reported as the client's name"
    );
    assert_eq!(body["choices"][0]["message"]["content"], "Hello from mock");
    assert_eq!(body["usage"]["prompt_tokens"], 11);

    let up = gw.mock.last();
    assert_eq!(up.path, "/v1/chat/completions");
    assert_eq!(
        up.headers["authorization"],
        format!("Bearer {PROVIDER_SECRET}")
    );
    assert!(
        !format!("{:?}", up.headers).contains(&gw.key),
        "the gateway key must never reach the upstream"
    );
    assert_eq!(up.body["model"], "cached");
    assert_eq!(up.body["temperature"], 0.3);
    assert_eq!(up.body["x_unknown"]["a"], 1, "unknown fields pass through");
    assert!(up.body.get("stream_options").is_none());

    let recs = wait_records(&app, &gw.user, 1).await;
    let rec = &recs[0];
    assert_eq!(rec["model"], "gpt-cached");
    assert_eq!(rec["provider"], "mock");
    assert_eq!(rec["endpoint"], "chat.completions");
    assert_eq!(rec["status"], 200);
    assert_eq!(rec["stream"], false);
    assert_eq!(
        (
            rec["prompt_tokens"].as_i64(),
            rec["completion_tokens"].as_i64(),
            rec["cached_tokens"].as_i64()
        ),
        (Some(11), Some(7), Some(4))
    );
    assert_eq!(rec["tokens_estimated"], false);
    assert_eq!(rec["request_id"], request_id.as_str());
    assert_eq!(rec["key_id"], gw.key_id.as_str());
    // (11-4) × $1 + 4 × $0.5 + 7 × $2 per 1M = 7 + 2 + 14 = 23 µ$ = 0.000023
    assert!(
        (rec["cost_usd"].as_f64().unwrap() - 0.000023).abs() < 1e-12,
        "{rec}"
    );
}

#[tokio::test]
async fn stream_hides_usage_unless_asked_and_meters_it() {
    let app = TestApp::spawn().await;
    let gw = setup(&app).await;
    let r = chat(&app, &gw.key, json!({"model": "gpt-test", "stream": true, "messages": [{"role": "user", "content": "hi"}]})).await;
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let text = r.text().await.unwrap();
    let data = sse_data(&text);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = data
        .iter()
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert_eq!(chunks.len(), 3, "the usage-only chunk is removed: {text}");
    assert!(
        chunks
            .iter()
            .all(|c| c.get("usage").is_none() && c["model"] == "gpt-test"),
        "{text}"
    );
    let content: String = chunks
        .iter()
        .map(|c| c["choices"][0]["delta"]["content"].as_str().unwrap())
        .collect();
    assert_eq!(content, "Hello from mock");
    let up = gw.mock.last();
    assert_eq!(
        up.body["stream_options"]["include_usage"], true,
        "the gateway always asks for usage"
    );
    assert_eq!(up.body["model"], "normal");

    let recs = wait_records(&app, &gw.user, 1).await;
    assert_eq!(recs[0]["stream"], true);
    assert_eq!(recs[0]["prompt_tokens"], 11);
    assert_eq!(recs[0]["completion_tokens"], 7);
    assert_eq!(recs[0]["tokens_estimated"], false);
    assert!(recs[0]["ttft_ms"].is_i64());

    // Asked for usage: it is there.
    let r = chat(&app, &gw.key, json!({"model": "gpt-test", "stream": true, "stream_options": {"include_usage": true}, "messages": []})).await;
    let text = r.text().await.unwrap();
    let usage_chunk = sse_data(&text)
        .into_iter()
        .filter(|d| d != "[DONE]")
        .map(|d| serde_json::from_str::<Value>(&d).unwrap())
        .find(|c| c["usage"].is_object());
    assert_eq!(
        usage_chunk.expect("usage chunk")["usage"]["completion_tokens"],
        7
    );
}

#[tokio::test]
async fn no_usage_from_upstream_is_estimated() {
    let app = TestApp::spawn().await;
    let gw = setup(&app).await;
    let r = chat(&app, &gw.key, json!({"model": "gpt-nousage", "stream": true, "messages": [{"role": "user", "content": "Say hello to the mock upstream please"}]})).await;
    assert_eq!(r.status(), 200);
    r.text().await.unwrap();
    let r = chat(
        &app,
        &gw.key,
        json!({"model": "gpt-nousage", "messages": [{"role": "user", "content": "hello"}]}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let recs = wait_records(&app, &gw.user, 2).await;
    for rec in &recs {
        assert_eq!(rec["tokens_estimated"], true, "{rec}");
        assert!(rec["prompt_tokens"].as_i64().unwrap() > 3, "{rec}");
        // "Hello from mock" is 3 tokens.
        assert_eq!(rec["completion_tokens"], 3, "{rec}");
        assert!(rec["cost_usd"].as_f64().unwrap() > 0.0);
    }
}

#[tokio::test]
async fn upstream_errors_pass_through_and_are_metered() {
    let app = TestApp::spawn().await;
    let gw = setup(&app).await;
    let r = chat(&app, &gw.key, json!({"model": "gpt-400", "messages": []})).await;
    assert_eq!(r.status(), 400);
    let b: Value = r.json().await.unwrap();
    assert_eq!(b["error"]["code"], "upstream_says_no");
    let r = chat(&app, &gw.key, json!({"model": "gpt-500", "messages": []})).await;
    assert_eq!(r.status(), 500);
    let b: Value = r.json().await.unwrap();
    assert_eq!(b["error"]["message"], "boom");
    let recs = wait_records(&app, &gw.user, 2).await;
    let mut statuses: Vec<i64> = recs.iter().map(|r| r["status"].as_i64().unwrap()).collect();
    statuses.sort();
    assert_eq!(statuses, vec![400, 500]);
}

#[tokio::test]
async fn upstream_cut_mid_stream_ends_with_error_event_and_gateway_stays_healthy() {
    let app = TestApp::spawn().await;
    let gw = setup(&app).await;
    let r = chat(
        &app,
        &gw.key,
        json!({"model": "gpt-cut", "stream": true, "messages": []}),
    )
    .await;
    let status = r.status();
    let text = r.text().await.unwrap();
    assert_eq!(status, 200, "{text}");
    let data = sse_data(&text);
    let last: Value = serde_json::from_str(data.last().unwrap()).unwrap();
    assert_eq!(last["error"]["type"], "upstream_error", "{text}");
    assert!(
        text.contains("Hello"),
        "what was produced reached the client: {text}"
    );
    let recs = wait_records(&app, &gw.user, 1).await;
    assert_eq!(recs[0]["status"], 502);
    assert!(
        recs[0]["completion_tokens"].as_i64().unwrap() >= 1,
        "metered what was produced: {}",
        recs[0]
    );
    // Still serving.
    let r = chat(&app, &gw.key, json!({"model": "gpt-test", "messages": []})).await;
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn client_hang_up_cancels_upstream_and_is_metered() {
    let app = TestApp::spawn().await;
    let gw = setup(&app).await;
    let r = chat(
        &app,
        &gw.key,
        json!({"model": "gpt-slow", "stream": true, "messages": []}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let mut s = r.bytes_stream();
    let first = s.next().await.expect("a first chunk").unwrap();
    assert!(!first.is_empty());
    drop(s);
    let recs = wait_records(&app, &gw.user, 1).await;
    assert_eq!(recs[0]["status"], 499, "{}", recs[0]);
    assert!(recs[0]["completion_tokens"].as_i64().unwrap() >= 1);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while gw.mock.cancelled() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the upstream stream was never cancelled"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn completions_and_embeddings() {
    let app = TestApp::spawn().await;
    let gw = setup(&app).await;
    let r = app
        .client
        .post(app.url("/v1/completions"))
        .bearer_auth(&gw.key)
        .json(&json!({"model": "text-test", "prompt": "Say"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let b: Value = r.json().await.unwrap();
    assert_eq!(b["choices"][0]["text"], "Hello from mock");
    assert_eq!(gw.mock.last().path, "/v1/completions");
    let r = app
        .client
        .post(app.url("/v1/embeddings"))
        .header("api-key", &gw.key)
        .json(&json!({"model": "embed-test", "input": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "api-key header works");
    let b: Value = r.json().await.unwrap();
    assert_eq!(b["data"][0]["embedding"][2], 0.3);
    assert_eq!(b["model"], "embed-test");
    assert_eq!(gw.mock.last().path, "/v1/embeddings");
    // A chat model on the embeddings route is refused before going upstream.
    let n = gw.mock.requests().len();
    let r = app
        .client
        .post(app.url("/v1/embeddings"))
        .bearer_auth(&gw.key)
        .json(&json!({"model": "gpt-test", "input": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(gw.mock.requests().len(), n);
    let recs = wait_records(&app, &gw.user, 2).await;
    let mut endpoints: Vec<&str> = recs
        .iter()
        .map(|r| r["endpoint"].as_str().unwrap())
        .collect();
    endpoints.sort();
    assert_eq!(endpoints, vec!["completions", "embeddings"]);
}

#[tokio::test]
async fn admission_errors() {
    let app = TestApp::spawn_with(|c| c.server.max_body_bytes = 4096).await;
    let gw = setup(&app).await;
    let msgs = json!([{"role": "user", "content": "hi"}]);
    // No key, wrong key, access token instead of a gateway key.
    let r = app
        .client
        .post(app.url("/v1/chat/completions"))
        .json(&json!({"model": "gpt-test"}))
        .send()
        .await
        .unwrap();
    let s = r.status().as_u16();
    assert_error(s, &r.json().await.unwrap(), 401, "invalid_api_key");
    for bad in [
        "sk-tg-0000000000000000000000000000000000000000000000",
        gw.user.as_str(),
    ] {
        let r = chat(&app, bad, json!({"model": "gpt-test", "messages": msgs})).await;
        let s = r.status().as_u16();
        let b: Value = r.json().await.unwrap();
        assert_error(s, &b, 401, "invalid_api_key");
        assert!(
            !b.to_string().contains(&bad[8..30]),
            "the presented key is masked in errors"
        );
    }
    // The gateway key is not accepted on the management API.
    let (s, b) = app.get("/api/me", Some(&gw.key)).await;
    assert_eq!(s, 401, "{b}");
    // Bad JSON, missing model, unknown model, too large.
    let r = app
        .client
        .post(app.url("/v1/chat/completions"))
        .bearer_auth(&gw.key)
        .header("content-type", "application/json")
        .body("{nope")
        .send()
        .await
        .unwrap();
    let s = r.status().as_u16();
    assert_error(s, &r.json().await.unwrap(), 400, "invalid_json");
    let r = chat(&app, &gw.key, json!({"messages": msgs})).await;
    let s = r.status().as_u16();
    assert_error(s, &r.json().await.unwrap(), 400, "missing_field");
    let r = chat(&app, &gw.key, json!({"model": "nope", "messages": msgs})).await;
    let s = r.status().as_u16();
    assert_error(s, &r.json().await.unwrap(), 404, "model_not_found");
    let r = chat(
        &app,
        &gw.key,
        json!({"model": "gpt-test", "messages": [{"role": "user", "content": "x".repeat(5000)}]}),
    )
    .await;
    let s = r.status().as_u16();
    assert_error(s, &r.json().await.unwrap(), 413, "payload_too_large");
    // Model and IP allow-lists.
    let (k2, _) = new_key(
        &app,
        &gw.user,
        json!({"name": "only-embed", "allowed_models": ["embed-test"]}),
    )
    .await;
    let r = chat(&app, &k2, json!({"model": "gpt-test", "messages": msgs})).await;
    let s = r.status().as_u16();
    assert_error(s, &r.json().await.unwrap(), 403, "model_not_allowed");
    let (k3, _) = new_key(
        &app,
        &gw.user,
        json!({"name": "far-away", "allowed_ips": ["10.9.9.0/24"]}),
    )
    .await;
    let r = chat(&app, &k3, json!({"model": "gpt-test", "messages": msgs})).await;
    let s = r.status().as_u16();
    assert_error(s, &r.json().await.unwrap(), 403, "ip_not_allowed");
    // A user without a provider key.
    let bob = common::accounts::user_token(&app, "bob").await;
    let (kb, _) = new_key(&app, &bob, json!({"name": "bob"})).await;
    let r = chat(&app, &kb, json!({"model": "gpt-test", "messages": msgs})).await;
    let s = r.status().as_u16();
    assert_error(s, &r.json().await.unwrap(), 400, "provider_key_missing");
    // None of those reached the upstream or wrote usage.
    assert!(gw.mock.requests().is_empty());
    let (_, b) = app.get("/api/me/usage/records", Some(&gw.user)).await;
    assert_eq!(b["total"], 0);
}

#[tokio::test]
async fn rate_limit_headers_and_429() {
    let app = TestApp::spawn().await;
    let gw = setup(&app).await;
    let (key, _) = new_key(&app, &gw.user, json!({"name": "limited", "rpm_limit": 3})).await;
    for i in 0..3 {
        let r = chat(&app, &key, json!({"model": "gpt-test", "messages": []})).await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-ratelimit-limit-requests"], "3");
        assert_eq!(
            r.headers()["x-ratelimit-remaining-requests"],
            (2 - i).to_string().as_str()
        );
        assert!(r.headers().contains_key("x-ratelimit-reset-requests"));
    }
    let r = chat(&app, &key, json!({"model": "gpt-test", "messages": []})).await;
    assert_eq!(r.status(), 429);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=20).contains(&retry), "retry-after {retry}");
    assert_eq!(r.headers()["x-ratelimit-remaining-requests"], "0");
    let s = r.status().as_u16();
    assert_error(s, &r.json().await.unwrap(), 429, "rate_limit_exceeded");
    let recs = wait_records(&app, &gw.user, 3).await;
    assert_eq!(recs.len(), 3, "the refused request was not metered");
    // Unlimited key: no rate headers at all.
    let r = chat(&app, &gw.key, json!({"model": "gpt-test", "messages": []})).await;
    assert!(!r.headers().contains_key("x-ratelimit-limit-requests"));
}

#[tokio::test]
async fn revoked_key_is_refused_on_the_next_request() {
    let app = TestApp::spawn().await;
    let gw = setup(&app).await;
    let r = chat(&app, &gw.key, json!({"model": "gpt-test", "messages": []})).await;
    assert_eq!(r.status(), 200);
    let (s, b) = app
        .post(
            &format!("/api/keys/{}/toggle", gw.key_id),
            Some(&gw.user),
            json!({}),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["is_active"], false);
    let r = chat(&app, &gw.key, json!({"model": "gpt-test", "messages": []})).await;
    assert_eq!(r.status(), 401);
    // Rotation kills the old secret at once.
    let (key, id) = new_key(&app, &gw.user, json!({"name": "rot"})).await;
    assert_eq!(
        chat(&app, &key, json!({"model": "gpt-test", "messages": []}))
            .await
            .status(),
        200
    );
    let (s, b) = app
        .post(&format!("/api/keys/{id}/rotate"), Some(&gw.user), json!({}))
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(
        chat(&app, &key, json!({"model": "gpt-test", "messages": []}))
            .await
            .status(),
        401
    );
    let new = b["key"].as_str().unwrap();
    assert_eq!(
        chat(&app, new, json!({"model": "gpt-test", "messages": []}))
            .await
            .status(),
        200
    );
    // A disabled model stops being served at once.
    let (_, models) = app.get("/api/models", None).await;
    let id = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "gpt-test")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (s, _) = app
        .post(
            &format!("/api/admin/models/{id}/toggle"),
            Some(&gw.admin),
            json!({}),
        )
        .await;
    assert_eq!(s, 200);
    assert_eq!(
        chat(&app, new, json!({"model": "gpt-test", "messages": []}))
            .await
            .status(),
        404
    );
}

#[tokio::test]
async fn v1_models_lists_what_the_key_may_use() {
    let app = TestApp::spawn().await;
    let gw = setup(&app).await;
    let r = app
        .client
        .get(app.url("/v1/models"))
        .bearer_auth(&gw.key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let b: Value = r.json().await.unwrap();
    assert_eq!(b["object"], "list");
    let ids: Vec<&str> = b["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert!(
        ids.contains(&"gpt-test") && ids.contains(&"embed-test"),
        "{ids:?}"
    );
    assert_eq!(b["data"][0]["object"], "model");
    let (k, _) = new_key(
        &app,
        &gw.user,
        json!({"name": "one", "allowed_models": ["gpt-test"]}),
    )
    .await;
    let b: Value = app
        .client
        .get(app.url("/v1/models"))
        .bearer_auth(&k)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(b["data"].as_array().unwrap().len(), 1);
    let r = app
        .client
        .get(app.url("/v1/models/gpt-test"))
        .bearer_auth(&k)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = app
        .client
        .get(app.url("/v1/models/embed-test"))
        .bearer_auth(&k)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

#[tokio::test]
async fn upstream_timeout_and_unreachable() {
    let app = TestApp::spawn_with(|c| c.upstream.first_byte_timeout_secs = 1).await;
    let gw = setup(&app).await;
    let r = chat(&app, &gw.key, json!({"model": "gpt-hang", "messages": []})).await;
    let s = r.status().as_u16();
    assert_error(s, &r.json().await.unwrap(), 504, "upstream_timeout");
    // A provider on a closed port.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let (s, b) = app.post("/api/admin/providers", Some(&gw.admin), json!({"key": "dead", "display_name": "Dead", "base_url": format!("http://{closed}/v1")})).await;
    assert_eq!(s, 201, "{b}");
    let (s, b) = app
        .post(
            "/api/admin/models",
            Some(&gw.admin),
            json!({"name": "dead-model", "provider": "dead"}),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    let (s, b) = app
        .post(
            "/api/provider-keys",
            Some(&gw.user),
            json!({"provider": "dead", "api_key": "sk-dead-0000000000"}),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    let r = chat(
        &app,
        &gw.key,
        json!({"model": "dead-model", "messages": []}),
    )
    .await;
    let s = r.status().as_u16();
    assert_error(s, &r.json().await.unwrap(), 502, "upstream_unreachable");
    let recs = wait_records(&app, &gw.user, 2).await;
    let mut statuses: Vec<i64> = recs.iter().map(|r| r["status"].as_i64().unwrap()).collect();
    statuses.sort();
    assert_eq!(statuses, vec![502, 504]);
}

#[tokio::test]
async fn two_hundred_concurrent_streams_are_all_metered() {
    let app = TestApp::spawn().await;
    let gw = setup(&app).await;
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let client = app.client.clone();
        let url = app.url("/v1/chat/completions");
        let key = gw.key.clone();
        tasks.push(tokio::spawn(async move {
            let r = client
                .post(url)
                .bearer_auth(key)
                .json(&json!({"model": "gpt-test", "stream": true, "messages": []}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            let text = r.text().await.unwrap();
            assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let recs = wait_records(&app, &gw.user, 200).await;
    assert!(recs.len() <= 100, "paged");
    let (_, b) = app
        .get("/api/me/usage/records?per_page=1", Some(&gw.user))
        .await;
    assert_eq!(b["total"], 200);
    let (_, key) = app
        .get(&format!("/api/keys/{}", gw.key_id), Some(&gw.user))
        .await;
    // 200 × (11 × $1 + 7 × $2) / 1M = 200 × 25 µ$ = $0.005
    assert!(
        (key["spent_usd"].as_f64().unwrap() - 0.005).abs() < 1e-9,
        "{key}"
    );
    assert!(key["last_used_at"].is_string());
}

#[tokio::test]
async fn shutdown_during_a_burst_meters_every_answered_request_once() {
    let app = TestApp::spawn().await;
    let gw = setup(&app).await;
    let db = app.db.clone();
    let mut tasks = Vec::new();
    for i in 0..300 {
        let client = app.client.clone();
        let url = app.url("/v1/chat/completions");
        let key = gw.key.clone();
        tasks.push(tokio::spawn(async move {
            let rid = format!("burst-{i}");
            let model = if i % 3 == 0 { "gpt-slow" } else { "gpt-test" };
            let r = client
                .post(url)
                .bearer_auth(key)
                .header("x-request-id", &rid)
                .json(&json!({"model": model, "stream": i % 2 == 0, "messages": []}))
                .send()
                .await;
            match r {
                Ok(r) if r.status() == 200 => match r.text().await {
                    Ok(t) if t.contains("[DONE]") || t.contains("\"choices\"") => Some(rid),
                    _ => None,
                },
                _ => None,
            }
        }));
        if i == 150 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let state = app.state.clone();
    app.stop().await;
    let mut answered = Vec::new();
    for t in tasks {
        if let Some(rid) = t.await.unwrap() {
            answered.push(rid);
        }
    }
    drop(state);
    assert!(!answered.is_empty());
    // Restart on the same database and count.
    let app2 = TestApp::spawn_on(db, |_| {}).await;
    let user = common::accounts::user_token(&app2, "alice").await;
    let mut seen = std::collections::HashMap::new();
    let mut page = 1;
    loop {
        let (s, b) = app2
            .get(
                &format!("/api/me/usage/records?per_page=100&page={page}"),
                Some(&user),
            )
            .await;
        assert_eq!(s, 200);
        let data = b["data"].as_array().unwrap();
        if data.is_empty() {
            break;
        }
        for r in data {
            *seen
                .entry(r["request_id"].as_str().unwrap().to_owned())
                .or_insert(0) += 1;
        }
        page += 1;
    }
    for rid in &answered {
        assert_eq!(
            seen.get(rid),
            Some(&1),
            "answered request {rid} must have exactly one usage record"
        );
    }
    assert!(
        seen.values().all(|&n| n == 1),
        "no request is metered twice"
    );
}

#[tokio::test]
async fn runtime_default_key_rpm_applies_at_once() {
    let app = TestApp::spawn().await;
    let gw = setup(&app).await;
    assert_eq!(
        chat(&app, &gw.key, json!({"model": "gpt-test", "messages": []}))
            .await
            .status(),
        200
    );
    let (s, b) = app
        .put(
            "/api/admin/settings/default_key_rpm",
            Some(&gw.admin),
            json!({"value": 2}),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    let (key, _) = new_key(&app, &gw.user, json!({"name": "defaults"})).await;
    let statuses: Vec<u16> = futures_util::future::join_all((0..3).map(|_| async {
        chat(&app, &key, json!({"model": "gpt-test", "messages": []}))
            .await
            .status()
            .as_u16()
    }))
    .await;
    let mut sorted = statuses.clone();
    sorted.sort();
    assert_eq!(sorted, vec![200, 200, 429], "{statuses:?}");
}

/// The proxied routes skip the router unless CORS is configured; either way a request id is
/// echoed (or generated, time-ordered), sent upstream, and the same id comes back.
#[tokio::test]
async fn request_id_on_v1_with_and_without_the_router() {
    for cors in [false, true] {
        let app = TestApp::spawn_with(|c| {
            if cors {
                c.server.cors_origins = vec!["https://app.example".into()];
            }
        })
        .await;
        let gw = setup(&app).await;
        let body = json!({"model": "gpt-cached", "messages": [{"role": "user", "content": "hi"}]});
        let r = app
            .client
            .post(app.url("/v1/chat/completions"))
            .bearer_auth(&gw.key)
            .header("x-request-id", "mine-7")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "cors={cors}");
        assert_eq!(r.headers()["x-request-id"], "mine-7", "cors={cors}");
        assert_eq!(gw.mock.last().headers["x-request-id"], "mine-7");

        let r = chat(&app, &gw.key, body).await;
        assert_eq!(r.status(), 200);
        let id = r.headers()["x-request-id"].to_str().unwrap().to_owned();
        let uuid = uuid::Uuid::parse_str(&id).expect("a UUID");
        assert_eq!(uuid.get_version_num(), 7, "cors={cors}: {id}");
        assert_eq!(gw.mock.last().headers["x-request-id"], id.as_str());

        // Methods other than POST still get the router's answer (GET is the stored
        // completions' list since API.md §9; PUT is no route).
        let r = app
            .client
            .put(app.url("/v1/chat/completions"))
            .bearer_auth(&gw.key)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 405, "cors={cors}");
        assert!(r.headers().contains_key("x-request-id"));
    }
}

#[tokio::test]
async fn a_private_literal_base_url_saved_while_allowed_is_refused_once_the_switch_is_off() {
    let app = TestApp::spawn_with(|c| c.security.allow_private_base_urls = true).await;
    let gw = setup(&app).await;
    // The user's own base URL: a second upstream on an IP literal (127.0.0.1:port).
    let own = common::mock::Mock::start().await;
    let (_, list) = app.get("/api/provider-keys", Some(&gw.user)).await;
    let id = list["data"][0]["id"].as_str().expect("provider key id");
    let (s, b) = app
        .patch(
            &format!("/api/provider-keys/{id}"),
            Some(&gw.user),
            json!({"base_url": own.base_url()}),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    let body = json!({"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]});
    let r = chat(&app, &gw.key, body.clone()).await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        own.requests().len(),
        1,
        "allowed: the user's upstream is used"
    );
    let db = app.db.clone();
    app.stop().await;

    // The same database, the switch now off: the literal is refused at connect time.
    let app = TestApp::spawn_on(db, |_| {}).await;
    for _ in 0..2 {
        let r = chat(&app, &gw.key, body.clone()).await;
        let s = r.status().as_u16();
        assert_error(
            s,
            &r.json().await.expect("json"),
            502,
            "upstream_unreachable",
        );
    }
    assert_eq!(
        own.requests().len(),
        1,
        "nothing more reached the private upstream"
    );
    assert!(
        gw.mock.requests().is_empty(),
        "nor the provider's own base URL"
    );
}

/// A client's `x-request-id` longer than 128 characters or with anything but visible ASCII is
/// never echoed, forwarded or recorded: a new id takes its place, with and without the router.
#[tokio::test]
async fn an_oversized_or_invisible_request_id_is_replaced() {
    for cors in [false, true] {
        let app = TestApp::spawn_with(|c| {
            if cors {
                c.server.cors_origins = vec!["https://app.example".into()];
            }
        })
        .await;
        let gw = setup(&app).await;
        let body = json!({"model": "gpt-cached", "messages": [{"role": "user", "content": "hi"}]});
        let huge = "x".repeat(60 * 1024);
        let mut sent = 0;
        for bad in [huge.as_str(), &"y".repeat(129), "has space", ""] {
            let r = app
                .client
                .post(app.url("/v1/chat/completions"))
                .bearer_auth(&gw.key)
                .header("x-request-id", bad)
                .json(&body)
                .send()
                .await
                .unwrap();
            sent += 1;
            assert_eq!(r.status(), 200, "cors={cors}");
            let id = r.headers()["x-request-id"].to_str().unwrap().to_owned();
            let uuid = uuid::Uuid::parse_str(&id).expect("a generated UUID");
            assert_eq!(uuid.get_version_num(), 7, "cors={cors}");
            assert_eq!(gw.mock.last().headers["x-request-id"], id.as_str());
            let recs = wait_records(&app, &gw.user, sent).await;
            assert!(
                recs.iter()
                    .all(|r| r["request_id"].as_str().unwrap().len() <= 128),
                "cors={cors}"
            );
        }
        // Exactly 128 visible characters are kept.
        let max = "z".repeat(128);
        let r = app
            .client
            .get(app.url("/health"))
            .header("x-request-id", &max)
            .send()
            .await
            .unwrap();
        assert_eq!(r.headers()["x-request-id"], max.as_str());
        let r = app
            .client
            .get(app.url("/health"))
            .header("x-request-id", &huge)
            .send()
            .await
            .unwrap();
        let id = r.headers()["x-request-id"].to_str().unwrap();
        assert!(uuid::Uuid::parse_str(id).is_ok(), "cors={cors}");
    }
}
