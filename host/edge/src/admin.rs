//! The admin HTTP endpoint (`server.admin`): the admin API (`/v1`, see
//! [`crate::api`]), `GET /stats` (JSON figures of this edge; a tenant's
//! administrator gets only its tenant's), both for authenticated callers
//! only; and, open for scrapers and load balancers, `GET /metrics` (the
//! Prometheus text format, when a Prometheus recorder is installed, see
//! [`install_prometheus`]) and `GET /healthz`. What `/metrics` shows
//! depends on the caller: an operator's key gets every series, a tenant's
//! administrator its own tenant's and the edge's, and a caller without a
//! key only the edge's (no series labelled with a tenant).

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

/// `/stats` as a tenant's administrator sees it: its own rooms and
/// quarantines, nothing of the edge's process or of other tenants.
#[derive(Debug, Serialize)]
struct TenantStats {
    uptime_s: f64,
    tenant: String,
    rooms: usize,
    /// Rooms this tenant may have alive here.
    room_cap: usize,
    /// Bytes of its group rooms' messages this edge stores (absent in a
    /// cluster, where JetStream keeps them).
    #[serde(skip_serializing_if = "Option::is_none")]
    group_log_bytes: Option<u64>,
    quarantined: Vec<Quarantined>,
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

/// A module in quarantine, as `/stats` and `/v1/overview` show it.
#[derive(Debug, Serialize)]
pub(crate) struct Quarantined {
    /// `filter` or `policy`.
    pub kind: &'static str,
    pub tenant: String,
    /// The tenant (filters) or `tenant/room` (policies).
    pub label: String,
    pub module: String,
    pub remaining_s: f64,
    /// Quarantines in a row (the cool-down doubles with each).
    pub level: u32,
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

/// Admin connections open at once. When all are taken, a new one takes
/// the place of the one idle longest (still sending its first headers, or
/// between requests); a connection in a request keeps its place. So
/// partial requests, however many, cannot keep `/healthz`, `/metrics` or
/// an operator out: each arriving caller evicts the oldest of them, and
/// long requests are few by their own limits (uploads, event streams).
const MAX_ADMIN_CONNECTIONS: usize = 256;
/// A request's headers must arrive within this.
const HEADER_TIMEOUT: Duration = Duration::from_secs(2);
/// No admin connection lives longer than this, whatever it sends. Long
/// enough for an upload whose checks compile a language runtime (an 18 MB
/// Python filter compiles for 13-24 s here); a caller must be
/// authenticated (headers, within `HEADER_TIMEOUT`) before any body is
/// read, so only key holders can hold a connection this long.
const CONNECTION_DEADLINE: Duration = Duration::from_secs(120);

/// The admin connections open, and which of them are in a request.
#[derive(Default)]
struct Conns {
    table: std::sync::Mutex<ConnTable>,
    /// A place came free.
    freed: tokio::sync::Notify,
}

#[derive(Default)]
struct ConnTable {
    next: u64,
    open: std::collections::HashMap<u64, Conn>,
}

struct Conn {
    /// Requests being answered (HTTP/1: one at a time, but a body may
    /// still stream when the next request is read).
    busy: u32,
    /// When it last went idle (or was accepted).
    idle_since: Instant,
    evict: CancellationToken,
}

impl Conns {
    fn table(&self) -> std::sync::MutexGuard<'_, ConnTable> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A place for a new connection, evicting the longest idle one if all
    /// are taken; `None` when every connection is in a request.
    fn admit(&self) -> Option<(u64, CancellationToken)> {
        let mut t = self.table();
        if t.open.len() >= MAX_ADMIN_CONNECTIONS {
            let oldest = t
                .open
                .iter()
                .filter(|(_, c)| c.busy == 0)
                .min_by_key(|(_, c)| c.idle_since)
                .map(|(id, _)| *id)?;
            if let Some(c) = t.open.remove(&oldest) {
                c.evict.cancel();
                metrics::counter!("throng_admin_evicted_total").increment(1);
            }
        }
        t.next += 1;
        let id = t.next;
        let evict = CancellationToken::new();
        t.open.insert(
            id,
            Conn {
                busy: 0,
                idle_since: Instant::now(),
                evict: evict.clone(),
            },
        );
        Some((id, evict))
    }

