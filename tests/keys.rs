//! The signed-in user's keys: provider keys (sealed, masked, SSRF-guarded, shared by admins) and
//! gateway keys (hashed, scoped, rotated), the caches the hot path reads, and master key rotation.

mod common;

use std::sync::Arc;

use chrono::Utc;
use common::{TestApp, TestDb, assert_error};
use sea_orm::sea_query::Expr;
use sea_orm::{ActiveModelTrait, ColumnTrait, EntityTrait, QueryFilter, Set};
use serde_json::{Value, json};
use tollgate::config::ProviderSeed;
use tollgate::crypto::{self, KeyRing};
use tollgate::store;

/// A signed-in user made straight through the store (independent of the accounts routes). Their
/// TOTP secret is sealed like the accounts code seals it (AAD = user id).
async fn user(app: &TestApp, username: &str, role: &str) -> (String, String) {
    let state = &app.state;
    let id = store::new_id();
    let now = Utc::now();
    entity::users::ActiveModel {
        id: Set(id.clone()),
        username: Set(username.to_owned()),
        email: Set(None),
        password_hash: Set("unused".into()),
        role: Set(role.to_owned()),
        status: Set("active".into()),
        totp_secret_enc: Set(state.keyring.seal(TOTP.as_bytes(), &id)),
        totp_pending_enc: Set(Some(state.keyring.seal(TOTP_PENDING.as_bytes(), &id))),
        totp_last_step: Set(None),
        balance_nanos: Set(0),
        reserved_nanos: Set(0),
        plan: Set(Some("pro".into())),
        plan_expires_at: Set(None),
        rpm_limit: Set(Some(60)),
        tpm_limit: Set(None),
        created_at: Set(now),
        updated_at: Set(now),
        last_login_at: Set(None),
    }
    .insert(&state.db)
    .await
    .expect("insert user");
    let exp = now + chrono::Duration::hours(1);
    let session = store::sessions::create(&state.db, &id, exp, None, None)
        .await
        .expect("session");
    let token = state.jwt.issue(&id, &session.id, exp).expect("token");
    (id, token)
}

const TOTP: &str = "JBSWY3DPEHPK3PXP";
const TOTP_PENDING: &str = "KRSXG5CTMVRXEZLU";
const UPSTREAM_SECRET: &str = "sk-proj-UPSTREAMsecretVALUE0123456789abcdef";

fn seeds(c: &mut tollgate::config::Config) {
    c.providers = vec![
        ProviderSeed {
            key: "openai".into(),
            display_name: "OpenAI".into(),
            base_url: "https://api.openai.com/v1".into(),
            kind: "openai".into(),
            is_active: true,
            sort_order: 0,
            ..Default::default()
        },
        ProviderSeed {
            key: "groq".into(),
            display_name: "Groq".into(),
            base_url: "https://api.groq.com/openai/v1".into(),
            kind: "openai".into(),
            is_active: true,
            sort_order: 1,
            ..Default::default()
        },
    ];
}

async fn spawn() -> TestApp {
    TestApp::spawn_with(seeds).await
}

async fn add_model(app: &TestApp, admin: &str, name: &str) {
    let (s, b) = app
        .post(
            "/api/admin/models",
            Some(admin),
            json!({"name": name, "provider": "openai"}),
        )
        .await;
    assert_eq!(s, 201, "{b}");
}

// ---------------------------------------------------------------------------------------------
// Provider keys

