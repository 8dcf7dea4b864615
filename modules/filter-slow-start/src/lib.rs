//! Test module: a `message-filter` that is slow to start. `configure` burns
//! `startup_ms` (default 20) of CPU, the way a filter carrying a language
//! runtime does while it boots; after that it judges quickly: a body
//! containing `bad` is rejected, everything else accepted. The host must
//! pay this once, when the filter is loaded, never on a room's tick.

use std::time::{Duration, Instant};

wit_bindgen::generate!({
    world: "message-filter",
    path: "../../wit",
});

struct FilterSlowStart;

impl Guest for FilterSlowStart {
    fn configure(params: Params) -> Result<(), String> {
        let ms = match params.iter().find(|(k, _)| k == "startup_ms") {
            Some((_, v)) => v.trim().parse::<u64>().map_err(|e| format!("startup_ms: {e}"))?,
            None => 20,
        };
        let until = Instant::now() + Duration::from_millis(ms);
        let mut spin = 0u64;
        while Instant::now() < until {
            spin = std::hint::black_box(spin.wrapping_add(1));
        }
        Ok(())
    }

    fn filter(batch: Vec<Message>) -> Vec<Verdict> {
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

export!(FilterSlowStart);
