//! `stored_completions`: chat completions made with `store: true`.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "stored_completions")]
pub struct Model {
    /// Row id: the list order (`after` pages by it).
    #[sea_orm(primary_key)]
    pub seq: i64,
    /// `chatcmpl-…`, unique.
    pub id: String,
    pub user_id: String,
    pub key_id: String,
    pub model: String,
    /// JSON object of at most 16 string pairs; also one row each in `stored_completion_metadata`.
    pub metadata: String,
    /// JSON array: the request's messages.
    pub messages: String,
    /// JSON: the `chat.completion` object the client received.
    pub response: String,
    pub created_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
