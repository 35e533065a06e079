//! `models`: the priced catalog clients choose from.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "models")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    /// What clients send as `model`.
    #[sea_orm(unique)]
    pub name: String,
    pub display_name: String,
    pub provider_key: String,
    pub upstream_model: String,
    /// `chat` | `completion` | `embedding`.
    pub model_type: String,
    /// Prices in nano-dollars per 1M tokens.
    pub input_price_nanos: i64,
    pub output_price_nanos: i64,
    pub cached_input_price_nanos: Option<i64>,
    pub context_window: Option<i32>,
    pub max_output_tokens: Option<i32>,
    pub supports_streaming: bool,
    pub supports_tools: bool,
    pub supports_vision: bool,
    pub description: Option<String>,
    pub is_active: bool,
    pub sort_order: i32,
    pub created_at: DateTimeUtc,
    pub updated_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
