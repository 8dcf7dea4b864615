//! The control plane: modules uploaded once and kept by content hash,
//! deployments that say which module runs where, activation (at once or
//! for a share of rooms), rollback, and an audit log of every change.
//!
//! # Layout
//!
//! - [`spec`]: deployments as documents: scopes, versions, rollout shares.
//! - [`store`]: the durable state (redb) and module bytes on disk.
//! - this file: [`ControlPlane`], the rules: who may do what, the checks a
//!   module passes before it is stored, quotas, and turning the active
//!   deployments into the [`ModuleSet`] rooms run.
//!
//! Uploading is apart from activating (as at Fastly or Cloudflare): a
//! module is checked when uploaded (size, compile, world, instantiate,
//! configure, self-test), a deployment is checked when created (every
//! module it names exists, may be used by that scope, fits its world and
//! takes its params), and an activation builds the whole new module set
//! before it replaces the old one. A failure at any step changes nothing.
//!
//! edge-config's `[[policy]]` rules and tenants' `filters` seed the first
//! deployment of their scopes, and a changed file on reload adds a new one.

pub mod shared;
pub mod spec;
pub mod store;
mod sync;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::sync::watch;

use crate::config::{Config, ControlConfig, ModuleSource as ConfigSource, OperatorKey, PolicyChoice};
use crate::modules::{self, Deployed, ModuleError, ModuleSet, ModuleSource};
use crate::wasm::filter::FilterLimits;
use crate::wasm::{ModuleHash, WasmError, WasmRuntime};
use shared::{EdgeReport, Failing, Shared, SharedError};
use spec::{Activation, Deployment, FilterUse, OnFailure, PolicyRule, Scope, Spec};
use store::{ControlStore, StoreError};

/// Who signed what an edge-config file seeded.
pub const CONFIG_CALLER: &str = "edge-config";

/// The plug-in point a module is written for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum World {
    RoomPolicy,
    MessageFilter,
}

impl World {
    pub fn as_str(self) -> &'static str {
        match self {
            World::RoomPolicy => "room-policy",
            World::MessageFilter => "message-filter",
        }
    }
}

/// Who is calling: an operator (by key) or a tenant's admin (by token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    Operator { name: String },
    Tenant { tenant: String, user: String },
}

impl Caller {
    /// As the audit log names it: `operator:<name>` or `tenant:<id>/<user>`.
    pub fn who(&self) -> String {
        match self {
            Caller::Operator { name } => format!("operator:{name}"),
            Caller::Tenant { tenant, user } => format!("tenant:{tenant}/{user}"),
        }
    }

    /// The owner of what this caller uploads.
    pub fn owner(&self) -> String {
        match self {
            Caller::Operator { .. } => OPERATOR_OWNER.into(),
            Caller::Tenant { tenant, .. } => tenant_owner(tenant),
        }
    }

    pub fn is_operator(&self) -> bool {
        matches!(self, Caller::Operator { .. })
    }

    /// Whether this caller may act for `tenant`.
    pub fn may_act_for(&self, tenant: &str) -> bool {
        match self {
            Caller::Operator { .. } => true,
            Caller::Tenant { tenant: t, .. } => t == tenant,
        }
    }

    /// The tenant this caller is limited to, if any.
    pub fn tenant(&self) -> Option<&str> {
        match self {
            Caller::Operator { .. } => None,
            Caller::Tenant { tenant, .. } => Some(tenant),
        }
    }
}

/// The owner of operators' modules.
pub const OPERATOR_OWNER: &str = "operator";

/// The fewest hex digits a `sha256:` prefix may name a module by.
pub const MIN_HASH_PREFIX: usize = 8;

/// `reference` (a whole `sha256:` hash, a unique prefix of one, or
/// `name@version`) as `sha256:<the whole hash>` of one of the modules
/// `candidates` gives (asked only when needed); why not, otherwise.
fn resolve_among(
    reference: &str,
    candidates: impl FnOnce() -> Result<Vec<ModuleRecord>, ControlError>,
) -> Result<String, String> {
    let shown = crate::untrusted(reference, 80);
    let all = |c: Result<Vec<ModuleRecord>, ControlError>| c.map_err(|e| e.to_string());
    let matches: Vec<ModuleRecord> = if let Some(hex) = reference.strip_prefix("sha256:") {
        let hex = hex.to_ascii_lowercase();
        if !hex.bytes().all(|b| b.is_ascii_hexdigit()) || hex.len() < MIN_HASH_PREFIX || hex.len() > 64 {
            return Err(format!(
                "`{shown}`: sha256: takes the whole hash or a prefix of at least {MIN_HASH_PREFIX} hex digits"
            ));
        }
        if hex.len() == 64 {
            return Ok(format!("sha256:{hex}"));
        }
        all(candidates())?
            .into_iter()
            .filter(|m| m.sha256.starts_with(&hex))
            .collect()
    } else if let Some((name, version)) = reference.rsplit_once('@') {
        all(candidates())?
            .into_iter()
            .filter(|m| m.name == name && m.version == version)
            .collect()
    } else {
        return Err(format!(
            "`{shown}`: expected sha256:<hex> (or a unique prefix), <name>@<version> of a stored module, or builtin:<name>"
        ));
    };
    // The same bytes stored by two owners are one module.
    let mut hashes: Vec<&str> = matches.iter().map(|m| m.sha256.as_str()).collect();
    hashes.sort_unstable();
    hashes.dedup();
    match hashes.as_slice() {
        [one] => Ok(format!("sha256:{one}")),
        [] => Err(format!("no stored module `{shown}` that may be used here")),
        many => {
            let listed: Vec<String> = matches
                .iter()
                .take(5)
                .map(|m| format!("sha256:{}… ({}@{}, {})", &m.sha256[..16], m.name, m.version, m.owner))
                .collect();
            Err(format!(
                "`{shown}` names {} modules: {}; give more of the hash",
                many.len(),
                listed.join(", ")
            ))
        }
    }
}

fn tenant_owner(tenant: &str) -> String {
    format!("tenant:{tenant}")
}

/// One step a module passed on upload, and how long it took.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckReport {
    pub step: String,
    pub ms: f64,
}

/// A stored module: immutable, by content hash.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModuleRecord {
    pub sha256: String,
    /// `operator`, or `tenant:<id>`.
    pub owner: String,
    pub name: String,
    /// A label of the uploader's choosing; (owner, name, version) names one
    /// module for ever.
    pub version: String,
    pub world: World,
    pub size: u64,
    pub uploader: String,
    pub uploaded_at_ms: u64,
    /// The params `configure` was checked with.
    pub params: BTreeMap<String, String>,
    pub checks: Vec<CheckReport>,
    /// Bytes of its compiled code in the cache of the edge that stored it
    /// (counted, with `size`, against the owner's `max_stored_bytes`).
    #[serde(default)]
    pub compiled_size: u64,
}

impl ModuleRecord {
    fn key(&self) -> String {
        format!("{}/{}", self.owner, self.sha256)
    }

    /// The tenant that owns it, if a tenant does.
    pub fn tenant(&self) -> Option<&str> {
        self.owner.strip_prefix("tenant:")
    }
}

/// One change, as the audit log keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub seq: u64,
    pub at_ms: u64,
    /// `operator:<name>`, `tenant:<id>/<user>` or `edge-config`.
    pub who: String,
    /// e.g. `module.upload`, `deployment.create`, `deployment.activate`,
    /// `deployment.rollback`, `user.disconnect`, `room.publish`.
    pub action: String,
    /// What it acted on: a module hash, a scope, a room.
    pub target: String,
    /// The tenant concerned, if one is: tenants read only their own entries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// Which audit entries a reader asks for (every field that is set must
/// match).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct AuditFilter {
    /// The entry's target exactly: a scope (`policies`, `filters/acme`),
    /// `sha256:<hex>`, a room.
    pub target: Option<String>,
    /// Who acted, exactly (`operator:ops`, `tenant:acme/lead`, `edge-config`).
    pub who: Option<String>,
    /// The action, or its family before the dot (`deployment`).
    pub action: Option<String>,
    /// Entries written at or after this Unix time (ms).
    pub since_ms: Option<u64>,
}

impl AuditFilter {
    fn takes(&self, e: &AuditEntry) -> bool {
        let action = self
            .action
            .as_deref()
            .is_none_or(|a| e.action == a || e.action.split_once('.').is_some_and(|(family, _)| family == a));
        action
            && self.target.as_deref().is_none_or(|t| e.target == t)
            && self.who.as_deref().is_none_or(|w| e.who == w)
            && self.since_ms.is_none_or(|t| e.at_ms >= t)
    }
}

impl AuditEntry {
    pub fn new(caller: &str, action: &str, target: impl Into<String>) -> Self {
        AuditEntry {
            seq: 0,
            at_ms: crate::unix_now_ms(),
            who: caller.to_owned(),
            action: action.to_owned(),
            target: target.into(),
            tenant: None,
            from: None,
            to: None,
            detail: None,
        }
    }
}

