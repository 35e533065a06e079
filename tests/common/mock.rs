//! A scripted OpenAI-compatible upstream on 127.0.0.1:0. The behaviour is chosen by the upstream
//! model name the gateway sends: `normal`, `cached`, `nousage`, `slow`, `cut`, `hang`, `err400`,
//! `err500`, `embed`, `tool` (a chat completion that calls the request's first function tool, or
//! `get_weather`, with `{"city":"Paris"}` — unless the last message is a tool result, which is
//! answered with text). Every request is recorded (path, headers, JSON body) for assertions.
//!
//! Faults, for routing: `fail503` (always 503), `r429` (429 with `retry-after: 1`), `r429bare`
//! (429 without it), `auth401`, `reset` (the connection closes before any response head),
//! `stall` (no response head for 30 s), `ctx400` (400 `context_length_exceeded`), and `flaky`:
//! bursts of five failures (503, a reset, 500, 502, then a 429 with `retry-after: 1`: four in a
//! row before the cool-down when requests come one at a time — concurrent ones can finish a
//! burst's answers between its failures) then five answers — half its requests fail — until
//! [`Mock::heal`]. [`Mock::count`] counts the requests per model.
//!
//! `held`: a streamed answer in Markdown ([`HELD_HEAD`], then [`HELD_TAIL`]) that stops after its
//! head until the test says how it ends: [`Mock::release_held`] sends the rest, usage and
//! `[DONE]`; [`Mock::break_held`] breaks the connection instead. [`Mock::held_waiting`] counts
//! the streams stopped there so far. Not streamed, it answers at once as `normal` does.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::{Value, json};

#[derive(Debug, Clone)]
pub struct Recorded {
    pub path: String,
    /// The query string, if the request had one.
    pub query: Option<String>,
    pub headers: HeaderMap,
    pub body: Value,
    /// The body exactly as received (multipart uploads are not JSON).
    pub raw: Bytes,
}

struct Inner {
    requests: Mutex<Vec<Recorded>>,
    /// Streams whose body was dropped before it finished (the gateway cancelled them).
    cancelled: AtomicUsize,
    finished: AtomicUsize,
    /// `flaky` requests so far.
    flaky: AtomicUsize,
    /// `flaky` answers every request from now on.
    healed: std::sync::atomic::AtomicBool,
    /// Requests whose body had begun to arrive (counted at its first bytes, before the rest).
    bodies_started: AtomicUsize,
    speech_gate: super::media_mock::SpeechGate,
    /// How each `held` stream ends, in order: `true` finishes it, `false` breaks it.
    held_tx: tokio::sync::mpsc::UnboundedSender<bool>,
    held_rx: tokio::sync::Mutex<tokio::sync::mpsc::UnboundedReceiver<bool>>,
    /// `held` streams that reached the hold.
    held_waiting: AtomicUsize,
}

impl Default for Inner {
    fn default() -> Self {
        let (held_tx, held_rx) = tokio::sync::mpsc::unbounded_channel();
        Self {
            requests: Mutex::default(),
            cancelled: AtomicUsize::default(),
            finished: AtomicUsize::default(),
            flaky: AtomicUsize::default(),
            healed: std::sync::atomic::AtomicBool::default(),
            bodies_started: AtomicUsize::default(),
            speech_gate: super::media_mock::SpeechGate::default(),
            held_tx,
            held_rx: tokio::sync::Mutex::new(held_rx),
            held_waiting: AtomicUsize::default(),
        }
    }
}

#[derive(Clone)]
pub struct Mock {
    pub addr: SocketAddr,
    inner: Arc<Inner>,
}

impl Mock {
    pub async fn start() -> Self {
        let inner = Arc::new(Inner::default());
        let app = Router::new()
            .fallback(handle)
            .layer(axum::extract::DefaultBodyLimit::disable())
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind mock");
        let addr = listener.local_addr().expect("mock addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { addr, inner }
    }

    /// The base URL to register as a provider.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.inner.requests.lock().expect("lock").clone()
    }

    pub fn last(&self) -> Recorded {
        self.requests().pop().expect("the mock received a request")
    }

