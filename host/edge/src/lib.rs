//! The Throng edge host as a library: QUIC termination, auth, rooms, config.
//!
//! # Layout
//!
//! - [`config`]: edge-config TOML → validated [`Config`] (two phases, errors name the key).
//! - [`tls`]: the configured certificate, or a self-signed dev one in the data dir.
//! - [`auth`]: JWT → [`auth::Grant`] (tenant, user, role, room pattern, expiry).
//! - `admission`: connection slots: half-open connections apart from
//!   authenticated ones, per source address.
//! - [`admin`]: the admin HTTP endpoint (`/stats`, `/metrics`), bounded.
//! - [`cluster`]: with `[cluster]`, this edge's membership of a cluster over
//!   NATS: heartbeats, the live set, each room's origin.
//! - [`procstat`]: the process's CPU and memory from `/proc`.
//! - `workers`: a thread pool per room size class.
//! - `connection`: one task per QUIC connection: Hello, control frames, one
//!   writer per joined room.
//! - [`room`]: one actor per room, a folder with a file per concern. The
//!   registry ([`room::Rooms`]) makes and finds rooms; each room's actor
//!   takes sends into its ingress and, each tick, runs the [`filter`]s,
//!   asks the [`policy`], numbers and acks messages with its sequencer,
//!   keeps its ring (and, for a group room, appends to the [`log`]),
//!   encodes one batch and sends it to its egress: the fanout into every
//!   local viewer's slot. The sequencer, ingress and egress are where a
//!   cluster plugs in.
//! - [`policy`]: the per-room decision of what goes out: the built-in
//!   [`policy::NativePolicy`] or an operator's Wasm module with a native fallback.
//! - [`filter`]: a tenant's Wasm message filters: one warm instance (and a
//!   spare) per tenant, made at load; `on_failure` closed or open.
//! - [`wasm`]: the engine, module cache (memory and disk), budgets, limits,
//!   quarantine.
//! - [`control`]: the control plane: the module store, versioned
//!   deployments (seeded by edge-config), rollout, rollback, audit log.
//! - [`api`]: the authenticated admin API (`/v1`) on the admin listener.
//! - [`modules`]: which module runs where: the active deployments, built.
//! - [`log`]: group rooms' durable log (redb), written in group commits.
//! - [`presence`]: who is online on this edge, for batched queries.
//! - `fuzzing` (hidden): the checks that `fuzz/` runs on arbitrary bytes and
//!   that `tests/fuzz_corpus.rs` replays on the saved corpus.
//!
//! A message's path: `connection` (frame, session rights, rate limit) →
//! [`room::RoomHandle::send`] → the room's inbox → its tick (filters,
//! policy, sequence number and ack, history, one encode) → every viewer's
//! [`room::ViewerSlot`] → that viewer's writer task → its QUIC stream for
//! the room. `docs/architecture.md` walks through it.
//!
//! [`Edge::start`] binds the UDP socket, starts the accept loop and returns a
//! handle; [`Edge::shutdown`] stops accepting, tells every connection, and
//! waits for connections and rooms to finish.

pub mod admin;
mod admission;
pub mod api;
pub mod auth;
pub mod cluster;
pub mod config;
mod connection;
pub mod control;
pub mod filter;
#[doc(hidden)]
pub mod fuzzing;
pub mod group_store;
mod kick;
pub mod log;
mod metrics_help;
pub mod modules;
mod peer;
pub mod policy;
pub mod presence;
pub mod procstat;
pub mod room;
pub mod tls;
pub mod wasm;
pub mod webtransport;
mod workers;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use thiserror::Error;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::{Config, ConfigError};

use crate::auth::Authenticator;
use crate::cluster::stream_log::StreamLog;
use crate::control::ControlPlane;
use crate::group_store::GroupStore;
use crate::log::{GroupLog, LogError, LogStats};
use crate::modules::ModuleError;
use crate::room::{Rooms, RoomsSetup};
use crate::wasm::{WasmError, WasmRuntime, WasmStats};

