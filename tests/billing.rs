//! Balance and budget enforcement on the hot path: reservations, settlement, the ledger.
#![allow(clippy::unwrap_used)]

mod common;

use common::gateway::{new_key, setup, wait_records};
use common::{TestApp, assert_error};
use sea_orm::{EntityTrait, QuerySelect};
use serde_json::{Value, json};

/// (balance, sum of ledger entries, reserved) in nano-dollars, straight from the database.
async fn ledger_state(app: &TestApp, user_id: &str) -> (i64, i64, i64) {
    let u = entity::users::Entity::find_by_id(user_id.to_owned())
        .one(&app.state.db)
        .await
        .unwrap()
        .unwrap();
    let entries: Vec<i64> = entity::balance_ledger::Entity::find()
        .select_only()
        .column(entity::balance_ledger::Column::AmountNanos)
        .into_tuple::<i64>()
        .all(&app.state.db)
        .await
        .unwrap();
    (u.balance_nanos, entries.iter().sum(), u.reserved_nanos)
}

async fn user_id(app: &TestApp, name: &str) -> String {
    tollgate::store::users::find_by_username(&app.state.db, name)
        .await
        .unwrap()
        .unwrap()
        .id
}

/// The reservation admission makes for `body` on a model priced $1 in / $2 out per 1M.
fn max_cost_nanos(body: &Value, max_tokens: i64) -> i64 {
    let bytes = serde_json::to_vec(body).unwrap().len() as i64;
    let prompt = (bytes + 3) / 4;
    // prompt × 1000 nanos + completion × 2000 nanos (per token), rounded as cost_nanos does
    prompt * 1000 + max_tokens * 2000
}

