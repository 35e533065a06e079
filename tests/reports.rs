//! Usage reports, balance, ledger and admin stats: grouped totals equal the records they sum,
//! users see only themselves, administrators see everyone.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, NaiveTime, Utc};
use common::accounts::{admin_token, user_token};
use common::gateway::{new_key, setup, wait_records};
use common::{TestApp, assert_error};
use entity::usage_records;
use sea_orm::{EntityTrait, Set};
use serde_json::{Value, json};

/// A usage record as the seed writes it.
#[derive(Debug, Clone)]
struct Seed {
    user: String,
    key: &'static str,
    model: &'static str,
    provider: &'static str,
    at: DateTime<Utc>,
    status: i32,
    prompt: i64,
    completion: i64,
    cached: i64,
    cost: i64,
    latency: i64,
}

impl Seed {
    fn model(&self) -> usage_records::ActiveModel {
        usage_records::ActiveModel {
            at: Set(self.at),
            user_id: Set(self.user.clone()),
            key_id: Set(self.key.to_owned()),
            model: Set(self.model.to_owned()),
            provider: Set(self.provider.to_owned()),
            endpoint: Set("chat.completions".into()),
            stream: Set(false),
            status: Set(self.status),
            prompt_tokens: Set(self.prompt),
            completion_tokens: Set(self.completion),
            cached_tokens: Set(self.cached),
            cost_nanos: Set(self.cost),
            latency_ms: Set(self.latency),
            ttft_ms: Set(None),
            tokens_estimated: Set(false),
            request_id: Set(uuid::Uuid::new_v4().to_string()),
            shared_key: Set(false),
            error: Set(None),
            ..Default::default()
        }
    }

    fn group(&self, by: &str) -> String {
        match by {
            "model" => self.model.to_owned(),
            "provider" => self.provider.to_owned(),
            "key" => self.key.to_owned(),
            "user" => self.user.clone(),
            "day" => self.at.format("%Y-%m-%d").to_string(),
            other => panic!("{other}"),
        }
    }
}

/// (requests, prompt, completion, cached, cost nanos, latency sum, errors)
type Sums = (i64, i64, i64, i64, i64, i64, i64);

fn sums<'a>(seeds: impl IntoIterator<Item = &'a Seed>) -> Sums {
    seeds.into_iter().fold((0, 0, 0, 0, 0, 0, 0), |a, s| {
        (
            a.0 + 1,
            a.1 + s.prompt,
            a.2 + s.completion,
            a.3 + s.cached,
            a.4 + s.cost,
            a.5 + s.latency,
            a.6 + i64::from(s.status >= 400),
        )
    })
}

fn nanos(v: &Value) -> i64 {
    (v.as_f64().unwrap_or_else(|| panic!("not a number: {v}")) * 1e9).round() as i64
}

/// Asserts that a report row (or the totals) carries exactly these sums.
#[track_caller]
fn assert_sums(row: &Value, want: Sums) {
    let got = (
        row["requests"].as_i64().unwrap(),
        row["prompt_tokens"].as_i64().unwrap(),
        row["completion_tokens"].as_i64().unwrap(),
        row["cached_tokens"].as_i64().unwrap(),
        nanos(&row["cost_usd"]),
        row["errors"].as_i64().unwrap(),
    );
    assert_eq!(
        got,
        (want.0, want.1, want.2, want.3, want.4, want.6),
        "{row}"
    );
    let avg = row["avg_latency_ms"].as_f64().unwrap();
    assert!(
        (avg - want.5 as f64 / want.0 as f64).abs() < 1e-6,
        "avg latency {avg} in {row}"
    );
}

/// Asserts `report` groups `seeds` by `by` exactly (every group, nothing else) with right totals.
#[track_caller]
fn assert_report(report: &Value, seeds: &[&Seed], by: &str) {
    let mut want: BTreeMap<String, Vec<&Seed>> = BTreeMap::new();
    for s in seeds {
        want.entry(s.group(by)).or_default().push(s);
    }
    let data = report["data"].as_array().unwrap();
    let got: Vec<&str> = data.iter().map(|r| r["group"].as_str().unwrap()).collect();
    let mut sorted = got.clone();
    sorted.sort_unstable();
    assert_eq!(
        sorted,
        want.keys().map(String::as_str).collect::<Vec<_>>(),
        "groups by {by}: {report}"
    );
    for row in data {
        assert_sums(
            row,
            sums(want[row["group"].as_str().unwrap()].iter().copied()),
        );
    }
    assert_sums(&report["totals"], sums(seeds.iter().copied()));
    // The totals are the sum of the groups.
    let group_requests: i64 = data.iter().map(|r| r["requests"].as_i64().unwrap()).sum();
    assert_eq!(
        group_requests,
        report["totals"]["requests"].as_i64().unwrap()
    );
}

