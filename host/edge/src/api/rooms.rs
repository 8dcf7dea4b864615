//! What runs where: `GET /v1/rooms` (every live room on this edge the
//! caller may see, by tenant and room; `?tenant=` narrows; pages of
//! `?limit=` (default 1,000, at most 10,000), the next one `?after=` the
//! `x-next-after` header's `tenant/room`), `GET /v1/rooms/<tenant>/<room>`,
//! and `GET /v1/tenants` (the same figures summed per tenant).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::extract::{Path, Query, State};
use axum::routing::get;
use axum::{Extension, Json, Router};
use serde::{Deserialize, Serialize};

use super::ApiError;
use crate::admin::AdminState;
use crate::control::Caller;
use crate::room::{RoomInfo, Running};

pub(super) fn routes() -> Router<Arc<AdminState>> {
    Router::new()
        .route("/v1/rooms", get(list))
        .route("/v1/rooms/{tenant}/{room}", get(show))
        .route("/v1/tenants", get(tenants))
}

/// One room as the API shows it.
#[derive(Debug, Serialize)]
pub(crate) struct RoomView {
    pub tenant: String,
    pub room: String,
    /// `livecast` or `group`.
    pub kind: &'static str,
    pub viewers: u64,
    pub online: u64,
    pub msgs_in: u64,
    pub delivered: u64,
    pub in_per_s: f64,
    pub delivered_per_s: f64,
    pub dropped_by_policy: u64,
    pub filtered: u64,
    pub policy_failures: u64,
    pub running: Running,
    pub created_ms: u64,
}

impl RoomView {
    pub(crate) fn of(i: &RoomInfo) -> Self {
        let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        let (in_per_s, delivered_per_s) = i.rates();
        RoomView {
            tenant: i.key.tenant.to_string(),
            room: i.key.name.to_string(),
            kind: if i.group { "group" } else { "livecast" },
            viewers: load(&i.viewers),
            online: load(&i.online),
            msgs_in: load(&i.msgs_in),
            delivered: load(&i.delivered),
            in_per_s,
            delivered_per_s,
            dropped_by_policy: load(&i.dropped_by_policy),
            filtered: load(&i.filtered),
            policy_failures: load(&i.policy_failures),
            running: i.running(),
            created_ms: i.created_ms,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RoomsQuery {
    tenant: Option<String>,
    /// `tenant/room`: the page starts after it.
    after: Option<String>,
    limit: Option<usize>,
}

/// The tenant `caller` may list: its own, whatever it asked.
fn scope_tenant(caller: &Caller, asked: Option<String>) -> Result<Option<String>, ApiError> {
    match (caller.tenant(), asked) {
        (None, asked) => Ok(asked),
        (Some(me), Some(t)) if t != me => Err(ApiError::forbidden(format!(
            "tenant `{me}` may not list tenant `{}`'s rooms",
            crate::untrusted(&t, 64)
        ))),
        (Some(me), _) => Ok(Some(me.to_owned())),
    }
}

pub(crate) fn room_views(s: &AdminState, tenant: Option<&str>) -> Vec<RoomView> {
    let mut rooms: Vec<RoomView> = s.shared.rooms.infos(tenant).iter().map(|i| RoomView::of(i)).collect();
    rooms.sort_by(|a, b| (&a.tenant, &a.room).cmp(&(&b.tenant, &b.room)));
    rooms
}

async fn list(
    State(s): State<Arc<AdminState>>,
    Extension(caller): Extension<Caller>,
    query: Result<Query<RoomsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<axum::response::Response, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::invalid("query", e.body_text()))?;
    let tenant = scope_tenant(&caller, q.tenant)?;
    let after = super::pair_cursor(q.after, "tenant/room")?;
    Ok(super::page(
        room_views(&s, tenant.as_deref()),
        |r| (r.tenant.clone(), r.room.clone()),
        |r| format!("{}/{}", r.tenant, r.room),
        after,
        q.limit,
    ))
}

async fn show(
    State(s): State<Arc<AdminState>>,
    Extension(caller): Extension<Caller>,
    Path((tenant, room)): Path<(String, String)>,
) -> Result<Json<RoomView>, ApiError> {
    if !caller.may_act_for(&tenant) {
        return Err(ApiError::forbidden(format!(
            "tenant `{}` may not read tenant `{}`'s rooms",
            caller.tenant().unwrap_or_default(),
            crate::untrusted(&tenant, 64)
        )));
    }
    let key = crate::room::RoomKey::new(&tenant, &room);
    s.shared
        .rooms
        .info(&key)
        .map(|i| Json(RoomView::of(&i)))
        .ok_or_else(|| {
            ApiError::not_found(format!(
                "no room `{}` of tenant `{}` alive on this edge",
                crate::untrusted(&room, 64),
                crate::untrusted(&tenant, 64)
            ))
        })
}

/// One tenant's rooms summed.
#[derive(Debug, Default, Serialize)]
pub(crate) struct TenantView {
    pub tenant: String,
    pub rooms: u64,
    pub viewers: u64,
    pub online_users: u64,
    pub msgs_in: u64,
    pub delivered: u64,
    pub in_per_s: f64,
    pub delivered_per_s: f64,
    pub dropped_by_policy: u64,
    pub filtered: u64,
    pub policy_failures: u64,
}

pub(crate) fn tenant_views(s: &AdminState, only: Option<&str>) -> Vec<TenantView> {
    let mut by: BTreeMap<String, TenantView> = BTreeMap::new();
    for t in s.shared.authenticator().tenants() {
        if only.is_none_or(|o| o == t) {
            by.entry(t.clone()).or_insert_with(|| TenantView {
                tenant: t.clone(),
                online_users: s.shared.presence.count(&t) as u64,
                ..TenantView::default()
            });
        }
    }
    for r in room_views(s, only) {
        let t = by.entry(r.tenant.clone()).or_insert_with(|| TenantView {
            tenant: r.tenant.clone(),
            ..TenantView::default()
        });
        t.rooms += 1;
        t.viewers += r.viewers;
        t.msgs_in += r.msgs_in;
        t.delivered += r.delivered;
        t.in_per_s += r.in_per_s;
        t.delivered_per_s += r.delivered_per_s;
        t.dropped_by_policy += r.dropped_by_policy;
        t.filtered += r.filtered;
        t.policy_failures += r.policy_failures;
    }
    by.into_values().collect()
}

async fn tenants(State(s): State<Arc<AdminState>>, Extension(caller): Extension<Caller>) -> Json<Vec<TenantView>> {
    Json(tenant_views(&s, caller.tenant()))
}
