//! What a client and a hostile or careless upstream can say on the wire, end to end: bodies that
//! repeat a field the gateway decides on, a streamed event that never ends, compressed answers,
//! an answer larger than the gateway holds, and the meaning of the rate-limit reset headers.
//!
//! The upstream here is a scripted one of this file's own (its behaviour is the upstream model
//! name), registered beside the shared mock as the provider `rogue`.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, header};
use axum::response::Response;
use bytes::Bytes;
use common::gateway::{Gateway, new_key, setup, wait_records};
use common::{TestApp, assert_error};
use serde_json::{Value, json};

/// The gzip encoding of `data` (one member).
fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).expect("gzip");
    e.finish().expect("gzip")
}

const MIB: usize = 1024 * 1024;

/// What the rogue upstream was sent.
#[derive(Default)]
struct Seen {
    requests: Mutex<Vec<(HeaderMap, Value)>>,
}

fn chunk(model: &str, content: &str) -> String {
    let c = json!({"id": "c", "object": "chat.completion.chunk", "model": model,
                   "choices": [{"index": 0, "delta": {"content": content}}]});
    format!("data: {c}\n\n")
}

fn usage_json() -> Value {
    json!({"prompt_tokens": 13, "completion_tokens": 5, "total_tokens": 18})
}

async fn rogue(State(seen): State<Arc<Seen>>, headers: HeaderMap, body: Bytes) -> Response {
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    seen.requests
        .lock()
        .expect("lock")
        .push((headers, body.clone()));
    let model = body["model"].as_str().unwrap_or_default().to_owned();
    let stream = body["stream"].as_bool().unwrap_or(false);
    let sse = |b: Body| {
        Response::builder()
            .header(header::CONTENT_TYPE, "text/event-stream")
            .body(b)
            .expect("response")
    };
    match model.as_str() {
        // One ordinary event, then a `data:` line of 100 MB that never ends, in 64 KiB writes.
        "endless" => {
            let first = Bytes::from(chunk(&model, "Hello there"));
            let start =
                Bytes::from_static(b"data: {\"id\":\"c\",\"choices\":[{\"delta\":{\"content\":\"");
            let filler = Bytes::from(vec![b'x'; 64 * 1024]);
            let parts = [first, start]
                .into_iter()
                .chain(std::iter::repeat_n(filler, 100 * MIB / (64 * 1024)))
                .map(Ok::<_, std::io::Error>);
            sse(Body::from_stream(futures_util::stream::iter(parts)))
        }
        // Compressed whatever the request said.
        "gzip" => {
            let plain = if stream {
                let mut s = String::new();
                for w in ["Hello", " from", " gzip"] {
                    s.push_str(&chunk(&model, w));
                }
                let u = json!({"id": "c", "model": model, "choices": [], "usage": usage_json()});
                s.push_str(&format!("data: {u}\n\ndata: [DONE]\n\n"));
                s.into_bytes()
            } else {
                serde_json::to_vec(&json!({
                    "id": "x", "object": "chat.completion", "model": model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello from gzip"}}],
                    "usage": usage_json()
                }))
                .expect("json")
            };
            Response::builder()
                .header(
                    header::CONTENT_TYPE,
                    if stream {
                        "text/event-stream"
                    } else {
                        "application/json"
                    },
                )
                .header(header::CONTENT_ENCODING, "gzip")
                .body(Body::from(gzip(&plain)))
                .expect("response")
        }
        // 65 MiB once decoded, about 65 KiB on the wire, in 4 KiB writes.
        "bomb" => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            let spaces = vec![b' '; MIB];
            for _ in 0..65 {
                e.write_all(&spaces).expect("gzip");
            }
            let packed = Bytes::from(e.finish().expect("gzip"));
            let parts: Vec<_> = (0..packed.len())
                .step_by(4096)
                .map(|i| Ok::<_, std::io::Error>(packed.slice(i..(i + 4096).min(packed.len()))))
                .collect();
            Response::builder()
                .header(header::CONTENT_TYPE, "application/json")
                .header(header::CONTENT_ENCODING, "gzip")
                .body(Body::from_stream(futures_util::stream::iter(parts)))
                .expect("response")
        }
        // 65 MiB, plain.
        "huge" => {
            let part = Bytes::from(vec![b' '; MIB]);
            let parts = std::iter::repeat_n(part, 65).map(Ok::<_, std::io::Error>);
            Response::builder()
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from_stream(futures_util::stream::iter(parts)))
                .expect("response")
        }
        // An encoding the gateway does not read.
        "compress" => Response::builder()
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::CONTENT_ENCODING, "x-unknown")
            .body(Body::from("\u{1}\u{2}\u{3}"))
            .expect("response"),
        _ => Response::builder()
            .status(400)
            .body(Body::from("unknown behaviour"))
            .expect("response"),
    }
}

