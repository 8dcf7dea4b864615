//! Edge configuration in two phases: deserialize the TOML strictly
//! (`deny_unknown_fields`, so a typo is an error, not a silent default),
//! then validate once into a typed [`Config`]. Every error names the key.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;
use throng_wire::{DEFAULT_MAX_FRAME, HARD_MAX_FRAME};

use crate::filter::OnFailure;
use crate::wasm::{Budget, WasmSettings};

/// The embedded defaults `throng serve` uses without `--config`.
pub const DEV_CONFIG: &str = include_str!("../../../edge-config/dev.toml");

/// The region of an edge whose `[cluster]` names none.
pub const DEFAULT_REGION: &str = "default";
/// How often an edge announces itself, unless `cluster.heartbeat` says.
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(1);

/// An edge id or region: one NATS subject token, and readable in a log.
pub fn check_bus_token(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > 64 {
        return Err(format!("must be 1 to 64 characters, not {}", s.len()));
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
    {
        return Err(format!(
            "`{}` is not allowed: use letters, digits, `-` and `_`",
            c.escape_default()
        ));
    }
    Ok(())
}

/// A NATS server URL: `nats://host:port` (or `tls://`), or a bare `host:port`.
pub fn check_nats_url(url: &str) -> Result<(), String> {
    let rest = url
        .strip_prefix("nats://")
        .or_else(|| url.strip_prefix("tls://"))
        .unwrap_or(url);
    let host_port = rest.rsplit('@').next().unwrap_or(rest);
    match host_port.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => Ok(()),
        _ => Err(format!("`{url}` is not a NATS URL like nats://127.0.0.1:4222")),
    }
}

/// Most threads one size class may ask for.
const MAX_CLASS_WORKERS: usize = 64;

/// A configuration that is wrong, with the key at fault.
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{origin}: `{key}`: {message}")]
    Parse {
        origin: String,
        key: String,
        message: String,
    },
    #[error("{origin}: `{key}`: {reason}")]
    Invalid {
        origin: String,
        key: String,
        reason: String,
    },
}

/// Shortest operator key accepted.
pub const MIN_OPERATOR_KEY: usize = 24;

/// The validated configuration of one edge.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    /// TCP address of the admin HTTP endpoint (`/stats`, `/metrics`); none
    /// when absent.
    pub admin: Option<SocketAddr>,
    pub data_dir: PathBuf,
    /// Certificate chain and key (PEM). Without them a self-signed dev
    /// certificate is made in `data_dir` on first start and reused.
    pub tls: Option<TlsFiles>,
    pub limits: LimitsConfig,
    pub quic: QuicConfig,
    pub rooms: RoomsConfig,
    pub storage: StorageConfig,
    pub tenants: BTreeMap<String, TenantConfig>,
    pub wasm: WasmSettings,
    /// Which policy a room runs: the first rule matching tenant and room wins;
    /// without a match, the built-in policy with `rooms.viewer_cap_per_sec`.
    pub policies: Vec<PolicyRule>,
    /// Each tenant's filter chain, in order.
    pub filters: BTreeMap<String, Vec<ModuleUse>>,
    /// `[cluster]`: edges that share rooms over NATS. None: a single edge,
    /// which needs no NATS.
    pub cluster: Option<ClusterConfig>,
    /// `[control]`: the admin API's callers and tenants' quotas.
    pub control: ControlConfig,
    /// `[webtransport]`: browsers on the same UDP port (ALPN `h3`). None
    /// when turned off.
    pub webtransport: Option<WebTransportConfig>,
}

/// `[webtransport]`: browser sessions over HTTP/3 beside native QUIC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebTransportConfig {
    /// The path a session's CONNECT must ask for (`/throng`).
    pub path: String,
    /// Page origins allowed to open sessions (`*` allows any). The demo
    /// page's own origin is always allowed. A request without an Origin
    /// header is not from a browser page and is let through: the token
    /// still decides who it is.
    pub allowed_origins: Vec<String>,
    /// Serve the demo page at `/demo` on the admin endpoint.
    pub demo: bool,
    /// How long the self-signed WebTransport dev certificate is valid.
    /// Browsers take one by hash only if it is ECDSA and valid at most
    /// 14 days.
    pub dev_cert_lifetime: Duration,
    /// A dev certificate with less than this left is replaced.
    pub dev_cert_renew_before: Duration,
}

/// `scheme://host[:port]`, nothing after: the form of a browser's Origin header.
fn is_origin(s: &str) -> bool {
    let Some(rest) = s.strip_prefix("https://").or_else(|| s.strip_prefix("http://")) else {
        return false;
    };
    !rest.is_empty() && !rest.contains(['/', ' ', '?', '#', '@'])
}

/// How far back a new dev certificate's validity starts.
pub const DEV_CERT_BACKDATE: Duration = Duration::from_secs(60);

/// Longest validity browsers accept for a certificate pinned by hash.
pub const MAX_PINNED_CERT_LIFETIME: Duration = Duration::from_secs(14 * 24 * 3600);

/// `[control]`: who may call the admin API (`/v1`), how far rollback
/// reaches, and what each tenant's uploads may cost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlConfig {
    /// Operators' API keys.
    pub operators: Vec<OperatorKey>,
    /// Rollback reaches this many earlier deployments of a scope.
    pub history: u32,
    /// Every tenant's quota unless `[tenants.X.quota]` says otherwise.
    pub quota: TenantQuota,
    /// Per-tenant quotas, resolved (the default filled in).
    pub tenant_quotas: BTreeMap<String, TenantQuota>,
}

impl ControlConfig {
    /// `tenant`'s quota.
    pub fn quota_of(&self, tenant: &str) -> &TenantQuota {
        self.tenant_quotas.get(tenant).unwrap_or(&self.quota)
    }
}

/// An operator's API key (`Authorization: Bearer <key>`).
#[derive(Clone, PartialEq, Eq)]
pub struct OperatorKey {
    pub name: String,
    pub key: String,
}

impl std::fmt::Debug for OperatorKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Keys end up in logs through Debug otherwise.
        write!(f, "OperatorKey({:?}, <redacted>)", self.name)
    }
}

/// What one tenant's filters may cost on an edge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantQuota {
    /// Largest module the tenant may upload.
    pub max_module_bytes: usize,
    /// Modules the tenant may keep in the store.
    pub max_modules: u32,
    /// Filter instances the tenant's chain may hold on an edge: each filter
    /// keeps two (its instance and a warm spare).
    pub max_instances: u32,
    /// Linear memory of each of the tenant's filter instances.
    pub filter_memory_bytes: usize,
    /// CPU time of one filter call (the fixed part; `wasm.budget_per_message`
    /// is added per message of the batch).
    pub filter_budget: Duration,
    /// CPU time the tenant's uploads may spend compiling in any hour (a
    /// refused upload costs the same as a stored one); an upload past it
    /// is refused until enough has come back.
    pub compile_per_hour: Duration,
    /// Bytes the tenant's stored modules may take on an edge: each module's
    /// bytes and its compiled code in the edge's cache.
    pub max_stored_bytes: u64,
}

/// What a tenant's stored modules may take on an edge unless its quota
/// says otherwise: 2 GiB, source and compiled code.
pub const DEFAULT_MAX_STORED_BYTES: u64 = 2 << 30;

/// `[cluster]`: how this edge joins the others over NATS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// NATS server URLs (`nats://host:port`), tried in order.
    pub nats: Vec<String>,
    /// This edge's id in the cluster; None: generated at start.
    pub edge_id: Option<String>,
    /// The region this edge is in (its presence aggregator's scope).
    pub region: String,
    pub credentials: Option<NatsCredentials>,
    /// How often this edge announces itself.
    pub heartbeat: Duration,
    /// An edge not heard from for this long is taken for dead.
    pub dead_after: Duration,
    /// Bus messages one subscription (a room's batches, this edge's
    /// ingress) buffers before NATS drops more: an edge that falls this far
    /// behind is a slow consumer, and its rooms resync from their origins.
    pub subscription_capacity: usize,
}

/// async-nats's own default.
pub const DEFAULT_SUBSCRIPTION_CAPACITY: usize = 65_536;

impl ClusterConfig {
    /// A cluster of these NATS servers with every other setting at its
    /// default (what `throng serve --cluster URL` alone gives).
    pub fn with_nats(nats: Vec<String>) -> Self {
        Self {
            nats,
            edge_id: None,
            region: DEFAULT_REGION.to_owned(),
            credentials: None,
            heartbeat: DEFAULT_HEARTBEAT,
            dead_after: DEFAULT_HEARTBEAT * 3,
            subscription_capacity: DEFAULT_SUBSCRIPTION_CAPACITY,
        }
    }
}

/// How the edge authenticates to NATS.
#[derive(Clone, PartialEq, Eq)]
pub enum NatsCredentials {
    UserPassword {
        user: String,
        password: String,
    },
    /// A `.creds` file (JWT and nkey seed), as `nsc` writes them.
    CredsFile(PathBuf),
    /// A file holding one nkey seed, as `throng nats-auth` writes them.
    NkeySeedFile(PathBuf),
}

impl std::fmt::Debug for NatsCredentials {
    // The password never reaches a log line or a reload diff.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::UserPassword { user, .. } => write!(f, "user {user:?} with a password"),
            Self::CredsFile(path) => write!(f, "creds file {}", path.display()),
            Self::NkeySeedFile(path) => write!(f, "nkey seed file {}", path.display()),
        }
    }
}

