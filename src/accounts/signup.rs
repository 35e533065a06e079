//! Creating accounts — one path for self-service registration, admin-created users and the
//! `tollgate admin create` bootstrap: validate, hash, enrol TOTP (sealed), insert, initial grant.

use chrono::Utc;
use entity::users;
use sea_orm::{DatabaseConnection, TransactionTrait};

use crate::accounts::{password, totp};
use crate::config::Config;
use crate::crypto::KeyRing;
use crate::error::ApiError;
use crate::store;
use crate::store::ledger::{self, Kind};
use crate::validate;

/// `admin` | `user`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Admin,
    User,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::User => "user",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "admin" => Some(Role::Admin),
            "user" => Some(Role::User),
            _ => None,
        }
    }
}

/// What a new account is made of.
#[derive(Debug, Clone)]
pub struct NewUser<'a> {
    pub username: &'a str,
    pub password: &'a str,
    pub email: Option<&'a str>,
    pub role: Role,
    /// `true` only for the CLI bootstrap, whose operator receives the secret directly; everyone
    /// else starts `pending_totp` and proves the enrolment with a first code.
    pub active: bool,
}

/// A created account and its enrolment (the only time the TOTP secret is shown).
#[derive(Debug)]
pub struct Created {
    pub user: users::Model,
    pub totp: totp::Enrolment,
}

#[derive(Debug, thiserror::Error)]
pub enum SignupError {
    #[error("username must be 3–32 characters of A–Z, a–z, 0–9, '_', '.', '-'")]
    InvalidUsername,
    #[error("password must be 8–128 characters")]
    InvalidPassword,
    #[error("email is not a valid e-mail address")]
    InvalidEmail,
    #[error("username `{0}` is already taken")]
    Duplicate(String),
    #[error(transparent)]
    Hash(#[from] password::HashError),
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl From<SignupError> for ApiError {
    fn from(e: SignupError) -> Self {
        let message = e.to_string();
        match e {
            SignupError::InvalidUsername => ApiError::invalid_param("username", message),
            SignupError::InvalidPassword => ApiError::invalid_param("password", message),
            SignupError::InvalidEmail => ApiError::invalid_param("email", message),
            SignupError::Duplicate(_) => ApiError::conflict(message),
            SignupError::Hash(h) => h.into(),
            SignupError::Internal(e) => ApiError::internal(e),
        }
    }
}

/// An e-mail from a request: blank means none; anything else must look like an address.
pub fn normalize_email(email: Option<&str>) -> Result<Option<String>, SignupError> {
    match email.map(str::trim).filter(|e| !e.is_empty()) {
        None => Ok(None),
        Some(e) if validate::email(e) => Ok(Some(e.to_owned())),
        Some(_) => Err(SignupError::InvalidEmail),
    }
}

/// A fresh TOTP secret for `user_id`: sealed for storage (AAD = the user id) and the enrolment
/// to show once.
pub fn new_enrolment(
    keyring: &KeyRing,
    user_id: &str,
    username: &str,
) -> anyhow::Result<(String, totp::Enrolment)> {
    let secret = totp::new_secret();
    let enrolment = totp::enrolment(&secret, username)?;
    Ok((keyring.seal(secret.as_bytes(), user_id), enrolment))
}

/// Creates the account (and its `grant` ledger entry when `billing.initial_balance_usd` > 0) in
/// one transaction.
pub async fn create(
    db: &DatabaseConnection,
    keyring: &KeyRing,
    config: &Config,
    new: NewUser<'_>,
) -> Result<Created, SignupError> {
    if !validate::username(new.username) {
        return Err(SignupError::InvalidUsername);
    }
    if !validate::password(new.password) {
        return Err(SignupError::InvalidPassword);
    }
    let email = normalize_email(new.email)?;
    let password_hash = password::hash(new.password).await?;
    let id = store::new_id();
    let (sealed, enrolment) = new_enrolment(keyring, &id, new.username)?;
    let now = Utc::now();
    let row = users::Model {
        id: id.clone(),
        username: new.username.to_owned(),
        email,
        password_hash,
        role: new.role.as_str().to_owned(),
        status: if new.active { "active" } else { "pending_totp" }.to_owned(),
        totp_secret_enc: sealed,
        totp_pending_enc: None,
        totp_last_step: None,
        balance_nanos: 0,
        reserved_nanos: 0,
        plan: None,
        plan_expires_at: None,
        rpm_limit: None,
        tpm_limit: None,
        created_at: now,
        updated_at: now,
        last_login_at: None,
    };
    let grant = store::usd_to_nanos(config.billing.initial_balance_usd);

    let txn = db.begin().await.map_err(anyhow::Error::from)?;
    let mut user = match store::users::insert(&txn, row).await {
        Ok(u) => u,
        Err(e) if store::is_unique_violation(&e) => {
            return Err(SignupError::Duplicate(new.username.to_owned()));
        }
        Err(e) => return Err(SignupError::Internal(e.into())),
    };
    if grant > 0 {
        let entry = ledger::apply(
            &txn,
            ledger::Change {
                user_id: &id,
                amount_nanos: grant,
                kind: Kind::Grant,
                note: Some("initial balance"),
                actor_id: None,
                refuse_negative: false,
            },
        )
        .await
        .map_err(anyhow::Error::from)?;
        user.balance_nanos = entry.balance_after_nanos;
    }
    txn.commit().await.map_err(anyhow::Error::from)?;
    Ok(Created {
        user,
        totp: enrolment,
    })
}
