//! Presence, edge -> region -> origin: every edge's counts to its region's
//! aggregator, the aggregator's sums to each origin.

use super::*;

impl Links {
    /// Every presence interval: as its region's aggregator, sums the
    /// region's counts and tells each origin; then sends this edge's own
    /// counts to the aggregator.
    pub(super) async fn count(self: Arc<Self>, every: Duration) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let live = self.cluster.live();
            let region = self.cluster.region().to_owned();
            let Some(aggregator) = live.aggregator(&region).map(str::to_owned) else {
                continue;
            };
            if aggregator == self.edge_id() {
                // A report three intervals old is from an edge that stopped.
                let by_origin = aggregate(&mut self.state(), &live, every * 3);
                for (origin, rooms) in by_origin {
                    let (at_ms, rooms) = rooms;
                    let counts = RegionCounts {
                        region: region.clone(),
                        from: self.edge_id().to_owned(),
                        at_ms,
                        rooms,
                    };
                    let subject = bus::regional_subject(&origin, self.edge_id());
                    let _ = self
                        .cluster
                        .publish(subject, BusKind::Regional, bus::encode(&counts))
                        .await;
                }
            } else {
                let mut state = self.state();
                state.reports.clear();
                state.told.clear();
            }
            let counts = {
                let mut state = self.state();
                let rooms: Vec<OriginCount> = state
                    .relayed
                    .iter()
                    .map(|(key, (origin, viewers))| OriginCount {
                        origin: origin.clone(),
                        tenant: key.tenant.to_string(),
                        room: key.name.to_string(),
                        viewers: *viewers,
                    })
                    .collect();
                // Once empty, say so once; then stay quiet while nothing is relayed.
                if rooms.is_empty() && !state.counted_any {
                    continue;
                }
                state.counted_any = !rooms.is_empty();
                EdgeCounts {
                    from: self.edge_id().to_owned(),
                    region: region.clone(),
                    at_ms: crate::unix_now_ms(),
                    rooms,
                }
            };
            for counts in split_counts(counts) {
                let subject = bus::counts_subject(&aggregator, self.edge_id());
                let _ = self
                    .cluster
                    .publish(subject, BusKind::Counts, bus::encode(&counts))
                    .await;
            }
        }
    }

    /// Counts of this region's edges, kept while this edge aggregates.
    pub(super) async fn hear_counts(self: Arc<Self>, mut sub: async_nats::Subscriber) {
        while let Some(Heard { body: counts, from, .. }) =
            self.next_from_edge::<EdgeCounts>(&mut sub, BusKind::Counts).await
        {
            if let Err(why) = counts.rooms.iter().try_for_each(|r| {
                self.check_room(&r.tenant, &r.room)
                    .and_then(|()| check_edge(&r.origin))
                    .and_then(|()| {
                        if r.viewers > bus::MAX_EDGE_VIEWERS {
                            Err("more viewers than an edge can have".to_owned())
                        } else {
                            Ok(())
                        }
                    })
            }) {
                self.cluster.refused(BusKind::Counts, &why);
                continue;
            }
            let live = self.cluster.live();
            let region = live.edges.iter().find(|e| e.edge_id == from).map(|e| e.region.as_str());
            if counts.region != self.cluster.region() || region != Some(self.cluster.region()) {
                self.cluster.refused(BusKind::Counts, "counts from another region");
                continue;
            }
            let mut state = self.state();
            let report = state.reports.entry(counts.from).or_insert_with(|| Report {
                heard: Instant::now(),
                at_ms: counts.at_ms,
                rooms: Vec::new(),
            });
            // A big edge's counts come in several messages of one moment.
            if report.at_ms != counts.at_ms {
                report.rooms.clear();
            }
            report.heard = Instant::now();
            report.at_ms = counts.at_ms;
            report.rooms.extend(counts.rooms);
        }
    }

    /// Regions' totals of rooms this edge is the origin of.
    pub(super) async fn hear_regional(self: Arc<Self>, mut sub: async_nats::Subscriber) {
        while let Some(Heard { body: counts, from, .. }) =
            self.next_from_edge::<RegionCounts>(&mut sub, BusKind::Regional).await
        {
            // A region's totals come from its aggregator, which all agree
            // on: so there are as many regions as regions with live edges,
            // and no total above what their edges could hold.
            let live = self.cluster.live();
            if live.aggregator(&counts.region) != Some(from.as_str()) {
                self.cluster
                    .refused(BusKind::Regional, "counts from an edge that does not sum that region");
                continue;
            }
            let edges_in_region = live.edges.iter().filter(|e| e.region == counts.region).count() as u64;
            let most = bus::MAX_EDGE_VIEWERS.saturating_mul(edges_in_region);
            if let Err(why) = counts.rooms.iter().try_for_each(|r| {
                self.check_room(&r.tenant, &r.room).and_then(|()| {
                    if r.viewers > most {
                        Err("more viewers than the region's edges can have".to_owned())
                    } else {
                        Ok(())
                    }
                })
            }) {
                self.cluster.refused(BusKind::Regional, &why);
                continue;
            }
            let lag = crate::unix_now_ms().saturating_sub(counts.at_ms);
            self.cluster
                .stats()
                .presence_lag_ms
                .store(lag, std::sync::atomic::Ordering::Relaxed);
            metrics::gauge!("throng_presence_lag_seconds").set(lag as f64 / 1000.0);
            let Some(rooms) = self.rooms.upgrade() else {
                return;
            };
            for r in counts.rooms {
                if !self.originates(&live, &r.tenant, &r.room) {
                    self.cluster
                        .refused(BusKind::Regional, "a room this edge is not the origin of");
                    continue;
                }
                let key = RoomKey {
                    tenant: Arc::from(r.tenant.as_str()),
                    name: Arc::from(r.room.as_str()),
                };
                rooms.peer_viewers(&key, Peer::Region(counts.region.clone()), r.viewers);
            }
        }
    }
}