/// Where a module's bytes come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModuleSource {
    /// Shipped inside the binary (`builtin:policy-default`).
    Builtin(String),
    /// A component file.
    Path(PathBuf),
    /// `sha256:<hex>`: `<data_dir>/modules/<hex>.wasm`, checked against the hash.
    Hash(String),
}

/// A module and its params, with the config key that named it (for errors).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleUse {
    pub key: String,
    pub source: ModuleSource,
    pub params: Vec<(String, String)>,
    /// What happens when the module cannot answer (`on_failure`): filters
    /// default to closed (the batch is refused), policies to open (the
    /// built-in policy plans the tick).
    pub on_failure: OnFailure,
}

/// What policy a room runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicyChoice {
    /// The built-in policy, natively.
    Native {
        cap_per_sec: u32,
    },
    Module(ModuleUse),
}

/// `[[policy]]`: rooms matching `tenant` and `rooms` run `policy`.
#[derive(Debug, Clone)]
pub struct PolicyRule {
    pub tenant: String,
    pub rooms: String,
    /// Only rooms currently in this size class (`[[rooms.class]]` name).
    pub class: Option<String>,
    pub policy: PolicyChoice,
}

impl Config {
    /// The group log's file: `storage.group_log`, relative to the data dir.
    pub fn group_log_path(&self) -> PathBuf {
        self.data_dir.join(&self.storage.group_log)
    }

    /// Where compiled modules are cached.
    pub fn cache_dir(&self) -> PathBuf {
        self.data_dir.join("cache")
    }

    /// Every setting that differs in `next` and that a running edge cannot
    /// take without a restart, as `key (old -> new)`. A reload applies
    /// tenants (keys, filters), `[[policy]]` and `[control]`; everything
    /// else is here.
    pub fn restart_needed(&self, next: &Config) -> Vec<String> {
        let mut out = Vec::new();
        // Every section is taken apart without `..`: a setting added to
        // the config does not compile until it is named here (compared, or
        // `apart` with its own comparison), so a reload never passes over
        // a change in silence.
        macro_rules! diff {
            ($prefix:literal, $ty:ident, $a:expr, $b:expr, [$($field:ident),* $(,)?] $(, apart [$($other:ident),* $(,)?])?) => {{
                let $ty { $($field: _,)* $($($other: _,)*)? } = &$a;
                $(
                    let (a, b) = (format!("{:?}", $a.$field), format!("{:?}", $b.$field));
                    if a != b {
                        out.push(format!(concat!($prefix, stringify!($field), " ({} -> {})"), a, b));
                    }
                )*
            }};
        }
        let Config {
            listen,
            admin,
            data_dir,
            tls,
            cluster,
            // Compared section by section below.
            limits: _,
            quic: _,
            rooms: _,
            storage: _,
            wasm: _,
            webtransport: _,
            // Applied by a reload: keys, filter chains, rules, control.
            tenants: _,
            policies: _,
            filters: _,
            control: _,
        } = self;
        let whole: [(&str, &dyn std::fmt::Debug, &dyn std::fmt::Debug); 5] = [
            ("server.listen", listen, &next.listen),
            ("server.admin", admin, &next.admin),
            ("server.data_dir", data_dir, &next.data_dir),
            ("tls", tls, &next.tls),
            ("cluster", cluster, &next.cluster),
        ];
        for (key, a, b) in whole {
            let (a, b) = (format!("{a:?}"), format!("{b:?}"));
            if a != b {
                out.push(format!("{key} ({a} -> {b})"));
            }
        }
        diff!(
            "limits.",
            LimitsConfig,
            self.limits,
            next.limits,
            [
                max_connections,
                max_rooms_per_connection,
                max_frame_bytes,
                max_body_bytes,
                send_rate_per_sec,
                send_burst,
                hello_timeout,
                max_unauthenticated,
                max_unauthenticated_per_ip,
                handshake_timeout,
                retry_above,
                reply_queue,
                control_rate_per_sec,
                control_burst,
                max_rooms_per_tenant,
                room_create_rate_per_sec,
                room_create_burst,
                max_room_creations_per_connection,
            ]
        );
        diff!(
            "quic.",
            QuicConfig,
            self.quic,
            next.quic,
            [
                idle_timeout,
                keep_alive,
                udp_recv_buffer,
                udp_send_buffer,
                segmentation_offload,
                stream_receive_window,
                connection_receive_window,
                send_window,
            ]
        );
        diff!(
            "rooms.",
            RoomsConfig,
            self.rooms,
            next.rooms,
            [
                tick,
                viewer_cap_per_sec,
                recent_messages,
                viewer_queue_batches,
                max_behind,
                presence_interval,
                empty_room_linger,
                inbox_capacity,
                group_rooms,
                shard_members,
                pace_chunk,
                group_max_members,
                group_history,
                group_retention,
            ],
            apart[classes]
        );
        if self.rooms.classes != next.rooms.classes {
            out.push(format!(
                "rooms.class ({:?} -> {:?})",
                self.rooms.classes, next.rooms.classes
            ));
        }
        diff!(
            "storage.",
            StorageConfig,
            self.storage,
            next.storage,
            [group_log, commit_interval, max_queued, compact_interval]
        );
        match (&self.webtransport, &next.webtransport) {
            (Some(a), Some(b)) => diff!(
                "webtransport.",
                WebTransportConfig,
                a,
                b,
                [path, allowed_origins, demo, dev_cert_lifetime, dev_cert_renew_before]
            ),
            (None, None) => {}
            (a, b) => out.push(format!(
                "webtransport ({} -> {})",
                if a.is_some() { "on" } else { "off" },
                if b.is_some() { "on" } else { "off" }
            )),
        }
        let (a, b) = (&self.wasm, &next.wasm);
        diff!(
            "wasm.",
            WasmSettings,
            a,
            b,
            [
                fuel_per_message,
                instantiate_budget,
                instantiate_fuel,
                max_module_bytes,
                policy_memory_bytes,
                filter_memory_bytes,
                max_instances,
                quarantine_after,
                quarantine_window,
                quarantine_cooldown,
                quarantine_cooldown_max,
            ],
            // Named by their keys in the file; the cache follows data_dir.
            apart [budget, budget_per_message, cache_dir]
        );
        let budget = |w: &WasmSettings| match w.budget {
            Budget::Epoch(d) => ("wasm.call_budget", format!("{d:?}")),
            Budget::Fuel(f) => ("wasm.fuel_per_call", f.to_string()),
        };
        if budget(a) != budget(b) {
            let ((ka, va), (kb, vb)) = (budget(a), budget(b));
            out.push(if ka == kb {
                format!("{ka} ({va} -> {vb})")
            } else {
                format!("wasm.budget ({ka} = {va} -> {kb} = {vb})")
            });
        }
        if a.budget_per_message != b.budget_per_message {
            out.push(format!(
                "wasm.call_budget_per_message ({:?} -> {:?})",
                a.budget_per_message, b.budget_per_message
            ));
        }
        out
    }
}

#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone)]
pub struct LimitsConfig {
    /// Authenticated connections (past Hello) at once.
    pub max_connections: u32,
    pub max_rooms_per_connection: u32,
    pub max_frame_bytes: u32,
    pub max_body_bytes: u32,
    pub send_rate_per_sec: u32,
    pub send_burst: u32,
    pub hello_timeout: Duration,
    /// Connections not yet authenticated (handshaking or before Hello), at
    /// once, and from one source address.
    pub max_unauthenticated: u32,
    pub max_unauthenticated_per_ip: u32,
    /// A QUIC handshake not complete within this is dropped.
    pub handshake_timeout: Duration,
    /// Above this many unauthenticated connections, new ones must prove
    /// their address first (a QUIC Retry round trip).
    pub retry_above: u32,
    /// Replies (acks, errors, pongs…) queued for one connection; a client
    /// that lets more pile up is not reading, and is closed (`TooSlow`).
    pub reply_queue: u32,
    /// Control frames (everything but Send) a connection may send a
    /// second, sustained and in a burst; beyond, they are refused
    /// (`RateLimited`), and a connection that keeps on is closed.
    pub control_rate_per_sec: u32,
    pub control_burst: u32,
    /// Rooms one tenant may have alive on this edge.
    pub max_rooms_per_tenant: u32,
    /// New rooms one user may create a second (sustained, and a burst).
    pub room_create_rate_per_sec: u32,
    pub room_create_burst: u32,
    /// New rooms one connection may create over its life.
    pub max_room_creations_per_connection: u32,
}

#[derive(Debug, Clone)]
pub struct QuicConfig {
    pub idle_timeout: Duration,
    pub keep_alive: Option<Duration>,
    pub udp_recv_buffer: usize,
    pub udp_send_buffer: usize,
    pub segmentation_offload: bool,
    pub stream_receive_window: u32,
    pub connection_receive_window: u32,
    pub send_window: u64,
}

#[derive(Debug, Clone)]
pub struct RoomsConfig {
    pub tick: Duration,
    /// Messages per second a viewer may be shown; 0 turns the cap off.
    pub viewer_cap_per_sec: u32,
    pub recent_messages: usize,
    pub viewer_queue_batches: usize,
    /// A viewer losing batches for this long is disconnected.
    pub max_behind: Duration,
    pub presence_interval: Duration,
    pub empty_room_linger: Duration,
    pub inbox_capacity: usize,
    /// Room name patterns of group rooms (durable log, full delivery,
    /// resume of everything missed); other rooms are livecast rooms.
    pub group_rooms: Vec<String>,
    /// Size classes, ascending by `min_members`; the first starts at 0.
    pub classes: Vec<RoomClass>,
    /// Rooms with at least this many members queue each batch for their
    /// members from parallel shards, one per thread of their class's pool.
    pub shard_members: usize,
    /// A class with a `spread` pushes a batch to this many viewers per step.
    pub pace_chunk: usize,
    /// Most members a group room takes (members persist across visits).
    pub group_max_members: u64,
    /// What of a group room's history a new member may read.
    pub group_history: GroupHistory,
    /// What the group log keeps per room.
    pub group_retention: GroupRetention,
}

