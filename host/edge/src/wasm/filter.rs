//! Message-filter modules: one instance per tenant on this edge, shared by
//! the tenant's rooms (a filter may carry a language runtime; it must not
//! multiply by the number of rooms). Calls are serialised on the instance.

use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::Store;

use super::bindings::filter::{MessageFilter, MessageFilterPre};
use super::bindings::{Kind, Message, Verdict};
use super::policy::CallFailure;
use super::{GuestState, ModuleHash, WasmError, WasmRuntime, reason};

/// A compiled message-filter component.
pub struct FilterModule {
    pub(super) hash: ModuleHash,
    pub(super) pre: MessageFilterPre<GuestState>,
}

impl std::fmt::Debug for FilterModule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FilterModule({})", self.hash)
    }
}

impl FilterModule {
    pub fn hash(&self) -> ModuleHash {
        self.hash
    }
}

/// A tenant's instance of a filter module.
pub struct FilterInstance {
    store: Store<GuestState>,
    bindings: MessageFilter,
    /// The fixed part of each call's CPU budget (the tenant's quota).
    call_budget: Duration,
}

/// What one tenant's filter instances may use: its quota, at most the
/// edge's own `[wasm]` limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FilterLimits {
    pub memory_bytes: usize,
    pub call_budget: Duration,
}

impl std::fmt::Debug for FilterInstance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FilterInstance")
            .field("state", self.store.data())
            .finish_non_exhaustive()
    }
}

impl WasmRuntime {
    /// Instantiates `module` for a tenant, calls its `configure` and warms
    /// it up with a one-message batch (a filter carrying a language runtime
    /// may do its real start-up on its first call), all under the
    /// instantiation budget: this runs at load, never on a room's tick.
    pub async fn instantiate_filter(
        &self,
        module: &Arc<FilterModule>,
        label: Arc<str>,
        params: Vec<(String, String)>,
        limits: FilterLimits,
    ) -> Result<FilterInstance, CallFailure> {
        let started = Instant::now();
        let fail = |reason: String| CallFailure {
            reason,
            elapsed: started.elapsed(),
        };
        let memory = limits.memory_bytes.min(self.settings.filter_memory_bytes);
        let mut store = self.store(label, module.hash, params.clone(), memory);
        self.arm_instantiate(&mut store);
        let bindings = module.pre.instantiate_async(&mut store).await.map_err(|e| {
            fail(
                WasmError::Instantiate {
                    hash: module.hash,
                    reason: reason(&e),
                }
                .to_string(),
            )
        })?;
        self.stats
            .instantiations
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut instance = FilterInstance {
            store,
            bindings,
            call_budget: limits.call_budget,
        };
        match instance.bindings.call_configure(&mut instance.store, &params).await {
            Ok(Ok(())) => {}
            Ok(Err(msg)) => return Err(fail(format!("configure refused its params: {msg}"))),
            Err(e) => return Err(fail(format!("configure failed: {}", reason(&e)))),
        }
        let warm_up = [Message {
            sender: "throng-warm-up".into(),
            kind: Kind::Chat,
            body: b"warm-up".to_vec(),
        }];
        match instance.bindings.call_filter(&mut instance.store, &warm_up).await {
            Ok(v) if v.len() == 1 => Ok(instance),
            Ok(v) => Err(fail(format!("warm-up call: {} verdicts for 1 message", v.len()))),
            Err(e) => Err(fail(format!("warm-up call failed: {}", reason(&e)))),
        }
    }

    /// Calls `filter` once for the whole batch under the budget; checks that
    /// there is exactly one verdict per message.
    pub async fn filter(&self, instance: &mut FilterInstance, batch: &[Message]) -> Result<Vec<Verdict>, CallFailure> {
        let started = Instant::now();
        self.arm_with(&mut instance.store, batch.len(), Some(instance.call_budget));
        let verdicts = instance
            .bindings
            .call_filter(&mut instance.store, batch)
            .await
            .map_err(|e| CallFailure {
                reason: reason(&e),
                elapsed: started.elapsed(),
            })?;
        validate(&verdicts, batch.len()).map_err(|reason| CallFailure {
            reason,
            elapsed: started.elapsed(),
        })?;
        Ok(verdicts)
    }
}

/// Checks a filter's answer against the batch it was given: exactly one
/// verdict per message.
pub fn validate(verdicts: &[Verdict], batch: usize) -> Result<(), String> {
    if verdicts.len() != batch {
        return Err(format!("{} verdicts for {batch} messages", verdicts.len()));
    }
    Ok(())
}
