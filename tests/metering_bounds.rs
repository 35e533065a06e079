//! Token counts and money from hostile upstreams and hostile sizes: usage is cut to the request's
//! bounds, the overdraft a request can cause is the documented one, reports survive extreme
//! records already in the database, refusals say what happened, and estimation is bounded.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::routing::post;
use common::TestApp;
use common::gateway::{new_key, setup, wait_records};
use sea_orm::{ActiveModelTrait, EntityTrait, Set};
use serde_json::{Value, json};

/// A hostile upstream. By upstream model: `huge` reports 9e15 tokens of each kind, `hang` takes
/// the request and never answers, `bigbody` answers 30 MB without usage.
struct Hostile {
    addr: SocketAddr,
    /// Bytes of the last request body a `hang` request brought.
    hung: Arc<AtomicUsize>,
}

const BIG_BODY: usize = 30_000_000;

async fn hostile() -> Hostile {
    let hung = Arc::new(AtomicUsize::new(0));
    async fn handle(State(hung): State<Arc<AtomicUsize>>, body: Bytes) -> axum::response::Response {
        use axum::response::IntoResponse;
        let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        match v["model"].as_str().unwrap_or_default() {
            "hang" => {
                hung.store(body.len(), Ordering::SeqCst);
                std::future::pending::<()>().await;
                unreachable!()
            }
            "bigbody" => {
                let head = br#"{"id":"x","object":"chat.completion","model":"bigbody","choices":[{"index":0,"message":{"role":"assistant","content":""#;
                let tail = br#""},"finish_reason":"stop"}]}"#;
                let mut b = Vec::with_capacity(BIG_BODY);
                b.extend_from_slice(head);
                b.resize(BIG_BODY - tail.len(), b'a');
                b.extend_from_slice(tail);
                ([("content-type", "application/json")], b).into_response()
            }
            _ => axum::Json(json!({
                "id": "x", "object": "chat.completion", "model": "huge",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 9_000_000_000_000_000i64, "completion_tokens": 9_000_000_000_000_000i64,
                          "prompt_tokens_details": {"cached_tokens": 9_000_000_000_000_000i64}}
            }))
            .into_response(),
        }
    }
    let app = Router::new()
        .route("/v1/chat/completions", post(handle))
        .layer(DefaultBodyLimit::disable())
        .with_state(hung.clone());
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await });
    Hostile { addr, hung }
}

