//! `GET /v1/filters`: what each tenant filter on this edge did: calls,
//! messages, rejections, failures, unjudged batches, quarantine and call
//! latency. A tenant sees its own filters only.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::routing::get;
use axum::{Extension, Json, Router};
use serde::Serialize;

use crate::admin::AdminState;
use crate::control::Caller;

pub(super) fn routes() -> Router<Arc<AdminState>> {
    Router::new().route("/v1/filters", get(list))
}

#[derive(Debug, Serialize)]
pub(crate) struct FilterView {
    pub tenant: String,
    /// The filter deployment's version it belongs to.
    pub version: u64,
    pub module: String,
    pub on_failure: &'static str,
    pub calls: u64,
    pub messages: u64,
    pub rejected: u64,
    pub failures: u64,
    pub unjudged: u64,
    pub mean_call_us: u64,
    pub max_call_us: u64,
    /// Seconds of quarantine left; absent when not quarantined.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quarantined_s: Option<f64>,
}

pub(crate) fn filter_views(s: &AdminState, caller: &Caller) -> Vec<FilterView> {
    let set = s.control.current();
    set.filters()
        .into_iter()
        .filter(|(t, _, _)| caller.may_act_for(t))
        .map(|(tenant, version, f)| {
            let c = f.calls();
            let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
            let calls = load(&c.calls);
            FilterView {
                tenant: tenant.to_owned(),
                version,
                module: format!("sha256:{}", f.module().hash().hex()),
                on_failure: f.on_failure().as_str(),
                calls,
                messages: load(&c.messages),
                rejected: load(&c.rejected),
                failures: load(&c.failures),
                unjudged: load(&c.unjudged),
                mean_call_us: load(&c.total_us).checked_div(calls).unwrap_or(0),
                max_call_us: load(&c.max_us),
                quarantined_s: f.quarantined_for().map(|d| d.as_secs_f64()),
            }
        })
        .collect()
}

async fn list(State(s): State<Arc<AdminState>>, Extension(caller): Extension<Caller>) -> Json<Vec<FilterView>> {
    Json(filter_views(&s, &caller))
}
