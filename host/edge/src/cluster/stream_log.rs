//! Group rooms' log in JetStream, for edges in a cluster.
//!
//! The same promises as the embedded log (`crate::log`), kept where every
//! edge can reach them, so a member resumes from any edge:
//!
//! - **One stream per tenant** ([`tenant_stream`], made on the tenant's
//!   first group room) with a subject per room
//!   (`throng.grouplog.<tenant hash>.<room hash>`). Each entry holds
//!   the room's ticks queued since its last entry (one, unless JetStream
//!   was slow or away), published with the message id
//!   `<room hash>.<first seq>.<last seq>.<writer>`: JetStream drops a second copy
//!   within [`DEDUP_WINDOW`], so a publish retried after a lost ack is not
//!   stored twice. Readers skip any number they already gave, so what is
//!   stored twice anyway (a retry holding more ticks, a new origin writing
//!   what the dead one may already have written) is read once.
//! - **A tenant's bound** (`rooms.group_retention.max_tenant_bytes`) is its
//!   stream's `max_bytes`, with new entries refused at it (discard new):
//!   JetStream keeps the bound across every edge that writes the tenant's
//!   rooms. An append refused for it fences the room's claim as another
//!   writer would ([`Commit::fence_full`]): its held ticks are refused
//!   with `StorageFull` (never acked, never shown), and for
//!   [`RECHECK_FULL`] the tenant's rooms refuse new messages before they
//!   are numbered; then an append tries again, so what retention frees is
//!   used. Each stream reserves its `max_bytes` of the server's
//!   `max_file_store`, so the tenants' bounds must fit in it.
//! - **The epoch** of a tenant's rooms is when its stream was made, the
//!   same on every edge (or the one-stream layout's, for streams made by
//!   moving its entries: see [`LEGACY_STREAM`]).
//!   A room has one entry in flight at a time, so its entries are in the
//!   stream in order.
//! - **One writer per room, fenced.** A room's origin claims its log
//!   ([`StreamLog::claim`]): it reads the stream sequence of the room's
//!   last entry, and publishes each entry with that as the expected last
//!   subject sequence (JetStream's optimistic concurrency). An edge that
//!   still takes itself for the origin after another took over (a
//!   partition, a paused process) finds its append refused: its claim is
//!   fenced, what it held is refused to its senders (never acked, never
//!   delivered), and it claims again from the new end before it numbers
//!   anything more. Two writers can never interleave entries, so readers
//!   never meet numbers out of order. A retry is the same entry under the
//!   same id (the id names this writer too), so a publish whose ack was
//!   lost is recognised rather than taken for another writer's.
//! - **Appends never wait**: rooms hand a tick to the writer task, which
//!   publishes every room's entry together each `commit_interval` and
//!   raises each room's `committed` mark once JetStream acked them, in
//!   order (a room's later tick never counts as committed before an earlier
//!   one). A publish that fails (NATS away) is retried, in order, until it
//!   is acked; meanwhile rooms keep the messages in memory and refuse new
//!   ones above `storage.max_queued`, as with a slow disk.
//! - **Members and cursors** live in the KV bucket [`MEMBERS_BUCKET`]:
//!   `<room>.m.<user hash>` holds the member's cursor and join point,
//!   `<room>.n` the member count. A first join raises the count by a
//!   compare-and-set on its revision and then creates the member's key,
//!   so the cap is exact across edges. Cursors are written in batches by
//!   the writer, never moving back (compare-and-set again).
//! - **Reading** a range finds the first entry at or after `from` by a
//!   binary search over stream sequence numbers (`next_by_subject` gets),
//!   then reads entries one by one.
//! - **Retention**: `max_messages` is the stream's per-subject limit,
//!   counted in entries (a tick or more each), so a room keeps at least that many
//!   messages; `max_age` is the stream's. JetStream does not say per subject
//!   what it removed, so a member that comes back from before what is kept
//!   is not told how many numbers it lost (the embedded log does).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv, stream};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use throng_wire::Message;
use tokio::sync::mpsc;

use crate::log::{
    Admission, Append, Commit, LogError, LogStats, MemberKey, Retention, Work, append_work, cursor_work, raise,
};

/// Where every group room's log was before the logs were split per tenant.
/// An edge that finds it moves its entries to the tenants' streams, in
/// order and each once, keeping its epoch (two edges may do it at once:
/// each copy is fenced like an append), then deletes it; until then its
/// group rooms wait.
pub const LEGACY_STREAM: &str = "THRONG_GROUPS";
/// Tenant streams are named this and the tenant's hash.
pub const STREAM_PREFIX: &str = "THRONG_GROUP_";
/// How long a tenant whose stream refused an append for its bound is taken
/// to be full before an append tries again.
pub const RECHECK_FULL: Duration = Duration::from_secs(1);
/// The KV bucket of group members and their cursors.
pub const MEMBERS_BUCKET: &str = "throng_group_members";
/// How long JetStream remembers a message id: a publish retried after
/// this is stored again (readers skip the repeat).
pub const DEDUP_WINDOW: Duration = Duration::from_secs(120);
/// (tenant, room).
type RoomId = (Arc<str>, Arc<str>);

/// Most bytes of messages one entry holds when it gathers several ticks
/// of a room (a single larger tick is an entry of its own): under NATS's
/// default 1 MB message limit.
const MAX_ENTRY_BYTES: usize = 512 * 1024;
/// Longest wait for one JetStream request or ack.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Compare-and-set attempts before a membership change gives up.
const CAS_ATTEMPTS: usize = 32;

/// A tenant's name in subjects and stream names (any tenant name is
/// allowed in neither).
fn tenant_token(tenant: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(&Sha256::digest(tenant.as_bytes())[..16])
}

