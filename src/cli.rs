//! Command line: `serve`, `migrate`, `admin create`, `master-key rotate`.

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
            let listener = tokio::net::TcpListener::bind(config.listen_addr()?).await?;
            let app = App::build(config).await?;
            tracing::info!(addr = %listener.local_addr()?, database = app.state.db_kind.as_str(), "tollgate listening");
            crate::server::serve(listener, app, crate::server::shutdown_signal()).await
        }
        Command::Migrate => {
            let db = store::connect(config.database_url(), 2).await?;
            store::migrate(&db, config.database_url()).await?;
            eprintln!("migrations applied");
            Ok(())
        }
        Command::Admin(AdminCommand::Create(args)) => admin_create(args, config).await,
        Command::MasterKey(MasterKeyCommand::Rotate) => {
            anyhow::bail!("master-key rotate: not available yet")
        }
    }
}

async fn admin_create(_args: AdminCreate, _config: Config) -> anyhow::Result<()> {
    anyhow::bail!("admin create: not available yet")
}