/// Why a control-plane call was refused. Each has a stable code and an
/// HTTP status; the message names the field or step at fault.
#[derive(Debug, Error)]
pub enum ControlError {
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("`{field}`: {reason}")]
    Invalid { field: String, reason: String },
    /// A module failed a check on upload.
    #[error("module refused at step `{step}`: {reason}")]
    Refused { step: &'static str, reason: String },
    #[error("{0}")]
    Conflict(String),
    #[error("quota `{quota}`: {reason}")]
    Quota { quota: &'static str, reason: String },
    /// A deployment names something that cannot run.
    #[error("`{field}`: {reason}")]
    Deployment { field: String, reason: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    /// In a cluster, JetStream (where changes are made) does not answer.
    #[error("{0}")]
    Unavailable(String),
}

impl From<SharedError> for ControlError {
    fn from(e: SharedError) -> Self {
        match e {
            SharedError::Conflict(m) => ControlError::Conflict(format!("{m}; read the scope again and retry")),
            SharedError::Unavailable(m) => ControlError::Unavailable(m),
        }
    }
}

impl ControlError {
    /// The stable code clients match on.
    pub fn code(&self) -> &'static str {
        match self {
            ControlError::Forbidden(_) => "forbidden",
            ControlError::NotFound(_) => "not_found",
            ControlError::Invalid { .. } => "invalid_request",
            ControlError::Refused { .. } => "module_refused",
            ControlError::Conflict(_) => "conflict",
            ControlError::Quota { .. } => "quota_exceeded",
            ControlError::Deployment { .. } => "deployment_refused",
            ControlError::Store(_) => "internal",
            ControlError::Unavailable(_) => "unavailable",
        }
    }

    pub fn status(&self) -> u16 {
        match self {
            ControlError::Forbidden(_) | ControlError::Quota { .. } => 403,
            ControlError::NotFound(_) => 404,
            ControlError::Invalid { .. } => 400,
            ControlError::Refused { .. } | ControlError::Deployment { .. } => 422,
            ControlError::Conflict(_) => 409,
            ControlError::Store(_) => 500,
            ControlError::Unavailable(_) => 503,
        }
    }

    /// The field or step at fault, for clients that point at it.
    pub fn field(&self) -> Option<String> {
        match self {
            ControlError::Invalid { field, .. } | ControlError::Deployment { field, .. } => Some(field.clone()),
            ControlError::Refused { step, .. } => Some((*step).to_owned()),
            ControlError::Quota { quota, .. } => Some((*quota).to_owned()),
            _ => None,
        }
    }

    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        ControlError::Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }

    fn deployment(field: impl Into<String>, reason: impl Into<String>) -> Self {
        ControlError::Deployment {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// What an uploader says of a module.
#[derive(Debug, Clone)]
pub struct Upload {
    pub name: String,
    pub version: String,
    pub world: World,
    pub params: BTreeMap<String, String>,
}

/// Which edges run which deployment.
#[derive(Debug, Clone, Serialize)]
pub struct EdgesView {
    /// Each scope's activation in force (the cluster's, or this edge's).
    pub desired: BTreeMap<String, Activation>,
    pub edges: Vec<EdgeView>,
}

/// One edge's report, and whether it runs what is in force.
#[derive(Debug, Clone, Serialize)]
pub struct EdgeView {
    #[serde(flatten)]
    pub report: EdgeReport,
    /// Every scope at the version and share in force, none failing.
    pub in_step: bool,
    /// Whether the edge is in the live set now (set by the caller, which
    /// knows the cluster's membership).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub live: Option<bool>,
}

/// The same version on the same share of rooms.
fn same_version(a: &Activation, b: &Activation) -> bool {
    (a.version, a.percent, a.base) == (b.version, b.percent, b.base)
}

/// A scope's state: what is active and which versions exist.
#[derive(Debug, Clone, Serialize)]
pub struct ScopeStatus {
    pub scope: String,
    pub active: Option<Activation>,
    pub versions: Vec<Deployment>,
}

/// A scope as the overview shows it: what is active and how many
/// versions are kept, without their specs (the overview is pushed every
/// second to each `/v1/events` stream).
#[derive(Debug, Clone, Serialize)]
pub struct ScopeSummary {
    pub scope: String,
    pub active: Option<Activation>,
    pub versions: usize,
}

/// The control plane of one edge.
pub struct ControlPlane {
    store: ControlStore,
    runtime: Arc<WasmRuntime>,
    modules: watch::Sender<Arc<ModuleSet>>,
    settings: RwLock<ControlConfig>,
    /// Tenants the config knows (deployments for others are refused).
    tenants: RwLock<BTreeSet<String>>,
    classes: Vec<String>,
    default_cap: u32,
    max_module_bytes: usize,
    /// One change at a time: an activation builds against the set it replaces.
    change: tokio::sync::Mutex<()>,
    /// In a cluster: where changes are shared.
    link: Option<Link>,
    /// Tenants' uploads read and checked at once: each holds its body in
    /// memory.
    uploads: tokio::sync::Semaphore,
    /// Operators' own turns, so no tenant's uploads make an operator wait.
    operator_uploads: tokio::sync::Semaphore,
    /// Who has an upload under way (a tenant, or one operator): one each.
    uploading: std::sync::Mutex<BTreeSet<String>>,
    /// What each tenant's uploads have left to compile this hour.
    compiling: std::sync::Mutex<BTreeMap<String, CompileBucket>>,
}

/// A tenant's compile time: `compile_per_hour` when full, filling back at
/// that rate; one upload may overdraw it (a compile cannot be cut short),
/// and the next waits until it is above zero again.
#[derive(Debug, Clone, Copy)]
struct CompileBucket {
    /// Seconds left; below zero after an overdraw.
    left: f64,
    at: Instant,
}

impl CompileBucket {
    fn refilled(mut self, per_hour: std::time::Duration, now: Instant) -> Self {
        let cap = per_hour.as_secs_f64();
        let back = now.saturating_duration_since(self.at).as_secs_f64() * cap / 3600.0;
        self.left = (self.left + back).min(cap);
        self.at = now;
        self
    }
}

/// CPU time of the calling thread (zero where the clock is missing).
fn thread_cpu() -> std::time::Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    std::time::Duration::new(t.tv_sec.max(0) as u64, t.tv_nsec.clamp(0, 999_999_999) as u32)
}

/// Tenants' uploads an edge reads and checks at once; more wait (see
/// [`ControlPlane::upload_turn`]), so a flood of uploads costs at most this
/// many bodies of memory (and as many again for operators').
const UPLOADS_AT_ONCE: usize = 2;
/// Versions a tenant's scope may hold above its active one, never
/// activated: each costs store space on every edge.
const MAX_PENDING_VERSIONS: u64 = 10;
/// An upload's body must have arrived within this, or it is refused: a
/// body sent a byte at a time holds its turn no longer.
pub const UPLOAD_BODY_DEADLINE: std::time::Duration = std::time::Duration::from_secs(30);
/// How long an upload waits for its turn before it is refused.
const UPLOAD_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// A caller's turn to upload (see [`ControlPlane::upload_turn`]); over
/// when dropped.
#[derive(Debug)]
pub struct UploadTurn<'a> {
    plane: &'a ControlPlane,
    who: String,
    _permit: Option<tokio::sync::SemaphorePermit<'a>>,
}

impl Drop for UploadTurn<'_> {
    fn drop(&mut self) {
        self.plane
            .uploading
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.who);
    }
}

/// An edge's part in a cluster's control plane.
#[derive(Debug)]
struct Link {
    edge_id: String,
    region: String,
    /// Set once JetStream first answers; changes wait for it.
    shared: tokio::sync::OnceCell<Shared>,
    /// Each scope's activation in the bucket, as last read.
    desired: std::sync::Mutex<BTreeMap<String, Activation>>,
    /// Activations this edge could not build, by scope.
    failing: std::sync::Mutex<BTreeMap<String, Failing>>,
    /// Every edge's last report (`e.<edge>`), by edge id.
    reports: std::sync::Mutex<BTreeMap<String, EdgeReport>>,
    /// edge-config has not reached the shared bucket yet (JetStream was
    /// away when the edge started).
    needs_seed: std::sync::atomic::AtomicBool,
    /// The config last applied, for seeding once JetStream answers.
    config: std::sync::Mutex<Option<Config>>,
}

/// What an edge in a cluster brings to its control plane.
#[derive(Debug)]
pub struct ClusterJoin {
    pub client: async_nats::Client,
    pub edge_id: String,
    pub region: String,
    pub shutdown: tokio_util::sync::CancellationToken,
    pub tasks: tokio_util::task::TaskTracker,
}

/// How long an edge's start waits for the cluster's deployments before it
/// starts on its own copy (and follows the cluster once JetStream answers).
const FIRST_SYNC: std::time::Duration = std::time::Duration::from_secs(5);

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

