//! Operations routes, error shape, request ids, OpenAPI.

mod common;

use common::{TestApp, assert_error};

#[tokio::test]
async fn health_ready_info() {
    let app = TestApp::spawn().await;
    let (s, b) = app.get("/health", None).await;
    assert_eq!(s, 200);
    assert_eq!(b["status"], "healthy");
    assert_eq!(b["version"], env!("CARGO_PKG_VERSION"));
    let (s, b) = app.get("/ready", None).await;
    assert_eq!(s, 200, "{b}");
    let (s, b) = app.get("/info", None).await;
    assert_eq!(s, 200);
    let want = if app.db.is_sqlite() {
        "sqlite"
    } else if app.db.url.starts_with("postgres") {
        "postgres"
    } else {
        "mysql"
    };
    assert_eq!(b["database"], want);
    assert!(b["uptime_secs"].is_u64());
}

#[tokio::test]
async fn unknown_route_and_method_are_openai_shaped() {
    let app = TestApp::spawn().await;
    let (s, b) = app.get("/nope", None).await;
    assert_error(s, &b, 404, "not_found");
    let (s, b) = app.post("/health", None, serde_json::json!({})).await;
    assert_error(s, &b, 405, "method_not_allowed");
}

#[tokio::test]
async fn request_id_is_echoed_or_generated() {
    let app = TestApp::spawn().await;
    let r = app
        .client
        .get(app.url("/health"))
        .header("x-request-id", "my-req-42")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-request-id"], "my-req-42");
    let r = app.client.get(app.url("/nope")).send().await.unwrap();
    let id = r.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert!(id.len() >= 16, "generated id {id}");
}

#[tokio::test]
async fn metrics_token_protects_metrics() {
    let app =
        TestApp::spawn_with(|c| c.server.metrics_token = Some("s3cret-token".to_owned().into()))
            .await;
    let r = app.client.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = app
        .client
        .get(app.url("/metrics"))
        .bearer_auth("s3cret-token")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    assert!(text.contains("tollgate_usage_queue_depth"), "{text}");
}

#[tokio::test]
async fn openapi_and_docs_are_served() {
    let app = TestApp::spawn().await;
    let (s, b) = app.get("/openapi.json", None).await;
    assert_eq!(s, 200);
    assert!(b["openapi"].as_str().unwrap().starts_with("3.1"));
    for p in ["/health", "/ready", "/info", "/metrics"] {
        assert!(
            b["paths"][p].is_object(),
            "{p} missing from the OpenAPI document"
        );
    }
    let r = app.client.get(app.url("/docs/")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().to_lowercase().contains("swagger"));
}
