//! Accounts: passwords (argon2id), second factor (TOTP), access tokens and sessions, lockout.

pub mod lockout;
pub mod password;
pub mod session;
pub mod signin;
pub mod signup;
pub mod tokens;
pub mod totp;
