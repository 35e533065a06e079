//! `provider_keys`: users' own upstream credentials, encrypted at rest.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "provider_keys")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    pub user_id: String,
    pub provider_key: String,
    pub label: Option<String>,
    /// Overrides the provider's base URL for this key.
    pub base_url: Option<String>,
    /// Envelope: `<key id>:<base64 nonce>:<base64 ciphertext>` (AES-256-GCM).
    pub secret_enc: String,
    /// Id of the master key that sealed `secret_enc` (for rotation).
    pub master_key_id: String,
    /// Display form, e.g. `sk-ab…wxyz`, computed once at creation.
    pub masked: String,
    /// An admin's key that serves every user without one for this provider.
    pub shared: bool,
    pub is_active: bool,
    /// Share of the pool's requests (1–100) among the owner's keys for the provider.
    pub weight: i32,
    /// `active` | `invalid` (the upstream answered 401/403; out of use until edited or verified).
    pub status: String,
    pub created_at: DateTimeUtc,
    pub updated_at: DateTimeUtc,
    pub last_used_at: Option<DateTimeUtc>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
