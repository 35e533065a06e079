//! Shared test harness: the real app on 127.0.0.1:0 against a fresh database.
//!
//! The database comes from `TOLLGATE_TEST_DATABASE_URL` (a PostgreSQL or MySQL/MariaDB server URL;
//! each test gets its own freshly created database on it) or, when unset, a new SQLite file in a
//! temporary directory.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;

use sea_orm::{ConnectionTrait, Database};
use secrecy::SecretString;
use serde_json::{Value, json};
use tollgate::app::App;
use tollgate::config::Config;
use tollgate::state::AppState;

pub mod accounts;
pub mod gateway;
pub mod kinds;
pub mod media_mock;
pub mod mock;

pub const TEST_DB_ENV: &str = "TOLLGATE_TEST_DATABASE_URL";

/// A database for one test, dropped afterwards.
pub struct TestDb {
    pub url: String,
    admin_url: Option<String>,
    name: Option<String>,
    _dir: Option<tempfile::TempDir>,
}

impl TestDb {
    pub async fn new() -> Self {
        match std::env::var(TEST_DB_ENV) {
            Ok(base) if !base.trim().is_empty() => Self::on_server(base.trim()).await,
            _ => {
                let dir = tempfile::tempdir().expect("tempdir");
                let url = format!("sqlite://{}?mode=rwc", dir.path().join("t.db").display());
                Self {
                    url,
                    admin_url: None,
                    name: None,
                    _dir: Some(dir),
                }
            }
        }
    }

    async fn on_server(base: &str) -> Self {
        let name = format!("tg_{}", uuid::Uuid::new_v4().simple());
        let admin = Database::connect(base)
            .await
            .unwrap_or_else(|e| panic!("{TEST_DB_ENV}={base}: cannot connect: {e}"));
        admin
            .execute_unprepared(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create test database");
        admin.close().await.ok();
        let mut url = url::Url::parse(base).expect("database url");
        url.set_path(&format!("/{name}"));
        Self {
            url: url.to_string(),
            admin_url: Some(base.to_owned()),
            name: Some(name),
            _dir: None,
        }
    }

    /// A SQLite database in a file the caller owns (e.g. one the `tollgate` binary just created).
    pub fn sqlite_at(path: &std::path::Path) -> Self {
        Self {
            url: format!("sqlite://{}?mode=rwc", path.display()),
            admin_url: None,
            name: None,
            _dir: None,
        }
    }

    pub fn is_sqlite(&self) -> bool {
        self.url.starts_with("sqlite:")
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let (Some(admin), Some(name)) = (self.admin_url.clone(), self.name.clone()) else {
            return;
        };
        // Best effort, on its own runtime: Drop cannot await.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async move {
                let db = Database::connect(&admin).await.ok()?;
                let sql = if admin.starts_with("postgres") {
                    format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")
                } else {
                    // MySQL has no FORCE: end the test's own connections first. A replica of the
                    // test may still hold a usage batch's transaction, and this thread blocks the
                    // test's runtime, so waiting for it to commit would wait forever.
                    let ids = db
                        .query_all_raw(sea_orm::Statement::from_string(
                            sea_orm::DbBackend::MySql,
                            format!(
                                "SELECT id FROM information_schema.processlist WHERE db = '{name}'"
                            ),
                        ))
                        .await
                        .unwrap_or_default();
                    for row in ids {
                        // MariaDB reports the id signed, MySQL unsigned.
                        let id = row
                            .try_get_by_index::<i64>(0)
                            .ok()
                            .or_else(|| row.try_get_by_index::<u64>(0).ok().map(|v| v as i64));
                        if let Some(id) = id {
                            let _ = db.execute_unprepared(&format!("KILL {id}")).await;
                        }
                    }
                    format!("DROP DATABASE IF EXISTS {name}")
                };
                db.execute_unprepared(&sql).await.ok()?;
                db.close().await.ok()
            })
        })
        .join();
    }
}

/// base64 of 32 bytes 0x01..=0x20.
pub const TEST_MASTER_KEY: &str = "AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA=";

