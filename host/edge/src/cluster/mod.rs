//! Edges that share rooms over NATS.
//!
//! Without `[cluster]` an edge has no [`Cluster`] and needs no NATS. With
//! it, the edge connects to its region's NATS server at start, announces
//! itself every `heartbeat` on [`bus::edges_subject`] (its own subject),
//! and keeps the live
//! set ([`membership`]) from what every edge announces: each edge hears the
//! same announcements, so all agree on the live set within `dead_after`,
//! and so on each room's origin ([`rendezvous`]) without asking anyone.
//!
//! `docs/architecture.md` (Cluster) says what travels on the bus and why.

pub mod bus;
pub mod links;
pub mod membership;
pub mod nats_auth;
pub mod rendezvous;
pub mod room_link;
pub mod stream_log;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::Serialize;
use thiserror::Error;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{ClusterConfig, NatsCredentials};
use bus::Announce;
use membership::{Change, Member, Members};

/// Why the edge could not join its cluster.
#[derive(Debug, Error)]
pub enum ClusterError {
    #[error("cluster.nats: `{url}` is not a NATS server address: {source}")]
    Url {
        url: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cluster credentials: cannot read {path}: {source}")]
    Creds {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot reach NATS at {urls}: {source}")]
    Connect {
        urls: String,
        #[source]
        source: async_nats::ConnectError,
    },
    #[error("cannot subscribe to {subject} on NATS: {source}")]
    Subscribe {
        subject: String,
        #[source]
        source: async_nats::SubscribeError,
    },
    #[error("cannot publish on NATS: {0}")]
    Publish(String),
    #[error("bus request unanswered: {0}")]
    Request(String),
}

/// How long the edge waits for NATS at start before it gives up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// One live edge, as this edge sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LiveEdge {
    pub edge_id: String,
    pub region: String,
    pub quic: String,
    /// The edge's run (its start, Unix ms): the epoch of the livecast
    /// rooms it originates.
    pub incarnation: u64,
}

/// The live edges, by id; every edge that has heard the same announcements
/// holds the same set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LiveSet {
    pub edges: Vec<LiveEdge>,
}

impl LiveSet {
    fn of(members: &Members) -> Self {
        Self {
            edges: members
                .live()
                .map(|m| LiveEdge {
                    edge_id: m.edge_id.clone(),
                    region: m.region.clone(),
                    quic: m.quic.clone(),
                    incarnation: m.incarnation,
                })
                .collect(),
        }
    }

    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.edges.iter().map(|e| e.edge_id.as_str())
    }

    /// The origin of a tenant's room among these edges.
    pub fn origin(&self, tenant: &str, room: &str) -> Option<&str> {
        rendezvous::origin(&rendezvous::room_key(tenant, room), self.ids())
    }

    /// The edge that sums `region`'s viewer counts: rendezvous hashing
    /// again, over the region's live edges, so all agree without asking.
    pub fn aggregator(&self, region: &str) -> Option<&str> {
        let key = format!("presence of region {region}");
        rendezvous::origin(
            &key,
            self.edges
                .iter()
                .filter(|e| e.region == region)
                .map(|e| e.edge_id.as_str()),
        )
    }

    /// The run of a live edge.
    pub fn incarnation(&self, edge_id: &str) -> Option<u64> {
        self.edges.iter().find(|e| e.edge_id == edge_id).map(|e| e.incarnation)
    }

    pub fn contains(&self, edge_id: &str) -> bool {
        self.edges.iter().any(|e| e.edge_id == edge_id)
    }
}

/// What a bus message is for; counted apart, so an operator (and a test)
/// sees how many of each an edge sends per tick and per interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BusKind {
    Announce,
    /// A room's tick, from its origin to its relays.
    Batch,
    /// Sends, from a relay to the origin.
    Forward,
    /// Acks and rejections, from the origin to a relay.
    Replies,
    /// A relay's first viewers of a room, told to its origin at once.
    Interest,
    /// An edge's viewer counts, to its region's aggregator.
    Counts,
    /// A region's viewer totals, from its aggregator to an origin.
    Regional,
    /// A cluster-wide "which users are online" and its answers.
    Who,
    /// A relay's request for what the bus lost, and the origin's answer.
    Resync,
    /// A cluster-wide disconnect of a user, and each edge's count.
    Kick,
}

