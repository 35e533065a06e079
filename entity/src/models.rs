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
    /// Per 1M cache-write tokens (Anthropic cache creation); the input price when unset.
    pub cache_write_input_price_nanos: Option<i64>,
    /// Per image generated (nano-dollars), when the upstream reports no token usage.
    pub price_per_image_nanos: Option<i64>,
    /// Per minute of audio (nano-dollars).
    pub price_per_minute_nanos: Option<i64>,
    /// Per 1M characters of input (speech), nano-dollars.
    #[sea_orm(column_name = "price_per_1m_chars_nanos")]
    pub price_per_1m_chars_nanos: Option<i64>,
    pub context_window: Option<i32>,
    pub max_output_tokens: Option<i32>,
    pub supports_streaming: bool,
    pub supports_tools: bool,
    pub supports_vision: bool,
    pub description: Option<String>,
    pub is_active: bool,
    pub sort_order: i32,
    /// JSON `[{provider, upstream_model, weight, priority}]` when the model has several
    /// deployments (the first is also in `provider_key` / `upstream_model`); `None`: one.
    pub deployments: Option<String>,
    /// JSON `["model-b", …]`: catalog models tried in order when every deployment failed.
    pub fallbacks: Option<String>,
    pub created_at: DateTimeUtc,
    pub updated_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
