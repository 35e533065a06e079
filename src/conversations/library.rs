//! The user's conversations as the chat shows them (`/api/conversations…`, API.md §12): list,
//! read, rename, delete, messages, search with a snippet, export. Same rows as `/v1/conversations`.

use chrono::Utc;
use entity::conversations;
use sea_orm::{DatabaseConnection, TransactionTrait};
use serde_json::{Value, json};

use super::chat::{MAX_TITLE_CHARS, message_view};
use super::not_found_conversation;
use crate::error::ApiError;
use crate::routes::rfc3339;
use crate::store::conversations::{self as store, ListFilter};
use crate::store::{Page, PageReq};

/// Characters of context a snippet keeps on each side of the match.
pub const SNIPPET_CONTEXT: usize = 60;
/// Longest `search` / `q` accepted, in characters.
pub const MAX_QUERY_CHARS: usize = 256;

/// `{id, title, model, message_count, created_at, updated_at, shared}`.
pub fn conversation_view(c: &conversations::Model, message_count: u64) -> Value {
    json!({
        "id": c.id,
        "title": c.title,
        "model": c.model,
        "message_count": message_count,
        "created_at": rfc3339(c.created_at),
        "updated_at": rfc3339(c.updated_at),
        "shared": c.share_token_hash.is_some(),
    })
}

fn check_query(param: &str, q: &str) -> Result<(), ApiError> {
    if q.chars().count() > MAX_QUERY_CHARS {
        return Err(ApiError::invalid_param(
            param,
            format!("'{param}' is longer than {MAX_QUERY_CHARS} characters."),
        ));
    }
    Ok(())
}

/// `GET /api/conversations`: newest activity first.
pub async fn list(
    db: &DatabaseConnection,
    user_id: &str,
    filter: ListFilter,
    page: PageReq,
) -> Result<Page<Value>, ApiError> {
    if let Some(s) = &filter.search {
        check_query("search", s)?;
    }
    let rows = store::list_for_user(db, user_id, &filter, page).await?;
    let ids: Vec<String> = rows.items.iter().map(|c| c.id.clone()).collect();
    let counts = store::item_counts(db, &ids).await?;
    Ok(Page {
        items: rows
            .items
            .iter()
            .map(|c| conversation_view(c, counts.get(&c.id).copied().unwrap_or(0)))
            .collect(),
        total: rows.total,
    })
}

/// The user's conversation and all its messages in order (within the history bounds).
pub async fn get(db: &DatabaseConnection, user_id: &str, id: &str) -> Result<Value, ApiError> {
    let rows = super::responses::conversation_rows(db, user_id, id, "id").await?;
    let conv = super::conversation::find(db, user_id, id).await?;
    let messages = rows
        .iter()
        .map(message_view)
        .collect::<Result<Vec<_>, _>>()?;
    let mut v = conversation_view(&conv, messages.len() as u64);
    v["messages"] = Value::Array(messages);
    Ok(v)
}

/// `PATCH /api/conversations/{id}` `{title}`: 1 to [`MAX_TITLE_CHARS`] characters, trimmed.
pub async fn rename(
    db: &DatabaseConnection,
    user_id: &str,
    id: &str,
    title: &str,
) -> Result<Value, ApiError> {
    let title = title.trim();
    if title.is_empty() || title.chars().count() > MAX_TITLE_CHARS {
        return Err(ApiError::invalid_param(
            "title",
            format!("'title' must be 1 to {MAX_TITLE_CHARS} characters."),
        ));
    }
    if !store::set_title(db, user_id, id, title, Utc::now()).await? {
        return Err(not_found_conversation(id));
    }
    let conv = super::conversation::find(db, user_id, id).await?;
    let n = store::item_counts(db, std::slice::from_ref(&conv.id))
        .await?
        .get(&conv.id)
        .copied()
        .unwrap_or(0);
    Ok(conversation_view(&conv, n))
}

/// `DELETE /api/conversations/{id}`: the conversation, its messages and its share link.
pub async fn delete(db: &DatabaseConnection, user_id: &str, id: &str) -> Result<(), ApiError> {
    super::pending::settled(id).await;
    let txn = db.begin().await?;
    if !store::delete(&txn, user_id, id).await? {
        return Err(not_found_conversation(id));
    }
    txn.commit().await?;
    Ok(())
}

/// `GET /api/conversations/{id}/messages`: one page, oldest first.
pub async fn messages(
    db: &DatabaseConnection,
    user_id: &str,
    id: &str,
    page: PageReq,
) -> Result<Page<Value>, ApiError> {
    let conv = super::conversation::find(db, user_id, id).await?;
    let rows = store::items_page(db, &conv.id, page).await?;
    Ok(Page {
        items: rows
            .items
            .iter()
            .map(message_view)
            .collect::<Result<Vec<_>, _>>()?,
        total: rows.total,
    })
}

