//! Support for the end-to-end tests in `tests/tests/`: a real edge on
//! `127.0.0.1:0` with its own data dir, tokens for its tenants, and clients.

pub mod api;
pub mod checker;
pub mod nats;
pub mod tools;

use std::time::Duration;

use std::sync::{Arc, Mutex, OnceLock};

use bytes::{Bytes, BytesMut};
use throng_client::{Client, ConnectOptions, RoomStream};
use throng_edge::auth::{Claims, sign, unix_now};
use throng_edge::config::TenantConfig;
use throng_edge::config::{ModuleSource, ModuleUse, PolicyChoice, PolicyRule};
use throng_edge::{Config, Edge};
use throng_wire::{Batch, ClientFrame, EdgeFrame, ErrorCode, FrameDecoder, Message, encode};

/// Two HS256 tenants with generous limits, so tests measure behaviour, not throttling.
pub const TEST_CONFIG: &str = r#"
[server]
listen = "127.0.0.1:0"
data_dir = "unused"

[limits]
max_rooms_per_connection = 4
send_rate_per_sec = 100000
send_burst = 100000
hello_timeout = "2s"
# Every test client comes from 127.0.0.1.
max_unauthenticated_per_ip = 100000

[rooms]
tick = "10ms"
viewer_cap_per_sec = 0
empty_room_linger = "1s"

[control]
operators = [{ name = "ops", key = "test-operator-key-0123456789" }]

[tenants.acme]
hs256_secret = "acme-secret-0123456789"

[tenants.globex]
hs256_secret = "globex-secret-0123456789"
"#;

/// The operator key of [`TEST_CONFIG`].
pub const OPERATOR_KEY: &str = "test-operator-key-0123456789";

/// [`TEST_CONFIG`] with `dir` as its data dir, for tests that start an
/// edge themselves (to see it refuse to start, say).
pub fn test_config(dir: &std::path::Path) -> Config {
    let mut config = Config::parse(TEST_CONFIG, "TEST_CONFIG", dir).expect("test config");
    config.data_dir = dir.to_owned();
    // Tests count what room policies do, not how fast they do it on a CI
    // box whose two cores are busy with other tests: the default 5 ms per
    // call is missed there now and then (a tick falls back, an instance is
    // made again). Tests of the budget set their own. Tenant filters keep
    // their quota's budget (`[control.quota]`, from the file's default).
    config.wasm.budget = throng_edge::wasm::Budget::Epoch(Duration::from_millis(250));
    config
}

/// A running edge and the directory it keeps state in.
#[allow(missing_debug_implementations)] // Edge holds no useful Debug for tests
pub struct TestEdge {
    pub edge: Edge,
    pub config: Config,
    _dir: tempfile::TempDir,
}

impl TestEdge {
    /// Starts an edge on [`TEST_CONFIG`], adjusted by `tweak`.
    pub async fn start(tweak: impl FnOnce(&mut Config)) -> TestEdge {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = test_config(dir.path());
        tweak(&mut config);
        let edge = Edge::start(config.clone()).await.expect("edge starts");
        TestEdge {
            edge,
            config,
            _dir: dir,
        }
    }

    /// Stops the edge and starts a new one on the same address and data dir
    /// (what an edge restart looks like to its clients).
    pub async fn restart(self) -> TestEdge {
        self.restart_after(async {}).await.0
    }

    /// [`Self::restart`], with `meanwhile` run while the edge is down.
    pub async fn restart_after<T>(self, meanwhile: impl std::future::Future<Output = T>) -> (TestEdge, T) {
        let TestEdge { edge, mut config, _dir } = self;
        config.listen = edge.local_addr();
        edge.shutdown().await;
        let out = meanwhile.await;
        // The old endpoint's driver lets go of the UDP port a moment after
        // its last connection is gone.
        let start = std::time::Instant::now();
        loop {
            match Edge::start(config.clone()).await {
                Ok(edge) => return (TestEdge { edge, config, _dir }, out),
                Err(e) if start.elapsed() < Duration::from_secs(5) => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("edge restarts: {e}"),
            }
        }
    }

    pub fn addr(&self) -> String {
        self.edge.local_addr().to_string()
    }