#[tokio::test]
async fn provider_keys_are_sealed_masked_and_private_to_their_owner() {
    let app = spawn().await;
    let (alice_id, alice) = user(&app, "alice", "user").await;
    let (_, bob) = user(&app, "bob", "user").await;

    let (s, b) = app
        .post(
            "/api/provider-keys",
            None,
            json!({"provider": "openai", "api_key": UPSTREAM_SECRET}),
        )
        .await;
    assert_error(s, &b, 401, "missing_token");

    let (s, k) = app
        .post(
            "/api/provider-keys",
            Some(&alice),
            json!({"provider": "openai", "api_key": UPSTREAM_SECRET, "label": "mine"}),
        )
        .await;
    assert_eq!(s, 201, "{k}");
    assert!(!k.to_string().contains(UPSTREAM_SECRET), "{k}");
    assert!(k.get("api_key").is_none() && k.get("secret_enc").is_none());
    assert_eq!(k["masked"], "sk-pr…cdef");
    assert_eq!(k["provider"], "openai");
    assert_eq!(k["label"], "mine");
    assert_eq!(k["shared"], false);
    assert_eq!(k["is_active"], true);
    assert_eq!(k["base_url"], Value::Null);
    let id = k["id"].as_str().expect("id").to_owned();

    // Stored sealed under the current master key with the row id as AAD.
    let row = entity::provider_keys::Entity::find_by_id(id.clone())
        .one(&app.state.db)
        .await
        .expect("db")
        .expect("row");
    assert_eq!(row.master_key_id, app.state.keyring.current_id());
    assert_eq!(
        app.state
            .keyring
            .open_string(&row.secret_enc, &id)
            .expect("open"),
        UPSTREAM_SECRET
    );
    assert!(
        app.state
            .keyring
            .open(&row.secret_enc, "other-row")
            .is_err()
    );

    let (s, list) = app.get("/api/provider-keys", Some(&alice)).await;
    assert_eq!(s, 200);
    assert_eq!(list["total"], 1);
    assert_eq!(list["data"][0]["masked"], "sk-pr…cdef");
    assert!(!list.to_string().contains(UPSTREAM_SECRET));
    let (_, list) = app.get("/api/provider-keys", Some(&bob)).await;
    assert_eq!(list["total"], 0, "bob sees only his own");

    // Bob cannot touch Alice's key: 404, never 403.
    let path = format!("/api/provider-keys/{id}");
    let (s, b) = app.patch(&path, Some(&bob), json!({"label": "x"})).await;
    assert_error(s, &b, 404, "not_found");
    let (s, b) = app
        .post(&format!("{path}/toggle"), Some(&bob), json!({}))
        .await;
    assert_error(s, &b, 404, "not_found");
    let (s, b) = app.delete(&path, Some(&bob)).await;
    assert_error(s, &b, 404, "not_found");

    // Validation.
    for (body, param) in [
        (
            json!({"provider": "nope", "api_key": "sk-x-123456789"}),
            "provider",
        ),
        (json!({"provider": "openai", "api_key": ""}), "api_key"),
        (
            json!({"provider": "openai", "api_key": "sk with space"}),
            "api_key",
        ),
        (
            json!({"provider": "openai", "api_key": "sk-123456789", "base_url": "ftp://x.example.com"}),
            "base_url",
        ),
    ] {
        let (s, b) = app
            .post("/api/provider-keys", Some(&alice), body.clone())
            .await;
        assert_error(s, &b, 400, "invalid_value");
        assert_eq!(b["error"]["param"], param, "{body}: {b}");
    }
    let (s, b) = app
        .post(
            "/api/provider-keys",
            Some(&alice),
            json!({"provider": "openai", "api_key": "sk-123456789", "user_id": "x"}),
        )
        .await;
    assert_error(s, &b, 400, "unknown_field");

    // PATCH: label cleared, secret replaced (new masked, new ciphertext that opens to it).
    let (s, b) = app
        .patch(
            &path,
            Some(&alice),
            json!({"label": null, "api_key": "sk-replacement-secret-9999"}),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["label"], Value::Null);
    assert_eq!(b["masked"], "sk-re…9999");
    assert!(!b.to_string().contains("replacement"));
    let row = entity::provider_keys::Entity::find_by_id(id.clone())
        .one(&app.state.db)
        .await
        .expect("db")
        .expect("row");
    assert_eq!(
        app.state
            .keyring
            .open_string(&row.secret_enc, &id)
            .expect("open"),
        "sk-replacement-secret-9999"
    );

    // Toggle and delete.
    let (s, b) = app
        .post(&format!("{path}/toggle"), Some(&alice), json!({}))
        .await;
    assert_eq!((s, &b["is_active"]), (200, &json!(false)), "{b}");
    let (s, b) = app
        .post(&format!("{path}/toggle"), Some(&alice), json!({}))
        .await;
    assert_eq!((s, &b["is_active"]), (200, &json!(true)), "{b}");
    let (s, _) = app.delete(&path, Some(&alice)).await;
    assert_eq!(s, 204);
    let (s, b) = app.delete(&path, Some(&alice)).await;
    assert_error(s, &b, 404, "not_found");

    let audit = store::audit::list(
        &app.state.db,
        Some(&alice_id),
        None,
        store::PageReq::new(None, Some(100)),
    )
    .await
    .expect("audit");
    let actions: Vec<&str> = audit.items.iter().map(|a| a.action.as_str()).collect();
    for want in [
        "provider_key.create",
        "provider_key.update",
        "provider_key.toggle",
        "provider_key.delete",
    ] {
        assert!(actions.contains(&want), "{want} missing from {actions:?}");
    }
    for a in &audit.items {
        let d = a.detail.clone().unwrap_or_default();
        assert!(
            !d.contains(UPSTREAM_SECRET) && !d.contains("replacement"),
            "{d}"
        );
    }
}

#[tokio::test]
async fn private_base_urls_are_refused() {
    let app = spawn().await;
    let (_, alice) = user(&app, "alice", "user").await;
    for url in [
        "http://127.0.0.1:8080/v1",
        "http://10.1.2.3/v1",
        "http://192.168.0.10/v1",
        "http://172.20.0.1/v1",
        "http://169.254.169.254/latest",
        "http://100.64.0.1/",
        "http://0.0.0.0/",
        "http://2130706433/",
        "http://[::1]:8080/v1",
        "http://[fd00::1]/v1",
        "http://[fe80::1]/v1",
        "http://[::ffff:127.0.0.1]/v1",
        "http://localhost:8080/v1",
    ] {
        let (s, b) = app
            .post(
                "/api/provider-keys",
                Some(&alice),
                json!({"provider": "openai", "api_key": "sk-abcdefghijkl", "base_url": url}),
            )
            .await;
        assert_error(s, &b, 400, "private_base_url");
        assert_eq!(b["error"]["param"], "base_url", "{url}: {b}");
    }
    // A public literal needs no DNS and is stored normalised.
    let (s, k) = app
        .post(
            "/api/provider-keys",
            Some(&alice),
            json!({"provider": "openai", "api_key": "sk-abcdefghijkl", "base_url": "https://8.8.8.8/v1/"}),
        )
        .await;
    assert_eq!(s, 201, "{k}");
    assert_eq!(k["base_url"], "https://8.8.8.8/v1");
    // PATCH is guarded too.
    let (s, b) = app
        .patch(
            &format!("/api/provider-keys/{}", k["id"].as_str().expect("id")),
            Some(&alice),
            json!({"base_url": "http://[::1]/"}),
        )
        .await;
    assert_error(s, &b, 400, "private_base_url");

    // With the switch on, a local upstream is fine.
    let app = TestApp::spawn_with(|c| {
        seeds(c);
        c.security.allow_private_base_urls = true;
    })
    .await;
    let (_, alice) = user(&app, "alice", "user").await;
    for url in [
        "http://localhost:8080/v1",
        "http://[::1]:9/v1",
        "http://10.0.0.5/v1",
    ] {
        let (s, b) = app
            .post(
                "/api/provider-keys",
                Some(&alice),
                json!({"provider": "openai", "api_key": "sk-abcdefghijkl", "base_url": url}),
            )
            .await;
        assert_eq!(s, 201, "{url}: {b}");
    }
}