impl ControlPlane {
    /// Opens the store, seeds it from `config` and builds the module set
    /// rooms start with.
    ///
    /// In a cluster the shared bucket is the truth: the edge takes what it
    /// holds (waiting at most [`FIRST_SYNC`]), then seeds edge-config there
    /// if its part of the file is new, and follows every change after.
    pub async fn start(
        config: &Config,
        runtime: Arc<WasmRuntime>,
        cluster: Option<ClusterJoin>,
    ) -> Result<(Arc<ControlPlane>, watch::Receiver<Arc<ModuleSet>>), ModuleError> {
        let store = ControlStore::open(&config.data_dir).map_err(|e| ModuleError {
            key: "server.data_dir".into(),
            reason: e.to_string(),
        })?;
        let (tx, rx) = watch::channel(Arc::new(ModuleSet::empty(config.rooms.viewer_cap_per_sec)));
        let plane = Arc::new(ControlPlane {
            store,
            runtime,
            modules: tx,
            settings: RwLock::new(config.control.clone()),
            tenants: RwLock::new(config.tenants.keys().cloned().collect()),
            classes: config.rooms.classes.iter().map(|c| c.name.clone()).collect(),
            default_cap: config.rooms.viewer_cap_per_sec,
            max_module_bytes: config.wasm.max_module_bytes,
            change: tokio::sync::Mutex::new(()),
            link: cluster.as_ref().map(|c| Link {
                edge_id: c.edge_id.clone(),
                region: c.region.clone(),
                shared: tokio::sync::OnceCell::new(),
                desired: std::sync::Mutex::default(),
                failing: std::sync::Mutex::default(),
                reports: std::sync::Mutex::default(),
                needs_seed: std::sync::atomic::AtomicBool::new(true),
                config: std::sync::Mutex::new(None),
            }),
            uploads: tokio::sync::Semaphore::new(UPLOADS_AT_ONCE),
            operator_uploads: tokio::sync::Semaphore::new(UPLOADS_AT_ONCE),
            uploading: std::sync::Mutex::default(),
            compiling: std::sync::Mutex::default(),
        });
        if let Some(c) = cluster {
            // Rooms start on this edge's own copy; the first sync brings
            // what changed in the cluster while it was away.
            let set = plane.build(&[]).await.map_err(|e| ModuleError {
                key: "control".into(),
                reason: e.to_string(),
            })?;
            plane.modules.send_replace(Arc::new(set));
            let (synced_tx, mut synced) = watch::channel(false);
            c.tasks
                .spawn(sync::run(Arc::clone(&plane), c.client, synced_tx, c.shutdown));
            if tokio::time::timeout(FIRST_SYNC, synced.wait_for(|s| *s)).await.is_err() {
                tracing::warn!(
                    "the cluster's control bucket did not answer within {FIRST_SYNC:?}: starting on this edge's own \
                     deployments and edge-config; the cluster's take over once JetStream answers"
                );
            }
        }
        plane.reload(config).await?;
        Ok((plane, rx))
    }

    /// The shared bucket, in a cluster: `Ok(None)` on a lone edge, an
    /// error while JetStream has not answered (changes wait for it, so no
    /// edge changes alone what all run).
    fn shared(&self) -> Result<Option<&Shared>, ControlError> {
        match &self.link {
            None => Ok(None),
            Some(l) => l.shared.get().map(Some).ok_or_else(|| {
                ControlError::Unavailable(
                    "this edge is in a cluster and its control bucket (JetStream) does not answer yet: \
                     changes are made there, so none is made now; retry shortly"
                        .into(),
                )
            }),
        }
    }

    /// Takes a (re)loaded config: operators' keys, quotas and tenants, and
    /// a new deployment for every scope whose part of the file changed.
    /// Returns the new module set's generation.
    pub async fn reload(&self, config: &Config) -> Result<u64, ModuleError> {
        let _one = self.change.lock().await;
        *self.settings.write().unwrap_or_else(|e| e.into_inner()) = config.control.clone();
        *self.tenants.write().unwrap_or_else(|e| e.into_inner()) = config.tenants.keys().cloned().collect();
        // In a cluster edge-config seeds the shared bucket; until JetStream
        // answers, this edge's own store, and the bucket once it does.
        let shared = self.link.as_ref().and_then(|l| {
            *l.config.lock().unwrap_or_else(|e| e.into_inner()) = Some(config.clone());
            l.shared.get()
        });
        let cluster_err = |e: SharedError| ModuleError {
            key: "cluster".into(),
            reason: e.to_string(),
        };
        let seeded = self.seed(config, shared).await?;
        // Several scopes may change at once: they are built together.
        let over: Vec<(Scope, Activation)> = seeded.iter().map(|(s, _, a, _)| (s.clone(), a.clone())).collect();
        let set = self.build(&over).await.map_err(|e| match e {
            BuildError::Module(m) => config_key(m, config),
            BuildError::Store(s) => ModuleError {
                key: "control".into(),
                reason: s.to_string(),
            },
        })?;
        // Only now, with the set built, do the seeded versions count.
        for (scope, spec, activation, entry) in seeded {
            let key = scope.key();
            if let Some(sh) = shared {
                // The file is the operator's word: it wins over a change
                // made meanwhile, as a SIGHUP on a lone edge does.
                sh.put_active(&key, &activation).await.map_err(cluster_err)?;
                sh.put_seed(&key, &spec).await.map_err(cluster_err)?;
            }
            self.store.set_active(&key, &activation).map_err(store_err)?;
            self.store.set_seed(&key, &spec).map_err(store_err)?;
            self.store.audit(entry).map_err(store_err)?;
        }
        let generation = set.generation;
        self.modules.send_replace(Arc::new(set));
        if let (Some(l), Some(sh)) = (&self.link, shared) {
            l.needs_seed.store(false, std::sync::atomic::Ordering::Relaxed);
            self.report(sh).await;
        }
        Ok(generation)
    }

    /// Operators' keys in force.
    pub fn operators(&self) -> Vec<OperatorKey> {
        self.settings
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .operators
            .clone()
    }

    /// The largest module `caller` may upload: the edge's limit for
    /// operators, the tenant's quota for a tenant.
    pub fn max_upload_bytes(&self, caller: &Caller) -> usize {
        match caller.tenant() {
            None => self.max_module_bytes,
            Some(t) => self
                .settings
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .quota_of(t)
                .max_module_bytes
                .min(self.max_module_bytes),
        }
    }

