//! Test module: a `room-policy` whose `plan-tick` allocates and touches
//! memory without bound, for the host's memory limit to stop.

use std::hint::black_box;

wit_bindgen::generate!({
    world: "room-policy",
    path: "../../wit",
});

const CHUNK: usize = 1 << 20;

struct HostileMemory;

impl Guest for HostileMemory {
    fn configure(_params: Params) -> Result<(), String> {
        Ok(())
    }

    fn plan_tick(_stats: RoomStats, _inbound: Inbound) -> TickPlan {
        let mut hoard: Vec<Vec<u8>> = Vec::new();
        loop {
            // Non-zero bytes, so every page is really written.
            let chunk = black_box(vec![0xA5u8; CHUNK]);
            hoard.push(chunk);
            black_box(&mut hoard);
        }
    }
}

export!(HostileMemory);
