//! Routing (spec §11): a catalog model's deployments and fallback models, provider-key pools
//! (a weight per key, and `status` so a key its upstream refused stays out of use until its owner
//! edits or re-verifies it), and what a usage record says about the attempts behind it.
//!
//! Deployments and fallbacks are small bounded JSON lists on the model row (at most 16 and 8
//! entries, checked at save): the catalog is read whole into the cache, so a side table would
//! only add a join to that load. One column per ALTER: SQLite takes a single ADD COLUMN per
//! statement.

use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Models {
    Table,
    Deployments,
    Fallbacks,
}

#[derive(DeriveIden)]
enum ProviderKeys {
    Table,
    Weight,
    Status,
}

#[derive(DeriveIden)]
enum UsageRecords {
    Table,
    Attempts,
    FallbackFrom,
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
        add(manager, Models::Table, text_null(Models::Deployments)).await?;
        add(manager, Models::Table, text_null(Models::Fallbacks)).await?;
        add(
            manager,
            ProviderKeys::Table,
            integer(ProviderKeys::Weight).default(1).take(),
        )
        .await?;
        add(
            manager,
            ProviderKeys::Table,
            string_len(ProviderKeys::Status, 16)
                .default("active")
                .take(),
        )
        .await?;
        add(
            manager,
            UsageRecords::Table,
            integer(UsageRecords::Attempts).default(1).take(),
        )
        .await?;
        add(
            manager,
            UsageRecords::Table,
            string_len_null(UsageRecords::FallbackFrom, 128),
        )
        .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        drop(manager, UsageRecords::Table, UsageRecords::FallbackFrom).await?;
        drop(manager, UsageRecords::Table, UsageRecords::Attempts).await?;
        drop(manager, ProviderKeys::Table, ProviderKeys::Status).await?;
        drop(manager, ProviderKeys::Table, ProviderKeys::Weight).await?;
        drop(manager, Models::Table, Models::Fallbacks).await?;
        drop(manager, Models::Table, Models::Deployments).await
    }
}
