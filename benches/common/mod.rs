//! What the hot-path benches and the load harness share: a realistic chat request, upstream
//! payloads, and a ready gateway in a database (user on a plan, provider, priced model, sealed
//! provider key, gateway key with every check switched on), built through the store modules.
#![allow(dead_code)]

use chrono::Utc;
use serde_json::json;
use tollgate::accounts::signup::{self, NewUser, Role};
use tollgate::config::Config;
use tollgate::crypto::{KeyRing, mask, sha256_hex};
use tollgate::store;
use tollgate::store::gateway_keys::NewGatewayKey;
use tollgate::store::models::NewModel;
use tollgate::store::provider_keys::NewProviderKey;
use tollgate::store::providers::NewProvider;
use tollgate::store::users::UserChanges;

/// The catalog name clients use.
pub const MODEL: &str = "gpt-bench";
/// What the gateway sends upstream instead (a different name, so the model swap runs both ways).
pub const UPSTREAM_MODEL: &str = "bench-upstream";
/// The provider's key in the catalog.
pub const PROVIDER: &str = "bench";
/// The plan the user is on (its limits must be in the config's `[[plans]]`).
pub const PLAN: &str = "bench";
/// Limits high enough never to refuse, low enough that every limiter is created and consulted.
pub const RPM_LIMIT: u32 = 10_000_000;
pub const TPM_LIMIT: u32 = 2_000_000_000;
/// The upstream credential stored (sealed) as the user's provider key.
pub const PROVIDER_SECRET: &str = "sk-bench-upstream-0123456789abcdefghijklmnopqrstuvwxyz";

/// The provider, model and upstream model of the translated paths (an `anthropic` provider at
/// the same upstream, which answers `/v1/messages` in Anthropic's shapes).
pub const ANTHROPIC_PROVIDER: &str = "bench-anthropic";
pub const ANTHROPIC_MODEL: &str = "claude-bench";
pub const ANTHROPIC_UPSTREAM_MODEL: &str = "claude-bench-upstream";

/// A model with two deployments, the second at a provider whose upstream fails half its
/// requests (the load harness's retry line): `FLAKY_PROVIDER` at `<upstream>/flaky/v1`.
pub const FLAKY_MODEL: &str = "gpt-bench-flaky";
pub const FLAKY_PROVIDER: &str = "bench-flaky";
/// The path prefix the harness upstream fails half the requests of.
pub const FLAKY_PREFIX: &str = "/flaky";

/// [`chat_body`] for another model.
pub fn chat_body_for(model: &str, stream: bool) -> Vec<u8> {
    let mut v: serde_json::Value = serde_json::from_slice(&chat_body(stream)).unwrap_or_default();
    v["model"] = json!(model);
    serde_json::to_vec(&v).unwrap_or_default()
}

/// The same conversation as [`chat_body`] as a Responses API request (`instructions` from the
/// system message, the rest as input items).
pub fn responses_body(model: &str, stream: bool, store: bool) -> Vec<u8> {
    let chat: serde_json::Value = serde_json::from_slice(&chat_body(stream)).unwrap_or_default();
    let msgs = chat["messages"].as_array().cloned().unwrap_or_default();
    let instructions = msgs
        .first()
        .map(|m| m["content"].clone())
        .unwrap_or_default();
    let input: Vec<serde_json::Value> = msgs[1..]
        .iter()
        .map(|m| json!({"role": m["role"], "content": m["content"]}))
        .collect();
    serde_json::to_vec(&json!({
        "model": model,
        "instructions": instructions,
        "input": input,
        "max_output_tokens": 512,
        "store": store,
        "stream": stream
    }))
    .unwrap_or_default()
}

/// A signed-in chat message (`POST /api/chat/stream`): a new conversation each time.
pub fn chat_ui_body(model: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "model": model,
        "message": "Summarise the trade-offs between a write-ahead log and a shadow-paging scheme in two sentences."
    }))
    .unwrap_or_default()
}

/// The same conversation as [`chat_body`] as an Anthropic Messages request (`system` apart).
pub fn messages_body(model: &str, stream: bool) -> Vec<u8> {
    let chat: serde_json::Value = serde_json::from_slice(&chat_body(stream)).unwrap_or_default();
    let msgs = chat["messages"].as_array().cloned().unwrap_or_default();
    let system = msgs
        .first()
        .map(|m| m["content"].clone())
        .unwrap_or_default();
    let body = json!({
        "model": model,
        "system": system,
        "messages": msgs[1..].to_vec(),
        "max_tokens": 512,
        "temperature": 0.7,
        "metadata": {"user_id": "customer-8842"},
        "stream": stream
    });
    serde_json::to_vec(&body).unwrap_or_default()
}