/// A region's viewers per (tenant, room).
pub(super) type RoomSums = HashMap<(String, String), u64>;

/// The aggregator's sums: per origin, the oldest count summed in and the
/// region's total of each of its rooms (with a 0 for a room told before
/// and not counted now). Forgets reports of edges not live or older than
/// `stale`.
pub(super) fn aggregate(state: &mut State, live: &LiveSet, stale: Duration) -> HashMap<String, (u64, Vec<RoomCount>)> {
    state
        .reports
        .retain(|edge, r| live.contains(edge) && r.heard.elapsed() < stale);
    let mut sums: HashMap<String, (u64, RoomSums)> = HashMap::new();
    for report in state.reports.values() {
        for r in &report.rooms {
            let (at_ms, rooms) = sums.entry(r.origin.clone()).or_insert((u64::MAX, HashMap::new()));
            *at_ms = (*at_ms).min(report.at_ms);
            let n = rooms.entry((r.tenant.clone(), r.room.clone())).or_insert(0);
            *n = n.saturating_add(r.viewers);
        }
    }
    let now = crate::unix_now_ms();
    for (origin, told) in std::mem::take(&mut state.told) {
        if !live.contains(&origin) {
            continue;
        }
        let (_, rooms) = sums.entry(origin).or_insert((now, HashMap::new()));
        for room in told {
            rooms.entry(room).or_insert(0);
        }
    }
    let mut out = HashMap::new();
    for (origin, (at_ms, rooms)) in sums {
        let told: Vec<(String, String)> = rooms.iter().filter(|(_, n)| **n > 0).map(|(k, _)| k.clone()).collect();
        if !told.is_empty() {
            state.told.insert(origin.clone(), told);
        }
        let rooms = rooms
            .into_iter()
            .map(|((tenant, room), viewers)| RoomCount { tenant, room, viewers })
            .collect();
        out.insert(origin, (at_ms, rooms));
    }
    out
}

