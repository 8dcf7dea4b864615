//! The per-room decision of what goes out each tick.
//!
//! A room holds a [`RoomPolicy`]: the built-in [`NativePolicy`] (the
//! default algorithm of `throng-policy-core`, run natively), or a
//! [`WasmPolicy`] (an operator's module instantiated for this room). Both
//! see message metadata only ([`InboundMeta`]) and return a [`Plan`].
//!
//! A Wasm policy that traps, runs out of budget or returns an invalid plan
//! is replaced *for that tick* by its native fallback, so viewers never miss
//! a tick; the failure is counted and logged with room and module hash, and
//! after `quarantine_after` failures within `quarantine_window` the module
//! is quarantined for the room: native for a cool-down that doubles with
//! each repeat (`quarantine_cooldown`, capped at `quarantine_cooldown_max`),
//! then a fresh instance.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use throng_policy_core::{Columns, DefaultPolicy, NO_GIFT};
use throng_wire::{Counters, GiftCount, Kind};

use crate::filter::OnFailure;
use crate::wasm::bindings::RoomStats;
use crate::wasm::policy::{CallFailure, PolicyInstance, PolicyModule};
use crate::wasm::{Failure, Quarantine, Strikes, WasmRuntime};

/// What a policy knows of a tick's inbound messages (the WIT `inbound`
/// record: parallel lists).
pub use crate::wasm::bindings::Inbound as InboundBatch;

impl InboundBatch {
    pub fn with_capacity(n: usize) -> Self {
        Self {
            senders: Vec::with_capacity(n),
            kinds: Vec::with_capacity(n),
            sizes: Vec::with_capacity(n),
            received_ms: Vec::with_capacity(n),
            gifts: Vec::with_capacity(n),
            gift_names: Vec::new(),
        }
    }

    /// Adds one message; `gift` is the gift's name for kind gift.
    pub fn push(&mut self, sender: u64, kind: Kind, size: u32, received_ms: u64, gift: Option<&str>) {
        self.senders.push(sender);
        self.kinds.push(core_kind(kind).code());
        self.sizes.push(size);
        self.received_ms.push(received_ms);
        let gift = match gift {
            None => NO_GIFT,
            Some(name) => match self.gift_names.iter().position(|n| n == name) {
                Some(i) => i as u32,
                None => {
                    self.gift_names.push(name.to_owned());
                    (self.gift_names.len() - 1) as u32
                }
            },
        };
        self.gifts.push(gift);
    }

    pub fn len(&self) -> usize {
        self.senders.len()
    }

    pub fn is_empty(&self) -> bool {
        self.senders.is_empty()
    }

    fn columns(&self) -> Columns<'_> {
        Columns {
            senders: &self.senders,
            kinds: &self.kinds,
            sizes: &self.sizes,
            received_ms: &self.received_ms,
            gifts: &self.gifts,
            gift_names: &self.gift_names,
        }
    }
}

/// A policy's decision for one tick, checked and ready for the room.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Indices into the tick's inbound messages, each at most once.
    pub deliver: Vec<u32>,
    pub counters: Counters,
    /// Indices (among `deliver`) to pin.
    pub pinned: Vec<u32>,
}

fn core_kind(kind: Kind) -> throng_policy_core::Kind {
    match kind {
        Kind::Chat => throng_policy_core::Kind::Chat,
        Kind::Like => throng_policy_core::Kind::Like,
        Kind::Gift => throng_policy_core::Kind::Gift,
        Kind::Host => throng_policy_core::Kind::Host,
        Kind::System => throng_policy_core::Kind::System,
    }
}

/// The WIT `kind` of a wire kind (for filter batches).
pub fn wit_kind(kind: Kind) -> crate::wasm::bindings::Kind {
    use crate::wasm::bindings::Kind as W;
    match kind {
        Kind::Chat => W::Chat,
        Kind::Like => W::Like,
        Kind::Gift => W::Gift,
        Kind::Host => W::Host,
        Kind::System => W::System,
    }
}

/// The built-in policy.
#[derive(Debug, Clone)]
pub struct NativePolicy {
    inner: DefaultPolicy,
}

impl NativePolicy {
    /// `cap_per_sec == 0` delivers everything.
    pub fn new(cap_per_sec: u32) -> Self {
        Self {
            inner: DefaultPolicy::new(cap_per_sec),
        }
    }

