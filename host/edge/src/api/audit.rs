//! `GET /v1/audit?after=<seq>&limit=<n>`: the audit log, oldest first:
//! everything for operators, a tenant's own entries for a tenant; pages
//! as `api::page` makes them (the `x-next-after` header is the last
//! entry's `seq`). `target=`, `who=`, `action=` (or its family, e.g.
//! `deployment`) and `since_ms=` keep only the entries that match.

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::routing::get;
use axum::{Extension, Router};
use serde::Deserialize;

use super::ApiError;
use crate::admin::AdminState;
use crate::control::{AuditEntry, AuditFilter, Caller};

pub(super) fn routes() -> Router<Arc<AdminState>> {
    Router::new().route("/v1/audit", get(audit))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditQuery {
    #[serde(default)]
    after: u64,
    limit: Option<usize>,
    target: Option<String>,
    who: Option<String>,
    action: Option<String>,
    since_ms: Option<u64>,
}

async fn audit(
    State(s): State<Arc<AdminState>>,
    Extension(caller): Extension<Caller>,
    query: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<axum::response::Response, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::invalid("query", e.body_text()))?;
    let limit = super::page_limit(q.limit);
    // One past the page tells whether another follows.
    let only = AuditFilter {
        target: q.target,
        who: q.who,
        action: q.action,
        since_ms: q.since_ms,
    };
    let entries: Vec<AuditEntry> = s.control.audit_log(&caller, q.after, limit + 1, &only)?;
    Ok(super::page(
        entries,
        |e| e.seq,
        |e| e.seq.to_string(),
        None,
        Some(limit),
    ))
}
