//! Accounts: passwords (argon2id), second factor (TOTP), access tokens and sessions, lockout,
//! and the per-address limit of the anonymous `/api/auth` routes.

pub mod lockout;
pub mod password;
pub mod session;
pub mod signin;
pub mod signup;
pub mod throttle;
pub mod tokens;
pub mod totp;
