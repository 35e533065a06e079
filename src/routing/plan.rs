//! The plan of one client request's attempts over one catalog model: which deployment and which
//! provider key to try next. Deployments of the lowest priority tier that has a usable pair come
//! first, chosen by weight (deployment weight × key weight); a pair is tried at most once.
//!
//! The plan is a cursor, not a list: it holds the model's key pools in a fixed array and the
//! pairs already tried as bits, so planning allocates nothing, and a model with one deployment
//! and one key costs one pass over one pair (no random draw, no health lookup while nothing is
//! unhealthy).

use std::sync::Arc;

use rand::RngExt;

use crate::cache::{CatalogModel, ProviderKeyPool};
use crate::routing::deployment::{Deployment, MAX_DEPLOYMENTS};
use crate::routing::health::{Health, PairRef, Usable, now_ms};

/// The most keys of one pool a plan considers (`store::provider_keys::MAX_POOL`).
pub const MAX_KEYS: usize = 32;

/// One attempt: indexes into the model's deployments and that deployment's pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pick {
    pub deployment: usize,
    pub key: usize,
}

/// The attempts over one model.
pub struct Plan {
    pub model: Arc<CatalogModel>,
    pools: [Option<Arc<ProviderKeyPool>>; MAX_DEPLOYMENTS],
    tried: [u32; MAX_DEPLOYMENTS],
}

impl std::fmt::Debug for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plan")
            .field("model", &self.model.model.name)
            .field("tried", &self.tried)
            .finish_non_exhaustive()
    }
}

impl Plan {
    pub fn new(model: Arc<CatalogModel>) -> Self {
        Self {
            model,
            pools: std::array::from_fn(|_| None),
            tried: [0; MAX_DEPLOYMENTS],
        }
    }

    /// The model's deployments the plan covers.
    pub fn deployments(&self) -> &[Deployment] {
        let d = &self.model.deployments;
        &d[..d.len().min(MAX_DEPLOYMENTS)]
    }

    /// Gives deployment `i` its provider-key pool (`None`: the user has no key for it).
    pub fn set_pool(&mut self, i: usize, pool: Option<Arc<ProviderKeyPool>>) {
        if i < MAX_DEPLOYMENTS {
            self.pools[i] = pool;
        }
    }

    /// Some deployment has a key to use.
    pub fn has_keys(&self) -> bool {
        self.pools.iter().flatten().any(|p| !p.keys.is_empty())
    }

    /// The pool of deployment `i`.
    pub fn pool(&self, i: usize) -> Option<&Arc<ProviderKeyPool>> {
        self.pools.get(i).and_then(Option::as_ref)
    }

    /// Some deployment's pool is the shared platform one (its requests are charged).
    pub fn may_use_shared(&self) -> bool {
        self.pools
            .iter()
            .flatten()
            .any(|p| p.keys.iter().any(|k| k.shared))
    }

