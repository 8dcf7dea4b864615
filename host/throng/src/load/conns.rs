//! The connections of a load run: viewers, senders, churners (through the
//! Throng client) and bare-quinn viewers, sharing a few UDP endpoints.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use throng_client::{Client, ClientError, ConnectOptions, PendingAck};
use throng_wire::{Batch, EdgeFrame, Kind};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::stats::{self, PerViewer, Stats};

/// Kernel buffers of each client UDP socket: thousands of connections
/// handshaking at once overflow the default ~200 KiB and lose packets.
const UDP_BUFFER: usize = 4 << 20;
/// How long a join (or the bare server's first stream) may take.
const JOIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How often senders and churners check what is due.
const PACE: Duration = Duration::from_millis(5);
/// How long a sender waits for its outstanding acks once the run stops.
const ACK_DRAIN: Duration = Duration::from_secs(3);
/// Gift names used, few as in a real room, so counters stay small.
const GIFTS: [&str; 3] = ["rose", "heart", "star"];

/// What every connection task of a run shares.
#[derive(Debug)]
pub struct Ctx {
    pub stats: Arc<Stats>,
    /// Cancelled when the run ends: every task closes its connection.
    pub stop: CancellationToken,
    /// Turns true when traffic (senders, churn) may start.
    pub go: watch::Receiver<bool>,
    /// Handshakes in flight.
    pub handshakes: Arc<Semaphore>,
    pub origin: Instant,
}

/// A UDP endpoint for client connections, with large socket buffers.
pub fn client_endpoint(server: SocketAddr) -> Result<quinn::Endpoint> {
    use socket2::{Domain, Protocol, Socket, Type};
    // Bind where the server is reachable from: loopback for loopback.
    let ip: IpAddr = match server.ip() {
        IpAddr::V4(v4) if v4.is_loopback() => Ipv4Addr::LOCALHOST.into(),
        IpAddr::V6(v6) if v6.is_loopback() => Ipv6Addr::LOCALHOST.into(),
        IpAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        IpAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    };
    let bind = SocketAddr::new(ip, 0);
    let socket =
        Socket::new(Domain::for_address(bind), Type::DGRAM, Some(Protocol::UDP)).context("cannot make a UDP socket")?;
    // The kernel may clamp these (net.core.rmem_max); that only costs packets.
    let _ = socket.set_recv_buffer_size(UDP_BUFFER);
    let _ = socket.set_send_buffer_size(UDP_BUFFER);
    socket
        .bind(&bind.into())
        .with_context(|| format!("cannot bind UDP {bind}"))?;
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        socket.into(),
        Arc::new(quinn::TokioRuntime),
    )
    .context("cannot make a QUIC endpoint")
}

/// The message kinds senders send, with weights (`chat=90,like=8,...`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mix(Vec<(Kind, u32)>);

impl std::str::FromStr for Mix {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (kind, weight) = part
                .split_once('=')
                .ok_or_else(|| format!("`{part}`: expected kind=weight, e.g. chat=90"))?;
            let kind: Kind = kind.trim().parse()?;
            let weight: u32 = weight
                .trim()
                .parse()
                .map_err(|_| format!("`{part}`: the weight must be a whole number"))?;
            if parts.iter().any(|(k, _)| *k == kind) {
                return Err(format!("kind `{}` appears twice", kind.as_str()));
            }
            if weight > 0 {
                parts.push((kind, weight));
            }
        }
        if parts.is_empty() {
            return Err("the mix needs at least one kind with a weight above 0".into());
        }
        if parts.iter().map(|(_, w)| u64::from(*w)).sum::<u64>() > u64::from(u32::MAX) {
            return Err("the weights add up to more than 4294967295".into());
        }
        Ok(Mix(parts))
    }
}

impl std::fmt::Display for Mix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self.0.iter().map(|(k, w)| format!("{}={w}", k.as_str())).collect();
        f.write_str(&parts.join(","))
    }
}

