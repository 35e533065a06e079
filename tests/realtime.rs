//! The Realtime API (`GET /v1/realtime`, spec §8) through the gateway: a real WebSocket client
//! (tokio-tungstenite) against a mock upstream WebSocket on 127.0.0.1 that checks the provider
//! key and model. Frames both ways, a usage record per `response.done` with its exact cost,
//! refusals before the upgrade (nothing reaches the upstream, nothing is recorded), the
//! browser's subprotocol auth, a client that closes mid-response, and a balance that runs out.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::accounts::{admin_token, user_token};
use common::gateway::{PROVIDER_SECRET, new_key, wait_records};
use common::{TestApp, assert_error};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message};

type Client =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The realtime model's upstream name; the client's is `gpt-rt`.
const UPSTREAM_MODEL: &str = "gpt-realtime-upstream";

/// What the mock upstream saw.
#[derive(Default, Debug)]
struct Seen {
    /// Handshakes: path and query, `authorization`, `openai-beta`, every header as text.
    uris: Vec<String>,
    auths: Vec<Option<String>>,
    betas: Vec<Option<String>>,
    headers: Vec<String>,
    /// Client events (text frames) received.
    events: Vec<Value>,
    binaries: Vec<Vec<u8>>,
    cancels: usize,
    /// Close frames received: code and reason.
    closes: Vec<(u16, String)>,
}

struct RtMock {
    addr: SocketAddr,
    seen: Arc<Mutex<Seen>>,
}

impl RtMock {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let seen = Arc::new(Mutex::new(Seen::default()));
        let s = seen.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve(stream, s.clone()));
            }
        });
        Self { addr, seen }
    }

    fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    fn seen<T>(&self, f: impl FnOnce(&Seen) -> T) -> T {
        f(&self.seen.lock().expect("seen"))
    }
}

fn usage(input: i64, cached: i64, output: i64) -> Value {
    json!({
        "total_tokens": input + output, "input_tokens": input, "output_tokens": output,
        "input_token_details": {"cached_tokens": cached, "text_tokens": input - 10, "audio_tokens": 10,
                                "cached_tokens_details": {"text_tokens": cached, "audio_tokens": 0}},
        "output_token_details": {"text_tokens": output / 2, "audio_tokens": output - output / 2}
    })
}

fn done(id: &str, status: &str, usage: Value) -> Message {
    Message::text(
        json!({"type": "response.done", "event_id": format!("evt_done_{id}"),
               "response": {"object": "realtime.response", "id": id, "status": status,
                            "output": [], "usage": usage}})
        .to_string(),
    )
}

