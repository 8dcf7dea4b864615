//! What the load generator counts, and the send-time stamp in bodies.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{LazyLock, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

/// Latency histograms are sharded so thousands of viewer tasks do not all
/// queue on one lock; each records a whole batch under one lock.
const LATENCY_SHARDS: usize = 16;
/// Largest latency recorded exactly (µs); longer ones saturate here.
const MAX_LATENCY_US: u64 = 120_000_000;

/// Bytes of the hex stamp.
pub const STAMP_LEN: usize = 16;
/// Gift bodies start with the gift's name padded to this many bytes, because
/// the edge counts gifts by the first 32 bytes of the body: a stamp there
/// would make every gift a new name.
pub const GIFT_NAME_LEN: usize = 32;

/// Unix-epoch nanoseconds that advance with the monotonic clock. Senders and
/// viewers live in this one process, so latency is a difference of two
/// monotonic readings, yet the stamp still reads as a wall-clock time.
struct Clock {
    origin: Instant,
    epoch_ns: u64,
}

static CLOCK: LazyLock<Clock> = LazyLock::new(|| Clock {
    origin: Instant::now(),
    epoch_ns: std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0),
});

pub fn now_ns() -> u64 {
    let c = &*CLOCK;
    c.epoch_ns
        .saturating_add(u64::try_from(c.origin.elapsed().as_nanos()).unwrap_or(u64::MAX))
}

/// A message body: the send time as 16 lowercase hex digits (after the
/// padded gift name for gifts), padded with `.` to `len` bytes.
pub fn body(stamp_ns: u64, gift: Option<&str>, len: usize) -> Vec<u8> {
    let mut b = Vec::with_capacity(len);
    if let Some(name) = gift {
        b.extend(name.bytes().take(GIFT_NAME_LEN));
        b.resize(GIFT_NAME_LEN, b'_');
    }
    b.extend(format!("{stamp_ns:016x}").bytes());
    if b.len() < len {
        b.resize(len, b'.');
    }
    b
}

/// The send time in a body made by [`body`], if there is one.
pub fn stamp(body: &[u8]) -> Option<u64> {
    let at = |off: usize| {
        let hex = body.get(off..off + STAMP_LEN)?;
        let s = std::str::from_utf8(hex).ok()?;
        u64::from_str_radix(s, 16).ok()
    };
    at(0).or_else(|| at(GIFT_NAME_LEN))
}

