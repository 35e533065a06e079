//! The usage reports at scale: one million usage records in SQLite, and every report query the
//! API runs for a user (or a time window) is answered through an index, never a table scan.
//!
//! Always runs on its own SQLite file: the query plans checked are SQLite's.
#![allow(clippy::unwrap_used)]

use std::time::Instant;

use chrono::{Duration, Utc};
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, Statement};
use tollgate::store::usage::{self, GroupBy, UsageFilter};

const ROWS: i64 = 1_000_000;
const USERS: i64 = 200;

/// One million records over the last 90 days (in time order, as the writer produces them), 200 users, 400 keys, 7 models on 3 providers,
/// inserted by SQLite itself (a recursive CTE), in the format the app writes timestamps in.
async fn fill(db: &DatabaseConnection) {
    let now = Utc::now().timestamp();
    let span = 90 * 86_400;
    let sql = format!(
        "WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < {last})
         INSERT INTO usage_records (at, user_id, key_id, model, provider, endpoint, stream, status,
             prompt_tokens, completion_tokens, cached_tokens, cost_nanos, latency_ms, ttft_ms,
             tokens_estimated, request_id, shared_key, error)
         SELECT strftime('%Y-%m-%dT%H:%M:%S+00:00', {now} - {span} + i * {span} / {ROWS}, 'unixepoch'),
                'user' || (i % {USERS}), 'key' || (i % 400), 'model' || (i % 7),
                'provider' || (i % 3), 'chat.completions', i % 2, CASE WHEN i % 50 = 0 THEN 500 ELSE 200 END,
                i % 1000, i % 300, i % 17, (i % 1000) * 1000, i % 2000, NULL, 0, 'req' || i, 0, NULL
         FROM n",
        last = ROWS - 1
    );
    // A throwaway database: no journal while filling it, and the migration's indexes built
    // once afterwards (from their own stored SQL) instead of row by row.
    for pragma in [
        "PRAGMA journal_mode = OFF",
        "PRAGMA synchronous = OFF",
        "PRAGMA cache_size = -131072",
    ] {
        db.execute_unprepared(pragma).await.unwrap();
    }
    let indexes: Vec<(String, String)> = db
        .query_all_raw(Statement::from_string(
            DbBackend::Sqlite,
            "SELECT name, sql FROM sqlite_master
             WHERE type = 'index' AND tbl_name = 'usage_records' AND sql IS NOT NULL",
        ))
        .await
        .unwrap()
        .iter()
        .map(|r| {
            (
                r.try_get("", "name").unwrap(),
                r.try_get("", "sql").unwrap(),
            )
        })
        .collect();
    assert!(
        indexes.iter().any(|(n, _)| n == "idx_usage_user_at")
            && indexes.iter().any(|(n, _)| n == "idx_usage_at"),
        "{indexes:?}"
    );
    for (name, _) in &indexes {
        db.execute_unprepared(&format!("DROP INDEX \"{name}\""))
            .await
            .unwrap();
    }
    db.execute_unprepared(&sql).await.unwrap();
    for (_, create) in &indexes {
        db.execute_unprepared(create).await.unwrap();
    }
}

/// SQLite's plan for `stmt`, one detail line per step.
async fn plan(db: &DatabaseConnection, stmt: &Statement) -> String {
    let explain = Statement::from_sql_and_values(
        DbBackend::Sqlite,
        format!("EXPLAIN QUERY PLAN {}", stmt.sql),
        stmt.values.clone().map(|v| v.0).unwrap_or_default(),
    );
    db.query_all_raw(explain)
        .await
        .unwrap()
        .iter()
        .map(|r| r.try_get::<String>("", "detail").unwrap())
        .collect::<Vec<_>>()
        .join(" | ")
}

#[track_caller]
fn assert_indexed(what: &str, plan: &str, index: &str) {
    assert!(
        !plan.contains("SCAN usage_records"),
        "{what}: table scan: {plan}"
    );
    assert!(
        plan.contains(&format!("USING INDEX {index}"))
            || plan.contains(&format!("USING COVERING INDEX {index}")),
        "{what}: not through {index}: {plan}"
    );
}

#[tokio::test]
async fn reports_over_a_million_records_use_the_indexes() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("scale.db").display()
    );
    // One connection, so the fill's pragmas apply to every statement.
    let db = tollgate::store::connect(&url, 1).await.unwrap();
    tollgate::store::migrate(&db, &url).await.unwrap();
    let t = Instant::now();
    fill(&db).await;
    eprintln!("inserted {ROWS} usage records in {:?}", t.elapsed());

    let now = Utc::now();
    let user = UsageFilter {
        user_id: Some("user7".into()),
        ..Default::default()
    };
    let month = UsageFilter {
        from: Some(now - Duration::days(30)),
        to: Some(now),
        ..user.clone()
    };
    let day = UsageFilter {
        from: Some(now - Duration::hours(24)),
        ..Default::default()
    };
    let groups = [
        GroupBy::Model,
        GroupBy::Provider,
        GroupBy::Day,
        GroupBy::Key,
    ];
    // Without statistics (as a fresh deployment runs), then with them.
    for analyzed in [false, true] {
        if analyzed {
            db.execute_unprepared("ANALYZE").await.unwrap();
        }
        for f in [&user, &month] {
            for g in groups {
                let stmt = usage::report_statement(DbBackend::Sqlite, f, g);
                let p = plan(&db, &stmt).await;
                assert_indexed(
                    &format!("{g:?} (analyzed: {analyzed})"),
                    &p,
                    "idx_usage_user_at",
                );
            }
            let p = plan(&db, &usage::totals_statement(DbBackend::Sqlite, f)).await;
            assert_indexed("user totals", &p, "idx_usage_user_at");
        }
        // The admin's last 24 hours across users (`/api/admin/stats`).
        let p = plan(&db, &usage::totals_statement(DbBackend::Sqlite, &day)).await;
        assert_indexed("24 h totals", &p, "idx_usage_at");
        for g in [GroupBy::User, GroupBy::Key, GroupBy::Model] {
            let stmt = usage::report_statement(DbBackend::Sqlite, &day, g);
            assert_indexed(
                &format!("24 h by {g:?}"),
                &plan(&db, &stmt).await,
                "idx_usage_at",
            );
        }
    }

    // And they answer, correctly and quickly.
    let t = Instant::now();
    let totals = usage::totals(&db, &user).await.unwrap();
    assert_eq!(totals.requests, ROWS / USERS);
    let by_model = usage::report(&db, &month, GroupBy::Model).await.unwrap();
    let month_totals = usage::totals(&db, &month).await.unwrap();
    assert_eq!(
        by_model.iter().map(|g| g.requests).sum::<i64>(),
        month_totals.requests
    );
    assert_eq!(
        by_model.iter().map(|g| g.cost_nanos).sum::<i64>(),
        month_totals.cost_nanos
    );
    let by_day = usage::report(&db, &month, GroupBy::Day).await.unwrap();
    assert!((30..=31).contains(&by_day.len()), "{} days", by_day.len());
    let stats = usage::totals(&db, &day).await.unwrap();
    assert!(stats.requests > 0);
    eprintln!("report queries answered in {:?}", t.elapsed());
}
