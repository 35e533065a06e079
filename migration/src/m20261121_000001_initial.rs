//! The whole product's schema. Money is integer nano-dollars (USD × 1e9) everywhere.

use sea_orm_migration::{prelude::*, schema::*};

use crate::columns::{instant, instant_null};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Users {
    Table,
    Id,
    Username,
    Email,
    PasswordHash,
    Role,
    Status,
    TotpSecretEnc,
    TotpPendingEnc,
    TotpLastStep,
    BalanceNanos,
    ReservedNanos,
    Plan,
    PlanExpiresAt,
    RpmLimit,
    TpmLimit,
    CreatedAt,
    UpdatedAt,
    LastLoginAt,
}

#[derive(DeriveIden)]
enum Sessions {
    Table,
    Id,
    UserId,
    CreatedAt,
    ExpiresAt,
    RevokedAt,
    Ip,
    UserAgent,
}

#[derive(DeriveIden)]
enum LoginHistory {
    Table,
    Id,
    UserId,
    Username,
    At,
    Ip,
    UserAgent,
    Success,
    Reason,
}

#[derive(DeriveIden)]
enum IpRecords {
    Table,
    Id,
    UserId,
    Ip,
    FirstSeen,
    LastSeen,
    Count,
}

#[derive(DeriveIden)]
enum AuditLog {
    Table,
    Id,
    At,
    ActorId,
    Action,
    Target,
    Ip,
    Detail,
}

