//! Which modules run where: the active deployments (see [`crate::control`])
//! of the policy rules and of each tenant's filter chain, loaded and
//! compiled into a [`ModuleSet`].
//!
//! Building a set tells the truth before anything changes: every policy
//! module's `configure` is dry-run with its rule's params, and every new
//! filter is instantiated, configured and warmed up; a refusal fails the
//! whole build, naming the module and reason. Compilation runs on blocking
//! threads and is cached on disk (see [`crate::wasm`]).
//!
//! While a gradual rollout is under way a scope holds two versions, the new
//! one and its base; each room runs the one its share point picks
//! ([`crate::control::spec::Activation::version_for`]).
//!
//! Rooms watch the current set; on a change each room swaps at its next
//! tick boundary: a room whose module, params or failure mode changed gets
//! a fresh instance and `configure` runs again; viewers stay connected.
//! Filters whose module, params, `on_failure` and limits did not change keep
//! their instance.

use std::collections::HashMap;
use std::sync::Arc;

use thiserror::Error;
use wildmatch::WildMatch;

use crate::control::spec::{Activation, Deployment, Spec};
use crate::filter::{OnFailure, TenantFilter};
use crate::wasm::filter::FilterLimits;
use crate::wasm::policy::{CallFailure, PolicyModule};
use crate::wasm::{WasmError, WasmRuntime};

/// A module that could not be loaded, with what named it (a config key or
/// a deployment's field).
#[derive(Debug, Error)]
#[error("`{key}`: {reason}")]
pub struct ModuleError {
    pub key: String,
    pub reason: String,
}

/// What a matching rule makes a room run.
#[derive(Debug, Clone)]
pub enum ResolvedPolicy {
    Native {
        cap_per_sec: u32,
    },
    Wasm {
        module: Arc<PolicyModule>,
        params: Vec<(String, String)>,
        on_failure: OnFailure,
    },
}

#[derive(Debug)]
struct Rule {
    tenant: WildMatch,
    rooms: WildMatch,
    class: Option<String>,
    policy: ResolvedPolicy,
}

/// One version of a scope, loaded.
#[derive(Debug)]
struct Versioned<T> {
    version: u64,
    items: T,
}

/// A scope's active version, and its base while a rollout is under way.
#[derive(Debug)]
struct Track<T> {
    activation: Activation,
    current: Versioned<T>,
    base: Option<Versioned<T>>,
}

impl<T> Track<T> {
    fn pick(&self, tenant: &str, room: &str) -> &Versioned<T> {
        let v = self.activation.version_for(tenant, room);
        match &self.base {
            Some(b) if b.version == v => b,
            _ => &self.current,
        }
    }

    fn versions(&self) -> impl Iterator<Item = &Versioned<T>> {
        std::iter::once(&self.current).chain(self.base.as_ref())
    }
}

/// What a room of a tenant runs: its policy and the deployment version it
/// came from (none: the built-in default, no rule matched).
#[derive(Debug, Clone, Copy)]
pub struct PolicyPick<'a> {
    pub policy: &'a ResolvedPolicy,
    pub version: Option<u64>,
}

/// The active deployments to build a [`ModuleSet`] from.
#[derive(Debug, Default)]
pub struct Deployed {
    /// The policy rules: activation, its version and its base.
    pub policies: Option<(Activation, Deployment, Option<Deployment>)>,
    /// Each tenant's filter chain, likewise.
    pub filters: Vec<(String, Activation, Deployment, Option<Deployment>)>,
}

/// Where a build gets module bytes and each tenant's filter limits.
pub trait ModuleSource: Send + Sync {
    /// The bytes of `builtin:<name>` or `sha256:<hex>`.
    fn bytes(&self, reference: &str) -> Result<Vec<u8>, String>;
    /// The limits of `tenant`'s filter instances.
    fn filter_limits(&self, tenant: &str) -> FilterLimits;
}

/// Every module in use on this edge, resolved and compiled.
#[derive(Debug)]
pub struct ModuleSet {
    /// Increases with every change.
    pub generation: u64,
    policies: Option<Track<Vec<Rule>>>,
    default: ResolvedPolicy,
    filters: HashMap<String, Track<Vec<Arc<TenantFilter>>>>,
}

impl ModuleSet {
    /// A set with no deployment: every room on the built-in policy.
    pub fn empty(default_cap: u32) -> Self {
        ModuleSet {
            generation: 0,
            policies: None,
            default: ResolvedPolicy::Native {
                cap_per_sec: default_cap,
            },
            filters: HashMap::new(),
        }
    }

