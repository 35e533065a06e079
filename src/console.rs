//! The web console: the files under `web/`, embedded in the binary and served at `/`.
//!
//! Every page URL (§13) answers the same small HTML shell; `web/app.js` picks the page module
//! from the path (`/keys` → `web/pages/keys.js`). The assets live under `/assets/<version>/…`,
//! where `<version>` is a hash of every embedded file: a new build gets new URLs, so the assets
//! can be cached for a year (`immutable`), while the shell itself is revalidated by its `ETag`.
//! Modules import each other by relative path, so they all inherit the versioned prefix.
//!
//! Every answer carries a strict `content-security-policy`: scripts, styles and connections only
//! from this origin, no inline script or style, images also from `data:` (the sign-up QR code),
//! Trusted Types enforced (only the sanitizer's policy may create HTML), and no framing.

use std::sync::OnceLock;

use axum::Router;
use axum::extract::Path;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use rust_embed::Embed;
use sha2::{Digest, Sha256};
use tower_http::compression::CompressionLayer;

use crate::error::ApiError;

#[derive(Embed)]
#[folder = "web/"]
struct Assets;

/// The page URLs of §13. Each one serves the shell; the browser renders the page.
pub const PAGES: &[&str] = &[
    "/",
    "/signin",
    "/signup",
    "/reset-password",
    "/keys",
    "/provider-keys",
    "/usage",
    "/balance",
    "/security",
    "/chat",
    "/admin/users",
    "/admin/catalog",
    "/admin/usage",
    "/admin/routing",
    "/admin/settings",
    "/admin/audit",
];

/// The policy every console answer carries (see the module documentation).
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
    style-src 'self'; img-src 'self' data:; connect-src 'self'; font-src 'self'; \
    manifest-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'; \
    require-trusted-types-for 'script'; trusted-types dompurify";

/// A year: asset URLs change with their content.
const IMMUTABLE: &str = "public, max-age=31536000, immutable";

/// The console's routes (not part of the OpenAPI document: they are pages, not API).
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    let mut router = Router::new();
    for page in PAGES {
        router = router.route(page, get(shell));
    }
    router
        .route("/assets/{version}/{*path}", get(asset))
        .layer(CompressionLayer::new().gzip(true).br(true))
}

struct Shell {
    version: String,
    html: Vec<u8>,
    etag: String,
}

/// The version hash and the rendered shell, computed once per process.
fn shell_parts() -> &'static Shell {
    static SHELL: OnceLock<Shell> = OnceLock::new();
    SHELL.get_or_init(|| {
        let mut names: Vec<_> = Assets::iter().collect();
        names.sort();
        let mut all = Sha256::new();
        for name in &names {
            if let Some(file) = Assets::get(name) {
                all.update(name.as_bytes());
                all.update(file.metadata.sha256_hash());
            }
        }
        let version = hex::encode(&all.finalize()[..8]);
        let template = Assets::get("index.html").map(|f| f.data.into_owned());
        let html = String::from_utf8_lossy(template.as_deref().unwrap_or_default())
            .replace("{{ASSETS}}", &format!("/assets/{version}"))
            .into_bytes();
        let etag = format!("\"{}\"", hex::encode(&Sha256::digest(&html)[..16]));
        Shell {
            version,
            html,
            etag,
        }
    })
}

/// The asset prefix of this build, `/assets/<version>` (tests and the shell use it).
pub fn asset_prefix() -> String {
    format!("/assets/{}", shell_parts().version)
}

async fn shell(headers: HeaderMap) -> Response {
    let shell = shell_parts();
    respond(
        &headers,
        &shell.etag,
        "no-cache",
        "text/html; charset=utf-8",
        shell.html.clone(),
    )
}

async fn asset(Path((version, path)): Path<(String, String)>, headers: HeaderMap) -> Response {
    let Some(file) = Assets::get(&path).filter(|_| path != "index.html") else {
        return with_security_headers(ApiError::not_found("asset").into_response());
    };
    // A page left open across an upgrade may still ask for the old version: it gets today's
    // file, revalidated rather than cached for a year under the old name.
    let cache = if version == shell_parts().version {
        IMMUTABLE
    } else {
        "no-cache"
    };
    let etag = format!("\"{}\"", hex::encode(&file.metadata.sha256_hash()[..16]));
    respond(
        &headers,
        &etag,
        cache,
        content_type(&path),
        file.data.into_owned(),
    )
}

fn respond(
    headers: &HeaderMap,
    etag: &str,
    cache: &'static str,
    content_type: &'static str,
    body: Vec<u8>,
) -> Response {
    let fresh = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|tags| tags.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
    let mut resp = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        let mut r = body.into_response();
        r.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        r
    };
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(etag) {
        h.insert(header::ETAG, v);
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    with_security_headers(resp)
}

fn with_security_headers(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        "cross-origin-opener-policy",
        HeaderValue::from_static("same-origin"),
    );
    resp
}

fn content_type(path: &str) -> &'static str {
    match path.rsplit('.').next().unwrap_or_default() {
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "json" | "webmanifest" => "application/json",
        "html" => "text/html; charset=utf-8",
        _ => "text/plain; charset=utf-8",
    }
}
