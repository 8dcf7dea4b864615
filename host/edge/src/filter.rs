//! A tenant's message filters as rooms use them.
//!
//! One [`TenantFilter`] per tenant and module on this edge, shared by all of
//! the tenant's rooms; each room calls it once per tick with its whole
//! inbox. Its instance is made, configured and warmed up when the config is
//! loaded ([`TenantFilter::load`]), so a room never waits for a cold one,
//! and its place in the instance pool is kept for it (see
//! [`WasmRuntime::reserve_for_filters`]).
//!
//! A batch the filter cannot judge (trap, budget, wrong number of verdicts,
//! quarantined, or no instance yet after a failure) goes the filter's
//! [`OnFailure`] way: `closed` (the default) rejects every message of it to
//! its sender with `FilterUnavailable`, `open` passes it on unfiltered;
//! both are counted. A filter keeps a second warm instance: after a
//! failure the spare takes over at once (the next batch is judged) and a
//! new spare is made in the background, off the rooms' ticks. After `quarantine_after` failures
//! within `quarantine_window` the filter is quarantined for a cool-down
//! that doubles with each repeat ([`Strikes`]), then gets a fresh instance.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use crate::wasm::bindings::{Message, Verdict};
use crate::wasm::filter::{FilterInstance, FilterLimits, FilterModule};
use crate::wasm::policy::CallFailure;
use crate::wasm::{Failure, Quarantine, Strikes, WasmRuntime};

/// What happens when a module cannot answer (trap, budget, bad answer,
/// quarantine): for a filter, to the batch it could not judge; for a
/// policy, to the tick it could not plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    /// Filters: every message of the batch is rejected with
    /// `FilterUnavailable`. Policies: only host and system messages go out
    /// that tick.
    #[default]
    Closed,
    /// Filters: the batch passes on unfiltered. Policies: the built-in
    /// policy plans the tick.
    Open,
}

impl OnFailure {
    pub fn as_str(self) -> &'static str {
        match self {
            OnFailure::Closed => "closed",
            OnFailure::Open => "open",
        }
    }
}

/// Why a batch went unjudged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Unjudged {
    #[error("the filter failed on this batch")]
    Failed,
    #[error("the filter is quarantined")]
    Quarantined,
    #[error("the filter is starting again after a failure")]
    NotReady,
}

/// What a tenant's filter did on this edge, for the tenant to see.
#[derive(Debug, Default)]
pub struct FilterCalls {
    pub calls: AtomicU64,
    pub messages: AtomicU64,
    /// Messages it rejected (or rewrote beyond the body limit).
    pub rejected: AtomicU64,
    /// Calls that failed (trap, budget, bad answer).
    pub failures: AtomicU64,
    /// Batches it could not judge (failed, quarantined, starting again).
    pub unjudged: AtomicU64,
    pub total_us: AtomicU64,
    pub max_us: AtomicU64,
}

/// A tenant's instance of one filter module.
pub struct TenantFilter {
    runtime: Arc<WasmRuntime>,
    module: Arc<FilterModule>,
    params: Vec<(String, String)>,
    on_failure: OnFailure,
    tenant: Arc<str>,
    limits: FilterLimits,
    calls: FilterCalls,
    state: tokio::sync::Mutex<FilterState>,
    /// A replacement instance is being made.
    warming: AtomicBool,
    /// Where replacements are made: the edge's main runtime, not a room's.
    spawner: tokio::runtime::Handle,
}

struct FilterState {
    instance: Option<FilterInstance>,
    /// Takes over when `instance` fails.
    spare: Option<FilterInstance>,
    strikes: Strikes,
    /// A quarantine is shown in stats and metrics until a batch finds it over.
    shown: bool,
}

impl std::fmt::Debug for TenantFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TenantFilter")
            .field("tenant", &self.tenant)
            .field("module", &self.module.hash())
            .field("on_failure", &self.on_failure)
            .finish_non_exhaustive()
    }
}

impl Drop for TenantFilter {
    fn drop(&mut self) {
        self.runtime.stats().release("filter", &self.tenant, self.module.hash());
    }
}

impl TenantFilter {
    /// Instantiates, configures and warms up the filter for `tenant`. An
    /// error (e.g. `configure` refused its params) means the config that
    /// names it must not be applied. Call it on the edge's main runtime.
    pub async fn load(
        runtime: Arc<WasmRuntime>,
        module: Arc<FilterModule>,
        params: Vec<(String, String)>,
        on_failure: OnFailure,
        tenant: Arc<str>,
        limits: FilterLimits,
    ) -> Result<Arc<Self>, CallFailure> {
        let instance = runtime
            .instantiate_filter(&module, Arc::clone(&tenant), params.clone(), limits)
            .await?;
        let spare = runtime
            .instantiate_filter(&module, Arc::clone(&tenant), params.clone(), limits)
            .await?;
        Ok(Arc::new(Self {
            runtime,
            module,
            params,
            on_failure,
            tenant,
            limits,
            calls: FilterCalls::default(),
            state: tokio::sync::Mutex::new(FilterState {
                instance: Some(instance),
                spare: Some(spare),
                strikes: Strikes::default(),
                shown: false,
            }),
            warming: AtomicBool::new(false),
            spawner: tokio::runtime::Handle::current(),
        }))
    }

    pub fn module(&self) -> &Arc<FilterModule> {
        &self.module
    }

    pub fn params(&self) -> &[(String, String)] {
        &self.params
    }

    pub fn on_failure(&self) -> OnFailure {
        self.on_failure
    }

