//! Queries of conversations and their items (`conversations`, `conversation_items`).
//!
//! Every read and write names the owner: a conversation of another user is "not found".
//!
//! Order under concurrent appends: [`append`] bumps the conversation row's `next_position` by the
//! number of items first (an `UPDATE`, so PostgreSQL and MySQL hold the row lock and SQLite the
//! write lock until commit), reads the new value back, and inserts the items at the positions it
//! reserved. Appends to one conversation are therefore serialized: each takes a consecutive run
//! of positions, the runs never overlap (`(conversation_id, position)` is unique besides), and an
//! append's items become visible only after every earlier append's did. Callers run it inside
//! their transaction with no read before it (a SQLite read lock cannot be upgraded without
//! failing as busy).

use chrono::{DateTime, Utc};
use entity::{conversation_items, conversations};
use sea_orm::sea_query::{Expr, ExprTrait};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, DatabaseConnection, EntityTrait, QueryFilter,
    QueryOrder, QuerySelect,
};

/// Order of a listing.
pub use crate::conversations::paging::Order;

pub async fn insert(
    db: &impl ConnectionTrait,
    row: conversations::Model,
) -> Result<(), sea_orm::DbErr> {
    conversations::Entity::insert(conversations::ActiveModel {
        id: Set(row.id),
        user_id: Set(row.user_id),
        metadata: Set(row.metadata),
        title: Set(row.title),
        model: Set(row.model),
        next_position: Set(row.next_position),
        created_at: Set(row.created_at),
        updated_at: Set(row.updated_at),
        share_token_hash: Set(row.share_token_hash),
    })
    .exec_without_returning(db)
    .await?;
    Ok(())
}

/// The user's conversation `id`.
pub async fn get(
    db: &impl ConnectionTrait,
    user_id: &str,
    id: &str,
) -> Result<Option<conversations::Model>, sea_orm::DbErr> {
    get_query(user_id, id).one(db).await
}

/// The query [`get`] runs (public for `benches/state.rs`'s `EXPLAIN`): the primary key.
pub fn get_query(user_id: &str, id: &str) -> sea_orm::Select<conversations::Entity> {
    conversations::Entity::find_by_id(id.to_owned())
        .filter(conversations::Column::UserId.eq(user_id))
}

/// Replaces the metadata; false when the user has no such conversation.
pub async fn set_metadata(
    db: &impl ConnectionTrait,
    user_id: &str,
    id: &str,
    metadata: String,
    now: DateTime<Utc>,
) -> Result<bool, sea_orm::DbErr> {
    let res = conversations::Entity::update_many()
        .col_expr(conversations::Column::Metadata, Expr::value(metadata))
        .col_expr(conversations::Column::UpdatedAt, Expr::value(now))
        .filter(conversations::Column::Id.eq(id))
        .filter(conversations::Column::UserId.eq(user_id))
        .exec(db)
        .await?;
    Ok(res.rows_affected > 0)
}

/// Deletes the conversation and its items; false when the user has no such conversation.
pub async fn delete(
    db: &impl ConnectionTrait,
    user_id: &str,
    id: &str,
) -> Result<bool, sea_orm::DbErr> {
    let res = conversations::Entity::delete_many()
        .filter(conversations::Column::Id.eq(id))
        .filter(conversations::Column::UserId.eq(user_id))
        .exec(db)
        .await?;
    if res.rows_affected == 0 {
        return Ok(false);
    }
    conversation_items::Entity::delete_many()
        .filter(conversation_items::Column::ConversationId.eq(id))
        .exec(db)
        .await?;
    Ok(true)
}

/// A chat turn in the user's conversation: the model it used, `updated_at`; false when the user
/// has no such conversation. A write, so it may open an `append`'s transaction.
pub async fn set_chat(
    db: &impl ConnectionTrait,
    user_id: &str,
    id: &str,
    model: &str,
    now: DateTime<Utc>,
) -> Result<bool, sea_orm::DbErr> {
    let res = conversations::Entity::update_many()
        .col_expr(conversations::Column::Model, Expr::value(model))
        .col_expr(conversations::Column::UpdatedAt, Expr::value(now))
        .filter(conversations::Column::Id.eq(id))
        .filter(conversations::Column::UserId.eq(user_id))
        .exec(db)
        .await?;
    Ok(res.rows_affected > 0)
}

