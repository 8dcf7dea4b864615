//! Async QUIC client for Throng edges. Does not depend on wasmtime.
//!
//! # Layout
//!
//! - [`Client::connect`] resolves the edge, does the QUIC + TLS handshake
//!   (ALPN `throng/3`), opens the control stream, says `Hello` with the JWT
//!   and waits for `Welcome`.
//! - A reader task takes edge frames off the control stream and completes
//!   what waits for them: acks and rejections by client message id, pongs
//!   by nonce, join refusals by room. A fatal `Error` fails everything
//!   pending with that error.
//! - An acceptor task takes each room stream the edge opens, reads its
//!   `Joined` frame, hands a [`RoomStream`] to the matching [`Client::join`],
//!   and forwards the room's batches into it.
//! - [`tls`] builds the rustls config from the certificate to trust.
//! - [`ResumableRoom`] keeps a room going across dropped connections: it
//!   reconnects and rejoins with the last sequence number it saw, so the
//!   edge sends what was missed (group rooms: all of it; livecast: what is
//!   still in the ring) and nothing twice. Given a cluster's edges
//!   ([`ConnectOptions::with_edges`]), it moves to the next edge when its
//!   own drops: every edge serves every room.

mod resume;
pub mod tls;

pub use resume::{Gap, GapKind, ResumableRoom, ResumePolicy, RoomEvent};

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

// One session type for both transports: a native connection is a raw
// session (no HTTP/3 layer), a browser-style one goes through CONNECT.
use rustls::pki_types::CertificateDer;
use thiserror::Error;
use throng_wire::{
    Batch, ClientFrame, EdgeFrame, ErrorCode, FrameBuffer, Kind, Limits, Message, Resumed, Session, encode,
};
use tokio::sync::{mpsc, oneshot};
use web_transport_quinn::{RecvStream, SendStream, Session as Connection};

pub use throng_wire as wire;

/// Batches buffered per room before the client stops reading the room's
/// stream (and QUIC flow control pushes back on the edge).
const ROOM_BUFFER: usize = 256;

/// Users per presence request (the edge's limit).
const PRESENCE_CHUNK: usize = 10_000;

/// What went wrong, typed so callers can tell a refusal from a lost network.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ClientError {
    #[error("invalid server address `{0}`")]
    Address(String),
    #[error("TLS setup failed: {0}")]
    Tls(String),
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("connection lost: {0}")]
    Connection(String),
    /// The edge sent an `Error` frame or closed the connection with a code.
    #[error("edge said {}: {text}", describe(*code, *raw))]
    Edge {
        code: Option<ErrorCode>,
        raw: u16,
        text: String,
    },
    #[error("join `{room}` refused, {}: {text}", describe(*code, *raw))]
    JoinRefused {
        room: String,
        code: Option<ErrorCode>,
        raw: u16,
        text: String,
    },
    #[error("message {client_msg_id} rejected, {}: {reason}", describe(*code, *raw))]
    Rejected {
        client_msg_id: u64,
        code: Option<ErrorCode>,
        raw: u16,
        reason: String,
    },
    #[error("the edge broke the protocol: {0}")]
    Protocol(String),
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    #[error("the client is closed")]
    Closed,
}

fn describe(code: Option<ErrorCode>, raw: u16) -> String {
    match code {
        Some(c) => c.to_string(),
        None => format!("code {raw}"),
    }
}

impl ClientError {
    /// The edge's error code, where the edge gave one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Self::Edge { code, .. } | Self::JoinRefused { code, .. } | Self::Rejected { code, .. } => *code,
            _ => None,
        }
    }

    fn from_connection(e: &quinn::ConnectionError) -> Self {
        match e {
            quinn::ConnectionError::ApplicationClosed(close) => {
                let raw = u16::try_from(close.error_code.into_inner()).unwrap_or(u16::MAX);
                ClientError::Edge {
                    code: ErrorCode::from_code(raw),
                    raw,
                    text: String::from_utf8_lossy(&close.reason).into_owned(),
                }
            }
            quinn::ConnectionError::ConnectionClosed(close)
                if close.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED =>
            {
                ClientError::Edge {
                    code: Some(ErrorCode::ServerBusy),
                    raw: ErrorCode::ServerBusy.code(),
                    text: "the edge refused the connection".into(),
                }
            }
            quinn::ConnectionError::LocallyClosed => ClientError::Closed,
            other => ClientError::Connection(other.to_string()),
        }
    }

    fn from_session(e: &web_transport_quinn::SessionError) -> Self {
        use web_transport_quinn::{SessionError, WebTransportError};
        match e {
            SessionError::ConnectionError(e) => Self::from_connection(e),
            // A WebTransport close carries the code in a capsule.
            SessionError::WebTransportError(WebTransportError::Closed(code, reason)) => {
                let raw = u16::try_from(*code).unwrap_or(u16::MAX);
                ClientError::Edge {
                    code: ErrorCode::from_code(raw),
                    raw,
                    text: reason.clone(),
                }
            }
            other => ClientError::Connection(other.to_string()),
        }
    }
}

