//! Which modules run where: edge-config's `[[policy]]` rules and tenant
//! filter chains, loaded and compiled into a [`ModuleSet`].
//!
//! Loading tells the truth before anything changes: every policy module's
//! `configure` is dry-run with its rule's params, and every new filter is
//! instantiated, configured and warmed up; a refusal fails the whole load,
//! naming the config key, module and reason. Compilation runs on blocking
//! threads and is cached on disk (see [`crate::wasm`]).
//!
//! Rooms watch the current set; on a change (SIGHUP reload) each room swaps
//! at its next tick boundary: a room whose module or params changed gets a
//! fresh instance and `configure` runs again; viewers stay connected.
//! Filters whose module, params and `on_failure` did not change keep their
//! instance.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use thiserror::Error;
use wildmatch::WildMatch;

use crate::config::{Config, ModuleSource, ModuleUse, PolicyChoice};
use crate::filter::TenantFilter;
use crate::wasm::policy::CallFailure;
use crate::wasm::policy::PolicyModule;
use crate::wasm::{ModuleHash, WasmError, WasmRuntime};

/// A module that could not be loaded, with the config key that named it.
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
    },
}

#[derive(Debug)]
struct Rule {
    tenant: WildMatch,
    rooms: WildMatch,
    class: Option<String>,
    policy: ResolvedPolicy,
}

/// Every module in use on this edge, resolved and compiled.
#[derive(Debug)]
pub struct ModuleSet {
    /// Increases with every reload.
    pub generation: u64,
    rules: Vec<Rule>,
    default: ResolvedPolicy,
    filters: HashMap<String, Vec<Arc<TenantFilter>>>,
}

impl ModuleSet {
    /// Loads and compiles what `config` names, dry-runs every policy's
    /// `configure` and makes every new filter's warm instance. Compilation
    /// runs on blocking threads. Filters equal (module, params, on_failure)
    /// to one in `previous` are reused, instance and all. Call it on the
    /// edge's main runtime (filters make their replacements there).
    pub async fn load(
        config: &Config,
        runtime: &Arc<WasmRuntime>,
        previous: Option<&ModuleSet>,
    ) -> Result<ModuleSet, ModuleError> {
        let before = previous.map_or(0, ModuleSet::filter_count);
        let wanted: usize = config.filters.values().map(Vec::len).sum();
        // Old and new filters live side by side until rooms swap; each may
        // need a place for a replacement as well.
        runtime.reserve_for_filters(places(before + wanted));
        let loaded = Self::load_inner(config, runtime, previous).await;
        if loaded.is_err() {
            runtime.reserve_for_filters(places(before));
        }
        loaded
    }

    async fn load_inner(
        config: &Config,
        runtime: &Arc<WasmRuntime>,
        previous: Option<&ModuleSet>,
    ) -> Result<ModuleSet, ModuleError> {
        let mut rules = Vec::new();
        for rule in &config.policies {
            let policy = match &rule.policy {
                PolicyChoice::Native { cap_per_sec } => ResolvedPolicy::Native {
                    cap_per_sec: *cap_per_sec,
                },
                PolicyChoice::Module(m) => {
                    let bytes = read(m, &config.data_dir)?;
                    let rt = Arc::clone(runtime);
                    let module = tokio::task::spawn_blocking(move || rt.load_policy(&bytes))
                        .await
                        .map_err(|e| err(m, e.to_string()))?
                        .map_err(|e| err(m, e.to_string()))?;
                    let label: Arc<str> = Arc::from(format!("dry-run/{}", m.key).as_str());
                    runtime
                        .dry_run_policy(&module, label, m.params.clone())
                        .await
                        .map_err(|f| refused(m, f))?;
                    ResolvedPolicy::Wasm {
                        module,
                        params: m.params.clone(),
                    }
                }
            };
            rules.push(Rule {
                tenant: WildMatch::new(&rule.tenant),
                rooms: WildMatch::new(&rule.rooms),
                class: rule.class.clone(),
                policy,
            });
        }
        let mut filters = HashMap::new();
        for (tenant, chain) in &config.filters {
            let mut loaded = Vec::new();
            for m in chain {
                let bytes = read(m, &config.data_dir)?;
                let rt = Arc::clone(runtime);
                let module = tokio::task::spawn_blocking(move || rt.load_filter(&bytes))
                    .await
                    .map_err(|e| err(m, e.to_string()))?
                    .map_err(|e| err(m, e.to_string()))?;
                let reuse = previous.and_then(|p| {
                    p.filters_for(tenant)
                        .iter()
                        .find(|f| {
                            f.module().hash() == module.hash()
                                && f.params() == m.params.as_slice()
                                && f.on_failure() == m.on_failure
                        })
                        .cloned()
                });
                let filter = match reuse {
                    Some(f) => f,
                    None => TenantFilter::load(
                        Arc::clone(runtime),
                        module,
                        m.params.clone(),
                        m.on_failure,
                        Arc::from(tenant.as_str()),
                    )
                    .await
                    .map_err(|f| refused(m, f))?,
                };
                loaded.push(filter);
            }
            filters.insert(tenant.clone(), loaded);
        }
        Ok(ModuleSet {
            generation: previous.map_or(1, |p| p.generation + 1),
            rules,
            default: ResolvedPolicy::Native {
                cap_per_sec: config.rooms.viewer_cap_per_sec,
            },
            filters,
        })
    }

