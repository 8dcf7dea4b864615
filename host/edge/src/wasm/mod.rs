//! The Wasm runtime: one engine, compiled modules cached by content hash,
//! an instance per room (policies) or per tenant (filters).
//!
//! # Layout
//!
//! - `bindings`: the one `bindgen!` site (types of `wit/throng.wit`).
//! - `guest`: what a store holds: locked-down WASI, limits, host imports.
//! - [`policy`]: room-policy modules and instances; validates every plan.
//! - [`filter`]: message-filter modules and the per-tenant instance.
//!
//! Components are compiled once ([`WasmRuntime::load_policy`],
//! [`WasmRuntime::load_filter`]) into an `InstancePre`, so a room's instance
//! costs a store and an instantiation from the pooling allocator. Compiled
//! code is also kept on disk (`<data_dir>/cache/`, wasmtime's serialized
//! form keyed by content hash and engine settings), so a restart or reload
//! does not compile again. Every call runs under a budget: CPU time checked
//! at epoch ticks (a 1 ms ticker thread; at each tick the guest is charged
//! the CPU time it ran, traps once its budget is spent, and otherwise
//! yields to the runtime; waiting for a worker is not charged) or fuel. A call
//! gets a fixed part plus an allowance per message of its batch;
//! instantiation (with `configure`) has its own, larger budget, because it
//! happens at load, not on a room's tick. Memory is capped per store.
//! A module that keeps failing is quarantined ([`Strikes`]) for a
//! cool-down that doubles with each repeat, up to a cap.

pub mod bindings;
pub mod check;
pub mod filter;
mod guest;
pub mod policy;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use thiserror::Error;
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store, StoreLimitsBuilder};

pub use guest::GuestState;

/// How often the epoch ticker ticks: the grain of the CPU-time budget.
const EPOCH_TICK: Duration = Duration::from_millis(1);

/// How a call's budget is enforced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Budget {
    /// CPU time per call, checked at 1 ms epoch ticks.
    Epoch(Duration),
    /// Fuel units per call (roughly one per Wasm instruction).
    Fuel(u64),
}

/// Runtime settings from edge-config's `[wasm]`.
#[derive(Debug, Clone)]
pub struct WasmSettings {
    /// The fixed part of every call's budget.
    pub budget: Budget,
    /// Added to a filter call's budget per message of its batch (epoch mode).
    pub budget_per_message: Duration,
    /// Added to a filter call's budget per message of its batch (fuel mode).
    pub fuel_per_message: u64,
    /// Instantiation plus `configure` (and a filter's warm-up call): done at
    /// load, so it may take far longer than a call on a room's tick.
    pub instantiate_budget: Duration,
    /// The same in fuel mode.
    pub instantiate_fuel: u64,
    pub max_module_bytes: usize,
    pub policy_memory_bytes: usize,
    pub filter_memory_bytes: usize,
    /// Instances the pooling allocator reserves room for (rooms + filters).
    pub max_instances: u32,
    /// A module failing this many times within `quarantine_window` is
    /// quarantined for that room (or tenant).
    pub quarantine_after: u32,
    pub quarantine_window: Duration,
    /// The first quarantine lasts this long; each one that follows within
    /// `quarantine_cooldown_max` of the last lasts twice as long as that.
    pub quarantine_cooldown: Duration,
    pub quarantine_cooldown_max: Duration,
    /// Where compiled modules are cached; none: compile at every load.
    pub cache_dir: Option<PathBuf>,
}

impl Default for WasmSettings {
    fn default() -> Self {
        Self {
            budget: Budget::Epoch(Duration::from_millis(5)),
            budget_per_message: Duration::from_micros(100),
            fuel_per_message: 1_000_000,
            instantiate_budget: Duration::from_secs(2),
            instantiate_fuel: 2_000_000_000,
            max_module_bytes: 32 << 20,
            policy_memory_bytes: 16 << 20,
            filter_memory_bytes: 256 << 20,
            max_instances: 12_000,
            quarantine_after: 3,
            quarantine_window: Duration::from_secs(60),
            quarantine_cooldown: Duration::from_secs(10),
            quarantine_cooldown_max: Duration::from_secs(600),
            cache_dir: None,
        }
    }
}

