//! A tenant's message filters as rooms use them.
//!
//! One [`TenantFilter`] per tenant and module on this edge, shared by all of
//! the tenant's rooms; each room calls it once per tick with its whole
//! inbox. A filter that fails (trap, budget, wrong number of verdicts)
//! **fails open** for that batch: the messages go on unfiltered, the failure
//! is counted and logged with tenant and module hash, and after
//! `quarantine_after` failures within `quarantine_window` the filter is
//! quarantined (skipped) until the next module change. Failing open keeps
//! a broken filter from silencing every room of the tenant; a tenant that
//! needs fail-closed moderation should say so and get a config switch.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::wasm::bindings::{Message, Verdict};
use crate::wasm::filter::{FilterInstance, FilterModule};
use crate::wasm::policy::CallFailure;
use crate::wasm::{Failure, Strikes, WasmRuntime};

/// A tenant's instance of one filter module.
pub struct TenantFilter {
    runtime: Arc<WasmRuntime>,
    module: Arc<FilterModule>,
    params: Vec<(String, String)>,
    tenant: Arc<str>,
    state: tokio::sync::Mutex<FilterState>,
}

struct FilterState {
    instance: Option<FilterInstance>,
    strikes: Strikes,
}

impl std::fmt::Debug for TenantFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TenantFilter")
            .field("tenant", &self.tenant)
            .field("module", &self.module.hash())
            .finish_non_exhaustive()
    }
}

impl TenantFilter {
    pub fn new(
        runtime: Arc<WasmRuntime>,
        module: Arc<FilterModule>,
        params: Vec<(String, String)>,
        tenant: Arc<str>,
    ) -> Self {
        Self {
            runtime,
            module,
            params,
            tenant,
            state: tokio::sync::Mutex::new(FilterState {
                instance: None,
                strikes: Strikes::default(),
            }),
        }
    }

    pub fn module(&self) -> &Arc<FilterModule> {
        &self.module
    }

    pub fn params(&self) -> &[(String, String)] {
        &self.params
    }

    /// One verdict per message, or `None` when the filter is unavailable
    /// (failed this time, or quarantined): the batch then passes unfiltered.
    pub async fn run(&self, batch: &[Message]) -> Option<Vec<Verdict>> {
        let mut state = self.state.lock().await;
        if state.strikes.is_quarantined() {
            return None;
        }
        if state.instance.is_none() {
            match self
                .runtime
                .instantiate_filter(&self.module, Arc::clone(&self.tenant), self.params.clone())
                .await
            {
                Ok(i) => state.instance = Some(i),
                Err(f) => {
                    self.fail(&mut state, f);
                    return None;
                }
            }
        }
        let instance = state.instance.as_mut()?;
        match self.runtime.filter(instance, batch).await {
            Ok(v) => Some(v),
            Err(f) => {
                self.fail(&mut state, f);
                None
            }
        }
    }

    fn fail(&self, state: &mut FilterState, f: CallFailure) {
        let stats = self.runtime.stats();
        stats.filter_failures.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("throng_wasm_filter_failures_total").increment(1);
        tracing::warn!(
            tenant = %self.tenant,
            module = %self.module.hash(),
            reason = %f.reason,
            elapsed_us = f.elapsed.as_micros() as u64,
            "filter module failed; this batch passes unfiltered"
        );
        stats.record(Failure {
            label: self.tenant.to_string(),
            module: self.module.hash(),
            reason: f.reason,
            elapsed: f.elapsed,
        });
        state.instance = None;
        if state.strikes.strike(self.runtime.settings()) {
            stats.quarantines.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("throng_wasm_quarantines_total").increment(1);
            tracing::error!(tenant = %self.tenant, module = %self.module.hash(), "filter module quarantined");
        }
    }
}
