//! The `throng` command: run an edge, mint dev tokens, talk to an edge.

mod admin_cli;
mod baseline;
mod load;

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use throng_client::{Client, ClientError, ConnectOptions};
use throng_edge::auth::{Claims, sign, unix_now};
use throng_edge::{Config, Edge};
use throng_wire::{Batch, Kind, Message, Resumed, Role};

/// Where `throng serve` listens on its embedded dev config; a client aimed
/// here may trust the dev certificate without being told where it is.
const DEV_SERVER: &str = "127.0.0.1:4433";

/// How long `client` commands wait for an edge's certificate-checked hello
/// to come back, wherever they aim: a typo in `--server` should not look
/// like a hang.
const CONNECT_TIMEOUT: &str = "1500ms";

/// How long an exiting client waits for its QUIC close to go out, so the
/// edge drops its session (and presence) at once instead of after the
/// idle timeout.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

#[derive(Parser)]
#[command(
    name = "throng",
    version,
    about = "Throng: an edge host for livecast rooms over QUIC"
)]
struct Cli {
    /// How log lines on stderr are written.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    /// Human-readable; coloured only when stderr is a terminal.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// `--role`: the wire's roles, listed in `--help`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum RoleArg {
    /// Reads rooms, sends chat, likes and gifts.
    Viewer,
    /// May also send host and system messages.
    Host,
    /// The same sending rights as a host.
    Moderator,
    /// A tenant's administrator: the admin API (`throng module`,
    /// `throng admin`) for that tenant only; joins no room.
    TenantAdmin,
}

impl RoleArg {
    /// As the token's `role` claim says it.
    fn claim(self) -> &'static str {
        match self {
            RoleArg::TenantAdmin => throng_edge::auth::TENANT_ADMIN,
            other => Role::from(other).as_str(),
        }
    }
}

impl From<RoleArg> for Role {
    fn from(r: RoleArg) -> Self {
        match r {
            RoleArg::Viewer => Role::Viewer,
            RoleArg::Host => Role::Host,
            RoleArg::Moderator | RoleArg::TenantAdmin => Role::Moderator,
        }
    }
}

/// `--kind`: the wire's message kinds, listed in `--help`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum KindArg {
    /// A chat line.
    Chat,
    /// Folded into the room's like counter.
    Like,
    /// A gift: the body names it; counted per name.
    Gift,
    /// From the room's host (host and moderator roles only); never dropped.
    Host,
    /// From the service (host and moderator roles only).
    System,
}

