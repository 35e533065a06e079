//! Upstream response headers passed back to the client (API.md §8's forwarding rules, README
//! "OpenAI API"): `retry-after`, `retry-after-ms`, every `x-ratelimit-*` and
//! `openai-processing-ms` come back with the upstream's values on successes (stream and not) and
//! on errors (an upstream 429); the gateway's own `x-ratelimit-*` replace the upstream's when the
//! key has a limit; nothing else the upstream sends (cookies, hop-by-hop headers, its
//! organization, its request id, its `content-encoding`) reaches the client.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::Response;
use bytes::Bytes;
use common::TestApp;
use common::accounts::{admin_token, user_token};
use common::gateway::{PROVIDER_SECRET, new_key};
use serde_json::{Value, json};

/// Upstream response headers §8 passes back, with the values the mock sends. The last
/// `x-ratelimit-*` is one no gateway limit ever writes: the rule is the whole family.
const PASSED: [(&str, &str); 10] = [
    ("retry-after", "7"),
    ("retry-after-ms", "6500"),
    ("x-ratelimit-limit-requests", "5000"),
    ("x-ratelimit-remaining-requests", "4999"),
    ("x-ratelimit-reset-requests", "12ms"),
    ("x-ratelimit-limit-tokens", "800000"),
    ("x-ratelimit-remaining-tokens", "799123"),
    ("x-ratelimit-reset-tokens", "92ms"),
    ("x-ratelimit-limit-project-tokens", "9000000"),
    ("openai-processing-ms", "321"),
];

/// Upstream response headers that must not reach the client: the provider account's cookie,
/// hop-by-hop headers (RFC 9110 §7.6.1), the organization of the provider key, the upstream's own
/// request id (the client gets the gateway's, §1), and anything else outside §8's list.
const NOT_PASSED: [(&str, &str); 7] = [
    ("set-cookie", "__cf_bm=upstream-session; path=/; HttpOnly"),
    ("keep-alive", "timeout=99, max=7"),
    ("proxy-authenticate", "Basic realm=\"upstream\""),
    ("openai-organization", "org-upstream-secret"),
    ("x-request-id", "req_upstream_0001"),
    ("server", "upstream-server/1.0"),
    ("x-upstream-internal", "secret-route-7"),
];

/// What the client sends as its request id (echoed back, §1).
const CLIENT_REQUEST_ID: &str = "client-req-0001";

/// An OpenAI-compatible upstream (chat completions and the Responses API) that answers every
/// request with all of [`PASSED`] and [`NOT_PASSED`]. The upstream model picks the answer:
/// `ok` a success, `gz` a gzip-encoded success, `r429…` a 429 rate-limit error.
#[derive(Clone, Default)]
struct Upstream {
    /// (path, body) of every request.
    seen: Arc<Mutex<Vec<(String, Value)>>>,
}

impl Upstream {
    async fn start() -> (Self, String) {
        let up = Upstream::default();
        let seen = up.seen.clone();
        let app = Router::new().fallback(move |uri: Uri, body: Bytes| {
            let seen = seen.clone();
            async move {
                let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                seen.lock()
                    .unwrap()
                    .push((uri.path().to_owned(), v.clone()));
                answer(uri.path(), &v)
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        (up, format!("http://{addr}/v1"))
    }

    /// Requests received for this upstream model.
    fn count(&self, model: &str) -> usize {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, b)| b["model"] == model)
            .count()
    }
}

fn answer(path: &str, body: &Value) -> Response {
    let model = body["model"].as_str().unwrap_or_default();
    let stream = body["stream"] == true;
    let responses = path.ends_with("/responses");
    let mut b = Response::builder();
    for (k, v) in PASSED.iter().chain(NOT_PASSED.iter()) {
        b = b.header(*k, *v);
    }
    if model.starts_with("r429") {
        return b
            .status(StatusCode::TOO_MANY_REQUESTS)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(
                json!({"error": {"message": "upstream says slow down", "type": "requests",
                                 "param": null, "code": "rate_limit_exceeded"}})
                .to_string(),
            ))
            .unwrap();
    }
    let text = if stream {
        sse_answer(model, responses, body)
    } else if responses {
        response_object(model).to_string()
    } else {
        json!({"id": "chatcmpl-up", "object": "chat.completion", "created": 1, "model": model,
               "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello there"},
                            "finish_reason": "stop"}],
               "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}})
        .to_string()
    };
    b = b.header(
        header::CONTENT_TYPE,
        if stream {
            "text/event-stream"
        } else {
            "application/json"
        },
    );
    let bytes = if model == "gz" {
        b = b.header(header::CONTENT_ENCODING, "gzip");
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(text.as_bytes()).unwrap();
        gz.finish().unwrap()
    } else {
        text.into_bytes()
    };
    b.body(Body::from(bytes)).unwrap()
}

