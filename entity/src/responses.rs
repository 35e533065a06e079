//! `responses`: one row per stored Responses API response (`store: true`), for any provider.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "responses")]
pub struct Model {
    /// `resp_…`.
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    /// The owner: the user of the gateway key that made it; every key of theirs sees it.
    pub user_id: String,
    pub key_id: String,
    pub model: String,
    /// `completed` | `failed` | `incomplete` | `cancelled` | `in_progress` | `queued`.
    pub status: String,
    /// The response this one continued; its history is replayed before this one's input.
    pub previous_response_id: Option<String>,
    pub conversation_id: Option<String>,
    /// JSON array: this turn's own input items, ids assigned (not the replayed history).
    pub input_items: String,
    /// JSON: the response object as the client received it (`output` included).
    pub response: String,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub created_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