    pub fn roots(&self) -> Vec<rustls::pki_types::CertificateDer<'static>> {
        throng_client::tls::load_certs(self.edge.cert_path()).expect("dev cert")
    }

    /// A token for `user` of `tenant` with `role`, allowed rooms `rooms`.
    pub fn token(&self, tenant: &str, user: &str, role: &str, rooms: &str) -> String {
        self.token_exp(tenant, user, role, rooms, unix_now() + 3600)
    }

    pub fn token_exp(&self, tenant: &str, user: &str, role: &str, rooms: &str, exp: u64) -> String {
        let t: &TenantConfig = self.config.tenants.get(tenant).expect("known tenant");
        let claims = Claims {
            tenant: tenant.into(),
            sub: user.into(),
            role: role.into(),
            rooms: rooms.into(),
            exp,
            nbf: None,
        };
        sign(&claims, t, None).expect("sign")
    }

    pub fn options(&self, token: String) -> ConnectOptions {
        ConnectOptions::new(self.addr(), self.roots(), token)
    }

    /// Options for a WebTransport session, as a browser page opens one:
    /// HTTP/3 to the session path, the certificate pinned by its hash.
    pub fn web_options(&self, token: String) -> ConnectOptions {
        self.options(token)
            .with_webtransport(throng_client::WebTransportOptions {
                path: "/throng".into(),
                cert_hashes: vec![self.web_cert_hash()],
                origin: None,
            })
    }

    /// The SHA-256 of the WebTransport certificate the edge serves now.
    pub fn web_cert_hash(&self) -> [u8; 32] {
        use base64::Engine;
        let hash = self.edge.webtransport_cert_sha256().expect("WebTransport is on");
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(hash)
            .expect("base64 hash");
        bytes.try_into().expect("32 bytes")
    }

    /// A WebTransport client as `user` of `tenant` with `role`, allowed every room.
    pub async fn web_client(&self, tenant: &str, user: &str, role: &str) -> Client {
        Client::connect(self.web_options(self.token(tenant, user, role, "*")))
            .await
            .expect("WebTransport client connects")
    }

    /// Connects a client as `user` of `tenant` with `role`, allowed every room.
    pub async fn client(&self, tenant: &str, user: &str, role: &str) -> Client {
        Client::connect(self.options(self.token(tenant, user, role, "*")))
            .await
            .expect("client connects")
    }
}

/// A raw QUIC connection speaking ALPN throng/3, to send what no client
/// library would: (connection, control send stream, control recv stream).
pub async fn raw(edge: &TestEdge) -> (quinn::Connection, quinn::SendStream, quinn::RecvStream) {
    let conn = raw_connection(edge).await;
    let (send, recv) = conn.open_bi().await.expect("control stream");
    (conn, send, recv)
}

/// A raw QUIC connection to `edge`, with no stream opened yet.
pub async fn raw_connection(edge: &TestEdge) -> quinn::Connection {
    let config =
        throng_client::tls::client_config(&edge.roots(), None, Duration::from_secs(5), Duration::from_secs(10))
            .expect("client config");
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("endpoint");
    endpoint.set_default_client_config(config);
    endpoint
        .connect(edge.edge.local_addr(), "localhost")
        .expect("connect")
        .await
        .expect("handshake")
}

/// Reads edge frames until the control stream ends (or 5 s pass).
pub async fn drain(recv: &mut quinn::RecvStream) -> Vec<EdgeFrame> {
    let d = FrameDecoder::new(1 << 20);
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while let Ok(Some(chunk)) = recv.read_chunk(65536, true).await {
            buf.extend_from_slice(&chunk.bytes);
            while let Ok(Some(f)) = d.decode::<EdgeFrame>(&mut buf) {
                frames.push(f);
            }
        }
    })
    .await;
    frames
}

/// A client frame, encoded.
pub fn frame(f: &ClientFrame) -> Bytes {
    encode(f, 1 << 20).expect("encode")
}

/// The application close code of a connection the edge closed, once it is.
pub async fn close_code(conn: &quinn::Connection, within: Duration) -> Option<ErrorCode> {
    match tokio::time::timeout(within, conn.closed()).await {
        Ok(quinn::ConnectionError::ApplicationClosed(c)) => {
            ErrorCode::from_code(u16::try_from(c.error_code.into_inner()).ok()?)
        }
        _ => None,
    }
}

/// Makes every room of `config` tick every `tick`. The tick lives in the
/// size classes once the config is parsed; `rooms.tick` alone changes
/// nothing.
pub fn set_tick(config: &mut Config, tick: Duration) {
    config.rooms.tick = tick;
    for class in &mut config.rooms.classes {
        class.tick = tick;
        class.spread = class.spread.min(tick / 2);
    }
}

/// Receives batches until `n` messages arrived (or `limit` passes), returning
/// them with the batches they came in.
pub async fn collect(room: &mut RoomStream, n: usize, limit: Duration) -> (Vec<Message>, Vec<Batch>) {
    let mut messages = Vec::new();
    let mut batches = Vec::new();
    let _ = tokio::time::timeout(limit, async {
        while messages.len() < n {
            match room.next_batch().await {
                Some(Ok(b)) => {
                    messages.extend(b.messages.iter().cloned());
                    batches.push(b);
                }
                _ => break,
            }
        }
    })
    .await;
    (messages, batches)
}

