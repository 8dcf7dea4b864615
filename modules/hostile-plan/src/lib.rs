//! Test module: a `room-policy` whose `plan-tick` returns an absurd plan
//! (indices out of range and repeated, a million deliveries, ten thousand
//! 1 KiB gift names), for the host's plan validation to refuse.

use throng::room::types::{Counters, GiftCount};

wit_bindgen::generate!({
    world: "room-policy",
    path: "../../wit",
});

const DELIVER: usize = 1_000_000;
const GIFTS: usize = 10_000;
const GIFT_NAME_BYTES: usize = 1024;

struct HostilePlan;

impl Guest for HostilePlan {
    fn configure(_params: Params) -> Result<(), String> {
        Ok(())
    }

    fn plan_tick(_stats: RoomStats, inbound: Inbound) -> TickPlan {
        let past_end = u32::try_from(inbound.senders.len()).unwrap_or(u32::MAX).saturating_add(5);
        let pattern = [u32::MAX, past_end, 0, 0, past_end];
        let deliver: Vec<u32> = pattern.iter().copied().cycle().take(DELIVER).collect();
        let gifts = (0..GIFTS)
            .map(|i| {
                let mut gift = format!("gift-{i}-");
                gift.extend(std::iter::repeat_n('x', GIFT_NAME_BYTES - gift.len()));
                GiftCount { gift, count: u64::MAX }
            })
            .collect();
        TickPlan {
            deliver,
            counters: Counters { likes: u64::MAX, gifts },
            pinned: vec![u32::MAX, past_end],
        }
    }
}

export!(HostilePlan);
