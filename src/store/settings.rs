//! Runtime settings stored in the database (`registration`, default limits, ...).

use chrono::Utc;
use entity::settings;
use sea_orm::{ConnectionTrait, EntityTrait, QueryOrder, Set, sea_query::OnConflict};

pub async fn get(
    db: &impl ConnectionTrait,
    key: &str,
) -> Result<Option<settings::Model>, sea_orm::DbErr> {
    settings::Entity::find_by_id(key.to_owned()).one(db).await
}

pub async fn list(db: &impl ConnectionTrait) -> Result<Vec<settings::Model>, sea_orm::DbErr> {
    settings::Entity::find()
        .order_by_asc(settings::Column::Key)
        .all(db)
        .await
}

/// Insert or replace.
pub async fn put(
    db: &impl ConnectionTrait,
    key: &str,
    value: &serde_json::Value,
    description: Option<&str>,
) -> Result<settings::Model, sea_orm::DbErr> {
    let model = settings::ActiveModel {
        key: Set(key.to_owned()),
        value: Set(value.to_string()),
        description: Set(description.map(str::to_owned)),
        updated_at: Set(Utc::now()),
    };
    settings::Entity::insert(model)
        .on_conflict(
            OnConflict::column(settings::Column::Key)
                .update_columns([
                    settings::Column::Value,
                    settings::Column::Description,
                    settings::Column::UpdatedAt,
                ])
                .to_owned(),
        )
        .exec(db)
        .await?;
    get(db, key)
        .await?
        .ok_or_else(|| sea_orm::DbErr::RecordNotFound(key.to_owned()))
}