/// The stream of `tenant`'s group logs.
pub fn tenant_stream(tenant: &str) -> String {
    format!("{STREAM_PREFIX}{}", tenant_token(tenant))
}

/// A room's subject in its tenant's stream.
pub fn group_subject(tenant: &str, room: &str) -> String {
    format!(
        "{}.{}.{}.{}",
        super::bus::PREFIX,
        super::bus::GROUP_LOG,
        tenant_token(tenant),
        super::bus::room_token(tenant, room)
    )
}

fn member_key(tenant: &str, room: &str, user: &str) -> String {
    use sha2::{Digest, Sha256};
    let user = Sha256::digest(user.as_bytes());
    format!(
        "{}.m.{}",
        super::bus::room_token(tenant, room),
        hex::encode(&user[..16])
    )
}

fn count_key(tenant: &str, room: &str) -> String {
    format!("{}.n", super::bus::room_token(tenant, room))
}

/// One or more ticks of one room, as stored.
#[derive(Debug, Serialize, Deserialize)]
struct Entry {
    tenant: String,
    room: String,
    messages: Vec<Message>,
    /// The highest number the room had handed out with these messages (a
    /// like folded into a counter has one but is no message): numbering
    /// after this entry goes on above it.
    head: u64,
}

impl Entry {
    /// The highest number this entry accounts for.
    fn last(&self) -> u64 {
        self.messages.last().map_or(0, |m| m.seq).max(self.head)
    }
}

/// A member's record in the KV bucket.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct MemberRecord {
    cursor: u64,
    joined_at: u64,
}

/// Group logs in JetStream: a stream per tenant, one KV bucket, one writer
/// task.
#[derive(Debug, Clone)]
pub struct StreamLog {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    parts: tokio::sync::OnceCell<Parts>,
    js: jetstream::Context,
    retention: Retention,
    /// The tenants' streams this edge has opened. Tenants are the edge's
    /// configured ones (a token names one), so this stays small.
    tenants: Mutex<HashMap<Arc<str>, Arc<TenantLog>>>,
    tx: mpsc::UnboundedSender<Work>,
    /// Cursors handed to the writer and not yet stored.
    cursors: Mutex<HashMap<MemberKey, u64>>,
    stats: Arc<LogStats>,
    max_queued: u64,
}

/// One tenant's stream.
#[derive(Debug)]
struct TenantLog {
    stream: stream::Stream,
    /// The numbering the tenant's group rooms' sequence numbers belong
    /// to, the same on every edge (see the module's doc).
    epoch: u64,
    /// Until when the tenant is taken to be full.
    full_until: Mutex<Option<Instant>>,
}

fn js_err(what: &str) -> impl Fn(&dyn std::fmt::Display) -> LogError + '_ {
    move |e| LogError::Read(format!("{what}: {e}"))
}

async fn within<T, E: std::fmt::Display>(
    what: &str,
    f: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, String> {
    match tokio::time::timeout(REQUEST_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{what}: {e}")),
        Err(_) => Err(format!("{what}: no answer within {REQUEST_TIMEOUT:?}")),
    }
}

/// The bucket, once it is known to exist (and the one-stream layout gone).
#[derive(Debug)]
struct Parts {
    members: kv::Store,
}

/// A stream's creation time in Unix ms, asked for again when the answer
/// came without it (a create that raced another edge's: that edge would
/// number under epoch 1 while the other used the real one).
async fn created_ms(stream: &mut stream::Stream) -> Result<u64, String> {
    let mut created = stream.cached_info().created;
    if created.unix_timestamp() <= 0 {
        created = within("read the stream's info", stream.info()).await?.created;
    }
    let ms = created.unix_timestamp_nanos() / 1_000_000;
    match u64::try_from(ms) {
        Ok(epoch @ 1..) => Ok(epoch),
        _ => Err(format!("the stream's info names no creation time ({created})")),
    }
}

/// Where a stream made by moving the one-stream layout keeps that
/// layout's epoch: its description ends with this and the number.
const EPOCH_MARK: &str = "; epoch ";

/// Makes sure the bucket exists and the one-stream layout is moved.
async fn set_up(inner: &Inner) -> Result<Parts, String> {
    let js = &inner.js;
    // The bucket's stream is made here, as a KV bucket's is: the client's
    // `create_key_value` first asks for account details in a form
    // nats-server 2.9 does not answer.
    let bucket = stream::Config {
        name: format!("KV_{MEMBERS_BUCKET}"),
        subjects: vec![format!("$KV.{MEMBERS_BUCKET}.>")],
        max_messages_per_subject: 1,
        storage: stream::StorageType::File,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: stream::DiscardPolicy::New,
        num_replicas: 1,
        ..Default::default()
    };
    within("create the members bucket", js.get_or_create_stream(bucket)).await?;
    let members = within("open the members bucket", js.get_key_value(MEMBERS_BUCKET)).await?;
    match tokio::time::timeout(REQUEST_TIMEOUT, js.get_stream(LEGACY_STREAM)).await {
        Ok(Ok(legacy)) => move_legacy(inner, legacy).await?,
        // Not found: nothing to move.
        Ok(Err(e))
            if matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(j)
                if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) => {}
        Ok(Err(e)) => return Err(format!("look for the one-stream group log: {e}")),
        Err(_) => return Err("look for the one-stream group log: no answer".into()),
    }
    Ok(Parts { members })
}