#[tokio::test]
async fn shared_provider_keys_are_admin_only_and_serve_users_without_their_own() {
    let app = spawn().await;
    let (admin_id, admin) = user(&app, "root", "admin").await;
    let (alice_id, alice) = user(&app, "alice", "user").await;
    let caches = &app.state.caches;
    let db = &app.state.db;

    let (s, b) = app
        .post(
            "/api/provider-keys",
            Some(&alice),
            json!({"provider": "openai", "api_key": "sk-alice-shared-1234", "shared": true}),
        )
        .await;
    assert_error(s, &b, 403, "forbidden");

    // Nothing yet: no key at all (and the answer is cached).
    assert!(
        caches
            .provider_key(db, &alice_id, "openai")
            .await
            .expect("db")
            .is_none()
    );

    let (s, shared) = app
        .post(
            "/api/provider-keys",
            Some(&admin),
            json!({"provider": "openai", "api_key": "sk-platform-key-5678", "shared": true}),
        )
        .await;
    assert_eq!(s, 201, "{shared}");
    assert_eq!(shared["shared"], true);
    let shared_id = shared["id"].as_str().expect("id").to_owned();

    // Alice has none of her own: the shared key serves her, marked as borrowed.
    let e = caches
        .provider_key(db, &alice_id, "openai")
        .await
        .expect("db")
        .expect("shared key");
    assert_eq!(
        (e.id.as_str(), e.user_id.as_str()),
        (shared_id.as_str(), admin_id.as_str())
    );
    assert!(e.shared);
    assert_eq!(
        app.state
            .keyring
            .open_string(&e.secret_enc, &e.id)
            .expect("open"),
        "sk-platform-key-5678"
    );
    // The admin's own use of it is not "borrowed".
    let own = caches
        .provider_key(db, &admin_id, "openai")
        .await
        .expect("db")
        .expect("own");
    assert!(!own.shared);
    // No shared key for another provider.
    assert!(
        caches
            .provider_key(db, &alice_id, "groq")
            .await
            .expect("db")
            .is_none()
    );

    // Alice adds her own: it wins at once.
    let (s, mine) = app
        .post(
            "/api/provider-keys",
            Some(&alice),
            json!({"provider": "openai", "api_key": "sk-alice-own-0000", "base_url": "https://8.8.4.4/v1"}),
        )
        .await;
    assert_eq!(s, 201, "{mine}");
    let mine_id = mine["id"].as_str().expect("id").to_owned();
    let e = caches
        .provider_key(db, &alice_id, "openai")
        .await
        .expect("db")
        .expect("own key");
    assert_eq!(e.id, mine_id);
    assert!(!e.shared);
    assert_eq!(e.base_url.as_deref(), Some("https://8.8.4.4/v1"));

    // Her key off → the shared one again; the admin turns the shared key off → nothing.
    let (s, _) = app
        .post(
            &format!("/api/provider-keys/{mine_id}/toggle"),
            Some(&alice),
            json!({}),
        )
        .await;
    assert_eq!(s, 200);
    let e = caches
        .provider_key(db, &alice_id, "openai")
        .await
        .expect("db")
        .expect("shared again");
    assert_eq!(e.id, shared_id);
    let (s, _) = app
        .post(
            &format!("/api/provider-keys/{shared_id}/toggle"),
            Some(&admin),
            json!({}),
        )
        .await;
    assert_eq!(s, 200);
    assert!(
        caches
            .provider_key(db, &alice_id, "openai")
            .await
            .expect("db")
            .is_none()
    );

    // A non-admin cannot flip an existing key to shared either.
    let (s, b) = app
        .patch(
            &format!("/api/provider-keys/{mine_id}"),
            Some(&alice),
            json!({"shared": true}),
        )
        .await;
    assert_error(s, &b, 403, "forbidden");

    // Un-sharing is invalidated for everyone.
    let (s, _) = app
        .post(
            &format!("/api/provider-keys/{shared_id}/toggle"),
            Some(&admin),
            json!({}),
        )
        .await;
    assert_eq!(s, 200);
    assert!(
        caches
            .provider_key(db, &alice_id, "openai")
            .await
            .expect("db")
            .is_some()
    );
    let (s, b) = app
        .patch(
            &format!("/api/provider-keys/{shared_id}"),
            Some(&admin),
            json!({"shared": false}),
        )
        .await;
    assert_eq!((s, &b["shared"]), (200, &json!(false)), "{b}");
    assert!(
        caches
            .provider_key(db, &alice_id, "openai")
            .await
            .expect("db")
            .is_none()
    );
}

// ---------------------------------------------------------------------------------------------
// Gateway keys

fn is_gateway_secret(s: &str) -> bool {
    s.strip_prefix("sk-tg-")
        .is_some_and(|r| r.len() == 48 && r.bytes().all(|b| b.is_ascii_alphanumeric()))
}

