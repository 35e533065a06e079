//! A catalog model's deployments (where it can be served: provider, upstream model, weight,
//! priority tier) and fallback models, as stored on the model row and as the catalog holds them;
//! and the save-time checks of spec §11 (weights 1–100, known active providers, no fallback cycle).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use entity::{models, providers};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The most deployments one model has.
pub const MAX_DEPLOYMENTS: usize = 16;
/// The most fallback models one model names.
pub const MAX_FALLBACKS: usize = 8;
/// The lowest priority tier a deployment may be in (0 is tried first).
pub const MAX_PRIORITY: i32 = 100;

/// One deployment as the management API takes and shows it (and as stored, in JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeploymentSpec {
    /// A provider key.
    pub provider: String,
    /// The model name sent to that provider (default: the catalog model's name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_model: Option<String>,
    /// Share of its tier's requests, 1–100 (default 1).
    #[serde(default = "one")]
    pub weight: i32,
    /// Tier: 0 is tried first; a higher tier only when no deployment of a lower one is healthy.
    #[serde(default)]
    pub priority: i32,
}

fn one() -> i32 {
    1
}

/// A deployment as the hot path reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct Deployment {
    pub provider: Arc<providers::Model>,
    pub upstream_model: String,
    pub weight: u32,
    pub priority: u32,
}

/// A model's deployments from its row: the stored list, else the one its `provider_key` and
/// `upstream_model` name. A deployment whose provider is missing is left out; unreadable stored
/// data falls back to the row's own provider.
pub fn from_row(
    m: &models::Model,
    providers: &HashMap<String, Arc<providers::Model>>,
) -> Vec<Deployment> {
    let specs: Vec<DeploymentSpec> = m
        .deployments
        .as_deref()
        .and_then(|j| serde_json::from_str(j).ok())
        .unwrap_or_default();
    let mut out: Vec<Deployment> = specs
        .into_iter()
        .take(MAX_DEPLOYMENTS)
        .filter_map(|s| {
            Some(Deployment {
                provider: providers.get(&s.provider)?.clone(),
                upstream_model: s.upstream_model.unwrap_or_else(|| m.upstream_model.clone()),
                weight: s.weight.clamp(1, 100) as u32,
                priority: s.priority.clamp(0, MAX_PRIORITY) as u32,
            })
        })
        .collect();
    if out.is_empty()
        && let Some(p) = providers.get(&m.provider_key)
    {
        out.push(Deployment {
            provider: p.clone(),
            upstream_model: m.upstream_model.clone(),
            weight: 1,
            priority: 0,
        });
    }
    out
}

/// The deployments to show for a row (the stored list, else the row's own one).
pub fn specs_of(m: &models::Model) -> Vec<DeploymentSpec> {
    m.deployments
        .as_deref()
        .and_then(|j| serde_json::from_str::<Vec<DeploymentSpec>>(j).ok())
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| {
            vec![DeploymentSpec {
                provider: m.provider_key.clone(),
                upstream_model: Some(m.upstream_model.clone()),
                weight: 1,
                priority: 0,
            }]
        })
}

/// A row's fallback model names, in order.
pub fn fallbacks_of(m: &models::Model) -> Vec<String> {
    m.fallbacks
        .as_deref()
        .and_then(|j| serde_json::from_str::<Vec<String>>(j).ok())
        .unwrap_or_default()
        .into_iter()
        .take(MAX_FALLBACKS)
        .collect()
}

/// Why a routing setting was refused at save: the parameter and a message for the admin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub param: &'static str,
    pub message: String,
}

fn refuse(param: &'static str, message: impl Into<String>) -> Refusal {
    Refusal {
        param,
        message: message.into(),
    }
}

/// Checks a deployment list against the providers (`key → is_active`): 1–16 entries, weights
/// 1–100, priorities 0–100, every provider known and active, no deployment twice.
pub fn check_deployments(
    specs: &[DeploymentSpec],
    providers: &HashMap<String, bool>,
) -> Result<(), Refusal> {
    if specs.is_empty() || specs.len() > MAX_DEPLOYMENTS {
        return Err(refuse(
            "deployments",
            format!("deployments must hold 1–{MAX_DEPLOYMENTS} entries"),
        ));
    }
    let mut seen = HashSet::new();
    for s in specs {
        match providers.get(&s.provider) {
            None => {
                return Err(refuse(
                    "deployments",
                    format!("unknown provider {:?}", truncated(&s.provider)),
                ));
            }
            Some(false) => {
                return Err(refuse(
                    "deployments",
                    format!("the provider {:?} is not active", s.provider),
                ));
            }
            Some(true) => {}
        }
        if !(1..=100).contains(&s.weight) {
            return Err(refuse(
                "deployments",
                "weight must be an integer from 1 to 100",
            ));
        }
        if !(0..=MAX_PRIORITY).contains(&s.priority) {
            return Err(refuse(
                "deployments",
                format!("priority must be an integer from 0 to {MAX_PRIORITY}"),
            ));
        }
        if let Some(u) = &s.upstream_model
            && (u.is_empty() || u.len() > 128 || u.chars().any(|c| c.is_whitespace()))
        {
            return Err(refuse(
                "deployments",
                "upstream_model must be 1–128 characters without spaces",
            ));
        }
        if !seen.insert((s.provider.as_str(), s.upstream_model.as_deref())) {
            return Err(refuse(
                "deployments",
                format!("the deployment {:?} is listed twice", s.provider),
            ));
        }
    }
    Ok(())
}