    /// Loads and compiles what `deployed` names, dry-runs every policy's
    /// `configure` and makes every new filter's warm instance. Filters
    /// equal (module, params, on_failure, limits) to one in `previous` are
    /// reused, instance and all. Call it on the edge's main runtime
    /// (filters make their replacements there).
    pub async fn build(
        deployed: &Deployed,
        source: &dyn ModuleSource,
        runtime: &Arc<WasmRuntime>,
        previous: &ModuleSet,
        default_cap: u32,
    ) -> Result<ModuleSet, ModuleError> {
        let before = previous.filter_count();
        let wanted: usize = deployed
            .filters
            .iter()
            .map(|(_, _, d, b)| chain_len(d) + b.as_ref().map_or(0, chain_len))
            .sum();
        // Old and new filters live side by side until rooms swap; each may
        // need a place for a replacement as well.
        runtime.reserve_for_filters(places(before + wanted));
        let built = Self::build_inner(deployed, source, runtime, previous, default_cap).await;
        if built.is_err() {
            runtime.reserve_for_filters(places(before));
        }
        built
    }

    async fn build_inner(
        deployed: &Deployed,
        source: &dyn ModuleSource,
        runtime: &Arc<WasmRuntime>,
        previous: &ModuleSet,
        default_cap: u32,
    ) -> Result<ModuleSet, ModuleError> {
        let policies = match &deployed.policies {
            None => None,
            Some((activation, current, base)) => Some(Track {
                activation: activation.clone(),
                current: load_rules(current, source, runtime).await?,
                base: match base {
                    Some(b) => Some(load_rules(b, source, runtime).await?),
                    None => None,
                },
            }),
        };
        let mut filters = HashMap::new();
        for (tenant, activation, current, base) in &deployed.filters {
            let limits = source.filter_limits(tenant);
            let mut made = Vec::new();
            let current = load_chain(tenant, current, limits, source, runtime, previous, &mut made).await?;
            let base = match base {
                Some(b) => Some(load_chain(tenant, b, limits, source, runtime, previous, &mut made).await?),
                None => None,
            };
            filters.insert(
                tenant.clone(),
                Track {
                    activation: activation.clone(),
                    current,
                    base,
                },
            );
        }
        Ok(ModuleSet {
            generation: previous.generation + 1,
            policies,
            default: ResolvedPolicy::Native {
                cap_per_sec: default_cap,
            },
            filters,
        })
    }

    /// The policy for `room` of `tenant` in size class `class`: the first
    /// matching rule of the version this room runs.
    pub fn policy_for(&self, tenant: &str, room: &str, class: &str) -> PolicyPick<'_> {
        let Some(track) = &self.policies else {
            return PolicyPick {
                policy: &self.default,
                version: None,
            };
        };
        let v = track.pick(tenant, room);
        let rule = v.items.iter().find(|r| {
            r.tenant.matches(tenant) && r.rooms.matches(room) && r.class.as_deref().is_none_or(|c| c == class)
        });
        PolicyPick {
            policy: rule.map_or(&self.default, |r| &r.policy),
            version: Some(v.version),
        }
    }

    /// The tenant's filter chain for `room`, in order, and its version.
    pub fn filters_for(&self, tenant: &str, room: &str) -> (&[Arc<TenantFilter>], Option<u64>) {
        match self.filters.get(tenant) {
            None => (&[], None),
            Some(track) => {
                let v = track.pick(tenant, room);
                (v.items.as_slice(), Some(v.version))
            }
        }
    }

    /// Tenant filters in this set (every version held).
    pub fn filter_count(&self) -> usize {
        self.filters
            .values()
            .flat_map(|t| t.versions())
            .map(|v| v.items.len())
            .sum()
    }

    /// The cap of the built-in policy when no rule matches.
    pub fn default_cap(&self) -> u32 {
        match self.default {
            ResolvedPolicy::Native { cap_per_sec } => cap_per_sec,
            ResolvedPolicy::Wasm { .. } => 0,
        }
    }

    /// Every tenant filter in the set: tenant, deployment version, filter.
    pub fn filters(&self) -> Vec<(&str, u64, &Arc<TenantFilter>)> {
        let mut out = Vec::new();
        for (tenant, track) in &self.filters {
            for v in track.versions() {
                for f in &v.items {
                    out.push((tenant.as_str(), v.version, f));
                }
            }
        }
        out.sort_by_key(|(t, v, _)| (t.to_string(), *v));
        out
    }

    fn all_filters(&self, tenant: &str) -> impl Iterator<Item = &Arc<TenantFilter>> {
        self.filters
            .get(tenant)
            .into_iter()
            .flat_map(|t| t.versions())
            .flat_map(|v| v.items.iter())
    }
}

fn chain_len(d: &Deployment) -> usize {
    match &d.spec {
        Spec::Filters(chain) => chain.len(),
        Spec::Policies(_) => 0,
    }
}

fn field(d: &Deployment, what: &str, i: usize) -> String {
    format!("{}@{}.{what}[{i}].module", d.scope, d.version)
}