fn histogram() -> Histogram<u64> {
    // Constant bounds that hdrhistogram accepts (1 ≤ low, high ≥ 2·low, 3 digits).
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("valid constant histogram bounds")
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A histogram or a string left by a panicking task is still usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Counters shared by every connection task of one run.
#[derive(Debug)]
pub struct Stats {
    /// Whether the measured window is open; only what arrives (or is sent)
    /// while it is counts in the window figures.
    pub measuring: AtomicBool,

    pub connected: AtomicU64,
    /// Viewers connected and in their room.
    pub viewers_ready: AtomicU64,
    pub failed: AtomicU64,
    pub join_failed: AtomicU64,
    /// Connection tasks that finished setup (joined, or gave up).
    pub settled: AtomicU64,
    /// When the last handshake finished, ns after the run's origin.
    pub last_connect_ns: AtomicU64,
    pub first_error: Mutex<Option<String>>,
    /// Room streams or connections that ended with an error mid-run.
    pub stream_errors: AtomicU64,

    /// Delivered since setup, window or not (for the progress line).
    pub frames_total: AtomicU64,
    pub messages_total: AtomicU64,

    pub frames: AtomicU64,
    pub messages: AtomicU64,
    pub missed: AtomicU64,
    pub bytes: AtomicU64,
    /// Delivered messages without a parsable stamp (not from this run).
    pub unstamped: AtomicU64,
    /// Encoded size of batches re-encoded by one viewer per room.
    pub sampled_frame_bytes: AtomicU64,
    pub sampled_frames: AtomicU64,
    latency: Vec<Mutex<Histogram<u64>>>,

    pub sent: AtomicU64,
    pub acked: AtomicU64,
    pub rejected: AtomicU64,
    /// Sends whose answer never came because the connection failed.
    pub ack_lost: AtomicU64,
    pub send_errors: AtomicU64,
    /// Messages not sent because a sender fell more than a second behind.
    pub send_skipped: AtomicU64,
    pub rejected_by: Mutex<std::collections::BTreeMap<String, u64>>,

    pub joins: AtomicU64,
    pub leaves: AtomicU64,
    pub churn_errors: AtomicU64,
    join_latency: Mutex<Histogram<u64>>,
}

impl Stats {
    pub fn new() -> Self {
        Self {
            measuring: AtomicBool::new(false),
            connected: AtomicU64::new(0),
            viewers_ready: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            join_failed: AtomicU64::new(0),
            settled: AtomicU64::new(0),
            last_connect_ns: AtomicU64::new(0),
            first_error: Mutex::new(None),
            stream_errors: AtomicU64::new(0),
            frames_total: AtomicU64::new(0),
            messages_total: AtomicU64::new(0),
            frames: AtomicU64::new(0),
            messages: AtomicU64::new(0),
            missed: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            unstamped: AtomicU64::new(0),
            sampled_frame_bytes: AtomicU64::new(0),
            sampled_frames: AtomicU64::new(0),
            latency: (0..LATENCY_SHARDS).map(|_| Mutex::new(histogram())).collect(),
            sent: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            ack_lost: AtomicU64::new(0),
            send_errors: AtomicU64::new(0),
            send_skipped: AtomicU64::new(0),
            rejected_by: Mutex::new(Default::default()),
            joins: AtomicU64::new(0),
            leaves: AtomicU64::new(0),
            churn_errors: AtomicU64::new(0),
            join_latency: Mutex::new(histogram()),
        }
    }

    pub fn measuring(&self) -> bool {
        self.measuring.load(Ordering::Relaxed)
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn error(&self, e: impl std::fmt::Display) {
        let mut first = lock(&self.first_error);
        if first.is_none() {
            *first = Some(e.to_string());
        }
    }

    pub fn first_error(&self) -> Option<String> {
        lock(&self.first_error).clone()
    }

    pub fn rejected_with(&self, reason: &str) {
        *lock(&self.rejected_by).entry(reason.to_owned()).or_default() += 1;
    }

    pub fn rejected_by(&self) -> std::collections::BTreeMap<String, u64> {
        lock(&self.rejected_by).clone()
    }

    /// Records the latencies of one batch, `now - stamp` for each stamp.
    pub fn record_latencies(&self, shard: usize, now_ns: u64, stamps: impl Iterator<Item = Option<u64>>) {
        let mut h = lock(&self.latency[shard % LATENCY_SHARDS]);
        let mut unstamped = 0;
        for s in stamps {
            match s {
                // A stamp from the future (another process's clock) counts as 0.
                Some(s) => h.saturating_record((now_ns.saturating_sub(s) / 1_000).max(1)),
                None => unstamped += 1,
            }
        }
        drop(h);
        if unstamped > 0 {
            Self::add(&self.unstamped, unstamped);
        }
    }

    pub fn record_join(&self, took: Duration) {
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX).max(1);
        lock(&self.join_latency).saturating_record(us);
    }

    pub fn latency(&self) -> Histogram<u64> {
        let mut all = histogram();
        for shard in &self.latency {
            // Same bounds on both sides, so adding cannot fail.
            let _ = all.add(&*lock(shard));
        }
        all
    }

    pub fn join_latency(&self) -> Histogram<u64> {
        lock(&self.join_latency).clone()
    }
}

/// One connection's count of what it received in the window.
#[derive(Debug, Default)]
pub struct PerViewer {
    pub received: AtomicU64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_round_trip_for_every_body_shape() {
        let t = 0x0123_4567_89ab_cdef;
        let chat = body(t, None, 200);
        assert_eq!(chat.len(), 200);
        assert_eq!(stamp(&chat), Some(t));
        let gift = body(t, Some("rose"), 200);
        assert_eq!(&gift[..4], b"rose");
        assert_eq!(stamp(&gift), Some(t));
        // Shorter than asked when the stamp alone is longer: never cut.
        assert_eq!(body(t, None, 4).len(), STAMP_LEN);
        assert_eq!(stamp(b"hello, not a stamp at all"), None);
        assert_eq!(stamp(b""), None);
    }

    #[test]
    fn latency_shards_merge() {
        let s = Stats::new();
        s.record_latencies(0, 5_000_000, [Some(1_000_000), None].into_iter());
        s.record_latencies(7, 5_000_000, [Some(4_000_000)].into_iter());
        let h = s.latency();
        assert_eq!(h.len(), 2);
        assert_eq!(s.unstamped.load(Ordering::Relaxed), 1);
        assert!(h.max() >= 3_990 && h.max() <= 4_010, "{}", h.max());
    }
}