/// `GET /api/conversations/search?q=`: the user's messages holding every word of `q`, newest
/// first, each with its conversation and a snippet around the first match.
pub async fn search(
    db: &DatabaseConnection,
    user_id: &str,
    q: &str,
    page: PageReq,
) -> Result<Page<Value>, ApiError> {
    check_query("q", q)?;
    let words = store::search_words(q);
    if words.is_empty() {
        return Err(ApiError::invalid_param(
            "q",
            "'q' must contain at least one word.",
        ));
    }
    let rows = store::search_items(db, user_id, q, page).await?;
    let mut items = Vec::with_capacity(rows.items.len());
    for row in &rows.items {
        let mut v = message_view(row)?;
        let text = row.content_text.as_deref().unwrap_or_default();
        v["conversation_id"] = json!(row.conversation_id);
        v["snippet"] = json!(snippet(text, &words, SNIPPET_CONTEXT));
        items.push(v);
    }
    Ok(Page {
        items,
        total: rows.total,
    })
}

/// Up to `context` characters either side of the first occurrence of any of `words`
/// (case-insensitive), with `…` where text was left out; the text's start when none occurs.
pub fn snippet(text: &str, words: &[String], context: usize) -> String {
    let chars: Vec<char> = text.chars().collect();
    let lower: Vec<char> = chars
        .iter()
        .map(|c| c.to_lowercase().next().unwrap_or(*c))
        .collect();
    let hit = words
        .iter()
        .filter_map(|w| {
            let w: Vec<char> = w.chars().collect();
            if w.is_empty() || w.len() > lower.len() {
                return None;
            }
            lower.windows(w.len()).position(|win| win == w.as_slice())
        })
        .min();
    let (start, end) = match hit {
        Some(at) => (
            at.saturating_sub(context),
            (at + context * 2).min(chars.len()),
        ),
        None => (0, (context * 2).min(chars.len())),
    };
    let mut out = String::new();
    if start > 0 {
        out.push('…');
    }
    out.extend(&chars[start..end]);
    if end < chars.len() {
        out.push('…');
    }
    out
}

/// An export's file: its name, content type and body.
pub struct Export {
    pub filename: String,
    pub content_type: &'static str,
    pub body: String,
}

/// `GET /api/conversations/{id}/export?format=json|markdown`.
pub async fn export(
    db: &DatabaseConnection,
    user_id: &str,
    id: &str,
    format: &str,
) -> Result<Export, ApiError> {
    if format != "json" && format != "markdown" {
        return Err(ApiError::invalid_param(
            "format",
            "'format' must be json or markdown.",
        ));
    }
    let conv = get(db, user_id, id).await?;
    if format == "json" {
        return Ok(Export {
            filename: format!("{id}.json"),
            content_type: "application/json",
            body: serde_json::to_string_pretty(&conv).map_err(ApiError::internal)?,
        });
    }
    Ok(Export {
        filename: format!("{id}.md"),
        content_type: "text/markdown; charset=utf-8",
        body: markdown(&conv),
    })
}

/// A conversation (as [`get`] renders it) as Markdown: the title, then each message under its
/// role (and model), separated by rules.
pub fn markdown(conv: &Value) -> String {
    let mut out = format!(
        "# {}\n\n",
        conv["title"].as_str().unwrap_or("Untitled conversation")
    );
    for m in conv["messages"].as_array().into_iter().flatten() {
        let role = m["role"].as_str().unwrap_or("unknown");
        let mut head = {
            let mut c = role.chars();
            c.next()
                .map(|f| f.to_uppercase().chain(c).collect::<String>())
                .unwrap_or_default()
        };
        if let Some(model) = m["model"].as_str() {
            head.push_str(&format!(" ({model})"));
        }
        if m["status"] == "incomplete" {
            head.push_str(" — incomplete");
        }
        out.push_str(&format!(
            "## {head}\n\n{}\n\n---\n\n",
            m["content"].as_str().unwrap_or_default()
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snippets_center_the_match_and_mark_cuts() {
        let text = format!("{} Needle here {}", "a".repeat(100), "b".repeat(100));
        let s = snippet(&text, &["needle".into()], 10);
        assert!(s.starts_with('…') && s.ends_with('…'), "{s}");
        assert!(s.contains("Needle"), "{s}");
        assert_eq!(s.chars().count(), 2 + 30);
        assert_eq!(snippet("short", &["zzz".into()], 10), "short");
        // Multi-byte text is cut on characters.
        let s = snippet(&"é".repeat(50), &["x".into()], 5);
        assert_eq!(s, format!("{}…", "é".repeat(10)));
    }
}