/// The stream config `tenant`'s stream should have.
fn tenant_config(tenant: &str, retention: Retention, epoch: Option<u64>) -> stream::Config {
    let token = tenant_token(tenant);
    let mut description = format!("throng group log of tenant {tenant}");
    if let Some(e) = epoch {
        description.push_str(&format!("{EPOCH_MARK}{e}"));
    }
    stream::Config {
        name: format!("{STREAM_PREFIX}{token}"),
        description: Some(description),
        subjects: vec![format!("{}.{}.{token}.*", super::bus::PREFIX, super::bus::GROUP_LOG)],
        storage: stream::StorageType::File,
        // JetStream refuses a duplicate window longer than the stream
        // keeps messages.
        duplicate_window: retention.max_age.map_or(DEDUP_WINDOW, |age| age.min(DEDUP_WINDOW)),
        max_messages_per_subject: retention.max_messages.map_or(-1, |n| n.min(i64::MAX as u64) as i64),
        max_age: retention.max_age.unwrap_or(Duration::ZERO),
        max_bytes: retention.max_tenant_bytes.map_or(-1, |n| n.min(i64::MAX as u64) as i64),
        discard: stream::DiscardPolicy::New,
        ..Default::default()
    }
}

/// Opens (or makes) `tenant`'s stream, with this edge's limits: an
/// operator changes a tenant's bound or retention in the edges' config.
/// `epoch` is kept in a stream made now (moving the one-stream layout).
async fn open_tenant(
    js: &jetstream::Context,
    tenant: &str,
    retention: Retention,
    epoch: Option<u64>,
) -> Result<TenantLog, String> {
    let want = tenant_config(tenant, retention, epoch);
    let mut stream = within("open the tenant's group log", js.get_or_create_stream(want.clone())).await?;
    let have = stream.cached_info().config.clone();
    if (
        have.max_bytes,
        have.max_age,
        have.max_messages_per_subject,
        have.discard,
    ) != (
        want.max_bytes,
        want.max_age,
        want.max_messages_per_subject,
        want.discard,
    ) {
        let config = stream::Config {
            max_bytes: want.max_bytes,
            max_age: want.max_age,
            max_messages_per_subject: want.max_messages_per_subject,
            discard: want.discard,
            ..have.clone()
        };
        within("set the tenant's group log limits", js.update_stream(config)).await?;
        tracing::info!(
            tenant,
            max_bytes = want.max_bytes,
            was = have.max_bytes,
            "the tenant's group log takes this edge's limits"
        );
        stream = within("open the tenant's group log", js.get_stream(&want.name)).await?;
    }
    let marked = have
        .description
        .as_deref()
        .and_then(|d| d.rsplit_once(EPOCH_MARK))
        .and_then(|(_, e)| e.parse::<u64>().ok())
        .filter(|&e| e > 0);
    let epoch = match marked {
        Some(e) => e,
        None => created_ms(&mut stream).await?,
    };
    Ok(TenantLog {
        stream,
        epoch,
        full_until: Mutex::new(None),
    })
}

/// Moves the one-stream layout's entries to the tenants' streams, in
/// order, each once, then deletes it. Safe to run again after it stopped
/// halfway, and on two edges at once: a room's entry is copied only above
/// what the room's new log holds, under the expected last subject sequence
/// (a copy that lost the race reads the end again).
async fn move_legacy(inner: &Inner, mut legacy: stream::Stream) -> Result<(), String> {
    use futures::StreamExt;
    let info = within("read the one-stream group log", legacy.info()).await?.clone();
    let epoch = created_ms(&mut legacy).await?;
    let last = info.state.last_sequence;
    let (mut moved, mut rooms) = (0u64, HashMap::<RoomId, (u64, u64)>::new());
    if info.state.messages > 0 {
        tracing::info!(
            entries = info.state.messages,
            "moving the one-stream group log to per-tenant streams"
        );
        let consumer = within(
            "read the one-stream group log",
            legacy.create_consumer(jetstream::consumer::pull::OrderedConfig::default()),
        )
        .await?;
        let mut messages = within("read the one-stream group log", consumer.messages()).await?;
        loop {
            let next = tokio::time::timeout(REQUEST_TIMEOUT, messages.next()).await;
            let message = match next {
                Ok(Some(Ok(m))) => m,
                Ok(Some(Err(e))) => return Err(format!("read the one-stream group log: {e}")),
                Ok(None) | Err(_) => return Err("the one-stream group log ended early".into()),
            };
            let at = message
                .info()
                .map_err(|e| format!("a one-stream entry: {e}"))?
                .stream_sequence;
            let decoded: Result<Entry, _> = super::bus::decode(&message.payload, super::bus::MAX_ROOM_BUS_BYTES);
            match decoded {
                Ok(entry) => {
                    if copy_entry(inner, &mut rooms, epoch, entry, at).await? {
                        moved += 1;
                    }
                }
                Err(e) => {
                    tracing::warn!(at, error = %e, "a one-stream group log entry that does not decode is left behind")
                }
            }
            if at >= last {
                break;
            }
        }
    }
    match within("delete the one-stream group log", inner.js.delete_stream(LEGACY_STREAM)).await {
        Ok(_) => {}
        // Another edge that moved it too deleted it first.
        Err(e) if e.contains("not found") => {}
        Err(e) => return Err(e),
    }
    tracing::info!(
        entries = moved,
        rooms = rooms.len(),
        epoch,
        "moved the one-stream group log to per-tenant streams"
    );
    Ok(())
}