/// `rooms.group_history`: what a group member may read from before it
/// joined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GroupHistory {
    /// Nothing: a member reads what came after it joined, whatever
    /// `resume_from` it asks for.
    #[default]
    SinceJoin,
    /// Everything the log still has.
    All,
}

/// `[rooms.group_retention]`: unset keys keep everything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupRetention {
    /// Messages older than this are removed.
    pub max_age: Option<Duration>,
    /// At most about this many messages per room (the newest).
    pub max_messages: Option<u64>,
    /// Stored group messages of one tenant on this edge, in bytes: past
    /// it the tenant's group rooms refuse new messages (`StorageFull`)
    /// until retention has removed enough. Always set (default 1 GiB), so
    /// one tenant cannot fill the disk; in a cluster it is the tenant's
    /// JetStream stream's `max_bytes`, kept across edges.
    pub max_tenant_bytes: u64,
}

impl Default for GroupRetention {
    fn default() -> Self {
        GroupRetention {
            max_age: None,
            max_messages: None,
            max_tenant_bytes: DEFAULT_MAX_TENANT_BYTES,
        }
    }
}

/// `rooms.group_retention.max_tenant_bytes` unless set.
pub const DEFAULT_MAX_TENANT_BYTES: u64 = 1 << 30;

/// Rooms of at least `min_members` tick at `tick` (until the next class).
/// A room moves up when it reaches the next class's `min_members` and back
/// down only below 80% of its own, so a room at the edge does not flap.
/// Each class runs its rooms and their viewers' writers on its own
/// `workers` threads (0: on the edge's main threads). A class with a `spread` pushes each batch in steps of
/// `rooms.pace_chunk` viewers over that long, so the QUIC layer every room
/// shares gets the huge room's work a bit at a time, not all at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomClass {
    pub name: String,
    pub min_members: u64,
    pub tick: Duration,
    pub workers: usize,
    pub spread: Duration,
}

/// Where group rooms keep their log.
#[derive(Debug, Clone)]
pub struct StorageConfig {
    /// The redb file of the group log.
    pub group_log: PathBuf,
    /// Longest wait before appended messages are committed together.
    pub commit_interval: Duration,
    /// Messages waiting for a commit above which group rooms refuse new
    /// messages (`ServerBusy`) until the log catches up.
    pub max_queued: u64,
    /// Least time between two compactions of the group log's file (after
    /// retention removed something).
    pub compact_interval: Duration,
}

#[derive(Debug, Clone)]
pub enum TenantConfig {
    Hs256 { secret: Vec<u8> },
    Es256 { public_key_pem: Vec<u8> },
}

// ---- phase one: what the file may say ----

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: RawServer,
    tls: Option<RawTls>,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    quic: RawQuic,
    #[serde(default)]
    rooms: RawRooms,
    #[serde(default)]
    tenants: BTreeMap<String, RawTenant>,
    #[serde(default)]
    wasm: RawWasm,
    #[serde(default)]
    policy: Vec<RawPolicyRule>,
    #[serde(default)]
    storage: RawStorage,
    cluster: Option<RawCluster>,
    #[serde(default)]
    control: RawControl,
    #[serde(default)]
    webtransport: RawWebTransport,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawWebTransport {
    enabled: bool,
    path: String,
    allowed_origins: Vec<String>,
    demo: bool,
    #[serde(with = "humantime_serde")]
    dev_cert_lifetime: Duration,
    #[serde(with = "humantime_serde")]
    dev_cert_renew_before: Duration,
}

