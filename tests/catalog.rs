//! The catalog: providers (seeded, listed, admin-managed) and priced models, and the catalog cache
//! the `/v1` hot path reads.

mod common;

use chrono::Utc;
use common::{TestApp, assert_error};
use sea_orm::{ActiveModelTrait, Set};
use serde_json::{Value, json};
use tollgate::config::ProviderSeed;
use tollgate::store;

/// A signed-in user made straight through the store (independent of the accounts routes).
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
        totp_secret_enc: Set(state.keyring.seal(b"JBSWY3DPEHPK3PXP", &id)),
        totp_pending_enc: Set(None),
        totp_last_step: Set(None),
        balance_nanos: Set(0),
        reserved_nanos: Set(0),
        plan: Set(None),
        plan_expires_at: Set(None),
        rpm_limit: Set(None),
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

fn seed(key: &str, sort_order: i32, is_active: bool) -> ProviderSeed {
    ProviderSeed {
        key: key.to_owned(),
        display_name: key.to_uppercase(),
        base_url: format!("https://{key}.example.com/v1/"),
        kind: "openai".into(),
        is_active,
        sort_order,
    }
}

async fn app_with_providers() -> TestApp {
    TestApp::spawn_with(|c| {
        c.providers = vec![
            seed("alpha", 2, true),
            seed("beta", 1, true),
            seed("gamma", 0, false),
        ];
    })
    .await
}

