//! `kill -9` of the real binary with requests in flight and records queued: on restart every
//! request that reached the upstream has exactly one usage record (the spool's replay), a second
//! restart writes and debits nothing twice, and the killed replica's reservation leases are
//! reclaimed while a live replica's are not.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::accounts::user_token;
use common::gateway::{self, new_key};
use common::{TEST_MASTER_KEY, TestApp, TestDb, tollgate_command};
use entity::{gateway_keys, reservation_leases, usage_records, users};
use sea_orm::{ColumnTrait, Database, DatabaseConnection, EntityTrait, QueryFilter};
use serde_json::{Value, json};

/// Generous for a debug build on a busy machine; every wait polls a condition.
const TIMEOUT: Duration = Duration::from_secs(120);
const IN_FLIGHT: usize = 100;
const QUEUED: usize = 10;

fn shipped_config() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("config.toml")
}

/// `tollgate serve` on `db` with `spool`; returns the child and its address.
fn serve(cwd: &Path, db: &str, spool: &Path) -> (Child, String) {
    let mut child = tollgate_command(cwd)
        .arg("--config")
        .arg(shipped_config())
        .arg("serve")
        .env("TOLLGATE_SERVER__LISTEN", "127.0.0.1:0")
        .env("TOLLGATE_DATABASE__URL", db)
        .env("TOLLGATE_SECURITY__MASTER_KEY", TEST_MASTER_KEY)
        .env("TOLLGATE_SECURITY__JWT_SECRET", "t".repeat(48))
        .env("TOLLGATE_SECURITY__ALLOW_PRIVATE_BASE_URLS", "true")
        .env("TOLLGATE_BILLING__ENFORCE_BALANCE", "true")
        .env("TOLLGATE_BILLING__LEASE_TTL_SECS", "3")
        // Completed records wait in the writer for a minute: the kill finds them queued.
        .env("TOLLGATE_USAGE__FLUSH_INTERVAL_MS", "60000")
        .env("TOLLGATE_USAGE__SPOOL_DIR", spool)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tollgate serve");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let v = serde_json::from_str::<Value>(&line).unwrap_or(Value::Null);
            if !sent && v["message"] == "tollgate listening" {
                let _ = tx.send(v["addr"].as_str().unwrap_or_default().to_owned());
                sent = true;
            }
        }
    });
    let addr = rx
        .recv_timeout(TIMEOUT)
        .unwrap_or_else(|e| panic!("tollgate did not start: {e:?}; {:?}", child.try_wait()));
    (child, addr)
}

fn kill9(child: &mut Child) {
    child.kill().expect("SIGKILL");
    child.wait().expect("reap");
}

