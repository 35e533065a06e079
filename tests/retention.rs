//! Usage retention: `tollgate usage prune --older-than` and the daily prune `serve` runs with
//! `usage.retention_days`.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration as StdDuration, Instant};

use chrono::{DateTime, Duration, Utc};
use common::{TestApp, TestDb, tollgate_command};
use entity::usage_records;
use sea_orm::{
    ColumnTrait, DatabaseConnection, EntityTrait, PaginatorTrait, QueryFilter, QuerySelect, Set,
};

async fn open(db: &TestDb) -> DatabaseConnection {
    let conn = tollgate::store::connect(&db.url, 2).await.unwrap();
    tollgate::store::migrate(&conn, &db.url).await.unwrap();
    conn
}

fn record(at: DateTime<Utc>, tag: &str) -> usage_records::ActiveModel {
    usage_records::ActiveModel {
        at: Set(at),
        user_id: Set("u1".into()),
        key_id: Set("k1".into()),
        model: Set(tag.to_owned()),
        provider: Set("p".into()),
        endpoint: Set("chat.completions".into()),
        stream: Set(false),
        status: Set(200),
        prompt_tokens: Set(1),
        completion_tokens: Set(1),
        cached_tokens: Set(0),
        cost_nanos: Set(1),
        latency_ms: Set(1),
        ttft_ms: Set(None),
        tokens_estimated: Set(false),
        request_id: Set("r".into()),
        shared_key: Set(false),
        error: Set(None),
        ..Default::default()
    }
}

/// Inserts `n` records tagged `tag` at `at` (in statements of 1,000 rows).
async fn seed(db: &DatabaseConnection, n: usize, at: DateTime<Utc>, tag: &str) {
    let mut left = n;
    while left > 0 {
        let take = left.min(1000);
        usage_records::Entity::insert_many((0..take).map(|_| record(at, tag)))
            .exec_without_returning(db)
            .await
            .unwrap();
        left -= take;
    }
}

async fn count(db: &DatabaseConnection, tag: &str) -> u64 {
    usage_records::Entity::find()
        .filter(usage_records::Column::Model.eq(tag))
        .count(db)
        .await
        .unwrap()
}

fn prune(dir: &std::path::Path, url: &str, age: &str) -> std::process::Output {
    tollgate_command(dir)
        .env("DATABASE_URL", url)
        .args(["usage", "prune", "--older-than", age])
        .output()
        .unwrap()
}

#[tokio::test]
async fn cli_prunes_old_records_in_batches_and_keeps_the_rest() {
    let db = TestDb::new().await;
    let conn = open(&db).await;
    let now = Utc::now();
    // More than two batches of 10,000.
    seed(&conn, 21_500, now - Duration::days(100), "ancient").await;
    seed(&conn, 7, now - Duration::days(91), "old").await;
    seed(&conn, 5, now - Duration::days(89), "recent").await;
    seed(&conn, 3, now - Duration::hours(30), "yesterday").await;
    seed(&conn, 2, now - Duration::hours(1), "fresh").await;
    let dir = tempfile::tempdir().unwrap();

    let out = prune(dir.path(), &db.url, "90d");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.starts_with("deleted 21507 usage records from before "),
        "{stdout}"
    );
    assert_eq!(count(&conn, "ancient").await, 0);
    assert_eq!(count(&conn, "old").await, 0);
    assert_eq!(count(&conn, "recent").await, 5);

    // Hours work too; running again finds nothing more of that age.
    let out = prune(dir.path(), &db.url, "24h");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("deleted 8 usage records"));
    let out = prune(dir.path(), &db.url, "24h");
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("deleted 0 usage records"));
    assert_eq!(count(&conn, "fresh").await, 2);

    // Ages that are not `<N>d` / `<N>h` are refused before anything is deleted.
    for bad in ["90", "0d", "-1d", "1w", "d", "9999999999999999999d", "٣d"] {
        let out = prune(dir.path(), &db.url, bad);
        assert!(!out.status.success(), "{bad} was accepted");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("--older-than"),
            "{bad}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(count(&conn, "fresh").await, 2);
}

#[tokio::test]
async fn a_batch_deletes_at_most_its_limit() {
    let db = TestDb::new().await;
    let conn = open(&db).await;
    let now = Utc::now();
    seed(&conn, 250, now - Duration::days(10), "old").await;
    seed(&conn, 4, now, "new").await;
    let cutoff = now - Duration::days(1);
    let store = tollgate::store::usage::prune_batch;
    assert_eq!(store(&conn, cutoff, 100).await.unwrap(), 100);
    assert_eq!(count(&conn, "old").await, 150);
    assert_eq!(store(&conn, cutoff, 100).await.unwrap(), 100);
    assert_eq!(store(&conn, cutoff, 100).await.unwrap(), 50);
    assert_eq!(store(&conn, cutoff, 100).await.unwrap(), 0);
    assert_eq!(count(&conn, "new").await, 4);
    let ids: Vec<i64> = usage_records::Entity::find()
        .select_only()
        .column(usage_records::Column::Id)
        .into_tuple()
        .all(&conn)
        .await
        .unwrap();
    assert_eq!(ids.len(), 4);
}

#[tokio::test]
async fn serve_prunes_past_the_retention_days_and_stops_cleanly() {
    let db = Arc::new(TestDb::new().await);
    let conn = open(&db).await;
    let now = Utc::now();
    seed(&conn, 12, now - Duration::days(40), "old").await;
    seed(&conn, 3, now - Duration::days(20), "kept").await;

    // Retention off (the default): nothing is deleted.
    assert!(tollgate::store::retention::start(conn.clone(), 0, 0).is_none());
    let app = TestApp::spawn_on(db.clone(), |_| {}).await;
    app.stop().await;
    assert_eq!(count(&conn, "old").await, 12);

    // 30 days: the old records go at start, the others stay.
    let app = TestApp::spawn_on(db.clone(), |c| c.usage.retention_days = 30).await;
    let deadline = Instant::now() + StdDuration::from_secs(15);
    while count(&conn, "old").await > 0 {
        assert!(
            Instant::now() < deadline,
            "old usage records were never pruned"
        );
        tokio::time::sleep(StdDuration::from_millis(25)).await;
    }
    assert_eq!(count(&conn, "kept").await, 3);
    // Shutdown stops the daily task (`stop` waits for `serve` to return).
    tokio::time::timeout(StdDuration::from_secs(30), app.stop())
        .await
        .expect("serve returned with the retention task running");
}