    pub fn cap_per_sec(&self) -> u32 {
        self.inner.cap_per_sec()
    }

    pub fn plan_tick(&mut self, stats: &RoomStats, inbound: &InboundBatch) -> Plan {
        let metas = inbound.columns().metas();
        let p = self.inner.plan(stats.elapsed_ms, stats.tick_ms, &metas);
        Plan {
            deliver: p.deliver,
            counters: Counters {
                likes: p.likes,
                gifts: p
                    .gifts
                    .into_iter()
                    .map(|(gift, count)| GiftCount { gift, count })
                    .collect(),
            },
            pinned: p.pinned,
        }
    }
}

/// An operator's Wasm policy for one room, with its native fallback.
pub struct WasmPolicy {
    runtime: Arc<WasmRuntime>,
    module: Arc<PolicyModule>,
    params: Vec<(String, String)>,
    label: Arc<str>,
    instance: Option<PolicyInstance>,
    fallback: NativePolicy,
    /// Room time since the fallback last ran: its clock must not stand
    /// still while the module decides.
    fallback_elapsed: u32,
    strikes: Strikes,
    /// Open: the fallback plans a tick the module could not. Closed: only
    /// host and system messages go out that tick.
    on_failure: OnFailure,
    /// Ticks the module did not plan (failed, or quarantined).
    failed_ticks: u64,
}

impl std::fmt::Debug for WasmPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WasmPolicy")
            .field("module", &self.module.hash())
            .field("label", &self.label)
            .field("quarantined", &self.strikes.is_quarantined())
            .finish_non_exhaustive()
    }
}

impl Drop for WasmPolicy {
    fn drop(&mut self) {
        // A retired or swapped room's quarantine is over with it.
        self.runtime.stats().release("policy", &self.label, self.module.hash());
    }
}

impl WasmPolicy {
    /// Instantiates the module for the room. A failure here is a failure
    /// like any other: the room runs on the fallback and retries next tick.
    pub async fn new(
        runtime: Arc<WasmRuntime>,
        module: Arc<PolicyModule>,
        params: Vec<(String, String)>,
        label: Arc<str>,
        fallback: NativePolicy,
        on_failure: OnFailure,
    ) -> Self {
        let mut p = Self {
            runtime,
            module,
            params,
            label,
            instance: None,
            fallback,
            fallback_elapsed: 0,
            strikes: Strikes::default(),
            on_failure,
            failed_ticks: 0,
        };
        p.ensure_instance().await;
        p
    }

    pub fn module(&self) -> &Arc<PolicyModule> {
        &self.module
    }

    pub fn params(&self) -> &[(String, String)] {
        &self.params
    }

    pub fn on_failure(&self) -> OnFailure {
        self.on_failure
    }

    /// Ticks this instance's module did not plan, since the room took it.
    pub fn failed_ticks(&self) -> u64 {
        self.failed_ticks
    }

    pub fn is_quarantined(&self) -> bool {
        self.strikes.is_quarantined()
    }

    async fn ensure_instance(&mut self) -> bool {
        if self.instance.is_some() {
            return true;
        }
        if self.strikes.is_quarantined() {
            return false;
        }
        match self
            .runtime
            .instantiate_policy(&self.module, Arc::clone(&self.label), self.params.clone())
            .await
        {
            Ok(i) => {
                self.instance = Some(i);
                if self.strikes.level() > 0 {
                    self.runtime.stats().release("policy", &self.label, self.module.hash());
                }
                true
            }
            Err(f) => {
                self.fail(f);
                false
            }
        }
    }