    pub fn cancelled(&self) -> usize {
        self.inner.cancelled.load(Ordering::SeqCst)
    }

    pub fn finished(&self) -> usize {
        self.inner.finished.load(Ordering::SeqCst)
    }

    /// `flaky` stops failing.
    pub fn heal(&self) {
        self.inner.healed.store(true, Ordering::SeqCst);
    }

    /// Requests received for this upstream model.
    pub fn count(&self, model: &str) -> usize {
        self.requests()
            .iter()
            .filter(|r| r.body["model"] == model)
            .count()
    }

    /// Requests whose body had begun to arrive.
    pub fn bodies_started(&self) -> usize {
        self.inner.bodies_started.load(Ordering::SeqCst)
    }

    /// The next `held` stream (or the one waiting now) sends the rest of its answer.
    pub fn release_held(&self) {
        self.inner.held_tx.send(true).expect("mock running");
    }

    /// The next `held` stream (or the one waiting now) breaks its connection after its head.
    pub fn break_held(&self) {
        self.inner.held_tx.send(false).expect("mock running");
    }

    /// `held` streams that have sent their head and stopped (so far, in all).
    pub fn held_waiting(&self) -> usize {
        self.inner.held_waiting.load(Ordering::SeqCst)
    }

    /// Holds the `tts-held` behaviour's audio after its first chunk.
    pub fn speech_gate(&self) -> super::media_mock::SpeechGate {
        self.inner.speech_gate.clone()
    }
}

/// Ends the connection without a response: the handler's task unwinds and hyper drops the
/// socket. The panic message is recognised and silenced by [`quiet_resets`].
fn reset() -> ! {
    quiet_resets();
    std::panic::panic_any(RESET)
}

const RESET: &str = "mock: connection reset";

fn quiet_resets() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if info.payload().downcast_ref::<&str>() != Some(&RESET) {
                previous(info);
            }
        }));
    });
}

fn status_error(status: StatusCode, code: &str, retry_after: Option<&str>) -> Response {
    let mut resp = (
        status,
        axum::Json(json!({"error": {"message": format!("mock {code}"), "type": "server_error", "param": null, "code": code}})),
    )
        .into_response();
    if let Some(r) = retry_after {
        resp.headers_mut()
            .insert("retry-after", r.parse().expect("header"));
    }
    resp
}

/// Counts how a streamed body ended.
struct Guard {
    inner: Arc<Inner>,
    done: bool,
}

impl Guard {
    fn mark_done(&mut self) {
        self.done = true;
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let c = if self.done {
            &self.inner.finished
        } else {
            &self.inner.cancelled
        };
        c.fetch_add(1, Ordering::SeqCst);
    }
}

