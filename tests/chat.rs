//! Chat for signed-in users (API.md §12): `/api/chat`, `/api/chat/stream`,
//! `/api/chat/regenerate` through the hot path against the mock upstream, on the tables of §9
//! (a conversation continues through `/v1/conversations` and the other way round), on whichever
//! database `TOLLGATE_TEST_DATABASE_URL` names (SQLite otherwise).
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::gateway::{Gateway, setup, wait_records};
use common::{TestApp, assert_error};
use futures_util::StreamExt;
use sea_orm::{EntityTrait, PaginatorTrait};
use serde_json::{Value, json};

async fn conversation_count(app: &TestApp) -> u64 {
    entity::conversations::Entity::find()
        .count(&app.state.db)
        .await
        .unwrap()
}

async fn usage_count(app: &TestApp) -> u64 {
    entity::usage_records::Entity::find()
        .count(&app.state.db)
        .await
        .unwrap()
}

/// The SSE frames of a finished `/api/chat/stream` (or `?stream=true`) answer.
async fn frames(app: &TestApp, path: &str, token: &str, body: Value) -> (u16, Vec<Value>) {
    let resp = app
        .client
        .post(app.url(path))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let ct = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let text = resp.text().await.unwrap();
    if !ct.starts_with("text/event-stream") {
        return (status, vec![serde_json::from_str(&text).unwrap()]);
    }
    let frames = text
        .split("\n\n")
        .filter_map(|ev| ev.strip_prefix("data: "))
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    (status, frames)
}

