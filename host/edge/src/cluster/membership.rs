//! The live set: which edges this edge has heard from lately.
//!
//! Pure bookkeeping, fed by the announcements the cluster task receives and
//! by the clock, so its rules are tested without a bus: an edge is live from
//! its first announcement until `dead_after` passes without another, or
//! until it says it is leaving. Every edge hears the same announcements, so
//! every edge's live set agrees within `dead_after`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::bus::Announce;

/// Leaves remembered at most (one per edge id).
const MAX_GONE: usize = 4096;

/// What this edge knows of another (or of itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub edge_id: String,
    pub region: String,
    pub quic: String,
    pub incarnation: u64,
    pub last_seen: Instant,
}

/// A change in the live set, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Joined(String),
    /// Restarted: a new incarnation under the same id.
    Restarted(String),
    Left(String),
    Dead(String),
}

/// The edges heard from within `dead_after`; this edge is always one.
#[derive(Debug)]
pub struct Members {
    me: String,
    dead_after: Duration,
    live: BTreeMap<String, Member>,
    /// The newest incarnation that said it was leaving, per edge, and when:
    /// its late heartbeats (already in flight) must not bring it back. An
    /// edge that goes on announcing for `dead_after` after its leave did
    /// not leave (the leave was forged, or the bus reordered it): it is
    /// live again.
    gone: BTreeMap<String, (u64, Instant)>,
    /// Edges that were live and are not now, and when they stopped being:
    /// a message from one of them within [`LATELY`] is from an edge this one
    /// knew, not made up (see [`Members::knows`]).
    lately: BTreeMap<String, Instant>,
}

/// How long an edge that was live stays known after it is not: longer than
/// any NATS outage the edges ride out, so messages that race its return
/// (an interest sent the moment it is back) are taken.
pub const LATELY: Duration = Duration::from_secs(300);

impl Members {
    pub fn new(me: Member, dead_after: Duration) -> Self {
        let id = me.edge_id.clone();
        Self {
            me: id.clone(),
            dead_after,
            live: BTreeMap::from([(id, me)]),
            gone: BTreeMap::new(),
            lately: BTreeMap::new(),
        }
    }

    /// Takes in an announcement heard at `now`.
    pub fn heard(&mut self, a: &Announce, now: Instant) -> Option<Change> {
        if a.edge_id == self.me {
            if let Some(me) = self.live.get_mut(&a.edge_id) {
                me.last_seen = now;
            }
            return None;
        }
        if let Some(&(inc, left)) = self.gone.get(&a.edge_id) {
            if inc > a.incarnation
                || (inc == a.incarnation && (a.leaving || now.saturating_duration_since(left) < self.dead_after))
            {
                return None;
            }
            self.gone.remove(&a.edge_id);
        }
        if a.leaving {
            // Bounded: one entry per edge id that ever left, and edge ids
            // that are heard at all come from edges' own subjects.
            if self.gone.len() >= MAX_GONE {
                self.gone.pop_first();
            }
            self.gone.insert(a.edge_id.clone(), (a.incarnation, now));
            let left = self.live.remove(&a.edge_id).map(|_| Change::Left(a.edge_id.clone()));
            if left.is_some() {
                self.was_live(&a.edge_id, now);
            }
            return left;
        }
        match self.live.get_mut(&a.edge_id) {
            Some(m) if m.incarnation > a.incarnation => None,
            Some(m) => {
                let restarted = m.incarnation < a.incarnation;
                m.incarnation = a.incarnation;
                m.region.clone_from(&a.region);
                m.quic.clone_from(&a.quic);
                m.last_seen = now;
                restarted.then(|| Change::Restarted(a.edge_id.clone()))
            }
            None => {
                self.live.insert(
                    a.edge_id.clone(),
                    Member {
                        edge_id: a.edge_id.clone(),
                        region: a.region.clone(),
                        quic: a.quic.clone(),
                        incarnation: a.incarnation,
                        last_seen: now,
                    },
                );
                Some(Change::Joined(a.edge_id.clone()))
            }
        }
    }

    /// Drops the edges not heard from within `dead_after` of `now`; never
    /// this edge, which knows it is alive even while the bus is away.
    pub fn expire(&mut self, now: Instant) -> Vec<Change> {
        let dead: Vec<String> = self
            .live
            .values()
            .filter(|m| m.edge_id != self.me && now.saturating_duration_since(m.last_seen) >= self.dead_after)
            .map(|m| m.edge_id.clone())
            .collect();
        for id in &dead {
            self.live.remove(id);
            self.was_live(id, now);
        }
        self.lately.retain(|_, at| now.saturating_duration_since(*at) < LATELY);
        dead.into_iter().map(Change::Dead).collect()
    }

    fn was_live(&mut self, id: &str, now: Instant) {
        if self.lately.len() >= MAX_GONE {
            self.lately.pop_first();
        }
        self.lately.insert(id.to_owned(), now);
    }

    /// Whether `id` is live, or was within [`LATELY`] of `now`: an edge
    /// this one knows (messages from any other are refused).
    pub fn knows(&self, id: &str, now: Instant) -> bool {
        self.live.contains_key(id)
            || self
                .lately
                .get(id)
                .is_some_and(|at| now.saturating_duration_since(*at) < LATELY)
    }

