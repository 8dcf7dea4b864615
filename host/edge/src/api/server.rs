//! The server API for tenants' backends (as Centrifugo offers one): publish
//! into a room, disconnect a user, ask who is online, read a group room's
//! history. Rooms and presence are read through `rooms` and these routes;
//! a tenant's token reaches its own tenant only.
//!
//! - `POST /v1/rooms/<tenant>/<room>/publish`: `{"kind": "system"|"host",
//!   "body": "...", "sender": "..."}` → `{"seq": n}` once the room's tick
//!   accepted it (filters judge it like any message);
//! - `POST /v1/tenants/<tenant>/users/<user>/disconnect`: `{"reason": "..."}`
//!   → `{"connections": n}` closed with `Disconnected` (42), on every
//!   edge of the cluster;
//! - `POST /v1/tenants/<tenant>/presence`: `{"users": [...]}` (up to 10,000)
//!   → `{"online": [bool...], "online_users": n}` (every edge of a cluster);
//! - `GET /v1/rooms/<tenant>/<room>/history?from=&to=&limit=`: a group
//!   room's messages with `from <= seq <= to`, oldest first.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde::{Deserialize, Serialize};
use throng_wire::{EdgeFrame, Kind};

use super::{ApiError, json_body};
use crate::admin::AdminState;
use crate::control::{AuditEntry, Caller, ControlError};
use crate::room::{Inbound, ReplyTx, RoomKey};

pub(super) fn routes() -> Router<Arc<AdminState>> {
    Router::new()
        .route("/v1/rooms/{tenant}/{room}/publish", post(publish))
        .route("/v1/rooms/{tenant}/{room}/history", get(history))
        .route("/v1/tenants/{tenant}/users/{user}/disconnect", post(disconnect))
        .route("/v1/tenants/{tenant}/presence", post(presence))
}

/// How long a publish waits for the room's tick to answer.
const PUBLISH_WAIT: Duration = Duration::from_secs(5);
/// Most messages one history read returns.
const MAX_HISTORY: usize = 1000;

fn for_tenant(caller: &Caller, tenant: &str) -> Result<(), ApiError> {
    if caller.may_act_for(tenant) {
        Ok(())
    } else {
        Err(ApiError::forbidden(format!(
            "tenant `{}` may not act for tenant `{}`",
            caller.tenant().unwrap_or_default(),
            crate::untrusted(tenant, 64)
        )))
    }
}

fn known(s: &AdminState, tenant: &str) -> Result<(), ApiError> {
    if s.shared.authenticator().tenants().iter().any(|t| t == tenant) {
        Ok(())
    } else {
        Err(ApiError::not_found(format!(
            "no tenant `{}`",
            crate::untrusted(tenant, 64)
        )))
    }
}

fn room_key(tenant: &str, room: &str) -> Result<RoomKey, ApiError> {
    throng_wire::validate_room_name(room).map_err(|e| ApiError::invalid("room", e))?;
    Ok(RoomKey::new(tenant, room))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Publish {
    kind: String,
    body: String,
    /// Shown as the message's sender (default `backend`).
    sender: Option<String>,
}

#[derive(Debug, Serialize)]
struct Published {
    seq: u64,
    /// The numbering `seq` is of (as in `Joined` and `Batch`).
    epoch: u64,
}

async fn publish(
    State(s): State<Arc<AdminState>>,
    Extension(caller): Extension<Caller>,
    Path((tenant, room)): Path<(String, String)>,
    body: Body,
) -> Result<Json<Published>, ApiError> {
    for_tenant(&caller, &tenant)?;
    known(&s, &tenant)?;
    let key = room_key(&tenant, &room)?;
    let p: Publish = json_body(body).await?;
    let kind = match p.kind.as_str() {
        "system" => Kind::System,
        "host" => Kind::Host,
        other => {
            return Err(ApiError::invalid(
                "kind",
                format!(
                    "`{}`: the server API publishes system or host messages",
                    crate::untrusted(other, 20)
                ),
            ));
        }
    };
    let max = s.shared.config.limits.max_body_bytes as usize;
    if p.body.len() > max {
        return Err(ApiError::invalid(
            "body",
            format!("{} bytes; the limit is {max}", p.body.len()),
        ));
    }
    let sender = p.sender.unwrap_or_else(|| "backend".into());
    if sender.is_empty() || sender.len() > crate::auth::MAX_SUB_BYTES || sender.chars().any(char::is_control) {
        return Err(ApiError::invalid("sender", "1 to 256 bytes, no control characters"));
    }
    let (reply, mut answers) = ReplyTx::channel(4, || {});
    let inbound = Inbound {
        sender: Arc::from(sender.as_str()),
        kind,
        body: p.body.into_bytes(),
        client_msg_id: 1,
        reply,
        received_ms: crate::unix_now_ms(),
        hops: 0,
    };
    s.shared
        .rooms
        .peer_send(&key, inbound)
        .map_err(|(_, e)| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "room_unavailable", e.to_string()))?;
    metrics::counter!("throng_api_published_total", "tenant" => tenant.clone()).increment(1);
    match tokio::time::timeout(PUBLISH_WAIT, answers.recv()).await {
        Ok(Some(frame)) => match *frame {
            EdgeFrame::Ack { seq, epoch, .. } => Ok(Json(Published { seq, epoch })),
            EdgeFrame::Rejected { code, reason, .. } => Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "rejected",
                format!("the room refused it (code {code}): {reason}"),
            )),
            other => Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                format!("unexpected answer {other:?}"),
            )),
        },
        _ => Err(ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "timeout",
            "the room did not answer in 5 s",
        )),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Disconnect {
    reason: Option<String>,
}