/// Adds the hostile upstream as provider `hostile` with alice's key for it, and its models:
/// `hostile-huge` ($1 in / $2 out per 1M, window 1000, max output 100), `hostile-hang` and
/// `hostile-big` (same prices, no window, no max output).
async fn add_hostile(app: &TestApp, admin: &str, user: &str) -> Hostile {
    let h = hostile().await;
    let (s, b) = app
        .post(
            "/api/admin/providers",
            Some(admin),
            json!({"key": "hostile", "display_name": "Hostile", "base_url": format!("http://{}/v1", h.addr), "kind": "openai"}),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    for (name, upstream, window) in [
        ("hostile-huge", "huge", Some(1000)),
        ("hostile-hang", "hang", None),
        ("hostile-big", "bigbody", None),
    ] {
        let mut m = json!({"name": name, "provider": "hostile", "upstream_model": upstream,
            "input_price_per_1m": 1.0, "output_price_per_1m": 2.0});
        if let Some(w) = window {
            m["context_window"] = json!(w);
            m["max_output_tokens"] = json!(100);
        }
        let (s, b) = app.post("/api/admin/models", Some(admin), m).await;
        assert_eq!(s, 201, "{b}");
    }
    let (s, b) = app
        .post(
            "/api/provider-keys",
            Some(user),
            json!({"provider": "hostile", "api_key": "sk-hostile-0123456789"}),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    h
}

async fn user_id(app: &TestApp, name: &str) -> String {
    tollgate::store::users::find_by_username(&app.state.db, name)
        .await
        .unwrap()
        .unwrap()
        .id
}

async fn credit(app: &TestApp, user_id: &str, nanos: i64) {
    tollgate::store::ledger::apply(
        &app.state.db,
        tollgate::store::ledger::Change {
            user_id,
            amount_nanos: nanos,
            kind: tollgate::store::ledger::Kind::Adjustment,
            note: Some("test"),
            actor_id: None,
            refuse_negative: true,
        },
    )
    .await
    .unwrap();
}

async fn user_row(app: &TestApp, id: &str) -> entity::users::Model {
    entity::users::Entity::find_by_id(id.to_owned())
        .one(&app.state.db)
        .await
        .unwrap()
        .unwrap()
}

async fn chat(app: &TestApp, key: &str, body: &Value) -> (u16, Value) {
    let r = app
        .client
        .post(app.url("/v1/chat/completions"))
        .bearer_auth(key)
        .json(body)
        .send()
        .await
        .unwrap();
    let s = r.status().as_u16();
    (s, r.json().await.unwrap_or(Value::Null))
}

/// An upstream reporting 9e15 tokens of each kind is metered at the request's bounds; the
/// balance goes below zero by at most the documented bound (prompt bytes − ⌈bytes/4⌉ at the
/// input price); the key's spend is that cost, not a wrapped negative; the next request is
/// refused with a message that says why and what to do.
#[tokio::test]
async fn absurd_upstream_usage_is_bounded_and_the_overdraft_is_the_documented_one() {
    let app = TestApp::spawn_with(|c| c.billing.enforce_balance = true).await;
    let gw = setup(&app).await;
    add_hostile(&app, &gw.admin, &gw.user).await;
    let alice = user_id(&app, "alice").await;
    let body = json!({"model": "hostile-huge", "max_tokens": 50,
        "messages": [{"role": "user", "content": "hello, how much does this cost?"}]});
    let len = serde_json::to_vec(&body).unwrap().len() as i64;
    let prompt_reserved = (len + 3) / 4;
    // $1 / 1M in = 1000 nanos a token, $2 / 1M out = 2000.
    let reservation = prompt_reserved * 1000 + 50 * 2000;
    // Exactly what the request reserves: nothing to spare.
    credit(&app, &alice, reservation).await;
    let clamped_before = app
        .state
        .metrics
        .usage_clamped_total
        .with_label_values(&["completion"])
        .get();

    let (s, b) = chat(&app, &gw.key, &body).await;
    assert_eq!(s, 200, "{b}");
    let recs = wait_records(&app, &gw.user, 1).await;
    let r = &recs[0];
    // prompt ≤ the body's bytes (and the window of 1000), completion ≤ max_tokens, cached ≤ prompt.
    assert_eq!(r["prompt_tokens"], len);
    assert_eq!(r["completion_tokens"], 50);
    assert_eq!(r["cached_tokens"], len);
    assert_eq!(
        app.state
            .metrics
            .usage_clamped_total
            .with_label_values(&["completion"])
            .get(),
        clamped_before + 1
    );

    // The documented worst case: (bytes − ⌈bytes/4⌉) × input price below zero.
    let bound = (len - prompt_reserved) * 1000;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let u = user_row(&app, &alice).await;
        if u.reserved_nanos == 0 && u.balance_nanos != reservation {
            assert_eq!(u.balance_nanos, -bound, "overdrawn by exactly the bound");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never settled: {u:?}");
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    let (_, k) = app
        .get(&format!("/api/keys/{}", gw.key_id), Some(&gw.user))
        .await;
    let spent = k["spent_usd"].as_f64().unwrap();
    assert!(
        (spent - (reservation + bound) as f64 / 1e9).abs() < 1e-9,
        "{k}"
    );

    // The balance is below zero now: refused, with the numbers and what to do.
    let (s, b) = chat(&app, &gw.key, &body).await;
    assert_eq!(s, 429, "{b}");
    assert_eq!(b["error"]["code"], "insufficient_quota");
    let msg = b["error"]["message"].as_str().unwrap();
    let want_cost = format!("may cost up to ${:.6}", reservation as f64 / 1e9);
    assert!(msg.contains(&want_cost), "{msg}");
    assert!(msg.contains(&format!("{prompt_reserved} tokens")), "{msg}");
    assert!(msg.contains("+ 50 completion tokens"), "{msg}");
    assert!(
        msg.contains("your balance has $0.000000 available"),
        "{msg}"
    );
    assert!(msg.contains("Lower max_tokens"), "{msg}");
    assert!(msg.contains("add credit"), "{msg}");
}

/// A key whose budget is below one request's maximum cost, at $0 spent: the refusal does not
/// claim the budget was reached; it gives the maximum cost, the remaining budget and the way out.
#[tokio::test]
async fn budget_refusal_says_what_the_request_may_cost_and_what_is_left() {
    let app = TestApp::spawn().await;
    let gw = setup(&app).await;
    let (key, _) = new_key(
        &app,
        &gw.user,
        json!({"name": "small", "budget_usd": 0.001}),
    )
    .await;
    let body = json!({"model": "gpt-test", "max_tokens": 100000, "messages": []});
    let (s, b) = chat(&app, &key, &body).await;
    assert_eq!(s, 429, "{b}");
    assert_eq!(b["error"]["code"], "insufficient_quota");
    let msg = b["error"]["message"].as_str().unwrap();
    assert!(!msg.contains("reached its budget"), "{msg}");
    assert!(msg.contains("may cost up to $0.2"), "{msg}");
    assert!(msg.contains("+ 100000 completion tokens"), "{msg}");
    assert!(
        msg.contains("remaining budget is $0.001000 (budget $0.001000, spent $0.000000"),
        "{msg}"
    );
    assert!(msg.contains("Lower max_tokens"), "{msg}");
    assert!(msg.contains("raise the key's budget (budget_usd)"), "{msg}");
}

/// Records written before counts were bounded (values near `i64::MAX`) must not make any
/// report fail: sums saturate.
#[tokio::test]
async fn reports_survive_extreme_records_already_in_the_database() {
    let app = TestApp::spawn().await;
    let gw = setup(&app).await;
    let alice = user_id(&app, "alice").await;
    let half = i64::MAX / 2;
    for i in 0..3 {
        entity::usage_records::ActiveModel {
            at: Set(chrono::Utc::now()),
            user_id: Set(alice.clone()),
            key_id: Set(gw.key_id.clone()),
            model: Set("gpt-test".into()),
            provider: Set(if i == 0 { "a" } else { "b" }.into()),
            endpoint: Set("chat.completions".into()),
            stream: Set(false),
            status: Set(200),
            prompt_tokens: Set(half),
            completion_tokens: Set(half),
            cached_tokens: Set(half),
            cost_nanos: Set(half),
            latency_ms: Set(half),
            ttft_ms: Set(None),
            tokens_estimated: Set(false),
            request_id: Set(format!("r{i}")),
            shared_key: Set(false),
            error: Set(None),
            ..Default::default()
        }
        .insert(&app.state.db)
        .await
        .unwrap();
    }
    let max_usd = i64::MAX as f64 / 1e9;
    for path in [
        "/api/me/usage",
        "/api/me/usage?group_by=day",
        "/api/me/usage?group_by=provider",
    ] {
        let (s, b) = app.get(path, Some(&gw.user)).await;
        assert_eq!(s, 200, "{path}: {b}");
        assert_eq!(b["totals"]["prompt_tokens"], i64::MAX, "{path}: {b}");
        assert_eq!(b["totals"]["cost_usd"].as_f64(), Some(max_usd), "{path}");
    }
    for path in ["/api/admin/usage", "/api/admin/usage?group_by=user"] {
        let (s, b) = app.get(path, Some(&gw.admin)).await;
        assert_eq!(s, 200, "{path}: {b}");
        assert_eq!(b["totals"]["completion_tokens"], i64::MAX, "{path}: {b}");
    }
    let (s, b) = app.get("/api/admin/stats", Some(&gw.admin)).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["cost_usd_24h"].as_f64(), Some(max_usd), "{b}");
    let (s, b) = app.get("/api/me/balance", Some(&gw.user)).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["spent_usd_30d"].as_f64(), Some(max_usd), "{b}");
    // Exact below the limits: one record alone.
    let (s, b) = app
        .get("/api/me/usage?group_by=provider", Some(&gw.user))
        .await;
    assert_eq!(s, 200);
    let a = b["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["group"] == "a")
        .unwrap();
    assert_eq!(a["prompt_tokens"], half);
}

/// A key whose spend saturated at the top of the range (or a balance at the bottom): a new
/// reservation is refused (429), not a database error (500), and settling more spend on it
/// does not fail the usage batch.
#[tokio::test]
async fn saturated_spend_and_balance_refuse_instead_of_failing() {
    use sea_orm::{ColumnTrait, QueryFilter, sea_query::Expr};
    let app = TestApp::spawn_with(|c| c.billing.enforce_balance = true).await;
    let gw = setup(&app).await;
    let alice = user_id(&app, "alice").await;
    let (key, key_id) = new_key(&app, &gw.user, json!({"name": "b", "budget_usd": 1.0})).await;
    entity::gateway_keys::Entity::update_many()
        .col_expr(
            entity::gateway_keys::Column::SpentNanos,
            Expr::value(i64::MAX - 5),
        )
        .filter(entity::gateway_keys::Column::Id.eq(key_id.clone()))
        .exec(&app.state.db)
        .await
        .unwrap();
    let (s, b) = chat(&app, &key, &json!({"model": "gpt-test", "messages": []})).await;
    assert_eq!(s, 429, "{b}");
    assert_eq!(b["error"]["code"], "insufficient_quota");
    // A balance at the bottom of the range: refused, not 500.
    entity::users::Entity::update_many()
        .col_expr(
            entity::users::Column::BalanceNanos,
            Expr::value(i64::MIN + 5),
        )
        .filter(entity::users::Column::Id.eq(alice.clone()))
        .exec(&app.state.db)
        .await
        .unwrap();
    let (s, b) = chat(&app, &gw.key, &json!({"model": "gpt-test", "messages": []})).await;
    assert_eq!(s, 429, "{b}");
    // The ledger saturates instead of failing the batch's statement.
    tollgate::store::ledger::apply(
        &app.state.db,
        tollgate::store::ledger::Change {
            user_id: &alice,
            amount_nanos: -1_000_000,
            kind: tollgate::store::ledger::Kind::Usage,
            note: None,
            actor_id: None,
            refuse_negative: false,
        },
    )
    .await
    .unwrap();
    assert_eq!(user_row(&app, &alice).await.balance_nanos, i64::MIN);
}

/// A 16 MiB prompt whose client leaves before the upstream answers, and a 30 MB answer without
/// usage: both are recorded, estimated in proportion to their size, and the tokenizer runs over
/// none of it (both are beyond what is kept for tokenizing).
#[tokio::test]
async fn huge_bodies_are_estimated_by_size_without_tokenizing_them() {
    let app = TestApp::spawn().await;
    let gw = setup(&app).await;
    let h = add_hostile(&app, &gw.admin, &gw.user).await;
    let tokenized_before = app.state.metrics.usage_estimate_tokenized_bytes_total.get();

    // 16 MiB less a little room for the JSON around the text.
    let text = "x".repeat(16 * 1024 * 1024 - 200);
    let body = serde_json::to_vec(
        &json!({"model": "hostile-hang", "messages": [{"role": "user", "content": text}]}),
    )
    .unwrap();
    let len = body.len();
    let client = app.client.clone();
    let url = app.url("/v1/chat/completions");
    let key = gw.key.clone();
    let req = tokio::spawn(async move {
        client
            .post(url)
            .bearer_auth(key)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
    });
    // Once the upstream holds the request, the client goes away.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while h.hung.load(Ordering::SeqCst) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "upstream never got it"
        );
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    req.abort();
    let recs = wait_records(&app, &gw.user, 1).await;
    let r = &recs[0];
    assert_eq!(r["status"], 499, "{r}");
    assert_eq!(r["tokens_estimated"], true);
    assert_eq!(r["prompt_tokens"], len.div_ceil(4) as i64, "{r}");

    let (s, _) = chat(
        &app,
        &gw.key,
        &json!({"model": "hostile-big", "messages": []}),
    )
    .await;
    assert_eq!(s, 200);
    let recs = wait_records(&app, &gw.user, 2).await;
    let r = recs
        .iter()
        .find(|r| r["model"] == "hostile-big")
        .expect("record");
    assert_eq!(r["tokens_estimated"], true);
    assert_eq!(r["completion_tokens"], BIG_BODY.div_ceil(4) as i64, "{r}");
    assert_eq!(
        app.state.metrics.usage_estimate_tokenized_bytes_total.get() - tokenized_before,
        // The second request's small body ({"model":…,"messages":[]}) has no text to tokenize.
        0
    );
}