#[tokio::test]
async fn gateway_keys_crud_validation_and_isolation() {
    let app = spawn().await;
    let (_, admin) = user(&app, "root", "admin").await;
    let (alice_id, alice) = user(&app, "alice", "user").await;
    let (_, bob) = user(&app, "bob", "user").await;
    add_model(&app, &admin, "gpt-mini").await;
    add_model(&app, &admin, "gpt-big").await;

    let (s, b) = app.post("/api/keys", None, json!({"name": "x"})).await;
    assert_error(s, &b, 401, "missing_token");

    let expires = (Utc::now() + chrono::Duration::days(30)).to_rfc3339();
    let (s, k) = app
        .post(
            "/api/keys",
            Some(&alice),
            json!({
                "name": "ci",
                "allowed_models": ["gpt-mini"],
                "allowed_ips": ["203.0.113.7", "10.1.2.3/8", "2001:db8::1/32"],
                "rpm_limit": 60,
                "tpm_limit": 100000,
                "budget_usd": 12.5,
                "expires_at": expires,
            }),
        )
        .await;
    assert_eq!(s, 201, "{k}");
    let secret = k["key"].as_str().expect("key").to_owned();
    assert!(is_gateway_secret(&secret), "{secret}");
    let id = k["id"].as_str().expect("id").to_owned();
    assert_eq!(k["name"], "ci");
    assert_eq!(k["masked"], crypto::mask(&secret));
    assert!(k["masked"].as_str().expect("masked").starts_with("sk-tg…"));
    assert_eq!(k["allowed_models"], json!(["gpt-mini"]));
    assert_eq!(
        k["allowed_ips"],
        json!(["203.0.113.7/32", "10.0.0.0/8", "2001:db8::/32"])
    );
    assert_eq!(k["rpm_limit"], 60);
    assert_eq!(k["tpm_limit"], 100000);
    assert_eq!(k["budget_usd"], 12.5);
    assert_eq!(k["spent_usd"], 0.0);
    assert_eq!(k["is_active"], true);
    assert_eq!(k["last_used_at"], Value::Null);
    assert!(k["expires_at"].as_str().expect("ts").ends_with('Z'));
    assert!(k["created_at"].is_string());

    // The secret is never shown again.
    let (s, one) = app.get(&format!("/api/keys/{id}"), Some(&alice)).await;
    assert_eq!(s, 200);
    assert!(one.get("key").is_none());
    assert!(!one.to_string().contains(&secret[6..]));
    assert_eq!(one["masked"], k["masked"]);
    let (s, list) = app.get("/api/keys", Some(&alice)).await;
    assert_eq!((s, &list["total"]), (200, &json!(1)));
    assert!(list["data"][0].get("key").is_none());
    assert!(!list.to_string().contains(&secret[6..]));

    // Minimal key: everything optional but the name.
    let (s, min) = app
        .post("/api/keys", Some(&alice), json!({"name": "open"}))
        .await;
    assert_eq!(s, 201, "{min}");
    assert_eq!(min["allowed_models"], Value::Null);
    assert_eq!(min["allowed_ips"], Value::Null);
    assert_eq!(min["budget_usd"], Value::Null);
    assert_eq!(min["expires_at"], Value::Null);
    assert_ne!(min["key"], k["key"]);
    let (_, list) = app.get("/api/keys", Some(&alice)).await;
    assert_eq!(list["data"][0]["name"], "open", "newest first");

    // Validation.
    let past = (Utc::now() - chrono::Duration::minutes(1)).to_rfc3339();
    for (body, code, param) in [
        (json!({"name": ""}), "invalid_value", "name"),
        (
            json!({"name": "x", "allowed_ips": ["10.0.0.0/33"]}),
            "invalid_value",
            "allowed_ips",
        ),
        (
            json!({"name": "x", "allowed_ips": ["not-an-ip"]}),
            "invalid_value",
            "allowed_ips",
        ),
        (
            json!({"name": "x", "allowed_ips": ["1.2.3.4/"]}),
            "invalid_value",
            "allowed_ips",
        ),
        (
            json!({"name": "x", "allowed_ips": []}),
            "invalid_value",
            "allowed_ips",
        ),
        (
            json!({"name": "x", "allowed_models": ["no-such-model"]}),
            "model_not_found",
            "allowed_models",
        ),
        (
            json!({"name": "x", "allowed_models": []}),
            "invalid_value",
            "allowed_models",
        ),
        (
            json!({"name": "x", "rpm_limit": -1}),
            "invalid_value",
            "rpm_limit",
        ),
        (
            json!({"name": "x", "tpm_limit": -5}),
            "invalid_value",
            "tpm_limit",
        ),
        (
            json!({"name": "x", "budget_usd": -0.5}),
            "invalid_value",
            "budget_usd",
        ),
        (
            json!({"name": "x", "expires_at": past}),
            "invalid_value",
            "expires_at",
        ),
        (
            json!({"name": "x", "expires_at": "tomorrow"}),
            "invalid_value",
            "expires_at",
        ),
    ] {
        let (s, b) = app.post("/api/keys", Some(&alice), body.clone()).await;
        assert_error(s, &b, 400, code);
        assert_eq!(b["error"]["param"], param, "{body}: {b}");
    }
    let (s, b) = app
        .post(
            "/api/keys",
            Some(&alice),
            json!({"name": "x", "key_hash": "abc"}),
        )
        .await;
    assert_error(s, &b, 400, "unknown_field");
    let (s, b) = app
        .post("/api/keys", Some(&alice), json!({"allowed_models": null}))
        .await;
    assert_error(s, &b, 400, "missing_field");

    // PATCH: re-scope, clear, and validate.
    let path = format!("/api/keys/{id}");
    let (s, b) = app
        .patch(
            &path,
            Some(&alice),
            json!({"name": "ci-2", "allowed_models": ["gpt-mini", "gpt-big"], "allowed_ips": null,
                   "budget_usd": null, "rpm_limit": 0}),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["name"], "ci-2");
    assert_eq!(b["allowed_models"], json!(["gpt-mini", "gpt-big"]));
    assert_eq!(b["allowed_ips"], Value::Null);
    assert_eq!(b["budget_usd"], Value::Null);
    assert_eq!(b["rpm_limit"], 0);
    assert_eq!(b["tpm_limit"], 100000, "untouched");
    assert!(b.get("key").is_none());
    for (body, param) in [
        (json!({"allowed_ips": ["300.1.1.1"]}), "allowed_ips"),
        (json!({"budget_usd": -1}), "budget_usd"),
        (json!({"expires_at": past}), "expires_at"),
    ] {
        let (s, b) = app.patch(&path, Some(&alice), body).await;
        assert_error(s, &b, 400, "invalid_value");
        assert_eq!(b["error"]["param"], param);
    }
    let (s, b) = app
        .patch(&path, Some(&alice), json!({"allowed_models": ["ghost"]}))
        .await;
    assert_error(s, &b, 400, "model_not_found");

    // Bob: 404 on every route for Alice's key; his list is empty.
    let (s, b) = app.get(&path, Some(&bob)).await;
    assert_error(s, &b, 404, "not_found");
    let (s, b) = app.patch(&path, Some(&bob), json!({"name": "mine"})).await;
    assert_error(s, &b, 404, "not_found");
    let (s, b) = app
        .post(&format!("{path}/toggle"), Some(&bob), json!({}))
        .await;
    assert_error(s, &b, 404, "not_found");
    let (s, b) = app
        .post(&format!("{path}/rotate"), Some(&bob), json!({}))
        .await;
    assert_error(s, &b, 404, "not_found");
    let (s, b) = app.delete(&path, Some(&bob)).await;
    assert_error(s, &b, 404, "not_found");
    let (_, list) = app.get("/api/keys", Some(&bob)).await;
    assert_eq!(list["total"], 0);
    let (s, b) = app.get("/api/keys/nope", Some(&alice)).await;
    assert_error(s, &b, 404, "not_found");

    // Rotate: a new secret in the 200, the old hash gone from the row.
    let (s, r) = app
        .post(&format!("{path}/rotate"), Some(&alice), json!({}))
        .await;
    assert_eq!(s, 200, "{r}");
    let new_secret = r["key"].as_str().expect("key").to_owned();
    assert!(is_gateway_secret(&new_secret));
    assert_ne!(new_secret, secret);
    assert_eq!(r["id"], json!(id));
    assert_eq!(r["masked"], crypto::mask(&new_secret));
    let row = store::gateway_keys::find_owned(&app.state.db, &alice_id, &id)
        .await
        .expect("db")
        .expect("row");
    assert_eq!(row.key_hash, crypto::sha256_hex(&new_secret));

    // Toggle, then delete (hard).
    let (s, b) = app
        .post(&format!("{path}/toggle"), Some(&alice), json!({}))
        .await;
    assert_eq!((s, &b["is_active"]), (200, &json!(false)));
    let (s, _) = app.delete(&path, Some(&alice)).await;
    assert_eq!(s, 204);
    let (s, b) = app.get(&path, Some(&alice)).await;
    assert_error(s, &b, 404, "not_found");
    assert!(
        store::gateway_keys::find_by_hash(&app.state.db, &crypto::sha256_hex(&new_secret))
            .await
            .expect("db")
            .is_none()
    );

    let audit = store::audit::list(
        &app.state.db,
        Some(&alice_id),
        None,
        store::PageReq::new(None, Some(100)),
    )
    .await
    .expect("audit");
    let actions: Vec<&str> = audit.items.iter().map(|a| a.action.as_str()).collect();
    for want in [
        "gateway_key.create",
        "gateway_key.update",
        "gateway_key.rotate",
        "gateway_key.toggle",
        "gateway_key.delete",
    ] {
        assert!(actions.contains(&want), "{want} missing from {actions:?}");
    }
    for a in &audit.items {
        let d = a.detail.clone().unwrap_or_default();
        assert!(
            !d.contains(&secret[6..]) && !d.contains(&new_secret[6..]),
            "{d}"
        );
    }
}

