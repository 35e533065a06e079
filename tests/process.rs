//! The real binary as a new user runs it: `serve` from an empty directory with the shipped config,
//! `/health`, SIGTERM → exit 0, restart with the same generated secrets; `migrate` repeated and
//! raced by two processes on one database.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{TestDb, tollgate_command};
use migration::{Migrator, MigratorTrait};
use serde_json::Value;

/// Generous for a debug build on a busy CI machine; polled, so a healthy run takes far less.
const START_TIMEOUT: Duration = Duration::from_secs(90);
/// `server.shutdown_drain_secs` the tests run with.
const DRAIN_SECS: u64 = 5;

fn shipped_config() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("config.toml")
}

/// A running `tollgate serve`; killed if a test fails before it exits.
struct Server {
    child: Child,
    addr: String,
    /// Every stderr line so far (JSON log lines).
    log: Vec<String>,
    lines: mpsc::Receiver<String>,
}

impl Server {
    /// `tollgate --config <shipped config.toml> serve` in `dir`, on a free port.
    fn start(dir: &Path) -> Self {
        let mut child = tollgate_command(dir)
            .arg("--config")
            .arg(shipped_config())
            .arg("serve")
            .env("TOLLGATE_SERVER__LISTEN", "127.0.0.1:0")
            .env(
                "TOLLGATE_SERVER__SHUTDOWN_DRAIN_SECS",
                DRAIN_SECS.to_string(),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn tollgate serve");
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut server = Self {
            child,
            addr: String::new(),
            log: Vec::new(),
            lines,
        };
        let listening = server.wait_for_log(|v| v["message"] == "tollgate listening");
        server.addr = listening["addr"]
            .as_str()
            .expect("the listening line has addr")
            .to_owned();
        server
    }

    /// Reads stderr until a JSON line matches; panics with the log on timeout or exit.
    fn wait_for_log(&mut self, want: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let v = serde_json::from_str::<Value>(&line).unwrap_or(Value::Null);
                    self.log.push(line);
                    if want(&v) {
                        return v;
                    }
                }
                Err(e) => panic!(
                    "no matching log line ({e:?}); exit: {:?}; stderr:\n{}",
                    self.child.try_wait(),
                    self.log.join("\n")
                ),
            }
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn sigterm(&self) {
        let status = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("kill -TERM {}", self.child.id()))
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed");
    }

    /// Waits for the process to exit on its own, at most `limit`; then collects the rest of stderr.
    fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                break s;
            }
            assert!(
                Instant::now() < deadline,
                "still running {limit:?} after SIGTERM; stderr:\n{}",
                self.log.join("\n")
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        // The reader thread ends at EOF, which follows the exit.
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(5)) {
            self.log.push(line);
        }
        status
    }

    /// Has some JSON log line at `level` with `field` ending in `suffix`?
    fn logged(&self, level: &str, field: &str, suffix: &str) -> bool {
        self.log.iter().any(|l| {
            serde_json::from_str::<Value>(l).is_ok_and(|v| {
                v["level"] == level && v[field].as_str().is_some_and(|s| s.ends_with(suffix))
            })
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[cfg(unix)]
fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

#[tokio::test]
async fn serve_answers_then_exits_0_on_sigterm_and_restarts_with_the_same_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let http = reqwest::Client::new();
    let secrets = dir.path().join("tollgate.db.secrets");

    let mut server = Server::start(dir.path());
    let r = http.get(server.url("/health")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["status"], "healthy");
    let r = http.get(server.url("/ready")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = http
        .get(server.url("/info"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["database"], "sqlite");

    // The shipped SQLite URL is relative: the database and its secrets land in the working dir.
    assert!(dir.path().join("tollgate.db").exists());
    #[cfg(unix)]
    assert_eq!(mode(&secrets), 0o600);
    // The database and SQLite's WAL files beside it are the gateway user's alone (umask 022 or not).
    #[cfg(unix)]
    for f in [
        "tollgate.db",
        "tollgate.db-wal",
        "tollgate.db-shm",
        "tollgate.db.migrate-lock",
    ] {
        assert_eq!(mode(&dir.path().join(f)), 0o600, "{f}");
    }
    assert!(
        server.logged("WARN", "path", "tollgate.db.secrets"),
        "generating the secrets is logged with the file's path:\n{}",
        server.log.join("\n")
    );
    let written = std::fs::read(&secrets).unwrap();

    server.sigterm();
    let status = server.wait_exit(Duration::from_secs(DRAIN_SECS + 10));
    assert_eq!(
        status.code(),
        Some(0),
        "{status:?}; stderr:\n{}",
        server.log.join("\n")
    );
    assert!(
        http.get(server.url("/health")).send().await.is_err(),
        "nothing listens after exit"
    );

    // A second start reuses the secrets file untouched and does not announce new secrets.
    let mut again = Server::start(dir.path());
    let r = http.get(again.url("/ready")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(std::fs::read(&secrets).unwrap(), written);
    assert!(!again.logged("WARN", "path", "tollgate.db.secrets"));
    again.sigterm();
    let status = again.wait_exit(Duration::from_secs(DRAIN_SECS + 10));
    assert_eq!(status.code(), Some(0), "{}", again.log.join("\n"));
}

/// `tollgate migrate` in `dir` (no config file: defaults + `env`), started but not awaited.
fn spawn_migrate(dir: &Path, env: &[(&str, &str)]) -> Child {
    tollgate_command(dir)
        .arg("migrate")
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tollgate migrate")
}

#[track_caller]
fn assert_succeeds(child: Child) {
    let out = child.wait_with_output().expect("wait for migrate");
    assert!(
        out.status.success(),
        "migrate: {:?}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn assert_fully_migrated(url: &str) {
    let db = tollgate::store::connect(url, 1).await.expect("connect");
    let applied = Migrator::get_applied_migrations(&db)
        .await
        .expect("applied migrations");
    assert_eq!(applied.len(), Migrator::migrations().len());
    let pending = Migrator::get_pending_migrations(&db)
        .await
        .expect("pending migrations");
    assert!(pending.is_empty());
    db.close().await.expect("close");
}

#[tokio::test]
async fn migrate_twice_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    // No config file in the working directory: the defaults apply (sqlite://tollgate.db).
    assert_succeeds(spawn_migrate(dir.path(), &[]));
    assert_succeeds(spawn_migrate(dir.path(), &[]));
    let url = format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("tollgate.db").display()
    );
    assert_fully_migrated(&url).await;
}

#[tokio::test]
async fn two_migrates_at_once_on_one_fresh_sqlite_file_both_succeed() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("race.db").display());
    let env = [("DATABASE_URL", url.as_str())];
    let a = spawn_migrate(dir.path(), &env);
    let b = spawn_migrate(dir.path(), &env);
    assert_succeeds(a);
    assert_succeeds(b);
    assert_fully_migrated(&url).await;
}

/// On the suite's database: a fresh database on the server in `TOLLGATE_TEST_DATABASE_URL`
/// (PostgreSQL advisory lock / MySQL `GET_LOCK`), else another SQLite file.
#[tokio::test]
async fn two_migrates_at_once_on_the_test_database_both_succeed() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let env = [("DATABASE_URL", db.url.as_str())];
    let a = spawn_migrate(dir.path(), &env);
    let b = spawn_migrate(dir.path(), &env);
    assert_succeeds(a);
    assert_succeeds(b);
    assert_fully_migrated(&db.url).await;
}
