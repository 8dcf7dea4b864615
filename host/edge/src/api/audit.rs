//! `GET /v1/audit?after=<seq>&limit=<n>`: the audit log, oldest first:
//! everything for operators, a tenant's own entries for a tenant.

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::routing::get;
use axum::{Extension, Json, Router};
use serde::Deserialize;

use super::ApiError;
use crate::admin::AdminState;
use crate::control::{AuditEntry, Caller};

pub(super) fn routes() -> Router<Arc<AdminState>> {
    Router::new().route("/v1/audit", get(audit))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditQuery {
    #[serde(default)]
    after: u64,
    limit: Option<usize>,
}

async fn audit(
    State(s): State<Arc<AdminState>>,
    Extension(caller): Extension<Caller>,
    query: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Vec<AuditEntry>>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::invalid("query", e.body_text()))?;
    let limit = q.limit.unwrap_or(1000).min(10_000);
    Ok(Json(s.control.audit_log(&caller, q.after, limit)?))
}
