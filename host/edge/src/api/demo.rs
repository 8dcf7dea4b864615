//! The WebTransport demo page (development): the page, the JavaScript
//! client it imports (the very file of `clients/js`), and where to
//! connect. Open, like `/dashboard`: nothing here is secret, and the page
//! asks for a token like any client.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};

use crate::admin::AdminState;

pub(crate) fn routes() -> Router<Arc<AdminState>> {
    Router::new()
        .route("/demo", get(page))
        .route("/demo/throng.js", get(client))
        .route("/demo/config.json", get(config))
}

async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        include_str!("demo.html"),
    )
        .into_response()
}

async fn client() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        include_str!("../../../../clients/js/src/throng.js"),
    )
        .into_response()
}

/// Where pages connect, and the hash of the certificate in use now: read
/// on every connect, so a page follows a rotated dev certificate.
async fn config(State(s): State<Arc<AdminState>>) -> Response {
    let Some(web) = s.shared.webtransport.as_ref() else {
        return (StatusCode::NOT_FOUND, "WebTransport is off\n").into_response();
    };
    let cert = web.cert.current();
    (
        [(header::CACHE_CONTROL, "no-store")],
        Json(serde_json::json!({
            "url": web.url,
            "certHashes": cert.sha256.iter().collect::<Vec<_>>(),
            "certNotAfter": cert.not_after,
        })),
    )
        .into_response()
}