/// Why a module could not be loaded or instantiated.
#[derive(Debug, Error)]
pub enum WasmError {
    #[error("cannot configure the Wasm engine: {0}")]
    Engine(String),
    #[error("module is {size} bytes; the limit is {max}")]
    TooLarge { size: usize, max: usize },
    #[error("module {hash} is not a valid component: {reason}")]
    Invalid { hash: ModuleHash, reason: String },
    #[error("module {hash} does not fit the {world} world: {reason}")]
    WrongWorld {
        hash: ModuleHash,
        world: &'static str,
        reason: String,
    },
    #[error("cannot instantiate module {hash}: {reason}")]
    Instantiate { hash: ModuleHash, reason: String },
    #[error("instance pool: {live} room instances and {reserved} places kept for tenant filters fill all {max}")]
    PoolReserved { live: u32, reserved: u32, max: u32 },
}

/// SHA-256 of a module's bytes: its identity in config, cache and logs.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ModuleHash(pub [u8; 32]);

impl ModuleHash {
    pub fn of(bytes: &[u8]) -> Self {
        Self(Sha256::digest(bytes).into())
    }

    /// The full hex digest, as used in `sha256:<hex>` references.
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The first 12 hex digits, for logs.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..6])
    }
}

impl std::fmt::Display for ModuleHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.short())
    }
}

impl std::fmt::Debug for ModuleHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

/// Counters of guest failures, for tests, stats and logs.
#[derive(Debug, Default)]
pub struct WasmStats {
    pub policy_failures: AtomicU64,
    pub filter_failures: AtomicU64,
    pub quarantines: AtomicU64,
    pub fallback_ticks: AtomicU64,
    pub instantiations: AtomicU64,
    /// Modules compiled (a cache miss, or no cache).
    pub compilations: AtomicU64,
    /// Modules loaded from the disk cache without compiling.
    pub cache_hits: AtomicU64,
    /// Messages of batches a filter could not judge (failed, quarantined or
    /// not ready), whichever way `on_failure` sent them.
    pub filter_unjudged: AtomicU64,
    recent: Mutex<Vec<Failure>>,
    quarantined: Mutex<BTreeMap<(&'static str, String, ModuleHash), Quarantine>>,
}

/// A module quarantined for a tenant (filters) or a room (policies).
#[derive(Debug, Clone)]
pub struct Quarantine {
    /// `filter` or `policy`.
    pub kind: &'static str,
    pub tenant: String,
    /// The tenant (filters) or `tenant/room` (policies).
    pub label: String,
    pub module: ModuleHash,
    pub until: Instant,
    /// Quarantines of this module here in a row (the cool-down doubles).
    pub level: u32,
}

/// One recorded guest failure.
#[derive(Debug, Clone)]
pub struct Failure {
    /// `tenant/room` for policies, the tenant for filters.
    pub label: String,
    pub module: ModuleHash,
    pub reason: String,
    /// How long the failed call ran.
    pub elapsed: Duration,
}

impl WasmStats {
    const KEEP: usize = 256;

    pub(crate) fn record(&self, failure: Failure) {
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        if recent.len() == Self::KEEP {
            recent.remove(0);
        }
        recent.push(failure);
    }

