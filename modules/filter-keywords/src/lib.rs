//! A `message-filter` module that rejects, or masks, messages containing
//! banned words.
//!
//! Params:
//! - `words` (required): comma-separated, trimmed, matched case-insensitively
//!   as whole words (bounded by non-alphanumeric characters or the ends);
//! - `mode`: `reject` (default) refuses the message, naming the word; `mask`
//!   lets it through with each banned word replaced by as many `*` as it has
//!   characters.
//!
//! Bodies that are not UTF-8 are accepted unchanged. The matching itself is in
//! [`words`], plain Rust tested on the host with `cargo test`.

use std::cell::RefCell;

use throng::room::host::{self, Level};

mod words;

use words::{Filter, Outcome};

// `Params`, `Message` and `Verdict` are in scope through the world's
// `use types.{...}`.
wit_bindgen::generate!({
    world: "message-filter",
    path: "../../wit",
});

thread_local! {
    /// The tenant's configured filter (Wasm is single-threaded).
    static FILTER: RefCell<Option<Filter>> = const { RefCell::new(None) };
}

struct FilterKeywords;

impl Guest for FilterKeywords {
    fn configure(params: Params) -> Result<(), String> {
        let filter = Filter::from_params(params.iter().map(|(k, v)| (k.as_str(), v.as_str())))?;
        host::log(
            Level::Debug,
            &format!(
                "filter-keywords configured words={} mode={}",
                filter.word_count(),
                filter.mode().as_str()
            ),
        );
        FILTER.with(|f| *f.borrow_mut() = Some(filter));
        Ok(())
    }

    fn filter(batch: Vec<Message>) -> Vec<Verdict> {
        FILTER.with(|f| match &*f.borrow() {
            Some(filter) => batch
                .iter()
                .map(|m| match filter.judge(&m.body) {
                    Outcome::Accept => Verdict::Accept,
                    Outcome::Reject(reason) => Verdict::Reject(reason),
                    Outcome::Rewrite(body) => Verdict::Rewrite(body),
                })
                .collect(),
            // The host always configures first; should it not, nothing is banned.
            None => {
                host::log(
                    Level::Warn,
                    "filter-keywords: filter called before configure; accepting",
                );
                batch.iter().map(|_| Verdict::Accept).collect()
            }
        })
    }
}

export!(FilterKeywords);
