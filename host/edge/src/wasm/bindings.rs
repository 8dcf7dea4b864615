//! The one place that runs `bindgen!`: Rust types for `wit/throng.wit`.
//!
//! Exports are async so a call can yield at epoch ticks (a busy guest then
//! does not hold a runtime worker for its whole budget); the host imports are
//! trivial and stay synchronous.

pub mod policy {
    wasmtime::component::bindgen!({
        path: "../../wit",
        world: "room-policy",
        exports: { default: async },
    });
}

pub mod filter {
    wasmtime::component::bindgen!({
        path: "../../wit",
        world: "message-filter",
        exports: { default: async },
        // Shared interfaces come from the policy bindings, so one `Host`
        // implementation serves both worlds.
        with: {
            "throng:room/types": super::policy::throng::room::types,
            "throng:room/host": super::policy::throng::room::host,
        },
    });
}

pub use policy::throng::room::host::Level;
#[allow(unused_imports)] // part of the module's vocabulary, used by tests and benches
pub use policy::throng::room::types::{Counters, GiftCount, Inbound, Kind, Message, RoomStats, TickPlan, Verdict};