/// The user's usage records of the chat (not those of the `/v1` calls), once `n` exist.
async fn chat_records(app: &TestApp, token: &str, n: usize) -> Vec<Value> {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let all = wait_records(app, token, 0).await;
        let chat: Vec<Value> = all.into_iter().filter(|r| r["source"] == "chat").collect();
        if chat.len() >= n {
            return chat;
        }
        assert!(std::time::Instant::now() < deadline, "{chat:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn items(app: &TestApp, g: &Gateway, conv: &str) -> Vec<Value> {
    let (s, b) = app
        .get(
            &format!("/v1/conversations/{conv}/items?order=asc&limit=100"),
            Some(&g.key),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    b["data"].as_array().unwrap().clone()
}

#[tokio::test]
async fn chat_titles_stores_meters_and_continues_through_v1() {
    let app = TestApp::spawn().await;
    let g = setup(&app).await;
    let (s, b) = app
        .post(
            "/api/chat",
            Some(&g.user),
            json!({"model": "gpt-test", "message": "  \nHow do tides work?\nPlease explain.", "temperature": 0.5, "max_tokens": 50}),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    let conv = b["conversation_id"].as_str().unwrap().to_owned();
    assert!(conv.starts_with("conv_"), "{b}");
    let m = &b["message"];
    assert_eq!(m["role"], "assistant");
    assert_eq!(m["content"], "Hello from mock");
    assert_eq!(m["model"], "gpt-test");
    assert_eq!(m["tokens"], 7);
    assert!(m["id"].as_str().unwrap().starts_with("msg_"));
    assert!(m["created_at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(b["usage"]["prompt_tokens"], 11);
    assert_eq!(b["usage"]["completion_tokens"], 7);
    // Upstream: the user's own key, the model's upstream name, the message and the options.
    let up = g.mock.last();
    assert_eq!(
        up.headers["authorization"],
        format!("Bearer {}", common::gateway::PROVIDER_SECRET)
    );
    assert_eq!(up.body["model"], "normal");
    assert_eq!(up.body["messages"].as_array().unwrap().len(), 1);
    assert_eq!(up.body["temperature"], 0.5);
    assert_eq!(up.body["max_tokens"], 50);

    // The same conversation through the Conversations API (the user's gateway key).
    let (s, c) = app
        .get(&format!("/v1/conversations/{conv}"), Some(&g.key))
        .await;
    assert_eq!(s, 200, "{c}");
    let it = items(&app, &g, &conv).await;
    assert_eq!(it.len(), 2);
    assert_eq!(it[0]["role"], "user");
    assert_eq!(
        it[0]["content"][0]["text"],
        "  \nHow do tides work?\nPlease explain."
    );
    assert_eq!(it[1]["role"], "assistant");
    assert_eq!(it[1]["id"], m["id"]);
    assert_eq!(it[1]["content"][0]["type"], "output_text");
    let row = entity::conversations::Entity::find_by_id(conv.clone())
        .one(&app.state.db)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row.title.as_deref(), Some("How do tides work?"));
    assert_eq!(row.model.as_deref(), Some("gpt-test"));

    // The usage record: no key, source chat, the conversation.
    let recs = chat_records(&app, &g.user, 1).await;
    assert_eq!(recs[0]["key_id"], Value::Null, "{}", recs[0]);
    assert_eq!(recs[0]["source"], "chat");
    assert_eq!(recs[0]["conversation_id"], conv.as_str());
    assert_eq!(recs[0]["status"], 200);
    assert_eq!(recs[0]["prompt_tokens"], 11);
    assert_eq!(recs[0]["completion_tokens"], 7);

    // Items added through /v1 are part of the next chat turn's history.
    let (s, b) = app
        .post(
            &format!("/v1/conversations/{conv}/items"),
            Some(&g.key),
            json!({"items": [{"role": "user", "content": "From the SDK"}, {"role": "assistant", "content": "Noted"}]}),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    let (s, b) = app
        .post(
            "/api/chat",
            Some(&g.user),
            json!({"model": "gpt-test", "message": "And the moon?", "conversation_id": conv, "system": "Be brief."}),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["conversation_id"], conv.as_str());
    let sent = g.mock.last().body["messages"].clone();
    let roles: Vec<_> = sent
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["role"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        roles,
        ["system", "user", "assistant", "user", "assistant", "user"]
    );
    assert_eq!(sent[0]["content"], "Be brief.");
    assert_eq!(sent[3]["content"], "From the SDK");
    assert_eq!(sent[5]["content"], "And the moon?");
    assert_eq!(items(&app, &g, &conv).await.len(), 6);
    // The system prompt is for that turn only: not stored.
    assert!(
        items(&app, &g, &conv)
            .await
            .iter()
            .all(|i| i["role"] != "system")
    );

    // A conversation made through /v1 continues in the chat.
    let (s, v1) = app
        .post(
            "/v1/conversations",
            Some(&g.key),
            json!({"items": [{"role": "user", "content": "Remember 42"}]}),
        )
        .await;
    assert_eq!(s, 200, "{v1}");
    let (s, b) = app
        .post(
            "/api/chat",
            Some(&g.user),
            json!({"model": "gpt-test", "message": "What number?", "conversation_id": v1["id"]}),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    let sent = g.mock.last().body["messages"].clone();
    assert_eq!(sent[0]["content"], "Remember 42");
    assert_eq!(sent[1]["content"], "What number?");
}

#[tokio::test]
async fn stream_sends_start_deltas_done_and_stores_the_answer() {
    let app = TestApp::spawn().await;
    let g = setup(&app).await;
    let (s, f) = frames(
        &app,
        "/api/chat/stream",
        &g.user,
        json!({"model": "gpt-test", "message": "Stream please"}),
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(f[0]["type"], "start", "{f:?}");
    let conv = f[0]["conversation_id"].as_str().unwrap().to_owned();
    let msg_id = f[0]["message_id"].as_str().unwrap().to_owned();
    let deltas: Vec<_> = f
        .iter()
        .filter(|x| x["type"] == "delta")
        .map(|x| x["content"].as_str().unwrap())
        .collect();
    assert_eq!(deltas, ["Hello", " from", " mock"]);
    let done = f.last().unwrap();
    assert_eq!(done["type"], "done", "{f:?}");
    assert_eq!(done["message"]["id"], msg_id.as_str());
    assert_eq!(done["message"]["content"], "Hello from mock");
    assert_eq!(done["message"]["status"], "completed");
    assert_eq!(done["usage"]["total_tokens"], 18);
    let it = items(&app, &g, &conv).await;
    assert_eq!(it.len(), 2);
    assert_eq!(it[1]["id"], msg_id.as_str());
    assert_eq!(it[1]["status"], "completed");

    // A failure upstream before the answer starts: an error response, nothing stored.
    let before = conversation_count(&app).await;
    let (s, f) = frames(
        &app,
        "/api/chat/stream",
        &g.user,
        json!({"model": "gpt-400", "message": "fail"}),
    )
    .await;
    assert_error(s, &f[0], 400, "upstream_says_no");
    assert_eq!(conversation_count(&app).await, before);
}

#[tokio::test]
async fn regenerate_replaces_the_last_answer() {
    let app = TestApp::spawn().await;
    let g = setup(&app).await;
    let (s, b) = app
        .post(
            "/api/chat",
            Some(&g.user),
            json!({"model": "gpt-test", "message": "First"}),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    let conv = b["conversation_id"].as_str().unwrap().to_owned();
    let old = b["message"]["id"].clone();
    let (s, r) = app
        .post(
            "/api/chat/regenerate",
            Some(&g.user),
            json!({"conversation_id": conv}),
        )
        .await;
    assert_eq!(s, 200, "{r}");
    assert_ne!(r["message"]["id"], old);
    assert_eq!(r["message"]["content"], "Hello from mock");
    // Sent upstream: the history up to the last user message, with the conversation's model.
    let up = g.mock.last().body;
    assert_eq!(up["model"], "normal");
    assert_eq!(up["messages"].as_array().unwrap().len(), 1);
    let it = items(&app, &g, &conv).await;
    assert_eq!(it.len(), 2);
    assert_eq!(it[1]["id"], r["message"]["id"]);

    // Streamed.
    let (s, f) = frames(
        &app,
        "/api/chat/regenerate?stream=true",
        &g.user,
        json!({"conversation_id": conv}),
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(f[0]["type"], "start");
    assert_eq!(f.last().unwrap()["type"], "done");
    let it = items(&app, &g, &conv).await;
    assert_eq!(it.len(), 2);
    assert_eq!(it[1]["id"], f[0]["message_id"]);

    // Nothing to answer: a conversation without a user message.
    let (_, v1) = app
        .post(
            "/v1/conversations",
            Some(&g.key),
            json!({"items": [{"role": "assistant", "content": "hi"}]}),
        )
        .await;
    let (s, b) = app
        .post(
            "/api/chat/regenerate",
            Some(&g.user),
            json!({"conversation_id": v1["id"], "model": "gpt-test"}),
        )
        .await;
    assert_error(s, &b, 400, "invalid_value");
}

#[tokio::test]
async fn bad_input_is_refused_and_nothing_is_stored_or_charged() {
    let app = TestApp::spawn_with(|c| c.server.max_body_bytes = 4096).await;
    let g = setup(&app).await;
    let requests_before = g.mock.requests().len();
    let cases = [
        (
            json!({"model": "gpt-test", "message": "   "}),
            400,
            "invalid_value",
        ),
        (json!({"model": "gpt-test"}), 400, "missing_field"),
        (
            json!({"model": "gpt-test", "message": "x", "extra": 1}),
            400,
            "unknown_field",
        ),
        (
            json!({"model": "gpt-test", "message": "x", "temperature": 3}),
            400,
            "invalid_value",
        ),
        (
            json!({"model": "no-such-model", "message": "x"}),
            404,
            "model_not_found",
        ),
        (
            json!({"model": "embed-test", "message": "x"}),
            400,
            "invalid_value",
        ),
        (
            json!({"model": "gpt-test", "message": "x", "conversation_id": "conv_nope"}),
            404,
            "not_found",
        ),
        (
            json!({"model": "gpt-test", "message": "x".repeat(5000)}),
            413,
            "payload_too_large",
        ),
    ];
    for (body, status, code) in &cases {
        for path in ["/api/chat", "/api/chat/stream"] {
            let (s, b) = app.post(path, Some(&g.user), body.clone()).await;
            assert_error(s, &b, *status, code);
        }
    }
    // No access token; a gateway key is not an access token.
    let (s, b) = app
        .post(
            "/api/chat",
            None,
            json!({"model": "gpt-test", "message": "x"}),
        )
        .await;
    assert_error(s, &b, 401, "missing_token");
    let (s, _) = app
        .post(
            "/api/chat",
            Some(&g.key),
            json!({"model": "gpt-test", "message": "x"}),
        )
        .await;
    assert_eq!(s, 401);
    // The upstream refuses: its error, nothing stored.
    let (s, b) = app
        .post(
            "/api/chat",
            Some(&g.user),
            json!({"model": "gpt-500", "message": "x"}),
        )
        .await;
    assert_eq!(s, 500, "{b}");
    assert_eq!(b["error"]["message"], "boom");
    assert_eq!(conversation_count(&app).await, 0);
    // Only the gpt-500 call reached the upstream; it is the only usage record.
    assert_eq!(g.mock.requests().len(), requests_before + 1);
    let recs = wait_records(&app, &g.user, 1).await;
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0]["status"], 500);
    assert_eq!(usage_count(&app).await, 1);

    // Someone else's conversation is 404, and it is left as it was.
    let (s, b) = app
        .post(
            "/api/chat",
            Some(&g.user),
            json!({"model": "gpt-test", "message": "mine"}),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    let conv = b["conversation_id"].as_str().unwrap().to_owned();
    let bob = common::accounts::user_token(&app, "bob").await;
    for path in ["/api/chat", "/api/chat/stream"] {
        let (s, b) = app
            .post(
                path,
                Some(&bob),
                json!({"model": "gpt-test", "message": "x", "conversation_id": conv}),
            )
            .await;
        assert_error(s, &b, 404, "not_found");
    }
    let (s, b) = app
        .post(
            "/api/chat/regenerate",
            Some(&bob),
            json!({"conversation_id": conv}),
        )
        .await;
    assert_error(s, &b, 404, "not_found");
    assert_eq!(items(&app, &g, &conv).await.len(), 2);
}

#[tokio::test]
async fn a_client_that_leaves_keeps_what_was_produced_marked_incomplete() {
    let app = TestApp::spawn().await;
    let g = setup(&app).await;
    let resp = app
        .client
        .post(app.url("/api/chat/stream"))
        .bearer_auth(&g.user)
        .json(&json!({"model": "gpt-slow", "message": "Long answer please"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    let mut seen = String::new();
    while !seen.contains("\"delta\"") {
        let chunk = body.next().await.unwrap().unwrap();
        seen.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    let conv = seen
        .split("\"conversation_id\":\"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap()
        .to_owned();
    drop(body);
    // The answer is stored as far as it got, marked incomplete; the upstream is stopped.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let it = loop {
        let it = items(&app, &g, &conv).await;
        if it.len() == 2 {
            break it;
        }
        assert!(std::time::Instant::now() < deadline, "{it:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    assert_eq!(it[1]["status"], "incomplete");
    let text = it[1]["content"][0]["text"].as_str().unwrap();
    assert!(text.starts_with("Hello"), "{text}");
    assert!(!text.ends_with(&" more".repeat(30)), "{text}");
    let recs = chat_records(&app, &g.user, 1).await;
    assert_eq!(recs[0]["status"], 499, "{}", recs[0]);
    assert_eq!(recs[0]["source"], "chat");
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while g.mock.cancelled() == 0 {
        assert!(std::time::Instant::now() < deadline, "upstream not stopped");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn chat(app: &TestApp, token: &str, body: Value) -> Value {
    let (s, b) = app.post("/api/chat", Some(token), body).await;
    assert_eq!(s, 200, "{b}");
    b
}

#[tokio::test]
async fn conversations_list_get_rename_messages_delete() {
    let app = TestApp::spawn().await;
    let g = setup(&app).await;
    let a = chat(
        &app,
        &g.user,
        json!({"model": "gpt-test", "message": "Zebra stripes"}),
    )
    .await;
    let b = chat(
        &app,
        &g.user,
        json!({"model": "gpt-cached", "message": "Volcano facts"}),
    )
    .await;
    let c = chat(
        &app,
        &g.user,
        json!({"model": "gpt-test", "message": "Glacier melt"}),
    )
    .await;
    let ids = |v: &Value| -> Vec<String> {
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["id"].as_str().unwrap().to_owned())
            .collect()
    };
    // Newest activity first; a turn in `a` moves it to the front.
    chat(&app, &g.user, json!({"model": "gpt-test", "message": "More zebra", "conversation_id": a["conversation_id"]})).await;
    let (s, l) = app.get("/api/conversations", Some(&g.user)).await;
    assert_eq!(s, 200, "{l}");
    assert_eq!(l["total"], 3);
    assert_eq!(
        ids(&l),
        [
            &a["conversation_id"],
            &c["conversation_id"],
            &b["conversation_id"]
        ]
        .map(|v| v.as_str().unwrap().to_owned())
    );
    let first = &l["data"][0];
    assert_eq!(first["title"], "Zebra stripes");
    assert_eq!(first["model"], "gpt-test");
    assert_eq!(first["message_count"], 4);
    assert_eq!(first["shared"], false);
    assert!(first["created_at"].as_str().unwrap().ends_with('Z'));
    // Paging.
    let (_, p2) = app
        .get("/api/conversations?page=2&per_page=2", Some(&g.user))
        .await;
    assert_eq!(ids(&p2), [b["conversation_id"].as_str().unwrap()]);
    assert_eq!(
        (
            p2["page"].as_u64(),
            p2["per_page"].as_u64(),
            p2["total"].as_u64()
        ),
        (Some(2), Some(2), Some(3))
    );
    let (s, e) = app
        .get("/api/conversations?per_page=101", Some(&g.user))
        .await;
    assert_error(s, &e, 400, "invalid_value");
    let (s, e) = app.get("/api/conversations?bogus=1", Some(&g.user)).await;
    assert_eq!(s, 400, "{e}");
    // The model filter; search over titles and message text.
    let (_, m) = app
        .get("/api/conversations?model=gpt-cached", Some(&g.user))
        .await;
    assert_eq!(ids(&m), [b["conversation_id"].as_str().unwrap()]);
    let (_, t) = app
        .get("/api/conversations?search=GLACIER", Some(&g.user))
        .await;
    assert_eq!(ids(&t), [c["conversation_id"].as_str().unwrap()]);
    let (_, t) = app
        .get("/api/conversations?search=mock", Some(&g.user))
        .await;
    assert_eq!(t["total"], 3, "the answers' text matches: {t}");
    let (_, t) = app
        .get("/api/conversations?search=100%25", Some(&g.user))
        .await;
    assert_eq!(t["total"], 0, "{t}");

    // Get with messages in order; messages paging.
    let conv = a["conversation_id"].as_str().unwrap();
    let (s, one) = app
        .get(&format!("/api/conversations/{conv}"), Some(&g.user))
        .await;
    assert_eq!(s, 200, "{one}");
    let msgs = one["messages"].as_array().unwrap();
    assert_eq!(msgs.len(), 4);
    assert_eq!(msgs[0]["role"], "user");
    assert_eq!(msgs[0]["content"], "Zebra stripes");
    assert_eq!(msgs[0]["model"], Value::Null);
    assert_eq!(msgs[1]["role"], "assistant");
    assert_eq!(msgs[1]["model"], "gpt-test");
    assert_eq!(msgs[1]["tokens"], 7);
    assert_eq!(msgs[2]["content"], "More zebra");
    let (_, mp) = app
        .get(
            &format!("/api/conversations/{conv}/messages?page=2&per_page=3"),
            Some(&g.user),
        )
        .await;
    assert_eq!(mp["total"], 4);
    assert_eq!(mp["data"].as_array().unwrap().len(), 1);
    assert_eq!(mp["data"][0]["id"], msgs[3]["id"]);

    // Rename.
    let (s, r) = app
        .patch(
            &format!("/api/conversations/{conv}"),
            Some(&g.user),
            json!({"title": "  Stripes  "}),
        )
        .await;
    assert_eq!(s, 200, "{r}");
    assert_eq!(r["title"], "Stripes");
    for bad in [
        json!({"title": "  "}),
        json!({"title": "x".repeat(256)}),
        json!({"title": "x", "more": 1}),
        json!({}),
    ] {
        let (s, e) = app
            .patch(
                &format!("/api/conversations/{conv}"),
                Some(&g.user),
                bad.clone(),
            )
            .await;
        assert_eq!(s, 400, "{bad}: {e}");
    }
    let (_, one) = app
        .get(&format!("/api/conversations/{conv}"), Some(&g.user))
        .await;
    assert_eq!(one["title"], "Stripes");

    // Someone else's: 404 everywhere, and nothing changes.
    let bob = common::accounts::user_token(&app, "bob").await;
    let (_, bl) = app.get("/api/conversations", Some(&bob)).await;
    assert_eq!(bl["total"], 0);
    for (method, path) in [
        ("GET", format!("/api/conversations/{conv}")),
        ("GET", format!("/api/conversations/{conv}/messages")),
        ("GET", format!("/api/conversations/{conv}/export")),
        ("DELETE", format!("/api/conversations/{conv}")),
        ("POST", format!("/api/conversations/{conv}/share")),
        ("DELETE", format!("/api/conversations/{conv}/share")),
    ] {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let (s, e) = app.call(m, &path, Some(&bob), None).await;
        assert_error(s, &e, 404, "not_found");
    }
    let (s, e) = app
        .patch(
            &format!("/api/conversations/{conv}"),
            Some(&bob),
            json!({"title": "mine"}),
        )
        .await;
    assert_error(s, &e, 404, "not_found");
    let (_, one) = app
        .get(&format!("/api/conversations/{conv}"), Some(&g.user))
        .await;
    assert_eq!(one["title"], "Stripes");

    // Delete: the conversation and its messages, here and on /v1.
    let (s, _) = app
        .delete(&format!("/api/conversations/{conv}"), Some(&g.user))
        .await;
    assert_eq!(s, 204);
    let (s, e) = app
        .get(&format!("/api/conversations/{conv}"), Some(&g.user))
        .await;
    assert_error(s, &e, 404, "not_found");
    let (s, _) = app
        .get(&format!("/v1/conversations/{conv}"), Some(&g.key))
        .await;
    assert_eq!(s, 404);
    let left = entity::conversation_items::Entity::find()
        .all(&app.state.db)
        .await
        .unwrap();
    assert!(left.iter().all(|i| i.conversation_id != conv));
    let (_, l) = app.get("/api/conversations", Some(&g.user)).await;
    assert_eq!(l["total"], 2);
}

#[tokio::test]
async fn search_finds_only_the_users_own_messages_with_a_snippet() {
    let app = TestApp::spawn().await;
    let g = setup(&app).await;
    let long = format!(
        "{} the quokka population on Rottnest island {}",
        "filler ".repeat(30),
        "padding ".repeat(30)
    );
    let a = chat(&app, &g.user, json!({"model": "gpt-test", "message": long})).await;
    chat(
        &app,
        &g.user,
        json!({"model": "gpt-test", "message": "Nothing relevant here"}),
    )
    .await;
    // Bob says the same word: alice never sees it.
    let bob = common::accounts::user_token(&app, "bob").await;
    let (s, b) = app
        .post(
            "/api/provider-keys",
            Some(&bob),
            json!({"provider": "mock", "api_key": "sk-bob-upstream-0123456789"}),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    chat(
        &app,
        &bob,
        json!({"model": "gpt-test", "message": "Bob's quokka secret"}),
    )
    .await;

    let (s, r) = app
        .get("/api/conversations/search?q=Quokka", Some(&g.user))
        .await;
    assert_eq!(s, 200, "{r}");
    assert_eq!(r["total"], 1, "{r}");
    let hit = &r["data"][0];
    assert_eq!(hit["conversation_id"], a["conversation_id"]);
    assert_eq!(hit["role"], "user");
    let snip = hit["snippet"].as_str().unwrap();
    assert!(snip.contains("quokka population"), "{snip}");
    assert!(snip.starts_with('…') && snip.ends_with('…'), "{snip}");
    assert!(snip.chars().count() < 200, "{snip}");
    assert!(!r.to_string().contains("secret"));
    // Every word must match; order and case do not matter.
    let (_, r) = app
        .get("/api/conversations/search?q=island%20QUOKKA", Some(&g.user))
        .await;
    assert_eq!(r["total"], 1, "{r}");
    let (_, r) = app
        .get(
            "/api/conversations/search?q=quokka%20zeppelin",
            Some(&g.user),
        )
        .await;
    assert_eq!(r["total"], 0, "{r}");
    // Bob finds his own.
    let (_, r) = app
        .get("/api/conversations/search?q=quokka", Some(&bob))
        .await;
    assert_eq!(r["total"], 1, "{r}");
    assert!(r["data"][0]["snippet"].as_str().unwrap().contains("secret"));
    // Query syntax of the databases is not passed through; bad queries are 400.
    let (s, r) = app
        .get(
            "/api/conversations/search?q=%22quokka*%20OR%20(NEAR%20-x%27",
            Some(&g.user),
        )
        .await;
    assert_eq!(s, 200, "{r}");
    for q in ["", "%20%2A%22", &"w".repeat(300)] {
        let (s, e) = app
            .get(&format!("/api/conversations/search?q={q}"), Some(&g.user))
            .await;
        assert_error(s, &e, 400, "invalid_value");
    }
    let (s, _) = app.get("/api/conversations/search", Some(&g.user)).await;
    assert_eq!(s, 400);
    // Paging.
    let (_, r) = app
        .get(
            "/api/conversations/search?q=mock&per_page=1&page=2",
            Some(&g.user),
        )
        .await;
    assert_eq!(r["total"], 2, "{r}");
    assert_eq!(r["data"].as_array().unwrap().len(), 1);
    assert_eq!(r["data"][0]["role"], "assistant");
}

#[tokio::test]
async fn export_and_share_links() {
    let app = TestApp::spawn().await;
    let g = setup(&app).await;
    let a = chat(
        &app,
        &g.user,
        json!({"model": "gpt-test", "message": "**Bold** ask <script>alert(1)</script> <img src=x onerror=alert(2)>"}),
    )
    .await;
    let conv = a["conversation_id"].as_str().unwrap();

    // Export: JSON and Markdown downloads.
    let r = app
        .client
        .get(app.url(&format!("/api/conversations/{conv}/export?format=json")))
        .bearer_auth(&g.user)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["content-disposition"],
        format!("attachment; filename=\"{conv}.json\"").as_str()
    );
    let j: Value = r.json().await.unwrap();
    assert_eq!(j["id"], conv);
    assert_eq!(j["messages"].as_array().unwrap().len(), 2);
    assert_eq!(j["messages"][1]["content"], "Hello from mock");
    let r = app
        .client
        .get(app.url(&format!("/api/conversations/{conv}/export?format=markdown")))
        .bearer_auth(&g.user)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/markdown")
    );
    assert!(
        r.headers()["content-disposition"]
            .to_str()
            .unwrap()
            .starts_with("attachment;")
    );
    let md = r.text().await.unwrap();
    assert!(md.starts_with("# **Bold** ask"), "{md}");
    assert!(
        md.contains("## Assistant (gpt-test)\n\nHello from mock"),
        "{md}"
    );
    let (s, e) = app
        .get(
            &format!("/api/conversations/{conv}/export?format=xml"),
            Some(&g.user),
        )
        .await;
    assert_error(s, &e, 400, "invalid_value");

    // Share: an unguessable token, a public page (sanitized, not indexed) and JSON.
    let (s, sh) = app
        .post(
            &format!("/api/conversations/{conv}/share"),
            Some(&g.user),
            json!({}),
        )
        .await;
    assert_eq!(s, 200, "{sh}");
    let token = sh["token"].as_str().unwrap().to_owned();
    assert!(token.len() >= 22, "{token}");
    assert_eq!(sh["url"], format!("http://{}/share/{token}", app.addr));
    let page = app
        .client
        .get(app.url(&format!("/share/{token}")))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    assert_eq!(page.headers()["x-robots-tag"], "noindex, nofollow");
    assert_eq!(page.headers()["cache-control"], "no-store");
    assert!(
        page.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let html = page.text().await.unwrap();
    assert!(html.contains("<strong>Bold</strong>"), "{html}");
    assert!(html.contains("Hello from mock"), "{html}");
    // Markdown rendered, HTML sanitized; the title (plain text) escaped.
    assert!(!html.contains("<script>"), "{html}");
    assert!(html.contains("<img src=\"x\">"), "{html}");
    assert!(!html.contains("<img src=x onerror"), "{html}");
    assert!(html.contains("&lt;script&gt;"), "{html}");
    let r = app
        .client
        .get(app.url(&format!("/share/{token}?format=json")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-robots-tag"], "noindex, nofollow");
    let j: Value = r.json().await.unwrap();
    assert_eq!(j["id"], conv);
    assert_eq!(j["messages"].as_array().unwrap().len(), 2);
    let (_, l) = app.get("/api/conversations", Some(&g.user)).await;
    assert_eq!(l["data"][0]["shared"], true);
    // Unknown tokens are 404, also absurd ones.
    for bad in ["nope", &"x".repeat(500)] {
        let (s, e) = app.get(&format!("/share/{bad}"), None).await;
        assert_error(s, &e, 404, "not_found");
    }

    // Revoked: 404 at once. A new link replaces an older one.
    let (s, _) = app
        .delete(&format!("/api/conversations/{conv}/share"), Some(&g.user))
        .await;
    assert_eq!(s, 204);
    let (s, e) = app.get(&format!("/share/{token}?format=json"), None).await;
    assert_error(s, &e, 404, "not_found");
    let (_, l) = app.get("/api/conversations", Some(&g.user)).await;
    assert_eq!(l["data"][0]["shared"], false);
    let (_, s1) = app
        .post(
            &format!("/api/conversations/{conv}/share"),
            Some(&g.user),
            json!({}),
        )
        .await;
    let (_, s2) = app
        .post(
            &format!("/api/conversations/{conv}/share"),
            Some(&g.user),
            json!({}),
        )
        .await;
    assert_ne!(s1["token"], s2["token"]);
    let (s, _) = app
        .get(&format!("/share/{}", s1["token"].as_str().unwrap()), None)
        .await;
    assert_eq!(s, 404);
    let (s, _) = app
        .get(
            &format!("/share/{}?format=json", s2["token"].as_str().unwrap()),
            None,
        )
        .await;
    assert_eq!(s, 200);
    // Deleting the conversation takes its link with it.
    let (s, _) = app
        .delete(&format!("/api/conversations/{conv}"), Some(&g.user))
        .await;
    assert_eq!(s, 204);
    let (s, _) = app
        .get(
            &format!("/share/{}?format=json", s2["token"].as_str().unwrap()),
            None,
        )
        .await;
    assert_eq!(s, 404);
}

#[tokio::test]
async fn the_chat_routes_are_in_the_openapi_document() {
    let app = TestApp::spawn().await;
    let (s, doc) = app.get("/openapi.json", None).await;
    assert_eq!(s, 200);
    let paths = &doc["paths"];
    for (path, method) in [
        ("/api/chat", "post"),
        ("/api/chat/stream", "post"),
        ("/api/chat/regenerate", "post"),
        ("/api/conversations", "get"),
        ("/api/conversations/search", "get"),
        ("/api/conversations/{id}", "get"),
        ("/api/conversations/{id}", "patch"),
        ("/api/conversations/{id}", "delete"),
        ("/api/conversations/{id}/messages", "get"),
        ("/api/conversations/{id}/export", "get"),
        ("/api/conversations/{id}/share", "post"),
        ("/api/conversations/{id}/share", "delete"),
        ("/share/{token}", "get"),
        ("/api/ws", "get"),
    ] {
        assert!(paths[path][method].is_object(), "{method} {path} missing");
    }
}

#[tokio::test]
async fn an_empty_balance_refuses_the_chat_and_stores_nothing() {
    let app = TestApp::spawn_with(|c| {
        c.billing.enforce_balance = true;
        c.billing.initial_balance_usd = 0.0;
    })
    .await;
    let g = setup(&app).await;
    let before = g.mock.requests().len();
    for path in ["/api/chat", "/api/chat/stream"] {
        let (s, b) = app
            .post(
                path,
                Some(&g.user),
                json!({"model": "gpt-test", "message": "Am I broke?"}),
            )
            .await;
        assert_error(s, &b, 429, "insufficient_quota");
    }
    assert_eq!(g.mock.requests().len(), before);
    assert_eq!(conversation_count(&app).await, 0);
    assert_eq!(usage_count(&app).await, 0);
}

#[tokio::test]
async fn the_users_rate_limit_applies_to_the_chat() {
    let app = TestApp::spawn_with(|c| c.limits.default_user_rpm = 1).await;
    let g = setup(&app).await;
    chat(
        &app,
        &g.user,
        json!({"model": "gpt-test", "message": "one"}),
    )
    .await;
    let r = app
        .client
        .post(app.url("/api/chat/stream"))
        .bearer_auth(&g.user)
        .json(&json!({"model": "gpt-test", "message": "two"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
    let b: Value = r.json().await.unwrap();
    assert_error(429, &b, 429, "rate_limit_exceeded");
    assert_eq!(conversation_count(&app).await, 1);
}