    /// The most recent failures, oldest first.
    pub fn recent_failures(&self) -> Vec<Failure> {
        self.recent.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Counts and shows a new quarantine (per tenant and module in metrics,
    /// per label in [`WasmStats::quarantined`]).
    pub(crate) fn quarantine(&self, q: Quarantine) {
        self.quarantines.fetch_add(1, Ordering::Relaxed);
        let labels = [
            ("kind", q.kind.to_owned()),
            ("tenant", q.tenant.clone()),
            ("module", q.module.short()),
        ];
        metrics::counter!("throng_wasm_quarantines_total", &labels).increment(1);
        metrics::gauge!("throng_wasm_quarantined", &labels).increment(1.0);
        lock(&self.quarantined).insert((q.kind, q.label.clone(), q.module), q);
    }

    /// A quarantine ended (cool-down over, or the module was replaced).
    pub(crate) fn release(&self, kind: &'static str, label: &str, module: ModuleHash) {
        if let Some(q) = lock(&self.quarantined).remove(&(kind, label.to_owned(), module)) {
            let labels = [
                ("kind", kind.to_owned()),
                ("tenant", q.tenant),
                ("module", module.short()),
            ];
            metrics::gauge!("throng_wasm_quarantined", &labels).decrement(1.0);
        }
    }

    /// Quarantines in force now.
    pub fn quarantined(&self) -> Vec<Quarantine> {
        let now = Instant::now();
        lock(&self.quarantined)
            .values()
            .filter(|q| q.until > now)
            .cloned()
            .collect()
    }
}

/// The process's Wasm engine and module cache.
pub struct WasmRuntime {
    engine: Engine,
    policy_linker: Linker<GuestState>,
    filter_linker: Linker<GuestState>,
    policies: Mutex<HashMap<ModuleHash, Weak<policy::PolicyModule>>>,
    filters: Mutex<HashMap<ModuleHash, Weak<filter::FilterModule>>>,
    settings: WasmSettings,
    stats: Arc<WasmStats>,
    ticker_stop: Arc<AtomicBool>,
    /// Identifies this engine's settings in cache keys.
    engine_key: String,
    /// Room policy instances alive.
    live_policies: Arc<AtomicU32>,
    /// Pool places rooms may not take: tenant filters' instances and their
    /// replacements, so rooms exhausting the pool never unseat a filter.
    filter_reserve: AtomicU32,
}

impl std::fmt::Debug for WasmRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WasmRuntime")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Drop for WasmRuntime {
    fn drop(&mut self) {
        self.ticker_stop.store(true, Ordering::Relaxed);
    }
}

impl WasmRuntime {
    pub fn new(settings: WasmSettings) -> Result<Arc<Self>, WasmError> {
        let engine_err = |e: wasmtime::Error| WasmError::Engine(format!("{e:#}"));
        let mut config = Config::new();
        config.wasm_component_model(true);
        // A trap's Wasm backtrace is not worth its cost on the failure path;
        // the failure is logged with room, module and reason instead.
        config.wasm_backtrace_max_frames(None);
        // Compile on the one (blocking) thread that asked, not on a pool of
        // every core: a big module's compile must not starve the threads
        // that run rooms. The disk cache makes this a once-per-module cost.
        config.parallel_compilation(false);
        match settings.budget {
            Budget::Epoch(_) => {
                config.epoch_interruption(true);
            }
            Budget::Fuel(_) => {
                config.consume_fuel(true);
            }
        }
        let max_memory = settings.policy_memory_bytes.max(settings.filter_memory_bytes);
        // Each pooled memory slot reserves `max_memory` of address space (not
        // RAM); 12,000 slots of 256 MiB stay well inside 47 bits.
        config.memory_reservation(max_memory as u64);
        config.memory_guard_size(64 << 10);
        config.memory_reservation_for_growth(0);
        let n = settings.max_instances;
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(n)
            .total_core_instances(n.saturating_mul(4))
            .total_memories(n.saturating_mul(2))
            .total_tables(n.saturating_mul(4))
            // A store keeps its async fiber stack between calls, so every
            // live instance holds one: as many stacks as instances.
            .total_stacks(n)
            .max_memory_size(max_memory)
            .max_memories_per_component(4)
            .max_tables_per_component(16)
            .max_core_instances_per_component(64)
            .max_component_instance_size(1 << 20)
            .max_core_instance_size(1 << 20)
            .table_elements(100_000)
            // Reusing a slot: zero a little memory in place instead of
            // returning it to the kernel and faulting it back in, which
            // was half of an instantiation's cost (page faults, TLB flushes).
            .linear_memory_keep_resident(128 << 10)
            .table_keep_resident(16 << 10)
            .async_stack_keep_resident(64 << 10);
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&config).map_err(engine_err)?;

        let mut policy_linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut policy_linker).map_err(engine_err)?;
        bindings::policy::RoomPolicy::add_to_linker::<GuestState, HasSelf<GuestState>>(&mut policy_linker, |s| s)
            .map_err(engine_err)?;
        let mut filter_linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut filter_linker).map_err(engine_err)?;
        bindings::filter::MessageFilter::add_to_linker::<GuestState, HasSelf<GuestState>>(&mut filter_linker, |s| s)
            .map_err(engine_err)?;