async fn serve(stream: tokio::net::TcpStream, seen: Arc<Mutex<Seen>>) {
    let seen2 = seen.clone();
    let mut model = String::new();
    #[allow(clippy::result_large_err)] // the signature tungstenite's accept callback takes
    let check = |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
        let h = req.headers();
        let get = |n: &str| h.get(n).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let mut s = seen2.lock().expect("seen");
        s.uris.push(req.uri().to_string());
        s.auths.push(get("authorization"));
        s.betas.push(get("openai-beta"));
        s.headers.push(format!("{h:?}"));
        model = req
            .uri()
            .query()
            .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("model=")))
            .unwrap_or_default()
            .to_owned();
        if get("authorization").as_deref() != Some(&format!("Bearer {PROVIDER_SECRET}")) {
            let mut r = ErrorResponse::new(Some(
                json!({"error": {"message": "Incorrect API key provided", "type": "invalid_request_error", "code": "invalid_api_key"}}).to_string(),
            ));
            *r.status_mut() = http::StatusCode::UNAUTHORIZED;
            return Err(r);
        }
        if model != UPSTREAM_MODEL || req.uri().path() != "/v1/realtime" {
            let mut r = ErrorResponse::new(Some(
                json!({"error": {"message": "unknown model", "type": "invalid_request_error", "code": "model_not_found"}}).to_string(),
            ));
            *r.status_mut() = http::StatusCode::NOT_FOUND;
            return Err(r);
        }
        Ok(resp)
    };
    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(stream, check).await else {
        return;
    };
    let created = json!({"type": "session.created", "event_id": "evt_session",
                         "session": {"id": "sess_mock", "object": "realtime.session", "model": UPSTREAM_MODEL}});
    if ws.send(Message::text(created.to_string())).await.is_err() {
        return;
    }
    let mut n = 0;
    let mut deaf = false;
    while let Some(Ok(m)) = ws.next().await {
        match m {
            Message::Text(t) => {
                let v: Value = serde_json::from_str(t.as_str()).unwrap_or_default();
                seen.lock().expect("seen").events.push(v.clone());
                match v["type"].as_str().unwrap_or_default() {
                    "response.create" => {
                        n += 1;
                        let id = format!("resp_{n}");
                        let mode = v["response"]["metadata"]["mode"]
                            .as_str()
                            .unwrap_or("normal");
                        let mut out = vec![
                            json!({"type": "response.created", "event_id": format!("evt_c{n}"),
                                   "response": {"object": "realtime.response", "id": id, "status": "in_progress", "output": []}}),
                            json!({"type": "response.output_text.delta", "response_id": id, "item_id": "item_1",
                                   "output_index": 0, "content_index": 0, "delta": "Hello"}),
                            json!({"type": "response.output_audio.delta", "response_id": id, "item_id": "item_1",
                                   "output_index": 0, "content_index": 0, "delta": "UklGRgAAAAA="}),
                            json!({"type": "response.output_text.delta", "response_id": id, "item_id": "item_1",
                                   "output_index": 0, "content_index": 0, "delta": " world"}),
                        ];
                        let tail = match mode {
                            "normal" => Some(done(&id, "completed", usage(120, 20, 30))),
                            "big" => Some(done(&id, "completed", usage(1000, 0, 1000))),
                            // Closes mid-response.
                            "drop" => Some(Message::Close(Some(CloseFrame {
                                code: CloseCode::Error,
                                reason: "upstream failure".into(),
                            }))),
                            // Never answers `response.cancel`.
                            "deaf" => {
                                deaf = true;
                                None
                            }
                            // Waits for `response.cancel`.
                            _ => None,
                        };
                        for e in out.drain(..) {
                            let _ = ws.send(Message::text(e.to_string())).await;
                        }
                        if let Some(t) = tail {
                            let _ = ws.send(t).await;
                        }
                    }
                    "response.cancel" => {
                        seen.lock().expect("seen").cancels += 1;
                        if deaf {
                            continue;
                        }
                        let id = format!("resp_{n}");
                        let _ = ws.send(done(&id, "cancelled", usage(50, 0, 5))).await;
                    }
                    _ => {}
                }
            }
            Message::Binary(b) => {
                seen.lock().expect("seen").binaries.push(b.to_vec());
                let _ = ws.send(Message::Binary(b)).await;
            }
            Message::Close(f) => {
                let (code, reason) = f
                    .map(|f| (u16::from(f.code), f.reason.as_str().to_owned()))
                    .unwrap_or((1005, String::new()));
                seen.lock().expect("seen").closes.push((code, reason));
            }
            _ => {}
        }
    }
}

struct World {
    mock: RtMock,
    user: String,
    key: String,
    admin: String,
}

