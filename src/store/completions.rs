//! Queries of stored chat completions (`stored_completions`, `stored_completion_metadata`).
//! Every read and write names the owner.

use chrono::{DateTime, Utc};
use entity::{stored_completion_metadata as meta, stored_completions};
use sea_orm::sea_query::{Expr, ExprTrait, Query};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, EntityTrait, PaginatorTrait, QueryFilter,
    QueryOrder, QuerySelect,
};

pub use crate::conversations::paging::Order;

/// Inserts the completion and one metadata row per pair.
pub async fn insert(
    db: &impl ConnectionTrait,
    row: stored_completions::Model,
    pairs: &[(String, String)],
) -> Result<(), sea_orm::DbErr> {
    let id = row.id.clone();
    stored_completions::Entity::insert(stored_completions::ActiveModel {
        id: Set(row.id),
        user_id: Set(row.user_id),
        key_id: Set(row.key_id),
        model: Set(row.model),
        metadata: Set(row.metadata),
        messages: Set(row.messages),
        response: Set(row.response),
        created_at: Set(row.created_at),
        ..Default::default()
    })
    .exec_without_returning(db)
    .await?;
    insert_pairs(db, &id, pairs).await
}

async fn insert_pairs(
    db: &impl ConnectionTrait,
    id: &str,
    pairs: &[(String, String)],
) -> Result<(), sea_orm::DbErr> {
    if pairs.is_empty() {
        return Ok(());
    }
    meta::Entity::insert_many(pairs.iter().map(|(k, v)| meta::ActiveModel {
        completion_id: Set(id.to_owned()),
        meta_key: Set(k.clone()),
        meta_value: Set(v.clone()),
    }))
    .exec_without_returning(db)
    .await?;
    Ok(())
}

/// The user's stored completion `id`.
pub async fn get(
    db: &impl ConnectionTrait,
    user_id: &str,
    id: &str,
) -> Result<Option<stored_completions::Model>, sea_orm::DbErr> {
    stored_completions::Entity::find()
        .filter(stored_completions::Column::Id.eq(id))
        .filter(stored_completions::Column::UserId.eq(user_id))
        .one(db)
        .await
}

/// What a listing is narrowed to.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub model: Option<String>,
    /// Every pair must be in the completion's metadata.
    pub metadata: Vec<(String, String)>,
}

/// Up to `limit` of the user's completions matching `filter`, in `order` of creation, strictly
/// after row `after` (a `seq`) in that order when given.
pub async fn list(
    db: &impl ConnectionTrait,
    user_id: &str,
    filter: &Filter,
    after: Option<i64>,
    limit: u64,
    order: Order,
) -> Result<Vec<stored_completions::Model>, sea_orm::DbErr> {
    let mut q =
        stored_completions::Entity::find().filter(stored_completions::Column::UserId.eq(user_id));
    if let Some(m) = &filter.model {
        q = q.filter(stored_completions::Column::Model.eq(m.as_str()));
    }
    for (k, v) in &filter.metadata {
        q = q.filter(Expr::exists(
            Query::select()
                .expr(Expr::val(1))
                .from(meta::Entity)
                .and_where(
                    Expr::col((meta::Entity, meta::Column::CompletionId))
                        .equals((stored_completions::Entity, stored_completions::Column::Id)),
                )
                .and_where(Expr::col((meta::Entity, meta::Column::MetaKey)).eq(k.as_str()))
                .and_where(Expr::col((meta::Entity, meta::Column::MetaValue)).eq(v.as_str()))
                .to_owned(),
        ));
    }
    q = match (order, after) {
        (Order::Asc, Some(s)) => q.filter(stored_completions::Column::Seq.gt(s)),
        (Order::Desc, Some(s)) => q.filter(stored_completions::Column::Seq.lt(s)),
        _ => q,
    };
    q = match order {
        Order::Asc => q.order_by_asc(stored_completions::Column::Seq),
        Order::Desc => q.order_by_desc(stored_completions::Column::Seq),
    };
    q.limit(limit).all(db).await
}

/// Replaces the metadata (the JSON and the pairs); false when the user has no such completion.
pub async fn set_metadata(
    db: &impl ConnectionTrait,
    user_id: &str,
    id: &str,
    metadata: String,
    pairs: &[(String, String)],
) -> Result<bool, sea_orm::DbErr> {
    let res = stored_completions::Entity::update_many()
        .col_expr(stored_completions::Column::Metadata, Expr::value(metadata))
        .filter(stored_completions::Column::Id.eq(id))
        .filter(stored_completions::Column::UserId.eq(user_id))
        .exec(db)
        .await?;
    if res.rows_affected == 0 {
        // MySQL counts changed rows only: an update to the same metadata reports 0.
        if get(db, user_id, id).await?.is_none() {
            return Ok(false);
        }
    }
    meta::Entity::delete_many()
        .filter(meta::Column::CompletionId.eq(id))
        .exec(db)
        .await?;
    insert_pairs(db, id, pairs).await?;
    Ok(true)
}

/// Deletes the user's completion and its metadata rows; false when there is none.
pub async fn delete(
    db: &impl ConnectionTrait,
    user_id: &str,
    id: &str,
) -> Result<bool, sea_orm::DbErr> {
    let res = stored_completions::Entity::delete_many()
        .filter(stored_completions::Column::Id.eq(id))
        .filter(stored_completions::Column::UserId.eq(user_id))
        .exec(db)
        .await?;
    if res.rows_affected == 0 {
        return Ok(false);
    }
    meta::Entity::delete_many()
        .filter(meta::Column::CompletionId.eq(id))
        .exec(db)
        .await?;
    Ok(true)
}

/// Deletes up to `limit` completions created before `cutoff`, with their metadata rows.
pub async fn prune_batch(
    db: &impl ConnectionTrait,
    cutoff: DateTime<Utc>,
    limit: u64,
) -> Result<u64, sea_orm::DbErr> {
    let rows: Vec<(i64, String)> = stored_completions::Entity::find()
        .select_only()
        .column(stored_completions::Column::Seq)
        .column(stored_completions::Column::Id)
        .filter(stored_completions::Column::CreatedAt.lt(cutoff))
        .limit(limit)
        .into_tuple()
        .all(db)
        .await?;
    if rows.is_empty() {
        return Ok(0);
    }
    let (seqs, ids): (Vec<i64>, Vec<String>) = rows.into_iter().unzip();
    meta::Entity::delete_many()
        .filter(meta::Column::CompletionId.is_in(ids))
        .exec(db)
        .await?;
    let res = stored_completions::Entity::delete_many()
        .filter(stored_completions::Column::Seq.is_in(seqs))
        .exec(db)
        .await?;
    Ok(res.rows_affected)
}

/// Every stored completion (for the admin's counts; never their content).
pub async fn count(db: &impl ConnectionTrait) -> Result<u64, sea_orm::DbErr> {
    stored_completions::Entity::find().count(db).await
}
