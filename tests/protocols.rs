//! Part two end to end through the real App: a client protocol and a provider that differ are
//! translated both ways (stream and not), a client speaking its provider's protocol is passed
//! through, errors come back in the client's shape, and every call is one usage record with the
//! provider's own token counts.

mod common;

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use common::TestApp;
use common::gateway::{self, PROVIDER_SECRET};
use serde_json::{Value, json};

/// A scripted Anthropic Messages API on 127.0.0.1:0 (model `claude-ok`, or `claude-overloaded`
/// for a 529), recording every request.
#[derive(Clone, Default)]
struct Anthropic {
    requests: Arc<Mutex<Vec<(String, HeaderMap, Value)>>>,
    /// Model `claude-held`: the stream sends its first text delta, then waits for this.
    release: Arc<tokio::sync::Notify>,
}

const MESSAGE_USAGE: &str = r#"{"input_tokens": 20, "cache_read_input_tokens": 30, "cache_creation_input_tokens": 10, "output_tokens": 6}"#;

async fn anthropic_handle(
    State(m): State<Anthropic>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    m.requests
        .lock()
        .expect("lock")
        .push((uri.path().to_owned(), headers, body.clone()));
    if uri.path().ends_with("/messages/count_tokens") {
        return axum::Json(json!({"input_tokens": 42})).into_response();
    }
    if body["model"] == "claude-overloaded" {
        return (
            StatusCode::from_u16(529).expect("status"),
            axum::Json(json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})),
        )
            .into_response();
    }
    let usage: Value = serde_json::from_str(MESSAGE_USAGE).expect("usage");
    if body["model"] == "claude-held" && body["stream"] == true {
        return held_stream(&m.release);
    }
    if body["stream"] != true {
        return axum::Json(json!({
            "id": "msg_mock", "type": "message", "role": "assistant", "model": body["model"],
            "content": [{"type": "text", "text": "Hello from claude"}],
            "stop_reason": "end_turn", "stop_sequence": null, "usage": usage
        }))
        .into_response();
    }
    let events = [
        (
            "message_start",
            json!({"type": "message_start", "message": {"id": "msg_mock", "type": "message", "role": "assistant", "model": body["model"], "content": [], "stop_reason": null, "stop_sequence": null,
                "usage": {"input_tokens": 20, "cache_read_input_tokens": 30, "cache_creation_input_tokens": 10, "output_tokens": 1}}}),
        ),
        (
            "content_block_start",
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ),
        (
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hello"}}),
        ),
        ("ping", json!({"type": "ping"})),
        (
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": " from claude"}}),
        ),
        (
            "content_block_stop",
            json!({"type": "content_block_stop", "index": 0}),
        ),
        (
            "message_delta",
            json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null}, "usage": {"output_tokens": 3}}),
        ),
        (
            "message_delta",
            json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null}, "usage": {"output_tokens": 6}}),
        ),
        ("message_stop", json!({"type": "message_stop"})),
    ];
    let text: String = events
        .iter()
        .map(|(name, data)| format!("event: {name}\ndata: {data}\n\n"))
        .collect();
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .body(Body::from(text))
        .expect("response")
}

/// An Anthropic stream whose first text delta comes at once and the rest only once `release`
/// is notified.
fn held_stream(release: &Arc<tokio::sync::Notify>) -> Response {
    let ev = |name: &str, data: Value| Bytes::from(format!("event: {name}\ndata: {data}\n\n"));
    let first = [
        ev(
            "message_start",
            json!({"type": "message_start", "message": {"id": "msg_held", "type": "message", "role": "assistant", "model": "claude-held", "content": [], "stop_reason": null, "stop_sequence": null,
                "usage": {"input_tokens": 20, "output_tokens": 1}}}),
        ),
        ev(
            "content_block_start",
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ),
        ev(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "First"}}),
        ),
    ];
    let rest = [
        ev(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": " then the rest"}}),
        ),
        ev(
            "content_block_stop",
            json!({"type": "content_block_stop", "index": 0}),
        ),
        ev(
            "message_delta",
            json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null}, "usage": {"output_tokens": 4}}),
        ),
        ev("message_stop", json!({"type": "message_stop"})),
    ];
    let release = release.clone();
    let parts = futures_util::stream::unfold(0u8, move |step| {
        let (first, rest, release) = (first.concat(), rest.concat(), release.clone());
        async move {
            match step {
                0 => Some((Ok::<_, std::convert::Infallible>(Bytes::from(first)), 1)),
                1 => {
                    release.notified().await;
                    Some((Ok(Bytes::from(rest)), 2))
                }
                _ => None,
            }
        }
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .body(Body::from_stream(parts))
        .expect("response")
}

impl Anthropic {
    async fn start() -> (Self, String) {
        let m = Anthropic::default();
        let app = Router::new()
            .fallback(anthropic_handle)
            .with_state(m.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        (m, format!("http://{addr}/v1"))
    }

    fn last(&self) -> (String, HeaderMap, Value) {
        self.requests
            .lock()
            .expect("lock")
            .last()
            .cloned()
            .expect("a request reached the Anthropic mock")
    }
}

struct World {
    g: gateway::Gateway,
    anthropic: Anthropic,
}

/// The usual mock gateway plus an `anthropic` provider with models `claude` and
/// `claude-overloaded`, and the user's key for it.
async fn world(app: &TestApp) -> World {
    let g = gateway::setup(app).await;
    let (anthropic, base) = Anthropic::start().await;
    let (s, b) = app
        .post(
            "/api/admin/providers",
            Some(&g.admin),
            json!({"key": "claude", "display_name": "Anthropic", "base_url": base, "kind": "anthropic"}),
        )
        .await;
    assert_eq!(s, 201, "anthropic provider: {b}");
    for (name, upstream) in [
        ("claude", "claude-ok"),
        ("claude-overloaded", "claude-overloaded"),
    ] {
        let (s, b) = app
            .post(
                "/api/admin/models",
                Some(&g.admin),
                json!({"name": name, "provider": "claude", "upstream_model": upstream, "type": "chat",
                       "input_price_per_1m": 3.0, "output_price_per_1m": 15.0,
                       "cached_input_price_per_1m": 0.3, "cache_write_input_price_per_1m": 3.75,
                       "max_output_tokens": 777}),
            )
            .await;
        assert_eq!(s, 201, "model {name}: {b}");
    }
    let (s, b) = app
        .post(
            "/api/provider-keys",
            Some(&g.user),
            json!({"provider": "claude", "api_key": PROVIDER_SECRET}),
        )
        .await;
    assert_eq!(s, 201, "anthropic key: {b}");
    World { g, anthropic }
}

async fn post_raw(
    app: &TestApp,
    path: &str,
    headers: &[(&str, &str)],
    body: Value,
) -> (u16, HeaderMap, String) {
    let mut req = app.client.post(app.url(path)).json(&body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.expect("send");
    let status = resp.status().as_u16();
    let h = resp.headers().clone();
    (status, h, resp.text().await.expect("body"))
}

fn bearer(key: &str) -> String {
    format!("Bearer {key}")
}

/// `data:` payloads of an SSE body, with their `event:` names.
fn sse(text: &str) -> Vec<(Option<String>, String)> {
    text.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            let mut name = None;
            let mut data = String::new();
            for line in e.lines() {
                if let Some(n) = line.strip_prefix("event: ") {
                    name = Some(n.to_owned());
                } else if let Some(d) = line.strip_prefix("data: ") {
                    data.push_str(d);
                }
            }
            (name, data)
        })
        .collect()
}

fn record_for<'a>(records: &'a [Value], model: &str, endpoint: &str) -> &'a Value {
    records
        .iter()
        .find(|r| r["model"] == model && r["endpoint"] == endpoint)
        .unwrap_or_else(|| panic!("no record for {model} {endpoint}: {records:?}"))
}

