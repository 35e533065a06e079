//! Every route of part two (API.md §8–§11) is in the served OpenAPI document with each of its
//! methods, and the Swagger UI answers. The list below is the spec's, route by route; when the
//! spec is beside the repository (`../shared/spec/API.md`) the test also checks the list still
//! says what the spec says, so a route added there cannot be forgotten here.

mod common;

use std::collections::BTreeSet;

use common::TestApp;

/// (method, path) of every route API.md §8–§11 names, in the spec's order.
const PART_TWO: &[(&str, &str)] = &[
    // §8: every OpenAI route an SDK calls.
    ("POST", "/v1/responses"),
    ("GET", "/v1/responses/{id}"),
    ("DELETE", "/v1/responses/{id}"),
    ("GET", "/v1/responses/{id}/input_items"),
    ("POST", "/v1/conversations"),
    ("GET", "/v1/conversations/{id}"),
    ("POST", "/v1/conversations/{id}"),
    ("DELETE", "/v1/conversations/{id}"),
    ("GET", "/v1/conversations/{id}/items"),
    ("POST", "/v1/conversations/{id}/items"),
    ("GET", "/v1/conversations/{id}/items/{item_id}"),
    ("DELETE", "/v1/conversations/{id}/items/{item_id}"),
    ("GET", "/v1/chat/completions"),
    ("GET", "/v1/chat/completions/{id}"),
    ("POST", "/v1/chat/completions/{id}"),
    ("DELETE", "/v1/chat/completions/{id}"),
    ("GET", "/v1/chat/completions/{id}/messages"),
    ("POST", "/v1/images/generations"),
    ("POST", "/v1/images/edits"),
    ("POST", "/v1/audio/speech"),
    ("POST", "/v1/audio/transcriptions"),
    ("POST", "/v1/audio/translations"),
    ("POST", "/v1/moderations"),
    ("GET", "/v1/realtime"),
    // §10: the Anthropic API inbound.
    ("POST", "/v1/messages"),
    ("POST", "/v1/messages/count_tokens"),
    // §11: routing.
    ("POST", "/api/admin/models"),
    ("GET", "/api/provider-keys"),
    ("POST", "/api/provider-keys/{id}/verify"),
    ("GET", "/api/admin/routing/health"),
];

const METHODS: &[&str] = &["GET", "POST", "PUT", "PATCH", "DELETE"];

/// The routes a piece of the spec names in backticks: `` `GET/POST /v1/x/{id}` `` is two, a query
/// string is dropped.
fn routes_in(text: &str) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for span in text.split('`').skip(1).step_by(2) {
        let Some((methods, path)) = span.split_once(' ') else {
            continue;
        };
        let methods: Vec<&str> = methods.split('/').collect();
        if !path.starts_with('/') || !methods.iter().all(|m| METHODS.contains(m)) {
            continue;
        }
        let path = path.split('?').next().unwrap_or(path).trim();
        for m in methods {
            out.insert((m.to_owned(), path.to_owned()));
        }
    }
    out
}

#[test]
fn the_list_is_the_specs() {
    let ours: BTreeSet<(String, String)> = PART_TWO
        .iter()
        .map(|(m, p)| ((*m).to_owned(), (*p).to_owned()))
        .collect();
    assert_eq!(ours.len(), PART_TWO.len(), "a route listed twice");
    // The parser itself, on the spec's shapes.
    let sample = "| `GET/POST/DELETE /v1/conversations/{id}` | x `GET /v1/chat/completions?model=&after=` \
                  **`POST /v1/messages`** `x-tollgate-cache-ttl: N` `/v1/responses`";
    let parsed: Vec<_> = routes_in(sample).into_iter().collect();
    assert_eq!(parsed.len(), 5, "{parsed:?}");
    assert!(parsed.contains(&("GET".into(), "/v1/chat/completions".into())));
    assert!(parsed.contains(&("DELETE".into(), "/v1/conversations/{id}".into())));

    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/spec/API.md");
    let Ok(spec) = std::fs::read_to_string(&path) else {
        eprintln!(
            "the_list_is_the_specs: {} not found; the list is checked against the app only",
            path.display()
        );
        return;
    };
    let start = spec.find("\n## 8.").expect("§8 in the spec");
    let end = spec.find("\n## 12.").expect("§12 in the spec");
    let spec_routes = routes_in(&spec[start..end]);
    let missing: Vec<_> = spec_routes.difference(&ours).collect();
    let extra: Vec<_> = ours.difference(&spec_routes).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "API.md §8–§11 and this test's list differ: in the spec only {missing:?}, here only {extra:?}"
    );
}

#[tokio::test]
async fn every_part_two_route_is_documented() {
    let app = TestApp::spawn().await;
    let (s, doc) = app.get("/openapi.json", None).await;
    assert_eq!(s, 200, "{doc}");
    let paths = doc["paths"].as_object().expect("paths");
    let missing: Vec<String> = PART_TWO
        .iter()
        .filter(|(m, p)| {
            !paths
                .get(*p)
                .is_some_and(|ops| ops[m.to_lowercase()].is_object())
        })
        .map(|(m, p)| format!("{m} {p}"))
        .collect();
    assert!(
        missing.is_empty(),
        "missing from /openapi.json: {missing:?}"
    );
    // Each is a real operation: it says what it answers.
    for (m, p) in PART_TWO {
        let op = &paths[*p][m.to_lowercase()];
        assert!(
            op["responses"].as_object().is_some_and(|r| !r.is_empty()),
            "{m} {p} documents no response: {op}"
        );
    }

    // The Swagger UI, at `/docs` (redirected to `/docs/`) and `/docs/`.
    for p in ["/docs", "/docs/"] {
        let r = app.client.get(app.url(p)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{p}");
        let body = r.text().await.unwrap().to_lowercase();
        assert!(body.contains("swagger"), "{p}: {body}");
    }
    app.stop().await;
}
