//! Resync: a relay that missed bus batches asks the room's origin for
//! what its ring still holds.

use super::*;

impl Links {
    /// Asks `origin` for the messages of `key` it delivered after `after`
    /// (a relay that missed bus batches). None if it does not answer in
    /// time or answers nonsense.
    pub async fn resync(&self, origin: &str, key: &RoomKey, after: u64) -> Option<Resynced> {
        let ask = Resync {
            tenant: key.tenant.to_string(),
            room: key.name.to_string(),
            after_seq: after,
        };
        let subject = bus::resync_subject(origin, self.edge_id());
        match self
            .cluster
            .ask(subject, BusKind::Resync, bus::encode(&ask), RESYNC_DEADLINE)
            .await
        {
            Ok(bytes) => match bus::decode::<Resynced>(&bytes, bus::MAX_ROOM_BUS_BYTES) {
                Ok(r) if r.origin == origin => Some(r),
                Ok(_) => {
                    self.cluster.malformed(BusKind::Resync, &"an answer from another edge");
                    None
                }
                Err(e) => {
                    self.cluster.malformed(BusKind::Resync, &e);
                    None
                }
            },
            Err(e) => {
                tracing::debug!(error = %e, room = %key, "resync unanswered");
                None
            }
        }
    }

    /// Relays' requests for what the bus lost, answered from the room's
    /// ring, one task each (a room answers between its ticks).
    pub(super) async fn hear_resync(self: Arc<Self>, mut sub: async_nats::Subscriber) {
        while let Some(Heard { body: ask, reply, .. }) = self.next_from_edge::<Resync>(&mut sub, BusKind::Resync).await
        {
            let Some(reply) = reply else {
                self.cluster
                    .malformed(BusKind::Resync, &"a request without a reply subject");
                continue;
            };
            if let Err(why) = self.check_room(&ask.tenant, &ask.room) {
                self.cluster.refused(BusKind::Resync, &why);
                continue;
            }
            let Ok(permit) = Arc::clone(&self.resyncs_in_flight).try_acquire_owned() else {
                metrics::counter!("throng_resync_refused_total").increment(1);
                continue;
            };
            let Some(rooms) = self.rooms.upgrade() else {
                return;
            };
            let links = Arc::clone(&self);
            self.tasks.spawn(async move {
                let key = RoomKey {
                    tenant: Arc::from(ask.tenant.as_str()),
                    name: Arc::from(ask.room.as_str()),
                };
                let Some((mut messages, mut complete)) = rooms.ring_since(&key, ask.after_seq, RESYNC_DEADLINE).await
                else {
                    return;
                };
                // The oldest go first when they would not fit one bus message.
                let mut size: usize = messages.iter().map(|m| m.body.len() + m.sender.len() + 16).sum();
                while size > bus::FORWARD_SPLIT_BYTES && !messages.is_empty() {
                    let m = messages.remove(0);
                    size -= m.body.len() + m.sender.len() + 16;
                    complete = false;
                }
                let answer = Resynced {
                    origin: links.edge_id().to_owned(),
                    messages,
                    complete,
                };
                let _ = links
                    .cluster
                    .publish(reply, BusKind::Resync, bus::encode(&answer))
                    .await;
                drop(permit);
            });
        }
    }
}
