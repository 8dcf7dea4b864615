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
        let inbox = self.cluster.inbox();
        let mut answers = match self.cluster.subscribe(inbox.clone()).await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "presence query: cannot hear answers; answering for this edge alone");
                return Some(here);
            }
        };
        let query = WhoQuery {
            from: self.edge_id().to_owned(),
            tenant: tenant.to_owned(),
            users,
        };
        if let Err(e) = self
            .cluster
            .request(
                bus::who_subject(self.edge_id()),
                inbox,
                BusKind::Who,
                bus::encode(&query),
            )
            .await
        {
            tracing::debug!(error = %e, "presence query not sent; answering for this edge alone");
            return Some(here);
        }
        let deadline = tokio::time::Instant::now() + WHO_DEADLINE;
        let mut heard = std::collections::HashSet::new();
        while heard.len() < others {
            let answer = tokio::select! {
                _ = tokio::time::sleep_until(deadline) => break,
                a = self.next::<WhoAnswer>(&mut answers, BusKind::Who) => match a { Some(a) => a, None => break },
            };
            // An answer counts once per live edge: anyone may answer an
            // inbox.
            if !self.cluster.live().contains(&answer.from) || !heard.insert(answer.from) {
                continue;
            }
            for (i, online) in here.iter_mut().enumerate() {
                *online |= bus::bit(&answer.online, i);
            }
        }
        if heard.len() < others {
            metrics::counter!("throng_presence_query_partial_total").increment(1);
        }
        Some(here)
    }

    /// Other edges' "who is online": answered from this edge's users.
    pub(super) async fn hear_who(self: Arc<Self>, mut sub: async_nats::Subscriber) {
        while let Some(Heard {
            body: query,
            from,
            reply,
        }) = self.next_from_edge::<WhoQuery>(&mut sub, BusKind::Who).await
        {
            if from == self.edge_id() {
                continue;
            }
            if !self.same_sender(BusKind::Who, &from, &query.from) {
                continue;
            }
            if !self.knows(&query.tenant) {
                self.cluster.refused(BusKind::Who, "a tenant this edge does not know");
                continue;
            }
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
