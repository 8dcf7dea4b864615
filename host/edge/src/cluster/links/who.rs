//! Who is online: one question to every edge, answers merged within
//! `WHO_DEADLINE`.

use super::*;

impl Links {
    /// For each of `users` of `tenant`: online on any live edge. `here` is
    /// this edge's own answer; other edges are asked at once and whatever
    /// answers within [`WHO_DEADLINE`] is merged in. None when too many
    /// such queries are under way on this edge.
    pub async fn who_is_online(&self, tenant: &str, users: Vec<String>, mut here: Vec<bool>) -> Option<Vec<bool>> {
        let others = self.cluster.live().edges.len().saturating_sub(1);
        if others == 0 || here.iter().all(|b| *b) {
            return Some(here);
        }
        let _permit = Arc::clone(&self.who_in_flight).try_acquire_owned().ok()?;
        let query = WhoQuery {
            from: self.edge_id().to_owned(),
            tenant: tenant.to_owned(),
            users,
        };
        let asked = self
            .ask_every_edge(
                (bus::who_subject(self.edge_id()), BusKind::Who),
                bus::encode(&query),
                others,
                |a: &WhoAnswer| a.from.as_str(),
                |a: WhoAnswer| {
                    for (i, online) in here.iter_mut().enumerate() {
                        *online |= bus::bit(&a.online, i);
                    }
                },
            )
            .await;
        match asked {
            Ok(answered) if answered < others => {
                metrics::counter!("throng_presence_query_partial_total").increment(1);
            }
            Ok(_) => {}
            Err(e) => {
                tracing::debug!(error = %e, "presence query: cannot ask the other edges; answering for this edge alone")
            }
        }
        Some(here)
    }

    /// Other edges' "who is online": answered from this edge's users.
    pub(super) async fn hear_who(self: Arc<Self>, mut sub: async_nats::Subscriber) {
        while let Some(Heard { body: query, reply, .. }) = self.next_from_edge::<WhoQuery>(&mut sub, BusKind::Who).await
        {
            let Some(reply) = reply else {
                self.cluster.malformed(BusKind::Who, &"a query without a reply subject");
                continue;
            };
            if query.users.len() > crate::presence::MAX_QUERY_USERS {
                self.cluster.malformed(BusKind::Who, &"a query of too many users");
                continue;
            }
            let online = self.presence.query(&query.tenant, &query.users);
            let answer = WhoAnswer {
                from: self.edge_id().to_owned(),
                online: bus::pack_bits(&online),
            };
            let _ = self.cluster.publish(reply, BusKind::Who, bus::encode(&answer)).await;
        }
    }
}
