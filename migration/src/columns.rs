//! Column helpers that pick a portable type per backend.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DbBackend;

/// A UTC instant. MySQL's TIMESTAMP stops in 2038, so MySQL gets `DATETIME(6)`; the others get
/// their timezone-aware type.
pub fn instant(backend: DbBackend, col: impl IntoIden) -> ColumnDef {
    let mut def = ColumnDef::new(col);
    match backend {
        DbBackend::MySql => def.custom(Alias::new("DATETIME(6)")),
        _ => def.timestamp_with_time_zone(),
    };
    def.not_null().take()
}

pub fn instant_null(backend: DbBackend, col: impl IntoIden) -> ColumnDef {
    let mut def = instant(backend, col);
    def.null().take()
}

/// A JSON document of unbounded size (a response object, a conversation item). MySQL's TEXT stops
/// at 64 KiB, so MySQL gets `LONGTEXT`; the others' TEXT is unbounded.
pub fn json_text(backend: DbBackend, col: impl IntoIden) -> ColumnDef {
    let mut def = ColumnDef::new(col);
    match backend {
        DbBackend::MySql => def.custom(Alias::new("LONGTEXT")),
        _ => def.text(),
    };
    def.not_null().take()
}