/// Milliseconds since the Unix epoch.
pub fn unix_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Why the edge could not start.
#[derive(Debug, Error)]
pub enum EdgeError {
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("cannot bind UDP {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("bad transport setting: {0}")]
    Transport(String),
    #[error("bad tenant key: {0}")]
    TenantKey(String),
    #[error(transparent)]
    Wasm(#[from] WasmError),
    #[error("cannot load module {0}")]
    Module(#[from] ModuleError),
    #[error(transparent)]
    Log(#[from] LogError),
    #[error("cannot start the room worker threads: {0}")]
    Workers(#[source] std::io::Error),
    #[error(transparent)]
    Cluster(#[from] cluster::ClusterError),
    #[error("cannot bind the admin endpoint TCP {addr}: {source}")]
    AdminBind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Per-user send buckets, keyed by [`rate_key`].
pub(crate) type SendLimiter = DefaultKeyedRateLimiter<String>;

/// The key of a user's send bucket (and room-creation bucket).
pub(crate) fn rate_key(tenant: &str, user: &str) -> String {
    format!("{tenant}\u{0}{user}")
}

/// State every connection shares.
pub(crate) struct Shared {
    config: Config,
    /// Tenants and their keys; a reload replaces it.
    auth: std::sync::RwLock<Arc<Authenticator>>,
    rooms: Arc<Rooms>,
    limiter: Arc<SendLimiter>,
    wire_limits: throng_wire::Limits,
    presence: Arc<presence::Presence>,
    shutdown: CancellationToken,
    next_connection: AtomicU64,
    /// Connections past their handshake and not yet closed.
    open_connections: AtomicU64,
    admission: Arc<admission::Admission>,
    /// Every authenticated connection, for the server API's disconnect.
    kicks: Arc<kick::Kicks>,
    /// This edge's cluster, with `[cluster]`.
    cluster: Option<Arc<cluster::Cluster>>,
    /// Its links to the other edges' rooms, presence and connections.
    links: Option<Arc<cluster::links::Links>>,
    /// Browser sessions, with `[webtransport]`.
    webtransport: Option<Arc<webtransport::WebTransport>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("listen", &self.config.listen)
            .finish_non_exhaustive()
    }
}

impl Shared {
    fn next_connection_id(&self) -> u64 {
        self.next_connection.fetch_add(1, Ordering::Relaxed)
    }

    /// The tenants and keys in force now.
    fn authenticator(&self) -> Arc<Authenticator> {
        Arc::clone(&self.auth.read().unwrap_or_else(|e| e.into_inner()))
    }
}

/// What a reload changed, and what it could not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reload {
    /// The new module set's generation.
    pub generation: u64,
    /// Changed settings a running edge cannot take (`key (old -> new)`);
    /// they apply at the next restart.
    pub needs_restart: Vec<String>,
}

/// A running edge host.
#[derive(Debug)]
pub struct Edge {
    endpoint: quinn::Endpoint,
    local_addr: SocketAddr,
    cert_path: PathBuf,
    shutdown: CancellationToken,
    connections: TaskTracker,
    rooms: Arc<Rooms>,
    runtime: Arc<WasmRuntime>,
    control: Arc<ControlPlane>,
    reload: tokio::sync::Mutex<()>,
    group_log: GroupStore,
    shared: Arc<Shared>,
    /// The size classes' threads; rooms stop when these are dropped.
    workers: workers::ClassWorkers,
    admin_addr: Option<SocketAddr>,
}

impl Edge {
    /// Binds the listener and starts serving. Returns once the socket is bound.
    pub async fn start(config: Config) -> Result<Edge, EdgeError> {
        let identity = tls::identity(&config)?;
        // Browsers get their own certificate: a dev one they can pin by
        // hash, or the configured one.
        let web_cert = match &config.webtransport {
            None => None,
            Some(w) => Some(Arc::new(match &config.tls {
                Some(_) => tls::WebCert::configured(&identity)?,
                None => tls::WebCert::dev(&config.data_dir, w.dev_cert_lifetime, w.dev_cert_renew_before)?,
            })),
        };
        let crypto = tls::server_crypto(&identity, web_cert.as_ref())?;
        let mut server = quinn::ServerConfig::with_crypto(crypto);
        server.transport_config(Arc::new(transport(&config)?));

        let socket = bind_udp(&config)?;
        let endpoint = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(server),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(|source| EdgeError::Bind {
            addr: config.listen,
            source,
        })?;
        let local_addr = endpoint.local_addr().map_err(|source| EdgeError::Bind {
            addr: config.listen,
            source,
        })?;

        let mut wasm = config.wasm.clone();
        wasm.max_instances = fit_to_map_count(wasm.max_instances);
        wasm.cache_dir = Some(config.cache_dir());
        // The pool's instances serve rooms' policies and tenants' filters
        // (an instance and a warm spare each); rooms get what the filters
        // leave, so a crowd of new rooms meets a typed refusal at join,
        // never an empty pool.
        let filter_instances: usize = 2 * config.filters.values().map(Vec::len).sum::<usize>() + FILTER_SPARE;
        let max_rooms = (wasm.max_instances as usize).saturating_sub(filter_instances).max(1);
        let per_tenant = config.limits.max_rooms_per_tenant as usize;
        let cap = room::tenant_cap(max_rooms, per_tenant, config.tenants.len());
        if cap < per_tenant {
            tracing::warn!(
                max_rooms_per_tenant = per_tenant,
                room_places = max_rooms,
                each_tenant_here = cap,
                "limits.max_rooms_per_tenant is more than three quarters of this edge's room places: with several tenants, each may take at most that share"
            );
        }
        let runtime = WasmRuntime::new(wasm)?;
        let shutdown = CancellationToken::new();
        let connections = TaskTracker::new();
        let webtransport = match (&config.webtransport, web_cert) {
            (Some(w), Some(cert)) => {
                if config.tls.is_none() {
                    connections.spawn(Arc::clone(&cert).keep_fresh(
                        config.data_dir.clone(),
                        w.dev_cert_lifetime,
                        w.dev_cert_renew_before,
                        shutdown.clone(),
                    ));
                }
                Some(Arc::new(webtransport::WebTransport::new(w.clone(), cert, local_addr)))
            }
            _ => None,
        };
        let cluster = match &config.cluster {
            None => None,
            Some(c) => Some(cluster::Cluster::join(c, local_addr, shutdown.clone(), &connections).await?),
        };
        // In a cluster, deployments come from the cluster's control bucket.
        let join = cluster.as_ref().map(|c| control::ClusterJoin {
            client: c.client(),
            edge_id: c.edge_id().to_owned(),
            region: c.region().to_owned(),
            shutdown: shutdown.clone(),
            tasks: connections.clone(),
        });
        let (control, modules_rx) = ControlPlane::start(&config, Arc::clone(&runtime), join).await?;
        let retention = log::Retention {
            max_age: config.rooms.group_retention.max_age,
            max_messages: config.rooms.group_retention.max_messages,
            compact_interval: config.storage.compact_interval,
            max_tenant_bytes: Some(config.rooms.group_retention.max_tenant_bytes),
        };
        // In a cluster a group room's log is where every edge reads it.
        let group_log = match &cluster {
            None => GroupStore::Local(GroupLog::open_with(
                &config.group_log_path(),
                config.storage.commit_interval,
                config.storage.max_queued,
                retention,
            )?),
            Some(c) => GroupStore::Stream(
                StreamLog::open(
                    c.client(),
                    config.storage.commit_interval,
                    config.storage.max_queued,
                    retention,
                )
                .await,
            ),
        };
        let workers = workers::ClassWorkers::start(&config.rooms.classes).map_err(EdgeError::Workers)?;
        let rooms = Rooms::new(RoomsSetup {
            config: config.rooms.clone(),
            max_frame: config.limits.max_frame_bytes,
            max_body: config.limits.max_body_bytes,
            runtime: Arc::clone(&runtime),
            modules: modules_rx,
            log: group_log.clone(),
            shutdown: shutdown.clone(),
            pools: workers.handles(),
            max_rooms,
            max_rooms_per_tenant: config.limits.max_rooms_per_tenant as usize,
            tenants: config.tenants.len(),
            room_create_rate_per_sec: config.limits.room_create_rate_per_sec,
            room_create_burst: config.limits.room_create_burst,
            incarnation: cluster.as_ref().map_or_else(unix_now_ms, |c| c.incarnation()),
        });
        let presence = Arc::new(presence::Presence::default());
        let l = &config.limits;
        let quota = Quota::per_second(nonzero(l.send_rate_per_sec)).allow_burst(nonzero(l.send_burst));
        let limiter = Arc::new(RateLimiter::keyed(quota));
        let kicks = Arc::new(kick::Kicks::default());
        let links = if let Some(c) = &cluster {
            // Sends to other edges' rooms go out once per edge tick: the
            // fastest room tick there is.
            let flush = config
                .rooms
                .classes
                .iter()
                .map(|c| c.tick)
                .min()
                .unwrap_or(config.rooms.tick)
                .min(config.rooms.tick);
            let setup = cluster::links::LinkSetup {
                flush_every: flush,
                presence_every: config.rooms.presence_interval,
                send_limiter: Arc::clone(&limiter),
                kicks: Arc::clone(&kicks),
                tenants: config.tenants.keys().cloned().collect(),
            };
            let links = cluster::links::Links::start(
                Arc::clone(c),
                &rooms,
                Arc::clone(&presence),
                setup,
                shutdown.clone(),
                &connections,
            )
            .await?;
            rooms.set_cluster(Arc::new(cluster::room_link::RoomPorts(Arc::clone(&links))));
            Some(links)
        } else {
            None
        };
        let l = &config.limits;
        let wire_limits = throng_wire::Limits {
            max_frame_bytes: l.max_frame_bytes,
            max_body_bytes: l.max_body_bytes,
            max_rooms: l.max_rooms_per_connection,
            send_rate_per_sec: l.send_rate_per_sec,
            send_burst: l.send_burst,
            idle_timeout_ms: config.quic.idle_timeout.as_millis() as u64,
        };
        let shared = Arc::new(Shared {
            auth: std::sync::RwLock::new(Arc::new(
                Authenticator::new(&config.tenants).map_err(EdgeError::TenantKey)?,
            )),
            rooms: Arc::clone(&rooms),
            limiter,
            wire_limits,
            presence,
            shutdown: shutdown.clone(),
            next_connection: AtomicU64::new(1),
            open_connections: AtomicU64::new(0),
            admission: admission::Admission::new(&config.limits),
            kicks,
            cluster,
            links,
            webtransport,
            config,
        });
        connections.spawn(accept_loop(endpoint.clone(), Arc::clone(&shared), connections.clone()));
        connections.spawn(housekeeping(Arc::clone(&shared)));
        let admin_addr = match shared.config.admin {
            None => None,
            Some(addr) => {
                // Bound before the edge reports ready: a taken port is a
                // start-up error, not a silent missing endpoint.
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|source| EdgeError::AdminBind { addr, source })?;
                let bound = listener.local_addr().unwrap_or(addr);
                if let Some(w) = shared.webtransport.as_ref().filter(|w| w.config.demo) {
                    w.set_demo_addr(bound);
                }
                let state = Arc::new(admin::AdminState {
                    shared: Arc::clone(&shared),
                    wasm: Arc::clone(runtime.stats()),
                    log: Arc::clone(group_log.stats()),
                    control: Arc::clone(&control),
                    started: std::time::Instant::now(),
                    event_streams: Arc::default(),
                });
                connections.spawn(admin::serve(listener, state, shutdown.clone()));
                tracing::info!(
                    admin = %format!("http://{bound}"),
                    dashboard = %format!("http://{bound}/dashboard"),
                    "admin endpoint ready: the API (/v1), the dashboard (/dashboard), /stats, /metrics, /healthz{}",
                    if shared.config.webtransport.as_ref().is_some_and(|w| w.demo) { " and the demo (/demo)" } else { "" }
                );
                Some(bound)
            }
        };
        match &shared.cluster {
            Some(c) => tracing::info!(
                quic = %local_addr,
                cert = %identity.cert_path.display(),
                edge_id = %c.edge_id(),
                region = %c.region(),
                "edge ready"
            ),
            None => tracing::info!(quic = %local_addr, cert = %identity.cert_path.display(), "edge ready"),
        }
        Ok(Edge {
            endpoint,
            local_addr,
            cert_path: identity.cert_path,
            shutdown,
            connections,
            rooms,
            runtime,
            control,
            reload: tokio::sync::Mutex::new(()),
            group_log,
            shared,
            workers,
            admin_addr,
        })
    }

    /// Where the admin HTTP endpoint listens, if it does.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// This edge's cluster, if it is in one.
    pub fn cluster(&self) -> Option<&Arc<cluster::Cluster>> {
        self.shared.cluster.as_ref()
    }

    /// Users of `tenant` online on this edge.
    pub fn online_users(&self, tenant: &str) -> usize {
        self.shared.presence.count(tenant)
    }

    /// Applies a new config's tenants (keys and filters) and policies:
    /// every module is loaded and its `configure` dry-run first, and any
    /// failure (a bad key, a module that refuses its params) changes
    /// nothing. Rooms swap at their next tick boundary; viewers stay
    /// connected; new connections use the new keys. Other changed settings
    /// are named in [`Reload::needs_restart`] (and logged), not applied.
    pub async fn reload(&self, config: &Config) -> Result<Reload, EdgeError> {
        let _one_at_a_time = self.reload.lock().await;
        let auth = Authenticator::new(&config.tenants).map_err(EdgeError::TenantKey)?;
        if let Some(links) = &self.shared.links {
            links.set_tenants(config.tenants.keys().cloned());
        }
        // The new keys first: a tenant the config adds may then deploy.
        let before = std::mem::replace(
            &mut *self.shared.auth.write().unwrap_or_else(|e| e.into_inner()),
            Arc::new(auth),
        );
        let generation = match self.control.reload(config).await {
            Ok(g) => g,
            Err(e) => {
                *self.shared.auth.write().unwrap_or_else(|e| e.into_inner()) = before;
                return Err(e.into());
            }
        };
        self.shared.rooms.set_tenants(config.tenants.len());
        let filters = self.control.current().filter_count();
        // Old filters go as rooms swap; over-reserving meanwhile is harmless.
        self.runtime
            .reserve_for_filters(u32::try_from(filters * 2).unwrap_or(u32::MAX));
        // Against what the edge started with: that is what still runs.
        let needs_restart = self.shared.config.restart_needed(config);
        for setting in &needs_restart {
            tracing::warn!(%setting, "changed setting needs a restart; not applied");
        }
        tracing::info!(
            generation,
            tenants = config.tenants.len(),
            needs_restart = needs_restart.len(),
            "config reloaded: tenants, keys, filters and policies"
        );
        Ok(Reload {
            generation,
            needs_restart,
        })
    }

    /// The control plane: modules, deployments, audit.
    pub fn control(&self) -> &Arc<ControlPlane> {
        &self.control
    }

    /// Bytes of `tenant`'s group messages this edge stores (None in a
    /// cluster).
    pub fn group_log_tenant_bytes(&self, tenant: &str) -> Option<u64> {
        self.group_log.tenant_bytes(tenant)
    }

    /// Group log durability figures.
    pub fn log_stats(&self) -> &Arc<LogStats> {
        self.group_log.stats()
    }

    /// Guest failure counters.
    pub fn wasm_stats(&self) -> &Arc<WasmStats> {
        self.runtime.stats()
    }

    /// The address the QUIC listener is bound to (the real port for `:0`).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The certificate clients should trust.
    pub fn cert_path(&self) -> &Path {
        &self.cert_path
    }

    /// The URL browsers open a WebTransport session to, when enabled.
    pub fn webtransport_url(&self) -> Option<&str> {
        self.shared.webtransport.as_ref().map(|w| w.url.as_str())
    }

    /// Base64 SHA-256 of the WebTransport dev certificate in use now (what
    /// pages pass in `serverCertificateHashes`); none with a configured
    /// certificate or without WebTransport.
    pub fn webtransport_cert_sha256(&self) -> Option<String> {
        self.shared.webtransport.as_ref()?.cert.current().sha256.clone()
    }

    /// The demo page's address, when it is served.
    pub fn demo_url(&self) -> Option<String> {
        self.shared.webtransport.as_ref()?.demo_url()
    }

    /// Rooms alive on this edge.
    pub fn room_count(&self) -> usize {
        self.rooms.len()
    }

    /// Stops accepting, tells every client, waits (bounded) for connections
    /// and rooms to finish.
    pub async fn shutdown(self) {
        let Edge {
            endpoint,
            shutdown,
            connections,
            rooms,
            runtime,
            control,
            group_log,
            shared,
            workers,
            ..
        } = self;
        if let Some(cluster) = &shared.cluster {
            cluster.leave().await;
        }
        shutdown.cancel();
        connections.close();
        let drain = async {
            connections.wait().await;
            rooms.drained().await;
        };
        if tokio::time::timeout(Duration::from_secs(5), drain).await.is_err() {
            tracing::warn!("shutdown: some connections did not finish in 5 s");
        }
        endpoint.close(
            u32::from(throng_wire::ErrorCode::ShuttingDown.code()).into(),
            b"shutting down",
        );
        let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
        // Everything holding the group log is gone now; let its writer
        // finish so the file is free for the next start.
        drop((rooms, runtime, control, shared, workers));
        if !group_log.close(Duration::from_secs(5)).await {
            tracing::warn!("shutdown: the group log writer did not finish in 5 s");
        }
    }
}

/// Pool instances kept for filters beyond those configured (a reload may
/// add some).
const FILTER_SPARE: usize = 64;

/// Memory maps one pooled Wasm instance costs the process (measured: the
/// kernel's default `vm.max_map_count` of 65,530 ran out near 10,400 live
/// instances, with the edge's own maps besides).
const MAPS_PER_INSTANCE: u64 = 6;
/// Maps left for everything else: threads, allocator arenas, the binary.
const MAPS_FOR_THE_REST: u64 = 8_192;

/// `max_instances`, lowered if the kernel's `vm.max_map_count` could not
/// map that many: past the limit, allocations fail and the process aborts.
fn fit_to_map_count(max_instances: u32) -> u32 {
    let Some(limit) = std::fs::read_to_string("/proc/sys/vm/max_map_count")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
    else {
        return max_instances;
    };
    let fits = limit.saturating_sub(MAPS_FOR_THE_REST) / MAPS_PER_INSTANCE;
    let fits = u32::try_from(fits).unwrap_or(u32::MAX).max(1);
    if fits < max_instances {
        tracing::warn!(
            max_map_count = limit,
            configured = max_instances,
            using = fits,
            "wasm.max_instances lowered to what vm.max_map_count allows (raise it with sysctl for more rooms)"
        );
        fits
    } else {
        tracing::info!(
            max_map_count = limit,
            max_instances,
            "Wasm instance pool fits vm.max_map_count"
        );
        max_instances
    }
}

/// An untrusted string (a client's room name, a token's claim) made fit for
/// a log line or an error text: at most `max` characters, control
/// characters escaped (no forged lines, no terminal escape sequences), and
/// a mark where it was cut.
pub fn untrusted(s: &str, max: usize) -> String {
    let mut out = String::with_capacity(s.len().min(max) + 8);
    for (n, c) in s.chars().enumerate() {
        if n == max {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

pub(crate) fn nonzero(n: u32) -> std::num::NonZeroU32 {
    std::num::NonZeroU32::new(n).unwrap_or(std::num::NonZeroU32::MIN)
}

async fn accept_loop(endpoint: quinn::Endpoint, shared: Arc<Shared>, connections: TaskTracker) {
    loop {
        let incoming = tokio::select! {
            _ = shared.shutdown.cancelled() => break,
            i = endpoint.accept() => match i { Some(i) => i, None => break },
        };
        // Under a crowd of half-open connections, a newcomer first proves it
        // can receive at its address (one round trip, no state kept here),
        // so spoofed or fire-and-forget Initials cost a packet, not a slot.
        if shared.admission.wants_retry() && !incoming.remote_address_validated() && incoming.may_retry() {
            metrics::counter!("throng_handshake_retries_total").increment(1);
            let _ = incoming.retry();
            continue;
        }
        match shared.admission.admit(incoming.remote_address().ip()) {
            Ok(slot) => {
                let serve = connection::serve(incoming, Arc::clone(&shared), slot, connections.clone());
                connections.spawn(serve);
            }
            Err(why) => {
                // Debug, not warn: a flood would otherwise flood the log too.
                metrics::counter!("throng_connections_refused_total", "reason" => why.as_str()).increment(1);
                tracing::debug!(remote = %incoming.remote_address(), reason = why.as_str(), "refusing a new connection");
                incoming.refuse();
            }
        }
    }
}

async fn housekeeping(shared: Arc<Shared>) {
    let mut every = tokio::time::interval(Duration::from_secs(30));
    loop {
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            _ = every.tick() => {
                // Forget rate-limit state of users who have been quiet long
                // enough for their bucket to be full again.
                shared.limiter.retain_recent();
                shared.limiter.shrink_to_fit();
                shared.rooms.forget_quiet_creators();
            }
        }
    }
}

/// Transport settings for many mostly idle viewers: the client may open one
/// bidirectional (control) stream and no unidirectional ones, and its
/// receive windows are small, because quinn sizes per-connection state from
/// these limits. With WebTransport, a browser also needs HTTP/3's own
/// streams (RFC 9114 asks for three unidirectional ones: control and the
/// two QPACK streams; and the CONNECT stream beside the control stream):
/// the limits are raised for every handshake, since the protocol is known
/// only after it, and a native connection is held back to one and none once
/// it is known. Public so the bare-quinn baseline of `throng load` runs the
/// very same settings.
pub fn transport(config: &Config) -> Result<quinn::TransportConfig, EdgeError> {
    let q = &config.quic;
    let mut t = quinn::TransportConfig::default();
    let (bidi, uni) = match config.webtransport {
        Some(_) => (WEB_BIDI_STREAMS, WEB_UNI_STREAMS),
        None => (1, 0),
    };
    t.max_concurrent_bidi_streams(bidi.into())
        .max_concurrent_uni_streams(uni.into())
        .stream_receive_window(q.stream_receive_window.into())
        .receive_window(q.connection_receive_window.into())
        .send_window(q.send_window)
        .max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(q.idle_timeout).map_err(|e| EdgeError::Transport(e.to_string()))?,
        ))
        .keep_alive_interval(q.keep_alive)
        // web-transport-quinn announces H3_DATAGRAM, and HTTP/3 peers then
        // require the datagram transport parameter (RFC 9297; aioquic
        // closes without it). The edge reads no datagrams: quinn keeps at
        // most this many bytes of them, dropping the oldest.
        .datagram_receive_buffer_size(config.webtransport.as_ref().map(|_| WEB_DATAGRAM_BUFFER))
        .enable_segmentation_offload(q.segmentation_offload);
    Ok(t)
}

/// Streams a browser may open: the CONNECT and control streams.
const WEB_BIDI_STREAMS: u32 = 2;
/// HTTP/3's control stream and the two QPACK streams.
const WEB_UNI_STREAMS: u32 = 3;
/// Unread datagram bytes a connection may hold (also the largest datagram).
const WEB_DATAGRAM_BUFFER: usize = 1200;

/// The listener's UDP socket with the configured kernel buffers (shared with
/// the bare-quinn baseline).
pub fn bind_udp(config: &Config) -> Result<std::net::UdpSocket, EdgeError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let addr = config.listen;
    let err = |source| EdgeError::Bind { addr, source };
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP)).map_err(err)?;
    if addr.is_ipv6() {
        // Dual-stack when bound to [::], so IPv4 clients reach it too.
        let _ = socket.set_only_v6(false);
    }
    // The kernel may clamp these (net.core.rmem_max); log what we got.
    let _ = socket.set_recv_buffer_size(config.quic.udp_recv_buffer);
    let _ = socket.set_send_buffer_size(config.quic.udp_send_buffer);
    tracing::debug!(
        recv = socket.recv_buffer_size().unwrap_or(0),
        send = socket.send_buffer_size().unwrap_or(0),
        "UDP socket buffers"
    );
    socket.bind(&addr.into()).map_err(err)?;
    Ok(socket.into())
}
