//! State and chat benchmarks (issues 19 and 22; benches/README.md, "State and chat benchmarks").
//!
//! `cargo bench --bench state [-- --only history|search|ws]`, each part on its own data:
//!
//! - **history**: continuing a 50-turn conversation. One user holds 100,000 items (1,000
//!   conversations of 100 items, user and assistant messages alternating); ≥ 200 reads of a random
//!   one of them through `conversations::history_for` (what `POST /v1/responses` with a
//!   `conversation` calls; `/api/chat` reads the same rows through the same store query), and
//!   the store query alone (`store::conversations::list_items`). p50/p99, and the `EXPLAIN` of the
//!   exact statements (built by the store's own query functions), checked to be index reads.
//! - **search**: 1,000,000 chat messages across 1,000 users (sentences from a word list with a
//!   Zipf-like frequency, seeded), loaded with multi-row `INSERT`s in transactions, the full-text
//!   index kept the production way (SQLite: the FTS5 triggers fire on each insert; PostgreSQL: the
//!   GIN expression index is maintained by the insert). Then one-word queries for one user at a
//!   time through `conversations::library::search` (the function behind
//!   `GET /api/conversations/search`: count, one page of 20, snippets), for a rare, an uncommon and
//!   a common word: p50/p99, with the `EXPLAIN` of both statements.
//! - **ws**: 1,000 WebSocket connections to `/api/ws` of the real `tollgate` binary (this build's,
//!   or `STATE_BENCH_BIN`), each authenticated by its first message with an access token (several
//!   users: `chat.ws_max_sockets_per_user` caps each), then idle for `STATE_BENCH_WS_SECS`
//!   (default 65 s: every socket answers the server's 30 s pings at least twice); the gateway's RSS
//!   before and after gives the RSS per connection.
//!
//! Both database parts run on SQLite (a temporary file) and, when `STATE_BENCH_PG_URL` is set, on
//! PostgreSQL, in a database of their own that is dropped and created anew (and dropped at the end
//! unless `STATE_BENCH_KEEP=1`). `STATE_BENCH_SCALE=0.01` shrinks every size for a quick run.
//! Results go to stdout and `benches/results/state.txt` (a run of one part replaces its section).
#![allow(clippy::unwrap_used)]

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail, ensure};
use chrono::Utc;
use entity::{conversation_items, conversations};
use futures_util::{SinkExt, StreamExt};
use sea_orm::ActiveValue::Set;
use sea_orm::{
    ConnectionTrait, DatabaseConnection, DbBackend, EntityTrait, QueryTrait, Statement,
    TransactionTrait,
};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tollgate::conversations::{ids, items, library};
use tollgate::store;
use tollgate::store::PageReq;
use tollgate::store::conversations::Order;

// ----------------------------------------------------------------------------------------------
// Sizes, output.

struct Sizes {
    scale: f64,
    /// Items of the history user (100 per conversation).
    history_items: usize,
    history_reads: usize,
    search_messages: usize,
    search_users: usize,
    search_queries: usize,
    ws_connections: usize,
    ws_hold: Duration,
}

fn env_num<T: std::str::FromStr>(name: &str) -> Option<T> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

impl Sizes {
    fn from_env() -> Self {
        let scale: f64 = env_num("STATE_BENCH_SCALE")
            .filter(|s: &f64| *s > 0.0)
            .unwrap_or(1.0);
        let n = |full: f64, min: usize| ((full * scale).round() as usize).max(min);
        Self {
            scale,
            history_items: n(100_000.0, 200) / 100 * 100,
            history_reads: env_num("STATE_BENCH_READS").unwrap_or(500).max(200),
            search_messages: n(1_000_000.0, 2_000),
            search_users: n(1_000.0, 2),
            search_queries: env_num("STATE_BENCH_QUERIES").unwrap_or(300).max(200),
            ws_connections: n(1_000.0, 10),
            ws_hold: Duration::from_secs(
                env_num("STATE_BENCH_WS_SECS").unwrap_or(if scale >= 1.0 { 65 } else { 5 }),
            ),
        }
    }
}

/// What a part prints, kept for the results file.
#[derive(Default)]
struct Out {
    text: String,
}

impl Out {
    fn line(&mut self, s: impl AsRef<str>) {
        println!("{}", s.as_ref());
        self.text.push_str(s.as_ref());
        self.text.push('\n');
    }
}

/// Nearest-rank percentile of sorted samples, in milliseconds.
fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1].as_secs_f64() * 1000.0
}

fn summary(mut v: Vec<Duration>) -> String {
    v.sort();
    format!(
        "p50 {:.3} ms  p99 {:.3} ms  (min {:.3}, max {:.3}, n = {})",
        pct(&v, 50.0),
        pct(&v, 99.0),
        pct(&v, 0.0),
        pct(&v, 100.0),
        v.len()
    )
}

/// A seeded generator (splitmix64): the same data on every run and database.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

// ----------------------------------------------------------------------------------------------
// Text.

