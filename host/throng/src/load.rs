//! `throng load`: a load generator with real QUIC viewers, and the same load
//! against a bare-quinn baseline, measured honestly for a shared machine:
//! server CPU (utime + stime) over a window after a warm-up, divided by the
//! work done; RSS before and after connecting; latency from a send-time stamp
//! in each body.
//!
//! # Layout
//!
//! - [`conns`]: the connection tasks (viewers, senders, churners, bare-quinn
//!   viewers) and the UDP endpoints they share.
//! - [`server`]: the generated edge config and the spawned server process.
//! - [`stats`]: shared counters, latency histograms, the body stamp.
//! - [`procstat`]: CPU seconds and RSS from /proc.
//! - [`report`]: the JSON / text report.
//!
//! One run: start (or find) the server → connect everything, at most
//! `--handshakes` at once → sample RSS → traffic starts → warm-up → window
//! (CPU sampled at both ends) → stop everything → report.

mod conns;
use throng_edge::procstat;
mod report;
mod server;
mod stats;

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::ValueEnum;
use throng_client::ConnectOptions;
use throng_edge::Config;
use throng_edge::auth::{Claims, sign, unix_now};
use throng_wire::{Kind, Role};
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;

use conns::{BareViewer, Churner, Ctx, Mix, Sender, Viewer};
use report::{CompareReport, Pair, RunReport, Spread};
use server::{LoadConfig, Server};
use stats::{PerViewer, Stats};

/// Connections per client UDP endpoint when `--endpoints` is not given.
const CONNECTIONS_PER_ENDPOINT: usize = 500;
/// Time after setup before RSS is sampled, for handshake leftovers to settle.
const SETTLE: Duration = Duration::from_millis(500);
/// Time for every connection task to finish once the run stops.
const TEARDOWN: Duration = Duration::from_secs(10);
/// Slack in the hard cap beyond the phases' own bounds.
const CAP_SLACK: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Load a Throng edge.
    Edge,
    /// The baseline: bare quinn writing the same bytes to every connection each tick.
    BareQuinn,
    /// Alternate edge and bare-quinn runs (A, B, A, B, ...) and report the ratios.
    Compare,
}

/// How the viewers reach the edge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Transport {
    /// Native QUIC, ALPN `throng/3`.
    Quic,
    /// WebTransport (HTTP/3), as browsers do, the certificate pinned by hash.
    Webtransport,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PolicyChoice {
    /// The default policy compiled to Wasm, as deployed.
    Wasm,
    /// The same algorithm run natively.
    Native,
}

#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:
  throng load --spawn-edge --viewers 1000 --rooms 1 --senders 1 --rate 200 --mix chat=100
  throng load --mode compare --viewers 1000 --rate 200 --mix chat=100 --edge-cpu 0 --pairs 2
  throng load --write-config load.toml   # then: throng serve --config load.toml
  throng load --server 127.0.0.1:4433 --cert .throng/dev-cert.pem --config load.toml --edge-pid PID

Figures: server CPU is utime+stime of its PID over the window (after the
warm-up), divided by frames (batches) and messages the viewers received in it.
RSS per connection is (RSS after every connection is set up and joined, before
traffic) minus (RSS before the first handshake), over the connections opened.
Latency is send -> receive of stamped bodies, both ends in this process.
Run the load generator under `taskset -c 1` and pin the server with
`--edge-cpu 0` to keep them off each other's core.")]
pub struct LoadArgs {
    /// What to load: an edge, the bare-quinn baseline, or both alternately.
    #[arg(long, value_enum, default_value = "edge")]
    mode: Mode,
    /// Shorthand for `--mode bare-quinn`.
    #[arg(long, conflicts_with = "mode")]
    baseline: bool,
    /// A/B pairs to run with `--mode compare`.
    #[arg(long, default_value_t = 2)]
    pairs: u32,

    /// Start the server as a child of this executable (`throng serve` on
    /// 127.0.0.1:0 with a temporary data dir), measure it, kill it at the end.
    #[arg(long, conflicts_with = "server")]
    spawn_edge: bool,
    /// Edges already running, ip:port, comma-separated: viewers and senders
    /// are spread over them round-robin (edges of one cluster serve every
    /// room). Loopback only unless --allow-remote.
    #[arg(long, requires = "cert", value_delimiter = ',')]
    server: Vec<SocketAddr>,
    /// The certificates to trust for --server (one, or one per edge),
    /// comma-separated.
    #[arg(long, value_delimiter = ',')]
    cert: Vec<PathBuf>,
    /// TLS name of --server (default: its IP).
    #[arg(long)]
    server_name: Option<String>,
    /// PIDs of the --server processes, comma-separated, to read their CPU
    /// time and RSS (summed over the edges).
    #[arg(long, requires = "server", value_delimiter = ',')]
    edge_pid: Vec<u32>,
    /// The --server edges' admin endpoints (`server.admin`), e.g.
    /// http://127.0.0.1:9433, comma-separated: their CPU time and RSS come
    /// from `/stats` when the edges run elsewhere.
    #[arg(long, requires = "server", conflicts_with = "edge_pid", value_delimiter = ',')]
    edge_stats: Vec<String>,
    /// The operator key --edge-stats reads `/stats` with (default: the
    /// generated config's).
    #[arg(long, env = "THRONG_ADMIN_KEY", default_value = server::LOAD_OPERATOR_KEY, hide_env_values = true)]
    admin_key: String,
    /// Allow a --server that is not on loopback.
    #[arg(long)]
    allow_remote: bool,
    /// Pin the spawned server to these CPUs (`taskset -c LIST`), e.g. 0.
    #[arg(long, conflicts_with = "server")]
    edge_cpu: Option<String>,