#[tokio::test]
async fn key_cache_reflects_every_change_on_the_next_call() {
    let app = spawn().await;
    let (_, admin) = user(&app, "root", "admin").await;
    let (alice_id, alice) = user(&app, "alice", "user").await;
    add_model(&app, &admin, "gpt-mini").await;
    let (caches, db, metrics) = (&app.state.caches, &app.state.db, &app.state.metrics);

    let (s, k) = app
        .post(
            "/api/keys",
            Some(&alice),
            json!({"name": "svc", "allowed_ips": ["10.0.0.0/8"], "rpm_limit": 30, "budget_usd": 1.5}),
        )
        .await;
    assert_eq!(s, 201, "{k}");
    let id = k["id"].as_str().expect("id").to_owned();
    let secret = k["key"].as_str().expect("key").to_owned();
    let hash = crypto::sha256_hex(&secret);
    let path = format!("/api/keys/{id}");

    let misses = metrics.auth_cache_misses_total.get();
    let hits = metrics.auth_cache_hits_total.get();
    let ctx = caches
        .gateway_key(db, metrics, &hash)
        .await
        .expect("db")
        .expect("known key");
    assert_eq!(ctx.key_id, id);
    assert_eq!(ctx.user_id, alice_id);
    assert_eq!(ctx.key_name, "svc");
    assert_eq!(ctx.rpm_limit, Some(30));
    assert_eq!(ctx.budget_nanos, Some(1_500_000_000));
    assert!(ctx.allowed_models.is_none() && ctx.allows_model("gpt-mini"));
    assert!(ctx.allows_ip("10.9.8.7".parse().expect("ip")));
    assert!(!ctx.allows_ip("192.0.2.1".parse().expect("ip")));
    assert!(ctx.is_active_at(Utc::now()));
    assert!(ctx.user_is_active());
    assert_eq!(ctx.user_role, "user");
    assert_eq!(ctx.user_rpm_limit, Some(60));
    assert_eq!(ctx.plan.as_deref(), Some("pro"));
    assert_eq!(metrics.auth_cache_misses_total.get(), misses + 1);

    // A hit: same Arc, counted, and no database needed (proved below by changing the row behind
    // the cache's back).
    let again = caches
        .gateway_key(db, metrics, &hash)
        .await
        .expect("db")
        .expect("key");
    assert!(Arc::ptr_eq(&ctx, &again));
    assert_eq!(metrics.auth_cache_hits_total.get(), hits + 1);
    entity::gateway_keys::Entity::update_many()
        .col_expr(entity::gateway_keys::Column::Name, Expr::value("sneaky"))
        .filter(entity::gateway_keys::Column::Id.eq(id.as_str()))
        .exec(db)
        .await
        .expect("db");
    let cached = caches
        .gateway_key(db, metrics, &hash)
        .await
        .expect("db")
        .expect("key");
    assert_eq!(cached.key_name, "svc", "served from the cache");

    // Toggle off → inactive on the very next call; on again → active.
    let (s, _) = app
        .post(&format!("{path}/toggle"), Some(&alice), json!({}))
        .await;
    assert_eq!(s, 200);
    let ctx = caches
        .gateway_key(db, metrics, &hash)
        .await
        .expect("db")
        .expect("key");
    assert!(!ctx.is_active && !ctx.is_active_at(Utc::now()));
    let (s, _) = app
        .post(&format!("{path}/toggle"), Some(&alice), json!({}))
        .await;
    assert_eq!(s, 200);
    assert!(
        caches
            .gateway_key(db, metrics, &hash)
            .await
            .expect("db")
            .expect("key")
            .is_active
    );

    // Re-scope → the next call sees the new scope.
    let (s, _) = app
        .patch(
            &path,
            Some(&alice),
            json!({"allowed_models": ["gpt-mini"], "allowed_ips": null}),
        )
        .await;
    assert_eq!(s, 200);
    let ctx = caches
        .gateway_key(db, metrics, &hash)
        .await
        .expect("db")
        .expect("key");
    assert!(ctx.allows_model("gpt-mini") && !ctx.allows_model("gpt-big"));
    assert!(ctx.allows_ip("192.0.2.1".parse().expect("ip")));

    // Rotate: the old secret dies at once, the new one works.
    let (s, r) = app
        .post(&format!("{path}/rotate"), Some(&alice), json!({}))
        .await;
    assert_eq!(s, 200);
    let new_hash = crypto::sha256_hex(r["key"].as_str().expect("key"));
    assert!(
        caches
            .gateway_key(db, metrics, &hash)
            .await
            .expect("db")
            .is_none()
    );
    let ctx = caches
        .gateway_key(db, metrics, &new_hash)
        .await
        .expect("db")
        .expect("new key");
    assert_eq!(ctx.key_id, id);

    // Unknown keys are cached as "none": the second lookup is a hit.
    let bogus = crypto::sha256_hex("sk-tg-bogus");
    let misses = metrics.auth_cache_misses_total.get();
    let hits = metrics.auth_cache_hits_total.get();
    assert!(
        caches
            .gateway_key(db, metrics, &bogus)
            .await
            .expect("db")
            .is_none()
    );
    assert!(
        caches
            .gateway_key(db, metrics, &bogus)
            .await
            .expect("db")
            .is_none()
    );
    assert_eq!(metrics.auth_cache_misses_total.get(), misses + 1);
    assert_eq!(metrics.auth_cache_hits_total.get(), hits + 1);

    // Delete (revoke) → gone on the next call.
    let (s, _) = app.delete(&path, Some(&alice)).await;
    assert_eq!(s, 204);
    assert!(
        caches
            .gateway_key(db, metrics, &new_hash)
            .await
            .expect("db")
            .is_none()
    );
}

