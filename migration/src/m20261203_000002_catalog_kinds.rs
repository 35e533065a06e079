//! Part two's catalog and meter (spec §8, §10): provider kinds beyond OpenAI need an API version
//! (Azure), a region (Bedrock) and to say whether they speak the Responses API; models gain the
//! prices of cache writes, images, audio minutes and characters; usage records gain cache-write
//! and reasoning tokens and the stored response or conversation a call belongs to.
//!
//! One column per ALTER: SQLite takes a single ADD COLUMN per statement.

use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Providers {
    Table,
    Kind,
    BaseUrl,
    SupportsResponses,
    ApiVersion,
    Region,
}

#[derive(DeriveIden)]
enum Models {
    Table,
    CacheWriteInputPriceNanos,
    PricePerImageNanos,
    PricePerMinuteNanos,
    #[sea_orm(iden = "price_per_1m_chars_nanos")]
    PricePer1mCharsNanos,
}

#[derive(DeriveIden)]
enum UsageRecords {
    Table,
    CacheWriteTokens,
    ReasoningTokens,
    ResponseId,
    ConversationId,
}

async fn add(
    manager: &SchemaManager<'_>,
    table: impl IntoIden,
    col: ColumnDef,
) -> Result<(), DbErr> {
    manager
        .alter_table(Table::alter().table(table).add_column(col).to_owned())
        .await
}

async fn drop(
    manager: &SchemaManager<'_>,
    table: impl IntoIden,
    col: impl IntoIden,
) -> Result<(), DbErr> {
    manager
        .alter_table(Table::alter().table(table).drop_column(col).to_owned())
        .await
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        add(
            manager,
            Providers::Table,
            boolean(Providers::SupportsResponses).default(false).take(),
        )
        .await?;
        add(
            manager,
            Providers::Table,
            string_len_null(Providers::ApiVersion, 32),
        )
        .await?;
        add(
            manager,
            Providers::Table,
            string_len_null(Providers::Region, 32),
        )
        .await?;
        // The OpenAI provider the shipped config seeds serves `/responses` (spec §9); a database
        // seeded before this column existed gets what a fresh one gets.
        manager
            .exec_stmt(
                Query::update()
                    .table(Providers::Table)
                    .value(Providers::SupportsResponses, true)
                    .and_where(Expr::col(Providers::Kind).eq("openai"))
                    .and_where(Expr::col(Providers::BaseUrl).eq("https://api.openai.com/v1"))
                    .to_owned(),
            )
            .await?;
        for col in [
            Models::CacheWriteInputPriceNanos,
            Models::PricePerImageNanos,
            Models::PricePerMinuteNanos,
            Models::PricePer1mCharsNanos,
        ] {
            add(manager, Models::Table, big_integer_null(col)).await?;
        }
        add(
            manager,
            UsageRecords::Table,
            big_integer(UsageRecords::CacheWriteTokens)
                .default(0)
                .take(),
        )
        .await?;
        add(
            manager,
            UsageRecords::Table,
            big_integer(UsageRecords::ReasoningTokens).default(0).take(),
        )
        .await?;
        add(
            manager,
            UsageRecords::Table,
            string_len_null(UsageRecords::ResponseId, 64),
        )
        .await?;
        add(
            manager,
            UsageRecords::Table,
            string_len_null(UsageRecords::ConversationId, 64),
        )
        .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for col in [
            UsageRecords::ConversationId,
            UsageRecords::ResponseId,
            UsageRecords::ReasoningTokens,
            UsageRecords::CacheWriteTokens,
        ] {
            drop(manager, UsageRecords::Table, col).await?;
        }
        for col in [
            Models::PricePer1mCharsNanos,
            Models::PricePerMinuteNanos,
            Models::PricePerImageNanos,
            Models::CacheWriteInputPriceNanos,
        ] {
            drop(manager, Models::Table, col).await?;
        }
        for col in [
            Providers::Region,
            Providers::ApiVersion,
            Providers::SupportsResponses,
        ] {
            drop(manager, Providers::Table, col).await?;
        }
        Ok(())
    }
}
