//! Test module: a `message-filter` that is slow per message. It burns
//! `per_message_us` (default 200) of CPU for every message of a batch, then
//! rejects bodies containing `bad` and accepts the rest. A batch of n
//! messages costs n times that: the host's budget must scale with the batch.

use std::cell::Cell;
use std::time::{Duration, Instant};

wit_bindgen::generate!({
    world: "message-filter",
    path: "../../wit",
});

thread_local! {
    static PER_MESSAGE: Cell<Duration> = const { Cell::new(Duration::from_micros(200)) };
}

struct FilterSlow;

impl Guest for FilterSlow {
    fn configure(params: Params) -> Result<(), String> {
        if let Some((_, v)) = params.iter().find(|(k, _)| k == "per_message_us") {
            let us = v.trim().parse::<u64>().map_err(|e| format!("per_message_us: {e}"))?;
            PER_MESSAGE.with(|p| p.set(Duration::from_micros(us)));
        }
        Ok(())
    }

    fn filter(batch: Vec<Message>) -> Vec<Verdict> {
        let per_message = PER_MESSAGE.with(Cell::get);
        let until = Instant::now() + per_message * batch.len() as u32;
        let mut spin = 0u64;
        while Instant::now() < until {
            spin = std::hint::black_box(spin.wrapping_add(1));
        }
        batch
            .iter()
            .map(|m| {
                if m.body.windows(3).any(|w| w == b"bad") {
                    Verdict::Reject("contains `bad`".into())
                } else {
                    Verdict::Accept
                }
            })
            .collect()
    }
}

export!(FilterSlow);
