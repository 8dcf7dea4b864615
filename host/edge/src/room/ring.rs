//! The recent messages a joiner gets in its `Joined` frame.

use std::collections::VecDeque;

use throng_wire::Message;

/// The room's last `cap` delivered messages, oldest first.
#[derive(Debug)]
pub(super) struct Ring {
    messages: VecDeque<Message>,
    cap: usize,
    /// The highest number dropped to make room: `since` a number below it
    /// is not the whole story.
    dropped_up_to: u64,
}

impl Ring {
    pub(super) fn new(cap: usize) -> Self {
        Self {
            messages: VecDeque::new(),
            cap,
            dropped_up_to: 0,
        }
    }

    /// Keeps a tick's delivered messages, dropping the oldest beyond `cap`.
    pub(super) fn record(&mut self, delivered: &[Message]) {
        // Only the newest `cap` of a large tick could stay: copy no others.
        let keep = delivered.len().saturating_sub(self.cap);
        if let Some(skipped) = delivered[..keep].last() {
            self.dropped_up_to = self.dropped_up_to.max(skipped.seq);
        }
        for m in &delivered[keep..] {
            if self.messages.len() == self.cap
                && let Some(old) = self.messages.pop_front()
            {
                self.dropped_up_to = self.dropped_up_to.max(old.seq);
            }
            if self.cap > 0 {
                self.messages.push_back(m.clone());
            } else {
                self.dropped_up_to = self.dropped_up_to.max(m.seq);
            }
        }
    }

    /// The kept messages numbered after `after`.
    pub(super) fn since(&self, after: u64) -> Vec<Message> {
        self.messages.iter().filter(|m| m.seq > after).cloned().collect()
    }

    /// The number of the last message delivered (kept or not), 0 if none.
    pub(super) fn last(&self) -> u64 {
        self.messages.back().map_or(0, |m| m.seq).max(self.dropped_up_to)
    }

    /// Whether every delivered message numbered after `after` is kept.
    pub(super) fn holds_all_after(&self, after: u64) -> bool {
        self.dropped_up_to <= after
    }
}

#[cfg(test)]
mod tests {
    use throng_wire::Kind;

    use super::*;

    fn message(seq: u64) -> Message {
        Message {
            seq,
            sender: "s".into(),
            kind: Kind::Chat,
            body: Vec::new(),
        }
    }

    fn seqs(messages: &[Message]) -> Vec<u64> {
        messages.iter().map(|m| m.seq).collect()
    }

    #[test]
    fn keeps_the_newest_and_answers_after_a_sequence() {
        let mut ring = Ring::new(3);
        ring.record(&[message(1), message(2)]);
        assert_eq!(seqs(&ring.since(0)), [1, 2]);
        ring.record(&(3..=7).map(message).collect::<Vec<_>>());
        assert_eq!(seqs(&ring.since(0)), [5, 6, 7]);
        assert_eq!(seqs(&ring.since(5)), [6, 7]);
        assert!(ring.since(7).is_empty());
        assert!(ring.holds_all_after(4) && !ring.holds_all_after(3));
    }

    #[test]
    fn a_ring_of_nothing_keeps_nothing() {
        let mut ring = Ring::new(0);
        ring.record(&[message(1)]);
        assert!(ring.since(0).is_empty());
        assert!(!ring.holds_all_after(0) && ring.holds_all_after(1));
    }
}
