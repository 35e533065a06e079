//! PostgreSQL LISTEN/NOTIFY: how replicas on one PostgreSQL database tell each other about cache
//! invalidations when no Redis is configured.
//!
//! Notifications are scoped to the database, so deployments (and tests) on different databases of
//! one server never hear each other.

use sea_orm::sqlx::postgres::PgListener;
use sea_orm::{ConnectionTrait, DbBackend, Statement};

/// Sends `payload` (at most ~8000 bytes) to every session listening on `channel`, this one's too.
pub async fn notify(
    db: &impl ConnectionTrait,
    channel: &str,
    payload: &str,
) -> Result<(), sea_orm::DbErr> {
    db.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "SELECT pg_notify($1, $2)",
        [channel.into(), payload.into()],
    ))
    .await
    .map(|_| ())
}

/// A listener on `channel` over its own connection to `url` (not one of the pool's, which it
/// would hold for ever). After a lost connection it reconnects and listens again by itself.
pub async fn listen(url: &str, channel: &str) -> Result<PgListener, sea_orm::sqlx::Error> {
    let mut listener = PgListener::connect(url).await?;
    listener.listen(channel).await?;
    Ok(listener)
}
