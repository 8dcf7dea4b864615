//! The per-room decision of what goes out each tick.
//!
//! A [`Policy`] sees message metadata (sender, kind, size), never bodies, and
//! returns a [`TickPlan`]: which inbound messages are delivered and what is
//! folded into counters. [`NativePolicy`] is the built-in pass-through with a
//! per-viewer cap; a Wasm policy module sits behind the same trait.

use std::sync::Arc;
use std::time::Duration;

use throng_wire::{Counters, Kind};

/// What a policy knows of one inbound message.
#[derive(Debug, Clone)]
pub struct InboundMeta {
    pub sender: Arc<str>,
    pub kind: Kind,
    pub size: u32,
}

/// What a policy knows of the room at this tick.
#[derive(Debug, Clone, Copy)]
pub struct RoomStats {
    pub tick: u64,
    pub tick_interval: Duration,
    pub online: u64,
}

/// A policy's decision for one tick.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TickPlan {
    /// Indices into the tick's inbound messages, in delivery order.
    pub deliver: Vec<u32>,
    pub counters: Counters,
}

/// Decides, once per tick, what a room's viewers see.
pub trait Policy: Send + std::fmt::Debug {
    fn plan_tick(&mut self, stats: &RoomStats, inbound: &[InboundMeta]) -> TickPlan;
}

/// The built-in policy: likes become counters; gifts are counted and shown;
/// host and system messages always go out; everything else goes out in
/// arrival order while the per-viewer budget lasts.
///
/// Every viewer of a room sees the same batch, so the room's delivery rate is
/// each viewer's rate. The budget is a token bucket holding a quarter of the
/// cap and refilled at the rest: any one-second window then holds at most
/// `burst + refill = cap` messages, while a few messages arriving together
/// in a quiet room still all go out.
#[derive(Debug)]
pub struct NativePolicy {
    cap_per_sec: u32,
    burst: f64,
    refill_per_sec: f64,
    credit: f64,
}

impl NativePolicy {
    /// `cap_per_sec == 0` delivers everything.
    pub fn new(cap_per_sec: u32) -> Self {
        let cap = f64::from(cap_per_sec);
        let burst = (cap / 4.0).floor().max(1.0).min(cap);
        Self {
            cap_per_sec,
            burst,
            refill_per_sec: cap - burst,
            credit: burst,
        }
    }
}

impl Policy for NativePolicy {
    fn plan_tick(&mut self, stats: &RoomStats, inbound: &[InboundMeta]) -> TickPlan {
        let mut plan = TickPlan::default();
        let capped = self.cap_per_sec > 0;
        if capped {
            let refill = self.refill_per_sec * stats.tick_interval.as_secs_f64();
            self.credit = (self.credit + refill).min(self.burst);
        }
        // Host and system messages are never dropped and spend credit first
        // (possibly into debt), so the chat that follows keeps the bound.
        for (i, m) in inbound.iter().enumerate() {
            if matches!(m.kind, Kind::Host | Kind::System) {
                plan.deliver.push(i as u32);
                if capped {
                    self.credit -= 1.0;
                }
            }
        }
        for (i, m) in inbound.iter().enumerate() {
            match m.kind {
                Kind::Like => plan.counters.likes += 1,
                Kind::Host | Kind::System => {}
                Kind::Chat | Kind::Gift => {
                    if m.kind == Kind::Gift {
                        plan.counters.gifts += 1;
                    }
                    if !capped {
                        plan.deliver.push(i as u32);
                    } else if self.credit >= 1.0 {
                        plan.deliver.push(i as u32);
                        self.credit -= 1.0;
                    }
                }
            }
        }
        // Viewers see messages in the order they arrived.
        plan.deliver.sort_unstable();
        plan
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(kind: Kind) -> InboundMeta {
        InboundMeta {
            sender: Arc::from("u"),
            kind,
            size: 10,
        }
    }

    fn stats(tick: u64) -> RoomStats {
        RoomStats {
            tick,
            tick_interval: Duration::from_millis(100),
            online: 3,
        }
    }

    #[test]
    fn uncapped_passes_everything_but_likes() {
        let mut p = NativePolicy::new(0);
        let inbound = [meta(Kind::Chat), meta(Kind::Like), meta(Kind::Gift), meta(Kind::Like)];
        let plan = p.plan_tick(&stats(1), &inbound);
        assert_eq!(plan.deliver, vec![0, 2]);
        assert_eq!(plan.counters, Counters { likes: 2, gifts: 1 });
    }

    #[test]
    fn cap_bounds_each_second_and_host_always_goes_out() {
        let mut p = NativePolicy::new(20);
        let mut delivered = 0;
        for tick in 0..10 {
            let mut inbound = vec![meta(Kind::Chat); 50];
            inbound.push(meta(Kind::Host));
            let plan = p.plan_tick(&stats(tick), &inbound);
            assert!(plan.deliver.contains(&50), "host message dropped at tick {tick}");
            delivered += plan.deliver.len();
        }
        // Ten 100 ms ticks are one second: 20 allowed, host messages included.
        assert!(delivered <= 20, "delivered {delivered} in one second");
        assert!(delivered >= 10, "delivered only {delivered}: hosts at least");
    }
}