/// Cuts an edge's counts into bus messages that fit.
pub(super) fn split_counts(counts: EdgeCounts) -> Vec<EdgeCounts> {
    let mut out = Vec::new();
    let mut part = Vec::new();
    let mut size = 0;
    for r in counts.rooms {
        let s = r.origin.len() + r.tenant.len() + r.room.len() + 16;
        if size + s > bus::FORWARD_SPLIT_BYTES && !part.is_empty() {
            out.push(std::mem::take(&mut part));
            size = 0;
        }
        size += s;
        part.push(r);
    }
    if !part.is_empty() || out.is_empty() {
        out.push(part);
    }
    out.into_iter()
        .map(|rooms| EdgeCounts {
            from: counts.from.clone(),
            region: counts.region.clone(),
            at_ms: counts.at_ms,
            rooms,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::LiveEdge;

    fn live(ids: &[&str]) -> LiveSet {
        LiveSet {
            edges: ids
                .iter()
                .map(|id| LiveEdge {
                    edge_id: (*id).to_owned(),
                    region: "eu".into(),
                    quic: "127.0.0.1:1".into(),
                    incarnation: 1,
                })
                .collect(),
        }
    }

    fn report(state: &mut State, edge: &str, at_ms: u64, rooms: &[(&str, &str, u64)]) {
        state.reports.insert(
            edge.to_owned(),
            Report {
                heard: Instant::now(),
                at_ms,
                rooms: rooms
                    .iter()
                    .map(|(origin, room, viewers)| OriginCount {
                        origin: (*origin).to_owned(),
                        tenant: "acme".into(),
                        room: (*room).to_owned(),
                        viewers: *viewers,
                    })
                    .collect(),
            },
        );
    }

    fn sorted(mut rooms: Vec<RoomCount>) -> Vec<(String, u64)> {
        rooms.sort_by(|a, b| a.room.cmp(&b.room));
        rooms.into_iter().map(|r| (r.room, r.viewers)).collect()
    }

    #[test]
    fn the_aggregator_sums_per_origin_and_says_once_when_a_room_empties() {
        let live = live(&["a", "b", "c", "o1", "o2"]);
        let mut state = State::default();
        report(&mut state, "a", 100, &[("o1", "x", 3), ("o2", "y", 1)]);
        report(&mut state, "b", 90, &[("o1", "x", 4), ("o1", "z", 2)]);
        let mut out = aggregate(&mut state, &live, Duration::from_secs(60));
        assert_eq!(out.len(), 2, "one message per origin");
        let (at, o1) = out.remove("o1").unwrap();
        assert_eq!(at, 90, "the oldest count summed in");
        assert_eq!(sorted(o1), vec![("x".into(), 7), ("z".into(), 2)]);
        assert_eq!(sorted(out.remove("o2").unwrap().1), vec![("y".into(), 1)]);

        // b's viewers of z left, and a stopped relaying anything.
        report(&mut state, "b", 200, &[("o1", "x", 4)]);
        report(&mut state, "a", 200, &[]);
        let mut out = aggregate(&mut state, &live, Duration::from_secs(60));
        assert_eq!(
            sorted(out.remove("o1").unwrap().1),
            vec![("x".into(), 4), ("z".into(), 0)]
        );
        assert_eq!(sorted(out.remove("o2").unwrap().1), vec![("y".into(), 0)]);
        assert!(out.is_empty());

        // Said once: the next round names only what has viewers.
        let mut out = aggregate(&mut state, &live, Duration::from_secs(60));
        assert_eq!(sorted(out.remove("o1").unwrap().1), vec![("x".into(), 4)]);
        assert!(out.is_empty());
    }

    #[test]
    fn counts_of_a_dead_or_silent_edge_are_dropped() {
        let mut state = State::default();
        report(&mut state, "a", 1, &[("o", "x", 3)]);
        report(&mut state, "gone", 1, &[("o", "x", 5)]);
        let mut out = aggregate(&mut state, &live(&["a", "o"]), Duration::from_secs(60));
        assert_eq!(sorted(out.remove("o").unwrap().1), vec![("x".into(), 3)]);
        let out = aggregate(&mut state, &live(&["a", "o"]), Duration::ZERO);
        // a fell silent: its room is told once more, with nobody in it.
        assert_eq!(sorted(out.get("o").unwrap().1.clone()), vec![("x".into(), 0)]);
        assert!(state.reports.is_empty());
    }

    #[test]
    fn big_counts_are_cut_into_messages_that_fit() {
        let rooms: Vec<OriginCount> = (0..40_000)
            .map(|i| OriginCount {
                origin: "origin-edge".into(),
                tenant: "acme".into(),
                room: format!("room-{i:08}"),
                viewers: 1,
            })
            .collect();
        let parts = split_counts(EdgeCounts {
            from: "a".into(),
            region: "eu".into(),
            at_ms: 5,
            rooms,
        });
        assert!(parts.len() > 1);
        assert_eq!(parts.iter().map(|p| p.rooms.len()).sum::<usize>(), 40_000);
        for p in &parts {
            assert!(bus::encode(p).len() <= bus::MAX_ROOM_BUS_BYTES);
            assert_eq!(p.at_ms, 5, "one moment: the aggregator joins the parts");
        }
        let empty = split_counts(EdgeCounts {
            from: "a".into(),
            region: "eu".into(),
            at_ms: 5,
            rooms: Vec::new(),
        });
        assert_eq!(empty.len(), 1, "an empty count is still said once");
    }
}