    /// Edge config: the spawned edge runs it and tokens are signed with its
    /// tenant key. Default: a generated config without rate limits (see
    /// --tick, --cap, --policy, --filter; --write-config prints it).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Write the generated config to this file and exit.
    #[arg(long)]
    write_config: Option<PathBuf>,
    /// Tenant of every connection's token.
    #[arg(long, default_value = "dev")]
    tenant: String,
    /// PEM private key, for a tenant configured with an ES256 public key.
    #[arg(long)]
    key: Option<PathBuf>,
    /// Generated config: room tick (also the bare-quinn tick).
    #[arg(long, default_value = "50ms", value_parser = humantime::parse_duration, conflicts_with_all = ["config", "server"])]
    tick: Duration,
    /// Generated config: messages per second a viewer is shown; 0 is off.
    #[arg(long, default_value_t = 0, conflicts_with_all = ["config", "server"])]
    cap: u32,
    /// Generated config: run the default policy as Wasm or natively.
    #[arg(long, value_enum, default_value = "wasm", conflicts_with_all = ["config", "server"])]
    policy: PolicyChoice,
    /// Generated config: add the dev tenant's keyword filter (Wasm).
    #[arg(long, conflicts_with_all = ["config", "server"])]
    filter: bool,

    /// Viewer connections.
    #[arg(long, default_value_t = 100)]
    viewers: usize,
    /// How viewers connect (senders and churners stay native): native QUIC
    /// or WebTransport, which pins `webtransport-cert.pem` from the edge's
    /// data dir (beside --cert, or the spawned edge's) by its hash.
    #[arg(long, value_enum, default_value = "quic")]
    transport: Transport,
    /// Rooms `load-0`, `load-1`, ...; viewers are spread over them round-robin.
    #[arg(long, default_value_t = 1)]
    rooms: usize,
    /// Handshakes in flight at most.
    #[arg(long, default_value_t = 64)]
    handshakes: usize,
    /// Client UDP endpoints the connections share (default: one per 500 connections).
    #[arg(long)]
    endpoints: Option<usize>,

    /// Sender connections (role host), each in its share of the rooms.
    #[arg(long, default_value_t = 1)]
    senders: usize,
    /// Messages per second in, across all senders.
    #[arg(long, default_value_t = 200.0)]
    rate: f64,
    /// Kinds sent, with weights.
    #[arg(long, default_value = "chat=90,like=8,gift=1,host=1")]
    mix: Mix,
    /// Body size: the send time in 16 hex digits, padded with `.` (gift
    /// bodies start with the gift's name in 32 bytes, so need 48 at least).
    #[arg(long, default_value_t = 200)]
    body_bytes: usize,

    /// Joins per second (each followed by a leave) by extra connections.
    #[arg(long, default_value_t = 0.0)]
    churn: f64,
    /// Connections doing the churn (default: one per 50 joins/s).
    #[arg(long)]
    churn_connections: Option<usize>,

    /// Measured window.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Traffic before the window opens (after every connection is set up).
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Longest time for connection setup; the run goes on with what connected.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    setup_timeout: Duration,

    /// Bare-quinn: bytes per frame on the wire, length prefix included
    /// (default: estimated from --rate, --rooms, --body-bytes and the tick;
    /// `--mode compare` uses the edge run's measured average).
    #[arg(long)]
    frame_bytes: Option<usize>,

    /// Print the report as one JSON object on stdout.
    #[arg(long)]
    json: bool,
    /// No progress line on stderr.
    #[arg(long)]
    quiet: bool,
}

/// WebTransport viewers pin the edge's WebTransport dev certificate, which
/// sits beside its native one in the data dir.
fn webtransport_options(target: &Target) -> Result<throng_client::WebTransportOptions> {
    use sha2::Digest;
    let native = target
        .certs
        .first()
        .context("no certificate to find the WebTransport one beside")?;
    let path = native.with_file_name("webtransport-cert.pem");
    let cert = throng_client::tls::load_certs(&path)
        .with_context(|| format!("WebTransport viewers need the edge's {}", path.display()))?
        .remove(0);
    Ok(throng_client::WebTransportOptions {
        path: "/throng".into(),
        cert_hashes: vec![sha2::Sha256::digest(cert.as_ref()).into()],
        origin: None,
    })
}

/// What every run of one command shares.
struct Plan {
    config: Config,
    /// The file the spawned server runs.
    config_path: PathBuf,
    config_label: String,
    policy_label: String,
    tenant_key: Option<Vec<u8>>,
    churn_connections: usize,
    endpoints: usize,
    _dir: tempfile::TempDir,
}