impl BusKind {
    pub const ALL: [BusKind; 10] = [
        BusKind::Announce,
        BusKind::Batch,
        BusKind::Forward,
        BusKind::Replies,
        BusKind::Interest,
        BusKind::Counts,
        BusKind::Regional,
        BusKind::Who,
        BusKind::Resync,
        BusKind::Kick,
    ];

    pub fn name(self) -> &'static str {
        match self {
            BusKind::Announce => "announce",
            BusKind::Batch => "batch",
            BusKind::Forward => "forward",
            BusKind::Replies => "replies",
            BusKind::Interest => "interest",
            BusKind::Counts => "counts",
            BusKind::Regional => "regional",
            BusKind::Who => "who",
            BusKind::Resync => "resync",
            BusKind::Kick => "kick",
        }
    }
}

/// Bus traffic of this edge.
#[derive(Debug, Default)]
pub struct BusStats {
    pub messages_out: AtomicU64,
    pub bytes_out: AtomicU64,
    pub messages_in: AtomicU64,
    pub bytes_in: AtomicU64,
    /// Bus messages that did not decode (dropped).
    pub malformed: AtomicU64,
    /// Bus messages that decoded and were not taken (see
    /// [`Cluster::refused`]).
    pub refused: AtomicU64,
    /// Messages out and in, by [`BusKind`] (in `ALL`'s order).
    by_kind: [[AtomicU64; 2]; BusKind::ALL.len()],
    /// Origin: the latest region count's age when it arrived (ms).
    pub presence_lag_ms: AtomicU64,
}

impl BusStats {
    /// Messages of `kind` this edge sent and received so far.
    pub fn of(&self, kind: BusKind) -> (u64, u64) {
        let [out, inn] = &self.by_kind[kind as usize];
        (out.load(Ordering::Relaxed), inn.load(Ordering::Relaxed))
    }
}

/// This edge's membership of a cluster.
#[derive(Debug)]
pub struct Cluster {
    client: async_nats::Client,
    edge_id: String,
    region: String,
    quic: String,
    incarnation: u64,
    seq: AtomicU64,
    members: Arc<Mutex<Members>>,
    live: watch::Receiver<Arc<LiveSet>>,
    stats: Arc<BusStats>,
    /// Rooms alive here whose origin this edge is.
    originated: AtomicU64,
    /// Set by [`Cluster::leave`]: no heartbeat goes out after it (the others
    /// would take an edge still announcing after its leave for alive).
    left: std::sync::atomic::AtomicBool,
}