#[tokio::test]
async fn expired_keys_and_disabled_users_show_in_the_context() {
    let app = spawn().await;
    let (alice_id, alice) = user(&app, "alice", "user").await;
    let (caches, db, metrics) = (&app.state.caches, &app.state.db, &app.state.metrics);

    let expires = Utc::now() + chrono::Duration::hours(1);
    let (s, k) = app
        .post(
            "/api/keys",
            Some(&alice),
            json!({"name": "short", "expires_at": expires.to_rfc3339()}),
        )
        .await;
    assert_eq!(s, 201, "{k}");
    let id = k["id"].as_str().expect("id").to_owned();
    let hash = crypto::sha256_hex(k["key"].as_str().expect("key"));
    let ctx = caches
        .gateway_key(db, metrics, &hash)
        .await
        .expect("db")
        .expect("key");
    assert!(ctx.is_active_at(Utc::now()));
    // The cached context stops being active the moment the expiry passes, with no reload.
    assert!(ctx.is_expired_at(expires));
    assert!(!ctx.is_active_at(expires + chrono::Duration::seconds(1)));

    // A key whose expiry is already past (set behind the API's back) reads as inactive.
    entity::gateway_keys::Entity::update_many()
        .col_expr(
            entity::gateway_keys::Column::ExpiresAt,
            Expr::value(Utc::now() - chrono::Duration::minutes(5)),
        )
        .filter(entity::gateway_keys::Column::Id.eq(id.as_str()))
        .exec(db)
        .await
        .expect("db");
    caches.invalidate_gateway_key(&hash).await;
    let ctx = caches
        .gateway_key(db, metrics, &hash)
        .await
        .expect("db")
        .expect("key");
    assert!(ctx.is_active, "the switch is still on");
    assert!(!ctx.is_active_at(Utc::now()), "but the key has expired");

    // The owner is disabled: after invalidate_user the context says so.
    entity::users::Entity::update_many()
        .col_expr(entity::users::Column::Status, Expr::value("disabled"))
        .filter(entity::users::Column::Id.eq(alice_id.as_str()))
        .exec(db)
        .await
        .expect("db");
    let stale = caches
        .gateway_key(db, metrics, &hash)
        .await
        .expect("db")
        .expect("key");
    assert!(stale.user_is_active(), "cached until invalidated");
    caches.invalidate_user(&alice_id).await;
    let ctx = caches
        .gateway_key(db, metrics, &hash)
        .await
        .expect("db")
        .expect("key");
    assert_eq!(ctx.user_status, "disabled");
    assert!(!ctx.user_is_active());

    // invalidate_user touches only that user's entries.
    let (_, bob) = user(&app, "bob", "user").await;
    let (_, kb) = app
        .post("/api/keys", Some(&bob), json!({"name": "b"}))
        .await;
    let bob_hash = crypto::sha256_hex(kb["key"].as_str().expect("key"));
    let bob_ctx = caches
        .gateway_key(db, metrics, &bob_hash)
        .await
        .expect("db")
        .expect("key");
    caches.invalidate_user(&alice_id).await;
    let bob_again = caches
        .gateway_key(db, metrics, &bob_hash)
        .await
        .expect("db")
        .expect("key");
    assert!(Arc::ptr_eq(&bob_ctx, &bob_again));
}

// ---------------------------------------------------------------------------------------------
// Secrets at rest