/// A complete Anthropic message with usage (412 input tokens in all, 128 of them cached).
pub fn anthropic_message(model: &str) -> String {
    json!({
        "id": "msg_bench000000000000000000", "type": "message", "role": "assistant", "model": model,
        "content": [{"type": "text", "text":
            "The dragon-keeper series (48213) ends its first book on a settled note: the apprentice passes her \
             first trial and the story closes at a midwinter feast."}],
        "stop_reason": "end_turn", "stop_sequence": null,
        "usage": {"input_tokens": 284, "cache_read_input_tokens": 128, "cache_creation_input_tokens": 0,
                  "output_tokens": 74}
    })
    .to_string()
}

/// The SSE body of a streamed Anthropic message: the event sequence Anthropic sends, one text
/// delta per word of [`STREAM_WORDS`].
pub fn anthropic_events(model: &str) -> Vec<String> {
    let ev = |name: &str, data: serde_json::Value| format!("event: {name}\ndata: {data}\n\n");
    let mut out = vec![
        ev(
            "message_start",
            json!({"type": "message_start", "message": {
            "id": "msg_bench000000000000000000", "type": "message", "role": "assistant",
            "model": model, "content": [], "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": 284, "cache_read_input_tokens": 128,
                      "cache_creation_input_tokens": 0, "output_tokens": 1}}}),
        ),
        ev(
            "content_block_start",
            json!({"type": "content_block_start", "index": 0,
            "content_block": {"type": "text", "text": ""}}),
        ),
    ];
    for w in STREAM_WORDS {
        out.push(ev(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0,
            "delta": {"type": "text_delta", "text": w}}),
        ));
    }
    out.push(ev(
        "content_block_stop",
        json!({"type": "content_block_stop", "index": 0}),
    ));
    out.push(ev("message_delta", json!({"type": "message_delta",
        "delta": {"stop_reason": "end_turn", "stop_sequence": null}, "usage": {"output_tokens": 38}})));
    out.push(ev("message_stop", json!({"type": "message_stop"})));
    out
}

/// A chat completion request of about 2 KB: a system prompt, a short conversation, the usual
/// sampling fields. Compact JSON, so `"stream":true` appears verbatim.
pub fn chat_body(stream: bool) -> Vec<u8> {
    let system = "You are a careful assistant for an online bookshop. Answer in at most three \
                  short paragraphs, cite the catalogue number of every book you mention, never \
                  invent prices, and say so plainly when you do not know. Prefer British \
                  spelling. If the customer asks about an order, ask for the order number first.";
    let body = json!({
        "model": MODEL,
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": "Hello! I'm looking for a present for my niece, who is twelve and loves \
                stories about dragons and boarding schools. She has already read the obvious ones. Could you \
                suggest something a little less well known, ideally the first book of a series?"},
            {"role": "assistant", "content": "Happy to help. Two series come to mind that are popular with readers \
                of that age but less famous than the usual suspects: one about a girl who is apprenticed to a \
                dragon-keeper at a mountain academy (catalogue 48213), and one set in a school for young \
                cartographers where the maps come alive (catalogue 51907). Both start gently and build up. \
                Would you like paperback or hardback?"},
            {"role": "user", "content": "Both sound lovely. She reads quickly, so a series with at least four books \
                would be ideal, and she has mentioned that she does not enjoy stories where animals come to harm."},
            {"role": "assistant", "content": "Noted. The dragon-keeper series has five books so far and no animal is \
                harmed on the page; the cartographers' series has four, with one chapter in which a messenger bird \
                is lost in a storm but returns safely in the next chapter."},
            {"role": "user", "content": "Paperback, please. Which of the two has the better ending to the first \
                book? I'd rather she were not left on a cliffhanger before the holidays, and can you tell me \
                whether the second one is suitable for a twelve-year-old in terms of how scary it gets?"}
        ],
        "temperature": 0.7,
        "top_p": 1,
        "max_tokens": 512,
        "presence_penalty": 0,
        "frequency_penalty": 0,
        "user": "customer-8842",
        "stream": stream
    });
    serde_json::to_vec(&body).unwrap_or_default()
}