        let ticker_stop = Arc::new(AtomicBool::new(false));
        if matches!(settings.budget, Budget::Epoch(_)) {
            let engine = engine.weak();
            let stop = Arc::clone(&ticker_stop);
            std::thread::Builder::new()
                .name("throng-epoch".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(EPOCH_TICK);
                        match engine.upgrade() {
                            Some(e) => e.increment_epoch(),
                            None => return,
                        }
                    }
                })
                .map_err(|e| WasmError::Engine(format!("cannot start the epoch ticker: {e}")))?;
        }
        let engine_key = {
            let mut h = ShaHasher(Sha256::new());
            std::hash::Hash::hash(&engine.precompile_compatibility_hash(), &mut h);
            hex::encode(&h.0.finalize()[..8])
        };
        Ok(Arc::new(Self {
            engine,
            policy_linker,
            filter_linker,
            policies: Mutex::new(HashMap::new()),
            filters: Mutex::new(HashMap::new()),
            settings,
            stats: Arc::new(WasmStats::default()),
            ticker_stop,
            engine_key,
            live_policies: Arc::new(AtomicU32::new(0)),
            filter_reserve: AtomicU32::new(0),
        }))
    }

    /// Keeps `places` of the instance pool for tenant filters.
    pub fn reserve_for_filters(&self, places: u32) {
        self.filter_reserve.store(places, Ordering::Relaxed);
    }

    /// Takes a pool place for a room's policy instance, unless the rest of
    /// the pool is kept for filters.
    fn take_policy_place(&self) -> Result<PolicyPlace, WasmError> {
        let reserved = self.filter_reserve.load(Ordering::Relaxed);
        let max = self.settings.max_instances;
        let live = self.live_policies.fetch_add(1, Ordering::Relaxed);
        let place = PolicyPlace(Arc::clone(&self.live_policies));
        if live.saturating_add(reserved) >= max {
            return Err(WasmError::PoolReserved { live, reserved, max });
        }
        Ok(place)
    }

    pub fn settings(&self) -> &WasmSettings {
        &self.settings
    }

    pub fn stats(&self) -> &Arc<WasmStats> {
        &self.stats
    }

    /// Where the compiled code of the module of `hash` is cached, if
    /// anywhere.
    fn cache_path(&self, hash: ModuleHash) -> Option<PathBuf> {
        self.settings
            .cache_dir
            .as_ref()
            .map(|dir| dir.join(format!("{}-{}.cwasm", hash.hex(), self.engine_key)))
    }

    /// Bytes of the module's compiled code in the disk cache (0 for none).
    pub fn compiled_size(&self, bytes: &[u8]) -> u64 {
        self.cache_path(ModuleHash::of(bytes))
            .and_then(|path| std::fs::metadata(path).ok())
            .map_or(0, |m| m.len())
    }

    /// Removes the module's compiled code from the disk cache (a module
    /// refused at upload): returns the bytes freed.
    pub fn forget_compiled(&self, bytes: &[u8]) -> u64 {
        let Some(path) = self.cache_path(ModuleHash::of(bytes)) else {
            return 0;
        };
        let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        match std::fs::remove_file(&path) {
            Ok(()) => {
                metrics::counter!("throng_wasm_cache_removed_bytes_total").increment(size);
                size
            }
            Err(_) => 0,
        }
    }

    fn compile(&self, bytes: &[u8], hash: ModuleHash) -> Result<Component, WasmError> {
        if bytes.len() > self.settings.max_module_bytes {
            return Err(WasmError::TooLarge {
                size: bytes.len(),
                max: self.settings.max_module_bytes,
            });
        }
        let cached = self.cache_path(hash);
        if let Some(path) = &cached {
            let started = Instant::now();
            match self.read_cached(path) {
                Ok(Some(component)) => {
                    self.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(
                        module = %hash,
                        ms = started.elapsed().as_millis() as u64,
                        "loaded compiled module from the disk cache"
                    );
                    return Ok(component);
                }
                Ok(None) => {}
                Err(reason) => {
                    tracing::warn!(module = %hash, path = %path.display(), %reason, "ignoring a bad cache entry");
                    let _ = std::fs::remove_file(path);
                }
            }
        }
        if !bytes.starts_with(b"\0asm") {
            let head: Vec<String> = bytes.iter().take(4).map(|b| format!("{b:02x}")).collect();
            return Err(WasmError::Invalid {
                hash,
                reason: format!(
                    "not a WebAssembly file: it starts with {} where Wasm starts with 00 61 73 6d (\\0asm)",
                    if head.is_empty() {
                        "nothing".to_owned()
                    } else {
                        head.join(" ")
                    }
                ),
            });
        }
        let started = Instant::now();
        let component = Component::new(&self.engine, bytes).map_err(|e| WasmError::Invalid {
            hash,
            // wasmtime's reasons may hold a pretty-printed list of bytes:
            // one line reads better in an error.
            reason: format!("{e:#}").split_whitespace().collect::<Vec<_>>().join(" "),
        })?;
        self.stats.compilations.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("throng_wasm_compilations_total").increment(1);
        tracing::info!(module = %hash, bytes = bytes.len(), ms = started.elapsed().as_millis() as u64, "compiled module");
        if let Some(path) = &cached
            && let Err(e) = write_cached(&component, path)
        {
            tracing::warn!(module = %hash, path = %path.display(), error = %e, "cannot cache the compiled module");
        }
        Ok(component)
    }

    /// A cache entry is the SHA-256 of the serialized component, then the
    /// component as [`Component::serialize`] wrote it.
    #[allow(unsafe_code)]
    fn read_cached(&self, path: &std::path::Path) -> Result<Option<Component>, String> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.to_string()),
        };
        let (sum, serialized) = bytes.split_at_checked(32).ok_or("shorter than its checksum")?;
        if Sha256::digest(serialized).as_slice() != sum {
            return Err("checksum mismatch".into());
        }
        // SAFETY: `deserialize` trusts its input to be wasmtime's own output.
        // This file is: the cache dir is the edge's own (`<data_dir>/cache`),
        // entries are written only by `write_cached` from `serialize`, named
        // by module hash and engine compatibility hash, and the checksum
        // above refuses a torn or altered entry; wasmtime itself also
        // refuses an entry from another version or engine configuration.
        let component = unsafe { Component::deserialize(&self.engine, serialized) }.map_err(|e| format!("{e:#}"))?;
        Ok(Some(component))
    }

    /// Compiles a room-policy component, or returns the cached one with the
    /// same content hash. Blocking (compilation): call it off the async runtime.
    pub fn load_policy(&self, bytes: &[u8]) -> Result<Arc<policy::PolicyModule>, WasmError> {
        let hash = ModuleHash::of(bytes);
        if let Some(m) = lock(&self.policies).get(&hash).and_then(Weak::upgrade) {
            return Ok(m);
        }
        let component = self.compile(bytes, hash)?;
        let pre = self
            .policy_linker
            .instantiate_pre(&component)
            .map_err(|e| WasmError::WrongWorld {
                hash,
                world: "room-policy",
                reason: format!("{e:#}"),
            })?;
        let pre = bindings::policy::RoomPolicyPre::new(pre).map_err(|e| WasmError::WrongWorld {
            hash,
            world: "room-policy",
            reason: format!("{e:#}"),
        })?;
        let module = Arc::new(policy::PolicyModule { hash, pre });
        lock(&self.policies).insert(hash, Arc::downgrade(&module));
        Ok(module)
    }

    /// Compiles a message-filter component, or returns the cached one.
    pub fn load_filter(&self, bytes: &[u8]) -> Result<Arc<filter::FilterModule>, WasmError> {
        let hash = ModuleHash::of(bytes);
        if let Some(m) = lock(&self.filters).get(&hash).and_then(Weak::upgrade) {
            return Ok(m);
        }
        let component = self.compile(bytes, hash)?;
        let pre = self
            .filter_linker
            .instantiate_pre(&component)
            .map_err(|e| WasmError::WrongWorld {
                hash,
                world: "message-filter",
                reason: format!("{e:#}"),
            })?;
        let pre = bindings::filter::MessageFilterPre::new(pre).map_err(|e| WasmError::WrongWorld {
            hash,
            world: "message-filter",
            reason: format!("{e:#}"),
        })?;
        let module = Arc::new(filter::FilterModule { hash, pre });
        lock(&self.filters).insert(hash, Arc::downgrade(&module));
        Ok(module)
    }

    /// The limits of filters no quota narrows: the edge's own.
    pub fn filter_limits(&self) -> filter::FilterLimits {
        filter::FilterLimits {
            memory_bytes: self.settings.filter_memory_bytes,
            call_budget: match self.settings.budget {
                Budget::Epoch(d) => d,
                Budget::Fuel(_) => Duration::ZERO,
            },
        }
    }

    /// A fresh store for one instance, with its memory limit and budget hook.
    fn store(
        &self,
        label: Arc<str>,
        module: ModuleHash,
        params: Vec<(String, String)>,
        memory: usize,
    ) -> Store<GuestState> {
        let limits = StoreLimitsBuilder::new()
            .memory_size(memory)
            .table_elements(100_000)
            .instances(64)
            .tables(16)
            .memories(4)
            .trap_on_grow_failure(true)
            .build();
        let mut store = Store::new(
            &self.engine,
            GuestState::new(label, Arc::from(module.short().as_str()), params, limits),
        );
        store.limiter(|s| &mut s.limits);
        if matches!(self.settings.budget, Budget::Epoch(_)) {
            // At every epoch tick: budget spent, trap; otherwise yield to
            // the runtime so a busy guest does not hold a worker thread.
            store.epoch_deadline_callback(|mut ctx| {
                let budget = &mut ctx.data_mut().budget;
                if budget.charge(EPOCH_TICK) {
                    Ok(wasmtime::UpdateDeadline::Interrupt)
                } else {
                    Ok(wasmtime::UpdateDeadline::YieldCustom(1, budget.yield_now()))
                }
            });
        }
        store
    }

    /// Arms the budget for one call on a batch of `messages`: the fixed
    /// part plus the per-message allowance.
    fn arm(&self, store: &mut Store<GuestState>, messages: usize) {
        self.arm_with(store, messages, None);
    }

    /// [`Self::arm`] with the fixed part of a CPU budget given (a tenant's
    /// quota) instead of the edge's; fuel mode keeps the edge's fuel.
    fn arm_with(&self, store: &mut Store<GuestState>, messages: usize, cpu: Option<Duration>) {
        let n = u32::try_from(messages).unwrap_or(u32::MAX);
        match self.settings.budget {
            Budget::Epoch(fixed) => {
                let fixed = cpu.unwrap_or(fixed);
                let extra = self.settings.budget_per_message.saturating_mul(n);
                self.arm_cpu(store, fixed.saturating_add(extra));
            }
            Budget::Fuel(fixed) => {
                let extra = self.settings.fuel_per_message.saturating_mul(u64::from(n));
                // Cannot fail: fuel is enabled on this engine in fuel mode.
                let _ = store.set_fuel(fixed.saturating_add(extra));
            }
        }
    }

    /// Arms the instantiation budget (instantiate, `configure`, warm-up).
    fn arm_instantiate(&self, store: &mut Store<GuestState>) {
        match self.settings.budget {
            Budget::Epoch(_) => self.arm_cpu(store, self.settings.instantiate_budget),
            Budget::Fuel(_) => {
                let _ = store.set_fuel(self.settings.instantiate_fuel);
            }
        }
    }

    fn arm_cpu(&self, store: &mut Store<GuestState>, limit: Duration) {
        store.data_mut().budget.arm(limit);
        store.set_epoch_deadline(1);
    }
}