#[tokio::test]
async fn zero_balance_is_refused_without_reaching_the_upstream() {
    let app = TestApp::spawn_with(|c| c.billing.enforce_balance = true).await;
    let gw = setup(&app).await;
    let r = app
        .client
        .post(app.url("/v1/chat/completions"))
        .bearer_auth(&gw.key)
        .json(&json!({"model": "gpt-test", "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["x-should-retry"], "false");
    let s = r.status().as_u16();
    let b: Value = r.json().await.unwrap();
    assert_error(s, &b, 429, "insufficient_quota");
    assert_eq!(b["error"]["type"], "insufficient_quota");
    assert!(gw.mock.requests().is_empty());
}

#[tokio::test]
async fn grant_spend_and_ledger_agree_to_the_nano_dollar() {
    let app = TestApp::spawn_with(|c| c.billing.enforce_balance = true).await;
    let gw = setup(&app).await;
    let alice = user_id(&app, "alice").await;
    let (s, b) = app
        .post(
            &format!("/api/admin/users/{alice}/balance"),
            Some(&gw.admin),
            json!({"amount_usd": 1.5, "note": "welcome"}),
        )
        .await;
    assert!(s == 200 || s == 201, "{s} {b}");
    for i in 0..7 {
        let body = json!({"model": if i % 2 == 0 { "gpt-cached" } else { "gpt-test" }, "stream": i % 3 == 0, "messages": []});
        let r = app
            .client
            .post(app.url("/v1/chat/completions"))
            .bearer_auth(&gw.key)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.text().await.unwrap();
    }
    let recs = wait_records(&app, &gw.user, 7).await;
    let cost_nanos: i64 = recs
        .iter()
        .map(|r| (r["cost_usd"].as_f64().unwrap() * 1e9).round() as i64)
        .sum();
    // Settlement lands with the records, but poll until no reservation is left.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (balance, sum, reserved) = ledger_state(&app, &alice).await;
        if reserved == 0 && balance == 1_500_000_000 - cost_nanos {
            assert_eq!(sum, balance, "ledger entries sum to the balance");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "balance {balance}, ledger {sum}, reserved {reserved}, cost {cost_nanos}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
}

#[tokio::test]
async fn parallel_requests_cannot_overdraw_the_balance() {
    let app = TestApp::spawn_with(|c| c.billing.enforce_balance = true).await;
    let gw = setup(&app).await;
    let alice = user_id(&app, "alice").await;
    let body = json!({"model": "gpt-slow", "stream": true, "max_tokens": 1000, "messages": [{"role": "user", "content": "hi"}]});
    let each = max_cost_nanos(&body, 1000);
    // Room for four reservations, not five.
    let grant = each * 4 + each / 2;
    tollgate::store::ledger::apply(
        &app.state.db,
        tollgate::store::ledger::Change {
            user_id: &alice,
            amount_nanos: grant,
            kind: tollgate::store::ledger::Kind::Adjustment,
            note: Some("test"),
            actor_id: None,
            refuse_negative: true,
        },
    )
    .await
    .unwrap();
    let mut tasks = Vec::new();
    for _ in 0..40 {
        let client = app.client.clone();
        let url = app.url("/v1/chat/completions");
        let key = gw.key.clone();
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            let r = client
                .post(url)
                .bearer_auth(key)
                .json(&body)
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            r.text().await.unwrap();
            status
        }));
    }
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            200 => ok += 1,
            429 => {}
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!(ok, 4, "exactly what was reservable was served");
    wait_records(&app, &gw.user, 4).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (balance, sum, reserved) = ledger_state(&app, &alice).await;
        if reserved == 0 {
            assert!(balance >= 0, "never overdrawn: {balance}");
            assert_eq!(sum, balance);
            assert!(balance < grant, "the four requests were charged");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "reservations never released: {reserved}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
}

#[tokio::test]
async fn key_budget_is_enforced_without_balance_enforcement() {
    let app = TestApp::spawn().await;
    let gw = setup(&app).await;
    let body = json!({"model": "gpt-test", "max_tokens": 10, "messages": []});
    let each = max_cost_nanos(&body, 10);
    // A budget for two reservations; each request actually costs 25 µ$ (11 in, 7 out).
    let budget_usd = (each * 2 + each / 2) as f64 / 1e9;
    let (key, key_id) = new_key(
        &app,
        &gw.user,
        json!({"name": "capped", "budget_usd": budget_usd}),
    )
    .await;
    let mut statuses = Vec::new();
    for _ in 0..40 {
        let r = app
            .client
            .post(app.url("/v1/chat/completions"))
            .bearer_auth(&key)
            .json(&body)
            .send()
            .await
            .unwrap();
        statuses.push(r.status().as_u16());
        if r.status() == 429 {
            assert_eq!(r.headers()["x-should-retry"], "false");
            let b: Value = r.json().await.unwrap();
            assert_eq!(b["error"]["code"], "insufficient_quota");
            break;
        }
        r.text().await.unwrap();
        // Let the writer settle so the next reservation sees the real spend.
        tokio::time::sleep(std::time::Duration::from_millis(120)).await;
    }
    assert_eq!(
        statuses.last(),
        Some(&429),
        "the budget ran out: {statuses:?}"
    );
    let (_, k) = app
        .get(&format!("/api/keys/{key_id}"), Some(&gw.user))
        .await;
    assert!(k["spent_usd"].as_f64().unwrap() <= budget_usd, "{k}");
    // The balance was never touched: own provider key, enforcement off.
    let alice = user_id(&app, "alice").await;
    assert_eq!(ledger_state(&app, &alice).await.0, 0);
}

/// Leases: a replica reserves balance in chunks, serves the next requests from memory, falls back
/// to exactly what is missing when the balance is short, and gives its spare back.
#[tokio::test]
async fn leases_reserve_in_chunks_and_give_back_the_spare() {
    use tollgate::metering::leases::Holder;
    let app = TestApp::spawn_with(|c| c.billing.enforce_balance = true).await;
    setup(&app).await;
    let alice = user_id(&app, "alice").await;
    let db = &app.state.db;
    let leases = tollgate::metering::leases::Leases::default();
    let n = 1_000_000;
    let grant = |amount| {
        tollgate::store::ledger::apply(
            db,
            tollgate::store::ledger::Change {
                user_id: &alice,
                amount_nanos: amount,
                kind: tollgate::store::ledger::Kind::Adjustment,
                note: Some("test"),
                actor_id: None,
                refuse_negative: true,
            },
        )
    };
    grant(100 * n).await.unwrap();

    // The first request reserves a chunk (itself + 16 more) in one statement …
    assert!(leases.take(db, Holder::User, &alice, n).await.unwrap());
    assert_eq!(ledger_state(&app, &alice).await.2, 17 * n);
    // … the next sixteen come from memory: the database does not move.
    for _ in 0..16 {
        assert!(leases.take(db, Holder::User, &alice, n).await.unwrap());
    }
    assert_eq!(ledger_state(&app, &alice).await.2, 17 * n);
    assert_eq!(leases.held(Holder::User, &alice), (17 * n, 17 * n));
    // The eighteenth needs a new chunk: 1 + 16 + the 17 in flight.
    assert!(leases.take(db, Holder::User, &alice, n).await.unwrap());
    assert_eq!(ledger_state(&app, &alice).await.2, 51 * n);

    // Settling: what a request cost leaves the lease (the writer takes it out of the column in
    // the same transaction as the debit); the rest of its reservation is spare again.
    leases.settle(Holder::User, &alice, n, n / 4);
    assert_eq!(leases.held(Holder::User, &alice), (51 * n - n / 4, 17 * n));
    for _ in 0..17 {
        leases.release(Holder::User, &alice, n);
    }
    // Idle for a second: the spare goes back; the slot is forgotten.
    leases.give_back(db, std::time::Duration::ZERO).await;
    assert_eq!(leases.held(Holder::User, &alice), (0, 0));
    assert_eq!(ledger_state(&app, &alice).await.2, n / 4);

    // A short balance: the chunk does not fit, exactly what is missing does, once.
    let (balance, _, reserved) = ledger_state(&app, &alice).await;
    grant(-(balance - reserved) + 3 * n / 2).await.unwrap();
    assert!(leases.take(db, Holder::User, &alice, n).await.unwrap());
    assert_eq!(ledger_state(&app, &alice).await.2, n / 4 + n);
    assert!(!leases.take(db, Holder::User, &alice, n).await.unwrap());
    leases.release(Holder::User, &alice, n);
    leases.give_back(db, std::time::Duration::ZERO).await;
    assert_eq!(ledger_state(&app, &alice).await.2, n / 4);
}

/// Polls until `user_id` holds no reservation and its balance is `want`; returns the ledger sum.
async fn settled_balance(app: &TestApp, user_id: &str, want: i64) -> i64 {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (balance, sum, reserved) = ledger_state(app, user_id).await;
        if reserved == 0 && balance == want {
            return sum;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "balance {balance} (want {want}), ledger {sum}, reserved {reserved}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
}

fn nanos(usd: &Value) -> i64 {
    (usd.as_f64().unwrap() * 1e9).round() as i64
}

/// Spec §10's formula through the real App: the upstream reports
/// `prompt_tokens_details.cached_tokens` (11 prompt, 4 of them cached, 7 completion, stream and
/// not); the records and the balance debit are (11 − 4) × input + 4 × cached-input + 7 × output,
/// and the cache-write price, with no cache writes reported, changes nothing.
#[tokio::test]
async fn cached_tokens_are_billed_once_at_the_cached_price() {
    let app = TestApp::spawn_with(|c| c.billing.enforce_balance = true).await;
    let gw = setup(&app).await;
    let alice = user_id(&app, "alice").await;
    // $3 in, $0.30 cache read, $3.75 cache write, $15 out per 1M: 3000 / 300 / 3750 / 15000
    // nano-dollars a token.
    for (name, cached_price) in [("claude-ish", json!(0.3)), ("no-cache-price", Value::Null)] {
        let (s, b) = app
            .post(
                "/api/admin/models",
                Some(&gw.admin),
                json!({"name": name, "provider": "mock", "upstream_model": "cached",
                       "input_price_per_1m": 3.0, "output_price_per_1m": 15.0,
                       "cached_input_price_per_1m": cached_price,
                       "cache_write_input_price_per_1m": 3.75, "max_output_tokens": 1000}),
            )
            .await;
        assert_eq!(s, 201, "{b}");
    }
    let (s, b) = app
        .post(
            &format!("/api/admin/users/{alice}/balance"),
            Some(&gw.admin),
            json!({"amount_usd": 1.0, "note": "grant"}),
        )
        .await;
    assert!(s == 200 || s == 201, "{s} {b}");

    let mut sent = 0;
    for model in ["claude-ish", "no-cache-price"] {
        for stream in [false, true] {
            let r = app
                .client
                .post(app.url("/v1/chat/completions"))
                .bearer_auth(&gw.key)
                .json(&json!({"model": model, "stream": stream,
                              "messages": [{"role": "user", "content": "hi"}]}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            r.text().await.unwrap();
            sent += 1;
        }
    }
    let recs = wait_records(&app, &gw.user, sent).await;
    let with_price = 7 * 3_000 + 4 * 300 + 7 * 15_000;
    let without = 11 * 3_000 + 7 * 15_000;
    let mut total = 0;
    for r in &recs {
        assert_eq!(r["prompt_tokens"], 11, "{r}");
        assert_eq!(r["cached_tokens"], 4, "{r}");
        assert_eq!(r["completion_tokens"], 7, "{r}");
        assert_eq!(r["cache_write_tokens"], 0, "{r}");
        assert_eq!(r["reasoning_tokens"], 0, "{r}");
        assert_eq!(r["tokens_estimated"], false, "{r}");
        assert_eq!(r["response_id"], Value::Null, "{r}");
        let want = if r["model"] == "claude-ish" {
            with_price
        } else {
            without
        };
        assert_eq!(nanos(&r["cost_usd"]), want, "{r}");
        total += want;
    }
    assert_eq!(total, 2 * with_price + 2 * without);
    let sum = settled_balance(&app, &alice, 1_000_000_000 - total).await;
    assert_eq!(sum, 1_000_000_000 - total, "the ledger sums to the balance");

    // The report sums the new columns too.
    let (s, rep) = app
        .get("/api/me/usage?group_by=model", Some(&gw.user))
        .await;
    assert_eq!(s, 200, "{rep}");
    assert_eq!(rep["totals"]["cached_tokens"], 16, "{rep}");
    assert_eq!(rep["totals"]["cache_write_tokens"], 0, "{rep}");
    assert_eq!(rep["totals"]["reasoning_tokens"], 0, "{rep}");
    assert_eq!(nanos(&rep["totals"]["cost_usd"]), total, "{rep}");
}

/// Cache writes, reasoning, a non-token cost and the stored response and conversation go from
/// the usage event through the batch writer to the records, the reports and the balance.
#[tokio::test]
async fn cache_writes_reasoning_and_ids_reach_the_records() {
    use tollgate::metering::event::{Prices, Reservation, Units, UsageEvent, units_cost_nanos};
    use tollgate::metering::spool::Ticket;
    use tollgate::metering::writer::{Settled, write_settled};
    use tollgate::providers::{Endpoint, Usage};

    let app = TestApp::spawn_with(|c| c.billing.enforce_balance = true).await;
    let gw = setup(&app).await;
    let alice = user_id(&app, "alice").await;
    let prices = Prices {
        input: 3_000_000_000,
        output: 15_000_000_000,
        cached_input: Some(300_000_000),
        cache_write_input: Some(3_750_000_000),
        per_image: Some(40_000_000),
        ..Default::default()
    };
    let extra = units_cost_nanos(
        Units {
            images: 2,
            ..Default::default()
        },
        prices,
    );
    let event = UsageEvent {
        at: chrono::Utc::now(),
        user_id: alice.clone(),
        key_id: gw.key_id.clone(),
        model: "claude-ish".into(),
        provider: "mock".into(),
        endpoint: Endpoint::ChatCompletions,
        stream: true,
        status: 200,
        usage: Usage {
            prompt: 10_000,
            completion: 500,
            cached: 6_000,
            cache_write: 3_000,
            reasoning: 200,
        },
        prices,
        latency_ms: 5,
        ttft_ms: Some(1),
        tokens_estimated: false,
        request_id: "req-cw".into(),
        shared_key: false,
        error: None,
        extra_cost_nanos: extra,
        response_id: Some("resp_0123456789abcdef".into()),
        conversation_id: Some("conv_0123456789abcdef".into()),
        routed: Default::default(),
        reservation: Reservation::default(),
        charged: true,
        ticket: Ticket::new(),
    };
    // 1000 × 3000 + 6000 × 300 + 3000 × 3750 + 500 × 15000 + 2 images × 0.04 USD.
    let want = 3_000_000 + 1_800_000 + 11_250_000 + 7_500_000 + 80_000_000;
    assert_eq!(event.cost_nanos(), want);
    let rows = [Settled {
        cost_nanos: event.cost_nanos(),
        event,
    }];
    write_settled(&app.state.db, "test-replica", &rows)
        .await
        .unwrap();

    let recs = wait_records(&app, &gw.user, 1).await;
    let r = &recs[0];
    assert_eq!(r["prompt_tokens"], 10_000, "{r}");
    assert_eq!(r["cached_tokens"], 6_000, "{r}");
    assert_eq!(r["cache_write_tokens"], 3_000, "{r}");
    assert_eq!(r["completion_tokens"], 500, "{r}");
    assert_eq!(r["reasoning_tokens"], 200, "{r}");
    assert_eq!(r["response_id"], "resp_0123456789abcdef", "{r}");
    assert_eq!(r["conversation_id"], "conv_0123456789abcdef", "{r}");
    assert_eq!(nanos(&r["cost_usd"]), want, "{r}");
    let (s, b) = app
        .get("/api/admin/usage/records?per_page=10", Some(&gw.admin))
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["data"][0]["cache_write_tokens"], 3_000, "{b}");
    assert_eq!(b["data"][0]["reasoning_tokens"], 200, "{b}");
    assert_eq!(b["data"][0]["user_id"], alice.as_str(), "{b}");
    let (s, rep) = app
        .get("/api/admin/usage?group_by=user", Some(&gw.admin))
        .await;
    assert_eq!(s, 200, "{rep}");
    assert_eq!(rep["totals"]["cache_write_tokens"], 3_000, "{rep}");
    assert_eq!(rep["totals"]["reasoning_tokens"], 200, "{rep}");
    assert_eq!(rep["data"][0]["cache_write_tokens"], 3_000, "{rep}");
    // Charged: the balance went below zero by exactly the cost (no grant, no reservation).
    let sum = settled_balance(&app, &alice, -want).await;
    assert_eq!(sum, -want);
}
