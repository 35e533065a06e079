//! Stored state (API.md §9): the Conversations API, stored responses and stored chat
//! completions over HTTP with gateway keys, and the domain functions the hot path calls
//! (`history_for`, `save_response`, `save_completion`), on whichever database
//! `TOLLGATE_TEST_DATABASE_URL` names (SQLite otherwise).
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::sync::Arc;

use chrono::{Duration, Utc};
use common::accounts::{ensure_user, user_token};
use common::gateway::new_key;
use common::{TestApp, TestDb, assert_error};
use sea_orm::{EntityTrait, PaginatorTrait};
use serde_json::{Map, Value, json};
use tollgate::accounts::signup::Role;
use tollgate::conversations::{
    StoredCompletion, StoredResponse, history_for, ids, save_completion, save_response,
};

/// A user with a gateway key: (user id, key secret, key id).
async fn user_with_key(app: &TestApp, name: &str) -> (String, String, String) {
    let user = ensure_user(app, name, Role::User).await;
    let token = user_token(app, name).await;
    let (key, key_id) = new_key(app, &token, json!({"name": format!("{name}-key")})).await;
    (user.id, key, key_id)
}

fn ids_of(list: &Value) -> Vec<String> {
    list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["id"].as_str().unwrap().to_owned())
        .collect()
}

fn msg(text: &str) -> Value {
    json!({"role": "user", "content": text})
}

async fn conversation_count(app: &TestApp) -> u64 {
    entity::conversations::Entity::find()
        .count(&app.state.db)
        .await
        .unwrap()
}

async fn item_count(app: &TestApp) -> u64 {
    entity::conversation_items::Entity::find()
        .count(&app.state.db)
        .await
        .unwrap()
}