/// A policy instance's place in the pool count; given back on drop.
#[derive(Debug)]
pub(crate) struct PolicyPlace(Arc<AtomicU32>);

impl Drop for PolicyPlace {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Feeds `Hash` output into SHA-256, for a cache key that does not depend
/// on std's hasher.
struct ShaHasher(Sha256);

impl std::hash::Hasher for ShaHasher {
    fn finish(&self) -> u64 {
        let digest = self.0.clone().finalize();
        u64::from_le_bytes(digest[..8].try_into().unwrap_or_default())
    }

    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
}

/// Writes a cache entry whole or not at all (a temporary file, renamed).
fn write_cached(component: &Component, path: &std::path::Path) -> Result<(), String> {
    let serialized = component.serialize().map_err(|e| format!("{e:#}"))?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let mut bytes = Vec::with_capacity(32 + serialized.len());
    bytes.extend_from_slice(&Sha256::digest(&serialized));
    bytes.extend_from_slice(&serialized);
    std::fs::write(&tmp, &bytes).map_err(|e| e.to_string())?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        e.to_string()
    })
}

/// Failures of one module in one room (or tenant): within the quarantine
/// window, `quarantine_after` of them quarantine the module for a
/// cool-down, which doubles for each quarantine that follows the last
/// within `quarantine_cooldown_max`, up to that cap. When the cool-down is
/// over the module gets a fresh start.
#[derive(Debug, Default)]
pub struct Strikes {
    times: std::collections::VecDeque<Instant>,
    until: Option<Instant>,
    /// Quarantines in a row.
    level: u32,
}

