//! What numbers a room's messages, and in which numbering.
//!
//! Every accepted message gets the room's next sequence number, delivered
//! or not; acks, batches, the ring, the group log and members' cursors all
//! speak in these numbers, so they never repeat and never go backwards.
//! The sequencer keeps that promise itself, whoever asks it to move:
//!
//! - **Epoch.** Numbers belong to a numbering (`throng_wire::EdgeFrame::Joined`):
//!   this edge's run for a livecast room, the log's for a group room. A
//!   room that becomes its cluster's origin, or claims its log again,
//!   takes the numbering on with [`Sequencer::continue_after`], which only
//!   ever raises the count.
//! - **Fencing.** A group room numbers only while it holds the claim on its
//!   log. When the log fences it (another edge appended) or a claim fails,
//!   the room [`fence`](Sequencer::fence)s its sequencer: it numbers
//!   nothing until a new claim says where the log ends, so no number is
//!   handed out that another writer may also hand out.
//! - **Fresh numbering.** A numbering that starts now (a livecast room, a
//!   room whose origin moved, a log that lost every entry) starts above
//!   [`time_base`], so it numbers above anything an earlier life handed
//!   out, seen here or not.
//! - **A livecast origin moves to now when its cluster changes.** Each
//!   time the live set changes, a livecast room's origin numbers on from
//!   [`time_base`] ([`Sequencer::take_over`] of its own room). When a
//!   partition let both sides originate the room, the loser numbered from
//!   its takeover densely; the winner, seeing the cluster whole again,
//!   numbers above that, so the loser's viewers, who saw the loser's
//!   numbers, take the winner's next messages for new ones (told of the
//!   gap by the epoch), not for repeats. When only the loser saw the
//!   partition, the winner's live set never changed: the loser, stepping
//!   down, tells the winner how far it numbered (`RoomInterest::numbered_to`
//!   on the bus), and the winner takes that over the same way. Numbers stay
//!   dense otherwise.

/// What numbers a room's messages.
#[derive(Debug)]
pub(super) struct Sequencer {
    last: u64,
    epoch: u64,
    fenced: bool,
}

impl Sequencer {
    /// Numbers on after `last`, the last number the room's history holds,
    /// in numbering `epoch`.
    pub(super) fn after(last: u64, epoch: u64) -> Self {
        Self {
            last,
            epoch,
            fenced: false,
        }
    }

    /// Numbers in a numbering that starts now: above [`time_base`] and
    /// above `at_least`.
    pub(super) fn fresh(at_least: u64, epoch: u64) -> Self {
        Self::after(time_base().max(at_least), epoch)
    }

    /// The numbering these numbers belong to.
    pub(super) fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The next message's number; none while fenced.
    pub(super) fn next(&mut self) -> Option<u64> {
        if self.fenced {
            return None;
        }
        self.last += 1;
        Some(self.last)
    }

    /// The highest number handed out so far (0 for none).
    pub(super) fn last(&self) -> u64 {
        self.last
    }

    /// Stops numbering: another writer may be numbering the room now.
    pub(super) fn fence(&mut self) {
        self.fenced = true;
    }

    pub(super) fn is_fenced(&self) -> bool {
        self.fenced
    }

    /// Numbers on in `epoch` after `floor` (where the log ends, or the
    /// highest number seen from another origin), and never below what this
    /// sequencer handed out already. Lifts a fence.
    pub(super) fn continue_after(&mut self, floor: u64, epoch: u64) {
        self.last = self.last.max(floor);
        self.epoch = epoch;
        self.fenced = false;
    }

    /// Takes the room's numbering over from another origin that numbered
    /// up to `seen` (as far as this edge knows): a fresh numbering's base,
    /// or above `seen`, whichever is higher.
    pub(super) fn take_over(&mut self, seen: u64, epoch: u64) {
        self.continue_after(time_base().max(seen), epoch);
    }
}

/// The first sequence number base of a room whose numbering starts now:
/// 2^22 (4,194,304) numbers for every second since 2026, counted by the
/// millisecond, so a room restarted (even within the same second) or
/// taken over by another origin numbers above anything its last life
/// handed out, even unseen, as long as a room numbers fewer than 4 million
/// messages a second and edges' clocks agree within `dead_after`. Stays
/// below 2^53 until 2034, so JavaScript clients read it exactly.
pub fn time_base() -> u64 {
    const SINCE_MS: u64 = 1_767_225_600_000; // 2026-01-01T00:00:00Z
    let ms = crate::unix_now_ms().saturating_sub(SINCE_MS);
    (u128::from(ms) * (1 << 22) / 1000) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_go_on_after_the_history() {
        let mut s = Sequencer::after(41, 7);
        assert_eq!(s.last(), 41);
        assert_eq!((s.next(), s.next()), (Some(42), Some(43)));
        assert_eq!(s.last(), 43);
        assert_eq!(s.epoch(), 7);
        assert_eq!(Sequencer::after(0, 1).next(), Some(1));
    }

    #[test]
    fn a_fenced_sequencer_numbers_nothing_until_it_continues() {
        let mut s = Sequencer::after(10, 1);
        s.fence();
        assert!(s.is_fenced());
        assert_eq!(s.next(), None);
        assert_eq!(s.last(), 10, "a refused number is not handed out");
        // The log ends at 15 now: another writer numbered 11..=15.
        s.continue_after(15, 2);
        assert!(!s.is_fenced());
        assert_eq!((s.next(), s.epoch()), (Some(16), 2));
    }

    #[test]
    fn numbers_never_go_back_whoever_asks() {
        let mut s = Sequencer::after(100, 1);
        s.continue_after(40, 1);
        assert_eq!(s.next(), Some(101), "a lower floor does not lower the count");
        let base = time_base();
        s.take_over(5, 3);
        let taken = s.last();
        assert!(taken >= base, "a new origin numbers above the time base");
        assert_eq!(s.epoch(), 3);
        assert_eq!(s.next(), Some(taken + 1));
    }

    #[test]
    fn after_a_partition_the_origin_that_goes_on_numbers_above_the_one_that_lost() {
        // The winner numbers densely from its start; the loser took the
        // room over later, in the partition, and numbered 1,000 more.
        let mut winner = Sequencer::fresh(0, 1);
        for _ in 0..10 {
            winner.next();
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
        let mut loser = Sequencer::fresh(winner.last(), 1);
        loser.take_over(winner.last(), 2);
        let loser_last = (0..1_000).filter_map(|_| loser.next()).last().expect("numbers");
        assert!(
            loser_last > winner.last() + 1_000,
            "the loser numbered above the winner"
        );
        std::thread::sleep(std::time::Duration::from_millis(2));
        // The cluster is whole again: the winner moves to now, in its own
        // numbering, and goes on densely from there.
        winner.take_over(winner.last(), 1);
        let next = winner.next().expect("a number");
        assert!(next > loser_last, "{next} after the loser's {loser_last}");
        assert_eq!((winner.next(), winner.epoch()), (Some(next + 1), 1));
    }

    #[test]
    fn a_fresh_numbering_starts_above_every_earlier_one() {
        let before = time_base();
        let s = Sequencer::fresh(0, 1);
        assert!(s.last() >= before);
        // A history above the base still wins.
        let high = time_base() + 1_000_000;
        assert_eq!(Sequencer::fresh(high, 1).last(), high);
        // 2^22 a second: a restart 1 ms later numbers 4,194 higher.
        assert!(time_base() < 1 << 53, "JavaScript reads it exactly");
    }
}