fn keys(list: &Value) -> Vec<String> {
    list["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|p| p["key"].as_str().expect("key").to_owned())
        .collect()
}

fn names(list: &Value) -> Vec<String> {
    list["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|p| p["name"].as_str().expect("name").to_owned())
        .collect()
}

#[tokio::test]
async fn providers_are_seeded_once_and_listed_in_order() {
    let app = app_with_providers().await;
    let (_, token) = user(&app, "alice", "user").await;

    let (s, b) = app.get("/api/providers", None).await;
    assert_error(s, &b, 401, "missing_token");

    let (s, b) = app.get("/api/providers", Some(&token)).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(keys(&b), ["beta", "alpha"], "active only, by sort_order");
    assert_eq!(b["total"], 2);
    let beta = &b["data"][0];
    assert_eq!(beta["display_name"], "BETA");
    assert_eq!(beta["base_url"], "https://beta.example.com/v1");
    assert_eq!(beta["kind"], "openai");
    assert_eq!(beta["is_active"], true);
    assert_eq!(beta["sort_order"], 1);
    assert!(beta.get("created_at").is_none());

    // A plain user cannot ask for inactive ones; an admin can.
    let (s, b) = app
        .get("/api/providers?include_inactive=true", Some(&token))
        .await;
    assert_eq!((s, keys(&b)), (200, vec!["beta".into(), "alpha".into()]));
    let (_, admin) = user(&app, "root", "admin").await;
    let (s, b) = app
        .get("/api/providers?include_inactive=true", Some(&admin))
        .await;
    assert_eq!(s, 200);
    assert_eq!(keys(&b), ["gamma", "beta", "alpha"]);

    // An admin's edit survives a restart with the seed still in the config.
    let (s, b) = app
        .patch(
            "/api/admin/providers/alpha",
            Some(&admin),
            json!({"display_name": "Edited"}),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    let db = app.db.clone();
    app.stop().await;
    let app = TestApp::spawn_on(db, |c| {
        c.providers = vec![seed("alpha", 2, true), seed("delta", 5, true)];
    })
    .await;
    let p = store::providers::find(&app.state.db, "alpha")
        .await
        .expect("db")
        .expect("alpha");
    assert_eq!(p.display_name, "Edited");
    assert!(
        store::providers::find(&app.state.db, "delta")
            .await
            .expect("db")
            .is_some(),
        "a new seed entry is created at the next start"
    );
}

#[tokio::test]
async fn admin_manages_providers() {
    let app = app_with_providers().await;
    let (admin_id, admin) = user(&app, "root", "admin").await;
    let (_, token) = user(&app, "bob", "user").await;

    let body =
        json!({"key": "local-llm", "display_name": "Local", "base_url": "http://127.0.0.1:9/v1"});
    // Plain users: 403 on every admin route.
    let (s, b) = app
        .post("/api/admin/providers", Some(&token), body.clone())
        .await;
    assert_error(s, &b, 403, "forbidden");
    let (s, b) = app
        .patch(
            "/api/admin/providers/alpha",
            Some(&token),
            json!({"sort_order": 9}),
        )
        .await;
    assert_error(s, &b, 403, "forbidden");
    let (s, b) = app.delete("/api/admin/providers/alpha", Some(&token)).await;
    assert_error(s, &b, 403, "forbidden");

    // Admin URLs are trusted: a private address is fine here.
    let (s, b) = app
        .post("/api/admin/providers", Some(&admin), body.clone())
        .await;
    assert_eq!(s, 201, "{b}");
    assert_eq!(b["key"], "local-llm");
    assert_eq!(b["base_url"], "http://127.0.0.1:9/v1");
    assert_eq!(b["kind"], "openai");
    assert_eq!(b["is_active"], true);

    let (s, b) = app.post("/api/admin/providers", Some(&admin), body).await;
    assert_error(s, &b, 409, "conflict");

    for (bad, param) in [
        (
            json!({"key": "Bad Key", "base_url": "https://x.example.com"}),
            "key",
        ),
        (
            json!({"key": "", "base_url": "https://x.example.com"}),
            "key",
        ),
        (
            json!({"key": "ok", "base_url": "ftp://x.example.com"}),
            "base_url",
        ),
        (json!({"key": "ok", "base_url": "not a url"}), "base_url"),
        (
            json!({"key": "ok", "base_url": "https://x.example.com", "kind": "anthropic"}),
            "kind",
        ),
    ] {
        let (s, b) = app
            .post("/api/admin/providers", Some(&admin), bad.clone())
            .await;
        assert_error(s, &b, 400, "invalid_value");
        assert_eq!(b["error"]["param"], param, "{bad}: {b}");
    }
    let (s, b) = app
        .post(
            "/api/admin/providers",
            Some(&admin),
            json!({"key": "ok", "base_url": "https://x.example.com", "extra": 1}),
        )
        .await;
    assert_error(s, &b, 400, "unknown_field");

    let (s, b) = app
        .patch(
            "/api/admin/providers/local-llm",
            Some(&admin),
            json!({"display_name": "Local LLM", "sort_order": -1, "base_url": "https://llm.example.com/"}),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["display_name"], "Local LLM");
    assert_eq!(b["base_url"], "https://llm.example.com");
    let (_, list) = app.get("/api/providers", Some(&token)).await;
    assert_eq!(keys(&list), ["local-llm", "beta", "alpha"]);

    let (s, b) = app
        .patch(
            "/api/admin/providers/nope",
            Some(&admin),
            json!({"sort_order": 1}),
        )
        .await;
    assert_error(s, &b, 404, "not_found");

    // DELETE is soft: the row stays, inactive, and leaves the list.
    let (s, _) = app
        .delete("/api/admin/providers/local-llm", Some(&admin))
        .await;
    assert_eq!(s, 204);
    let (_, list) = app.get("/api/providers", Some(&token)).await;
    assert_eq!(keys(&list), ["beta", "alpha"]);
    let row = store::providers::find(&app.state.db, "local-llm")
        .await
        .expect("db")
        .expect("still there");
    assert!(!row.is_active);
    let (s, b) = app.delete("/api/admin/providers/nope", Some(&admin)).await;
    assert_error(s, &b, 404, "not_found");

    let audit = store::audit::list(
        &app.state.db,
        Some(&admin_id),
        None,
        store::PageReq::new(None, Some(100)),
    )
    .await
    .expect("audit");
    let actions: Vec<&str> = audit.items.iter().map(|a| a.action.as_str()).collect();
    for want in ["provider.create", "provider.update", "provider.delete"] {
        assert!(actions.contains(&want), "{want} missing from {actions:?}");
    }
}

fn model_body(name: &str, provider: &str) -> Value {
    json!({
        "name": name,
        "provider": provider,
        "input_price_per_1m": 0.15,
        "output_price_per_1m": 0.6,
        "cached_input_price_per_1m": 0.075,
        "context_window": 128000,
        "max_output_tokens": 16384,
        "supports_tools": true,
        "description": "small and cheap"
    })
}

#[tokio::test]
async fn admin_manages_models_with_exact_prices() {
    let app = app_with_providers().await;
    let (admin_id, admin) = user(&app, "root", "admin").await;
    let (_, token) = user(&app, "carol", "user").await;

    let (s, b) = app
        .post(
            "/api/admin/models",
            Some(&token),
            model_body("gpt-mini", "alpha"),
        )
        .await;
    assert_error(s, &b, 403, "forbidden");

    let (s, m) = app
        .post(
            "/api/admin/models",
            Some(&admin),
            model_body("gpt-mini", "alpha"),
        )
        .await;
    assert_eq!(s, 201, "{m}");
    let id = m["id"].as_str().expect("id").to_owned();
    assert_eq!(m["name"], "gpt-mini");
    assert_eq!(m["display_name"], "gpt-mini");
    assert_eq!(m["upstream_model"], "gpt-mini", "defaults to name");
    assert_eq!(m["provider"], "alpha");
    assert_eq!(m["type"], "chat");
    assert_eq!(m["input_price_per_1m"], 0.15);
    assert_eq!(m["output_price_per_1m"], 0.6);
    assert_eq!(m["cached_input_price_per_1m"], 0.075);
    assert_eq!(m["context_window"], 128000);
    assert_eq!(m["max_output_tokens"], 16384);
    assert_eq!(m["supports_streaming"], true);
    assert_eq!(m["supports_tools"], true);
    assert_eq!(m["supports_vision"], false);
    assert_eq!(m["is_active"], true);
    assert!(m["created_at"].as_str().expect("ts").ends_with('Z'));
    let row = store::models::find(&app.state.db, &id)
        .await
        .expect("db")
        .expect("row");
    assert_eq!(row.input_price_nanos, 150_000_000);
    assert_eq!(row.output_price_nanos, 600_000_000);
    assert_eq!(row.cached_input_price_nanos, Some(75_000_000));
    assert_eq!(row.model_type, "chat");

    // Validation.
    let (s, b) = app
        .post(
            "/api/admin/models",
            Some(&admin),
            model_body("gpt-mini", "beta"),
        )
        .await;
    assert_error(s, &b, 409, "conflict");
    let (s, b) = app
        .post(
            "/api/admin/models",
            Some(&admin),
            model_body("other", "no-such-provider"),
        )
        .await;
    assert_error(s, &b, 400, "invalid_value");
    assert_eq!(b["error"]["param"], "provider");
    for (field, value) in [
        ("input_price_per_1m", json!(-0.01)),
        ("output_price_per_1m", json!(-1)),
        ("cached_input_price_per_1m", json!(-5)),
        ("type", json!("image")),
        ("context_window", json!(0)),
        ("name", json!("has space")),
    ] {
        let mut body = model_body("other", "alpha");
        body[field] = value;
        let (s, b) = app.post("/api/admin/models", Some(&admin), body).await;
        assert_error(s, &b, 400, "invalid_value");
        assert_eq!(b["error"]["param"], field, "{b}");
    }
    let mut body = model_body("other", "alpha");
    body["prices"] = json!({});
    let (s, b) = app.post("/api/admin/models", Some(&admin), body).await;
    assert_error(s, &b, 400, "unknown_field");
    let (s, b) = app
        .post(
            "/api/admin/models",
            Some(&admin),
            json!({"provider": "alpha"}),
        )
        .await;
    assert_error(s, &b, 400, "missing_field");

    // A second model, embedding type on beta, with an explicit upstream name.
    let (s, e) = app
        .post(
            "/api/admin/models",
            Some(&admin),
            json!({"name": "embed", "provider": "beta", "type": "embedding",
                   "upstream_model": "text-embedding-3-small", "input_price_per_1m": 0.02, "sort_order": -5}),
        )
        .await;
    assert_eq!(s, 201, "{e}");
    let embed_id = e["id"].as_str().expect("id").to_owned();
    assert_eq!(e["upstream_model"], "text-embedding-3-small");
    assert_eq!(e["cached_input_price_per_1m"], Value::Null);

    // PATCH: price change, clearing a nullable field with null, rename conflict, unknown id.
    let (s, b) = app
        .patch(
            &format!("/api/admin/models/{id}"),
            Some(&admin),
            json!({"output_price_per_1m": 1.25, "cached_input_price_per_1m": null, "display_name": "GPT Mini"}),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["output_price_per_1m"], 1.25);
    assert_eq!(b["cached_input_price_per_1m"], Value::Null);
    assert_eq!(b["display_name"], "GPT Mini");
    assert_eq!(b["input_price_per_1m"], 0.15, "untouched");
    assert_eq!(b["context_window"], 128000, "untouched");
    let (s, b) = app
        .patch(
            &format!("/api/admin/models/{id}"),
            Some(&admin),
            json!({"name": "embed"}),
        )
        .await;
    assert_error(s, &b, 409, "conflict");
    let (s, b) = app
        .patch(
            &format!("/api/admin/models/{id}"),
            Some(&admin),
            json!({"provider": "zzz"}),
        )
        .await;
    assert_error(s, &b, 400, "invalid_value");
    let (s, b) = app
        .patch(
            &format!("/api/admin/models/{id}"),
            Some(&admin),
            json!({"input_price_per_1m": -2}),
        )
        .await;
    assert_error(s, &b, 400, "invalid_value");
    let (s, b) = app
        .patch(
            "/api/admin/models/nope",
            Some(&admin),
            json!({"sort_order": 1}),
        )
        .await;
    assert_error(s, &b, 404, "not_found");
    let (s, b) = app
        .patch(
            &format!("/api/admin/models/{id}"),
            Some(&token),
            json!({"sort_order": 1}),
        )
        .await;
    assert_error(s, &b, 403, "forbidden");

    // The public catalog: no token needed; filters.
    let (s, b) = app.get("/api/models", None).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(names(&b), ["embed", "gpt-mini"], "by sort_order");
    let (_, b) = app.get("/api/models?provider=alpha", None).await;
    assert_eq!(names(&b), ["gpt-mini"]);
    let (_, b) = app.get("/api/models?type=embedding", None).await;
    assert_eq!(names(&b), ["embed"]);
    let (s, b) = app.get("/api/models?type=image", None).await;
    assert_error(s, &b, 400, "invalid_value");

    // Toggle: off leaves the default (active-only) list, stays with active_only=false.
    let (s, b) = app
        .post(
            &format!("/api/admin/models/{id}/toggle"),
            Some(&token),
            json!({}),
        )
        .await;
    assert_error(s, &b, 403, "forbidden");
    let (s, b) = app
        .post(
            &format!("/api/admin/models/{id}/toggle"),
            Some(&admin),
            json!({}),
        )
        .await;
    assert_eq!((s, &b["is_active"]), (200, &json!(false)), "{b}");
    let (_, b) = app.get("/api/models", None).await;
    assert_eq!(names(&b), ["embed"]);
    let (_, b) = app.get("/api/models?active_only=false", None).await;
    assert_eq!(names(&b), ["embed", "gpt-mini"]);
    let (s, b) = app
        .post("/api/admin/models/nope/toggle", Some(&admin), json!({}))
        .await;
    assert_error(s, &b, 404, "not_found");

    // DELETE is a hard delete.
    let (s, b) = app
        .delete(&format!("/api/admin/models/{embed_id}"), Some(&token))
        .await;
    assert_error(s, &b, 403, "forbidden");
    let (s, _) = app
        .delete(&format!("/api/admin/models/{embed_id}"), Some(&admin))
        .await;
    assert_eq!(s, 204);
    assert!(
        store::models::find(&app.state.db, &embed_id)
            .await
            .expect("db")
            .is_none()
    );
    let (s, b) = app
        .delete(&format!("/api/admin/models/{embed_id}"), Some(&admin))
        .await;
    assert_error(s, &b, 404, "not_found");

    let audit = store::audit::list(
        &app.state.db,
        Some(&admin_id),
        None,
        store::PageReq::new(None, Some(100)),
    )
    .await
    .expect("audit");
    let actions: Vec<&str> = audit.items.iter().map(|a| a.action.as_str()).collect();
    for want in [
        "model.create",
        "model.update",
        "model.toggle",
        "model.delete",
    ] {
        assert!(actions.contains(&want), "{want} missing from {actions:?}");
    }
}

#[tokio::test]
async fn reorder_models() {
    let app = app_with_providers().await;
    let (_, admin) = user(&app, "root", "admin").await;
    let (_, token) = user(&app, "dave", "user").await;
    let mut ids = Vec::new();
    for name in ["m-a", "m-b", "m-c"] {
        let (s, b) = app
            .post("/api/admin/models", Some(&admin), model_body(name, "alpha"))
            .await;
        assert_eq!(s, 201, "{b}");
        ids.push(b["id"].as_str().expect("id").to_owned());
    }
    let (_, b) = app.get("/api/models", None).await;
    assert_eq!(names(&b), ["m-a", "m-b", "m-c"]);

    let order = json!([
        {"id": ids[0], "sort_order": 30},
        {"id": ids[1], "sort_order": 20},
        {"id": ids[2], "sort_order": 10},
    ]);
    let (s, b) = app
        .post("/api/admin/models/reorder", Some(&token), order.clone())
        .await;
    assert_error(s, &b, 403, "forbidden");
    let (s, b) = app
        .post("/api/admin/models/reorder", Some(&admin), order)
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(names(&b), ["m-c", "m-b", "m-a"]);
    let (_, b) = app.get("/api/models", None).await;
    assert_eq!(names(&b), ["m-c", "m-b", "m-a"]);
    let catalog = app
        .state
        .caches
        .catalog(&app.state.db)
        .await
        .expect("catalog");
    let order: Vec<&str> = catalog
        .servable_models()
        .map(|m| m.model.name.as_str())
        .collect();
    assert_eq!(order, ["m-c", "m-b", "m-a"], "the cache was invalidated");

    // All or nothing: one unknown id changes nothing.
    let (s, b) = app
        .post(
            "/api/admin/models/reorder",
            Some(&admin),
            json!([{"id": ids[0], "sort_order": 0}, {"id": "nope", "sort_order": 1}]),
        )
        .await;
    assert_error(s, &b, 400, "invalid_value");
    let (_, b) = app.get("/api/models", None).await;
    assert_eq!(names(&b), ["m-c", "m-b", "m-a"]);
    let (s, b) = app
        .post(
            "/api/admin/models/reorder",
            Some(&admin),
            json!([{"id": ids[0], "sort_order": 0}, {"id": ids[0], "sort_order": 1}]),
        )
        .await;
    assert_error(s, &b, 400, "invalid_value");
    let (s, b) = app
        .post(
            "/api/admin/models/reorder",
            Some(&admin),
            json!({"id": ids[0]}),
        )
        .await;
    assert_eq!(s, 400, "{b}");
}

#[tokio::test]
async fn catalog_cache_tracks_models_and_provider_state() {
    let app = app_with_providers().await;
    let (_, admin) = user(&app, "root", "admin").await;
    let caches = &app.state.caches;
    let db = &app.state.db;

    // Warm the cache while empty: the next write must show up at once.
    assert!(
        caches
            .catalog(db)
            .await
            .expect("catalog")
            .get("chat-1")
            .is_none()
    );
    let (s, m) = app
        .post(
            "/api/admin/models",
            Some(&admin),
            model_body("chat-1", "alpha"),
        )
        .await;
    assert_eq!(s, 201, "{m}");
    let id = m["id"].as_str().expect("id").to_owned();
    let cat = caches.catalog(db).await.expect("catalog");
    let entry = cat.servable("chat-1").expect("servable");
    assert_eq!(entry.provider.key, "alpha");
    assert_eq!(entry.provider.base_url, "https://alpha.example.com/v1");
    assert_eq!(entry.model.input_price_nanos, 150_000_000);

    // A second read agrees. (Not asserting the very same Arc: on PostgreSQL the write's own
    // NOTIFY may arrive a moment later and legitimately drop the entry.)
    let again = caches.catalog(db).await.expect("catalog");
    assert_eq!(
        again.get("chat-1").map(|m| m.model.id.clone()),
        Some(id.clone())
    );

    // Price change shows at once.
    let (s, _) = app
        .patch(
            &format!("/api/admin/models/{id}"),
            Some(&admin),
            json!({"input_price_per_1m": 2.5}),
        )
        .await;
    assert_eq!(s, 200);
    let cat = caches.catalog(db).await.expect("catalog");
    assert_eq!(
        cat.get("chat-1").expect("model").model.input_price_nanos,
        2_500_000_000
    );

    // The provider goes inactive: the model exists but is not served, and leaves /api/models.
    let (s, _) = app.delete("/api/admin/providers/alpha", Some(&admin)).await;
    assert_eq!(s, 204);
    let cat = caches.catalog(db).await.expect("catalog");
    let entry = cat.get("chat-1").expect("still known");
    assert!(entry.model.is_active && !entry.provider.is_active);
    assert!(cat.servable("chat-1").is_none());
    assert_eq!(cat.servable_models().count(), 0);
    let (_, b) = app.get("/api/models", None).await;
    assert!(names(&b).is_empty(), "{b}");
    let (_, b) = app.get("/api/models?active_only=false", None).await;
    assert_eq!(names(&b), ["chat-1"]);

    // Back on.
    let (s, _) = app
        .patch(
            "/api/admin/providers/alpha",
            Some(&admin),
            json!({"is_active": true}),
        )
        .await;
    assert_eq!(s, 200);
    assert!(
        caches
            .catalog(db)
            .await
            .expect("catalog")
            .servable("chat-1")
            .is_some()
    );

    // Model toggled off: known, not served.
    let (s, _) = app
        .post(
            &format!("/api/admin/models/{id}/toggle"),
            Some(&admin),
            json!({}),
        )
        .await;
    assert_eq!(s, 200);
    let cat = caches.catalog(db).await.expect("catalog");
    assert!(cat.get("chat-1").is_some() && cat.servable("chat-1").is_none());

    // Deleted: unknown.
    let (s, _) = app
        .delete(&format!("/api/admin/models/{id}"), Some(&admin))
        .await;
    assert_eq!(s, 204);
    assert!(
        caches
            .catalog(db)
            .await
            .expect("catalog")
            .get("chat-1")
            .is_none()
    );
}

#[tokio::test]
async fn catalog_and_key_routes_are_documented() {
    let doc = serde_json::to_value(tollgate::app::openapi()).expect("openapi json");
    for (path, methods) in [
        ("/api/providers", &["get"][..]),
        ("/api/admin/providers", &["post"][..]),
        ("/api/admin/providers/{key}", &["patch", "delete"][..]),
        ("/api/models", &["get"][..]),
        ("/api/admin/models", &["post"][..]),
        ("/api/admin/models/{id}", &["patch", "delete"][..]),
        ("/api/admin/models/{id}/toggle", &["post"][..]),
        ("/api/admin/models/reorder", &["post"][..]),
        ("/api/provider-keys", &["get", "post"][..]),
        ("/api/provider-keys/{id}", &["patch", "delete"][..]),
        ("/api/provider-keys/{id}/toggle", &["post"][..]),
        ("/api/keys", &["get", "post"][..]),
        ("/api/keys/{id}", &["get", "patch", "delete"][..]),
        ("/api/keys/{id}/toggle", &["post"][..]),
        ("/api/keys/{id}/rotate", &["post"][..]),
    ] {
        for m in methods {
            assert!(
                doc["paths"][path][m].is_object(),
                "{m} {path} missing from the OpenAPI document"
            );
        }
    }
    // `/api/models` is public; the others need an access token.
    assert!(doc["paths"]["/api/models"]["get"].get("security").is_none());
    assert!(doc["paths"]["/api/keys"]["post"]["security"].is_array());
    let model = &doc["components"]["schemas"]["ModelView"]["properties"];
    assert!(
        model["type"].is_object() && model.get("model_type").is_none(),
        "{model}"
    );
}
