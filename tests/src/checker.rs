//! A checker of room histories, Jepsen's way: what senders were told
//! (acks with their numbers), what each reader saw (in order, with the
//! gaps it was told of), and what a reader from the start finds; then what
//! was lost, duplicated, reordered, or numbered twice.
//!
//! It knows nothing of how the history was made: the fault-injection
//! suite (`host/throng/tests/processes/faults.rs`) drives real processes through
//! kills, pauses and outages and records what happened here.

use std::collections::{HashMap, HashSet};

/// A send the edge acked: `body` is unique per send in a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acked {
    pub body: String,
    /// The numbering the ack came in (the sender's room's `epoch`).
    pub epoch: u64,
    pub seq: u64,
}

/// One thing a reader saw, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    Message {
        epoch: u64,
        seq: u64,
        body: String,
    },
    /// The reader was told messages may be lost here, uncounted: what of
    /// `from_epoch` came after `after_seq`, and what of `to_epoch` came
    /// before its next message.
    Gap {
        from_epoch: u64,
        to_epoch: u64,
        after_seq: Option<u64>,
    },
    /// A batch said (its `missed`) that batches of `epoch` did not reach
    /// the reader before it: what came after `after_seq` and before the
    /// next message of `epoch` the reader saw.
    Missed {
        epoch: u64,
        after_seq: Option<u64>,
    },
}

/// The figures of one run (BENCHMARKS.md reports these per scenario).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Sends acked.
    pub acked: usize,
    /// Acked sends the reader from the start found.
    pub readable: usize,
    /// Acked sends no reader from the start found.
    pub lost: usize,
    /// Acked sends a live reader neither saw nor was told it may have
    /// missed (a gap that covers them).
    pub silently_missed: usize,
    /// A message seen twice by one reader.
    pub duplicated: usize,
    /// A message seen after one with a higher number of the same epoch.
    pub reordered: usize,
    /// A number (of one epoch) that named two different messages.
    pub reused: usize,
    /// Gaps readers were told of.
    pub gaps: usize,
}

impl std::fmt::Display for Counts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "acked={} readable={} lost={} silently_missed={} duplicated={} reordered={} reused={} gaps={}",
            self.acked,
            self.readable,
            self.lost,
            self.silently_missed,
            self.duplicated,
            self.reordered,
            self.reused,
            self.gaps
        )
    }
}

/// Checks a run: `acked` what senders were told, `live` each live
/// reader's trace, `complete` a read from the start after the run (`None`
/// for a livecast room, which keeps no history).
pub fn check(acked: &[Acked], live: &[Vec<Seen>], complete: Option<&[Seen]>) -> Counts {
    let mut c = Counts {
        acked: acked.len(),
        ..Counts::default()
    };
    // Numbers: every (epoch, seq) names one body, across acks and reads.
    let mut named: HashMap<(u64, u64), HashSet<&str>> = HashMap::new();
    for a in acked {
        named.entry((a.epoch, a.seq)).or_default().insert(&a.body);
    }
    let traces = live.iter().map(Vec::as_slice).chain(complete);
    for trace in traces.clone() {
        for s in trace {
            if let Seen::Message { epoch, seq, body } = s {
                named.entry((*epoch, *seq)).or_default().insert(body);
            }
        }
    }
    c.reused = named.values().filter(|b| b.len() > 1).count();
    for trace in traces {
        let (dup, reordered, gaps) = order(trace);
        c.duplicated += dup;
        c.reordered += reordered;
        c.gaps += gaps;
    }
    if let Some(complete) = complete {
        let found: HashSet<&str> = bodies(complete).collect();
        c.readable = acked.iter().filter(|a| found.contains(a.body.as_str())).count();
        c.lost = c.acked - c.readable;
    }
    c.silently_missed = live.iter().map(|t| silently_missed(acked, t)).sum();
    c
}

fn bodies(trace: &[Seen]) -> impl Iterator<Item = &str> {
    trace.iter().filter_map(|s| match s {
        Seen::Message { body, .. } => Some(body.as_str()),
        Seen::Gap { .. } | Seen::Missed { .. } => None,
    })
}

/// Duplicates, reorderings and gaps in one reader's trace.
fn order(trace: &[Seen]) -> (usize, usize, usize) {
    let (mut dup, mut reordered, mut gaps) = (0, 0, 0);
    let mut seen = HashSet::new();
    let mut last: Option<(u64, u64)> = None;
    for s in trace {
        match s {
            Seen::Message { epoch, seq, body } => {
                if !seen.insert(body.as_str()) {
                    dup += 1;
                }
                if let Some((e, prev)) = last
                    && e == *epoch
                    && *seq <= prev
                {
                    reordered += 1;
                }
                last = Some((*epoch, *seq));
            }
            Seen::Gap { .. } | Seen::Missed { .. } => gaps += 1,
        }
    }
    (dup, reordered, gaps)
}

