//! Scripted upstreams of the non-OpenAI kinds (Gemini, Azure OpenAI, Bedrock), each
//! recording what it received, with the gateway helpers the provider tests share
//! (`tests/providers_e2e.rs`, and the SDK matrix in `tests/sdk.rs`).

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde_json::{Value, json};
use tollgate::providers::bedrock::sigv4;

use super::TestApp;
use super::gateway::{self, Gateway};

pub const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

pub fn fixture(path: &str) -> String {
    std::fs::read_to_string(format!("{FIXTURES}/{path}")).expect("fixture")
}

// ---------------------------------------------------------------- a recording upstream

/// One request as the upstream received it.
#[derive(Debug, Clone)]
pub struct Seen {
    /// The path as sent on the wire (percent-encoding kept).
    pub path: String,
    pub query: Option<String>,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Seen {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// No header carries the gateway key.
    #[track_caller]
    pub fn assert_no_gateway_key(&self, key: &str) {
        for (name, v) in &self.headers {
            assert!(
                !v.as_bytes().windows(key.len()).any(|w| w == key.as_bytes()),
                "the gateway key reached the upstream in {name}"
            );
        }
        assert!(
            !self.body.windows(key.len()).any(|w| w == key.as_bytes()),
            "the gateway key reached the upstream in the body"
        );
    }
}

pub type Handler = fn(&Seen) -> Response;

/// A scripted upstream: `handler` answers, every request is recorded.
#[derive(Clone)]
pub struct Upstream {
    pub seen: Arc<Mutex<Vec<Seen>>>,
    /// `http://127.0.0.1:<port>`.
    pub addr: String,
}

impl Upstream {
    pub async fn start(handler: Handler) -> Self {
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let s2 = seen.clone();
        let app = Router::new().fallback(move |uri: Uri, headers: HeaderMap, body: Bytes| {
            let seen = s2.clone();
            async move {
                let s = Seen {
                    path: uri.path().to_owned(),
                    query: uri.query().map(str::to_owned),
                    headers,
                    body,
                };
                seen.lock().expect("lock").push(s.clone());
                handler(&s)
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            seen,
            addr: format!("http://{addr}"),
        }
    }

    pub fn count(&self) -> usize {
        self.seen.lock().expect("lock").len()
    }

    pub fn last(&self) -> Seen {
        self.seen
            .lock()
            .expect("lock")
            .last()
            .cloned()
            .expect("a request reached the upstream")
    }
}

pub fn json_response(status: u16, body: Value) -> Response {
    (
        StatusCode::from_u16(status).expect("status"),
        axum::Json(body),
    )
        .into_response()
}

pub fn sse_response(text: String) -> Response {
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .body(Body::from(text))
        .expect("response")
}

// ---------------------------------------------------------------- gateway helpers

/// A provider (`provider["key"]`), its models `(name, upstream_model, type)`, and the user's
/// key for it.
pub async fn add_provider(
    app: &TestApp,
    g: &Gateway,
    provider: Value,
    models: &[(&str, &str, &str)],
    secret: &str,
) {
    let (s, b) = app
        .post("/api/admin/providers", Some(&g.admin), provider.clone())
        .await;
    assert_eq!(s, 201, "provider {provider}: {b}");
    for (name, upstream, kind) in models {
        let (s, b) = app
            .post(
                "/api/admin/models",
                Some(&g.admin),
                json!({"name": name, "provider": provider["key"], "upstream_model": upstream, "type": kind,
                       "input_price_per_1m": 1.0, "output_price_per_1m": 2.0,
                       "cached_input_price_per_1m": 0.5, "max_output_tokens": 1000}),
            )
            .await;
        assert_eq!(s, 201, "model {name}: {b}");
    }
    let (s, b) = app
        .post(
            "/api/provider-keys",
            Some(&g.user),
            json!({"provider": provider["key"], "api_key": secret}),
        )
        .await;
    assert_eq!(s, 201, "provider key: {b}");
}

pub async fn post_raw(
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

/// `POST path` with the gateway key as a bearer token; the JSON answer (`null` if none).
pub async fn call(app: &TestApp, key: &str, path: &str, body: Value) -> (u16, String) {
    let (s, _, text) = post_raw(
        app,
        path,
        &[("authorization", &format!("Bearer {key}"))],
        body,
    )
    .await;
    (s, text)
}

pub fn parse(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// `data:` payloads of an SSE body, with their `event:` names.
pub fn sse(text: &str) -> Vec<(Option<String>, String)> {
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

/// An OpenAI chat stream: its chunks (without `[DONE]`), asserting it ends with `[DONE]`.
#[track_caller]
pub fn chat_chunks(text: &str) -> Vec<Value> {
    let events = sse(text);
    assert_eq!(
        events.last().map(|e| e.1.as_str()),
        Some("[DONE]"),
        "{text}"
    );
    events
        .iter()
        .filter(|e| e.1 != "[DONE]")
        .map(|e| parse(&e.1))
        .collect()
}

pub fn chunk_text(chunks: &[Value]) -> String {
    chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect()
}

/// The text of an Anthropic stream's `text_delta`s.
pub fn anthropic_stream_text(events: &[(Option<String>, String)]) -> String {
    events
        .iter()
        .filter(|e| e.0.as_deref() == Some("content_block_delta"))
        .filter_map(|e| parse(&e.1)["delta"]["text"].as_str().map(str::to_owned))
        .collect()
}

/// The text blocks of an Anthropic message.
pub fn anthropic_text(v: &Value) -> String {
    v["content"]
        .as_array()
        .expect("content")
        .iter()
        .filter(|b| b["type"] == "text")
        .filter_map(|b| b["text"].as_str())
        .collect()
}

/// Expected token counts of a usage record.
#[derive(Debug, Clone, Copy)]
pub struct Counts {
    pub prompt: i64,
    pub completion: i64,
    pub cached: i64,
    pub cache_write: i64,
    pub reasoning: i64,
}

impl Counts {
    /// At the test models' prices ($1 input, $0.50 cached, $2 output per 1M; cache writes at
    /// the input price).
    pub fn cost(self) -> f64 {
        ((self.prompt - self.cached - self.cache_write) as f64
            + self.cached as f64 * 0.5
            + self.cache_write as f64
            + self.completion as f64 * 2.0)
            / 1e6
    }
}

#[track_caller]
pub fn assert_record(r: &Value, want: Counts) {
    assert_eq!(r["status"], 200, "{r}");
    assert_eq!(r["prompt_tokens"], want.prompt, "prompt: {r}");
    assert_eq!(r["completion_tokens"], want.completion, "completion: {r}");
    assert_eq!(r["cached_tokens"], want.cached, "cached: {r}");
    assert_eq!(
        r["cache_write_tokens"], want.cache_write,
        "cache write: {r}"
    );
    assert_eq!(r["reasoning_tokens"], want.reasoning, "reasoning: {r}");
    assert_eq!(
        r["tokens_estimated"], false,
        "the provider's own report: {r}"
    );
    let cost = r["cost_usd"].as_f64().expect("cost");
    assert!(
        (cost - want.cost()).abs() < 1e-9,
        "cost {cost}, want {}: {r}",
        want.cost()
    );
}

pub fn records_for<'a>(records: &'a [Value], model: &str, endpoint: &str) -> Vec<&'a Value> {
    records
        .iter()
        .filter(|r| r["model"] == model && r["endpoint"] == endpoint)
        .collect()
}

// ---------------------------------------------------------------- Gemini

pub const GEMINI_SECRET: &str = "AIzaSyD-user-own-gemini-key-0123456789";

/// The final (cumulative) usage every Gemini answer reports.
pub const GEMINI_COUNTS: Counts = Counts {
    prompt: 25,
    completion: 10,
    cached: 8,
    cache_write: 0,
    reasoning: 4,
};

pub fn gemini_usage() -> Value {
    json!({"promptTokenCount": 25, "cachedContentTokenCount": 8, "candidatesTokenCount": 6,
           "thoughtsTokenCount": 4, "totalTokenCount": 35,
           "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 25}],
           "cacheTokensDetails": [{"modality": "TEXT", "tokenCount": 8}]})
}

/// The parts of a `generateContent` answer to `req`: a text answer, a function call when tools
/// are offered, or the answer to a function response.
pub fn gemini_parts(req: &Value) -> Vec<Value> {
    let answered = req["contents"].as_array().is_some_and(|cs| {
        cs.iter().any(|c| {
            c["parts"]
                .as_array()
                .is_some_and(|ps| ps.iter().any(|p| p.get("functionResponse").is_some()))
        })
    });
    if answered {
        vec![json!({"text": "It is sunny in Paris."})]
    } else if req.get("tools").is_some() {
        vec![
            json!({"functionCall": {"name": "get_weather", "args": {"city": "Paris"}},
                   "thoughtSignature": "c2lnLXdlYXRoZXItMQ=="}),
        ]
    } else {
        vec![
            json!({"text": "Let me think.", "thought": true}),
            json!({"text": "Hello from gemini"}),
        ]
    }
}

/// Google AI's Gemini API under `/v1beta`. Model `gem-busy` answers Google's 429.
pub fn gemini(s: &Seen) -> Response {
    let not_found = || {
        json_response(
            404,
            json!({"error": {"code": 404, "message": "not found", "status": "NOT_FOUND"}}),
        )
    };
    let Some((model, method)) = s
        .path
        .strip_prefix("/v1beta/models/")
        .and_then(|r| r.rsplit_once(':'))
    else {
        return not_found();
    };
    if s.header("x-goog-api-key") != Some(GEMINI_SECRET) {
        return json_response(400, parse(&fixture("gemini/error_api_key.json")));
    }
    if model == "gem-busy" {
        return json_response(429, parse(&fixture("gemini/error_rate_limit.json")));
    }
    let req = s.json();
    match method {
        "generateContent" => json_response(
            200,
            json!({"candidates": [{"content": {"parts": gemini_parts(&req), "role": "model"},
                                   "finishReason": "STOP", "index": 0}],
                   "usageMetadata": gemini_usage(), "modelVersion": "gemini-2.5-flash",
                   "responseId": "gem-resp-1"}),
        ),
        "streamGenerateContent"
            if s.query.as_deref() == Some("alt=sse") && model == "gem-flaky" =>
        {
            // One chunk, then Google's error object inside the stream.
            let events = [
                json!({"candidates": [{"content": {"parts": [{"text": "Hel"}], "role": "model"}, "index": 0}],
                       "usageMetadata": {"promptTokenCount": 25, "candidatesTokenCount": 1, "totalTokenCount": 26}}),
                json!({"error": {"code": 503, "status": "UNAVAILABLE", "message": "The model is overloaded. Please try again later."}}),
            ];
            sse_response(
                events
                    .iter()
                    .map(|e| format!("data: {e}\r\n\r\n"))
                    .collect(),
            )
        }
        "streamGenerateContent"
            if s.query.as_deref() == Some("alt=sse") && req.get("tools").is_some() =>
        {
            let e = json!({"candidates": [{"content": {"parts": gemini_parts(&req), "role": "model"},
                                           "finishReason": "STOP", "index": 0}],
                           "usageMetadata": gemini_usage(), "modelVersion": "gemini-2.5-flash"});
            sse_response(format!("data: {e}\r\n\r\n"))
        }
        "streamGenerateContent" if s.query.as_deref() == Some("alt=sse") => {
            // Cumulative usageMetadata on every chunk (a sum would be three times too much);
            // Google frames its events with CRLF.
            let events = [
                json!({"candidates": [{"content": {"parts": [{"text": "Let me think.", "thought": true}], "role": "model"}, "index": 0}],
                       "usageMetadata": {"promptTokenCount": 25, "totalTokenCount": 29, "thoughtsTokenCount": 4},
                       "modelVersion": "gemini-2.5-flash", "responseId": "gem-stream-1"}),
                json!({"candidates": [{"content": {"parts": [{"text": "Hello"}], "role": "model"}, "index": 0}],
                       "usageMetadata": {"promptTokenCount": 25, "candidatesTokenCount": 1, "totalTokenCount": 30, "thoughtsTokenCount": 4},
                       "modelVersion": "gemini-2.5-flash", "responseId": "gem-stream-1"}),
                json!({"candidates": [{"content": {"parts": [{"text": " from gemini"}], "role": "model"}, "finishReason": "STOP", "index": 0}],
                       "usageMetadata": gemini_usage(),
                       "modelVersion": "gemini-2.5-flash", "responseId": "gem-stream-1"}),
            ];
            sse_response(
                events
                    .iter()
                    .map(|e| format!("data: {e}\r\n\r\n"))
                    .collect(),
            )
        }
        "batchEmbedContents" => {
            let n = req["requests"].as_array().map_or(0, Vec::len);
            let embeddings: Vec<Value> = (0..n)
                .map(|i| json!({"values": [0.25 * i as f64, -0.5, 0.125]}))
                .collect();
            json_response(200, json!({ "embeddings": embeddings }))
        }
        _ => not_found(),
    }
}

/// The usual gateway plus a `gemini` provider (`gem`, `gem-busy`, `gem-embed`) and the user's
/// Gemini key.
pub async fn gemini_world(app: &TestApp) -> (Gateway, Upstream) {
    let g = gateway::setup(app).await;
    let up = Upstream::start(gemini).await;
    add_provider(
        app,
        &g,
        json!({"key": "google", "display_name": "Gemini", "kind": "gemini",
               "base_url": format!("{}/v1beta", up.addr)}),
        &[
            ("gem", "gemini-2.5-flash", "chat"),
            ("gem-busy", "gem-busy", "chat"),
            ("gem-flaky", "gem-flaky", "chat"),
            ("gem-embed", "text-embedding-004", "embedding"),
        ],
        GEMINI_SECRET,
    )
    .await;
    (g, up)
}

#[track_caller]
pub fn assert_gemini_auth(seen: &Seen, gateway_key: &str) {
    assert_eq!(seen.header("x-goog-api-key"), Some(GEMINI_SECRET));
    assert!(seen.header("authorization").is_none(), "{:?}", seen.headers);
    assert!(seen.header("api-key").is_none() && seen.header("x-api-key").is_none());
    seen.assert_no_gateway_key(gateway_key);
}

// ---------------------------------------------------------------- Azure OpenAI

pub const AZURE_SECRET: &str = "0123456789abcdef0123456789abcdef";
pub const AZURE_VERSION: &str = "2024-10-21";

pub fn azure_chat(deployment: &str, req: &Value) -> Response {
    if deployment == "filtered" {
        return json_response(400, parse(&fixture("azure/error_content_filter.json")));
    }
    if req["stream"] == true {
        sse_response(fixture("azure/stream.sse"))
    } else {
        json_response(200, parse(&fixture("azure/chat_completion.json")))
    }
}

pub fn azure_response(req: &Value) -> Value {
    json!({"id": "resp_azure_own", "object": "response", "created_at": 1745927416, "status": "completed",
           "model": req["model"], "output": [{"type": "message", "id": "msg_az", "status": "completed", "role": "assistant",
           "content": [{"type": "output_text", "text": "Azure says hi", "annotations": []}]}],
           "usage": {"input_tokens": 21, "input_tokens_details": {"cached_tokens": 5}, "output_tokens": 9,
                     "output_tokens_details": {"reasoning_tokens": 3}, "total_tokens": 30}})
}

pub fn azure_responses(req: &Value) -> Response {
    let response = azure_response(req);
    if req["stream"] != true {
        return json_response(200, response);
    }
    let created = json!({"id": "resp_azure_own", "object": "response", "status": "in_progress",
                         "model": req["model"], "output": []});
    let events = [
        (
            "response.created",
            json!({"type": "response.created", "sequence_number": 0, "response": created}),
        ),
        (
            "response.output_text.delta",
            json!({"type": "response.output_text.delta", "sequence_number": 1,
            "item_id": "msg_az", "output_index": 0, "content_index": 0, "delta": "Azure says hi"}),
        ),
        (
            "response.completed",
            json!({"type": "response.completed", "sequence_number": 2, "response": response}),
        ),
    ];
    sse_response(
        events
            .iter()
            .map(|(name, data)| format!("event: {name}\ndata: {data}\n\n"))
            .collect(),
    )
}

/// Azure OpenAI: the dated API (`/openai/deployments/{dep}/…?api-version=`) and the v1 API
/// (`/openai/v1/…`, the deployment in the body). Deployment `filtered` answers Azure's 400
/// content filter.
pub fn azure(s: &Seen) -> Response {
    if s.header("api-key") != Some(AZURE_SECRET) {
        return json_response(
            401,
            json!({"error": {"code": "401", "message": "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a valid key for an active subscription and use a correct regional API endpoint for your resource."}}),
        );
    }
    let req = s.json();
    let versioned = s.query.as_deref() == Some(&format!("api-version={AZURE_VERSION}"));
    let not_found = || {
        json_response(
            404,
            json!({"error": {"code": "404", "message": "Resource not found"}}),
        )
    };
    if let Some(rest) = s.path.strip_prefix("/openai/deployments/") {
        if !versioned {
            return not_found();
        }
        return match rest.split_once('/') {
            Some((dep, "chat/completions")) => azure_chat(dep, &req),
            Some((_, "embeddings")) => json_response(
                200,
                json!({"object": "list", "model": "text-embedding-3-small",
                       "data": [{"object": "embedding", "index": 0, "embedding": [0.5, -0.25]}],
                       "usage": {"prompt_tokens": 6, "total_tokens": 6}}),
            ),
            _ => not_found(),
        };
    }
    match s.path.as_str() {
        "/openai/v1/chat/completions" if s.query.is_none() => {
            azure_chat(req["model"].as_str().unwrap_or_default(), &req)
        }
        "/openai/responses" if versioned => azure_responses(&req),
        "/openai/v1/responses" if s.query.is_none() => azure_responses(&req),
        _ => not_found(),
    }
}

/// The usual gateway plus two Azure providers on one resource: `az` (dated API: models `az-gpt`,
/// `az-filter`, `az-embed`) and `az1` (no api_version, the v1 API: model `az1-gpt`).
pub async fn azure_world(app: &TestApp) -> (Gateway, Upstream) {
    let g = gateway::setup(app).await;
    let up = Upstream::start(azure).await;
    add_provider(
        app,
        &g,
        json!({"key": "az", "display_name": "Azure dated", "kind": "azure", "base_url": up.addr,
               "api_version": AZURE_VERSION}),
        &[
            ("az-gpt", "gpt4o-prod", "chat"),
            ("az-filter", "filtered", "chat"),
            ("az-embed", "embed-prod", "embedding"),
        ],
        AZURE_SECRET,
    )
    .await;
    add_provider(
        app,
        &g,
        json!({"key": "az1", "display_name": "Azure v1", "kind": "azure", "base_url": up.addr}),
        &[("az1-gpt", "gpt4o-v1", "chat")],
        AZURE_SECRET,
    )
    .await;
    (g, up)
}

#[track_caller]
pub fn assert_azure_auth(seen: &Seen, gateway_key: &str) {
    assert_eq!(seen.header("api-key"), Some(AZURE_SECRET));
    assert!(
        seen.header("authorization").is_none(),
        "Azure takes api-key, not Authorization: {:?}",
        seen.headers
    );
    seen.assert_no_gateway_key(gateway_key);
}

// ---------------------------------------------------------------- Bedrock

pub const AWS_ACCESS_KEY: &str = "AKIDEXAMPLE";
pub const AWS_SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";
pub const CLAUDE_ID: &str = "anthropic.claude-3-5-sonnet-20240620-v1:0";
/// The model id as one path segment.
pub const CLAUDE_SEGMENT: &str = "anthropic.claude-3-5-sonnet-20240620-v1%3A0";

pub fn aws_key() -> String {
    json!({"access_key_id": AWS_ACCESS_KEY, "secret_access_key": AWS_SECRET}).to_string()
}

pub const BEDROCK_COUNTS: Counts = Counts {
    prompt: 37,
    completion: 7,
    cached: 20,
    cache_write: 5,
    reasoning: 0,
};

pub fn bedrock_usage() -> Value {
    json!({"inputTokens": 12, "outputTokens": 7, "totalTokens": 44,
           "cacheReadInputTokens": 20, "cacheWriteInputTokens": 5})
}

/// One AWS event-stream message with real CRCs (string headers only).
pub fn frame(headers: &[(&str, &str)], payload: &[u8]) -> Vec<u8> {
    let mut h = Vec::new();
    for (name, value) in headers {
        h.push(u8::try_from(name.len()).expect("short name"));
        h.extend_from_slice(name.as_bytes());
        h.push(7);
        h.extend_from_slice(
            &u16::try_from(value.len())
                .expect("short value")
                .to_be_bytes(),
        );
        h.extend_from_slice(value.as_bytes());
    }
    raw_frame(&h, payload)
}

/// An AWS event-stream message around already-encoded header bytes, with real CRCs.
pub fn raw_frame(headers: &[u8], payload: &[u8]) -> Vec<u8> {
    let total = 12 + headers.len() + payload.len() + 4;
    let mut m = Vec::with_capacity(total);
    m.extend_from_slice(&u32::try_from(total).expect("size").to_be_bytes());
    m.extend_from_slice(&u32::try_from(headers.len()).expect("size").to_be_bytes());
    let prelude_crc = crc32fast::hash(&m);
    m.extend_from_slice(&prelude_crc.to_be_bytes());
    m.extend_from_slice(headers);
    m.extend_from_slice(payload);
    let crc = crc32fast::hash(&m);
    m.extend_from_slice(&crc.to_be_bytes());
    m
}

pub fn event(name: &str, payload: Value) -> Vec<u8> {
    frame(
        &[
            (":event-type", name),
            (":content-type", "application/json"),
            (":message-type", "event"),
        ],
        payload.to_string().as_bytes(),
    )
}

/// Bedrock's runtime: `/model/{id}/converse` and `/converse-stream`. Model ids with `busy`
/// answer a 429 ThrottlingException, with `cut` a stream that ends in a throttling exception.
pub fn bedrock(s: &Seen) -> Response {
    let Some((model, action)) = s
        .path
        .strip_prefix("/model/")
        .and_then(|r| r.split_once('/'))
    else {
        return json_response(404, json!({"message": "Unknown operation"}));
    };
    if s.header("authorization").is_none()
        || s.header("authorization") != expected_signature(s).as_deref()
    {
        let mut r = json_response(
            403,
            json!({"message": "The request signature we calculated does not match the signature you provided. Check your AWS Secret Access Key and signing method. Consult the service documentation for details."}),
        );
        r.headers_mut().insert(
            "x-amzn-errortype",
            "InvalidSignatureException:http://internal.amazon.com/coral/com.amazon.coral.service/"
                .parse()
                .expect("header"),
        );
        return r;
    }
    if model.contains("busy") {
        let mut r = json_response(
            429,
            json!({"message": "Too many requests, please wait before trying again."}),
        );
        r.headers_mut().insert(
            "x-amzn-errortype",
            "ThrottlingException:http://internal.amazon.com/coral/com.amazon.bedrock/"
                .parse()
                .expect("header"),
        );
        return r;
    }
    match action {
        "invoke" => json_response(200, parse(&fixture("bedrock/titan_embedding.json"))),
        "converse" => json_response(
            200,
            json!({"output": {"message": {"role": "assistant", "content": [{"text": "Hello from bedrock"}]}},
                   "stopReason": "end_turn", "usage": bedrock_usage(), "metrics": {"latencyMs": 321}}),
        ),
        "converse-stream" => {
            let mut bytes: Vec<u8> = [
                event("messageStart", json!({"role": "assistant"})),
                event(
                    "contentBlockDelta",
                    json!({"contentBlockIndex": 0, "delta": {"text": "Hello"}}),
                ),
            ]
            .concat();
            if model.contains("cut") {
                bytes.extend(frame(
                    &[
                        (":exception-type", "throttlingException"),
                        (":content-type", "application/json"),
                        (":message-type", "exception"),
                    ],
                    br#"{"message":"Too many tokens, please wait before trying again."}"#,
                ));
            } else {
                for e in [
                    event(
                        "contentBlockDelta",
                        json!({"contentBlockIndex": 0, "delta": {"text": " from bedrock"}}),
                    ),
                    event("contentBlockStop", json!({"contentBlockIndex": 0})),
                    event("messageStop", json!({"stopReason": "end_turn"})),
                    event(
                        "metadata",
                        json!({"usage": bedrock_usage(), "metrics": {"latencyMs": 321}}),
                    ),
                ] {
                    bytes.extend(e);
                }
            }
            Response::builder()
                .header(header::CONTENT_TYPE, "application/vnd.amazon.eventstream")
                .body(Body::from(bytes))
                .expect("response")
        }
        _ => json_response(404, json!({"message": "Unknown operation"})),
    }
}

/// The usual gateway plus a `bedrock` provider (`claude-br`, `br-busy`, `br-cut`) and the
/// user's AWS key.
pub async fn bedrock_world(app: &TestApp) -> (Gateway, Upstream) {
    let g = gateway::setup(app).await;
    let up = Upstream::start(bedrock).await;
    add_provider(
        app,
        &g,
        json!({"key": "aws", "display_name": "Bedrock", "kind": "bedrock", "region": "us-east-1",
               "base_url": up.addr}),
        &[
            ("claude-br", CLAUDE_ID, "chat"),
            ("br-busy", "anthropic.claude-busy-v1:0", "chat"),
            ("br-cut", "anthropic.claude-cut-v1:0", "chat"),
            ("titan", "amazon.titan-embed-text-v2:0", "embedding"),
        ],
        &aws_key(),
    )
    .await;
    (g, up)
}

/// The `authorization` AWS computes for what arrived (host, percent-encoded path, body, date)
/// with the user's credentials, as Bedrock checks it.
pub fn expected_signature(seen: &Seen) -> Option<String> {
    let signed = sigv4::sign(
        &sigv4::Request {
            method: "POST",
            host: seen.header("host")?,
            path: &seen.path,
            query: seen.query.as_deref().unwrap_or(""),
            headers: &[],
            payload: &seen.body,
        },
        &sigv4::Credentials {
            access_key_id: AWS_ACCESS_KEY,
            secret_access_key: AWS_SECRET,
            session_token: None,
        },
        &sigv4::Scope {
            region: "us-east-1",
            service: "bedrock",
            amz_date: seen.header("x-amz-date")?,
        },
    );
    Some(signed.authorization)
}

/// The request is SigV4-signed for us-east-1 / bedrock, over exactly what arrived: the host,
/// the percent-encoded path, the body and the date sent.
#[track_caller]
pub fn assert_sigv4(seen: &Seen, gateway_key: &str) {
    let auth = seen.header("authorization").expect("authorization");
    assert!(
        auth.starts_with("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/"),
        "{auth}"
    );
    assert!(
        auth.contains("/us-east-1/bedrock/aws4_request, SignedHeaders=host;x-amz-date, Signature="),
        "{auth}"
    );
    assert!(!auth.contains(AWS_SECRET));
    let date = seen.header("x-amz-date").expect("x-amz-date");
    assert_eq!(date.len(), 16, "{date}");
    assert_eq!(
        Some(auth),
        expected_signature(seen).as_deref(),
        "the signature covers what was sent"
    );
    assert!(seen.header("x-amz-security-token").is_none());
    assert!(seen.header("api-key").is_none() && seen.header("x-api-key").is_none());
    seen.assert_no_gateway_key(gateway_key);
}