    /// The health pair of a pick.
    pub fn pair_of(&self, p: Pick) -> Option<PairRef<'_>> {
        self.pair(p.deployment, p.key)
    }

    /// The masked provider key of a pick.
    pub fn masked_of(&self, p: Pick) -> &str {
        self.pool(p.deployment)
            .and_then(|pool| pool.keys.get(p.key))
            .map_or("", |k| k.masked.as_str())
    }

    fn pair<'a>(&'a self, d: usize, k: usize) -> Option<PairRef<'a>> {
        let dep = self.deployments().get(d)?;
        let key = self.pool(d)?.keys.get(k)?;
        Some(PairRef {
            provider: &dep.provider.key,
            upstream_model: &dep.upstream_model,
            key_id: &key.id,
        })
    }

    /// Every untried pair of an active provider with a key: (deployment, key, weight, priority).
    fn candidates(&self) -> impl Iterator<Item = (usize, usize, u64, u32)> + '_ {
        self.deployments()
            .iter()
            .enumerate()
            .filter(|(_, dep)| dep.provider.is_active)
            .flat_map(move |(d, dep)| {
                let keys = self.pools[d].as_ref().map_or(&[][..], |p| &p.keys[..]);
                keys.iter()
                    .take(MAX_KEYS)
                    .enumerate()
                    .filter(move |(k, _)| self.tried[d] & (1 << k) == 0)
                    .map(move |(k, key)| {
                        (
                            d,
                            k,
                            u64::from(dep.weight.max(1)) * u64::from(key.weight.max(1)),
                            dep.priority,
                        )
                    })
            })
    }

    /// The next pair to try: in the lowest tier with a usable pair, by weight. `last_resort`:
    /// when no pair is usable, the one that recovers soonest (never an invalid key).
    pub fn next(&mut self, health: &Health, last_resort: bool) -> Option<Pick> {
        let now = now_ms();
        let all_healthy = health.all_healthy(now);
        // A half-open probe lost to another request makes the pair unusable: a few rounds at most.
        for _ in 0..4 {
            let usable = |d: usize, k: usize| -> Usable {
                if all_healthy {
                    return Usable::Yes;
                }
                match (self.pair(d, k), self.pool(d)) {
                    (Some(p), Some(pool)) => health.usable(p, pool.loaded_ms, now),
                    _ => Usable::No(u64::MAX),
                }
            };
            let (mut tier, mut total) = (u32::MAX, 0u64);
            for (d, k, w, prio) in self.candidates() {
                if matches!(usable(d, k), Usable::No(_)) {
                    continue;
                }
                if prio < tier {
                    (tier, total) = (prio, w);
                } else if prio == tier {
                    total = total.saturating_add(w);
                }
            }
            if total == 0 {
                if !last_resort {
                    return None;
                }
                let soonest = self
                    .candidates()
                    .filter_map(|(d, k, _, _)| match usable(d, k) {
                        Usable::No(t) if t != u64::MAX => Some((t, d, k)),
                        _ => None,
                    })
                    .min()?;
                let pick = Pick {
                    deployment: soonest.1,
                    key: soonest.2,
                };
                self.mark(pick);
                return Some(pick);
            }
            let mut r = if total > 1 {
                rand::rng().random_range(0..total)
            } else {
                0
            };
            let mut chosen = None;
            for (d, k, w, prio) in self.candidates() {
                if prio != tier || matches!(usable(d, k), Usable::No(_)) {
                    continue;
                }
                if r < w {
                    chosen = Some((d, k));
                    break;
                }
                r -= w;
            }
            let (d, k) = chosen?;
            let lost_probe = usable(d, k) == Usable::Probe
                && self.pair(d, k).is_some_and(|p| !health.claim_probe(p, now));
            let pick = Pick {
                deployment: d,
                key: k,
            };
            self.mark(pick);
            if lost_probe {
                continue;
            }
            return Some(pick);
        }
        None
    }

    /// No key of the plan can ever be used as things stand: each was refused by its upstream
    /// (401/403) since its pool was read, or there is none. The refusal reaches the database and
    /// the key caches in the background (`routing::invalidate_key`); until it does, this tells
    /// the client the same thing it will be told afterwards (400 `provider_key_missing`).
    pub fn every_key_refused(&self, health: &Health) -> bool {
        let now = now_ms();
        for d in 0..self.deployments().len() {
            let Some(pool) = self.pool(d) else { continue };
            for k in 0..pool.keys.len().min(MAX_KEYS) {
                match self.pair(d, k) {
                    Some(p) if health.usable(p, pool.loaded_ms, now) == Usable::No(u64::MAX) => {}
                    _ => return false,
                }
            }
        }
        true
    }

    fn mark(&mut self, p: Pick) {
        if p.deployment < MAX_DEPLOYMENTS && p.key < MAX_KEYS {
            self.tried[p.deployment] |= 1 << p.key;
        }
    }

    /// Skips every remaining pair of the model (the upstream said the context is too long: the
    /// model's other deployments will say so too).
    pub fn give_up(&mut self) {
        self.tried = [u32::MAX; MAX_DEPLOYMENTS];
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::time::Duration;

    use super::*;
    use crate::cache::ProviderKeyEntry;
    use crate::routing::health::Outcome;

    fn provider(key: &str) -> entity::providers::Model {
        entity::providers::Model {
            key: key.into(),
            display_name: key.into(),
            base_url: "http://127.0.0.1:1".into(),
            kind: "openai".into(),
            is_active: true,
            supports_responses: false,
            api_version: None,
            region: None,
            sort_order: 0,
            created_at: chrono::Utc::now(),
            updated_at: chrono::Utc::now(),
        }
    }

    fn model(deps: &[(&str, u32, u32)]) -> Arc<CatalogModel> {
        let now = chrono::Utc::now();
        let m = entity::models::Model {
            id: "m1".into(),
            name: "m".into(),
            display_name: "m".into(),
            provider_key: deps[0].0.into(),
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
        let deployments = deps
            .iter()
            .map(|(p, w, prio)| Deployment {
                provider: Arc::new(provider(p)),
                upstream_model: format!("up-{p}"),
                weight: *w,
                priority: *prio,
            })
            .collect::<Vec<_>>();
        Arc::new(CatalogModel {
            provider: (*deployments[0].provider).clone(),
            model: m,
            deployments,
            fallbacks: Vec::new(),
        })
    }

    fn pool(ids: &[(&str, u32)]) -> Option<Arc<ProviderKeyPool>> {
        Some(Arc::new(ProviderKeyPool {
            keys: ids
                .iter()
                .map(|(id, w)| ProviderKeyEntry {
                    id: (*id).into(),
                    user_id: "u".into(),
                    provider: "p".into(),
                    secret_enc: String::new(),
                    base_url: None,
                    shared: false,
                    weight: *w,
                    masked: String::new(),
                    opened: Default::default(),
                })
                .collect(),
            loaded_ms: now_ms(),
        }))
    }

    fn plan(m: &Arc<CatalogModel>, pools: &[&[(&str, u32)]]) -> Plan {
        let mut p = Plan::new(m.clone());
        for (i, ids) in pools.iter().enumerate() {
            p.set_pool(i, pool(ids));
        }
        p
    }

    #[test]
    fn single_pair_is_tried_once() {
        let h = Health::new(5, Duration::from_secs(30));
        let m = model(&[("a", 1, 0)]);
        let mut p = plan(&m, &[&[("k", 1)]]);
        assert_eq!(
            p.next(&h, false),
            Some(Pick {
                deployment: 0,
                key: 0
            })
        );
        assert_eq!(p.next(&h, false), None);
        assert_eq!(p.next(&h, true), None);
    }

    #[test]
    fn lowest_tier_first_then_the_next() {
        let h = Health::new(5, Duration::from_secs(30));
        let m = model(&[("backup", 100, 1), ("a", 1, 0), ("b", 1, 0)]);
        let mut p = plan(&m, &[&[("kx", 1)], &[("ka", 1)], &[("kb", 1)]]);
        let first = p.next(&h, false).unwrap();
        let second = p.next(&h, false).unwrap();
        let mut tier0 = [first.deployment, second.deployment];
        tier0.sort();
        assert_eq!(tier0, [1, 2]);
        assert_eq!(
            p.next(&h, false),
            Some(Pick {
                deployment: 0,
                key: 0
            })
        );
        assert_eq!(p.next(&h, false), None);
    }

    #[test]
    fn weights_share_the_tier() {
        let h = Health::new(5, Duration::from_secs(30));
        let m = model(&[("a", 1, 0), ("b", 3, 0)]);
        let mut counts: HashMap<usize, u32> = HashMap::new();
        for _ in 0..4000 {
            let mut p = plan(&m, &[&[("ka", 1)], &[("kb", 1)]]);
            *counts
                .entry(p.next(&h, false).unwrap().deployment)
                .or_default() += 1;
        }
        let b = counts[&1];
        // Expected 3000 of 4000; far outside chance either way.
        assert!((2700..=3300).contains(&b), "{counts:?}");
        // Key weights within a pool.
        let m = model(&[("a", 1, 0)]);
        let mut k1 = 0;
        for _ in 0..2000 {
            let mut p = plan(&m, &[&[("k0", 1), ("k1", 9)]]);
            if p.next(&h, false).unwrap().key == 1 {
                k1 += 1;
            }
        }
        assert!((1700..=1900).contains(&k1), "{k1}");
    }

    #[test]
    fn unhealthy_pairs_are_skipped_and_used_only_as_a_last_resort() {
        let h = Health::new(1, Duration::from_secs(30));
        let m = model(&[("a", 1, 0), ("b", 1, 1)]);
        let bad = PairRef {
            provider: "a",
            upstream_model: "up-a",
            key_id: "ka",
        };
        h.record(bad, "", Outcome::Failed, Duration::ZERO);
        for _ in 0..50 {
            let mut p = plan(&m, &[&[("ka", 1)], &[("kb", 1)]]);
            // Tier 0's only deployment is open: tier 1 answers.
            assert_eq!(
                p.next(&h, false),
                Some(Pick {
                    deployment: 1,
                    key: 0
                })
            );
            assert_eq!(p.next(&h, false), None);
            assert_eq!(
                p.next(&h, true),
                Some(Pick {
                    deployment: 0,
                    key: 0
                })
            );
        }
        // An invalid key is never a last resort.
        let refused = PairRef {
            provider: "b",
            upstream_model: "up-b",
            key_id: "kb",
        };
        let m2 = model(&[("b", 1, 0)]);
        let mut p = plan(&m2, &[&[("kb", 1)]]);
        std::thread::sleep(Duration::from_millis(2));
        // Before the refusal every key may still be used; after it, none ever can.
        assert!(!p.every_key_refused(&h));
        h.record(refused, "", Outcome::Refused, Duration::ZERO);
        assert_eq!(p.next(&h, true), None);
        assert!(p.every_key_refused(&h));
        // A pair that is only failing (the open breaker of `ka`) is not refused.
        let p = plan(&m, &[&[("ka", 1)], &[("kb", 1)]]);
        assert!(!p.every_key_refused(&h));
    }

    #[test]
    fn inactive_provider_and_missing_pool_are_skipped() {
        let h = Health::new(5, Duration::from_secs(30));
        let mut m = (*model(&[("a", 1, 0), ("b", 1, 0)])).clone();
        let mut off = (*m.deployments[0].provider).clone();
        off.is_active = false;
        m.deployments[0].provider = Arc::new(off);
        let m = Arc::new(m);
        let mut p = plan(&m, &[&[("ka", 1)], &[("kb", 1)]]);
        assert_eq!(
            p.next(&h, false),
            Some(Pick {
                deployment: 1,
                key: 0
            })
        );
        assert_eq!(p.next(&h, false), None);
        let mut p = Plan::new(m);
        assert!(!p.has_keys());
        assert_eq!(p.next(&h, true), None);
    }
}