/// Common English words, most frequent first; drawn with weight 1/rank.
const WORDS: &[&str] = &[
    "the",
    "to",
    "and",
    "a",
    "of",
    "is",
    "in",
    "you",
    "that",
    "it",
    "for",
    "this",
    "can",
    "with",
    "be",
    "on",
    "as",
    "your",
    "are",
    "if",
    "or",
    "we",
    "not",
    "have",
    "use",
    "will",
    "an",
    "from",
    "by",
    "function",
    "at",
    "data",
    "what",
    "value",
    "code",
    "how",
    "when",
    "which",
    "there",
    "one",
    "all",
    "each",
    "more",
    "example",
    "file",
    "should",
    "would",
    "also",
    "some",
    "these",
    "then",
    "time",
    "list",
    "make",
    "into",
    "new",
    "like",
    "just",
    "error",
    "need",
    "other",
    "first",
    "only",
    "could",
    "return",
    "string",
    "way",
    "set",
    "here",
    "using",
    "number",
    "because",
    "model",
    "user",
    "than",
    "test",
    "about",
    "type",
    "work",
    "change",
    "result",
    "want",
    "call",
    "line",
    "does",
    "system",
    "name",
    "run",
    "method",
    "question",
    "server",
    "class",
    "object",
    "write",
    "might",
    "check",
    "table",
    "query",
    "step",
    "input",
    "output",
    "after",
    "before",
    "request",
    "answer",
    "simple",
    "better",
    "loop",
    "variable",
    "array",
    "key",
    "case",
    "order",
    "version",
    "problem",
    "message",
    "index",
    "page",
    "field",
    "point",
    "process",
    "memory",
    "thread",
    "option",
    "default",
    "module",
    "package",
    "build",
    "network",
    "client",
    "response",
    "update",
    "delete",
    "insert",
    "search",
    "format",
    "parse",
    "date",
    "config",
    "path",
    "local",
    "remote",
    "branch",
    "commit",
    "merge",
    "review",
    "design",
    "pattern",
    "layer",
    "cache",
    "queue",
    "stream",
    "event",
    "handler",
    "route",
    "token",
    "limit",
    "price",
    "budget",
    "report",
    "chart",
    "summary",
    "recipe",
    "garden",
    "travel",
    "weather",
    "history",
    "music",
    "movie",
    "novel",
    "poem",
    "letter",
    "email",
    "meeting",
    "schedule",
    "holiday",
    "coffee",
    "bread",
    "river",
    "mountain",
    "forest",
    "ocean",
    "planet",
    "engine",
    "bicycle",
    "window",
    "kitchen",
    "doctor",
    "teacher",
    "student",
    "market",
    "language",
    "translate",
    "explain",
    "compare",
    "improve",
    "describe",
    "suggest",
    "consider",
    "although",
    "however",
    "therefore",
    "usually",
    "probably",
    "exactly",
    "quickly",
    "carefully",
];

/// The searched words: (word, share of messages it is put into, label). Not in [`WORDS`], so
/// their frequency is exactly what is set here; "common" is a word of the list.
const RARE: (&str, f64) = ("kangaroo", 0.001);
const UNCOMMON: (&str, f64) = ("telescope", 0.01);
const COMMON: &str = "function";

struct Text {
    cumulative: Vec<f64>,
}

impl Text {
    fn new() -> Self {
        let mut acc = 0.0;
        let cumulative = (0..WORDS.len())
            .map(|r| {
                acc += 1.0 / (r as f64 + 1.0);
                acc
            })
            .collect();
        Self { cumulative }
    }

    fn word(&self, rng: &mut Rng) -> &'static str {
        let total = *self.cumulative.last().unwrap();
        let x = rng.unit() * total;
        let i = self.cumulative.partition_point(|c| *c < x);
        WORDS[i.min(WORDS.len() - 1)]
    }

    /// A message of sentences, `min..max` words in all, with the searched words mixed in at
    /// their rates.
    fn message(&self, rng: &mut Rng, min: usize, max: usize) -> String {
        let n = min + rng.below(max - min);
        let mut out = String::with_capacity(n * 7);
        let mut sentence = 0;
        let mut inserts = Vec::new();
        for (w, p) in [RARE, UNCOMMON] {
            if rng.unit() < p {
                inserts.push((rng.below(n), w));
            }
        }
        for i in 0..n {
            let mut w = self.word(rng);
            if let Some((_, iw)) = inserts.iter().find(|(at, _)| *at == i) {
                w = iw;
            }
            if sentence == 0 {
                if !out.is_empty() {
                    out.push(' ');
                }
                let mut c = w.chars();
                if let Some(f) = c.next() {
                    out.extend(f.to_uppercase());
                    out.push_str(c.as_str());
                }
            } else {
                out.push(' ');
                out.push_str(w);
            }
            sentence += 1;
            if sentence >= 6 + rng.below(10) || i + 1 == n {
                out.push(if rng.below(6) == 0 { '?' } else { '.' });
                sentence = 0;
            } else if rng.below(12) == 0 {
                out.push(',');
            }
        }
        out
    }
}

/// A stored message row as the chat stores it: the normalized item, its id and indexed text.
fn item_row(
    conversation_id: &str,
    user_id: &str,
    position: i64,
    role: &str,
    text: String,
    now: chrono::DateTime<Utc>,
) -> anyhow::Result<conversation_items::ActiveModel> {
    let item = items::normalize(json!({"role": role, "content": text}), "message")
        .map_err(|e| anyhow!("normalize: {e:?}"))?;
    Ok(conversation_items::ActiveModel {
        conversation_id: Set(conversation_id.to_owned()),
        position: Set(position),
        item_id: Set(items::id_of(&item).to_owned()),
        user_id: Set(user_id.to_owned()),
        content_text: Set(items::indexed_text(&item)),
        item: Set(item.to_string()),
        response_id: Set(None),
        created_at: Set(now),
        model: Set((role == "assistant").then(|| "gpt-bench".to_owned())),
        tokens: Set((role == "assistant").then_some(120)),
        ..Default::default()
    })
}

