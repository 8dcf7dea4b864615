//! A room that survives dropped connections.

use std::time::{Duration, Instant};

use throng_wire::{Batch, Counters, ErrorCode, Resumed};

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

/// What a [`ResumableRoom`] hands out next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoomEvent {
    Batch(Batch),
    /// Messages may have been lost here, and nobody can say how many.
    Gap(Gap),
}

/// A place in a room's stream where messages may be missing uncounted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gap {
    pub kind: GapKind,
    /// The numbering before the gap and after it (the same for `Truncated`).
    pub from_epoch: u64,
    pub to_epoch: u64,
    /// The last sequence number handed out before the gap (of `from_epoch`).
    pub after_seq: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GapKind {
    /// The room's numbering changed (a restart, or another edge took the
    /// room over): what was said between is unknown.
    NewEpoch,
    /// Same numbering, but the edge no longer held everything after our
    /// last number (a livecast room's recent messages moved on).
    Truncated,
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
    /// The numbering `last_seq` is of (0 before the first `Joined`).
    epoch: u64,
    /// A gap the latest rejoin or batch showed, not yet handed out.
    gap: Option<Gap>,
    gaps: u64,
    /// A batch that showed a gap, handed out after it.
    next: Option<Batch>,
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
    /// Connects and joins `room` (from `resume_from`, if given, a number of
    /// the room's current numbering).
    pub async fn join(
        opts: ConnectOptions,
        room: &str,
        resume_from: Option<u64>,
        policy: ResumePolicy,
    ) -> Result<Self, ClientError> {
        Self::resume(opts, room, resume_from, 0, policy).await
    }

    /// Connects and joins `room` after `resume_from` of numbering `epoch`
    /// (0: the room's current one).
    pub async fn resume(
        opts: ConnectOptions,
        room: &str,
        resume_from: Option<u64>,
        epoch: u64,
        policy: ResumePolicy,
    ) -> Result<Self, ClientError> {
        let client = Client::connect(opts.clone()).await?;
        let mut stream = client.resume(room, resume_from, epoch).await?;
        let recent = std::mem::take(&mut stream.recent);
        let edges = opts.edges();
        let remote = client.remote_address();
        let edge = edges
            .iter()
            .position(|e| e.parse::<std::net::SocketAddr>().is_ok_and(|a| a == remote))
            .unwrap_or(0);
        let mut this = Self {
            edges,
            edge,
            opts,
            policy,
            room: room.to_owned(),
            epoch,
            gap: None,
            gaps: 0,
            next: None,
            client,
            last_seq: resume_from,
            stream,
            recent,
            reconnects: 0,
            reconnecting: None,
        };
        this.joined();
        Ok(this)
    }

    /// Takes in what the latest `Joined` said of the numbering.
    fn joined(&mut self) {
        let (epoch, resumed) = (self.stream.epoch, self.stream.resumed);
        let kind = match resumed {
            Resumed::NewEpoch { .. } => Some(GapKind::NewEpoch),
            Resumed::Truncated => Some(GapKind::Truncated),
            Resumed::Fresh | Resumed::Continued => None,
        };
        self.note_gap(kind, epoch);
    }

    fn note_gap(&mut self, kind: Option<GapKind>, epoch: u64) {
        if let Some(kind) = kind {
            self.gaps += 1;
            self.gap = Some(Gap {
                kind,
                from_epoch: self.epoch,
                to_epoch: epoch,
                after_seq: self.last_seq,
            });
        }
        // A room's numbers only go up, across epochs too: `last_seq` still
        // tells what was handed out already.
        self.epoch = epoch;
    }

    /// The numbering of [`ResumableRoom::last_seq`].
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// How many gaps (uncounted holes) this room met so far.
    pub fn gaps(&self) -> u64 {
        self.gaps
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
    ///
    /// The future holds no borrow of the room (which is not `Sync`: a
    /// reconnect under way is kept in it), so it may be awaited inside
    /// `tokio::spawn` while the room goes on.
    pub fn seen(&self) -> impl std::future::Future<Output = Result<(), ClientError>> + Send + 'static {
        let (client, room, seq) = (self.client.clone(), self.room.clone(), self.last_seq);
        async move {
            match seq {
                Some(seq) => client.seen(&room, seq).await,
                None => Ok(()),
            }
        }
    }

    pub fn reconnects(&self) -> u64 {
        self.reconnects
    }

    /// The current connection (for sending on it).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The next batch, reconnecting as needed; gaps are counted
    /// ([`ResumableRoom::gaps`]) but not handed out: see
    /// [`ResumableRoom::next_event`].
    pub async fn next_batch(&mut self) -> Result<Batch, ClientError> {
        loop {
            if let RoomEvent::Batch(b) = self.next_event().await? {
                return Ok(b);
            }
        }
    }

    /// The next batch or gap, reconnecting as needed. Messages a rejoin's
    /// `Joined` carries come first, as a batch of tick 0; a gap the rejoin
    /// (or a batch of another numbering) showed comes before them.
    ///
    /// Cancel-safe: dropped before it returns (in a `select!` loop, say),
    /// it loses no batch, and a reconnect under way goes on at the next
    /// call.
    pub async fn next_event(&mut self) -> Result<RoomEvent, ClientError> {
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
                self.joined();
            }
            if let Some(gap) = self.gap.take() {
                return Ok(RoomEvent::Gap(gap));
            }
            if let Some(batch) = self.next.take() {
                return Ok(RoomEvent::Batch(self.hand_out(batch)));
            }
            if !self.recent.is_empty() {
                let messages = std::mem::take(&mut self.recent);
                return Ok(RoomEvent::Batch(self.hand_out(Batch {
                    room: self.room.clone(),
                    tick: 0,
                    messages,
                    counters: Counters::default(),
                    pinned: Vec::new(),
                    online: self.stream.online,
                    missed: 0,
                    epoch: self.epoch,
                })));
            }
            match self.stream.next_batch().await {
                Some(Ok(batch)) if batch.epoch != self.epoch => {
                    // Another edge took the room over mid-stream: what its
                    // predecessor said last may not have reached us.
                    self.note_gap(Some(GapKind::NewEpoch), batch.epoch);
                    self.next = Some(batch);
                }
                Some(Ok(batch)) => return Ok(RoomEvent::Batch(self.hand_out(batch))),
                Some(Err(e)) if !recoverable(&e) => return Err(e),
                // The stream ended or broke: the connection is gone or going.
                _ => {
                    self.client.close();
                    self.reconnecting = Some(Reconnecting(Box::pin(reconnect(
                        self.opts.clone(),
                        self.edges.clone(),
                        self.edge,
                        self.room.clone(),
                        (self.last_seq, self.epoch),
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
    (last_seq, epoch): (Option<u64>, u64),
    policy: ResumePolicy,
) -> Result<Reconnected, ClientError> {
    let started = Instant::now();
    let mut backoff = policy.first_backoff;
    loop {
        tokio::time::sleep(backoff).await;
        edge = (edge + 1) % edges.len();
        let attempt = async {
            let client = Client::connect(opts.for_edge(&edges[edge])).await?;
            let stream = client.resume(&room, last_seq, epoch).await?;
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

#[cfg(test)]
mod send_tests {
    use super::*;

    /// Compiles only if `seen`'s future may go to `tokio::spawn`.
    #[allow(dead_code)]
    fn seen_is_send(room: &ResumableRoom) {
        fn send<T: Send + 'static>(_: T) {}
        send(room.seen());
    }
}