/// How to reach an edge and who to be there.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// `host:port` or `ip:port`.
    pub server: String,
    /// Certificates to trust (the edge's self-signed dev certificate, or a CA).
    pub roots: Vec<CertificateDer<'static>>,
    pub token: String,
    /// TLS server name; defaults to the host part of `server`.
    pub server_name: Option<String>,
    /// How often to ping an otherwise quiet connection (default 3 s; at
    /// most a third of `idle_timeout`, which a longer one is cut to).
    pub keep_alive: Duration,
    /// How long a silent edge is given before the connection counts as
    /// lost (default 10 s): a killed edge says nothing, so this is at most
    /// how long its viewers wait before `ResumableRoom` moves them on.
    pub idle_timeout: Duration,
    pub handshake_timeout: Duration,
    /// Where to get a later token before the current one expires. With it,
    /// the client refreshes by itself (see [`TokenSource`]); without it, the
    /// edge ends the session at the token's expiry.
    pub refresh: Option<TokenSource>,
    /// Other edges of the same cluster (`host:port`), tried in turn when
    /// `server` cannot be reached; a [`ResumableRoom`] moves to the next
    /// one when its connection drops. `roots` must trust all of them.
    pub fallback: Vec<String>,
    /// Connect the way a browser does, over WebTransport (HTTP/3), instead
    /// of native QUIC.
    pub webtransport: Option<WebTransportOptions>,
}

/// A WebTransport session instead of a native connection: the same
/// protocol inside, reached at `https://<server><path>`.
#[derive(Debug, Clone, Default)]
pub struct WebTransportOptions {
    /// The edge's session path (`[webtransport] path`, `/throng` by default).
    pub path: String,
    /// SHA-256 hashes of certificates to accept without a CA, as browsers
    /// take `serverCertificateHashes`; empty: trust `roots`.
    pub cert_hashes: Vec<[u8; 32]>,
    /// The Origin header a page would send; none for a non-browser client.
    pub origin: Option<String>,
}

/// Gives the client a fresh token when its current one nears expiry (a
/// call to the application's auth service, typically). The client asks
/// when a fifth of the token's remaining life is left (at least 2 s, at
/// most a minute before expiry), sends it as `Refresh`, and asks again, a
/// second apart, if that fails.
#[derive(Clone)]
pub struct TokenSource(Arc<TokenFn>);

type TokenFuture = std::pin::Pin<Box<dyn std::future::Future<Output = Result<String, String>> + Send>>;
type TokenFn = dyn Fn() -> TokenFuture + Send + Sync;

impl TokenSource {
    pub fn new<F, Fut>(f: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<String, String>> + Send + 'static,
    {
        Self(Arc::new(move || Box::pin(f())))
    }
}

impl std::fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenSource")
    }
}

impl ConnectOptions {
    pub fn new(server: impl Into<String>, roots: Vec<CertificateDer<'static>>, token: impl Into<String>) -> Self {
        Self {
            server: server.into(),
            roots,
            token: token.into(),
            server_name: None,
            keep_alive: Duration::from_secs(3),
            idle_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            refresh: None,
            fallback: Vec::new(),
            webtransport: None,
        }
    }

    /// Connects over WebTransport, as a browser does.
    pub fn with_webtransport(mut self, webtransport: WebTransportOptions) -> Self {
        self.webtransport = Some(webtransport);
        self
    }

    /// Edges of one cluster, any of which serves every room: the first is
    /// tried first, the others when it cannot be reached (see `fallback`).
    /// An empty list changes nothing.
    pub fn with_edges<S: Into<String>>(mut self, edges: impl IntoIterator<Item = S>) -> Self {
        let mut edges: Vec<String> = edges.into_iter().map(Into::into).collect();
        if !edges.is_empty() {
            self.server = edges.remove(0);
            self.fallback = edges;
        }
        self
    }

