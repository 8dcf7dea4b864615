//! The tenant's filters over a tick's inbox: one Wasm call per filter for
//! the whole batch.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use throng_wire::{EdgeFrame, ErrorCode};

use super::{Inbound, MAX_REASON};
use crate::filter::{OnFailure, TenantFilter};
use crate::policy::wit_kind;
use crate::wasm::WasmRuntime;
use crate::wasm::bindings::{self, Verdict};

/// Runs `tenant`'s filters over the inbox, one call per filter for the
/// whole batch; rejected senders are told why. A batch a filter could not
/// judge goes its `on_failure` way: closed rejects every message of it
/// (`FilterUnavailable`), open passes it on; never silently. A rewrite may
/// not make a body longer than `max_body`.
pub(super) async fn run(
    filters: &[Arc<TenantFilter>],
    mut inbox: Vec<Inbound>,
    runtime: &WasmRuntime,
    tenant: &str,
    max_body: u32,
) -> Vec<Inbound> {
    for filter in filters {
        if inbox.is_empty() {
            break;
        }
        // Bodies move into the call's batch and back out: no copy here.
        let batch: Vec<bindings::Message> = inbox
            .iter_mut()
            .map(|m| bindings::Message {
                sender: m.sender.to_string(),
                kind: wit_kind(m.kind),
                body: std::mem::take(&mut m.body),
            })
            .collect();
        let verdicts = filter.run(&batch).await;
        for (m, b) in inbox.iter_mut().zip(batch) {
            m.body = b.body;
        }
        let verdicts = match verdicts {
            Ok(v) => v,
            Err(why) => {
                let on_failure = filter.on_failure();
                runtime
                    .stats()
                    .filter_unjudged
                    .fetch_add(inbox.len() as u64, Ordering::Relaxed);
                metrics::counter!(
                    "throng_filter_unjudged_total",
                    "tenant" => tenant.to_owned(),
                    "module" => filter.module().hash().short(),
                    "on_failure" => on_failure.as_str(),
                )
                .increment(inbox.len() as u64);
                match on_failure {
                    OnFailure::Open => continue,
                    OnFailure::Closed => {
                        let reason = format!("message filter unavailable: {why}");
                        for m in inbox.drain(..) {
                            let _ = m.reply.send(EdgeFrame::Rejected {
                                client_msg_id: m.client_msg_id,
                                code: ErrorCode::FilterUnavailable.code(),
                                reason: reason.clone(),
                            });
                        }
                        break;
                    }
                }
            }
        };
        let mut kept = Vec::with_capacity(inbox.len());
        for (mut m, verdict) in inbox.into_iter().zip(verdicts) {
            match verdict {
                Verdict::Accept => kept.push(m),
                Verdict::Reject(reason) => {
                    filtered(tenant, filter);
                    let _ = m.reply.send(EdgeFrame::Rejected {
                        client_msg_id: m.client_msg_id,
                        code: ErrorCode::Filtered.code(),
                        reason: reason[..reason.floor_char_boundary(MAX_REASON)].to_owned(),
                    });
                }
                Verdict::Rewrite(body) if body.len() <= max_body as usize => {
                    m.body = body;
                    kept.push(m);
                }
                Verdict::Rewrite(body) => {
                    // A rewrite may not exceed what a client could send;
                    // the original was judged unfit, so it does not go
                    // out either.
                    filtered(tenant, filter);
                    let _ = m.reply.send(EdgeFrame::Rejected {
                        client_msg_id: m.client_msg_id,
                        code: ErrorCode::Filtered.code(),
                        reason: format!(
                            "the filter's rewrite is {} bytes, over the {max_body}-byte body limit",
                            body.len(),
                        ),
                    });
                }
            }
        }
        inbox = kept;
    }
    inbox
}

/// One message a tenant's filter refused.
fn filtered(tenant: &str, filter: &crate::filter::TenantFilter) {
    filter.calls().rejected.fetch_add(1, Ordering::Relaxed);
    metrics::counter!(
        "throng_messages_filtered_total",
        "tenant" => tenant.to_owned(),
        "module" => filter.module().hash().short(),
    )
    .increment(1);
}
