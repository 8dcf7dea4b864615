//! The durable log of group rooms, in an embedded store (redb).
//!
//! Rooms hand each tick's sequenced messages to [`GroupLog::append`] and go
//! on: a single writer thread collects appends from every room and commits
//! them together (group commit) at most every `commit_interval`, off the push
//! path. After a commit it raises each room's `committed` mark, so a room
//! knows which messages it may stop keeping in memory.
//!
//! **Membership.** A group room's members are kept too: (tenant, room,
//! user) → the member's cursor, the highest sequence it said it has
//! processed (`Seen`). A member joining without `resume_from` resumes after
//! its cursor; a first join records the member at the room's current end.
//! Cursors are committed with the next group commit and read through an
//! in-memory overlay of what is not committed yet.
//!
//! **Who reads what.** A user becomes a member in one write transaction
//! ([`GroupLog::admit`]): membership checked, members counted against the
//! cap and the member recorded together, so concurrent joiners cannot all
//! pass a count read before any of them was written. The member's join
//! point is kept with it; a room configured `since_join` serves nothing at
//! or before it.
//!
//! **Retention.** The writer enforces [`Retention`] after its commits, a
//! bounded number of ticks per pass: per room at most `max_messages` (by
//! sequence number, whole ticks) and nothing older than `max_age`. What it
//! removed is remembered per room ([`GroupLog::pruned_through`]), so a
//! member coming back from before it learns how much it lost, and a room
//! whose every tick aged out still numbers on from its last sequence. Freed
//! pages are reused by redb; the file itself shrinks only by compaction,
//! which stops every reader and writer while it runs, so it runs at most
//! every `compact_interval` and only after retention removed something.
//!
//! **What an ack promises.** A group room acks a message, and delivers it
//! to anyone, only once its writer committed it (redb commits with an
//! fsync): an ack, or a message seen, means it is on disk and its number
//! is its own for good. A room waits on its [`Commit`] for that; the cost
//! is one `commit_interval` plus one commit of latency (BENCHMARKS.md has
//! the figures). An edge killed before a commit loses only messages nobody
//! was told of, so numbering on from the log's end reuses no number anyone
//! saw. (In a cluster the log is in JetStream instead: `cluster::stream_log`.)

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, mpsc};
use std::time::{Duration, Instant};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use thiserror::Error;
use throng_wire::Message;

/// (tenant, room, first seq) → one tick's messages, postcard-encoded
/// `Vec<Message>` in sequence order. One entry per room tick, not per
/// message: a commit of many rooms' ticks is then a few B-tree inserts.
const TICKS: TableDefinition<(&str, &str, u64), &[u8]> = TableDefinition::new("ticks");

/// (tenant, room) → the highest sequence number the room handed out and
/// committed, delivered or not (a like folded into a counter has one too):
/// numbering after a restart goes on above it, so no acked number is
/// handed out twice.
const HEADS: TableDefinition<(&str, &str), u64> = TableDefinition::new("heads");

/// `"epoch"` → when this log was made (Unix ms): the numbering its rooms'
/// sequence numbers belong to. A log made anew (a wiped data dir) is
/// another epoch, so a client's numbers from the old one are not taken
/// for the new one's.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// (tenant, room, user) → the member's cursor.
const MEMBERS: TableDefinition<(&str, &str, &str), u64> = TableDefinition::new("members");

/// (tenant, room, user) → the room's last committed sequence when the user
/// became a member. Members from before this table have no row (read as 0).
const JOINED: TableDefinition<(&str, &str, &str), u64> = TableDefinition::new("joined");

/// (commit time, ms since the Unix epoch; tenant; room; first seq) → (): the
/// ticks in the order they age out. Written only while a `max_age` is set;
/// a row whose tick retention already removed by count is simply dropped.
const AGES: TableDefinition<(u64, &str, &str, u64), ()> = TableDefinition::new("ages");

/// (tenant, room) → the highest sequence retention removed.
const PRUNED: TableDefinition<(&str, &str), u64> = TableDefinition::new("pruned");

/// Most ticks one retention pass removes, so a pass (and the commits
/// waiting behind it) stays short however much has to go; the rest goes
/// in the next passes.
const PRUNE_BUDGET: usize = 4096;

/// Least time between retention passes.
const PRUNE_INTERVAL: Duration = Duration::from_millis(200);

/// What the group log keeps, per room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Ticks committed longer ago than this are removed.
    pub max_age: Option<Duration>,
    /// At most about this many messages per room (by sequence number,
    /// whole ticks: a tick across the line stays).
    pub max_messages: Option<u64>,
    /// Least time between two compactions of the file.
    pub compact_interval: Duration,
    /// Stored bytes of one tenant's ticks past which
    /// [`GroupLog::tenant_full`] says so (None: no bound).
    pub max_tenant_bytes: Option<u64>,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            max_age: None,
            max_messages: None,
            compact_interval: Duration::from_secs(3600),
            max_tenant_bytes: None,
        }
    }
}

/// The outcome of [`GroupLog::admit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Already a member: its cursor, and the room's last sequence when it
    /// joined (0 for members from before join points were kept).
    Member { cursor: u64, joined_at: u64 },
    /// A member from now on; its cursor and join point are the room's last
    /// committed sequence. Messages the room sequenced but had not yet
    /// committed (one commit interval's worth) are after it, so a new
    /// member may read those few from just before it joined.
    New { joined_at: u64 },
    /// Not a member, and the room has its maximum.
    Full { members: u64 },
}

