//! Every sea-orm query lives here, as `async fn(db, …)`; the only module that imports `entity`.

pub mod audit;
pub mod billing;
pub mod completions;
pub mod conversations;
pub mod gateway_keys;
pub mod ip_records;
pub mod leases;
pub mod ledger;
pub mod login_history;
pub mod models;
pub mod notify;
pub mod plans;
pub mod provider_keys;
pub mod providers;
pub mod rekey;
pub mod responses;
pub mod retention;
pub mod sessions;
pub mod settings;
pub mod stats;
pub mod usage;
pub mod usage_batch;
pub mod users;

use std::time::Duration;

use anyhow::Context;
use migration::{Migrator, MigratorTrait};
use sea_orm::sqlx;
use sea_orm::{ConnectOptions, Database, DatabaseConnection, DbBackend};

/// Which database family a URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DbKind {
    Sqlite,
    Postgres,
    Mysql,
}

impl DbKind {
    pub fn from_url(url: &str) -> Option<Self> {
        if url.starts_with("sqlite:") {
            Some(Self::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Some(Self::Postgres)
        } else if url.starts_with("mysql://") || url.starts_with("mariadb://") {
            Some(Self::Mysql)
        } else {
            None
        }
    }

    pub fn of(db: &DatabaseConnection) -> Self {
        match db.get_database_backend() {
            DbBackend::Postgres => Self::Postgres,
            DbBackend::MySql => Self::Mysql,
            _ => Self::Sqlite,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sqlite => "sqlite",
            Self::Postgres => "postgres",
            Self::Mysql => "mysql",
        }
    }
}

/// Opens the pool. SQLite gets WAL and a busy timeout so several writers wait instead of failing.
pub async fn connect(url: &str, max_connections: u32) -> anyhow::Result<DatabaseConnection> {
    let url = url.replacen("mariadb://", "mysql://", 1);
    let mut opts = ConnectOptions::new(url.clone());
    opts.max_connections(max_connections)
        .min_connections(1)
        .connect_timeout(Duration::from_secs(10))
        .acquire_timeout(Duration::from_secs(30))
        .sqlx_logging(false)
        .map_sqlx_sqlite_opts(|o| {
            o.journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
                .synchronous(sqlx::sqlite::SqliteSynchronous::Normal)
                .busy_timeout(Duration::from_secs(30))
                .foreign_keys(false)
        });
    if url.contains(":memory:") || url.contains("mode=memory") {
        // Every pooled connection to `:memory:` would be its own empty database.
        opts.max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None);
    }
    // Opening a SQLite file switches it to WAL, which needs a moment of exclusive access: a second
    // process opening the same fresh file at that instant gets SQLITE_BUSY from the pragma
    // (the busy timeout does not cover it). Retry briefly instead of failing the start.
    let sqlite = url.starts_with("sqlite:");
    if let Some(path) = sqlite_file_path(&url) {
        private_sqlite_files(&path)?;
    }
    let mut attempts = 0;
    loop {
        match Database::connect(opts.clone()).await {
            Err(e) if sqlite && attempts < 50 && e.to_string().contains("database is locked") => {
                attempts += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            res => {
                return res.with_context(|| {
                    format!(
                        "connecting to the {} database",
                        DbKind::from_url(&url).map_or("?", |k| k.as_str())
                    )
                });
            }
        }
    }
}

/// Applies pending migrations under a cross-process lock, so replicas starting together on one
/// database do not race: a PostgreSQL advisory lock, MySQL `GET_LOCK`, or a lock file beside a
/// SQLite database.
pub async fn migrate(db: &DatabaseConnection, url: &str) -> anyhow::Result<()> {
    const LOCK_ID: i64 = 0x7011_6a7e; // "tollgate"
    match DbKind::of(db) {
        DbKind::Postgres => {
            let mut conn = db.get_postgres_connection_pool().acquire().await?;
            sqlx::query("SELECT pg_advisory_lock($1)")
                .bind(LOCK_ID)
                .execute(&mut *conn)
                .await
                .context("taking the migration lock")?;
            let res = Migrator::up(db, None).await;
            sqlx::query("SELECT pg_advisory_unlock($1)")
                .bind(LOCK_ID)
                .execute(&mut *conn)
                .await?;
            res?;
        }
        DbKind::Mysql => {
            let mut conn = db.get_mysql_connection_pool().acquire().await?;
            let got: (Option<i64>,) = sqlx::query_as("SELECT GET_LOCK('tollgate_migrate', 120)")
                .fetch_one(&mut *conn)
                .await
                .context("taking the migration lock")?;
            anyhow::ensure!(got.0 == Some(1), "timed out waiting for the migration lock");
            let res = Migrator::up(db, None).await;
            sqlx::query("SELECT RELEASE_LOCK('tollgate_migrate')")
                .execute(&mut *conn)
                .await?;
            res?;
        }
        DbKind::Sqlite => {
            let lock = sqlite_lock_path(url);
            let file = match &lock {
                Some(p) => Some(
                    {
                        let mut o = std::fs::OpenOptions::new();
                        o.create(true).truncate(false).write(true);
                        #[cfg(unix)]
                        std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
                        o
                    }
                    .open(p)
                    .with_context(|| format!("opening {}", p.display()))?,
                ),
                None => None,
            };
            let file = tokio::task::spawn_blocking(move || -> std::io::Result<_> {
                if let Some(f) = &file {
                    f.lock()?;
                }
                Ok(file)
            })
            .await??;
            // One connection for the whole run: DDL is checked against the schema a connection
            // has cached, so a `CREATE TRIGGER` on one pooled connection right after the
            // `DROP TRIGGER` ran on another could fail with "already exists".
            let res = match &lock {
                Some(_) => match connect(url, 1).await {
                    Ok(one) => {
                        let res = Migrator::up(&one, None).await;
                        let _ = one.close().await;
                        res
                    }
                    Err(e) => {
                        if let Some(f) = &file {
                            let _ = f.unlock();
                        }
                        return Err(e);
                    }
                },
                // `:memory:` is a single connection already (and a second one would be another
                // database).
                None => Migrator::up(db, None).await,
            };
            if let Some(f) = file {
                let _ = f.unlock();
            }
            res?;
        }
    }
    Ok(())
}

fn sqlite_lock_path(url: &str) -> Option<std::path::PathBuf> {
    let path = sqlite_file_path(url)?;
    Some(suffixed(&path, ".migrate-lock"))
}

/// The file a `sqlite:` URL names, if it names one (not `:memory:`).
fn sqlite_file_path(url: &str) -> Option<std::path::PathBuf> {
    let path = url.strip_prefix("sqlite:")?.trim_start_matches("//");
    let path = path.split('?').next()?;
    if path.is_empty() || path.contains(":memory:") || url.contains("mode=memory") {
        return None;
    }
    Some(std::path::PathBuf::from(path))
}

fn suffixed(path: &std::path::Path, suffix: &str) -> std::path::PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    s.into()
}

