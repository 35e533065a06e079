//! Several replicas on one database (and one Redis): shared rate limits, cache invalidations that
//! reach every replica, usage metered exactly once, concurrent start-up, a replica killed
//! mid-load, and Redis outages.
//!
//! Redis tests need `TOLLGATE_TEST_REDIS_URL` (e.g. `redis://127.0.0.1:6379`) and print why they
//! skip without it; each uses its own key prefix, so they run in parallel on one Redis. The
//! database is the harness's (`TOLLGATE_TEST_DATABASE_URL`, else SQLite); the LISTEN/NOTIFY test
//! needs it to be PostgreSQL.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::gateway::{Gateway, new_key, setup, wait_records};
use common::{TEST_DB_ENV, TEST_MASTER_KEY, TestApp, TestDb, test_config, tollgate_command};
use sea_orm::{ConnectionTrait, Statement};
use secrecy::SecretString;
use serde_json::{Value, json};
use tollgate::app::App;
use tollgate::cluster::limits::{SharedLimits, Verdict};
use tollgate::cluster::redis::RedisLink;
use tollgate::config::Config;
use tollgate::telemetry::Metrics;

const REDIS_ENV: &str = "TOLLGATE_TEST_REDIS_URL";
/// How soon a management write must reach every replica.
const PROPAGATION: Duration = Duration::from_secs(1);

/// The test Redis, or `None` after saying why the test does not run.
fn redis_url(test: &str) -> Option<String> {
    match std::env::var(REDIS_ENV) {
        Ok(u) if !u.trim().is_empty() => Some(u.trim().to_owned()),
        _ => {
            eprintln!("{test}: skipped: set {REDIS_ENV}=redis://127.0.0.1:6379 to run it");
            None
        }
    }
}

/// A key prefix no other test uses.
fn fresh_prefix() -> String {
    format!("tgtest:{}:", uuid::Uuid::new_v4().simple())
}

fn with_redis(url: &str, prefix: &str) -> impl FnOnce(&mut Config) {
    let (url, prefix) = (url.to_owned(), prefix.to_owned());
    move |c: &mut Config| {
        c.redis.url = Some(SecretString::from(url));
        c.redis.key_prefix = prefix;
    }
}

/// Two replicas on one database sharing Redis at `url`, and the gateway set up through the first.
async fn two_replicas(url: &str) -> (TestApp, TestApp, Gateway) {
    let prefix = fresh_prefix();
    let a = TestApp::spawn_with(with_redis(url, &prefix)).await;
    let b = TestApp::spawn_on(a.db.clone(), with_redis(url, &prefix)).await;
    let gw = setup(&a).await;
    wait_listening(&[&a, &b]).await;
    (a, b, gw)
}