#[tokio::test]
async fn openai_chat_to_anthropic_translated_both_ways_with_cache_tokens_metered() {
    let app = TestApp::spawn().await;
    let w = world(&app).await;
    let auth = bearer(&w.g.key);

    let (s, _, body) = post_raw(
        &app,
        "/v1/chat/completions",
        &[("authorization", &auth)],
        json!({"model": "claude", "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"}]}),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let v: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(
        v["model"], "claude",
        "the client's model name, not the upstream's"
    );
    assert_eq!(v["choices"][0]["message"]["content"], "Hello from claude");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(
        v["usage"]["prompt_tokens"], 60,
        "input + cache read + cache write"
    );
    assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 30);

    let (path, headers, up) = w.anthropic.last();
    assert_eq!(path, "/v1/messages");
    assert_eq!(
        headers.get("x-api-key").and_then(|v| v.to_str().ok()),
        Some(PROVIDER_SECRET)
    );
    assert!(headers.get("authorization").is_none());
    assert_eq!(
        headers
            .get("anthropic-version")
            .and_then(|v| v.to_str().ok()),
        Some("2023-06-01")
    );
    assert_eq!(up["model"], "claude-ok");
    assert_eq!(up["max_tokens"], 777, "the model's max_output_tokens");
    assert_eq!(up["system"][0]["text"], "Be brief.");
    assert_eq!(up["messages"][0]["role"], "user");

    // Streamed: OpenAI chunks, the usage chunk when asked, [DONE].
    let (s, h, body) = post_raw(
        &app,
        "/v1/chat/completions",
        &[("authorization", &auth)],
        json!({"model": "claude", "stream": true, "stream_options": {"include_usage": true},
               "messages": [{"role": "user", "content": "Hi"}]}),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    assert!(
        h[header::CONTENT_TYPE]
            .to_str()
            .unwrap_or_default()
            .starts_with("text/event-stream")
    );
    let events = sse(&body);
    assert_eq!(events.last().map(|e| e.1.as_str()), Some("[DONE]"));
    let chunks: Vec<Value> = events
        .iter()
        .filter(|e| e.1 != "[DONE]")
        .map(|e| serde_json::from_str(&e.1).expect("chunk json"))
        .collect();
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, "Hello from claude");
    let usage = chunks
        .iter()
        .find(|c| c["usage"].is_object())
        .expect("usage chunk");
    assert_eq!(
        usage["usage"]["completion_tokens"], 6,
        "the last cumulative message_delta, never a sum"
    );
    assert!(chunks.iter().all(|c| c["model"] == "claude"));

    let records = gateway::wait_records(&app, &w.g.user, 2).await;
    for r in records.iter().filter(|r| r["model"] == "claude") {
        assert_eq!(r["prompt_tokens"], 60, "{r}");
        assert_eq!(r["cached_tokens"], 30, "{r}");
        assert_eq!(r["cache_write_tokens"], 10, "{r}");
        assert_eq!(r["completion_tokens"], 6, "{r}");
        assert_eq!(r["tokens_estimated"], false, "{r}");
        // (60 − 30 − 10) × $3 + 30 × $0.30 + 10 × $3.75 + 6 × $15, per 1M tokens.
        let want = (20.0 * 3.0 + 30.0 * 0.3 + 10.0 * 3.75 + 6.0 * 15.0) / 1e6;
        let cost = r["cost_usd"].as_f64().expect("cost");
        assert!((cost - want).abs() < 1e-9, "cost {cost} want {want}: {r}");
    }
    app.stop().await;
}

