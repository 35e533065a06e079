//! Command line: `serve`, `migrate`, `admin create`, `master-key rotate`, `usage prune`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::app::App;
use crate::config::Config;
use crate::store;

#[derive(Debug, Parser)]
#[command(
    name = "tollgate",
    version,
    about = "A multi-tenant, OpenAI-compatible LLM gateway"
)]
pub struct Cli {
    /// Config file (default: $TOLLGATE_CONFIG, else ./config.toml when present).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway (applies pending migrations first).
    Serve,
    /// Apply pending migrations and exit.
    Migrate,
    /// Administrator bootstrap.
    #[command(subcommand)]
    Admin(AdminCommand),
    /// Master key operations.
    #[command(subcommand, name = "master-key")]
    MasterKey(MasterKeyCommand),
    /// Usage record maintenance.
    #[command(subcommand)]
    Usage(UsageCommand),
}

#[derive(Debug, Subcommand)]
pub enum UsageCommand {
    /// Delete usage records older than an age (e.g. `--older-than 90d`), in batches.
    Prune(UsagePrune),
}

#[derive(Debug, Args)]
pub struct UsagePrune {
    /// `<N>d` (days) or `<N>h` (hours), N ≥ 1.
    #[arg(long, value_name = "AGE", value_parser = parse_age)]
    pub older_than: chrono::Duration,
}

/// `90d`, `36h` → a duration.
pub fn parse_age(s: &str) -> Result<chrono::Duration, String> {
    let bad = || format!("{s:?} is not an age like 90d or 36h");
    let t = s.trim();
    let (n, unit): (&str, fn(i64) -> Option<chrono::Duration>) =
        if let Some(n) = t.strip_suffix('d') {
            (n, chrono::Duration::try_days)
        } else if let Some(n) = t.strip_suffix('h') {
            (n, chrono::Duration::try_hours)
        } else {
            return Err(bad());
        };
    n.parse::<i64>()
        .ok()
        .filter(|n| *n >= 1)
        .and_then(unit)
        .ok_or_else(bad)
}

#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Create an active administrator; prints its TOTP enrolment.
    Create(AdminCreate),
}

#[derive(Debug, Args)]
pub struct AdminCreate {
    #[arg(long)]
    pub username: String,
    #[arg(long)]
    pub email: Option<String>,
    /// Read the password from standard input (required: never pass it as an argument).
    #[arg(long, required = true)]
    pub password_stdin: bool,
    /// Print exactly one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum MasterKeyCommand {
    /// Re-encrypt every stored secret under the newest master key.
    Rotate,
}

/// Runs a parsed command with a loaded config.
pub async fn run(cli: Cli, config: Config) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve => {
            let shutdown = crate::server::shutdown_signal();
            let listener = tokio::net::TcpListener::bind(config.listen_addr()?).await?;
            let app = App::build(config).await?;
            tracing::info!(addr = %listener.local_addr()?, database = app.state.db_kind.as_str(), "tollgate listening");
            crate::server::serve(listener, app, shutdown).await
        }
        Command::Migrate => {
            let db = store::connect(config.database_url(), 2).await?;
            store::migrate(&db, config.database_url()).await?;
            eprintln!("migrations applied");
            Ok(())
        }
        Command::Admin(AdminCommand::Create(args)) => admin_create(args, config).await,
        Command::Usage(UsageCommand::Prune(args)) => {
            let db = store::connect(config.database_url(), 2).await?;
            store::migrate(&db, config.database_url()).await?;
            let cutoff = chrono::Utc::now() - args.older_than;
            let deleted = store::usage::prune_older_than(&db, cutoff).await?;
            println!(
                "deleted {deleted} usage records from before {}",
                crate::routes::rfc3339(cutoff)
            );
            Ok(())
        }
        Command::MasterKey(MasterKeyCommand::Rotate) => {
            // File-managed keys: put a new key first in the secrets file. A configured key
            // (security.master_key / TOLLGATE_MASTER_KEY) is already the newest: the operator
            // moved the old one to security.previous_master_keys.
            let file_managed = crate::config::non_empty(&config.security.master_key).is_none();
            if file_managed {
                let path = crate::secrets::Secrets::add_generated_key(&config)?;
                eprintln!("added a new master key to {}", path.display());
            }
            let secrets = crate::secrets::Secrets::load(&config, false)?;
            let db = store::connect(config.database_url(), 2).await?;
            store::migrate(&db, config.database_url()).await?;
            let report = store::rekey::rekey_all(&db, &secrets.keyring).await?;
            println!(
                "master key {}: re-encrypted {} provider keys and {} TOTP secrets ({} already current)",
                secrets.keyring.current_id(),
                report.provider_keys,
                report.totp_secrets,
                report.already_current
            );
            if file_managed {
                eprintln!(
                    "running servers load the new key when they first meet a value sealed under it"
                );
            }
            anyhow::ensure!(
                report.failed.is_empty(),
                "{} values could not be decrypted with any known master key and were left as they are: {}",
                report.failed.len(),
                report.failed.join(", ")
            );
            Ok(())
        }
    }
}