/// How far one room's log is stored: raised by the log's writer after each
/// commit, waited on by the room, which acks and delivers only what it
/// covers. In a cluster it is also the room's claim on its log: the
/// JetStream writer appends only after the entry this room last knew of,
/// and marks the claim `fenced` when another edge appended meanwhile.
#[derive(Debug)]
pub struct Commit {
    stored: AtomicU64,
    fenced: AtomicBool,
    /// Fenced because the tenant's storage is full, not by another writer.
    full: AtomicBool,
    changed: tokio::sync::Notify,
    /// JetStream: the stream sequence of the room's last entry as this
    /// edge knows it (0 for none), the expected last subject sequence of
    /// its next append.
    last_entry: AtomicU64,
}

impl Commit {
    /// A claim on a log stored up to `stored`, whose last entry is
    /// `last_entry` (JetStream's stream sequence; 0 for none or redb).
    pub fn new(stored: u64, last_entry: u64) -> Arc<Self> {
        Arc::new(Self {
            stored: AtomicU64::new(stored),
            fenced: AtomicBool::new(false),
            full: AtomicBool::new(false),
            changed: tokio::sync::Notify::new(),
            last_entry: AtomicU64::new(last_entry),
        })
    }

    /// The highest sequence number stored.
    pub fn stored(&self) -> u64 {
        self.stored.load(Ordering::Acquire)
    }

    /// Whether another writer appended to the room's log after this claim
    /// was made: nothing more is stored under it.
    pub fn is_fenced(&self) -> bool {
        self.fenced.load(Ordering::Acquire)
    }

    /// Waits until the mark rises or the claim is fenced (returns at once
    /// if either happened since the last wait).
    pub async fn changed(&self) {
        self.changed.notified().await;
    }

    /// Raises the mark to `seq` (never lowers it) and wakes the room.
    pub(crate) fn raise(&self, seq: u64) {
        if self.stored.fetch_max(seq, Ordering::AcqRel) < seq {
            self.changed.notify_one();
        }
    }

    pub(crate) fn fence(&self) {
        self.fenced.store(true, Ordering::Release);
        self.changed.notify_one();
    }

    /// Whether the claim was fenced because the log refused an append for
    /// the tenant's storage bound (JetStream's `max_bytes`): its held ticks
    /// are refused with `StorageFull`, not "another edge took over".
    pub fn is_full(&self) -> bool {
        self.full.load(Ordering::Acquire)
    }

    /// Fences the claim for the tenant's storage bound: nothing after the
    /// refused append may be stored under it (the room claims the log
    /// again, so its numbering goes on after what is stored).
    pub(crate) fn fence_full(&self) {
        self.full.store(true, Ordering::Release);
        self.fence();
    }

    pub(crate) fn last_entry(&self) -> u64 {
        self.last_entry.load(Ordering::Acquire)
    }

    pub(crate) fn set_last_entry(&self, seq: u64) {
        self.last_entry.store(seq, Ordering::Release);
    }
}

/// (tenant, room, user).
pub(crate) type MemberKey = (Arc<str>, Arc<str>, Arc<str>);

/// What a group log's writer is handed: redb's writer thread here, the
/// JetStream writer task in `cluster::stream_log`.
pub(crate) enum Work {
    Append(Append),
    Cursor(MemberKey, u64),
}

/// The work an append is, counted as queued in `stats`; none for no
/// messages.
pub(crate) fn append_work(
    stats: &LogStats,
    tenant: &Arc<str>,
    room: &Arc<str>,
    messages: Vec<Message>,
    head: u64,
    committed: &Arc<Commit>,
) -> Option<Work> {
    let head = head.max(messages.last().map_or(0, |m| m.seq));
    if messages.is_empty() && head <= committed.stored() {
        return None;
    }
    stats.queued.fetch_add(1, Ordering::Relaxed);
    stats
        .queued_messages
        .fetch_add(messages.len() as u64, Ordering::Relaxed);
    Some(Work::Append(Append {
        tenant: Arc::clone(tenant),
        room: Arc::clone(room),
        messages,
        head,
        committed: Arc::clone(committed),
        queued_at: Instant::now(),
    }))
}

/// The work a cursor move is. It is noted in `pending` first, where reads
/// find it until the writer has stored it.
pub(crate) fn cursor_work(
    pending: &std::sync::Mutex<HashMap<MemberKey, u64>>,
    tenant: &Arc<str>,
    room: &Arc<str>,
    user: &Arc<str>,
    seq: u64,
) -> Work {
    let key = (Arc::clone(tenant), Arc::clone(room), Arc::clone(user));
    raise(&mut pending.lock().unwrap_or_else(|e| e.into_inner()), key.clone(), seq);
    Work::Cursor(key, seq)
}

/// Merges a cursor move into `cursors`: cursors never move back.
pub(crate) fn raise(cursors: &mut HashMap<MemberKey, u64>, key: MemberKey, seq: u64) {
    let v = cursors.entry(key).or_insert(seq);
    *v = (*v).max(seq);
}

#[derive(Debug, Error)]
pub enum LogError {
    #[error("cannot open the group log {path}: {reason}")]
    Open { path: PathBuf, reason: String },
    #[error("group log read failed: {0}")]
    Read(String),
    #[error("group log write failed: {0}")]
    Write(String),
}

fn read_err(e: impl std::fmt::Display) -> LogError {
    LogError::Read(e.to_string())
}

