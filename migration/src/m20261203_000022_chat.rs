//! Chat for signed-in users (API.md §12), on the tables of §9: per item, the plain text the
//! full-text index covers (`content_text`), the model that wrote an answer and its tokens; per
//! conversation, the SHA-256 of its share token. The full-text index is each database's own:
//! SQLite an external-content FTS5 table kept by triggers, PostgreSQL a GIN index over
//! `to_tsvector('simple', content_text)`, MySQL/MariaDB a `FULLTEXT` index.
//!
//! Items stored before this migration have no `content_text`: they are listed and replayed as
//! before, and found by search once rewritten (nothing rewrites them today).

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::{ConnectionTrait, DbBackend};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum ConversationItems {
    Table,
    ContentText,
    Model,
    Tokens,
}

#[derive(DeriveIden)]
enum Conversations {
    Table,
    ShareTokenHash,
}

pub(crate) const SQLITE_UP: &[&str] = &[
    "CREATE VIRTUAL TABLE conversation_items_fts USING fts5(content_text, content='conversation_items', content_rowid='seq')",
    "CREATE TRIGGER conversation_items_fts_ai AFTER INSERT ON conversation_items WHEN new.content_text IS NOT NULL BEGIN \
     INSERT INTO conversation_items_fts(rowid, content_text) VALUES (new.seq, new.content_text); END",
    "CREATE TRIGGER conversation_items_fts_ad AFTER DELETE ON conversation_items WHEN old.content_text IS NOT NULL BEGIN \
     INSERT INTO conversation_items_fts(conversation_items_fts, rowid, content_text) VALUES ('delete', old.seq, old.content_text); END",
    "CREATE TRIGGER conversation_items_fts_aud AFTER UPDATE OF content_text ON conversation_items WHEN old.content_text IS NOT NULL BEGIN \
     INSERT INTO conversation_items_fts(conversation_items_fts, rowid, content_text) VALUES ('delete', old.seq, old.content_text); END",
    "CREATE TRIGGER conversation_items_fts_aui AFTER UPDATE OF content_text ON conversation_items WHEN new.content_text IS NOT NULL BEGIN \
     INSERT INTO conversation_items_fts(rowid, content_text) VALUES (new.seq, new.content_text); END",
];

const SQLITE_DOWN: &[&str] = &[
    "DROP TRIGGER IF EXISTS conversation_items_fts_ai",
    "DROP TRIGGER IF EXISTS conversation_items_fts_ad",
    "DROP TRIGGER IF EXISTS conversation_items_fts_aud",
    "DROP TRIGGER IF EXISTS conversation_items_fts_aui",
    "DROP TABLE IF EXISTS conversation_items_fts",
];

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let b = manager.get_database_backend();
        let mut text = ColumnDef::new(ConversationItems::ContentText);
        match b {
            // TEXT stops at 64 KiB on MySQL; an answer may be longer.
            DbBackend::MySql => text.custom(Alias::new("LONGTEXT")),
            _ => text.text(),
        };
        text.null();
        // One column per statement: SQLite alters one at a time.
        for col in [
            text,
            ColumnDef::new(ConversationItems::Model)
                .string_len(128)
                .null()
                .take(),
            ColumnDef::new(ConversationItems::Tokens)
                .big_integer()
                .null()
                .take(),
        ] {
            manager
                .alter_table(
                    Table::alter()
                        .table(ConversationItems::Table)
                        .add_column(col)
                        .to_owned(),
                )
                .await?;
        }
        manager
            .alter_table(
                Table::alter()
                    .table(Conversations::Table)
                    .add_column(
                        ColumnDef::new(Conversations::ShareTokenHash)
                            .string_len(64)
                            .null(),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_conversations_share")
                    .table(Conversations::Table)
                    .col(Conversations::ShareTokenHash)
                    .unique()
                    .to_owned(),
            )
            .await?;
        let db = manager.get_connection();
        match b {
            DbBackend::Sqlite => {
                for sql in SQLITE_UP {
                    db.execute_unprepared(sql).await?;
                }
            }
            DbBackend::Postgres => {
                db.execute_unprepared(
                    "CREATE INDEX idx_conv_items_fts ON conversation_items \
                     USING GIN (to_tsvector('simple', coalesce(content_text, '')))",
                )
                .await?;
            }
            DbBackend::MySql => {
                db.execute_unprepared(
                    "CREATE FULLTEXT INDEX idx_conv_items_fts ON conversation_items (content_text)",
                )
                .await?;
            }
            _ => {}
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let b = manager.get_database_backend();
        let db = manager.get_connection();
        match b {
            DbBackend::Sqlite => {
                for sql in SQLITE_DOWN {
                    db.execute_unprepared(sql).await?;
                }
            }
            _ => {
                manager
                    .drop_index(
                        Index::drop()
                            .name("idx_conv_items_fts")
                            .table(ConversationItems::Table)
                            .to_owned(),
                    )
                    .await?;
            }
        }
        manager
            .drop_index(
                Index::drop()
                    .name("idx_conversations_share")
                    .table(Conversations::Table)
                    .to_owned(),
            )
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table(Conversations::Table)
                    .drop_column(Conversations::ShareTokenHash)
                    .to_owned(),
            )
            .await?;
        for col in [
            ConversationItems::ContentText,
            ConversationItems::Model,
            ConversationItems::Tokens,
        ] {
            manager
                .alter_table(
                    Table::alter()
                        .table(ConversationItems::Table)
                        .drop_column(col)
                        .to_owned(),
                )
                .await?;
        }
        Ok(())
    }
}
