//! The bounded queues between a room and a connection: a viewer's batches
//! for one room ([`ViewerSlot`]), and replies to a sender's control stream
//! ([`ReplyTx`]).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use throng_wire::{Batch, EdgeFrame};
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;

/// Where a room sends acks and rejections for a sender's connection.
///
/// Bounded: a client that does not read its control stream (grants no flow
/// control credit) while it keeps asking (pings, sends) would otherwise
/// grow the edge's memory without end. When the queue is full the reply is
/// dropped and the connection is flagged as not reading; its task closes it
/// with `TooSlow`.
///
/// Frames travel boxed: a tokio channel allocates room for 32 values at a
/// time, and 32 unboxed frames would be 4 KiB on every connection, most of
/// which never sends anything.
#[derive(Clone)]
pub struct ReplyTx {
    tx: mpsc::Sender<Box<EdgeFrame>>,
    /// Runs once when a reply does not fit: the connection closes the
    /// client with `TooSlow`.
    on_overflow: Arc<dyn Fn() + Send + Sync>,
}

impl std::fmt::Debug for ReplyTx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplyTx").finish_non_exhaustive()
    }
}

impl ReplyTx {
    /// A queue of `capacity` replies; `on_overflow` runs when one did not fit.
    pub fn channel(
        capacity: usize,
        on_overflow: impl Fn() + Send + Sync + 'static,
    ) -> (Self, mpsc::Receiver<Box<EdgeFrame>>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        (
            Self {
                tx,
                on_overflow: Arc::new(on_overflow),
            },
            rx,
        )
    }

    /// Queues `frame` for the control stream; false once the connection's
    /// writer is gone or the client stopped reading.
    pub fn send(&self, frame: EdgeFrame) -> bool {
        match self.tx.try_send(Box::new(frame)) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                metrics::counter!("throng_reply_queue_overflows_total").increment(1);
                (self.on_overflow)();
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }
}

/// One encoded batch frame, shared by every member it goes to.
#[derive(Debug)]
pub struct Delivery {
    pub frame: Bytes,
    /// Kept so a lagging viewer's copy can be re-encoded with its `missed` count.
    pub batch: Batch,
}

/// A viewer's bounded outbound queue for one room.
///
/// The room pushes every batch without waiting; a viewer that cannot keep up
/// loses its oldest batches (counted as `missed`, reported in the next batch
/// it gets), so it never stalls the room or holds more than `capacity`
/// batches. A viewer still dropping batches `max_behind` after it started
/// is evicted: `on_evict` runs (the connection closes it with `TooSlow`),
/// from the pushing side, because the writer may be stuck in a write the
/// viewer never reads.
pub struct ViewerSlot {
    state: Mutex<SlotState>,
    notify: Notify,
    capacity: usize,
    max_behind: Duration,
    on_evict: Box<dyn Fn() + Send + Sync>,
}

impl std::fmt::Debug for ViewerSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ViewerSlot")
            .field("capacity", &self.capacity)
            .field("max_behind", &self.max_behind)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Default)]
struct SlotState {
    queue: VecDeque<Arc<Delivery>>,
    missed: u64,
    closed: bool,
    /// Since when this viewer has been losing batches without catching up.
    behind_since: Option<Instant>,
    /// The room moved to another class's pool; the writer should follow.
    moved_to: Option<tokio::runtime::Handle>,
    /// Behind for longer than `max_behind`: the viewer is to be disconnected.
    evicted: bool,
}

/// What a viewer's writer does next.
#[derive(Debug)]
pub enum Next {
    /// Write these, the first preceded by `missed` lost batches.
    Batches(Vec<Arc<Delivery>>, u64),
    /// Continue on this pool (the room changed size class).
    Move(tokio::runtime::Handle),
    /// Too slow for too long: disconnect the viewer.
    Evicted,
    /// Closed and drained.
    Done,
}

impl ViewerSlot {
    pub fn new(capacity: usize, max_behind: Duration, on_evict: impl Fn() + Send + Sync + 'static) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(SlotState::default()),
            notify: Notify::new(),
            capacity: capacity.max(1),
            max_behind,
            on_evict: Box::new(on_evict),
        })
    }

    fn lock(&self) -> MutexGuard<'_, SlotState> {
        // A panic while holding this lock leaves only a queue of Arcs behind,
        // which is still consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a batch; if the queue is full the oldest is dropped and counted.
    pub fn push(&self, delivery: Arc<Delivery>) {
        let mut s = self.lock();
        if s.closed {
            return;
        }
        if s.queue.len() >= self.capacity {
            s.queue.pop_front();
            s.missed += 1;
            metrics::counter!("throng_viewer_batches_missed_total").increment(1);
            let since = *s.behind_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= self.max_behind {
                s.closed = true;
                s.evicted = true;
                s.queue.clear();
                drop(s);
                metrics::counter!("throng_viewers_evicted_total").increment(1);
                self.notify.notify_one();
                (self.on_evict)();
                return;
            }
        }
        s.queue.push_back(delivery);
        drop(s);
        self.notify.notify_one();
    }

    /// No more batches: the writer drains what is queued and finishes.
    pub fn close(&self) {
        self.lock().closed = true;
        self.notify.notify_one();
    }

    /// Asks the writer to continue on `pool`, the room's new class pool.
    pub(super) fn rehome(&self, pool: tokio::runtime::Handle) {
        self.lock().moved_to = Some(pool);
        self.notify.notify_one();
    }

    /// Waits for queued batches, a move, or the end.
    pub async fn next(&self) -> Next {
        loop {
            {
                let mut s = self.lock();
                if s.evicted {
                    return Next::Evicted;
                }
                if let Some(pool) = s.moved_to.take() {
                    return Next::Move(pool);
                }
                if !s.queue.is_empty() {
                    let missed = std::mem::take(&mut s.missed);
                    if missed == 0 {
                        // Nothing lost since the last drain: caught up.
                        s.behind_since = None;
                    }
                    return Next::Batches(s.queue.drain(..).collect(), missed);
                }
                if s.closed {
                    return Next::Done;
                }
            }
            self.notify.notified().await;
        }
    }

    /// The ticks of the batches queued, oldest first.
    #[cfg(test)]
    pub(super) fn queued_ticks(&self) -> Vec<u64> {
        self.lock().queue.iter().map(|d| d.batch.tick).collect()
    }
}