async fn user_id(app: &TestApp, name: &str) -> String {
    tollgate::store::users::find_by_username(&app.state.db, name)
        .await
        .unwrap()
        .unwrap()
        .id
}

struct World {
    app: TestApp,
    admin: String,
    alice: String,
    bob: String,
    alice_id: String,
    bob_id: String,
    seeds: Vec<Seed>,
    /// Midnight UTC three days ago: records at 23:30 the day before it and 00:30 after it.
    midnight: DateTime<Utc>,
}

/// Two users with records over several models, providers, keys, days and statuses.
async fn world() -> World {
    let app = TestApp::spawn().await;
    let admin = admin_token(&app).await;
    let alice = user_token(&app, "alice").await;
    let bob = user_token(&app, "bob").await;
    let (alice_id, bob_id) = (user_id(&app, "alice").await, user_id(&app, "bob").await);
    let now = Utc::now();
    let midnight = (now.date_naive() - Duration::days(3))
        .and_time(NaiveTime::MIN)
        .and_utc();
    let seed = |user: &str,
                key,
                model,
                provider,
                at,
                status,
                prompt,
                completion,
                cached,
                cost,
                latency| Seed {
        user: user.to_owned(),
        key,
        model,
        provider,
        at,
        status,
        prompt,
        completion,
        cached,
        cost,
        latency,
    };
    let seeds = vec![
        seed(
            &alice_id,
            "ka1",
            "gpt-a",
            "openai",
            now - Duration::hours(1),
            200,
            100,
            50,
            10,
            1_234_567,
            120,
        ),
        seed(
            &alice_id,
            "ka1",
            "gpt-a",
            "openai",
            now - Duration::hours(2),
            500,
            40,
            0,
            0,
            0,
            30,
        ),
        seed(
            &alice_id,
            "ka2",
            "gpt-b",
            "openai",
            midnight - Duration::minutes(30),
            200,
            7,
            3,
            0,
            999,
            45,
        ),
        seed(
            &alice_id,
            "ka2",
            "claude",
            "anthropic",
            midnight + Duration::minutes(30),
            429,
            9,
            0,
            0,
            0,
            5,
        ),
        seed(
            &alice_id,
            "ka1",
            "claude",
            "anthropic",
            midnight + Duration::hours(5),
            200,
            1000,
            2000,
            500,
            42_000_000,
            3000,
        ),
        // Older than 30 days: counts in reports without bounds, not in the balance's 30 days.
        seed(
            &alice_id,
            "ka1",
            "gpt-a",
            "openai",
            now - Duration::days(45),
            200,
            11,
            22,
            0,
            5_000,
            77,
        ),
        seed(
            &bob_id,
            "kb1",
            "gpt-a",
            "openai",
            now - Duration::minutes(10),
            200,
            300,
            100,
            0,
            7_777_777,
            250,
        ),
        seed(
            &bob_id,
            "kb1",
            "mistral",
            "mistral",
            now - Duration::days(2),
            400,
            12,
            0,
            0,
            0,
            9,
        ),
    ];
    usage_records::Entity::insert_many(seeds.iter().map(Seed::model))
        .exec_without_returning(&app.state.db)
        .await
        .unwrap();
    World {
        app,
        admin,
        alice,
        bob,
        alice_id,
        bob_id,
        seeds,
        midnight,
    }
}

impl World {
    fn of(&self, user: &str) -> Vec<&Seed> {
        self.seeds.iter().filter(|s| s.user == user).collect()
    }
}

