//! The Throng edge host as a library: QUIC termination, auth, rooms, config.
//!
//! # Layout
//!
//! - [`config`]: edge-config TOML → validated [`Config`] (two phases, errors name the key).
//! - [`tls`]: the configured certificate, or a self-signed dev one in the data dir.
//! - [`auth`]: JWT → [`auth::Grant`] (tenant, user, role, room pattern).
//! - `connection`: one task per QUIC connection: Hello, control frames, one
//!   writer per joined room.
//! - [`room`]: one actor per room; ticks, asks the [`policy`], encodes one
//!   batch, queues it for every member.
//! - [`policy`]: the per-room decision of what goes out: the built-in
//!   [`policy::NativePolicy`] or an operator's Wasm module with a native fallback.
//! - [`filter`]: a tenant's Wasm message filters, one instance per tenant.
//! - [`wasm`]: the engine, module cache, per-call budgets and limits.
//! - [`modules`]: which module runs where (edge-config), reloadable.
//! - [`log`]: group rooms' durable log (redb), written in group commits.
//! - [`presence`]: who is online on this edge, for batched queries.
//! - `fuzzing` (hidden): the checks that `fuzz/` runs on arbitrary bytes and
//!   that `tests/fuzz_corpus.rs` replays on the saved corpus.
//!
//! [`Edge::start`] binds the UDP socket, starts the accept loop and returns a
//! handle; [`Edge::shutdown`] stops accepting, tells every connection, and
//! waits for connections and rooms to finish.

pub mod admin;
pub mod auth;
pub mod config;
mod connection;
pub mod filter;
#[doc(hidden)]
pub mod fuzzing;
pub mod log;
pub mod modules;
pub mod policy;
pub mod presence;
pub mod procstat;
pub mod room;
pub mod tls;
pub mod wasm;
mod workers;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use thiserror::Error;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::{Config, ConfigError};

use crate::auth::Authenticator;
use crate::log::{GroupLog, LogError, LogStats};
use crate::modules::{ModuleError, ModuleSet};
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
    #[error("cannot bind the admin endpoint TCP {addr}: {source}")]
    AdminBind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// State every connection shares.
pub(crate) struct Shared {
    config: Config,
    auth: Authenticator,
    rooms: Arc<Rooms>,
    limiter: DefaultKeyedRateLimiter<String>,
    wire_limits: throng_wire::Limits,
    presence: presence::Presence,
    shutdown: CancellationToken,
    next_connection: AtomicU64,
    /// Connections past their handshake and not yet closed.
    open_connections: AtomicU64,
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
    modules: tokio::sync::watch::Sender<Arc<ModuleSet>>,
    reload: tokio::sync::Mutex<()>,
    group_log: GroupLog,
    shared: Arc<Shared>,
    /// The size classes' threads; rooms stop when these are dropped.
    workers: workers::ClassWorkers,
    admin_addr: Option<SocketAddr>,
}

