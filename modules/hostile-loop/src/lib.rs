//! Test module: a `room-policy` whose `plan-tick` never returns, for the
//! host's CPU limits (fuel or epoch interruption) to stop.

use std::hint::black_box;

wit_bindgen::generate!({
    world: "room-policy",
    path: "../../wit",
});

struct HostileLoop;

impl Guest for HostileLoop {
    fn configure(_params: Params) -> Result<(), String> {
        Ok(())
    }

    fn plan_tick(stats: RoomStats, inbound: Inbound) -> TickPlan {
        // `black_box` keeps the counter opaque, so the loop cannot be removed.
        let mut n = black_box(stats.tick ^ inbound.senders.len() as u64);
        loop {
            n = black_box(n.wrapping_add(1));
        }
    }
}

export!(HostileLoop);
