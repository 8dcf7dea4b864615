//! Pushing a tick's batches into every local viewer's slot.
//!
//! The same encoded bytes go to every viewer; what differs is how fast.
//! Most rooms push to all their viewers at once. A class with a `spread`
//! paces the push in steps of `pace_chunk` viewers over that long, so a
//! huge room's writes do not queue ahead of a small room's on the QUIC
//! threads every room shares. A room of `shard_members` or more that does
//! not pace pushes from shards run in parallel on its class's pool.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::time::Instant;

use super::slot::{Delivery, ViewerSlot};

/// The room's viewers on this edge, by member id.
#[derive(Debug, Default)]
pub(super) struct Viewers {
    slots: HashMap<u64, Arc<ViewerSlot>>,
    /// The slots as a list, shared by pushes that outlive a borrow of the
    /// map (paced steps, shards on other threads); made again after a join
    /// or leave, so a room without churn does not copy its list each tick.
    listed: Option<Arc<[Arc<ViewerSlot>]>>,
}

impl Viewers {
    /// Adds `member`'s slot, handing back the one it replaces.
    pub(super) fn insert(&mut self, member: u64, slot: Arc<ViewerSlot>) -> Option<Arc<ViewerSlot>> {
        self.listed = None;
        self.slots.insert(member, slot)
    }

    pub(super) fn remove(&mut self, member: u64) -> Option<Arc<ViewerSlot>> {
        let slot = self.slots.remove(&member);
        if slot.is_some() {
            self.listed = None;
        }
        slot
    }

    pub(super) fn len(&self) -> usize {
        self.slots.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    pub(super) fn slots(&self) -> impl Iterator<Item = &Arc<ViewerSlot>> {
        self.slots.values()
    }

    fn listed(&mut self) -> Arc<[Arc<ViewerSlot>]> {
        let slots = &self.slots;
        Arc::clone(self.listed.get_or_insert_with(|| slots.values().cloned().collect()))
    }
}

/// How a room pushes its batches to its local viewers.
#[derive(Debug)]
pub(super) struct Fanout {
    /// Rooms with at least this many viewers push from parallel shards.
    shard_members: usize,
    /// Viewers per step of a paced push.
    pace_chunk: usize,
    /// A tick's batches still being pushed, step by step.
    paced: Option<PacedPush>,
}

impl Fanout {
    pub(super) fn new(shard_members: usize, pace_chunk: usize) -> Self {
        Self {
            shard_members,
            pace_chunk: pace_chunk.max(1),
            paced: None,
        }
    }

    /// Queues a tick's batches for every viewer: all at once (from parallel
    /// shards on `pool` for a huge room), or paced over `spread`.
    pub(super) async fn push(
        &mut self,
        viewers: &mut Viewers,
        deliveries: Vec<Arc<Delivery>>,
        spread: Duration,
        pool: &Handle,
    ) {
        if deliveries.is_empty() {
            return;
        }
        let members = viewers.len();
        if spread.is_zero() || members <= self.pace_chunk {
            if members >= self.shard_members {
                push_sharded(viewers.listed(), deliveries, pool).await;
            } else {
                for delivery in &deliveries {
                    for slot in viewers.slots() {
                        slot.push(Arc::clone(delivery));
                    }
                }
            }
            return;
        }
        let mut paced = PacedPush::new(deliveries, viewers.listed(), self.pace_chunk, spread);
        if !paced.step() {
            self.paced = Some(paced);
        }
        metrics::counter!("throng_paced_fanouts_total").increment(1);
    }

    /// When the next step of a paced push is due, if one is under way.
    pub(super) fn step_due(&self) -> Option<Instant> {
        self.paced.as_ref().map(|p| p.due)
    }

    /// Pushes the next step of a paced push.
    pub(super) fn step(&mut self) {
        if self.paced.as_mut().is_some_and(PacedPush::step) {
            self.paced = None;
        }
    }

    /// Pushes whatever a paced push has left, now: a tick's batches go out
    /// before the next tick's.
    pub(super) fn finish(&mut self) {
        if let Some(p) = self.paced.take() {
            p.finish();
        }
    }
}

/// A huge room's viewers in shards, one per thread of its class's pool,
/// each queueing every batch for its viewers in order: the same bytes, in a
/// fraction of the time one thread takes. The QUIC writes themselves
/// already run in parallel in each viewer's writer task.
///
/// Every shard is a task, and the room waits for them all (the tick is not
/// over before its batches are queued). The room does not push a shard
/// itself: the task a worker spawned last sits in that worker's LIFO slot,
/// which other workers cannot steal from, so it runs on the room's worker
/// while the room waits, and the other shards run on the other workers.
async fn push_sharded(slots: Arc<[Arc<ViewerSlot>]>, deliveries: Vec<Arc<Delivery>>, pool: &Handle) {
    metrics::counter!("throng_sharded_fanouts_total").increment(1);
    let shards = pool.metrics().num_workers();
    if shards < 2 {
        push_each(&slots, &deliveries);
        return;
    }
    let size = slots.len().div_ceil(shards).max(1);
    let deliveries: Arc<[Arc<Delivery>]> = deliveries.into();
    let tasks: Vec<_> = (0..slots.len())
        .step_by(size)
        .map(|start| {
            let (slots, deliveries) = (Arc::clone(&slots), Arc::clone(&deliveries));
            pool.spawn(async move {
                let end = (start + size).min(slots.len());
                push_each(&slots[start..end], &deliveries);
            })
        })
        .collect();
    for task in tasks {
        if let Err(e) = task.await {
            // Cancelled only when the pool shuts down, with the edge.
            if e.is_panic() {
                tracing::error!(error = %e, "a fanout shard panicked");
            }
        }
    }
}

fn push_each(slots: &[Arc<ViewerSlot>], deliveries: &[Arc<Delivery>]) {
    for slot in slots {
        for delivery in deliveries {
            slot.push(Arc::clone(delivery));
        }
    }
}

/// A tick's batches on their way to a snapshot of the viewers, a step at a
/// time. Viewers who join meanwhile got these messages in their join
/// (`recent` / catch-up); viewers who leave have closed slots.
#[derive(Debug)]
struct PacedPush {
    deliveries: Vec<Arc<Delivery>>,
    slots: Arc<[Arc<ViewerSlot>]>,
    /// Viewers per step.
    chunk: usize,
    gap: Duration,
    next: usize,
    /// When the next step is due.
    due: Instant,
}

impl PacedPush {
    /// Steps of about `chunk` viewers, evenly over `spread`, at least 1 ms
    /// apart (the timer's grain): bigger steps when there would be more of
    /// them than milliseconds in the spread.
    fn new(deliveries: Vec<Arc<Delivery>>, slots: Arc<[Arc<ViewerSlot>]>, chunk: usize, spread: Duration) -> Self {
        let steps = slots
            .len()
            .div_ceil(chunk.max(1))
            .clamp(1, spread.as_millis().max(1) as usize);
        Self {
            chunk: slots.len().div_ceil(steps).max(1),
            gap: spread / steps as u32,
            deliveries,
            slots,
            next: 0,
            due: Instant::now(),
        }
    }

