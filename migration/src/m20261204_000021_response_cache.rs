//! The response cache (spec §11): a gateway key's `cache_ttl_secs` (0 = off) and a usage
//! record's `cache_hit` (answered from the cache: no upstream call, cost 0). One column per
//! ALTER: SQLite takes a single ADD COLUMN per statement.

use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum GatewayKeys {
    Table,
    CacheTtlSecs,
}

#[derive(DeriveIden)]
enum UsageRecords {
    Table,
    CacheHit,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(GatewayKeys::Table)
                    .add_column(integer(GatewayKeys::CacheTtlSecs).default(0).take())
                    .to_owned(),
            )
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table(UsageRecords::Table)
                    .add_column(boolean(UsageRecords::CacheHit).default(false).take())
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(UsageRecords::Table)
                    .drop_column(UsageRecords::CacheHit)
                    .to_owned(),
            )
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table(GatewayKeys::Table)
                    .drop_column(GatewayKeys::CacheTtlSecs)
                    .to_owned(),
            )
            .await
    }
}
