//! The admin HTTP endpoint (`server.admin`): the admin API (`/v1`, see
//! [`crate::api`]), `GET /stats` (JSON figures of this edge), both for
//! authenticated callers only; and, open for scrapers and load balancers,
//! `GET /metrics` (the Prometheus text format, when a Prometheus recorder
//! is installed, see [`install_prometheus`]) and `GET /healthz`.

use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::log::LogStats;
use crate::wasm::WasmStats;
use crate::{Shared, procstat};

static PROMETHEUS: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Makes the `metrics` crate record into a Prometheus registry that
/// `/metrics` renders. Once per process: later calls return the same
/// handle; `None` if another recorder was installed first.
pub fn install_prometheus() -> Option<PrometheusHandle> {
    PROMETHEUS.get_or_init(install).clone()
}

fn install() -> Option<PrometheusHandle> {
    // Call latencies as histograms with fixed buckets (summaries do not add
    // up across edges).
    let builder = PrometheusBuilder::new().set_buckets_for_metric(
        metrics_exporter_prometheus::Matcher::Suffix("_call_seconds".into()),
        crate::metrics_help::CALL_BUCKETS,
    );
    let builder = match builder {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(error = %e, "histogram buckets refused; summaries instead");
            PrometheusBuilder::new()
        }
    };
    match builder.install_recorder() {
        Ok(handle) => {
            crate::metrics_help::describe();
            Some(handle)
        }
        Err(e) => {
            tracing::warn!(error = %e, "no Prometheus metrics: cannot install the recorder");
            None
        }
    }
}

/// What `/stats` reads.
pub(crate) struct AdminState {
    pub shared: Arc<Shared>,
    pub wasm: Arc<WasmStats>,
    pub log: Arc<LogStats>,
    pub control: Arc<crate::control::ControlPlane>,
    pub started: Instant,
    /// Open `/v1/events` streams, by caller (see `api::overview`).
    pub event_streams: Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
}

#[derive(Debug, Serialize)]
struct Stats {
    uptime_s: f64,
    /// Authenticated connections.
    connections: u64,
    /// Connections handshaking or not yet past Hello.
    unauthenticated_connections: usize,
    rooms: usize,
    process: Option<Process>,
    wasm: Wasm,
    group_log: GroupLog,
    /// This edge's view of its cluster; absent on a single edge.
    #[serde(skip_serializing_if = "Option::is_none")]
    cluster: Option<crate::cluster::ClusterSnapshot>,
}

#[derive(Debug, Serialize)]
struct Process {
    cpu_s: f64,
    rss_kib: u64,
    peak_rss_kib: u64,
}

#[derive(Debug, Serialize)]
struct Wasm {
    instantiations: u64,
    /// Modules compiled, and modules taken from the disk cache instead.
    compilations: u64,
    cache_hits: u64,
    policy_failures: u64,
    filter_failures: u64,
    /// Messages of batches a filter could not judge.
    filter_unjudged: u64,
    quarantines: u64,
    fallback_ticks: u64,
    /// Quarantines in force, per tenant and module.
    quarantined: Vec<Quarantined>,
}

#[derive(Debug, Serialize)]
struct Quarantined {
    /// `filter` or `policy`.
    kind: &'static str,
    tenant: String,
    /// The tenant (filters) or `tenant/room` (policies).
    label: String,
    module: String,
    remaining_s: f64,
    /// Quarantines in a row (the cool-down doubles with each).
    level: u32,
}

#[derive(Debug, Serialize)]
struct GroupLog {
    commits: u64,
    messages: u64,
    queued_appends: u64,
    queued_messages: u64,
    refused: u64,
    max_window_us: u64,
    mean_window_us: u64,
}

/// Admin connections served at once; more wait in the kernel's backlog.
const MAX_ADMIN_CONNECTIONS: usize = 32;
/// A request's headers must arrive within this.
const HEADER_TIMEOUT: Duration = Duration::from_secs(2);
/// No admin connection lives longer than this, whatever it sends. Long
/// enough for an upload whose checks compile a language runtime (an 18 MB
/// Python filter compiles for 13-24 s here); a caller must be
/// authenticated (headers, within `HEADER_TIMEOUT`) before any body is
/// read, so only key holders can hold a connection this long.
const CONNECTION_DEADLINE: Duration = Duration::from_secs(120);

