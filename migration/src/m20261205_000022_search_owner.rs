//! Chat search scoped by owner inside the full-text index (API.md §12, issue 22). The first
//! index (`m20261203_000022_chat`) matched a word across every user's messages and filtered by
//! user afterwards: a word in 17% of 1M messages made SQLite collect 170k row ids and
//! PostgreSQL visit 170k heap rows for the one user's 170 matches. Now each row also carries one
//! token naming its owner and a search matches it together with the words, so the index itself
//! intersects the owner's short list with the word's:
//!
//! - SQLite: the FTS5 table gains an `owner` column, `hex(user_id)` (always a single token),
//!   read through the view `conversation_items_fts_src` (external content must name its
//!   columns); the triggers write it; the table is rebuilt from the view.
//! - PostgreSQL: the GIN index covers `to_tsvector(...) || array_to_tsvector(['u' || md5(user_id)])`.
//! - MySQL/MariaDB: unchanged (`FULLTEXT` over the text; the user filter stays a row filter).
//!
//! The queries (`store::conversations::match_clause`) still filter `user_id` on the row as well.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::{ConnectionTrait, DbBackend};

#[derive(DeriveMigrationName)]
pub struct Migration;

const SQLITE_DROP: &[&str] = &[
    "DROP TRIGGER IF EXISTS conversation_items_fts_ai",
    "DROP TRIGGER IF EXISTS conversation_items_fts_ad",
    "DROP TRIGGER IF EXISTS conversation_items_fts_aud",
    "DROP TRIGGER IF EXISTS conversation_items_fts_aui",
    "DROP TABLE IF EXISTS conversation_items_fts",
    "DROP VIEW IF EXISTS conversation_items_fts_src",
];

const SQLITE_UP: &[&str] = &[
    "CREATE VIEW conversation_items_fts_src AS \
     SELECT seq, content_text, hex(user_id) AS owner FROM conversation_items",
    "CREATE VIRTUAL TABLE conversation_items_fts USING fts5(content_text, owner, \
     content='conversation_items_fts_src', content_rowid='seq')",
    "CREATE TRIGGER conversation_items_fts_ai AFTER INSERT ON conversation_items WHEN new.content_text IS NOT NULL BEGIN \
     INSERT INTO conversation_items_fts(rowid, content_text, owner) VALUES (new.seq, new.content_text, hex(new.user_id)); END",
    "CREATE TRIGGER conversation_items_fts_ad AFTER DELETE ON conversation_items WHEN old.content_text IS NOT NULL BEGIN \
     INSERT INTO conversation_items_fts(conversation_items_fts, rowid, content_text, owner) VALUES ('delete', old.seq, old.content_text, hex(old.user_id)); END",
    "CREATE TRIGGER conversation_items_fts_aud AFTER UPDATE OF content_text, user_id ON conversation_items WHEN old.content_text IS NOT NULL BEGIN \
     INSERT INTO conversation_items_fts(conversation_items_fts, rowid, content_text, owner) VALUES ('delete', old.seq, old.content_text, hex(old.user_id)); END",
    "CREATE TRIGGER conversation_items_fts_aui AFTER UPDATE OF content_text, user_id ON conversation_items WHEN new.content_text IS NOT NULL BEGIN \
     INSERT INTO conversation_items_fts(rowid, content_text, owner) VALUES (new.seq, new.content_text, hex(new.user_id)); END",
    "INSERT INTO conversation_items_fts(conversation_items_fts) VALUES ('rebuild')",
];

/// The PostgreSQL index expression; `store::conversations::match_clause` repeats it exactly
/// (with the `ci.` alias) so the planner uses the index.
const PG_INDEX: &str = "CREATE INDEX idx_conv_items_fts ON conversation_items USING GIN \
     ((to_tsvector('simple', coalesce(content_text, '')) || array_to_tsvector(ARRAY['u' || md5(user_id)])))";

const PG_INDEX_DOWN: &str = "CREATE INDEX idx_conv_items_fts ON conversation_items \
     USING GIN (to_tsvector('simple', coalesce(content_text, '')))";

async fn run(db: &SchemaManagerConnection<'_>, sqls: &[&str]) -> Result<(), DbErr> {
    for sql in sqls {
        db.execute_unprepared(sql).await?;
    }
    Ok(())
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        match manager.get_database_backend() {
            DbBackend::Sqlite => {
                run(db, SQLITE_DROP).await?;
                run(db, SQLITE_UP).await
            }
            DbBackend::Postgres => {
                run(db, &["DROP INDEX IF EXISTS idx_conv_items_fts", PG_INDEX]).await
            }
            _ => Ok(()),
        }
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        match manager.get_database_backend() {
            DbBackend::Sqlite => {
                run(db, SQLITE_DROP).await?;
                // The first migration's table and triggers, filled from the rows.
                run(db, crate::m20261203_000022_chat::SQLITE_UP).await?;
                run(
                    db,
                    &["INSERT INTO conversation_items_fts(conversation_items_fts) VALUES ('rebuild')"],
                )
                .await
            }
            DbBackend::Postgres => {
                run(
                    db,
                    &["DROP INDEX IF EXISTS idx_conv_items_fts", PG_INDEX_DOWN],
                )
                .await
            }
            _ => Ok(()),
        }
    }
}