/// Renames the user's conversation; false when there is no such conversation.
pub async fn set_title(
    db: &impl ConnectionTrait,
    user_id: &str,
    id: &str,
    title: &str,
    now: DateTime<Utc>,
) -> Result<bool, sea_orm::DbErr> {
    let res = conversations::Entity::update_many()
        .col_expr(conversations::Column::Title, Expr::value(title))
        .col_expr(conversations::Column::UpdatedAt, Expr::value(now))
        .filter(conversations::Column::Id.eq(id))
        .filter(conversations::Column::UserId.eq(user_id))
        .exec(db)
        .await?;
    Ok(res.rows_affected > 0)
}

/// Deletes the items of a conversation at `position` and after (a regenerated answer); the
/// caller has checked the conversation is the user's.
pub async fn delete_items_from(
    db: &impl ConnectionTrait,
    conversation_id: &str,
    position: i64,
) -> Result<u64, sea_orm::DbErr> {
    let res = conversation_items::Entity::delete_many()
        .filter(conversation_items::Column::ConversationId.eq(conversation_id))
        .filter(conversation_items::Column::Position.gte(position))
        .exec(db)
        .await?;
    Ok(res.rows_affected)
}

/// One item to append: its id, its JSON, the response it came from.
#[derive(Debug, Clone)]
pub struct NewItem {
    pub item_id: String,
    pub item: String,
    pub response_id: Option<String>,
    /// What the full-text index sees (a message's text), if anything.
    pub content_text: Option<String>,
    /// The model that wrote it and its completion tokens (a chat answer).
    pub model: Option<String>,
    pub tokens: Option<i64>,
}

/// Appends `items` in order at the end of the user's conversation (see the module docs for the
/// ordering guarantee; run it in a transaction, before any read in it). Returns the first
/// position taken, or `None` when the user has no such conversation (nothing written).
pub async fn append(
    db: &impl ConnectionTrait,
    user_id: &str,
    conversation_id: &str,
    items: Vec<NewItem>,
    now: DateTime<Utc>,
) -> Result<Option<i64>, sea_orm::DbErr> {
    let n = i64::try_from(items.len()).unwrap_or(i64::MAX);
    let res = conversations::Entity::update_many()
        .col_expr(
            conversations::Column::NextPosition,
            Expr::col(conversations::Column::NextPosition).add(n),
        )
        .col_expr(conversations::Column::UpdatedAt, Expr::value(now))
        .filter(conversations::Column::Id.eq(conversation_id))
        .filter(conversations::Column::UserId.eq(user_id))
        .exec(db)
        .await?;
    if res.rows_affected == 0 {
        return Ok(None);
    }
    let end: Option<i64> = conversations::Entity::find_by_id(conversation_id.to_owned())
        .select_only()
        .column(conversations::Column::NextPosition)
        .into_tuple()
        .one(db)
        .await?;
    let Some(end) = end else {
        return Ok(None);
    };
    let first = end - n;
    if items.is_empty() {
        return Ok(Some(first));
    }
    let rows = items
        .into_iter()
        .enumerate()
        .map(|(i, it)| conversation_items::ActiveModel {
            conversation_id: Set(conversation_id.to_owned()),
            position: Set(first + i as i64),
            item_id: Set(it.item_id),
            user_id: Set(user_id.to_owned()),
            item: Set(it.item),
            response_id: Set(it.response_id),
            created_at: Set(now),
            content_text: Set(it.content_text),
            model: Set(it.model),
            tokens: Set(it.tokens),
            ..Default::default()
        });
    conversation_items::Entity::insert_many(rows)
        .exec_without_returning(db)
        .await?;
    Ok(Some(first))
}

/// The item `item_id` of a conversation (its first occurrence, should a client have sent one id
/// twice). The caller has checked the conversation is the user's.
pub async fn find_item(
    db: &impl ConnectionTrait,
    conversation_id: &str,
    item_id: &str,
) -> Result<Option<conversation_items::Model>, sea_orm::DbErr> {
    conversation_items::Entity::find()
        .filter(conversation_items::Column::ConversationId.eq(conversation_id))
        .filter(conversation_items::Column::ItemId.eq(item_id))
        .order_by_asc(conversation_items::Column::Position)
        .one(db)
        .await
}

/// Up to `limit` items of a conversation in `order`, strictly after position `after` in that
/// order when given.
pub async fn list_items(
    db: &impl ConnectionTrait,
    conversation_id: &str,
    after: Option<i64>,
    limit: u64,
    order: Order,
) -> Result<Vec<conversation_items::Model>, sea_orm::DbErr> {
    list_items_query(conversation_id, after, limit, order)
        .all(db)
        .await
}

