//! `providers`: upstream APIs in the catalog.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "providers")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub key: String,
    pub display_name: String,
    pub base_url: String,
    /// `openai` = any OpenAI-compatible upstream.
    pub kind: String,
    pub is_active: bool,
    /// `openai` kind only: the upstream serves `/responses` (requests go there, not translated).
    pub supports_responses: bool,
    /// `azure`: the `api-version` query (the `/openai/v1/` API when unset).
    pub api_version: Option<String>,
    /// `bedrock`: the AWS region.
    pub region: Option<String>,
    pub sort_order: i32,
    pub created_at: DateTimeUtc,
    pub updated_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