/// Acked sends of epochs this reader read that it neither saw nor was
/// told (by a gap) it may have missed. Sends of an epoch the reader never
/// read from are the reader's absence, not a silent loss.
fn silently_missed(acked: &[Acked], trace: &[Seen]) -> usize {
    let got: HashSet<&str> = bodies(trace).collect();
    // Per epoch: the ranges of numbers a gap excuses.
    let mut excused: Vec<(u64, u64, u64)> = Vec::new(); // (epoch, after, before)
    let mut read_epochs: HashSet<u64> = HashSet::new();
    for (i, s) in trace.iter().enumerate() {
        match s {
            Seen::Message { epoch, .. } => {
                read_epochs.insert(*epoch);
            }
            Seen::Gap {
                from_epoch,
                to_epoch,
                after_seq,
            } => {
                excused.push((*from_epoch, after_seq.unwrap_or(0), u64::MAX));
                excused.push((*to_epoch, 0, next_of(*to_epoch, &trace[i + 1..])));
            }
            Seen::Missed { epoch, after_seq } => {
                excused.push((*epoch, after_seq.unwrap_or(0), next_of(*epoch, &trace[i + 1..])));
            }
        }
    }
    acked
        .iter()
        .filter(|a| read_epochs.contains(&a.epoch) && !got.contains(a.body.as_str()))
        .filter(|a| {
            !excused
                .iter()
                .any(|&(e, after, before)| e == a.epoch && a.seq > after && a.seq < before)
        })
        .count()
}

/// The number of the first message of `epoch` in `rest` (none: no bound).
fn next_of(epoch: u64, rest: &[Seen]) -> u64 {
    rest.iter()
        .find_map(|s| match s {
            Seen::Message { epoch: e, seq, .. } if *e == epoch => Some(*seq),
            _ => None,
        })
        .unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ack(body: &str, epoch: u64, seq: u64) -> Acked {
        Acked {
            body: body.into(),
            epoch,
            seq,
        }
    }

    fn msg(body: &str, epoch: u64, seq: u64) -> Seen {
        Seen::Message {
            epoch,
            seq,
            body: body.into(),
        }
    }

    #[test]
    fn a_clean_run_counts_nothing_wrong() {
        let acked = vec![ack("a", 1, 1), ack("b", 1, 2)];
        let trace = vec![msg("a", 1, 1), msg("b", 1, 2)];
        let c = check(&acked, std::slice::from_ref(&trace), Some(&trace));
        assert_eq!(
            c,
            Counts {
                acked: 2,
                readable: 2,
                ..Counts::default()
            }
        );
    }

    #[test]
    fn each_fault_is_counted_where_it_shows() {
        // "b" acked but never stored; seq 3 named twice; "c" read twice;
        // "d" read before "c" though numbered after it.
        let acked = vec![
            ack("a", 1, 1),
            ack("b", 1, 2),
            ack("c", 1, 3),
            ack("x", 1, 3),
            ack("d", 1, 4),
        ];
        let live = vec![msg("a", 1, 1), msg("d", 1, 4), msg("c", 1, 3), msg("c", 1, 3)];
        let complete = vec![msg("a", 1, 1), msg("c", 1, 3), msg("d", 1, 4)];
        let c = check(&acked, &[live], Some(&complete));
        assert_eq!(c.lost, 2, "b and x");
        assert_eq!(c.reused, 1);
        assert_eq!(c.duplicated, 1);
        assert_eq!(c.reordered, 2, "c after d, and c again");
        assert_eq!(c.silently_missed, 2, "b and x, with no gap said");
    }

    #[test]
    fn a_gap_excuses_what_it_covers_and_nothing_else() {
        // Epoch 1 up to 2 read, then a gap into epoch 2 whose first read
        // message is 10: 3 of epoch 1 and 9 of epoch 2 are excused; 1 of
        // epoch 1 (before the gap) is not.
        let acked = vec![
            ack("p", 1, 1),
            ack("q", 1, 2),
            ack("r", 1, 3),
            ack("s", 2, 9),
            ack("t", 2, 10),
        ];
        let live = vec![
            msg("q", 1, 2),
            Seen::Gap {
                from_epoch: 1,
                to_epoch: 2,
                after_seq: Some(2),
            },
            msg("t", 2, 10),
        ];
        let c = check(&acked, &[live], None);
        assert_eq!(c.silently_missed, 1, "only p");
        assert_eq!(c.gaps, 1);
        assert_eq!(c.lost, 0, "no complete read: a livecast room");
    }

    #[test]
    fn a_batch_saying_it_missed_some_excuses_the_hole_before_it_and_nothing_after() {
        // 3..5 of epoch 1 never arrived, and the batch after the hole says
        // so; 8 went missing later with nothing said.
        let acked: Vec<Acked> = (1..=8).map(|n| ack(&format!("m{n}"), 1, n)).collect();
        let live = vec![
            msg("m1", 1, 1),
            msg("m2", 1, 2),
            Seen::Missed {
                epoch: 1,
                after_seq: Some(2),
            },
            msg("m6", 1, 6),
            msg("m7", 1, 7),
        ];
        let c = check(&acked, std::slice::from_ref(&live), None);
        assert_eq!(c.silently_missed, 1, "only m8: {c}");
        assert_eq!(c.gaps, 1);
        // Without the word of it, the hole is silent.
        let unsaid: Vec<Seen> = live.into_iter().filter(|s| !matches!(s, Seen::Missed { .. })).collect();
        assert_eq!(check(&acked, &[unsaid], None).silently_missed, 4);
    }
}