    /// Every edge to try, `server` first.
    pub fn edges(&self) -> Vec<String> {
        std::iter::once(self.server.clone())
            .chain(self.fallback.iter().cloned())
            .collect()
    }

    /// These options for one edge of the list alone.
    pub fn for_edge(&self, edge: &str) -> Self {
        let mut one = self.clone();
        one.server = edge.to_owned();
        one.fallback = Vec::new();
        one
    }

    /// Refreshes the token through `source` before it expires.
    pub fn with_refresh(mut self, source: TokenSource) -> Self {
        self.refresh = Some(source);
        self
    }
}

/// The edge's answer to a sent message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    pub client_msg_id: u64,
    pub seq: u64,
    /// The numbering `seq` is of: the `epoch` of the room's `Joined` and
    /// batches, unless the room's numbering changed since (a failover, or
    /// a partition in which this edge numbered on its own).
    pub epoch: u64,
}

type AckTx = oneshot::Sender<Result<Ack, ClientError>>;
type JoinTx = oneshot::Sender<Result<RoomStream, ClientError>>;

#[derive(Default)]
struct Pending {
    acks: HashMap<u64, AckTx>,
    joins: HashMap<String, JoinTx>,
    pings: HashMap<u64, oneshot::Sender<()>>,
    presence: HashMap<u64, oneshot::Sender<Result<Vec<bool>, ClientError>>>,
    /// The one refresh under way.
    refresh: Option<oneshot::Sender<Result<u64, ClientError>>>,
    fatal: Option<ClientError>,
}

struct Inner {
    pending: Mutex<Pending>,
    control: tokio::sync::Mutex<SendStream>,
    max_frame: u32,
    /// When the session's token expires, seconds since the Unix epoch.
    expires_at: AtomicU64,
}

impl Inner {
    fn pending(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Fails everything waiting, and everything after, with `err`.
    fn fail(&self, err: ClientError) {
        let mut p = self.pending();
        if p.fatal.is_none() {
            p.fatal = Some(err.clone());
        }
        let err = p.fatal.clone().unwrap_or(err);
        for (_, tx) in p.acks.drain() {
            let _ = tx.send(Err(err.clone()));
        }
        for (_, tx) in p.joins.drain() {
            let _ = tx.send(Err(err.clone()));
        }
        for (_, tx) in p.presence.drain() {
            let _ = tx.send(Err(err.clone()));
        }
        if let Some(tx) = p.refresh.take() {
            let _ = tx.send(Err(err.clone()));
        }
        p.pings.clear();
    }

    /// Sends `Refresh` and waits for the edge's answer: the new expiry.
    async fn refresh(&self, token: String) -> Result<u64, ClientError> {
        let (tx, rx) = oneshot::channel();
        {
            let mut p = self.pending();
            if let Some(e) = &p.fatal {
                return Err(e.clone());
            }
            if p.refresh.is_some() {
                return Err(ClientError::Protocol("a refresh is already under way".into()));
            }
            p.refresh = Some(tx);
        }
        if let Err(e) = self.write(&ClientFrame::Refresh { token }).await {
            self.pending().refresh = None;
            return Err(e);
        }
        let expires_at = rx.await.unwrap_or(Err(ClientError::Closed))?;
        self.expires_at.store(expires_at, Ordering::Relaxed);
        Ok(expires_at)
    }

    async fn write(&self, frame: &ClientFrame) -> Result<(), ClientError> {
        let bytes = encode(frame, self.max_frame).map_err(|e| ClientError::Protocol(e.to_string()))?;
        let mut control = self.control.lock().await;
        if let Err(e) = control.write_chunk(bytes).await {
            drop(control);
            return Err(self
                .pending()
                .fatal
                .clone()
                .unwrap_or(ClientError::Connection(e.to_string())));
        }
        Ok(())
    }
}

/// A connection to an edge.
#[derive(Clone)]
pub struct Client {
    conn: Connection,
    inner: Arc<Inner>,
    session: Session,
    limits: Limits,
    next_id: Arc<AtomicU64>,
    /// Closes the connection when the last clone of this client is dropped
    /// (the reader tasks hold the connection too, so it would stay open).
    _close: Arc<CloseOnDrop>,
    endpoint: quinn::Endpoint,
}

struct CloseOnDrop(Connection);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close(0, b"client dropped");
    }
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("remote", &self.conn.remote_address())
            .field("session", &self.session)
            .finish()
    }
}

