//! Schema migrations for tollgate; run unchanged on SQLite, PostgreSQL and MySQL/MariaDB.

pub use sea_orm_migration::prelude::*;

mod columns;
mod m20261121_000001_initial;
mod m20261203_000001_durability;
mod m20261203_000001_username_case;
mod m20261203_000002_catalog_kinds;
mod m20261203_000003_state;
mod m20261203_000010_routing;
mod m20261203_000022_chat;
mod m20261204_000021_response_cache;
mod m20261205_000022_search_owner;

pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261121_000001_initial::Migration),
            Box::new(m20261203_000001_durability::Migration),
            Box::new(m20261203_000001_username_case::Migration),
            Box::new(m20261203_000002_catalog_kinds::Migration),
            Box::new(m20261203_000003_state::Migration),
            Box::new(m20261203_000010_routing::Migration),
            Box::new(m20261203_000022_chat::Migration),
            Box::new(m20261204_000021_response_cache::Migration),
            Box::new(m20261205_000022_search_owner::Migration),
        ]
    }
}
