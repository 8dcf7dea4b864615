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
//! costs a store and an instantiation from the pooling allocator. Every call
//! runs under a budget: wall-clock through epoch ticks (a 1 ms ticker
//! thread; the guest yields to the runtime at each tick and traps once its
//! deadline passes) or fuel. Memory is capped per store.

pub mod bindings;
pub mod filter;
mod guest;
pub mod policy;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use thiserror::Error;
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store, StoreLimitsBuilder};

pub use guest::GuestState;

/// How a call's budget is enforced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Budget {
    /// Wall-clock deadline per call, checked at 1 ms epoch ticks.
    Epoch(Duration),
    /// Fuel units per call (roughly one per Wasm instruction).
    Fuel(u64),
}

/// Runtime settings from edge-config's `[wasm]`.
#[derive(Debug, Clone)]
pub struct WasmSettings {
    pub budget: Budget,
    pub max_module_bytes: usize,
    pub policy_memory_bytes: usize,
    pub filter_memory_bytes: usize,
    /// Instances the pooling allocator reserves room for (rooms + filters).
    pub max_instances: u32,
    /// A module failing this many times within `quarantine_window` is
    /// quarantined for that room (or tenant).
    pub quarantine_after: u32,
    pub quarantine_window: Duration,
}

impl Default for WasmSettings {
    fn default() -> Self {
        Self {
            budget: Budget::Epoch(Duration::from_millis(5)),
            max_module_bytes: 32 << 20,
            policy_memory_bytes: 16 << 20,
            filter_memory_bytes: 256 << 20,
            max_instances: 12_000,
            quarantine_after: 3,
            quarantine_window: Duration::from_secs(60),
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
    recent: Mutex<Vec<Failure>>,
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
                        std::thread::sleep(Duration::from_millis(1));
                        match engine.upgrade() {
                            Some(e) => e.increment_epoch(),
                            None => return,
                        }
                    }
                })
                .map_err(|e| WasmError::Engine(format!("cannot start the epoch ticker: {e}")))?;
        }
        Ok(Arc::new(Self {
            engine,
            policy_linker,
            filter_linker,
            policies: Mutex::new(HashMap::new()),
            filters: Mutex::new(HashMap::new()),
            settings,
            stats: Arc::new(WasmStats::default()),
            ticker_stop,
        }))
    }

    pub fn settings(&self) -> &WasmSettings {
        &self.settings
    }

    pub fn stats(&self) -> &Arc<WasmStats> {
        &self.stats
    }

    fn compile(&self, bytes: &[u8], hash: ModuleHash) -> Result<Component, WasmError> {
        if bytes.len() > self.settings.max_module_bytes {
            return Err(WasmError::TooLarge {
                size: bytes.len(),
                max: self.settings.max_module_bytes,
            });
        }
        let started = Instant::now();
        let component = Component::new(&self.engine, bytes).map_err(|e| WasmError::Invalid {
            hash,
            reason: format!("{e:#}"),
        })?;
        tracing::info!(module = %hash, bytes = bytes.len(), ms = started.elapsed().as_millis() as u64, "compiled module");
        Ok(component)
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
            // At every epoch tick: past the deadline, trap; otherwise yield
            // to the runtime so a busy guest does not hold a worker thread.
            store.epoch_deadline_callback(|ctx| {
                if Instant::now() >= ctx.data().deadline {
                    Ok(wasmtime::UpdateDeadline::Interrupt)
                } else {
                    Ok(wasmtime::UpdateDeadline::Yield(1))
                }
            });
        }
        store
    }

    /// Arms the budget for one call.
    fn arm(&self, store: &mut Store<GuestState>) {
        match self.settings.budget {
            Budget::Epoch(limit) => {
                store.data_mut().deadline = Instant::now() + limit;
                store.set_epoch_deadline(1);
            }
            Budget::Fuel(fuel) => {
                // Cannot fail: fuel is enabled on this engine in fuel mode.
                let _ = store.set_fuel(fuel);
            }
        }
    }
}

/// Failures of one module in one room (or tenant) within the quarantine window.
#[derive(Debug, Default)]
pub struct Strikes {
    times: std::collections::VecDeque<Instant>,
    quarantined: bool,
}

impl Strikes {
    pub fn is_quarantined(&self) -> bool {
        self.quarantined
    }

    /// Records a failure; returns true when this one quarantines the module.
    pub fn strike(&mut self, settings: &WasmSettings) -> bool {
        let now = Instant::now();
        self.times.push_back(now);
        while self
            .times
            .front()
            .is_some_and(|t| now.duration_since(*t) > settings.quarantine_window)
        {
            self.times.pop_front();
        }
        if !self.quarantined && self.times.len() >= settings.quarantine_after as usize {
            self.quarantined = true;
            return true;
        }
        false
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
            wasmtime::Trap::Interrupt => "budget exhausted (deadline)".into(),
            wasmtime::Trap::OutOfFuel => "budget exhausted (fuel)".into(),
            other => format!("trap: {other}"),
        };
    }
    let text = e.to_string();
    text.lines().next().unwrap_or("error").to_owned()
}