fn usage(cached: bool) -> Value {
    let mut u = json!({"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18});
    if cached {
        u["prompt_tokens_details"] = json!({"cached_tokens": 4});
    }
    u
}

const WORDS: [&str; 3] = ["Hello", " from", " mock"];

/// The `held` behaviour's answer up to its hold, in the pieces it streams.
pub const HELD_HEAD: [&str; 3] = ["Hello", " from the", " **held** mock."];
/// The rest of the `held` answer: a code block, and markup that must not run.
pub const HELD_TAIL: &str = " The end.\n\n```rust\nfn main() {}\n```\n\n<img src=x onerror=\"window.__xss=7\"><script>window.__xss=8</script>";

/// What the `tool` behaviour calls: the call's id and its arguments, in the pieces a stream sends.
pub const TOOL_CALL_ID: &str = "call_mock_1";
pub const TOOL_ARGS: [&str; 2] = ["{\"city\":", "\"Paris\"}"];

async fn handle(
    State(inner): State<Arc<Inner>>,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    // Read as it comes, so a test can see an upload begin before the client has sent it all.
    let mut raw = Vec::new();
    let mut frames = body.into_data_stream();
    while let Some(chunk) = frames.next().await {
        let Ok(chunk) = chunk else { break };
        if raw.is_empty() && !chunk.is_empty() {
            inner.bodies_started.fetch_add(1, Ordering::SeqCst);
        }
        raw.extend_from_slice(&chunk);
    }
    let raw = Bytes::from(raw);
    let body: Value = serde_json::from_slice(&raw).unwrap_or(Value::Null);
    inner.requests.lock().expect("lock").push(Recorded {
        path: uri.path().to_owned(),
        query: uri.query().map(str::to_owned),
        headers: headers.clone(),
        body: body.clone(),
        raw: raw.clone(),
    });
    if let Some(resp) =
        super::media_mock::answer(uri.path(), &headers, &body, &raw, &inner.speech_gate)
    {
        return resp;
    }
    let model = body["model"].as_str().unwrap_or_default().to_owned();
    let stream = body["stream"].as_bool().unwrap_or(false);
    let include_usage = body["stream_options"]["include_usage"]
        .as_bool()
        .unwrap_or(false);
    let behaviour = model.split(':').next().unwrap_or_default().to_owned();
    let chat = uri.path().ends_with("/chat/completions");
    let behaviour = if behaviour == "flaky" {
        let n = inner.flaky.fetch_add(1, Ordering::SeqCst);
        if inner.healed.load(Ordering::SeqCst) || n % 10 >= 5 {
            "normal".to_owned()
        } else {
            ["fail503", "reset", "fail500", "fail502", "r429"][n % 5].to_owned()
        }
    } else {
        behaviour
    };
    match behaviour.as_str() {
        "fail503" => return status_error(StatusCode::SERVICE_UNAVAILABLE, "overloaded", None),
        "fail500" => return status_error(StatusCode::INTERNAL_SERVER_ERROR, "boom", None),
        "fail502" => return status_error(StatusCode::BAD_GATEWAY, "bad_gateway", None),
        "r429" => {
            return status_error(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_exceeded",
                Some("1"),
            );
        }
        "r429bare" => {
            return status_error(StatusCode::TOO_MANY_REQUESTS, "rate_limit_exceeded", None);
        }
        "auth401" => return status_error(StatusCode::UNAUTHORIZED, "invalid_api_key", None),
        "ctx400" => {
            return (
                StatusCode::BAD_REQUEST,
                axum::Json(json!({"error": {"message": "This model's maximum context length is 8 tokens.", "type": "invalid_request_error", "param": "messages", "code": "context_length_exceeded"}})),
            )
                .into_response();
        }
        "reset" => reset(),
        "stall" => {
            tokio::time::sleep(Duration::from_secs(30)).await;
        }
        "err400" => {
            return (
                StatusCode::BAD_REQUEST,
                axum::Json(json!({"error": {"message": "bad thing", "type": "invalid_request_error", "param": "messages", "code": "upstream_says_no"}})),
            )
                .into_response();
        }
        "err500" => {
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                axum::Json(json!({"error": {"message": "boom", "type": "server_error", "param": null, "code": null}})),
            )
                .into_response();
        }
        "hang" => {
            tokio::time::sleep(Duration::from_secs(30)).await;
        }
        _ => {}
    }
    if uri.path().ends_with("/embeddings") {
        return axum::Json(json!({
            "object": "list",
            "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2, 0.3]}],
            "model": model,
            "usage": {"prompt_tokens": 5, "total_tokens": 5}
        }))
        .into_response();
    }
    let with_usage = behaviour != "nousage";
    let cached = behaviour == "cached";
    // `tool`: call a function unless the conversation already ends with a tool result.
    let tool_call = (chat && behaviour == "tool" && {
        let last = body["messages"].as_array().and_then(|m| m.last());
        last.is_none_or(|m| m["role"] != "tool")
    })
    .then(|| {
        body["tools"][0]["function"]["name"]
            .as_str()
            .unwrap_or("get_weather")
            .to_owned()
    });
    if !stream {
        let choice = if let Some(name) = &tool_call {
            json!({"index": 0, "message": {"role": "assistant", "content": null, "tool_calls": [
                {"id": TOOL_CALL_ID, "type": "function", "function": {"name": name, "arguments": TOOL_ARGS.concat()}}
            ]}, "finish_reason": "tool_calls"})
        } else if chat {
            json!({"index": 0, "message": {"role": "assistant", "content": WORDS.concat()}, "finish_reason": "stop"})
        } else {
            json!({"index": 0, "text": WORDS.concat(), "finish_reason": "stop"})
        };
        let mut resp = json!({
            "id": "cmpl-mock", "object": if chat { "chat.completion" } else { "text_completion" },
            "created": 1_700_000_000, "model": model, "choices": [choice]
        });
        if with_usage {
            resp["usage"] = usage(cached);
        }
        return axum::Json(resp).into_response();
    }

    let delay = match behaviour.as_str() {
        "slow" => Duration::from_millis(100),
        "cut" => Duration::from_millis(30),
        _ => Duration::ZERO,
    };
    let cut = behaviour == "cut";
    let held = behaviour == "held";
    let sse = |chunk: Value| format!("data: {chunk}\n\n").into_bytes();
    let mut events: Vec<Vec<u8>> = if let Some(name) = &tool_call {
        // The call's id and name first, the arguments in pieces, then the finish reason.
        let mut ev = vec![sse(
            json!({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": model,
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": null, "tool_calls": [
                {"index": 0, "id": TOOL_CALL_ID, "type": "function", "function": {"name": name, "arguments": ""}}]},
                "finish_reason": null}]}),
        )];
        for piece in TOOL_ARGS {
            ev.push(sse(json!({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": model,
                "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]},
                "finish_reason": null}]})));
        }
        ev.push(sse(
            json!({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": model,
            "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}),
        ));
        ev
    } else if held && chat {
        HELD_HEAD
            .iter()
            .chain(std::iter::once(&HELD_TAIL))
            .map(|w| {
                let chunk = json!({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": model,
                    "choices": [{"index": 0, "delta": {"content": w}, "finish_reason": null}]});
                format!("data: {chunk}\n\n").into_bytes()
            })
            .collect()
    } else {
        WORDS
        .iter()
        .map(|w| {
            let choice = if chat {
                json!({"index": 0, "delta": {"content": w}, "finish_reason": null})
            } else {
                json!({"index": 0, "text": w, "finish_reason": null})
            };
            let chunk = json!({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": model, "choices": [choice]});
            format!("data: {chunk}\n\n").into_bytes()
        })
        .collect()
    };
    if behaviour == "slow" {
        // A long stream: 30 more chunks.
        for _ in 0..30 {
            let chunk = json!({"id": "c", "model": model, "choices": [{"index": 0, "delta": {"content": " more"}}]});
            events.push(format!("data: {chunk}\n\n").into_bytes());
        }
    }
    if with_usage && include_usage {
        let chunk = json!({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": model, "choices": [], "usage": usage(cached)});
        events.push(format!("data: {chunk}\n\n").into_bytes());
    }
    events.push(b"data: [DONE]\n\n".to_vec());
    let total = events.len();
    let guard = Guard {
        inner: inner.clone(),
        done: false,
    };
    let s = futures_util::stream::unfold((0usize, events, guard), move |(i, events, mut guard)| {
        let inner = inner.clone();
        async move {
            if i >= total {
                guard.mark_done();
                return None;
            }
            if held && chat && i == HELD_HEAD.len() {
                inner.held_waiting.fetch_add(1, Ordering::SeqCst);
                let finish = inner.held_rx.lock().await.recv().await.unwrap_or(false);
                if !finish {
                    guard.mark_done();
                    return Some((
                        Err::<Bytes, std::io::Error>(std::io::Error::other("held: broken")),
                        (total, events, guard),
                    ));
                }
            }
            if cut && i == 2 {
                // Let what was sent reach the gateway before the connection breaks.
                tokio::time::sleep(Duration::from_millis(100)).await;
                guard.mark_done();
                return Some((
                    Err::<Bytes, std::io::Error>(std::io::Error::other("cut")),
                    (total, events, guard),
                ));
            }
            if !delay.is_zero() && (i > 0 || cut) {
                tokio::time::sleep(delay).await;
            }
            Some((Ok(Bytes::from(events[i].clone())), (i + 1, events, guard)))
        }
    })
    .boxed();
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .body(Body::from_stream(s))
        .expect("response")
}