/// A translated stream gathers what the upstream has at hand into one write, but never waits
/// for more: the first text reaches the client while the upstream still holds the rest.
#[tokio::test]
async fn a_translated_stream_sends_each_event_when_it_arrives() {
    use futures_util::StreamExt;
    let app = TestApp::spawn().await;
    let w = world(&app).await;
    let (s, b) = app
        .post(
            "/api/admin/models",
            Some(&w.g.admin),
            json!({"name": "claude-held", "provider": "claude", "upstream_model": "claude-held",
                   "type": "chat", "input_price_per_1m": 3.0, "output_price_per_1m": 15.0}),
        )
        .await;
    assert_eq!(s, 201, "model: {b}");
    let resp = app
        .client
        .post(app.url("/v1/chat/completions"))
        .header("authorization", bearer(&w.g.key))
        .json(&json!({"model": "claude-held", "stream": true,
                      "messages": [{"role": "user", "content": "Hi"}]}))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    let mut got = String::new();
    // The upstream sends the rest only after this: a gateway that held the first event back
    // would never show it.
    let first = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        while !got.contains("First") {
            let Some(Ok(part)) = body.next().await else {
                break;
            };
            got.push_str(&String::from_utf8_lossy(&part));
        }
    })
    .await;
    assert!(
        first.is_ok() && got.contains("First"),
        "the first text did not arrive while the upstream held the rest: {got:?}"
    );
    assert!(!got.contains("[DONE]"), "{got}");
    w.anthropic.release.notify_one();
    while let Some(part) = body.next().await {
        got.push_str(&String::from_utf8_lossy(&part.expect("part")));
    }
    let chunks: Vec<Value> = sse(&got)
        .iter()
        .filter(|e| e.1 != "[DONE]")
        .map(|e| serde_json::from_str(&e.1).expect("chunk json"))
        .collect();
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, "First then the rest");
    assert!(got.ends_with("data: [DONE]\n\n"), "{got}");
    let records = gateway::wait_records(&app, &w.g.user, 1).await;
    let r = record_for(&records, "claude-held", "chat.completions");
    assert_eq!(r["status"], 200, "{r}");
    assert_eq!(r["completion_tokens"], 4, "{r}");
    app.stop().await;
}

#[tokio::test]
async fn messages_pass_through_to_anthropic_untouched_but_the_model() {
    let app = TestApp::spawn().await;
    let w = world(&app).await;
    let req = json!({"model": "claude", "max_tokens": 64, "system": [{"type": "text", "text": "sys", "cache_control": {"type": "ephemeral"}}],
        "metadata": {"user_id": "u-1"}, "thinking": {"type": "enabled", "budget_tokens": 1024},
        "messages": [{"role": "user", "content": "Hi"}]});
    let (s, _, body) = post_raw(
        &app,
        "/v1/messages",
        &[
            ("x-api-key", &w.g.key),
            ("anthropic-version", "2023-06-01"),
            ("anthropic-beta", "prompt-caching-2024-07-31"),
        ],
        req.clone(),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let v: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["type"], "message");
    assert_eq!(v["content"][0]["text"], "Hello from claude");

    let (_, headers, up) = w.anthropic.last();
    let mut want = req.clone();
    want["model"] = json!("claude-ok");
    assert_eq!(
        up, want,
        "the body reaches Anthropic as sent, model replaced"
    );
    assert_eq!(
        headers.get("anthropic-beta").and_then(|v| v.to_str().ok()),
        Some("prompt-caching-2024-07-31")
    );
    assert_eq!(
        headers.get("x-api-key").and_then(|v| v.to_str().ok()),
        Some(PROVIDER_SECRET),
        "the gateway key never reaches the upstream"
    );

    // Streamed: relayed event by event.
    let mut sreq = req.clone();
    sreq["stream"] = json!(true);
    let (s, _, body) = post_raw(
        &app,
        "/v1/messages",
        &[("authorization", &bearer(&w.g.key))],
        sreq,
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let names: Vec<_> = sse(&body).into_iter().filter_map(|e| e.0).collect();
    assert_eq!(names.first().map(String::as_str), Some("message_start"));
    assert_eq!(names.last().map(String::as_str), Some("message_stop"));
    assert!(names.iter().any(|n| n == "ping"), "untouched: pings too");

    // count_tokens goes to Anthropic's own counter.
    let (s, _, body) = post_raw(
        &app,
        "/v1/messages/count_tokens",
        &[("x-api-key", &w.g.key)],
        json!({"model": "claude", "messages": [{"role": "user", "content": "Hi"}]}),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).expect("json")["input_tokens"],
        42
    );
    assert_eq!(w.anthropic.last().0, "/v1/messages/count_tokens");

    let records = gateway::wait_records(&app, &w.g.user, 3).await;
    let streamed = records
        .iter()
        .find(|r| r["endpoint"] == "messages" && r["stream"] == true)
        .expect("stream record");
    assert_eq!(streamed["prompt_tokens"], 60, "{streamed}");
    assert_eq!(
        streamed["completion_tokens"], 6,
        "cumulative usage, the last one: {streamed}"
    );
    assert_eq!(streamed["cache_write_tokens"], 10, "{streamed}");
    let counted = record_for(&records, "claude", "messages.count_tokens");
    assert_eq!(counted["cost_usd"].as_f64(), Some(0.0));
    app.stop().await;
}

