//! Usernames are unique regardless of case on every database, as they already were on
//! MySQL/MariaDB (whose default collations compare case-insensitively).
//!
//! PostgreSQL and SQLite compare bytes, so `alice` and `ALICE` could both exist there. This adds a
//! unique index on `LOWER(username)` (usernames are ASCII, so `LOWER` is exact on both), after
//! renaming the accounts that would collide: in each group of names equal but for case the oldest
//! account keeps its name, and each later one becomes `<name>-2`, `<name>-3`, … (cut to fit the
//! 32-character limit, skipping names already taken). No account is dropped; every rename is
//! printed so the operator can tell the users concerned. On MySQL/MariaDB nothing changes.

use std::collections::HashSet;

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::{ConnectionTrait, DbBackend, Statement};

#[derive(DeriveMigrationName)]
pub struct Migration;

const INDEX: &str = "idx_users_username_lower";
/// `validate::username`'s upper bound.
const MAX_LEN: usize = 32;

/// The renames that make `names` (id, username, oldest first) unique ignoring case.
pub fn renames(names: &[(String, String)]) -> Vec<(String, String)> {
    let mut taken: HashSet<String> = names.iter().map(|(_, n)| n.to_ascii_lowercase()).collect();
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for (id, name) in names {
        if seen.insert(name.to_ascii_lowercase()) {
            continue;
        }
        let new = (2u32..)
            .map(|n| {
                let suffix = format!("-{n}");
                let keep = name.len().min(MAX_LEN.saturating_sub(suffix.len()));
                format!("{}{suffix}", &name[..keep])
            })
            .find(|c| !taken.contains(&c.to_ascii_lowercase()))
            .expect("some suffix is free");
        taken.insert(new.to_ascii_lowercase());
        seen.insert(new.to_ascii_lowercase());
        out.push((id.clone(), new));
    }
    out
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        let backend = db.get_database_backend();
        if backend == DbBackend::MySql {
            return Ok(());
        }
        let rows = db
            .query_all_raw(Statement::from_string(
                backend,
                "SELECT id, username FROM users ORDER BY created_at, id",
            ))
            .await?;
        let names = rows
            .iter()
            .map(|r| Ok((r.try_get_by_index(0)?, r.try_get_by_index(1)?)))
            .collect::<Result<Vec<(String, String)>, DbErr>>()?;
        for (id, new) in renames(&names) {
            let old = names
                .iter()
                .find(|(i, _)| *i == id)
                .map(|(_, n)| n.as_str())
                .unwrap_or_default();
            eprintln!(
                "usernames are now unique regardless of case: renamed user {id} from {old:?} to {new:?} (an older account has that name in another case)"
            );
            let sql = match backend {
                DbBackend::Postgres => "UPDATE users SET username = $1 WHERE id = $2",
                _ => "UPDATE users SET username = ? WHERE id = ?",
            };
            db.execute_raw(Statement::from_sql_and_values(
                backend,
                sql,
                [new.into(), id.into()],
            ))
            .await?;
        }
        db.execute_unprepared(&format!(
            "CREATE UNIQUE INDEX {INDEX} ON users (LOWER(username))"
        ))
        .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        if db.get_database_backend() == DbBackend::MySql {
            return Ok(());
        }
        db.execute_unprepared(&format!("DROP INDEX {INDEX}"))
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(v: &[&str]) -> Vec<(String, String)> {
        v.iter()
            .enumerate()
            .map(|(i, n)| (format!("u{i}"), (*n).to_owned()))
            .collect()
    }

    #[test]
    fn the_oldest_keeps_its_name_and_later_ones_get_free_suffixes() {
        assert!(renames(&rows(&["alice", "bob"])).is_empty());
        let r = renames(&rows(&["alice", "ALICE", "Alice", "alice-2"]));
        assert_eq!(
            r,
            vec![
                ("u1".to_owned(), "ALICE-3".to_owned()),
                ("u2".to_owned(), "Alice-4".to_owned())
            ]
        );
        let long = "a".repeat(32);
        let r = renames(&rows(&[&long, &long.to_uppercase()]));
        assert_eq!(r[0].1, format!("{}-2", "A".repeat(30)));
        assert!(r[0].1.len() <= MAX_LEN);
    }
}