impl Mix {
    pub fn has(&self, kind: Kind) -> bool {
        self.0.iter().any(|(k, _)| *k == kind)
    }

    /// The fraction of messages of this kind.
    pub fn share(&self, kind: Kind) -> f64 {
        let total: u64 = self.0.iter().map(|(_, w)| u64::from(*w)).sum();
        let of: u64 = self
            .0
            .iter()
            .filter(|(k, _)| *k == kind)
            .map(|(_, w)| u64::from(*w))
            .sum();
        of as f64 / total.max(1) as f64
    }

    fn pick(&self, r: u64) -> Kind {
        let total: u64 = self.0.iter().map(|(_, w)| u64::from(*w)).sum();
        let mut x = r % total.max(1);
        for (kind, w) in &self.0 {
            if x < u64::from(*w) {
                return *kind;
            }
            x -= u64::from(*w);
        }
        Kind::Chat
    }
}

/// xorshift64*: enough to spread kinds; a seeded generator keeps runs repeatable.
#[derive(Debug)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// Counts a connection task as settled (connected and joined, or failed)
/// exactly once, whichever way the task leaves setup.
struct Settle<'a>(&'a Stats, bool);

impl Settle<'_> {
    fn done(&mut self) {
        if !self.1 {
            self.1 = true;
            Stats::add(&self.0.settled, 1);
        }
    }
}

impl Drop for Settle<'_> {
    fn drop(&mut self) {
        self.done();
    }
}

async fn connect(ctx: &Ctx, endpoint: quinn::Endpoint, opts: ConnectOptions) -> Option<Client> {
    let permit = ctx.handshakes.acquire().await.ok()?;
    let result = tokio::select! {
        _ = ctx.stop.cancelled() => return None,
        r = Client::connect_with(endpoint, opts) => r,
    };
    drop(permit);
    handshake_done(ctx, result.map_err(|e| e.to_string()))
}

fn handshake_done<T>(ctx: &Ctx, result: Result<T, String>) -> Option<T> {
    let s = &ctx.stats;
    match result {
        Ok(c) => {
            Stats::add(&s.connected, 1);
            let at = u64::try_from(ctx.origin.elapsed().as_nanos()).unwrap_or(u64::MAX);
            s.last_connect_ns.fetch_max(at, Ordering::Relaxed);
            Some(c)
        }
        Err(e) => {
            Stats::add(&s.failed, 1);
            s.error(format!("connect: {e}"));
            None
        }
    }
}

async fn join(ctx: &Ctx, client: &Client, room: &str) -> Option<throng_client::RoomStream> {
    let s = &ctx.stats;
    let result = tokio::select! {
        _ = ctx.stop.cancelled() => return None,
        r = tokio::time::timeout(JOIN_TIMEOUT, client.join(room)) => r,
    };
    match result {
        Ok(Ok(stream)) => Some(stream),
        Ok(Err(e)) => {
            Stats::add(&s.join_failed, 1);
            s.error(format!("join `{room}`: {e}"));
            None
        }
        Err(_) => {
            Stats::add(&s.join_failed, 1);
            s.error(format!("join `{room}`: no answer in {JOIN_TIMEOUT:?}"));
            None
        }
    }
}

/// Waits until traffic may start; false if the run stopped first.
async fn wait_go(ctx: &Ctx) -> bool {
    let mut go = ctx.go.clone();
    tokio::select! {
        _ = ctx.stop.cancelled() => false,
        r = go.wait_for(|started| *started) => r.is_ok(),
    }
}

/// What one viewer is.
#[derive(Debug)]
pub struct Viewer {
    pub opts: ConnectOptions,
    pub room: String,
    /// Picks the latency shard.
    pub index: usize,
    /// Re-encode each batch to learn the edge's frame size (one viewer per room).
    pub sample_frames: bool,
    pub counter: Arc<PerViewer>,
}