    pub fn limits(&self) -> FilterLimits {
        self.limits
    }

    pub fn calls(&self) -> &FilterCalls {
        &self.calls
    }

    /// Whether it is quarantined now, and for how much longer.
    pub fn quarantined_for(&self) -> Option<Duration> {
        let state = self.state.try_lock().ok()?;
        state
            .strikes
            .quarantined_until()
            .map(|u| u.saturating_duration_since(std::time::Instant::now()))
    }

    pub fn tenant(&self) -> &str {
        &self.tenant
    }

    /// One verdict per message, or why the batch went unjudged.
    pub async fn run(self: &Arc<Self>, batch: &[Message]) -> Result<Vec<Verdict>, Unjudged> {
        let out = self.judge(batch).await;
        if out.is_err() {
            self.calls.unjudged.fetch_add(1, Ordering::Relaxed);
        }
        out
    }

    async fn judge(self: &Arc<Self>, batch: &[Message]) -> Result<Vec<Verdict>, Unjudged> {
        let mut state = self.state.lock().await;
        if state.strikes.is_quarantined() {
            return Err(Unjudged::Quarantined);
        }
        if std::mem::take(&mut state.shown) {
            self.runtime.stats().release("filter", &self.tenant, self.module.hash());
            tracing::info!(tenant = %self.tenant, module = %self.module.hash(), "filter module quarantine over");
        }
        if state.instance.is_none() {
            state.instance = state.spare.take();
        }
        let Some(instance) = state.instance.as_mut() else {
            // The cool-down is over (or a replacement failed): try again.
            drop(state);
            self.replace_instance(Duration::ZERO);
            return Err(Unjudged::NotReady);
        };
        let started = std::time::Instant::now();
        let judged = self.runtime.filter(instance, batch).await;
        let took = started.elapsed();
        let us = took.as_micros() as u64;
        self.calls.calls.fetch_add(1, Ordering::Relaxed);
        self.calls.messages.fetch_add(batch.len() as u64, Ordering::Relaxed);
        self.calls.total_us.fetch_add(us, Ordering::Relaxed);
        self.calls.max_us.fetch_max(us, Ordering::Relaxed);
        metrics::histogram!(
            "throng_filter_call_seconds",
            "tenant" => self.tenant.to_string(),
            "module" => self.module.hash().short(),
        )
        .record(took.as_secs_f64());
        match judged {
            Ok(v) => Ok(v),
            Err(f) => {
                // A trapped instance may hold broken state: never reuse it.
                state.instance = None;
                let wait = self.fail(&mut state, f);
                drop(state);
                self.replace_instance(wait);
                Err(Unjudged::Failed)
            }
        }
    }

    /// Records a failure; returns how long to wait before making a new
    /// instance (the cool-down, if this failure quarantined the filter).
    fn fail(&self, state: &mut FilterState, f: CallFailure) -> Duration {
        let stats = self.runtime.stats();
        stats.filter_failures.fetch_add(1, Ordering::Relaxed);
        self.calls.failures.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(
            "throng_wasm_filter_failures_total",
            "tenant" => self.tenant.to_string(),
            "module" => self.module.hash().short(),
        )
        .increment(1);
        tracing::warn!(
            tenant = %self.tenant,
            module = %self.module.hash(),
            reason = %f.reason,
            elapsed_us = f.elapsed.as_micros() as u64,
            on_failure = self.on_failure.as_str(),
            "filter module failed; this batch goes unjudged"
        );
        stats.record(Failure {
            label: self.tenant.to_string(),
            module: self.module.hash(),
            reason: f.reason,
            elapsed: f.elapsed,
        });
        let Some(cooldown) = state.strikes.strike(self.runtime.settings()) else {
            return Duration::ZERO;
        };
        stats.quarantine(Quarantine {
            kind: "filter",
            tenant: self.tenant.to_string(),
            label: self.tenant.to_string(),
            module: self.module.hash(),
            until: std::time::Instant::now() + cooldown,
            level: state.strikes.level(),
        });
        state.shown = true;
        tracing::error!(
            tenant = %self.tenant,
            module = %self.module.hash(),
            cooldown_s = cooldown.as_secs_f64(),
            on_failure = self.on_failure.as_str(),
            "filter module quarantined for a cool-down"
        );
        cooldown
    }

    /// Refills the instance and the spare after `wait`, in the background,
    /// unless that is under way already. Two attempts at most; ends early
    /// when the filter is replaced or dropped.
    fn replace_instance(self: &Arc<Self>, wait: Duration) {
        if self.warming.swap(true, Ordering::AcqRel) {
            return;
        }
        let weak: Weak<Self> = Arc::downgrade(self);
        self.spawner.spawn(async move {
            tokio::time::sleep(wait).await;
            for _ in 0..2 {
                let Some(this) = weak.upgrade() else { return };
                let made = this
                    .runtime
                    .instantiate_filter(&this.module, Arc::clone(&this.tenant), this.params.clone(), this.limits)
                    .await;
                let mut state = this.state.lock().await;
                match made {
                    Ok(instance) => {
                        if state.instance.is_none() {
                            state.instance = Some(instance);
                        } else {
                            state.spare = Some(instance);
                        }
                        if state.spare.is_some() {
                            break;
                        }
                    }
                    // Counted like any failure: a filter that cannot start
                    // again is quarantined too. The next batch after the
                    // cool-down tries again.
                    Err(f) => {
                        this.fail(&mut state, f);
                        break;
                    }
                }
            }
            if let Some(this) = weak.upgrade() {
                this.warming.store(false, Ordering::Release);
            }
        });
    }
}
