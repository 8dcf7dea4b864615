//! Room time, in whole ticks.

use std::time::Duration;

use tokio::time::Instant;

/// Room time: whole ticks since the room started, counted from the wall
/// clock, so that ticks a busy machine ran late still count, and whole, so
/// that a second of room time is exactly a second's worth of tick numbers
/// (jitter in when a tick's plan runs must not push a message out of, or
/// into, a policy's one-second window). Batches carry this tick number, so
/// a viewer can check the cap by tick numbers too.
#[derive(Debug)]
pub(super) struct RoomClock {
    origin: Instant,
    tick: Duration,
    /// The tick number at `origin`.
    base: u64,
    /// The tick number last reported to the policy.
    told: u64,
}

impl RoomClock {
    pub(super) fn new(tick: Duration) -> Self {
        Self {
            origin: Instant::now(),
            tick: tick.max(Duration::from_millis(1)),
            base: 0,
            told: 0,
        }
    }

    /// The current tick number (rounded to the nearest tick).
    pub(super) fn now(&self) -> u64 {
        let tick = self.tick.as_micros();
        let ticks = (self.origin.elapsed().as_micros() + tick / 2) / tick;
        self.base + u64::try_from(ticks).unwrap_or(u64::MAX / 2)
    }

    /// Room time up to tick `now` since the previous call, in milliseconds.
    pub(super) fn elapsed_ms(&mut self, now: u64) -> u32 {
        let ticks = now.saturating_sub(self.told);
        self.told = self.told.max(now);
        u32::try_from(u128::from(ticks) * self.tick.as_millis()).unwrap_or(u32::MAX)
    }

    /// The room's tick changed (it moved to another size class): count on
    /// from here in the new tick.
    pub(super) fn retick(&mut self, tick: Duration) {
        self.base = self.now();
        self.told = self.told.min(self.base);
        self.origin = Instant::now();
        self.tick = tick.max(Duration::from_millis(1));
    }
}