/// A viewer: connects, joins one room, and counts what arrives until the run stops.
pub async fn viewer(ctx: Arc<Ctx>, endpoint: quinn::Endpoint, v: Viewer) {
    let mut settle = Settle(&ctx.stats, false);
    let Some(client) = connect(&ctx, endpoint, v.opts.clone()).await else {
        return;
    };
    let Some(mut stream) = join(&ctx, &client, &v.room).await else {
        client.close();
        return;
    };
    let s = &ctx.stats;
    Stats::add(&s.viewers_ready, 1);
    settle.done();
    loop {
        let next = tokio::select! {
            biased;
            _ = ctx.stop.cancelled() => break,
            b = stream.next_batch() => b,
        };
        match next {
            Some(Ok(batch)) => on_batch(s, &v, batch, stats::now_ns()),
            Some(Err(e)) => {
                Stats::add(&s.stream_errors, 1);
                s.error(format!("room `{}`: {e}", v.room));
                break;
            }
            None => {
                if !ctx.stop.is_cancelled() {
                    Stats::add(&s.stream_errors, 1);
                    s.error(format!("the edge ended room `{}`", v.room));
                }
                break;
            }
        }
    }
    client.close();
}

fn on_batch(s: &Stats, v: &Viewer, batch: Batch, now_ns: u64) {
    let n = batch.messages.len() as u64;
    Stats::add(&s.frames_total, 1);
    Stats::add(&s.messages_total, n);
    if !s.measuring() {
        return;
    }
    Stats::add(&s.frames, 1);
    Stats::add(&s.messages, n);
    Stats::add(&s.missed, batch.missed);
    v.counter.received.fetch_add(n, Ordering::Relaxed);
    if n > 0 {
        s.record_latencies(v.index, now_ns, batch.messages.iter().map(|m| stats::stamp(&m.body)));
    }
    if v.sample_frames {
        // The client hands us decoded batches; postcard is deterministic, so
        // encoding again gives the size of the frame that arrived.
        if let Ok(bytes) = throng_wire::encode(&EdgeFrame::Batch(batch), throng_wire::HARD_MAX_FRAME) {
            Stats::add(&s.sampled_frame_bytes, bytes.len() as u64);
            Stats::add(&s.sampled_frames, 1);
        }
    }
}

/// What one sender does.
#[derive(Debug)]
pub struct Sender {
    pub opts: ConnectOptions,
    pub rooms: Vec<String>,
    /// Messages per second from this sender.
    pub rate: f64,
    pub mix: Arc<Mix>,
    pub body_bytes: usize,
    pub seed: u64,
}

