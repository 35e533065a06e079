//! Typed runtime settings: the keys an administrator may change without a restart, their value
//! types, descriptions and defaults (from the config), stored in the `settings` table.

use sea_orm::ConnectionTrait;
use serde::Serialize;
use serde_json::Value;

use crate::config::{Config, Registration};
use crate::store;

/// Every known setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Setting {
    /// `open` | `closed`: whether `POST /api/auth/register` accepts new accounts.
    Registration,
    /// Requests per minute per user without a limit of their own; 0 = none.
    DefaultUserRpm,
    /// Requests per minute per gateway key without a limit of its own; 0 = none.
    DefaultKeyRpm,
}

impl Setting {
    pub const ALL: [Setting; 3] = [
        Setting::Registration,
        Setting::DefaultUserRpm,
        Setting::DefaultKeyRpm,
    ];

    pub fn key(self) -> &'static str {
        match self {
            Setting::Registration => "registration",
            Setting::DefaultUserRpm => "default_user_rpm",
            Setting::DefaultKeyRpm => "default_key_rpm",
        }
    }

    pub fn from_key(key: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.key() == key)
    }

    pub fn default_description(self) -> &'static str {
        match self {
            Setting::Registration => {
                "\"open\" or \"closed\": whether anyone may create an account with POST /api/auth/register."
            }
            Setting::DefaultUserRpm => {
                "Requests per minute per user who has no limit of their own; 0 = no limit."
            }
            Setting::DefaultKeyRpm => {
                "Requests per minute per gateway key that has no limit of its own; 0 = no limit."
            }
        }
    }

    /// The value when nothing is stored: from the config file.
    pub fn default_value(self, config: &Config) -> Value {
        match self {
            Setting::Registration => Value::from(match config.auth.registration {
                Registration::Open => "open",
                Registration::Closed => "closed",
            }),
            Setting::DefaultUserRpm => Value::from(config.limits.default_user_rpm),
            Setting::DefaultKeyRpm => Value::from(config.limits.default_key_rpm),
        }
    }

    /// Checks a value's type for this key; the message is for the API caller.
    pub fn validate(self, value: &Value) -> Result<(), String> {
        match self {
            Setting::Registration => match value.as_str() {
                Some("open" | "closed") => Ok(()),
                _ => Err("registration must be \"open\" or \"closed\"".into()),
            },
            Setting::DefaultUserRpm | Setting::DefaultKeyRpm => match value.as_u64() {
                Some(n) if n <= u64::from(u32::MAX) => Ok(()),
                _ => Err(format!(
                    "{} must be a whole number ≥ 0 (0 = no limit)",
                    self.key()
                )),
            },
        }
    }
}

/// A setting as the API shows it: `{key, value, description}`.
#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
pub struct SettingView {
    pub key: String,
    #[schema(value_type = Object)]
    pub value: Value,
    pub description: String,
}

/// Why a setting could not be written.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("unknown setting `{0}`")]
    UnknownKey(String),
    #[error("{0}")]
    InvalidValue(String),
    #[error(transparent)]
    Db(#[from] sea_orm::DbErr),
}

/// The effective value of one setting: the stored one when valid, else the config default.
pub async fn effective(
    db: &impl ConnectionTrait,
    config: &Config,
    setting: Setting,
) -> Result<SettingView, sea_orm::DbErr> {
    let stored = store::settings::get(db, setting.key()).await?;
    Ok(view(setting, config, stored))
}

fn view(setting: Setting, config: &Config, stored: Option<entity::settings::Model>) -> SettingView {
    let (value, description) = match stored {
        Some(row) => (
            serde_json::from_str::<Value>(&row.value)
                .ok()
                .filter(|v| setting.validate(v).is_ok()),
            row.description.filter(|d| !d.is_empty()),
        ),
        None => (None, None),
    };
    SettingView {
        key: setting.key().to_owned(),
        value: value.unwrap_or_else(|| setting.default_value(config)),
        description: description.unwrap_or_else(|| setting.default_description().to_owned()),
    }
}

/// Every known setting with its effective value, by key.
pub async fn list(
    db: &impl ConnectionTrait,
    config: &Config,
) -> Result<Vec<SettingView>, sea_orm::DbErr> {
    let stored = store::settings::list(db).await?;
    let mut out: Vec<SettingView> = Setting::ALL
        .into_iter()
        .map(|s| {
            let row = stored.iter().find(|r| r.key == s.key()).cloned();
            view(s, config, row)
        })
        .collect();
    out.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(out)
}

/// Validates and stores a value (and optionally a new description).
pub async fn put(
    db: &impl ConnectionTrait,
    config: &Config,
    key: &str,
    value: &Value,
    description: Option<&str>,
) -> Result<SettingView, SettingsError> {
    let setting =
        Setting::from_key(key).ok_or_else(|| SettingsError::UnknownKey(key.to_owned()))?;
    setting
        .validate(value)
        .map_err(SettingsError::InvalidValue)?;
    if description.is_some_and(|d| d.chars().count() > 255) {
        return Err(SettingsError::InvalidValue(
            "description must be at most 255 characters".into(),
        ));
    }
    let description = match description {
        Some(d) => Some(d.to_owned()),
        None => store::settings::get(db, key)
            .await?
            .and_then(|row| row.description),
    };
    let row = store::settings::put(db, key, value, description.as_deref()).await?;
    Ok(view(setting, config, Some(row)))
}

/// Whether self-service registration is open right now.
pub async fn registration_open(
    db: &impl ConnectionTrait,
    config: &Config,
) -> Result<bool, sea_orm::DbErr> {
    let v = effective(db, config, Setting::Registration).await?;
    Ok(v.value.as_str() == Some("open"))
}

/// `default_user_rpm` now (0 = no limit).
pub async fn default_user_rpm(
    db: &impl ConnectionTrait,
    config: &Config,
) -> Result<u32, sea_orm::DbErr> {
    rpm(db, config, Setting::DefaultUserRpm).await
}

/// `default_key_rpm` now (0 = no limit).
pub async fn default_key_rpm(
    db: &impl ConnectionTrait,
    config: &Config,
) -> Result<u32, sea_orm::DbErr> {
    rpm(db, config, Setting::DefaultKeyRpm).await
}

async fn rpm(
    db: &impl ConnectionTrait,
    config: &Config,
    setting: Setting,
) -> Result<u32, sea_orm::DbErr> {
    let v = effective(db, config, setting).await?;
    Ok(v.value
        .as_u64()
        .and_then(|n| u32::try_from(n).ok())
        .unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_roundtrip_and_validate() {
        for s in Setting::ALL {
            assert_eq!(Setting::from_key(s.key()), Some(s));
            assert!(s.validate(&s.default_value(&Config::default())).is_ok());
        }
        assert_eq!(Setting::from_key("nope"), None);
        let r = Setting::Registration;
        assert!(r.validate(&Value::from("open")).is_ok());
        assert!(r.validate(&Value::from("maybe")).is_err());
        assert!(r.validate(&Value::from(true)).is_err());
        let k = Setting::DefaultKeyRpm;
        assert!(k.validate(&Value::from(0)).is_ok());
        assert!(k.validate(&Value::from(600)).is_ok());
        assert!(k.validate(&Value::from(-1)).is_err());
        assert!(k.validate(&Value::from(1.5)).is_err());
        assert!(k.validate(&Value::from("60")).is_err());
        assert!(k.validate(&Value::from(u64::from(u32::MAX) + 1)).is_err());
    }
}