fn conversation_row(
    id: &str,
    user_id: &str,
    items: i64,
    at: chrono::DateTime<Utc>,
) -> conversations::ActiveModel {
    conversations::ActiveModel {
        id: Set(id.to_owned()),
        user_id: Set(user_id.to_owned()),
        metadata: Set("{}".into()),
        title: Set(Some(format!("Conversation {id}"))),
        model: Set(Some("gpt-bench".into())),
        next_position: Set(items),
        created_at: Set(at),
        updated_at: Set(at),
        share_token_hash: Set(None),
    }
}

/// Rows per multi-row `INSERT` (10 columns: far inside SQLite's 32,766 and PostgreSQL's 65,535
/// bound parameters) and statements per transaction.
const ROWS_PER_INSERT: usize = 1_000;
const INSERTS_PER_TXN: usize = 10;

/// Inserts rows in multi-row `INSERT`s, [`INSERTS_PER_TXN`] per transaction.
struct Loader {
    items: Vec<conversation_items::ActiveModel>,
    convs: Vec<conversations::ActiveModel>,
    pending: Vec<(
        Vec<conversations::ActiveModel>,
        Vec<conversation_items::ActiveModel>,
    )>,
    rows: u64,
}

impl Loader {
    fn new() -> Self {
        Self {
            items: Vec::with_capacity(ROWS_PER_INSERT),
            convs: Vec::new(),
            pending: Vec::new(),
            rows: 0,
        }
    }

    async fn conversation(
        &mut self,
        db: &DatabaseConnection,
        c: conversations::ActiveModel,
    ) -> anyhow::Result<()> {
        self.convs.push(c);
        if self.convs.len() >= ROWS_PER_INSERT {
            self.cut();
            self.maybe_flush(db).await?;
        }
        Ok(())
    }

    async fn item(
        &mut self,
        db: &DatabaseConnection,
        it: conversation_items::ActiveModel,
    ) -> anyhow::Result<()> {
        self.items.push(it);
        if self.items.len() >= ROWS_PER_INSERT {
            self.cut();
            self.maybe_flush(db).await?;
        }
        Ok(())
    }

    fn cut(&mut self) {
        let convs = std::mem::take(&mut self.convs);
        let items = std::mem::replace(&mut self.items, Vec::with_capacity(ROWS_PER_INSERT));
        self.pending.push((convs, items));
    }

    async fn maybe_flush(&mut self, db: &DatabaseConnection) -> anyhow::Result<()> {
        if self.pending.len() >= INSERTS_PER_TXN {
            self.flush(db).await?;
        }
        Ok(())
    }

    async fn flush(&mut self, db: &DatabaseConnection) -> anyhow::Result<()> {
        let batches = std::mem::take(&mut self.pending);
        if batches.is_empty() {
            return Ok(());
        }
        let txn = db.begin().await?;
        for (convs, items) in batches {
            if !convs.is_empty() {
                conversations::Entity::insert_many(convs)
                    .exec_without_returning(&txn)
                    .await?;
            }
            if !items.is_empty() {
                self.rows += items.len() as u64;
                conversation_items::Entity::insert_many(items)
                    .exec_without_returning(&txn)
                    .await?;
            }
        }
        txn.commit().await?;
        Ok(())
    }

    async fn finish(mut self, db: &DatabaseConnection) -> anyhow::Result<u64> {
        self.cut();
        self.flush(db).await?;
        Ok(self.rows)
    }
}

// ----------------------------------------------------------------------------------------------
// Databases.

/// A database of the bench's own: a temporary SQLite file, or a PostgreSQL database created anew.
struct Db {
    name: &'static str,
    conn: DatabaseConnection,
    /// PostgreSQL: the server URL and the database to drop at the end.
    pg_drop: Option<(String, String)>,
    _tmp: Option<tempfile::TempDir>,
}

impl Db {
    async fn sqlite(part: &str) -> anyhow::Result<Self> {
        let tmp = tempfile::Builder::new()
            .prefix(&format!("tollgate-state-{part}-"))
            .tempdir()?;
        let url = format!(
            "sqlite://{}?mode=rwc",
            tmp.path().join("state.db").display()
        );
        let conn = store::connect(&url, 4).await?;
        store::migrate(&conn, &url).await?;
        Ok(Self {
            name: "SQLite",
            conn,
            pg_drop: None,
            _tmp: Some(tmp),
        })
    }

    async fn postgres(server_url: &str, part: &str) -> anyhow::Result<Self> {
        let mut url = url::Url::parse(server_url).context("STATE_BENCH_PG_URL")?;
        ensure!(
            matches!(
                url.host_str(),
                Some("127.0.0.1" | "localhost" | "::1" | "[::1]")
            ),
            "STATE_BENCH_PG_URL must be on loopback"
        );
        let dbname = format!("tollgate_state_bench_{part}");
        let admin = store::connect(server_url, 1).await?;
        admin
            .execute_unprepared(&format!("DROP DATABASE IF EXISTS {dbname} WITH (FORCE)"))
            .await?;
        admin
            .execute_unprepared(&format!("CREATE DATABASE {dbname}"))
            .await?;
        admin.close().await?;
        url.set_path(&format!("/{dbname}"));
        let conn = store::connect(url.as_str(), 4).await?;
        store::migrate(&conn, url.as_str()).await?;
        Ok(Self {
            name: "PostgreSQL",
            conn,
            pg_drop: Some((server_url.to_owned(), dbname)),
            _tmp: None,
        })
    }

