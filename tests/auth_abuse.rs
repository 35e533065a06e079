//! Abuse of the public endpoints (issue 18, items 8–11): login floods, lockouts a stranger could
//! cause or race past, out-of-range pagination, slow request bodies and connection floods.

mod common;

use common::accounts::admin_token;
use common::{TestApp, assert_error};

/// Every list route, the public model list included, refuses a `page` or `per_page` outside its
/// range with 400 `invalid_value` naming the parameter — instead of overflowing the offset (which
/// panicked the worker and dropped the connection).
#[tokio::test]
async fn out_of_range_pages_are_refused_on_every_list_route() {
    let app = TestApp::spawn().await;
    let admin = admin_token(&app).await;
    let routes = [
        "/api/models",
        "/api/providers",
        "/api/keys",
        "/api/provider-keys",
        "/api/me/login-history",
        "/api/me/ip-records",
        "/api/me/audit-log",
        "/api/me/usage/records",
        "/api/me/balance/transactions",
        "/api/admin/users",
        "/api/admin/audit-log",
        "/api/admin/usage/records",
    ];
    let bad = [
        ("page", "18446744073709551615"),
        ("page", "0"),
        ("page", "1000000001"),
        ("page", "-1"),
        ("per_page", "0"),
        ("per_page", "101"),
        ("per_page", "18446744073709551615"),
        ("per_page", "-5"),
    ];
    for route in routes {
        let (s, b) = app.get(route, Some(&admin)).await;
        assert_eq!(s, 200, "{route}: {b}");
        let (s, b) = app
            .get(&format!("{route}?page=1000000000&per_page=100"), Some(&admin))
            .await;
        assert_eq!(s, 200, "{route} at the largest page: {b}");
        assert_eq!(b["data"], serde_json::json!([]), "{route}");
        for (param, value) in bad {
            let (s, b) = app
                .get(&format!("{route}?{param}={value}"), Some(&admin))
                .await;
            assert_error(s, &b, 400, "invalid_value");
            assert_eq!(b["error"]["param"], param, "{route}?{param}={value}: {b}");
        }
    }
    // Anonymous on the public list too, and the server is still answering.
    let (s, b) = app.get("/api/models?page=18446744073709551615", None).await;
    assert_error(s, &b, 400, "invalid_value");
    let (s, _) = app.get("/health", None).await;
    assert_eq!(s, 200);
}