impl Cluster {
    /// Connects to NATS, announces this edge and starts hearing the others.
    /// The tasks it starts run on `tasks` until `shutdown`.
    pub async fn join(
        config: &ClusterConfig,
        quic: std::net::SocketAddr,
        shutdown: CancellationToken,
        tasks: &TaskTracker,
    ) -> Result<Arc<Cluster>, ClusterError> {
        let edge_id = config.edge_id.clone().unwrap_or_else(generated_edge_id);
        let mut addrs = Vec::new();
        for url in &config.nats {
            let addr = url
                .parse::<async_nats::ServerAddr>()
                .map_err(|source| ClusterError::Url {
                    url: url.clone(),
                    source,
                })?;
            addrs.push(addr);
        }
        let mut options = async_nats::ConnectOptions::new()
            .name(format!("throng edge {edge_id}"))
            .connection_timeout(CONNECT_TIMEOUT)
            .subscription_capacity(config.subscription_capacity)
            .event_callback(|event| async move { on_event(&event) });
        match &config.credentials {
            None => {}
            Some(NatsCredentials::UserPassword { user, password }) => {
                options = options.user_and_password(user.clone(), password.clone());
            }
            Some(NatsCredentials::NkeySeedFile(path)) => {
                let seed = std::fs::read_to_string(path).map_err(|source| ClusterError::Creds {
                    path: path.display().to_string(),
                    source,
                })?;
                let seed = seed.trim().to_owned();
                if nkeys::KeyPair::from_seed(&seed).is_err() {
                    return Err(ClusterError::Creds {
                        path: path.display().to_string(),
                        source: std::io::Error::new(std::io::ErrorKind::InvalidData, "not an nkey seed (SU...)"),
                    });
                }
                options = options.nkey(seed);
            }
            Some(NatsCredentials::CredsFile(path)) => {
                options = options
                    .credentials_file(path)
                    .await
                    .map_err(|source| ClusterError::Creds {
                        path: path.display().to_string(),
                        source,
                    })?;
            }
        }
        let urls = config.nats.join(", ");
        let client = options
            .connect(addrs)
            .await
            .map_err(|source| ClusterError::Connect { urls, source })?;
        if config.credentials.is_none() {
            tracing::warn!(
                "cluster.user / cluster.creds_file not set: anyone who can reach the NATS server can speak as an \
                 edge (see `throng nats-auth` for per-edge users that may only speak as themselves)"
            );
        }
        let subject = bus::all_edges_subject();
        let announcements = client
            .subscribe(subject.clone())
            .await
            .map_err(|source| ClusterError::Subscribe { subject, source })?;

        let incarnation = crate::unix_now_ms();
        let me = Member {
            edge_id: edge_id.clone(),
            region: config.region.clone(),
            quic: quic.to_string(),
            incarnation,
            last_seen: Instant::now(),
        };
        let members = Members::new(me, config.dead_after);
        let (live_tx, live) = watch::channel(Arc::new(LiveSet::of(&members)));
        let cluster = Arc::new(Cluster {
            client,
            edge_id,
            region: config.region.clone(),
            quic: quic.to_string(),
            incarnation,
            seq: AtomicU64::new(0),
            members: Arc::new(Mutex::new(members)),
            live,
            stats: Arc::default(),
            originated: AtomicU64::new(0),
            left: std::sync::atomic::AtomicBool::new(false),
        });
        cluster.announce(false).await?;
        // Flushed before the edge says it is ready, so the others hear of
        // it within one round trip, not one heartbeat.
        cluster
            .client
            .flush()
            .await
            .map_err(|e| ClusterError::Publish(e.to_string()))?;
        tracing::info!(
            edge_id = %cluster.edge_id,
            region = %cluster.region,
            nats = %config.nats.join(", "),
            "joined the cluster"
        );
        metrics::gauge!("throng_cluster_live_edges").set(1.0);
        tasks.spawn(heartbeats(Arc::clone(&cluster), config.heartbeat, shutdown.clone()));
        tasks.spawn(hear(
            Arc::clone(&cluster),
            announcements,
            live_tx,
            config.heartbeat,
            shutdown,
        ));
        Ok(cluster)
    }

    /// The NATS connection, for JetStream.
    pub(crate) fn client(&self) -> async_nats::Client {
        self.client.clone()
    }

    pub fn edge_id(&self) -> &str {
        &self.edge_id
    }

    pub fn region(&self) -> &str {
        &self.region
    }

    /// The live edges now.
    pub fn live(&self) -> Arc<LiveSet> {
        Arc::clone(&self.live.borrow())
    }

    /// Tells of every change in the live set.
    pub fn watch_live(&self) -> watch::Receiver<Arc<LiveSet>> {
        self.live.clone()
    }

    pub fn stats(&self) -> &Arc<BusStats> {
        &self.stats
    }

    /// A room here became (`true`) or stopped being its own origin.
    pub(crate) fn originates(&self, yes: bool) {
        let n = if yes {
            self.originated.fetch_add(1, Ordering::Relaxed) + 1
        } else {
            self.originated.fetch_sub(1, Ordering::Relaxed).saturating_sub(1)
        };
        metrics::gauge!("throng_cluster_rooms_originated").set(n as f64);
    }