    /// A turn to read and check an upload: one per tenant (or operator) at
    /// a time, refused at once beyond; at most [`UPLOADS_AT_ONCE`] tenants'
    /// and as many operators' at a time, each from its own pool; one that
    /// waits longer than [`UPLOAD_WAIT`] is refused (503).
    pub async fn upload_turn(&self, caller: &Caller) -> Result<UploadTurn<'_>, ControlError> {
        let who = if caller.is_operator() {
            caller.who()
        } else {
            caller.owner()
        };
        let mine = {
            let mut uploading = self.uploading.lock().unwrap_or_else(|e| e.into_inner());
            uploading.insert(who.clone())
        };
        if !mine {
            return Err(ControlError::Quota {
                quota: "uploads_in_flight",
                reason: format!("{who} has an upload under way on this edge; one at a time"),
            });
        }
        let mut turn = UploadTurn {
            plane: self,
            who,
            _permit: None,
        };
        let pool = if caller.is_operator() {
            &self.operator_uploads
        } else {
            &self.uploads
        };
        match tokio::time::timeout(UPLOAD_WAIT, pool.acquire()).await {
            Ok(Ok(p)) => {
                turn._permit = Some(p);
                Ok(turn)
            }
            _ => Err(ControlError::Unavailable(format!(
                "{UPLOADS_AT_ONCE} uploads are being checked on this edge and this one waited {UPLOAD_WAIT:?}; retry"
            ))),
        }
    }

    /// Refuses an upload of `owner` whose compile time for the hour is
    /// spent.
    fn compile_left(&self, owner: &str, per_hour: std::time::Duration) -> Result<(), ControlError> {
        let now = Instant::now();
        let mut all = self.compiling.lock().unwrap_or_else(|e| e.into_inner());
        let Some(bucket) = all.get_mut(owner) else {
            return Ok(());
        };
        *bucket = bucket.refilled(per_hour, now);
        if bucket.left > 0.0 {
            return Ok(());
        }
        let rate = per_hour.as_secs_f64() / 3600.0;
        let wait = (-bucket.left / rate).ceil() + 1.0;
        Err(ControlError::Quota {
            quota: "compile_per_hour",
            reason: format!(
                "{owner}'s uploads spent their {:?} of compiling for the hour (refused ones count too); the next may start in {wait:.0} s",
                per_hour
            ),
        })
    }

    fn charge_compile(&self, owner: &str, per_hour: std::time::Duration, spent: std::time::Duration) {
        let now = Instant::now();
        let mut all = self.compiling.lock().unwrap_or_else(|e| e.into_inner());
        let full = CompileBucket {
            left: per_hour.as_secs_f64(),
            at: now,
        };
        let bucket = all.entry(owner.to_owned()).or_insert(full);
        *bucket = bucket.refilled(per_hour, now);
        bucket.left -= spent.as_secs_f64();
        let tenant = owner.trim_start_matches("tenant:").to_owned();
        metrics::counter!("throng_upload_compile_milliseconds_total", "tenant" => tenant)
            .increment(u64::try_from(spent.as_millis()).unwrap_or(u64::MAX));
    }

    /// The module set rooms run now.
    pub fn current(&self) -> Arc<ModuleSet> {
        Arc::clone(&self.modules.borrow())
    }

    pub fn store(&self) -> &ControlStore {
        &self.store
    }

    fn quota_limits(&self, tenant: &str) -> FilterLimits {
        let s = self.settings.read().unwrap_or_else(|e| e.into_inner());
        let q = s.quota_of(tenant);
        FilterLimits {
            memory_bytes: q.filter_memory_bytes,
            call_budget: q.filter_budget,
        }
    }

    fn knows_tenant(&self, tenant: &str) -> bool {
        self.tenants.read().unwrap_or_else(|e| e.into_inner()).contains(tenant)
    }

    // ---- modules ----

    /// Checks and stores a module. Returns the record and whether it is new
    /// (the same owner uploading the same bytes again gets the first record).
    pub async fn upload(
        &self,
        caller: &Caller,
        up: Upload,
        bytes: Vec<u8>,
    ) -> Result<(ModuleRecord, bool), ControlError> {
        check_label("name", &up.name)?;
        check_label("version", &up.version)?;
        if let Some(t) = caller.tenant()
            && up.world != World::MessageFilter
        {
            return Err(ControlError::Forbidden(format!(
                "tenant `{t}` may upload message-filter modules only; room policies are deployed by operators"
            )));
        }
        let (max_bytes, max_modules, limits, compile_per_hour, max_stored) = match caller.tenant() {
            None => (
                self.max_module_bytes,
                u32::MAX,
                self.runtime.filter_limits(),
                None,
                u64::MAX,
            ),
            Some(t) => {
                let s = self.settings.read().unwrap_or_else(|e| e.into_inner());
                let q = s.quota_of(t);
                (
                    q.max_module_bytes,
                    q.max_modules,
                    FilterLimits {
                        memory_bytes: q.filter_memory_bytes,
                        call_budget: q.filter_budget,
                    },
                    Some(q.compile_per_hour),
                    q.max_stored_bytes,
                )
            }
        };
        let mut checks = Vec::new();
        let started = Instant::now();
        if bytes.len() > max_bytes {
            return Err(ControlError::Refused {
                step: "size",
                reason: format!("module is {} bytes; the limit is {max_bytes}", bytes.len()),
            });
        }
        checks.push(report("size", started));
        let sha256 = ModuleHash::of(&bytes).hex();
        let owner = caller.owner();
        if let Some(existing) = self.store.module(&owner, &sha256)? {
            return Ok((existing, false));
        }
        let mine: Vec<ModuleRecord> = self.store.modules()?.into_iter().filter(|m| m.owner == owner).collect();
        if let Some(other) = mine.iter().find(|m| m.name == up.name && m.version == up.version) {
            return Err(ControlError::Conflict(format!(
                "module `{}` version `{}` exists already with sha256 {}; versions are immutable: upload under a new version",
                up.name, up.version, other.sha256
            )));
        }
        if mine.len() >= max_modules as usize {
            return Err(ControlError::Quota {
                quota: "max_modules",
                reason: format!("the tenant keeps {} modules; the quota is {max_modules}", mine.len()),
            });
        }
        let stored: u64 = mine.iter().map(|m| m.size.saturating_add(m.compiled_size)).sum();
        let over = |more: u64| stored.saturating_add(more) > max_stored;
        if over(bytes.len() as u64) {
            return Err(stored_quota(stored, bytes.len() as u64, None, max_stored));
        }
        if let Some(per_hour) = compile_per_hour {
            self.compile_left(&owner, per_hour)?;
        }
        let params: Vec<(String, String)> = up.params.clone().into_iter().collect();
        let shared = self.shared()?;
        let _one = self.change.lock().await;
        let mut compile_cpu = std::time::Duration::ZERO;
        let checked = self
            .check_module(&bytes, up.world, params, limits, &mut checks, &mut compile_cpu)
            .await;
        if let Some(per_hour) = compile_per_hour {
            self.charge_compile(&owner, per_hour, compile_cpu);
        }
        let compiled_size = self.runtime.compiled_size(&bytes);
        let checked = checked.and_then(|()| {
            if over(bytes.len() as u64 + compiled_size) {
                return Err(stored_quota(
                    stored,
                    bytes.len() as u64,
                    Some(compiled_size),
                    max_stored,
                ));
            }
            Ok(())
        });
        if let Err(e) = checked {
            // Its compiled code went to the disk cache; nobody may run a
            // module that is not stored, so nothing of it stays behind.
            if !self.store.modules()?.iter().any(|m| m.sha256 == sha256) {
                self.runtime.forget_compiled(&bytes);
            }
            return Err(e);
        }
        let record = ModuleRecord {
            sha256: sha256.clone(),
            owner,
            name: up.name,
            version: up.version,
            world: up.world,
            size: bytes.len() as u64,
            uploader: caller.who(),
            uploaded_at_ms: crate::unix_now_ms(),
            params: up.params,
            checks,
            compiled_size,
        };
        if let Some(sh) = shared {
            if let Some(other) = sh
                .claim_label(&record.owner, &record.name, &record.version, &sha256)
                .await?
            {
                return Err(ControlError::Conflict(format!(
                    "module `{}` version `{}` exists already with sha256 {other} (uploaded on another edge); \
                     versions are immutable: upload under a new version",
                    record.name, record.version
                )));
            }
            sh.put_module(&record, &bytes).await?;
        }
        self.store.put_bytes(&sha256, &bytes)?;
        self.store.put_module(&record)?;
        let mut entry = AuditEntry::new(&caller.who(), "module.upload", format!("sha256:{sha256}"));
        entry.tenant = record.tenant().map(str::to_owned);
        entry.to = Some(format!(
            "{} {} ({})",
            record.name,
            record.version,
            record.world.as_str()
        ));
        self.store.audit(entry)?;
        tracing::info!(
            who = %caller.who(),
            module = %sha256,
            name = %record.name,
            version = %record.version,
            world = record.world.as_str(),
            "module stored"
        );
        Ok((record, true))
    }

    /// Compile, world, instantiate, configure, self-test.
    async fn check_module(
        &self,
        bytes: &[u8],
        world: World,
        params: Vec<(String, String)>,
        limits: FilterLimits,
        checks: &mut Vec<CheckReport>,
        compile_cpu: &mut std::time::Duration,
    ) -> Result<(), ControlError> {
        let started = Instant::now();
        // Compiling fills the disk cache too: a deployment or restart that
        // names the module finds it compiled.
        let compiled = {
            let rt = Arc::clone(&self.runtime);
            let bytes = bytes.to_vec();
            let (compiled, cpu) = tokio::task::spawn_blocking(move || {
                // One thread compiles (no parallel compilation): its CPU
                // time is what the upload cost.
                let before = thread_cpu();
                let compiled = match world {
                    World::RoomPolicy => rt.load_policy(&bytes).map(Compiled::Policy),
                    World::MessageFilter => rt.load_filter(&bytes).map(Compiled::Filter),
                };
                (compiled, thread_cpu().saturating_sub(before))
            })
            .await
            .map_err(|e| ControlError::Refused {
                step: "compile",
                reason: e.to_string(),
            })?;
            *compile_cpu = cpu;
            compiled
        };
        let compiled = compiled.map_err(|e| match e {
            WasmError::TooLarge { .. } => ControlError::Refused {
                step: "size",
                reason: e.to_string(),
            },
            WasmError::WrongWorld { .. } => ControlError::Refused {
                step: "world",
                reason: e.to_string(),
            },
            other => ControlError::Refused {
                step: "compile",
                reason: other.to_string(),
            },
        })?;
        checks.push(report("compile_and_world", started));
        let started = Instant::now();
        let checked = match &compiled {
            Compiled::Policy(m) => self.runtime.check_policy(m, params).await,
            Compiled::Filter(m) => self.runtime.check_filter(m, params, limits).await,
        };
        checked.map_err(|f| ControlError::Refused {
            step: f.stage.as_str(),
            reason: f.reason,
        })?;
        checks.push(report("instantiate_configure_self_test", started));
        Ok(())
    }

    /// The modules `caller` may see: all for operators, its own for a tenant.
    pub fn modules(&self, caller: &Caller) -> Result<Vec<ModuleRecord>, ControlError> {
        let owner = caller.owner();
        Ok(self
            .store
            .modules()?
            .into_iter()
            .filter(|m| caller.is_operator() || m.owner == owner)
            .collect())
    }

    /// One module by hash (whole, a unique prefix, or `name@version`), as
    /// `caller` may see it: a record per owner that stored its bytes.
    /// Another tenant's module is not found, never shown.
    pub fn module(&self, caller: &Caller, reference: &str) -> Result<Vec<ModuleRecord>, ControlError> {
        let reference = if reference.starts_with("sha256:") || reference.contains('@') {
            reference.to_owned()
        } else {
            format!("sha256:{reference}")
        };
        let whole = resolve_among(&reference, || self.modules(caller)).map_err(ControlError::NotFound)?;
        let sha256 = whole.trim_start_matches("sha256:");
        let found: Vec<ModuleRecord> = self
            .modules(caller)?
            .into_iter()
            .filter(|m| m.sha256 == sha256)
            .collect();
        if found.is_empty() {
            return Err(ControlError::NotFound(format!(
                "no module sha256:{sha256} that you may see"
            )));
        }
        Ok(found)
    }

    // ---- deployments ----

    fn may_deploy(&self, caller: &Caller, scope: &Scope) -> Result<(), ControlError> {
        match scope {
            Scope::Policies if !caller.is_operator() => Err(ControlError::Forbidden(
                "only operators deploy policies; tenants deploy their own filters (filters/<tenant>)".into(),
            )),
            Scope::Filters(t) if !caller.may_act_for(t) => Err(ControlError::Forbidden(format!(
                "tenant `{}` may not touch tenant `{t}`'s filters",
                caller.tenant().unwrap_or_default()
            ))),
            Scope::Filters(t) if !self.knows_tenant(t) => Err(ControlError::NotFound(format!("no tenant `{t}`"))),
            _ => Ok(()),
        }
    }

    /// A scope's active version and its deployments, newest last.
    pub fn status(&self, caller: &Caller, scope: &Scope) -> Result<ScopeStatus, ControlError> {
        match scope {
            Scope::Policies if !caller.is_operator() => {
                return Err(ControlError::Forbidden("only operators read policy deployments".into()));
            }
            Scope::Filters(t) if !caller.may_act_for(t) => {
                return Err(ControlError::Forbidden(format!(
                    "tenant `{}` may not read tenant `{t}`'s filters",
                    caller.tenant().unwrap_or_default()
                )));
            }
            _ => {}
        }
        let key = scope.key();
        Ok(ScopeStatus {
            active: self.store.active(&key)?,
            versions: self.store.deployments(&key)?,
            scope: key,
        })
    }

    /// Scopes with an active deployment that `caller` may see, in the
    /// order of their keys, the first `limit` after `after`: only those
    /// are read with their versions.
    pub fn scopes(&self, caller: &Caller, after: Option<&str>, limit: usize) -> Result<Vec<ScopeStatus>, ControlError> {
        let mut keys: Vec<String> = self.store.actives()?.into_iter().map(|(key, _)| key).collect();
        keys.sort();
        let mut out = Vec::new();
        for key in keys.into_iter().filter(|k| after.is_none_or(|a| k.as_str() > a)) {
            if out.len() >= limit {
                break;
            }
            let Some(scope) = Scope::parse(&key) else { continue };
            if self.visible(caller, &scope) {
                out.push(self.status(caller, &scope)?);
            }
        }
        Ok(out)
    }

    /// Every scope with an active deployment that `caller` may see, in
    /// short.
    pub fn scope_summaries(&self, caller: &Caller) -> Result<Vec<ScopeSummary>, ControlError> {
        let mut out = Vec::new();
        for (key, active) in self.store.actives()? {
            let Some(scope) = Scope::parse(&key) else { continue };
            if self.visible(caller, &scope) {
                out.push(ScopeSummary {
                    versions: self.store.deployment_count(&key)?,
                    active: Some(active),
                    scope: key,
                });
            }
        }
        Ok(out)
    }

    fn visible(&self, caller: &Caller, scope: &Scope) -> bool {
        match (scope, caller.tenant()) {
            (_, None) => true,
            (Scope::Policies, Some(_)) => false,
            (Scope::Filters(t), Some(me)) => t == me,
        }
    }

    pub fn deployment(&self, caller: &Caller, scope: &Scope, version: u64) -> Result<Deployment, ControlError> {
        if let Scope::Filters(t) = scope
            && !caller.may_act_for(t)
        {
            return Err(ControlError::Forbidden(format!(
                "tenant `{}` may not read tenant `{t}`'s filters",
                caller.tenant().unwrap_or_default()
            )));
        }
        if matches!(scope, Scope::Policies) && !caller.is_operator() {
            return Err(ControlError::Forbidden("only operators read policy deployments".into()));
        }
        self.store
            .deployment(&scope.key(), version)?
            .ok_or_else(|| ControlError::NotFound(format!("no version {version} of {scope}")))
    }

    /// Checks and stores a new version of `scope`; it is not active until
    /// [`Self::activate`]d.
    pub async fn create(
        &self,
        caller: &Caller,
        scope: &Scope,
        spec: Spec,
        note: Option<String>,
    ) -> Result<Deployment, ControlError> {
        self.may_deploy(caller, scope)?;
        if let Some(n) = &note
            && n.len() > 1024
        {
            return Err(ControlError::invalid("note", "longer than 1024 bytes"));
        }
        let shared = self.shared()?;
        let _one = self.change.lock().await;
        if !caller.is_operator() {
            // A tenant's versions are kept for rollback; what piles up
            // unused above the active one is what a flood makes.
            let key = scope.key();
            let active = self.store.active(&key)?.map_or(0, |a| a.version);
            let pending = self.store.last_version(&key)?.saturating_sub(active);
            if pending >= MAX_PENDING_VERSIONS {
                return Err(ControlError::Quota {
                    quota: "pending_versions",
                    reason: format!(
                        "{scope} has {pending} versions above its active one (v{active}) never activated; \
                         activate or roll back before creating more (at most {MAX_PENDING_VERSIONS})"
                    ),
                });
            }
        }
        let spec = self.resolve_spec(scope, spec)?;
        self.check_spec(caller, scope, &spec).await?;
        let d = self.store_version(shared, caller.who(), scope, spec, note).await?;
        let mut entry = AuditEntry::new(&caller.who(), "deployment.create", scope.key());
        entry.tenant = scope.tenant().map(str::to_owned);
        entry.to = Some(format!("v{}", d.version));
        self.store.audit(entry)?;
        Ok(d)
    }

    /// Stores `spec` as the scope's next version. In a cluster the number
    /// is claimed in the shared bucket: when another edge took it first,
    /// its deployment is kept and the next number tried.
    async fn store_version(
        &self,
        shared: Option<&Shared>,
        who: String,
        scope: &Scope,
        spec: Spec,
        note: Option<String>,
    ) -> Result<Deployment, ControlError> {
        let key = scope.key();
        let mut d = Deployment {
            version: self.store.last_version(&key)? + 1,
            scope: key.clone(),
            spec,
            note,
            created_by: who,
            created_at_ms: crate::unix_now_ms(),
        };
        let Some(sh) = shared else {
            self.store.put_deployment(&d)?;
            return Ok(d);
        };
        for _ in 0..32 {
            match sh.claim_version(&d).await {
                Ok(()) => {
                    self.store.put_deployment(&d)?;
                    return Ok(d);
                }
                Err(SharedError::Conflict(_)) => {
                    if let Some(theirs) = sh.deployment(&key, d.version).await? {
                        self.store.put_deployment(&theirs)?;
                    }
                    d.version += 1;
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(ControlError::Conflict(format!(
            "{scope}: 32 version numbers were taken by other edges meanwhile; retry"
        )))
    }

    /// Every module the spec names exists, may be used in this scope, is of
    /// the right world and takes its params; quotas hold.
    async fn check_spec(&self, caller: &Caller, scope: &Scope, spec: &Spec) -> Result<(), ControlError> {
        match (scope, spec) {
            (Scope::Policies, Spec::Policies(rules)) => {
                if rules.len() > 1000 {
                    return Err(ControlError::invalid("policies", "more than 1000 rules"));
                }
                for (i, r) in rules.iter().enumerate() {
                    let field = format!("policies[{i}]");
                    self.check_policy_rule(&field, r).await?;
                }
            }
            (Scope::Filters(tenant), Spec::Filters(chain)) => {
                if !caller.is_operator() {
                    let q = {
                        let s = self.settings.read().unwrap_or_else(|e| e.into_inner());
                        s.quota_of(tenant).max_instances
                    };
                    let wanted = chain.len().saturating_mul(2);
                    if wanted > q as usize {
                        return Err(ControlError::Quota {
                            quota: "max_instances",
                            reason: format!(
                                "a chain of {} filters holds {wanted} instances (each and its warm spare); the quota is {q}",
                                chain.len()
                            ),
                        });
                    }
                }
                let limits = self.quota_limits(tenant);
                for (i, f) in chain.iter().enumerate() {
                    let field = format!("filters[{i}]");
                    self.check_filter_use(&field, tenant, f, limits).await?;
                }
            }
            (Scope::Policies, _) => {
                return Err(ControlError::invalid("filters", "the policies scope takes `policies`"));
            }
            (Scope::Filters(_), _) => {
                return Err(ControlError::invalid("policies", "a filters scope takes `filters`"));
            }
        }
        Ok(())
    }

    async fn check_policy_rule(&self, field: &str, r: &PolicyRule) -> Result<(), ControlError> {
        for (name, value) in [("tenant", &r.tenant), ("rooms", &r.rooms)] {
            if value.is_empty() || value.len() > 256 {
                return Err(ControlError::invalid(
                    format!("{field}.{name}"),
                    "must be 1 to 256 bytes",
                ));
            }
        }
        if let Some(class) = &r.class
            && !self.classes.contains(class)
        {
            return Err(ControlError::invalid(
                format!("{field}.class"),
                format!("no room class `{class}` (classes: {})", self.classes.join(", ")),
            ));
        }
        check_params(&format!("{field}.params"), &r.params)?;
        let params: Vec<(String, String)> = r.params.clone().into_iter().collect();
        if r.module == "native" {
            throng_policy_core::DefaultPolicy::from_params(params.iter().map(|(k, v)| (k.as_str(), v.as_str())))
                .map_err(|e| ControlError::deployment(format!("{field}.params"), e))?;
            return Ok(());
        }
        let bytes = self.bytes_for(&format!("{field}.module"), &r.module, None)?;
        let rt = Arc::clone(&self.runtime);
        let module = tokio::task::spawn_blocking(move || rt.load_policy(&bytes))
            .await
            .map_err(|e| ControlError::deployment(format!("{field}.module"), e.to_string()))?
            .map_err(|e| ControlError::deployment(format!("{field}.module"), e.to_string()))?;
        self.runtime.check_policy(&module, params).await.map_err(|f| {
            ControlError::deployment(format!("{field}.params"), format!("{}: {}", f.stage.as_str(), f.reason))
        })
    }

    async fn check_filter_use(
        &self,
        field: &str,
        tenant: &str,
        f: &FilterUse,
        limits: FilterLimits,
    ) -> Result<(), ControlError> {
        check_params(&format!("{field}.params"), &f.params)?;
        let bytes = self.bytes_for(&format!("{field}.module"), &f.module, Some(tenant))?;
        let rt = Arc::clone(&self.runtime);
        let module = tokio::task::spawn_blocking(move || rt.load_filter(&bytes))
            .await
            .map_err(|e| ControlError::deployment(format!("{field}.module"), e.to_string()))?
            .map_err(|e| ControlError::deployment(format!("{field}.module"), e.to_string()))?;
        let params: Vec<(String, String)> = f.params.clone().into_iter().collect();
        self.runtime.check_filter(&module, params, limits).await.map_err(|e| {
            ControlError::deployment(format!("{field}.params"), format!("{}: {}", e.stage.as_str(), e.reason))
        })
    }

    /// Names every module of `spec` by its whole hash (see
    /// [`Self::resolve_module`]), so a stored version says exactly what
    /// it runs.
    pub fn resolve_spec(&self, scope: &Scope, mut spec: Spec) -> Result<Spec, ControlError> {
        match &mut spec {
            Spec::Policies(rules) => {
                for (i, r) in rules.iter_mut().enumerate() {
                    r.module = self.resolve_module(scope, &format!("policies[{i}].module"), &r.module)?;
                }
            }
            Spec::Filters(chain) => {
                for (i, f) in chain.iter_mut().enumerate() {
                    f.module = self.resolve_module(scope, &format!("filters[{i}].module"), &f.module)?;
                }
            }
        }
        Ok(spec)
    }

    /// A module reference as a deployment of `scope` stores it:
    /// `name@version` or a unique `sha256:` prefix (at least
    /// [`MIN_HASH_PREFIX`] hex digits) of a module the scope may use
    /// becomes `sha256:<the whole hash>`; a whole hash, `native` and
    /// `builtin:<name>` stay as they are (checked with the rest of the
    /// spec). A reference that names no module, or several, is refused
    /// with the candidates.
    pub fn resolve_module(&self, scope: &Scope, field: &str, reference: &str) -> Result<String, ControlError> {
        if reference == "native" || reference.starts_with("builtin:") {
            return Ok(reference.to_owned());
        }
        let mut owners = vec![OPERATOR_OWNER.to_owned()];
        if let Some(t) = scope.tenant() {
            owners.push(tenant_owner(t));
        }
        let usable = || -> Result<Vec<ModuleRecord>, ControlError> {
            Ok(self
                .store
                .modules()?
                .into_iter()
                .filter(|m| owners.contains(&m.owner))
                .collect())
        };
        resolve_among(reference, usable).map_err(|why| ControlError::deployment(field, why))
    }

    /// The bytes of a module reference a scope may use: a built-in, an
    /// operator's module, or (in `tenant`'s filter scope) the tenant's own.
    fn bytes_for(&self, field: &str, reference: &str, tenant: Option<&str>) -> Result<Vec<u8>, ControlError> {
        if let Some(name) = reference.strip_prefix("builtin:") {
            return modules::builtin(name)
                .map(<[u8]>::to_vec)
                .ok_or_else(|| ControlError::deployment(field, format!("no built-in module `{name}`")));
        }
        let Some(hex) = reference.strip_prefix("sha256:") else {
            return Err(ControlError::deployment(
                field,
                format!(
                    "`{}`: expected sha256:<hex> of a stored module or builtin:<name>",
                    crate::untrusted(reference, 80)
                ),
            ));
        };
        let hex = hex.to_ascii_lowercase();
        let mut owners = vec![OPERATOR_OWNER.to_owned()];
        if let Some(t) = tenant {
            owners.push(tenant_owner(t));
        }
        let mut found = false;
        for owner in &owners {
            if self.store.module(owner, &hex)?.is_some() {
                found = true;
                break;
            }
        }
        if !found {
            return Err(ControlError::deployment(
                field,
                format!(
                    "no stored module sha256:{} that this scope may use",
                    crate::untrusted(&hex, 64)
                ),
            ));
        }
        Ok(self.store.bytes(&hex)?)
    }

    /// Puts `version` of `scope` on `percent` of rooms (the rest stay on the
    /// version active now), or on every room at 100. Widening a rollout is
    /// activating the same version with a larger share.
    pub async fn activate(
        &self,
        caller: &Caller,
        scope: &Scope,
        version: u64,
        percent: u8,
    ) -> Result<Activation, ControlError> {
        self.may_deploy(caller, scope)?;
        if percent > 100 {
            return Err(ControlError::invalid("percent", format!("{percent} is over 100")));
        }
        self.shared()?;
        let _one = self.change.lock().await;
        let key = scope.key();
        if self.store.deployment(&key, version)?.is_none() {
            return Err(ControlError::NotFound(format!("no version {version} of {scope}")));
        }
        let current = self.store.active(&key)?;
        let base = if percent == 100 {
            None
        } else {
            let base = match &current {
                Some(a) if a.version == version => a.base,
                Some(a) => Some(a.version),
                None => None,
            };
            if base.is_none() {
                return Err(ControlError::invalid(
                    "percent",
                    format!("{scope} has no other active version to roll out from: activate at 100"),
                ));
            }
            base
        };
        let next = Activation {
            version,
            percent,
            base,
            by: caller.who(),
            at_ms: crate::unix_now_ms(),
        };
        self.apply(caller, scope, current, next, "deployment.activate").await
    }

    /// Returns `scope` to an earlier version on every room: `to`, or the
    /// one before the active one. Only the last `control.history` versions
    /// can be returned to.
    pub async fn rollback(&self, caller: &Caller, scope: &Scope, to: Option<u64>) -> Result<Activation, ControlError> {
        self.may_deploy(caller, scope)?;
        self.shared()?;
        let _one = self.change.lock().await;
        let key = scope.key();
        let current = self
            .store
            .active(&key)?
            .ok_or_else(|| ControlError::NotFound(format!("{scope} has no active deployment to roll back")))?;
        let target = match to {
            Some(v) => v,
            None => match current.base {
                Some(b) => b,
                None => current.version.checked_sub(1).filter(|v| *v > 0).ok_or_else(|| {
                    ControlError::invalid("to", format!("{scope} has no version before v{}", current.version))
                })?,
            },
        };
        let last = self.store.last_version(&key)?;
        let history = u64::from(self.settings.read().unwrap_or_else(|e| e.into_inner()).history);
        if target == 0 || target > last || target + history <= last {
            return Err(ControlError::invalid(
                "to",
                format!(
                    "v{target} is not among the last {history} versions of {scope} (v{}..=v{last})",
                    last.saturating_sub(history) + 1
                ),
            ));
        }
        if self.store.deployment(&key, target)?.is_none() {
            return Err(ControlError::NotFound(format!("no version {target} of {scope}")));
        }
        let next = Activation {
            version: target,
            percent: 100,
            base: None,
            by: caller.who(),
            at_ms: crate::unix_now_ms(),
        };
        self.apply(caller, scope, Some(current), next, "deployment.rollback")
            .await
    }

    /// Builds the set with `next` in force, then (only if that worked)
    /// stores it, audits it and hands it to the rooms.
    async fn apply(
        &self,
        caller: &Caller,
        scope: &Scope,
        current: Option<Activation>,
        next: Activation,
        action: &str,
    ) -> Result<Activation, ControlError> {
        let set = self
            .build(&[(scope.clone(), next.clone())])
            .await
            .map_err(|e| match e {
                BuildError::Module(m) => ControlError::deployment(m.key, m.reason),
                BuildError::Store(s) => ControlError::Store(s),
            })?;
        let key = scope.key();
        if let Some(sh) = self.shared()? {
            // Changed against what this edge saw: if another edge changed
            // the scope meanwhile, this change is refused, not lost.
            let held = sh.active(&key).await?;
            if held.as_ref().map(|v| &v.value) != current.as_ref() {
                return Err(ControlError::Conflict(format!(
                    "{scope} was changed on another edge meanwhile (it is at {}); read it again and retry",
                    held.as_ref().map_or("nothing".into(), |v| describe(&v.value))
                )));
            }
            sh.set_active(&key, &next, held.map(|v| v.revision)).await?;
        }
        self.store.set_active(&key, &next)?;
        let mut entry = AuditEntry::new(&caller.who(), action, key);
        entry.tenant = scope.tenant().map(str::to_owned);
        entry.from = current.as_ref().map(describe);
        entry.to = Some(describe(&next));
        self.store.audit(entry)?;
        tracing::info!(
            who = %caller.who(),
            %scope,
            version = next.version,
            percent = next.percent,
            base = ?next.base,
            generation = set.generation,
            action,
            "deployment in force"
        );
        self.modules.send_replace(Arc::new(set));
        if let Ok(Some(sh)) = self.shared() {
            self.report(sh).await;
        }
        Ok(next)
    }

    /// The module set of the stored activations, with those in `over` in
    /// place of their scopes'.
    async fn build(&self, over: &[(Scope, Activation)]) -> Result<ModuleSet, BuildError> {
        let mut actives: BTreeMap<String, Activation> = self.store.actives()?.into_iter().collect();
        for (scope, a) in over {
            actives.insert(scope.key(), a.clone());
        }
        let mut deployed = Deployed::default();
        for (key, a) in actives {
            let Some(scope) = Scope::parse(&key) else { continue };
            let current = self.store.deployment(&key, a.version)?.ok_or_else(|| ModuleError {
                key: key.clone(),
                reason: format!("active version {} is missing from the store", a.version),
            })?;
            let base = match a.base {
                None => None,
                Some(b) => Some(self.store.deployment(&key, b)?.ok_or_else(|| ModuleError {
                    key: key.clone(),
                    reason: format!("rollout base version {b} is missing from the store"),
                })?),
            };
            match scope {
                Scope::Policies => deployed.policies = Some((a, current, base)),
                Scope::Filters(t) => {
                    // A tenant gone from the config runs no filters.
                    if self.knows_tenant(&t) {
                        deployed.filters.push((t, a, current, base));
                    }
                }
            }
        }
        let previous = self.current();
        let source = Source { plane: self };
        Ok(ModuleSet::build(&deployed, &source, &self.runtime, &previous, self.default_cap).await?)
    }

    // ---- edge-config ----

    /// For every scope whose part of `config` differs from what it seeded
    /// last, stores a new version (modules read from files are checked and
    /// stored like uploads). Returns what to activate once the set builds.
    async fn seed(
        &self,
        config: &Config,
        shared: Option<&Shared>,
    ) -> Result<Vec<(Scope, Spec, Activation, AuditEntry)>, ModuleError> {
        let mut specs = Vec::new();
        let mut rules = Vec::new();
        for rule in &config.policies {
            let (module, params, on_failure) = match &rule.policy {
                PolicyChoice::Native { cap_per_sec } => (
                    "native".to_owned(),
                    BTreeMap::from([("cap_per_sec".to_owned(), cap_per_sec.to_string())]),
                    OnFailure::Open,
                ),
                PolicyChoice::Module(m) => (
                    self.seed_module(&m.key, &m.source, World::RoomPolicy, &m.params)
                        .await?,
                    m.params.iter().cloned().collect(),
                    m.on_failure,
                ),
            };
            rules.push(PolicyRule {
                tenant: rule.tenant.clone(),
                rooms: rule.rooms.clone(),
                class: rule.class.clone(),
                module,
                params,
                on_failure,
            });
        }
        specs.push((Scope::Policies, Spec::Policies(rules)));
        for tenant in config.tenants.keys() {
            let mut chain = Vec::new();
            for m in config.filters.get(tenant).map_or(&[][..], Vec::as_slice) {
                chain.push(FilterUse {
                    module: self
                        .seed_module(&m.key, &m.source, World::MessageFilter, &m.params)
                        .await?,
                    params: m.params.iter().cloned().collect(),
                    on_failure: m.on_failure,
                });
            }
            specs.push((Scope::Filters(tenant.clone()), Spec::Filters(chain)));
        }
        let mut out = Vec::new();
        for (scope, spec) in specs {
            let key = scope.key();
            let cluster_err = |e: SharedError| ModuleError {
                key: "cluster".into(),
                reason: e.to_string(),
            };
            let (seeded, active) = match shared {
                None => (
                    self.store.seed(&key).map_err(store_err)?,
                    self.store.active(&key).map_err(store_err)?,
                ),
                Some(sh) => (
                    sh.seed(&key).await.map_err(cluster_err)?.map(|v| v.value),
                    sh.active(&key).await.map_err(cluster_err)?.map(|v| v.value),
                ),
            };
            let empty =
                matches!(&spec, Spec::Policies(r) if r.is_empty()) || matches!(&spec, Spec::Filters(c) if c.is_empty());
            let unchanged = match &seeded {
                Some(s) => *s == spec,
                // Nothing seeded and nothing to seed: no deployment needed
                // (and one made through the API stays in force).
                None => empty,
            };
            if unchanged {
                continue;
            }
            let d = self
                .store_version(
                    shared,
                    CONFIG_CALLER.into(),
                    &scope,
                    spec.clone(),
                    Some("from edge-config".into()),
                )
                .await
                .map_err(|e| ModuleError {
                    key: key.clone(),
                    reason: e.to_string(),
                })?;
            let activation = Activation {
                version: d.version,
                percent: 100,
                base: None,
                by: CONFIG_CALLER.into(),
                at_ms: crate::unix_now_ms(),
            };
            let mut entry = AuditEntry::new(CONFIG_CALLER, "deployment.activate", key.clone());
            entry.tenant = scope.tenant().map(str::to_owned);
            entry.from = active.as_ref().map(describe);
            entry.to = Some(describe(&activation));
            entry.detail = Some("edge-config seeded or changed".into());
            out.push((scope, spec, activation, entry));
        }
        Ok(out)
    }

    /// A module named in edge-config, as a reference a deployment holds: a
    /// built-in stays by name; a file is checked and stored like an upload.
    async fn seed_module(
        &self,
        key: &str,
        source: &ConfigSource,
        world: World,
        params: &[(String, String)],
    ) -> Result<String, ModuleError> {
        let fail = |reason: String| ModuleError {
            key: key.to_owned(),
            reason,
        };
        let bytes = match source {
            ConfigSource::Builtin(name) => return Ok(format!("builtin:{name}")),
            ConfigSource::Path(path) => {
                std::fs::read(path).map_err(|e| fail(format!("cannot read {}: {e}", path.display())))?
            }
            ConfigSource::Hash(hex) => self.store.bytes(hex).map_err(|e| fail(e.to_string()))?,
        };
        let sha256 = ModuleHash::of(&bytes).hex();
        if self.store.module(OPERATOR_OWNER, &sha256).map_err(store_err)?.is_none() {
            // Checked for compile and world only: the deployment build that
            // follows runs `configure` with the rule's params and names the key.
            let rt = Arc::clone(&self.runtime);
            let b = bytes.clone();
            tokio::task::spawn_blocking(move || match world {
                World::RoomPolicy => rt.load_policy(&b).map(drop),
                World::MessageFilter => rt.load_filter(&b).map(drop),
            })
            .await
            .map_err(|e| fail(e.to_string()))?
            .map_err(|e| fail(e.to_string()))?;
            self.store.put_bytes(&sha256, &bytes).map_err(store_err)?;
            let name = match source {
                ConfigSource::Path(p) => p
                    .file_stem()
                    .map_or("module".into(), |s| s.to_string_lossy().into_owned()),
                _ => format!("sha256-{}", &sha256[..12]),
            };
            let record = ModuleRecord {
                sha256: sha256.clone(),
                owner: OPERATOR_OWNER.into(),
                name: crate::untrusted(&name, 64),
                version: format!("edge-config-{}", &sha256[..12]),
                world,
                size: bytes.len() as u64,
                uploader: CONFIG_CALLER.into(),
                uploaded_at_ms: crate::unix_now_ms(),
                params: params.iter().cloned().collect(),
                checks: Vec::new(),
                compiled_size: self.runtime.compiled_size(&bytes),
            };
            self.store.put_module(&record).map_err(store_err)?;
        }
        Ok(format!("sha256:{sha256}"))
    }

    // ---- what runs where ----

    /// What this edge runs now, as it reports it to the cluster.
    fn own_report(&self) -> EdgeReport {
        let (edge_id, region, failing) = match &self.link {
            Some(l) => (
                l.edge_id.clone(),
                l.region.clone(),
                l.failing.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            ),
            None => ("this-edge".into(), String::new(), BTreeMap::new()),
        };
        EdgeReport {
            edge_id,
            region,
            at_ms: crate::unix_now_ms(),
            generation: self.current().generation,
            running: self.store.actives().unwrap_or_default().into_iter().collect(),
            failing,
        }
    }

    /// Tells the cluster what this edge runs (best effort: the next
    /// change tells it again).
    async fn report(&self, shared: &Shared) {
        if let Err(e) = shared.report(&self.own_report()).await {
            tracing::warn!(error = %e, "cannot tell the cluster what this edge runs");
        }
    }

    /// Which version of each scope every edge runs, against what the
    /// cluster (or, alone, this edge) has activated. A tenant sees only its
    /// own filters' scope.
    ///
    /// In a cluster, from the bucket as this edge last read it (its watch
    /// keeps up): cheap enough for the dashboard's every second.
    pub fn edges(&self, caller: &Caller) -> Result<EdgesView, ControlError> {
        let mine = self.own_report();
        let (desired, reports): (BTreeMap<String, Activation>, Vec<EdgeReport>) = match &self.link {
            None => (mine.running.clone(), vec![mine]),
            Some(l) => {
                let desired = l.desired.lock().unwrap_or_else(|e| e.into_inner()).clone();
                let mut reports = l.reports.lock().unwrap_or_else(|e| e.into_inner()).clone();
                reports.insert(mine.edge_id.clone(), mine);
                (desired, reports.into_values().collect())
            }
        };
        let visible = |scope: &str| match caller.tenant() {
            None => true,
            Some(t) => Scope::parse(scope).is_some_and(|s| s.tenant() == Some(t)),
        };
        let desired: BTreeMap<String, Activation> = desired.into_iter().filter(|(k, _)| visible(k)).collect();
        let edges = reports
            .into_iter()
            .map(|mut r| {
                r.running.retain(|k, _| visible(k));
                r.failing.retain(|k, _| visible(k));
                let in_step = r.failing.is_empty()
                    && desired
                        .iter()
                        .all(|(k, a)| r.running.get(k).is_some_and(|mine| same_version(mine, a)));
                EdgeView {
                    report: r,
                    in_step,
                    live: None,
                }
            })
            .collect();
        Ok(EdgesView { desired, edges })
    }

    // ---- audit ----

    /// Audit entries after `after`, at most `limit`: all for operators, a
    /// tenant's own for a tenant.
    pub fn audit_log(
        &self,
        caller: &Caller,
        after: u64,
        limit: usize,
        only: &AuditFilter,
    ) -> Result<Vec<AuditEntry>, ControlError> {
        let tenant = caller.tenant().map(str::to_owned);
        Ok(self.store.audit_log(after, limit, |e| {
            let mine = match &tenant {
                None => true,
                Some(t) => e.tenant.as_deref() == Some(t.as_str()),
            };
            mine && only.takes(e)
        })?)
    }

    /// Writes an entry for a change made elsewhere (the server API).
    pub fn record(&self, entry: AuditEntry) -> Result<AuditEntry, ControlError> {
        Ok(self.store.audit(entry)?)
    }
}

enum Compiled {
    Policy(#[allow(dead_code)] Arc<crate::wasm::policy::PolicyModule>),
    Filter(#[allow(dead_code)] Arc<crate::wasm::filter::FilterModule>),
}

#[derive(Debug, Error)]
enum BuildError {
    #[error(transparent)]
    Module(#[from] ModuleError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

struct Source<'a> {
    plane: &'a ControlPlane,
}

impl ModuleSource for Source<'_> {
    fn bytes(&self, reference: &str) -> Result<Vec<u8>, String> {
        if let Some(name) = reference.strip_prefix("builtin:") {
            return modules::builtin(name)
                .map(<[u8]>::to_vec)
                .ok_or_else(|| format!("no built-in module `{name}`"));
        }
        match reference.strip_prefix("sha256:") {
            Some(hex) => self.plane.store.bytes(hex).map_err(|e| e.to_string()),
            None => Err(format!("`{reference}` is not a module reference")),
        }
    }

    fn filter_limits(&self, tenant: &str) -> FilterLimits {
        self.plane.quota_limits(tenant)
    }
}

/// A build failure of what edge-config seeded, named by the config key
/// that said it (`policy[0].module`, `tenants.acme.filters[1].module`)
/// rather than the deployment's field.
fn config_key(mut e: ModuleError, config: &Config) -> ModuleError {
    let Some((scope, rest)) = e.key.split_once('@') else {
        return e;
    };
    let index = rest
        .split_once('[')
        .and_then(|(_, r)| r.split_once(']'))
        .and_then(|(n, _)| n.parse::<usize>().ok());
    let Some(i) = index else { return e };
    let key = match Scope::parse(scope) {
        Some(Scope::Policies) => config.policies.get(i).map(|r| match &r.policy {
            PolicyChoice::Module(m) => m.key.clone(),
            PolicyChoice::Native { .. } => format!("policy[{i}].params"),
        }),
        Some(Scope::Filters(t)) => config.filters.get(&t).and_then(|c| c.get(i)).map(|m| m.key.clone()),
        None => None,
    };
    if let Some(key) = key {
        e.key = key;
    }
    e
}

fn describe(a: &Activation) -> String {
    match a.base {
        Some(b) => format!("v{} on {}% of rooms (v{b} on the rest)", a.version, a.percent),
        None => format!("v{}", a.version),
    }
}

/// An upload past its owner's `max_stored_bytes`: `source` more bytes,
/// and `compiled` more in the cache once compiled (none: refused before).
fn stored_quota(stored: u64, source: u64, compiled: Option<u64>, max: u64) -> ControlError {
    let adds = match compiled {
        None => format!("this one's {source} bytes"),
        Some(c) => format!("this one {}: {source} bytes and {c} compiled", source + c),
    };
    ControlError::Quota {
        quota: "max_stored_bytes",
        reason: format!(
            "the tenant's modules take {stored} bytes stored and compiled on this edge; {adds} would pass the quota of {max}"
        ),
    }
}

fn report(step: &str, started: Instant) -> CheckReport {
    CheckReport {
        step: step.into(),
        ms: started.elapsed().as_secs_f64() * 1e3,
    }
}

fn store_err(e: StoreError) -> ModuleError {
    ModuleError {
        key: "control".into(),
        reason: e.to_string(),
    }
}

/// Module names and version labels: 1 to 64 of `A-Z a-z 0-9 . _ - +`.
fn check_label(field: &str, value: &str) -> Result<(), ControlError> {
    if value.is_empty() || value.len() > 64 {
        return Err(ControlError::invalid(field, "must be 1 to 64 characters"));
    }
    if let Some(c) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '+')))
    {
        return Err(ControlError::invalid(
            field,
            format!("has the character {c:?}; allowed are A-Z a-z 0-9 . _ - +"),
        ));
    }
    Ok(())
}

/// Params are small: at most 64 keys of 64 bytes, values of 4 KiB.
fn check_params(field: &str, params: &BTreeMap<String, String>) -> Result<(), ControlError> {
    if params.len() > 64 {
        return Err(ControlError::invalid(field, "more than 64 params"));
    }
    for (k, v) in params {
        if k.is_empty() || k.len() > 64 {
            return Err(ControlError::invalid(
                format!("{field}.{}", crate::untrusted(k, 64)),
                "keys are 1 to 64 bytes",
            ));
        }
        if v.len() > 4096 {
            return Err(ControlError::invalid(
                format!("{field}.{k}"),
                "values are at most 4096 bytes",
            ));
        }
    }
    Ok(())
}

/// `params` with the values of secret-looking keys hidden, for showing.
pub fn redacted(params: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    params
        .iter()
        .map(|(k, v)| {
            let lower = k.to_ascii_lowercase();
            let secret = ["secret", "token", "password", "key", "credential"]
                .iter()
                .any(|s| lower.contains(s));
            (k.clone(), if secret { "<redacted>".into() } else { v.clone() })
        })
        .collect()
}
