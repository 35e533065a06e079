//! `usage_records`: one row per request that reached an upstream.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "usage_records")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    pub at: DateTimeUtc,
    pub user_id: String,
    pub key_id: String,
    pub model: String,
    pub provider: String,
    /// `chat.completions` | `completions` | `embeddings`.
    pub endpoint: String,
    pub stream: bool,
    /// HTTP status the client saw (or 499 when the client left first).
    pub status: i32,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub cached_tokens: i64,
    /// Prompt tokens written to the provider's cache (inside `prompt_tokens`).
    pub cache_write_tokens: i64,
    /// Hidden reasoning tokens (inside `completion_tokens`).
    pub reasoning_tokens: i64,
    pub cost_nanos: i64,
    pub latency_ms: i64,
    pub ttft_ms: Option<i64>,
    /// True when the upstream reported no usage and the gateway counted.
    pub tokens_estimated: bool,
    pub request_id: String,
    /// Which key paid: a shared platform provider key charges the user's balance.
    pub shared_key: bool,
    pub error: Option<String>,
    /// Unique per record (a UUIDv7 made at admission): the usage spool replays by it after a
    /// crash without writing a record twice. `None` for records older than the column.
    pub event_id: Option<String>,
    /// The stored response this request made or read (`resp_…`), if any.
    pub response_id: Option<String>,
    /// The conversation this request ran in or read (`conv_…`), if any.
    pub conversation_id: Option<String>,
    /// Upstream attempts behind this request (≥ 1; retries and fallbacks included).
    pub attempts: i32,
    /// The model the client asked for, when a fallback model answered (`model` is that one).
    pub fallback_from: Option<String>,
    /// Answered from the response cache: no upstream call, `cost_nanos` 0.
    pub cache_hit: bool,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