/// Copies one entry of the one-stream layout to its tenant's stream
/// unless the room's new log holds it already; true if copied.
async fn copy_entry(
    inner: &Inner,
    rooms: &mut HashMap<RoomId, (u64, u64)>,
    epoch: u64,
    entry: Entry,
    at: u64,
) -> Result<bool, String> {
    let room: RoomId = (Arc::from(entry.tenant.as_str()), Arc::from(entry.room.as_str()));
    let log = tenant_log(inner, &room.0, Some(epoch))
        .await
        .map_err(|e| e.to_string())?;
    let subject = group_subject(&entry.tenant, &entry.room);
    let payload = Bytes::from(super::bus::encode(&entry));
    for _ in 0..CAS_ATTEMPTS {
        let (end, last_entry) = match rooms.get(&room) {
            Some(&known) => known,
            None => last_entry_of(&log.stream, &subject, &entry.tenant, &entry.room)
                .await
                .map_err(|e| e.to_string())?,
        };
        rooms.insert(room.clone(), (end, last_entry));
        if entry.last() <= end {
            return Ok(false);
        }
        let publish = jetstream::message::PublishMessage::build()
            .payload(payload.clone())
            .message_id(format!("moved.{at}"))
            .expected_last_subject_sequence(last_entry);
        let ack = within(
            "copy a group log entry",
            inner.js.send_publish(subject.clone(), publish),
        )
        .await?;
        match tokio::time::timeout(REQUEST_TIMEOUT, ack.into_future()).await {
            Ok(Ok(ack)) => {
                rooms.insert(room, (entry.last(), ack.sequence));
                return Ok(true);
            }
            Ok(Err(e)) if e.kind() == jetstream::context::PublishErrorKind::WrongLastSequence => {
                // Another edge copied (or appended) first: read the end again.
                rooms.remove(&room);
            }
            Ok(Err(e)) => return Err(format!("copy a group log entry: {e}")),
            Err(_) => return Err("copy a group log entry: no answer".into()),
        }
    }
    Err(format!("copying entry {at} did not settle in {CAS_ATTEMPTS} attempts"))
}