impl Strikes {
    pub fn is_quarantined(&self) -> bool {
        self.until.is_some_and(|u| Instant::now() < u)
    }

    /// When the current quarantine ends, if one is in force.
    pub fn quarantined_until(&self) -> Option<Instant> {
        self.until.filter(|u| Instant::now() < *u)
    }

    /// Quarantines in a row so far.
    pub fn level(&self) -> u32 {
        self.level
    }

    /// Records a failure; returns the cool-down when this one quarantines
    /// the module.
    pub fn strike(&mut self, settings: &WasmSettings) -> Option<Duration> {
        let now = Instant::now();
        if let Some(until) = self.until {
            if now < until {
                return None;
            }
            // The last quarantine is over; a long quiet since resets the
            // doubling.
            self.until = None;
            self.times.clear();
            if now.duration_since(until) > settings.quarantine_cooldown_max {
                self.level = 0;
            }
        }
        self.times.push_back(now);
        while self
            .times
            .front()
            .is_some_and(|t| now.duration_since(*t) > settings.quarantine_window)
        {
            self.times.pop_front();
        }
        if self.times.len() < settings.quarantine_after as usize {
            return None;
        }
        let cooldown = settings
            .quarantine_cooldown
            .saturating_mul(1u32 << self.level.min(20))
            .min(settings.quarantine_cooldown_max);
        self.level = self.level.saturating_add(1);
        self.until = Some(now + cooldown);
        self.times.clear();
        Some(cooldown)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Turns a trap or error from a guest call into a short reason, without
/// formatting a backtrace.
fn reason(e: &wasmtime::Error) -> String {
    if let Some(trap) = e.downcast_ref::<wasmtime::Trap>() {
        return match trap {
            wasmtime::Trap::Interrupt => "budget exhausted (CPU time)".into(),
            wasmtime::Trap::OutOfFuel => "budget exhausted (fuel)".into(),
            other => format!("trap: {other}"),
        };
    }
    let text = e.to_string();
    text.lines().next().unwrap_or("error").to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quarantine_cool_downs_double_up_to_the_cap_and_end() {
        let settings = WasmSettings {
            quarantine_after: 2,
            quarantine_cooldown: Duration::from_millis(10),
            quarantine_cooldown_max: Duration::from_millis(35),
            ..WasmSettings::default()
        };
        let mut strikes = Strikes::default();
        let mut cooldowns = Vec::new();
        for _ in 0..4 {
            assert_eq!(strikes.strike(&settings), None, "one failure is not enough");
            let cooldown = strikes.strike(&settings).expect("the second quarantines");
            assert!(strikes.is_quarantined());
            cooldowns.push(cooldown);
            // Bounded: the cool-down is at most 35 ms.
            let deadline = Instant::now() + Duration::from_secs(1);
            while strikes.is_quarantined() {
                assert!(Instant::now() < deadline);
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        let ms: Vec<u128> = cooldowns.iter().map(Duration::as_millis).collect();
        assert_eq!(ms, [10, 20, 35, 35]);
        assert_eq!(strikes.level(), 4);
    }
}
