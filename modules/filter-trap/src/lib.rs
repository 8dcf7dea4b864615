//! Test module: a `message-filter` that accepts everything, except that it
//! traps (panics, and so aborts) when any body in the batch contains `boom`,
//! for the host's handling of a failed filter.

wit_bindgen::generate!({
    world: "message-filter",
    path: "../../wit",
});

struct FilterTrap;

impl Guest for FilterTrap {
    fn configure(_params: Params) -> Result<(), String> {
        Ok(())
    }

    fn filter(batch: Vec<Message>) -> Vec<Verdict> {
        if batch.iter().any(|m| m.body.windows(4).any(|w| w == b"boom")) {
            panic!("filter-trap: a body contains `boom`");
        }
        batch.iter().map(|_| Verdict::Accept).collect()
    }
}

export!(FilterTrap);