impl From<KindArg> for Kind {
    fn from(k: KindArg) -> Self {
        match k {
            KindArg::Chat => Kind::Chat,
            KindArg::Like => Kind::Like,
            KindArg::Gift => Kind::Gift,
            KindArg::Host => Kind::Host,
            KindArg::System => Kind::System,
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run the edge host. Prints one ready line to stdout; logs go to stderr.
    Serve {
        /// Config file; without it the embedded dev defaults are used.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Override server.listen, e.g. 127.0.0.1:0 for a free port.
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Override server.data_dir.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Override server.admin: an ip:port for the admin HTTP endpoint, or
        /// `off`.
        #[arg(long, value_parser = parse_admin)]
        admin: Option<Admin>,
        /// Join a cluster over NATS: server URLs, comma-separated
        /// (nats://HOST:PORT). Alone it is enough: the edge id is generated
        /// and the region is `default`. Overrides `cluster.nats`.
        #[arg(long, value_delimiter = ',', value_parser = parse_nats_url)]
        cluster: Vec<String>,
        /// This edge's id in its cluster (overrides `cluster.edge_id`).
        #[arg(long, value_parser = parse_bus_token)]
        edge_id: Option<String>,
        /// This edge's region (overrides `cluster.region`).
        #[arg(long, value_parser = parse_bus_token)]
        region: Option<String>,
        /// A file with this edge's NATS nkey seed, as `throng nats-auth`
        /// writes them (overrides the config's cluster credentials).
        #[arg(long)]
        nats_nkey: Option<PathBuf>,
    },
    /// Make NATS users for a cluster: an nkey seed file per edge (it may
    /// publish on the bus only as itself) and per app user (it may not use
    /// the bus at all), and print the `authorization` block for
    /// nats-server's config.
    NatsAuth {
        /// Edge ids, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        edges: Vec<String>,
        /// Users that are not edges (a tenant's backend), comma-separated.
        #[arg(long, value_delimiter = ',')]
        apps: Vec<String>,
        /// Where the seed files go (`<name>.nk`, readable by the owner only).
        #[arg(long)]
        out: PathBuf,
    },
    /// Print a JWT signed with a tenant's key from the config.
    Token {
        /// Config file; without it the embedded dev defaults are used.
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        user: String,
        #[arg(long, value_enum, default_value_t = RoleArg::Viewer)]
        role: RoleArg,
        /// Rooms the token may join: a pattern with * and ? wildcards.
        #[arg(long, default_value = "*")]
        rooms: String,
        /// Lifetime, e.g. 30m, 1h, 7d.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// PEM private key, for tenants configured with an ES256 public key.
        #[arg(long)]
        key: Option<PathBuf>,
        /// Make a token that expired an hour ago (to see how clients take
        /// `TokenExpired`); --ttl is ignored.
        #[arg(long)]
        expired: bool,
    },
    /// Connect to an edge as a client.
    Client {
        /// Edge address, host:port.
        #[arg(long, env = "THRONG_SERVER", default_value = DEV_SERVER)]
        server: String,
        /// Certificate to trust (the ready line prints it). Defaults to the
        /// dev certificate, `<data_dir>/dev-cert.pem` of the embedded dev
        /// config, when --server is the dev default.
        #[arg(long)]
        cert: Option<PathBuf>,
        /// How long to wait for the edge to answer (QUIC and TLS handshake,
        /// then its Welcome), e.g. 500ms, 10s.
        #[arg(long, default_value = CONNECT_TIMEOUT, value_parser = humantime::parse_duration)]
        connect_timeout: Duration,
        /// JWT from `throng token`.
        #[arg(long, env = "THRONG_TOKEN")]
        token: String,
        #[command(subcommand)]
        action: ClientAction,
    },
    /// Upload, list and deploy Wasm modules through an edge's admin API.
    Module(Box<admin_cli::ModuleArgs>),
    /// Rooms, tenants, disconnects and publishing through an edge's admin API.
    Admin(Box<admin_cli::AdminArgs>),
    /// Load an edge (or a bare-quinn baseline) with real QUIC viewers and report CPU, RSS and latency.
    Load(Box<load::LoadArgs>),
    /// Baseline server for `throng load --mode bare-quinn`.
    #[command(hide = true)]
    BareQuinn(baseline::BareQuinnArgs),
}

#[derive(Subcommand)]
enum ClientAction {
    /// Print what a room delivers: the recent messages the join brings,
    /// then each batch's messages and counters.
    Listen {
        room: String,
        /// Exit after this many messages (recent ones included).
        #[arg(long)]
        count: Option<u64>,
        /// One JSON object per line: `"type": "message"` for each message
        /// (`"recent": true` for those the join brought), `"type": "batch"`
        /// for a batch's counters (likes, gifts) and missed batches,
        /// `"type": "gap"` where messages may be lost uncounted (the room's
        /// numbering changed, or the edge no longer held all after
        /// `--resume-from`).
        #[arg(long)]
        json: bool,
        /// Ask for what the edge still has after this sequence number.
        #[arg(long)]
        resume_from: Option<u64>,
        /// The numbering `--resume-from` is of (the `epoch` the edge printed
        /// with it); 0 takes it as the room's current one.
        #[arg(long, default_value_t = 0, requires = "resume_from")]
        epoch: u64,
    },
    /// Send messages to a room and print each ack or rejection.
    Send {
        room: String,
        text: String,
        #[arg(long, value_enum, default_value_t = KindArg::Chat)]
        kind: KindArg,
        /// How many times to send it.
        #[arg(long, default_value_t = 1)]
        repeat: u64,
        /// Messages per second when repeating.
        #[arg(long, default_value_t = 10.0)]
        rate: f64,
    },
    /// Which of these users (of the token's tenant) are online on the edge.
    Online {
        /// User ids; with --file, read one per line from that file as well.
        users: Vec<String>,
        #[arg(long)]
        file: Option<PathBuf>,
        /// Print only the users who are online.
        #[arg(long)]
        only_online: bool,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let default_level = if matches!(cli.command, Command::Serve { .. }) {
        "info"
    } else {
        "warn"
    };
    let logs = tracing_subscriber::fmt().with_writer(std::io::stderr).with_env_filter(
        tracing_subscriber::EnvFilter::try_from_default_env()
            // web-transport-quinn warns at every browser that leaves without
            // a close capsule: a client's doing, one line per session, which
            // any page could turn into a log flood.
            .unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new(format!("{default_level},web_transport_quinn=error"))
            }),
    );
    match cli.log_format {
        // Colour codes are noise in a file or a pipe.
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => logs.json().with_ansi(false).init(),
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// `serve`'s cluster flags.
struct ClusterArgs {
    nats: Vec<String>,
    edge_id: Option<String>,
    region: Option<String>,
    nkey: Option<PathBuf>,
}

impl ClusterArgs {
    fn apply(&self, config: &mut Config) -> Result<()> {
        if !self.nats.is_empty() {
            let cluster = config
                .cluster
                .get_or_insert_with(|| throng_edge::config::ClusterConfig::with_nats(Vec::new()));
            cluster.nats.clone_from(&self.nats);
        }
        let Some(cluster) = config.cluster.as_mut() else {
            if self.edge_id.is_some() || self.region.is_some() || self.nkey.is_some() {
                anyhow::bail!(
                    "--edge-id, --region and --nats-nkey need a cluster: add --cluster nats://HOST:PORT or [cluster] to the config"
                );
            }
            return Ok(());
        };
        if let Some(id) = &self.edge_id {
            cluster.edge_id = Some(id.clone());
        }
        if let Some(region) = &self.region {
            cluster.region.clone_from(region);
        }
        if let Some(path) = &self.nkey {
            cluster.credentials = Some(throng_edge::config::NatsCredentials::NkeySeedFile(path.clone()));
        }
        Ok(())
    }
}

fn parse_nats_url(s: &str) -> Result<String, String> {
    throng_edge::config::check_nats_url(s).map(|()| s.to_owned())
}

fn parse_bus_token(s: &str) -> Result<String, String> {
    throng_edge::config::check_bus_token(s).map(|()| s.to_owned())
}

fn load_config(path: Option<&Path>) -> Result<Config> {
    match path {
        Some(p) => Config::load(p).with_context(|| format!("invalid config {}", p.display())),
        None => Config::dev().context("invalid embedded dev config"),
    }
}

/// `throng nats-auth`: seed files in `out`, the server's block on stdout.
fn nats_auth(edges: &[String], apps: &[String], out: &std::path::Path) -> Result<std::process::ExitCode> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let users = throng_edge::cluster::nats_auth::users(edges, apps)?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot make {}", out.display()))?;
    for u in &users {
        let path = out.join(format!("{}.nk", u.name));
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| {
                format!(
                    "cannot write {} (an existing seed is never overwritten)",
                    path.display()
                )
            })?;
        writeln!(file, "{}", u.seed).with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    print!("{}", throng_edge::cluster::nats_auth::authorization(&users));
    Ok(std::process::ExitCode::SUCCESS)
}

async fn run(cli: Cli) -> Result<std::process::ExitCode> {
    match cli.command {
        Command::Load(args) => load::run(*args).await,
        Command::Module(args) => admin_cli::module(*args).await,
        Command::Admin(args) => admin_cli::admin(*args).await,
        Command::BareQuinn(args) => baseline::run(args).await,
        Command::NatsAuth { edges, apps, out } => nats_auth(&edges, &apps, &out),
        Command::Serve {
            config,
            listen,
            data_dir,
            admin,
            cluster,
            edge_id,
            region,
            nats_nkey,
        } => {
            let cluster = ClusterArgs {
                nats: cluster,
                edge_id,
                region,
                nkey: nats_nkey,
            };
            serve(config, listen, data_dir, admin, cluster).await
        }
        Command::Token {
            config,
            tenant,
            user,
            role,
            rooms,
            ttl,
            key,
            expired,
        } => {
            let config = load_config(config.as_deref())?;
            let tenant_config = config
                .tenants
                .get(&tenant)
                .with_context(|| format!("tenant `{tenant}` is not in the config"))?;
            let private = key
                .map(|p| std::fs::read(&p).with_context(|| format!("cannot read key {}", p.display())))
                .transpose()?;
            let claims = Claims {
                tenant,
                sub: user,
                role: role.claim().to_owned(),
                rooms,
                exp: if expired {
                    unix_now().saturating_sub(3600)
                } else {
                    unix_now() + ttl.as_secs()
                },
                nbf: None,
            };
            let token = sign(&claims, tenant_config, private.as_deref()).map_err(anyhow::Error::msg)?;
            println!("{token}");
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::Client {
            server,
            cert,
            connect_timeout,
            token,
            action,
        } => {
            let cert = match cert {
                Some(cert) => cert,
                None if server == DEV_SERVER => dev_cert()?,
                None => bail!("--cert is needed for a server other than the dev default {DEV_SERVER}"),
            };
            let roots = throng_client::tls::load_certs(&cert)
                .with_context(|| format!("cannot trust the certificate {}", cert.display()))?;
            let mut options = ConnectOptions::new(server.clone(), roots, token);
            options.handshake_timeout = connect_timeout;
            // The handshake timeout does not cover resolving the name.
            let client = match tokio::time::timeout(connect_timeout, Client::connect(options)).await {
                Ok(Ok(client)) => client,
                Err(_) | Ok(Err(ClientError::Timeout(_))) => bail!(
                    "no answer from {server} within {}: is `throng serve` running there, and is --server right? \
                     (--connect-timeout waits longer)",
                    humantime::format_duration(connect_timeout)
                ),
                Ok(Err(e)) => return Err(e).with_context(|| format!("cannot connect to {server}")),
            };
            let result = client_action(&client, action).await;
            if !client.close_and_wait(CLOSE_WAIT).await {
                tracing::warn!("the connection did not close within {CLOSE_WAIT:?}");
            }
            result
        }
    }
}

/// The dev certificate `throng serve` makes on its embedded config.
fn dev_cert() -> Result<PathBuf> {
    let config = Config::dev().context("invalid embedded dev config")?;
    let path = throng_edge::tls::dev_cert_path(&config.data_dir);
    if !path.exists() {
        bail!(
            "no --cert given and the dev certificate {} does not exist: start `throng serve` from this \
             directory first, or pass --cert",
            path.display()
        );
    }
    Ok(path)
}

async fn client_action(client: &Client, action: ClientAction) -> Result<std::process::ExitCode> {
    let code = match action {
        ClientAction::Listen {
            room,
            count,
            json,
            resume_from,
            epoch,
        } => listen(client, &room, count, json, (resume_from, epoch)).await?,
        ClientAction::Send {
            room,
            text,
            kind,
            repeat,
            rate,
        } => send(client, &room, &text, kind.into(), repeat, rate).await?,
        ClientAction::Online {
            mut users,
            file,
            only_online,
        } => {
            if let Some(path) = file {
                let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
                users.extend(text.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_owned));
            }
            let online = client.online(&users).await.context("presence query failed")?;
            for (user, is_online) in users.iter().zip(online) {
                if is_online || !only_online {
                    println!("{user}\t{}", if is_online { "online" } else { "offline" });
                }
            }
            std::process::ExitCode::SUCCESS
        }
    };
    Ok(code)
}

/// `--admin`: where the admin endpoint listens, or nowhere.
#[derive(Debug, Clone, Copy)]
struct Admin(Option<SocketAddr>);

fn parse_admin(s: &str) -> Result<Admin, String> {
    match s {
        "off" => Ok(Admin(None)),
        _ => s
            .parse()
            .map(|a| Admin(Some(a)))
            .map_err(|e| format!("`{s}` is neither an ip:port address ({e}) nor `off`")),
    }
}

async fn serve(
    config_path: Option<PathBuf>,
    listen: Option<SocketAddr>,
    data_dir: Option<PathBuf>,
    admin: Option<Admin>,
    cluster: ClusterArgs,
) -> Result<std::process::ExitCode> {
    // Before any metric is recorded, so /metrics sees them all.
    throng_edge::admin::install_prometheus();
    let overrides = |mut config: Config| -> Result<Config> {
        cluster.apply(&mut config)?;
        if let Some(listen) = listen {
            config.listen = listen;
        }
        if let Some(dir) = &data_dir {
            config.data_dir = dir.clone();
        }
        if let Some(Admin(addr)) = admin {
            config.admin = addr;
        }
        Ok(config)
    };
    let config = overrides(load_config(config_path.as_deref())?)?;
    let edge = Edge::start(config).await.context("cannot start the edge")?;
    let cert = std::fs::canonicalize(edge.cert_path()).unwrap_or_else(|_| edge.cert_path().to_owned());
    let mut ready = format!("throng ready quic={} cert={}", edge.local_addr(), cert.display());
    if let Some(url) = edge.webtransport_url() {
        ready.push_str(&format!(" webtransport={url}"));
    }
    if let Some(hash) = edge.webtransport_cert_sha256() {
        ready.push_str(&format!(" cert_sha256={hash}"));
    }
    if let Some(admin) = edge.admin_addr() {
        // The admin endpoint serves the API (/v1), the dashboard, /stats,
        // /metrics and /healthz.
        ready.push_str(&format!(" admin=http://{admin} dashboard=http://{admin}/dashboard"));
    }
    if let Some(demo) = edge.demo_url() {
        ready.push_str(&format!(" demo={demo}"));
    }
    println!("{ready}");
    if let Some(c) = edge.cluster() {
        println!("throng cluster edge_id={} region={}", c.edge_id(), c.region());
    }
    loop {
        match next_signal().await? {
            Signal::Stop => break,
            Signal::Reload => {
                // A bad config on reload is logged and changes nothing;
                // settings that need a restart are named by the edge.
                let result = match load_config(config_path.as_deref()) {
                    Ok(config) => match overrides(config) {
                        Ok(config) => edge.reload(&config).await.map_err(anyhow::Error::from),
                        Err(e) => Err(e),
                    },
                    Err(e) => Err(e),
                };
                match result {
                    Ok(r) => tracing::info!(
                        generation = r.generation,
                        needs_restart = r.needs_restart.len(),
                        "SIGHUP: config reloaded"
                    ),
                    Err(e) => tracing::error!("SIGHUP: config reload failed; nothing changed: {e:#}"),
                }
            }
        }
    }
    tracing::info!("shutting down");
    edge.shutdown().await;
    Ok(std::process::ExitCode::SUCCESS)
}

enum Signal {
    Stop,
    Reload,
}

async fn next_signal() -> Result<Signal> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
        let mut hup = signal(SignalKind::hangup()).context("cannot watch SIGHUP")?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => { r.context("cannot watch Ctrl-C")?; Ok(Signal::Stop) }
            _ = term.recv() => Ok(Signal::Stop),
            _ = hup.recv() => Ok(Signal::Reload),
        }
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c().await.context("cannot watch Ctrl-C")?;
        Ok(Signal::Stop)
    }
}