#[tokio::test]
async fn conversations_create_list_page_get_delete() {
    let app = TestApp::spawn().await;
    let (_, key, _) = user_with_key(&app, "alice").await;
    let k = Some(key.as_str());

    let (s, conv) = app
        .post(
            "/v1/conversations",
            k,
            json!({"items": [msg("one"), msg("two"), {"type": "message", "role": "assistant", "content": "three"}],
                   "metadata": {"topic": "demo"}}),
        )
        .await;
    assert_eq!(s, 200, "{conv}");
    let id = conv["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("conv_"), "{id}");
    assert_eq!(conv["object"], "conversation");
    assert_eq!(conv["metadata"], json!({"topic": "demo"}));
    assert!(conv["created_at"].as_i64().unwrap() > 1_700_000_000);
    assert_eq!(
        conv.as_object().unwrap().keys().collect::<HashSet<_>>(),
        ["id", "object", "created_at", "metadata"]
            .iter()
            .map(|s| s.to_string())
            .collect::<HashSet<_>>()
            .iter()
            .collect()
    );

    // No body at all is a conversation with nothing in it.
    let resp = app
        .client
        .post(app.url("/v1/conversations"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let empty: Value = resp.json().await.unwrap();
    assert_eq!(empty["metadata"], json!({}));

    let (s, got) = app.get(&format!("/v1/conversations/{id}"), k).await;
    assert_eq!((s, &got), (200, &conv));

    // Default: newest first, 20.
    let (s, list) = app.get(&format!("/v1/conversations/{id}/items"), k).await;
    assert_eq!(s, 200, "{list}");
    assert_eq!(list["object"], "list");
    let desc = ids_of(&list);
    assert_eq!(desc.len(), 3);
    assert_eq!(list["has_more"], false);
    assert_eq!(list["first_id"], desc[0].as_str());
    assert_eq!(list["last_id"], desc[2].as_str());
    let texts: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["content"][0]["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["three", "two", "one"]);
    let first = &list["data"][2];
    assert_eq!(first["type"], "message");
    assert_eq!(first["role"], "user");
    assert_eq!(first["status"], "completed");
    assert_eq!(
        first["content"],
        json!([{"type": "input_text", "text": "one"}])
    );
    assert!(desc[0].starts_with("msg_"));
    assert_eq!(list["data"][0]["content"][0]["type"], "output_text");

    // Add two more: 5 in all, in order.
    let (s, added) = app
        .post(
            &format!("/v1/conversations/{id}/items"),
            k,
            json!({"items": [msg("four"), {"type": "function_call", "call_id": "call_1", "name": "f", "arguments": "{}"}]}),
        )
        .await;
    assert_eq!(s, 200, "{added}");
    assert_eq!(added["object"], "list");
    let added_ids = ids_of(&added);
    assert_eq!(added_ids.len(), 2);
    assert!(added_ids[1].starts_with("fc_"), "{added}");
    assert_eq!(added["first_id"], added_ids[0].as_str());
    assert_eq!(added["last_id"], added_ids[1].as_str());

    let mut asc: Vec<String> = desc.iter().rev().cloned().collect();
    asc.extend(added_ids.clone());

    // Paging ascending, two at a time.
    let (s, p1) = app
        .get(
            &format!("/v1/conversations/{id}/items?order=asc&limit=2"),
            k,
        )
        .await;
    assert_eq!(s, 200);
    assert_eq!(ids_of(&p1), asc[0..2]);
    assert_eq!(p1["has_more"], true);
    assert_eq!(p1["first_id"], asc[0].as_str());
    assert_eq!(p1["last_id"], asc[1].as_str());
    let (_, p2) = app
        .get(
            &format!(
                "/v1/conversations/{id}/items?order=asc&limit=2&after={}",
                asc[1]
            ),
            k,
        )
        .await;
    assert_eq!(ids_of(&p2), asc[2..4]);
    assert_eq!(p2["has_more"], true);
    let (_, p3) = app
        .get(
            &format!(
                "/v1/conversations/{id}/items?order=asc&limit=2&after={}",
                asc[3]
            ),
            k,
        )
        .await;
    assert_eq!(ids_of(&p3), asc[4..5]);
    assert_eq!(p3["has_more"], false);
    assert_eq!(p3["first_id"], asc[4].as_str());
    assert_eq!(p3["last_id"], asc[4].as_str());
    // Descending after the 4th: the 3 before it, newest first.
    let (_, d) = app
        .get(
            &format!("/v1/conversations/{id}/items?limit=100&after={}", asc[3]),
            k,
        )
        .await;
    assert_eq!(
        ids_of(&d),
        asc[0..3].iter().rev().cloned().collect::<Vec<_>>()
    );
    // An exact fit has no more.
    let (_, exact) = app
        .get(&format!("/v1/conversations/{id}/items?limit=5"), k)
        .await;
    assert_eq!(exact["has_more"], false);
    // Past the end: empty, nulls.
    let (_, end) = app
        .get(
            &format!("/v1/conversations/{id}/items?order=asc&after={}", asc[4]),
            k,
        )
        .await;
    assert_eq!(end["data"], json!([]));
    assert!(end["first_id"].is_null() && end["last_id"].is_null());
    assert_eq!(end["has_more"], false);

    // Bad paging input: 400 naming the parameter.
    for (q, param) in [
        ("order=up", "order"),
        ("limit=0", "limit"),
        ("limit=101", "limit"),
        ("limit=x", "limit"),
        ("after=msg_nope", "after"),
    ] {
        let (s, b) = app
            .get(&format!("/v1/conversations/{id}/items?{q}"), k)
            .await;
        assert_error(s, &b, 400, "invalid_value");
        assert_eq!(b["error"]["param"], param, "{q}: {b}");
    }

    // One item; then delete it: the answer is the conversation.
    let (s, item) = app
        .get(&format!("/v1/conversations/{id}/items/{}", asc[1]), k)
        .await;
    assert_eq!(s, 200);
    assert_eq!(item["content"][0]["text"], "two");
    let (s, after_delete) = app
        .delete(&format!("/v1/conversations/{id}/items/{}", asc[1]), k)
        .await;
    assert_eq!(s, 200, "{after_delete}");
    assert_eq!(after_delete["id"], id.as_str());
    assert_eq!(after_delete["object"], "conversation");
    let (s, b) = app
        .get(&format!("/v1/conversations/{id}/items/{}", asc[1]), k)
        .await;
    assert_error(s, &b, 404, "not_found");
    let (_, left) = app
        .get(&format!("/v1/conversations/{id}/items?order=asc"), k)
        .await;
    assert_eq!(
        ids_of(&left),
        [&asc[0], &asc[2], &asc[3], &asc[4]]
            .iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>()
    );

    // More than 20 items at a time: 400, nothing added.
    let before = item_count(&app).await;
    let many: Vec<Value> = (0..21).map(|i| msg(&i.to_string())).collect();
    let (s, b) = app
        .post(
            &format!("/v1/conversations/{id}/items"),
            k,
            json!({ "items": many }),
        )
        .await;
    assert_error(s, &b, 400, "invalid_value");
    let (s, b) = app
        .post(
            &format!("/v1/conversations/{id}/items"),
            k,
            json!({"items": [msg("ok"), {"role": "robot", "content": "x"}]}),
        )
        .await;
    assert_error(s, &b, 400, "invalid_value");
    assert_eq!(b["error"]["param"], "items[1]");
    assert_eq!(item_count(&app).await, before);

    // Update metadata.
    let (s, up) = app
        .post(
            &format!("/v1/conversations/{id}"),
            k,
            json!({"metadata": {"topic": "changed", "x": "y"}}),
        )
        .await;
    assert_eq!(s, 200, "{up}");
    assert_eq!(up["metadata"], json!({"topic": "changed", "x": "y"}));

    // Delete: the deleted object, then 404, and the items are gone.
    let (s, del) = app.delete(&format!("/v1/conversations/{id}"), k).await;
    assert_eq!(s, 200);
    assert_eq!(
        del,
        json!({"id": id, "object": "conversation.deleted", "deleted": true})
    );
    let (s, b) = app.get(&format!("/v1/conversations/{id}"), k).await;
    assert_error(s, &b, 404, "not_found");
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .contains(&format!("Conversation with id '{id}' not found"))
    );
    let (s, b) = app.get(&format!("/v1/conversations/{id}/items"), k).await;
    assert_error(s, &b, 404, "not_found");
    assert_eq!(item_count(&app).await, 0);

    // Without a gateway key: 401.
    let (s, b) = app.get(&format!("/v1/conversations/{id}"), None).await;
    assert_error(s, &b, 401, "invalid_api_key");
}

#[tokio::test]
async fn metadata_beyond_openai_limits_is_400_and_creates_nothing() {
    let app = TestApp::spawn().await;
    let (_, key, _) = user_with_key(&app, "alice").await;
    let k = Some(key.as_str());
    let seventeen: Map<String, Value> = (0..17).map(|i| (format!("k{i}"), json!("v"))).collect();
    for bad in [
        Value::Object(seventeen),
        json!({"k".repeat(65): "v"}),
        json!({"k": "v".repeat(513)}),
        json!({"k": 5}),
        json!("text"),
    ] {
        let (s, b) = app
            .post("/v1/conversations", k, json!({ "metadata": bad }))
            .await;
        assert_error(s, &b, 400, "invalid_value");
        assert_eq!(b["error"]["param"], "metadata");
    }
    assert_eq!(conversation_count(&app).await, 0);
    // At the limits: fine.
    let sixteen: Map<String, Value> = (0..16)
        .map(|i| (format!("{i:0>64}"), json!("é".repeat(512))))
        .collect();
    let (s, c) = app
        .post(
            "/v1/conversations",
            k,
            json!({ "metadata": Value::Object(sixteen.clone()) }),
        )
        .await;
    assert_eq!(s, 200, "{c}");
    assert_eq!(c["metadata"], Value::Object(sixteen));
    // An update past the limit changes nothing.
    let id = c["id"].as_str().unwrap();
    let (s, b) = app
        .post(
            &format!("/v1/conversations/{id}"),
            k,
            json!({"metadata": {"k": "v".repeat(600)}}),
        )
        .await;
    assert_error(s, &b, 400, "invalid_value");
    let (_, again) = app.get(&format!("/v1/conversations/{id}"), k).await;
    assert_eq!(again["metadata"], c["metadata"]);
}

/// Seeds a chain r1 ← r2 ← r3 for `user`; returns the ids.
async fn seed_chain(app: &TestApp, user: &str, key_id: &str) -> Vec<String> {
    let mut prev: Option<String> = None;
    let mut out = Vec::new();
    for (i, (input, output)) in [("A", "B"), ("C", "D"), ("E", "F")].iter().enumerate() {
        let id = ids::response_id();
        save_response(
            &app.state.db,
            StoredResponse {
                id: id.clone(),
                user_id: user.to_owned(),
                key_id: key_id.to_owned(),
                model: "gpt-test".into(),
                status: "completed".into(),
                previous_response_id: prev.clone(),
                conversation_id: None,
                input_items: vec![json!({"role": "user", "content": input})],
                response: json!({
                    "id": id, "object": "response", "created_at": 1_750_000_000 + i as i64,
                    "status": "completed", "model": "gpt-test",
                    "previous_response_id": prev,
                    "output": [{"type": "message", "id": format!("msg_out{i}"), "status": "completed",
                                "role": "assistant", "content": [{"type": "output_text", "text": output, "annotations": []}]}],
                    "usage": {"input_tokens": 3, "output_tokens": 1, "total_tokens": 4}
                }),
                input_tokens: 3,
                output_tokens: 1,
                created_at: Utc::now(),
            },
        )
        .await
        .unwrap();
        prev = Some(id.clone());
        out.push(id);
    }
    out
}

fn texts(items: &[Value]) -> Vec<String> {
    items
        .iter()
        .map(|v| v["content"][0]["text"].as_str().unwrap_or("?").to_owned())
        .collect()
}

#[tokio::test]
async fn responses_history_chain_and_routes() {
    let app = TestApp::spawn().await;
    let (alice, key, key_id) = user_with_key(&app, "alice").await;
    let (bob, bob_key, _) = user_with_key(&app, "bob").await;
    let db = &app.state.db;
    let chain = seed_chain(&app, &alice, &key_id).await;

    let h = history_for(db, &alice, Some(&chain[2]), None)
        .await
        .unwrap();
    assert_eq!(texts(&h), ["A", "B", "C", "D", "E", "F"]);
    assert!(h[0]["id"].as_str().unwrap().starts_with("msg_"));
    assert_eq!(h[1]["id"], "msg_out0");
    let h = history_for(db, &alice, Some(&chain[0]), None)
        .await
        .unwrap();
    assert_eq!(texts(&h), ["A", "B"]);
    assert!(
        history_for(db, &alice, None, None)
            .await
            .unwrap()
            .is_empty()
    );

    // Another user's response: 404, OpenAI's message.
    let e = history_for(db, &bob, Some(&chain[2]), None)
        .await
        .unwrap_err();
    assert_eq!(e.parts().0.as_u16(), 404);
    assert!(e.to_string().contains("No response found with id"), "{e}");
    // Both: 400.
    let e = history_for(db, &alice, Some(&chain[2]), Some("conv_x"))
        .await
        .unwrap_err();
    assert_eq!(e.parts().0.as_u16(), 400);

    // GET over HTTP: the stored object; bob: 404.
    let k = Some(key.as_str());
    let (s, r) = app.get(&format!("/v1/responses/{}", chain[1]), k).await;
    assert_eq!(s, 200, "{r}");
    assert_eq!(r["id"], chain[1].as_str());
    assert_eq!(r["object"], "response");
    assert_eq!(r["output"][0]["content"][0]["text"], "D");
    let (s, b) = app
        .get(&format!("/v1/responses/{}", chain[1]), Some(&bob_key))
        .await;
    assert_error(s, &b, 404, "not_found");

    // Input items: this turn's own.
    let (s, items) = app
        .get(&format!("/v1/responses/{}/input_items", chain[1]), k)
        .await;
    assert_eq!(s, 200, "{items}");
    assert_eq!(texts(items["data"].as_array().unwrap()), ["C"]);
    assert_eq!(items["has_more"], false);
    assert_eq!(items["first_id"], items["data"][0]["id"]);
    let (s, b) = app
        .get(
            &format!("/v1/responses/{}/input_items?limit=0", chain[1]),
            k,
        )
        .await;
    assert_error(s, &b, 400, "invalid_value");

    // Deleting the oldest: the chain replays from what is left.
    let (s, b) = app
        .delete(&format!("/v1/responses/{}", chain[0]), Some(&bob_key))
        .await;
    assert_error(s, &b, 404, "not_found");
    let (s, del) = app.delete(&format!("/v1/responses/{}", chain[0]), k).await;
    assert_eq!(s, 200);
    assert_eq!(
        del,
        json!({"id": chain[0], "object": "response", "deleted": true})
    );
    let (s, b) = app.get(&format!("/v1/responses/{}", chain[0]), k).await;
    assert_error(s, &b, 404, "not_found");
    let h = history_for(db, &alice, Some(&chain[2]), None)
        .await
        .unwrap();
    assert_eq!(texts(&h), ["C", "D", "E", "F"]);
    let e = history_for(db, &alice, Some(&chain[0]), None)
        .await
        .unwrap_err();
    assert_eq!(e.parts().0.as_u16(), 404);
}

/// A stored response of `user` in conversation `conv_id`: input `q-{text}`, output a function
/// call then the message `a-{text}`.
fn conversation_turn(user: &str, key_id: &str, conv_id: &str, text: &str) -> StoredResponse {
    let id = ids::response_id();
    StoredResponse {
        id: id.clone(),
        user_id: user.to_owned(),
        key_id: key_id.to_owned(),
        model: "gpt-test".into(),
        status: "completed".into(),
        previous_response_id: None,
        conversation_id: Some(conv_id.to_owned()),
        input_items: vec![json!({"role": "user", "content": format!("q-{text}")})],
        response: json!({"id": id, "object": "response", "output": [
            {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
            {"type": "message", "role": "assistant", "status": "completed",
             "content": [{"type": "output_text", "text": format!("a-{text}"), "annotations": []}]}]}),
        input_tokens: 1,
        output_tokens: 1,
        created_at: Utc::now(),
    }
}

#[tokio::test]
async fn responses_in_a_conversation_append_atomically() {
    let app = TestApp::spawn().await;
    let (alice, key, key_id) = user_with_key(&app, "alice").await;
    let (bob, _, bob_key_id) = user_with_key(&app, "bob").await;
    let db = &app.state.db;
    let k = Some(key.as_str());
    let (_, conv) = app
        .post("/v1/conversations", k, json!({"items": [msg("hello")]}))
        .await;
    let conv_id = conv["id"].as_str().unwrap().to_owned();

    let resp =
        |user: &str, key_id: &str, text: &str| conversation_turn(user, key_id, &conv_id, text);
    let r1 = resp(&alice, &key_id, "1");
    let r1_id = r1.id.clone();
    save_response(db, r1).await.unwrap();

    let h = history_for(db, &alice, None, Some(&conv_id)).await.unwrap();
    assert_eq!(h.len(), 4, "{h:?}");
    assert_eq!(h[0]["content"][0]["text"], "hello");
    assert_eq!(h[1]["content"][0]["text"], "q-1");
    assert_eq!(h[2]["type"], "function_call");
    assert!(h[2]["id"].as_str().unwrap().starts_with("fc_"));
    assert_eq!(h[3]["content"][0]["text"], "a-1");
    // The stored response's output carries the same ids as the conversation's items.
    let (_, stored) = app.get(&format!("/v1/responses/{r1_id}"), k).await;
    assert_eq!(stored["output"][0]["id"], h[2]["id"]);
    let (_, items) = app
        .get(&format!("/v1/conversations/{conv_id}/items?order=asc"), k)
        .await;
    assert_eq!(items["data"], Value::Array(h.clone()));

    // Bob's response naming alice's conversation: 404, and neither the response nor items land.
    let items_before = item_count(&app).await;
    let r2 = resp(&bob, &bob_key_id, "2");
    let r2_id = r2.id.clone();
    let e = save_response(db, r2).await.unwrap_err();
    assert_eq!(e.parts().0.as_u16(), 404);
    assert!(e.to_string().contains("Conversation with id"), "{e}");
    assert_eq!(item_count(&app).await, items_before);
    assert!(
        entity::responses::Entity::find_by_id(r2_id)
            .one(db)
            .await
            .unwrap()
            .is_none()
    );
    let e = history_for(db, &bob, None, Some(&conv_id))
        .await
        .unwrap_err();
    assert_eq!(e.parts().0.as_u16(), 404);
}

#[tokio::test]
async fn another_users_ids_are_404_on_every_route_and_every_key_of_the_owner_sees_them() {
    let app = TestApp::spawn().await;
    let (alice, key, key_id) = user_with_key(&app, "alice").await;
    let (_, bob_key, _) = user_with_key(&app, "bob").await;
    let alice_token = user_token(&app, "alice").await;
    let (key2, _) = new_key(&app, &alice_token, json!({"name": "second"})).await;
    let k = Some(key.as_str());
    let (_, conv) = app
        .post("/v1/conversations", k, json!({"items": [msg("hi")]}))
        .await;
    let conv_id = conv["id"].as_str().unwrap().to_owned();
    let (_, items) = app
        .get(&format!("/v1/conversations/{conv_id}/items"), k)
        .await;
    let item_id = items["data"][0]["id"].as_str().unwrap().to_owned();
    let resp_id = seed_chain(&app, &alice, &key_id).await.remove(0);
    let cmpl_id = ids::completion_id();
    save_completion(
        &app.state.db,
        completion(&cmpl_id, &alice, &key_id, "gpt-test", json!({"a": "1"})),
    )
    .await
    .unwrap();

    let gets = [
        format!("/v1/conversations/{conv_id}"),
        format!("/v1/conversations/{conv_id}/items"),
        format!("/v1/conversations/{conv_id}/items/{item_id}"),
        format!("/v1/responses/{resp_id}"),
        format!("/v1/responses/{resp_id}/input_items"),
        format!("/v1/chat/completions/{cmpl_id}"),
        format!("/v1/chat/completions/{cmpl_id}/messages"),
    ];
    for path in &gets {
        let (s, b) = app.get(path, Some(&bob_key)).await;
        assert_error(s, &b, 404, "not_found");
        let (s, b) = app.get(path, Some(&key2)).await;
        assert_eq!(s, 200, "second key of the owner, {path}: {b}");
    }
    let posts = [
        (
            format!("/v1/conversations/{conv_id}"),
            json!({"metadata": {"x": "y"}}),
        ),
        (
            format!("/v1/conversations/{conv_id}/items"),
            json!({"items": [msg("intruder")]}),
        ),
        (
            format!("/v1/chat/completions/{cmpl_id}"),
            json!({"metadata": {"x": "y"}}),
        ),
    ];
    for (path, body) in &posts {
        let (s, b) = app.post(path, Some(&bob_key), body.clone()).await;
        assert_error(s, &b, 404, "not_found");
    }
    let deletes = [
        format!("/v1/conversations/{conv_id}/items/{item_id}"),
        format!("/v1/conversations/{conv_id}"),
        format!("/v1/responses/{resp_id}"),
        format!("/v1/chat/completions/{cmpl_id}"),
    ];
    for path in &deletes {
        let (s, b) = app.delete(path, Some(&bob_key)).await;
        assert_error(s, &b, 404, "not_found");
    }
    // Bob's list of stored completions is empty; nothing of alice's changed.
    let (s, list) = app.get("/v1/chat/completions", Some(&bob_key)).await;
    assert_eq!(s, 200);
    assert_eq!(list["data"], json!([]));
    let (_, c) = app.get(&format!("/v1/conversations/{conv_id}"), k).await;
    assert_eq!(c["metadata"], json!({}));
    let (_, it) = app
        .get(&format!("/v1/conversations/{conv_id}/items"), k)
        .await;
    assert_eq!(ids_of(&it), [item_id]);
    let (_, sc) = app.get(&format!("/v1/chat/completions/{cmpl_id}"), k).await;
    assert_eq!(sc["metadata"], json!({"a": "1"}));
    // The owner deletes with the second key.
    for path in &deletes {
        let (s, b) = app.delete(path, Some(&key2)).await;
        assert_eq!(s, 200, "{path}: {b}");
    }
    // Admins see counts, never content.
    let admin = common::accounts::admin_token(&app).await;
    let (s, stats) = app.get("/api/admin/stats", Some(&admin)).await;
    assert_eq!(s, 200, "{stats}");
    assert_eq!(stats["conversations"], 0);
    assert_eq!(stats["stored_responses"], 2);
    assert_eq!(stats["stored_completions"], 0);
}

fn completion(
    id: &str,
    user: &str,
    key_id: &str,
    model: &str,
    metadata: Value,
) -> StoredCompletion {
    StoredCompletion {
        id: id.to_owned(),
        user_id: user.to_owned(),
        key_id: key_id.to_owned(),
        model: model.to_owned(),
        metadata: metadata.as_object().cloned().unwrap_or_default(),
        messages: vec![
            json!({"role": "system", "content": "Be brief."}),
            json!({"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]}),
        ],
        response: json!({
            "id": id, "object": "chat.completion", "created": 1_750_000_000, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi."}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
        }),
        created_at: Utc::now(),
    }
}

#[tokio::test]
async fn stored_completions_filter_page_update_delete() {
    let app = TestApp::spawn().await;
    let (alice, key, key_id) = user_with_key(&app, "alice").await;
    let k = Some(key.as_str());
    let db = &app.state.db;
    let mut all = Vec::new();
    for (model, meta) in [
        ("m1", json!({"env": "prod", "team": "a"})),
        ("m2", json!({"env": "prod"})),
        ("m1", json!({"env": "dev", "team": "a"})),
        ("m1", json!({})),
    ] {
        let id = ids::completion_id();
        save_completion(db, completion(&id, &alice, &key_id, model, meta))
            .await
            .unwrap();
        all.push(id);
    }
    // The same id again: 409, nothing written twice.
    let e = save_completion(db, completion(&all[0], &alice, &key_id, "m1", json!({})))
        .await
        .unwrap_err();
    assert_eq!(e.parts().0.as_u16(), 409);
    // Metadata past the limit is refused before anything is written.
    let e = save_completion(
        db,
        completion(
            &ids::completion_id(),
            &alice,
            &key_id,
            "m1",
            json!({"k": "v".repeat(513)}),
        ),
    )
    .await
    .unwrap_err();
    assert_eq!(e.parts().0.as_u16(), 400);

    // Default: oldest first.
    let (s, list) = app.get("/v1/chat/completions", k).await;
    assert_eq!(s, 200, "{list}");
    assert_eq!(list["object"], "list");
    assert_eq!(ids_of(&list), all);
    assert_eq!(list["has_more"], false);
    assert_eq!(list["first_id"], all[0].as_str());
    assert_eq!(list["last_id"], all[3].as_str());
    assert_eq!(list["data"][0]["object"], "chat.completion");
    assert_eq!(
        list["data"][0]["metadata"],
        json!({"env": "prod", "team": "a"})
    );

    let (_, m1) = app.get("/v1/chat/completions?model=m1", k).await;
    assert_eq!(ids_of(&m1), [&all[0], &all[2], &all[3]].map(|s| s.clone()));
    let (_, prod) = app.get("/v1/chat/completions?metadata[env]=prod", k).await;
    assert_eq!(ids_of(&prod), [&all[0], &all[1]].map(|s| s.clone()));
    let (_, both) = app
        .get(
            "/v1/chat/completions?metadata%5Benv%5D=prod&metadata%5Bteam%5D=a",
            k,
        )
        .await;
    assert_eq!(ids_of(&both), [all[0].clone()]);
    let (_, m1a) = app
        .get(
            "/v1/chat/completions?model=m1&metadata[team]=a&order=desc",
            k,
        )
        .await;
    assert_eq!(ids_of(&m1a), [&all[2], &all[0]].map(|s| s.clone()));
    let (_, none) = app
        .get("/v1/chat/completions?metadata[env]=staging", k)
        .await;
    assert_eq!(none["data"], json!([]));

    // Paging.
    let (_, p1) = app.get("/v1/chat/completions?limit=3", k).await;
    assert_eq!(ids_of(&p1), all[0..3]);
    assert_eq!(p1["has_more"], true);
    assert_eq!(p1["last_id"], all[2].as_str());
    let (_, p2) = app
        .get(&format!("/v1/chat/completions?limit=3&after={}", all[2]), k)
        .await;
    assert_eq!(ids_of(&p2), all[3..4]);
    assert_eq!(p2["has_more"], false);
    let (_, d) = app
        .get(
            &format!("/v1/chat/completions?order=desc&after={}", all[2]),
            k,
        )
        .await;
    assert_eq!(ids_of(&d), [&all[1], &all[0]].map(|s| s.clone()));
    for (q, param) in [
        ("order=sideways", "order"),
        ("limit=101", "limit"),
        ("after=chatcmpl-unknown", "after"),
    ] {
        let (s, b) = app.get(&format!("/v1/chat/completions?{q}"), k).await;
        assert_error(s, &b, 400, "invalid_value");
        assert_eq!(b["error"]["param"], param);
    }

    // One, its messages, update, delete.
    let (s, one) = app
        .get(&format!("/v1/chat/completions/{}", all[1]), k)
        .await;
    assert_eq!(s, 200, "{one}");
    assert_eq!(one["id"], all[1].as_str());
    assert_eq!(one["choices"][0]["message"]["content"], "Hi.");
    assert_eq!(one["metadata"], json!({"env": "prod"}));
    let (s, msgs) = app
        .get(&format!("/v1/chat/completions/{}/messages", all[1]), k)
        .await;
    assert_eq!(s, 200, "{msgs}");
    assert_eq!(
        ids_of(&msgs),
        [format!("{}-0", all[1]), format!("{}-1", all[1])]
    );
    assert_eq!(msgs["data"][0]["content"], "Be brief.");
    assert_eq!(msgs["data"][1]["content"], "Hello there");
    assert_eq!(msgs["data"][1]["content_parts"][1]["text"], "there");
    let (_, m2) = app
        .get(
            &format!(
                "/v1/chat/completions/{}/messages?limit=1&order=desc",
                all[1]
            ),
            k,
        )
        .await;
    assert_eq!(ids_of(&m2), [format!("{}-1", all[1])]);
    assert_eq!(m2["has_more"], true);

    let (s, up) = app
        .post(
            &format!("/v1/chat/completions/{}", all[1]),
            k,
            json!({"metadata": {"env": "staging"}}),
        )
        .await;
    assert_eq!(s, 200, "{up}");
    assert_eq!(up["metadata"], json!({"env": "staging"}));
    let (_, staging) = app
        .get("/v1/chat/completions?metadata[env]=staging", k)
        .await;
    assert_eq!(ids_of(&staging), [all[1].clone()]);
    let (_, prod) = app.get("/v1/chat/completions?metadata[env]=prod", k).await;
    assert_eq!(ids_of(&prod), [all[0].clone()]);
    let (s, b) = app
        .post(
            &format!("/v1/chat/completions/{}", all[1]),
            k,
            json!({"metadata": {"k": "v".repeat(513)}}),
        )
        .await;
    assert_error(s, &b, 400, "invalid_value");

    let (s, del) = app
        .delete(&format!("/v1/chat/completions/{}", all[1]), k)
        .await;
    assert_eq!(s, 200);
    assert_eq!(
        del,
        json!({"object": "chat.completion.deleted", "id": all[1], "deleted": true})
    );
    let (s, b) = app
        .get(&format!("/v1/chat/completions/{}", all[1]), k)
        .await;
    assert_error(s, &b, 404, "not_found");
    let (_, staging) = app
        .get("/v1/chat/completions?metadata[env]=staging", k)
        .await;
    assert_eq!(staging["data"], json!([]));
    assert_eq!(
        entity::stored_completion_metadata::Entity::find()
            .count(db)
            .await
            .unwrap(),
        4,
        "2 + 2 pairs left: the deleted completion's metadata rows are gone"
    );
}

#[tokio::test]
async fn concurrent_appends_keep_one_total_order_without_duplicates() {
    let app = Arc::new(TestApp::spawn().await);
    let (_, key, _) = user_with_key(&app, "alice").await;
    let (_, conv) = app.post("/v1/conversations", Some(&key), json!({})).await;
    let conv_id = conv["id"].as_str().unwrap().to_owned();
    const WRITERS: usize = 8;
    const CALLS: usize = 5;
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let (app, key, conv_id) = (app.clone(), key.clone(), conv_id.clone());
        tasks.push(tokio::spawn(async move {
            let mut added = Vec::new();
            for c in 0..CALLS {
                let (s, b) = app
                    .post(
                        &format!("/v1/conversations/{conv_id}/items"),
                        Some(&key),
                        json!({"items": [msg(&format!("{w}-{c}-a")), msg(&format!("{w}-{c}-b")), msg(&format!("{w}-{c}-c"))]}),
                    )
                    .await;
                assert_eq!(s, 200, "{b}");
                added.push(ids_of(&b));
            }
            added
        }));
    }
    let mut calls = Vec::new();
    for t in tasks {
        calls.extend(t.await.unwrap());
    }
    // Read everything back, ascending, 7 per page.
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let q = match &after {
            Some(a) => format!("?order=asc&limit=7&after={a}"),
            None => "?order=asc&limit=7".into(),
        };
        let (s, page) = app
            .get(&format!("/v1/conversations/{conv_id}/items{q}"), Some(&key))
            .await;
        assert_eq!(s, 200, "{page}");
        let ids = ids_of(&page);
        seen.extend(ids.clone());
        if page["has_more"] == false {
            break;
        }
        after = ids.last().cloned();
    }
    let total = WRITERS * CALLS * 3;
    assert_eq!(seen.len(), total);
    assert_eq!(
        seen.iter().collect::<HashSet<_>>().len(),
        total,
        "no duplicates"
    );
    // Each call's three items are adjacent and in order, and each writer's calls in its order.
    for call in &calls {
        let at = seen.iter().position(|i| i == &call[0]).unwrap();
        assert_eq!(&seen[at..at + 3], &call[..], "an append stays contiguous");
    }
    // The descending listing is exactly the reverse.
    let mut desc = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let q = match &after {
            Some(a) => format!("?limit=100&after={a}"),
            None => "?limit=100".into(),
        };
        let (_, page) = app
            .get(&format!("/v1/conversations/{conv_id}/items{q}"), Some(&key))
            .await;
        let ids = ids_of(&page);
        desc.extend(ids.clone());
        if page["has_more"] == false {
            break;
        }
        after = ids.last().cloned();
    }
    desc.reverse();
    assert_eq!(desc, seen);
    // Positions are 0..total with no gap.
    let mut positions: Vec<i64> = entity::conversation_items::Entity::find()
        .all(&app.state.db)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.position)
        .collect();
    positions.sort_unstable();
    assert_eq!(positions, (0..total as i64).collect::<Vec<_>>());
}

#[tokio::test]
async fn retention_deletes_old_stored_objects_daily_and_keeps_the_rest() {
    let db = Arc::new(TestDb::new().await);
    let app = TestApp::spawn_on(db.clone(), |_| {}).await;
    let (alice, key, key_id) = user_with_key(&app, "alice").await;
    let k = Some(key.as_str());
    let conn = &app.state.db;
    let old = Utc::now() - Duration::days(40);
    // Old and new of each kind.
    let (_, conv) = app
        .post("/v1/conversations", k, json!({"items": [msg("new item")]}))
        .await;
    let conv_id = conv["id"].as_str().unwrap().to_owned();
    let mut ids_by_age = Vec::new();
    for at in [old, Utc::now()] {
        let rid = ids::response_id();
        save_response(
            conn,
            StoredResponse {
                id: rid.clone(),
                user_id: alice.clone(),
                key_id: key_id.clone(),
                model: "m".into(),
                status: "completed".into(),
                previous_response_id: None,
                conversation_id: Some(conv_id.clone()),
                input_items: vec![msg("q")],
                response: json!({"id": rid, "object": "response", "output": []}),
                input_tokens: 0,
                output_tokens: 0,
                created_at: at,
            },
        )
        .await
        .unwrap();
        let cid = ids::completion_id();
        let mut c = completion(&cid, &alice, &key_id, "m", json!({"a": "b"}));
        c.created_at = at;
        save_completion(conn, c).await.unwrap();
        ids_by_age.push((rid, cid));
    }
    assert_eq!(item_count(&app).await, 3);
    app.stop().await;

    // A restart with storage.retention_days = 30 prunes at start.
    let app = TestApp::spawn_on(db, |c| c.storage.retention_days = 30).await;
    let conn = &app.state.db;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while entity::responses::Entity::find().count(conn).await.unwrap() > 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "old response not pruned"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    while entity::stored_completions::Entity::find()
        .count(conn)
        .await
        .unwrap()
        > 1
        || item_count(&app).await > 2
    {
        assert!(std::time::Instant::now() < deadline, "old rows not pruned");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let (old_ids, new_ids) = (&ids_by_age[0], &ids_by_age[1]);
    let (s, _) = app.get(&format!("/v1/responses/{}", old_ids.0), k).await;
    assert_eq!(s, 404);
    let (s, _) = app.get(&format!("/v1/responses/{}", new_ids.0), k).await;
    assert_eq!(s, 200);
    let (s, _) = app
        .get(&format!("/v1/chat/completions/{}", old_ids.1), k)
        .await;
    assert_eq!(s, 404);
    let (s, _) = app
        .get(&format!("/v1/chat/completions/{}", new_ids.1), k)
        .await;
    assert_eq!(s, 200);
    // The conversation stays, with its recent items.
    let (s, items) = app
        .get(&format!("/v1/conversations/{conv_id}/items?order=asc"), k)
        .await;
    assert_eq!(s, 200);
    assert_eq!(texts(items["data"].as_array().unwrap()), ["new item", "q"]);
    assert_eq!(
        entity::stored_completion_metadata::Entity::find()
            .count(conn)
            .await
            .unwrap(),
        1
    );
    // And the direct prune: nothing is older than a day now.
    let n = tollgate::store::retention::prune_stored(conn, Utc::now() - Duration::days(1))
        .await
        .unwrap();
    assert_eq!(n, 0);
}

#[tokio::test]
async fn storage_disabled_still_serves_what_is_stored() {
    let app = TestApp::spawn_with(|c| c.storage.enabled = false).await;
    let (_, key, _) = user_with_key(&app, "alice").await;
    let (s, conv) = app
        .post(
            "/v1/conversations",
            Some(&key),
            json!({"items": [msg("x")]}),
        )
        .await;
    assert_eq!(s, 200, "{conv}");
    let id = conv["id"].as_str().unwrap();
    let (s, items) = app
        .get(&format!("/v1/conversations/{id}/items"), Some(&key))
        .await;
    assert_eq!(s, 200);
    assert_eq!(ids_of(&items).len(), 1);
}

#[test]
fn openapi_documents_the_state_routes() {
    let doc = serde_json::to_value(tollgate::app::openapi()).unwrap();
    let paths = &doc["paths"];
    for (path, methods) in [
        ("/v1/conversations", &["post"][..]),
        ("/v1/conversations/{id}", &["get", "post", "delete"][..]),
        ("/v1/conversations/{id}/items", &["get", "post"][..]),
        (
            "/v1/conversations/{id}/items/{item_id}",
            &["get", "delete"][..],
        ),
        ("/v1/responses/{id}", &["get", "delete"][..]),
        ("/v1/responses/{id}/input_items", &["get"][..]),
        ("/v1/chat/completions", &["get", "post"][..]),
        ("/v1/chat/completions/{id}", &["get", "post", "delete"][..]),
        ("/v1/chat/completions/{id}/messages", &["get"][..]),
    ] {
        for m in methods {
            assert!(paths[path][m].is_object(), "{m} {path} undocumented");
        }
    }
}

#[tokio::test]
async fn every_stored_state_call_writes_one_free_usage_record() {
    let app = TestApp::spawn().await;
    let (_, key, key_id) = user_with_key(&app, "alice").await;
    let token = user_token(&app, "alice").await;
    let k = Some(key.as_str());
    let (s, conv) = app.post("/v1/conversations", k, json!({})).await;
    assert_eq!(s, 200);
    let id = conv["id"].as_str().unwrap();
    let (s, _) = app.get(&format!("/v1/conversations/{id}/items"), k).await;
    assert_eq!(s, 200);
    let (s, _) = app.get("/v1/responses/resp_missing", k).await;
    assert_eq!(s, 404);
    let (s, _) = app.get("/v1/chat/completions", k).await;
    assert_eq!(s, 200);
    // No key: no user to charge, no record.
    let (s, _) = app.get("/v1/chat/completions", None).await;
    assert_eq!(s, 401);
    let records = common::gateway::wait_records(&app, &token, 4).await;
    assert_eq!(records.len(), 4, "{records:?}");
    let mut seen: Vec<(String, i64, Value, Value)> = records
        .iter()
        .map(|r| {
            assert_eq!(r["key_id"], key_id.as_str());
            assert_eq!(r["prompt_tokens"], 0);
            assert_eq!(r["completion_tokens"], 0);
            assert_eq!(r["cost_usd"], 0.0);
            assert!(!r["request_id"].as_str().unwrap().is_empty());
            (
                r["endpoint"].as_str().unwrap().to_owned(),
                r["status"].as_i64().unwrap(),
                r["conversation_id"].clone(),
                r["response_id"].clone(),
            )
        })
        .collect();
    seen.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
    // Each record names the conversation it was about (the created one too); a call that
    // failed names nothing: the id in its path was not the user's.
    assert_eq!(
        seen,
        [
            (
                "chat.completions.stored".to_owned(),
                200,
                Value::Null,
                Value::Null
            ),
            ("conversations".to_owned(), 200, json!(id), Value::Null),
            ("conversations".to_owned(), 200, json!(id), Value::Null),
            ("responses.stored".to_owned(), 404, Value::Null, Value::Null),
        ]
    );
}

/// Saves that queue up while none is being written go to the database together
/// (`conversations::writer`): one transaction, each save in a savepoint. A failing save (a
/// conversation the user does not own) rolls back alone, the others land in order, and a reader
/// waiting on a save's mark sees it committed.
#[tokio::test]
async fn saves_queued_together_land_in_one_batch_and_a_failing_one_rolls_back_alone() {
    use tollgate::conversations::pending;
    use tollgate::conversations::writer::Save;

    let app = TestApp::spawn().await;
    let (alice, key, key_id) = user_with_key(&app, "alice").await;
    let (bob, _, bob_key_id) = user_with_key(&app, "bob").await;
    let db = &app.state.db;
    let k = Some(key.as_str());
    let (_, conv) = app
        .post("/v1/conversations", k, json!({"items": [msg("hello")]}))
        .await;
    let conv_id = conv["id"].as_str().unwrap().to_owned();
    let resp = |user: &str, key_id: &str, text: &str| {
        let mut r = conversation_turn(user, key_id, &conv_id, text);
        // Only the answer's message: no function call.
        r.response["output"].as_array_mut().unwrap().remove(0);
        r
    };
    let writer = &app.state.stored;
    let batches_before = writer.batches();
    let items_before = item_count(&app).await;
    let mut saved = Vec::new();
    let mut bobs = String::new();
    // Submitted without yielding: the batch task cannot run before all of them are queued.
    for i in 0..30 {
        let r = if i == 12 {
            // Bob's response naming alice's conversation: 404 inside the batch.
            let r = resp(&bob, &bob_key_id, "bob");
            bobs = r.id.clone();
            r
        } else {
            resp(&alice, &key_id, &format!("{i:02}"))
        };
        if i != 12 {
            saved.push(r.id.clone());
        }
        let mark = pending::writing(vec![r.id.clone()]);
        writer.submit(Save::Response(r), vec![mark]);
    }
    let completion_id = ids::completion_id();
    let mark = pending::writing(vec![completion_id.clone()]);
    writer.submit(
        Save::Completion(StoredCompletion {
            id: completion_id.clone(),
            user_id: alice.clone(),
            key_id: key_id.clone(),
            model: "gpt-test".into(),
            metadata: Map::new(),
            messages: vec![msg("hi")],
            response: json!({"id": completion_id, "object": "chat.completion", "choices": []}),
            created_at: Utc::now(),
        }),
        vec![mark],
    );
    assert_eq!(writer.queued(), 31);
    pending::settled(&completion_id).await;
    assert_eq!(writer.batches(), batches_before + 1, "one batch for all 31");
    assert_eq!(writer.queued(), 0);

    // 29 responses, each with its input and output item, in submission order; bob's: nothing.
    assert_eq!(item_count(&app).await, items_before + 29 * 2);
    let h = history_for(db, &alice, None, Some(&conv_id)).await.unwrap();
    let want: Vec<String> = std::iter::once("hello".to_owned())
        .chain(
            (0..30)
                .filter(|i| *i != 12)
                .flat_map(|i| [format!("q-{i:02}"), format!("a-{i:02}")]),
        )
        .collect();
    assert_eq!(texts(&h), want);
    for id in &saved {
        let (s, v) = app.get(&format!("/v1/responses/{id}"), k).await;
        assert_eq!(s, 200, "{v}");
    }
    assert!(
        entity::responses::Entity::find_by_id(bobs)
            .one(db)
            .await
            .unwrap()
            .is_none()
    );
    let (s, v) = app
        .get(&format!("/v1/chat/completions/{completion_id}"), k)
        .await;
    assert_eq!(s, 200, "{v}");
}

// ---- issue 19: storage switched off, and refused `/v1/responses` requests ---------------------

/// Rows of the stored-state tables: (responses, conversations, conversation items).
async fn state_rows(app: &TestApp) -> (u64, u64, u64) {
    let responses = entity::responses::Entity::find()
        .count(&app.state.db)
        .await
        .unwrap();
    (
        responses,
        conversation_count(app).await,
        item_count(app).await,
    )
}

/// The usage records in the database, oldest first, once at least `n` exist (the writer
/// batches them); then a moment more, so that a record too many would show as well.
async fn usage_rows(app: &TestApp, n: usize) -> Vec<entity::usage_records::Model> {
    use sea_orm::QueryOrder;
    let all = || async {
        entity::usage_records::Entity::find()
            .order_by_asc(entity::usage_records::Column::Id)
            .all(&app.state.db)
            .await
            .unwrap()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while all().await.len() < n {
        assert!(
            std::time::Instant::now() < deadline,
            "only {} of {n} usage records arrived",
            all().await.len()
        );
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    all().await
}

async fn user_id_of(app: &TestApp, name: &str) -> String {
    tollgate::store::users::find_by_username(&app.state.db, name)
        .await
        .unwrap()
        .unwrap()
        .id
}

/// The key's (spent, reserved) in nano-dollars, straight from the database.
async fn key_money(app: &TestApp, key_id: &str) -> (i64, i64) {
    let k = entity::gateway_keys::Entity::find_by_id(key_id.to_owned())
        .one(&app.state.db)
        .await
        .unwrap()
        .unwrap();
    (k.spent_nanos, k.reserved_nanos)
}

/// Polls until neither the user nor the key holds a reservation (leases go back after a second
/// idle); returns (user balance, key spent) in nano-dollars.
async fn settled_money(app: &TestApp, user_id: &str, key_id: &str) -> (i64, i64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let u = entity::users::Entity::find_by_id(user_id.to_owned())
            .one(&app.state.db)
            .await
            .unwrap()
            .unwrap();
        let (spent, key_reserved) = key_money(app, key_id).await;
        if u.reserved_nanos == 0 && key_reserved == 0 {
            return (u.balance_nanos, spent);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still reserved: user {}, key {key_reserved}",
            u.reserved_nanos
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// `POST /v1/responses` with a raw body; (status, JSON body or the SSE text as `{"raw": …}`).
async fn post_responses(app: &TestApp, key: &str, body: &Value) -> (u16, Value) {
    app.post("/v1/responses", Some(key), body.clone()).await
}

/// The JSON payloads of an SSE body's `data:` lines.
fn sse_payloads(text: &str) -> Vec<Value> {
    text.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str(d).ok())
        .collect()
}

/// `storage.enabled = false` (API.md §9): `store` is a no-op — the response is served and
/// says `store: false`, and nothing is saved (GET and input_items are 404, no rows, no batch
/// written) — while `previous_response_id` and `conversation` (either form, stream or not) are
/// 400 `invalid_value` naming the parameter, in OpenAI's error shape, before any upstream is
/// asked: one usage record each (§8), free. State saved before the switch stays readable but
/// is not usable as history.
#[tokio::test]
async fn storage_disabled_serves_responses_unstored_and_refuses_history_for_free() {
    let app = TestApp::spawn_with(|c| c.storage.enabled = false).await;
    let gw = common::gateway::setup(&app).await;
    let alice = user_id_of(&app, "alice").await;
    let k = Some(gw.key.as_str());
    let old = seed_chain(&app, &alice, &gw.key_id).await.pop().unwrap();
    let (s, conv) = app
        .post("/v1/conversations", k, json!({"items": [msg("before")]}))
        .await;
    assert_eq!(s, 200, "{conv}");
    let conv_id = conv["id"].as_str().unwrap().to_owned();
    let (s, got) = app.get(&format!("/v1/responses/{old}"), k).await;
    assert_eq!(s, 200, "stored before the switch, still served: {got}");
    // Two state calls so far (the conversation's creation and the GET): free records.
    let before = usage_rows(&app, 2).await.len();
    assert_eq!(before, 2);
    let rows = state_rows(&app).await;
    assert_eq!(rows, (3, 1, 1));
    let batches = app.state.stored.batches();

    let history = [
        ("previous_response_id", json!(old)),
        ("conversation", json!(conv_id)),
        ("conversation", json!({"id": conv_id})),
    ];
    for (field, value) in &history {
        for stream in [false, true] {
            let mut body = json!({"model": "gpt-test", "input": "hi", "stream": stream});
            body[*field] = value.clone();
            let (s, b) = post_responses(&app, &gw.key, &body).await;
            assert_error(s, &b, 400, "invalid_value");
            assert_eq!(b["error"]["type"], "invalid_request_error", "{b}");
            assert_eq!(b["error"]["param"], *field, "{b}");
            assert!(
                b["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("storage.enabled"),
                "{b}"
            );
        }
    }
    assert!(
        gw.mock.requests().is_empty(),
        "a refused request reached the upstream"
    );
    let records = usage_rows(&app, before + 6).await;
    assert_eq!(records.len(), before + 6, "one record per refusal");
    for r in &records[before..] {
        assert_eq!(r.endpoint, "responses");
        assert_eq!(r.status, 400);
        assert_eq!(r.cost_nanos, 0, "{r:?}");
        assert_eq!(
            (r.prompt_tokens, r.completion_tokens, r.tokens_estimated),
            (0, 0, false),
            "{r:?}"
        );
        assert_eq!(r.response_id, None, "no response was made: {r:?}");
    }
    assert_eq!(key_money(&app, &gw.key_id).await.0, 0, "nothing spent");

    // `store` (explicit or by default, stream or not) is served and stored nowhere.
    let mut served = Vec::new();
    for (stream, store) in [(false, Some(true)), (false, None), (true, Some(true))] {
        let mut body = json!({"model": "gpt-test", "input": "Hi", "stream": stream,
                              "metadata": {"k": "v"}});
        if let Some(store) = store {
            body["store"] = json!(store);
        }
        let (s, b) = post_responses(&app, &gw.key, &body).await;
        assert_eq!(s, 200, "{b}");
        let response = if stream {
            let events = sse_payloads(b["raw"].as_str().unwrap());
            let created = events
                .iter()
                .find(|e| e["type"] == "response.created")
                .unwrap();
            assert_eq!(created["response"]["store"], false, "{created}");
            events
                .into_iter()
                .find(|e| e["type"] == "response.completed")
                .unwrap()["response"]
                .clone()
        } else {
            b
        };
        assert_eq!(response["object"], "response");
        assert_eq!(response["status"], "completed");
        assert_eq!(response["store"], false, "{response}");
        let message = response["output"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["type"] == "message")
            .unwrap();
        assert_eq!(
            message["content"][0]["text"], "Hello from mock",
            "{response}"
        );
        let up = gw.mock.last();
        assert!(up.body.get("store").is_none(), "{}", up.body);
        served.push(response["id"].as_str().unwrap().to_owned());
    }
    assert_eq!(gw.mock.requests().len(), 3);
    let records = usage_rows(&app, before + 9).await;
    assert_eq!(records.len(), before + 9);
    assert!(
        records[before + 6..]
            .iter()
            .all(|r| r.status == 200 && r.cost_nanos > 0),
        "served requests are metered: {records:?}"
    );
    for id in &served {
        // A save in flight would make these wait for it, not answer 404.
        let (s, b) = app.get(&format!("/v1/responses/{id}"), k).await;
        assert_error(s, &b, 404, "not_found");
        let (s, b) = app.get(&format!("/v1/responses/{id}/input_items"), k).await;
        assert_error(s, &b, 404, "not_found");
        assert!(
            entity::responses::Entity::find_by_id(id.clone())
                .one(&app.state.db)
                .await
                .unwrap()
                .is_none()
        );
    }
    assert_eq!(state_rows(&app).await, rows, "nothing was stored");
    assert_eq!(app.state.stored.batches(), batches, "no save was written");
    assert_eq!(app.state.stored.queued(), 0);
}

/// Refused `POST /v1/responses` requests (API.md §8, §9, issue 19's "bad input"): both
/// `previous_response_id` and `conversation` → 400; a built-in tool a chat-completions-only
/// upstream cannot serve → 400 `unsupported_tool` naming it; an unknown or another user's
/// `resp_…`/`conv_…` → 404 that does not tell the two apart. After all of them: the upstream was
/// asked nothing, no response, conversation or item was stored, the balance (enforced) and the
/// key's spend are untouched with nothing left reserved, no ledger entry, and each refusal has
/// its one usage record (§8) at cost 0 naming no response. A request that is served afterwards
/// moves every one of those figures, so none of them is stuck.
#[tokio::test]
async fn refused_responses_store_nothing_charge_nothing_and_reach_no_upstream() {
    let app = TestApp::spawn_with(|c| c.billing.enforce_balance = true).await;
    let gw = common::gateway::setup(&app).await;
    let alice = user_id_of(&app, "alice").await;
    let grant = 1_000_000_000_i64;
    let (s, b) = app
        .post(
            &format!("/api/admin/users/{alice}/balance"),
            Some(&gw.admin),
            json!({"amount_usd": 1.0, "note": "test"}),
        )
        .await;
    assert!(s == 200 || s == 201, "{s} {b}");
    let (key, key_id) = new_key(
        &app,
        &gw.user,
        json!({"name": "budgeted", "budget_usd": 5.0}),
    )
    .await;
    let k = Some(key.as_str());
    let mine = seed_chain(&app, &alice, &key_id).await.pop().unwrap();
    let (s, conv) = app
        .post("/v1/conversations", k, json!({"items": [msg("hello")]}))
        .await;
    assert_eq!(s, 200, "{conv}");
    let conv_id = conv["id"].as_str().unwrap().to_owned();
    let (bob, bob_key, bob_key_id) = user_with_key(&app, "bob").await;
    let bobs_response = seed_chain(&app, &bob, &bob_key_id).await.pop().unwrap();
    let (s, bconv) = app
        .post(
            "/v1/conversations",
            Some(&bob_key),
            json!({"items": [msg("bob's")]}),
        )
        .await;
    assert_eq!(s, 200, "{bconv}");
    let bobs_conv = bconv["id"].as_str().unwrap().to_owned();
    let before = usage_rows(&app, 2).await.len();
    assert_eq!(before, 2, "the two conversations' creations");
    let rows = state_rows(&app).await;
    assert_eq!(rows, (6, 2, 2));
    let batches = app.state.stored.batches();
    let (balance0, spent0) = settled_money(&app, &alice, &key_id).await;
    assert_eq!((balance0, spent0), (grant, 0));

    let model = |extra: Value| {
        let mut b = json!({"model": "gpt-test", "input": "Hello", "store": true});
        b.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        b
    };
    let fn_tool = json!({"type": "function", "name": "f", "parameters": {"type": "object"}});
    let unknown_response = "resp_00000000000000000000000000000000";
    let unknown_conv = "conv_00000000000000000000000000000000";
    // (what, body, status, code, param, the message names)
    let cases: Vec<(&str, Value, u16, &str, Value, String)> = vec![
        (
            "both",
            model(json!({"previous_response_id": mine, "conversation": conv_id})),
            400,
            "invalid_value",
            json!("conversation"),
            "previous_response_id".into(),
        ),
        (
            "both, the conversation as an object, streamed",
            model(
                json!({"previous_response_id": mine, "conversation": {"id": conv_id}, "stream": true}),
            ),
            400,
            "invalid_value",
            json!("conversation"),
            "previous_response_id".into(),
        ),
        (
            "a built-in tool",
            model(json!({"tools": [{"type": "web_search_preview"}]})),
            400,
            "unsupported_tool",
            json!("tools[0].type"),
            "web_search_preview".into(),
        ),
        (
            "a built-in tool in the user's conversation, streamed",
            model(
                json!({"conversation": conv_id, "stream": true, "tools": [fn_tool, {"type": "file_search", "vector_store_ids": ["vs_1"]}]}),
            ),
            400,
            "unsupported_tool",
            json!("tools[1].type"),
            "file_search".into(),
        ),
        (
            "a built-in tool after the user's stored response",
            model(json!({"previous_response_id": mine, "tools": [{"type": "web_search"}]})),
            400,
            "unsupported_tool",
            json!("tools[0].type"),
            "web_search".into(),
        ),
        (
            "an unknown response",
            model(json!({"previous_response_id": unknown_response})),
            404,
            "not_found",
            Value::Null,
            format!("No response found with id '{unknown_response}'."),
        ),
        (
            "another user's response, streamed",
            model(json!({"previous_response_id": bobs_response, "stream": true})),
            404,
            "not_found",
            Value::Null,
            format!("No response found with id '{bobs_response}'."),
        ),
        (
            "an unknown conversation",
            model(json!({"conversation": unknown_conv})),
            404,
            "not_found",
            Value::Null,
            format!("Conversation with id '{unknown_conv}' not found."),
        ),
        (
            "another user's conversation",
            model(json!({"conversation": {"id": bobs_conv}})),
            404,
            "not_found",
            Value::Null,
            format!("Conversation with id '{bobs_conv}' not found."),
        ),
    ];
    for (what, body, status, code, param, names) in &cases {
        let (s, b) = post_responses(&app, &key, body).await;
        assert_eq!(s, *status, "{what}: {b}");
        assert_error(s, &b, *status, code);
        assert_eq!(b["error"]["type"], "invalid_request_error", "{what}: {b}");
        assert_eq!(b["error"]["param"], *param, "{what}: {b}");
        let message = b["error"]["message"].as_str().unwrap();
        if *status == 404 {
            // Another user's id reads exactly as an unknown one.
            assert_eq!(message, names, "{what}");
        } else {
            assert!(message.contains(names.as_str()), "{what}: {message}");
        }
    }

    assert!(
        gw.mock.requests().is_empty(),
        "a refused request reached the upstream: {:?}",
        gw.mock.requests()
    );
    let records = usage_rows(&app, before + cases.len()).await;
    assert_eq!(
        records.len(),
        before + cases.len(),
        "one usage record per refusal"
    );
    let mut statuses: Vec<i32> = Vec::new();
    for r in &records[before..] {
        assert_eq!(r.endpoint, "responses", "{r:?}");
        assert_eq!(r.key_id, key_id);
        assert_eq!(r.cost_nanos, 0, "a refusal is free: {r:?}");
        assert_eq!(
            (r.prompt_tokens, r.completion_tokens, r.tokens_estimated),
            (0, 0, false),
            "{r:?}"
        );
        assert_eq!(
            r.response_id, None,
            "a refused request made no response: {r:?}"
        );
        assert!(
            r.conversation_id.is_none() || r.conversation_id.as_deref() == Some(conv_id.as_str()),
            "names only the user's own conversation: {r:?}"
        );
        statuses.push(r.status);
    }
    statuses.sort_unstable();
    let mut want: Vec<i32> = cases.iter().map(|c| i32::from(c.2)).collect();
    want.sort_unstable();
    assert_eq!(statuses, want);

    // Nothing stored, nothing appended, nothing written, nothing charged or left reserved.
    assert_eq!(state_rows(&app).await, rows, "nothing was stored");
    assert_eq!(app.state.stored.batches(), batches);
    assert_eq!(app.state.stored.queued(), 0);
    let (s, items) = app
        .get(&format!("/v1/conversations/{conv_id}/items"), k)
        .await;
    assert_eq!(s, 200);
    assert_eq!(texts(items["data"].as_array().unwrap()), ["hello"]);
    assert_eq!(
        settled_money(&app, &alice, &key_id).await,
        (grant, 0),
        "balance and key spend untouched"
    );
    let usage_entries = {
        use sea_orm::{ColumnTrait, QueryFilter};
        entity::balance_ledger::Entity::find()
            .filter(entity::balance_ledger::Column::UserId.eq(alice.as_str()))
            .filter(entity::balance_ledger::Column::Kind.eq("usage"))
            .count(&app.state.db)
            .await
            .unwrap()
    };
    assert_eq!(usage_entries, 0);

    // The same checks see a request that is served: upstream asked, stored, charged.
    let (s, b) = post_responses(&app, &key, &model(json!({"conversation": conv_id}))).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(gw.mock.requests().len(), 1);
    let id = b["id"].as_str().unwrap();
    let (s, got) = app.get(&format!("/v1/responses/{id}"), k).await;
    assert_eq!(s, 200, "{got}");
    assert_eq!(state_rows(&app).await, (rows.0 + 1, rows.1, rows.2 + 2));
    let records = usage_rows(&app, before + cases.len() + 2).await;
    let served = records
        .iter()
        .find(|r| r.response_id.as_deref() == Some(id))
        .unwrap();
    assert!(served.cost_nanos > 0, "{served:?}");
    let (balance, spent) = settled_money(&app, &alice, &key_id).await;
    assert_eq!(spent, served.cost_nanos);
    assert_eq!(balance, grant - served.cost_nanos);
}