/// A provider on the mock, the realtime model `gpt-rt` ($4 input, $0.40 cached, $16 output per
/// 1M), a chat model, a user with a provider key and a gateway key.
async fn world(app: &TestApp) -> World {
    let mock = RtMock::start().await;
    let admin = admin_token(app).await;
    let (s, b) = app
        .post("/api/admin/providers", Some(&admin), json!({"key": "rtmock", "display_name": "Realtime mock", "base_url": mock.base_url(), "kind": "openai"}))
        .await;
    assert_eq!(s, 201, "provider: {b}");
    for (name, upstream, kind) in [
        ("gpt-rt", UPSTREAM_MODEL, "realtime"),
        ("gpt-chat", "chat-up", "chat"),
    ] {
        let (s, b) = app
            .post(
                "/api/admin/models",
                Some(&admin),
                json!({"name": name, "provider": "rtmock", "upstream_model": upstream, "type": kind,
                       "input_price_per_1m": 4.0, "output_price_per_1m": 16.0, "cached_input_price_per_1m": 0.4,
                       "max_output_tokens": 1000}),
            )
            .await;
        assert_eq!(s, 201, "model {name}: {b}");
    }
    let user = user_token(app, "alice").await;
    let (s, b) = app
        .post(
            "/api/provider-keys",
            Some(&user),
            json!({"provider": "rtmock", "api_key": PROVIDER_SECRET}),
        )
        .await;
    assert_eq!(s, 201, "provider key: {b}");
    let (key, _) = new_key(app, &user, json!({"name": "rt"})).await;
    World {
        mock,
        user,
        key,
        admin,
    }
}

fn ws_url(app: &TestApp, query: &str) -> String {
    format!("ws://{}/v1/realtime{query}", app.addr)
}

/// Opens a session with these extra headers.
async fn open(
    app: &TestApp,
    query: &str,
    headers: &[(&str, &str)],
) -> Result<(Client, http::Response<Option<Vec<u8>>>), tungstenite::Error> {
    let mut req = ws_url(app, query).into_client_request().expect("request");
    for (k, v) in headers {
        req.headers_mut().insert(
            http::HeaderName::from_bytes(k.as_bytes()).expect("name"),
            v.parse().expect("value"),
        );
    }
    tokio::time::timeout(
        Duration::from_secs(20),
        tokio_tungstenite::connect_async(req),
    )
    .await
    .expect("handshake in time")
}

async fn open_ok(app: &TestApp, key: &str) -> Client {
    let auth = format!("Bearer {key}");
    open(
        app,
        "?model=gpt-rt&intent=conversation",
        &[("authorization", &auth), ("openai-beta", "realtime=v1")],
    )
    .await
    .expect("upgraded")
    .0
}

/// The refusal of a handshake: status and the OpenAI-shaped body.
async fn refused(app: &TestApp, query: &str, headers: &[(&str, &str)]) -> (u16, Value) {
    match open(app, query, headers).await {
        Err(tungstenite::Error::Http(r)) => {
            let status = r.status().as_u16();
            let body = r
                .body()
                .as_ref()
                .and_then(|b| serde_json::from_slice(b).ok())
                .unwrap_or(Value::Null);
            (status, body)
        }
        Ok(_) => panic!("{query}: upgraded, expected a refusal"),
        Err(e) => panic!("{query}: {e}"),
    }
}

/// The next frame, within 10 s.
async fn next(ws: &mut Client) -> Message {
    tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .expect("a frame in time")
        .expect("open")
        .expect("frame")
}

/// The next text event (pings and pongs skipped).
async fn event(ws: &mut Client) -> Value {
    loop {
        match next(ws).await {
            Message::Text(t) => return serde_json::from_str(t.as_str()).expect("json event"),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("expected an event, got {other:?}"),
        }
    }
}

/// Events until (and with) the one of type `until`.
async fn events_until(ws: &mut Client, until: &str) -> Vec<Value> {
    let mut out = Vec::new();
    loop {
        let e = event(ws).await;
        let end = e["type"] == until;
        out.push(e);
        if end {
            return out;
        }
    }
}

async fn send_json(ws: &mut Client, v: Value) {
    ws.send(Message::text(v.to_string())).await.expect("send");
}