pub async fn run(mut a: LoadArgs) -> Result<std::process::ExitCode> {
    if a.baseline {
        a.mode = Mode::BareQuinn;
    }
    let generated = LoadConfig {
        tenant: a.tenant.clone(),
        tick: a.tick,
        cap_per_sec: a.cap,
        wasm_policy: a.policy == PolicyChoice::Wasm,
        filter: a.filter,
    };
    if let Some(path) = &a.write_config {
        std::fs::write(path, generated.toml()).with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!("wrote {}", path.display());
        return Ok(std::process::ExitCode::SUCCESS);
    }
    validate(&a)?;
    let plan = plan(&a, &generated)?;
    let runs = match a.mode {
        Mode::Compare => 2 * a.pairs,
        _ => 1,
    };
    let cap = hard_cap(&a) * runs;
    watchdog(cap + CAP_SLACK);
    let outcome = tokio::time::timeout(cap, async {
        match a.mode {
            Mode::Edge => run_once(&a, &plan, Mode::Edge, None)
                .await
                .map(|r| Output::Run(Box::new(r))),
            Mode::BareQuinn => {
                let frame = match a.frame_bytes {
                    Some(f) => (f, "given"),
                    None => (estimate_frame_bytes(&a, &plan.config), "estimated"),
                };
                let r = run_once(&a, &plan, Mode::BareQuinn, Some(frame)).await?;
                Ok(Output::Run(Box::new(r)))
            }
            Mode::Compare => compare(&a, &plan).await.map(|r| Output::Compare(Box::new(r))),
        }
    })
    .await;
    let output = match outcome {
        Ok(r) => r?,
        // Dropping the run's future killed the servers it started.
        Err(_) => bail!("the load run went past its hard cap of {cap:?} and was stopped"),
    };
    match (&output, a.json) {
        (Output::Run(r), true) => println!("{}", serde_json::to_string(r)?),
        (Output::Compare(r), true) => println!("{}", serde_json::to_string(r)?),
        (Output::Run(r), false) => r.print_text(),
        (Output::Compare(r), false) => r.print_text(),
    }
    Ok(std::process::ExitCode::SUCCESS)
}

enum Output {
    Run(Box<RunReport>),
    Compare(Box<CompareReport>),
}

fn validate(a: &LoadArgs) -> Result<()> {
    if a.viewers == 0 {
        bail!("--viewers must be at least 1");
    }
    if a.rooms == 0 {
        bail!("--rooms must be at least 1");
    }
    if a.handshakes == 0 {
        bail!("--handshakes must be at least 1");
    }
    if a.endpoints == Some(0) {
        bail!("--endpoints must be at least 1");
    }
    if a.churn_connections == Some(0) {
        bail!("--churn-connections must be at least 1");
    }
    if !(a.rate.is_finite() && a.rate >= 0.0) {
        bail!("--rate must be 0 or a positive number");
    }
    if !(a.churn.is_finite() && a.churn >= 0.0) {
        bail!("--churn must be 0 or a positive number");
    }
    if a.duration.is_zero() {
        bail!("--duration must be above 0");
    }
    if a.pairs == 0 {
        bail!("--pairs must be at least 1");
    }
    let min_body = if a.mix.has(Kind::Gift) {
        stats::GIFT_NAME_LEN + stats::STAMP_LEN
    } else {
        stats::STAMP_LEN
    };
    if a.body_bytes < min_body {
        bail!(
            "--body-bytes must be at least {min_body} to hold the send time{}",
            if min_body > stats::STAMP_LEN {
                " after a gift's name"
            } else {
                ""
            }
        );
    }
    if let Some(f) = a.frame_bytes
        && f != 0
        && !(throng_wire::LENGTH_PREFIX + 1..=throng_wire::HARD_MAX_FRAME as usize).contains(&f)
    {
        bail!(
            "--frame-bytes must be 0 (no frames) or {}..={}",
            throng_wire::LENGTH_PREFIX + 1,
            throng_wire::HARD_MAX_FRAME
        );
    }
    match a.mode {
        Mode::Edge => {
            if a.server.is_empty() && !a.spawn_edge {
                bail!("say which edge: --spawn-edge, or --server ADDR --cert PATH");
            }
            if a.rate > 0.0 && a.senders == 0 {
                bail!("--rate needs at least one sender (--senders)");
            }
        }
        Mode::BareQuinn | Mode::Compare => {
            if !a.server.is_empty() {
                bail!("--mode bare-quinn and compare start their own servers; drop --server");
            }
        }
    }
    for addr in &a.server {
        conns::check_target(*addr, a.allow_remote)?;
    }
    if !a.server.is_empty() && a.cert.len() != 1 && a.cert.len() != a.server.len() {
        bail!("give one --cert for all the --server edges, or one per edge");
    }
    for (flag, n) in [("--edge-pid", a.edge_pid.len()), ("--edge-stats", a.edge_stats.len())] {
        if n != 0 && n != a.server.len() {
            bail!(
                "give one {flag} per --server edge ({} of them), not {n}",
                a.server.len()
            );
        }
    }
    Ok(())
}

