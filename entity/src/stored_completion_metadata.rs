//! `stored_completion_metadata`: one row per metadata pair of a stored chat completion, so
//! `GET /v1/chat/completions?metadata[k]=v` filters in SQL on every backend.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "stored_completion_metadata")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub completion_id: String,
    #[sea_orm(primary_key, auto_increment = false)]
    pub meta_key: String,
    pub meta_value: String,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