/// Polls until `f` holds of what the mock saw.
async fn eventually(mock: &RtMock, what: &str, f: impl Fn(&Seen) -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !mock.seen(&f) {
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: {:?}",
            mock.seen(|s| format!("{s:?}"))
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn realtime_records(records: &[Value]) -> Vec<&Value> {
    records
        .iter()
        .filter(|r| r["endpoint"] == "realtime")
        .collect()
}

#[track_caller]
fn assert_cost(r: &Value, usd: f64) {
    let got = r["cost_usd"].as_f64().expect("cost");
    assert!((got - usd).abs() < 1e-12, "cost {got} != {usd}: {r}");
}

#[tokio::test]
async fn a_session_relays_both_ways_and_meters_each_response() {
    let app = TestApp::spawn().await;
    let w = world(&app).await;
    let mut ws = open_ok(&app, &w.key).await;

    let first = event(&mut ws).await;
    assert_eq!(first["type"], "session.created", "{first}");
    assert_eq!(first["session"]["id"], "sess_mock");

    // What the upstream got: its own model name, the rest of the query, the user's provider
    // key, `OpenAI-Beta`; never the gateway key.
    eventually(&w.mock, "handshake", |s| s.uris.len() == 1).await;
    w.mock.seen(|s| {
        assert_eq!(
            s.uris[0],
            format!("/v1/realtime?model={UPSTREAM_MODEL}&intent=conversation")
        );
        assert_eq!(
            s.auths[0].as_deref(),
            Some(format!("Bearer {PROVIDER_SECRET}").as_str())
        );
        assert_eq!(s.betas[0].as_deref(), Some("realtime=v1"));
        assert!(
            !s.headers[0].contains(&w.key),
            "gateway key leaked upstream"
        );
    });

    // Client events go up unchanged; the upstream's come back unchanged.
    let update = json!({"type": "session.update", "session": {"instructions": "Be brief.", "modalities": ["text", "audio"]}});
    send_json(&mut ws, update.clone()).await;
    for _ in 0..2 {
        send_json(
            &mut ws,
            json!({"type": "response.create", "response": {"modalities": ["text"]}}),
        )
        .await;
        let evs = events_until(&mut ws, "response.done").await;
        let kinds: Vec<&str> = evs.iter().filter_map(|e| e["type"].as_str()).collect();
        assert_eq!(
            kinds,
            [
                "response.created",
                "response.output_text.delta",
                "response.output_audio.delta",
                "response.output_text.delta",
                "response.done"
            ]
        );
        let done = evs.last().expect("done");
        assert_eq!(done["response"]["usage"]["input_tokens"], 120, "{done}");
        assert_eq!(
            done["response"]["usage"]["output_token_details"]["audio_tokens"],
            15
        );
    }
    eventually(&w.mock, "client events", |s| s.events.len() == 3).await;
    w.mock.seen(|s| assert_eq!(s.events[0], update));

    // Binary frames both ways, ping answered.
    let blob: Vec<u8> = (0..70_000u32).map(|i| (i % 251) as u8).collect();
    ws.send(Message::Binary(blob.clone().into()))
        .await
        .expect("binary");
    loop {
        match next(&mut ws).await {
            Message::Binary(b) => {
                assert_eq!(b.as_ref(), blob.as_slice(), "binary echoed intact");
                break;
            }
            Message::Pong(_) | Message::Ping(_) => {}
            other => panic!("expected the binary echo, got {other:?}"),
        }
    }
    ws.send(Message::Ping(b"are you there".to_vec().into()))
        .await
        .expect("ping");
    loop {
        match next(&mut ws).await {
            Message::Pong(p) => {
                assert_eq!(p.as_ref(), b"are you there");
                break;
            }
            Message::Ping(_) => {}
            other => panic!("expected a pong, got {other:?}"),
        }
    }

    // The client's close reaches the upstream with its code and reason.
    ws.send(Message::Close(Some(CloseFrame {
        code: CloseCode::from(4000),
        reason: "bye now".into(),
    })))
    .await
    .expect("close");
    eventually(&w.mock, "close upstream", |s| !s.closes.is_empty()).await;
    w.mock
        .seen(|s| assert_eq!(s.closes[0], (4000, "bye now".to_owned())));

    // One record per response.done: (120 − 20) × $4 + 20 × $0.40 + 30 × $16 per 1M.
    let recs = wait_records(&app, &w.user, 2).await;
    let rt = realtime_records(&recs);
    assert_eq!(rt.len(), 2, "{recs:?}");
    for r in rt {
        assert_eq!(r["status"], 200, "{r}");
        assert_eq!(r["model"], "gpt-rt");
        assert_eq!(r["prompt_tokens"], 120);
        assert_eq!(r["cached_tokens"], 20);
        assert_eq!(r["completion_tokens"], 30);
        assert_eq!(r["tokens_estimated"], false);
        assert_cost(r, (100.0 * 4.0 + 20.0 * 0.4 + 30.0 * 16.0) / 1e6);
    }
    // Nothing more arrives for the session (no extra record for the unused next response).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, b) = app
        .get("/api/me/usage/records?per_page=100", Some(&w.user))
        .await;
    assert_eq!(b["total"], 2, "{b}");
    app.stop().await;
}

#[tokio::test]
async fn refusals_come_before_the_upgrade_and_cost_nothing() {
    let app = TestApp::spawn().await;
    let w = world(&app).await;
    let auth = format!("Bearer {}", w.key);

    let (s, b) = refused(&app, "?model=gpt-rt", &[]).await;
    assert_error(s, &b, 401, "invalid_api_key");
    let (s, b) = refused(
        &app,
        "?model=gpt-rt",
        &[(
            "authorization",
            "Bearer sk-tg-not-a-real-key-000000000000000000000000",
        )],
    )
    .await;
    assert_error(s, &b, 401, "invalid_api_key");
    let (s, b) = refused(&app, "?model=no-such-model", &[("authorization", &auth)]).await;
    assert_error(s, &b, 404, "model_not_found");
    let (s, b) = refused(&app, "", &[("authorization", &auth)]).await;
    assert_eq!(s, 400, "{b}");
    assert_eq!(b["error"]["param"], "model", "{b}");
    let (s, b) = refused(&app, "?model=gpt-chat", &[("authorization", &auth)]).await;
    assert_eq!(s, 400, "a chat model does not serve /v1/realtime: {b}");

    let (other, _) = new_key(
        &app,
        &w.user,
        json!({"name": "chat-only", "allowed_models": ["gpt-chat"]}),
    )
    .await;
    let (s, b) = refused(
        &app,
        "?model=gpt-rt",
        &[("authorization", &format!("Bearer {other}"))],
    )
    .await;
    assert_error(s, &b, 403, "model_not_allowed");

    // A plain GET (no upgrade) with a good key.
    let r = app
        .client
        .get(app.url("/v1/realtime?model=gpt-rt"))
        .bearer_auth(&w.key)
        .send()
        .await
        .expect("get");
    let s = r.status().as_u16();
    let b: Value = r.json().await.expect("json");
    assert_error(s, &b, 400, "websocket_required");

    // The upstream saw nothing; nothing was recorded.
    assert_eq!(w.mock.seen(|s| s.uris.len()), 0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, b) = app
        .get("/api/me/usage/records?per_page=100", Some(&w.user))
        .await;
    assert_eq!(b["total"], 0, "{b}");

    // The upstream refusing the provider key: its status and body, metered with that status.
    let bob = user_token(&app, "bob").await;
    let (s, b) = app
        .post(
            "/api/provider-keys",
            Some(&bob),
            json!({"provider": "rtmock", "api_key": "sk-wrong-upstream-key"}),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    let (bob_key, _) = new_key(&app, &bob, json!({"name": "bob"})).await;
    let (s, b) = refused(
        &app,
        "?model=gpt-rt",
        &[("authorization", &format!("Bearer {bob_key}"))],
    )
    .await;
    assert_eq!(s, 401, "{b}");
    assert_eq!(
        b["error"]["code"], "invalid_api_key",
        "the upstream's body: {b}"
    );
    assert_eq!(w.mock.seen(|s| s.uris.len()), 1);
    let recs = wait_records(&app, &bob, 1).await;
    assert_eq!(recs[0]["status"], 401, "{}", recs[0]);
    assert_eq!(recs[0]["endpoint"], "realtime");
    assert_cost(&recs[0], 0.0);
    app.stop().await;
}

#[tokio::test]
async fn a_browser_authenticates_with_the_subprotocol_and_sees_only_realtime_echoed() {
    let app = TestApp::spawn().await;
    let w = world(&app).await;
    let protocols = format!(
        "realtime, openai-insecure-api-key.{}, openai-beta.realtime-v1",
        w.key
    );
    let (mut ws, resp) = open(
        &app,
        "?model=gpt-rt",
        &[("sec-websocket-protocol", &protocols)],
    )
    .await
    .expect("upgraded");
    assert_eq!(
        resp.headers()
            .get("sec-websocket-protocol")
            .and_then(|v| v.to_str().ok()),
        Some("realtime")
    );
    assert!(
        !format!("{:?}", resp.headers()).contains(&w.key),
        "the key is never echoed"
    );
    let first = event(&mut ws).await;
    assert_eq!(first["type"], "session.created");
    w.mock.seen(|s| {
        assert_eq!(
            s.auths[0].as_deref(),
            Some(format!("Bearer {PROVIDER_SECRET}").as_str())
        );
        assert!(
            !s.headers[0].contains(&w.key),
            "gateway key leaked upstream"
        );
    });
    // A wrong key in the subprotocol is refused like a wrong header.
    let (s, b) = refused(
        &app,
        "?model=gpt-rt",
        &[(
            "sec-websocket-protocol",
            "realtime, openai-insecure-api-key.sk-tg-wrong0000000000000000000000000000000000",
        )],
    )
    .await;
    assert_error(s, &b, 401, "invalid_api_key");

    // A session with no response still leaves one record: status 101, nothing charged.
    ws.close(None).await.expect("close");
    let recs = wait_records(&app, &w.user, 1).await;
    let rt = realtime_records(&recs);
    assert_eq!(rt.len(), 1, "{recs:?}");
    assert_eq!(rt[0]["status"], 101, "{}", rt[0]);
    assert_eq!(rt[0]["prompt_tokens"], 0);
    assert_eq!(rt[0]["completion_tokens"], 0);
    assert_cost(rt[0], 0.0);
    app.stop().await;
}

#[tokio::test]
async fn a_client_closing_mid_response_cancels_it_and_is_metered() {
    let app = TestApp::spawn().await;
    let w = world(&app).await;
    let mut ws = open_ok(&app, &w.key).await;
    assert_eq!(event(&mut ws).await["type"], "session.created");
    send_json(
        &mut ws,
        json!({"type": "response.create", "response": {"metadata": {"mode": "hang"}}}),
    )
    .await;
    let created = event(&mut ws).await;
    assert_eq!(created["type"], "response.created");
    let delta = event(&mut ws).await;
    assert_eq!(delta["delta"], "Hello");
    ws.send(Message::Close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "done listening".into(),
    })))
    .await
    .expect("close");

    // The gateway asked the upstream to cancel, then closed it with the client's code.
    eventually(&w.mock, "cancel then close", |s| {
        s.cancels == 1 && !s.closes.is_empty()
    })
    .await;
    w.mock
        .seen(|s| assert_eq!(s.closes[0], (1000, "done listening".to_owned())));

    // The cancelled response's own usage: 50 × $4 + 5 × $16 per 1M.
    let recs = wait_records(&app, &w.user, 1).await;
    let rt = realtime_records(&recs);
    assert_eq!(rt.len(), 1, "{recs:?}");
    assert_eq!(rt[0]["prompt_tokens"], 50, "{}", rt[0]);
    assert_eq!(rt[0]["completion_tokens"], 5);
    assert_eq!(rt[0]["tokens_estimated"], false);
    assert_cost(rt[0], (50.0 * 4.0 + 5.0 * 16.0) / 1e6);
    app.stop().await;
}