#[tokio::test]
async fn no_secret_is_stored_in_clear() {
    let app = spawn().await;
    let (_, alice) = user(&app, "alice", "user").await;
    let (s, pk) = app
        .post(
            "/api/provider-keys",
            Some(&alice),
            json!({"provider": "openai", "api_key": UPSTREAM_SECRET, "label": "prod"}),
        )
        .await;
    assert_eq!(s, 201, "{pk}");
    let (s, gk) = app
        .post("/api/keys", Some(&alice), json!({"name": "svc"}))
        .await;
    assert_eq!(s, 201, "{gk}");
    let gateway_secret = gk["key"].as_str().expect("key").to_owned();
    let random_part = &gateway_secret[6..];

    let db = &app.state.db;
    let mut rows: Vec<Value> = entity::provider_keys::Entity::find()
        .into_json()
        .all(db)
        .await
        .expect("db");
    rows.extend(
        entity::gateway_keys::Entity::find()
            .into_json()
            .all(db)
            .await
            .expect("db"),
    );
    rows.extend(
        entity::audit_log::Entity::find()
            .into_json()
            .all(db)
            .await
            .expect("db"),
    );
    assert!(rows.len() >= 4, "{rows:?}");
    for row in &rows {
        let text = row.to_string();
        assert!(!text.contains(UPSTREAM_SECRET), "{text}");
        assert!(!text.contains(&UPSTREAM_SECRET[8..20]), "{text}");
        assert!(!text.contains(random_part), "{text}");
        assert!(!text.contains(&random_part[10..30]), "{text}");
    }
    // What is stored is enough to use them: a hash and a sealed value.
    let g = &rows
        .iter()
        .find(|r| r.get("key_hash").is_some())
        .expect("gateway row");
    assert_eq!(g["key_hash"], crypto::sha256_hex(&gateway_secret));
}

// ---------------------------------------------------------------------------------------------
// Master key rotation

#[tokio::test]
async fn rekey_reseals_everything_under_the_new_key() {
    let app = spawn().await;
    let (alice_id, alice) = user(&app, "alice", "user").await;
    let (bob_id, bob) = user(&app, "bob", "user").await;
    let mut originals = Vec::new();
    for (token, secret) in [
        (&alice, "sk-alice-aaaaaaaa"),
        (&bob, "sk-bob-bbbbbbbbbbb"),
        (&alice, "gsk-alice-groq-cc"),
    ] {
        let provider = if secret.starts_with("gsk") {
            "groq"
        } else {
            "openai"
        };
        let (s, b) = app
            .post(
                "/api/provider-keys",
                Some(token),
                json!({"provider": provider, "api_key": secret}),
            )
            .await;
        assert_eq!(s, 201, "{b}");
        originals.push((b["id"].as_str().expect("id").to_owned(), secret.to_owned()));
    }
    let db = &app.state.db;
    let before: Vec<entity::provider_keys::Model> = entity::provider_keys::Entity::find()
        .all(db)
        .await
        .expect("db");

    // The old key came from the test config; the new one goes first in the ring.
    let old = app.state.keyring.clone();
    let new_key: [u8; 32] = rand::random();
    let old_key = {
        use secrecy::ExposeSecret;
        crypto::parse_master_key(
            app.state
                .config
                .security
                .master_key
                .as_ref()
                .expect("configured")
                .expose_secret(),
        )
        .expect("key")
    };
    let ring = KeyRing::new(&[new_key, old_key]).expect("ring");
    assert_ne!(ring.current_id(), old.current_id());

    let report = store::rekey::rekey_all(db, &ring).await.expect("rekey");
    assert_eq!(report.provider_keys, 3);
    assert_eq!(report.totp_secrets, 4, "active + pending for two users");
    assert!(report.failed.is_empty());

    // Only the new key is needed from now on.
    let only_new = KeyRing::new(&[new_key]).expect("ring");
    for (id, secret) in &originals {
        let row = entity::provider_keys::Entity::find_by_id(id.clone())
            .one(db)
            .await
            .expect("db")
            .expect("row");
        let old_row = before.iter().find(|r| &r.id == id).expect("before");
        assert_ne!(row.secret_enc, old_row.secret_enc, "re-sealed");
        assert_eq!(row.master_key_id, only_new.current_id());
        assert_eq!(
            &only_new.open_string(&row.secret_enc, id).expect("open"),
            secret
        );
        assert!(
            old.open(&row.secret_enc, id).is_err(),
            "the old ring cannot open it"
        );
    }
    for uid in [&alice_id, &bob_id] {
        let u = store::users::find(db, uid)
            .await
            .expect("db")
            .expect("user");
        assert_eq!(
            only_new.open_string(&u.totp_secret_enc, uid).expect("open"),
            TOTP
        );
        assert_eq!(
            only_new
                .open_string(u.totp_pending_enc.as_deref().expect("pending"), uid)
                .expect("open"),
            TOTP_PENDING
        );
    }

    // Idempotent: a second pass changes nothing.
    let snapshot: Vec<String> = entity::provider_keys::Entity::find()
        .all(db)
        .await
        .expect("db")
        .into_iter()
        .map(|r| r.secret_enc)
        .collect();
    let again = store::rekey::rekey_all(db, &ring).await.expect("rekey");
    assert_eq!((again.provider_keys, again.totp_secrets), (0, 0));
    assert_eq!(again.already_current, 7);
    let after: Vec<String> = entity::provider_keys::Entity::find()
        .all(db)
        .await
        .expect("db")
        .into_iter()
        .map(|r| r.secret_enc)
        .collect();
    assert_eq!(snapshot, after);

    // A row no key in the ring can open is reported, not destroyed.
    let stranger = KeyRing::new(&[[9u8; 32]]).expect("ring");
    let report = store::rekey::rekey_all(db, &stranger).await.expect("rekey");
    assert_eq!(report.failed.len(), 7, "{report:?}");
    assert!(
        report
            .failed
            .contains(&format!("users/{alice_id}.totp_pending_enc"))
    );
    assert_eq!(report.provider_keys, 0);
}