fn plan(a: &LoadArgs, generated: &LoadConfig) -> Result<Plan> {
    let dir = tempfile::Builder::new()
        .prefix("throng-load-")
        .tempdir()
        .context("cannot make a temporary directory")?;
    let (config, config_path, config_label, policy_label) = match &a.config {
        Some(path) => (
            Config::load(path).with_context(|| format!("invalid config {}", path.display()))?,
            std::fs::canonicalize(path).unwrap_or_else(|_| path.clone()),
            path.display().to_string(),
            "config".to_owned(),
        ),
        None => {
            let path = dir.path().join("load.toml");
            std::fs::write(&path, generated.toml()).with_context(|| format!("cannot write {}", path.display()))?;
            let config = Config::load(&path).context("the generated load config is invalid")?;
            let policy = match a.policy {
                // An external edge runs whatever config it was started with.
                _ if !a.server.is_empty() => "unknown",
                PolicyChoice::Wasm => "wasm",
                PolicyChoice::Native => "native",
            };
            (config, path, "generated".to_owned(), policy.to_owned())
        }
    };
    if !config.tenants.contains_key(&a.tenant) {
        bail!("tenant `{}` is not in the config", a.tenant);
    }
    if a.body_bytes > config.limits.max_body_bytes as usize && a.mode != Mode::BareQuinn {
        bail!(
            "--body-bytes {} is over the config's limits.max_body_bytes {}",
            a.body_bytes,
            config.limits.max_body_bytes
        );
    }
    if a.mode != Mode::BareQuinn {
        let rooms_per_sender = if a.senders == 0 { 0 } else { a.rooms.div_ceil(a.senders) };
        if rooms_per_sender > config.limits.max_rooms_per_connection as usize {
            bail!(
                "each sender would join {rooms_per_sender} rooms, over the config's limits.max_rooms_per_connection {}; \
                 use more --senders",
                config.limits.max_rooms_per_connection
            );
        }
    }
    let tenant_key = a
        .key
        .as_ref()
        .map(|p| std::fs::read(p).with_context(|| format!("cannot read key {}", p.display())))
        .transpose()?;
    let churn_connections = if a.churn > 0.0 {
        a.churn_connections
            .unwrap_or_else(|| (a.churn / 50.0).ceil().max(1.0) as usize)
    } else {
        0
    };
    let total = a.viewers + a.senders + churn_connections;
    let endpoints = a
        .endpoints
        .unwrap_or_else(|| total.div_ceil(CONNECTIONS_PER_ENDPOINT))
        .clamp(1, total.max(1));
    Ok(Plan {
        config,
        config_path,
        config_label,
        policy_label,
        tenant_key,
        churn_connections,
        endpoints,
        _dir: dir,
    })
}

/// The longest one run may take: each phase's own bound plus slack.
fn hard_cap(a: &LoadArgs) -> Duration {
    server::START_TIMEOUT + a.setup_timeout + SETTLE + a.warmup + a.duration + TEARDOWN + CAP_SLACK
}

/// Last resort if the runtime itself wedges: the async cap could not fire.
fn watchdog(after: Duration) {
    std::thread::spawn(move || {
        std::thread::sleep(after);
        eprintln!("error: throng load is still running {after:?} after it started; exiting");
        // kill_on_drop does not run on exit: stop the servers by their PIDs.
        server::kill_all();
        std::process::exit(3);
    });
}

/// An estimate of the edge's batch frame for this load, used by the
/// baseline when neither `--frame-bytes` nor a measured edge run gives one:
/// the messages a room delivers per tick (likes fold into a counter), each
/// its body plus ~14 bytes (seq, sender, kind, length), plus ~28 bytes of
/// batch around them (length prefix, room, tick, counters, online).
fn estimate_frame_bytes(a: &LoadArgs, config: &Config) -> usize {
    if a.rate == 0.0 {
        return 0;
    }
    let delivered = 1.0 - a.mix.share(Kind::Like);
    let per_tick = (a.rate * delivered * config.rooms.tick.as_secs_f64() / a.rooms as f64)
        .round()
        .max(1.0) as usize;
    28 + per_tick * (a.body_bytes + 14)
}

async fn compare(a: &LoadArgs, plan: &Plan) -> Result<CompareReport> {
    let mut runs = Vec::new();
    let mut pairs = Vec::new();
    for _ in 0..a.pairs {
        let edge = run_once(a, plan, Mode::Edge, None).await?;
        // Same bytes per tick as the edge wrote: its measured average frame.
        // An edge that delivered nothing in the window gives 0: the baseline
        // then writes nothing either.
        let frame = match a.frame_bytes {
            Some(f) => (f, "given"),
            None => (
                edge.delivery.avg_frame_bytes.map_or(0, |b| b.round() as usize),
                "measured",
            ),
        };
        let bare = run_once(a, plan, Mode::BareQuinn, Some(frame)).await?;
        let usage = |r: &RunReport| r.server.as_ref().and_then(|s| s.us_cpu_per_frame);
        let rss = |r: &RunReport| r.server.as_ref().and_then(|s| s.rss_per_connection_bytes);
        let ratio = |x: Option<f64>, y: Option<f64>| match (x, y) {
            (Some(x), Some(y)) if y > 0.0 => Some(x / y),
            _ => None,
        };
        pairs.push(Pair {
            frame_bytes: frame.0,
            edge_us_per_frame: usage(&edge),
            bare_us_per_frame: usage(&bare),
            cpu_per_frame_ratio: ratio(usage(&edge), usage(&bare)),
            edge_rss_per_connection_bytes: rss(&edge),
            bare_rss_per_connection_bytes: rss(&bare),
            rss_per_connection_ratio: ratio(rss(&edge), rss(&bare)),
        });
        runs.push(edge);
        runs.push(bare);
    }
    Ok(CompareReport {
        mode: "compare",
        cpu_per_frame_ratio: Spread::of(pairs.iter().filter_map(|p| p.cpu_per_frame_ratio).collect()),
        rss_per_connection_ratio: Spread::of(pairs.iter().filter_map(|p| p.rss_per_connection_ratio).collect()),
        pairs,
        runs,
    })
}

fn token(a: &LoadArgs, plan: &Plan, user: String, role: Role) -> Result<String> {
    let tenant = plan
        .config
        .tenants
        .get(&a.tenant)
        .with_context(|| format!("tenant `{}` is not in the config", a.tenant))?;
    let claims = Claims {
        tenant: a.tenant.clone(),
        sub: user,
        role: role.as_str().to_owned(),
        rooms: "*".into(),
        exp: unix_now() + hard_cap(a).as_secs() * 4 + 3600,
        nbf: None,
    };
    sign(&claims, tenant, plan.tenant_key.as_deref()).map_err(|e| anyhow::anyhow!("cannot sign a token: {e}"))
}

