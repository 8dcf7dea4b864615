//! Interest: a relay tells a room's origin at once of the room's first
//! viewers here and of its last leaving.

use super::*;

/// How far past this edge's own [`time_base`](crate::room::time_base) a
/// peer's numbers may be: a minute of clock difference, more than edges
/// that agree within `dead_after` ever show.
const MAX_NUMBERED_AHEAD: u64 = 60 << 22;

impl Links {
    /// This edge has `viewers` viewers of `key`, a room `origin` runs; 0
    /// forgets the room. The origin hears at once of a room's first
    /// viewers here and of its last leaving (or of the room moving to
    /// another origin); counts in between go the presence way. A new
    /// origin also hears `numbered_to`, the highest number this edge's
    /// viewers got from this edge itself (see [`RoomInterest`]).
    pub fn relayed(&self, key: &RoomKey, origin: &str, viewers: u64, numbered_to: u64) {
        let tell: Vec<(String, u64)> = {
            let mut state = self.state();
            let before = if viewers == 0 {
                state.relayed.remove(key)
            } else {
                state.relayed.insert(key.clone(), (origin.to_owned(), viewers))
            };
            match before {
                Some((was, _)) if was == origin => Vec::new(),
                Some((was, _)) if viewers == 0 || was.is_empty() => vec![(was, 0)],
                Some((was, _)) => vec![(was, 0), (origin.to_owned(), viewers)],
                None if viewers > 0 => vec![(origin.to_owned(), viewers)],
                None => Vec::new(),
            }
        };
        for (origin, viewers) in tell {
            if origin.is_empty() {
                continue;
            }
            let interest = Interest {
                from: self.edge_id().to_owned(),
                rooms: vec![RoomInterest {
                    tenant: key.tenant.to_string(),
                    room: key.name.to_string(),
                    viewers,
                    numbered_to: if viewers > 0 { numbered_to } else { 0 },
                }],
            };
            let links = self.cluster.clone();
            let subject = bus::interest_subject(&origin, self.edge_id());
            self.tasks.spawn(async move {
                let _ = links.publish(subject, BusKind::Interest, bus::encode(&interest)).await;
            });
        }
    }

    /// Other edges' first (or no more) viewers of rooms this edge is the
    /// origin of.
    pub(super) async fn hear_interest(self: Arc<Self>, mut sub: async_nats::Subscriber) {
        while let Some(Heard {
            body: interest, from, ..
        }) = self.next_from_edge::<Interest>(&mut sub, BusKind::Interest).await
        {
            let Some(rooms) = self.rooms.upgrade() else {
                return;
            };
            let live = self.cluster.live();
            for r in interest.rooms {
                if let Err(why) = self.check_room(&r.tenant, &r.room) {
                    self.cluster.refused(BusKind::Interest, &why);
                    continue;
                }
                if !self.originates(&live, &r.tenant, &r.room) {
                    // A room is made here only where this edge is its origin.
                    self.cluster
                        .refused(BusKind::Interest, "a room this edge is not the origin of");
                    continue;
                }
                if r.viewers > bus::MAX_EDGE_VIEWERS {
                    self.cluster
                        .refused(BusKind::Interest, "more viewers than an edge can have");
                    continue;
                }
                let key = RoomKey {
                    tenant: Arc::from(r.tenant.as_str()),
                    name: Arc::from(r.room.as_str()),
                };
                if r.numbered_to > crate::room::time_base().saturating_add(MAX_NUMBERED_AHEAD) {
                    // Beyond any number an edge's clock gives: a forged
                    // count that would use the room's numbers up.
                    self.cluster
                        .refused(BusKind::Interest, "numbers no edge could have handed out yet");
                    continue;
                }
                rooms.peer_viewers(&key, Peer::Edge(from.clone()), r.viewers);
                if r.numbered_to > 0 {
                    rooms.numbered_elsewhere(&key, r.numbered_to);
                }
            }
        }
    }
}
