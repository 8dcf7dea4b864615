//! Test module: a `room-policy` whose `plan-tick` traps (a Wasm
//! `unreachable`), for the host's fallback on a failed call.

wit_bindgen::generate!({
    world: "room-policy",
    path: "../../wit",
});

struct HostileTrap;

impl Guest for HostileTrap {
    fn configure(_params: Params) -> Result<(), String> {
        Ok(())
    }

    fn plan_tick(_stats: RoomStats, _inbound: Inbound) -> TickPlan {
        #[cfg(target_arch = "wasm32")]
        core::arch::wasm32::unreachable();
        #[cfg(not(target_arch = "wasm32"))]
        panic!("hostile-trap: plan-tick traps on purpose");
    }
}

export!(HostileTrap);