fn write_err(e: impl std::fmt::Display) -> LogError {
    LogError::Write(e.to_string())
}

/// One room's batch of messages waiting for the next commit.
pub(crate) struct Append {
    pub(crate) tenant: Arc<str>,
    pub(crate) room: Arc<str>,
    pub(crate) messages: Vec<Message>,
    /// The highest number the room handed out with these messages (at
    /// least the last message's).
    pub(crate) head: u64,
    pub(crate) committed: Arc<Commit>,
    pub(crate) queued_at: Instant,
}

/// Durability figures, for stats and benchmarks.
#[derive(Debug, Default)]
pub struct LogStats {
    pub commits: AtomicU64,
    pub messages: AtomicU64,
    /// Longest time from a room's append to its commit, in microseconds.
    pub max_window_us: AtomicU64,
    /// Sum of append-to-commit times, for the mean.
    pub total_window_us: AtomicU64,
    pub appends: AtomicU64,
    /// Appends waiting for a commit: grows only when the disk cannot keep
    /// up with the group rooms' traffic.
    pub queued: AtomicU64,
    /// Messages in those appends. Rooms never block on the log; above the
    /// log's `max_queued` they refuse new messages instead.
    pub queued_messages: AtomicU64,
    /// Messages refused because the log was behind.
    pub refused: AtomicU64,
    /// Ticks retention removed.
    pub pruned_ticks: AtomicU64,
    /// Compactions of the file that ran.
    pub compactions: AtomicU64,
    /// Member cursors stored.
    pub cursors: AtomicU64,
}

/// Above this many waiting appends the writer warns (at most every 10 s).
const QUEUE_WARN: u64 = 100_000;

/// The database, behind a lock only compaction takes for writing: it
/// needs the database to itself. Every transaction is begun and finished
/// under a read guard.
type Db = Arc<RwLock<Database>>;

fn db_guard(db: &Db) -> RwLockReadGuard<'_, Database> {
    db.read().unwrap_or_else(|e| e.into_inner())
}

/// Bytes of stored ticks, per tenant: counted at open, raised by each
/// commit and lowered by retention.
type Usage = Arc<std::sync::Mutex<HashMap<Arc<str>, u64>>>;

fn usage_lock(u: &Usage) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, u64>> {
    u.lock().unwrap_or_else(|e| e.into_inner())
}

/// The group log: one database, one writer thread.
#[derive(Debug, Clone)]
pub struct GroupLog {
    db: Db,
    usage: Usage,
    max_tenant_bytes: Option<u64>,
    tx: mpsc::Sender<Work>,
    /// Cursors queued and not yet committed, newest value per member.
    cursors: Arc<std::sync::Mutex<std::collections::HashMap<MemberKey, u64>>>,
    stats: Arc<LogStats>,
    writer_done: Arc<std::sync::atomic::AtomicBool>,
    max_queued: u64,
    epoch: u64,
}

impl GroupLog {
    /// Opens (or creates) the log at `path` and starts its writer. Rooms
    /// should refuse messages while more than `max_queued` wait for a commit
    /// ([`GroupLog::is_behind`]).
    pub fn open(path: &Path, commit_interval: Duration, max_queued: u64) -> Result<Self, LogError> {
        Self::open_with(path, commit_interval, max_queued, Retention::default())
    }

