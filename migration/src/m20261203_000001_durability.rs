//! Crash safety (issue 18): reservation leases recorded per replica, so a replica that died
//! holding them can be reclaimed by the others, and a unique id per usage record, so the local
//! usage spool can be replayed after a `kill -9` without writing a record twice.

use sea_orm_migration::{prelude::*, schema::*};

use crate::columns::instant;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum ReservationLeases {
    Table,
    ReplicaId,
    Holder,
    HolderId,
    HeldNanos,
    HeartbeatAt,
}

#[derive(DeriveIden)]
enum UsageRecords {
    Table,
    EventId,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let b = manager.get_database_backend();
        manager
            .create_table(
                Table::create()
                    .table(ReservationLeases::Table)
                    .col(string_len(ReservationLeases::ReplicaId, 36))
                    .col(string_len(ReservationLeases::Holder, 8))
                    .col(string_len(ReservationLeases::HolderId, 64))
                    .col(big_integer(ReservationLeases::HeldNanos).default(0))
                    .col(instant(b, ReservationLeases::HeartbeatAt))
                    .primary_key(
                        Index::create()
                            .col(ReservationLeases::ReplicaId)
                            .col(ReservationLeases::Holder)
                            .col(ReservationLeases::HolderId),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_leases_heartbeat")
                    .table(ReservationLeases::Table)
                    .col(ReservationLeases::HeartbeatAt)
                    .to_owned(),
            )
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table(UsageRecords::Table)
                    .add_column(string_len_null(UsageRecords::EventId, 36))
                    .to_owned(),
            )
            .await?;
        // NULL for records written before this migration: every backend lets NULLs repeat.
        manager
            .create_index(
                Index::create()
                    .name("idx_usage_event")
                    .table(UsageRecords::Table)
                    .col(UsageRecords::EventId)
                    .unique()
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_index(
                Index::drop()
                    .name("idx_usage_event")
                    .table(UsageRecords::Table)
                    .to_owned(),
            )
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table(UsageRecords::Table)
                    .drop_column(UsageRecords::EventId)
                    .to_owned(),
            )
            .await?;
        manager
            .drop_table(Table::drop().table(ReservationLeases::Table).to_owned())
            .await
    }
}
