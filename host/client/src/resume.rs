//! A room that survives dropped connections.

use std::time::{Duration, Instant};

use throng_wire::{Batch, Counters, ErrorCode};

use crate::{Client, ClientError, ConnectOptions, RoomStream};

/// How hard to try to get back.
#[derive(Debug, Clone)]
pub struct ResumePolicy {
    /// First wait before reconnecting; doubles up to `max_backoff`.
    pub first_backoff: Duration,
    pub max_backoff: Duration,
    /// Give up when the room has been unreachable this long.
    pub give_up_after: Duration,
}

impl Default for ResumePolicy {
    fn default() -> Self {
        Self {
            first_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(2),
            give_up_after: Duration::from_secs(30),
        }
    }
}

/// A joined room that reconnects and resumes from the last sequence number
/// it delivered when the connection drops.
#[derive(Debug)]
pub struct ResumableRoom {
    opts: ConnectOptions,
    policy: ResumePolicy,
    room: String,
    client: Client,
    stream: RoomStream,
    last_seq: Option<u64>,
    /// Recent messages from the latest `Joined`, not yet handed out.
    recent: Vec<throng_wire::Message>,
    reconnects: u64,
    /// Every edge this room may be served from, and the one serving it.
    edges: Vec<String>,
    edge: usize,
    /// A reconnect under way: kept here, so a `next_batch` dropped
    /// meanwhile (a losing `select!` branch) loses none of its progress.
    reconnecting: Option<Reconnecting>,
}

/// A new connection, its stream of the room, and which edge it is to.
type Reconnected = (Client, RoomStream, usize);

struct Reconnecting(std::pin::Pin<Box<dyn std::future::Future<Output = Result<Reconnected, ClientError>> + Send>>);

impl std::fmt::Debug for Reconnecting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Reconnecting")
    }
}

impl ResumableRoom {
    /// Connects and joins `room` (from `resume_from`, if given).
    pub async fn join(
        opts: ConnectOptions,
        room: &str,
        resume_from: Option<u64>,
        policy: ResumePolicy,
    ) -> Result<Self, ClientError> {
        let client = Client::connect(opts.clone()).await?;
        let mut stream = client.join_from(room, resume_from).await?;
        let recent = std::mem::take(&mut stream.recent);
        let edges = opts.edges();
        let remote = client.remote_address();
        let edge = edges
            .iter()
            .position(|e| e.parse::<std::net::SocketAddr>().is_ok_and(|a| a == remote))
            .unwrap_or(0);
        Ok(Self {
            edges,
            edge,
            opts,
            policy,
            room: room.to_owned(),
            client,
            stream,
            last_seq: resume_from,
            recent,
            reconnects: 0,
            reconnecting: None,
        })
    }

    /// The sequence number of the last message handed out.
    pub fn last_seq(&self) -> Option<u64> {
        self.last_seq
    }

    /// The edge serving the room now (`host:port`, as listed).
    pub fn edge(&self) -> &str {
        &self.edges[self.edge]
    }

    /// How many times the connection was re-established.
    /// Reports everything handed out so far as processed (`Client::seen`):
    /// in a group room, a later join from anywhere resumes after it. Call it
    /// once the app has dealt with what `next_batch` gave it.
    pub async fn seen(&self) -> Result<(), ClientError> {
        match self.last_seq {
            Some(seq) => self.client.seen(&self.room, seq).await,
            None => Ok(()),
        }
    }

    pub fn reconnects(&self) -> u64 {
        self.reconnects
    }

    /// The current connection (for sending on it).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The next batch, reconnecting as needed. Messages a rejoin's `Joined`
    /// carries come first, as a batch of tick 0.
    ///
    /// Cancel-safe: dropped before it returns (in a `select!` loop, say),
    /// it loses no batch, and a reconnect under way goes on at the next
    /// call.
    pub async fn next_batch(&mut self) -> Result<Batch, ClientError> {
        loop {
            if let Some(r) = &mut self.reconnecting {
                let done = r.0.as_mut().await;
                self.reconnecting = None;
                let (client, mut stream, edge) = done?;
                self.recent = std::mem::take(&mut stream.recent);
                self.client = client;
                self.stream = stream;
                self.edge = edge;
                self.reconnects += 1;
            }
            if !self.recent.is_empty() {
                let messages = std::mem::take(&mut self.recent);
                return Ok(self.hand_out(Batch {
                    room: self.room.clone(),
                    tick: 0,
                    messages,
                    counters: Counters::default(),
                    pinned: Vec::new(),
                    online: self.stream.online,
                    missed: 0,
                }));
            }
            match self.stream.next_batch().await {
                Some(Ok(batch)) => return Ok(self.hand_out(batch)),
                Some(Err(e)) if !recoverable(&e) => return Err(e),
                // The stream ended or broke: the connection is gone or going.
                _ => {
                    self.client.close();
                    self.reconnecting = Some(Reconnecting(Box::pin(reconnect(
                        self.opts.clone(),
                        self.edges.clone(),
                        self.edge,
                        self.room.clone(),
                        self.last_seq,
                        self.policy.clone(),
                    ))));
                }
            }
        }
    }

    fn hand_out(&mut self, mut batch: Batch) -> Batch {
        // Never hand out a message twice, whatever the edge sends.
        if let Some(last) = self.last_seq {
            batch.messages.retain(|m| m.seq > last);
        }
        if let Some(m) = batch.messages.last() {
            self.last_seq = Some(m.seq);
        }
        batch
    }
}

/// Connects again and rejoins `room` after `last_seq`, trying the edges
/// after `edge` in turn (the one that dropped us last: in a cluster any
/// edge serves the room, and a dead one costs a handshake timeout).
async fn reconnect(
    opts: ConnectOptions,
    edges: Vec<String>,
    mut edge: usize,
    room: String,
    last_seq: Option<u64>,
    policy: ResumePolicy,
) -> Result<Reconnected, ClientError> {
    let started = Instant::now();
    let mut backoff = policy.first_backoff;
    loop {
        tokio::time::sleep(backoff).await;
        edge = (edge + 1) % edges.len();
        let attempt = async {
            let client = Client::connect(opts.for_edge(&edges[edge])).await?;
            let stream = client.join_from(&room, last_seq).await?;
            Ok::<_, ClientError>((client, stream))
        };
        match attempt.await {
            Ok((client, stream)) => return Ok((client, stream, edge)),
            Err(e) if !recoverable(&e) => return Err(e),
            Err(e) => {
                if started.elapsed() >= policy.give_up_after {
                    return Err(e);
                }
                tracing::debug!(error = %e, "reconnect failed; retrying");
                backoff = (backoff * 2).min(policy.max_backoff);
            }
        }
    }
}

/// Whether trying again may help: lost networks and restarting edges yes,
/// refusals of who we are or what we asked no.
pub(crate) fn recoverable(e: &ClientError) -> bool {
    match e {
        ClientError::Connect(_) | ClientError::Connection(_) | ClientError::Timeout(_) | ClientError::Closed => true,
        ClientError::Edge { code, .. } => matches!(
            code,
            None | Some(ErrorCode::ShuttingDown | ErrorCode::ServerBusy | ErrorCode::Internal | ErrorCode::TooSlow)
        ),
        _ => false,
    }
}
