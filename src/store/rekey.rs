//! Re-sealing every stored secret under the newest master key (`tollgate master-key rotate`).
//!
//! Provider keys are sealed with their row id as associated data, TOTP secrets (active and
//! pending) with the user id. A value already sealed under the newest key is left alone, so the
//! loop is idempotent and can be re-run after an interruption. Each row is updated only if its
//! ciphertext is still the one that was read, so a concurrent edit is never overwritten.

use entity::{provider_keys, users};
use sea_orm::sea_query::Expr;
use sea_orm::{
    ColumnTrait, ConnectionTrait, DbErr, EntityTrait, QueryFilter, QueryOrder, QuerySelect,
};

use crate::crypto::KeyRing;

const BATCH: u64 = 500;

/// What a re-key pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RekeyReport {
    /// Provider keys re-sealed under the newest master key.
    pub provider_keys: u64,
    /// TOTP secrets (active or pending) re-sealed.
    pub totp_secrets: u64,
    /// Values that were already sealed under the newest key.
    pub already_current: u64,
    /// Values no key in the ring could open (`table/id[.column]`); left untouched.
    pub failed: Vec<String>,
}

/// Re-seals one value under the ring's newest key; `Ok(None)` when it is already current.
fn reseal(ring: &KeyRing, sealed: &str, aad: &str) -> Result<Option<String>, ()> {
    if KeyRing::sealed_key_id(sealed) == Some(ring.current_id().as_str()) {
        return Ok(None);
    }
    let plain = ring.open(sealed, aad).map_err(|_| ())?;
    Ok(Some(ring.seal(&plain, aad)))
}

/// Re-seals every provider key and TOTP secret under `ring`'s newest key.
pub async fn rekey_all(db: &impl ConnectionTrait, ring: &KeyRing) -> Result<RekeyReport, DbErr> {
    let mut report = RekeyReport::default();
    rekey_provider_keys(db, ring, &mut report).await?;
    rekey_users(db, ring, &mut report).await?;
    Ok(report)
}

async fn rekey_provider_keys(
    db: &impl ConnectionTrait,
    ring: &KeyRing,
    report: &mut RekeyReport,
) -> Result<(), DbErr> {
    let mut after: Option<String> = None;
    loop {
        let mut q = provider_keys::Entity::find().order_by_asc(provider_keys::Column::Id);
        if let Some(last) = &after {
            q = q.filter(provider_keys::Column::Id.gt(last.as_str()));
        }
        let rows = q.limit(BATCH).all(db).await?;
        let Some(last) = rows.last() else { break };
        after = Some(last.id.clone());
        for row in rows {
            match reseal(ring, &row.secret_enc, &row.id) {
                Ok(None) => report.already_current += 1,
                Ok(Some(new)) => {
                    provider_keys::Entity::update_many()
                        .col_expr(provider_keys::Column::SecretEnc, Expr::value(new))
                        .col_expr(
                            provider_keys::Column::MasterKeyId,
                            Expr::value(ring.current_id()),
                        )
                        .filter(provider_keys::Column::Id.eq(row.id.as_str()))
                        .filter(provider_keys::Column::SecretEnc.eq(row.secret_enc.as_str()))
                        .exec(db)
                        .await?;
                    report.provider_keys += 1;
                }
                Err(()) => report.failed.push(format!("provider_keys/{}", row.id)),
            }
        }
    }
    Ok(())
}

async fn rekey_users(
    db: &impl ConnectionTrait,
    ring: &KeyRing,
    report: &mut RekeyReport,
) -> Result<(), DbErr> {
    let mut after: Option<String> = None;
    loop {
        let mut q = users::Entity::find()
            .select_only()
            .column(users::Column::Id)
            .column(users::Column::TotpSecretEnc)
            .column(users::Column::TotpPendingEnc)
            .order_by_asc(users::Column::Id);
        if let Some(last) = &after {
            q = q.filter(users::Column::Id.gt(last.as_str()));
        }
        let rows: Vec<(String, String, Option<String>)> =
            q.limit(BATCH).into_tuple().all(db).await?;
        let Some(last) = rows.last() else { break };
        after = Some(last.0.clone());
        for (id, secret, pending) in rows {
            let mut values = vec![(users::Column::TotpSecretEnc, "totp_secret_enc", secret)];
            values.extend(pending.map(|p| (users::Column::TotpPendingEnc, "totp_pending_enc", p)));
            for (col, col_name, sealed) in values {
                if sealed.is_empty() {
                    continue;
                }
                match reseal(ring, &sealed, &id) {
                    Ok(None) => report.already_current += 1,
                    Ok(Some(new)) => {
                        users::Entity::update_many()
                            .col_expr(col, Expr::value(new))
                            .filter(users::Column::Id.eq(id.as_str()))
                            .filter(col.eq(sealed.as_str()))
                            .exec(db)
                            .await?;
                        report.totp_secrets += 1;
                    }
                    Err(()) => report.failed.push(format!("users/{id}.{col_name}")),
                }
            }
        }
    }
    Ok(())
}
