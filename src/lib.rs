//! tollgate: a multi-tenant, OpenAI-compatible LLM gateway.
//!
//! A request's life is the module layout: `routes` → `proxy` (auth → admit → route → upstream →
//! stream → meter) → `store`. See `ARCHITECTURE.md` in the design notes.

pub mod accounts;
pub mod app;
pub mod cache;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod console;
pub mod conversations;
pub mod crypto;
pub mod edge;
pub mod error;
pub mod metering;
pub mod pivot;
pub mod protocols;
pub mod providers;
pub mod proxy;
pub mod routes;
pub mod routing;
pub mod secrets;
pub mod server;
pub mod settings;
pub mod ssrf;
pub mod state;
pub mod store;
pub mod telemetry;
pub mod validate;