/// A joined room: what the edge said on join, then its batches.
#[derive(Debug)]
pub struct RoomStream {
    pub room: String,
    /// Members online when we joined, us included.
    pub online: u64,
    /// Recent messages (after `resume_from`, if given).
    pub recent: Vec<Message>,
    /// The room's numbering: sequence numbers compare only within one.
    pub epoch: u64,
    /// What became of the join's resume.
    pub resumed: Resumed,
    rx: mpsc::Receiver<Result<Batch, ClientError>>,
}

impl RoomStream {
    /// The next batch; `None` once the edge finished the room's stream
    /// (after a leave, or when the connection ended cleanly).
    pub async fn next_batch(&mut self) -> Option<Result<Batch, ClientError>> {
        self.rx.recv().await
    }
}

/// A message on its way; await [`PendingAck::ack`] for the edge's answer.
#[derive(Debug)]
pub struct PendingAck {
    pub client_msg_id: u64,
    rx: oneshot::Receiver<Result<Ack, ClientError>>,
}

impl PendingAck {
    pub async fn ack(self) -> Result<Ack, ClientError> {
        self.rx.await.unwrap_or(Err(ClientError::Closed))
    }
}

/// A WebTransport handshake that did not open a session: the edge's HTTP
/// status (404 for a wrong path, 403 for an origin it does not allow) or
/// the network's error.
fn webtransport_refused(e: web_transport_quinn::ClientError) -> ClientError {
    match e {
        web_transport_quinn::ClientError::Connection(e) => ClientError::from_connection(&e),
        web_transport_quinn::ClientError::HttpError(web_transport_quinn::ConnectError::ErrorStatus(status)) => {
            ClientError::Connect(format!("the edge refused the WebTransport session: HTTP {status}"))
        }
        other => ClientError::Connect(format!("WebTransport handshake failed: {other}")),
    }
}

/// Resolves `host:port`; returns the address and the host part for TLS.
async fn resolve(server: &str) -> Result<(SocketAddr, String), ClientError> {
    let bad = || ClientError::Address(server.to_owned());
    let (host, _port) = server.rsplit_once(':').ok_or_else(bad)?;
    let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
    let addr = tokio::net::lookup_host(server)
        .await
        .map_err(|e| ClientError::Address(format!("{server}: {e}")))?
        .next()
        .ok_or_else(bad)?;
    Ok((addr, host))
}

