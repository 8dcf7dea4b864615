//! The admin API (`/v1`) on the admin listener: JSON in and out, one file
//! per resource, one error type with a stable code, and authentication as
//! a layer in front of every route but `/metrics` and `/healthz`.
//!
//! Callers: operators, with a key from edge-config (`[control] operators`),
//! and tenants' administrators, with a JWT signed by their tenant's key
//! whose role is `tenant-admin`; a tenant sees and changes only its own
//! modules, filters and rooms. Both send `Authorization: Bearer <...>`.
//!
//! - `modules`: upload (checked step by step), list, show.
//! - `deployments`: versions per scope, activate (at once or for a share
//!   of rooms), roll back.
//! - `audit`: the audit log.
//! - `filters`: what each tenant filter did (calls, failures, quarantine,
//!   latency).
//! - `rooms`: what runs where, per room and tenant.
//! - `server`: the server API for tenants' backends: publish, disconnect,
//!   presence, group history.
//! - `overview`: the dashboard's picture, as JSON and as server-sent events.
//! - `demo`: the WebTransport demo page (open, like the dashboard).

mod audit;
pub(crate) mod demo;
mod deployments;
mod filters;
mod modules;
mod overview;
mod rooms;
mod server;

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};

use crate::admin::AdminState;
use crate::control::{Caller, ControlError};

/// Largest JSON request body.
const MAX_JSON_BYTES: usize = 1 << 20;

/// Entries of a listing page unless `limit` says otherwise, and at most.
const PAGE_DEFAULT: usize = 1000;
const PAGE_MAX: usize = 10_000;

/// The header naming the cursor of the next page (`?after=` it), present
/// only when more entries follow.
pub(crate) const NEXT_PAGE: &str = "x-next-after";

/// One page of `items`, which are sorted by `key`: those whose key is
/// after `after`, at most `limit` (default [`PAGE_DEFAULT`], at most
/// [`PAGE_MAX`]), as a JSON array, with [`NEXT_PAGE`] when more follow.
pub(crate) fn page<T: Serialize, K: Ord>(
    items: Vec<T>,
    key: impl Fn(&T) -> K,
    cursor: impl Fn(&T) -> String,
    after: Option<K>,
    limit: Option<usize>,
) -> Response {
    let limit = page_limit(limit);
    let mut rest: Vec<T> = match &after {
        None => items,
        Some(a) => items.into_iter().filter(|i| key(i) > *a).collect(),
    };
    let more = rest.len() > limit;
    rest.truncate(limit);
    let next = if more { rest.last().map(&cursor) } else { None };
    let mut response = axum::Json(rest).into_response();
    if let Some(next) = next
        && let Ok(v) = axum::http::HeaderValue::from_str(&next)
    {
        response.headers_mut().insert(NEXT_PAGE, v);
    }
    response
}

/// A two-part `?after=` cursor, `<a>/<b>` (`tenant/room`,
/// `owner/sha256`: the second part never holds a `/`), or a typed error
/// naming the form `expected`.
pub(crate) fn pair_cursor(after: Option<String>, expected: &str) -> Result<Option<(String, String)>, ApiError> {
    match after {
        None => Ok(None),
        Some(a) => match a.rsplit_once('/') {
            Some((x, y)) => Ok(Some((x.to_owned(), y.to_owned()))),
            None => Err(ApiError::invalid("after", format!("expected `{expected}`"))),
        },
    }
}

/// How many entries a page asked for with `?limit=` holds.
pub(crate) fn page_limit(asked: Option<usize>) -> usize {
    asked.unwrap_or(PAGE_DEFAULT).clamp(1, PAGE_MAX)
}

/// The routes that need a caller, with authentication in front.
pub(crate) fn router(state: Arc<AdminState>) -> Router<Arc<AdminState>> {
    Router::new()
        .merge(modules::routes())
        .merge(deployments::routes())
        .merge(audit::routes())
        .merge(rooms::routes())
        .merge(overview::routes())
        .merge(server::routes())
        .merge(filters::routes())
        .layer(axum::middleware::from_fn_with_state(state, authenticate))
}

