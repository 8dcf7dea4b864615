//! `/v1/deployments`: each scope's versions, activation and rollback.
//!
//! A scope is `policies` (operators) or `filters/<tenant>` (that tenant, or
//! an operator):
//!
//! - `GET  /v1/deployments`: every scope the caller may see, with what is
//!   active, by scope in pages (`?limit=`, `?after=<scope>`);
//! - `GET  /v1/deployments/<scope>`: one scope, every version;
//! - `POST /v1/deployments/<scope>`: a new version
//!   (`{"policies": [...]}` or `{"filters": [...]}`, and an optional
//!   `note`); with `"activate": <percent>` it is activated at once;
//!   Instead of a whole set, `{"add": <rule or filter>}` or `{"remove":
//!   <selector>}` changes one entry of the active set and keeps the rest
//!   (a policy rule is named by `tenant`, `rooms` and `class`; a filter by
//!   `module`). `"dry_run": true` creates nothing and answers with the
//!   resulting set and the live rooms on this edge it would change;
//! - `GET  /v1/deployments/<scope>/<version>`;
//! - `POST /v1/deployments/<scope>/activate`: `{"version": v, "percent": p}`
//!   (p below 100 rolls out to that share of rooms, by a hash of the room;
//!   activating the same version with a larger share widens it);
//! - `POST /v1/deployments/<scope>/rollback`: `{"to": v}` or `{}` (the
//!   version before);
//! - `GET  /v1/deployments/edges`: which edge runs which version of each
//!   scope, against what is in force (in a cluster, every edge's report).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde::{Deserialize, Serialize};

use super::{ApiError, json_body};
use crate::admin::AdminState;
use crate::control::spec::{Activation, Change, Deployment, FilterUse, PolicyRule, RuleSelector, Scope, Spec};
use crate::control::{Caller, EdgesView, ScopeStatus};