/// A `[[policy]]` rule running a built-in module on rooms matching `rooms`.
pub fn builtin_policy(rooms: &str, module: &str, params: &[(&str, &str)]) -> PolicyRule {
    PolicyRule {
        tenant: "*".into(),
        rooms: rooms.into(),
        class: None,
        policy: PolicyChoice::Module(policy_use(builtin(module, params))),
    }
}

/// Policies fail open unless a rule says otherwise.
fn policy_use(mut m: ModuleUse) -> ModuleUse {
    m.on_failure = throng_edge::filter::OnFailure::Open;
    m
}

/// A built-in module with params, as a filter chain entry or policy.
pub fn builtin(module: &str, params: &[(&str, &str)]) -> ModuleUse {
    ModuleUse {
        key: format!("test.{module}"),
        source: ModuleSource::Builtin(module.into()),
        params: params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        on_failure: throng_edge::filter::OnFailure::Closed,
    }
}

/// A test module (from `throng-test-modules`, which `builtin:` does not
/// offer) with params, by its path, as a filter chain entry or policy.
pub fn test_module(module: &str, params: &[(&str, &str)]) -> ModuleUse {
    let path = test_module_path(module);
    ModuleUse {
        key: format!("test.{module}"),
        source: ModuleSource::Path(path.into()),
        params: params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        on_failure: throng_edge::filter::OnFailure::Closed,
    }
}

fn test_module_path(name: &str) -> &'static str {
    use throng_test_modules as t;
    match name {
        "filter-slow" => t::FILTER_SLOW_PATH,
        "filter-slow-start" => t::FILTER_SLOW_START_PATH,
        "filter-trap" => t::FILTER_TRAP_PATH,
        "hostile-loop" => t::HOSTILE_LOOP_PATH,
        "hostile-memory" => t::HOSTILE_MEMORY_PATH,
        "hostile-plan" => t::HOSTILE_PLAN_PATH,
        "hostile-trap" => t::HOSTILE_TRAP_PATH,
        "wasi-probe" => t::WASI_PROBE_PATH,
        other => panic!("no path for test module `{other}`"),
    }
}

/// A `[[policy]]` rule running a test module on rooms matching `rooms`.
pub fn test_policy(rooms: &str, module: &str, params: &[(&str, &str)]) -> PolicyRule {
    PolicyRule {
        tenant: "*".into(),
        rooms: rooms.into(),
        class: None,
        policy: PolicyChoice::Module(policy_use(test_module(module, params))),
    }
}

/// Everything the edge logs in this test process, for tests that check logs.
pub fn captured_logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let writer = Arc::clone(&buf);
        let _ = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_env_filter(tracing_subscriber::EnvFilter::new(
                "warn,throng_edge=info,throng::guest=info",
            ))
            .with_writer(move || LogWriter(Arc::clone(&writer)))
            .try_init();
        buf
    })
    .clone()
}

/// The captured log as text.
pub fn log_text() -> String {
    let logs = captured_logs();
    let bytes = logs.lock().unwrap_or_else(|e| e.into_inner());
    String::from_utf8_lossy(&bytes).into_owned()
}

struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Connects `n` viewers of `tenant` and joins them to `room`, a few
/// handshakes at a time (many at once overflow loopback socket buffers).
pub async fn viewers(edge: &TestEdge, tenant: &str, room: &str, n: usize) -> Vec<(Client, RoomStream)> {
    let mut out = Vec::with_capacity(n);
    for chunk in (0..n).collect::<Vec<_>>().chunks(32) {
        let mut joins = Vec::new();
        for &i in chunk {
            let opts = edge.options(edge.token(tenant, &format!("viewer{i}"), "viewer", "*"));
            let room = room.to_owned();
            joins.push(tokio::spawn(async move {
                let c = Client::connect(opts).await.expect("viewer connects");
                let r = c.join(&room).await.expect("viewer joins");
                (c, r)
            }));
        }
        for j in joins {
            out.push(j.await.expect("join task"));
        }
    }
    out
}

/// Reads length-framed edge frames from one QUIC receive stream, with no
/// client library in between: what the edge wrote is what a test sees
/// (duplicates included, which `ResumableRoom` would drop).
#[allow(missing_debug_implementations)] // holds a quinn stream
pub struct FrameReader {
    recv: quinn::RecvStream,
    buf: BytesMut,
    decoder: FrameDecoder,
}

impl FrameReader {
    pub fn new(recv: quinn::RecvStream) -> Self {
        FrameReader {
            recv,
            buf: BytesMut::new(),
            decoder: FrameDecoder::new(1 << 20),
        }
    }