/// A sender: joins its rooms, then sends at its rate from `go` until stop,
/// and counts the edge's answers to what it sent in the window.
pub async fn sender(ctx: Arc<Ctx>, endpoint: quinn::Endpoint, p: Sender) {
    let mut settle = Settle(&ctx.stats, false);
    let s = &ctx.stats;
    let Some(client) = connect(&ctx, endpoint, p.opts.clone()).await else {
        return;
    };
    let max_body = client.limits().max_body_bytes as usize;
    if p.body_bytes > max_body {
        Stats::add(&s.join_failed, 1);
        s.error(format!(
            "--body-bytes {} is over the edge's max_body_bytes {max_body}",
            p.body_bytes
        ));
        client.close();
        return;
    }
    // Senders are members too; their batches are read and thrown away so the
    // edge never sees them as slow viewers.
    let mut drains = tokio::task::JoinSet::new();
    for room in &p.rooms {
        let Some(mut stream) = join(&ctx, &client, room).await else {
            client.close();
            return;
        };
        let stop = ctx.stop.clone();
        drains.spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    b = stream.next_batch() => if !matches!(b, Some(Ok(_))) { return },
                }
            }
        });
    }
    settle.done();
    if !wait_go(&ctx).await {
        client.close();
        return;
    }
    let (acks, pending) = mpsc::unbounded_channel();
    let collector = tokio::spawn(collect_acks(Arc::clone(&ctx.stats), pending));
    let mut rng = Rng(p.seed | 1);
    let mut ticker = tokio::time::interval(PACE);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let start = Instant::now();
    let mut sent = 0u64;
    // Falling further behind than a second of sends is not caught up in a
    // burst: those sends are skipped and counted.
    let max_behind = p.rate.ceil().max(1.0) as u64;
    'run: loop {
        tokio::select! {
            biased;
            _ = ctx.stop.cancelled() => break,
            _ = ticker.tick() => {}
        }
        let due = (start.elapsed().as_secs_f64() * p.rate) as u64;
        if due.saturating_sub(sent) > max_behind {
            let skip = due - sent - max_behind;
            if s.measuring() {
                Stats::add(&s.send_skipped, skip);
            }
            sent += skip;
        }
        while sent < due {
            if ctx.stop.is_cancelled() {
                break 'run;
            }
            let kind = p.mix.pick(rng.next());
            let gift = (kind == Kind::Gift).then(|| GIFTS[(rng.next() % GIFTS.len() as u64) as usize]);
            let room = &p.rooms[(sent % p.rooms.len() as u64) as usize];
            let body = stats::body(stats::now_ns(), gift, p.body_bytes);
            let counted = s.measuring();
            match client.submit(room, kind, body).await {
                Ok(pending) => {
                    if counted {
                        Stats::add(&s.sent, 1);
                    }
                    let _ = acks.send((pending, counted));
                }
                Err(e) => {
                    // submit fails only when the connection is unusable.
                    Stats::add(&s.send_errors, 1);
                    s.error(format!("send: {e}"));
                    break 'run;
                }
            }
            sent += 1;
        }
    }
    drop(acks);
    if tokio::time::timeout(ACK_DRAIN, collector).await.is_err() {
        tracing::debug!("acks still outstanding after {ACK_DRAIN:?}");
    }
    drains.abort_all();
    client.close();
}

async fn collect_acks(s: Arc<Stats>, mut pending: mpsc::UnboundedReceiver<(PendingAck, bool)>) {
    while let Some((p, counted)) = pending.recv().await {
        let answer = p.ack().await;
        if !counted {
            continue;
        }
        match answer {
            Ok(_) => Stats::add(&s.acked, 1),
            Err(ClientError::Rejected { code, raw, .. }) => {
                Stats::add(&s.rejected, 1);
                s.rejected_with(&code.map_or_else(|| format!("code {raw}"), |c| c.to_string()));
            }
            Err(_) => Stats::add(&s.ack_lost, 1),
        }
    }
}

/// What one churning connection does.
#[derive(Debug)]
pub struct Churner {
    pub opts: ConnectOptions,
    pub rooms: Vec<String>,
    /// Joins per second (each followed by a leave).
    pub rate: f64,
    pub offset: usize,
}