pub(super) fn routes() -> Router<Arc<AdminState>> {
    Router::new()
        .route("/v1/deployments", get(all))
        .route("/v1/deployments/edges", get(edges))
        .route("/v1/deployments/policies", get(policies_status).post(policies_create))
        .route("/v1/deployments/policies/activate", post(policies_activate))
        .route("/v1/deployments/policies/rollback", post(policies_rollback))
        .route("/v1/deployments/policies/{version}", get(policies_version))
        .route(
            "/v1/deployments/filters/{tenant}",
            get(filters_status).post(filters_create),
        )
        .route("/v1/deployments/filters/{tenant}/activate", post(filters_activate))
        .route("/v1/deployments/filters/{tenant}/rollback", post(filters_rollback))
        .route("/v1/deployments/filters/{tenant}/{version}", get(filters_version))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Create {
    policies: Option<Vec<PolicyRule>>,
    filters: Option<Vec<FilterUse>>,
    /// One rule (or filter) into the active set, the rest kept.
    add: Option<serde_json::Value>,
    /// One rule (or filter) out of the active set, the rest kept.
    remove: Option<serde_json::Value>,
    /// Answer with the resulting set and the rooms it changes; create
    /// nothing.
    #[serde(default)]
    dry_run: bool,
    note: Option<String>,
    /// Activate at once on this share of rooms (100: all).
    activate: Option<u8>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Activate {
    version: u64,
    #[serde(default = "hundred")]
    percent: u8,
}

fn hundred() -> u8 {
    100
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Rollback {
    to: Option<u64>,
}

#[derive(Serialize)]
struct Created {
    deployment: Deployment,
    #[serde(skip_serializing_if = "Option::is_none")]
    active: Option<Activation>,
    /// The version a rule-level change was made from.
    #[serde(skip_serializing_if = "Option::is_none")]
    based_on: Option<u64>,
}

fn filters_scope(tenant: &str) -> Result<Scope, ApiError> {
    Scope::parse(&format!("filters/{tenant}")).ok_or_else(|| ApiError::invalid("tenant", "not a tenant id"))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    /// A scope (`policies`, `filters/<tenant>`): the page starts after it.
    after: Option<String>,
    limit: Option<usize>,
}

/// By scope, in pages (see `api::page`): an operator's edge may hold
/// every tenant's scope, each with its kept versions.
async fn all(
    State(s): State<Arc<AdminState>>,
    Extension(caller): Extension<Caller>,
    query: Result<axum::extract::Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<axum::response::Response, ApiError> {
    let axum::extract::Query(q) = query.map_err(|e| ApiError::invalid("query", e.body_text()))?;
    let mut scopes = s
        .control
        .scopes(&caller, q.after.as_deref(), super::page_limit(q.limit) + 1)?;
    scopes.sort_by(|a, b| a.scope.cmp(&b.scope));
    Ok(super::page(
        scopes,
        |st| st.scope.clone(),
        |st| st.scope.clone(),
        None,
        q.limit,
    ))
}

async fn edges(
    State(s): State<Arc<AdminState>>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<EdgesView>, ApiError> {
    Ok(Json(edges_view(&s, &caller)?))
}

/// [`crate::control::ControlPlane::edges`], each edge marked live or not
/// from the cluster's membership.
pub(super) fn edges_view(s: &AdminState, caller: &Caller) -> Result<EdgesView, ApiError> {
    let mut view = s.control.edges(caller)?;
    if let Some(c) = &s.shared.cluster {
        let live = c.live();
        for e in &mut view.edges {
            e.live = Some(live.contains(&e.report.edge_id));
        }
    }
    Ok(view)
}

async fn status(s: &AdminState, caller: &Caller, scope: &Scope) -> Result<Json<ScopeStatus>, ApiError> {
    Ok(Json(s.control.status(caller, scope)?))
}

async fn create(
    s: &AdminState,
    caller: &Caller,
    scope: &Scope,
    body: Body,
) -> Result<impl IntoResponse + use<>, ApiError> {
    let c: Create = json_body(body).await?;
    let whole = match (c.policies, c.filters, scope) {
        (None, None, _) => None,
        (Some(p), None, Scope::Policies) => Some(s.control.resolve_spec(scope, Spec::Policies(p))?),
        (None, Some(f), Scope::Filters(_)) => Some(s.control.resolve_spec(scope, Spec::Filters(f))?),
        (_, _, Scope::Policies) => {
            return Err(ApiError::invalid(
                "policies",
                "the policies scope takes `policies` only",
            ));
        }
        (_, _, Scope::Filters(_)) => return Err(ApiError::invalid("filters", "a filters scope takes `filters` only")),
    };
    let status = s.control.status(caller, scope)?;
    let based_on = status.active.as_ref().map(|a| a.version);
    let base = based_on
        .and_then(|v| status.versions.iter().find(|d| d.version == v))
        .map(|d| d.spec.clone())
        .unwrap_or_else(|| match scope {
            Scope::Policies => Spec::Policies(Vec::new()),
            Scope::Filters(_) => Spec::Filters(Vec::new()),
        });
    let removing = c.remove.is_some();
    let change = match (c.add, c.remove) {
        (None, None) => None,
        (Some(_), Some(_)) => return Err(ApiError::invalid("remove", "one change at a time: `add` or `remove`")),
        // Modules named by name@version or a hash prefix are named by
        // their whole hash before they are compared with the active set.
        (Some(add), None) => Some(match scope {
            Scope::Policies => {
                let mut rule: PolicyRule = entry("add", add)?;
                rule.module = s.control.resolve_module(scope, "add.module", &rule.module)?;
                Change::AddRule(rule)
            }
            Scope::Filters(_) => {
                let mut filter: FilterUse = entry("add", add)?;
                filter.module = s.control.resolve_module(scope, "add.module", &filter.module)?;
                Change::AddFilter(filter)
            }
        }),
        (None, Some(remove)) => Some(match scope {
            Scope::Policies => Change::RemoveRule(entry::<RuleSelector>("remove", remove)?),
            Scope::Filters(_) => {
                let named = entry::<FilterName>("remove", remove)?.module;
                Change::RemoveFilter(s.control.resolve_module(scope, "remove.module", &named)?)
            }
        }),
    };
    let spec = match (whole, change) {
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid(
                "add",
                "either a whole set (`policies` or `filters`) or one change (`add` or `remove`)",
            ));
        }
        (None, None) => {
            return Err(ApiError::invalid(
                "(body)",
                "give a whole set (`policies` or `filters`) or one change (`add` or `remove`)",
            ));
        }
        (Some(spec), None) => spec,
        (None, Some(change)) => base.changed(change).map_err(|e| {
            let field = if removing { "remove" } else { "add" };
            ApiError::invalid(field, e)
        })?,
    };
    if c.dry_run {
        let (rooms_changing, total) = rooms_changing(s, scope, &base, &spec);
        let body = DryRun {
            dry_run: true,
            scope: scope.key(),
            based_on,
            set: spec,
            rooms_changing,
            rooms_changing_total: total,
        };
        return Ok((StatusCode::OK, Json(serde_json::to_value(body).unwrap_or_default())));
    }
    let deployment = s.control.create(caller, scope, spec, c.note).await?;
    let active = match c.activate {
        None => None,
        Some(p) => Some(s.control.activate(caller, scope, deployment.version, p).await?),
    };
    let created = Created {
        deployment,
        active,
        based_on,
    };
    Ok((
        StatusCode::CREATED,
        Json(serde_json::to_value(created).unwrap_or_default()),
    ))
}

/// `field`'s value as a `T`, or an error naming the field inside it.
fn entry<T: serde::de::DeserializeOwned>(field: &str, v: serde_json::Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        let at = if path == "." {
            field.to_owned()
        } else {
            format!("{field}.{path}")
        };
        ApiError::invalid(at, crate::untrusted(&e.inner().to_string(), 200))
    })
}

/// Names a filter to remove from a chain.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FilterName {
    module: String,
}

/// Rooms listed by a dry run, at most.
const DRY_RUN_ROOMS: usize = 1000;