struct Rogue {
    seen: Arc<Seen>,
}

impl Rogue {
    fn requests(&self) -> Vec<(HeaderMap, Value)> {
        self.seen.requests.lock().expect("lock").clone()
    }
}

/// The shared gateway set-up plus the `rogue` provider, its models (`gpt-<behaviour>`) and the
/// user's key for it.
async fn with_rogue(app: &TestApp) -> (Gateway, Rogue) {
    let gw = setup(app).await;
    let seen = Arc::new(Seen::default());
    let router = Router::new().fallback(rogue).with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    let (s, b) = app
        .post(
            "/api/admin/providers",
            Some(&gw.admin),
            json!({"key": "rogue", "display_name": "Rogue", "base_url": format!("http://{addr}/v1"), "kind": "openai"}),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    for behaviour in ["endless", "gzip", "bomb", "huge", "compress"] {
        let (s, b) = app
            .post(
                "/api/admin/models",
                Some(&gw.admin),
                json!({"name": format!("gpt-{behaviour}"), "provider": "rogue", "upstream_model": behaviour,
                       "type": "chat", "input_price_per_1m": 1.0, "output_price_per_1m": 2.0}),
            )
            .await;
        assert_eq!(s, 201, "{b}");
    }
    let (s, b) = app
        .post(
            "/api/provider-keys",
            Some(&gw.user),
            json!({"provider": "rogue", "api_key": "sk-rogue-0123456789"}),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    (gw, Rogue { seen })
}

async fn send(app: &TestApp, key: &str, body: &str) -> reqwest::Response {
    app.client
        .post(app.url("/v1/chat/completions"))
        .bearer_auth(key)
        .header("content-type", "application/json")
        .body(body.to_owned())
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

// ---- issue 18 item 2: a repeated decided field ------------------------------------------------

#[tokio::test]
async fn a_body_repeating_a_decided_field_is_refused_before_anything_is_reserved_or_sent() {
    let app = TestApp::spawn().await;
    let gw = setup(&app).await;
    for (body, param) in [
        (
            r#"{"model":"gpt-test","max_tokens":1,"messages":[],"max_tokens":2000000}"#,
            "max_tokens",
        ),
        (
            r#"{"model":"gpt-test","messages":[],"model":"gpt-cached"}"#,
            "model",
        ),
        (
            r#"{"model":"gpt-test","stream":false,"messages":[],"stream":true}"#,
            "stream",
        ),
        (r#"{"model":"gpt-test","n":1,"n":100}"#, "n"),
        (
            r#"{"model":"gpt-test","max_completion_tokens":1,"max_completion_tokens":9}"#,
            "max_completion_tokens",
        ),
        (
            r#"{"model":"gpt-test","stream":true,"stream_options":{"include_usage":true},"stream_options":{}}"#,
            "stream_options",
        ),
    ] {
        let r = send(&app, &gw.key, body).await;
        let status = r.status().as_u16();
        let b: Value = r.json().await.expect("json");
        assert_error(status, &b, 400, "invalid_json");
        assert_eq!(b["error"]["param"], param, "{body}: {b}");
    }
    // Bounds an upstream could still read as a number are refused, not ignored.
    for body in [
        r#"{"model":"gpt-test","max_tokens":1e6}"#,
        r#"{"model":"gpt-test","max_tokens":-1}"#,
        r#"{"model":"gpt-test","max_tokens":"5"}"#,
    ] {
        let r = send(&app, &gw.key, body).await;
        let status = r.status().as_u16();
        let b: Value = r.json().await.expect("json");
        assert_error(status, &b, 400, "invalid_value");
        assert_eq!(b["error"]["param"], "max_tokens", "{body}: {b}");
    }
    // Nothing reached the upstream, nothing was metered.
    assert!(gw.mock.requests().is_empty());
    let (_, b) = app.get("/api/me/usage/records", Some(&gw.user)).await;
    assert_eq!(b["total"], 0, "{b}");
    // A body the gateway accepts reaches the upstream meaning the same.
    let r = send(
        &app,
        &gw.key,
        r#"{"model":"gpt-test","max_tokens":7,"n":2,"temperature":1,"temperature":0}"#,
    )
    .await;
    assert_eq!(r.status(), 200);
    let up = gw.mock.last();
    assert_eq!(
        (&up.body["max_tokens"], &up.body["n"]),
        (&json!(7), &json!(2))
    );
}

// ---- item 7: an SSE event that never ends ------------------------------------------------------

#[tokio::test]
async fn an_endless_sse_line_ends_the_stream_with_an_error_event_and_one_usage_record() {
    let app = TestApp::spawn().await;
    let (gw, _rogue) = with_rogue(&app).await;
    let r = send(
        &app,
        &gw.key,
        r#"{"model":"gpt-endless","stream":true,"messages":[{"role":"user","content":"hi"}]}"#,
    )
    .await;
    assert_eq!(r.status(), 200);
    let text = r.text().await.expect("the stream ends");
    assert!(
        text.len() < 64 * 1024,
        "none of the endless line is relayed ({} bytes)",
        text.len()
    );
    let data = sse_data(&text);
    assert!(text.contains("Hello there"), "what came before it: {text}");
    let last: Value = serde_json::from_str(data.last().expect("events")).expect("json");
    assert_eq!(last["error"]["type"], "upstream_error", "{text}");
    assert_eq!(last["error"]["code"], "upstream_event_too_large", "{text}");
    let recs = wait_records(&app, &gw.user, 1).await;
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0]["status"], 502, "{}", recs[0]);
    assert_eq!(recs[0]["tokens_estimated"], true, "{}", recs[0]);
    assert!(
        recs[0]["completion_tokens"].as_i64().unwrap_or(0) >= 1,
        "what was relayed is metered: {}",
        recs[0]
    );
}

// ---- item 15: compressed upstream answers ------------------------------------------------------

#[tokio::test]
async fn a_compressing_upstream_is_asked_for_identity_and_decoded_for_client_and_meter() {
    let app = TestApp::spawn().await;
    let (gw, rogue) = with_rogue(&app).await;

    let r = send(
        &app,
        &gw.key,
        r#"{"model":"gpt-gzip","messages":[{"role":"user","content":"hi"}]}"#,
    )
    .await;
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("content-encoding").is_none());
    // The body is valid for its headers: plain JSON.
    let b: Value = r.json().await.expect("plain JSON");
    assert_eq!(b["choices"][0]["message"]["content"], "Hello from gzip");
    assert_eq!(b["model"], "gpt-gzip");
    let (headers, _) = rogue.requests().pop().expect("a request");
    assert_eq!(headers["accept-encoding"], "identity");

    let r = send(
        &app,
        &gw.key,
        r#"{"model":"gpt-gzip","stream":true,"messages":[{"role":"user","content":"hi"}]}"#,
    )
    .await;
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("content-encoding").is_none());
    let text = r.text().await.expect("text");
    let content: String = sse_data(&text)
        .iter()
        .filter(|d| *d != "[DONE]")
        .map(|d| {
            let v: Value = serde_json::from_str(d).expect("plain SSE");
            v["choices"][0]["delta"]["content"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    assert_eq!(content, "Hello from gzip", "{text}");

    // Both metered from the upstream's usage, not estimated.
    let recs = wait_records(&app, &gw.user, 2).await;
    for rec in &recs {
        assert_eq!(rec["tokens_estimated"], false, "{rec}");
        assert_eq!(
            (
                rec["prompt_tokens"].as_i64(),
                rec["completion_tokens"].as_i64()
            ),
            (Some(13), Some(5)),
            "{rec}"
        );
    }

    // An encoding the gateway cannot read is not relayed as if it were plain.
    let r = send(&app, &gw.key, r#"{"model":"gpt-compress","messages":[]}"#).await;
    let status = r.status().as_u16();
    let b: Value = r.json().await.expect("json");
    assert_error(status, &b, 502, "upstream_bad_encoding");
}

#[tokio::test]
async fn an_upstream_answer_over_64_mib_is_refused_plain_or_decoded() {
    let app = TestApp::spawn().await;
    let (gw, _rogue) = with_rogue(&app).await;
    for model in ["gpt-huge", "gpt-bomb"] {
        let r = send(
            &app,
            &gw.key,
            &format!(r#"{{"model":"{model}","messages":[]}}"#),
        )
        .await;
        let status = r.status().as_u16();
        let b: Value = r.json().await.expect("json");
        assert_eq!(b["error"]["code"], "upstream_error", "{model}: {b}");
        assert_error(status, &b, 502, "upstream_error");
        assert!(
            b["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("too large")),
            "{model}: {b}"
        );
    }
    let recs = wait_records(&app, &gw.user, 2).await;
    assert!(recs.iter().all(|r| r["status"] == 502), "{recs:?}");
}

// ---- item 16: x-ratelimit-reset-requests -------------------------------------------------------

/// `1m0s` → 60.
fn reset_secs(h: &reqwest::header::HeaderMap, name: &str) -> u64 {
    let v = h[name].to_str().expect("ASCII");
    let v = v.strip_suffix('s').expect("ends in s");
    match v.split_once('m') {
        Some((m, s)) => m.parse::<u64>().expect("minutes") * 60 + s.parse::<u64>().expect("secs"),
        None => v.parse().expect("secs"),
    }
}

#[tokio::test]
async fn rate_limit_reset_means_full_again_on_successes_and_429s_alike() {
    let app = TestApp::spawn().await;
    let gw = setup(&app).await;
    let (key, _) = new_key(&app, &gw.user, json!({"name": "two", "rpm_limit": 2})).await;
    let body = r#"{"model":"gpt-test","messages":[]}"#;
    let r = send(&app, &key, body).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-ratelimit-remaining-requests"], "1");
    // One used: full again after one interval (60 s / 2).
    assert_eq!(reset_secs(r.headers(), "x-ratelimit-reset-requests"), 30);
    let r = send(&app, &key, body).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-ratelimit-remaining-requests"], "0");
    // The last one used: full again after both intervals.
    let last_allowed = reset_secs(r.headers(), "x-ratelimit-reset-requests");
    assert_eq!(last_allowed, 60);

    let r = send(&app, &key, body).await;
    assert_eq!(r.status(), 429);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .expect("ASCII")
        .parse()
        .expect("seconds");
    let reset = reset_secs(r.headers(), "x-ratelimit-reset-requests");
    // `retry-after`: until the next request is allowed (one interval, less what has passed).
    assert!((1..=30).contains(&retry), "retry-after {retry}");
    // The reset header keeps its meaning: until full again, the next request's interval plus
    // the other one — never more than the last allowed response said.
    assert!(reset <= last_allowed, "reset {reset} > {last_allowed}");
    assert!(
        (retry + 29..=retry + 30).contains(&reset),
        "reset {reset}, retry-after {retry}"
    );
    assert_eq!(r.headers()["x-ratelimit-remaining-requests"], "0");
}