/// A churner: over one open connection, joins a room, leaves it, and moves
/// on to the next room, at its rate.
pub async fn churner(ctx: Arc<Ctx>, endpoint: quinn::Endpoint, c: Churner) {
    let mut settle = Settle(&ctx.stats, false);
    let s = &ctx.stats;
    let Some(client) = connect(&ctx, endpoint, c.opts.clone()).await else {
        return;
    };
    settle.done();
    if !wait_go(&ctx).await {
        client.close();
        return;
    }
    let mut ticker = tokio::time::interval(PACE);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let start = Instant::now();
    let mut done = 0u64;
    'run: loop {
        tokio::select! {
            biased;
            _ = ctx.stop.cancelled() => break,
            _ = ticker.tick() => {}
        }
        let due = (start.elapsed().as_secs_f64() * c.rate) as u64;
        // A churner that cannot keep up does not burst; the report shows
        // the rate reached against the rate asked for.
        done = done.max(due.saturating_sub(c.rate.ceil().max(1.0) as u64));
        while done < due {
            let room = &c.rooms[(c.offset + done as usize) % c.rooms.len()];
            done += 1;
            let started = Instant::now();
            let joined = tokio::select! {
                _ = ctx.stop.cancelled() => break 'run,
                r = tokio::time::timeout(JOIN_TIMEOUT, client.join(room)) => r,
            };
            let stream = match joined {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => {
                    Stats::add(&s.churn_errors, 1);
                    s.error(format!("churn join `{room}`: {e}"));
                    if matches!(e, ClientError::JoinRefused { .. }) {
                        continue;
                    }
                    break 'run;
                }
                Err(_) => {
                    Stats::add(&s.churn_errors, 1);
                    s.error(format!("churn join `{room}`: no answer in {JOIN_TIMEOUT:?}"));
                    continue;
                }
            };
            let counted = s.measuring();
            if counted {
                Stats::add(&s.joins, 1);
                s.record_join(started.elapsed());
            }
            let left = client.leave(room).await;
            // The stream is dropped after the leave so the edge finishes it
            // rather than seeing the reader go away first.
            drop(stream);
            match left {
                Ok(()) if counted => Stats::add(&s.leaves, 1),
                Ok(()) => {}
                Err(e) => {
                    Stats::add(&s.churn_errors, 1);
                    s.error(format!("churn leave `{room}`: {e}"));
                    break 'run;
                }
            }
        }
    }
    client.close();
}

/// A bare-quinn viewer: one QUIC connection, one stream from the server,
/// frames counted by their length prefixes.
#[derive(Debug)]
pub struct BareViewer {
    pub config: quinn::ClientConfig,
    pub addr: SocketAddr,
    pub server_name: String,
    pub handshake_timeout: Duration,
    pub counter: Arc<PerViewer>,
}

pub async fn bare_viewer(ctx: Arc<Ctx>, endpoint: quinn::Endpoint, v: BareViewer) {
    let mut settle = Settle(&ctx.stats, false);
    let s = &ctx.stats;
    let Ok(permit) = ctx.handshakes.acquire().await else {
        return;
    };
    let result = match endpoint.connect_with(v.config.clone(), v.addr, &v.server_name) {
        Ok(connecting) => tokio::select! {
            _ = ctx.stop.cancelled() => return,
            r = tokio::time::timeout(v.handshake_timeout, connecting) => match r {
                Ok(Ok(conn)) => Ok(conn),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(format!("no handshake in {:?}", v.handshake_timeout)),
            },
        },
        Err(e) => Err(e.to_string()),
    };
    drop(permit);
    let Some(conn) = handshake_done(&ctx, result) else {
        return;
    };
    let accepted = tokio::select! {
        _ = ctx.stop.cancelled() => return,
        r = tokio::time::timeout(JOIN_TIMEOUT, conn.accept_uni()) => r,
    };
    let mut recv = match accepted {
        Ok(Ok(recv)) => recv,
        Ok(Err(e)) => {
            Stats::add(&s.join_failed, 1);
            s.error(format!("bare-quinn stream: {e}"));
            return;
        }
        Err(_) => {
            Stats::add(&s.join_failed, 1);
            s.error(format!("bare-quinn stream: none opened in {JOIN_TIMEOUT:?}"));
            return;
        }
    };
    Stats::add(&s.viewers_ready, 1);
    settle.done();
    let mut frames = FrameCounter::default();
    loop {
        let chunk = tokio::select! {
            biased;
            _ = ctx.stop.cancelled() => break,
            c = recv.read_chunk(64 * 1024, true) => c,
        };
        match chunk {
            Ok(Some(chunk)) => {
                let n = frames.feed(&chunk.bytes);
                Stats::add(&s.frames_total, n);
                if s.measuring() {
                    Stats::add(&s.frames, n);
                    Stats::add(&s.bytes, chunk.bytes.len() as u64);
                    v.counter.received.fetch_add(n, Ordering::Relaxed);
                }
            }
            Ok(None) | Err(_) if ctx.stop.is_cancelled() => break,
            Ok(None) => {
                Stats::add(&s.stream_errors, 1);
                s.error("the bare-quinn server finished its stream");
                break;
            }
            Err(e) => {
                Stats::add(&s.stream_errors, 1);
                s.error(format!("bare-quinn stream: {e}"));
                break;
            }
        }
    }
    conn.close(0u32.into(), b"done");
}