/// `tenant`'s stream, opened on first use.
async fn tenant_log(inner: &Inner, tenant: &str, epoch: Option<u64>) -> Result<Arc<TenantLog>, LogError> {
    if let Some(t) = lock(&inner.tenants).get(tenant) {
        return Ok(Arc::clone(t));
    }
    let opened = open_tenant(&inner.js, tenant, inner.retention, epoch)
        .await
        .map_err(LogError::Read)?;
    let mut tenants = lock(&inner.tenants);
    // Opened twice at once: the first one in stays.
    Ok(Arc::clone(
        tenants.entry(Arc::from(tenant)).or_insert_with(|| Arc::new(opened)),
    ))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The highest sequence number a room's log holds in `stream` and the
/// stream sequence of its last entry (0 and 0 if none).
async fn last_entry_of(
    stream: &stream::Stream,
    subject: &str,
    tenant: &str,
    room: &str,
) -> Result<(u64, u64), LogError> {
    let got = tokio::time::timeout(REQUEST_TIMEOUT, stream.get_last_raw_message_by_subject(subject)).await;
    match got {
        Ok(Ok(m)) => Ok((decode_entry(&m.payload, tenant, room)?.last(), m.sequence)),
        Ok(Err(e)) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok((0, 0)),
        Ok(Err(e)) => Err(LogError::Read(format!("last entry of the room: {e}"))),
        Err(_) => Err(LogError::Read(format!(
            "last entry of the room: no answer within {REQUEST_TIMEOUT:?}"
        ))),
    }
}

/// How long the edge's start waits for JetStream before it goes on
/// without (group rooms then wait for it; livecast rooms never do).
const FIRST_TRY: Duration = Duration::from_secs(2);
/// Between two attempts to set the stream up.
const RETRY_SET_UP: Duration = Duration::from_secs(2);

impl StreamLog {
    /// Starts the writer and makes sure the bucket exists (and the
    /// one-stream layout is moved). NATS without JetStream (or not
    /// answering yet) does not stop the edge: it tries again in the
    /// background, and until then group rooms refuse joins with a typed
    /// error ("try again").
    pub async fn open(
        client: async_nats::Client,
        commit_interval: Duration,
        max_queued: u64,
        retention: Retention,
    ) -> Self {
        let js = jetstream::new(client);
        let (tx, rx) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            parts: tokio::sync::OnceCell::new(),
            js: js.clone(),
            retention,
            tenants: Mutex::new(HashMap::new()),
            tx,
            cursors: Mutex::new(HashMap::new()),
            stats: Arc::default(),
            max_queued,
        });
        match tokio::time::timeout(FIRST_TRY, set_up(&inner)).await {
            Ok(Ok(parts)) => {
                let _ = inner.parts.set(parts);
            }
            outcome => {
                let why = match outcome {
                    Ok(Err(e)) => e,
                    _ => format!("no answer within {FIRST_TRY:?}"),
                };
                tracing::error!(error = %why, "JetStream is not available: group rooms wait for it");
                let weak = Arc::downgrade(&inner);
                tokio::spawn(async move {
                    loop {
                        tokio::time::sleep(RETRY_SET_UP).await;
                        let Some(inner) = weak.upgrade() else { return };
                        match set_up(&inner).await {
                            Ok(parts) => {
                                let _ = inner.parts.set(parts);
                                tracing::info!("JetStream is available: group rooms can start");
                                return;
                            }
                            Err(e) => tracing::debug!(error = %e, "JetStream still not available"),
                        }
                    }
                });
            }
        }
        let writer = Writer {
            js,
            inner: Arc::downgrade(&inner),
            stats: Arc::clone(&inner.stats),
            interval: commit_interval,
            queue: VecDeque::new(),
            cursors: HashMap::new(),
            frozen: HashMap::new(),
            nonce: crate::unix_now_ms() ^ u64::from(std::process::id()).rotate_left(40),
        };
        tokio::spawn(writer.run(rx));
        Self { inner }
    }

    fn parts(&self) -> Result<&Parts, LogError> {
        self.inner
            .parts
            .get()
            .ok_or_else(|| LogError::Read("JetStream is not available yet".into()))
    }

    /// `tenant`'s stream, once JetStream is set up.
    async fn tenant(&self, tenant: &str) -> Result<Arc<TenantLog>, LogError> {
        self.parts()?;
        tenant_log(&self.inner, tenant, None).await
    }

    pub fn stats(&self) -> &Arc<LogStats> {
        &self.inner.stats
    }

    /// The numbering `tenant`'s group rooms' sequence numbers belong to:
    /// when its stream was made.
    pub async fn epoch(&self, tenant: &str) -> Result<u64, LogError> {
        Ok(self.tenant(tenant).await?.epoch)
    }

    /// Whether `tenant`'s stream refused an append for its bound within
    /// [`RECHECK_FULL`].
    pub fn tenant_full(&self, tenant: &str) -> bool {
        let Some(log) = lock(&self.inner.tenants).get(tenant).cloned() else {
            return false;
        };
        let mut until = lock(&log.full_until);
        match *until {
            Some(t) if Instant::now() < t => true,
            Some(_) => {
                *until = None;
                false
            }
            None => false,
        }
    }

    /// Claims a room's log for this edge: where it ends (its highest
    /// sequence number) and a [`Commit`] whose appends go after the room's
    /// last entry only (see the module's doc).
    pub async fn claim(&self, tenant: &str, room: &str) -> Result<(u64, Arc<Commit>), LogError> {
        let (last, entry) = self.last_entry(tenant, room).await?;
        Ok((last, Commit::new(last, entry)))
    }

    /// Queues a tick's messages; `committed` is raised once JetStream has
    /// them (and every earlier tick of the room).
    pub fn append(
        &self,
        tenant: &Arc<str>,
        room: &Arc<str>,
        messages: Vec<Message>,
        head: u64,
        committed: &Arc<Commit>,
    ) {
        if let Some(work) = append_work(&self.inner.stats, tenant, room, messages, head, committed) {
            let _ = self.inner.tx.send(work);
        }
    }

    /// Moves a member's cursor up to `seq` (written with the next batch).
    pub fn set_cursor(&self, tenant: &Arc<str>, room: &Arc<str>, user: &Arc<str>, seq: u64) {
        let _ = self
            .inner
            .tx
            .send(cursor_work(&self.inner.cursors, tenant, room, user, seq));
    }

    async fn record(&self, key: &str) -> Result<Option<(MemberRecord, u64)>, LogError> {
        let entry = within("read a member", self.parts()?.members.entry(key.to_owned()))
            .await
            .map_err(LogError::Read)?;
        let Some(entry) = entry else { return Ok(None) };
        if entry.operation != kv::Operation::Put {
            return Ok(None);
        }
        let record = postcard::from_bytes(&entry.value).map_err(|e| js_err("a member record")(&e))?;
        Ok(Some((record, entry.revision)))
    }

    /// Makes `user` a member of the room unless it has `max_members`
    /// already (exact across edges: see the module's doc).
    pub async fn admit(&self, tenant: &str, room: &str, user: &str, max_members: u64) -> Result<Admission, LogError> {
        let key = member_key(tenant, room, user);
        let overlay = {
            let p = self.inner.cursors.lock().unwrap_or_else(|e| e.into_inner());
            p.get(&(Arc::from(tenant), Arc::from(room), Arc::from(user))).copied()
        };
        if let Some((r, _)) = self.record(&key).await? {
            return Ok(Admission::Member {
                cursor: r.cursor.max(overlay.unwrap_or(0)),
                joined_at: r.joined_at,
            });
        }
        let counter = count_key(tenant, room);
        match self.add_to_count(&counter, 1, Some(max_members)).await? {
            Ok(()) => {}
            Err(members) => return Ok(Admission::Full { members }),
        }
        let at = self.last_seq(tenant, room).await?;
        let record = MemberRecord {
            cursor: at,
            joined_at: at,
        };
        let bytes = Bytes::from(postcard::to_allocvec(&record).map_err(|e| LogError::Write(e.to_string()))?);
        match within("record a member", self.parts()?.members.create(&key, bytes)).await {
            Ok(_) => Ok(Admission::New { joined_at: at }),
            Err(e) => {
                // Made a member meanwhile (the same user joining on another
                // edge), or the write failed: either way, count it once.
                self.add_to_count(&counter, -1, None).await?.ok();
                match self.record(&key).await? {
                    Some((r, _)) => Ok(Admission::Member {
                        cursor: r.cursor,
                        joined_at: r.joined_at,
                    }),
                    None => Err(LogError::Write(e)),
                }
            }
        }
    }

    /// Adds `delta` to a room's member count by compare-and-set; with a
    /// `cap`, refuses (with the count) rather than pass it.
    async fn add_to_count(&self, key: &str, delta: i64, cap: Option<u64>) -> Result<Result<(), u64>, LogError> {
        let kv = &self.parts()?.members;
        for _ in 0..CAS_ATTEMPTS {
            let entry = within("read the member count", kv.entry(key.to_owned()))
                .await
                .map_err(LogError::Read)?;
            let (count, revision) = match &entry {
                Some(e) if e.operation == kv::Operation::Put => {
                    let n: u64 = postcard::from_bytes(&e.value).map_err(|e| js_err("the member count")(&e))?;
                    (n, Some(e.revision))
                }
                Some(e) => (0, Some(e.revision)),
                None => (0, None),
            };
            if cap.is_some_and(|cap| delta > 0 && count >= cap) {
                return Ok(Err(count));
            }
            let next = count.saturating_add_signed(delta);
            let bytes = Bytes::from(postcard::to_allocvec(&next).map_err(|e| LogError::Write(e.to_string()))?);
            let written = match revision {
                Some(rev) => within("count a member", kv.update(key, bytes, rev)).await.map(|_| ()),
                None => within("count a member", kv.create(key, bytes)).await.map(|_| ()),
            };
            if written.is_ok() {
                return Ok(Ok(()));
            }
            // Another join moved the count first: read it again.
        }
        Err(LogError::Write(format!(
            "the member count did not settle in {CAS_ATTEMPTS} attempts"
        )))
    }

    /// How many members a room has.
    pub async fn member_count(&self, tenant: &str, room: &str) -> Result<u64, LogError> {
        let entry = within(
            "read the member count",
            self.parts()?.members.get(count_key(tenant, room)),
        )
        .await
        .map_err(LogError::Read)?;
        match entry {
            Some(v) => postcard::from_bytes(&v).map_err(|e| js_err("the member count")(&e)),
            None => Ok(0),
        }
    }

    pub fn is_behind(&self) -> bool {
        self.inner.stats.queued_messages.load(Ordering::Relaxed) >= self.inner.max_queued
    }

    /// The highest sequence number JetStream holds for a room (0 if none).
    pub async fn last_seq(&self, tenant: &str, room: &str) -> Result<u64, LogError> {
        Ok(self.last_entry(tenant, room).await?.0)
    }

    /// The highest sequence number JetStream holds for a room and the
    /// stream sequence of its last entry (0 and 0 if none).
    async fn last_entry(&self, tenant: &str, room: &str) -> Result<(u64, u64), LogError> {
        let log = self.tenant(tenant).await?;
        last_entry_of(&log.stream, &group_subject(tenant, room), tenant, room).await
    }

    /// The first entry of the room at stream sequence `at` or later.
    async fn next_entry(
        log: &TenantLog,
        subject: &str,
        at: u64,
        tenant: &str,
        room: &str,
    ) -> Result<Option<(u64, Entry)>, LogError> {
        let get = log
            .stream
            .raw_message_builder()
            .sequence(at)
            .next_by_subject(subject.to_owned())
            .send();
        match tokio::time::timeout(REQUEST_TIMEOUT, get).await {
            Ok(Ok(m)) => Ok(Some((m.sequence, decode_entry(&m.payload, tenant, room)?))),
            Ok(Err(e)) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Ok(Err(e)) => Err(LogError::Read(format!("entry of the room: {e}"))),
            Err(_) => Err(LogError::Read(format!(
                "entry of the room: no answer within {REQUEST_TIMEOUT:?}"
            ))),
        }
    }

    /// Up to `limit` messages of a room with `from <= seq <= to`, in order,
    /// each number once.
    pub async fn read(
        &self,
        tenant: &str,
        room: &str,
        from: u64,
        to: u64,
        limit: usize,
    ) -> Result<Vec<Message>, LogError> {
        if from > to || limit == 0 {
            return Ok(Vec::new());
        }
        let subject = group_subject(tenant, room);
        let log = self.tenant(tenant).await?;
        let info = within("stream info", log.stream.get_info())
            .await
            .map_err(LogError::Read)?;
        // The first entry whose last message is at or after `from`.
        let (mut lo, mut hi) = (
            info.state.first_sequence.max(1),
            info.state.last_sequence.saturating_add(1),
        );
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match Self::next_entry(&log, &subject, mid, tenant, room).await? {
                Some((at, e)) if e.last() < from => lo = at + 1,
                _ => hi = mid,
            }
        }
        let mut out: Vec<Message> = Vec::new();
        let mut at = lo;
        while out.len() < limit {
            let Some((seq, entry)) = Self::next_entry(&log, &subject, at, tenant, room).await? else {
                break;
            };
            at = seq + 1;
            if entry.messages.first().is_some_and(|m| m.seq > to) {
                break;
            }
            let after = out.last().map_or(0, |m| m.seq);
            for m in entry.messages {
                if m.seq >= from && m.seq <= to && m.seq > after && out.len() < limit {
                    out.push(m);
                }
            }
        }
        Ok(out)
    }
}