/// One streamed chunk as an OpenAI upstream sends it (the `data:` payload).
pub fn content_chunk(model: &str, text: &str) -> String {
    json!({
        "id": "chatcmpl-bench0000000000000000000000",
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": model,
        "system_fingerprint": "fp_bench",
        "choices": [{"index": 0, "delta": {"content": text}, "logprobs": null, "finish_reason": null}],
        "usage": null
    })
    .to_string()
}

/// The final usage-only chunk (what `stream_options.include_usage` asks for).
pub fn usage_chunk(model: &str) -> String {
    json!({
        "id": "chatcmpl-bench0000000000000000000000",
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": model,
        "system_fingerprint": "fp_bench",
        "choices": [],
        "usage": {"prompt_tokens": 412, "completion_tokens": 38, "total_tokens": 450,
                  "prompt_tokens_details": {"cached_tokens": 128}}
    })
    .to_string()
}

/// A complete (non-streamed) chat completion with usage.
pub fn completion_body(model: &str) -> String {
    json!({
        "id": "chatcmpl-bench0000000000000000000000",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": model,
        "system_fingerprint": "fp_bench",
        "choices": [{"index": 0, "message": {"role": "assistant", "content":
            "The dragon-keeper series (48213) ends its first book on a settled note: the apprentice passes her \
             first trial and the story closes at a midwinter feast. The cartographers' school (51907) is \
             gentler still; it has one tense chapter in a flooded library but nothing a twelve-year-old \
             should find frightening.", "refusal": null}, "logprobs": null, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 412, "completion_tokens": 74, "total_tokens": 486,
                  "prompt_tokens_details": {"cached_tokens": 128}}
    })
    .to_string()
}

/// The words of a streamed answer: one content chunk each.
pub const STREAM_WORDS: [&str; 5] = [
    "The dragon",
    "-keeper series",
    " ends",
    " on a settled",
    " note.",
];

/// The SSE body of a streamed answer: content chunks, the usage chunk, `[DONE]`, one event each.
pub fn sse_events(model: &str) -> Vec<String> {
    let mut out: Vec<String> = STREAM_WORDS
        .iter()
        .map(|w| format!("data: {}\n\n", content_chunk(model, w)))
        .collect();
    out.push(format!("data: {}\n\n", usage_chunk(model)));
    out.push("data: [DONE]\n\n".to_owned());
    out
}

/// What a test or bench needs to know about the gateway it set up.
#[derive(Debug, Clone)]
pub struct Fixture {
    pub user_id: String,
    pub key_id: String,
    /// The gateway key secret (`sk-tg-…`) to present.
    pub key_secret: String,
    pub key_hash: String,
}

/// The config the fixture assumes: balance enforcement on (unless `billing` is false) with a
/// large grant, the bench plan, default limits on. `db_url` and the secrets are the caller's.
pub fn bench_config(db_url: &str, master_key: &str, billing: bool) -> Config {
    let mut cfg = Config::default();
    cfg.server.listen = "127.0.0.1:0".into();
    cfg.database.url = secrecy::SecretString::from(db_url.to_owned());
    cfg.security.master_key = Some(secrecy::SecretString::from(master_key.to_owned()));
    cfg.security.jwt_secret = Some(secrecy::SecretString::from("b".repeat(48)));
    cfg.security.allow_private_base_urls = true;
    cfg.billing.enforce_balance = billing;
    cfg.billing.initial_balance_usd = 1_000_000.0;
    cfg.limits.default_user_rpm = RPM_LIMIT;
    cfg.limits.default_key_rpm = RPM_LIMIT;
    cfg.plans = vec![tollgate::config::PlanConfig {
        name: PLAN.into(),
        rpm_limit: RPM_LIMIT,
        tpm_limit: TPM_LIMIT,
        price_usd_per_month: 0.0,
    }];
    cfg
}

/// The same settings as `config.toml` text for the `tollgate` binary.
pub fn bench_config_toml(db_url: &str, master_key: &str, billing: bool) -> String {
    format!(
        r#"# Written by the load harness (benches/load.rs).
[server]
listen = "127.0.0.1:0"
log_format = "json"
shutdown_drain_secs = 10

[database]
url = "{db_url}"
max_connections = 16

[security]
allow_private_base_urls = true
master_key = "{master_key}"
jwt_secret = "{jwt}"

[billing]
enforce_balance = {billing}
initial_balance_usd = 1000000.0

[limits]
default_user_rpm = {RPM_LIMIT}
default_key_rpm = {RPM_LIMIT}

[[plans]]
name = "{PLAN}"
rpm_limit = {RPM_LIMIT}
tpm_limit = {TPM_LIMIT}
price_usd_per_month = 0.0
"#,
        jwt = "b".repeat(48),
    )
}

/// Creates, through the store modules: an active user on the bench plan with a large balance
/// and an RPM limit of its own; the provider `bench` at `upstream_base_url`; the model `gpt-bench`
/// (→ `bench-upstream`, priced); the user's sealed provider key; and a gateway key with a model
/// allow-list, a loopback IP allow-list, RPM/TPM limits, a budget (when `cfg` enforces the
/// balance, i.e. billing is on) and an expiry.
pub async fn create_fixture(
    db: &sea_orm::DatabaseConnection,
    ring: &KeyRing,
    cfg: &Config,
    upstream_base_url: &str,
) -> anyhow::Result<Fixture> {
    let billing = cfg.billing.enforce_balance;
    let user = signup::create(
        db,
        ring,
        cfg,
        NewUser {
            username: "bench",
            password: "bench-password-0123",
            email: None,
            role: Role::User,
            active: true,
        },
    )
    .await?
    .user;
    store::users::update(
        db,
        &user.id,
        UserChanges {
            plan: Some(Some(PLAN.into())),
            plan_expires_at: Some(Some(Utc::now() + chrono::Duration::days(30))),
            rpm_limit: Some(Some(RPM_LIMIT as i32)),
            ..Default::default()
        },
    )
    .await?;
    store::providers::create(
        db,
        NewProvider {
            key: PROVIDER.into(),
            display_name: "Bench upstream".into(),
            base_url: upstream_base_url.trim_end_matches('/').to_owned(),
            kind: "openai".into(),
            is_active: true,
            sort_order: 0,
            ..Default::default()
        },
    )
    .await?;
    store::models::create(
        db,
        NewModel {
            name: MODEL.into(),
            display_name: "GPT bench".into(),
            provider_key: PROVIDER.into(),
            upstream_model: UPSTREAM_MODEL.into(),
            model_type: "chat".into(),
            input_price_nanos: store::usd_to_nanos(2.5),
            output_price_nanos: store::usd_to_nanos(10.0),
            cached_input_price_nanos: Some(store::usd_to_nanos(1.25)),
            context_window: Some(128_000),
            max_output_tokens: Some(16_384),
            supports_streaming: true,
            supports_tools: true,
            supports_vision: false,
            description: None,
            is_active: true,
            sort_order: 0,
            ..Default::default()
        },
    )
    .await?;
    store::provider_keys::create(
        db,
        ring,
        NewProviderKey {
            user_id: &user.id,
            provider_key: PROVIDER,
            api_key: PROVIDER_SECRET,
            base_url: None,
            label: Some("bench".into()),
            shared: false,
            weight: 1,
        },
    )
    .await?;
    let secret = tollgate::routes::keys::new_gateway_secret();
    let key_hash = sha256_hex(&secret);
    let key = store::gateway_keys::create(
        db,
        NewGatewayKey {
            user_id: user.id.clone(),
            name: "bench".into(),
            key_hash: key_hash.clone(),
            masked: mask(&secret),
            allowed_models: Some(serde_json::to_string(&[
                MODEL,
                ANTHROPIC_MODEL,
                FLAKY_MODEL,
            ])?),
            allowed_ips: Some(r#"["127.0.0.0/8","::1/128"]"#.into()),
            rpm_limit: Some(RPM_LIMIT as i32),
            tpm_limit: Some(TPM_LIMIT as i32),
            budget_nanos: billing.then(|| store::usd_to_nanos(1_000_000.0)),
            expires_at: Some(Utc::now() + chrono::Duration::days(30)),
        },
    )
    .await?;
    Ok(Fixture {
        user_id: user.id,
        key_id: key.id,
        key_secret: secret,
        key_hash,
    })
}

/// Adds the translated paths' `anthropic` provider (at `upstream_base_url`, whose `/messages`
/// answers in Anthropic's shapes), its priced model and the user's key for it.
pub async fn add_anthropic(
    db: &sea_orm::DatabaseConnection,
    ring: &KeyRing,
    user_id: &str,
    upstream_base_url: &str,
) -> anyhow::Result<()> {
    store::providers::create(
        db,
        NewProvider {
            key: ANTHROPIC_PROVIDER.into(),
            display_name: "Bench Anthropic".into(),
            base_url: upstream_base_url.trim_end_matches('/').to_owned(),
            kind: "anthropic".into(),
            is_active: true,
            sort_order: 1,
            ..Default::default()
        },
    )
    .await?;
    store::models::create(
        db,
        NewModel {
            name: ANTHROPIC_MODEL.into(),
            display_name: "Claude bench".into(),
            provider_key: ANTHROPIC_PROVIDER.into(),
            upstream_model: ANTHROPIC_UPSTREAM_MODEL.into(),
            model_type: "chat".into(),
            input_price_nanos: store::usd_to_nanos(3.0),
            output_price_nanos: store::usd_to_nanos(15.0),
            cached_input_price_nanos: Some(store::usd_to_nanos(0.3)),
            context_window: Some(200_000),
            max_output_tokens: Some(8_192),
            supports_streaming: true,
            supports_tools: true,
            supports_vision: false,
            description: None,
            is_active: true,
            sort_order: 1,
            ..Default::default()
        },
    )
    .await?;
    store::provider_keys::create(
        db,
        ring,
        NewProviderKey {
            user_id,
            provider_key: ANTHROPIC_PROVIDER,
            api_key: PROVIDER_SECRET,
            base_url: None,
            label: Some("bench".into()),
            shared: false,
            weight: 1,
        },
    )
    .await?;
    Ok(())
}

/// Adds [`FLAKY_PROVIDER`] (at `upstream_origin` + [`FLAKY_PREFIX`] + `/v1`), the user's key for
/// it, and [`FLAKY_MODEL`] deployed on `bench` and on it with equal weights.
pub async fn add_flaky(
    db: &sea_orm::DatabaseConnection,
    ring: &KeyRing,
    user_id: &str,
    upstream_origin: &str,
) -> anyhow::Result<()> {
    store::providers::create(
        db,
        NewProvider {
            key: FLAKY_PROVIDER.into(),
            display_name: "Bench flaky upstream".into(),
            base_url: format!("{}{FLAKY_PREFIX}/v1", upstream_origin.trim_end_matches('/')),
            kind: "openai".into(),
            is_active: true,
            sort_order: 2,
            ..Default::default()
        },
    )
    .await?;
    store::provider_keys::create(
        db,
        ring,
        NewProviderKey {
            user_id,
            provider_key: FLAKY_PROVIDER,
            api_key: PROVIDER_SECRET,
            base_url: None,
            label: Some("bench".into()),
            shared: false,
            weight: 1,
        },
    )
    .await?;
    store::models::create(
        db,
        NewModel {
            name: FLAKY_MODEL.into(),
            display_name: "GPT bench, one flaky deployment".into(),
            provider_key: PROVIDER.into(),
            upstream_model: UPSTREAM_MODEL.into(),
            model_type: "chat".into(),
            input_price_nanos: store::usd_to_nanos(2.5),
            output_price_nanos: store::usd_to_nanos(10.0),
            cached_input_price_nanos: Some(store::usd_to_nanos(1.25)),
            context_window: Some(128_000),
            max_output_tokens: Some(16_384),
            supports_streaming: true,
            supports_tools: true,
            supports_vision: false,
            description: None,
            is_active: true,
            sort_order: 2,
            deployments: Some(
                json!([
                    {"provider": PROVIDER, "upstream_model": UPSTREAM_MODEL, "weight": 1},
                    {"provider": FLAKY_PROVIDER, "upstream_model": UPSTREAM_MODEL, "weight": 1},
                ])
                .to_string(),
            ),
            ..Default::default()
        },
    )
    .await?;
    Ok(())
}

/// An access token (as sign-in issues) for `user_id`, for the chat routes (`/api/chat/…`).
pub async fn access_token(
    db: &sea_orm::DatabaseConnection,
    cfg: &Config,
    user_id: &str,
) -> anyhow::Result<String> {
    use secrecy::ExposeSecret as _;
    let expires = Utc::now() + chrono::Duration::hours(12);
    let session = store::sessions::create(db, user_id, expires, Some("127.0.0.1"), None).await?;
    let secret = cfg
        .security
        .jwt_secret
        .as_ref()
        .map(|s| s.expose_secret().to_owned())
        .unwrap_or_default();
    let keys = tollgate::accounts::tokens::JwtKeys::new(&secrecy::SecretString::from(secret));
    keys.issue(user_id, &session.id, expires)
}
