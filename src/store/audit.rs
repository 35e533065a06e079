//! The audit log: written for every state-changing management call, read by users and admins.

use chrono::Utc;
use entity::audit_log;
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, EntityTrait, PaginatorTrait, QueryFilter,
    QueryOrder, QuerySelect, Set,
};

use super::{Page, PageReq};

/// Who did what to what, from where. `detail` must never hold a secret.
#[derive(Debug, Clone, Default)]
pub struct AuditEntry<'a> {
    pub actor_id: Option<&'a str>,
    pub action: &'a str,
    pub target: Option<String>,
    pub ip: Option<&'a str>,
    pub detail: Option<serde_json::Value>,
}

pub async fn record(db: &impl ConnectionTrait, e: AuditEntry<'_>) -> Result<(), sea_orm::DbErr> {
    audit_log::ActiveModel {
        at: Set(Utc::now()),
        actor_id: Set(e.actor_id.map(str::to_owned)),
        action: Set(e.action.to_owned()),
        target: Set(e.target),
        ip: Set(e.ip.map(str::to_owned)),
        detail: Set(e.detail.map(|d| d.to_string())),
        ..Default::default()
    }
    .insert(db)
    .await?;
    Ok(())
}

/// Newest first; `actor_id = None` lists everyone's (admin view).
pub async fn list(
    db: &impl ConnectionTrait,
    actor_id: Option<&str>,
    action: Option<&str>,
    page: PageReq,
) -> Result<Page<audit_log::Model>, sea_orm::DbErr> {
    let mut q = audit_log::Entity::find();
    if let Some(a) = actor_id {
        q = q.filter(audit_log::Column::ActorId.eq(a));
    }
    if let Some(a) = action {
        q = q.filter(audit_log::Column::Action.eq(a));
    }
    let total = q.clone().count(db).await?;
    let items = q
        .order_by_desc(audit_log::Column::At)
        .order_by_desc(audit_log::Column::Id)
        .offset(page.offset())
        .limit(page.per_page)
        .all(db)
        .await?;
    Ok(Page { items, total })
}