    /// What the database's statistics would say after autovacuum's pass (PostgreSQL only; the
    /// GIN index's pending list is merged too). SQLite in production runs no `ANALYZE`.
    async fn settle(&self, out: &mut Out) -> anyhow::Result<()> {
        if self.conn.get_database_backend() == DbBackend::Postgres {
            let t = Instant::now();
            self.conn
                .execute_unprepared("VACUUM ANALYZE conversation_items")
                .await?;
            self.conn
                .execute_unprepared("VACUUM ANALYZE conversations")
                .await?;
            out.line(format!(
                "  VACUUM ANALYZE (what autovacuum does after a bulk load): {:.1} s",
                t.elapsed().as_secs_f64()
            ));
        }
        Ok(())
    }

    async fn size(&self) -> String {
        let sql = match self.conn.get_database_backend() {
            DbBackend::Postgres => "SELECT pg_database_size(current_database()) AS n",
            _ => "SELECT page_count * page_size AS n FROM pragma_page_count(), pragma_page_size()",
        };
        let n: Option<i64> = self
            .conn
            .query_one_raw(Statement::from_string(
                self.conn.get_database_backend(),
                sql,
            ))
            .await
            .ok()
            .flatten()
            .and_then(|r| r.try_get("", "n").ok());
        n.map(|n| format!("{:.0} MiB", n as f64 / 1_048_576.0))
            .unwrap_or_else(|| "?".into())
    }

    async fn close(self) -> anyhow::Result<()> {
        self.conn.close().await?;
        if let Some((server, dbname)) = self.pg_drop
            && std::env::var("STATE_BENCH_KEEP").ok().as_deref() != Some("1")
        {
            let admin = store::connect(&server, 1).await?;
            admin
                .execute_unprepared(&format!("DROP DATABASE IF EXISTS {dbname} WITH (FORCE)"))
                .await?;
            admin.close().await?;
        }
        Ok(())
    }
}

/// The plan of `stmt` (SQLite `EXPLAIN QUERY PLAN`, PostgreSQL `EXPLAIN`), one line per step.
async fn explain(db: &DatabaseConnection, stmt: &Statement) -> anyhow::Result<Vec<String>> {
    let backend = db.get_database_backend();
    let (prefix, col) = match backend {
        DbBackend::Postgres => ("EXPLAIN ", 0),
        _ => ("EXPLAIN QUERY PLAN ", 3),
    };
    let values = stmt.values.clone().map(|v| v.0).unwrap_or_default();
    let rows = db
        .query_all_raw(Statement::from_sql_and_values(
            backend,
            format!("{prefix}{}", stmt.sql),
            values,
        ))
        .await?;
    rows.iter()
        .map(|r| r.try_get_by_index::<String>(col).map_err(Into::into))
        .collect()
}

async fn print_plan(
    out: &mut Out,
    db: &DatabaseConnection,
    what: &str,
    stmt: &Statement,
) -> anyhow::Result<Vec<String>> {
    let plan = explain(db, stmt).await?;
    out.line(format!("  plan of {what}:"));
    out.line(format!("    sql: {}", stmt.sql));
    for l in &plan {
        out.line(format!("    | {l}"));
    }
    Ok(plan)
}

/// The plan reads through an index and scans no table whole.
fn indexed(plan: &[String]) -> bool {
    let text = plan.join("\n");
    let uses_index = text.contains("USING INDEX")
        || text.contains("USING COVERING INDEX")
        || text.contains("USING INTEGER PRIMARY KEY")
        || text.contains("USING PRIMARY KEY")
        || text.contains("Index Scan")
        || text.contains("Index Only Scan")
        || text.contains("Bitmap Index Scan")
        || text.contains("VIRTUAL TABLE INDEX");
    let full_scan = plan.iter().any(|l| {
        let l = l.trim_start_matches(|c: char| !c.is_alphabetic());
        (l.starts_with("SCAN ") && !l.contains("VIRTUAL TABLE") && !l.contains("INDEX"))
            || l.starts_with("Seq Scan")
    });
    uses_index && !full_scan
}

fn verdict(ok: bool) -> &'static str {
    if ok { "yes" } else { "NO" }
}

// ----------------------------------------------------------------------------------------------
// 1. History of a 50-turn conversation.

