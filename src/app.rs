//! `App::build`: the state, the router, and the one ordered layer stack.

use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderName, HeaderValue, Method, header};
use axum::response::IntoResponse;
use tower::ServiceBuilder;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::request_id::{
    MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};
use utoipa::OpenApi;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa_axum::router::OpenApiRouter;
use utoipa_swagger_ui::SwaggerUi;

use crate::cache::Caches;
use crate::cluster::Cluster;
use crate::config::Config;
use crate::error::ApiError;
use crate::metering::leases::Leases;
use crate::metering::spool::{self, Spool};
use crate::metering::writer::{self as usage_writer, UsageWriter, WriterConfig};
use crate::proxy::admit::Limiters;
use crate::proxy::upstream;
use crate::secrets::Secrets;
use crate::state::{AppState, Inner};
use crate::store::{self, DbKind};
use crate::telemetry::Metrics;
use crate::{accounts, routes};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "tollgate",
        description = "A multi-tenant, OpenAI-compatible LLM gateway. `/v1` takes gateway keys (`sk-tg-…`); `/api` takes access tokens from `/api/auth/login`."
    ),
    modifiers(&SecuritySchemes),
    components(schemas(crate::error::ErrorBody))
)]
struct ApiDoc;

struct SecuritySchemes;

impl utoipa::Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "access_token",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
        components.add_security_scheme(
            "gateway_key",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("sk-tg-…")
                    .build(),
            ),
        );
        components.add_security_scheme(
            "gateway_key_header",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("api-key"))),
        );
    }
}

/// Every documented route, in one place; also what `/openapi.json` describes.
pub fn api_router() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(routes::ops::router())
        .merge(routes::auth::router())
        .merge(routes::me::router())
        .merge(routes::admin::router())
        .merge(routes::catalog::router())
        .merge(routes::keys::router())
        .merge(routes::openai::router())
        .merge(routes::usage::router())
        .merge(routes::admin_usage::router())
        .merge(routes::plans::router())
        .merge(routes::conversations::router())
        .merge(routes::chat::router())
        .merge(routes::chat_conversations::router())
        .merge(routes::share::router())
        .merge(routes::ws::router())
        .merge(routes::stored_responses::router())
        .merge(routes::stored_completions::router())
}

/// The OpenAPI document (tests compare it with the router).
pub fn openapi() -> utoipa::openapi::OpenApi {
    api_router().split_for_parts().1
}

pub struct App {
    pub state: AppState,
    pub router: Router,
    /// Flushed by `server::serve` after the drain.
    pub usage_writer: UsageWriter,
    /// Deletes usage records past `usage.retention_days` and stored objects past
    /// `storage.retention_days` (none when both are 0); stopped by `serve`.
    pub retention: Option<store::retention::Pruner>,
}

