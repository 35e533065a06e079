//! Accounts: passwords (argon2id), second factor (TOTP), access tokens and sessions, lockout.

pub mod password;
pub mod session;
pub mod tokens;
pub mod totp;