async fn history(db: &Db, sz: &Sizes, out: &mut Out) -> anyhow::Result<()> {
    let user = "user_history_bench";
    let n_conv = sz.history_items / 100;
    out.line(format!(
        "{}: one user, {} items in {} conversations of 100 items (50 turns)",
        db.name, sz.history_items, n_conv
    ));
    let text = Text::new();
    let mut rng = Rng(19);
    let start = Instant::now();
    let base = Utc::now() - chrono::Duration::days(30);
    let mut loader = Loader::new();
    let mut conv_ids = Vec::with_capacity(n_conv);
    for c in 0..n_conv {
        let id = ids::conversation_id();
        let at = base + chrono::Duration::seconds(c as i64 * 60);
        loader
            .conversation(&db.conn, conversation_row(&id, user, 100, at))
            .await?;
        for p in 0..100i64 {
            let (role, msg) = if p % 2 == 0 {
                ("user", text.message(&mut rng, 8, 40))
            } else {
                ("assistant", text.message(&mut rng, 30, 120))
            };
            loader
                .item(&db.conn, item_row(&id, user, p, role, msg, at)?)
                .await?;
        }
        conv_ids.push(id);
    }
    let rows = loader.finish(&db.conn).await?;
    out.line(format!(
        "  load: {rows} items in {:.1} s ({:.0} rows/s), database {}",
        start.elapsed().as_secs_f64(),
        rows as f64 / start.elapsed().as_secs_f64(),
        db.size().await
    ));
    db.settle(out).await?;

    // The statements the history read runs, built by the store's own query functions.
    let backend = db.conn.get_database_backend();
    let probe = &conv_ids[conv_ids.len() / 2];
    let get = store::conversations::get_query(user, probe).build(backend);
    let list = store::conversations::list_items_query(probe, None, 500, Order::Asc).build(backend);
    let get_plan = print_plan(
        out,
        &db.conn,
        "the conversation's row (store::conversations::get)",
        &get,
    )
    .await?;
    let list_plan = print_plan(
        out,
        &db.conn,
        "its items (store::conversations::list_items, one page of 500)",
        &list,
    )
    .await?;
    out.line(format!(
        "  index reads only: conversation row {}, items {}",
        verdict(indexed(&get_plan)),
        verdict(indexed(&list_plan))
    ));

    let mut full = Vec::with_capacity(sz.history_reads);
    let mut query = Vec::with_capacity(sz.history_reads);
    for i in 0..(sz.history_reads + 20) {
        let id = &conv_ids[rng.below(conv_ids.len())];
        let t = Instant::now();
        let h = tollgate::conversations::history_for(&db.conn, user, None, Some(id))
            .await
            .map_err(|e| anyhow!("history_for: {e:?}"))?;
        let d = t.elapsed();
        ensure!(
            h.len() == 100,
            "history of {id}: {} items, not 100",
            h.len()
        );
        let id = &conv_ids[rng.below(conv_ids.len())];
        let t = Instant::now();
        let rows = store::conversations::list_items(&db.conn, id, None, 500, Order::Asc).await?;
        let q = t.elapsed();
        ensure!(rows.len() == 100, "list_items of {id}: {} rows", rows.len());
        if i >= 20 {
            full.push(d);
            query.push(q);
        }
    }
    out.line(format!(
        "  history_for (conversation row + items + JSON): {}",
        summary(full)
    ));
    out.line(format!(
        "  list_items alone (100 rows):              {}",
        summary(query)
    ));
    Ok(())
}

// ----------------------------------------------------------------------------------------------
// 2. Search.

async fn search(db: &Db, sz: &Sizes, out: &mut Out) -> anyhow::Result<()> {
    let users: Vec<String> = (0..sz.search_users)
        .map(|u| format!("user_search_{u:05}"))
        .collect();
    let per_user = sz.search_messages / sz.search_users;
    let per_conv = 20;
    out.line(format!(
        "{}: {} messages, {} users × {} messages, {} per conversation",
        db.name,
        per_user * sz.search_users,
        sz.search_users,
        per_user,
        per_conv
    ));
    let text = Text::new();
    let mut rng = Rng(22);
    let start = Instant::now();
    let base = Utc::now() - chrono::Duration::days(90);
    let mut loader = Loader::new();
    let (mut n_rare, mut n_uncommon, mut n_common) = (0u64, 0u64, 0u64);
    // Users take turns, one conversation at a time, as a live system's would interleave.
    let convs_per_user = per_user.div_ceil(per_conv);
    for c in 0..convs_per_user {
        for user in &users {
            let id = ids::conversation_id();
            let at = base + chrono::Duration::seconds((c * users.len()) as i64);
            let n = per_conv.min(per_user - c * per_conv);
            loader
                .conversation(&db.conn, conversation_row(&id, user, n as i64, at))
                .await?;
            for p in 0..n {
                let (role, msg) = if p % 2 == 0 {
                    ("user", text.message(&mut rng, 6, 30))
                } else {
                    ("assistant", text.message(&mut rng, 20, 80))
                };
                let lower = msg.to_lowercase();
                let has = |w: &str| lower.split(|c: char| !c.is_alphanumeric()).any(|t| t == w);
                n_rare += u64::from(has(RARE.0));
                n_uncommon += u64::from(has(UNCOMMON.0));
                n_common += u64::from(has(COMMON));
                loader
                    .item(&db.conn, item_row(&id, user, p as i64, role, msg, at)?)
                    .await?;
            }
        }
    }
    let rows = loader.finish(&db.conn).await?;
    let load = start.elapsed().as_secs_f64();
    out.line(format!(
        "  load: {rows} messages in {load:.1} s ({:.0} rows/s; multi-row INSERTs of {ROWS_PER_INSERT}, {INSERTS_PER_TXN} per transaction, full-text index kept by the database on insert), database {}",
        rows as f64 / load,
        db.size().await
    ));
    db.settle(out).await?;

    let backend = db.conn.get_database_backend();
    let page = PageReq {
        page: 1,
        per_page: 20,
    };
    let (count, select) =
        store::conversations::search_items_statements(backend, &users[0], RARE.0, page)
            .context("no words")?;
    let c_plan = print_plan(out, &db.conn, "the match count (search_items)", &count).await?;
    let s_plan = print_plan(out, &db.conn, "one page of matches (search_items)", &select).await?;
    out.line(format!(
        "  full-text index used: count {}, page {}",
        verdict(indexed(&c_plan)),
        verdict(indexed(&s_plan))
    ));

    let total = rows as f64;
    for (word, n, label) in [
        (RARE.0, n_rare, "rare"),
        (UNCOMMON.0, n_uncommon, "uncommon"),
        (COMMON, n_common, "common"),
    ] {
        let mut times = Vec::with_capacity(sz.search_queries);
        let mut hits = 0u64;
        for i in 0..(sz.search_queries + 10) {
            let user = &users[rng.below(users.len())];
            let t = Instant::now();
            let res = library::search(&db.conn, user, word, page)
                .await
                .map_err(|e| anyhow!("search: {e:?}"))?;
            let d = t.elapsed();
            for it in &res.items {
                let snip = it["snippet"].as_str().unwrap_or_default().to_lowercase();
                ensure!(
                    snip.contains(word),
                    "a result's snippet lacks {word:?}: {snip}"
                );
            }
            if i >= 10 {
                hits += res.total;
                times.push(d);
            }
        }
        out.line(format!(
            "  search {label:>8} {word:?} (in {:.2}% of messages, {:.1} matches per user on average): {}",
            n as f64 / total * 100.0,
            hits as f64 / sz.search_queries as f64,
            summary(times)
        ));
    }
    Ok(())
}