/// Live rooms on this edge whose policy (or filter chain) `new` changes
/// from `old`, as `tenant/room`: the first [`DRY_RUN_ROOMS`], and how many.
fn rooms_changing(s: &AdminState, scope: &Scope, old: &Spec, new: &Spec) -> (Vec<String>, usize) {
    let mut rooms: Vec<String> = s
        .shared
        .rooms
        .infos(scope.tenant())
        .iter()
        .filter(|i| match (old, new) {
            (Spec::Policies(a), Spec::Policies(b)) => {
                // Group rooms deliver everything: policies are not theirs.
                let class = i.running().class;
                let pick = |rules: &[PolicyRule]| {
                    rules
                        .iter()
                        .find(|r| r.matches(&i.key.tenant, &i.key.name, &class))
                        .cloned()
                };
                !i.group && pick(a) != pick(b)
            }
            (a, b) => a != b,
        })
        .map(|i| format!("{}/{}", i.key.tenant, i.key.name))
        .collect();
    rooms.sort();
    let total = rooms.len();
    rooms.truncate(DRY_RUN_ROOMS);
    (rooms, total)
}

#[derive(Serialize)]
struct DryRun {
    dry_run: bool,
    scope: String,
    /// The active version the set was made from (none: no active one).
    based_on: Option<u64>,
    set: Spec,
    rooms_changing: Vec<String>,
    rooms_changing_total: usize,
}

async fn version(s: &AdminState, caller: &Caller, scope: &Scope, version: u64) -> Result<Json<Deployment>, ApiError> {
    Ok(Json(s.control.deployment(caller, scope, version)?))
}

async fn activate(s: &AdminState, caller: &Caller, scope: &Scope, body: Body) -> Result<Json<Activation>, ApiError> {
    let a: Activate = json_body(body).await?;
    Ok(Json(s.control.activate(caller, scope, a.version, a.percent).await?))
}

async fn rollback(s: &AdminState, caller: &Caller, scope: &Scope, body: Body) -> Result<Json<Activation>, ApiError> {
    let bytes = axum::body::to_bytes(body, 4096)
        .await
        .map_err(|_| ApiError::invalid("(body)", "too large"))?;
    let r: Rollback = if bytes.iter().all(u8::is_ascii_whitespace) {
        Rollback::default()
    } else {
        json_body(Body::from(bytes)).await?
    };
    Ok(Json(s.control.rollback(caller, scope, r.to).await?))
}

async fn policies_status(
    State(s): State<Arc<AdminState>>,
    Extension(c): Extension<Caller>,
) -> Result<Json<ScopeStatus>, ApiError> {
    status(&s, &c, &Scope::Policies).await
}

async fn policies_create(
    State(s): State<Arc<AdminState>>,
    Extension(c): Extension<Caller>,
    body: Body,
) -> Result<impl IntoResponse, ApiError> {
    create(&s, &c, &Scope::Policies, body).await
}

async fn policies_version(
    State(s): State<Arc<AdminState>>,
    Extension(c): Extension<Caller>,
    Path(v): Path<u64>,
) -> Result<Json<Deployment>, ApiError> {
    version(&s, &c, &Scope::Policies, v).await
}

async fn policies_activate(
    State(s): State<Arc<AdminState>>,
    Extension(c): Extension<Caller>,
    body: Body,
) -> Result<Json<Activation>, ApiError> {
    activate(&s, &c, &Scope::Policies, body).await
}

async fn policies_rollback(
    State(s): State<Arc<AdminState>>,
    Extension(c): Extension<Caller>,
    body: Body,
) -> Result<Json<Activation>, ApiError> {
    rollback(&s, &c, &Scope::Policies, body).await
}

async fn filters_status(
    State(s): State<Arc<AdminState>>,
    Extension(c): Extension<Caller>,
    Path(t): Path<String>,
) -> Result<Json<ScopeStatus>, ApiError> {
    status(&s, &c, &filters_scope(&t)?).await
}

async fn filters_create(
    State(s): State<Arc<AdminState>>,
    Extension(c): Extension<Caller>,
    Path(t): Path<String>,
    body: Body,
) -> Result<impl IntoResponse, ApiError> {
    create(&s, &c, &filters_scope(&t)?, body).await
}

async fn filters_version(
    State(s): State<Arc<AdminState>>,
    Extension(c): Extension<Caller>,
    Path((t, v)): Path<(String, u64)>,
) -> Result<Json<Deployment>, ApiError> {
    version(&s, &c, &filters_scope(&t)?, v).await
}

async fn filters_activate(
    State(s): State<Arc<AdminState>>,
    Extension(c): Extension<Caller>,
    Path(t): Path<String>,
    body: Body,
) -> Result<Json<Activation>, ApiError> {
    activate(&s, &c, &filters_scope(&t)?, body).await
}

async fn filters_rollback(
    State(s): State<Arc<AdminState>>,
    Extension(c): Extension<Caller>,
    Path(t): Path<String>,
    body: Body,
) -> Result<Json<Activation>, ApiError> {
    rollback(&s, &c, &filters_scope(&t)?, body).await
}