/// The database holds password hashes, sealed provider keys and everyone's usage: readable by the
/// gateway's user only. A missing database file is created 0600 before SQLite opens it (SQLite
/// then gives its `-wal` and `-shm` files the database file's mode); files an older version left
/// readable by others are narrowed to 0600.
fn private_sqlite_files(path: &std::path::Path) -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
        {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            // A directory that does not exist yet: let SQLite report it as it always has.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e).with_context(|| format!("creating {}", path.display())),
        }
        for f in [
            path.to_path_buf(),
            suffixed(path, "-wal"),
            suffixed(path, "-shm"),
            suffixed(path, ".migrate-lock"),
        ] {
            if let Ok(meta) = std::fs::metadata(&f)
                && meta.permissions().mode() & 0o077 != 0
            {
                std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600))
                    .with_context(|| format!("making {} private", f.display()))?;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// `?page=&per_page=` resolved: 1 ≤ page ≤ [`MAX_PAGE`], 1 ≤ per_page ≤ [`MAX_PER_PAGE`].
#[derive(Debug, Clone, Copy)]
pub struct PageReq {
    pub page: u64,
    pub per_page: u64,
}

/// Largest page number a list accepts: `(page - 1) * per_page` then stays far inside the signed
/// 64-bit `OFFSET` every database takes (10^11 rows at 100 per page).
pub const MAX_PAGE: u64 = 1_000_000_000;
/// Largest page size a list accepts (API.md §1).
pub const MAX_PER_PAGE: u64 = 100;

/// A `page` or `per_page` outside its range; names the parameter.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{param} must be between 1 and {max}")]
pub struct PageError {
    pub param: &'static str,
    pub max: u64,
}

impl PageReq {
    /// Defaults for what is absent, clamped into range for what is not: for callers inside the
    /// process. A client's values go through [`PageReq::parse`].
    pub fn new(page: Option<u64>, per_page: Option<u64>) -> Self {
        Self {
            page: page.unwrap_or(1).clamp(1, MAX_PAGE),
            per_page: per_page.unwrap_or(20).clamp(1, MAX_PER_PAGE),
        }
    }

    /// A client's `?page=&per_page=`: defaults for what is absent, an error for what is out of
    /// range (never clamped silently, never an overflow).
    pub fn parse(page: Option<u64>, per_page: Option<u64>) -> Result<Self, PageError> {
        if page.is_some_and(|p| !(1..=MAX_PAGE).contains(&p)) {
            return Err(PageError {
                param: "page",
                max: MAX_PAGE,
            });
        }
        if per_page.is_some_and(|n| !(1..=MAX_PER_PAGE).contains(&n)) {
            return Err(PageError {
                param: "per_page",
                max: MAX_PER_PAGE,
            });
        }
        Ok(Self::new(page, per_page))
    }

    pub fn offset(&self) -> u64 {
        self.page.saturating_sub(1).saturating_mul(self.per_page)
    }
}

/// One page of rows and the total count.
#[derive(Debug)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub total: u64,
}

/// Nano-dollars from a USD amount, rounded to the nearest nano.
pub fn usd_to_nanos(usd: f64) -> i64 {
    (usd * 1e9).round() as i64
}

/// USD from nano-dollars, for JSON.
pub fn nanos_to_usd(nanos: i64) -> f64 {
    nanos as f64 / 1e9
}

/// A new opaque id: UUIDv7 (time-ordered, good index locality), hyphenless.
pub fn new_id() -> String {
    uuid::Uuid::now_v7().simple().to_string()
}

/// Is this error a unique-constraint violation (→ 409)?
pub fn is_unique_violation(e: &sea_orm::DbErr) -> bool {
    matches!(
        e.sql_err(),
        Some(sea_orm::SqlErr::UniqueConstraintViolation(_))
    )
}