/// Counts length-prefixed frames in a byte stream without buffering them.
/// Empty frames (the server's stream-opening marker) are not counted.
#[derive(Debug, Default)]
struct FrameCounter {
    header: [u8; 4],
    have: usize,
    remaining: u64,
    /// Whether the current frame has a payload.
    counted: bool,
}

impl FrameCounter {
    /// Feeds bytes; returns frames completed in them.
    fn feed(&mut self, mut bytes: &[u8]) -> u64 {
        let mut done = 0;
        while !bytes.is_empty() {
            if self.have < 4 {
                let take = (4 - self.have).min(bytes.len());
                self.header[self.have..self.have + take].copy_from_slice(&bytes[..take]);
                self.have += take;
                bytes = &bytes[take..];
                if self.have < 4 {
                    break;
                }
                self.remaining = u64::from(u32::from_be_bytes(self.header));
                self.counted = self.remaining > 0;
            }
            let take = self.remaining.min(bytes.len() as u64);
            self.remaining -= take;
            bytes = &bytes[take as usize..];
            if self.remaining == 0 {
                if self.counted {
                    done += 1;
                }
                self.have = 0;
            }
        }
        done
    }
}

/// Checks that a target may be loaded: loopback unless allowed otherwise.
pub fn check_target(addr: SocketAddr, allow_remote: bool) -> Result<()> {
    if !addr.ip().is_loopback() && !allow_remote {
        bail!("{addr} is not a loopback address; load runs stay on this machine unless --allow-remote is given");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mix_parses_and_picks_by_weight() {
        let mix: Mix = "chat=90, like=8,gift=1,host=1".parse().expect("parses");
        assert_eq!(mix.to_string(), "chat=90,like=8,gift=1,host=1");
        assert!((mix.share(Kind::Like) - 0.08).abs() < 1e-9);
        assert_eq!(mix.share(Kind::System), 0.0);
        let mut rng = Rng(42);
        let mut chats = 0;
        for _ in 0..10_000 {
            if mix.pick(rng.next()) == Kind::Chat {
                chats += 1;
            }
        }
        assert!((8_700..9_300).contains(&chats), "{chats}");
        assert!("chat=0".parse::<Mix>().is_err());
        assert!("chat".parse::<Mix>().is_err());
        assert!("chat=1,chat=2".parse::<Mix>().is_err());
        assert!("shout=1".parse::<Mix>().is_err());
        assert!("chat=-1".parse::<Mix>().is_err());
    }

    #[test]
    fn frames_are_counted_across_chunk_boundaries() {
        let mut stream = Vec::new();
        stream.extend(0u32.to_be_bytes()); // the opening marker: not counted
        for len in [3u32, 0, 1000, 1] {
            stream.extend(len.to_be_bytes());
            stream.extend(std::iter::repeat_n(7u8, len as usize));
        }
        for chunk in [1, 2, 3, 5, 7, 4096] {
            let mut c = FrameCounter::default();
            let n: u64 = stream.chunks(chunk).map(|b| c.feed(b)).sum();
            assert_eq!(n, 3, "chunk size {chunk}");
        }
    }

    #[test]
    fn only_loopback_without_allow_remote() {
        let remote: SocketAddr = "192.0.2.1:4433".parse().expect("addr");
        assert!(check_target("127.0.0.1:4433".parse().expect("addr"), false).is_ok());
        assert!(check_target("[::1]:4433".parse().expect("addr"), false).is_ok());
        assert!(check_target(remote, false).is_err());
        assert!(check_target(remote, true).is_ok());
    }
}