fn response_object(model: &str) -> Value {
    json!({"id": "resp_upstream", "object": "response", "created_at": 1, "status": "completed",
           "model": model, "output": [{"type": "message", "id": "msg_up", "status": "completed",
           "role": "assistant", "content": [{"type": "output_text", "text": "Hello there", "annotations": []}]}],
           "usage": {"input_tokens": 5, "output_tokens": 2, "total_tokens": 7}})
}

fn sse_answer(model: &str, responses: bool, body: &Value) -> String {
    if responses {
        let r = response_object(model);
        return [
            json!({"type": "response.created", "sequence_number": 0,
                   "response": {"id": "resp_upstream", "object": "response", "status": "in_progress", "model": model, "output": []}}),
            json!({"type": "response.output_text.delta", "sequence_number": 1, "item_id": "msg_up",
                   "output_index": 0, "content_index": 0, "delta": "Hello there"}),
            json!({"type": "response.completed", "sequence_number": 2, "response": r}),
        ]
        .iter()
        .map(|e| format!("event: {}\ndata: {e}\n\n", e["type"].as_str().unwrap()))
        .collect();
    }
    let chunk = |delta: Value, finish: Value| {
        json!({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": model,
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
    };
    let mut events = vec![
        chunk(
            json!({"role": "assistant", "content": "Hello"}),
            Value::Null,
        ),
        chunk(json!({"content": " there"}), json!("stop")),
    ];
    if body["stream_options"]["include_usage"] == true {
        events.push(json!({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": model, "choices": [],
                           "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}));
    }
    let mut out: String = events.iter().map(|e| format!("data: {e}\n\n")).collect();
    out.push_str("data: [DONE]\n\n");
    out
}

struct World {
    app: TestApp,
    up: Upstream,
    /// The user's access token.
    user: String,
    /// A key without limits.
    key: String,
}

/// Catalog model → (provider, upstream model). `fwd` speaks the Responses API too, `fwdchat`
/// only chat completions. Each 429 model is its own deployment: a 429 cools its deployment down.
const MODELS: &[(&str, &str, &str)] = &[
    ("ok", "fwd", "ok"),
    ("gz", "fwd", "gz"),
    ("r429-a", "fwd", "r429a"),
    ("r429-b", "fwd", "r429b"),
    ("r429-c", "fwd", "r429c"),
    ("r429-d", "fwd", "r429d"),
    ("r429-e", "fwd", "r429e"),
    ("chat-only", "fwdchat", "ok"),
    ("chat-only-429", "fwdchat", "r429f"),
];

async fn world() -> World {
    let app = TestApp::spawn().await;
    let (up, base) = Upstream::start().await;
    let admin = admin_token(&app).await;
    let user = user_token(&app, "alice").await;
    for (key, responses) in [("fwd", true), ("fwdchat", false)] {
        let (s, b) = app
            .post(
                "/api/admin/providers",
                Some(&admin),
                json!({"key": key, "display_name": key, "base_url": base, "kind": "openai",
                       "supports_responses": responses}),
            )
            .await;
        assert_eq!(s, 201, "provider {key}: {b}");
        let (s, b) = app
            .post(
                "/api/provider-keys",
                Some(&user),
                json!({"provider": key, "api_key": PROVIDER_SECRET}),
            )
            .await;
        assert_eq!(s, 201, "provider key {key}: {b}");
    }
    for (name, provider, upstream) in MODELS {
        let (s, b) = app
            .post(
                "/api/admin/models",
                Some(&admin),
                json!({"name": name, "provider": provider, "upstream_model": upstream, "type": "chat",
                       "input_price_per_1m": 1.0, "output_price_per_1m": 2.0, "max_output_tokens": 100}),
            )
            .await;
        assert_eq!(s, 201, "model {name}: {b}");
    }
    let (key, _) = new_key(&app, &user, json!({"name": "unlimited"})).await;
    World { app, up, user, key }
}

impl World {
    async fn limited_key(&self, limits: Value) -> String {
        let mut body = json!({"name": "limited"});
        body.as_object_mut()
            .unwrap()
            .extend(limits.as_object().unwrap().clone());
        new_key(&self.app, &self.user, body).await.0
    }

    /// POSTs `body` to `path` with `key` and the client's request id; (status, headers, body).
    async fn post(&self, path: &str, key: &str, body: Value) -> (u16, HeaderMap, String) {
        let r = self
            .app
            .client
            .post(self.app.url(path))
            .bearer_auth(key)
            .header("x-request-id", CLIENT_REQUEST_ID)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        (status, headers, r.text().await.unwrap())
    }
}

fn chat(model: &str, stream: bool) -> Value {
    json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": "Hi"}]})
}

fn header_of<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).map(|v| v.to_str().unwrap())
}

/// Every [`PASSED`] header carries the upstream's value (`except` those the gateway replaces).
#[track_caller]
fn assert_passed(h: &HeaderMap, except: &[&str], what: &str) {
    for (name, value) in PASSED {
        if except.contains(&name) {
            continue;
        }
        assert_eq!(
            h.get_all(name)
                .iter()
                .map(|v| v.to_str().unwrap())
                .collect::<Vec<_>>(),
            [value],
            "{what}: {name} (once, the upstream's value); headers: {h:?}"
        );
    }
}

/// None of [`NOT_PASSED`] reached the client with the upstream's value, nor `content-encoding`.
#[track_caller]
fn assert_not_passed(h: &HeaderMap, what: &str) {
    for (name, value) in NOT_PASSED {
        assert!(
            h.get_all(name).iter().all(|v| v != value),
            "{what}: the upstream's {name} reached the client; headers: {h:?}"
        );
    }
    assert_eq!(
        header_of(h, "x-request-id"),
        Some(CLIENT_REQUEST_ID),
        "{what}: the gateway's request id (the client's, echoed)"
    );
    assert!(
        h.get("set-cookie").is_none() && h.get("keep-alive").is_none(),
        "{what}: {h:?}"
    );
    assert!(h.get(header::CONTENT_ENCODING).is_none(), "{what}: {h:?}");
}

/// The text of a chat answer, complete or streamed.
fn chat_text(body: &str, stream: bool) -> String {
    if !stream {
        let v: Value = serde_json::from_str(body).unwrap();
        return v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_owned();
    }
    body.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect()
}

/// A pass-through `/v1/chat/completions` success, complete and streamed: each §8 header comes
/// back once with the upstream's value; no other upstream header does.
#[tokio::test]
async fn chat_completions_pass_back_the_upstreams_rate_and_retry_headers() {
    let w = world().await;
    for stream in [false, true] {
        let what = format!("chat, stream {stream}");
        let (s, h, body) = w
            .post("/v1/chat/completions", &w.key, chat("ok", stream))
            .await;
        assert_eq!(s, 200, "{what}: {body}");
        assert_eq!(chat_text(&body, stream), "Hello there", "{what}");
        if stream {
            assert!(
                header_of(&h, "content-type")
                    .unwrap()
                    .starts_with("text/event-stream")
            );
        }
        assert_passed(&h, &[], &what);
        assert_not_passed(&h, &what);
    }
    assert_eq!(w.up.count("ok"), 2);
}

/// An upstream 429 (stream asked or not) is returned as the upstream sent it, with its
/// `retry-after`, `retry-after-ms`, `x-ratelimit-*` and `openai-processing-ms`, and nothing
/// else of its headers.
#[tokio::test]
async fn an_upstream_429_comes_back_with_its_retry_and_rate_headers() {
    let w = world().await;
    for (model, upstream, stream) in [("r429-a", "r429a", false), ("r429-b", "r429b", true)] {
        let what = format!("429, stream {stream}");
        let (s, h, body) = w
            .post("/v1/chat/completions", &w.key, chat(model, stream))
            .await;
        assert_eq!(s, 429, "{what}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["error"]["message"], "upstream says slow down", "{what}");
        assert_eq!(v["error"]["code"], "rate_limit_exceeded", "{what}");
        assert_passed(&h, &[], &what);
        assert_not_passed(&h, &what);
        assert_eq!(w.up.count(upstream), 1, "{what}");
    }
}

/// A key with its own limits (API.md §2, §8: "the gateway's own `x-ratelimit-*` win"; README:
/// they replace the upstream's): the client sees the gateway's `x-ratelimit-*` — none of the
/// upstream's, not even those the gateway has no value for — and still the upstream's
/// `retry-after`, `retry-after-ms` and `openai-processing-ms`, on successes and on a 429.
#[tokio::test]
async fn a_limited_keys_own_rate_headers_replace_the_upstreams() {
    let w = world().await;
    let both = w
        .limited_key(json!({"rpm_limit": 50, "tpm_limit": 100000}))
        .await;
    let rpm_only = w.limited_key(json!({"rpm_limit": 40})).await;
    let upstreams = PASSED
        .iter()
        .map(|p| p.0)
        .filter(|n| n.starts_with("x-ratelimit-"))
        .collect::<Vec<_>>();
    let both = (both.as_str(), "50", Some("100000"));
    let rpm_only = (rpm_only.as_str(), "40", None);
    let cases = [
        (both, "ok", false, 200),
        (both, "ok", true, 200),
        (rpm_only, "ok", false, 200),
        (rpm_only, "ok", true, 200),
        // Each 429 model once: its deployment cools down after it.
        (both, "r429-c", false, 429),
        (rpm_only, "r429-d", true, 429),
    ];
    for ((key, rpm, tpm), model, stream, status) in cases {
        let what = format!("{model}, stream {stream}, rpm {rpm}");
        let (s, h, body) = w
            .post("/v1/chat/completions", key, chat(model, stream))
            .await;
        assert_eq!(s, status, "{what}: {body}");
        assert_passed(&h, &upstreams, &what);
        assert_not_passed(&h, &what);
        // The gateway's: this key's limit and what is left of it, once each.
        let once = |name: &str| {
            let all: Vec<_> = h
                .get_all(name)
                .iter()
                .map(|v| v.to_str().unwrap())
                .collect();
            assert!(all.len() <= 1, "{what}: {name} twice: {all:?}");
            all.first().map(|v| (*v).to_owned())
        };
        assert_eq!(
            once("x-ratelimit-limit-requests").as_deref(),
            Some(rpm),
            "{what}"
        );
        let remaining: u32 = once("x-ratelimit-remaining-requests")
            .unwrap()
            .parse()
            .unwrap();
        assert!(remaining < rpm.parse().unwrap(), "{what}: {remaining}");
        assert_ne!(
            once("x-ratelimit-reset-requests").as_deref(),
            Some("12ms"),
            "{what}"
        );
        assert_eq!(once("x-ratelimit-limit-tokens").as_deref(), tpm, "{what}");
        if tpm.is_some() {
            assert_ne!(
                once("x-ratelimit-remaining-tokens").as_deref(),
                Some("799123"),
                "{what}"
            );
            assert_ne!(
                once("x-ratelimit-reset-tokens").as_deref(),
                Some("92ms"),
                "{what}"
            );
            assert!(h.contains_key("x-ratelimit-reset-tokens"), "{what}");
        } else {
            assert!(
                !h.contains_key("x-ratelimit-remaining-tokens")
                    && !h.contains_key("x-ratelimit-reset-tokens"),
                "{what}: no upstream token headers beside the gateway's: {h:?}"
            );
        }
        assert!(
            !h.contains_key("x-ratelimit-limit-project-tokens"),
            "{what}: the upstream's x-ratelimit-* are replaced, all of them: {h:?}"
        );
    }
    assert_eq!(w.up.count("ok"), 4);
}

/// An upstream that compresses although `identity` was asked for: the client gets the plain
/// body without `content-encoding` (README "OpenAI API": tollgate never relays encoded bytes),
/// and the §8 headers all the same, stream and not.
#[tokio::test]
async fn a_compressed_answer_is_decoded_and_its_content_encoding_not_passed_back() {
    let w = world().await;
    for stream in [false, true] {
        let what = format!("gzip, stream {stream}");
        let (s, h, body) = w
            .post("/v1/chat/completions", &w.key, chat("gz", stream))
            .await;
        assert_eq!(s, 200, "{what}: {body}");
        assert_eq!(chat_text(&body, stream), "Hello there", "{what}");
        assert!(h.get(header::CONTENT_ENCODING).is_none(), "{what}: {h:?}");
        assert_passed(&h, &[], &what);
        assert_not_passed(&h, &what);
    }
    assert_eq!(w.up.count("gz"), 2);
}

/// `/v1/responses` passed through to a Responses-capable upstream (`proxy::passthrough`): the
/// same rules, on a success (stream and not) and on a 429.
#[tokio::test]
async fn responses_passed_through_pass_back_the_same_headers() {
    let w = world().await;
    for stream in [false, true] {
        let what = format!("responses, stream {stream}");
        let (s, h, body) = w
            .post(
                "/v1/responses",
                &w.key,
                json!({"model": "ok", "input": "Hi", "stream": stream, "store": false}),
            )
            .await;
        assert_eq!(s, 200, "{what}: {body}");
        assert!(body.contains("Hello there"), "{what}: {body}");
        assert_passed(&h, &[], &what);
        assert_not_passed(&h, &what);
    }
    let (s, h, body) = w
        .post(
            "/v1/responses",
            &w.key,
            json!({"model": "r429-e", "input": "Hi", "store": false}),
        )
        .await;
    assert_eq!(s, 429, "{body}");
    assert_passed(&h, &[], "responses 429");
    assert_not_passed(&h, "responses 429");
    let paths: Vec<String> =
        w.up.seen
            .lock()
            .unwrap()
            .iter()
            .map(|r| r.0.clone())
            .collect();
    assert_eq!(paths, ["/v1/responses"; 3]);
}

/// `/v1/responses` translated to a chat-completions-only upstream (`proxy::translate`): §8's
/// rules are for every `/v1` route, so the upstream's headers come back here too, on a success
/// (stream and not) and on a 429 (its `retry-after` above all).
#[tokio::test]
async fn responses_translated_to_chat_pass_back_the_same_headers() {
    let w = world().await;
    for stream in [false, true] {
        let what = format!("translated responses, stream {stream}");
        let (s, h, body) = w
            .post(
                "/v1/responses",
                &w.key,
                json!({"model": "chat-only", "input": "Hi", "stream": stream, "store": false}),
            )
            .await;
        assert_eq!(s, 200, "{what}: {body}");
        assert!(body.contains("Hello"), "{what}: {body}");
        assert_not_passed(&h, &what);
        assert_passed(&h, &[], &what);
    }
    let (s, h, body) = w
        .post(
            "/v1/responses",
            &w.key,
            json!({"model": "chat-only-429", "input": "Hi", "store": false}),
        )
        .await;
    assert_eq!(s, 429, "{body}");
    assert_not_passed(&h, "translated responses 429");
    assert_passed(&h, &[], "translated responses 429");
    assert_eq!(w.up.count("ok"), 2);
    assert_eq!(w.up.count("r429f"), 1);
}
