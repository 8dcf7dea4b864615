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
//! **What an ack promises.** A group room acks a message when it is
//! sequenced, before it is on disk: the ack promises order (its sequence
//! number) and that the message is committed within the durability window,
//! one `commit_interval` plus one commit (fsync), unless the edge dies in
//! that window. BENCHMARKS.md has the measured window.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use thiserror::Error;
use throng_wire::Message;

/// (tenant, room, first seq) → one tick's messages, postcard-encoded
/// `Vec<Message>` in sequence order. One entry per room tick, not per
/// message: a commit of many rooms' ticks is then a few B-tree inserts.
const TICKS: TableDefinition<(&str, &str, u64), &[u8]> = TableDefinition::new("ticks");

/// (tenant, room, user) → the member's cursor.
const MEMBERS: TableDefinition<(&str, &str, &str), u64> = TableDefinition::new("members");

type MemberKey = (Arc<str>, Arc<str>, Arc<str>);

/// What the writer thread is handed.
enum Work {
    Append(Append),
    Cursor(MemberKey, u64),
}

#[derive(Debug, Error)]
pub enum LogError {
    #[error("cannot open the group log {path}: {reason}")]
    Open { path: PathBuf, reason: String },
    #[error("group log read failed: {0}")]
    Read(String),
}

/// One room's batch of messages waiting for the next commit.
struct Append {
    tenant: Arc<str>,
    room: Arc<str>,
    messages: Vec<Message>,
    committed: Arc<AtomicU64>,
    queued_at: Instant,
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
}

/// Above this many waiting appends the writer warns (at most every 10 s).
const QUEUE_WARN: u64 = 100_000;

/// The group log: one database, one writer thread.
#[derive(Debug, Clone)]
pub struct GroupLog {
    db: Arc<Database>,
    tx: mpsc::Sender<Work>,
    /// Cursors queued and not yet committed, newest value per member.
    cursors: Arc<std::sync::Mutex<std::collections::HashMap<MemberKey, u64>>>,
    stats: Arc<LogStats>,
    writer_done: Arc<std::sync::atomic::AtomicBool>,
    max_queued: u64,
}

impl GroupLog {
    /// Opens (or creates) the log at `path` and starts its writer. Rooms
    /// should refuse messages while more than `max_queued` wait for a commit
    /// ([`GroupLog::is_behind`]).
    pub fn open(path: &Path, commit_interval: Duration, max_queued: u64) -> Result<Self, LogError> {
        let open_err = |reason: String| LogError::Open {
            path: path.to_owned(),
            reason,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| open_err(e.to_string()))?;
        }
        let db = Arc::new(Database::create(path).map_err(|e| open_err(e.to_string()))?);
        {
            // Make sure the table exists so readers never race its creation.
            let w = db.begin_write().map_err(|e| open_err(e.to_string()))?;
            w.open_table(TICKS).map_err(|e| open_err(e.to_string()))?;
            w.open_table(MEMBERS).map_err(|e| open_err(e.to_string()))?;
            w.commit().map_err(|e| open_err(e.to_string()))?;
        }
        let (tx, rx) = mpsc::channel();
        let stats = Arc::new(LogStats::default());
        let writer_db = Arc::clone(&db);
        let writer_stats = Arc::clone(&stats);
        let cursors = Arc::default();
        let writer_cursors = Arc::clone(&cursors);
        let writer_done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let done = Arc::clone(&writer_done);
        std::thread::Builder::new()
            .name("throng-group-log".into())
            .spawn(move || {
                writer(writer_db, rx, commit_interval, writer_stats, writer_cursors);
                done.store(true, Ordering::Release);
            })
            .map_err(|e| open_err(format!("cannot start the writer thread: {e}")))?;
        Ok(Self {
            db,
            tx,
            cursors,
            stats,
            writer_done,
            max_queued,
        })
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

