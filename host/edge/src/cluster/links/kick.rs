//! Disconnects ordered on one edge, carried out on every edge.

use super::*;

impl Links {
    /// Closes `user`'s sessions on every other live edge. Returns the
    /// sessions they closed and how many edges did not answer within
    /// [`WHO_DEADLINE`] (the order reached them all the same, unless the
    /// bus lost it). None when too many cluster-wide queries are under way.
    pub async fn disconnect(&self, tenant: &str, user: &str, reason: &str) -> Option<(usize, usize)> {
        let others = self.cluster.live().edges.len().saturating_sub(1);
        if others == 0 {
            return Some((0, 0));
        }
        let _permit = Arc::clone(&self.who_in_flight).try_acquire_owned().ok()?;
        let order = KickOrder {
            from: self.edge_id().to_owned(),
            tenant: tenant.to_owned(),
            user: user.to_owned(),
            reason: reason.to_owned(),
        };
        let mut closed = 0usize;
        let asked = self
            .ask_every_edge(
                (bus::kick_subject(self.edge_id()), BusKind::Kick),
                bus::encode(&order),
                others,
                |a: &KickAnswer| a.from.as_str(),
                |a: KickAnswer| closed += a.connections as usize,
            )
            .await;
        match asked {
            Ok(answered) => Some((closed, others - answered)),
            Err(e) => {
                tracing::warn!(error = %e, "disconnect not sent to the other edges");
                Some((0, others))
            }
        }
    }

    /// Other edges' disconnects: this edge's sessions of that user close.
    pub(super) async fn hear_kick(self: Arc<Self>, mut sub: async_nats::Subscriber) {
        while let Some(Heard { body: order, reply, .. }) =
            self.next_from_edge::<KickOrder>(&mut sub, BusKind::Kick).await
        {
            let reason = crate::untrusted(&order.reason, 200);
            let n = self.kicks.kick(&crate::rate_key(&order.tenant, &order.user), &reason);
            if n > 0 {
                tracing::info!(tenant = %crate::untrusted(&order.tenant, 64), from = %crate::untrusted(&order.from, 64),
                    connections = n, "sessions closed by a disconnect from another edge");
            }
            if let Some(reply) = reply {
                let answer = KickAnswer {
                    from: self.edge_id().to_owned(),
                    connections: n.min(u32::MAX as usize) as u32,
                };
                let _ = self.cluster.publish(reply, BusKind::Kick, bus::encode(&answer)).await;
            }
        }
    }
}