#[derive(Debug, Serialize)]
struct Disconnected {
    /// Sessions closed, on this edge and the others that answered.
    connections: usize,
    /// In a cluster: live edges that did not answer in time (the order
    /// was sent to them all the same).
    #[serde(skip_serializing_if = "Option::is_none")]
    unanswered_edges: Option<usize>,
}

async fn disconnect(
    State(s): State<Arc<AdminState>>,
    Extension(caller): Extension<Caller>,
    Path((tenant, user)): Path<(String, String)>,
    body: Body,
) -> Result<Json<Disconnected>, ApiError> {
    for_tenant(&caller, &tenant)?;
    known(&s, &tenant)?;
    let bytes = axum::body::to_bytes(body, 4096)
        .await
        .map_err(|_| ApiError::invalid("(body)", "too large"))?;
    let d: Disconnect = if bytes.iter().all(u8::is_ascii_whitespace) {
        Disconnect::default()
    } else {
        json_body(Body::from(bytes)).await?
    };
    let reason = crate::untrusted(d.reason.as_deref().unwrap_or("disconnected by the service"), 200);
    let mut n = s.shared.kicks.kick(&crate::rate_key(&tenant, &user), &reason);
    let mut unanswered = None;
    if let Some(links) = s.shared.links.clone() {
        let (elsewhere, missing) = links.disconnect(&tenant, &user, &reason).await.ok_or_else(|| {
            ApiError::from(ControlError::Unavailable(
                "too many cluster-wide queries under way on this edge; retry".into(),
            ))
        })?;
        n += elsewhere;
        unanswered = Some(missing);
    }
    let mut entry = AuditEntry::new(&caller.who(), "user.disconnect", format!("{tenant}/{user}"));
    entry.tenant = Some(tenant.clone());
    entry.detail = Some(format!("{n} connections: {reason}"));
    s.control.record(entry)?;
    Ok(Json(Disconnected {
        connections: n,
        unanswered_edges: unanswered,
    }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PresenceQuery {
    users: Vec<String>,
}

#[derive(Debug, Serialize)]
struct PresenceAnswer {
    online: Vec<bool>,
    /// Users of the tenant online on this edge.
    online_users: usize,
}

async fn presence(
    State(s): State<Arc<AdminState>>,
    Extension(caller): Extension<Caller>,
    Path(tenant): Path<String>,
    body: Body,
) -> Result<Json<PresenceAnswer>, ApiError> {
    for_tenant(&caller, &tenant)?;
    known(&s, &tenant)?;
    let q: PresenceQuery = json_body(body).await?;
    if q.users.len() > crate::presence::MAX_QUERY_USERS {
        return Err(ApiError::invalid(
            "users",
            format!("{} users; at most {}", q.users.len(), crate::presence::MAX_QUERY_USERS),
        ));
    }
    let here = s.shared.presence.query(&tenant, &q.users);
    let online = match s.shared.links.clone() {
        None => here,
        Some(links) => links.who_is_online(&tenant, q.users, here).await.ok_or_else(|| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "busy",
                "too many presence queries under way; try again",
            )
        })?,
    };
    Ok(Json(PresenceAnswer {
        online,
        online_users: s.shared.presence.count(&tenant),
    }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HistoryQuery {
    #[serde(default)]
    from: u64,
    to: Option<u64>,
    limit: Option<usize>,
}

#[derive(Debug, Serialize)]
struct HistoryMessage {
    seq: u64,
    sender: String,
    kind: &'static str,
    body: String,
}

async fn history(
    State(s): State<Arc<AdminState>>,
    Extension(caller): Extension<Caller>,
    Path((tenant, room)): Path<(String, String)>,
    query: Result<Query<HistoryQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Vec<HistoryMessage>>, ApiError> {
    for_tenant(&caller, &tenant)?;
    known(&s, &tenant)?;
    room_key(&tenant, &room)?;
    let Query(q) = query.map_err(|e| ApiError::invalid("query", e.body_text()))?;
    if !s.shared.rooms.is_group(&room) {
        return Err(ApiError::invalid(
            "room",
            "a livecast room keeps no history; history is for group rooms (rooms.group_rooms)",
        ));
    }
    let limit = q.limit.unwrap_or(100).min(MAX_HISTORY);
    let messages = s
        .shared
        .rooms
        .group_log()
        .read(&tenant, &room, q.from, q.to.unwrap_or(u64::MAX), limit)
        .await
        .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "log_unavailable", e.to_string()))?;
    Ok(Json(
        messages
            .into_iter()
            .map(|m| HistoryMessage {
                seq: m.seq,
                sender: m.sender,
                kind: kind_name(m.kind),
                body: String::from_utf8_lossy(&m.body).into_owned(),
            })
            .collect(),
    ))
}

fn kind_name(k: Kind) -> &'static str {
    match k {
        Kind::Chat => "chat",
        Kind::Like => "like",
        Kind::Gift => "gift",
        Kind::Host => "host",
        Kind::System => "system",
    }
}