/// `tollgate master-key rotate` with file-managed keys: a new key goes first in the secrets file,
/// every provider key is re-sealed under it, and the old key is no longer needed.
#[tokio::test]
async fn master_key_rotate_command() {
    let dir = tempfile::tempdir().expect("tempdir");
    let secrets_path = dir.path().join("tollgate.secrets");
    let db = Arc::new(TestDb::new().await);
    let sp = secrets_path.clone();
    let app = TestApp::spawn_on(db.clone(), move |c| {
        seeds(c);
        c.security.master_key = None;
        c.security.secrets_file = Some(sp);
    })
    .await;
    let (_, alice) = user(&app, "alice", "user").await;
    let (s, b) = app
        .post(
            "/api/provider-keys",
            Some(&alice),
            json!({"provider": "openai", "api_key": UPSTREAM_SECRET}),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    let id = b["id"].as_str().expect("id").to_owned();
    let before = entity::provider_keys::Entity::find_by_id(id.clone())
        .one(&app.state.db)
        .await
        .expect("db")
        .expect("row");
    let old_id = app.state.keyring.current_id().to_owned();
    app.stop().await;

    let file = tollgate::secrets::SecretsFile::read(&secrets_path)
        .expect("read")
        .expect("generated");
    assert_eq!(file.master_keys.len(), 1);

    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[database]\nurl = {:?}\n\n[security]\nsecrets_file = {:?}\njwt_secret = {:?}\n",
            db.url,
            secrets_path.display().to_string(),
            "t".repeat(48)
        ),
    )
    .expect("config");
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"));
    cmd.current_dir(dir.path());
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy().into_owned();
        if name.starts_with("TOLLGATE_") || name == "DATABASE_URL" {
            cmd.env_remove(name);
        }
    }
    let out = cmd
        .args(["master-key", "rotate", "--config"])
        .arg(&config)
        .output()
        .expect("run tollgate");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stdout: {stdout}\nstderr: {stderr}");
    assert!(
        stdout.contains("re-encrypted 1 provider keys and 2 TOTP secrets"),
        "{stdout}"
    );
    assert!(!stdout.contains(UPSTREAM_SECRET) && !stderr.contains(UPSTREAM_SECRET));

    let file = tollgate::secrets::SecretsFile::read(&secrets_path)
        .expect("read")
        .expect("file");
    assert_eq!(file.master_keys.len(), 2, "new key first, old kept");
    let new_key = crypto::parse_master_key(&file.master_keys[0]).expect("key");
    let only_new = KeyRing::new(&[new_key]).expect("ring");
    assert_ne!(only_new.current_id(), old_id);

    let app = TestApp::spawn_on(db.clone(), {
        let sp = secrets_path.clone();
        move |c| {
            c.security.master_key = None;
            c.security.secrets_file = Some(sp);
        }
    })
    .await;
    let after = entity::provider_keys::Entity::find_by_id(id.clone())
        .one(&app.state.db)
        .await
        .expect("db")
        .expect("row");
    assert_ne!(after.secret_enc, before.secret_enc);
    assert_eq!(after.master_key_id, only_new.current_id());
    assert_eq!(
        only_new.open_string(&after.secret_enc, &id).expect("open"),
        UPSTREAM_SECRET
    );
    // The restarted app seals with and opens under the new key.
    assert_eq!(app.state.keyring.current_id(), only_new.current_id());
}

/// `tollgate master-key rotate` while a server runs: the server opens what was re-sealed under the
/// new key without a restart (it reloads its key ring on meeting the unknown key id), and then
/// seals under the new key too.
#[tokio::test]
async fn a_running_server_opens_keys_rotated_by_the_cli_without_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let secrets_path = dir.path().join("tollgate.secrets");
    let db = Arc::new(TestDb::new().await);
    let sp = secrets_path.clone();
    let app = TestApp::spawn_on(db.clone(), move |c| {
        seeds(c);
        c.security.master_key = None;
        c.security.secrets_file = Some(sp);
    })
    .await;
    let (alice_id, alice) = user(&app, "alice", "user").await;
    let (s, b) = app
        .post(
            "/api/provider-keys",
            Some(&alice),
            json!({"provider": "openai", "api_key": UPSTREAM_SECRET}),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    let id = b["id"].as_str().expect("id").to_owned();
    let old_id = app.state.keyring.current_id();

    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[database]\nurl = {:?}\n\n[security]\nsecrets_file = {:?}\njwt_secret = {:?}\n",
            db.url,
            secrets_path.display().to_string(),
            "t".repeat(48)
        ),
    )
    .expect("config");
    let out = common::tollgate_command(dir.path())
        .args(["master-key", "rotate", "--config"])
        .arg(&config)
        .output()
        .expect("run tollgate");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The row is sealed under a key the running server did not start with.
    let row = entity::provider_keys::Entity::find_by_id(id.clone())
        .one(&app.state.db)
        .await
        .expect("db")
        .expect("row");
    assert_ne!(row.master_key_id, old_id);
    assert_eq!(
        app.state
            .keyring
            .open_string(&row.secret_enc, &id)
            .expect("the running server opens it"),
        UPSTREAM_SECRET
    );
    assert_eq!(app.state.keyring.current_id(), row.master_key_id);
    let u = store::users::find(&app.state.db, &alice_id)
        .await
        .expect("db")
        .expect("user");
    assert_eq!(
        app.state
            .keyring
            .open_string(&u.totp_secret_enc, &alice_id)
            .expect("open"),
        TOTP
    );
    // A key saved now is sealed under the new key.
    let (s, b) = app
        .post(
            "/api/provider-keys",
            Some(&alice),
            json!({"provider": "groq", "api_key": "sk-another-secret-0000"}),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    let row = entity::provider_keys::Entity::find_by_id(b["id"].as_str().expect("id").to_owned())
        .one(&app.state.db)
        .await
        .expect("db")
        .expect("row");
    assert_eq!(
        Some(row.master_key_id.as_str()),
        KeyRing::sealed_key_id(&row.secret_enc)
    );
    assert_ne!(row.master_key_id, old_id);
}
