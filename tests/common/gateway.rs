//! A ready gateway for proxy tests: the mock upstream as a provider, one model per mock
//! behaviour, a user with a provider key and a gateway key.

use serde_json::{Value, json};

use super::TestApp;
use super::accounts::{admin_token, user_token};
use super::mock::Mock;

/// The user's upstream key, as stored at the provider (the mock must receive exactly this).
pub const PROVIDER_SECRET: &str = "sk-upstream-user-secret-0123456789";

pub struct Gateway {
    pub mock: Mock,
    pub admin: String,
    pub user: String,
    /// The gateway key secret (`sk-tg-…`).
    pub key: String,
    pub key_id: String,
}

/// Client model name → mock behaviour (upstream model).
pub const MODELS: &[(&str, &str, &str)] = &[
    ("gpt-test", "normal", "chat"),
    ("gpt-cached", "cached", "chat"),
    ("gpt-nousage", "nousage", "chat"),
    ("gpt-slow", "slow", "chat"),
    ("gpt-cut", "cut", "chat"),
    ("gpt-hang", "hang", "chat"),
    ("gpt-400", "err400", "chat"),
    ("gpt-500", "err500", "chat"),
    ("normal", "normal", "chat"),
    ("text-test", "normal", "completion"),
    ("embed-test", "embed", "embedding"),
];

pub async fn setup(app: &TestApp) -> Gateway {
    let mock = Mock::start().await;
    let admin = admin_token(app).await;
    let (s, b) = app
        .post("/api/admin/providers", Some(&admin), json!({"key": "mock", "display_name": "Mock", "base_url": mock.base_url(), "kind": "openai"}))
        .await;
    assert_eq!(s, 201, "create provider: {b}");
    for (name, upstream, kind) in MODELS {
        let (s, b) = app
            .post(
                "/api/admin/models",
                Some(&admin),
                json!({"name": name, "provider": "mock", "upstream_model": upstream, "type": kind,
                       "input_price_per_1m": 1.0, "output_price_per_1m": 2.0, "cached_input_price_per_1m": 0.5,
                       "max_output_tokens": 1000}),
            )
            .await;
        assert_eq!(s, 201, "create model {name}: {b}");
    }
    let user = user_token(app, "alice").await;
    let (s, b) = app
        .post(
            "/api/provider-keys",
            Some(&user),
            json!({"provider": "mock", "api_key": PROVIDER_SECRET}),
        )
        .await;
    assert_eq!(s, 201, "provider key: {b}");
    let (key, key_id) = new_key(app, &user, json!({"name": "test"})).await;
    Gateway {
        mock,
        admin,
        user,
        key,
        key_id,
    }
}

/// Creates a gateway key for the user behind `token`; returns (secret, id).
pub async fn new_key(app: &TestApp, token: &str, body: Value) -> (String, String) {
    let (s, b) = app.post("/api/keys", Some(token), body).await;
    assert_eq!(s, 201, "create key: {b}");
    (
        b["key"].as_str().expect("key").to_owned(),
        b["id"].as_str().expect("id").to_owned(),
    )
}

/// Usage records of the signed-in user, polled until `n` exist (the writer batches every ~50 ms).
pub async fn wait_records(app: &TestApp, token: &str, n: usize) -> Vec<Value> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let (s, b) = app
            .get("/api/me/usage/records?per_page=100", Some(token))
            .await;
        assert_eq!(s, 200, "{b}");
        let total = b["total"].as_u64().unwrap_or(0) as usize;
        if total >= n {
            return b["data"].as_array().cloned().unwrap_or_default();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "only {total} of {n} usage records arrived: {b}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
}