async fn load_rules(
    d: &Deployment,
    source: &dyn ModuleSource,
    runtime: &Arc<WasmRuntime>,
) -> Result<Versioned<Vec<Rule>>, ModuleError> {
    let Spec::Policies(spec) = &d.spec else {
        return Err(ModuleError {
            key: d.scope.clone(),
            reason: "not a policy deployment".into(),
        });
    };
    let mut rules = Vec::new();
    for (i, rule) in spec.iter().enumerate() {
        let key = field(d, "policies", i);
        let params: Vec<(String, String)> = rule.params.clone().into_iter().collect();
        let policy = if rule.module == "native" {
            let cap =
                throng_policy_core::DefaultPolicy::from_params(params.iter().map(|(k, v)| (k.as_str(), v.as_str())))
                    .map_err(|reason| ModuleError {
                        key: key.clone(),
                        reason,
                    })?
                    .cap_per_sec();
            ResolvedPolicy::Native { cap_per_sec: cap }
        } else {
            let bytes = source.bytes(&rule.module).map_err(|reason| ModuleError {
                key: key.clone(),
                reason,
            })?;
            let rt = Arc::clone(runtime);
            let module = tokio::task::spawn_blocking(move || rt.load_policy(&bytes))
                .await
                .map_err(|e| err(&key, e.to_string()))?
                .map_err(|e| err(&key, e.to_string()))?;
            let label: Arc<str> = Arc::from(format!("dry-run/{key}").as_str());
            runtime
                .dry_run_policy(&module, label, params.clone())
                .await
                .map_err(|f| refused(&key, &rule.module, f))?;
            ResolvedPolicy::Wasm {
                module,
                params,
                on_failure: rule.on_failure,
            }
        };
        rules.push(Rule {
            tenant: WildMatch::new(&rule.tenant),
            rooms: WildMatch::new(&rule.rooms),
            class: rule.class.clone(),
            policy,
        });
    }
    Ok(Versioned {
        version: d.version,
        items: rules,
    })
}

async fn load_chain(
    tenant: &str,
    d: &Deployment,
    limits: FilterLimits,
    source: &dyn ModuleSource,
    runtime: &Arc<WasmRuntime>,
    previous: &ModuleSet,
    made: &mut Vec<Arc<TenantFilter>>,
) -> Result<Versioned<Vec<Arc<TenantFilter>>>, ModuleError> {
    let Spec::Filters(chain) = &d.spec else {
        return Err(ModuleError {
            key: d.scope.clone(),
            reason: "not a filter deployment".into(),
        });
    };
    let mut loaded = Vec::new();
    for (i, f) in chain.iter().enumerate() {
        let key = field(d, "filters", i);
        let bytes = source.bytes(&f.module).map_err(|reason| ModuleError {
            key: key.clone(),
            reason,
        })?;
        let rt = Arc::clone(runtime);
        let module = tokio::task::spawn_blocking(move || rt.load_filter(&bytes))
            .await
            .map_err(|e| err(&key, e.to_string()))?
            .map_err(|e| err(&key, e.to_string()))?;
        let params: Vec<(String, String)> = f.params.clone().into_iter().collect();
        let reuse = previous
            .all_filters(tenant)
            .find(|old| {
                old.module().hash() == module.hash()
                    && old.params() == params.as_slice()
                    && old.on_failure() == f.on_failure
                    && old.limits() == limits
            })
            // Or the same filter in the other version of this very build.
            .or_else(|| {
                made.iter().find(|old| {
                    old.module().hash() == module.hash()
                        && old.params() == params.as_slice()
                        && old.on_failure() == f.on_failure
                })
            })
            .cloned();
        let filter = match reuse {
            Some(old) => old,
            None => TenantFilter::load(
                Arc::clone(runtime),
                module,
                params,
                f.on_failure,
                Arc::from(tenant),
                limits,
            )
            .await
            .map_err(|e| refused(&key, &f.module, e))?,
        };
        made.push(Arc::clone(&filter));
        loaded.push(filter);
    }
    Ok(Versioned {
        version: d.version,
        items: loaded,
    })
}

/// Pool places to keep for `filters` tenant filters: each one's instance
/// and its replacement.
fn places(filters: usize) -> u32 {
    u32::try_from(filters.saturating_mul(2)).unwrap_or(u32::MAX)
}

fn refused(key: &str, module: &str, f: CallFailure) -> ModuleError {
    err(key, format!("{module}: {}", f.reason))
}

fn err(key: &str, reason: String) -> ModuleError {
    ModuleError {
        key: key.to_owned(),
        reason,
    }
}

/// The bytes of a built-in module, by name.
pub fn builtin(name: &str) -> Option<&'static [u8]> {
    throng_guest_artifacts::BUILTIN
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, bytes)| *bytes)
}

impl From<WasmError> for ModuleError {
    fn from(e: WasmError) -> Self {
        ModuleError {
            key: "wasm".into(),
            reason: e.to_string(),
        }
    }
}