/// An API error: status, stable code, message, and the field at fault.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    field: Option<String>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    code: &'a str,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<&'a str>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            field: None,
        }
    }

    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        let field = field.into();
        ApiError {
            status: StatusCode::BAD_REQUEST,
            code: "invalid_request",
            message: format!("`{field}`: {}", message.into()),
            field: Some(field),
        }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }
}

impl From<ControlError> for ApiError {
    fn from(e: ControlError) -> Self {
        if matches!(e, ControlError::Store(_)) {
            tracing::error!(error = %e, "control store failed");
        }
        ApiError {
            status: StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            code: e.code(),
            field: e.field(),
            message: e.to_string(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code,
                message: &self.message,
                field: self.field.as_deref(),
            },
        };
        (self.status, axum::Json(body)).into_response()
    }
}

/// Reads a JSON body of at most [`MAX_JSON_BYTES`] into `T`; an error
/// names the field at fault.
pub(crate) async fn json_body<T: DeserializeOwned>(body: Body) -> Result<T, ApiError> {
    let bytes = axum::body::to_bytes(body, MAX_JSON_BYTES).await.map_err(|_| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("a JSON body is at most {MAX_JSON_BYTES} bytes"),
        )
    })?;
    let de = &mut serde_json::Deserializer::from_slice(&bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." { "(body)".to_owned() } else { path };
        ApiError::invalid(field, crate::untrusted(&e.inner().to_string(), 200))
    })
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

/// The layer for keyed routes outside `/v1` (`/stats`).
pub(crate) async fn require_caller(state: State<Arc<AdminState>>, req: Request, next: Next) -> Response {
    authenticate(state, req, next).await
}

/// Who is calling, from `Authorization: Bearer`: an operator's key or a
/// tenant administrator's token. Refused callers get 401 with the reason.
async fn authenticate(State(state): State<Arc<AdminState>>, mut req: Request, next: Next) -> Response {
    let caller = match bearer(req.headers()) {
        None => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "send `Authorization: Bearer <operator key or tenant-admin token>`",
        )),
        Some(token) => identify(&state, token),
    };
    match caller {
        Ok(caller) => {
            req.extensions_mut().insert(caller);
            next.run(req).await
        }
        Err(e) => {
            metrics::counter!("throng_admin_unauthenticated_total").increment(1);
            e.into_response()
        }
    }
}

/// The caller a request names, if it names one (`/metrics`, open to
/// scrapers, shows more to a key holder); a key that does not hold is an
/// error all the same.
pub(crate) fn optional_caller(state: &AdminState, headers: &HeaderMap) -> Result<Option<Caller>, ApiError> {
    match bearer(headers) {
        None => Ok(None),
        Some(token) => identify(state, token).map(Some),
    }
}

fn identify(state: &AdminState, token: &str) -> Result<Caller, ApiError> {
    // Compared as digests: equal length, and no early exit on the first
    // differing byte of the key itself.
    let offered = Sha256::digest(token.as_bytes());
    for op in state.control.operators() {
        if Sha256::digest(op.key.as_bytes()) == offered {
            return Ok(Caller::Operator { name: op.name });
        }
    }
    if token.split('.').count() != 3 {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "not an operator key, nor a token",
        ));
    }
    let auth = state.shared.authenticator();
    match auth.verify_tenant_admin(token) {
        Ok((tenant, user)) => Ok(Caller::Tenant { tenant, user }),
        Err(e) => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            auth_code(&e),
            format!("tenant-admin token refused: {e}"),
        )),
    }
}

/// The stable code of a refused token.
fn auth_code(e: &crate::auth::AuthError) -> &'static str {
    use crate::auth::AuthError as A;
    match e {
        A::Missing => "unauthenticated",
        A::Malformed(_) | A::TooLong(_) => "token_malformed",
        A::UnknownTenant(_) => "unknown_tenant",
        A::Algorithm { .. } => "algorithm_not_allowed",
        A::Expired => "token_expired",
        A::NotYetValid | A::BadSignature => "token_invalid",
    }
}