    /// [`GroupLog::open`], keeping what `retention` says.
    pub fn open_with(
        path: &Path,
        commit_interval: Duration,
        max_queued: u64,
        retention: Retention,
    ) -> Result<Self, LogError> {
        let open_err = |reason: String| LogError::Open {
            path: path.to_owned(),
            reason,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| open_err(e.to_string()))?;
        }
        let db = Database::create(path).map_err(|e| open_err(e.to_string()))?;
        let epoch;
        {
            // Make sure the tables exist so readers never race their creation.
            let w = db.begin_write().map_err(|e| open_err(e.to_string()))?;
            w.open_table(TICKS).map_err(|e| open_err(e.to_string()))?;
            w.open_table(MEMBERS).map_err(|e| open_err(e.to_string()))?;
            w.open_table(JOINED).map_err(|e| open_err(e.to_string()))?;
            w.open_table(AGES).map_err(|e| open_err(e.to_string()))?;
            w.open_table(PRUNED).map_err(|e| open_err(e.to_string()))?;
            w.open_table(HEADS).map_err(|e| open_err(e.to_string()))?;
            let mut meta = w.open_table(META).map_err(|e| open_err(e.to_string()))?;
            let made = meta
                .get("epoch")
                .map_err(|e| open_err(e.to_string()))?
                .map(|v| v.value());
            epoch = match made {
                Some(epoch) => epoch,
                None => {
                    let now = crate::unix_now_ms().max(1);
                    meta.insert("epoch", now).map_err(|e| open_err(e.to_string()))?;
                    now
                }
            };
            drop(meta);
            w.commit().map_err(|e| open_err(e.to_string()))?;
        }
        let usage: Usage =
            Arc::new(std::sync::Mutex::new(tenant_usage(&db).map_err(|e| {
                open_err(format!("cannot count what each tenant stores: {e}"))
            })?));
        let max_tenant_bytes = retention.max_tenant_bytes;
        let db = Arc::new(RwLock::new(db));
        let (tx, rx) = mpsc::channel();
        let stats = Arc::new(LogStats::default());
        let writer_db = Arc::clone(&db);
        let writer_stats = Arc::clone(&stats);
        let cursors = Arc::default();
        let writer_cursors = Arc::clone(&cursors);
        let writer_done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let done = Arc::clone(&writer_done);
        let writer_usage = Arc::clone(&usage);
        std::thread::Builder::new()
            .name("throng-group-log".into())
            .spawn(move || {
                let mut writer = Writer {
                    db: writer_db,
                    stats: writer_stats,
                    usage: writer_usage,
                    overlay: writer_cursors,
                    retention,
                    touched: HashMap::new(),
                    pruned_at: Instant::now(),
                    freed_since_compaction: 0,
                    compacted_at: Instant::now(),
                };
                writer.run(rx, commit_interval);
                done.store(true, Ordering::Release);
            })
            .map_err(|e| open_err(format!("cannot start the writer thread: {e}")))?;
        Ok(Self {
            db,
            usage,
            max_tenant_bytes,
            tx,
            cursors,
            stats,
            writer_done,
            max_queued,
            epoch,
        })
    }

    /// Bytes of `tenant`'s stored ticks.
    pub fn tenant_bytes(&self, tenant: &str) -> u64 {
        usage_lock(&self.usage).get(tenant).copied().unwrap_or(0)
    }

    /// Whether `tenant` stores as much as `max_tenant_bytes` allows: its
    /// rooms should refuse new messages until retention frees some.
    pub fn tenant_full(&self, tenant: &str) -> bool {
        self.max_tenant_bytes
            .is_some_and(|max| self.tenant_bytes(tenant) >= max)
    }

    /// The numbering this log's sequence numbers belong to (see `META`).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Drops this handle; if it was the last one, waits (bounded) until the
    /// writer has committed what was queued and closed the database, so the
    /// same file can be opened again (an edge restarting in-process).
    pub fn close(self, limit: Duration) -> bool {
        let done = Arc::clone(&self.writer_done);
        drop(self);
        let start = Instant::now();
        while !done.load(Ordering::Acquire) {
            if start.elapsed() >= limit {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }

    pub fn stats(&self) -> &Arc<LogStats> {
        &self.stats
    }

    /// Queues messages for the next group commit, with `head`, the highest
    /// number the room handed out with them; `committed` is raised to it
    /// once they are on disk.
    pub fn append(
        &self,
        tenant: &Arc<str>,
        room: &Arc<str>,
        messages: Vec<Message>,
        head: u64,
        committed: &Arc<Commit>,
    ) {
        if let Some(work) = append_work(&self.stats, tenant, room, messages, head, committed) {
            let _ = self.tx.send(work);
        }
    }

    /// Records `user` as a member of the room whose cursor is at least
    /// `seq` (cursors never move back).
    pub fn set_cursor(&self, tenant: &Arc<str>, room: &Arc<str>, user: &Arc<str>, seq: u64) {
        let _ = self.tx.send(cursor_work(&self.cursors, tenant, room, user, seq));
    }

    /// A member's cursor, or `None` if `user` is not a member of the room.
    pub fn cursor(&self, tenant: &str, room: &str, user: &str) -> Result<Option<u64>, LogError> {
        let pending = {
            let p = self.cursors.lock().unwrap_or_else(|e| e.into_inner());
            p.get(&(Arc::from(tenant), Arc::from(room), Arc::from(user))).copied()
        };
        let db = db_guard(&self.db);
        let r = db.begin_read().map_err(read_err)?;
        let t = r.open_table(MEMBERS).map_err(read_err)?;
        let stored = t.get((tenant, room, user)).map_err(read_err)?.map(|v| v.value());
        Ok(pending.max(stored))
    }

    /// Makes `user` a member of the room unless it has `max_members`
    /// already; the check and the insert are one write transaction, so the
    /// cap is exact under concurrent joins. A member is only looked up.
    pub fn admit(&self, tenant: &str, room: &str, user: &str, max_members: u64) -> Result<Admission, LogError> {
        let joined_at = |db: &Database| -> Result<u64, LogError> {
            let r = db.begin_read().map_err(read_err)?;
            let t = r.open_table(JOINED).map_err(read_err)?;
            Ok(t.get((tenant, room, user)).map_err(read_err)?.map_or(0, |v| v.value()))
        };
        if let Some(cursor) = self.cursor(tenant, room, user)? {
            let joined_at = joined_at(&db_guard(&self.db))?;
            return Ok(Admission::Member { cursor, joined_at });
        }
        let db = db_guard(&self.db);
        let w = db.begin_write().map_err(write_err)?;
        let admission = {
            let mut members = w.open_table(MEMBERS).map_err(write_err)?;
            let existing = members.get((tenant, room, user)).map_err(write_err)?.map(|v| v.value());
            let count = count_members(&members, tenant, room)?;
            if let Some(cursor) = existing {
                // Made a member by a join that won the race to the lock.
                Admission::Member { cursor, joined_at: 0 }
            } else if count >= max_members {
                Admission::Full { members: count }
            } else {
                let at = last_seq_in(&w, tenant, room)?;
                members.insert((tenant, room, user), at).map_err(write_err)?;
                w.open_table(JOINED)
                    .map_err(write_err)?
                    .insert((tenant, room, user), at)
                    .map_err(write_err)?;
                Admission::New { joined_at: at }
            }
        };
        match admission {
            Admission::New { .. } => w.commit().map_err(write_err)?,
            Admission::Member { cursor, .. } => {
                w.abort().map_err(write_err)?;
                return Ok(Admission::Member {
                    cursor,
                    joined_at: joined_at(&db)?,
                });
            }
            Admission::Full { .. } => w.abort().map_err(write_err)?,
        }
        Ok(admission)
    }

    /// How many members a room has (committed ones: a member joining in the
    /// same commit interval may not count yet).
    pub fn member_count(&self, tenant: &str, room: &str) -> Result<u64, LogError> {
        let db = db_guard(&self.db);
        let r = db.begin_read().map_err(read_err)?;
        let t = r.open_table(MEMBERS).map_err(read_err)?;
        count_members(&t, tenant, room)
    }

    /// Whether so many messages wait for a commit that rooms should refuse
    /// more (the disk is slow or failing).
    pub fn is_behind(&self) -> bool {
        self.stats.queued_messages.load(Ordering::Relaxed) >= self.max_queued
    }

    /// Counts messages a room refused because the log was behind.
    pub fn refused(&self, n: u64) {
        self.stats.refused.fetch_add(n, Ordering::Relaxed);
        metrics::counter!("throng_group_log_refused_total").increment(n);
    }

    /// The highest sequence number a room has committed (0 if none),
    /// retained or not.
    pub fn last_seq(&self, tenant: &str, room: &str) -> Result<u64, LogError> {
        let db = db_guard(&self.db);
        let r = db.begin_read().map_err(read_err)?;
        let ticks = r.open_table(TICKS).map_err(read_err)?;
        let pruned = r.open_table(PRUNED).map_err(read_err)?;
        let heads = r.open_table(HEADS).map_err(read_err)?;
        last_seq_of(&ticks, &pruned, &heads, tenant, room)
    }

    /// The highest sequence retention removed from a room (0 if none):
    /// a catch-up from at or below it lost that much.
    pub fn pruned_through(&self, tenant: &str, room: &str) -> Result<u64, LogError> {
        let db = db_guard(&self.db);
        let r = db.begin_read().map_err(read_err)?;
        let t = r.open_table(PRUNED).map_err(read_err)?;
        Ok(t.get((tenant, room)).map_err(read_err)?.map_or(0, |v| v.value()))
    }

    /// Up to `limit` messages of a room with `from <= seq <= to`, in order.
    pub fn read(&self, tenant: &str, room: &str, from: u64, to: u64, limit: usize) -> Result<Vec<Message>, LogError> {
        if from > to {
            return Ok(Vec::new());
        }
        let db = db_guard(&self.db);
        let r = db.begin_read().map_err(|e| LogError::Read(e.to_string()))?;
        let t = r.open_table(TICKS).map_err(|e| LogError::Read(e.to_string()))?;
        // The tick holding `from` starts at or before it; later ticks start
        // after it.
        let mut out = Vec::new();
        let first = t
            .range((tenant, room, 0)..=(tenant, room, from))
            .map_err(|e| LogError::Read(e.to_string()))?
            .next_back();
        let later = t
            .range((tenant, room, from.saturating_add(1))..=(tenant, room, to))
            .map_err(|e| LogError::Read(e.to_string()))?;
        for entry in first.into_iter().chain(later) {
            let (_, v) = entry.map_err(|e| LogError::Read(e.to_string()))?;
            for m in decode(v.value())? {
                if m.seq >= from && m.seq <= to {
                    out.push(m);
                    if out.len() == limit {
                        return Ok(out);
                    }
                }
            }
        }
        Ok(out)
    }
}

/// Bytes of stored ticks per tenant, read once at open.
fn tenant_usage(db: &Database) -> Result<HashMap<Arc<str>, u64>, String> {
    let r = db.begin_read().map_err(|e| e.to_string())?;
    let t = r.open_table(TICKS).map_err(|e| e.to_string())?;
    let mut usage: HashMap<Arc<str>, u64> = HashMap::new();
    for entry in t.iter().map_err(|e| e.to_string())? {
        let (k, v) = entry.map_err(|e| e.to_string())?;
        let tenant = k.value().0;
        let n = v.value().len() as u64;
        match usage.get_mut(tenant) {
            Some(u) => *u += n,
            None => {
                usage.insert(Arc::from(tenant), n);
            }
        }
    }
    Ok(usage)
}

fn decode(bytes: &[u8]) -> Result<Vec<Message>, LogError> {
    postcard::from_bytes(bytes).map_err(|e| LogError::Read(format!("corrupt log entry: {e}")))
}

type Overlay = Arc<std::sync::Mutex<HashMap<MemberKey, u64>>>;

fn count_members(
    t: &impl ReadableTable<(&'static str, &'static str, &'static str), u64>,
    tenant: &str,
    room: &str,
) -> Result<u64, LogError> {
    let range = t.range((tenant, room, "")..).map_err(read_err)?;
    let mut n = 0;
    for entry in range {
        let (k, _) = entry.map_err(read_err)?;
        let (t2, r2, _) = k.value();
        if t2 != tenant || r2 != room {
            break;
        }
        n += 1;
    }
    Ok(n)
}

fn last_seq_of(
    ticks: &impl ReadableTable<(&'static str, &'static str, u64), &'static [u8]>,
    pruned: &impl ReadableTable<(&'static str, &'static str), u64>,
    heads: &impl ReadableTable<(&'static str, &'static str), u64>,
    tenant: &str,
    room: &str,
) -> Result<u64, LogError> {
    let pruned = pruned.get((tenant, room)).map_err(read_err)?.map_or(0, |v| v.value());
    let head = heads.get((tenant, room)).map_err(read_err)?.map_or(0, |v| v.value());
    let pruned = pruned.max(head);
    let mut range = ticks
        .range((tenant, room, 0)..=(tenant, room, u64::MAX))
        .map_err(read_err)?;
    let stored = match range.next_back() {
        Some(Ok((_, v))) => decode(v.value())?.last().map_or(0, |m| m.seq),
        Some(Err(e)) => return Err(read_err(e)),
        None => 0,
    };
    Ok(stored.max(pruned))
}

fn last_seq_in(w: &WriteTransaction, tenant: &str, room: &str) -> Result<u64, LogError> {
    let ticks = w.open_table(TICKS).map_err(write_err)?;
    let pruned = w.open_table(PRUNED).map_err(write_err)?;
    let heads = w.open_table(HEADS).map_err(write_err)?;
    last_seq_of(&ticks, &pruned, &heads, tenant, room)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The writer thread's state.
struct Writer {
    db: Db,
    stats: Arc<LogStats>,
    usage: Usage,
    overlay: Overlay,
    retention: Retention,
    /// Rooms appended to since their last count-based pruning, with their
    /// last committed sequence.
    touched: HashMap<(Arc<str>, Arc<str>), u64>,
    pruned_at: Instant,
    /// Ticks removed since the last compaction.
    freed_since_compaction: u64,
    compacted_at: Instant,
}

impl Writer {
    fn run(&mut self, rx: mpsc::Receiver<Work>, interval: Duration) {
        let mut batch: Vec<Append> = Vec::new();
        let mut cursors: HashMap<MemberKey, u64> = HashMap::new();
        let take = |work: Work, batch: &mut Vec<Append>, cursors: &mut HashMap<MemberKey, u64>| match work {
            Work::Append(a) => batch.push(a),
            Work::Cursor(key, seq) => raise(cursors, key, seq),
        };
        let mut warned: Option<Instant> = None;
        let retaining = self.retention.max_age.is_some() || self.retention.max_messages.is_some();
        loop {
            // Wait for the first append, then gather what else arrives within the
            // interval, so one commit (one fsync) covers every room's ticks. With
            // retention on, wake now and then even when idle: ticks age out
            // without new appends.
            let first = if retaining {
                match rx.recv_timeout(PRUNE_INTERVAL) {
                    Ok(w) => Some(w),
                    Err(mpsc::RecvTimeoutError::Timeout) => None,
                    Err(mpsc::RecvTimeoutError::Disconnected) => return,
                }
            } else {
                match rx.recv() {
                    Ok(w) => Some(w),
                    Err(_) => return,
                }
            };
            if let Some(w) = first {
                take(w, &mut batch, &mut cursors);
                let deadline = Instant::now() + interval;
                loop {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    match rx.recv_timeout(left) {
                        Ok(w) => take(w, &mut batch, &mut cursors),
                        Err(mpsc::RecvTimeoutError::Timeout) => break,
                        Err(mpsc::RecvTimeoutError::Disconnected) => break,
                    }
                }
                if let Err(e) = self.commit(&batch, &cursors) {
                    // The messages stay un-committed; their rooms keep them in memory
                    // and the failure is loud. Retrying the same batch next round.
                    tracing::error!(error = %e, appends = batch.len(), "group log commit failed; will retry");
                    std::thread::sleep(interval.max(Duration::from_millis(10)));
                    continue;
                }
                self.committed(&mut batch, &mut cursors, &mut warned);
            }
            if retaining && self.pruned_at.elapsed() >= PRUNE_INTERVAL {
                self.pruned_at = Instant::now();
                match self.prune() {
                    Ok(n) => self.freed_since_compaction += n,
                    Err(e) => tracing::error!(error = %e, "group log retention pass failed; will retry"),
                }
                self.maybe_compact();
            }
        }
    }

    /// Bookkeeping after a successful commit.
    fn committed(
        &mut self,
        batch: &mut Vec<Append>,
        cursors: &mut HashMap<MemberKey, u64>,
        warned: &mut Option<Instant>,
    ) {
        let stats = &self.stats;
        let now = Instant::now();
        stats.commits.fetch_add(1, Ordering::Relaxed);
        let queued = stats.queued.fetch_sub(batch.len() as u64, Ordering::Relaxed) - batch.len() as u64;
        let messages: u64 = batch.iter().map(|a| a.messages.len() as u64).sum();
        stats.queued_messages.fetch_sub(messages, Ordering::Relaxed);
        metrics::gauge!("throng_group_log_queued").set(queued as f64);
        if queued > QUEUE_WARN && warned.is_none_or(|t| now.duration_since(t) > Duration::from_secs(10)) {
            *warned = Some(now);
            tracing::warn!(
                queued,
                "the group log is falling behind: acks are further from disk than the commit interval"
            );
        }
        for a in batch.drain(..) {
            let window = now.duration_since(a.queued_at).as_micros() as u64;
            stats.max_window_us.fetch_max(window, Ordering::Relaxed);
            stats.total_window_us.fetch_add(window, Ordering::Relaxed);
            stats.appends.fetch_add(1, Ordering::Relaxed);
            stats.messages.fetch_add(a.messages.len() as u64, Ordering::Relaxed);
            a.committed.raise(a.head);
            if let Some(last) = a.messages.last()
                && self.retention.max_messages.is_some()
            {
                let e = self.touched.entry((a.tenant, a.room)).or_insert(0);
                *e = (*e).max(last.seq);
            }
        }
        if !cursors.is_empty() {
            stats.cursors.fetch_add(cursors.len() as u64, Ordering::Relaxed);
            // Committed cursors need no overlay, unless a newer one came in.
            let mut pending = self.overlay.lock().unwrap_or_else(|e| e.into_inner());
            for (key, seq) in cursors.drain() {
                if pending.get(&key).is_some_and(|&p| p <= seq) {
                    pending.remove(&key);
                }
            }
        }
        metrics::counter!("throng_group_log_commits_total").increment(1);
    }

    fn commit(&self, batch: &[Append], cursors: &HashMap<MemberKey, u64>) -> Result<(), String> {
        let mut added: HashMap<Arc<str>, u64> = HashMap::new();
        let db = db_guard(&self.db);
        let w = db.begin_write().map_err(|e| e.to_string())?;
        if !cursors.is_empty() {
            let mut t = w.open_table(MEMBERS).map_err(|e| e.to_string())?;
            for ((tenant, room, user), &seq) in cursors {
                let key = (&**tenant, &**room, &**user);
                let old = t.get(key).map_err(|e| e.to_string())?.map(|v| v.value());
                // Only members have cursors (admit makes them): a cursor
                // never makes a member, so the count stays exact, and it
                // never moves back.
                if old.is_some_and(|o| o < seq) {
                    t.insert(key, seq).map_err(|e| e.to_string())?;
                }
            }
        }
        {
            let mut t = w.open_table(TICKS).map_err(|e| e.to_string())?;
            let mut ages = w.open_table(AGES).map_err(|e| e.to_string())?;
            let mut heads = w.open_table(HEADS).map_err(|e| e.to_string())?;
            let now = now_ms();
            for a in batch {
                let key = (&*a.tenant, &*a.room);
                let head = heads.get(key).map_err(|e| e.to_string())?.map_or(0, |v| v.value());
                if a.head > head {
                    heads.insert(key, a.head).map_err(|e| e.to_string())?;
                }
                let Some(first) = a.messages.first() else { continue };
                let bytes = postcard::to_allocvec(&a.messages).map_err(|e| e.to_string())?;
                t.insert((&*a.tenant, &*a.room, first.seq), bytes.as_slice())
                    .map_err(|e| e.to_string())?;
                *added.entry(Arc::clone(&a.tenant)).or_insert(0) += bytes.len() as u64;
                if self.retention.max_age.is_some() {
                    ages.insert((now, &*a.tenant, &*a.room, first.seq), ())
                        .map_err(|e| e.to_string())?;
                }
            }
        }
        w.commit().map_err(|e| e.to_string())?;
        let mut usage = usage_lock(&self.usage);
        for (tenant, n) in added {
            *usage.entry(tenant).or_insert(0) += n;
        }
        Ok(())
    }

    /// One retention pass, at most [`PRUNE_BUDGET`] ticks; returns how many
    /// it removed.
    fn prune(&mut self) -> Result<u64, LogError> {
        let db = db_guard(&self.db);
        let w = db.begin_write().map_err(write_err)?;
        let mut budget = PRUNE_BUDGET;
        let mut removed = 0u64;
        let mut freed: HashMap<Arc<str>, u64> = HashMap::new();
        {
            let mut ticks = w.open_table(TICKS).map_err(write_err)?;
            let mut pruned = w.open_table(PRUNED).map_err(write_err)?;
            let mut marks: BTreeMap<(Arc<str>, Arc<str>), u64> = BTreeMap::new();
            if let Some(max) = self.retention.max_messages {
                let rooms: Vec<_> = self.touched.iter().map(|(k, v)| (k.clone(), *v)).collect();
                for ((tenant, room), last) in rooms {
                    if budget == 0 {
                        break;
                    }
                    let cutoff = last.saturating_sub(max);
                    // Tick i ends where tick i+1 starts: every tick but the
                    // last one starting at or below cutoff + 1 ends at or
                    // below the cutoff.
                    let starts: Vec<u64> = ticks
                        .range((&*tenant, &*room, 0)..=(&*tenant, &*room, cutoff.saturating_add(1)))
                        .map_err(write_err)?
                        .take(budget + 1)
                        .map(|e| e.map(|(k, _)| k.value().2).map_err(write_err))
                        .collect::<Result<_, _>>()?;
                    let whole = starts.len() == budget + 1;
                    if let Some((&next, gone)) = starts.split_last() {
                        for &first in gone {
                            if let Some(v) = ticks.remove((&*tenant, &*room, first)).map_err(write_err)? {
                                *freed.entry(Arc::clone(&tenant)).or_insert(0) += v.value().len() as u64;
                            }
                        }
                        if !gone.is_empty() {
                            let mark = marks.entry((tenant.clone(), room.clone())).or_insert(0);
                            *mark = (*mark).max(next - 1);
                            removed += gone.len() as u64;
                            budget -= gone.len();
                        }
                    }
                    if !whole {
                        self.touched.remove(&(tenant, room));
                    }
                }
            }
            if let Some(max_age) = self.retention.max_age {
                let cutoff = now_ms().saturating_sub(max_age.as_millis() as u64);
                let mut ages = w.open_table(AGES).map_err(write_err)?;
                let old: Vec<(u64, String, String, u64)> = ages
                    .range((0, "", "", 0)..(cutoff, "", "", 0))
                    .map_err(write_err)?
                    .take(budget)
                    .map(|e| {
                        e.map(|(k, _)| {
                            let (ms, t, r, s) = k.value();
                            (ms, t.to_owned(), r.to_owned(), s)
                        })
                        .map_err(write_err)
                    })
                    .collect::<Result<_, _>>()?;
                for (ms, tenant, room, first) in old {
                    ages.remove((ms, tenant.as_str(), room.as_str(), first))
                        .map_err(write_err)?;
                    let last = match ticks
                        .remove((tenant.as_str(), room.as_str(), first))
                        .map_err(write_err)?
                    {
                        Some(v) => {
                            *freed.entry(Arc::from(tenant.as_str())).or_insert(0) += v.value().len() as u64;
                            decode(v.value())?.last().map_or(first, |m| m.seq)
                        }
                        None => continue, // removed by count already
                    };
                    let mark = marks.entry((Arc::from(tenant), Arc::from(room))).or_insert(0);
                    *mark = (*mark).max(last);
                    removed += 1;
                }
            }
            for ((tenant, room), mark) in marks {
                let old = pruned
                    .get((&*tenant, &*room))
                    .map_err(write_err)?
                    .map_or(0, |v| v.value());
                if mark > old {
                    pruned.insert((&*tenant, &*room), mark).map_err(write_err)?;
                }
            }
        }
        if removed == 0 {
            w.abort().map_err(write_err)?;
            return Ok(0);
        }
        w.commit().map_err(write_err)?;
        let mut usage = usage_lock(&self.usage);
        for (tenant, n) in freed {
            if let Some(u) = usage.get_mut(&tenant) {
                *u = u.saturating_sub(n);
            }
        }
        drop(usage);
        self.stats.pruned_ticks.fetch_add(removed, Ordering::Relaxed);
        metrics::counter!("throng_group_log_pruned_ticks_total").increment(removed);
        Ok(removed)
    }

    /// Compacts the file if retention freed something and the last
    /// compaction is long enough ago. Readers and writers wait meanwhile.
    fn maybe_compact(&mut self) {
        if self.freed_since_compaction == 0 || self.compacted_at.elapsed() < self.retention.compact_interval {
            return;
        }
        let start = Instant::now();
        let mut db = self.db.write().unwrap_or_else(|e| e.into_inner());
        self.compacted_at = Instant::now();
        match db.compact() {
            Ok(_) => {
                self.freed_since_compaction = 0;
                self.stats.compactions.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("throng_group_log_compactions_total").increment(1);
                tracing::info!(ms = start.elapsed().as_millis() as u64, "group log compacted");
            }
            // A reader is in a transaction: try again after the interval.
            Err(e) => tracing::warn!(error = %e, "group log compaction skipped"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use throng_wire::Kind;

    fn msg(seq: u64) -> Message {
        Message {
            seq,
            sender: "u".into(),
            kind: Kind::Chat,
            body: format!("m{seq}").into_bytes(),
        }
    }

    #[test]
    fn appends_commit_in_groups_and_read_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.redb");
        let log = GroupLog::open(&path, Duration::from_millis(5), u64::MAX).unwrap();
        let (t, r): (Arc<str>, Arc<str>) = (Arc::from("acme"), Arc::from("g1"));
        let other: Arc<str> = Arc::from("g2");
        let committed = Commit::new(0, 0);
        let committed2 = Commit::new(0, 0);
        // Ticks of several messages, with a gap (3 was a like, say).
        log.append(&t, &r, vec![msg(1), msg(2), msg(4)], 4, &committed);
        log.append(&t, &r, vec![msg(5)], 5, &committed);
        log.append(&t, &r, (6..=10).map(msg).collect(), 10, &committed);
        log.append(&t, &other, vec![msg(1)], 1, &committed2);
        let start = Instant::now();
        while committed.stored() < 10 && start.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(committed.stored(), 10);
        assert_eq!(log.last_seq("acme", "g1").unwrap(), 10);
        let start = Instant::now();
        while log.stats().queued.load(Ordering::Relaxed) != 0 && start.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(
            log.stats().queued.load(Ordering::Relaxed),
            0,
            "every append was committed"
        );
        assert_eq!(log.last_seq("acme", "g2").unwrap(), 1);
        assert_eq!(log.last_seq("acme", "nope").unwrap(), 0);
        let seqs = |from, to| -> Vec<u64> {
            log.read("acme", "g1", from, to, 100)
                .unwrap()
                .iter()
                .map(|m| m.seq)
                .collect()
        };
        assert_eq!(seqs(3, 8), vec![4, 5, 6, 7, 8], "from inside a tick, across a gap");
        assert_eq!(seqs(2, 2), vec![2]);
        assert!(seqs(11, 20).is_empty());
        assert_eq!(log.read("acme", "g1", 1, 10, 3).unwrap().len(), 3);
        drop(log);
        // Reopened, it is all still there.
        std::thread::sleep(Duration::from_millis(20));
        let again = GroupLog::open(&path, Duration::from_millis(5), u64::MAX);
        // The first writer thread may still hold the file briefly.
        let again = match again {
            Ok(l) => l,
            Err(_) => {
                std::thread::sleep(Duration::from_millis(200));
                GroupLog::open(&path, Duration::from_millis(5), u64::MAX).unwrap()
            }
        };
        assert_eq!(again.last_seq("acme", "g1").unwrap(), 10);
    }
}
