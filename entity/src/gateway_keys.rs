//! `gateway_keys`: the `sk-tg-…` keys SDKs present on `/v1`. Only a SHA-256 of the secret is kept.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "gateway_keys")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    pub user_id: String,
    pub name: String,
    /// Hex SHA-256 of the full secret.
    #[sea_orm(unique)]
    pub key_hash: String,
    pub masked: String,
    /// JSON array of model names; `None` = every model.
    pub allowed_models: Option<String>,
    /// JSON array of CIDRs; `None` = any address.
    pub allowed_ips: Option<String>,
    pub rpm_limit: Option<i32>,
    pub tpm_limit: Option<i32>,
    pub budget_nanos: Option<i64>,
    pub spent_nanos: i64,
    /// Sum of in-flight reservations against the budget.
    pub reserved_nanos: i64,
    pub expires_at: Option<DateTimeUtc>,
    pub is_active: bool,
    pub last_used_at: Option<DateTimeUtc>,
    pub created_at: DateTimeUtc,
    pub updated_at: DateTimeUtc,
    /// Seconds an identical non-streamed answer is served from the response cache; 0 = off.
    pub cache_ttl_secs: i32,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