    /// Queues messages for the next group commit; `committed` is raised to
    /// the highest committed sequence of this room afterwards.
    pub fn append(&self, tenant: &Arc<str>, room: &Arc<str>, messages: Vec<Message>, committed: &Arc<AtomicU64>) {
        if messages.is_empty() {
            return;
        }
        self.stats.queued.fetch_add(1, Ordering::Relaxed);
        self.stats
            .queued_messages
            .fetch_add(messages.len() as u64, Ordering::Relaxed);
        let _ = self.tx.send(Work::Append(Append {
            tenant: Arc::clone(tenant),
            room: Arc::clone(room),
            messages,
            committed: Arc::clone(committed),
            queued_at: Instant::now(),
        }));
    }

    /// Records `user` as a member of the room whose cursor is at least
    /// `seq` (cursors never move back).
    pub fn set_cursor(&self, tenant: &Arc<str>, room: &Arc<str>, user: &Arc<str>, seq: u64) {
        let key = (Arc::clone(tenant), Arc::clone(room), Arc::clone(user));
        {
            let mut pending = self.cursors.lock().unwrap_or_else(|e| e.into_inner());
            let v = pending.entry(key.clone()).or_insert(seq);
            *v = (*v).max(seq);
        }
        let _ = self.tx.send(Work::Cursor(key, seq));
    }

    /// A member's cursor, or `None` if `user` is not a member of the room.
    pub fn cursor(&self, tenant: &str, room: &str, user: &str) -> Result<Option<u64>, LogError> {
        let pending = {
            let p = self.cursors.lock().unwrap_or_else(|e| e.into_inner());
            p.get(&(Arc::from(tenant), Arc::from(room), Arc::from(user))).copied()
        };
        let r = self.db.begin_read().map_err(|e| LogError::Read(e.to_string()))?;
        let t = r.open_table(MEMBERS).map_err(|e| LogError::Read(e.to_string()))?;
        let stored = t
            .get((tenant, room, user))
            .map_err(|e| LogError::Read(e.to_string()))?
            .map(|v| v.value());
        Ok(pending.max(stored))
    }

