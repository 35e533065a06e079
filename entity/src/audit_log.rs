//! `audit_log`: one entry per state-changing management call.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "audit_log")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    pub at: DateTimeUtc,
    /// Who did it (`None` for the CLI or an anonymous call such as register).
    pub actor_id: Option<String>,
    pub action: String,
    /// What it was done to, e.g. `user:<id>`, `gateway_key:<id>`.
    pub target: Option<String>,
    pub ip: Option<String>,
    /// JSON with the non-secret particulars.
    pub detail: Option<String>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
