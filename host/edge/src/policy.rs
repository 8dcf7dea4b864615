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
//! is quarantined for the room (native until the next module change).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use throng_policy_core::{DefaultPolicy, Meta};
use throng_wire::{Counters, GiftCount, Kind};

use crate::wasm::bindings::{self, MessageMeta, RoomStats};
use crate::wasm::policy::{CallFailure, PolicyInstance, PolicyModule};
use crate::wasm::{Failure, Strikes, WasmRuntime};

/// What a policy knows of one inbound message (the WIT `message-meta`).
pub type InboundMeta = MessageMeta;

/// A policy's decision for one tick, checked and ready for the room.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Indices into the tick's inbound messages, each at most once.
    pub deliver: Vec<u32>,
    pub counters: Counters,
    /// Indices (among `deliver`) to pin.
    pub pinned: Vec<u32>,
}

pub fn wit_kind(kind: Kind) -> bindings::Kind {
    match kind {
        Kind::Chat => bindings::Kind::Chat,
        Kind::Like => bindings::Kind::Like,
        Kind::Gift => bindings::Kind::Gift,
        Kind::Host => bindings::Kind::Host,
        Kind::System => bindings::Kind::System,
    }
}

fn core_kind(kind: bindings::Kind) -> throng_policy_core::Kind {
    match kind {
        bindings::Kind::Chat => throng_policy_core::Kind::Chat,
        bindings::Kind::Like => throng_policy_core::Kind::Like,
        bindings::Kind::Gift => throng_policy_core::Kind::Gift,
        bindings::Kind::Host => throng_policy_core::Kind::Host,
        bindings::Kind::System => throng_policy_core::Kind::System,
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

    pub fn plan_tick(&mut self, stats: &RoomStats, inbound: &[InboundMeta]) -> Plan {
        let metas: Vec<Meta<'_>> = inbound
            .iter()
            .map(|m| Meta {
                sender: m.sender,
                kind: core_kind(m.kind),
                size: m.size,
                received_ms: m.received_ms,
                gift: &m.gift,
            })
            .collect();
        let p = self.inner.plan(stats.tick_ms, &metas);
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
    strikes: Strikes,
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

impl WasmPolicy {
    /// Instantiates the module for the room. A failure here is a failure
    /// like any other: the room runs on the fallback and retries next tick.
    pub async fn new(
        runtime: Arc<WasmRuntime>,
        module: Arc<PolicyModule>,
        params: Vec<(String, String)>,
        label: Arc<str>,
        fallback: NativePolicy,
    ) -> Self {
        let mut p = Self {
            runtime,
            module,
            params,
            label,
            instance: None,
            fallback,
            strikes: Strikes::default(),
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
        metrics::counter!("throng_wasm_policy_failures_total").increment(1);
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
        if self.strikes.strike(self.runtime.settings()) {
            stats.quarantines.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("throng_wasm_quarantines_total").increment(1);
            tracing::error!(
                room = %self.label,
                module = %self.module.hash(),
                "policy module quarantined for this room; the built-in policy takes over"
            );
        }
    }

    pub async fn plan_tick(&mut self, stats: &RoomStats, inbound: &[InboundMeta]) -> Plan {
        if self.ensure_instance().await
            && let Some(instance) = self.instance.as_mut()
        {
            match self.runtime.plan_tick(instance, *stats, inbound).await {
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
        self.fallback.plan_tick(stats, inbound)
    }
}

/// The policy a room runs.
#[derive(Debug)]
pub enum RoomPolicy {
    Native(NativePolicy),
    Wasm(Box<WasmPolicy>),
}

impl RoomPolicy {
    pub async fn plan_tick(&mut self, stats: &RoomStats, inbound: &[InboundMeta]) -> Plan {
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

    fn meta(sender: u64, kind: Kind) -> InboundMeta {
        InboundMeta {
            sender,
            kind: wit_kind(kind),
            size: 10,
            received_ms: 0,
            gift: if kind == Kind::Gift {
                "rose".into()
            } else {
                String::new()
            },
        }
    }

    fn stats(tick: u64) -> RoomStats {
        RoomStats {
            tick,
            tick_ms: 100,
            online: 3,
        }
    }

    #[test]
    fn native_policy_maps_counters_and_pins() {
        let mut p = NativePolicy::new(0);
        let inbound = [
            meta(1, Kind::Chat),
            meta(1, Kind::Like),
            meta(2, Kind::Gift),
            meta(3, Kind::Host),
        ];
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