async fn listen(
    client: &Client,
    room: &str,
    count: Option<u64>,
    json: bool,
    (resume_from, epoch): (Option<u64>, u64),
) -> Result<std::process::ExitCode> {
    let mut stream = client
        .resume(room, resume_from, epoch)
        .await
        .with_context(|| format!("cannot join `{room}`"))?;
    eprintln!(
        "joined {room}: {} online, {} recent, epoch {}",
        stream.online,
        stream.recent.len(),
        stream.epoch
    );
    let mut epoch = stream.epoch;
    // A gap is said before the messages after it, never left silent.
    let gap = |kind: &str, from: u64, to: u64| {
        if json {
            println!(
                "{}",
                serde_json::json!({"type": "gap", "room": room, "kind": kind, "from_epoch": from, "epoch": to})
            );
        } else {
            let why = match kind {
                "new_epoch" => "the room's numbering changed (a restart or a takeover)",
                _ => "the edge no longer held everything after that number",
            };
            println!("[{room}] gap: messages may be lost, uncounted: {why} (epoch {from} -> {to})");
        }
    };
    match stream.resumed {
        Resumed::NewEpoch { previous } => gap("new_epoch", previous, epoch),
        Resumed::Truncated => gap("truncated", epoch, epoch),
        Resumed::Fresh | Resumed::Continued => {}
    }
    let mut seen = 0u64;
    let done = |seen: u64| count.is_some_and(|c| seen >= c);
    if done(seen) {
        return Ok(std::process::ExitCode::SUCCESS);
    }
    for m in &stream.recent {
        if json {
            println!("{}", message_json(room, (None, epoch), m, false, stream.online));
        } else {
            println!("{} (recent)", message_text(room, m));
        }
        seen += 1;
        if done(seen) {
            return Ok(std::process::ExitCode::SUCCESS);
        }
    }
    while let Some(batch) = stream.next_batch().await {
        let batch = batch.with_context(|| format!("room `{room}` failed"))?;
        if batch.epoch != epoch {
            gap("new_epoch", epoch, batch.epoch);
            epoch = batch.epoch;
        }
        if !batch.counters.is_empty() || batch.missed > 0 {
            if json {
                println!("{}", batch_json(&batch));
            } else {
                if !batch.counters.is_empty() {
                    let gifts: Vec<String> = batch
                        .counters
                        .gifts
                        .iter()
                        .map(|g| format!("{}×{}", g.gift, g.count))
                        .collect();
                    println!(
                        "[{room}] likes +{} gifts [{}] ({} online)",
                        batch.counters.likes,
                        gifts.join(", "),
                        batch.online
                    );
                }
                if batch.missed > 0 {
                    println!("[{room}] missed {} batches", batch.missed);
                }
            }
        }
        for m in &batch.messages {
            if json {
                let pinned = batch.pinned.contains(&m.seq);
                println!("{}", message_json(room, (Some(&batch), epoch), m, pinned, batch.online));
            } else {
                println!("{}", message_text(room, m));
            }
            seen += 1;
            if done(seen) {
                return Ok(std::process::ExitCode::SUCCESS);
            }
        }
    }
    // A room that ends with its session says why: the edge's Error frame
    // (its code and reason) or the connection's close, once either is in.
    if let Ok(why) = tokio::time::timeout(Duration::from_secs(2), client.closed()).await {
        bail!("the edge ended room `{room}` after {seen} messages: {why}")
    }
    bail!("the edge ended room `{room}` after {seen} messages")
}

