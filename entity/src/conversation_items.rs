//! `conversation_items`: the items of a conversation, in `position` order.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "conversation_items")]
pub struct Model {
    /// Row id, for batched retention deletes; the order is `position`.
    #[sea_orm(primary_key)]
    pub seq: i64,
    pub conversation_id: String,
    /// Unique within the conversation; an append takes consecutive positions.
    pub position: i64,
    /// The item's `id` (`msg_…`, `fc_…`, …).
    pub item_id: String,
    pub user_id: String,
    /// JSON: the item object as the Responses API renders it.
    pub item: String,
    /// The response whose input or output this item was, if any.
    pub response_id: Option<String>,
    pub created_at: DateTimeUtc,
    /// The item's text as the full-text index sees it (a message's text parts); `None` for items
    /// without text and for those stored before the column.
    pub content_text: Option<String>,
    /// The model that wrote this answer (chat, `/api/chat`), if known.
    pub model: Option<String>,
    /// The answer's completion tokens (chat), if known.
    pub tokens: Option<i64>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
