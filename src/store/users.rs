//! Users: lookups and the conditional updates that keep second factors single-use.

use entity::users;
use sea_orm::sea_query::Expr;
use sea_orm::sea_query::ExprTrait;
use sea_orm::{ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter};

pub async fn find(
    db: &impl ConnectionTrait,
    id: &str,
) -> Result<Option<users::Model>, sea_orm::DbErr> {
    users::Entity::find_by_id(id.to_owned()).one(db).await
}

pub async fn find_by_username(
    db: &impl ConnectionTrait,
    username: &str,
) -> Result<Option<users::Model>, sea_orm::DbErr> {
    users::Entity::find()
        .filter(users::Column::Username.eq(username))
        .one(db)
        .await
}

/// Records `step` as the last accepted TOTP step, only if it is newer than the one stored.
/// Returns false when the code was already used (or an older one): the caller must refuse it.
/// Atomic in SQL, so two replicas cannot both accept one code.
pub async fn consume_totp_step(
    db: &impl ConnectionTrait,
    user_id: &str,
    step: i64,
) -> Result<bool, sea_orm::DbErr> {
    let res = users::Entity::update_many()
        .col_expr(users::Column::TotpLastStep, Expr::value(step))
        .filter(users::Column::Id.eq(user_id))
        .filter(
            users::Column::TotpLastStep
                .is_null()
                .or(users::Column::TotpLastStep.lt(step)),
        )
        .exec(db)
        .await?;
    Ok(res.rows_affected == 1)
}