    /// Pushes one step; true when every viewer has the batches.
    fn step(&mut self) -> bool {
        let end = (self.next + self.chunk).min(self.slots.len());
        push_each(&self.slots[self.next..end], &self.deliveries);
        self.next = end;
        self.due += self.gap;
        self.next >= self.slots.len()
    }

    /// Pushes the rest at once.
    fn finish(mut self) {
        self.chunk = self.slots.len();
        self.step();
    }
}

#[cfg(test)]
mod tests {
    use throng_wire::{Batch, Counters, EdgeFrame, encode};

    use super::*;

    fn delivery(tick: u64) -> Arc<Delivery> {
        let batch = Batch {
            room: "r".into(),
            tick,
            messages: Vec::new(),
            counters: Counters::default(),
            pinned: Vec::new(),
            online: 0,
            missed: 0,
            epoch: 1,
        };
        let frame = encode(&EdgeFrame::Batch(batch.clone()), 1 << 16).expect("encodes");
        Arc::new(Delivery { frame, batch })
    }

    fn viewers(n: u64) -> Viewers {
        let mut viewers = Viewers::default();
        for member in 0..n {
            viewers.insert(member, ViewerSlot::new(8, Duration::from_secs(30), || {}));
        }
        viewers
    }

    fn queued(viewers: &mut Viewers) -> Vec<usize> {
        viewers.listed().iter().map(|s| s.queued_ticks().len()).collect()
    }

    #[test]
    fn a_paced_push_reaches_every_viewer_once_in_even_steps() {
        let mut viewers = viewers(10);
        let mut paced = PacedPush::new(
            vec![delivery(1), delivery(2)],
            viewers.listed(),
            3,
            Duration::from_millis(8),
        );
        // ceil(10 / 3) = 4 steps of 3, 2 ms apart.
        assert_eq!((paced.chunk, paced.gap), (3, Duration::from_millis(2)));
        let first_due = paced.due;
        assert!(!paced.step());
        assert_eq!(queued(&mut viewers), [2, 2, 2, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(paced.due - first_due, Duration::from_millis(2));
        assert!(!paced.step());
        assert!(!paced.step());
        assert!(paced.step());
        assert_eq!(queued(&mut viewers), [2; 10]);
        // Both batches, in order, exactly once each.
        for slot in viewers.slots() {
            assert_eq!(slot.queued_ticks(), [1, 2]);
        }
    }

    #[test]
    fn steps_are_never_closer_than_a_millisecond_and_finish_pushes_the_rest() {
        let mut viewers = viewers(1000);
        // 1,000 steps of one would be 3 µs apart: 3 steps of 334 instead.
        let mut paced = PacedPush::new(vec![delivery(1)], viewers.listed(), 1, Duration::from_millis(3));
        assert_eq!((paced.chunk, paced.gap), (334, Duration::from_millis(1)));
        assert!(!paced.step());
        paced.finish();
        assert_eq!(queued(&mut viewers), vec![1; 1000]);
    }

    #[test]
    fn the_list_of_viewers_is_made_again_only_after_a_join_or_leave() {
        let mut viewers = viewers(3);
        let first = viewers.listed();
        assert!(Arc::ptr_eq(&first, &viewers.listed()));
        assert!(viewers.remove(7).is_none());
        assert!(Arc::ptr_eq(&first, &viewers.listed()), "nobody left");
        viewers.remove(1);
        let second = viewers.listed();
        assert_eq!(second.len(), 2);
        viewers.insert(9, ViewerSlot::new(8, Duration::from_secs(30), || {}));
        assert_eq!(viewers.listed().len(), 3);
        assert!(!Arc::ptr_eq(&second, &viewers.listed()));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 3)]
    async fn sharded_pushes_give_every_viewer_every_batch_in_order() {
        let mut viewers = viewers(1001);
        let mut fanout = Fanout::new(10, 256);
        let pool = Handle::current();
        for tick in 0..3 {
            let batches = vec![delivery(2 * tick), delivery(2 * tick + 1)];
            fanout.push(&mut viewers, batches, Duration::ZERO, &pool).await;
        }
        for slot in viewers.slots() {
            assert_eq!(slot.queued_ticks(), [0, 1, 2, 3, 4, 5]);
        }
    }
}