/// A config for tests: fixed secrets, ephemeral port, the given database.
pub fn test_config(db_url: &str) -> Config {
    let mut cfg = Config::default();
    cfg.server.listen = "127.0.0.1:0".into();
    cfg.server.log_format = "json".into();
    cfg.database.url = SecretString::from(db_url.to_owned());
    cfg.database.max_connections = 8;
    // Fixed, so an app restarted on the same database opens what the first one sealed.
    cfg.security.master_key = Some(SecretString::from(TEST_MASTER_KEY.to_owned()));
    cfg.security.jwt_secret = Some(SecretString::from("t".repeat(48)));
    // One spool per app: replicas and restarts in one test must not share one (it is locked).
    cfg.usage.spool_dir = Some(tempfile::tempdir().expect("spool dir").keep());
    cfg
}

/// A running app. Dropping it stops the server.
pub struct TestApp {
    pub addr: SocketAddr,
    pub base: String,
    pub state: AppState,
    pub client: reqwest::Client,
    pub db: Arc<TestDb>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    handle: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl TestApp {
    pub async fn spawn() -> Self {
        Self::spawn_with(|_| {}).await
    }

    pub async fn spawn_with(f: impl FnOnce(&mut Config)) -> Self {
        let db = Arc::new(TestDb::new().await);
        Self::spawn_on(db, f).await
    }

    /// Another app on the same database (restart, second replica).
    pub async fn spawn_on(db: Arc<TestDb>, f: impl FnOnce(&mut Config)) -> Self {
        let mut cfg = test_config(&db.url);
        f(&mut cfg);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let app = App::build(cfg).await.expect("build app");
        let state = app.state.clone();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let handle = tokio::spawn(tollgate::server::serve(listener, app, async move {
            let _ = rx.await;
        }));
        Self {
            addr,
            base: format!("http://{addr}"),
            state,
            client: reqwest::Client::new(),
            db,
            shutdown: Some(tx),
            handle: Some(handle),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// Stops accepting, drains, flushes; waits until `serve` returns.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.handle.take() {
            h.await.expect("server task").expect("serve");
        }
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> (u16, Value) {
        self.call(reqwest::Method::GET, path, token, None).await
    }

    pub async fn post(&self, path: &str, token: Option<&str>, body: Value) -> (u16, Value) {
        self.call(reqwest::Method::POST, path, token, Some(body))
            .await
    }

    pub async fn patch(&self, path: &str, token: Option<&str>, body: Value) -> (u16, Value) {
        self.call(reqwest::Method::PATCH, path, token, Some(body))
            .await
    }

    pub async fn put(&self, path: &str, token: Option<&str>, body: Value) -> (u16, Value) {
        self.call(reqwest::Method::PUT, path, token, Some(body))
            .await
    }

    pub async fn delete(&self, path: &str, token: Option<&str>) -> (u16, Value) {
        self.call(reqwest::Method::DELETE, path, token, None).await
    }

    /// Sends a JSON request; returns the status and the JSON body (`null` when empty).
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut req = self.client.request(method, self.url(path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("request");
        let status = resp.status().as_u16();
        let text = resp.text().await.expect("body");
        let json = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or_else(|_| json!({ "raw": text }))
        };
        (status, json)
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// Asserts an OpenAI-shaped error with this status and code.
#[track_caller]
pub fn assert_error(status: u16, body: &Value, want_status: u16, want_code: &str) {
    assert_eq!(status, want_status, "status; body: {body}");
    let err = &body["error"];
    assert!(err.is_object(), "no error object in {body}");
    assert!(err["message"].is_string(), "no message in {body}");
    assert!(err["type"].is_string(), "no type in {body}");
    assert!(
        err.get("param").is_some() && err.get("code").is_some(),
        "param/code missing in {body}"
    );
    assert_eq!(err["code"], want_code, "code; body: {body}");
}

/// The real `tollgate` binary, run in `cwd` as a user would, with none of the caller's
/// `TOLLGATE_*`, `DATABASE_URL` or `RUST_LOG` variables leaking in (the test adds what it means).
pub fn tollgate_command(cwd: &std::path::Path) -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"));
    cmd.current_dir(cwd).stdin(std::process::Stdio::null());
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if name.starts_with("TOLLGATE_") || name == "DATABASE_URL" || name == "RUST_LOG" {
            cmd.env_remove(name.as_ref());
        }
    }
    cmd
}