/// Polls until every app hears the others' invalidations.
async fn wait_listening(apps: &[&TestApp]) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !apps.iter().all(|a| a.state.cluster.is_listening()) {
        assert!(
            Instant::now() < deadline,
            "the invalidation listeners never subscribed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn chat(app: &TestApp, key: &str) -> reqwest::Response {
    chat_at(&app.client, &app.url("/v1/chat/completions"), key).await
}

async fn chat_at(client: &reqwest::Client, url: &str, key: &str) -> reqwest::Response {
    client
        .post(url)
        .bearer_auth(key)
        .json(&json!({"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .expect("send")
}

/// Sends until `key` gets `want` from `app`, failing after `within`.
async fn wait_status(app: &TestApp, key: &str, want: u16, within: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let status = chat(app, key).await.status().as_u16();
        if status == want {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "still {status} after {:?}, want {want}",
            start.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The value of one sample line of `/metrics`, 0 when absent.
async fn metric(app: &TestApp, sample: &str) -> f64 {
    let text = app
        .client
        .get(app.url("/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics body");
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Every usage record of the signed-in user, by request id → count.
async fn records_by_request_id(
    app: &TestApp,
    token: &str,
) -> std::collections::HashMap<String, usize> {
    let mut seen = std::collections::HashMap::new();
    for page in 1.. {
        let (s, b) = app
            .get(
                &format!("/api/me/usage/records?per_page=100&page={page}"),
                Some(token),
            )
            .await;
        assert_eq!(s, 200, "{b}");
        let data = b["data"].as_array().expect("data");
        if data.is_empty() {
            break;
        }
        for r in data {
            let rid = r["request_id"].as_str().expect("request_id").to_owned();
            *seen.entry(rid).or_insert(0) += 1;
        }
    }
    seen
}

// ------------------------------------------------------------------------------------------------
// Without Redis: the database is all replicas share.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_replicas_start_at_once_on_a_fresh_database() {
    let db = TestDb::new().await;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let mut cfg = test_config(&db.url);
        cfg.database.max_connections = 4;
        cfg.providers = serde_json::from_value(json!([
            {"key": "one", "display_name": "One", "base_url": "https://one.example/v1"},
            {"key": "two", "display_name": "Two", "base_url": "https://two.example/v1"}
        ]))
        .expect("provider seeds");
        tasks.spawn(App::build(cfg));
    }
    let mut apps = Vec::new();
    while let Some(res) = tasks.join_next().await {
        apps.push(res.expect("task").expect("every replica starts"));
    }
    assert_eq!(apps.len(), 4);
    let db = &apps[0].state.db;
    let backend = db.get_database_backend();
    let count = |sql: &str| {
        let stmt = Statement::from_string(backend, sql.to_owned());
        async move {
            let row = db.query_one_raw(stmt).await.expect("query").expect("a row");
            row.try_get_by_index::<i64>(0).expect("count")
        }
    };
    use migration::MigratorTrait;
    let migrations = migration::Migrator::migrations().len() as i64;
    assert_eq!(
        count("SELECT COUNT(*) FROM seaql_migrations").await,
        migrations,
        "each migration applied exactly once"
    );
    assert_eq!(
        count("SELECT COUNT(*) FROM providers").await,
        2,
        "seeds created once"
    );
    for app in &apps {
        assert!(
            tollgate::store::providers::find(&app.state.db, "one")
                .await
                .expect("query")
                .is_some()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_writers_meter_every_request_once_and_lose_no_update() {
    let a = TestApp::spawn().await;
    let b = TestApp::spawn_on(a.db.clone(), |_| {}).await;
    let gw = setup(&a).await;
    const N: usize = 80;
    let mut tasks = Vec::new();
    for i in 0..N {
        let app = if i % 2 == 0 { &a } else { &b };
        let (client, url, key) = (
            app.client.clone(),
            app.url("/v1/chat/completions"),
            gw.key.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let r = client
                .post(url)
                .bearer_auth(key)
                .header("x-request-id", format!("two-writers-{i}"))
                .json(&json!({"model": "gpt-test", "stream": i % 4 < 2, "messages": []}))
                .send()
                .await
                .expect("send");
            assert_eq!(r.status(), 200);
            r.text().await.expect("body");
        }));
    }
    // Balance changes through both replicas at the same time.
    let (_, me) = a.get("/api/me", Some(&gw.user)).await;
    let user_id = me["id"].as_str().expect("user id").to_owned();
    let mut grants = Vec::new();
    for i in 0..20 {
        let app = if i % 2 == 0 { &a } else { &b };
        let (client, url, admin) = (
            app.client.clone(),
            app.url(&format!("/api/admin/users/{user_id}/balance")),
            gw.admin.clone(),
        );
        grants.push(tokio::spawn(async move {
            let r = client
                .post(url)
                .bearer_auth(admin)
                .json(&json!({"amount_usd": 0.01, "note": format!("grant {i}")}))
                .send()
                .await
                .expect("send");
            assert!(r.status().is_success(), "grant: {}", r.status());
        }));
    }
    for t in tasks.into_iter().chain(grants) {
        t.await.expect("task");
    }
    wait_records(&a, &gw.user, N).await;
    let seen = records_by_request_id(&b, &gw.user).await;
    assert_eq!(seen.len(), N, "one record per request: {seen:?}");
    for i in 0..N {
        assert_eq!(
            seen.get(&format!("two-writers-{i}")),
            Some(&1),
            "request {i} metered exactly once"
        );
    }
    // N × (11 × $1 + 7 × $2) / 1M = N × 25 µ$, with no increment lost between the two writers.
    let (_, key) = b
        .get(&format!("/api/keys/{}", gw.key_id), Some(&gw.user))
        .await;
    let spent = key["spent_usd"].as_f64().expect("spent_usd");
    assert!(
        (spent - N as f64 * 25e-6).abs() < 1e-12,
        "spent {spent}: {key}"
    );
    let (_, user) = a
        .get(&format!("/api/admin/users/{user_id}"), Some(&gw.admin))
        .await;
    let balance = user["balance_usd"].as_f64().expect("balance_usd");
    assert!(
        (balance - 0.20).abs() < 1e-12,
        "20 grants of $0.01 through two replicas: {user}"
    );
}

#[tokio::test]
async fn invalidations_travel_over_postgres_notify_without_redis() {
    let pg = std::env::var(TEST_DB_ENV)
        .ok()
        .filter(|u| u.starts_with("postgres"));
    if pg.is_none() {
        eprintln!(
            "invalidations_travel_over_postgres_notify_without_redis: skipped: set {TEST_DB_ENV}=postgres://… to run it"
        );
        return;
    }
    let a = TestApp::spawn().await;
    let b = TestApp::spawn_on(a.db.clone(), |_| {}).await;
    assert!(a.state.cluster.redis.is_none());
    assert_eq!(
        a.state.cluster.bus.as_ref().map(|b| b.kind()),
        Some("postgres")
    );
    let gw = setup(&a).await;
    wait_listening(&[&a, &b]).await;
    assert_eq!(chat(&b, &gw.key).await.status(), 200, "cached on b");
    let (s, body) = a
        .post(
            &format!("/api/keys/{}/toggle", gw.key_id),
            Some(&gw.user),
            json!({}),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    let took = wait_status(&b, &gw.key, 401, PROPAGATION).await;
    eprintln!("revocation reached the other replica in {took:?}");
}

/// A replica whose Redis never answers still serves, on limits of its own, and counts the errors.
#[tokio::test]
async fn redis_down_at_start_falls_back_to_per_replica_limits() {
    let closed: SocketAddr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let app = TestApp::spawn_with(with_redis(&format!("redis://{closed}"), &fresh_prefix())).await;
    let gw = setup(&app).await;
    let (key, _) = new_key(&app, &gw.user, json!({"name": "three", "rpm_limit": 3})).await;
    let start = Instant::now();
    for i in 0..3 {
        let r = chat(&app, &key).await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-ratelimit-limit-requests"], "3");
        assert_eq!(
            r.headers()["x-ratelimit-remaining-requests"],
            (2 - i).to_string().as_str()
        );
    }
    let r = chat(&app, &key).await;
    assert_eq!(r.status(), 429, "the replica's own bucket still limits");
    assert!(r.headers().contains_key("retry-after"));
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "a dead Redis must not slow every request: {:?}",
        start.elapsed()
    );
    assert!(
        app.state
            .cluster
            .redis
            .as_ref()
            .is_some_and(|l| l.is_down())
    );
    // The catalog writes of the setup tried to publish; failed calls are counted.
    let published = metric(&app, "tollgate_redis_errors_total{op=\"publish\"}").await;
    assert!(published >= 1.0, "failed publishes are counted");
    // Management writes still succeed (the publish fails, the write stands).
    let (s, b) = app
        .post(
            &format!("/api/keys/{}/toggle", gw.key_id),
            Some(&gw.user),
            json!({}),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(chat(&app, &gw.key).await.status(), 401);
    assert!(metric(&app, "tollgate_redis_errors_total{op=\"publish\"}").await > published);
    // While down, limited requests keep probing Redis (once a second), each probe counted.
    let (probe, _) = new_key(&app, &gw.user, json!({"name": "probe", "rpm_limit": 1000})).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(&app, "tollgate_redis_errors_total{op=\"rate_limit\"}").await < 1.0 {
        assert!(
            Instant::now() < deadline,
            "no rate-limit call ever probed Redis"
        );
        assert_eq!(chat(&app, &probe).await.status(), 200);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ------------------------------------------------------------------------------------------------
// With Redis.

#[tokio::test]
async fn gcra_script_counts_like_the_local_buckets() {
    let Some(url) = redis_url("gcra_script_counts_like_the_local_buckets") else {
        return;
    };
    let link = RedisLink::new(&url, &fresh_prefix(), Metrics::new()).expect("link");
    let limits = SharedLimits::new(link);
    for want in [2, 1, 0] {
        match limits.take("key_rpm", "k", 3, 1).await {
            Some(Verdict::Allowed { remaining, reset }) => {
                assert_eq!(remaining, want);
                // Full again after (3 - remaining) × 20 s.
                let full = Duration::from_secs(20 * u64::from(3 - want));
                assert!(
                    reset <= full && reset + Duration::from_secs(1) > full,
                    "{reset:?}"
                );
            }
            other => panic!("want allowed, got {other:?}"),
        }
    }
    match limits.take("key_rpm", "k", 3, 1).await {
        Some(Verdict::Refused { wait, full }) => {
            assert!(
                wait > Duration::from_secs(18) && wait <= Duration::from_secs(20),
                "{wait:?}"
            );
            // Full again once all three refilled: what the allowed request before said.
            assert!(
                full > Duration::from_secs(58) && full <= Duration::from_secs(60),
                "{full:?}"
            );
        }
        other => panic!("want refused, got {other:?}"),
    }
    // Another id, scope or limit is another bucket.
    assert!(matches!(
        limits.take("user_rpm", "k", 3, 1).await,
        Some(Verdict::Allowed { remaining: 2, .. })
    ));
    assert!(matches!(
        limits.take("key_rpm", "k", 4, 1).await,
        Some(Verdict::Allowed { remaining: 3, .. })
    ));
    // Tokens: several cells at once, clamped to the limit; a refusal takes nothing.
    assert!(matches!(
        limits.take("key_tpm", "k", 100, 60).await,
        Some(Verdict::Allowed { remaining: 40, .. })
    ));
    assert!(matches!(
        limits.take("key_tpm", "k", 100, 50).await,
        Some(Verdict::Refused { .. })
    ));
    assert!(matches!(
        limits.take("key_tpm", "k", 100, 40).await,
        Some(Verdict::Allowed { remaining: 0, .. })
    ));
    assert!(matches!(
        limits.take("key_tpm", "other", 100, 1000).await,
        Some(Verdict::Allowed { remaining: 0, .. })
    ));
}

#[tokio::test]
async fn rate_limit_is_shared_by_the_replicas() {
    let Some(url) = redis_url("rate_limit_is_shared_by_the_replicas") else {
        return;
    };
    let (a, b, gw) = two_replicas(&url).await;
    let (key, _) = new_key(&a, &gw.user, json!({"name": "ten", "rpm_limit": 10})).await;
    let start = Instant::now();
    let mut ok = 0;
    let mut refused = 0;
    for i in 0..30 {
        let app = if i % 2 == 0 { &a } else { &b };
        let r = chat(app, &key).await;
        assert_eq!(r.headers()["x-ratelimit-limit-requests"], "10");
        let remaining: u32 = r.headers()["x-ratelimit-remaining-requests"]
            .to_str()
            .expect("ascii")
            .parse()
            .expect("number");
        match r.status().as_u16() {
            200 => {
                ok += 1;
                if i < 10 {
                    // One bucket for both: the remaining count goes down across replicas.
                    assert!(remaining <= 9 - i as u32 + 1, "request {i}: {remaining}");
                }
            }
            429 => {
                refused += 1;
                assert_eq!(remaining, 0);
                assert!(r.headers().contains_key("retry-after"));
            }
            other => panic!("unexpected status {other}"),
        }
    }
    // One request refills every 6 s; a slow machine may have earned a few back.
    let refilled = (start.elapsed().as_secs() / 6) as usize;
    assert!(
        (10..=10 + refilled).contains(&ok),
        "{ok} successes across both replicas for a 10 RPM key (elapsed {:?})",
        start.elapsed()
    );
    assert_eq!(ok + refused, 30);
    assert_eq!(
        metric(&a, "tollgate_redis_errors_total{op=\"rate_limit\"}").await,
        0.0
    );
}

#[tokio::test]
async fn a_write_through_one_replica_reaches_the_other_within_a_second() {
    let Some(url) = redis_url("a_write_through_one_replica_reaches_the_other_within_a_second")
    else {
        return;
    };
    let (a, b, gw) = two_replicas(&url).await;
    // b caches the key, the catalog and the provider key.
    assert_eq!(chat(&b, &gw.key).await.status(), 200);
    let (s, body) = a
        .post(
            &format!("/api/keys/{}/toggle", gw.key_id),
            Some(&gw.user),
            json!({}),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["is_active"], false);
    let took = wait_status(&b, &gw.key, 401, PROPAGATION).await;
    eprintln!("revocation reached the other replica in {took:?}");

    // A catalog change made on b reaches a.
    let (key, _) = new_key(&a, &gw.user, json!({"name": "second"})).await;
    assert_eq!(chat(&a, &key).await.status(), 200);
    let (_, models) = b.get("/api/models", None).await;
    let id = models["data"]
        .as_array()
        .expect("models")
        .iter()
        .find(|m| m["name"] == "gpt-test")
        .expect("gpt-test")["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let (s, _) = b
        .post(
            &format!("/api/admin/models/{id}/toggle"),
            Some(&gw.admin),
            json!({}),
        )
        .await;
    assert_eq!(s, 200);
    wait_status(&a, &key, 404, PROPAGATION).await;
}

/// A TCP proxy in front of the test Redis that can cut every connection (and refuse new ones)
/// and come back on the same port: a Redis outage and its end, without touching the real Redis.
struct FlakyRedis {
    addr: SocketAddr,
    cut: Arc<AtomicBool>,
    conns: Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl FlakyRedis {
    async fn start(upstream: &str) -> Self {
        let target = url::Url::parse(upstream).expect("redis url");
        let target = format!(
            "{}:{}",
            target.host_str().expect("host"),
            target.port().unwrap_or(6379)
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let cut = Arc::new(AtomicBool::new(false));
        let conns = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (c, list) = (cut.clone(), conns.clone());
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if c.load(Ordering::SeqCst) {
                    continue; // dropped: the client sees the connection close at once
                }
                let target = target.clone();
                let task = tokio::spawn(async move {
                    if let Ok(mut out) = tokio::net::TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                    }
                });
                list.lock().expect("lock").push(task.abort_handle());
            }
        });
        Self {
            addr,
            cut,
            conns,
            accept,
        }
    }

    fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for c in self.conns.lock().expect("lock").drain(..) {
            c.abort();
        }
    }

    fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for FlakyRedis {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}

#[tokio::test]
async fn redis_outage_falls_back_and_recovers() {
    let Some(url) = redis_url("redis_outage_falls_back_and_recovers") else {
        return;
    };
    let flaky = FlakyRedis::start(&url).await;
    let (a, b, gw) = two_replicas(&flaky.url()).await;
    let user = gw.user.clone();
    let shared_limit = |name: &'static str| {
        let (a, user) = (&a, user.clone());
        async move {
            new_key(a, &user, json!({"name": name, "rpm_limit": 2}))
                .await
                .0
        }
    };

    // Shared: 2 per minute across both.
    let k1 = shared_limit("before").await;
    assert_eq!(chat(&a, &k1).await.status(), 200);
    assert_eq!(chat(&b, &k1).await.status(), 200);
    assert_eq!(chat(&a, &k1).await.status(), 429);

    // Redis goes away: every replica limits on its own, nothing fails.
    flaky.cut();
    let k2 = shared_limit("during").await;
    for app in [&a, &b] {
        assert_eq!(chat(app, &k2).await.status(), 200);
        assert_eq!(chat(app, &k2).await.status(), 200);
        let r = chat(app, &k2).await;
        assert_eq!(r.status(), 429, "the replica's own bucket");
        assert_eq!(r.headers()["x-ratelimit-remaining-requests"], "0");
    }
    for app in [&a, &b] {
        assert!(
            app.state
                .cluster
                .redis
                .as_ref()
                .is_some_and(|l| l.is_down())
        );
        let mut errors = 0.0;
        for op in ["rate_limit", "publish"] {
            errors += metric(app, &format!("tollgate_redis_errors_total{{op=\"{op}\"}}")).await;
        }
        assert!(errors >= 1.0, "the failed calls are counted");
    }

    // Redis returns: both replicas notice on their own and share again.
    flaky.restore();
    let probe = shared_limit("probe").await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        for app in [&a, &b] {
            // Any limited request probes Redis (at most once a second while it is down).
            let _ = chat(app, &probe).await;
        }
        let up = [&a, &b].iter().all(|app| {
            app.state
                .cluster
                .redis
                .as_ref()
                .is_some_and(|l| !l.is_down())
        });
        if up && a.state.cluster.is_listening() && b.state.cluster.is_listening() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the replicas never went back to Redis"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let k3 = shared_limit("after").await;
    assert_eq!(chat(&b, &k3).await.status(), 200);
    assert_eq!(chat(&a, &k3).await.status(), 200);
    assert_eq!(chat(&b, &k3).await.status(), 429, "shared again");
    // And invalidations flow again (the listeners re-subscribed).
    assert_eq!(chat(&b, &gw.key).await.status(), 200);
    let (s, _) = a
        .post(
            &format!("/api/keys/{}/toggle", gw.key_id),
            Some(&gw.user),
            json!({}),
        )
        .await;
    assert_eq!(s, 200);
    wait_status(&b, &gw.key, 401, PROPAGATION).await;
}

// ------------------------------------------------------------------------------------------------
// Real processes: one is killed with SIGKILL while a client keeps using the other.

/// A `tollgate serve` child process; SIGKILLed when dropped.
struct Replica {
    child: Child,
    base: String,
}

impl Replica {
    fn start(dir: &Path, name: &str, db_url: &str, redis: Option<(&str, &str)>) -> Self {
        let mut toml = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n\n[database]\nurl = {db}\nmax_connections = 8\n\n\
             [security]\nmaster_key = \"{TEST_MASTER_KEY}\"\njwt_secret = \"{jwt}\"\n\n\
             [usage]\nspool_dir = {spool}\n",
            db = toml_string(db_url),
            jwt = "t".repeat(48),
            // One usage spool per replica (a second process on a spool refuses to start).
            spool = toml_string(&dir.join(format!("{name}.spool")).to_string_lossy()),
        );
        if let Some((url, prefix)) = redis {
            toml.push_str(&format!(
                "\n[redis]\nurl = {}\nkey_prefix = {}\n",
                toml_string(url),
                toml_string(prefix)
            ));
        }
        let path = dir.join(format!("{name}.toml"));
        std::fs::write(&path, toml).expect("write config");
        let mut child = tollgate_command(dir)
            .arg("--config")
            .arg(&path)
            .arg("serve")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn tollgate serve");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            // Keep draining after the address is known so the child never blocks on its log.
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let Ok(v) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                if v["message"] == "tollgate listening"
                    && let (Some(tx), Some(addr)) = (tx.take(), v["addr"].as_str())
                {
                    let _ = tx.send(addr.to_owned());
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(90))
            .unwrap_or_else(|e| panic!("replica {name} did not start: {e}"));
        Self {
            child,
            base: format!("http://{addr}"),
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
    }
}

fn toml_string(s: &str) -> String {
    serde_json::to_string(s).expect("a JSON string is a TOML basic string")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_one_replica_mid_load_leaves_the_other_serving() {
    let redis = std::env::var(REDIS_ENV)
        .ok()
        .filter(|u| !u.trim().is_empty());
    let prefix = fresh_prefix();
    // The in-process app only sets the gateway up; the two replicas are real processes.
    let admin_app = TestApp::spawn().await;
    let gw = setup(&admin_app).await;
    let (key, _) = new_key(
        &admin_app,
        &gw.user,
        json!({"name": "load", "rpm_limit": 1_000_000}),
    )
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let redis = redis.as_deref().map(|u| (u, prefix.as_str()));
    let mut victim = Replica::start(dir.path(), "victim", &admin_app.db.url, redis);
    let survivor = Replica::start(dir.path(), "survivor", &admin_app.db.url, redis);

    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for worker in 0..4 {
        let (stop, served, key) = (stop.clone(), served.clone(), key.clone());
        let url = format!("{}/v1/chat/completions", survivor.base);
        clients.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            let (mut answered, mut failures) = (Vec::new(), Vec::new());
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                let rid = format!("survivor-{worker}-{n}");
                let r = client
                    .post(&url)
                    .bearer_auth(&key)
                    .header("x-request-id", &rid)
                    .json(&json!({"model": "gpt-test", "stream": (worker + n) % 2 == 0, "messages": []}))
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status().is_success() => match r.text().await {
                        Ok(_) => {
                            served.fetch_add(1, Ordering::SeqCst);
                            answered.push(rid);
                        }
                        Err(e) => failures.push(format!("{rid}: body: {e}")),
                    },
                    Ok(r) => failures.push(format!("{rid}: status {}", r.status())),
                    Err(e) => failures.push(format!("{rid}: send: {e}")),
                }
                n += 1;
            }
            (answered, failures)
        }));
    }
    // Load on the victim too, so it dies with requests in flight.
    let victim_served = Arc::new(AtomicUsize::new(0));
    let victim_load = {
        let (stop, key, ok) = (stop.clone(), key.clone(), victim_served.clone());
        let url = format!("{}/v1/chat/completions", victim.base);
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            while !stop.load(Ordering::SeqCst) {
                let r = client
                    .post(&url)
                    .bearer_auth(&key)
                    .json(&json!({"model": "gpt-test", "messages": []}))
                    .send()
                    .await;
                // Transport errors are expected once it is killed.
                if let Ok(r) = r
                    && r.status().is_success()
                    && r.text().await.is_ok()
                {
                    ok.fetch_add(1, Ordering::SeqCst);
                }
            }
        })
    };
    let wait_served = |counter: &Arc<AtomicUsize>, at_least: usize| {
        let counter = counter.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            while counter.load(Ordering::SeqCst) < at_least {
                assert!(Instant::now() < deadline, "a replica stalled");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    // Both replicas under load, then the victim dies.
    wait_served(&served, 40).await;
    wait_served(&victim_served, 20).await;
    victim.kill();
    let at_kill = served.load(Ordering::SeqCst);
    wait_served(&served, at_kill + 80).await;
    stop.store(true, Ordering::SeqCst);
    let (mut answered, mut failures) = (Vec::new(), Vec::new());
    for c in clients {
        let (a, f) = c.await.expect("client task");
        answered.extend(a);
        failures.extend(f);
    }
    victim_load.await.expect("victim load");
    assert!(
        failures.is_empty(),
        "the survivor answered non-2xx or failed: {failures:?}"
    );
    // Everything the survivor answered is metered once (the victim's last unflushed batch may be
    // lost with it: SIGKILL gives it no chance to flush).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let seen = records_by_request_id(&admin_app, &gw.user).await;
        let missing = answered
            .iter()
            .filter(|rid| !seen.contains_key(*rid))
            .count();
        if missing == 0 {
            for rid in &answered {
                assert_eq!(seen.get(rid), Some(&1), "{rid} metered once");
            }
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{missing} of the survivor's {} answered requests were never metered",
            answered.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(survivor);
}
