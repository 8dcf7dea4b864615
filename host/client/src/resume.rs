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
    /// Not cancel-safe while reconnecting: a call dropped then (a losing
    /// `select!` branch) starts the reconnect over at the next edge, and a
    /// loop that keeps dropping it never reconnects. Read a room that may
    /// move from a task of its own.
    pub async fn next_batch(&mut self) -> Result<Batch, ClientError> {
        loop {
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
                _ => self.resume().await?,
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

    async fn resume(&mut self) -> Result<(), ClientError> {
        self.client.close();
        let started = Instant::now();
        let mut backoff = self.policy.first_backoff;
        loop {
            tokio::time::sleep(backoff).await;
            // The edge that dropped us is tried last: in a cluster any edge
            // serves the room, and a dead one costs a handshake timeout.
            self.edge = (self.edge + 1) % self.edges.len();
            let opts = self.opts.for_edge(&self.edges[self.edge]);
            let attempt = async {
                let client = Client::connect(opts).await?;
                let stream = client.join_from(&self.room, self.last_seq).await?;
                Ok::<_, ClientError>((client, stream))
            };
            match attempt.await {
                Ok((client, mut stream)) => {
                    self.recent = std::mem::take(&mut stream.recent);
                    self.client = client;
                    self.stream = stream;
                    self.reconnects += 1;
                    return Ok(());
                }
                Err(e) if !recoverable(&e) => return Err(e),
                Err(e) => {
                    if started.elapsed() >= self.policy.give_up_after {
                        return Err(e);
                    }
                    tracing::debug!(error = %e, "reconnect failed; retrying");
                    backoff = (backoff * 2).min(self.policy.max_backoff);
                }
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