#[tokio::test]
async fn grouped_reports_sum_exactly_the_users_own_records() {
    let w = world().await;
    let alice = w.of(&w.alice_id);
    for by in ["model", "provider", "day", "key"] {
        let (s, b) = w
            .app
            .get(&format!("/api/me/usage?group_by={by}"), Some(&w.alice))
            .await;
        assert_eq!(s, 200, "{by}: {b}");
        assert_report(&b, &alice, by);
    }
    // The default is by model.
    let (_, default) = w.app.get("/api/me/usage", Some(&w.alice)).await;
    assert_report(&default, &alice, "model");
    // Days are UTC calendar days, in order: 23:30 and 00:30 fall on two days.
    let (_, days) = w
        .app
        .get("/api/me/usage?group_by=day", Some(&w.alice))
        .await;
    let names: Vec<&str> = days["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["group"].as_str().unwrap())
        .collect();
    let mut sorted = names.clone();
    sorted.sort_unstable();
    assert_eq!(names, sorted, "days in date order");
    let before = (w.midnight - Duration::days(1))
        .format("%Y-%m-%d")
        .to_string();
    let after = w.midnight.format("%Y-%m-%d").to_string();
    assert!(
        names.contains(&before.as_str()) && names.contains(&after.as_str()),
        "{days}"
    );

    // The totals equal the sum of the record list.
    let (s, recs) = w
        .app
        .get("/api/me/usage/records?per_page=100", Some(&w.alice))
        .await;
    assert_eq!(s, 200);
    let recs = recs["data"].as_array().unwrap();
    assert_eq!(recs.len(), alice.len());
    let prompt: i64 = recs
        .iter()
        .map(|r| r["prompt_tokens"].as_i64().unwrap())
        .sum();
    let cost: i64 = recs.iter().map(|r| nanos(&r["cost_usd"])).sum();
    assert_eq!(default["totals"]["prompt_tokens"].as_i64(), Some(prompt));
    assert_eq!(nanos(&default["totals"]["cost_usd"]), cost);

    // Bob's models never show up in Alice's report, and the reverse.
    assert!(!default.to_string().contains("mistral"));
    let (_, bob) = w
        .app
        .get("/api/me/usage?group_by=model", Some(&w.bob))
        .await;
    assert_report(&bob, &w.of(&w.bob_id), "model");
}

#[tokio::test]
async fn time_bounds_and_filters_narrow_the_report() {
    let w = world().await;
    let from = w.midnight - Duration::hours(1);
    let to = w.midnight + Duration::hours(1);
    let url = format!(
        "/api/me/usage?group_by=provider&from={}&to={}",
        urlencode(&from.to_rfc3339()),
        urlencode(&to.to_rfc3339())
    );
    let (s, b) = w.app.get(&url, Some(&w.alice)).await;
    assert_eq!(s, 200, "{b}");
    let inside: Vec<&Seed> = w
        .of(&w.alice_id)
        .into_iter()
        .filter(|r| r.at >= from && r.at < to)
        .collect();
    assert_eq!(inside.len(), 2);
    assert_report(&b, &inside, "provider");
    // A bare date is midnight UTC; `model` and `key_id` filter too.
    let url = format!(
        "/api/me/usage?group_by=key&from={}&model=gpt-a",
        (Utc::now() - Duration::days(1)).format("%Y-%m-%d")
    );
    let (s, b) = w.app.get(&url, Some(&w.alice)).await;
    assert_eq!(s, 200, "{b}");
    let since = (Utc::now() - Duration::days(1))
        .date_naive()
        .and_time(NaiveTime::MIN)
        .and_utc();
    let want: Vec<&Seed> = w
        .of(&w.alice_id)
        .into_iter()
        .filter(|r| r.model == "gpt-a" && r.at >= since)
        .collect();
    assert_report(&b, &want, "key");
    // Nothing in range: empty data, zero totals.
    let (_, b) = w
        .app
        .get(
            "/api/me/usage?from=2001-01-01&to=2001-01-02",
            Some(&w.alice),
        )
        .await;
    assert_eq!(b["data"], json!([]));
    assert_eq!(b["totals"]["requests"], 0);
    assert_eq!(b["totals"]["avg_latency_ms"], 0.0);
}

fn urlencode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

#[tokio::test]
async fn bad_parameters_are_refused() {
    let w = world().await;
    for (url, param) in [
        ("/api/me/usage?group_by=color", "group_by"),
        // `user` is for administrators only.
        ("/api/me/usage?group_by=user", "group_by"),
        ("/api/me/usage?from=yesterday", "from"),
    ] {
        let (s, b) = w.app.get(url, Some(&w.alice)).await;
        assert_error(s, &b, 400, "invalid_value");
        assert_eq!(b["error"]["param"], param, "{url}: {b}");
    }
    // There is no `user_id` on the user's own routes.
    for url in [
        format!("/api/me/usage?user_id={}", w.bob_id),
        format!("/api/me/usage/records?user_id={}", w.bob_id),
    ] {
        let (s, b) = w.app.get(&url, Some(&w.alice)).await;
        assert_eq!(s, 400, "{url}: {b}");
        assert!(!b.to_string().contains("mistral"));
    }
    let (s, b) = w.app.get("/api/me/usage", None).await;
    assert_eq!(s, 401, "{b}");
}

#[tokio::test]
async fn admin_reports_cover_every_user_or_one() {
    let w = world().await;
    let all: Vec<&Seed> = w.seeds.iter().collect();
    for by in ["model", "provider", "day", "key", "user"] {
        let (s, b) = w
            .app
            .get(&format!("/api/admin/usage?group_by={by}"), Some(&w.admin))
            .await;
        assert_eq!(s, 200, "{by}: {b}");
        assert_report(&b, &all, by);
    }
    let (s, b) = w
        .app
        .get(
            &format!("/api/admin/usage?group_by=model&user_id={}", w.bob_id),
            Some(&w.admin),
        )
        .await;
    assert_eq!(s, 200);
    assert_report(&b, &w.of(&w.bob_id), "model");
    let (s, b) = w
        .app
        .get("/api/admin/usage?group_by=week", Some(&w.admin))
        .await;
    assert_error(s, &b, 400, "invalid_value");

    // Records: everyone's, each with its user; or one user's.
    let (s, b) = w
        .app
        .get("/api/admin/usage/records?per_page=100", Some(&w.admin))
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["total"], w.seeds.len());
    let users: std::collections::BTreeSet<&str> = b["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["user_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        users,
        [w.alice_id.as_str(), w.bob_id.as_str()]
            .into_iter()
            .collect()
    );
    let (_, b) = w
        .app
        .get(
            &format!("/api/admin/usage/records?user_id={}", w.alice_id),
            Some(&w.admin),
        )
        .await;
    assert_eq!(b["total"], w.of(&w.alice_id).len());
    assert!(
        b["data"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["user_id"] == w.alice_id.as_str() && r["model"].is_string())
    );
    // Newest first.
    let ats: Vec<&str> = b["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["at"].as_str().unwrap())
        .collect();
    let mut sorted = ats.clone();
    sorted.sort_unstable_by(|a, b| b.cmp(a));
    assert_eq!(ats, sorted);

    // Users get 403 on every admin report.
    for url in [
        "/api/admin/usage",
        "/api/admin/usage/records",
        "/api/admin/stats",
    ] {
        let (s, b) = w.app.get(url, Some(&w.alice)).await;
        assert_error(s, &b, 403, "forbidden");
    }
}

#[tokio::test]
async fn stats_count_users_active_keys_and_the_last_24_hours() {
    let w = world().await;
    new_key(&w.app, &w.alice, json!({"name": "on"})).await;
    let (_, off) = new_key(&w.app, &w.alice, json!({"name": "off"})).await;
    let (s, _) = w
        .app
        .post(
            &format!("/api/keys/{off}/toggle"),
            Some(&w.alice),
            json!({}),
        )
        .await;
    assert_eq!(s, 200);
    let past = (Utc::now() - Duration::hours(1)).to_rfc3339();
    let (s, b) = w
        .app
        .post(
            "/api/keys",
            Some(&w.bob),
            json!({"name": "expired", "expires_at": past}),
        )
        .await;
    // An already-expired expiry may be refused at creation; either way it is not active.
    assert!(s == 201 || s == 400, "{s} {b}");
    new_key(&w.app, &w.bob, json!({"name": "bob"})).await;

    let (s, b) = w.app.get("/api/admin/stats", Some(&w.admin)).await;
    assert_eq!(s, 200, "{b}");
    let day = Utc::now() - Duration::hours(24);
    let recent = sums(w.seeds.iter().filter(|r| r.at >= day));
    assert_eq!(recent.0, 3, "three seeded records in the last 24 h");
    assert_eq!(b["users"], 3, "admin, alice, bob: {b}");
    assert_eq!(b["active_keys"], 2, "{b}");
    assert_eq!(b["requests_24h"], recent.0);
    assert_eq!(b["tokens_24h"], recent.1 + recent.2);
    assert_eq!(nanos(&b["cost_usd_24h"]), recent.4);
}

#[tokio::test]
async fn balance_shows_30_days_of_spend_by_provider() {
    let w = world().await;
    let (s, b) = w
        .app
        .post(
            &format!("/api/admin/users/{}/balance", w.alice_id),
            Some(&w.admin),
            json!({"amount_usd": 12.5, "note": "credit"}),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    let (s, b) = w.app.get("/api/me/balance", Some(&w.alice)).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["balance_usd"], 12.5);
    let month = Utc::now() - Duration::days(30);
    let recent: Vec<&Seed> = w
        .of(&w.alice_id)
        .into_iter()
        .filter(|r| r.at >= month)
        .collect();
    assert_eq!(nanos(&b["spent_usd_30d"]), sums(recent.iter().copied()).4);
    let mut by: BTreeMap<&str, i64> = BTreeMap::new();
    for r in &recent {
        *by.entry(r.provider).or_default() += r.cost;
    }
    let got: BTreeMap<&str, i64> = b["by_provider"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["provider"].as_str().unwrap(), nanos(&p["cost_usd"])))
        .collect();
    assert_eq!(got, by, "{b}");
    // Highest first.
    let costs: Vec<i64> = b["by_provider"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| nanos(&p["cost_usd"]))
        .collect();
    assert!(costs.windows(2).all(|c| c[0] >= c[1]), "{b}");
    // Bob spent nothing of Alice's.
    let (_, bob) = w.app.get("/api/me/balance", Some(&w.bob)).await;
    assert_eq!(bob["balance_usd"], 0.0);
    assert!(!bob.to_string().contains("anthropic"));
}

