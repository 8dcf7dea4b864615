//! Where group rooms keep their log: the embedded one ([`GroupLog`], redb)
//! on a single edge, JetStream ([`StreamLog`]) in a cluster, so a member
//! resumes from any edge. Rooms and connections see one interface; the
//! embedded log's blocking calls run on tokio's blocking threads.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use throng_wire::Message;

use crate::cluster::stream_log::StreamLog;
use crate::log::{Admission, Commit, GroupLog, LogError, LogStats};

#[derive(Debug, Clone)]
pub enum GroupStore {
    Local(GroupLog),
    Stream(StreamLog),
}

/// Runs a blocking call of the embedded log off the async threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, LogError> + Send + 'static) -> Result<T, LogError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| LogError::Read(format!("log task failed: {e}")))?
}

impl GroupStore {
    pub fn stats(&self) -> &Arc<LogStats> {
        match self {
            Self::Local(l) => l.stats(),
            Self::Stream(s) => s.stats(),
        }
    }

    /// The numbering `tenant`'s rooms' sequence numbers belong to: the
    /// log's own (a log made anew is another epoch): the embedded log's,
    /// or the tenant's stream's in a cluster.
    pub async fn epoch(&self, tenant: &str) -> Result<u64, LogError> {
        match self {
            Self::Local(l) => Ok(l.epoch()),
            Self::Stream(s) => s.epoch(tenant).await,
        }
    }

    /// Claims a room's log for this edge to write: where it ends, and the
    /// [`Commit`] its appends raise. In a cluster the claim is fenced when
    /// another edge appends after it (`cluster::stream_log`); the embedded
    /// log has one writer, this edge, by its file lock.
    pub async fn claim(&self, tenant: &str, room: &str) -> Result<(u64, Arc<Commit>), LogError> {
        match self {
            Self::Local(_) => {
                let last = self.last_seq(tenant, room).await?;
                Ok((last, Commit::new(last, 0)))
            }
            Self::Stream(s) => s.claim(tenant, room).await,
        }
    }

    /// Queues a tick's messages, with `head`, the highest number the room
    /// handed out with them; `committed` is raised to it once stored.
    pub fn append(
        &self,
        tenant: &Arc<str>,
        room: &Arc<str>,
        messages: Vec<Message>,
        head: u64,
        committed: &Arc<Commit>,
    ) {
        match self {
            Self::Local(l) => l.append(tenant, room, messages, head, committed),
            Self::Stream(s) => s.append(tenant, room, messages, head, committed),
        }
    }

    /// Moves a member's cursor up to `seq` (never back).
    pub fn set_cursor(&self, tenant: &Arc<str>, room: &Arc<str>, user: &Arc<str>, seq: u64) {
        match self {
            Self::Local(l) => l.set_cursor(tenant, room, user, seq),
            Self::Stream(s) => s.set_cursor(tenant, room, user, seq),
        }
    }

    /// Whether so many messages wait to be stored that rooms should refuse
    /// more.
    pub fn is_behind(&self) -> bool {
        match self {
            Self::Local(l) => l.is_behind(),
            Self::Stream(s) => s.is_behind(),
        }
    }

    /// Bytes of `tenant`'s stored group messages in the embedded log
    /// (None in a cluster: JetStream keeps them).
    pub fn tenant_bytes(&self, tenant: &str) -> Option<u64> {
        match self {
            Self::Local(l) => Some(l.tenant_bytes(tenant)),
            Self::Stream(_) => None,
        }
    }

    /// Whether `tenant` stores all `max_tenant_bytes` allows: counted by
    /// the embedded log, or its stream refused an append for it lately
    /// (JetStream keeps the bound across edges).
    pub fn tenant_full(&self, tenant: &str) -> bool {
        match self {
            Self::Local(l) => l.tenant_full(tenant),
            Self::Stream(s) => s.tenant_full(tenant),
        }
    }

    /// Counts messages a room refused because the log was behind.
    pub fn refused(&self, n: u64) {
        match self {
            Self::Local(l) => l.refused(n),
            Self::Stream(s) => {
                s.stats().refused.fetch_add(n, Ordering::Relaxed);
                metrics::counter!("throng_group_log_refused_total").increment(n);
            }
        }
    }

    pub async fn admit(&self, tenant: &str, room: &str, user: &str, max_members: u64) -> Result<Admission, LogError> {
        match self {
            Self::Local(l) => {
                let (l, t, r, u) = (l.clone(), tenant.to_owned(), room.to_owned(), user.to_owned());
                blocking(move || l.admit(&t, &r, &u, max_members)).await
            }
            Self::Stream(s) => s.admit(tenant, room, user, max_members).await,
        }
    }

    /// The highest sequence number the room's log holds (0 if none).
    pub async fn last_seq(&self, tenant: &str, room: &str) -> Result<u64, LogError> {
        match self {
            Self::Local(l) => {
                let (l, t, r) = (l.clone(), tenant.to_owned(), room.to_owned());
                blocking(move || l.last_seq(&t, &r)).await
            }
            Self::Stream(s) => s.last_seq(tenant, room).await,
        }
    }

    /// The highest sequence retention removed from a room, when known.
    pub async fn pruned_through(&self, tenant: &str, room: &str) -> Result<u64, LogError> {
        match self {
            Self::Local(l) => {
                let (l, t, r) = (l.clone(), tenant.to_owned(), room.to_owned());
                blocking(move || l.pruned_through(&t, &r)).await
            }
            Self::Stream(_) => Ok(0),
        }
    }

    /// Up to `limit` messages with `from <= seq <= to`, in order.
    pub async fn read(
        &self,
        tenant: &str,
        room: &str,
        from: u64,
        to: u64,
        limit: usize,
    ) -> Result<Vec<Message>, LogError> {
        match self {
            Self::Local(l) => {
                let (l, t, r) = (l.clone(), tenant.to_owned(), room.to_owned());
                blocking(move || l.read(&t, &r, from, to, limit)).await
            }
            Self::Stream(s) => s.read(tenant, room, from, to, limit).await,
        }
    }

    /// Drops this handle; the embedded log's writer finishes within
    /// `limit` (JetStream's, once what is queued is stored).
    pub async fn close(self, limit: Duration) -> bool {
        match self {
            Self::Local(l) => tokio::task::spawn_blocking(move || l.close(limit))
                .await
                .unwrap_or(false),
            Self::Stream(s) => {
                let stats = Arc::clone(s.stats());
                drop(s);
                let start = tokio::time::Instant::now();
                while stats.queued.load(Ordering::Relaxed) > 0 {
                    if start.elapsed() >= limit {
                        return false;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                true
            }
        }
    }
}