    /// Whether the NATS connection is up now.
    pub fn connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// Tells the others this edge is going away, so its rooms move at once
    /// rather than after `dead_after`. Best effort, bounded: a shutdown
    /// never waits long for the bus.
    pub async fn leave(&self) {
        self.left.store(true, Ordering::Release);
        let said = async {
            self.announce(true).await?;
            self.client
                .flush()
                .await
                .map_err(|e| ClusterError::Publish(e.to_string()))
        };
        match tokio::time::timeout(Duration::from_secs(1), said).await {
            Ok(Ok(())) => tracing::info!(edge_id = %self.edge_id, "left the cluster"),
            Ok(Err(e)) => tracing::warn!(error = %e, "could not tell the cluster this edge is leaving"),
            Err(_) => tracing::warn!("could not tell the cluster this edge is leaving within 1 s"),
        }
    }

    async fn announce(&self, leaving: bool) -> Result<(), ClusterError> {
        let bytes = bus::encode(&Announce {
            edge_id: self.edge_id.clone(),
            region: self.region.clone(),
            quic: self.quic.clone(),
            incarnation: self.incarnation,
            seq: self.seq.fetch_add(1, Ordering::Relaxed),
            leaving,
        });
        self.publish(bus::edges_subject(&self.edge_id), BusKind::Announce, bytes)
            .await
    }

    /// This run's incarnation (its start, Unix ms).
    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    pub(crate) async fn subscribe(&self, subject: String) -> Result<async_nats::Subscriber, ClusterError> {
        self.client
            .subscribe(subject.clone())
            .await
            .map_err(|source| ClusterError::Subscribe { subject, source })
    }

    /// Whether `edge` is live, or was lately (see [`membership::Members::knows`]).
    pub(crate) fn knows(&self, edge: &str) -> bool {
        self.members().knows(edge, Instant::now())
    }

    /// Counts and drops a bus message that was read and is not taken: from
    /// an edge that is not live, speaking for another, naming a tenant this
    /// edge does not know, counting what no edge could have.
    pub(crate) fn refused(&self, kind: BusKind, why: &str) {
        self.stats.refused.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("throng_bus_refused_total", "kind" => kind.name()).increment(1);
        tracing::debug!(kind = kind.name(), why, "refused a bus message");
    }

    /// Counts and drops a bus message that could not be read.
    pub(crate) fn malformed(&self, kind: BusKind, why: &dyn std::fmt::Display) {
        self.stats.malformed.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("throng_bus_malformed_total", "kind" => kind.name()).increment(1);
        tracing::debug!(kind = kind.name(), error = %why, "dropped a malformed bus message");
    }

    pub(crate) async fn publish(&self, subject: String, kind: BusKind, bytes: Vec<u8>) -> Result<(), ClusterError> {
        let n = bytes.len();
        self.client
            .publish(subject, bytes.into())
            .await
            .map_err(|e| ClusterError::Publish(e.to_string()))?;
        self.sent(kind, n);
        Ok(())
    }

    /// Publishes a request whose answers come to `reply`.
    pub(crate) async fn request(
        &self,
        subject: String,
        reply: String,
        kind: BusKind,
        bytes: Vec<u8>,
    ) -> Result<(), ClusterError> {
        let n = bytes.len();
        self.client
            .publish_with_reply(subject, reply, bytes.into())
            .await
            .map_err(|e| ClusterError::Publish(e.to_string()))?;
        self.sent(kind, n);
        Ok(())
    }

    /// Publishes a request and waits (at most `within`) for its one answer.
    pub(crate) async fn ask(
        &self,
        subject: String,
        kind: BusKind,
        bytes: Vec<u8>,
        within: Duration,
    ) -> Result<bytes::Bytes, ClusterError> {
        let n = bytes.len();
        let answer = tokio::time::timeout(within, self.client.request(subject, bytes.into()))
            .await
            .map_err(|_| ClusterError::Request(format!("no answer within {within:?}")))?
            .map_err(|e| ClusterError::Request(e.to_string()))?;
        self.sent(kind, n);
        self.received(kind, answer.payload.len());
        Ok(answer.payload)
    }