// ----------------------------------------------------------------------------------------------
// 3. Idle WebSockets.

fn rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn listening_addr(line: &str) -> Option<std::net::SocketAddr> {
    if !line.contains("tollgate listening") {
        return None;
    }
    let v: Value = serde_json::from_str(line).ok()?;
    v.get("addr")
        .or_else(|| v.pointer("/fields/addr"))?
        .as_str()?
        .parse()
        .ok()
}

struct Gateway {
    child: Child,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Raises the soft open-files limit to what `need` descriptors take (the child inherits it).
fn raise_nofile(need: u64) -> anyhow::Result<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft >= need {
        return Ok(soft);
    }
    ensure!(
        hard >= need,
        "the open-files limit is {hard}; {need} are needed"
    );
    setrlimit(Resource::RLIMIT_NOFILE, need, hard)?;
    Ok(need)
}

/// Sockets opened and authenticated at most this many at a time.
const CONNECT_CONCURRENCY: usize = 64;

/// Idle chat sockets, each a task: connect, authenticate by the first message, then read (which
/// answers the server's pings with pongs) until told to stop.
struct Clients {
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
    authed: Arc<AtomicUsize>,
    pings: Arc<Vec<AtomicU64>>,
    gate: Arc<tokio::sync::Semaphore>,
    stop: tokio::sync::watch::Sender<bool>,
}

impl Clients {
    fn new(n: usize) -> Self {
        Self {
            tasks: Vec::with_capacity(n),
            authed: Arc::new(AtomicUsize::new(0)),
            pings: Arc::new((0..n).map(|_| AtomicU64::new(0)).collect()),
            gate: Arc::new(tokio::sync::Semaphore::new(CONNECT_CONCURRENCY)),
            stop: tokio::sync::watch::channel(false).0,
        }
    }

    fn spawn(&mut self, i: usize, url: &str, token: String) {
        let url = url.to_owned();
        let mut stop_rx = self.stop.subscribe();
        let authed = self.authed.clone();
        let pings = self.pings.clone();
        let gate = self.gate.clone();
        self.tasks.push(tokio::spawn(async move {
            let mut ws = {
                let _permit = gate.acquire().await?;
                let (mut ws, _) = tokio::time::timeout(
                    Duration::from_secs(30),
                    tokio_tungstenite::connect_async(&url),
                )
                .await
                .context("connect timed out")??;
                ws.send(Message::text(
                    json!({"type": "auth", "token": token}).to_string(),
                ))
                .await?;
                let first = tokio::time::timeout(Duration::from_secs(30), ws.next())
                    .await
                    .context("no answer to auth")?;
                match first {
                    Some(Ok(Message::Text(t))) if t.contains("\"authenticated\"") => {}
                    other => bail!("socket {i}: auth answered {other:?}"),
                }
                authed.fetch_add(1, Ordering::Relaxed);
                ws
            };
            loop {
                tokio::select! {
                    msg = ws.next() => match msg {
                        Some(Ok(Message::Ping(_))) => {
                            pings[i].fetch_add(1, Ordering::Relaxed);
                        }
                        Some(Ok(Message::Close(f))) => bail!("socket {i} closed by the server: {f:?}"),
                        Some(Ok(_)) => {}
                        Some(Err(e)) => bail!("socket {i}: {e}"),
                        None => bail!("socket {i} ended"),
                    },
                    _ = stop_rx.changed() => break,
                }
            }
            let _ = ws.close(None).await;
            anyhow::Ok(())
        }));
    }

    /// The error of a client that ended, if one did.
    async fn failed(&mut self) -> Option<String> {
        let t = self.tasks.iter_mut().find(|t| t.is_finished())?;
        Some(match t.await {
            Ok(Err(e)) => format!("{e:#}"),
            other => format!("{other:?}"),
        })
    }

