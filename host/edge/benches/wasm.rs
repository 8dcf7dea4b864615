//! Wasm module costs, each beside its baseline measured in the same run.
//!
//! `cargo bench -p throng-edge --bench wasm`
//!
//! - `plan_tick/{wasm,native}/N`: policy-default as a Wasm component versus
//!   the same algorithm (throng-policy-core) called natively, N inbound.
//! - `budget/{epoch,fuel}`: the same 1,000-message plan under each budget.
//! - `instantiate`: a room's instance from the InstancePre (pooling
//!   allocator) plus its `configure` call.
//! - `filter/1000x64B`: filter-keywords on a batch of 1,000 64-byte bodies.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use throng_edge::policy::{InboundBatch, NativePolicy, wit_kind};
use throng_edge::wasm::bindings::{Message, RoomStats};
use throng_edge::wasm::{Budget, WasmRuntime, WasmSettings};
use throng_wire::Kind;

fn inbound(n: usize) -> InboundBatch {
    let mut batch = InboundBatch::with_capacity(n);
    for i in 0..n {
        let kind = match i % 10 {
            0 => Kind::Like,
            1 => Kind::Gift,
            _ => Kind::Chat,
        };
        let gift = (kind == Kind::Gift).then_some("rose");
        batch.push((i % 97) as u64, kind, 64, 1_700_000_000_000 + i as u64, gift);
    }
    batch
}

fn stats(tick: u64) -> RoomStats {
    RoomStats {
        tick,
        tick_ms: 50,
        elapsed_ms: 50,
        online: 10_000,
    }
}

fn runtime(budget: Budget) -> Arc<WasmRuntime> {
    WasmRuntime::new(WasmSettings {
        budget,
        max_instances: 1000,
        ..WasmSettings::default()
    })
    .expect("runtime")
}

fn params() -> Vec<(String, String)> {
    vec![("cap_per_sec".into(), "20".into())]
}

fn plan_tick(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio");
    let wasm = runtime(Budget::Epoch(Duration::from_secs(1)));
    let module = wasm.load_policy(throng_guest_artifacts::POLICY_DEFAULT).expect("load");
    let mut instance = rt
        .block_on(wasm.instantiate_policy(&module, Arc::from("bench/room"), params()))
        .expect("instantiate");
    let mut group = c.benchmark_group("plan_tick");
    for n in [1usize, 100, 1000] {
        let metas = inbound(n);
        let mut tick = 0;
        group.bench_with_input(BenchmarkId::new("wasm", n), &metas, |b, metas| {
            b.iter(|| {
                tick += 1;
                let plan = rt
                    .block_on(wasm.plan_tick(&mut instance, stats(tick), metas))
                    .expect("plan");
                black_box(plan)
            })
        });
        let mut native = NativePolicy::new(20);
        group.bench_with_input(BenchmarkId::new("native", n), &metas, |b, metas| {
            b.iter(|| {
                tick += 1;
                black_box(native.plan_tick(&stats(tick), metas))
            })
        });
    }
    group.finish();
}

fn budget(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio");
    let metas = inbound(1000);
    let mut group = c.benchmark_group("budget");
    for (name, budget) in [
        ("epoch", Budget::Epoch(Duration::from_secs(1))),
        ("fuel", Budget::Fuel(1 << 40)),
    ] {
        let wasm = runtime(budget);
        let module = wasm.load_policy(throng_guest_artifacts::POLICY_DEFAULT).expect("load");
        let mut instance = rt
            .block_on(wasm.instantiate_policy(&module, Arc::from("bench/room"), params()))
            .expect("instantiate");
        let mut tick = 0;
        group.bench_function(BenchmarkId::new(name, 1000), |b| {
            b.iter(|| {
                tick += 1;
                black_box(
                    rt.block_on(wasm.plan_tick(&mut instance, stats(tick), &metas))
                        .expect("plan"),
                )
            })
        });
    }
    group.finish();
}

fn instantiate(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio");
    let wasm = runtime(Budget::Epoch(Duration::from_secs(1)));
    let module = wasm.load_policy(throng_guest_artifacts::POLICY_DEFAULT).expect("load");
    let label: Arc<str> = Arc::from("bench/room");
    c.bench_function("instantiate", |b| {
        b.iter(|| {
            let i = rt
                .block_on(wasm.instantiate_policy(&module, Arc::clone(&label), params()))
                .expect("instantiate");
            black_box(i)
        })
    });
}

fn filter(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio");
    let wasm = runtime(Budget::Epoch(Duration::from_secs(1)));
    let module = wasm.load_filter(throng_guest_artifacts::FILTER_KEYWORDS).expect("load");
    let params = vec![
        ("words".to_owned(), "scam,spoiler,phishing".to_owned()),
        ("mode".to_owned(), "mask".to_owned()),
    ];
    let mut instance = rt
        .block_on(wasm.instantiate_filter(&module, Arc::from("bench"), params, wasm.filter_limits()))
        .expect("instantiate");
    let batch: Vec<Message> = (0..1000)
        .map(|i| Message {
            sender: format!("user{}", i % 97),
            kind: wit_kind(Kind::Chat),
            // 64 bytes, a banned word in one message of ten.
            body: format!(
                "{:<64}",
                if i % 10 == 0 {
                    "what a spoiler that was, really now"
                } else {
                    "hello everyone, great show tonight!"
                }
            )
            .into_bytes(),
        })
        .collect();
    c.bench_function("filter/1000x64B", |b| {
        b.iter(|| black_box(rt.block_on(wasm.filter(&mut instance, &batch)).expect("filter")))
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).sample_size(30);
    targets = plan_tick, budget, instantiate, filter
}
criterion_main!(benches);