fn message_text(room: &str, m: &Message) -> String {
    let body = String::from_utf8_lossy(&m.body);
    format!("[{room} #{}] {} ({}): {body}", m.seq, m.sender, m.kind.as_str())
}

/// A message as one JSON line; `batch` is `None` for the recent messages
/// of the `Joined` frame, which belong to no tick.
fn message_json(
    room: &str,
    (batch, epoch): (Option<&Batch>, u64),
    m: &Message,
    pinned: bool,
    online: u64,
) -> serde_json::Value {
    serde_json::json!({
        "type": "message",
        "room": room,
        "tick": batch.map(|b| b.tick),
        "recent": batch.is_none(),
        "seq": m.seq,
        "sender": m.sender,
        "kind": m.kind.as_str(),
        "body": String::from_utf8_lossy(&m.body),
        "pinned": pinned,
        "online": online,
        "epoch": epoch,
    })
}

/// What a batch says besides its messages: counters (likes folded by the
/// policy, gifts by name) and how many batches this viewer lost before it.
fn batch_json(batch: &Batch) -> serde_json::Value {
    let gifts: serde_json::Map<String, serde_json::Value> = batch
        .counters
        .gifts
        .iter()
        .map(|g| (g.gift.clone(), g.count.into()))
        .collect();
    serde_json::json!({
        "type": "batch",
        "room": batch.room,
        "tick": batch.tick,
        "likes": batch.counters.likes,
        "gifts": gifts,
        "messages": batch.messages.len(),
        "online": batch.online,
        "missed": batch.missed,
        "epoch": batch.epoch,
    })
}

async fn send(
    client: &Client,
    room: &str,
    text: &str,
    kind: Kind,
    repeat: u64,
    rate: f64,
) -> Result<std::process::ExitCode> {
    if !(rate > 0.0 && rate.is_finite()) {
        bail!("--rate must be a positive number");
    }
    let _room = client
        .join(room)
        .await
        .with_context(|| format!("cannot join `{room}`"))?;
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    let mut pending = Vec::new();
    for _ in 0..repeat {
        ticker.tick().await;
        pending.push(client.submit(room, kind, text.as_bytes().to_vec()).await?);
    }
    let mut rejected = 0u64;
    for p in pending {
        match p.ack().await {
            Ok(ack) => println!("ack id={} seq={} epoch={}", ack.client_msg_id, ack.seq, ack.epoch),
            Err(ClientError::Rejected {
                client_msg_id,
                raw,
                reason,
                ..
            }) => {
                rejected += 1;
                println!("rejected id={client_msg_id} code={raw}: {reason}");
            }
            Err(e) => return Err(e).context("lost the edge before every ack arrived"),
        }
    }
    Ok(if rejected == 0 {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::from(2)
    })
}