    /// The live edges, by id.
    pub fn live(&self) -> impl Iterator<Item = &Member> {
        self.live.values()
    }

    /// Live edges, this one included (never 0).
    pub fn len(&self) -> usize {
        self.live.len()
    }

    /// Never: this edge is always live. (For clippy's `len` rule.)
    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEAD: Duration = Duration::from_secs(3);

    fn member(id: &str, at: Instant) -> Member {
        Member {
            edge_id: id.into(),
            region: "eu".into(),
            quic: "127.0.0.1:1".into(),
            incarnation: 1,
            last_seen: at,
        }
    }

    fn announce(id: &str, incarnation: u64, leaving: bool) -> Announce {
        Announce {
            edge_id: id.into(),
            region: "eu".into(),
            quic: "127.0.0.1:2".into(),
            incarnation,
            seq: 0,
            leaving,
        }
    }

    fn ids(m: &Members) -> Vec<&str> {
        m.live().map(|m| m.edge_id.as_str()).collect()
    }

    #[test]
    fn an_edge_is_live_until_dead_after_passes_without_a_word() {
        let t0 = Instant::now();
        let mut m = Members::new(member("me", t0), DEAD);
        assert_eq!(m.heard(&announce("b", 1, false), t0), Some(Change::Joined("b".into())));
        assert_eq!(m.heard(&announce("b", 1, false), t0 + Duration::from_secs(2)), None);
        assert!(m.expire(t0 + Duration::from_millis(4900)).is_empty());
        assert_eq!(ids(&m), ["b", "me"]);
        assert_eq!(m.expire(t0 + Duration::from_secs(5)), vec![Change::Dead("b".into())]);
        assert_eq!(ids(&m), ["me"]);
    }

    #[test]
    fn this_edge_never_expires_even_when_the_bus_is_silent() {
        let t0 = Instant::now();
        let mut m = Members::new(member("me", t0), DEAD);
        assert!(m.expire(t0 + Duration::from_secs(3600)).is_empty());
        assert_eq!(m.len(), 1);
    }

    #[test]
    fn a_leaving_edge_goes_at_once_and_its_late_heartbeats_do_not_bring_it_back() {
        let t0 = Instant::now();
        let mut m = Members::new(member("me", t0), DEAD);
        m.heard(&announce("b", 5, false), t0);
        assert_eq!(m.heard(&announce("b", 5, true), t0), Some(Change::Left("b".into())));
        assert_eq!(m.heard(&announce("b", 5, false), t0), None);
        assert_eq!(m.heard(&announce("b", 5, false), t0 + DEAD / 2), None);
        assert_eq!(ids(&m), ["me"]);
        // Restarted under the same id: welcome back.
        assert_eq!(m.heard(&announce("b", 6, false), t0), Some(Change::Joined("b".into())));
    }

    #[test]
    fn an_edge_that_goes_on_announcing_after_a_leave_did_not_leave() {
        // A forged (or reordered) leave costs the edge at most dead_after.
        let t0 = Instant::now();
        let mut m = Members::new(member("me", t0), DEAD);
        m.heard(&announce("b", 5, false), t0);
        assert_eq!(m.heard(&announce("b", 5, true), t0), Some(Change::Left("b".into())));
        assert_eq!(
            m.heard(&announce("b", 5, false), t0 + DEAD - Duration::from_millis(1)),
            None
        );
        assert_eq!(
            m.heard(&announce("b", 5, false), t0 + DEAD),
            Some(Change::Joined("b".into()))
        );
        assert_eq!(ids(&m), ["b", "me"]);
        // Another leave, repeated later, is a leave again.
        assert_eq!(
            m.heard(&announce("b", 5, true), t0 + DEAD * 2),
            Some(Change::Left("b".into()))
        );
    }

    #[test]
    fn an_edge_taken_for_dead_stays_known_for_a_while_and_a_made_up_one_never_is() {
        let t0 = Instant::now();
        let mut m = Members::new(member("me", t0), DEAD);
        m.heard(&announce("b", 1, false), t0);
        assert!(m.knows("b", t0));
        m.expire(t0 + DEAD);
        assert!(!m.live().any(|e| e.edge_id == "b"));
        assert!(m.knows("b", t0 + DEAD + Duration::from_secs(10)));
        assert!(!m.knows("b", t0 + DEAD + LATELY));
        assert!(!m.knows("made-up", t0));
        assert!(m.knows("me", t0));
    }

    #[test]
    fn a_restart_replaces_the_earlier_incarnation_and_an_older_one_is_ignored() {
        let t0 = Instant::now();
        let mut m = Members::new(member("me", t0), DEAD);
        m.heard(&announce("b", 5, false), t0);
        assert_eq!(
            m.heard(&announce("b", 6, false), t0),
            Some(Change::Restarted("b".into()))
        );
        assert_eq!(m.heard(&announce("b", 5, false), t0 + DEAD), None);
        // The stale one did not refresh it.
        assert_eq!(m.expire(t0 + DEAD), vec![Change::Dead("b".into())]);
    }
}
