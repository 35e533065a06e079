//! The chat WebSocket (`/api/ws`, API.md §12) driven by a real client (tokio-tungstenite):
//! first-message auth, chat frames, errors that keep the socket open, heartbeats, the per-user
//! cap, `conversation.updated` (also across two replicas through Redis), and the close on
//! shutdown. On whichever database `TOLLGATE_TEST_DATABASE_URL` names (SQLite otherwise).
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::TestApp;
use common::gateway::setup;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Bound on waiting for one frame (a hang fails the test instead of blocking it).
const WAIT: Duration = Duration::from_secs(15);

async fn connect(app: &TestApp, query: &str) -> Ws {
    let url = format!("ws://{}/api/ws{query}", app.addr);
    tokio_tungstenite::connect_async(url).await.unwrap().0
}

async fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::text(v.to_string())).await.unwrap();
}

/// The next JSON text frame (pings are answered by the client as it reads).
async fn next(ws: &mut Ws) -> Value {
    loop {
        let m = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a frame in time")
            .expect("socket open")
            .expect("frame");
        match m {
            Message::Text(t) => return serde_json::from_str(t.as_str()).unwrap(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// The close frame's code and reason (skipping anything before it).
async fn closed(ws: &mut Ws) -> (u16, String) {
    loop {
        let m = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a close in time");
        match m {
            Some(Ok(Message::Close(Some(f)))) => return (u16::from(f.code), f.reason.to_string()),
            Some(Ok(Message::Close(None))) | None => return (0, String::new()),
            Some(Ok(_)) => continue,
            Some(Err(e)) => panic!("{e}"),
        }
    }
}

async fn authed(app: &TestApp, token: &str) -> Ws {
    let mut ws = connect(app, "").await;
    send(&mut ws, json!({"type": "auth", "token": token})).await;
    let ok = next(&mut ws).await;
    assert_eq!(ok["type"], "authenticated", "{ok}");
    ws
}

/// Frames of one turn, `start` to `done` / `error`.
async fn turn(ws: &mut Ws) -> Vec<Value> {
    let mut out = Vec::new();
    loop {
        let f = next(ws).await;
        if f["type"] == "conversation.updated" {
            continue;
        }
        let end = f["type"] == "done" || f["type"] == "error";
        out.push(f);
        if end {
            return out;
        }
    }
}

#[tokio::test]
async fn chat_ping_errors_and_updates_over_the_socket() {
    let app = TestApp::spawn_with(|c| c.server.max_body_bytes = 4096).await;
    let g = setup(&app).await;
    let mut ws = authed(&app, &g.user).await;
    let mut other = authed(&app, &g.user).await;

    send(&mut ws, json!({"type": "ping"})).await;
    assert_eq!(next(&mut ws).await, json!({"type": "pong"}));

    // A chat streams the frames of /api/chat/stream and is stored.
    send(
        &mut ws,
        json!({"type": "chat", "model": "gpt-test", "content": "Hello socket"}),
    )
    .await;
    let f = turn(&mut ws).await;
    assert_eq!(f[0]["type"], "start", "{f:?}");
    let conv = f[0]["conversation_id"].as_str().unwrap().to_owned();
    let deltas: Vec<_> = f
        .iter()
        .filter(|x| x["type"] == "delta")
        .map(|x| x["content"].as_str().unwrap())
        .collect();
    assert_eq!(deltas, ["Hello", " from", " mock"]);
    let done = f.last().unwrap();
    assert_eq!(done["type"], "done");
    assert_eq!(done["message"]["id"], f[0]["message_id"]);
    assert_eq!(done["message"]["content"], "Hello from mock");
    assert_eq!(done["usage"]["completion_tokens"], 7);
    let (s, c) = app
        .get(&format!("/api/conversations/{conv}"), Some(&g.user))
        .await;
    assert_eq!(s, 200, "{c}");
    assert_eq!(c["messages"].as_array().unwrap().len(), 2);
    assert_eq!(c["title"], "Hello socket");
    // The user's other socket heard about it.
    let u = next(&mut other).await;
    assert_eq!(
        u,
        json!({"type": "conversation.updated", "conversation_id": conv})
    );

    // Continue the conversation over the socket.
    send(
        &mut ws,
        json!({"type": "chat", "model": "gpt-test", "content": "Again", "conversation_id": conv}),
    )
    .await;
    let f = turn(&mut ws).await;
    assert_eq!(f[0]["conversation_id"], conv.as_str());
    assert_eq!(f.last().unwrap()["type"], "done");
    assert_eq!(g.mock.last().body["messages"].as_array().unwrap().len(), 3);

    // A change over HTTP reaches every socket of the user.
    let (s, _) = app
        .patch(
            &format!("/api/conversations/{conv}"),
            Some(&g.user),
            json!({"title": "Renamed"}),
        )
        .await;
    assert_eq!(s, 200);
    for sock in [&mut ws, &mut other] {
        loop {
            let u = next(sock).await;
            assert_eq!(u["type"], "conversation.updated", "{u}");
            if u["conversation_id"] == conv.as_str() {
                break;
            }
        }
    }

    // Bad frames: an error frame each, and the socket stays open.
    let bob = common::accounts::user_token(&app, "bob").await;
    let (s, b) = app
        .post(
            "/api/provider-keys",
            Some(&bob),
            json!({"provider": "mock", "api_key": "sk-bob-upstream-0123456789"}),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    let (s, bc) = app
        .post(
            "/api/chat",
            Some(&bob),
            json!({"model": "gpt-test", "message": "bob's"}),
        )
        .await;
    assert_eq!(s, 200, "{bc}");
    let requests = g.mock.requests().len();
    let cases = [
        (Message::text("not json"), "invalid_json"),
        (Message::binary(vec![1u8, 2, 3]), "invalid_frame"),
        (Message::text(json!({"no": "type"}).to_string()), "missing_field"),
        (Message::text(json!({"type": "dance"}).to_string()), "invalid_value"),
        (
            Message::text(json!({"type": "auth", "token": g.user}).to_string()),
            "invalid_value",
        ),
        (
            Message::text(json!({"type": "chat", "model": "gpt-test"}).to_string()),
            "missing_field",
        ),
        (
            Message::text(json!({"type": "chat", "model": "gpt-test", "content": 5}).to_string()),
            "invalid_value",
        ),
        (
            Message::text(json!({"type": "chat", "model": "gpt-test", "content": "  "}).to_string()),
            "invalid_value",
        ),
        (
            Message::text(
                json!({"type": "chat", "model": "gpt-test", "content": "x".repeat(5000)})
                    .to_string(),
            ),
            "payload_too_large",
        ),
        (
            Message::text(json!({"type": "chat", "model": "nope", "content": "x"}).to_string()),
            "model_not_found",
        ),
        (
            Message::text(
                json!({"type": "chat", "model": "gpt-test", "content": "x", "conversation_id": bc["conversation_id"]})
                    .to_string(),
            ),
            "not_found",
        ),
        (
            Message::text(
                json!({"type": "regenerate", "conversation_id": bc["conversation_id"]}).to_string(),
            ),
            "not_found",
        ),
    ];
    for (frame, code) in cases {
        let shown = format!("{frame:?}");
        ws.send(frame).await.unwrap();
        let e = next(&mut ws).await;
        assert_eq!(e["type"], "error", "{shown}: {e}");
        assert_eq!(e["error"]["code"], code, "{shown}: {e}");
        assert!(e["error"]["message"].is_string());
    }
    send(&mut ws, json!({"type": "ping"})).await;
    assert_eq!(next(&mut ws).await["type"], "pong");
    // Nothing refused reached the upstream (the refused model was not even tried).
    assert_eq!(g.mock.requests().len(), requests);
    let (_, bl) = app.get("/api/conversations", Some(&bob)).await;
    assert_eq!(bl["data"][0]["message_count"], 2);

    // Regenerate over the socket.
    send(
        &mut ws,
        json!({"type": "regenerate", "conversation_id": conv}),
    )
    .await;
    let f = turn(&mut ws).await;
    assert_eq!(f[0]["type"], "start");
    assert_eq!(f.last().unwrap()["type"], "done");
    let (_, c) = app
        .get(&format!("/api/conversations/{conv}"), Some(&g.user))
        .await;
    assert_eq!(c["messages"].as_array().unwrap().len(), 4);
    assert_eq!(c["messages"][3]["id"], f[0]["message_id"]);
}

#[tokio::test]
async fn auth_is_the_first_message_in_time() {
    let app = TestApp::spawn_with(|c| c.chat.ws_auth_timeout_secs = 1).await;
    let g = setup(&app).await;
    // Nothing in time.
    let mut ws = connect(&app, "").await;
    let (code, reason) = closed(&mut ws).await;
    assert_eq!(code, 4401, "{reason}");
    // A wrong token; a first message that is not auth; a token in the URL.
    let mut ws = connect(&app, "").await;
    send(&mut ws, json!({"type": "auth", "token": "nope"})).await;
    assert_eq!(closed(&mut ws).await.0, 4401);
    let mut ws = connect(&app, "").await;
    send(&mut ws, json!({"type": "ping"})).await;
    assert_eq!(closed(&mut ws).await.0, 4401);
    let mut ws = connect(&app, &format!("?token={}", g.user)).await;
    let (code, reason) = closed(&mut ws).await;
    assert_eq!(code, 4401);
    assert!(reason.contains("first message"), "{reason}");
    // A gateway key is not an access token.
    let mut ws = connect(&app, "").await;
    send(&mut ws, json!({"type": "auth", "token": g.key})).await;
    assert_eq!(closed(&mut ws).await.0, 4401);
    // Logged out: the next chat closes the socket.
    let token = common::accounts::user_token(&app, "carol").await;
    let mut ws = authed(&app, &token).await;
    let (s, _) = app.post("/api/auth/logout", Some(&token), json!({})).await;
    assert!(s == 200 || s == 204, "{s}");
    send(
        &mut ws,
        json!({"type": "chat", "model": "gpt-test", "content": "hi"}),
    )
    .await;
    assert_eq!(closed(&mut ws).await.0, 4401);
}

#[tokio::test]
async fn heartbeats_idle_close_and_the_per_user_cap() {
    let app = TestApp::spawn_with(|c| {
        c.chat.ws_ping_interval_secs = 1;
        c.chat.ws_idle_timeout_secs = 2;
        c.chat.ws_max_sockets_per_user = 2;
    })
    .await;
    let g = setup(&app).await;
    // A client that reads (and so answers pings) stays open past the idle time.
    let mut live = authed(&app, &g.user).await;
    let mut silent = authed(&app, &g.user).await;
    // A third socket of the same user is over the cap.
    let mut third = connect(&app, "").await;
    send(&mut third, json!({"type": "auth", "token": g.user})).await;
    assert_eq!(closed(&mut third).await.0, 4429);

    let mut pings = 0;
    let until = tokio::time::Instant::now() + Duration::from_secs(4);
    while let Ok(m) = tokio::time::timeout_at(until, live.next()).await {
        if let Some(Ok(Message::Ping(_))) = m {
            pings += 1;
        }
    }
    assert!(pings >= 2, "{pings} pings");
    send(&mut live, json!({"type": "ping"})).await;
    assert_eq!(next(&mut live).await["type"], "pong");
    // The silent one (it read nothing, so it answered no ping) was pinged, then closed.
    let mut saw_ping = false;
    let code = loop {
        match tokio::time::timeout(WAIT, silent.next()).await.unwrap() {
            Some(Ok(Message::Ping(_))) => saw_ping = true,
            Some(Ok(Message::Close(Some(f)))) => break u16::from(f.code),
            other => panic!("{other:?}"),
        }
    };
    assert!(saw_ping);
    assert_eq!(code, 1001);
    // Its slot is free again.
    drop(silent);
    let deadline = std::time::Instant::now() + WAIT;
    while app.state.caches.hub().count(&user_id(&app, &g.user).await) > 1 {
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _again = authed(&app, &g.user).await;
}

async fn user_id(app: &TestApp, token: &str) -> String {
    let (_, me) = app.get("/api/me", Some(token)).await;
    me["id"]
        .as_str()
        .or(me["user"]["id"].as_str())
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn shutdown_finishes_the_answer_then_closes() {
    let app = TestApp::spawn().await;
    let g = setup(&app).await;
    let mut ws = authed(&app, &g.user).await;
    send(
        &mut ws,
        json!({"type": "chat", "model": "gpt-slow", "content": "A long one"}),
    )
    .await;
    let start = next(&mut ws).await;
    assert_eq!(start["type"], "start");
    let conv = start["conversation_id"].as_str().unwrap().to_owned();
    let db = app.db.clone();
    let stopping = tokio::spawn(app.stop());
    let f = turn(&mut ws).await;
    let done = f.last().unwrap();
    assert_eq!(done["type"], "done", "{f:?}");
    assert_eq!(done["message"]["status"], "completed");
    assert!(
        done["message"]["content"]
            .as_str()
            .unwrap()
            .ends_with(" more")
    );
    let (code, _) = closed(&mut ws).await;
    assert_eq!(code, 1001);
    stopping.await.unwrap();
    // What a restarted server reads: both messages, the answer complete.
    let again = TestApp::spawn_on(db, |_| {}).await;
    let (s, c) = again
        .get(&format!("/api/conversations/{conv}"), Some(&g.user))
        .await;
    assert_eq!(s, 200, "{c}");
    assert_eq!(c["messages"].as_array().unwrap().len(), 2);
    assert_eq!(c["messages"][1]["status"], "completed");
}

#[tokio::test]
async fn updates_reach_a_socket_on_another_replica_through_redis() {
    let Ok(url) = std::env::var("TOLLGATE_TEST_REDIS_URL") else {
        eprintln!("skipped: set TOLLGATE_TEST_REDIS_URL=redis://127.0.0.1:6379 to run it");
        return;
    };
    let prefix = format!("tg-chat-{}:", uuid::Uuid::new_v4().simple());
    let with_redis = |url: String, prefix: String| {
        move |c: &mut tollgate::config::Config| {
            c.redis.url = Some(secrecy::SecretString::from(url));
            c.redis.key_prefix = prefix;
        }
    };
    let a = TestApp::spawn_with(with_redis(url.clone(), prefix.clone())).await;
    let b = TestApp::spawn_on(a.db.clone(), with_redis(url, prefix)).await;
    let g = setup(&a).await;
    let mut on_b = authed(&b, &g.user).await;
    // A chat and a rename on replica A reach the socket held by replica B.
    let (s, c) = a
        .post(
            "/api/chat",
            Some(&g.user),
            json!({"model": "gpt-test", "message": "cross replica"}),
        )
        .await;
    assert_eq!(s, 200, "{c}");
    let conv = c["conversation_id"].as_str().unwrap();
    let u = next(&mut on_b).await;
    assert_eq!(
        u,
        json!({"type": "conversation.updated", "conversation_id": conv})
    );
    let (s, _) = a
        .patch(
            &format!("/api/conversations/{conv}"),
            Some(&g.user),
            json!({"title": "moved"}),
        )
        .await;
    assert_eq!(s, 200);
    loop {
        let u = next(&mut on_b).await;
        assert_eq!(u["conversation_id"], conv);
        let (_, v) = b
            .get(&format!("/api/conversations/{conv}"), Some(&g.user))
            .await;
        if v["title"] == "moved" {
            break;
        }
    }
    // A share revoked on A is 404 on B at once.
    let (_, sh) = a
        .post(
            &format!("/api/conversations/{conv}/share"),
            Some(&g.user),
            json!({}),
        )
        .await;
    let token = sh["token"].as_str().unwrap();
    let (s, _) = b.get(&format!("/share/{token}?format=json"), None).await;
    assert_eq!(s, 200);
    let (s, _) = a
        .delete(&format!("/api/conversations/{conv}/share"), Some(&g.user))
        .await;
    assert_eq!(s, 204);
    let (s, _) = b.get(&format!("/share/{token}?format=json"), None).await;
    assert_eq!(s, 404);
}