/// Where connections go, and the processes to measure.
struct Target {
    /// The first edge (or the one spawned).
    addr: SocketAddr,
    /// Every edge connections are spread over, `addr` first.
    edges: Vec<SocketAddr>,
    certs: Vec<PathBuf>,
    /// The edges' processes, when local.
    pids: Vec<u32>,
    /// The edges' admin endpoints, for servers measured over HTTP.
    stats: Vec<String>,
    /// The operator key `stats` are read with.
    admin_key: String,
    spawned: Option<Server>,
}

impl Target {
    /// The edge connection `i` goes to.
    fn edge(&self, i: usize) -> SocketAddr {
        self.edges[i % self.edges.len()]
    }
}

/// The measured servers' CPU seconds so far, summed: from /proc for local
/// pids, else from the edges' `/stats`.
async fn server_cpu(target: &Target) -> Result<Option<f64>> {
    if !target.pids.is_empty() {
        let mut sum = 0.0;
        for pid in &target.pids {
            sum += procstat::cpu_seconds(*pid)?;
        }
        return Ok(Some(sum));
    }
    if target.stats.is_empty() {
        return Ok(None);
    }
    let mut sum = 0.0;
    for url in &target.stats {
        sum += remote_process(url, &target.admin_key).await?.0;
    }
    Ok(Some(sum))
}

/// The measured servers' memory, summed.
async fn server_memory(target: &Target) -> Result<Option<procstat::Memory>> {
    let mut sum = procstat::Memory { rss_kib: 0, hwm_kib: 0 };
    let mut add = |m: procstat::Memory| {
        sum.rss_kib += m.rss_kib;
        sum.hwm_kib += m.hwm_kib;
    };
    if !target.pids.is_empty() {
        for pid in &target.pids {
            add(procstat::memory(*pid)?);
        }
    } else if !target.stats.is_empty() {
        for url in &target.stats {
            add(remote_process(url, &target.admin_key).await?.1);
        }
    } else {
        return Ok(None);
    }
    Ok(Some(sum))
}

/// (cpu seconds, memory) from an edge's `GET <url>/stats`.
async fn remote_process(url: &str, key: &str) -> Result<(f64, procstat::Memory)> {
    let url = format!("{}/stats", url.trim_end_matches('/'));
    let body = tokio::task::spawn_blocking({
        let url = url.clone();
        let auth = format!("Bearer {key}");
        move || -> Result<String> {
            let mut response = ureq::get(&url)
                .header("Authorization", auth)
                .call()
                .with_context(|| format!("GET {url}"))?;
            response
                .body_mut()
                .read_to_string()
                .with_context(|| format!("GET {url}: body"))
        }
    })
    .await
    .context("stats request task")??;
    let stats: serde_json::Value = serde_json::from_str(&body).with_context(|| format!("{url}: not JSON"))?;
    let p = &stats["process"];
    let (Some(cpu_s), Some(rss_kib), Some(hwm_kib)) =
        (p["cpu_s"].as_f64(), p["rss_kib"].as_u64(), p["peak_rss_kib"].as_u64())
    else {
        bail!("{url}: no process figures (is the edge on Linux?)");
    };
    Ok((cpu_s, procstat::Memory { rss_kib, hwm_kib }))
}

async fn start_target(a: &LoadArgs, plan: &Plan, mode: Mode, frame_bytes: usize, dir: &Path) -> Result<Target> {
    let config = plan.config_path.display().to_string();
    let args: Vec<String> = match mode {
        Mode::Edge => {
            if let Some(&addr) = a.server.first() {
                return Ok(Target {
                    addr,
                    edges: a.server.clone(),
                    certs: a.cert.clone(),
                    pids: a.edge_pid.clone(),
                    stats: a.edge_stats.clone(),
                    admin_key: a.admin_key.clone(),
                    spawned: None,
                });
            }
            let data = dir.join("data").display().to_string();
            [
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--data-dir",
                &data,
                "--config",
                &config,
            ]
            .map(String::from)
            .to_vec()
        }
        _ => {
            let certs = dir.join("cert").display().to_string();
            let tick = humantime::format_duration(plan.config.rooms.tick).to_string();
            let frame = frame_bytes.to_string();
            [
                "bare-quinn",
                "--listen",
                "127.0.0.1:0",
                "--cert-dir",
                &certs,
                "--tick",
                &tick,
                "--frame-bytes",
                &frame,
                "--config",
                &config,
                "--start-on-stdin",
            ]
            .map(String::from)
            .to_vec()
        }
    };
    let go_on_stdin = mode == Mode::BareQuinn;
    let server = Server::start(&args, a.edge_cpu.as_deref(), &dir.join("server.log"), go_on_stdin).await?;
    conns::check_target(server.addr, false)?;
    Ok(Target {
        addr: server.addr,
        edges: vec![server.addr],
        certs: vec![server.cert.clone()],
        pids: vec![server.pid],
        stats: Vec::new(),
        admin_key: a.admin_key.clone(),
        spawned: Some(server),
    })
}

/// Rooms for sender `s` of `senders`: its share when there are fewer
/// senders than rooms, else one room shared with other senders.
fn sender_rooms(s: usize, senders: usize, rooms: usize) -> Vec<String> {
    if senders <= rooms {
        (0..rooms).filter(|r| r % senders == s).map(room_name).collect()
    } else {
        vec![room_name(s % rooms)]
    }
}