impl Client {
    /// Connects on a fresh UDP socket, to `server` or, if it cannot be
    /// reached, to each `fallback` edge in turn.
    pub async fn connect(opts: ConnectOptions) -> Result<Client, ClientError> {
        let mut last = None;
        for edge in opts.edges() {
            match Self::connect_one(opts.for_edge(&edge)).await {
                Ok(c) => return Ok(c),
                Err(e) if resume::recoverable(&e) && !opts.fallback.is_empty() => {
                    tracing::debug!(%edge, error = %e, "edge unreachable; trying the next");
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or(ClientError::Closed))
    }

    async fn connect_one(opts: ConnectOptions) -> Result<Client, ClientError> {
        let (addr, _) = resolve(&opts.server).await?;
        let bind: SocketAddr = if addr.is_ipv6() {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        };
        let endpoint = quinn::Endpoint::client(bind).map_err(|e| ClientError::Connect(e.to_string()))?;
        Self::connect_with(endpoint, opts).await
    }

    /// Connects through an existing endpoint (many clients can share one socket).
    pub async fn connect_with(endpoint: quinn::Endpoint, opts: ConnectOptions) -> Result<Client, ClientError> {
        let (addr, host) = resolve(&opts.server).await?;
        let config = tls::client_config(
            &opts.roots,
            opts.webtransport.as_ref().map(|w| w.cert_hashes.as_slice()),
            opts.keep_alive,
            opts.idle_timeout,
        )?;
        let server_name = opts.server_name.clone().unwrap_or(host);
        let connecting = endpoint
            .connect_with(config, addr, &server_name)
            .map_err(|e| ClientError::Connect(e.to_string()))?;
        let handshake = async {
            let quic = connecting.await.map_err(|e| ClientError::from_connection(&e))?;
            let conn = match &opts.webtransport {
                None => Connection::raw(quic),
                Some(w) => {
                    let url = format!("https://{}{}", opts.server, w.path);
                    let url = web_transport_quinn::proto::ConnectRequest::new(
                        url.parse::<url::Url>()
                            .map_err(|e| ClientError::Address(format!("{url}: {e}")))?,
                    );
                    let request = match &w.origin {
                        Some(origin) => url.with_header(
                            web_transport_quinn::http::header::ORIGIN,
                            origin
                                .parse()
                                .map_err(|_| ClientError::Address(format!("bad origin `{origin}`")))?,
                        ),
                        None => url,
                    };
                    Connection::connect(quic, request).await.map_err(webtransport_refused)?
                }
            };
            let (mut send, mut recv) = conn.open_bi().await.map_err(|e| ClientError::from_session(&e))?;
            let hello = encode(
                &ClientFrame::Hello {
                    token: opts.token.clone(),
                },
                throng_wire::HARD_MAX_FRAME,
            )
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
            send.write_chunk(hello)
                .await
                .map_err(|e| ClientError::Connection(e.to_string()))?;
            let mut buf = FrameBuffer::<EdgeFrame>::new(throng_wire::DEFAULT_MAX_FRAME);
            match read_frame(&mut recv, &mut buf, &conn).await? {
                Some(EdgeFrame::Welcome {
                    session,
                    limits,
                    expires_at,
                }) => Ok((conn, send, recv, buf, session, limits, expires_at)),
                Some(EdgeFrame::Error { code, text }) => Err(ClientError::Edge {
                    code: ErrorCode::from_code(code),
                    raw: code,
                    text,
                }),
                Some(other) => Err(ClientError::Protocol(format!("expected Welcome, got {other:?}"))),
                None => Err(conn
                    .close_reason()
                    .map(|e| ClientError::from_session(&e))
                    .unwrap_or(ClientError::Protocol("control stream ended before Welcome".into()))),
            }
        };
        let (conn, send, recv, buf, session, limits, expires_at) =
            tokio::time::timeout(opts.handshake_timeout, handshake)
                .await
                .map_err(|_| ClientError::Timeout("the edge's Welcome"))??;

        let inner = Arc::new(Inner {
            pending: Mutex::new(Pending::default()),
            control: tokio::sync::Mutex::new(send),
            max_frame: limits.max_frame_bytes,
            expires_at: AtomicU64::new(expires_at),
        });
        tokio::spawn(read_control(recv, buf, Arc::clone(&inner), conn.clone()));
        if let Some(source) = opts.refresh.clone() {
            tokio::spawn(keep_fresh(Arc::clone(&inner), conn.clone(), source));
        }
        tokio::spawn(accept_rooms(conn.clone(), Arc::clone(&inner), limits.max_frame_bytes));
        Ok(Client {
            _close: Arc::new(CloseOnDrop(conn.clone())),
            conn,
            inner,
            session,
            limits,
            next_id: Arc::new(AtomicU64::new(1)),
            endpoint,
        })
    }

    /// The edge this client is connected to.
    pub fn remote_address(&self) -> SocketAddr {
        self.conn.remote_address()
    }

    /// When the session's token expires (seconds since the Unix epoch);
    /// the edge ends the session then unless it is refreshed.
    pub fn expires_at(&self) -> u64 {
        self.inner.expires_at.load(Ordering::Relaxed)
    }

    /// Sends a later token for the same user; returns its expiry. A refused
    /// token changes nothing (the error says why).
    pub async fn refresh(&self, token: impl Into<String>) -> Result<u64, ClientError> {
        self.inner.refresh(token.into()).await
    }

    /// Who the edge believes we are.
    pub fn session(&self) -> &Session {
        &self.session
    }

    /// The limits the edge enforces on us.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Joins a room and waits for its stream.
    pub async fn join(&self, room: &str) -> Result<RoomStream, ClientError> {
        self.join_from(room, None).await
    }

    /// Joins a room, asking for what the edge still has after `resume_from`
    /// (a number of the room's current numbering).
    pub async fn join_from(&self, room: &str, resume_from: Option<u64>) -> Result<RoomStream, ClientError> {
        self.resume(room, resume_from, 0).await
    }

    /// Joins a room, asking for what the edge still has after `resume_from`
    /// of numbering `epoch` (a `Joined`'s or a `Batch`'s; 0 if unknown).
    /// [`RoomStream::resumed`] says what became of it: a new numbering, or
    /// a hole the edge could not count, is said, never silent.
    pub async fn resume(&self, room: &str, resume_from: Option<u64>, epoch: u64) -> Result<RoomStream, ClientError> {
        let (tx, rx) = oneshot::channel();
        {
            let mut p = self.inner.pending();
            if let Some(e) = &p.fatal {
                return Err(e.clone());
            }
            if p.joins.contains_key(room) {
                return Err(ClientError::Protocol(format!(
                    "a join of `{room}` is already under way"
                )));
            }
            p.joins.insert(room.to_owned(), tx);
        }
        let frame = ClientFrame::Join {
            room: room.to_owned(),
            resume_from,
            epoch,
        };
        if let Err(e) = self.inner.write(&frame).await {
            self.inner.pending().joins.remove(room);
            return Err(e);
        }
        rx.await.unwrap_or(Err(ClientError::Closed))
    }

    /// Leaves a room; its [`RoomStream`] ends once the edge finishes it.
    /// Tells the edge this client has processed `room` up to `seq`. In a
    /// group room the edge keeps it as this user's cursor: joining later
    /// without `resume_from` (from any device) resumes after it. Call it
    /// after processing, and nothing is lost or delivered twice.
    pub async fn seen(&self, room: &str, seq: u64) -> Result<(), ClientError> {
        self.inner
            .write(&ClientFrame::Seen {
                room: room.to_owned(),
                seq,
            })
            .await
    }

    pub async fn leave(&self, room: &str) -> Result<(), ClientError> {
        self.inner.write(&ClientFrame::Leave { room: room.to_owned() }).await
    }

    /// Sends a message without waiting for the edge's answer.
    pub async fn submit(&self, room: &str, kind: Kind, body: impl Into<Vec<u8>>) -> Result<PendingAck, ClientError> {
        let client_msg_id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut p = self.inner.pending();
            if let Some(e) = &p.fatal {
                return Err(e.clone());
            }
            p.acks.insert(client_msg_id, tx);
        }
        let frame = ClientFrame::Send {
            room: room.to_owned(),
            kind,
            body: body.into(),
            client_msg_id,
        };
        if let Err(e) = self.inner.write(&frame).await {
            self.inner.pending().acks.remove(&client_msg_id);
            return Err(e);
        }
        Ok(PendingAck { client_msg_id, rx })
    }

    /// Sends a message and waits for its ack (or rejection, as an error).
    pub async fn send(&self, room: &str, kind: Kind, body: impl Into<Vec<u8>>) -> Result<Ack, ClientError> {
        self.submit(room, kind, body).await?.ack().await
    }

    /// Round-trip time of a Ping.
    pub async fn ping(&self) -> Result<Duration, ClientError> {
        let nonce = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.inner.pending().pings.insert(nonce, tx);
        let start = Instant::now();
        self.inner.write(&ClientFrame::Ping { nonce }).await?;
        match rx.await {
            Ok(()) => Ok(start.elapsed()),
            Err(_) => Err(self.inner.pending().fatal.clone().unwrap_or(ClientError::Closed)),
        }
    }

    /// Which of `users` (of our tenant) are online on the edge: one request
    /// per frame's worth of names (up to 10,000), however many are asked about.
    pub async fn online(&self, users: &[String]) -> Result<Vec<bool>, ClientError> {
        let mut answer = Vec::with_capacity(users.len());
        // Split by count (the edge's limit) and by encoded size (the frame limit).
        let budget = (self.limits.max_frame_bytes as usize).saturating_sub(256);
        let mut chunks: Vec<&[String]> = Vec::new();
        let (mut start, mut size) = (0, 0);
        for (i, u) in users.iter().enumerate() {
            let u_size = u.len() + 3;
            if i > start && (i - start == PRESENCE_CHUNK || size + u_size > budget) {
                chunks.push(&users[start..i]);
                start = i;
                size = 0;
            }
            size += u_size;
        }
        if start < users.len() {
            chunks.push(&users[start..]);
        }
        for chunk in chunks {
            let query_id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let (tx, rx) = oneshot::channel();
            {
                let mut p = self.inner.pending();
                if let Some(e) = &p.fatal {
                    return Err(e.clone());
                }
                p.presence.insert(query_id, tx);
            }
            let frame = ClientFrame::Presence {
                query_id,
                users: chunk.to_vec(),
            };
            if let Err(e) = self.inner.write(&frame).await {
                self.inner.pending().presence.remove(&query_id);
                return Err(e);
            }
            let online = rx.await.unwrap_or(Err(ClientError::Closed))?;
            if online.len() != chunk.len() {
                return Err(ClientError::Protocol(format!(
                    "presence answer has {} entries for {} users",
                    online.len(),
                    chunk.len()
                )));
            }
            answer.extend(online);
        }
        Ok(answer)
    }

    /// Resolves when the connection ends, with the reason.
    pub async fn closed(&self) -> ClientError {
        let e = self.conn.closed().await;
        self.inner
            .pending()
            .fatal
            .clone()
            .unwrap_or(ClientError::from_session(&e))
    }

    /// Closes the connection.
    pub fn close(&self) {
        self.conn.close(0, b"client closed");
    }

    /// Closes the connection and waits (at most `limit`) until the close has
    /// gone out, so the edge drops this session now rather than after its
    /// idle timeout. A process about to exit wants this: [`Client::close`]
    /// only queues the close, and the packet dies with the runtime. Returns
    /// whether the close finished in time. With an endpoint shared through
    /// [`Client::connect_with`] it also waits for that endpoint's other
    /// connections.
    pub async fn close_and_wait(&self, limit: Duration) -> bool {
        self.close();
        tokio::time::timeout(limit, self.endpoint.wait_idle()).await.is_ok()
    }
}

/// Reads one frame, or `None` at the end of the stream.
async fn read_frame(
    recv: &mut RecvStream,
    buf: &mut FrameBuffer<EdgeFrame>,
    conn: &Connection,
) -> Result<Option<EdgeFrame>, ClientError> {
    loop {
        if let Some(f) = buf.next_frame().map_err(|e| ClientError::Protocol(e.to_string()))? {
            return Ok(Some(f));
        }
        match recv.read_chunk(64 * 1024, true).await {
            Ok(Some(chunk)) => buf.extend(&chunk.bytes),
            Ok(None) => {
                buf.finish().map_err(|e| ClientError::Protocol(e.to_string()))?;
                return Ok(None);
            }
            Err(web_transport_quinn::ReadError::SessionError(e)) => return Err(ClientError::from_session(&e)),
            Err(e) => {
                return Err(conn
                    .close_reason()
                    .map(|c| ClientError::from_session(&c))
                    .unwrap_or(ClientError::Connection(e.to_string())));
            }
        }
    }
}

async fn read_control(mut recv: RecvStream, mut buf: FrameBuffer<EdgeFrame>, inner: Arc<Inner>, conn: Connection) {
    loop {
        let frame = match read_frame(&mut recv, &mut buf, &conn).await {
            Ok(Some(f)) => f,
            Ok(None) => {
                let e = conn.closed().await;
                inner.fail(ClientError::from_session(&e));
                return;
            }
            Err(e) => {
                inner.fail(e);
                return;
            }
        };
        match frame {
            EdgeFrame::Ack {
                client_msg_id,
                seq,
                epoch,
            } => {
                if let Some(tx) = inner.pending().acks.remove(&client_msg_id) {
                    let _ = tx.send(Ok(Ack {
                        client_msg_id,
                        seq,
                        epoch,
                    }));
                }
            }
            EdgeFrame::Rejected {
                client_msg_id,
                code,
                reason,
            } => {
                if let Some(tx) = inner.pending().acks.remove(&client_msg_id) {
                    let _ = tx.send(Err(ClientError::Rejected {
                        client_msg_id,
                        code: ErrorCode::from_code(code),
                        raw: code,
                        reason,
                    }));
                }
            }
            EdgeFrame::JoinRefused { room, code, text } => {
                if let Some(tx) = inner.pending().joins.remove(&room) {
                    let _ = tx.send(Err(ClientError::JoinRefused {
                        room,
                        code: ErrorCode::from_code(code),
                        raw: code,
                        text,
                    }));
                }
            }
            EdgeFrame::Presence { query_id, online } => {
                if let Some(tx) = inner.pending().presence.remove(&query_id) {
                    let _ = tx.send(Ok(online));
                }
            }
            EdgeFrame::PresenceRefused { query_id, code, text } => {
                if let Some(tx) = inner.pending().presence.remove(&query_id) {
                    let _ = tx.send(Err(ClientError::Edge {
                        code: ErrorCode::from_code(code),
                        raw: code,
                        text,
                    }));
                }
            }
            EdgeFrame::Pong { nonce } => {
                if let Some(tx) = inner.pending().pings.remove(&nonce) {
                    let _ = tx.send(());
                }
            }
            EdgeFrame::Refreshed { expires_at } => {
                if let Some(tx) = inner.pending().refresh.take() {
                    let _ = tx.send(Ok(expires_at));
                }
            }
            EdgeFrame::RefreshRefused { code, text } => {
                if let Some(tx) = inner.pending().refresh.take() {
                    let _ = tx.send(Err(ClientError::Edge {
                        code: ErrorCode::from_code(code),
                        raw: code,
                        text,
                    }));
                }
            }
            EdgeFrame::Error { code, text } => {
                let err = ClientError::Edge {
                    code: ErrorCode::from_code(code),
                    raw: code,
                    text,
                };
                if err.code().is_none_or(ErrorCode::is_fatal) {
                    inner.fail(err);
                    return;
                }
                tracing::warn!(error = %err, "edge reported an error");
            }
            other => {
                inner.fail(ClientError::Protocol(format!(
                    "unexpected frame on the control stream: {other:?}"
                )));
                conn.close(u32::from(ErrorCode::UnexpectedFrame.code()), b"unexpected frame");
                return;
            }
        }
    }
}

/// Seconds since the Unix epoch.
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Refreshes the session's token through `source` before each expiry,
/// until the connection ends.
async fn keep_fresh(inner: Arc<Inner>, conn: Connection, source: TokenSource) {
    let mut retry_at: Option<u64> = None;
    loop {
        let expires_at = inner.expires_at.load(Ordering::Relaxed);
        let now = unix_now();
        let left = expires_at.saturating_sub(now);
        let margin = (left / 5).clamp(2, 60);
        let due = retry_at.unwrap_or(expires_at.saturating_sub(margin)).max(now);
        let wait = Duration::from_secs(due - now);
        tokio::select! {
            _ = conn.closed() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        if inner.pending().fatal.is_some() {
            return;
        }
        let outcome = match (source.0)().await {
            Ok(token) => inner.refresh(token).await,
            Err(e) => Err(ClientError::Protocol(format!("the token source failed: {e}"))),
        };
        match outcome {
            Ok(_) => retry_at = None,
            Err(e) => {
                tracing::warn!(error = %e, "token refresh failed; retrying");
                retry_at = Some(unix_now() + 1);
                if unix_now() > expires_at {
                    return; // the edge ends the session; nothing to keep fresh
                }
            }
        }
    }
}

async fn accept_rooms(conn: Connection, inner: Arc<Inner>, max_frame: u32) {
    while let Ok(recv) = conn.accept_uni().await {
        tokio::spawn(read_room(recv, Arc::clone(&inner), conn.clone(), max_frame));
    }
}

async fn read_room(mut recv: RecvStream, inner: Arc<Inner>, conn: Connection, max_frame: u32) {
    let mut buf = FrameBuffer::new(max_frame);
    let (room, online, recent, epoch, resumed) = match read_frame(&mut recv, &mut buf, &conn).await {
        Ok(Some(EdgeFrame::Joined {
            room,
            online,
            recent,
            epoch,
            resumed,
        })) => (room, online, recent, epoch, resumed),
        other => {
            tracing::warn!(frame = ?other, "room stream did not start with Joined");
            return;
        }
    };
    let (tx, rx) = mpsc::channel(ROOM_BUFFER);
    let Some(waiter) = inner.pending().joins.remove(&room) else {
        tracing::warn!(%room, "room stream for a join we did not ask for");
        return;
    };
    let stream = RoomStream {
        room: room.clone(),
        online,
        recent,
        epoch,
        resumed,
        rx,
    };
    if waiter.send(Ok(stream)).is_err() {
        return;
    }
    loop {
        match read_frame(&mut recv, &mut buf, &conn).await {
            Ok(Some(EdgeFrame::Batch(batch))) => {
                if tx.send(Ok(batch)).await.is_err() {
                    return; // the RoomStream was dropped
                }
            }
            Ok(Some(other)) => {
                let _ = tx
                    .send(Err(ClientError::Protocol(format!(
                        "unexpected frame on room `{room}`: {other:?}"
                    ))))
                    .await;
                return;
            }
            Ok(None) => return,
            Err(e) => {
                let _ = tx.send(Err(e)).await;
                return;
            }
        }
    }
}