/// `tollgate admin create`: an active administrator with an enrolled TOTP secret, printed once.
async fn admin_create(args: AdminCreate, config: Config) -> anyhow::Result<()> {
    use crate::accounts::signup::{self, NewUser, Role, SignupError};

    // One line from stdin (pipes and terminals alike); exactly one trailing newline is removed.
    let mut line = tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line).map(|_| line)
    })
    .await?
    .map_err(|e| anyhow::anyhow!("reading the password from stdin: {e}"))?;
    if line.ends_with('\n') {
        line.pop();
        if line.ends_with('\r') {
            line.pop();
        }
    }
    let password = secrecy::SecretString::from(line);
    let password = secrecy::ExposeSecret::expose_secret(&password);
    // Refuse bad input before touching the database.
    if !crate::validate::username(&args.username) {
        anyhow::bail!("{}", SignupError::InvalidUsername);
    }
    if !crate::validate::password(password) {
        anyhow::bail!("{} (read from stdin)", SignupError::InvalidPassword);
    }
    signup::normalize_email(args.email.as_deref())?;

    let db = store::connect(config.database_url(), 2).await?;
    store::migrate(&db, config.database_url()).await?;
    let secrets = crate::secrets::Secrets::load(&config, true)?;
    let created = signup::create(
        &db,
        &secrets.keyring,
        &config,
        NewUser {
            username: &args.username,
            password,
            email: args.email.as_deref(),
            role: Role::Admin,
            active: true,
        },
    )
    .await
    .map_err(|e| match e {
        SignupError::Duplicate(name) => {
            anyhow::anyhow!("a user named `{name}` already exists; nothing was changed")
        }
        other => anyhow::Error::from(other),
    })?;
    store::audit::record(
        &db,
        store::audit::AuditEntry {
            actor_id: None,
            action: "admin.user.create",
            target: Some(format!("user:{}", created.user.id)),
            ip: None,
            detail: Some(serde_json::json!({
                "username": created.user.username,
                "role": "admin",
                "via": "cli",
            })),
        },
    )
    .await?;
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "id": created.user.id,
                "username": created.user.username,
                "totp_secret": created.totp.secret,
                "otpauth_url": created.totp.otpauth_url,
            })
        );
    } else {
        println!(
            "Created administrator `{}` (id {}).",
            created.user.username, created.user.id
        );
        println!();
        println!("Add this TOTP secret to an authenticator app now; it is not shown again:");
        println!("  secret:      {}", created.totp.secret);
        println!("  otpauth URL: {}", created.totp.otpauth_url);
        println!();
        println!("Then sign in with POST /api/auth/login {{username, password, totp_code}}.");
    }
    Ok(())
}
