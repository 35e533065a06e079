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
        ..Default::default()
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
            json!({"key": "ok", "base_url": "https://x.example.com", "kind": "vertex"}),
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
        ("type", json!("video")),
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
    let (s, b) = app.get("/api/models?type=video", None).await;
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
    // Part two's catalog fields are in the schemas clients generate code from.
    let schemas = &doc["components"]["schemas"];
    for (schema, fields) in [
        (
            "ProviderView",
            &["supports_responses", "api_version", "region"][..],
        ),
        (
            "CreateProvider",
            &["supports_responses", "api_version", "region"][..],
        ),
        (
            "UpdateProvider",
            &["supports_responses", "api_version", "region"][..],
        ),
        ("ModelView", &NEW_PRICES[..]),
        ("CreateModel", &NEW_PRICES[..]),
        ("UpdateModel", &NEW_PRICES[..]),
        (
            "UsageRecordView",
            &[
                "cache_write_tokens",
                "reasoning_tokens",
                "response_id",
                "conversation_id",
            ][..],
        ),
        (
            "UsageTotalsView",
            &["cache_write_tokens", "reasoning_tokens"][..],
        ),
    ] {
        for f in fields {
            assert!(
                schemas[schema]["properties"][f].is_object(),
                "{schema}.{f} missing from the OpenAPI document"
            );
        }
    }
}

const NEW_PRICES: [&str; 4] = [
    "cache_write_input_price_per_1m",
    "price_per_image",
    "price_per_minute",
    "price_per_1m_chars",
];