    /// The next frame, or `None` when the stream ends, fails or `within`
    /// passes first.
    pub async fn next(&mut self, within: Duration) -> Option<EdgeFrame> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match self.decoder.decode::<EdgeFrame>(&mut self.buf) {
                Ok(Some(f)) => return Some(f),
                Ok(None) => {}
                Err(e) => panic!("the edge wrote an undecodable frame: {e}"),
            }
            match tokio::time::timeout_at(deadline, self.recv.read_chunk(65536, true)).await {
                Ok(Ok(Some(chunk))) => self.buf.extend_from_slice(&chunk.bytes),
                _ => return None,
            }
        }
    }
}

/// A session spoken frame by frame on a raw connection: Hello sent and
/// Welcome read.
#[allow(missing_debug_implementations)] // holds quinn streams
pub struct RawSession {
    pub conn: quinn::Connection,
    pub send: quinn::SendStream,
    pub control: FrameReader,
}

impl RawSession {
    /// Connects with `token`; panics unless the edge answers `Welcome`.
    pub async fn hello(edge: &TestEdge, token: String) -> RawSession {
        let (conn, mut send, recv) = raw(edge).await;
        send.write_all(&frame(&ClientFrame::Hello { token }))
            .await
            .expect("hello");
        let mut control = FrameReader::new(recv);
        match control.next(Duration::from_secs(10)).await {
            Some(EdgeFrame::Welcome { .. }) => {}
            other => panic!("expected Welcome, got {other:?}"),
        }
        RawSession { conn, send, control }
    }

    pub async fn send(&mut self, f: &ClientFrame) {
        self.send.write_all(&frame(f)).await.expect("write a client frame");
    }

    /// Sends `Join` and returns the room's stream, whose first frame
    /// (`Joined` or, on refusal, nothing) the caller reads.
    pub async fn join(&mut self, room: &str, resume_from: Option<u64>) -> FrameReader {
        self.send(&ClientFrame::Join {
            room: room.into(),
            resume_from,
            epoch: 0,
        })
        .await;
        let recv = tokio::time::timeout(Duration::from_secs(10), self.conn.accept_uni())
            .await
            .expect("the edge opens the room's stream in time")
            .expect("room stream");
        FrameReader::new(recv)
    }

    /// The next control frame that is not an `Ack` (acks for messages this
    /// session sent are skipped).
    pub async fn next_control(&mut self, within: Duration) -> Option<EdgeFrame> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.control.next(left).await? {
                EdgeFrame::Ack { .. } => {}
                other => return Some(other),
            }
        }
    }

    /// A ping round trip: every frame the edge wrote on the control stream
    /// before the `Pong` has been read (and is returned).
    pub async fn round_trip(&mut self, nonce: u64) -> Vec<EdgeFrame> {
        self.send(&ClientFrame::Ping { nonce }).await;
        let mut before = Vec::new();
        loop {
            match self.control.next(Duration::from_secs(10)).await {
                Some(EdgeFrame::Pong { nonce: n }) if n == nonce => return before,
                Some(f) => before.push(f),
                None => panic!("no Pong {nonce}; read {before:?}"),
            }
        }
    }
}

/// Waits until `done()` holds, checking every 10 ms for at most `limit`:
/// a poll of something the edge publishes (stats, the log) with a deadline.
pub async fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub async fn cluster(nats: &nats::NatsServer, ids: &[&str]) -> Vec<TestEdge> {
    cluster_with(nats, ids, |_| {}).await
}

/// [`cluster`], each edge's config passed through `edit` as well.
pub async fn cluster_with(nats: &nats::NatsServer, ids: &[&str], edit: fn(&mut throng_edge::Config)) -> Vec<TestEdge> {
    let mut edges = Vec::new();
    for id in ids {
        let url = nats.url();
        // A secured server's edges sign in as themselves.
        let seed = nats.seed_file(id);
        let id = (*id).to_owned();
        edges.push(
            TestEdge::start(move |c| {
                let mut cluster = throng_edge::config::ClusterConfig::with_nats(vec![url]);
                cluster.credentials = seed.map(throng_edge::config::NatsCredentials::NkeySeedFile);
                cluster.edge_id = Some(id);
                cluster.heartbeat = Duration::from_millis(100);
                cluster.dead_after = Duration::from_millis(600);
                c.cluster = Some(cluster);
                c.rooms.presence_interval = Duration::from_millis(100);
                c.rooms.group_rooms = vec!["group-*".into()];
                // A newcomer may read a group's log from its start.
                c.rooms.group_history = throng_edge::config::GroupHistory::All;
                // Several edges in one process: each sizes its Wasm pool to
                // the whole of vm.max_map_count, as if it were alone.
                c.wasm.max_instances = 256;
                edit(c);
            })
            .await,
        );
    }
    for e in &edges {
        let c = e.edge.cluster().expect("clustered");
        wait_for("every edge to see the others", Duration::from_secs(10), || {
            c.live().edges.len() == ids.len()
        })
        .await;
    }
    edges
}