fn truncated(s: &str) -> String {
    s.chars().take(64).collect()
}

/// Checks `model`'s new fallback list against the catalog (`edges`: every other model's name →
/// its fallbacks): at most 8, each an existing model other than itself, none twice, and no cycle
/// through the models' fallbacks (a → b → a).
pub fn check_fallbacks(
    model: &str,
    fallbacks: &[String],
    edges: &HashMap<String, Vec<String>>,
) -> Result<(), Refusal> {
    if fallbacks.len() > MAX_FALLBACKS {
        return Err(refuse(
            "fallbacks",
            format!("fallbacks may name at most {MAX_FALLBACKS} models"),
        ));
    }
    let mut seen = HashSet::new();
    for f in fallbacks {
        if f == model {
            return Err(refuse("fallbacks", "a model cannot fall back to itself"));
        }
        if !edges.contains_key(f) {
            return Err(refuse(
                "fallbacks",
                format!("unknown model {:?}", truncated(f)),
            ));
        }
        if !seen.insert(f.as_str()) {
            return Err(refuse("fallbacks", format!("{f:?} is listed twice")));
        }
    }
    // Depth-first from each new fallback: reaching `model` again is a cycle.
    let mut stack: Vec<&str> = fallbacks.iter().map(String::as_str).collect();
    let mut visited: HashSet<&str> = HashSet::new();
    while let Some(m) = stack.pop() {
        if m == model {
            return Err(refuse(
                "fallbacks",
                format!("the fallbacks form a cycle back to {model:?}"),
            ));
        }
        if !visited.insert(m) {
            continue;
        }
        if let Some(next) = edges.get(m) {
            stack.extend(next.iter().map(String::as_str));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(p: &str, w: i32, prio: i32) -> DeploymentSpec {
        DeploymentSpec {
            provider: p.into(),
            upstream_model: None,
            weight: w,
            priority: prio,
        }
    }

    #[test]
    fn deployments_are_checked() {
        let providers: HashMap<String, bool> =
            [("a".to_owned(), true), ("off".to_owned(), false)].into();
        assert!(check_deployments(&[spec("a", 1, 0)], &providers).is_ok());
        assert!(check_deployments(&[], &providers).is_err());
        let unknown = check_deployments(&[spec("zz", 1, 0)], &providers).unwrap_err();
        assert!(unknown.message.contains("unknown provider"), "{unknown:?}");
        let off = check_deployments(&[spec("off", 1, 0)], &providers).unwrap_err();
        assert!(off.message.contains("not active"), "{off:?}");
        for w in [0, 101, -1] {
            assert!(check_deployments(&[spec("a", w, 0)], &providers).is_err());
        }
        assert!(check_deployments(&[spec("a", 100, 0)], &providers).is_ok());
        assert!(check_deployments(&[spec("a", 1, 101)], &providers).is_err());
        assert!(check_deployments(&[spec("a", 1, 0), spec("a", 2, 1)], &providers).is_err());
        let many: Vec<_> = (0..17)
            .map(|i| DeploymentSpec {
                upstream_model: Some(format!("m{i}")),
                ..spec("a", 1, 0)
            })
            .collect();
        assert!(check_deployments(&many, &providers).is_err());
        assert!(check_deployments(&many[..16], &providers).is_ok());
    }

    #[test]
    fn fallback_cycles_are_refused() {
        let edges: HashMap<String, Vec<String>> = [
            ("a".to_owned(), vec![]),
            ("b".to_owned(), vec!["c".to_owned()]),
            ("c".to_owned(), vec!["a".to_owned()]),
            ("d".to_owned(), vec![]),
        ]
        .into();
        assert!(check_fallbacks("a", &["d".into()], &edges).is_ok());
        let cycle = check_fallbacks("a", &["b".into()], &edges).unwrap_err();
        assert!(cycle.message.contains("cycle"), "{cycle:?}");
        assert!(check_fallbacks("a", &["a".into()], &edges).is_err());
        assert!(check_fallbacks("a", &["nope".into()], &edges).is_err());
        assert!(check_fallbacks("a", &["d".into(), "d".into()], &edges).is_err());
        assert!(check_fallbacks("d", &["b".into()], &edges).is_ok());
    }
}