async fn until<F: std::future::Future<Output = bool>>(what: &str, mut f: impl FnMut() -> F) {
    let deadline = Instant::now() + TIMEOUT;
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn records(db: &DatabaseConnection) -> Vec<usage_records::Model> {
    usage_records::Entity::find()
        .all(db)
        .await
        .expect("records")
}

async fn reserved(db: &DatabaseConnection, user_id: &str, key_id: &str) -> (i64, i64) {
    let u = users::Entity::find_by_id(user_id.to_owned())
        .one(db)
        .await
        .expect("user")
        .expect("user exists");
    let k = gateway_keys::Entity::find_by_id(key_id.to_owned())
        .one(db)
        .await
        .expect("key")
        .expect("key exists");
    (u.reserved_nanos, k.reserved_nanos)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_loses_no_record_and_leaks_no_reservation() {
    let test_db = Arc::new(TestDb::new().await);
    let cwd = tempfile::tempdir().expect("cwd");
    let spool = cwd.path().join("spool");
    // Set up through an in-process app on the same database, then stop it.
    let app = TestApp::spawn_on(test_db.clone(), |c| {
        c.billing.initial_balance_usd = 1000.0;
    })
    .await;
    let gw = gateway::setup(&app).await;
    let user = user_token(&app, "alice").await;
    let (key, key_id) = new_key(&app, &user, json!({"name": "budget", "budget_usd": 500.0})).await;
    let (s, me) = app.get("/api/me", Some(&user)).await;
    assert_eq!(s, 200, "{me}");
    let user_id = me["id"].as_str().expect("user id").to_owned();
    app.stop().await;
    let db = Database::connect(&test_db.url).await.expect("connect");
    let balance_before = users::Entity::find_by_id(user_id.clone())
        .one(&db)
        .await
        .unwrap()
        .unwrap()
        .balance_nanos;

    let (mut first, addr) = serve(cwd.path(), &test_db.url, &spool);
    let client = reqwest::Client::new();
    let send = |model: &'static str, i: usize| {
        let (client, key, addr) = (client.clone(), key.clone(), addr.clone());
        tokio::spawn(async move {
            client
                .post(format!("http://{addr}/v1/chat/completions"))
                .bearer_auth(key)
                .header("x-request-id", format!("crash-{model}-{i}"))
                .json(&json!({"model": model, "messages": [{"role": "user", "content": "hi"}]}))
                .send()
                .await
                .map(|r| r.status().as_u16())
        })
    };
    // Completed requests whose records sit in the writer (flush interval: a minute).
    for i in 0..QUEUED {
        let status = send("gpt-test", i).await.expect("join").expect("send");
        assert_eq!(status, 200);
    }
    // Requests the upstream holds open.
    let hanging: Vec<_> = (0..IN_FLIGHT).map(|i| send("gpt-hang", i)).collect();
    let mock = &gw.mock;
    until("the upstream to hold every request", || async {
        mock.requests().len() >= QUEUED + IN_FLIGHT
    })
    .await;
    let (u, k) = reserved(&db, &user_id, &key_id).await;
    assert!(u > 0 && k > 0, "requests in flight reserve: {u} {k}");
    assert!(
        records(&db).await.is_empty(),
        "nothing written before the kill"
    );
    kill9(&mut first);
    for h in hanging {
        assert!(
            h.await.expect("join").is_err(),
            "the killed gateway answered"
        );
    }
    let (u, k) = reserved(&db, &user_id, &key_id).await;
    assert!(
        u > 0 && k > 0,
        "the dead replica's leases are still reserved"
    );

    // A live replica holding a lease of its own for the same user and key.
    let live = TestApp::spawn_on(test_db.clone(), |c| {
        c.billing.enforce_balance = true;
        c.billing.lease_ttl_secs = 3;
    })
    .await;
    let live_req = {
        let (client, key, url) = (
            client.clone(),
            key.clone(),
            live.url("/v1/chat/completions"),
        );
        tokio::spawn(async move {
            client
                .post(url)
                .bearer_auth(key)
                .json(
                    &json!({"model": "gpt-hang", "messages": [{"role": "user", "content": "hi"}]}),
                )
                .send()
                .await
                .map(|r| r.status().as_u16())
        })
    };
    until("the live replica's request upstream", || async {
        mock.requests().len() > QUEUED + IN_FLIGHT
    })
    .await;
    let live_replica = live.state.leases.replica().to_owned();

    // Restart: the spool is replayed before serving; the dead leases are reclaimed after the TTL.
    let (mut second, _) = serve(cwd.path(), &test_db.url, &spool);
    let recs = records(&db).await;
    assert_eq!(
        recs.len(),
        QUEUED + IN_FLIGHT,
        "one record per request upstream"
    );
    // Completed records still queued in memory are billed like the cut-off ones (README: the
    // exact guarantee): by body size, as `gateway_restarted`.
    for (model, n) in [("gpt-test", QUEUED), ("gpt-hang", IN_FLIGHT)] {
        for i in 0..n {
            let id = format!("crash-{model}-{i}");
            let mine: Vec<_> = recs.iter().filter(|r| r.request_id == id).collect();
            assert_eq!(mine.len(), 1, "{id}: exactly one record");
            assert_eq!(mine[0].status, 499, "{id}");
            assert_eq!(mine[0].error.as_deref(), Some("gateway_restarted"), "{id}");
            assert!(
                mine[0].tokens_estimated && mine[0].cost_nanos > 0,
                "{id} is billed"
            );
        }
    }
    let dead_gone = || async {
        let leases = reservation_leases::Entity::find().all(&db).await.unwrap();
        leases
            .iter()
            .all(|l| l.replica_id == live_replica || l.held_nanos == 0)
    };
    until("the dead replica's leases reclaimed", dead_gone).await;
    let leases = reservation_leases::Entity::find().all(&db).await.unwrap();
    let held = |holder: &str| -> i64 {
        leases
            .iter()
            .filter(|l| l.holder == holder)
            .map(|l| l.held_nanos)
            .sum()
    };
    assert!(
        held("user") > 0 && held("key") > 0,
        "the live replica's leases were not reclaimed: {leases:?}"
    );
    assert_eq!(
        reserved(&db, &user_id, &key_id).await,
        (held("user"), held("key")),
        "reserved is what live replicas hold: {leases:?}"
    );
    let spent: i64 = recs.iter().map(|r| r.cost_nanos).sum();
    let balance = || async {
        users::Entity::find_by_id(user_id.clone())
            .one(&db)
            .await
            .unwrap()
            .unwrap()
            .balance_nanos
    };
    assert_eq!(balance().await, balance_before - spent, "debited once");
    let key_spent = gateway_keys::Entity::find()
        .filter(gateway_keys::Column::Id.eq(&key_id))
        .one(&db)
        .await
        .unwrap()
        .unwrap()
        .spent_nanos;
    assert_eq!(key_spent, spent);

    // Killed again, restarted again: the spool holds nothing already written; nothing doubles.
    kill9(&mut second);
    let (mut third, _) = serve(cwd.path(), &test_db.url, &spool);
    assert_eq!(records(&db).await.len(), QUEUED + IN_FLIGHT);
    assert_eq!(balance().await, balance_before - spent);
    kill9(&mut third);
    live_req.abort();
    live.stop().await;
}
