//! TOTP (RFC 6238: SHA-1, 6 digits, 30 s, ±1 step) enrolment and checking.
//!
//! A code is single-use: the caller records the accepted step (`users.totp_last_step`) with a
//! conditional update, and a code whose step is not newer than the last accepted one is refused.

use serde::Serialize;
use totp_rs::{Algorithm, Builder, Secret, Totp};

pub const ISSUER: &str = "tollgate";

/// What a user needs to enrol an authenticator app.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Enrolment {
    /// Base32 secret, for manual entry.
    pub secret: String,
    pub otpauth_url: String,
    /// A PNG QR code of `otpauth_url`, base64.
    pub qr_png_base64: String,
}

fn build(secret_b32: &str, account: &str) -> anyhow::Result<Totp> {
    let secret =
        Secret::try_from_base32(secret_b32).map_err(|e| anyhow::anyhow!("totp secret: {e:?}"))?;
    // ':' is not allowed in an otpauth account name; usernames cannot contain it anyway.
    Builder::new()
        .with_algorithm(Algorithm::SHA1)
        .with_digits(6)
        .with_skew(1)
        .with_step_duration(30)
        .with_secret(secret)
        .with_account_name(account.replace(':', "_"))
        .with_issuer(Some(ISSUER))
        .build()
        .map_err(|e| anyhow::anyhow!("totp: {e}"))
}

/// A fresh 160-bit secret, base32.
pub fn new_secret() -> String {
    Secret::generate().to_base32()
}

pub fn enrolment(secret_b32: &str, account: &str) -> anyhow::Result<Enrolment> {
    let totp = build(secret_b32, account)?;
    Ok(Enrolment {
        secret: secret_b32.to_owned(),
        otpauth_url: totp
            .to_url()
            .map_err(|e| anyhow::anyhow!("totp url: {e}"))?,
        qr_png_base64: totp
            .to_qr_base64()
            .map_err(|e| anyhow::anyhow!("totp qr: {e}"))?,
    })
}

/// The matched time step when `code` is valid now (±1 step), else `None`.
pub fn check(secret_b32: &str, code: &str) -> Option<i64> {
    let code = code.trim();
    if code.len() != 6 || !code.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let totp = build(secret_b32, "x").ok()?;
    totp.check_current(code).map(|s| s as i64)
}

/// The current code (for the CLI and tests).
pub fn current_code(secret_b32: &str) -> anyhow::Result<String> {
    Ok(build(secret_b32, "x")?.generate_current().to_string())
}

/// The code for an arbitrary Unix time (tests use it to reach the next step).
pub fn code_at(secret_b32: &str, unix: u64) -> anyhow::Result<String> {
    Ok(build(secret_b32, "x")?.generate(unix).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enrol_and_check() {
        let s = new_secret();
        let e = enrolment(&s, "alice").expect("enrol");
        assert!(e.otpauth_url.starts_with("otpauth://totp/"));
        assert!(e.otpauth_url.contains("issuer=tollgate"));
        assert!(!e.qr_png_base64.is_empty());
        let code = current_code(&s).expect("code");
        assert!(check(&s, &code).is_some());
        assert!(check(&s, "12345").is_none());
        assert!(check(&s, "abcdef").is_none());
    }
}
