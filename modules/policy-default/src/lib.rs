//! The default room policy as a `room-policy` module: the same algorithm the
//! edge runs natively (`throng-policy-core`), compiled to Wasm so the two can
//! be compared and so operators have a working module to start from.
//!
//! Params: `cap_per_sec` (see `DefaultPolicy::from_params`).

use std::cell::RefCell;

use throng::room::host::{self, Level};
// `Params`, `RoomStats`, `Inbound` and `TickPlan` are in scope through
// the world's `use types.{...}`.
use throng::room::types::{Counters, GiftCount};
use throng_policy_core::{Columns, DefaultPolicy, Meta};

wit_bindgen::generate!({
    world: "room-policy",
    path: "../../wit",
});

/// Cap used when `plan-tick` comes before any `configure`.
const DEFAULT_CAP_PER_SEC: u32 = 20;

thread_local! {
    /// The room's policy state, kept from tick to tick (Wasm is single-threaded).
    static POLICY: RefCell<Option<DefaultPolicy>> = const { RefCell::new(None) };
}

struct PolicyDefault;

impl Guest for PolicyDefault {
    fn configure(params: Params) -> Result<(), String> {
        let policy = DefaultPolicy::from_params(params.iter().map(|(k, v)| (k.as_str(), v.as_str())))?;
        host::log(
            Level::Debug,
            &format!("policy-default configured cap_per_sec={}", policy.cap_per_sec()),
        );
        POLICY.with(|p| *p.borrow_mut() = Some(policy));
        Ok(())
    }

    fn plan_tick(stats: RoomStats, inbound: Inbound) -> TickPlan {
        let metas = to_metas(&inbound);
        let plan = POLICY.with(|p| {
            p.borrow_mut()
                .get_or_insert_with(|| DefaultPolicy::new(DEFAULT_CAP_PER_SEC))
                .plan(stats.elapsed_ms, stats.tick_ms, &metas)
        });
        TickPlan {
            deliver: plan.deliver,
            counters: Counters {
                likes: plan.likes,
                gifts: plan
                    .gifts
                    .into_iter()
                    .map(|(gift, count)| GiftCount { gift, count })
                    .collect(),
            },
            pinned: plan.pinned,
        }
    }
}

fn to_metas(inbound: &Inbound) -> Vec<Meta<'_>> {
    Columns {
        senders: &inbound.senders,
        kinds: &inbound.kinds,
        sizes: &inbound.sizes,
        received_ms: &inbound.received_ms,
        gifts: &inbound.gifts,
        gift_names: &inbound.gift_names,
    }
    .metas()
}

export!(PolicyDefault);