#[tokio::test]
async fn messages_to_an_openai_provider_are_translated_and_errors_are_anthropic_shaped() {
    let app = TestApp::spawn().await;
    let w = world(&app).await;
    let key = w.g.key.clone();

    let (s, _, body) = post_raw(
        &app,
        "/v1/messages",
        &[("x-api-key", &key)],
        json!({"model": "gpt-test", "max_tokens": 50, "system": "Be brief.",
               "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]}),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let v: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["type"], "message");
    assert_eq!(v["role"], "assistant");
    assert_eq!(v["model"], "gpt-test");
    assert_eq!(v["content"][0]["type"], "text");
    assert_eq!(v["content"][0]["text"], "Hello from mock");
    assert_eq!(v["stop_reason"], "end_turn");
    assert_eq!(v["usage"]["input_tokens"], 11);
    assert_eq!(v["usage"]["output_tokens"], 7);
    let up = w.g.mock.last();
    assert_eq!(up.path, "/v1/chat/completions");
    assert_eq!(up.body["messages"][0]["role"], "system");
    assert_eq!(up.body["max_tokens"], 50);

    // Streamed: message_start comes first, then the text, message_delta with usage, message_stop.
    let (s, _, body) = post_raw(
        &app,
        "/v1/messages",
        &[("x-api-key", &key)],
        json!({"model": "gpt-test", "max_tokens": 50, "stream": true,
               "messages": [{"role": "user", "content": "Hi"}]}),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let events = sse(&body);
    assert_eq!(events[0].0.as_deref(), Some("message_start"));
    assert_eq!(
        events.last().and_then(|e| e.0.as_deref()),
        Some("message_stop")
    );
    let text: String = events
        .iter()
        .filter(|e| e.0.as_deref() == Some("content_block_delta"))
        .filter_map(|e| {
            serde_json::from_str::<Value>(&e.1).ok()?["delta"]["text"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(text, "Hello from mock");
    let delta = events
        .iter()
        .find(|e| e.0.as_deref() == Some("message_delta"))
        .expect("message_delta");
    let delta: Value = serde_json::from_str(&delta.1).expect("json");
    assert_eq!(delta["usage"]["output_tokens"], 7);

    // The gateway's own errors in Anthropic's shape: a wrong key, a missing max_tokens.
    let (s, _, body) = post_raw(
        &app,
        "/v1/messages",
        &[("x-api-key", "sk-tg-wrong")],
        json!({"model": "gpt-test", "max_tokens": 5, "messages": []}),
    )
    .await;
    assert_eq!(s, 401);
    let v: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["type"], "error", "{v}");
    assert_eq!(v["error"]["type"], "authentication_error", "{v}");
    let (s, _, body) = post_raw(
        &app,
        "/v1/messages",
        &[("x-api-key", &key)],
        json!({"model": "gpt-test", "messages": [{"role": "user", "content": "Hi"}]}),
    )
    .await;
    assert_eq!(s, 400, "{body}");
    let v: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("max_tokens"),
        "{v}"
    );

    // An upstream error through the translation: the Anthropic 529 is a 503 on OpenAI routes.
    let (s, _, body) = post_raw(
        &app,
        "/v1/chat/completions",
        &[("authorization", &bearer(&key))],
        json!({"model": "claude-overloaded", "messages": [{"role": "user", "content": "Hi"}]}),
    )
    .await;
    assert_eq!(s, 503, "{body}");
    let v: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["error"]["type"], "overloaded_error", "{v}");
    app.stop().await;
}

#[tokio::test]
async fn forwarding_rules_and_compressed_bodies() {
    use std::io::Write;
    let app = TestApp::spawn().await;
    let w = gateway::setup(&app).await;
    let auth = bearer(&w.key);
    let body = json!({"model": "gpt-test", "messages": [{"role": "user", "content": "Hi"}]});

    // Forwarded request headers, never the gateway key.
    let (s, _, text) = post_raw(
        &app,
        "/v1/chat/completions",
        &[
            ("authorization", &auth),
            ("openai-beta", "assistants=v2"),
            ("openai-organization", "org-x"),
            ("user-agent", "OpenAI/Python 9.9"),
        ],
        body.clone(),
    )
    .await;
    assert_eq!(s, 200, "{text}");
    let up = w.mock.last();
    assert_eq!(up.headers["openai-beta"], "assistants=v2");
    assert_eq!(up.headers["openai-organization"], "org-x");
    assert_eq!(up.headers["user-agent"], "OpenAI/Python 9.9");
    assert_eq!(
        up.headers["authorization"],
        format!("Bearer {PROVIDER_SECRET}").as_str()
    );
    assert_eq!(up.query, None, "no query string was sent");

    // The query string is forwarded as is (spec §8).
    let (s, _, text) = post_raw(
        &app,
        "/v1/chat/completions?api-version=2024-10-21&trace=a%20b",
        &[("authorization", &auth)],
        body.clone(),
    )
    .await;
    assert_eq!(s, 200, "{text}");
    let up = w.mock.last();
    assert_eq!(up.path, "/v1/chat/completions");
    assert_eq!(
        up.query.as_deref(),
        Some("api-version=2024-10-21&trace=a%20b")
    );

    // A gzip body is decoded.
    let raw = serde_json::to_vec(&body).expect("json");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&raw).expect("gzip");
    let gz = gz.finish().expect("gzip");
    let resp = app
        .client
        .post(app.url("/v1/chat/completions"))
        .header("authorization", &auth)
        .header("content-type", "application/json")
        .header("content-encoding", "gzip")
        .body(gz)
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 200, "{:?}", resp.text().await);
    assert_eq!(w.mock.last().body["model"], "normal");

    // Another encoding is 415, and nothing reached the upstream.
    let before = w.mock.requests().len();
    let resp = app
        .client
        .post(app.url("/v1/chat/completions"))
        .header("authorization", &auth)
        .header("content-encoding", "compress")
        .body(raw.clone())
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 415);
    let v: Value = resp.json().await.expect("json");
    assert_eq!(v["error"]["code"], "unsupported_encoding");

    // A declared length over the limit is refused before the body is read: the answer comes
    // while the client has sent nothing but the head.
    let limit = app.state.config.server.max_body_bytes;
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut conn = tokio::net::TcpStream::connect(app.addr)
            .await
            .expect("connect");
        let head = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: {auth}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            limit + 1
        );
        conn.write_all(head.as_bytes()).await.expect("write head");
        let mut buf = vec![0u8; 1024];
        let n = tokio::time::timeout(std::time::Duration::from_secs(10), conn.read(&mut buf))
            .await
            .expect("answered without the body")
            .expect("read");
        let answer = String::from_utf8_lossy(&buf[..n]);
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    }
    // A gzip bomb: small on the wire, over the limit decoded.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(&vec![b' '; limit + 1024]).expect("gzip");
    let bomb = gz.finish().expect("gzip");
    assert!(bomb.len() < limit / 10);
    let resp = app
        .client
        .post(app.url("/v1/chat/completions"))
        .header("authorization", &auth)
        .header("content-encoding", "gzip")
        .body(bomb)
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 413);
    assert_eq!(
        w.mock.requests().len(),
        before,
        "no refused body went upstream"
    );
    app.stop().await;
}