impl App {
    /// Connects, migrates, loads secrets, seeds, and assembles the router.
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        let db = store::connect(config.database_url(), config.database.max_connections).await?;
        store::migrate(&db, config.database_url()).await?;
        store::providers::seed(&db, &config.providers).await?;
        let secrets = Secrets::load(&config, true)?;
        let metrics = Metrics::new();
        let mut cluster = Cluster::new(&config, &db, &metrics)?;
        let caches = Caches::with_bus(cluster.bus.clone());
        let health = crate::routing::Health::with_breaker_gauge(
            config.routing.failure_threshold,
            Duration::from_secs(config.routing.cooldown_secs),
            {
                let gauge = metrics.routing_breakers_open.clone();
                move |provider, delta| gauge.with_label_values(&[provider]).add(delta)
            },
        );
        caches.attach_health(health.clone());
        if let Some(bus) = cluster.bus.clone() {
            crate::routing::share_health(&health, bus);
        }
        cluster.listen(&caches).await;
        let leases = Leases::default();
        let lease_ttl = Duration::from_secs(config.billing.lease_ttl_secs);
        // Leases of replicas (this one before a restart included) silent for the TTL.
        leases.reclaim(&db, lease_ttl).await;
        // Before serving: the records a killed predecessor left in the spool.
        let (spool, left) = Spool::open(&config.spool_dir())?;
        spool::replay(&db, leases.replica(), &left).await?;
        let spool = std::sync::Arc::new(spool);
        let (usage, usage_writer) = usage_writer::start(
            db.clone(),
            metrics.clone(),
            leases.clone(),
            spool.clone(),
            WriterConfig {
                capacity: config.usage.queue_capacity,
                batch_size: config.usage.batch_size,
                flush_interval: Duration::from_millis(config.usage.flush_interval_ms),
                lease_ttl,
            },
        );
        let responses = crate::routing::cache::ResponseCache::new(
            config.routing.cache_max_bytes,
            config.routing.cache_max_entry_bytes,
            cluster.redis.clone(),
            metrics.clone(),
        );
        let background = tokio_util::task::TaskTracker::new();
        let state = AppState(std::sync::Arc::new(Inner {
            stored: crate::conversations::writer::StateWriter::new(db.clone(), background.clone()),
            background,
            db_kind: DbKind::of(&db),
            db,
            keyring: secrets.keyring,
            jwt: accounts::tokens::JwtKeys::new(&secrets.jwt_secret),
            metrics,
            caches,
            health,
            responses,
            http: upstream::client(
                &config.upstream,
                config.security.allow_private_base_urls,
                config.workers(),
            )?,
            limiters: Limiters::new().with_shared(cluster.shared_limits()),
            auth_throttle: accounts::throttle::AuthThrottle::new(config.auth.ip_rpm),
            cluster,
            usage,
            leases,
            spool,
            started_at: Instant::now(),
            config,
        }));
        let router = Self::router(state.clone());
        let retention = store::retention::start(
            state.db.clone(),
            state.config.usage.retention_days,
            state.config.storage.retention_days,
        );
        Ok(Self {
            state,
            router,
            usage_writer,
            retention,
        })
    }

    /// The routes and the layer stack, outermost first: drop a bad client request id → request id
    /// → propagate it → access log,
    /// metrics and timeout → CORS → body limit → routes (the API, `/docs`, the web console).
    pub fn router(state: AppState) -> Router {
        let (routes, api) = api_router().split_for_parts();
        let cfg = &state.config.server;
        let routes = routes
            .merge(SwaggerUi::new("/docs").url("/openapi.json", api))
            .merge(crate::console::router())
            .fallback(|| async { ApiError::not_found("route").into_response() })
            .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed.into_response() });
        let x_request_id = crate::edge::X_REQUEST_ID;
        routes
            .layer(
                ServiceBuilder::new()
                    .map_request(crate::edge::drop_bad_request_id)
                    .layer(SetRequestIdLayer::new(
                        x_request_id.clone(),
                        TimeOrderedRequestId,
                    ))
                    .layer(PropagateRequestIdLayer::new(x_request_id))
                    .layer(axum::middleware::from_fn_with_state(
                        state.clone(),
                        crate::edge::edge,
                    ))
                    .option_layer(cors(&cfg.cors_origins))
                    .layer(DefaultBodyLimit::max(cfg.max_body_bytes)),
            )
            .with_state(state)
    }
}

/// `x-request-id` for requests that come without one: [`crate::edge::new_request_id`].
#[derive(Clone, Copy)]
struct TimeOrderedRequestId;

impl MakeRequestId for TimeOrderedRequestId {
    fn make_request_id<B>(&mut self, _: &axum::http::Request<B>) -> Option<RequestId> {
        Some(RequestId::new(crate::edge::new_request_id()))
    }
}

fn cors(origins: &[String]) -> Option<CorsLayer> {
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([
                Method::GET,
                Method::POST,
                Method::PUT,
                Method::PATCH,
                Method::DELETE,
            ])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                HeaderName::from_static("api-key"),
                HeaderName::from_static("x-request-id"),
            ])
            .expose_headers([
                HeaderName::from_static("x-request-id"),
                HeaderName::from_static("x-ratelimit-limit-requests"),
                HeaderName::from_static("x-ratelimit-remaining-requests"),
                HeaderName::from_static("x-ratelimit-reset-requests"),
                header::RETRY_AFTER,
            ]),
    )
}