    /// The policy for `room` of `tenant` in size class `class`: the first
    /// matching rule's.
    pub fn policy_for(&self, tenant: &str, room: &str, class: &str) -> &ResolvedPolicy {
        self.rules
            .iter()
            .find(|r| {
                r.tenant.matches(tenant) && r.rooms.matches(room) && r.class.as_deref().is_none_or(|c| c == class)
            })
            .map_or(&self.default, |r| &r.policy)
    }

    /// The tenant's filter chain, in order.
    pub fn filters_for(&self, tenant: &str) -> &[Arc<TenantFilter>] {
        self.filters.get(tenant).map_or(&[], Vec::as_slice)
    }

    /// Tenant filters in this set.
    pub fn filter_count(&self) -> usize {
        self.filters.values().map(Vec::len).sum()
    }

    /// The cap of the built-in policy when no rule matches.
    pub fn default_cap(&self) -> u32 {
        match self.default {
            ResolvedPolicy::Native { cap_per_sec } => cap_per_sec,
            ResolvedPolicy::Wasm { .. } => 0,
        }
    }
}

/// Pool places to keep for `filters` tenant filters: each one's instance
/// and its replacement.
fn places(filters: usize) -> u32 {
    u32::try_from(filters.saturating_mul(2)).unwrap_or(u32::MAX)
}

fn refused(m: &ModuleUse, f: CallFailure) -> ModuleError {
    err(m, format!("{}: {}", source_name(&m.source), f.reason))
}

fn source_name(source: &ModuleSource) -> String {
    match source {
        ModuleSource::Builtin(name) => format!("builtin:{name}"),
        ModuleSource::Path(path) => path.display().to_string(),
        ModuleSource::Hash(hex) => format!("sha256:{hex}"),
    }
}

fn err(m: &ModuleUse, reason: String) -> ModuleError {
    ModuleError {
        key: m.key.clone(),
        reason,
    }
}

fn read(m: &ModuleUse, data_dir: &Path) -> Result<Vec<u8>, ModuleError> {
    match &m.source {
        ModuleSource::Builtin(name) => throng_guest_artifacts::BUILTIN
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, bytes)| bytes.to_vec())
            .ok_or_else(|| err(m, format!("no built-in module `{name}`"))),
        ModuleSource::Path(path) => {
            std::fs::read(path).map_err(|e| err(m, format!("cannot read {}: {e}", path.display())))
        }
        ModuleSource::Hash(hex) => {
            let path = data_dir.join("modules").join(format!("{hex}.wasm"));
            let bytes = std::fs::read(&path).map_err(|e| err(m, format!("cannot read {}: {e}", path.display())))?;
            let actual = ModuleHash::of(&bytes);
            if actual.hex() != *hex {
                return Err(err(
                    m,
                    format!("{} has hash {actual:?}, not sha256:{hex}", path.display()),
                ));
            }
            Ok(bytes)
        }
    }
}

impl From<WasmError> for ModuleError {
    fn from(e: WasmError) -> Self {
        ModuleError {
            key: "wasm".into(),
            reason: e.to_string(),
        }
    }
}
