//! State for any provider (API.md §9): stored responses, conversations and their items, stored
//! chat completions (and their metadata, one row per pair so `metadata[k]=v` filters in SQL on
//! every backend), and the response / conversation a usage record belongs to.
//!
//! JSON documents are text columns (`LONGTEXT` on MySQL). Conversation items carry a
//! per-conversation `position`, handed out under the conversation row's lock
//! (`conversations.next_position`), unique with the conversation id: appends racing on one
//! conversation get a total order with no duplicates, and a position is visible only once every
//! smaller one of an earlier append is (see `store::conversations::append`).

use sea_orm_migration::{prelude::*, schema::*};

use crate::columns::{instant, json_text};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Responses {
    Table,
    Id,
    UserId,
    KeyId,
    Model,
    Status,
    PreviousResponseId,
    ConversationId,
    InputItems,
    Response,
    InputTokens,
    OutputTokens,
    CreatedAt,
}

#[derive(DeriveIden)]
enum Conversations {
    Table,
    Id,
    UserId,
    Metadata,
    Title,
    Model,
    NextPosition,
    CreatedAt,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum ConversationItems {
    Table,
    Seq,
    ConversationId,
    Position,
    ItemId,
    UserId,
    Item,
    ResponseId,
    CreatedAt,
}

#[derive(DeriveIden)]
enum StoredCompletions {
    Table,
    Seq,
    Id,
    UserId,
    KeyId,
    Model,
    Metadata,
    Messages,
    Response,
    CreatedAt,
}

#[derive(DeriveIden)]
enum StoredCompletionMetadata {
    Table,
    CompletionId,
    MetaKey,
    MetaValue,
}

/// Ids of our own objects (`resp_…`, `conv_…`, `chatcmpl-…`) and of users and keys.
fn id(col: impl IntoIden) -> ColumnDef {
    string_len(col, 64)
}

fn index(name: &str, table: impl IntoIden, cols: &[&'static str]) -> IndexCreateStatement {
    let mut stmt = Index::create();
    stmt.name(name).table(table);
    for c in cols {
        stmt.col(Alias::new(*c));
    }
    stmt.to_owned()
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let b = manager.get_database_backend();

        manager
            .create_table(
                Table::create()
                    .table(Responses::Table)
                    .col(id(Responses::Id).primary_key())
                    .col(id(Responses::UserId))
                    .col(id(Responses::KeyId))
                    .col(string_len(Responses::Model, 128))
                    .col(string_len(Responses::Status, 32))
                    .col(string_len_null(Responses::PreviousResponseId, 64))
                    .col(string_len_null(Responses::ConversationId, 64))
                    .col(json_text(b, Responses::InputItems))
                    .col(json_text(b, Responses::Response))
                    .col(big_integer(Responses::InputTokens).default(0))
                    .col(big_integer(Responses::OutputTokens).default(0))
                    .col(instant(b, Responses::CreatedAt))
                    .to_owned(),
            )
            .await?;
        for (name, cols) in [
            ("idx_responses_user_at", &["user_id", "created_at"][..]),
            ("idx_responses_at", &["created_at"][..]),
        ] {
            manager
                .create_index(index(name, Responses::Table, cols))
                .await?;
        }

        manager
            .create_table(
                Table::create()
                    .table(Conversations::Table)
                    .col(id(Conversations::Id).primary_key())
                    .col(id(Conversations::UserId))
                    .col(text(Conversations::Metadata))
                    .col(string_len_null(Conversations::Title, 255))
                    .col(string_len_null(Conversations::Model, 128))
                    .col(big_integer(Conversations::NextPosition).default(0))
                    .col(instant(b, Conversations::CreatedAt))
                    .col(instant(b, Conversations::UpdatedAt))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(index(
                "idx_conversations_user_updated",
                Conversations::Table,
                &["user_id", "updated_at"],
            ))
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(ConversationItems::Table)
                    .col(big_pk_auto(ConversationItems::Seq))
                    .col(id(ConversationItems::ConversationId))
                    .col(big_integer(ConversationItems::Position))
                    .col(string_len(ConversationItems::ItemId, 128))
                    .col(id(ConversationItems::UserId))
                    .col(json_text(b, ConversationItems::Item))
                    .col(string_len_null(ConversationItems::ResponseId, 64))
                    .col(instant(b, ConversationItems::CreatedAt))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                index(
                    "idx_conv_items_position",
                    ConversationItems::Table,
                    &["conversation_id", "position"],
                )
                .unique()
                .to_owned(),
            )
            .await?;
        for (name, cols) in [
            ("idx_conv_items_item", &["conversation_id", "item_id"][..]),
            ("idx_conv_items_at", &["created_at"][..]),
        ] {
            manager
                .create_index(index(name, ConversationItems::Table, cols))
                .await?;
        }

        manager
            .create_table(
                Table::create()
                    .table(StoredCompletions::Table)
                    .col(big_pk_auto(StoredCompletions::Seq))
                    .col(string_len_uniq(StoredCompletions::Id, 128))
                    .col(id(StoredCompletions::UserId))
                    .col(id(StoredCompletions::KeyId))
                    .col(string_len(StoredCompletions::Model, 128))
                    .col(text(StoredCompletions::Metadata))
                    .col(json_text(b, StoredCompletions::Messages))
                    .col(json_text(b, StoredCompletions::Response))
                    .col(instant(b, StoredCompletions::CreatedAt))
                    .to_owned(),
            )
            .await?;
        for (name, cols) in [
            ("idx_completions_user_seq", &["user_id", "seq"][..]),
            (
                "idx_completions_user_model_seq",
                &["user_id", "model", "seq"][..],
            ),
            ("idx_completions_at", &["created_at"][..]),
        ] {
            manager
                .create_index(index(name, StoredCompletions::Table, cols))
                .await?;
        }

        manager
            .create_table(
                Table::create()
                    .table(StoredCompletionMetadata::Table)
                    .col(string_len(StoredCompletionMetadata::CompletionId, 128))
                    .col(string_len(StoredCompletionMetadata::MetaKey, 64))
                    .col(string_len(StoredCompletionMetadata::MetaValue, 512))
                    .primary_key(
                        Index::create()
                            .col(StoredCompletionMetadata::CompletionId)
                            .col(StoredCompletionMetadata::MetaKey),
                    )
                    .to_owned(),
            )
            .await
        // `usage_records.response_id` / `conversation_id` come with the catalog migration.
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for t in [
            Alias::new("stored_completion_metadata"),
            Alias::new("stored_completions"),
            Alias::new("conversation_items"),
            Alias::new("conversations"),
            Alias::new("responses"),
        ] {
            manager
                .drop_table(Table::drop().table(t).to_owned())
                .await?;
        }
        Ok(())
    }
}