impl Edge {
    /// Binds the listener and starts serving. Returns once the socket is bound.
    pub async fn start(config: Config) -> Result<Edge, EdgeError> {
        let identity = tls::identity(&config)?;
        let crypto = tls::server_crypto(&identity)?;
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

        let group_log = GroupLog::open(
            &config.group_log_path(),
            config.storage.commit_interval,
            config.storage.max_queued,
        )?;
        let runtime = WasmRuntime::new(config.wasm.clone())?;
        let modules = ModuleSet::load(&config, &runtime, None).await?;
        let (modules, modules_rx) = tokio::sync::watch::channel(Arc::new(modules));
        let shutdown = CancellationToken::new();
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
        });
        let l = &config.limits;
        let quota = Quota::per_second(nonzero(l.send_rate_per_sec)).allow_burst(nonzero(l.send_burst));
        let wire_limits = throng_wire::Limits {
            max_frame_bytes: l.max_frame_bytes,
            max_body_bytes: l.max_body_bytes,
            max_rooms: l.max_rooms_per_connection,
            send_rate_per_sec: l.send_rate_per_sec,
            send_burst: l.send_burst,
            idle_timeout_ms: config.quic.idle_timeout.as_millis() as u64,
        };
        let shared = Arc::new(Shared {
            auth: Authenticator::new(&config.tenants).map_err(EdgeError::TenantKey)?,
            rooms: Arc::clone(&rooms),
            limiter: RateLimiter::keyed(quota),
            wire_limits,
            presence: presence::Presence::default(),
            shutdown: shutdown.clone(),
            next_connection: AtomicU64::new(1),
            open_connections: AtomicU64::new(0),
            config,
        });
        let connections = TaskTracker::new();
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
                let state = Arc::new(admin::AdminState {
                    shared: Arc::clone(&shared),
                    wasm: Arc::clone(runtime.stats()),
                    log: Arc::clone(group_log.stats()),
                    started: std::time::Instant::now(),
                });
                connections.spawn(admin::serve(listener, state, shutdown.clone()));
                tracing::info!(admin = %format!("http://{bound}"), "admin endpoint ready (/stats, /metrics)");
                Some(bound)
            }
        };
        tracing::info!(quic = %local_addr, cert = %identity.cert_path.display(), "edge ready");
        Ok(Edge {
            endpoint,
            local_addr,
            cert_path: identity.cert_path,
            shutdown,
            connections,
            rooms,
            runtime,
            modules,
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

    /// Users of `tenant` online on this edge.
    pub fn online_users(&self, tenant: &str) -> usize {
        self.shared.presence.count(tenant)
    }

    /// Applies the modules of a new config (policies and filters) to running
    /// rooms: each room swaps at its next tick boundary, viewers stay
    /// connected. Other settings need a restart. On error nothing changes.
    pub async fn reload(&self, config: &Config) -> Result<u64, EdgeError> {
        let _one_at_a_time = self.reload.lock().await;
        let current = Arc::clone(&self.modules.borrow());
        let next = ModuleSet::load(config, &self.runtime, Some(&current)).await?;
        let generation = next.generation;
        self.modules.send_replace(Arc::new(next));
        tracing::info!(generation, "modules reloaded");
        Ok(generation)
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
            modules,
            group_log,
            shared,
            workers,
            ..
        } = self;
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
        drop((rooms, runtime, modules, shared, workers));
        let closed = tokio::task::spawn_blocking(move || group_log.close(Duration::from_secs(5))).await;
        if !matches!(closed, Ok(true)) {
            tracing::warn!("shutdown: the group log writer did not finish in 5 s");
        }
    }
}

fn nonzero(n: u32) -> std::num::NonZeroU32 {
    std::num::NonZeroU32::new(n).unwrap_or(std::num::NonZeroU32::MIN)
}

async fn accept_loop(endpoint: quinn::Endpoint, shared: Arc<Shared>, connections: TaskTracker) {
    let permits = Arc::new(Semaphore::new(shared.config.limits.max_connections as usize));
    loop {
        let incoming = tokio::select! {
            _ = shared.shutdown.cancelled() => break,
            i = endpoint.accept() => match i { Some(i) => i, None => break },
        };
        match Arc::clone(&permits).try_acquire_owned() {
            Ok(permit) => {
                let serve = connection::serve(incoming, Arc::clone(&shared), permit, connections.clone());
                connections.spawn(serve);
            }
            Err(_) => {
                metrics::counter!("throng_connections_refused_total").increment(1);
                tracing::warn!(remote = %incoming.remote_address(), "at max_connections; refusing");
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
            }
        }
    }
}

/// Transport settings for many mostly idle viewers: the client may open one
/// bidirectional (control) stream and no unidirectional ones, and its
/// receive windows are small, because quinn sizes per-connection state from
/// these limits. Public so the bare-quinn baseline of `throng load` runs
/// the very same settings.
pub fn transport(config: &Config) -> Result<quinn::TransportConfig, EdgeError> {
    let q = &config.quic;
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(1u32.into())
        .max_concurrent_uni_streams(0u32.into())
        .stream_receive_window(q.stream_receive_window.into())
        .receive_window(q.connection_receive_window.into())
        .send_window(q.send_window)
        .max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(q.idle_timeout).map_err(|e| EdgeError::Transport(e.to_string()))?,
        ))
        .keep_alive_interval(q.keep_alive)
        .datagram_receive_buffer_size(None)
        .enable_segmentation_offload(q.segmentation_offload);
    Ok(t)
}

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
