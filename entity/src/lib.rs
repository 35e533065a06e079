//! sea-orm entities, one file per table. Data only: every query lives in `tollgate::store`.

pub mod prelude;

pub mod audit_log;
pub mod balance_ledger;
pub mod conversation_items;
pub mod conversations;
pub mod gateway_keys;
pub mod ip_records;
pub mod login_history;
pub mod models;
pub mod provider_keys;
pub mod providers;
pub mod reservation_leases;
pub mod responses;
pub mod sessions;
pub mod settings;
pub mod stored_completion_metadata;
pub mod stored_completions;
pub mod usage_records;
pub mod users;
