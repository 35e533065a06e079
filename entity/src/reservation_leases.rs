//! `reservation_leases`: what each replica holds of a user's `reserved_nanos` or a key's, so the
//! leases of a replica that stopped heartbeating can be reclaimed.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "reservation_leases")]
pub struct Model {
    /// A fresh UUID per process start.
    #[sea_orm(primary_key, auto_increment = false)]
    pub replica_id: String,
    /// `user` (`users.reserved_nanos`) or `key` (`gateway_keys.reserved_nanos`).
    #[sea_orm(primary_key, auto_increment = false)]
    pub holder: String,
    #[sea_orm(primary_key, auto_increment = false)]
    pub holder_id: String,
    /// Part of the holder row's `reserved_nanos` this replica holds.
    pub held_nanos: i64,
    /// Last heartbeat of the replica; leases older than `billing.lease_ttl_secs` are reclaimed.
    pub heartbeat_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
