//! The healthy single-deployment path plans without allocating: a counting allocator watches
//! `Plan::new`, giving it its pool, and picking the attempt.

use std::alloc::System;
use std::sync::Arc;
use std::time::Duration;

use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};
use tollgate::cache::{CatalogModel, ProviderKeyEntry, ProviderKeyPool};
use tollgate::routing::Health;
use tollgate::routing::deployment::Deployment;
use tollgate::routing::health::now_ms;
use tollgate::routing::plan::{Pick, Plan};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

fn catalog_model() -> Arc<CatalogModel> {
    let now = chrono::Utc::now();
    let provider = entity::providers::Model {
        key: "p".into(),
        display_name: "p".into(),
        base_url: "http://127.0.0.1:1/v1".into(),
        kind: "openai".into(),
        is_active: true,
        supports_responses: false,
        api_version: None,
        region: None,
        sort_order: 0,
        created_at: now,
        updated_at: now,
    };
    let model = entity::models::Model {
        id: "m".into(),
        name: "m".into(),
        display_name: "m".into(),
        provider_key: "p".into(),
        upstream_model: "up".into(),
        model_type: "chat".into(),
        input_price_nanos: 0,
        output_price_nanos: 0,
        cached_input_price_nanos: None,
        cache_write_input_price_nanos: None,
        price_per_image_nanos: None,
        price_per_minute_nanos: None,
        price_per_1m_chars_nanos: None,
        context_window: None,
        max_output_tokens: None,
        supports_streaming: true,
        supports_tools: false,
        supports_vision: false,
        description: None,
        is_active: true,
        sort_order: 0,
        deployments: None,
        fallbacks: None,
        created_at: now,
        updated_at: now,
    };
    Arc::new(CatalogModel {
        deployments: vec![Deployment {
            provider: Arc::new(provider.clone()),
            upstream_model: "up".into(),
            weight: 1,
            priority: 0,
        }],
        fallbacks: Vec::new(),
        provider,
        model,
    })
}

#[test]
fn the_healthy_single_deployment_plan_does_not_allocate() {
    let model = catalog_model();
    let pool = Arc::new(ProviderKeyPool {
        keys: vec![ProviderKeyEntry {
            id: "k".into(),
            user_id: "u".into(),
            provider: "p".into(),
            secret_enc: String::new(),
            base_url: None,
            shared: false,
            weight: 1,
            masked: "sk-…".into(),
            opened: Default::default(),
        }],
        loaded_ms: now_ms(),
    });
    let health = Health::new(5, Duration::from_secs(30));
    // Warm what is lazily set up once per process (the clock origin, the thread's RNG).
    let mut warm = Plan::new(model.clone());
    warm.set_pool(0, Some(pool.clone()));
    assert!(warm.next(&health, false).is_some());

    let region = Region::new(GLOBAL);
    let mut plan = Plan::new(model.clone());
    plan.set_pool(0, Some(pool.clone()));
    let first = plan.next(&health, false);
    let pair = first.and_then(|p| plan.pair_of(p)).map(|p| p.id());
    let second = plan.next(&health, false);
    let allocations = region.change().allocations;

    assert_eq!(
        first,
        Some(Pick {
            deployment: 0,
            key: 0
        })
    );
    assert!(pair.is_some());
    assert_eq!(second, None, "one pair is tried once");
    assert_eq!(allocations, 0, "planning allocated");
}