#[derive(DeriveIden)]
enum Settings {
    Table,
    Key,
    Value,
    Description,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum Providers {
    Table,
    Key,
    DisplayName,
    BaseUrl,
    Kind,
    IsActive,
    SortOrder,
    CreatedAt,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum Models {
    Table,
    Id,
    Name,
    DisplayName,
    ProviderKey,
    UpstreamModel,
    ModelType,
    InputPriceNanos,
    OutputPriceNanos,
    CachedInputPriceNanos,
    ContextWindow,
    MaxOutputTokens,
    SupportsStreaming,
    SupportsTools,
    SupportsVision,
    Description,
    IsActive,
    SortOrder,
    CreatedAt,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum ProviderKeys {
    Table,
    Id,
    UserId,
    ProviderKey,
    Label,
    BaseUrl,
    SecretEnc,
    MasterKeyId,
    Masked,
    Shared,
    IsActive,
    CreatedAt,
    UpdatedAt,
    LastUsedAt,
}

#[derive(DeriveIden)]
enum GatewayKeys {
    Table,
    Id,
    UserId,
    Name,
    KeyHash,
    Masked,
    AllowedModels,
    AllowedIps,
    RpmLimit,
    TpmLimit,
    BudgetNanos,
    SpentNanos,
    ReservedNanos,
    ExpiresAt,
    IsActive,
    LastUsedAt,
    CreatedAt,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum UsageRecords {
    Table,
    Id,
    At,
    UserId,
    KeyId,
    Model,
    Provider,
    Endpoint,
    Stream,
    Status,
    PromptTokens,
    CompletionTokens,
    CachedTokens,
    CostNanos,
    LatencyMs,
    TtftMs,
    TokensEstimated,
    RequestId,
    SharedKey,
    Error,
}

#[derive(DeriveIden)]
enum BalanceLedger {
    Table,
    Id,
    UserId,
    At,
    AmountNanos,
    Kind,
    Note,
    BalanceAfterNanos,
    ActorId,
}

/// Ids are short strings (UUIDs); 64 characters leaves room without being TEXT (MySQL indexes).
fn id(col: impl IntoIden) -> ColumnDef {
    string_len(col, 64)
}

fn id_null(col: impl IntoIden) -> ColumnDef {
    string_len_null(col, 64)
}

fn index(name: &str, table: impl IntoIden, cols: &[&'static str]) -> IndexCreateStatement {
    let mut stmt = Index::create();
    stmt.name(name).table(table);
    for c in cols {
        stmt.col(Alias::new(*c));
    }
    stmt.to_owned()
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let b = manager.get_database_backend();

        manager
            .create_table(
                Table::create()
                    .table(Users::Table)
                    .col(id(Users::Id).primary_key())
                    .col(string_len_uniq(Users::Username, 64))
                    .col(string_len_null(Users::Email, 255))
                    .col(string_len(Users::PasswordHash, 255))
                    .col(string_len(Users::Role, 16))
                    .col(string_len(Users::Status, 16))
                    .col(text(Users::TotpSecretEnc))
                    .col(text_null(Users::TotpPendingEnc))
                    .col(big_integer_null(Users::TotpLastStep))
                    .col(big_integer(Users::BalanceNanos).default(0))
                    .col(big_integer(Users::ReservedNanos).default(0))
                    .col(string_len_null(Users::Plan, 64))
                    .col(instant_null(b, Users::PlanExpiresAt))
                    .col(integer_null(Users::RpmLimit))
                    .col(integer_null(Users::TpmLimit))
                    .col(instant(b, Users::CreatedAt))
                    .col(instant(b, Users::UpdatedAt))
                    .col(instant_null(b, Users::LastLoginAt))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(index("idx_users_created", Users::Table, &["created_at"]))
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(Sessions::Table)
                    .col(id(Sessions::Id).primary_key())
                    .col(id(Sessions::UserId))
                    .col(instant(b, Sessions::CreatedAt))
                    .col(instant(b, Sessions::ExpiresAt))
                    .col(instant_null(b, Sessions::RevokedAt))
                    .col(string_len_null(Sessions::Ip, 64))
                    .col(string_len_null(Sessions::UserAgent, 255))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(index("idx_sessions_user", Sessions::Table, &["user_id"]))
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(LoginHistory::Table)
                    .col(big_pk_auto(LoginHistory::Id))
                    .col(id_null(LoginHistory::UserId))
                    .col(string_len(LoginHistory::Username, 64))
                    .col(instant(b, LoginHistory::At))
                    .col(string_len_null(LoginHistory::Ip, 64))
                    .col(string_len_null(LoginHistory::UserAgent, 255))
                    .col(boolean(LoginHistory::Success))
                    .col(string_len_null(LoginHistory::Reason, 64))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(index(
                "idx_login_history_username_at",
                LoginHistory::Table,
                &["username", "at"],
            ))
            .await?;
        manager
            .create_index(index(
                "idx_login_history_user_at",
                LoginHistory::Table,
                &["user_id", "at"],
            ))
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(IpRecords::Table)
                    .col(big_pk_auto(IpRecords::Id))
                    .col(id(IpRecords::UserId))
                    .col(string_len(IpRecords::Ip, 64))
                    .col(instant(b, IpRecords::FirstSeen))
                    .col(instant(b, IpRecords::LastSeen))
                    .col(big_integer(IpRecords::Count).default(0))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                index(
                    "uq_ip_records_user_ip",
                    IpRecords::Table,
                    &["user_id", "ip"],
                )
                .unique()
                .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(AuditLog::Table)
                    .col(big_pk_auto(AuditLog::Id))
                    .col(instant(b, AuditLog::At))
                    .col(id_null(AuditLog::ActorId))
                    .col(string_len(AuditLog::Action, 64))
                    .col(string_len_null(AuditLog::Target, 128))
                    .col(string_len_null(AuditLog::Ip, 64))
                    .col(text_null(AuditLog::Detail))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(index(
                "idx_audit_actor_at",
                AuditLog::Table,
                &["actor_id", "at"],
            ))
            .await?;
        manager
            .create_index(index("idx_audit_at", AuditLog::Table, &["at"]))
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(Settings::Table)
                    .col(string_len(Settings::Key, 64).primary_key())
                    .col(text(Settings::Value))
                    .col(string_len_null(Settings::Description, 255))
                    .col(instant(b, Settings::UpdatedAt))
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(Providers::Table)
                    .col(string_len(Providers::Key, 64).primary_key())
                    .col(string_len(Providers::DisplayName, 128))
                    .col(string_len(Providers::BaseUrl, 512))
                    .col(string_len(Providers::Kind, 32))
                    .col(boolean(Providers::IsActive).default(true))
                    .col(integer(Providers::SortOrder).default(0))
                    .col(instant(b, Providers::CreatedAt))
                    .col(instant(b, Providers::UpdatedAt))
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(Models::Table)
                    .col(id(Models::Id).primary_key())
                    .col(string_len_uniq(Models::Name, 128))
                    .col(string_len(Models::DisplayName, 128))
                    .col(string_len(Models::ProviderKey, 64))
                    .col(string_len(Models::UpstreamModel, 128))
                    .col(string_len(Models::ModelType, 16))
                    .col(big_integer(Models::InputPriceNanos).default(0))
                    .col(big_integer(Models::OutputPriceNanos).default(0))
                    .col(big_integer_null(Models::CachedInputPriceNanos))
                    .col(integer_null(Models::ContextWindow))
                    .col(integer_null(Models::MaxOutputTokens))
                    .col(boolean(Models::SupportsStreaming).default(true))
                    .col(boolean(Models::SupportsTools).default(false))
                    .col(boolean(Models::SupportsVision).default(false))
                    .col(text_null(Models::Description))
                    .col(boolean(Models::IsActive).default(true))
                    .col(integer(Models::SortOrder).default(0))
                    .col(instant(b, Models::CreatedAt))
                    .col(instant(b, Models::UpdatedAt))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(index(
                "idx_models_provider",
                Models::Table,
                &["provider_key"],
            ))
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(ProviderKeys::Table)
                    .col(id(ProviderKeys::Id).primary_key())
                    .col(id(ProviderKeys::UserId))
                    .col(string_len(ProviderKeys::ProviderKey, 64))
                    .col(string_len_null(ProviderKeys::Label, 128))
                    .col(string_len_null(ProviderKeys::BaseUrl, 512))
                    .col(text(ProviderKeys::SecretEnc))
                    .col(string_len(ProviderKeys::MasterKeyId, 32))
                    .col(string_len(ProviderKeys::Masked, 32))
                    .col(boolean(ProviderKeys::Shared).default(false))
                    .col(boolean(ProviderKeys::IsActive).default(true))
                    .col(instant(b, ProviderKeys::CreatedAt))
                    .col(instant(b, ProviderKeys::UpdatedAt))
                    .col(instant_null(b, ProviderKeys::LastUsedAt))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(index(
                "idx_provider_keys_user_provider",
                ProviderKeys::Table,
                &["user_id", "provider_key"],
            ))
            .await?;
        manager
            .create_index(index(
                "idx_provider_keys_shared",
                ProviderKeys::Table,
                &["provider_key", "shared"],
            ))
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(GatewayKeys::Table)
                    .col(id(GatewayKeys::Id).primary_key())
                    .col(id(GatewayKeys::UserId))
                    .col(string_len(GatewayKeys::Name, 128))
                    .col(string_len_uniq(GatewayKeys::KeyHash, 64))
                    .col(string_len(GatewayKeys::Masked, 32))
                    .col(text_null(GatewayKeys::AllowedModels))
                    .col(text_null(GatewayKeys::AllowedIps))
                    .col(integer_null(GatewayKeys::RpmLimit))
                    .col(integer_null(GatewayKeys::TpmLimit))
                    .col(big_integer_null(GatewayKeys::BudgetNanos))
                    .col(big_integer(GatewayKeys::SpentNanos).default(0))
                    .col(big_integer(GatewayKeys::ReservedNanos).default(0))
                    .col(instant_null(b, GatewayKeys::ExpiresAt))
                    .col(boolean(GatewayKeys::IsActive).default(true))
                    .col(instant_null(b, GatewayKeys::LastUsedAt))
                    .col(instant(b, GatewayKeys::CreatedAt))
                    .col(instant(b, GatewayKeys::UpdatedAt))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(index(
                "idx_gateway_keys_user",
                GatewayKeys::Table,
                &["user_id"],
            ))
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(UsageRecords::Table)
                    .col(big_pk_auto(UsageRecords::Id))
                    .col(instant(b, UsageRecords::At))
                    .col(id(UsageRecords::UserId))
                    .col(id(UsageRecords::KeyId))
                    .col(string_len(UsageRecords::Model, 128))
                    .col(string_len(UsageRecords::Provider, 64))
                    .col(string_len(UsageRecords::Endpoint, 32))
                    .col(boolean(UsageRecords::Stream))
                    .col(integer(UsageRecords::Status))
                    .col(big_integer(UsageRecords::PromptTokens).default(0))
                    .col(big_integer(UsageRecords::CompletionTokens).default(0))
                    .col(big_integer(UsageRecords::CachedTokens).default(0))
                    .col(big_integer(UsageRecords::CostNanos).default(0))
                    .col(big_integer(UsageRecords::LatencyMs).default(0))
                    .col(big_integer_null(UsageRecords::TtftMs))
                    .col(boolean(UsageRecords::TokensEstimated).default(false))
                    .col(string_len(UsageRecords::RequestId, 128))
                    .col(boolean(UsageRecords::SharedKey).default(false))
                    .col(string_len_null(UsageRecords::Error, 255))
                    .to_owned(),
            )
            .await?;
        for (name, cols) in [
            ("idx_usage_user_at", &["user_id", "at"][..]),
            ("idx_usage_key_at", &["key_id", "at"][..]),
            ("idx_usage_at", &["at"][..]),
            ("idx_usage_request", &["request_id"][..]),
        ] {
            manager
                .create_index(index(name, UsageRecords::Table, cols))
                .await?;
        }

        manager
            .create_table(
                Table::create()
                    .table(BalanceLedger::Table)
                    .col(big_pk_auto(BalanceLedger::Id))
                    .col(id(BalanceLedger::UserId))
                    .col(instant(b, BalanceLedger::At))
                    .col(big_integer(BalanceLedger::AmountNanos))
                    .col(string_len(BalanceLedger::Kind, 16))
                    .col(string_len_null(BalanceLedger::Note, 255))
                    .col(big_integer(BalanceLedger::BalanceAfterNanos))
                    .col(id_null(BalanceLedger::ActorId))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(index(
                "idx_ledger_user_at",
                BalanceLedger::Table,
                &["user_id", "at"],
            ))
            .await?;

        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for t in [
            "balance_ledger",
            "usage_records",
            "gateway_keys",
            "provider_keys",
            "models",
            "providers",
            "settings",
            "audit_log",
            "ip_records",
            "login_history",
            "sessions",
            "users",
        ] {
            manager
                .drop_table(Table::drop().table(Alias::new(t)).to_owned())
                .await?;
        }
        Ok(())
    }
}