/// Serves until `shutdown`. Bounded: at most `MAX_ADMIN_CONNECTIONS` at a
/// time, headers within `HEADER_TIMEOUT`, each connection at most
/// `CONNECTION_DEADLINE` (500 partial requests once held it for good).
pub(crate) async fn serve(listener: tokio::net::TcpListener, state: Arc<AdminState>, shutdown: CancellationToken) {
    let keyed = crate::api::router(Arc::clone(&state)).merge(Router::new().route("/stats", get(stats)).layer(
        axum::middleware::from_fn_with_state(Arc::clone(&state), crate::api::require_caller),
    ));
    let mut app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/dashboard", get(dashboard))
        .merge(keyed);
    if state.shared.webtransport.as_ref().is_some_and(|w| w.config.demo) {
        app = app.merge(crate::api::demo::routes());
    }
    let app = app.with_state(state);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_ADMIN_CONNECTIONS));
    let tasks = tokio_util::task::TaskTracker::new();
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = Arc::clone(&slots).acquire_owned() => match p { Ok(p) => p, Err(_) => break },
        };
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::debug!(error = %e, "admin accept failed");
                    continue;
                }
            },
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let stop = shutdown.clone();
        tasks.spawn(async move {
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT);
            let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = tokio::time::timeout(CONNECTION_DEADLINE, conn) => {}
            }
            drop(permit);
        });
    }
    tasks.close();
    let _ = tokio::time::timeout(Duration::from_secs(2), tasks.wait()).await;
}

async fn stats(State(s): State<Arc<AdminState>>) -> Json<Stats> {
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let me = std::process::id();
    let process = match (procstat::cpu_seconds(me), procstat::memory(me)) {
        (Ok(cpu_s), Ok(m)) => Some(Process {
            cpu_s,
            rss_kib: m.rss_kib,
            peak_rss_kib: m.hwm_kib,
        }),
        // Not Linux, or /proc is not mounted: the rest still answers.
        _ => None,
    };
    let appends = load(&s.log.appends);
    Json(Stats {
        uptime_s: s.started.elapsed().as_secs_f64(),
        connections: s.shared.open_connections.load(Ordering::Relaxed),
        unauthenticated_connections: s.shared.admission.unauthenticated(),
        rooms: s.shared.rooms.len(),
        process,
        wasm: Wasm {
            instantiations: load(&s.wasm.instantiations),
            compilations: load(&s.wasm.compilations),
            cache_hits: load(&s.wasm.cache_hits),
            policy_failures: load(&s.wasm.policy_failures),
            filter_failures: load(&s.wasm.filter_failures),
            filter_unjudged: load(&s.wasm.filter_unjudged),
            quarantines: load(&s.wasm.quarantines),
            fallback_ticks: load(&s.wasm.fallback_ticks),
            quarantined: s
                .wasm
                .quarantined()
                .into_iter()
                .map(|q| Quarantined {
                    kind: q.kind,
                    tenant: q.tenant,
                    label: q.label,
                    module: q.module.hex(),
                    remaining_s: q.until.saturating_duration_since(Instant::now()).as_secs_f64(),
                    level: q.level,
                })
                .collect(),
        },
        group_log: GroupLog {
            commits: load(&s.log.commits),
            messages: load(&s.log.messages),
            queued_appends: load(&s.log.queued),
            queued_messages: load(&s.log.queued_messages),
            refused: load(&s.log.refused),
            max_window_us: load(&s.log.max_window_us),
            mean_window_us: load(&s.log.total_window_us).checked_div(appends).unwrap_or(0),
        },
        cluster: s.shared.cluster.as_ref().map(|c| c.snapshot()),
    })
}

/// The live dashboard: a static page (no data in it) that asks for a key
/// and reads `/v1/events` with it.
async fn dashboard() -> Response {
    (
        [
            (axum::http::header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (axum::http::header::CACHE_CONTROL, "no-store"),
        ],
        include_str!("api/dashboard.html"),
    )
        .into_response()
}

/// For load balancers and scrapers: open, cheap, and says whether the
/// edge is stopping.
async fn healthz(State(s): State<Arc<AdminState>>) -> Response {
    if s.shared.shutdown.is_cancelled() {
        (StatusCode::SERVICE_UNAVAILABLE, "stopping\n").into_response()
    } else {
        (StatusCode::OK, "ok\n").into_response()
    }
}

async fn metrics(State(_): State<Arc<AdminState>>) -> Response {
    match PROMETHEUS.get().and_then(Option::as_ref) {
        Some(handle) => {
            // Histograms and summaries need their buckets drained now and then;
            // a scrape is a fine moment.
            handle.run_upkeep();
            handle.render().into_response()
        }
        None => (
            StatusCode::NOT_FOUND,
            "no Prometheus recorder in this process (throng serve installs one)\n",
        )
            .into_response(),
    }
}
