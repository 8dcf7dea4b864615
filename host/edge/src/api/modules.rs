//! `/v1/modules`: upload a component (checked before it is stored), list
//! and show what the caller may see.
//!
//! Upload: `POST /v1/modules?name=<n>&version=<v>&world=<room-policy|message-filter>&params=<JSON object>`
//! with the component's bytes as the body. 201 with the record when stored,
//! 200 with the first record when the caller stored these bytes before,
//! 422 `module_refused` naming the step (`size`, `compile`, `world`,
//! `instantiate`, `configure`, `self_test`) and the reason.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Extension, Json, Router};
use serde::{Deserialize, Serialize};

use super::ApiError;
use crate::admin::AdminState;
use crate::control::{Caller, ControlError, ModuleRecord, Upload, World};

pub(super) fn routes() -> Router<Arc<AdminState>> {
    Router::new()
        .route("/v1/modules", get(list).post(upload))
        // `{module}`: `sha256:<hex>`, its hex alone, a unique prefix of
        // it, or `name@version`.
        .route("/v1/modules/{module}", get(show))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UploadQuery {
    name: String,
    version: String,
    world: String,
    /// A JSON object of string values: what `configure` is checked with.
    #[serde(default)]
    params: Option<String>,
}

#[derive(Serialize)]
struct Uploaded {
    created: bool,
    module: ModuleRecord,
}

async fn upload(
    State(s): State<Arc<AdminState>>,
    Extension(caller): Extension<Caller>,
    query: Result<Query<UploadQuery>, axum::extract::rejection::QueryRejection>,
    body: Body,
) -> Result<impl IntoResponse, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::invalid("query", e.body_text()))?;
    let world = match q.world.as_str() {
        "room-policy" => World::RoomPolicy,
        "message-filter" => World::MessageFilter,
        other => {
            return Err(ApiError::invalid(
                "world",
                format!(
                    "`{}`: expected room-policy or message-filter",
                    crate::untrusted(other, 40)
                ),
            ));
        }
    };
    let params: BTreeMap<String, String> = match &q.params {
        None => BTreeMap::new(),
        Some(text) => serde_json::from_str(text)
            .map_err(|e| ApiError::invalid("params", format!("a JSON object of string values: {e}")))?,
    };
    // The read stops one byte past the caller's own limit (a tenant's
    // quota), so an oversized upload costs that much memory at most.
    let limit = s.control.max_upload_bytes(&caller);
    let _turn = s.control.upload_turn(&caller).await?;
    let deadline = crate::control::UPLOAD_BODY_DEADLINE;
    let bytes = tokio::time::timeout(deadline, axum::body::to_bytes(body, limit + 1))
        .await
        .map_err(|_| {
            ApiError::from(ControlError::invalid(
                "body",
                format!("the module's bytes did not arrive within {deadline:?}"),
            ))
        })?
        .map_err(|_| {
            ApiError::from(ControlError::Refused {
                step: "size",
                reason: format!("module is over {limit} bytes, the most this caller may upload"),
            })
        })?;
    let (module, created) = s
        .control
        .upload(
            &caller,
            Upload {
                name: q.name,
                version: q.version,
                world,
                params,
            },
            Vec::from(bytes),
        )
        .await?;
    let status = if created { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, Json(Uploaded { created, module })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    /// `<owner>/<sha256>`: the page starts after it.
    after: Option<String>,
    limit: Option<usize>,
}

/// By owner and sha256, in pages (see `api::page`).
async fn list(
    State(s): State<Arc<AdminState>>,
    Extension(caller): Extension<Caller>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<axum::response::Response, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::invalid("query", e.body_text()))?;
    let mut modules = s.control.modules(&caller)?;
    modules.sort_by(|a, b| (&a.owner, &a.sha256).cmp(&(&b.owner, &b.sha256)));
    let after = super::pair_cursor(q.after, "<owner>/<sha256>")?;
    Ok(super::page(
        modules,
        |m| (m.owner.clone(), m.sha256.clone()),
        |m| format!("{}/{}", m.owner, m.sha256),
        after,
        q.limit,
    ))
}

async fn show(
    State(s): State<Arc<AdminState>>,
    Extension(caller): Extension<Caller>,
    Path(reference): Path<String>,
) -> Result<Json<Vec<ModuleRecord>>, ApiError> {
    Ok(Json(s.control.module(&caller, &reference)?))
}