    /// A fresh subject for one request's answers.
    pub(crate) fn inbox(&self) -> String {
        self.client.new_inbox()
    }

    fn sent(&self, kind: BusKind, n: usize) {
        self.stats.messages_out.fetch_add(1, Ordering::Relaxed);
        self.stats.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
        self.stats.by_kind[kind as usize][0].fetch_add(1, Ordering::Relaxed);
        metrics::counter!("throng_bus_messages_total", "direction" => "out", "kind" => kind.name()).increment(1);
        metrics::counter!("throng_bus_bytes_total", "direction" => "out", "kind" => kind.name()).increment(n as u64);
    }

    pub(crate) fn received(&self, kind: BusKind, n: usize) {
        self.stats.messages_in.fetch_add(1, Ordering::Relaxed);
        self.stats.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
        self.stats.by_kind[kind as usize][1].fetch_add(1, Ordering::Relaxed);
        metrics::counter!("throng_bus_messages_total", "direction" => "in", "kind" => kind.name()).increment(1);
        metrics::counter!("throng_bus_bytes_total", "direction" => "in", "kind" => kind.name()).increment(n as u64);
    }

    fn members(&self) -> std::sync::MutexGuard<'_, Members> {
        self.members.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What `/stats` shows of the cluster.
    pub fn snapshot(&self) -> ClusterSnapshot {
        let now = Instant::now();
        let live = self
            .members()
            .live()
            .map(|m| LiveMember {
                edge_id: m.edge_id.clone(),
                region: m.region.clone(),
                quic: m.quic.clone(),
                seen_ms_ago: now.saturating_duration_since(m.last_seen).as_millis() as u64,
            })
            .collect();
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ClusterSnapshot {
            edge_id: self.edge_id.clone(),
            region: self.region.clone(),
            nats_connected: self.connected(),
            rooms_originated: self.originated.load(Ordering::Relaxed),
            live_edges: live,
            bus: BusSnapshot {
                messages_out: load(&self.stats.messages_out),
                bytes_out: load(&self.stats.bytes_out),
                messages_in: load(&self.stats.messages_in),
                bytes_in: load(&self.stats.bytes_in),
                malformed: load(&self.stats.malformed),
                refused: load(&self.stats.refused),
                by_kind: BusKind::ALL
                    .iter()
                    .map(|k| {
                        let (out, inn) = self.stats.of(*k);
                        (k.name(), KindSnapshot { out, r#in: inn })
                    })
                    .filter(|(_, s)| s.out + s.r#in > 0)
                    .collect(),
                presence_lag_ms: load(&self.stats.presence_lag_ms),
            },
        }
    }
}

/// The cluster as `/stats` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterSnapshot {
    pub edge_id: String,
    pub region: String,
    pub nats_connected: bool,
    /// Rooms alive here that this edge is the origin of.
    pub rooms_originated: u64,
    pub live_edges: Vec<LiveMember>,
    pub bus: BusSnapshot,
}

#[derive(Debug, Clone, Serialize)]
pub struct LiveMember {
    pub edge_id: String,
    pub region: String,
    pub quic: String,
    /// Since this edge last heard from it (0 for itself while the bus is up).
    pub seen_ms_ago: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct BusSnapshot {
    pub messages_out: u64,
    pub bytes_out: u64,
    pub messages_in: u64,
    pub bytes_in: u64,
    pub malformed: u64,
    /// Decoded and not taken: from an edge not live, for another sender, a
    /// tenant not known, a count beyond what is possible.
    pub refused: u64,
    /// Messages out and in by what they are for (kinds not seen left out).
    pub by_kind: std::collections::BTreeMap<&'static str, KindSnapshot>,
    /// As origin: how old the latest region count was when it arrived.
    pub presence_lag_ms: u64,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct KindSnapshot {
    pub out: u64,
    pub r#in: u64,
}

/// An id for an edge whose config names none: unique enough among a few
/// thousand edges, and readable in a log.
fn generated_edge_id() -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(std::process::id().to_be_bytes());
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    h.update(nanos.to_be_bytes());
    if let Ok(host) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        h.update(host.trim().as_bytes());
    }
    format!("edge-{}", &hex::encode(h.finalize())[..12])
}

fn on_event(event: &async_nats::Event) {
    use async_nats::Event;
    match event {
        Event::Connected => {
            metrics::gauge!("throng_bus_connected").set(1.0);
            tracing::info!("NATS connected");
        }
        Event::Disconnected => {
            metrics::gauge!("throng_bus_connected").set(0.0);
            tracing::warn!("NATS disconnected; reconnecting");
        }
        Event::SlowConsumer(sid) => {
            metrics::counter!("throng_bus_slow_consumer_total").increment(1);
            tracing::warn!(subscription = sid, "NATS: this edge fell behind on a subscription");
        }
        other => tracing::info!(event = %other, "NATS"),
    }
}

async fn heartbeats(cluster: Arc<Cluster>, every: Duration, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await; // join() announced already
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if cluster.left.load(Ordering::Acquire) {
            return;
        }
        // Bounded: while NATS is away the client's queue may fill, and a
        // heartbeat that cannot go out now is worthless later.
        match tokio::time::timeout(every, cluster.announce(false)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!(error = %e, "heartbeat not sent"),
            Err(_) => tracing::debug!("heartbeat not sent in time"),
        }
    }
}

async fn hear(
    cluster: Arc<Cluster>,
    mut announcements: async_nats::Subscriber,
    live_tx: watch::Sender<Arc<LiveSet>>,
    heartbeat: Duration,
    shutdown: CancellationToken,
) {
    // Sweeping twice per heartbeat finds a dead edge within dead_after plus
    // half a heartbeat.
    let mut sweep = tokio::time::interval((heartbeat / 2).max(Duration::from_millis(20)));
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let changes = tokio::select! {
            _ = shutdown.cancelled() => return,
            message = announcements.next() => {
                let Some(message) = message else {
                    tracing::warn!("the cluster subscription ended; this edge no longer hears the others");
                    return;
                };
                cluster.received(BusKind::Announce, message.payload.len());
                let sender = bus::sender_of(&message.subject).to_owned();
                let announce = bus::decode::<Announce>(&message.payload, bus::MAX_ANNOUNCE_BYTES)
                    .map_err(|e| e.to_string())
                    .and_then(|a| {
                        crate::config::check_bus_token(&a.edge_id)
                            .and_then(|()| crate::config::check_bus_token(&a.region))
                            .map(|()| a)
                    })
                    .and_then(|a| {
                        // Speaking for another edge (its leave, its address)
                        // is what a forger would do.
                        if a.edge_id == sender {
                            Ok(a)
                        } else {
                            Err(format!("an announcement for another edge on {sender}'s subject"))
                        }
                    });
                match announce {
                    Ok(a) => cluster.members().heard(&a, Instant::now()).into_iter().collect(),
                    Err(e) => {
                        cluster.malformed(BusKind::Announce, &e);
                        Vec::new()
                    }
                }
            }
            _ = sweep.tick() => cluster.members().expire(Instant::now()),
        };
        if changes.is_empty() {
            continue;
        }
        for change in &changes {
            match change {
                Change::Joined(id) => tracing::info!(edge_id = %crate::untrusted(id, 64), "edge joined the cluster"),
                Change::Restarted(id) => tracing::info!(edge_id = %crate::untrusted(id, 64), "edge restarted"),
                Change::Left(id) => tracing::info!(edge_id = %crate::untrusted(id, 64), "edge left the cluster"),
                Change::Dead(id) => {
                    tracing::warn!(edge_id = %crate::untrusted(id, 64), "edge taken for dead: not heard from within dead_after")
                }
            }
        }
        let set = LiveSet::of(&cluster.members());
        metrics::gauge!("throng_cluster_live_edges").set(set.edges.len() as f64);
        live_tx.send_replace(Arc::new(set));
    }
}
