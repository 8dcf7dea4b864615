//! Room-policy modules: compiled once, instantiated per room, every plan
//! checked before the room uses it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::Store;

use super::bindings::policy::RoomPolicyPre;
use super::bindings::{Inbound, RoomStats, TickPlan};
use super::{GuestState, ModuleHash, WasmError, WasmRuntime, reason};

/// Most gift names a plan may count in one tick.
pub const MAX_PLAN_GIFTS: usize = 256;
/// Longest gift name in a plan: the WIT's 32 bytes, one constant for the
/// native policy, the guest and the host's check.
pub use throng_policy_core::MAX_GIFT_NAME;
/// Most pinned messages in one tick.
pub const MAX_PINNED: usize = 16;

/// A compiled room-policy component, ready to instantiate.
pub struct PolicyModule {
    pub(super) hash: ModuleHash,
    pub(super) pre: RoomPolicyPre<GuestState>,
}

impl std::fmt::Debug for PolicyModule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PolicyModule({})", self.hash)
    }
}

impl PolicyModule {
    pub fn hash(&self) -> ModuleHash {
        self.hash
    }
}

/// One room's instance of a policy module.
pub struct PolicyInstance {
    store: Store<GuestState>,
    bindings: super::bindings::policy::RoomPolicy,
    hash: ModuleHash,
    /// Its place in the count of room instances (none for a dry run).
    _place: Option<super::PolicyPlace>,
}

impl std::fmt::Debug for PolicyInstance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PolicyInstance({})", self.hash)
    }
}

/// A failed guest call: why, and how long it ran.
#[derive(Debug, Clone)]
pub struct CallFailure {
    pub reason: String,
    pub elapsed: Duration,
}

impl WasmRuntime {
    /// Instantiates `module` for one room and calls its `configure`, under
    /// the instantiation budget. Refused when the rest of the instance pool
    /// is kept for tenant filters.
    pub async fn instantiate_policy(
        &self,
        module: &Arc<PolicyModule>,
        label: Arc<str>,
        params: Vec<(String, String)>,
    ) -> Result<PolicyInstance, CallFailure> {
        let place = self.take_policy_place().map_err(|e| CallFailure {
            reason: e.to_string(),
            elapsed: Duration::ZERO,
        })?;
        self.instantiate_policy_in(module, label, params, Some(place)).await
    }

    /// Instantiates `module` and runs `configure` with `params` once, to
    /// find out before a config is applied whether the module takes them.
    pub async fn dry_run_policy(
        &self,
        module: &Arc<PolicyModule>,
        label: Arc<str>,
        params: Vec<(String, String)>,
    ) -> Result<(), CallFailure> {
        self.instantiate_policy_in(module, label, params, None).await.map(drop)
    }

    async fn instantiate_policy_in(
        &self,
        module: &Arc<PolicyModule>,
        label: Arc<str>,
        params: Vec<(String, String)>,
        place: Option<super::PolicyPlace>,
    ) -> Result<PolicyInstance, CallFailure> {
        let started = Instant::now();
        let mut store = self.store(label, module.hash, params.clone(), self.settings.policy_memory_bytes);
        self.arm_instantiate(&mut store);
        let bindings = module
            .pre
            .instantiate_async(&mut store)
            .await
            .map_err(|e| CallFailure {
                reason: WasmError::Instantiate {
                    hash: module.hash,
                    reason: reason(&e),
                }
                .to_string(),
                elapsed: started.elapsed(),
            })?;
        self.stats
            .instantiations
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut instance = PolicyInstance {
            store,
            bindings,
            hash: module.hash,
            _place: place,
        };
        match instance.bindings.call_configure(&mut instance.store, &params).await {
            Ok(Ok(())) => Ok(instance),
            Ok(Err(msg)) => Err(CallFailure {
                reason: format!("configure refused its params: {msg}"),
                elapsed: started.elapsed(),
            }),
            Err(e) => Err(CallFailure {
                reason: format!("configure failed: {}", reason(&e)),
                elapsed: started.elapsed(),
            }),
        }
    }

    /// Calls `plan-tick` under the budget and checks the plan.
    pub async fn plan_tick(
        &self,
        instance: &mut PolicyInstance,
        stats: RoomStats,
        inbound: &Inbound,
    ) -> Result<TickPlan, CallFailure> {
        let started = Instant::now();
        // A plan sees metadata only: its budget is the fixed part.
        self.arm(&mut instance.store, 0);
        let plan = instance
            .bindings
            .call_plan_tick(&mut instance.store, stats, inbound)
            .await
            .map_err(|e| CallFailure {
                reason: reason(&e),
                elapsed: started.elapsed(),
            })?;
        validate(&plan, inbound.senders.len()).map_err(|reason| CallFailure {
            reason: format!("invalid plan: {reason}"),
            elapsed: started.elapsed(),
        })?;
        Ok(plan)
    }
}

impl PolicyInstance {
    pub fn hash(&self) -> ModuleHash {
        self.hash
    }
}

/// Checks a plan against the tick's inbound count: every index in range and
/// delivered at most once, pins among the deliveries, counters bounded.
pub fn validate(plan: &TickPlan, inbound: usize) -> Result<(), String> {
    if plan.deliver.len() > inbound {
        return Err(format!("{} deliveries for {inbound} messages", plan.deliver.len()));
    }
    let mut seen = vec![false; inbound];
    for &i in &plan.deliver {
        let slot = seen
            .get_mut(i as usize)
            .ok_or_else(|| format!("delivery index {i} out of range (0..{inbound})"))?;
        if std::mem::replace(slot, true) {
            return Err(format!("message {i} delivered twice"));
        }
    }
    if plan.pinned.len() > MAX_PINNED {
        return Err(format!("{} pinned messages; at most {MAX_PINNED}", plan.pinned.len()));
    }
    for &p in &plan.pinned {
        if !seen.get(p as usize).copied().unwrap_or(false) {
            return Err(format!("pinned index {p} is not delivered"));
        }
    }
    if plan.counters.gifts.len() > MAX_PLAN_GIFTS {
        return Err(format!(
            "{} gift counters; at most {MAX_PLAN_GIFTS}",
            plan.counters.gifts.len()
        ));
    }
    if let Some(g) = plan.counters.gifts.iter().find(|g| g.gift.len() > MAX_GIFT_NAME) {
        return Err(format!("gift name of {} bytes; at most {MAX_GIFT_NAME}", g.gift.len()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::bindings::{Counters, GiftCount};
    use super::*;

    fn plan(deliver: Vec<u32>, pinned: Vec<u32>) -> TickPlan {
        TickPlan {
            deliver,
            counters: Counters {
                likes: 0,
                gifts: vec![],
            },
            pinned,
        }
    }

    #[test]
    fn plans_are_checked() {
        assert!(validate(&plan(vec![0, 2], vec![2]), 3).is_ok());
        assert!(
            validate(&plan(vec![3], vec![]), 3)
                .unwrap_err()
                .contains("out of range")
        );
        assert!(validate(&plan(vec![1, 1], vec![]), 3).unwrap_err().contains("twice"));
        assert!(
            validate(&plan(vec![0], vec![1]), 3)
                .unwrap_err()
                .contains("not delivered")
        );
        assert!(validate(&plan(vec![0, 1, 2, 0], vec![]), 3).is_err());
        let mut p = plan(vec![], vec![]);
        p.counters.gifts = vec![
            GiftCount {
                gift: "x".repeat(65),
                count: 1
            };
            1
        ];
        assert!(validate(&p, 0).unwrap_err().contains("gift name"));
    }
}