fn decode_entry(payload: &[u8], tenant: &str, room: &str) -> Result<Entry, LogError> {
    let entry: Entry = super::bus::decode(payload, super::bus::MAX_ROOM_BUS_BYTES)
        .map_err(|e| LogError::Read(format!("corrupt log entry: {e}")))?;
    if entry.tenant != tenant || entry.room != room {
        return Err(LogError::Read(
            "a log entry of another room on this room's subject".into(),
        ));
    }
    Ok(entry)
}

/// The writer task.
struct Writer {
    js: jetstream::Context,
    /// Gone when the last handle is dropped: the writer then stores what
    /// is queued and stops.
    inner: std::sync::Weak<Inner>,
    stats: Arc<LogStats>,
    interval: Duration,
    queue: VecDeque<Append>,
    cursors: HashMap<MemberKey, u64>,
    /// Rooms whose last publish was not answered: how many of their queued
    /// ticks it held. The retry holds exactly those, under the same id, so
    /// JetStream's duplicate check (and the fence) see the same entry.
    frozen: HashMap<RoomId, usize>,
    /// Names this writer in entry ids: a retry of its own entry is told
    /// apart from another edge's entry of the same numbers.
    nonce: u64,
}

/// What became of one entry's publish.
enum Published {
    Stored(u64),
    /// Not answered (NATS away, a timeout): retried.
    Unanswered,
    /// Another writer appended to the room's log: this claim is fenced.
    Fenced,
    /// The tenant's stream is at its bound: refused, and so is the claim.
    Full,
}

/// Whether a publish was refused for the stream's `max_bytes` (discard
/// new): JetStream says "maximum bytes exceeded" as a store failure.
fn over_the_bound(e: &jetstream::context::PublishError) -> bool {
    use std::error::Error as _;
    e.source()
        .and_then(|s| s.downcast_ref::<jetstream::Error>())
        .is_some_and(|j| {
            j.error_code() == jetstream::ErrorCode::STREAM_STORE_FAILED && j.to_string().contains("maximum bytes")
        })
}

