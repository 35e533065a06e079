//! `users`: accounts, their second factor, balance and limits.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "users")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    #[sea_orm(unique)]
    pub username: String,
    pub email: Option<String>,
    /// argon2id PHC string.
    pub password_hash: String,
    /// `admin` | `user`.
    pub role: String,
    /// `pending_totp` | `active` | `disabled`.
    pub status: String,
    /// Active TOTP secret, envelope-encrypted with the master key ring.
    pub totp_secret_enc: String,
    /// A rotated secret waiting for its first code (`/api/me/totp/confirm`).
    pub totp_pending_enc: Option<String>,
    /// Last accepted TOTP time step: a code is never accepted twice.
    pub totp_last_step: Option<i64>,
    /// Balance in nano-dollars (USD × 1e9).
    pub balance_nanos: i64,
    /// Sum of in-flight reservations against the balance.
    pub reserved_nanos: i64,
    pub plan: Option<String>,
    pub plan_expires_at: Option<DateTimeUtc>,
    /// Per-user requests per minute; `None` = the configured default.
    pub rpm_limit: Option<i32>,
    pub tpm_limit: Option<i32>,
    pub created_at: DateTimeUtc,
    pub updated_at: DateTimeUtc,
    pub last_login_at: Option<DateTimeUtc>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
