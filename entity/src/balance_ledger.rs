//! `balance_ledger`: append-only record of every balance change; entries sum to the balance.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "balance_ledger")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    pub user_id: String,
    pub at: DateTimeUtc,
    pub amount_nanos: i64,
    /// `grant` | `usage` | `adjustment` | `renewal`.
    pub kind: String,
    pub note: Option<String>,
    pub balance_after_nanos: i64,
    pub actor_id: Option<String>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