impl Writer {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Work>) {
        let mut open = true;
        while open || !self.queue.is_empty() || !self.cursors.is_empty() {
            if open && self.queue.is_empty() && self.cursors.is_empty() {
                match rx.recv().await {
                    Some(w) => self.take(w),
                    None => open = false,
                }
            }
            // Gather what else arrives within the interval: one round of
            // publishes (and one wait for their acks) covers every room.
            let deadline = tokio::time::Instant::now() + self.interval;
            while open {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(w)) => self.take(w),
                    Ok(None) => open = false,
                    Err(_) => break,
                }
            }
            let stored = self.store_appends().await;
            self.store_cursors().await;
            if !stored {
                if !open && self.inner.strong_count() == 0 && self.stats.queued.load(Ordering::Relaxed) > 0 {
                    // Shutting down with NATS away: what is left is lost
                    // with this edge, as an edge that dies loses its window.
                    tracing::warn!(
                        appends = self.queue.len(),
                        "shutdown: group log entries not stored in JetStream"
                    );
                    return;
                }
                tokio::time::sleep(self.interval.max(Duration::from_millis(100))).await;
            }
        }
    }

    fn take(&mut self, work: Work) {
        match work {
            // A claim fenced while this tick was on its way: its room
            // refuses it (it was never acked).
            Work::Append(a) if a.committed.is_fenced() => self.forget(&a),
            Work::Append(a) => self.queue.push_back(a),
            Work::Cursor(key, seq) => raise(&mut self.cursors, key, seq),
        }
    }

    /// Publishes the queued ticks and waits for the acks; false if some
    /// publish was not acked (what it held stays queued, in order).
    ///
    /// Each room gets one entry per round, holding its queued ticks from
    /// the oldest (up to [`MAX_ENTRY_BYTES`]): a room's later ticks are
    /// published only once its earlier ones are acked, so its entries are
    /// in the stream in order even when a publish fails and is retried,
    /// which reading (a binary search) relies on. The entry's id names its
    /// first and last number: a retry that holds more ticks than the lost
    /// attempt is stored again, and readers skip the repeats.
    async fn store_appends(&mut self) -> bool {
        if self.queue.is_empty() {
            return true;
        }
        // Per room, the queue positions of this round's entry and its size.
        let mut rounds: HashMap<RoomId, (Vec<usize>, usize)> = HashMap::new();
        let mut full: HashSet<RoomId> = HashSet::new();
        for (i, a) in self.queue.iter().enumerate() {
            let room = (Arc::clone(&a.tenant), Arc::clone(&a.room));
            if full.contains(&room) {
                continue;
            }
            let size: usize = a.messages.iter().map(|m| m.body.len() + m.sender.len() + 32).sum();
            let (ticks, bytes) = rounds.entry(room.clone()).or_default();
            let frozen = self.frozen.get(&room).copied();
            let over = match frozen {
                Some(n) => ticks.len() >= n,
                None => !ticks.is_empty() && *bytes + size > MAX_ENTRY_BYTES,
            };
            if over {
                full.insert(room);
                continue;
            }
            ticks.push(i);
            *bytes += size;
        }
        let mut sent = Vec::with_capacity(rounds.len());
        for (room, (ticks, _)) in rounds {
            let messages: Vec<Message> = ticks
                .iter()
                .flat_map(|&i| self.queue[i].messages.iter().cloned())
                .collect();
            let head = ticks.iter().map(|&i| self.queue[i].head).max().unwrap_or(0);
            let first = messages.first().map_or(head, |m| m.seq);
            let a = &self.queue[ticks[0]];
            let id = format!(
                "{}.{}.{}.{:x}",
                super::bus::room_token(&a.tenant, &a.room),
                first,
                head,
                self.nonce
            );
            let subject = group_subject(&a.tenant, &a.room);
            let entry = Entry {
                tenant: a.tenant.to_string(),
                room: a.room.to_string(),
                messages,
                head,
            };
            let publish = jetstream::message::PublishMessage::build()
                .payload(Bytes::from(super::bus::encode(&entry)))
                .message_id(id.as_str())
                .expected_last_subject_sequence(a.committed.last_entry());
            let ack = tokio::time::timeout(REQUEST_TIMEOUT, self.js.send_publish(subject.clone(), publish)).await;
            sent.push((room, ticks, id, subject, ack));
        }
        let mut outcome: Vec<Option<bool>> = vec![None; self.queue.len()];
        let mut failed = 0usize;
        for (room, ticks, id, subject, ack) in sent {
            let published = match ack {
                Ok(Ok(ack)) => match tokio::time::timeout(REQUEST_TIMEOUT, ack.into_future()).await {
                    Ok(Ok(ack)) => Published::Stored(ack.sequence),
                    Ok(Err(e)) if e.kind() == jetstream::context::PublishErrorKind::WrongLastSequence => {
                        self.ours_after_all(&room.0, &subject, &id).await
                    }
                    Ok(Err(e)) if over_the_bound(&e) => Published::Full,
                    _ => Published::Unanswered,
                },
                _ => Published::Unanswered,
            };
            match published {
                Published::Stored(at) => {
                    self.frozen.remove(&room);
                    self.queue[ticks[0]].committed.set_last_entry(at);
                    for i in ticks {
                        outcome[i] = Some(true);
                    }
                }
                Published::Unanswered => {
                    self.frozen.insert(room, ticks.len());
                    failed += ticks.len();
                }
                Published::Fenced | Published::Full => {
                    self.frozen.remove(&room);
                    let commit = Arc::clone(&self.queue[ticks[0]].committed);
                    if matches!(published, Published::Full) {
                        tracing::info!(room = %room.1, tenant = %room.0, "the tenant's group log is at its bound: the room's messages are refused");
                        metrics::counter!("throng_group_log_full_total", "tenant" => room.0.to_string()).increment(1);
                        self.mark_full(&room.0);
                        commit.fence_full();
                    } else {
                        tracing::warn!(room = %room.1, tenant = %room.0, "another edge appended to this group room's log: this edge's claim is fenced");
                        metrics::counter!("throng_group_log_fenced_total").increment(1);
                        commit.fence();
                    }
                    for (i, a) in self.queue.iter().enumerate() {
                        if Arc::ptr_eq(&a.committed, &commit) {
                            outcome[i] = Some(false);
                        }
                    }
                }
            }
        }
        let mut kept = VecDeque::new();
        let now = Instant::now();
        let (mut done_appends, mut done_messages) = (0u64, 0u64);
        for (a, done) in self.queue.drain(..).zip(outcome) {
            // A room's stored ticks are the oldest of its queued ones.
            match done {
                None => {
                    kept.push_back(a);
                    continue;
                }
                Some(false) => {
                    // Fenced: dropped unstored; its room refuses them.
                    done_appends += 1;
                    done_messages += a.messages.len() as u64;
                    continue;
                }
                Some(true) => {}
            }
            let window = now.duration_since(a.queued_at).as_micros() as u64;
            self.stats.max_window_us.fetch_max(window, Ordering::Relaxed);
            self.stats.total_window_us.fetch_add(window, Ordering::Relaxed);
            self.stats.appends.fetch_add(1, Ordering::Relaxed);
            self.stats
                .messages
                .fetch_add(a.messages.len() as u64, Ordering::Relaxed);
            done_appends += 1;
            done_messages += a.messages.len() as u64;
            a.committed.raise(a.head);
        }
        self.stats.queued.fetch_sub(done_appends, Ordering::Relaxed);
        self.stats.queued_messages.fetch_sub(done_messages, Ordering::Relaxed);
        self.stats.commits.fetch_add(1, Ordering::Relaxed);
        metrics::gauge!("throng_group_log_queued").set(self.stats.queued.load(Ordering::Relaxed) as f64);
        metrics::counter!("throng_group_log_commits_total").increment(1);
        self.queue = kept;
        if failed > 0 {
            metrics::counter!("throng_group_log_store_retries_total").increment(failed as u64);
            tracing::warn!(
                appends = failed,
                "JetStream did not ack every group log entry; retrying"
            );
        }
        failed == 0
    }

    /// A publish refused for its expected last sequence: stored after all
    /// when the room's last entry is this very one (the first attempt was
    /// stored and its ack lost), fenced otherwise.
    async fn ours_after_all(&self, tenant: &str, subject: &str, id: &str) -> Published {
        let Some(inner) = self.inner.upgrade() else {
            return Published::Unanswered;
        };
        let Ok(log) = tenant_log(&inner, tenant, None).await else {
            return Published::Unanswered;
        };
        match tokio::time::timeout(REQUEST_TIMEOUT, log.stream.get_last_raw_message_by_subject(subject)).await {
            Ok(Ok(m)) => {
                let last_id = m
                    .headers
                    .get(async_nats::header::NATS_MESSAGE_ID)
                    .map(|v| v.as_str().to_owned());
                if last_id.as_deref() == Some(id) {
                    Published::Stored(m.sequence)
                } else {
                    Published::Fenced
                }
            }
            Ok(Err(e)) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Published::Fenced,
            _ => Published::Unanswered,
        }
    }

    /// Takes `tenant` to be full for [`RECHECK_FULL`].
    fn mark_full(&self, tenant: &str) {
        let Some(inner) = self.inner.upgrade() else { return };
        if let Some(log) = lock(&inner.tenants).get(tenant) {
            *lock(&log.full_until) = Some(Instant::now() + RECHECK_FULL);
        }
    }

    /// Drops an append that will never be stored, from the queue counts.
    fn forget(&self, a: &Append) {
        self.stats.queued.fetch_sub(1, Ordering::Relaxed);
        self.stats
            .queued_messages
            .fetch_sub(a.messages.len() as u64, Ordering::Relaxed);
    }

    /// Writes the cursors gathered, each only upward.
    async fn store_cursors(&mut self) {
        let Some(inner) = self.inner.upgrade() else {
            self.cursors.clear();
            return;
        };
        let Some(parts) = inner.parts.get() else { return };
        let mut failed = HashMap::new();
        for ((tenant, room, user), seq) in self.cursors.drain() {
            let key = member_key(&tenant, &room, &user);
            if !raise_cursor(&parts.members, &key, seq).await {
                failed.insert((tenant, room, user), seq);
                continue;
            }
            self.stats.cursors.fetch_add(1, Ordering::Relaxed);
            let mut pending = inner.cursors.lock().unwrap_or_else(|e| e.into_inner());
            let k = (tenant, room, user);
            if pending.get(&k).is_some_and(|&p| p <= seq) {
                pending.remove(&k);
            }
        }
        self.cursors = failed;
    }
}

/// Raises a member's stored cursor to `seq`; true when stored (or already
/// higher). A cursor never makes a member.
async fn raise_cursor(kv: &kv::Store, key: &str, seq: u64) -> bool {
    for _ in 0..CAS_ATTEMPTS {
        let Ok(Ok(entry)) = tokio::time::timeout(REQUEST_TIMEOUT, kv.entry(key.to_owned())).await else {
            return false;
        };
        let Some(entry) = entry.filter(|e| e.operation == kv::Operation::Put) else {
            return true;
        };
        let Ok(mut record) = postcard::from_bytes::<MemberRecord>(&entry.value) else {
            return true;
        };
        if record.cursor >= seq {
            return true;
        }
        record.cursor = seq;
        let Ok(bytes) = postcard::to_allocvec(&record) else {
            return true;
        };
        if let Ok(Ok(_)) = tokio::time::timeout(REQUEST_TIMEOUT, kv.update(key, bytes.into(), entry.revision)).await {
            return true;
        }
    }
    false
}
