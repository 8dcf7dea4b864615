//! What a room shows the admin API without being asked through its
//! mailbox: counters the actor bumps as it ticks, and what it runs. Read
//! at any time by `/v1/rooms`, the dashboard and the metrics.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use serde::Serialize;

use super::RoomKey;

/// One room's figures and what it runs.
#[derive(Debug)]
pub struct RoomInfo {
    pub key: RoomKey,
    pub group: bool,
    pub created_ms: u64,
    /// Viewers on this edge.
    pub viewers: AtomicU64,
    /// Viewers in the whole room (all edges), as last reported.
    pub online: AtomicU64,
    /// Messages that reached the room's tick.
    pub msgs_in: AtomicU64,
    /// Messages that went out in batches.
    pub delivered: AtomicU64,
    /// Accepted messages the policy did not deliver (over the cap; likes
    /// folded into counters count here too).
    pub dropped_by_policy: AtomicU64,
    /// Messages the tenant's filters rejected or could not judge.
    pub filtered: AtomicU64,
    /// Ticks the policy module could not plan.
    pub policy_failures: AtomicU64,
    /// The policy module is quarantined for this room (the fallback runs).
    pub policy_quarantined: AtomicBool,
    running: Mutex<Running>,
    rates: Mutex<Rates>,
}

/// What a room runs now.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Running {
    /// `native`, or the policy module's `sha256:<hex>`.
    pub policy: String,
    pub policy_params: BTreeMap<String, String>,
    pub policy_on_failure: Option<&'static str>,
    /// The policy deployment's version this room follows (none: no
    /// deployment, the built-in default).
    pub policy_version: Option<u64>,
    /// The room's size class (policy rules may name one).
    pub class: String,
    /// The tenant's filters, `sha256:<hex>` each, in order.
    pub filters: Vec<String>,
    pub filter_version: Option<u64>,
}

#[derive(Debug)]
struct Rates {
    at: Instant,
    msgs_in: u64,
    delivered: u64,
    in_per_s: f64,
    delivered_per_s: f64,
}

impl RoomInfo {
    pub fn new(key: RoomKey, group: bool) -> Self {
        RoomInfo {
            key,
            group,
            created_ms: crate::unix_now_ms(),
            viewers: AtomicU64::new(0),
            online: AtomicU64::new(0),
            msgs_in: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            dropped_by_policy: AtomicU64::new(0),
            filtered: AtomicU64::new(0),
            policy_failures: AtomicU64::new(0),
            policy_quarantined: AtomicBool::new(false),
            running: Mutex::new(Running::default()),
            rates: Mutex::new(Rates {
                at: Instant::now(),
                msgs_in: 0,
                delivered: 0,
                in_per_s: 0.0,
                delivered_per_s: 0.0,
            }),
        }
    }

    pub fn running(&self) -> Running {
        self.running.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub(super) fn set_running(&self, f: impl FnOnce(&mut Running)) {
        f(&mut self.running.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// Messages per second in and delivered, over the last whole second or
    /// more (the room samples as it ticks).
    pub fn rates(&self) -> (f64, f64) {
        let r = self.rates.lock().unwrap_or_else(|e| e.into_inner());
        // A room that stopped ticking stopped sampling: its rates are stale.
        if r.at.elapsed().as_secs_f64() > 3.0 {
            return (0.0, 0.0);
        }
        (r.in_per_s, r.delivered_per_s)
    }

    /// Takes a rate sample if a second has passed since the last.
    pub(super) fn sample(&self) {
        let mut r = self.rates.lock().unwrap_or_else(|e| e.into_inner());
        let dt = r.at.elapsed().as_secs_f64();
        if dt < 1.0 {
            return;
        }
        let msgs_in = self.msgs_in.load(Ordering::Relaxed);
        let delivered = self.delivered.load(Ordering::Relaxed);
        r.in_per_s = msgs_in.saturating_sub(r.msgs_in) as f64 / dt;
        r.delivered_per_s = delivered.saturating_sub(r.delivered) as f64 / dt;
        r.msgs_in = msgs_in;
        r.delivered = delivered;
        r.at = Instant::now();
    }

    pub(super) fn add(counter: &AtomicU64, n: usize) {
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
}
