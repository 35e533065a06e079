//! Entity re-exports under their table names.

pub use super::audit_log::Entity as AuditLog;
pub use super::balance_ledger::Entity as BalanceLedger;
pub use super::conversation_items::Entity as ConversationItems;
pub use super::conversations::Entity as Conversations;
pub use super::gateway_keys::Entity as GatewayKeys;
pub use super::ip_records::Entity as IpRecords;
pub use super::login_history::Entity as LoginHistory;
pub use super::models::Entity as Models;
pub use super::provider_keys::Entity as ProviderKeys;
pub use super::providers::Entity as Providers;
pub use super::reservation_leases::Entity as ReservationLeases;
pub use super::responses::Entity as Responses;
pub use super::sessions::Entity as Sessions;
pub use super::settings::Entity as Settings;
pub use super::stored_completion_metadata::Entity as StoredCompletionMetadata;
pub use super::stored_completions::Entity as StoredCompletions;
pub use super::usage_records::Entity as UsageRecords;
pub use super::users::Entity as Users;