/// The query [`list_items`] runs (public so `benches/state.rs` can `EXPLAIN` exactly it): one
/// range read of the unique index `(conversation_id, position)`.
pub fn list_items_query(
    conversation_id: &str,
    after: Option<i64>,
    limit: u64,
    order: Order,
) -> sea_orm::Select<conversation_items::Entity> {
    let mut q = conversation_items::Entity::find()
        .filter(conversation_items::Column::ConversationId.eq(conversation_id));
    q = match (order, after) {
        (Order::Asc, Some(p)) => q.filter(conversation_items::Column::Position.gt(p)),
        (Order::Desc, Some(p)) => q.filter(conversation_items::Column::Position.lt(p)),
        _ => q,
    };
    q = match order {
        Order::Asc => q.order_by_asc(conversation_items::Column::Position),
        Order::Desc => q.order_by_desc(conversation_items::Column::Position),
    };
    q.limit(limit)
}

/// Deletes one item (its first occurrence); false when there is none. Touches `updated_at`.
pub async fn delete_item(
    db: &impl ConnectionTrait,
    conversation_id: &str,
    item_id: &str,
    now: DateTime<Utc>,
) -> Result<bool, sea_orm::DbErr> {
    let Some(item) = find_item(db, conversation_id, item_id).await? else {
        return Ok(false);
    };
    let res = conversation_items::Entity::delete_by_id(item.seq)
        .exec(db)
        .await?;
    conversations::Entity::update_many()
        .col_expr(conversations::Column::UpdatedAt, Expr::value(now))
        .filter(conversations::Column::Id.eq(conversation_id))
        .exec(db)
        .await?;
    Ok(res.rows_affected > 0)
}

/// Deletes up to `limit` conversation items created before `cutoff`; returns how many.
pub async fn prune_items_batch(
    db: &impl ConnectionTrait,
    cutoff: DateTime<Utc>,
    limit: u64,
) -> Result<u64, sea_orm::DbErr> {
    let seqs: Vec<i64> = conversation_items::Entity::find()
        .select_only()
        .column(conversation_items::Column::Seq)
        .filter(conversation_items::Column::CreatedAt.lt(cutoff))
        .limit(limit)
        .into_tuple()
        .all(db)
        .await?;
    if seqs.is_empty() {
        return Ok(0);
    }
    let res = conversation_items::Entity::delete_many()
        .filter(conversation_items::Column::Seq.is_in(seqs))
        .exec(db)
        .await?;
    Ok(res.rows_affected)
}

/// Every conversation (for the admin's counts; never their content).
pub async fn count(db: &impl ConnectionTrait) -> Result<u64, sea_orm::DbErr> {
    use sea_orm::PaginatorTrait;
    conversations::Entity::find().count(db).await
}

/// Most conversations a message-text `search` of the conversation list considers (the newest
/// matching messages' conversations); titles are matched without a bound.
pub const MAX_SEARCH_CONVERSATIONS: u64 = 1000;

/// The conversation list's filters (`GET /api/conversations`).
#[derive(Debug, Default, Clone)]
pub struct ListFilter {
    /// Matches titles (substring, case-insensitive) and message text (full-text).
    pub search: Option<String>,
    /// The model the conversation last used.
    pub model: Option<String>,
}

/// The user's conversations, newest activity first.
pub async fn list_for_user(
    db: &DatabaseConnection,
    user_id: &str,
    filter: &ListFilter,
    page: crate::store::PageReq,
) -> Result<crate::store::Page<conversations::Model>, sea_orm::DbErr> {
    use sea_orm::sea_query::{Func, LikeExpr};
    use sea_orm::{Condition, PaginatorTrait};
    let mut q = conversations::Entity::find().filter(conversations::Column::UserId.eq(user_id));
    if let Some(m) = &filter.model {
        q = q.filter(conversations::Column::Model.eq(m.as_str()));
    }
    if let Some(s) = filter.search.as_deref().filter(|s| !s.trim().is_empty()) {
        let escaped: String = s
            .to_lowercase()
            .chars()
            .flat_map(|c| match c {
                '%' | '_' | '\\' => vec!['\\', c],
                c => vec![c],
            })
            .collect();
        let title = Expr::expr(Func::lower(Expr::col(conversations::Column::Title)))
            .like(LikeExpr::new(format!("%{escaped}%")).escape('\\'));
        let ids = search_conversation_ids(db, user_id, s, MAX_SEARCH_CONVERSATIONS).await?;
        let mut any = Condition::any().add(title);
        if !ids.is_empty() {
            any = any.add(conversations::Column::Id.is_in(ids));
        }
        q = q.filter(any);
    }
    let total = q.clone().count(db).await?;
    let items = q
        .order_by_desc(conversations::Column::UpdatedAt)
        .order_by_desc(conversations::Column::Id)
        .offset(page.offset())
        .limit(page.per_page)
        .all(db)
        .await?;
    Ok(crate::store::Page { items, total })
}