#[tokio::test]
async fn a_balance_that_runs_out_closes_the_session_with_1008() {
    let app = TestApp::spawn_with(|c| c.billing.enforce_balance = true).await;
    let w = world(&app).await;

    // No balance: refused before the upgrade, like any /v1 call.
    let auth = format!("Bearer {}", w.key);
    let (s, b) = refused(&app, "?model=gpt-rt", &[("authorization", &auth)]).await;
    assert_error(s, &b, 429, "insufficient_quota");
    assert_eq!(w.mock.seen(|s| s.uris.len()), 0);

    // $0.03 covers one response's reservation (1000 prompt at $4 + 1000 output at $16 per 1M
    // = $0.02) but not a second after a response that cost $0.02.
    let (s, b) = app.get("/api/me", Some(&w.user)).await;
    assert_eq!(s, 200, "{b}");
    let alice = b["id"].as_str().expect("id").to_owned();
    let (s, b) = app
        .post(
            &format!("/api/admin/users/{alice}/balance"),
            Some(&w.admin),
            json!({"amount_usd": 0.03, "note": "realtime test"}),
        )
        .await;
    assert!(s == 200 || s == 201, "{s} {b}");

    let mut ws = open_ok(&app, &w.key).await;
    assert_eq!(event(&mut ws).await["type"], "session.created");
    send_json(
        &mut ws,
        json!({"type": "response.create", "response": {"metadata": {"mode": "big"}}}),
    )
    .await;
    let evs = events_until(&mut ws, "response.done").await;
    assert_eq!(
        evs.last().expect("done")["response"]["usage"]["output_tokens"],
        1000
    );
    // Then the reason, as an error event and as the close frame.
    let err = event(&mut ws).await;
    assert_eq!(err["type"], "error", "{err}");
    assert_eq!(err["error"]["code"], "insufficient_quota", "{err}");
    match next(&mut ws).await {
        Message::Close(Some(f)) => {
            assert_eq!(f.code, CloseCode::Policy, "{f:?}");
            assert!(f.reason.as_str().starts_with("insufficient_quota"), "{f:?}");
        }
        other => panic!("expected a 1008 close, got {other:?}"),
    }
    eventually(&w.mock, "upstream closed", |s| !s.closes.is_empty()).await;

    let recs = wait_records(&app, &w.user, 1).await;
    let rt = realtime_records(&recs);
    assert_eq!(rt.len(), 1, "{recs:?}");
    assert_cost(rt[0], (1000.0 * 4.0 + 1000.0 * 16.0) / 1e6);
    app.stop().await;
}