#[tokio::test]
async fn metered_traffic_lands_in_the_report_and_the_ledger() {
    let app = TestApp::spawn_with(|c| c.billing.enforce_balance = true).await;
    let gw = setup(&app).await;
    let alice = user_id(&app, "alice").await;
    for amount in [2.0, -0.25, 1.0] {
        let (s, b) = app
            .post(
                &format!("/api/admin/users/{alice}/balance"),
                Some(&gw.admin),
                json!({"amount_usd": amount, "note": "t"}),
            )
            .await;
        assert_eq!(s, 200, "{b}");
    }
    for (i, model) in ["gpt-test", "gpt-cached", "gpt-test", "gpt-400"]
        .iter()
        .enumerate()
    {
        let r = app
            .client
            .post(app.url("/v1/chat/completions"))
            .bearer_auth(&gw.key)
            .json(&json!({"model": model, "stream": i == 2, "max_tokens": 10, "messages": []}))
            .send()
            .await
            .unwrap();
        r.text().await.unwrap();
    }
    let recs = wait_records(&app, &gw.user, 4).await;
    let (s, report) = app
        .get("/api/me/usage?group_by=model", Some(&gw.user))
        .await;
    assert_eq!(s, 200);
    let data = report["data"].as_array().unwrap();
    assert_eq!(data.len(), 3, "{report}");
    for row in data {
        let mine: Vec<&Value> = recs.iter().filter(|r| r["model"] == row["group"]).collect();
        assert_eq!(row["requests"].as_u64().unwrap() as usize, mine.len());
        let prompt: i64 = mine
            .iter()
            .map(|r| r["prompt_tokens"].as_i64().unwrap())
            .sum();
        assert_eq!(row["prompt_tokens"].as_i64(), Some(prompt));
        let errors = mine
            .iter()
            .filter(|r| r["status"].as_i64().unwrap() >= 400)
            .count();
        assert_eq!(row["errors"].as_u64().unwrap() as usize, errors);
    }
    assert_eq!(report["totals"]["errors"], 1);

    // The ledger sums to the balance once every record is settled.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (_, bal) = app.get("/api/me/balance", Some(&gw.user)).await;
        let (s, tx) = app
            .get("/api/me/balance/transactions?per_page=100", Some(&gw.user))
            .await;
        assert_eq!(s, 200, "{tx}");
        let entries = tx["data"].as_array().unwrap();
        let sum: i64 = entries.iter().map(|e| nanos(&e["amount_usd"])).sum();
        let charged: i64 = recs.iter().map(|r| nanos(&r["cost_usd"])).sum();
        if nanos(&bal["balance_usd"]) == 2_750_000_000 - charged {
            assert_eq!(sum, nanos(&bal["balance_usd"]), "{tx}");
            assert_eq!(tx["total"].as_u64().unwrap() as usize, entries.len());
            // Newest first: the first entry's balance_after is the balance.
            assert_eq!(nanos(&entries[0]["balance_after_usd"]), sum);
            let kinds: std::collections::BTreeSet<&str> = entries
                .iter()
                .map(|e| e["kind"].as_str().unwrap())
                .collect();
            assert!(
                kinds.contains("adjustment") && kinds.contains("usage"),
                "{tx}"
            );
            for e in entries {
                assert!(e["at"].as_str().unwrap().ends_with('Z'), "{e}");
            }
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{bal} {tx}");
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    // Another user's ledger is empty.
    let (_, bob_tx) = app
        .get(
            "/api/me/balance/transactions",
            Some(&user_token(&app, "bob").await),
        )
        .await;
    assert_eq!(bob_tx["total"], 0, "{bob_tx}");
}