/// Every kind of spec §10 is accepted with the fields it reads; a field another kind reads, an
/// unknown kind, and a bedrock provider without a region are refused, naming the field.
#[tokio::test]
async fn provider_kinds_and_their_fields() {
    let app = app_with_providers().await;
    let (_, admin) = user(&app, "root", "admin").await;
    let (_, token) = user(&app, "dave", "user").await;

    let create = |body: Value| {
        let app = &app;
        let admin = admin.clone();
        async move { app.post("/api/admin/providers", Some(&admin), body).await }
    };

    let (s, b) = create(
        json!({"key": "oai", "base_url": "https://api.openai.com/v1",
        "supports_responses": true}),
    )
    .await;
    assert_eq!(s, 201, "{b}");
    assert_eq!(b["kind"], "openai");
    assert_eq!(b["supports_responses"], true);
    assert_eq!(b["api_version"], Value::Null);
    assert_eq!(b["region"], Value::Null);

    let (s, b) = create(json!({"key": "claude", "kind": "anthropic",
        "base_url": "https://api.anthropic.com/v1"}))
    .await;
    assert_eq!(s, 201, "{b}");
    assert_eq!(
        (b["kind"].as_str(), b["supports_responses"].as_bool()),
        (Some("anthropic"), Some(false))
    );

    let (s, b) = create(json!({"key": "google", "kind": "gemini",
        "base_url": "https://generativelanguage.googleapis.com/v1beta"}))
    .await;
    assert_eq!(s, 201, "{b}");
    assert_eq!(b["kind"], "gemini");

    let (s, b) = create(json!({"key": "az", "kind": "azure",
        "base_url": "https://my-resource.openai.azure.com", "api_version": "2024-10-21"}))
    .await;
    assert_eq!(s, 201, "{b}");
    assert_eq!(b["api_version"], "2024-10-21");
    // Without api_version: the /openai/v1/ API.
    let (s, b) = create(json!({"key": "az-v1", "kind": "azure",
        "base_url": "https://other.openai.azure.com"}))
    .await;
    assert_eq!(s, 201, "{b}");
    assert_eq!(b["api_version"], Value::Null);

    // Bedrock: the region is required; base_url defaults to the region's runtime endpoint.
    let (s, b) = create(json!({"key": "aws", "kind": "bedrock", "region": "us-east-1"})).await;
    assert_eq!(s, 201, "{b}");
    assert_eq!(b["region"], "us-east-1");
    assert_eq!(
        b["base_url"],
        "https://bedrock-runtime.us-east-1.amazonaws.com"
    );
    let (s, b) = create(
        json!({"key": "aws-proxy", "kind": "bedrock", "region": "eu-west-3",
        "base_url": "https://bedrock.internal.example.com"}),
    )
    .await;
    assert_eq!(s, 201, "{b}");
    assert_eq!(b["base_url"], "https://bedrock.internal.example.com");

    // Users see the new fields too.
    let (_, list) = app.get("/api/providers", Some(&token)).await;
    let aws = list["data"]
        .as_array()
        .expect("data")
        .iter()
        .find(|p| p["key"] == "aws")
        .expect("aws listed");
    assert_eq!(aws["kind"], "bedrock");
    assert_eq!(aws["region"], "us-east-1");

    let (s, b) = create(json!({"key": "aws2", "kind": "bedrock"})).await;
    assert_error(s, &b, 400, "missing_field");
    assert_eq!(b["error"]["param"], "region", "{b}");
    assert!(
        b["error"]["message"].as_str().unwrap().contains("region"),
        "{b}"
    );
    let (s, b) = create(json!({"key": "aws2", "kind": "bedrock",
        "base_url": "https://bedrock-runtime.us-east-1.amazonaws.com"}))
    .await;
    assert_error(s, &b, 400, "missing_field");
    assert_eq!(b["error"]["param"], "region", "{b}");
    let (s, b) = create(json!({"key": "nourl"})).await;
    assert_error(s, &b, 400, "missing_field");
    assert_eq!(b["error"]["param"], "base_url", "{b}");

    for (bad, param) in [
        (
            json!({"key": "x", "kind": "vertex", "base_url": "https://x.example.com"}),
            "kind",
        ),
        (
            json!({"key": "x", "kind": "OpenAI", "base_url": "https://x.example.com"}),
            "kind",
        ),
        (
            json!({"key": "x", "kind": "bedrock", "region": "US-EAST-1"}),
            "region",
        ),
        (
            json!({"key": "x", "kind": "bedrock", "region": "us-east-1; drop"}),
            "region",
        ),
        (
            json!({"key": "x", "kind": "bedrock", "region": "moon"}),
            "region",
        ),
        (
            json!({"key": "x", "kind": "azure", "region": "us-east-1",
            "base_url": "https://x.openai.azure.com"}),
            "region",
        ),
        (
            json!({"key": "x", "kind": "openai", "api_version": "2024-10-21",
            "base_url": "https://x.example.com"}),
            "api_version",
        ),
        (
            json!({"key": "x", "kind": "azure", "api_version": "2024-10-21&x=1",
            "base_url": "https://x.openai.azure.com"}),
            "api_version",
        ),
        (
            json!({"key": "x", "kind": "anthropic", "supports_responses": true,
            "base_url": "https://api.anthropic.com/v1"}),
            "supports_responses",
        ),
        (
            json!({"key": "x", "kind": "azure", "supports_responses": true,
            "base_url": "https://x.openai.azure.com"}),
            "supports_responses",
        ),
    ] {
        let (s, b) = create(bad.clone()).await;
        assert_error(s, &b, 400, "invalid_value");
        assert_eq!(b["error"]["param"], param, "{bad}: {b}");
    }

    // PATCH: a bedrock provider on its region's endpoint follows a new region.
    let (s, b) = app
        .patch(
            "/api/admin/providers/aws",
            Some(&admin),
            json!({"region": "ap-southeast-2"}),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(
        b["base_url"],
        "https://bedrock-runtime.ap-southeast-2.amazonaws.com"
    );
    // … one with its own endpoint keeps it.
    let (s, b) = app
        .patch(
            "/api/admin/providers/aws-proxy",
            Some(&admin),
            json!({"region": "us-west-2"}),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["base_url"], "https://bedrock.internal.example.com");
    // A bedrock provider's region cannot be cleared.
    let (s, b) = app
        .patch(
            "/api/admin/providers/aws",
            Some(&admin),
            json!({"region": null}),
        )
        .await;
    assert_error(s, &b, 400, "missing_field");
    assert_eq!(b["error"]["param"], "region");
    // Turning a provider into bedrock needs a region.
    let (s, b) = app
        .patch(
            "/api/admin/providers/google",
            Some(&admin),
            json!({"kind": "bedrock"}),
        )
        .await;
    assert_error(s, &b, 400, "missing_field");
    assert_eq!(b["error"]["param"], "region");
    let (s, b) = app
        .patch(
            "/api/admin/providers/google",
            Some(&admin),
            json!({"kind": "nope"}),
        )
        .await;
    assert_error(s, &b, 400, "invalid_value");
    assert_eq!(b["error"]["param"], "kind");
    // Changing the kind drops what the new kind does not read.
    let (s, b) = app
        .patch(
            "/api/admin/providers/az",
            Some(&admin),
            json!({"kind": "openai"}),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["kind"], "openai");
    assert_eq!(b["api_version"], Value::Null);
    let (s, b) = app
        .patch(
            "/api/admin/providers/oai",
            Some(&admin),
            json!({"kind": "anthropic"}),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["supports_responses"], false);
    // … and a field of the kind kept is patched and cleared with null.
    let (s, b) = app
        .patch(
            "/api/admin/providers/az-v1",
            Some(&admin),
            json!({"api_version": "2025-04-01-preview"}),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["api_version"], "2025-04-01-preview");
    let (s, b) = app
        .patch(
            "/api/admin/providers/az-v1",
            Some(&admin),
            json!({"api_version": null}),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["api_version"], Value::Null);
    let (s, b) = app
        .patch(
            "/api/admin/providers/claude",
            Some(&admin),
            json!({"supports_responses": true}),
        )
        .await;
    assert_error(s, &b, 400, "invalid_value");
    assert_eq!(b["error"]["param"], "supports_responses");

    // The catalog cache the hot path reads carries the fields.
    let (s, b) = app
        .post(
            "/api/admin/models",
            Some(&admin),
            model_body("nova-x", "aws"),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    let catalog = app
        .state
        .caches
        .catalog(&app.state.db)
        .await
        .expect("catalog");
    let nova = catalog.get("nova-x").expect("in the catalog");
    assert_eq!(nova.provider.kind, "bedrock");
    assert_eq!(nova.provider.region.as_deref(), Some("ap-southeast-2"));
}

/// The seeded OpenAI provider says it serves `/responses` (spec §9); a bedrock seed gets its
/// region's endpoint; the config refuses what the API refuses.
#[tokio::test]
async fn seeds_carry_the_kind_fields() {
    let app = TestApp::spawn_with(|c| {
        c.providers = vec![
            ProviderSeed {
                key: "openai".into(),
                display_name: "OpenAI".into(),
                base_url: "https://api.openai.com/v1".into(),
                supports_responses: true,
                ..Default::default()
            },
            ProviderSeed {
                key: "aws".into(),
                display_name: "Bedrock".into(),
                kind: "bedrock".into(),
                region: Some("eu-central-1".into()),
                ..Default::default()
            },
        ];
    })
    .await;
    let db = &app.state.db;
    let openai = store::providers::find(db, "openai").await.unwrap().unwrap();
    assert!(openai.supports_responses);
    let aws = store::providers::find(db, "aws").await.unwrap().unwrap();
    assert_eq!(
        aws.base_url,
        "https://bedrock-runtime.eu-central-1.amazonaws.com"
    );
    assert_eq!(aws.region.as_deref(), Some("eu-central-1"));
    assert!(!aws.supports_responses);

    let mut cfg = tollgate::config::Config::default();
    for (seed, field) in [
        (
            ProviderSeed {
                key: "b".into(),
                kind: "bedrock".into(),
                ..Default::default()
            },
            "providers[0].region",
        ),
        (
            ProviderSeed {
                key: "v".into(),
                kind: "vertex".into(),
                base_url: "https://x".into(),
                ..Default::default()
            },
            "providers[0].kind",
        ),
        (
            ProviderSeed {
                key: "a".into(),
                kind: "anthropic".into(),
                base_url: "https://x".into(),
                supports_responses: true,
                ..Default::default()
            },
            "providers[0].supports_responses",
        ),
        (
            ProviderSeed {
                key: "o".into(),
                base_url: String::new(),
                ..Default::default()
            },
            "providers[0].base_url",
        ),
    ] {
        cfg.providers = vec![seed];
        let err = cfg.validate().expect_err(field).to_string();
        assert!(err.contains(field), "{field}: {err}");
    }
}

/// The new prices round-trip create → view → patch → null, exactly (nano-dollars), and are
/// validated like the token prices; the new model types are accepted.
#[tokio::test]
async fn new_prices_and_model_types_round_trip() {
    let app = app_with_providers().await;
    let (_, admin) = user(&app, "root", "admin").await;

    let mut body = model_body("claude-x", "alpha");
    body["cache_write_input_price_per_1m"] = json!(3.75);
    let (s, m) = app.post("/api/admin/models", Some(&admin), body).await;
    assert_eq!(s, 201, "{m}");
    let id = m["id"].as_str().expect("id").to_owned();
    assert_eq!(m["cache_write_input_price_per_1m"], 3.75);
    for f in ["price_per_image", "price_per_minute", "price_per_1m_chars"] {
        assert_eq!(m[f], Value::Null, "{f} absent = null");
    }

    let mut body = model_body("dall-e-x", "alpha");
    body["type"] = json!("image");
    body["price_per_image"] = json!(0.04);
    let (s, img) = app.post("/api/admin/models", Some(&admin), body).await;
    assert_eq!(s, 201, "{img}");
    assert_eq!(img["type"], "image");
    assert_eq!(img["price_per_image"], 0.04);

    for (name, t) in [
        ("whisper-x", "audio"),
        ("omni-mod", "moderation"),
        ("rt-x", "realtime"),
    ] {
        let mut body = model_body(name, "alpha");
        body["type"] = json!(t);
        let (s, b) = app.post("/api/admin/models", Some(&admin), body).await;
        assert_eq!(s, 201, "{b}");
        assert_eq!(b["type"], t);
    }
    let mut body = model_body("bad-type", "alpha");
    body["type"] = json!("video");
    let (s, b) = app.post("/api/admin/models", Some(&admin), body).await;
    assert_error(s, &b, 400, "invalid_value");
    assert_eq!(b["error"]["param"], "type");
    let (s, list) = app.get("/api/models?type=audio", None).await;
    assert_eq!(s, 200, "{list}");
    assert_eq!(names(&list), ["whisper-x"]);

    let (s, m) = app
        .patch(
            &format!("/api/admin/models/{id}"),
            Some(&admin),
            json!({"price_per_image": 0.019, "price_per_minute": 0.006,
                   "price_per_1m_chars": 15.0, "cache_write_input_price_per_1m": 0.3}),
        )
        .await;
    assert_eq!(s, 200, "{m}");
    assert_eq!(m["price_per_image"], 0.019);
    assert_eq!(m["price_per_minute"], 0.006);
    assert_eq!(m["price_per_1m_chars"], 15.0);
    assert_eq!(m["cache_write_input_price_per_1m"], 0.3);
    let row = store::models::find(&app.state.db, &id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row.price_per_image_nanos, Some(19_000_000));
    assert_eq!(row.price_per_minute_nanos, Some(6_000_000));
    assert_eq!(row.price_per_1m_chars_nanos, Some(15_000_000_000));
    assert_eq!(row.cache_write_input_price_nanos, Some(300_000_000));
    // Public listing shows them as well.
    let (_, list) = app.get("/api/models?active_only=false", None).await;
    let listed = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == id.as_str())
        .expect("listed");
    assert_eq!(listed["price_per_minute"], 0.006);

    // Absent leaves them; null clears them.
    let (s, m) = app
        .patch(
            &format!("/api/admin/models/{id}"),
            Some(&admin),
            json!({"sort_order": 3}),
        )
        .await;
    assert_eq!(s, 200, "{m}");
    assert_eq!(m["price_per_image"], 0.019);
    let (s, m) = app
        .patch(
            &format!("/api/admin/models/{id}"),
            Some(&admin),
            json!({"price_per_image": null, "price_per_minute": null,
                   "price_per_1m_chars": null, "cache_write_input_price_per_1m": null}),
        )
        .await;
    assert_eq!(s, 200, "{m}");
    for f in NEW_PRICES {
        assert_eq!(m[f], Value::Null, "{f} cleared");
    }
    let row = store::models::find(&app.state.db, &id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (
            row.price_per_image_nanos,
            row.price_per_minute_nanos,
            row.price_per_1m_chars_nanos,
            row.cache_write_input_price_nanos
        ),
        (None, None, None, None)
    );

    // Validated like the token prices, on create and on patch.
    for f in NEW_PRICES {
        for bad in [json!(-0.01), json!(1_000_000.5), json!("1")] {
            let mut body = model_body("bad-price", "alpha");
            body[f] = bad.clone();
            let (s, b) = app.post("/api/admin/models", Some(&admin), body).await;
            assert_eq!(s, 400, "{f}={bad}: {b}");
            assert_eq!(b["error"]["param"], f, "{f}={bad}: {b}");
            let (s, b) = app
                .patch(
                    &format!("/api/admin/models/{id}"),
                    Some(&admin),
                    json!({ f: bad }),
                )
                .await;
            assert_eq!(s, 400, "{f}={bad}: {b}");
            assert_eq!(b["error"]["param"], f, "{f}={bad}: {b}");
        }
    }
}

/// The part-two migration runs up, down and up again on every backend, and gives an OpenAI
/// provider seeded before it `supports_responses`.
#[tokio::test]
async fn catalog_kinds_migration_is_reversible_and_marks_openai() {
    use migration::{Migrator, MigratorTrait};
    use sea_orm::ConnectionTrait;
    let db = common::TestDb::new().await;
    // One connection: SQLite checks DDL against the schema a connection cached (see below).
    let conn = store::connect(&db.url, 1).await.unwrap();
    let all = Migrator::migrations().len() as u32;
    // Everything before this migration (later ones come after it).
    let before = Migrator::migrations()
        .iter()
        .position(|m| m.name() == "m20261203_000002_catalog_kinds")
        .expect("the catalog migration") as u32;
    Migrator::up(&conn, Some(before)).await.unwrap();
    for (key, url) in [
        ("openai", "https://api.openai.com/v1"),
        ("groq", "https://api.groq.com/openai/v1"),
    ] {
        use sea_orm::sea_query::{Alias, Query};
        let cols = [
            "key",
            "display_name",
            "base_url",
            "kind",
            "is_active",
            "sort_order",
            "created_at",
            "updated_at",
        ];
        let q = Query::insert()
            .into_table(Alias::new("providers"))
            .columns(cols.map(Alias::new))
            .values_panic([
                key.into(),
                key.into(),
                url.into(),
                "openai".into(),
                true.into(),
                0i32.into(),
                Utc::now().into(),
                Utc::now().into(),
            ])
            .to_owned();
        conn.execute(&q).await.unwrap();
    }
    Migrator::up(&conn, None).await.unwrap();
    let openai = store::providers::find(&conn, "openai")
        .await
        .unwrap()
        .unwrap();
    let groq = store::providers::find(&conn, "groq")
        .await
        .unwrap()
        .unwrap();
    assert!(openai.supports_responses && !groq.supports_responses);
    assert_eq!((groq.api_version, groq.region), (None, None));
    Migrator::down(&conn, Some(all - before)).await.unwrap();
    Migrator::up(&conn, None).await.unwrap();
    assert!(
        Migrator::get_pending_migrations(&conn)
            .await
            .unwrap()
            .is_empty()
    );
    let groq = store::providers::find(&conn, "groq")
        .await
        .unwrap()
        .unwrap();
    assert!(!groq.supports_responses);
}

/// `store::migrate` runs the migrations on one connection. SQLite checks DDL against the schema
/// each connection has cached, so when a migration's `DROP TRIGGER` and `CREATE TRIGGER` of the
/// same name landed on two pooled connections, the second could fail with "trigger … already
/// exists" (it did, once in CI, at a test's start). Here every pooled connection has read the
/// schema as it was before the search-owner migration, which drops and recreates the triggers.
#[tokio::test]
async fn migrations_ignore_what_pooled_connections_cached_of_the_schema() {
    use migration::{Migrator, MigratorTrait};
    use sea_orm::{ConnectionTrait, TransactionTrait};
    const POOL: u32 = 8;
    let before = Migrator::migrations()
        .iter()
        .position(|m| m.name() == "m20261205_000022_search_owner")
        .expect("the search-owner migration") as u32;
    // Which connection a statement lands on is the pool's choice: a few fresh databases make a
    // stray landing (one run in three before the fix) all but certain.
    for _ in 0..5 {
        let db = common::TestDb::new().await;
        let conn = store::connect(&db.url, POOL).await.unwrap();
        Migrator::up(&conn, Some(before)).await.unwrap();
        let mut held = Vec::new();
        for _ in 0..POOL {
            let txn = conn.begin().await.unwrap();
            txn.execute_unprepared("SELECT count(*) FROM conversation_items")
                .await
                .unwrap();
            held.push(txn);
        }
        drop(held);
        store::migrate(&conn, &db.url).await.unwrap();
        assert!(
            Migrator::get_pending_migrations(&conn)
                .await
                .unwrap()
                .is_empty()
        );
        // The pooled connections read the new schema.
        conn.execute_unprepared("SELECT count(*) FROM conversation_items")
            .await
            .unwrap();
    }
}
