//! One picture of the edge for the dashboard: `GET /v1/overview` (JSON)
//! and `GET /v1/events` (the same picture as server-sent events, once a
//! second). Scoped like everything else: a tenant sees its own rooms,
//! modules, deployments and quarantines only.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::routing::get;
use axum::{Extension, Json, Router};
use serde::Serialize;

use super::ApiError;
use super::rooms::{RoomView, TenantView, room_views, tenant_views};
use crate::admin::AdminState;
use crate::control::{Caller, ModuleRecord, ScopeSummary};

pub(super) fn routes() -> Router<Arc<AdminState>> {
    Router::new()
        .route("/v1/overview", get(overview))
        .route("/v1/events", get(events))
}

/// Rooms shown at most, busiest first.
const MAX_ROOMS: usize = 500;
/// An event stream ends after this; the page opens a new one (the admin
/// listener closes every connection after its deadline anyway).
const STREAM_FOR: Duration = Duration::from_secs(60);

#[derive(Debug, Serialize)]
pub(crate) struct Overview {
    pub edge: EdgeView,
    pub tenants: Vec<TenantView>,
    /// Busiest first, at most 500.
    pub rooms: Vec<RoomView>,
    pub rooms_total: usize,
    pub modules: Vec<ModuleUse>,
    pub deployments: Vec<ScopeSummary>,
    pub quarantined: Vec<crate::admin::Quarantined>,
    /// What each tenant filter did.
    pub filters: Vec<super::filters::FilterView>,
    /// Every live edge of the cluster and what it runs; absent on a single edge.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<crate::cluster::ClusterSnapshot>,
    /// Which edge runs which version of each scope the caller may see.
    pub deployed: crate::control::EdgesView,
}

#[derive(Debug, Serialize)]
pub(crate) struct EdgeView {
    pub edge_id: Option<String>,
    pub region: Option<String>,
    pub uptime_s: f64,
    pub connections: u64,
    pub rooms: usize,
    /// Who is looking: `operator:<name>` or `tenant:<id>/<user>`.
    pub caller: String,
    pub at_ms: u64,
}

/// A module and where it runs on this edge.
#[derive(Debug, Serialize)]
pub(crate) struct ModuleUse {
    #[serde(flatten)]
    pub record: ModuleRecord,
    /// Live rooms running it (as their policy or one of their filters).
    pub rooms: u64,
    pub viewers: u64,
}

pub(crate) fn picture(s: &AdminState, caller: &Caller) -> Result<Overview, ApiError> {
    let only = caller.tenant();
    let mut rooms = room_views(s, only);
    let rooms_total = rooms.len();
    let modules = s
        .control
        .modules(caller)?
        .into_iter()
        .map(|record| {
            let tag = format!("sha256:{}", record.sha256);
            let using = rooms
                .iter()
                .filter(|r| r.running.policy == tag || r.running.filters.contains(&tag))
                .filter(|r| record.tenant().is_none_or(|t| t == r.tenant));
            let (n, viewers) = using.fold((0, 0), |(n, v), r| (n + 1, v + r.viewers));
            ModuleUse {
                record,
                rooms: n,
                viewers,
            }
        })
        .collect();
    rooms.sort_by(|a, b| b.viewers.cmp(&a.viewers).then(b.in_per_s.total_cmp(&a.in_per_s)));
    rooms.truncate(MAX_ROOMS);
    let quarantined = crate::admin::quarantined(&s.wasm, only);
    let cluster = s.shared.cluster.as_ref().map(|c| c.snapshot());
    Ok(Overview {
        edge: EdgeView {
            edge_id: cluster.as_ref().map(|c| c.edge_id.clone()),
            region: cluster.as_ref().map(|c| c.region.clone()),
            uptime_s: s.started.elapsed().as_secs_f64(),
            connections: s.shared.open_connections.load(Ordering::Relaxed),
            rooms: s.shared.rooms.len(),
            caller: caller.who(),
            at_ms: crate::unix_now_ms(),
        },
        tenants: tenant_views(s, only),
        rooms,
        rooms_total,
        modules,
        deployments: s.control.scope_summaries(caller)?,
        quarantined,
        filters: super::filters::filter_views(s, caller),
        // Which edges exist is the operators' business.
        cluster: if caller.is_operator() { cluster } else { None },
        deployed: super::deployments::edges_view(s, caller)?,
    })
}

async fn overview(
    State(s): State<Arc<AdminState>>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Overview>, ApiError> {
    Ok(Json(picture(&s, &caller)?))
}

/// `/v1/events` streams one caller (a tenant, or one operator) may hold
/// open on an edge; the dashboard needs one per tab.
pub(crate) const MAX_STREAMS_PER_CALLER: usize = 2;
/// All callers' streams at most: well under the admin listener's 32
/// connections, so streams never take every one.
pub(crate) const MAX_STREAMS: usize = 8;

/// One open event stream, counted for its caller until dropped.
struct StreamTurn {
    streams: Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
    who: String,
}

impl Drop for StreamTurn {
    fn drop(&mut self) {
        let mut streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = streams.get_mut(&self.who) {
            *n -= 1;
            if *n == 0 {
                streams.remove(&self.who);
            }
        }
    }
}

fn stream_turn(s: &AdminState, caller: &Caller) -> Result<StreamTurn, ApiError> {
    let who = if caller.is_operator() {
        caller.who()
    } else {
        caller.owner()
    };
    let mut streams = s.event_streams.lock().unwrap_or_else(|e| e.into_inner());
    let mine = streams.get(&who).copied().unwrap_or(0);
    let all: usize = streams.values().sum();
    if mine >= MAX_STREAMS_PER_CALLER || all >= MAX_STREAMS {
        // 429, not 403: the dashboard retries later rather than ask for a key.
        return Err(ApiError::new(
            axum::http::StatusCode::TOO_MANY_REQUESTS,
            "too_many_streams",
            format!(
                "{who} has {mine} event streams open on this edge (at most {MAX_STREAMS_PER_CALLER}; \
                 {all} of {MAX_STREAMS} in all); close one or poll /v1/overview"
            ),
        ));
    }
    *streams.entry(who.clone()).or_insert(0) += 1;
    Ok(StreamTurn {
        streams: Arc::clone(&s.event_streams),
        who,
    })
}

async fn events(
    State(s): State<Arc<AdminState>>,
    Extension(caller): Extension<Caller>,
) -> Result<Sse<impl futures::Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let turn = stream_turn(&s, &caller)?;
    let started = Instant::now();
    let stream = futures::stream::unfold((s, caller, true, turn), move |(s, caller, first, turn)| async move {
        if !first {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        if started.elapsed() > STREAM_FOR || s.shared.shutdown.is_cancelled() {
            return None;
        }
        let event = match picture(&s, &caller) {
            Ok(p) => Event::default()
                .event("overview")
                .json_data(&p)
                .unwrap_or_else(|_| Event::default().event("error").data("cannot encode")),
            Err(e) => Event::default().event("error").data(format!("{e:?}")),
        };
        Some((Ok(event), (s, caller, false, turn)))
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}