    fn fail(&mut self, f: CallFailure) {
        let stats = self.runtime.stats();
        stats.policy_failures.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(
            "throng_wasm_policy_failures_total",
            "tenant" => self.label.split('/').next().unwrap_or_default().to_owned(),
            "module" => self.module.hash().short(),
        )
        .increment(1);
        tracing::warn!(
            room = %self.label,
            module = %self.module.hash(),
            reason = %f.reason,
            elapsed_us = f.elapsed.as_micros() as u64,
            "policy module failed; this tick uses the built-in policy"
        );
        stats.record(Failure {
            label: self.label.to_string(),
            module: self.module.hash(),
            reason: f.reason,
            elapsed: f.elapsed,
        });
        // A trapped instance may hold broken state: start afresh next tick.
        self.instance = None;
        if let Some(cooldown) = self.strikes.strike(self.runtime.settings()) {
            let tenant = self.label.split('/').next().unwrap_or_default().to_owned();
            stats.quarantine(Quarantine {
                kind: "policy",
                tenant,
                label: self.label.to_string(),
                module: self.module.hash(),
                until: std::time::Instant::now() + cooldown,
                level: self.strikes.level(),
            });
            tracing::error!(
                room = %self.label,
                module = %self.module.hash(),
                cooldown_s = cooldown.as_secs_f64(),
                "policy module quarantined for this room; the built-in policy takes over for the cool-down"
            );
        }
    }

    pub async fn plan_tick(&mut self, stats: &RoomStats, inbound: &InboundBatch) -> Plan {
        self.fallback_elapsed = self.fallback_elapsed.saturating_add(stats.elapsed_ms);
        if self.ensure_instance().await
            && let Some(instance) = self.instance.as_mut()
        {
            let started = std::time::Instant::now();
            let planned = self.runtime.plan_tick(instance, *stats, inbound).await;
            metrics::histogram!(
                "throng_policy_call_seconds",
                "tenant" => self.label.split('/').next().unwrap_or_default().to_owned(),
                "module" => self.module.hash().short(),
            )
            .record(started.elapsed().as_secs_f64());
            match planned {
                Ok(plan) => {
                    return Plan {
                        deliver: plan.deliver,
                        counters: Counters {
                            likes: plan.counters.likes,
                            gifts: plan
                                .counters
                                .gifts
                                .into_iter()
                                .map(|g| GiftCount {
                                    gift: g.gift,
                                    count: g.count,
                                })
                                .collect(),
                        },
                        pinned: plan.pinned,
                    };
                }
                Err(f) => self.fail(f),
            }
        }
        self.runtime.stats().fallback_ticks.fetch_add(1, Ordering::Relaxed);
        self.failed_ticks += 1;
        if self.on_failure == OnFailure::Closed {
            // Host and system messages are never dropped, whatever failed.
            let privileged = [core_kind(Kind::Host).code(), core_kind(Kind::System).code()];
            let deliver = (0..inbound.len() as u32)
                .filter(|&i| privileged.contains(&inbound.kinds[i as usize]))
                .collect();
            return Plan {
                deliver,
                ..Plan::default()
            };
        }
        let stats = RoomStats {
            elapsed_ms: std::mem::take(&mut self.fallback_elapsed),
            ..*stats
        };
        self.fallback.plan_tick(&stats, inbound)
    }
}

/// The policy a room runs.
#[derive(Debug)]
pub enum RoomPolicy {
    Native(NativePolicy),
    Wasm(Box<WasmPolicy>),
}

impl RoomPolicy {
    pub async fn plan_tick(&mut self, stats: &RoomStats, inbound: &InboundBatch) -> Plan {
        match self {
            RoomPolicy::Native(p) => p.plan_tick(stats, inbound),
            RoomPolicy::Wasm(p) => p.plan_tick(stats, inbound).await,
        }
    }
}

/// Milliseconds of a tick, for `room-stats`.
pub fn tick_ms(tick: Duration) -> u32 {
    u32::try_from(tick.as_millis()).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(tick: u64) -> RoomStats {
        RoomStats {
            tick,
            tick_ms: 100,
            elapsed_ms: 100,
            online: 3,
        }
    }

    #[test]
    fn native_policy_maps_counters_and_pins() {
        let mut p = NativePolicy::new(0);
        let mut inbound = InboundBatch::with_capacity(4);
        inbound.push(1, Kind::Chat, 10, 0, None);
        inbound.push(1, Kind::Like, 10, 0, None);
        inbound.push(2, Kind::Gift, 10, 0, Some("rose"));
        inbound.push(3, Kind::Host, 10, 0, None);
        let plan = p.plan_tick(&stats(1), &inbound);
        assert_eq!(plan.deliver, vec![0, 2, 3]);
        assert_eq!(plan.counters.likes, 1);
        assert_eq!(
            plan.counters.gifts,
            vec![GiftCount {
                gift: "rose".into(),
                count: 1
            }]
        );
        assert_eq!(plan.pinned, vec![3]);
    }
}