impl Default for RawWebTransport {
    fn default() -> Self {
        Self {
            enabled: true,
            path: "/throng".into(),
            allowed_origins: Vec::new(),
            demo: false,
            dev_cert_lifetime: Duration::from_secs(13 * 24 * 3600),
            dev_cert_renew_before: Duration::from_secs(3 * 24 * 3600),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawControl {
    operators: Vec<RawOperator>,
    history: u32,
    quota: RawQuota,
}

impl Default for RawControl {
    fn default() -> Self {
        Self {
            operators: Vec::new(),
            history: 10,
            quota: RawQuota::default(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOperator {
    name: String,
    key: String,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQuota {
    max_module_bytes: Option<usize>,
    max_modules: Option<u32>,
    max_instances: Option<u32>,
    filter_memory_bytes: Option<usize>,
    #[serde(default, with = "humantime_serde")]
    filter_budget: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    compile_per_hour: Option<Duration>,
    max_stored_bytes: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    #[serde(default)]
    nats: Vec<String>,
    edge_id: Option<String>,
    region: Option<String>,
    user: Option<String>,
    password: Option<String>,
    creds_file: Option<PathBuf>,
    nkey_seed_file: Option<PathBuf>,
    #[serde(default, with = "humantime_serde")]
    heartbeat: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    dead_after: Option<Duration>,
    subscription_capacity: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawStorage {
    group_log: PathBuf,
    #[serde(with = "humantime_serde")]
    commit_interval: Duration,
    max_queued: u64,
    #[serde(with = "humantime_serde")]
    compact_interval: Duration,
}

impl Default for RawStorage {
    fn default() -> Self {
        Self {
            group_log: PathBuf::from("group-log.redb"),
            commit_interval: Duration::from_millis(10),
            max_queued: 1_000_000,
            compact_interval: Duration::from_secs(3600),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawWasm {
    budget: String,
    #[serde(with = "humantime_serde")]
    call_budget: Duration,
    #[serde(with = "humantime_serde")]
    call_budget_per_message: Duration,
    fuel_per_call: u64,
    fuel_per_message: u64,
    #[serde(with = "humantime_serde")]
    instantiate_budget: Duration,
    instantiate_fuel: u64,
    max_module_bytes: usize,
    policy_memory_bytes: usize,
    filter_memory_bytes: usize,
    max_instances: u32,
    quarantine_after: u32,
    #[serde(with = "humantime_serde")]
    quarantine_window: Duration,
    #[serde(with = "humantime_serde")]
    quarantine_cooldown: Duration,
    #[serde(with = "humantime_serde")]
    quarantine_cooldown_max: Duration,
}

impl Default for RawWasm {
    fn default() -> Self {
        let d = WasmSettings::default();
        Self {
            budget: "epoch".into(),
            call_budget: Duration::from_millis(5),
            call_budget_per_message: d.budget_per_message,
            fuel_per_call: 50_000_000,
            fuel_per_message: d.fuel_per_message,
            instantiate_budget: d.instantiate_budget,
            instantiate_fuel: d.instantiate_fuel,
            max_module_bytes: d.max_module_bytes,
            policy_memory_bytes: d.policy_memory_bytes,
            filter_memory_bytes: d.filter_memory_bytes,
            max_instances: d.max_instances,
            quarantine_after: d.quarantine_after,
            quarantine_window: d.quarantine_window,
            quarantine_cooldown: d.quarantine_cooldown,
            quarantine_cooldown_max: d.quarantine_cooldown_max,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicyRule {
    #[serde(default = "star")]
    tenant: String,
    #[serde(default = "star")]
    rooms: String,
    class: Option<String>,
    module: String,
    #[serde(default)]
    params: BTreeMap<String, toml::Value>,
    /// "open" (default: the built-in policy plans a tick the module could
    /// not) or "closed" (only host and system messages go out that tick).
    on_failure: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModuleUse {
    module: String,
    #[serde(default)]
    params: BTreeMap<String, toml::Value>,
    on_failure: Option<String>,
}

fn star() -> String {
    "*".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawServer {
    listen: String,
    data_dir: PathBuf,
    admin: Option<String>,
}

impl Default for RawServer {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:4433".into(),
            data_dir: PathBuf::from(".throng"),
            admin: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: PathBuf,
    key: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawLimits {
    max_connections: u32,
    max_rooms_per_connection: u32,
    max_frame_bytes: u32,
    max_body_bytes: u32,
    send_rate_per_sec: u32,
    send_burst: u32,
    #[serde(with = "humantime_serde")]
    hello_timeout: Duration,
    max_unauthenticated: u32,
    max_unauthenticated_per_ip: u32,
    #[serde(with = "humantime_serde")]
    handshake_timeout: Duration,
    retry_above: u32,
    reply_queue: u32,
    control_rate_per_sec: u32,
    control_burst: u32,
    max_rooms_per_tenant: u32,
    room_create_rate_per_sec: u32,
    room_create_burst: u32,
    max_room_creations_per_connection: u32,
}

impl Default for RawLimits {
    fn default() -> Self {
        Self {
            max_connections: 100_000,
            max_rooms_per_connection: 8,
            max_frame_bytes: DEFAULT_MAX_FRAME,
            max_body_bytes: 4096,
            send_rate_per_sec: 10,
            send_burst: 20,
            hello_timeout: Duration::from_secs(5),
            max_unauthenticated: 2_000,
            max_unauthenticated_per_ip: 64,
            handshake_timeout: Duration::from_secs(5),
            retry_above: 200,
            reply_queue: 1_024,
            control_rate_per_sec: 100,
            control_burst: 200,
            max_rooms_per_tenant: 5_000,
            room_create_rate_per_sec: 5,
            room_create_burst: 20,
            max_room_creations_per_connection: 100,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawQuic {
    #[serde(with = "humantime_serde")]
    idle_timeout: Duration,
    #[serde(with = "humantime_serde")]
    keep_alive: Duration,
    udp_recv_buffer: usize,
    udp_send_buffer: usize,
    segmentation_offload: bool,
    stream_receive_window: u32,
    connection_receive_window: u32,
    send_window: u64,
}

impl Default for RawQuic {
    fn default() -> Self {
        Self {
            idle_timeout: Duration::from_secs(30),
            keep_alive: Duration::ZERO,
            udp_recv_buffer: 4 << 20,
            udp_send_buffer: 4 << 20,
            segmentation_offload: false,
            stream_receive_window: 64 * 1024,
            connection_receive_window: 128 * 1024,
            send_window: 1 << 20,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawRooms {
    #[serde(with = "humantime_serde")]
    tick: Duration,
    viewer_cap_per_sec: u32,
    recent_messages: usize,
    viewer_queue_batches: usize,
    #[serde(with = "humantime_serde")]
    max_behind: Duration,
    #[serde(with = "humantime_serde")]
    presence_interval: Duration,
    #[serde(with = "humantime_serde")]
    empty_room_linger: Duration,
    inbox_capacity: usize,
    group_rooms: Vec<String>,
    #[serde(rename = "class")]
    classes: Vec<RawClass>,
    shard_members: usize,
    pace_chunk: usize,
    group_max_members: u64,
    group_history: String,
    group_retention: RawRetention,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetention {
    #[serde(default, with = "humantime_serde")]
    max_age: Option<Duration>,
    max_messages: Option<u64>,
    max_tenant_bytes: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClass {
    name: String,
    min_members: u64,
    #[serde(with = "humantime_serde")]
    tick: Duration,
    #[serde(default = "one")]
    workers: usize,
    #[serde(default, with = "humantime_serde")]
    spread: Duration,
}

fn one() -> usize {
    1
}

impl Default for RawRooms {
    fn default() -> Self {
        Self {
            tick: Duration::from_millis(50),
            viewer_cap_per_sec: 20,
            recent_messages: 50,
            viewer_queue_batches: 64,
            max_behind: Duration::from_secs(30),
            presence_interval: Duration::from_secs(1),
            empty_room_linger: Duration::from_secs(30),
            inbox_capacity: 8192,
            group_rooms: Vec::new(),
            classes: Vec::new(),
            shard_members: 20_000,
            pace_chunk: 256,
            group_max_members: 10_000,
            group_history: "since_join".into(),
            group_retention: RawRetention::default(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTenant {
    hs256_secret: Option<String>,
    es256_public_key: Option<PathBuf>,
    #[serde(default)]
    filters: Vec<RawModuleUse>,
    quota: Option<RawQuota>,
}

// ---- phase two: what it means ----

impl Config {
    /// The embedded development defaults.
    pub fn dev() -> Result<Self, ConfigError> {
        Self::parse(DEV_CONFIG, "<embedded dev.toml>", Path::new("."))
    }

    /// Reads and validates a config file; relative paths in it are resolved
    /// against the file's directory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::parse(&text, &path.display().to_string(), base)
    }

    /// Parses and validates TOML text. `origin` names the text in errors.
    pub fn parse(text: &str, origin: &str, base: &Path) -> Result<Self, ConfigError> {
        let de = toml::Deserializer::new(text);
        let raw: RawConfig = serde_path_to_error::deserialize(de).map_err(|e| ConfigError::Parse {
            origin: origin.to_owned(),
            key: key_path(e.path()),
            message: e.inner().message().trim().to_owned(),
        })?;
        Validator { origin, base }.validate(raw)
    }
}

/// The key at fault as TOML spells it: a key that cannot be bare (empty, or
/// with dots, spaces or control characters) is quoted, so the error names
/// it visibly and unambiguously (`""`, not an empty string).
fn key_path(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut out = String::new();
    for segment in path {
        match segment {
            Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            Segment::Map { key } | Segment::Enum { variant: key } => {
                if !out.is_empty() {
                    out.push('.');
                }
                let bare = !key.is_empty() && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
                if bare {
                    out.push_str(key);
                } else {
                    out.push_str(&format!("{key:?}"));
                }
            }
            Segment::Unknown => out.push_str(if out.is_empty() { "?" } else { ".?" }),
        }
    }
    if out.is_empty() { "(top level)".into() } else { out }
}

struct Validator<'a> {
    origin: &'a str,
    base: &'a Path,
}

impl Validator<'_> {
    fn err(&self, key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            origin: self.origin.to_owned(),
            key: key.into(),
            reason: reason.into(),
        }
    }

    fn range<T: PartialOrd + std::fmt::Display + Copy>(
        &self,
        key: &str,
        value: T,
        min: T,
        max: T,
    ) -> Result<T, ConfigError> {
        if value < min || value > max {
            return Err(self.err(key, format!("{value} is out of range; allowed {min} to {max}")));
        }
        Ok(value)
    }

    fn duration(&self, key: &str, value: Duration, min: Duration, max: Duration) -> Result<Duration, ConfigError> {
        if value < min || value > max {
            return Err(self.err(key, format!("{value:?} is out of range; allowed {min:?} to {max:?}")));
        }
        Ok(value)
    }

    fn path(&self, p: PathBuf) -> PathBuf {
        if p.is_absolute() { p } else { self.base.join(p) }
    }

    fn validate(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        let listen: SocketAddr = raw.server.listen.parse().map_err(|e| {
            self.err(
                "server.listen",
                format!("`{}` is not an ip:port address: {e}", raw.server.listen),
            )
        })?;
        let admin = match &raw.server.admin {
            None => None,
            Some(a) => Some(
                a.parse::<SocketAddr>()
                    .map_err(|e| self.err("server.admin", format!("`{a}` is not an ip:port address: {e}")))?,
            ),
        };
        if raw.server.data_dir.as_os_str().is_empty() {
            return Err(self.err("server.data_dir", "must not be empty"));
        }
        let data_dir = self.path(raw.server.data_dir);
        let tls = raw.tls.map(|t| TlsFiles {
            cert: self.path(t.cert),
            key: self.path(t.key),
        });

        let l = raw.limits;
        let max_frame_bytes = self.range("limits.max_frame_bytes", l.max_frame_bytes, 1024, HARD_MAX_FRAME)?;
        // A Send frame carries the room name and a few ids beside the body.
        let body_room = max_frame_bytes - 512;
        let limits = LimitsConfig {
            max_connections: self.range("limits.max_connections", l.max_connections, 1, 10_000_000)?,
            max_rooms_per_connection: self.range(
                "limits.max_rooms_per_connection",
                l.max_rooms_per_connection,
                1,
                1024,
            )?,
            max_frame_bytes,
            max_body_bytes: self.range("limits.max_body_bytes", l.max_body_bytes, 1, body_room)?,
            send_rate_per_sec: self.range("limits.send_rate_per_sec", l.send_rate_per_sec, 1, 1_000_000)?,
            send_burst: self.range("limits.send_burst", l.send_burst, 1, 10_000_000)?,
            hello_timeout: self.duration(
                "limits.hello_timeout",
                l.hello_timeout,
                Duration::from_millis(100),
                Duration::from_secs(120),
            )?,
            max_unauthenticated: self.range("limits.max_unauthenticated", l.max_unauthenticated, 1, 1_000_000)?,
            max_unauthenticated_per_ip: self.range(
                "limits.max_unauthenticated_per_ip",
                l.max_unauthenticated_per_ip,
                1,
                1_000_000,
            )?,
            handshake_timeout: self.duration(
                "limits.handshake_timeout",
                l.handshake_timeout,
                Duration::from_millis(100),
                Duration::from_secs(60),
            )?,
            retry_above: self.range("limits.retry_above", l.retry_above, 0, 1_000_000)?,
            reply_queue: self.range("limits.reply_queue", l.reply_queue, 16, 1_000_000)?,
            control_rate_per_sec: self.range("limits.control_rate_per_sec", l.control_rate_per_sec, 1, 1_000_000)?,
            control_burst: self.range("limits.control_burst", l.control_burst, 1, 10_000_000)?,
            max_rooms_per_tenant: self.range("limits.max_rooms_per_tenant", l.max_rooms_per_tenant, 1, 10_000_000)?,
            room_create_rate_per_sec: self.range(
                "limits.room_create_rate_per_sec",
                l.room_create_rate_per_sec,
                1,
                1_000_000,
            )?,
            room_create_burst: self.range("limits.room_create_burst", l.room_create_burst, 1, 10_000_000)?,
            max_room_creations_per_connection: self.range(
                "limits.max_room_creations_per_connection",
                l.max_room_creations_per_connection,
                1,
                10_000_000,
            )?,
        };

        let q = raw.quic;
        let idle_timeout = self.duration(
            "quic.idle_timeout",
            q.idle_timeout,
            Duration::from_secs(1),
            Duration::from_secs(3600),
        )?;
        let keep_alive = if q.keep_alive.is_zero() {
            None
        } else if q.keep_alive >= idle_timeout {
            return Err(self.err(
                "quic.keep_alive",
                "must be shorter than quic.idle_timeout (or 0s to disable)",
            ));
        } else {
            Some(q.keep_alive)
        };
        let quic = QuicConfig {
            idle_timeout,
            keep_alive,
            udp_recv_buffer: self.range("quic.udp_recv_buffer", q.udp_recv_buffer, 64 << 10, 256 << 20)?,
            udp_send_buffer: self.range("quic.udp_send_buffer", q.udp_send_buffer, 64 << 10, 256 << 20)?,
            segmentation_offload: q.segmentation_offload,
            stream_receive_window: self.range(
                "quic.stream_receive_window",
                q.stream_receive_window,
                max_frame_bytes.clamp(4096, 1 << 20),
                64 << 20,
            )?,
            connection_receive_window: self.range(
                "quic.connection_receive_window",
                q.connection_receive_window,
                4096,
                256 << 20,
            )?,
            send_window: self.range("quic.send_window", q.send_window, 4096, 1 << 30)?,
        };

        let r = raw.rooms;
        let rooms = RoomsConfig {
            tick: self.duration("rooms.tick", r.tick, Duration::from_millis(1), Duration::from_secs(10))?,
            viewer_cap_per_sec: self.range("rooms.viewer_cap_per_sec", r.viewer_cap_per_sec, 0, 100_000)?,
            recent_messages: self.range("rooms.recent_messages", r.recent_messages, 0, 100_000)?,
            viewer_queue_batches: self.range("rooms.viewer_queue_batches", r.viewer_queue_batches, 1, 100_000)?,
            max_behind: self.duration(
                "rooms.max_behind",
                r.max_behind,
                Duration::from_millis(100),
                Duration::from_secs(3600),
            )?,
            presence_interval: self.duration(
                "rooms.presence_interval",
                r.presence_interval,
                Duration::from_millis(10),
                Duration::from_secs(3600),
            )?,
            empty_room_linger: self.duration(
                "rooms.empty_room_linger",
                r.empty_room_linger,
                Duration::ZERO,
                Duration::from_secs(86_400),
            )?,
            inbox_capacity: self.range("rooms.inbox_capacity", r.inbox_capacity, 16, 10_000_000)?,
            group_rooms: r.group_rooms,
            classes: Vec::new(),
            shard_members: self.range("rooms.shard_members", r.shard_members, 1, usize::MAX)?,
            pace_chunk: self.range("rooms.pace_chunk", r.pace_chunk, 1, usize::MAX)?,
            group_max_members: self.range("rooms.group_max_members", r.group_max_members, 1, 10_000_000)?,
            group_history: match r.group_history.as_str() {
                "since_join" => GroupHistory::SinceJoin,
                "all" => GroupHistory::All,
                other => {
                    return Err(self.err(
                        "rooms.group_history",
                        format!("`{other}` is neither \"since_join\" nor \"all\""),
                    ));
                }
            },
            group_retention: GroupRetention {
                max_age: r
                    .group_retention
                    .max_age
                    .map(|d| {
                        self.duration(
                            "rooms.group_retention.max_age",
                            d,
                            Duration::from_secs(1),
                            Duration::from_secs(100 * 365 * 86_400),
                        )
                    })
                    .transpose()?,
                max_messages: r
                    .group_retention
                    .max_messages
                    .map(|n| self.range("rooms.group_retention.max_messages", n, 1, u64::MAX))
                    .transpose()?,
                max_tenant_bytes: match r.group_retention.max_tenant_bytes {
                    None => DEFAULT_MAX_TENANT_BYTES,
                    Some(n) => self.range("rooms.group_retention.max_tenant_bytes", n, 1 << 16, u64::MAX)?,
                },
            },
        };
        let mut rooms = rooms;
        rooms.classes = if r.classes.is_empty() {
            vec![RoomClass {
                name: "default".into(),
                min_members: 0,
                tick: rooms.tick,
                // One class: nothing to keep apart, so no thread hop.
                workers: 0,
                spread: Duration::ZERO,
            }]
        } else {
            let mut classes = Vec::new();
            for (i, c) in r.classes.into_iter().enumerate() {
                let key = format!("rooms.class[{i}]");
                let tick = self.duration(
                    &format!("{key}.tick"),
                    c.tick,
                    Duration::from_millis(1),
                    Duration::from_secs(10),
                )?;
                match classes.last() {
                    None if c.min_members != 0 => {
                        return Err(self.err(format!("{key}.min_members"), "the first class must start at 0 members"));
                    }
                    Some(RoomClass { min_members, .. }) if c.min_members <= *min_members => {
                        return Err(self.err(
                            format!("{key}.min_members"),
                            format!("{} is not above the previous class's {min_members}", c.min_members),
                        ));
                    }
                    _ => {}
                }
                if c.workers > MAX_CLASS_WORKERS {
                    return Err(self.err(
                        format!("{key}.workers"),
                        format!("{} is above {MAX_CLASS_WORKERS}", c.workers),
                    ));
                }
                if c.spread >= tick {
                    return Err(self.err(
                        format!("{key}.spread"),
                        format!("{:?} is not shorter than the class's tick {tick:?}", c.spread),
                    ));
                }
                classes.push(RoomClass {
                    name: c.name,
                    min_members: c.min_members,
                    tick,
                    workers: c.workers,
                    spread: c.spread,
                });
            }
            classes
        };
        if let Some(p) = rooms.group_rooms.iter().find(|p| p.is_empty()) {
            return Err(self.err("rooms.group_rooms", format!("empty pattern {p:?}")));
        }
        let st = raw.storage;
        let storage = StorageConfig {
            // Relative paths stay relative: they resolve against the data
            // dir, which `--data-dir` may still change (see group_log_path).
            group_log: st.group_log,
            commit_interval: self.duration(
                "storage.commit_interval",
                st.commit_interval,
                Duration::from_millis(1),
                Duration::from_secs(10),
            )?,
            max_queued: self.range("storage.max_queued", st.max_queued, 1, u64::MAX)?,
            compact_interval: self.duration(
                "storage.compact_interval",
                st.compact_interval,
                Duration::ZERO,
                Duration::from_secs(365 * 86_400),
            )?,
        };

        if raw.tenants.is_empty() {
            return Err(self.err("tenants", "at least one tenant is needed, or no token can verify"));
        }
        let w = raw.wasm;
        let wasm = WasmSettings {
            budget: match w.budget.as_str() {
                "epoch" => Budget::Epoch(self.duration(
                    "wasm.call_budget",
                    w.call_budget,
                    Duration::from_millis(1),
                    Duration::from_secs(10),
                )?),
                "fuel" => Budget::Fuel(self.range("wasm.fuel_per_call", w.fuel_per_call, 10_000, 1 << 40)?),
                other => return Err(self.err("wasm.budget", format!("`{other}`: expected \"epoch\" or \"fuel\""))),
            },
            max_module_bytes: self.range("wasm.max_module_bytes", w.max_module_bytes, 1 << 10, 1 << 30)?,
            policy_memory_bytes: self.range("wasm.policy_memory_bytes", w.policy_memory_bytes, 1 << 16, 1 << 30)?,
            filter_memory_bytes: self.range("wasm.filter_memory_bytes", w.filter_memory_bytes, 1 << 16, 4 << 30)?,
            max_instances: self.range("wasm.max_instances", w.max_instances, 16, 1_000_000)?,
            quarantine_after: self.range("wasm.quarantine_after", w.quarantine_after, 1, 1_000_000)?,
            quarantine_window: self.duration(
                "wasm.quarantine_window",
                w.quarantine_window,
                Duration::from_secs(1),
                Duration::from_secs(86_400),
            )?,
            budget_per_message: self.duration(
                "wasm.call_budget_per_message",
                w.call_budget_per_message,
                Duration::ZERO,
                Duration::from_secs(1),
            )?,
            fuel_per_message: self.range("wasm.fuel_per_message", w.fuel_per_message, 0, 1 << 36)?,
            instantiate_budget: self.duration(
                "wasm.instantiate_budget",
                w.instantiate_budget,
                Duration::from_millis(10),
                Duration::from_secs(600),
            )?,
            instantiate_fuel: self.range("wasm.instantiate_fuel", w.instantiate_fuel, 10_000, 1 << 44)?,
            quarantine_cooldown: self.duration(
                "wasm.quarantine_cooldown",
                w.quarantine_cooldown,
                Duration::from_millis(100),
                Duration::from_secs(86_400),
            )?,
            quarantine_cooldown_max: self.duration(
                "wasm.quarantine_cooldown_max",
                w.quarantine_cooldown_max,
                w.quarantine_cooldown.max(Duration::from_millis(100)),
                Duration::from_secs(7 * 86_400),
            )?,
            // Set by the edge from server.data_dir (which --data-dir may
            // still change).
            cache_dir: None,
        };

        let mut policies = Vec::new();
        for (i, rule) in raw.policy.into_iter().enumerate() {
            let key = format!("policy[{i}]");
            let params = self.params(&format!("{key}.params"), rule.params)?;
            let policy = if rule.module == "native" {
                let cap = throng_policy_core::DefaultPolicy::from_params(
                    params.iter().map(|(k, v)| (k.as_str(), v.as_str())),
                )
                .map_err(|e| self.err(format!("{key}.params"), e))?
                .cap_per_sec();
                PolicyChoice::Native { cap_per_sec: cap }
            } else {
                PolicyChoice::Module(ModuleUse {
                    source: self.module_source(&format!("{key}.module"), &rule.module, wasm.max_module_bytes)?,
                    key: format!("{key}.module"),
                    params,
                    on_failure: self.on_failure(
                        &format!("{key}.on_failure"),
                        rule.on_failure.as_deref(),
                        OnFailure::Open,
                    )?,
                })
            };
            if let Some(class) = &rule.class
                && !rooms.classes.iter().any(|c| c.name == *class)
            {
                let known: Vec<&str> = rooms.classes.iter().map(|c| c.name.as_str()).collect();
                return Err(self.err(
                    format!("{key}.class"),
                    format!("no room class `{class}` (classes: {})", known.join(", ")),
                ));
            }
            policies.push(PolicyRule {
                tenant: rule.tenant,
                rooms: rule.rooms,
                class: rule.class,
                policy,
            });
        }

        let default_quota = self.quota("control.quota", &raw.control.quota, None, &wasm)?;
        let mut tenant_quotas = BTreeMap::new();
        let mut tenants = BTreeMap::new();
        let mut filters = BTreeMap::new();
        for (id, t) in raw.tenants {
            let key = format!("tenants.{id}");
            let quota = match &t.quota {
                None => default_quota.clone(),
                Some(q) => self.quota(&format!("{key}.quota"), q, Some(&default_quota), &wasm)?,
            };
            tenant_quotas.insert(id.clone(), quota);
            let mut chain = Vec::new();
            for (i, f) in t.filters.into_iter().enumerate() {
                let fkey = format!("{key}.filters[{i}]");
                let on_failure = self.on_failure(
                    &format!("{fkey}.on_failure"),
                    f.on_failure.as_deref(),
                    OnFailure::Closed,
                )?;
                chain.push(ModuleUse {
                    source: self.module_source(&format!("{fkey}.module"), &f.module, wasm.max_module_bytes)?,
                    key: format!("{fkey}.module"),
                    params: self.params(&format!("{fkey}.params"), f.params)?,
                    on_failure,
                });
            }
            if !chain.is_empty() {
                filters.insert(id.clone(), chain);
            }
            throng_wire::validate_room_name(&id)
                .map_err(|e| self.err(&key, format!("bad tenant id: {}", e.replace("room name", "tenant id"))))?;
            let tenant = match (t.hs256_secret, t.es256_public_key) {
                (Some(secret), None) => {
                    if secret.len() < 16 {
                        return Err(self.err(
                            format!("{key}.hs256_secret"),
                            format!("is {} bytes; use at least 16", secret.len()),
                        ));
                    }
                    TenantConfig::Hs256 {
                        secret: secret.into_bytes(),
                    }
                }
                (None, Some(path)) => {
                    let path = self.path(path);
                    let pem = std::fs::read(&path).map_err(|e| {
                        self.err(
                            format!("{key}.es256_public_key"),
                            format!("cannot read {}: {e}", path.display()),
                        )
                    })?;
                    jsonwebtoken::DecodingKey::from_ec_pem(&pem).map_err(|e| {
                        self.err(
                            format!("{key}.es256_public_key"),
                            format!("{} is not a PEM EC public key: {e}", path.display()),
                        )
                    })?;
                    TenantConfig::Es256 { public_key_pem: pem }
                }
                (Some(_), Some(_)) => {
                    return Err(self.err(&key, "set one of hs256_secret or es256_public_key, not both"));
                }
                (None, None) => {
                    return Err(self.err(&key, "needs hs256_secret or es256_public_key"));
                }
            };
            tenants.insert(id, tenant);
        }

        Ok(Config {
            listen,
            admin,
            data_dir,
            tls,
            limits,
            quic,
            rooms,
            storage,
            tenants,
            wasm,
            policies,
            filters,
            cluster: raw.cluster.map(|c| self.cluster(c)).transpose()?,
            control: self.control(raw.control.operators, raw.control.history, default_quota, tenant_quotas)?,
            webtransport: self.webtransport(raw.webtransport)?,
        })
    }

    fn webtransport(&self, w: RawWebTransport) -> Result<Option<WebTransportConfig>, ConfigError> {
        if !w.enabled {
            return Ok(None);
        }
        if !w.path.starts_with('/') || w.path.len() > 256 || w.path.contains(['?', '#', ' ']) {
            return Err(self.err(
                "webtransport.path",
                format!(
                    "`{}` is not a path (it starts with `/`, has no `?`, `#` or spaces, at most 256 bytes)",
                    w.path
                ),
            ));
        }
        for origin in &w.allowed_origins {
            let valid = origin == "*" || is_origin(origin);
            if !valid {
                return Err(self.err(
                    "webtransport.allowed_origins",
                    format!("`{origin}` is not an origin like \"https://example.com\" or \"http://127.0.0.1:9433\" (or \"*\")"),
                ));
            }
        }
        let lifetime = self.duration(
            "webtransport.dev_cert_lifetime",
            w.dev_cert_lifetime,
            Duration::from_secs(60),
            MAX_PINNED_CERT_LIFETIME,
        )?;
        // A new certificate starts a little in the past (clocks differ),
        // so it has that much less than its lifetime left.
        if w.dev_cert_renew_before + DEV_CERT_BACKDATE + Duration::from_secs(1) > lifetime {
            return Err(self.err(
                "webtransport.dev_cert_renew_before",
                format!(
                    "must be shorter than webtransport.dev_cert_lifetime less {}s (a new certificate is dated that far back)",
                    DEV_CERT_BACKDATE.as_secs()
                ),
            ));
        }
        Ok(Some(WebTransportConfig {
            path: w.path,
            allowed_origins: w.allowed_origins,
            demo: w.demo,
            dev_cert_lifetime: lifetime,
            dev_cert_renew_before: w.dev_cert_renew_before,
        }))
    }

    fn control(
        &self,
        operators: Vec<RawOperator>,
        history: u32,
        quota: TenantQuota,
        tenant_quotas: BTreeMap<String, TenantQuota>,
    ) -> Result<ControlConfig, ConfigError> {
        let mut out: Vec<OperatorKey> = Vec::new();
        for (i, o) in operators.into_iter().enumerate() {
            let key = format!("control.operators[{i}]");
            check_bus_token(&o.name).map_err(|why| self.err(format!("{key}.name"), why))?;
            if o.key.len() < MIN_OPERATOR_KEY {
                return Err(self.err(
                    format!("{key}.key"),
                    format!("is {} bytes; use at least {MIN_OPERATOR_KEY}", o.key.len()),
                ));
            }
            if o.key.bytes().any(|b| !b.is_ascii_graphic()) {
                return Err(self.err(format!("{key}.key"), "must be printable ASCII without spaces"));
            }
            if out.iter().any(|k| k.name == o.name) {
                return Err(self.err(format!("{key}.name"), format!("operator `{}` is named twice", o.name)));
            }
            if out.iter().any(|k| k.key == o.key) {
                return Err(self.err(format!("{key}.key"), "the same key is given to two operators"));
            }
            out.push(OperatorKey {
                name: o.name,
                key: o.key,
            });
        }
        Ok(ControlConfig {
            operators: out,
            history: self.range("control.history", history, 1, 1000)?,
            quota,
            tenant_quotas,
        })
    }

    /// A quota: each value given, else `inherit`'s, else the edge's own
    /// limit (`[wasm]`), which no quota may exceed.
    fn quota(
        &self,
        key: &str,
        q: &RawQuota,
        inherit: Option<&TenantQuota>,
        wasm: &WasmSettings,
    ) -> Result<TenantQuota, ConfigError> {
        let budget = match wasm.budget {
            crate::wasm::Budget::Epoch(d) => d,
            crate::wasm::Budget::Fuel(_) => Duration::from_millis(5),
        };
        let base = inherit.cloned().unwrap_or(TenantQuota {
            max_module_bytes: wasm.max_module_bytes,
            max_modules: 20,
            max_instances: 8,
            filter_memory_bytes: wasm.filter_memory_bytes,
            filter_budget: budget,
            compile_per_hour: Duration::from_secs(600),
            max_stored_bytes: DEFAULT_MAX_STORED_BYTES,
        });
        Ok(TenantQuota {
            max_module_bytes: match q.max_module_bytes {
                None => base.max_module_bytes,
                Some(v) => self.range(&format!("{key}.max_module_bytes"), v, 1 << 10, wasm.max_module_bytes)?,
            },
            max_modules: match q.max_modules {
                None => base.max_modules,
                Some(v) => self.range(&format!("{key}.max_modules"), v, 0, 10_000)?,
            },
            max_instances: match q.max_instances {
                None => base.max_instances,
                Some(v) => self.range(&format!("{key}.max_instances"), v, 0, 1_000)?,
            },
            filter_memory_bytes: match q.filter_memory_bytes {
                None => base.filter_memory_bytes,
                Some(v) => self.range(
                    &format!("{key}.filter_memory_bytes"),
                    v,
                    1 << 16,
                    wasm.filter_memory_bytes,
                )?,
            },
            filter_budget: match q.filter_budget {
                None => base.filter_budget,
                Some(v) => self.duration(
                    &format!("{key}.filter_budget"),
                    v,
                    Duration::from_millis(1),
                    Duration::from_secs(10),
                )?,
            },
            compile_per_hour: match q.compile_per_hour {
                None => base.compile_per_hour,
                Some(v) => self.duration(
                    &format!("{key}.compile_per_hour"),
                    v,
                    Duration::from_secs(1),
                    Duration::from_secs(3600),
                )?,
            },
            max_stored_bytes: match q.max_stored_bytes {
                None => base.max_stored_bytes,
                Some(v) => self.range(&format!("{key}.max_stored_bytes"), v, 1 << 20, 1 << 40)?,
            },
        })
    }

    fn cluster(&self, c: RawCluster) -> Result<ClusterConfig, ConfigError> {
        if c.nats.is_empty() {
            return Err(self.err(
                "cluster.nats",
                "needs at least one NATS URL, e.g. [\"nats://127.0.0.1:4222\"]",
            ));
        }
        for (i, url) in c.nats.iter().enumerate() {
            check_nats_url(url).map_err(|why| self.err(format!("cluster.nats[{i}]"), why))?;
        }
        if let Some(id) = &c.edge_id {
            check_bus_token(id).map_err(|why| self.err("cluster.edge_id", why))?;
        }
        let region = c.region.unwrap_or_else(|| DEFAULT_REGION.to_owned());
        check_bus_token(&region).map_err(|why| self.err("cluster.region", why))?;
        let credentials = match (c.user, c.password, c.creds_file, c.nkey_seed_file) {
            (None, None, None, None) => None,
            (Some(user), Some(password), None, None) => Some(NatsCredentials::UserPassword { user, password }),
            (None, None, Some(path), None) => Some(NatsCredentials::CredsFile(self.path(path))),
            (None, None, None, Some(path)) => Some(NatsCredentials::NkeySeedFile(self.path(path))),
            (Some(_), None, None, None) => return Err(self.err("cluster.password", "`user` needs a `password`")),
            (None, Some(_), None, None) => return Err(self.err("cluster.user", "`password` needs a `user`")),
            _ => {
                return Err(self.err(
                    "cluster.creds_file",
                    "set one of `user` and `password`, `creds_file` or `nkey_seed_file`",
                ));
            }
        };
        let heartbeat = self.duration(
            "cluster.heartbeat",
            c.heartbeat.unwrap_or(DEFAULT_HEARTBEAT),
            Duration::from_millis(50),
            Duration::from_secs(60),
        )?;
        let dead_after = c.dead_after.unwrap_or(heartbeat * 3);
        if dead_after < heartbeat * 2 {
            return Err(self.err(
                "cluster.dead_after",
                format!(
                    "{dead_after:?} is under two heartbeats ({heartbeat:?} each): a live edge would be taken for dead"
                ),
            ));
        }
        let dead_after = self.duration(
            "cluster.dead_after",
            dead_after,
            Duration::from_millis(100),
            Duration::from_secs(600),
        )?;
        let subscription_capacity = self.range(
            "cluster.subscription_capacity",
            c.subscription_capacity.unwrap_or(DEFAULT_SUBSCRIPTION_CAPACITY as u64),
            4,
            1 << 20,
        )? as usize;
        Ok(ClusterConfig {
            nats: c.nats,
            edge_id: c.edge_id,
            region,
            credentials,
            heartbeat,
            dead_after,
            subscription_capacity,
        })
    }

    fn params(&self, key: &str, raw: BTreeMap<String, toml::Value>) -> Result<Vec<(String, String)>, ConfigError> {
        raw.into_iter()
            .map(|(k, v)| {
                let v = match v {
                    toml::Value::String(s) => s,
                    toml::Value::Integer(i) => i.to_string(),
                    toml::Value::Float(f) => f.to_string(),
                    toml::Value::Boolean(b) => b.to_string(),
                    toml::Value::Array(items) => items
                        .into_iter()
                        .map(|i| match i {
                            toml::Value::String(s) => Ok(s),
                            toml::Value::Integer(n) => Ok(n.to_string()),
                            other => Err(self.err(
                                format!("{key}.{k}"),
                                format!("list items must be strings or numbers, not {}", other.type_str()),
                            )),
                        })
                        .collect::<Result<Vec<_>, _>>()?
                        .join(","),
                    other => {
                        return Err(self.err(
                            format!("{key}.{k}"),
                            format!("must be a string, number, boolean or list, not a {}", other.type_str()),
                        ));
                    }
                };
                Ok((k, v))
            })
            .collect()
    }

    fn on_failure(&self, key: &str, value: Option<&str>, default: OnFailure) -> Result<OnFailure, ConfigError> {
        match value {
            None => Ok(default),
            Some("closed") => Ok(OnFailure::Closed),
            Some("open") => Ok(OnFailure::Open),
            Some(other) => Err(self.err(key, format!("`{other}`: expected \"open\" or \"closed\""))),
        }
    }

    fn module_source(&self, key: &str, text: &str, max_bytes: usize) -> Result<ModuleSource, ConfigError> {
        if let Some(name) = text.strip_prefix("builtin:") {
            if !throng_guest_artifacts::BUILTIN.iter().any(|(n, _)| *n == name) {
                let known: Vec<&str> = throng_guest_artifacts::BUILTIN.iter().map(|(n, _)| *n).collect();
                return Err(self.err(
                    key,
                    format!("no built-in module `{name}` (built in: {})", known.join(", ")),
                ));
            }
            return Ok(ModuleSource::Builtin(name.to_owned()));
        }
        if let Some(hex) = text.strip_prefix("sha256:") {
            if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(self.err(key, "a sha256: reference needs 64 hex digits"));
            }
            return Ok(ModuleSource::Hash(hex.to_ascii_lowercase()));
        }
        let path = self.path(PathBuf::from(text));
        let meta =
            std::fs::metadata(&path).map_err(|e| self.err(key, format!("cannot read {}: {e}", path.display())))?;
        if meta.len() > max_bytes as u64 {
            return Err(self.err(
                key,
                format!(
                    "{} is {} bytes; wasm.max_module_bytes is {max_bytes}",
                    path.display(),
                    meta.len()
                ),
            ));
        }
        Ok(ModuleSource::Path(path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, "test.toml", Path::new("/etc/throng"))
    }

    const TENANT: &str = "[tenants.acme]\nhs256_secret = \"0123456789abcdef\"\n";

    #[test]
    fn a_reload_names_every_changed_setting_it_does_not_apply() {
        let base = parse(TENANT).unwrap();
        // What a reload applies is named nowhere: a new tenant and a rule.
        let applied = parse(&format!(
            "{TENANT}[tenants.globex]\nhs256_secret = \"fedcba9876543210\"\n\
             [[policy]]\nrooms = \"show-*\"\nmodule = \"native\"\nparams = {{ cap_per_sec = 5 }}\n"
        ))
        .unwrap();
        assert_eq!(base.restart_needed(&applied), Vec::<String>::new());
        let limits = [
            "max_connections = 7",
            "max_rooms_per_connection = 3",
            "max_frame_bytes = 32768",
            "max_body_bytes = 1000",
            "send_rate_per_sec = 3",
            "send_burst = 4",
            "hello_timeout = \"9s\"",
            "max_unauthenticated = 11",
            "max_unauthenticated_per_ip = 12",
            "handshake_timeout = \"8s\"",
            "retry_above = 13",
            "reply_queue = 32",
            "control_rate_per_sec = 15",
            "control_burst = 16",
            "max_rooms_per_tenant = 17",
            "room_create_rate_per_sec = 18",
            "room_create_burst = 19",
            "max_room_creations_per_connection = 20",
        ];
        let webtransport = [
            "path = \"/other\"",
            "allowed_origins = [\"https://example.com\"]",
            "demo = true",
            "dev_cert_lifetime = \"5days\"",
            "dev_cert_renew_before = \"1day\"",
        ];
        let changed = parse(&format!(
            "{TENANT}[limits]\n{}\n[webtransport]\n{}\n[storage]\ncompact_interval = \"1m\"\n\
             [rooms]\ngroup_history = \"all\"\n",
            limits.join("\n"),
            webtransport.join("\n")
        ))
        .unwrap();
        let named = base.restart_needed(&changed);
        let expected: Vec<String> = limits
            .iter()
            .map(|l| format!("limits.{}", l.split(' ').next().unwrap()))
            .chain(
                webtransport
                    .iter()
                    .map(|l| format!("webtransport.{}", l.split(' ').next().unwrap())),
            )
            .chain(["storage.compact_interval".into(), "rooms.group_history".into()])
            .collect();
        for key in &expected {
            assert!(
                named.iter().any(|n| n.starts_with(&format!("{key} ("))),
                "{key} not named in {named:#?}"
            );
        }
        assert_eq!(named.len(), expected.len(), "{named:#?}");
        let off = parse(&format!("{TENANT}[webtransport]\nenabled = false\n")).unwrap();
        assert_eq!(base.restart_needed(&off), ["webtransport (on -> off)"]);
    }

    #[test]
    fn dev_defaults_parse() {
        let c = Config::dev().unwrap();
        assert_eq!(c.listen, "127.0.0.1:4433".parse().unwrap());
        assert!(c.tenants.contains_key("dev"));
    }

    #[test]
    fn keys_that_cannot_be_bare_are_named_quoted() {
        // Found by fuzz/ (target `config`): the error named its key as "".
        let e = parse("\"\".\"\".rs =0").unwrap_err();
        assert!(matches!(&e, ConfigError::Parse { key, .. } if key == "\"\""), "{e}");
        let e = parse(&format!("{TENANT}[tenants.\"a b\"]\nx = 1\n")).unwrap_err();
        assert!(
            matches!(&e, ConfigError::Parse { key, .. } if key == "tenants.\"a b\".x"),
            "{e}"
        );
    }

    #[test]
    fn control_keys_and_quotas_are_checked_and_named() {
        let ok = parse(&format!(
            "[control]\noperators = [{{ name = \"ops\", key = \"0123456789abcdef01234567\" }}]\n\
             [control.quota]\nmax_modules = 3\n{TENANT}quota = {{ max_modules = 5 }}\n"
        ))
        .unwrap();
        assert_eq!(ok.control.operators[0].name, "ops");
        assert_eq!(ok.control.quota.max_modules, 3);
        assert_eq!(ok.control.quota_of("acme").max_modules, 5);
        // Debug never shows a key.
        assert!(!format!("{:?}", ok.control).contains("0123456789abcdef"));
        for (text, key) in [
            (
                "[control]\noperators = [{ name = \"ops\", key = \"short\" }]\n",
                "control.operators[0].key",
            ),
            (
                "[control]\noperators = [{ name = \"a b\", key = \"0123456789abcdef01234567\" }]\n",
                "control.operators[0].name",
            ),
            (
                "[control.quota]\nmax_module_bytes = 999999999999\n",
                "control.quota.max_module_bytes",
            ),
            (
                "[control.quota]\nfilter_budget = \"0s\"\n",
                "control.quota.filter_budget",
            ),
            ("[control]\nhistory = 0\n", "control.history"),
            ("[control]\nbogus = 1\n", "control"),
        ] {
            let e = parse(&format!("{text}{TENANT}")).unwrap_err().to_string();
            assert!(e.contains(key), "{text}: {e}");
        }
    }

    #[test]
    fn without_a_cluster_section_the_edge_is_alone() {
        assert_eq!(parse(TENANT).unwrap().cluster, None);
        assert_eq!(Config::dev().unwrap().cluster, None);
    }

    #[test]
    fn a_cluster_needs_only_its_nats_urls() {
        let c = parse(&format!("[cluster]\nnats = [\"nats://127.0.0.1:4222\"]\n{TENANT}"))
            .unwrap()
            .cluster
            .unwrap();
        assert_eq!(c, ClusterConfig::with_nats(vec!["nats://127.0.0.1:4222".into()]));
        assert_eq!(c.region, "default");
        assert_eq!(c.dead_after, c.heartbeat * 3);
        let c = parse(&format!(
            "[cluster]\nnats = [\"a:1\", \"tls://b:2\"]\nedge_id = \"eu-1\"\nregion = \"eu\"\n\
             user = \"u\"\npassword = \"secret-pw\"\nheartbeat = \"200ms\"\ndead_after = \"1s\"\n{TENANT}"
        ))
        .unwrap()
        .cluster
        .unwrap();
        assert_eq!((c.edge_id.as_deref(), c.region.as_str()), (Some("eu-1"), "eu"));
        assert_eq!(c.dead_after, Duration::from_secs(1));
        assert!(
            !format!("{c:?}").contains("secret-pw"),
            "the password stays out of logs"
        );
        let c = parse(&format!(
            "[cluster]\nnats = [\"a:1\"]\ncreds_file = \"edge.creds\"\n{TENANT}"
        ))
        .unwrap();
        assert_eq!(
            c.cluster.unwrap().credentials,
            Some(NatsCredentials::CredsFile(PathBuf::from("/etc/throng/edge.creds")))
        );
    }

    #[test]
    fn bad_cluster_settings_name_their_key() {
        for (body, key) in [
            ("nats = []", "cluster.nats"),
            ("nats = [\"nats://nohost\"]", "cluster.nats[0]"),
            ("nats = [\"a:1\", \"a:0\"]", "cluster.nats[1]"),
            ("nats = [\"a:1\"]\nedge_id = \"a.b\"", "cluster.edge_id"),
            ("nats = [\"a:1\"]\nedge_id = \"\"", "cluster.edge_id"),
            ("nats = [\"a:1\"]\nregion = \"eu west\"", "cluster.region"),
            ("nats = [\"a:1\"]\nuser = \"u\"", "cluster.password"),
            (
                "nats = [\"a:1\"]\nuser = \"u\"\npassword = \"p\"\ncreds_file = \"c\"",
                "cluster.creds_file",
            ),
            (
                "nats = [\"a:1\"]\nheartbeat = \"1s\"\ndead_after = \"1500ms\"",
                "cluster.dead_after",
            ),
            ("nats = [\"a:1\"]\nheartbeat = \"1ms\"", "cluster.heartbeat"),
            ("nats = [\"a:1\"]\nhartbeat = \"1s\"", "cluster.hartbeat"),
        ] {
            let e = parse(&format!("[cluster]\n{body}\n{TENANT}")).unwrap_err().to_string();
            assert!(e.contains(&format!("`{key}`")), "{body}: {e}");
        }
    }

    #[test]
    fn unknown_key_names_the_key() {
        let e = parse(&format!("[limits]\nmax_conections = 5\n{TENANT}")).unwrap_err();
        let s = e.to_string();
        assert!(s.contains("limits.max_conections"), "{s}");
        assert!(s.contains("unknown field"), "{s}");
    }

    #[test]
    fn bad_value_names_the_key_and_reason() {
        let e = parse(&format!("[limits]\nmax_frame_bytes = 10\n{TENANT}")).unwrap_err();
        let s = e.to_string();
        assert!(
            s.contains("limits.max_frame_bytes") && s.contains("out of range"),
            "{s}"
        );

        let e = parse(&format!("[server]\nlisten = \"nowhere\"\n{TENANT}")).unwrap_err();
        assert!(e.to_string().contains("server.listen"), "{e}");

        let e = parse(&format!("[rooms]\ntick = \"fast\"\n{TENANT}")).unwrap_err();
        assert!(e.to_string().contains("rooms.tick"), "{e}");

        let e = parse("[tenants.acme]\nhs256_secret = \"short\"\n").unwrap_err();
        assert!(e.to_string().contains("tenants.acme.hs256_secret"), "{e}");

        let e = parse("").unwrap_err();
        assert!(e.to_string().contains("`tenants`"), "{e}");
    }

    #[test]
    fn policy_rules_may_name_a_room_class() {
        let classes = "[[rooms.class]]\nname = \"small\"\nmin_members = 0\ntick = \"20ms\"\n\
                       [[rooms.class]]\nname = \"huge\"\nmin_members = 1000\ntick = \"200ms\"\n";
        let ok = format!("{classes}[[policy]]\nclass = \"huge\"\nmodule = \"native\"\n{TENANT}");
        let c = parse(&ok).unwrap();
        assert_eq!(c.policies[0].class.as_deref(), Some("huge"));
        let bad = format!("{classes}[[policy]]\nclass = \"giant\"\nmodule = \"native\"\n{TENANT}");
        let e = parse(&bad).unwrap_err().to_string();
        assert!(e.contains("policy[0].class") && e.contains("giant"), "{e}");
        let e = parse(&format!(
            "[[rooms.class]]\nname = \"x\"\nmin_members = 5\ntick = \"1s\"\n{TENANT}"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("rooms.class[0].min_members"), "{e}");
    }

    #[test]
    fn class_workers_default_to_one_and_are_bounded() {
        let class = |workers: &str| {
            format!("[[rooms.class]]\nname = \"small\"\nmin_members = 0\ntick = \"20ms\"\n{workers}{TENANT}")
        };
        assert_eq!(parse(&class("")).unwrap().rooms.classes[0].workers, 1);
        assert_eq!(parse(&class("workers = 3\n")).unwrap().rooms.classes[0].workers, 3);
        assert_eq!(parse(&class("workers = 0\n")).unwrap().rooms.classes[0].workers, 0);
        let e = parse(&class("workers = 65\n")).unwrap_err().to_string();
        assert!(e.contains("rooms.class[0].workers"), "{e}");
        assert_eq!(parse(&class("")).unwrap().rooms.classes[0].spread, Duration::ZERO);
        let e = parse(&class("spread = \"20ms\"\n")).unwrap_err().to_string();
        assert!(e.contains("rooms.class[0].spread"), "{e}");
    }

    #[test]
    fn filters_fail_closed_unless_they_say_open() {
        let filter = |extra: &str| {
            format!(
                "[tenants.acme]\nhs256_secret = \"0123456789abcdef\"\n\
                 filters = [{{ module = \"builtin:filter-keywords\", params = {{ words = \"x\" }}{extra} }}]\n"
            )
        };
        let c = parse(&filter("")).unwrap();
        assert_eq!(c.filters["acme"][0].on_failure, OnFailure::Closed);
        let c = parse(&filter(", on_failure = \"open\"")).unwrap();
        assert_eq!(c.filters["acme"][0].on_failure, OnFailure::Open);
        let e = parse(&filter(", on_failure = \"maybe\"")).unwrap_err().to_string();
        assert!(e.contains("tenants.acme.filters[0].on_failure"), "{e}");
        // Test modules are not built in.
        let e = parse(&filter("").replace("filter-keywords", "filter-trap"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no built-in module `filter-trap`"), "{e}");
    }

    #[test]
    fn the_budget_keys_parse_and_a_reload_names_what_needs_a_restart() {
        let c = parse(&format!(
            "[wasm]\ncall_budget_per_message = \"1ms\"\ninstantiate_budget = \"3s\"\n\
             quarantine_cooldown = \"5s\"\nquarantine_cooldown_max = \"1m\"\n{TENANT}"
        ))
        .unwrap();
        assert_eq!(c.wasm.budget_per_message, Duration::from_millis(1));
        assert_eq!(c.wasm.instantiate_budget, Duration::from_secs(3));
        assert_eq!(c.wasm.quarantine_cooldown_max, Duration::from_secs(60));
        let e = parse(&format!(
            "[wasm]\nquarantine_cooldown = \"5m\"\nquarantine_cooldown_max = \"1m\"\n{TENANT}"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("wasm.quarantine_cooldown_max"), "{e}");

        let mut next = c.clone();
        assert!(c.restart_needed(&next).is_empty());
        next.limits.max_body_bytes = 100;
        next.wasm.budget = Budget::Epoch(Duration::from_millis(7));
        next.tenants.insert(
            "new".into(),
            TenantConfig::Hs256 {
                secret: b"0123456789abcdef".to_vec(),
            },
        );
        assert_eq!(
            c.restart_needed(&next),
            ["limits.max_body_bytes (4096 -> 100)", "wasm.call_budget (5ms -> 7ms)"]
        );
    }

    #[test]
    fn relative_paths_resolve_against_the_file() {
        let c = parse(&format!("[server]\ndata_dir = \"state\"\n{TENANT}")).unwrap();
        assert_eq!(c.data_dir, Path::new("/etc/throng/state"));
    }
}