    /// Waits (at most 180 s) until `n` sockets are authenticated.
    async fn wait_authed(&mut self, n: usize) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(180);
        while self.authed.load(Ordering::Relaxed) < n {
            if let Some(why) = self.failed().await {
                bail!("a socket failed: {why}");
            }
            if Instant::now() > deadline {
                bail!(
                    "only {} of {n} sockets authenticated within 180 s",
                    self.authed.load(Ordering::Relaxed)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// Closes every socket; how many clients ended with an error.
    async fn stop(self) -> usize {
        let _ = self.stop.send(true);
        let mut errors = 0;
        for t in self.tasks {
            if !matches!(t.await, Ok(Ok(()))) {
                errors += 1;
            }
        }
        errors
    }
}

async fn websockets(sz: &Sizes, out: &mut Out) -> anyhow::Result<()> {
    use tollgate::accounts::signup::{self, NewUser, Role};
    let n = sz.ws_connections;
    let nofile = raise_nofile(2 * n as u64 + 512)?;
    let cap = tollgate::config::Config::default()
        .chat
        .ws_max_sockets_per_user;
    let per_user = cap.clamp(1, 10);
    let n_users = n.div_ceil(per_user);
    let bin = match std::env::var_os("STATE_BENCH_BIN") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_BIN_EXE_tollgate")),
    };
    ensure!(bin.exists(), "no tollgate binary at {}", bin.display());
    out.line(format!(
        "{n} connections to /api/ws of {}, {n_users} users × ≤ {per_user} sockets (chat.ws_max_sockets_per_user = {cap}), open-files limit {nofile}",
        bin.display()
    ));

    let tmp = tempfile::Builder::new()
        .prefix("tollgate-state-ws-")
        .tempdir()?;
    let db_url = format!("sqlite://{}?mode=rwc", tmp.path().join("ws.db").display());
    let master_key = tollgate::crypto::generate_master_key();
    let jwt_secret = "s".repeat(48);
    let mut cfg = tollgate::config::Config::default();
    cfg.security.master_key = Some(secrecy::SecretString::from(master_key.clone()));
    cfg.security.jwt_secret = Some(secrecy::SecretString::from(jwt_secret.clone()));
    let ring = tollgate::crypto::KeyRing::new(&[tollgate::crypto::parse_master_key(&master_key)?])?;
    let jwt =
        tollgate::accounts::tokens::JwtKeys::new(&secrecy::SecretString::from(jwt_secret.clone()));
    let db = store::connect(&db_url, 2).await?;
    store::migrate(&db, &db_url).await?;
    let t = Instant::now();
    let expires = Utc::now() + chrono::Duration::hours(2);
    let mut tokens = Vec::with_capacity(n_users);
    for u in 0..n_users {
        let user = signup::create(
            &db,
            &ring,
            &cfg,
            NewUser {
                username: &format!("wsbench{u:04}"),
                password: "ws-bench-password-0123",
                email: None,
                role: Role::User,
                active: true,
            },
        )
        .await?
        .user;
        let session = store::sessions::create(&db, &user.id, expires, None, None).await?;
        tokens.push(jwt.issue(&user.id, &session.id, expires)?);
    }
    db.close().await?;
    out.line(format!(
        "  {n_users} users with a session each in {:.1} s",
        t.elapsed().as_secs_f64()
    ));

    let config_path = tmp.path().join("config.toml");
    std::fs::write(
        &config_path,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nlog_format = \"json\"\n\n[database]\nurl = \"{db_url}\"\n\n\
             [security]\nmaster_key = \"{master_key}\"\njwt_secret = \"{jwt_secret}\"\n"
        ),
    )?;
    let log_path = tmp.path().join("tollgate.log");
    let log = std::fs::File::create(&log_path)?;
    let mut cmd = Command::new(&bin);
    cmd.arg("--config")
        .arg(&config_path)
        .arg("serve")
        .current_dir(tmp.path())
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if name.starts_with("TOLLGATE_") || name == "DATABASE_URL" || name == "RUST_LOG" {
            cmd.env_remove(name.as_ref());
        }
    }
    let gw = Gateway {
        child: cmd
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?,
    };
    let pid = gw.child.id();
    let deadline = Instant::now() + Duration::from_secs(60);
    let addr = loop {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        if let Some(addr) = text.lines().find_map(listening_addr) {
            break addr;
        }
        if Instant::now() > deadline {
            bail!("tollgate did not log `tollgate listening` within 60 s:\n{text}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    // The gateway at rest after a first wave of sockets came and went: what the first ones set
    // up once (the database pool's connections, the hub, buffers the allocator keeps) is not a
    // per-connection cost.
    let url = format!("ws://{addr}/api/ws");
    let warm = n.min(CONNECT_CONCURRENCY);
    let mut warmup = Clients::new(warm);
    for i in 0..warm {
        warmup.spawn(i, &url, tokens[i / per_user].clone());
    }
    warmup.wait_authed(warm).await?;
    warmup.stop().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = rss_kb(pid).context("reading the gateway's RSS")?;

    // Then the measured sockets, in two halves: the second half's growth is the marginal cost.
    let mut clients = Clients::new(n);
    let half = n / 2;
    let t_connect = Instant::now();
    for i in 0..half {
        clients.spawn(i, &url, tokens[i / per_user].clone());
    }
    clients.wait_authed(half).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let at_half = rss_kb(pid).context("RSS")?;
    for i in half..n {
        clients.spawn(i, &url, tokens[i / per_user].clone());
    }
    clients.wait_authed(n).await?;
    let connect_secs = t_connect.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after_connect = rss_kb(pid).context("RSS")?;
    out.line(format!(
        "  {n} sockets connected and authenticated in {connect_secs:.1} s ({CONNECT_CONCURRENCY} at a time, after a warm-up wave of {warm}); holding them {} s",
        sz.ws_hold.as_secs()
    ));
    let hold_start = Instant::now();
    let mut peak = after_connect;
    let mut samples = Vec::new();
    while hold_start.elapsed() < sz.ws_hold {
        tokio::time::sleep(Duration::from_secs(5).min(sz.ws_hold)).await;
        let kb = rss_kb(pid).context("RSS")?;
        peak = peak.max(kb);
        samples.push(format!(
            "{}s {:.1}",
            hold_start.elapsed().as_secs(),
            kb as f64 / 1024.0
        ));
        if let Some(why) = clients.failed().await {
            bail!("a socket ended while idle: {why}");
        }
    }
    let after = rss_kb(pid).context("RSS")?;
    let still_open = clients.tasks.iter().filter(|t| !t.is_finished()).count();
    let min_pings = clients
        .pings
        .iter()
        .map(|p| p.load(Ordering::Relaxed))
        .min()
        .unwrap_or(0);
    let errors = clients.stop().await;
    let per = |kb: u64| (kb.saturating_sub(before)) as f64 / n as f64;
    out.line(format!("  RSS MiB during the hold: {}", samples.join(", ")));
    out.line(format!(
        "  gateway RSS: {:.1} MiB before, {:.1} MiB with {half} sockets, {:.1} MiB with {n}, {:.1} MiB after {} s idle (peak {:.1} MiB)",
        before as f64 / 1024.0,
        at_half as f64 / 1024.0,
        after_connect as f64 / 1024.0,
        after as f64 / 1024.0,
        sz.ws_hold.as_secs(),
        peak as f64 / 1024.0
    ));
    out.line(format!(
        "  still open at the end: {still_open} of {n}; server pings answered per socket: ≥ {min_pings}; clients ending with an error: {errors}"
    ));
    let marginal = after_connect.saturating_sub(at_half) as f64 / (n - half).max(1) as f64;
    let worst = per(peak).max(per(after)).max(marginal);
    out.line(format!(
        "  RSS per connection: {:.1} KiB ((after the hold − before) / {n}), {:.1} KiB at the peak, {marginal:.1} KiB marginal (second half) — goal < 64 KB: {}",
        per(after),
        per(peak),
        if worst * 1024.0 < 64_000.0 { "met" } else { "NOT met" }
    ));
    drop(gw);
    Ok(())
}

// ----------------------------------------------------------------------------------------------
// Driver.

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "?".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .map_or("?".into(), |kb| {
            format!("{:.0} GiB", kb as f64 / 1_048_576.0)
        });
    let load = std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    format!("{cpu}, {cores} CPUs, {mem}; load average at start {load}")
}

/// Replaces the `== part ==` sections this run produced in the results file, keeping the rest.
fn write_results(path: &Path, header: &str, parts: &[(&str, String)]) -> anyhow::Result<()> {
    let old = std::fs::read_to_string(path).unwrap_or_default();
    let mut sections: Vec<(String, String)> = Vec::new();
    let mut cur: Option<(String, String)> = None;
    for line in old.lines() {
        if let Some(name) = line.strip_prefix("== ").and_then(|l| l.strip_suffix(" ==")) {
            sections.extend(cur.take());
            cur = Some((name.to_owned(), String::new()));
        } else if let Some((_, body)) = &mut cur {
            body.push_str(line);
            body.push('\n');
        }
    }
    sections.extend(cur);
    for (name, body) in parts {
        let body = format!("{header}\n{body}");
        match sections.iter_mut().find(|(n, _)| n == name) {
            Some(s) => s.1 = body,
            None => sections.push(((*name).to_owned(), body)),
        }
    }
    let order = ["history", "search", "ws"];
    sections.sort_by_key(|(n, _)| order.iter().position(|o| o == n).unwrap_or(order.len()));
    let mut text = String::from(
        "# benches/state.rs results (cargo bench --bench state); each section from the run named in it.\n",
    );
    for (name, body) in sections {
        let _ = write!(text, "\n== {name} ==\n{body}");
    }
    std::fs::create_dir_all(path.parent().unwrap_or(Path::new(".")))?;
    std::fs::write(path, text)?;
    Ok(())
}

async fn run() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1).cloned());
    let parts: Vec<&str> = match only.as_deref() {
        None => vec!["history", "search", "ws"],
        Some(p @ ("history" | "search" | "ws")) => vec![p],
        Some(other) => bail!("--only takes history, search or ws, not {other:?}"),
    };
    let sz = Sizes::from_env();
    let pg = std::env::var("STATE_BENCH_PG_URL")
        .ok()
        .filter(|s| !s.is_empty());
    let header = format!(
        "run {} UTC, build {}, scale {}; {}",
        Utc::now().format("%Y-%m-%d %H:%M"),
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        sz.scale,
        machine()
    );
    println!("state bench: {header}");
    let mut results = Vec::new();
    for part in parts {
        let mut out = Out::default();
        println!("\n== {part} ==");
        match part {
            "history" | "search" => {
                let mut dbs = vec![Db::sqlite(part).await?];
                match &pg {
                    Some(url) => dbs.push(Db::postgres(url, part).await?),
                    None => out.line("PostgreSQL: skipped (set STATE_BENCH_PG_URL)"),
                }
                for db in dbs {
                    if part == "history" {
                        history(&db, &sz, &mut out).await?;
                    } else {
                        search(&db, &sz, &mut out).await?;
                    }
                    db.close().await?;
                }
            }
            _ => websockets(&sz, &mut out).await?,
        }
        results.push((part, out.text));
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/results/state.txt");
    write_results(&path, &header, &results)?;
    println!("\nwritten to {}", path.display());
    Ok(())
}

fn main() -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("state: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("state: {e:#}");
            ExitCode::FAILURE
        }
    }
}