    fn close(&self, id: u64) {
        self.table().open.remove(&id);
        self.freed.notify_one();
    }

    fn busy(self: &Arc<Self>, id: u64) -> Busy {
        if let Some(c) = self.table().open.get_mut(&id) {
            c.busy += 1;
        }
        Busy {
            conns: Arc::clone(self),
            id,
        }
    }
}

/// A request being answered, until its response body is dropped.
struct Busy {
    conns: Arc<Conns>,
    id: u64,
}

impl Drop for Busy {
    fn drop(&mut self) {
        if let Some(c) = self.conns.table().open.get_mut(&self.id) {
            c.busy = c.busy.saturating_sub(1);
            if c.busy == 0 {
                c.idle_since = Instant::now();
            }
        }
    }
}

/// A response body that keeps its connection's place until it is sent
/// (an event stream's lasts as long as the stream).
struct Held {
    body: axum::body::Body,
    _busy: Busy,
}

impl hyper::body::Body for Held {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// Serves until `shutdown`. Bounded: at most `MAX_ADMIN_CONNECTIONS` at a
/// time (the longest idle evicted for a newcomer), headers within
/// `HEADER_TIMEOUT`, each connection at most `CONNECTION_DEADLINE` (500
/// partial requests once held it for good, and later slowed `/healthz` to
/// 9 s).
pub(crate) async fn serve(listener: tokio::net::TcpListener, state: Arc<AdminState>, shutdown: CancellationToken) {
    use hyper::service::Service as _;
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
    let conns = Arc::new(Conns::default());
    let tasks = tokio_util::task::TaskTracker::new();
    loop {
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
        let (id, evict) = loop {
            let freed = conns.freed.notified();
            if let Some(place) = conns.admit() {
                break place;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return close(tasks).await,
                _ = freed => {}
            }
        };
        let inner = hyper_util::service::TowerToHyperService::new(app.clone());
        let places = Arc::clone(&conns);
        let service = hyper::service::service_fn(move |req| {
            let busy = places.busy(id);
            let answer = inner.call(req);
            async move {
                let response = answer.await?;
                Ok::<_, std::convert::Infallible>(response.map(|body| Held { body, _busy: busy }))
            }
        });
        let stop = shutdown.clone();
        let conns = Arc::clone(&conns);
        tasks.spawn(async move {
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT);
            let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = evict.cancelled() => {}
                _ = tokio::time::timeout(CONNECTION_DEADLINE, conn) => {}
            }
            conns.close(id);
        });
    }
    close(tasks).await;
}

async fn close(tasks: tokio_util::task::TaskTracker) {
    tasks.close();
    let _ = tokio::time::timeout(Duration::from_secs(2), tasks.wait()).await;
}

async fn stats(State(s): State<Arc<AdminState>>, caller: axum::Extension<crate::control::Caller>) -> Response {
    match caller.tenant() {
        None => Json(edge_stats(&s)).into_response(),
        Some(tenant) => Json(TenantStats {
            uptime_s: s.started.elapsed().as_secs_f64(),
            tenant: tenant.to_owned(),
            rooms: s.shared.rooms.tenant_len(tenant),
            room_cap: s.shared.rooms.tenant_cap(),
            group_log_bytes: s.shared.rooms.log().tenant_bytes(tenant),
            quarantined: quarantined(&s.wasm, Some(tenant)),
        })
        .into_response(),
    }
}

/// Quarantines in force, `tenant`'s only if given.
/// The modules in quarantine now: every one, or `tenant`'s.
pub(crate) fn quarantined(wasm: &WasmStats, tenant: Option<&str>) -> Vec<Quarantined> {
    wasm.quarantined()
        .into_iter()
        .filter(|q| tenant.is_none_or(|t| q.tenant == t))
        .map(|q| Quarantined {
            kind: q.kind,
            tenant: q.tenant,
            label: q.label,
            module: q.module.hex(),
            remaining_s: q.until.saturating_duration_since(Instant::now()).as_secs_f64(),
            level: q.level,
        })
        .collect()
}

fn edge_stats(s: &AdminState) -> Stats {
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
    Stats {
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
            quarantined: quarantined(&s.wasm, None),
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
    }
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

async fn metrics(State(s): State<Arc<AdminState>>, headers: axum::http::HeaderMap) -> Response {
    // Open to scrapers, but a tenant's label is its business: who calls
    // decides which series they get.
    let sees = match crate::api::optional_caller(&s, &headers) {
        Ok(None) => Sees::Edge,
        Ok(Some(crate::control::Caller::Operator { .. })) => Sees::All,
        Ok(Some(crate::control::Caller::Tenant { tenant, .. })) => Sees::Tenant(tenant),
        Err(e) => return e.into_response(),
    };
    match PROMETHEUS.get().and_then(Option::as_ref) {
        Some(handle) => {
            // Histograms and summaries need their buckets drained now and then;
            // a scrape is a fine moment.
            handle.run_upkeep();
            let text = handle.render();
            match sees {
                Sees::All => text.into_response(),
                sees => scoped(&text, &sees).into_response(),
            }
        }
        None => (
            StatusCode::NOT_FOUND,
            "no Prometheus recorder in this process (throng serve installs one)\n",
        )
            .into_response(),
    }
}

/// Which `/metrics` series a caller gets.
#[derive(Debug, PartialEq)]
enum Sees {
    /// Every series (an operator).
    All,
    /// Series without a `tenant` label, and those of this tenant.
    Tenant(String),
    /// Series without a `tenant` label (no key).
    Edge,
}

/// The Prometheus text `text` without the samples `sees` may not see.
/// Comment lines stay: a family's HELP says nothing of a tenant.
fn scoped(text: &str, sees: &Sees) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let keep = line.starts_with('#')
            || match (tenant_label(line), sees) {
                (None, _) => true,
                (Some(t), Sees::Tenant(mine)) => t == *mine,
                (Some(_), _) => matches!(sees, Sees::All),
            };
        if keep {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// The value of a sample line's `tenant` label, unescaped. A line whose
/// labels do not parse counts as labelled with a tenant nobody has, so it
/// is shown to operators only.
fn tenant_label(line: &str) -> Option<String> {
    let open = line.find(['{', ' '])?;
    if line.as_bytes()[open] != b'{' {
        return None;
    }
    let mut rest = &line[open + 1..];
    let unparsed = Some(String::from("\u{0}"));
    loop {
        rest = rest.trim_start_matches([' ', ',']);
        if rest.starts_with('}') {
            return None;
        }
        let Some(eq) = rest.find("=\"") else { return unparsed };
        let key = rest[..eq].trim();
        rest = &rest[eq + 2..];
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next() {
                None => return unparsed,
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c)) => value.push(c),
                    None => return unparsed,
                },
                Some((_, c)) => value.push(c),
            }
        };
        if key == "tenant" {
            return Some(value);
        }
        rest = &rest[end + 1..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# HELP throng_x_total X.\n\
        # TYPE throng_x_total counter\n\
        throng_x_total{tenant=\"acme\",module=\"ab\"} 3\n\
        throng_x_total{module=\"cd\",tenant=\"globex\"} 4\n\
        throng_x_total{class=\"a\\\"b\",tenant=\"ac\\\\me\"} 5\n\
        throng_edge_total 7\n\
        throng_y_bucket{le=\"0.5\"} 1\n\
        throng_bad{tenant=\"acme 9\n";

    #[test]
    fn each_caller_gets_the_series_it_may_see() {
        let edge = scoped(TEXT, &Sees::Edge);
        assert!(!edge.contains("tenant="), "{edge}");
        assert!(
            edge.contains("throng_edge_total 7") && edge.contains("le=\"0.5\"} 1"),
            "{edge}"
        );
        assert!(edge.contains("# HELP throng_x_total"), "{edge}");

        let acme = scoped(TEXT, &Sees::Tenant("acme".into()));
        assert!(acme.contains("tenant=\"acme\",module=\"ab\"} 3"), "{acme}");
        assert!(
            !acme.contains("globex") && !acme.contains("} 5") && !acme.contains("throng_bad"),
            "{acme}"
        );
        assert!(acme.contains("throng_edge_total 7"), "{acme}");

        // An escaped value is compared unescaped, and a quote in another
        // label's value does not end the labels early.
        let odd = scoped(TEXT, &Sees::Tenant("ac\\me".into()));
        assert!(odd.contains("} 5") && !odd.contains("} 3"), "{odd}");
    }
}