fn room_name(i: usize) -> String {
    format!("load-{i}")
}

async fn run_once(a: &LoadArgs, plan: &Plan, mode: Mode, frame: Option<(usize, &'static str)>) -> Result<RunReport> {
    let dir = tempfile::Builder::new()
        .prefix("throng-load-run-")
        .tempdir()
        .context("cannot make a temporary directory")?;
    let frame_bytes = frame.map_or(0, |f| f.0);
    let progress = Progress::new(a.quiet, mode);
    progress.phase("starting");
    let mut target = start_target(a, plan, mode, frame_bytes, dir.path()).await?;
    let result = measure(a, plan, mode, frame, &mut target, &progress).await;
    progress.finish();
    if let Some(server) = target.spawned {
        server.stop().await;
    }
    result
}

async fn measure(
    a: &LoadArgs,
    plan: &Plan,
    mode: Mode,
    frame: Option<(usize, &'static str)>,
    target: &mut Target,
    progress: &Progress,
) -> Result<RunReport> {
    let bare = mode == Mode::BareQuinn;
    let mut roots = Vec::new();
    for cert in &target.certs {
        roots.extend(throng_client::tls::load_certs(cert)?);
    }
    let server_name = a.server_name.clone().unwrap_or_else(|| target.addr.ip().to_string());
    let (senders, churners) = if bare {
        (0, 0)
    } else {
        (a.senders, plan.churn_connections)
    };
    let total = a.viewers + senders + churners;
    let endpoints = (0..plan.endpoints)
        .map(|_| conns::client_endpoint(target.addr))
        .collect::<Result<Vec<_>>>()?;
    let endpoint = |i: usize| endpoints[i % endpoints.len()].clone();

    let rss_before = server_memory(target).await?;
    let cpu_before = server_cpu(target).await?;
    let stats = Arc::new(Stats::new());
    let stop = CancellationToken::new();
    // Stops every connection task however this function returns.
    let _stop_guard = stop.clone().drop_guard();
    let (go_tx, go) = watch::channel(false);
    let ctx = Arc::new(Ctx {
        stats: Arc::clone(&stats),
        stop: stop.clone(),
        go,
        handshakes: Arc::new(Semaphore::new(a.handshakes)),
        origin: Instant::now(),
    });
    let template = |token: String, i: usize| {
        let mut o = ConnectOptions::new(target.edge(i).to_string(), roots.clone(), token);
        o.server_name = Some(server_name.clone());
        o
    };
    let web = match a.transport {
        Transport::Quic => None,
        Transport::Webtransport => Some(webtransport_options(target)?),
    };
    let mut tasks = tokio::task::JoinSet::new();
    let counters: Vec<Arc<PerViewer>> = (0..a.viewers).map(|_| Arc::default()).collect();
    progress.phase("connecting");
    // Senders and churners first: with them ready, traffic can start as
    // soon as the last viewer is in.
    for s in 0..senders {
        let p = Sender {
            opts: template(token(a, plan, format!("load-s{s}"), Role::Host)?, s),
            rooms: sender_rooms(s, senders, a.rooms),
            rate: a.rate / senders as f64,
            mix: Arc::new(a.mix.clone()),
            body_bytes: a.body_bytes,
            seed: 0x9e37_79b9_7f4a_7c15 ^ s as u64,
        };
        tasks.spawn(conns::sender(Arc::clone(&ctx), endpoint(s), p));
    }
    for c in 0..churners {
        let p = Churner {
            opts: template(token(a, plan, format!("load-c{c}"), Role::Viewer)?, c),
            rooms: (0..a.rooms).map(room_name).collect(),
            rate: a.churn / churners as f64,
            offset: c,
        };
        tasks.spawn(conns::churner(Arc::clone(&ctx), endpoint(senders + c), p));
    }
    let bare_config = if bare {
        let keep_alive = ConnectOptions::new("", Vec::new(), "");
        Some(throng_client::tls::client_config(
            &roots,
            None,
            keep_alive.keep_alive,
            keep_alive.idle_timeout,
        )?)
    } else {
        None
    };
    for (i, counter) in counters.iter().enumerate() {
        let ep = endpoint(senders + churners + i);
        let counter = Arc::clone(counter);
        match &bare_config {
            Some(config) => {
                let v = BareViewer {
                    config: config.clone(),
                    addr: target.addr,
                    server_name: server_name.clone(),
                    handshake_timeout: ConnectOptions::new("", Vec::new(), "").handshake_timeout,
                    counter,
                };
                tasks.spawn(conns::bare_viewer(Arc::clone(&ctx), ep, v));
            }
            None => {
                let mut opts = template(token(a, plan, format!("load-v{i}"), Role::Viewer)?, i);
                opts.webtransport = web.clone();
                let v = Viewer {
                    opts,
                    room: room_name(i % a.rooms),
                    index: i,
                    sample_frames: i < a.rooms,
                    counter,
                };
                tasks.spawn(conns::viewer(Arc::clone(&ctx), ep, v));
            }
        }
    }

    // Setup: until every task has connected and joined or given up.
    let setup_deadline = Instant::now() + a.setup_timeout;
    while stats.settled.load(Ordering::Relaxed) < total as u64 && Instant::now() < setup_deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        progress.update(&stats, total, None);
    }
    let setup_s = stats.last_connect_ns.load(Ordering::Relaxed) as f64 / 1e9;
    let ready = stats.viewers_ready.load(Ordering::Relaxed);
    if ready == 0 {
        bail!(
            "no viewer connected and joined; first error: {}",
            stats.first_error().unwrap_or_else(|| "none (setup timed out)".into())
        );
    }
    if stats.settled.load(Ordering::Relaxed) < total as u64 {
        progress.println(format!(
            "warning: setup did not finish within {:?}; going on with {ready} of {} viewers",
            a.setup_timeout, a.viewers
        ));
    }
    tokio::time::sleep(SETTLE).await;
    let rss_after = server_memory(target).await?;
    let cpu_after = server_cpu(target).await?;
    // The server's CPU for the handshakes, joins and the settle pause.
    let setup_cpu_s = cpu_before.zip(cpu_after).map(|(b, a)| a - b);

    // Traffic, then the window.
    let _ = go_tx.send(true);
    if let Some(server) = &mut target.spawned {
        server.go().await?;
    }
    progress.phase("warm-up");
    let warm_end = Instant::now() + a.warmup;
    while Instant::now() < warm_end {
        tokio::time::sleep(Duration::from_millis(250).min(warm_end - Instant::now())).await;
        progress.update(&stats, total, None);
    }
    let me = std::process::id();
    let server_cpu0 = server_cpu(target).await?;
    let own_cpu0 = procstat::cpu_seconds(me)?;
    let machine0 = procstat::machine_busy_seconds()?;
    stats.measuring.store(true, Ordering::Relaxed);
    let window_start = Instant::now();
    progress.phase("measuring");
    let window_end = window_start + a.duration;
    while Instant::now() < window_end {
        tokio::time::sleep(Duration::from_millis(250).min(window_end - Instant::now())).await;
        progress.update(&stats, total, Some(window_start));
    }
    stats.measuring.store(false, Ordering::Relaxed);
    let window_s = window_start.elapsed().as_secs_f64();
    let server_cpu1 = server_cpu(target).await?;
    let own_cpu1 = procstat::cpu_seconds(me)?;
    let machine1 = procstat::machine_busy_seconds()?;
    let rss_end = server_memory(target).await?;

    progress.phase("stopping");
    stop.cancel();
    let drained = tokio::time::timeout(TEARDOWN, async { while tasks.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tasks.abort_all();
    }
    for ep in &endpoints {
        ep.close(0u32.into(), b"load run over");
    }

    let per_viewer: Vec<f64> = counters
        .iter()
        .map(|c| c.received.load(Ordering::Relaxed) as f64 / window_s)
        .collect();
    let load = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    let frames = load(&stats.frames);
    let messages = load(&stats.messages);
    let opened = load(&stats.connected);
    let per = |cpu: f64, n: u64| (n > 0).then(|| cpu * 1e6 / n as f64);
    let server = match (server_cpu0, server_cpu1, rss_end) {
        (Some(c0), Some(c1), Some(end)) => {
            let cpu_s = c1 - c0;
            Some(report::ServerUsage {
                pid: target.pids.first().copied(),
                stats_url: target.stats.first().cloned(),
                cpu_s,
                cores: cpu_s / window_s,
                us_cpu_per_frame: per(cpu_s, frames),
                us_cpu_per_message: per(cpu_s, messages),
                rss_before_connect_kib: rss_before.map(|m| m.rss_kib),
                rss_after_connect_kib: rss_after.map(|m| m.rss_kib),
                rss_per_connection_bytes: match (rss_before, rss_after) {
                    (Some(b), Some(a)) if opened > 0 => {
                        Some((a.rss_kib as f64 - b.rss_kib as f64) * 1024.0 / opened as f64)
                    }
                    _ => None,
                },
                rss_end_kib: end.rss_kib,
                peak_rss_kib: end.hwm_kib,
            })
        }
        _ => None,
    };
    let sampled = load(&stats.sampled_frames);
    let sent = load(&stats.sent);
    let (acked, rejected, lost) = (load(&stats.acked), load(&stats.rejected), load(&stats.ack_lost));
    let joins = load(&stats.joins);
    let leaves = load(&stats.leaves);
    Ok(RunReport {
        mode: if bare { "bare-quinn" } else { "edge" },
        target: report::Target {
            addr: target
                .edges
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(","),
            spawned: target.spawned.is_some(),
            pid: target.pids.first().copied(),
            server_cpus: target.spawned.as_ref().and(a.edge_cpu.clone()),
            config: plan.config_label.clone(),
        },
        params: report::Params {
            viewers: a.viewers,
            rooms: a.rooms,
            senders,
            rate: if bare { 0.0 } else { a.rate },
            mix: a.mix.to_string(),
            body_bytes: a.body_bytes,
            churn: if bare { 0.0 } else { a.churn },
            churn_connections: churners,
            handshakes_in_flight: a.handshakes,
            endpoints: endpoints.len(),
            warmup_s: a.warmup.as_secs_f64(),
            duration_s: a.duration.as_secs_f64(),
            tick_ms: (target.spawned.is_some() || a.config.is_some())
                .then_some(plan.config.rooms.tick.as_secs_f64() * 1e3),
            // A given config's policy rules decide the cap; only the generated one is known here.
            viewer_cap_per_sec: (!bare && a.config.is_none() && target.spawned.is_some()).then_some(a.cap),
            policy: plan.policy_label.clone(),
            frame_bytes: frame.map(|f| f.0),
            frame_bytes_source: frame.map(|f| f.1),
        },
        connections: report::Connections {
            requested: total as u64,
            viewers_requested: a.viewers as u64,
            viewers_connected: ready,
            opened,
            failed: load(&stats.failed),
            join_failed: load(&stats.join_failed),
            setup_s,
            handshakes_per_sec: if setup_s > 0.0 { opened as f64 / setup_s } else { 0.0 },
            server_cpu_s: setup_cpu_s,
            handshakes_per_server_cpu_s: setup_cpu_s.filter(|&c| c > 0.0).map(|c| opened as f64 / c),
        },
        window_s,
        delivery: report::Delivery {
            frames,
            frames_per_sec: frames as f64 / window_s,
            messages,
            messages_per_sec: messages as f64 / window_s,
            per_viewer_per_sec: Spread::of(per_viewer).unwrap_or(Spread {
                min: 0.0,
                median: 0.0,
                mean: 0.0,
                max: 0.0,
            }),
            missed: load(&stats.missed),
            avg_frame_bytes: (sampled > 0).then(|| load(&stats.sampled_frame_bytes) as f64 / sampled as f64),
            bytes: load(&stats.bytes),
            unstamped: load(&stats.unstamped),
        },
        latency_us: report::Latency::of(&stats.latency()),
        sends: (senders > 0).then(|| report::Sends {
            sent,
            sent_per_sec: sent as f64 / window_s,
            acked,
            rejected,
            rejected_by: stats.rejected_by(),
            lost,
            unanswered: sent.saturating_sub(acked + rejected + lost),
            skipped: load(&stats.send_skipped),
        }),
        churn: (churners > 0).then(|| report::Churn {
            target_joins_per_sec: a.churn,
            joins,
            leaves,
            joins_plus_leaves_per_sec: (joins + leaves) as f64 / window_s,
            join_latency_us: report::Latency::of(&stats.join_latency()),
            errors: load(&stats.churn_errors),
        }),
        server,
        loadgen: report::LoadgenUsage {
            cpu_s: own_cpu1 - own_cpu0,
            cores: (own_cpu1 - own_cpu0) / window_s,
            other_cores: ((machine1 - machine0)
                - (own_cpu1 - own_cpu0)
                - server_cpu0.zip(server_cpu1).map_or(0.0, |(c0, c1)| c1 - c0))
            .max(0.0)
                / window_s,
        },
        errors: report::Errors {
            stream_errors: load(&stats.stream_errors),
            first: stats.first_error(),
        },
    })
}

/// The progress line on stderr, only when it is a terminal.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    mode: Mode,
    last: std::sync::Mutex<(Instant, u64)>,
}

impl Progress {
    fn new(quiet: bool, mode: Mode) -> Progress {
        let bar = (!quiet && std::io::stderr().is_terminal()).then(|| {
            let bar = indicatif::ProgressBar::new_spinner();
            if let Ok(style) = indicatif::ProgressStyle::with_template("{spinner} {elapsed:>3} {prefix}: {wide_msg}") {
                bar.set_style(style);
            }
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Progress {
            bar,
            mode,
            last: std::sync::Mutex::new((Instant::now(), 0)),
        }
    }

    fn phase(&self, phase: &str) {
        if let Some(bar) = &self.bar {
            let what = match self.mode {
                Mode::BareQuinn => "bare",
                _ => "edge",
            };
            bar.set_prefix(format!("{what} {phase}"));
        }
    }

    fn println(&self, line: String) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None => eprintln!("{line}"),
        }
    }

    fn update(&self, s: &Stats, total: usize, window: Option<Instant>) {
        let Some(bar) = &self.bar else { return };
        let delivered = match self.mode {
            Mode::BareQuinn => s.frames_total.load(Ordering::Relaxed),
            _ => s.messages_total.load(Ordering::Relaxed),
        };
        let rate = {
            let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
            let dt = last.0.elapsed().as_secs_f64();
            let rate = if dt > 0.0 {
                delivered.saturating_sub(last.1) as f64 / dt
            } else {
                0.0
            };
            *last = (Instant::now(), delivered);
            rate
        };
        let unit = if self.mode == Mode::BareQuinn { "frames" } else { "msgs" };
        let failed = s.failed.load(Ordering::Relaxed) + s.join_failed.load(Ordering::Relaxed);
        let mut msg = format!("conns {}/{total}", s.connected.load(Ordering::Relaxed));
        if failed > 0 {
            msg.push_str(&format!(" ({failed} failed)"));
        }
        msg.push_str(&format!(" | {rate:.0} {unit}/s"));
        if window.is_some() && self.mode != Mode::BareQuinn {
            let h = s.latency();
            if !h.is_empty() {
                msg.push_str(&format!(" | p99 {:.1} ms", h.value_at_quantile(0.99) as f64 / 1e3));
            }
        }
        bar.set_message(msg);
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn senders_split_rooms_or_share_them() {
        assert_eq!(sender_rooms(0, 1, 3), ["load-0", "load-1", "load-2"]);
        assert_eq!(sender_rooms(1, 2, 5), ["load-1", "load-3"]);
        assert_eq!(sender_rooms(4, 6, 2), ["load-0"]);
        // Every room has a sender, whichever side is larger.
        for (senders, rooms) in [(1, 1), (3, 7), (7, 3), (4, 4)] {
            let mut covered: Vec<String> = (0..senders).flat_map(|s| sender_rooms(s, senders, rooms)).collect();
            covered.sort();
            covered.dedup();
            assert_eq!(covered.len(), rooms, "{senders} senders, {rooms} rooms");
        }
    }
}