/// The real `openai` Python SDK's Realtime client, when `TOLLGATE_TEST_PYTHON` names a Python
/// with `openai` and `websockets` (`.ci/run` sets it up; without it the test only says so).
#[tokio::test]
async fn the_openai_python_sdk_realtime_client_works_unchanged() {
    let Ok(python) = std::env::var("TOLLGATE_TEST_PYTHON") else {
        eprintln!("TOLLGATE_TEST_PYTHON is not set: skipping the realtime SDK check");
        return;
    };
    let app = TestApp::spawn().await;
    let w = world(&app).await;
    let script = format!(
        "{}/tests/sdk/openai_realtime.py",
        env!("CARGO_MANIFEST_DIR")
    );
    let out = tokio::process::Command::new(python)
        .arg(script)
        .env_remove("OPENAI_BASE_URL")
        .env_remove("OPENAI_API_KEY")
        .env("TOLLGATE_BASE_URL", &app.base)
        .env("TOLLGATE_KEY", &w.key)
        .output()
        .await
        .expect("python runs");
    assert!(
        out.status.success(),
        "script failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("json out");
    assert_eq!(v["session_id"], "sess_mock", "{v}");
    assert_eq!(v["text"], "Hello world", "{v}");
    assert_eq!(v["input_tokens"], 120, "{v}");
    assert_eq!(v["cached_tokens"], 20, "{v}");
    assert_eq!(v["output_tokens"], 30, "{v}");
    // The SDK's session.update reached the upstream as it sent it.
    eventually(&w.mock, "session.update", |s| {
        s.events.iter().any(|e| e["type"] == "session.update")
    })
    .await;
    w.mock.seen(|s| {
        assert_eq!(
            s.auths[0].as_deref(),
            Some(format!("Bearer {PROVIDER_SECRET}").as_str())
        );
    });
    let recs = wait_records(&app, &w.user, 1).await;
    let rt = realtime_records(&recs);
    assert_eq!(rt.len(), 1, "{recs:?}");
    assert_cost(rt[0], (100.0 * 4.0 + 20.0 * 0.4 + 30.0 * 16.0) / 1e6);
    app.stop().await;
}

#[tokio::test]
async fn a_response_that_never_reports_usage_is_estimated() {
    let app = TestApp::spawn().await;
    let w = world(&app).await;

    // The upstream closes mid-response: the client gets its close; the record is 502.
    let mut ws = open_ok(&app, &w.key).await;
    assert_eq!(event(&mut ws).await["type"], "session.created");
    send_json(
        &mut ws,
        json!({"type": "response.create", "response": {"metadata": {"mode": "drop"}}}),
    )
    .await;
    loop {
        match next(&mut ws).await {
            Message::Close(Some(f)) => {
                assert_eq!(f.code, CloseCode::Error, "{f:?}");
                assert_eq!(f.reason.as_str(), "upstream failure");
                break;
            }
            Message::Text(_) | Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("expected the upstream's close, got {other:?}"),
        }
    }
    let recs = wait_records(&app, &w.user, 1).await;
    let r = realtime_records(&recs)[0].clone();
    assert_eq!(r["status"], 502, "{r}");
    assert_eq!(r["tokens_estimated"], true, "{r}");
    assert_eq!(
        r["completion_tokens"], 2,
        "\"Hello world\" is two tokens: {r}"
    );

    // The client leaves and the upstream never answers the cancel: after the wait, 499.
    let mut ws = open_ok(&app, &w.key).await;
    assert_eq!(event(&mut ws).await["type"], "session.created");
    send_json(
        &mut ws,
        json!({"type": "response.create", "response": {"metadata": {"mode": "deaf"}}}),
    )
    .await;
    assert_eq!(event(&mut ws).await["type"], "response.created");
    drop(ws);
    let recs = wait_records(&app, &w.user, 2).await;
    let r = realtime_records(&recs)
        .into_iter()
        .find(|r| r["status"] == 499)
        .cloned()
        .unwrap_or_else(|| panic!("no 499 record: {recs:?}"));
    assert_eq!(r["tokens_estimated"], true, "{r}");
    assert!(
        r["completion_tokens"].as_i64().is_some_and(|n| n <= 2),
        "{r}"
    );
    assert_eq!(w.mock.seen(|s| s.cancels), 1);
    app.stop().await;
}

#[tokio::test]
async fn the_route_is_in_the_openapi_document() {
    let app = TestApp::spawn().await;
    let (s, doc) = app.get("/openapi.json", None).await;
    assert_eq!(s, 200);
    let op = &doc["paths"]["/v1/realtime"]["get"];
    assert!(op.is_object(), "{}", doc["paths"]);
    assert!(op["responses"]["101"].is_object(), "{op}");
    assert_eq!(op["parameters"][0]["name"], "model", "{op}");
    app.stop().await;
}
