//! `conversations`: a conversation of the Conversations API (`/v1/conversations`), also the
//! conversation of the signed-in chat (`/api/chat`); its items are in `conversation_items`.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "conversations")]
pub struct Model {
    /// `conv_…`.
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    pub user_id: String,
    /// JSON object of at most 16 string pairs (OpenAI's metadata).
    pub metadata: String,
    /// The chat's title (`/api/conversations`); `None` for one made through `/v1`.
    pub title: Option<String>,
    /// The model the chat last used; `None` for one made through `/v1`.
    pub model: Option<String>,
    /// The position the next appended item takes; bumped under this row's lock by each append.
    pub next_position: i64,
    pub created_at: DateTimeUtc,
    /// Last change: an item appended or deleted, metadata or title changed.
    pub updated_at: DateTimeUtc,
    /// SHA-256 (hex) of the share link's token (`/share/{token}`); `None` when not shared.
    pub share_token_hash: Option<String>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