#[tokio::test]
async fn responses_translated_to_chat_with_state_kept_by_the_gateway() {
    let app = TestApp::spawn().await;
    let w = gateway::setup(&app).await;
    let auth = bearer(&w.key);

    // Non-stream: a response object; the chat upstream got instructions as a system message.
    let (s, _, body) = post_raw(
        &app,
        "/v1/responses",
        &[("authorization", &auth)],
        json!({"model": "gpt-test", "instructions": "Be brief.", "input": "Hi there",
               "metadata": {"topic": "greeting"}}),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let first: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(first["object"], "response");
    assert_eq!(first["status"], "completed");
    assert_eq!(first["model"], "gpt-test");
    let id = first["id"].as_str().expect("id").to_owned();
    assert!(id.starts_with("resp_"), "{id}");
    let msg = first["output"]
        .as_array()
        .and_then(|o| o.iter().find(|i| i["type"] == "message"))
        .expect("a message item");
    assert_eq!(msg["content"][0]["type"], "output_text");
    assert_eq!(msg["content"][0]["text"], "Hello from mock");
    assert_eq!(first["usage"]["input_tokens"], 11);
    assert_eq!(first["usage"]["output_tokens"], 7);
    let up = w.mock.last();
    assert_eq!(up.path, "/v1/chat/completions");
    assert_eq!(up.body["messages"][0]["role"], "system");
    assert_eq!(up.body["messages"][0]["content"], "Be brief.");
    assert!(up.body.get("store").is_none() && up.body.get("metadata").is_none());

    // Stored: GET answers it (after the background write).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let resp = app
            .client
            .get(app.url(&format!("/v1/responses/{id}")))
            .header("authorization", &auth)
            .send()
            .await
            .expect("get");
        if resp.status() == 200 {
            let v: Value = resp.json().await.expect("json");
            assert_eq!(v["id"], id.as_str());
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never stored");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    // previous_response_id: the gateway sends the whole history, statelessly.
    let (s, _, body) = post_raw(
        &app,
        "/v1/responses",
        &[("authorization", &auth)],
        json!({"model": "gpt-test", "input": "And again", "previous_response_id": id}),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let up = w.mock.last();
    let roles: Vec<_> = up.body["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| m["role"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(
        roles,
        ["user", "assistant", "user"],
        "history then input; instructions are not inherited: {}",
        up.body
    );
    assert_eq!(up.body["messages"][1]["content"], "Hello from mock");

    // Another user's response id is 404, and an unknown one too.
    let other = common::accounts::user_token(&app, "mallory").await;
    let (s, b) = app
        .post(
            "/api/provider-keys",
            Some(&other),
            json!({"provider": "mock", "api_key": "sk-mallory-own-key-0123456789"}),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    let (okey, _) = gateway::new_key(&app, &other, json!({"name": "m"})).await;
    let (s, _, body) = post_raw(
        &app,
        "/v1/responses",
        &[("authorization", &bearer(&okey))],
        json!({"model": "gpt-test", "input": "x", "previous_response_id": id}),
    )
    .await;
    assert_eq!(s, 404, "{body}");

    // Streamed: response.* events with increasing sequence numbers, completed with usage.
    let (s, _, body) = post_raw(
        &app,
        "/v1/responses",
        &[("authorization", &auth)],
        json!({"model": "gpt-test", "input": "Hi", "stream": true, "store": false}),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let events = sse(&body);
    let names: Vec<_> = events.iter().filter_map(|e| e.0.clone()).collect();
    assert_eq!(names.first().map(String::as_str), Some("response.created"));
    assert_eq!(names.last().map(String::as_str), Some("response.completed"));
    assert!(names.iter().any(|n| n == "response.output_text.delta"));
    let seqs: Vec<u64> = events
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(&e.1).ok()?["sequence_number"].as_u64())
        .collect();
    assert_eq!(seqs, (0..seqs.len() as u64).collect::<Vec<_>>());
    let done: Value = serde_json::from_str(&events.last().expect("last").1).expect("json");
    assert_eq!(done["response"]["usage"]["output_tokens"], 7);

    // A conversation collects both turns' items.
    let (s, conv) = app.post("/v1/conversations", None, json!({})).await;
    assert_eq!(s, 401, "{conv}");
    let resp = app
        .client
        .post(app.url("/v1/conversations"))
        .header("authorization", &auth)
        .json(&json!({}))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 200);
    let conv: Value = resp.json().await.expect("json");
    let conv_id = conv["id"].as_str().expect("conv id").to_owned();
    for text in ["one", "two"] {
        let (s, _, body) = post_raw(
            &app,
            "/v1/responses",
            &[("authorization", &auth)],
            json!({"model": "gpt-test", "input": text, "conversation": conv_id}),
        )
        .await;
        assert_eq!(s, 200, "{body}");
        // The second turn saw the first one's items.
        if text == "two" {
            let n = w.mock.last().body["messages"]
                .as_array()
                .map(Vec::len)
                .unwrap_or(0);
            assert_eq!(n, 3, "{}", w.mock.last().body);
        } else {
            // Items are appended off the request path: wait until they are there.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            loop {
                let v: Value = app
                    .client
                    .get(app.url(&format!("/v1/conversations/{conv_id}/items?order=asc")))
                    .header("authorization", &auth)
                    .send()
                    .await
                    .expect("items")
                    .json()
                    .await
                    .expect("json");
                if v["data"].as_array().map(Vec::len) == Some(2) {
                    break;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "items never appended: {v}"
                );
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }

    let records = gateway::wait_records(&app, &w.user, 5).await;
    let r = records
        .iter()
        .find(|r| r["endpoint"] == "responses" && r["response_id"] == id.as_str())
        .expect("the first response's record carries its id");
    assert_eq!(r["prompt_tokens"], 11);
    app.stop().await;
}

/// A Responses-capable upstream: answers `/v1/responses` with its own ids.
async fn responses_upstream() -> (Arc<Mutex<Vec<Value>>>, String) {
    let seen: Arc<Mutex<Vec<Value>>> = Arc::default();
    let s2 = seen.clone();
    let app = Router::new().fallback(move |body: Bytes| {
        let seen = s2.clone();
        async move {
            let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            seen.lock().expect("lock").push(v.clone());
            let response = json!({"id": "resp_upstream", "object": "response", "created_at": 1, "status": "completed",
                "model": v["model"], "output": [{"type": "message", "id": "msg_up", "status": "completed", "role": "assistant",
                "content": [{"type": "output_text", "text": "Upstream says hi", "annotations": []}]}],
                "usage": {"input_tokens": 9, "input_tokens_details": {"cached_tokens": 2}, "output_tokens": 4,
                          "output_tokens_details": {"reasoning_tokens": 1}, "total_tokens": 13}});
            if v["stream"] == true {
                let text = format!(
                    "event: response.created\ndata: {}\n\nevent: response.output_text.delta\ndata: {}\n\nevent: response.completed\ndata: {}\n\n",
                    json!({"type": "response.created", "sequence_number": 0, "response": {"id": "resp_upstream", "object": "response", "status": "in_progress", "model": v["model"], "output": []}}),
                    json!({"type": "response.output_text.delta", "sequence_number": 1, "item_id": "msg_up", "output_index": 0, "content_index": 0, "delta": "Upstream says hi"}),
                    json!({"type": "response.completed", "sequence_number": 2, "response": response}),
                );
                Response::builder()
                    .header(header::CONTENT_TYPE, "text/event-stream")
                    .body(Body::from(text))
                    .expect("response")
            } else {
                axum::Json(response).into_response()
            }
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (seen, format!("http://{addr}/v1"))
}

#[tokio::test]
async fn responses_to_a_responses_capable_upstream_go_statelessly_with_our_ids() {
    let app = TestApp::spawn().await;
    let w = gateway::setup(&app).await;
    let (seen, base) = responses_upstream().await;
    let (s, b) = app
        .post(
            "/api/admin/providers",
            Some(&w.admin),
            json!({"key": "oai", "display_name": "OpenAI-like", "base_url": base, "kind": "openai", "supports_responses": true}),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    let (s, b) = app
        .post(
            "/api/admin/models",
            Some(&w.admin),
            json!({"name": "o-resp", "provider": "oai", "upstream_model": "o-up", "type": "chat",
                   "input_price_per_1m": 1.0, "output_price_per_1m": 2.0}),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    let (s, b) = app
        .post(
            "/api/provider-keys",
            Some(&w.user),
            json!({"provider": "oai", "api_key": PROVIDER_SECRET}),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    let auth = bearer(&w.key);

    let (s, _, body) = post_raw(
        &app,
        "/v1/responses",
        &[("authorization", &auth)],
        json!({"model": "o-resp", "input": "Hi", "reasoning": {"effort": "low"}}),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let v: Value = serde_json::from_str(&body).expect("json");
    let id = v["id"].as_str().expect("id").to_owned();
    assert_ne!(id, "resp_upstream", "the client sees tollgate's id");
    assert!(id.starts_with("resp_"));
    assert_eq!(v["model"], "o-resp");
    assert_eq!(
        v["store"], true,
        "tollgate stored it, whatever the upstream says: {v}"
    );
    let up = seen.lock().expect("lock").last().cloned().expect("request");
    assert_eq!(up["model"], "o-up");
    assert_eq!(up["store"], false, "upstreams are stateless");
    assert!(
        up["include"]
            .as_array()
            .is_some_and(|i| i.iter().any(|x| x == "reasoning.encrypted_content"))
    );

    // The follow-up's history comes from tollgate, not the upstream.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (s, _, body) = post_raw(
            &app,
            "/v1/responses",
            &[("authorization", &auth)],
            json!({"model": "o-resp", "input": "More", "previous_response_id": id, "stream": true}),
        )
        .await;
        if s == 404 && std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        }
        assert_eq!(s, 200, "{body}");
        let events = sse(&body);
        for (_, data) in &events {
            let e: Value = serde_json::from_str(data).expect("event json");
            if let Some(r) = e.get("response") {
                assert_ne!(r["id"], "resp_upstream", "{e}");
                assert_eq!(r["model"], "o-resp", "{e}");
                assert_eq!(r["store"], true, "{e}");
            }
        }
        assert_eq!(
            events.last().and_then(|e| e.0.as_deref()),
            Some("response.completed")
        );
        break;
    }
    let up = seen.lock().expect("lock").last().cloned().expect("request");
    assert!(up.get("previous_response_id").is_none(), "{up}");
    let input = up["input"].as_array().expect("input array");
    assert_eq!(input.len(), 3, "user, assistant, user: {up}");

    // (Follow-ups that came before the first response was stored are 404 records: wait for the
    // answered stream's own.)
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    let r = loop {
        let records = gateway::wait_records(&app, &w.user, 2).await;
        if let Some(r) = records
            .iter()
            .find(|r| r["endpoint"] == "responses" && r["stream"] == true && r["status"] == 200)
        {
            break r.clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no stream record: {records:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(r["prompt_tokens"], 9);
    assert_eq!(r["cached_tokens"], 2);
    assert_eq!(r["reasoning_tokens"], 1);
    app.stop().await;
}

#[tokio::test]
async fn chat_completions_with_store_are_kept_by_the_gateway_not_the_upstream() {
    let app = TestApp::spawn().await;
    let w = world(&app).await;
    let auth = bearer(&w.g.key);
    let mut ids = Vec::new();
    for (model, stream) in [
        ("gpt-test", false),
        ("gpt-test", true),
        ("claude", false),
        ("claude", true),
    ] {
        let (s, _, body) = post_raw(
            &app,
            "/v1/chat/completions",
            &[("authorization", &auth)],
            json!({"model": model, "stream": stream, "store": true, "metadata": {"run": "t1"},
                   "messages": [{"role": "user", "content": format!("Hi {model} {stream}")}]}),
        )
        .await;
        assert_eq!(s, 200, "{body}");
        let id = if stream {
            let events = sse(&body);
            let ids: std::collections::BTreeSet<String> = events
                .iter()
                .filter(|e| e.1 != "[DONE]")
                .filter_map(|e| {
                    serde_json::from_str::<Value>(&e.1).ok()?["id"]
                        .as_str()
                        .map(str::to_owned)
                })
                .collect();
            assert_eq!(ids.len(), 1, "one id on every chunk: {ids:?}");
            ids.into_iter().next().expect("id")
        } else {
            serde_json::from_str::<Value>(&body).expect("json")["id"]
                .as_str()
                .expect("id")
                .to_owned()
        };
        assert!(id.starts_with("chatcmpl-"), "{id}");
        ids.push(id);
        if model == "gpt-test" {
            let up = w.g.mock.last().body;
            assert!(up.get("store").is_none(), "store is not forwarded: {up}");
            assert!(
                up.get("metadata").is_none(),
                "metadata is not forwarded: {up}"
            );
        }
    }
    // Each is stored under the id its client saw, with the whole answer.
    for id in &ids {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let v = loop {
            let resp = app
                .client
                .get(app.url(&format!("/v1/chat/completions/{id}")))
                .header("authorization", &auth)
                .send()
                .await
                .expect("get");
            if resp.status() == 200 {
                break resp.json::<Value>().await.expect("json");
            }
            assert!(std::time::Instant::now() < deadline, "{id} never stored");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        };
        assert_eq!(v["id"], id.as_str());
        let text = v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap_or_default();
        assert!(text.starts_with("Hello from"), "{v}");
        assert_eq!(v["metadata"]["run"], "t1", "{v}");
    }
    let list: Value = app
        .client
        .get(app.url("/v1/chat/completions?metadata[run]=t1&limit=10"))
        .header("authorization", &auth)
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("json");
    assert_eq!(list["data"].as_array().map(Vec::len), Some(4), "{list}");

    // Bad metadata is refused before anything is sent.
    let before = w.g.mock.requests().len();
    let (s, _, body) = post_raw(
        &app,
        "/v1/chat/completions",
        &[("authorization", &auth)],
        json!({"model": "gpt-test", "store": true, "metadata": {"k": 5},
               "messages": [{"role": "user", "content": "Hi"}]}),
    )
    .await;
    assert_eq!(s, 400, "{body}");
    assert_eq!(w.g.mock.requests().len(), before);
    app.stop().await;
}

/// Spec §11 beyond OpenAI's pass-through: an attempt through the pivot, or Anthropic's Messages
/// passed through, that fails before any byte reached the client is retried on the next
/// deployment — whatever kind it is — for an OpenAI and an Anthropic client, streamed or not;
/// when every attempt fails, the last failure is the answer, in the client's shape.
#[tokio::test]
async fn translated_attempts_are_retried_on_the_next_deployment() {
    let app = TestApp::spawn_with(|c| c.routing.failure_threshold = 1000).await;
    let w = world(&app).await;
    let auth = bearer(&w.g.key);
    let dep = |provider: &str, upstream: &str, priority: i32| json!({"provider": provider, "upstream_model": upstream, "priority": priority});
    for (name, deployments) in [
        (
            "anthropic-first",
            json!([
                dep("claude", "claude-overloaded", 0),
                dep("mock", "normal", 1)
            ]),
        ),
        (
            "openai-first",
            json!([dep("mock", "fail503", 0), dep("claude", "claude-ok", 1)]),
        ),
        (
            "all-failing",
            json!([
                dep("claude", "claude-overloaded", 0),
                dep("mock", "fail503", 1)
            ]),
        ),
    ] {
        let (s, b) = app
            .post(
                "/api/admin/models",
                Some(&w.g.admin),
                json!({"name": name, "deployments": deployments, "input_price_per_1m": 1.0,
                       "output_price_per_1m": 2.0, "max_output_tokens": 100}),
            )
            .await;
        assert_eq!(s, 201, "model {name}: {b}");
    }
    let attempts = |h: &HeaderMap| -> u32 {
        h["x-tollgate-attempts"]
            .to_str()
            .expect("ascii")
            .parse()
            .expect("a number")
    };
    let chat = |model: &str, stream: bool| json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": "Hi"}]});
    let message = |model: &str, stream: bool| {
        json!({"model": model, "max_tokens": 50, "stream": stream,
               "messages": [{"role": "user", "content": "Hi"}]})
    };
    let overloaded_before = w.anthropic.requests.lock().expect("lock").len();
    let fail503_before = w.g.mock.count("fail503");

    // A failing Anthropic deployment, then an OpenAI one.
    for stream in [false, true] {
        let (s, h, body) = post_raw(
            &app,
            "/v1/chat/completions",
            &[("authorization", &auth)],
            chat("anthropic-first", stream),
        )
        .await;
        assert_eq!(s, 200, "chat, stream {stream}: {body}");
        assert_eq!(attempts(&h), 2, "chat, stream {stream}");
        assert_eq!(h["x-tollgate-model"], "anthropic-first");
        if stream {
            assert!(body.trim_end().ends_with("data: [DONE]"), "{body}");
        } else {
            let v: Value = serde_json::from_str(&body).expect("json");
            assert_eq!(v["object"], "chat.completion", "{v}");
            assert_eq!(v["model"], "anthropic-first", "{v}");
        }
        let (s, h, body) = post_raw(
            &app,
            "/v1/messages",
            &[("x-api-key", &w.g.key)],
            message("anthropic-first", stream),
        )
        .await;
        assert_eq!(s, 200, "messages, stream {stream}: {body}");
        assert_eq!(attempts(&h), 2, "messages, stream {stream}");
        if stream {
            let events = sse(&body);
            assert_eq!(events[0].0.as_deref(), Some("message_start"), "{body}");
            assert_eq!(
                events.last().and_then(|e| e.0.as_deref()),
                Some("message_stop")
            );
        } else {
            let v: Value = serde_json::from_str(&body).expect("json");
            assert_eq!(v["type"], "message", "{v}");
        }
    }
    let overloaded: Vec<Value> = w.anthropic.requests.lock().expect("lock")[overloaded_before..]
        .iter()
        .map(|(_, _, b)| b["model"].clone())
        .collect();
    assert_eq!(overloaded, vec![json!("claude-overloaded"); 4]);

    // A failing OpenAI deployment, then an Anthropic one (translated for the OpenAI client,
    // passed through for the Anthropic one).
    let (s, h, body) = post_raw(
        &app,
        "/v1/chat/completions",
        &[("authorization", &auth)],
        chat("openai-first", false),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(attempts(&h), 2);
    let v: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["choices"][0]["message"]["content"], "Hello from claude");
    let (s, h, body) = post_raw(
        &app,
        "/v1/messages",
        &[("x-api-key", &w.g.key)],
        message("openai-first", false),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(attempts(&h), 2);
    let v: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["content"][0]["text"], "Hello from claude", "{v}");
    assert_eq!(v["model"], "openai-first", "the client's model name");
    assert_eq!(w.g.mock.count("fail503") - fail503_before, 2);

    // Every deployment failing: the last failure, in the client's shape.
    let (s, h, body) = post_raw(
        &app,
        "/v1/chat/completions",
        &[("authorization", &auth)],
        chat("all-failing", false),
    )
    .await;
    assert_eq!(s, 503, "{body}");
    assert_eq!(attempts(&h), 2);
    let v: Value = serde_json::from_str(&body).expect("json");
    assert!(v["error"]["message"].is_string(), "OpenAI's shape: {v}");
    let (s, h, body) = post_raw(
        &app,
        "/v1/messages",
        &[("x-api-key", &w.g.key)],
        message("all-failing", false),
    )
    .await;
    assert_eq!(s, 503, "{body}");
    assert_eq!(attempts(&h), 2);
    let v: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["type"], "error", "Anthropic's shape: {v}");
    assert!(v["error"]["type"].is_string(), "{v}");

    // One usage record per client request, with its attempts and the provider that answered.
    let records = gateway::wait_records(&app, &w.g.user, 8).await;
    let ours: Vec<&Value> = records
        .iter()
        .filter(|r| {
            ["anthropic-first", "openai-first", "all-failing"]
                .contains(&r["model"].as_str().unwrap_or(""))
        })
        .collect();
    assert_eq!(ours.len(), 8, "{ours:?}");
    for r in &ours {
        assert_eq!(r["attempts"], 2, "{r}");
        let want = match (r["model"].as_str(), r["status"].as_i64()) {
            (Some("anthropic-first"), Some(200)) => "mock",
            (Some("openai-first"), Some(200)) => "claude",
            (Some("all-failing"), Some(503)) => "mock",
            other => panic!("unexpected record {other:?}: {r}"),
        };
        assert_eq!(r["provider"], want, "{r}");
    }
    app.stop().await;
}