    /// How many members a room has (committed ones: a member joining in the
    /// same commit interval may not count yet).
    pub fn member_count(&self, tenant: &str, room: &str) -> Result<u64, LogError> {
        let r = self.db.begin_read().map_err(|e| LogError::Read(e.to_string()))?;
        let t = r.open_table(MEMBERS).map_err(|e| LogError::Read(e.to_string()))?;
        let range = t
            .range((tenant, room, "")..)
            .map_err(|e| LogError::Read(e.to_string()))?;
        let mut n = 0;
        for entry in range {
            let (k, _) = entry.map_err(|e| LogError::Read(e.to_string()))?;
            let (t2, r2, _) = k.value();
            if t2 != tenant || r2 != room {
                break;
            }
            n += 1;
        }
        Ok(n)
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

    /// The highest sequence number stored for a room (0 if none).
    pub fn last_seq(&self, tenant: &str, room: &str) -> Result<u64, LogError> {
        let r = self.db.begin_read().map_err(|e| LogError::Read(e.to_string()))?;
        let t = r.open_table(TICKS).map_err(|e| LogError::Read(e.to_string()))?;
        let mut range = t
            .range((tenant, room, 0)..=(tenant, room, u64::MAX))
            .map_err(|e| LogError::Read(e.to_string()))?;
        match range.next_back() {
            Some(Ok((_, v))) => Ok(decode(v.value())?.last().map_or(0, |m| m.seq)),
            Some(Err(e)) => Err(LogError::Read(e.to_string())),
            None => Ok(0),
        }
    }

    /// Up to `limit` messages of a room with `from <= seq <= to`, in order.
    pub fn read(&self, tenant: &str, room: &str, from: u64, to: u64, limit: usize) -> Result<Vec<Message>, LogError> {
        if from > to {
            return Ok(Vec::new());
        }
        let r = self.db.begin_read().map_err(|e| LogError::Read(e.to_string()))?;
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

fn decode(bytes: &[u8]) -> Result<Vec<Message>, LogError> {
    postcard::from_bytes(bytes).map_err(|e| LogError::Read(format!("corrupt log entry: {e}")))
}

type Overlay = Arc<std::sync::Mutex<std::collections::HashMap<MemberKey, u64>>>;

fn writer(db: Arc<Database>, rx: mpsc::Receiver<Work>, interval: Duration, stats: Arc<LogStats>, overlay: Overlay) {
    let mut batch: Vec<Append> = Vec::new();
    let mut cursors: std::collections::HashMap<MemberKey, u64> = std::collections::HashMap::new();
    let take = |work: Work, batch: &mut Vec<Append>, cursors: &mut std::collections::HashMap<MemberKey, u64>| match work
    {
        Work::Append(a) => batch.push(a),
        Work::Cursor(key, seq) => {
            let v = cursors.entry(key).or_insert(seq);
            *v = (*v).max(seq);
        }
    };
    let mut warned: Option<Instant> = None;
    loop {
        // Wait for the first append, then gather what else arrives within the
        // interval, so one commit (one fsync) covers every room's ticks.
        match rx.recv() {
            Ok(w) => take(w, &mut batch, &mut cursors),
            Err(_) => return,
        }
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
        if let Err(e) = commit(&db, &batch, &cursors) {
            // The messages stay un-committed; their rooms keep them in memory
            // and the failure is loud. Retrying the same batch next round.
            tracing::error!(error = %e, appends = batch.len(), "group log commit failed; will retry");
            std::thread::sleep(interval.max(Duration::from_millis(10)));
            continue;
        }
        let now = Instant::now();
        stats.commits.fetch_add(1, Ordering::Relaxed);
        let queued = stats.queued.fetch_sub(batch.len() as u64, Ordering::Relaxed) - batch.len() as u64;
        let messages: u64 = batch.iter().map(|a| a.messages.len() as u64).sum();
        stats.queued_messages.fetch_sub(messages, Ordering::Relaxed);
        metrics::gauge!("throng_group_log_queued").set(queued as f64);
        if queued > QUEUE_WARN && warned.is_none_or(|t| now.duration_since(t) > Duration::from_secs(10)) {
            warned = Some(now);
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
            if let Some(last) = a.messages.last() {
                a.committed.fetch_max(last.seq, Ordering::Release);
            }
        }
        if !cursors.is_empty() {
            // Committed cursors need no overlay, unless a newer one came in.
            let mut pending = overlay.lock().unwrap_or_else(|e| e.into_inner());
            for (key, seq) in cursors.drain() {
                if pending.get(&key).is_some_and(|&p| p <= seq) {
                    pending.remove(&key);
                }
            }
        }
        metrics::counter!("throng_group_log_commits_total").increment(1);
    }
}

fn commit(db: &Database, batch: &[Append], cursors: &std::collections::HashMap<MemberKey, u64>) -> Result<(), String> {
    let w = db.begin_write().map_err(|e| e.to_string())?;
    if !cursors.is_empty() {
        let mut t = w.open_table(MEMBERS).map_err(|e| e.to_string())?;
        for ((tenant, room, user), &seq) in cursors {
            let key = (&**tenant, &**room, &**user);
            let old = t.get(key).map_err(|e| e.to_string())?.map(|v| v.value());
            if old.is_none_or(|o| o < seq) {
                t.insert(key, seq).map_err(|e| e.to_string())?;
            }
        }
    }
    {
        let mut t = w.open_table(TICKS).map_err(|e| e.to_string())?;
        for a in batch {
            let Some(first) = a.messages.first() else { continue };
            let bytes = postcard::to_allocvec(&a.messages).map_err(|e| e.to_string())?;
            t.insert((&*a.tenant, &*a.room, first.seq), bytes.as_slice())
                .map_err(|e| e.to_string())?;
        }
    }
    w.commit().map_err(|e| e.to_string())
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
        let committed = Arc::new(AtomicU64::new(0));
        let committed2 = Arc::new(AtomicU64::new(0));
        // Ticks of several messages, with a gap (3 was a like, say).
        log.append(&t, &r, vec![msg(1), msg(2), msg(4)], &committed);
        log.append(&t, &r, vec![msg(5)], &committed);
        log.append(&t, &r, (6..=10).map(msg).collect(), &committed);
        log.append(&t, &other, vec![msg(1)], &committed2);
        let start = Instant::now();
        while committed.load(Ordering::Acquire) < 10 && start.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(committed.load(Ordering::Acquire), 10);
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
