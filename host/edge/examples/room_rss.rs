//! RSS per idle room instance: instantiates N rooms of policy-default (each
//! configured and ticked once, then left idle) and reads VmRSS before and after.
//!
//! `cargo run --release -p throng-edge --example room_rss -- 10000`

use std::sync::Arc;
use std::time::{Duration, Instant};

use throng_edge::policy::InboundBatch;
use throng_edge::wasm::bindings::RoomStats;
use throng_edge::wasm::{Budget, WasmRuntime, WasmSettings};
use throng_wire::Kind;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn main() {
    let n: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio");
    let wasm = WasmRuntime::new(WasmSettings {
        budget: Budget::Epoch(Duration::from_secs(1)),
        max_instances: (n + 16) as u32,
        ..WasmSettings::default()
    })
    .expect("runtime");
    let module = wasm.load_policy(throng_guest_artifacts::POLICY_DEFAULT).expect("load");
    let params = vec![("cap_per_sec".to_owned(), "20".to_owned())];
    let mut metas = InboundBatch::with_capacity(1);
    metas.push(1, Kind::Chat, 64, 0, None);
    // One instance first, so one-time costs (code pages, runtime) are not counted per room.
    let mut rooms = Vec::with_capacity(n + 1);
    let warm = rt
        .block_on(wasm.instantiate_policy(&module, Arc::from("warm"), params.clone()))
        .expect("instantiate");
    rooms.push(warm);
    let before = rss_kib();
    let start = Instant::now();
    for i in 0..n {
        let label: Arc<str> = Arc::from(format!("t/room{i}").as_str());
        let mut room = rt
            .block_on(wasm.instantiate_policy(&module, label, params.clone()))
            .expect("instantiate");
        let stats = RoomStats {
            tick: 1,
            tick_ms: 50,
            elapsed_ms: 50,
            online: 1,
        };
        rt.block_on(wasm.plan_tick(&mut room, stats, &metas)).expect("plan");
        rooms.push(room);
    }
    let took = start.elapsed();
    let after = rss_kib();
    println!(
        "rooms={n} rss_before_kib={before} rss_after_kib={after} per_room_kib={:.1} instantiate+configure+1 tick: {:.1} us/room",
        (after - before) as f64 / n as f64,
        took.as_secs_f64() * 1e6 / n as f64
    );
}