/// How many items each of these conversations holds.
pub async fn item_counts(
    db: &impl ConnectionTrait,
    ids: &[String],
) -> Result<std::collections::HashMap<String, u64>, sea_orm::DbErr> {
    if ids.is_empty() {
        return Ok(Default::default());
    }
    let rows: Vec<(String, i64)> = conversation_items::Entity::find()
        .select_only()
        .column(conversation_items::Column::ConversationId)
        .column_as(conversation_items::Column::Seq.count(), "n")
        .filter(conversation_items::Column::ConversationId.is_in(ids.iter().cloned()))
        .group_by(conversation_items::Column::ConversationId)
        .into_tuple()
        .all(db)
        .await?;
    Ok(rows
        .into_iter()
        .map(|(id, n)| (id, u64::try_from(n).unwrap_or(0)))
        .collect())
}

/// One page of a conversation's items in order (oldest first), and how many it holds.
pub async fn items_page(
    db: &impl ConnectionTrait,
    conversation_id: &str,
    page: crate::store::PageReq,
) -> Result<crate::store::Page<conversation_items::Model>, sea_orm::DbErr> {
    use sea_orm::PaginatorTrait;
    let q = conversation_items::Entity::find()
        .filter(conversation_items::Column::ConversationId.eq(conversation_id));
    let total = q.clone().count(db).await?;
    let items = q
        .order_by_asc(conversation_items::Column::Position)
        .offset(page.offset())
        .limit(page.per_page)
        .all(db)
        .await?;
    Ok(crate::store::Page { items, total })
}

/// Most words of a search query used.
pub const MAX_SEARCH_WORDS: usize = 16;
/// Longest word of a search query used, in characters.
const MAX_WORD_CHARS: usize = 64;

/// The words of a search query: runs of letters and digits, lowercased, at most
/// [`MAX_SEARCH_WORDS`] of at most [`MAX_WORD_CHARS`] characters. Every database gets these and
/// only these (no query syntax of its own reaches it).
pub fn search_words(q: &str) -> Vec<String> {
    q.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(|w| {
            w.chars()
                .take(MAX_WORD_CHARS)
                .collect::<String>()
                .to_lowercase()
        })
        .take(MAX_SEARCH_WORDS)
        .collect()
}

/// The `WHERE` of the full-text match of the user's items with every word of `words`, in the
/// database's own index: SQLite FTS5, PostgreSQL `tsvector` (GIN), MySQL/MariaDB `FULLTEXT`.
fn match_clause(
    backend: sea_orm::DbBackend,
    user_id: &str,
    words: &[String],
) -> (String, Vec<sea_orm::Value>) {
    use sea_orm::DbBackend;
    match backend {
        DbBackend::Sqlite => {
            let q = words
                .iter()
                .map(|w| format!("\"{}\"", w.replace('"', "\"\"")))
                .collect::<Vec<_>>()
                .join(" ");
            // The owner's token (`hex(user_id)`, see the migration) and every word: FTS5
            // intersects the owner's short doclist with the words' however common they are.
            let owner = hex::encode_upper(user_id.as_bytes());
            (
                "ci.user_id = ? AND ci.seq IN (SELECT rowid FROM conversation_items_fts WHERE conversation_items_fts MATCH ?)".into(),
                vec![format!("owner : \"{owner}\" AND content_text : ({q})").into()],
            )
        }
        // The index's expression exactly (migration `m20261205_000022_search_owner`): the
        // owner's lexeme `'u' || md5(user_id)` and the words, intersected inside the GIN index.
        // A query without lexemes would leave the owner's alone (every item): refused by
        // `numnode`.
        DbBackend::Postgres => (
            "ci.user_id = $1 AND numnode(plainto_tsquery('simple', $2)) > 0 AND \
             (to_tsvector('simple', coalesce(ci.content_text, '')) || array_to_tsvector(ARRAY['u' || md5(ci.user_id)])) \
             @@ (plainto_tsquery('simple', $2) && ('u' || md5($1))::tsquery)".into(),
            vec![words.join(" ").into()],
        ),
        _ => {
            let q = words
                .iter()
                .map(|w| format!("+{w}"))
                .collect::<Vec<_>>()
                .join(" ");
            (
                "ci.user_id = ? AND MATCH(ci.content_text) AGAINST (? IN BOOLEAN MODE)".into(),
                vec![q.into()],
            )
        }
    }
}

