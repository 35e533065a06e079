//! Queries of stored responses (`responses`). Every read and delete names the owner.

use chrono::{DateTime, Utc};
use entity::responses;
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, EntityTrait, PaginatorTrait, QueryFilter,
    QuerySelect,
};

pub async fn insert(
    db: &impl ConnectionTrait,
    row: responses::Model,
) -> Result<(), sea_orm::DbErr> {
    responses::Entity::insert(responses::ActiveModel {
        id: Set(row.id),
        user_id: Set(row.user_id),
        key_id: Set(row.key_id),
        model: Set(row.model),
        status: Set(row.status),
        previous_response_id: Set(row.previous_response_id),
        conversation_id: Set(row.conversation_id),
        input_items: Set(row.input_items),
        response: Set(row.response),
        input_tokens: Set(row.input_tokens),
        output_tokens: Set(row.output_tokens),
        created_at: Set(row.created_at),
    })
    .exec_without_returning(db)
    .await?;
    Ok(())
}

/// The user's response `id`.
pub async fn get(
    db: &impl ConnectionTrait,
    user_id: &str,
    id: &str,
) -> Result<Option<responses::Model>, sea_orm::DbErr> {
    responses::Entity::find_by_id(id.to_owned())
        .filter(responses::Column::UserId.eq(user_id))
        .one(db)
        .await
}

/// What walking a `previous_response_id` chain needs of one response.
#[derive(Debug, Clone)]
pub struct ChainLink {
    pub previous_response_id: Option<String>,
    pub input_items: String,
    pub response: String,
}

/// One link of the user's chain.
pub async fn link(
    db: &impl ConnectionTrait,
    user_id: &str,
    id: &str,
) -> Result<Option<ChainLink>, sea_orm::DbErr> {
    let row: Option<(Option<String>, String, String)> =
        responses::Entity::find_by_id(id.to_owned())
            .select_only()
            .column(responses::Column::PreviousResponseId)
            .column(responses::Column::InputItems)
            .column(responses::Column::Response)
            .filter(responses::Column::UserId.eq(user_id))
            .into_tuple()
            .one(db)
            .await?;
    Ok(
        row.map(|(previous_response_id, input_items, response)| ChainLink {
            previous_response_id,
            input_items,
            response,
        }),
    )
}

/// Deletes the user's response; false when there is none.
pub async fn delete(
    db: &impl ConnectionTrait,
    user_id: &str,
    id: &str,
) -> Result<bool, sea_orm::DbErr> {
    let res = responses::Entity::delete_many()
        .filter(responses::Column::Id.eq(id))
        .filter(responses::Column::UserId.eq(user_id))
        .exec(db)
        .await?;
    Ok(res.rows_affected > 0)
}

/// Deletes up to `limit` responses created before `cutoff`; returns how many.
pub async fn prune_batch(
    db: &impl ConnectionTrait,
    cutoff: DateTime<Utc>,
    limit: u64,
) -> Result<u64, sea_orm::DbErr> {
    let ids: Vec<String> = responses::Entity::find()
        .select_only()
        .column(responses::Column::Id)
        .filter(responses::Column::CreatedAt.lt(cutoff))
        .limit(limit)
        .into_tuple()
        .all(db)
        .await?;
    if ids.is_empty() {
        return Ok(0);
    }
    let res = responses::Entity::delete_many()
        .filter(responses::Column::Id.is_in(ids))
        .exec(db)
        .await?;
    Ok(res.rows_affected)
}

/// Every stored response (for the admin's counts; never their content).
pub async fn count(db: &impl ConnectionTrait) -> Result<u64, sea_orm::DbErr> {
    responses::Entity::find().count(db).await
}
