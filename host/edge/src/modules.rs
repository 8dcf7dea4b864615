//! Which modules run where: edge-config's `[[policy]]` rules and tenant
//! filter chains, loaded and compiled into a [`ModuleSet`].
//!
//! Rooms watch the current set; on a change (SIGHUP reload) each room swaps
//! at its next tick boundary: a room whose module or params changed gets a
//! fresh instance and `configure` runs again; viewers stay connected.
//! Filters whose module and params did not change keep their instance.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use thiserror::Error;
use wildmatch::WildMatch;

use crate::config::{Config, ModuleSource, ModuleUse, PolicyChoice};
use crate::filter::TenantFilter;
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
    /// Loads and compiles what `config` names. Compilation runs on blocking
    /// threads. Filters equal (module and params) to one in `previous` are
    /// reused, instance and all.
    pub async fn load(
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
                        .find(|f| f.module().hash() == module.hash() && f.params() == m.params.as_slice())
                        .cloned()
                });
                loaded.push(reuse.unwrap_or_else(|| {
                    Arc::new(TenantFilter::new(
                        Arc::clone(runtime),
                        module,
                        m.params.clone(),
                        Arc::from(tenant.as_str()),
                    ))
                }));
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

    /// The cap of the built-in policy when no rule matches.
    pub fn default_cap(&self) -> u32 {
        match self.default {
            ResolvedPolicy::Native { cap_per_sec } => cap_per_sec,
            ResolvedPolicy::Wasm { .. } => 0,
        }
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
        ModuleSource::Builtin(name) => throng_guest_artifacts::ALL
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
