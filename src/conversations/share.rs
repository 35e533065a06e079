//! Share links (`/share/{token}`, API.md §12): a read-only view of one conversation, no login.
//!
//! The token is 256 random bits (base64url); only its SHA-256 is stored, so a new link replaces
//! the old one and revoking clears it: the next request for the old token finds nothing (404)
//! on every replica at once, as every replica reads the same row. The HTML page renders each
//! message's Markdown with `pulldown-cmark` and sanitizes it with `ammonia`: model output never
//! reaches the page as raw HTML.

use base64::Engine;
use sea_orm::DatabaseConnection;
use serde_json::{Value, json};

use super::not_found_conversation;
use crate::crypto::sha256_hex;
use crate::error::ApiError;
use crate::store::conversations as store;

/// Longest token accepted in a share URL (a longer one is not ours: 404 before any query).
const MAX_TOKEN_CHARS: usize = 64;

/// A new share token: 256 bits of OS randomness, base64url without padding (43 characters).
pub fn new_token() -> String {
    let bytes: [u8; 32] = rand::random();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Shares the user's conversation under a new token (an older link stops working).
pub async fn share(db: &DatabaseConnection, user_id: &str, id: &str) -> Result<String, ApiError> {
    let token = new_token();
    if !store::set_share(db, user_id, id, Some(sha256_hex(&token))).await? {
        return Err(not_found_conversation(id));
    }
    Ok(token)
}

/// Revokes the link; 404 when the user has no such conversation.
pub async fn revoke(db: &DatabaseConnection, user_id: &str, id: &str) -> Result<(), ApiError> {
    if !store::set_share(db, user_id, id, None).await? {
        return Err(not_found_conversation(id));
    }
    Ok(())
}

fn link_not_found() -> ApiError {
    ApiError::NotFound {
        message: "This share link does not exist or was revoked.".into(),
        code: "not_found",
    }
}

/// The shared conversation as `GET /api/conversations/{id}` renders it, without its owner's
/// share state; 404 for an unknown or revoked token.
pub async fn shared(db: &DatabaseConnection, token: &str) -> Result<Value, ApiError> {
    if token.is_empty() || token.len() > MAX_TOKEN_CHARS {
        return Err(link_not_found());
    }
    let conv = store::by_share(db, &sha256_hex(token))
        .await?
        .ok_or_else(link_not_found)?;
    let mut v = super::library::get(db, &conv.user_id, &conv.id).await?;
    if let Value::Object(o) = &mut v {
        o.remove("shared");
    }
    Ok(v)
}

/// Markdown → HTML, sanitized (no script, no event handlers, no raw HTML passes).
pub fn render_markdown(md: &str) -> String {
    let parser = pulldown_cmark::Parser::new_ext(md, pulldown_cmark::Options::all());
    let mut html = String::new();
    pulldown_cmark::html::push_html(&mut html, parser);
    ammonia::Builder::default()
        .link_rel(Some("noopener noreferrer nofollow"))
        .clean(&html)
        .to_string()
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

/// The read-only page of a shared conversation.
pub fn page(conv: &Value) -> String {
    let title = escape(conv["title"].as_str().unwrap_or("Shared conversation"));
    let mut body = String::new();
    for m in conv["messages"].as_array().into_iter().flatten() {
        let role = escape(m["role"].as_str().unwrap_or("unknown"));
        let model = m["model"]
            .as_str()
            .map(|s| format!(" <small>{}</small>", escape(s)))
            .unwrap_or_default();
        body.push_str(&format!(
            "<section class=\"msg {role}\"><h2>{role}{model}</h2>{}</section>\n",
            render_markdown(m["content"].as_str().unwrap_or_default())
        ));
    }
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"robots\" content=\"noindex, nofollow\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{title}</title>\
         <style>body{{font-family:system-ui,sans-serif;max-width:48rem;margin:2rem auto;padding:0 1rem;line-height:1.5}}\
         .msg{{border-top:1px solid #ddd;padding:.5rem 0}}.msg h2{{font-size:.9rem;text-transform:capitalize;color:#555}}.msg h2 small{{text-transform:none}}\
         pre{{overflow:auto;background:#f6f6f6;padding:.5rem}}</style></head>\
         <body><h1>{title}</h1>\n{body}</body></html>\n"
    )
}

/// `{url, token}` of a new share link, `url` made from the request's origin.
pub fn link(origin: &str, token: &str) -> Value {
    json!({"url": format!("{}/share/{token}", origin.trim_end_matches('/')), "token": token})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_long_and_distinct() {
        let (a, b) = (new_token(), new_token());
        assert_eq!(a.len(), 43);
        assert_ne!(a, b);
    }

    #[test]
    fn markdown_is_sanitized() {
        let html = render_markdown(
            "**bold** <script>alert(1)</script> <img src=x onerror=alert(1)> [x](javascript:alert(1))",
        );
        assert!(html.contains("<strong>bold</strong>"), "{html}");
        assert!(!html.contains("<script"), "{html}");
        assert!(!html.contains("onerror"), "{html}");
        assert!(!html.contains("javascript:"), "{html}");
    }
}