/// The user's items whose text holds every word of `q` (full-text, see [`match_clause`]),
/// newest first, one page, and how many match. Never another user's. No words: nothing.
pub async fn search_items(
    db: &DatabaseConnection,
    user_id: &str,
    q: &str,
    page: crate::store::PageReq,
) -> Result<crate::store::Page<conversation_items::Model>, sea_orm::DbErr> {
    use sea_orm::FromQueryResult;
    let backend = db.get_database_backend();
    let Some((count, select)) = search_items_statements(backend, user_id, q, page) else {
        return Ok(crate::store::Page {
            items: Vec::new(),
            total: 0,
        });
    };
    let total = db
        .query_one_raw(count)
        .await?
        .map(|r| r.try_get::<i64>("", "n"))
        .transpose()?
        .unwrap_or(0);
    let rows = db.query_all_raw(select).await?;
    let items = rows
        .iter()
        .map(|r| conversation_items::Model::from_query_result(r, ""))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(crate::store::Page {
        items,
        total: u64::try_from(total).unwrap_or(0),
    })
}

/// The two statements [`search_items`] runs — the count of the matches, then one page of them —
/// or `None` when `q` has no words. Public so `benches/state.rs` can `EXPLAIN` exactly these.
pub fn search_items_statements(
    backend: sea_orm::DbBackend,
    user_id: &str,
    q: &str,
    page: crate::store::PageReq,
) -> Option<(sea_orm::Statement, sea_orm::Statement)> {
    use sea_orm::Statement;
    let words = search_words(q);
    if words.is_empty() {
        return None;
    }
    let (clause, extra) = match_clause(backend, user_id, &words);
    let mut values: Vec<sea_orm::Value> = vec![user_id.into()];
    values.extend(extra);
    let count_sql = format!("SELECT COUNT(*) AS n FROM conversation_items ci WHERE {clause}");
    let count = Statement::from_sql_and_values(backend, &count_sql, values.clone());
    let (limit, offset) = match backend {
        sea_orm::DbBackend::Postgres => ("$3", "$4"),
        _ => ("?", "?"),
    };
    let sql = format!(
        "SELECT ci.* FROM conversation_items ci WHERE {clause} ORDER BY ci.seq DESC LIMIT {limit} OFFSET {offset}"
    );
    values.push(i64::try_from(page.per_page).unwrap_or(i64::MAX).into());
    values.push(i64::try_from(page.offset()).unwrap_or(i64::MAX).into());
    Some((count, Statement::from_sql_and_values(backend, &sql, values)))
}

/// The conversations (at most `limit`, of the newest matching items) whose message text holds
/// every word of `q`.
pub async fn search_conversation_ids(
    db: &DatabaseConnection,
    user_id: &str,
    q: &str,
    limit: u64,
) -> Result<Vec<String>, sea_orm::DbErr> {
    use sea_orm::Statement;
    let words = search_words(q);
    if words.is_empty() {
        return Ok(Vec::new());
    }
    let backend = db.get_database_backend();
    let (clause, extra) = match_clause(backend, user_id, &words);
    let mut values: Vec<sea_orm::Value> = vec![user_id.into()];
    values.extend(extra);
    values.push(i64::try_from(limit).unwrap_or(i64::MAX).into());
    let lim = match backend {
        sea_orm::DbBackend::Postgres => "$3",
        _ => "?",
    };
    let sql = format!(
        "SELECT DISTINCT ci.conversation_id AS id FROM conversation_items ci WHERE {clause} LIMIT {lim}"
    );
    let rows = db
        .query_all_raw(Statement::from_sql_and_values(backend, &sql, values))
        .await?;
    rows.iter().map(|r| r.try_get::<String>("", "id")).collect()
}

/// Sets (or with `None` clears) the share token hash of the user's conversation; false when
/// there is no such conversation.
pub async fn set_share(
    db: &impl ConnectionTrait,
    user_id: &str,
    id: &str,
    token_hash: Option<String>,
) -> Result<bool, sea_orm::DbErr> {
    let res = conversations::Entity::update_many()
        .col_expr(
            conversations::Column::ShareTokenHash,
            Expr::value(token_hash),
        )
        .filter(conversations::Column::Id.eq(id))
        .filter(conversations::Column::UserId.eq(user_id))
        .exec(db)
        .await?;
    Ok(res.rows_affected > 0)
}

/// The conversation shared under this token hash.
pub async fn by_share(
    db: &impl ConnectionTrait,
    token_hash: &str,
) -> Result<Option<conversations::Model>, sea_orm::DbErr> {
    conversations::Entity::find()
        .filter(conversations::Column::ShareTokenHash.eq(token_hash))
        .one(db)
        .await
}
