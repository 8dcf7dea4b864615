//! Forwarding: a relay's sends gathered per origin and flushed in one bus
//! message each, the origin's ingress, and its answers going back the same
//! way (`Ack` or `Rejected`, or `ServerBusy` past `FORWARD_TIMEOUT`).

use super::*;

impl Links {
    /// Queues a send for `origin`, to go out at the next flush.
    pub fn forward(&self, origin: &str, key: &RoomKey, m: Inbound, hops: u8) {
        if hops >= MAX_HOPS {
            refuse(
                &m.reply,
                m.client_msg_id,
                ErrorCode::ServerBusy,
                "the room's origin is moving; send again",
            );
            return;
        }
        let mut state = self.state();
        if state.pending.len() >= MAX_PENDING {
            drop(state);
            metrics::counter!("throng_forward_refused_total").increment(1);
            refuse(
                &m.reply,
                m.client_msg_id,
                ErrorCode::ServerBusy,
                "too many sends in flight to other edges",
            );
            return;
        }
        state.next_id += 1;
        let fwd_id = state.next_id;
        state.pending.insert(
            fwd_id,
            Pending {
                origin: origin.to_owned(),
                reply: m.reply,
                client_msg_id: m.client_msg_id,
                since: Instant::now(),
            },
        );
        state.outbox.entry(origin.to_owned()).or_default().push(Forwarded {
            tenant: key.tenant.to_string(),
            room: key.name.to_string(),
            fwd_id,
            hops: hops + 1,
            sender: m.sender.to_string(),
            kind: m.kind,
            body: m.body,
            received_ms: m.received_ms,
        });
    }

    /// Every `every`: one bus message per origin with what was gathered,
    /// and refusals for sends nobody answered.
    pub(super) async fn flush(self: Arc<Self>, every: Duration) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let live = self.cluster.live();
            let (outbox, expired) = {
                let mut state = self.state();
                // Answer queues of edges gone from the live set go too
                // (their task ends once the rooms' clones are dropped).
                state.repliers.retain(|edge, _| live.contains(edge));
                let outbox = std::mem::take(&mut state.outbox);
                let now = Instant::now();
                let expired: Vec<Pending> = if state.pending.values().any(|p| now - p.since >= FORWARD_TIMEOUT) {
                    let ids: Vec<u64> = state
                        .pending
                        .iter()
                        .filter(|(_, p)| now - p.since >= FORWARD_TIMEOUT)
                        .map(|(id, _)| *id)
                        .collect();
                    ids.iter().filter_map(|id| state.pending.remove(id)).collect()
                } else {
                    Vec::new()
                };
                (outbox, expired)
            };
            for p in expired {
                metrics::counter!("throng_forward_timeouts_total").increment(1);
                refuse(
                    &p.reply,
                    p.client_msg_id,
                    ErrorCode::ServerBusy,
                    "the room's origin did not answer; it may have the message (group rooms: check before sending again)",
                );
            }
            for (origin, items) in outbox {
                for items in split(items) {
                    let forward = Forward {
                        from: self.edge_id().to_owned(),
                        items,
                    };
                    let subject = bus::ingress_subject(&origin, self.edge_id());
                    if let Err(e) = self
                        .cluster
                        .publish(subject, BusKind::Forward, bus::encode(&forward))
                        .await
                    {
                        tracing::debug!(error = %e, %origin, "forward not published; its sends time out");
                    }
                }
            }
        }
    }

    /// Sends other edges forwarded to rooms this edge is the origin of.
    pub(super) async fn hear_ingress(self: Arc<Self>, mut sub: async_nats::Subscriber) {
        while let Some(Heard {
            body: forward, from, ..
        }) = self.next_from_edge::<Forward>(&mut sub, BusKind::Forward).await
        {
            let Some(rooms) = self.rooms.upgrade() else {
                return;
            };
            let reply = self.replier(&from);
            for item in forward.items {
                if let Err(why) = self.check_room(&item.tenant, &item.room) {
                    self.cluster.refused(BusKind::Forward, "a room this edge may not have");
                    refuse(&reply, item.fwd_id, ErrorCode::Malformed, &why);
                    continue;
                }
                // Counted again here, in one bucket with the user's sends
                // on this edge and from every other edge: so the user's
                // rate holds across the cluster for rooms of one origin.
                if self
                    .send_limiter
                    .check_key(&crate::rate_key(&item.tenant, &item.sender))
                    .is_err()
                {
                    metrics::counter!("throng_rate_limited_total", "where" => "origin").increment(1);
                    refuse(
                        &reply,
                        item.fwd_id,
                        ErrorCode::RateLimited,
                        "send rate exceeded across the cluster; slow down",
                    );
                    continue;
                }
                let key = RoomKey {
                    tenant: Arc::from(item.tenant.as_str()),
                    name: Arc::from(item.room.as_str()),
                };
                let inbound = Inbound {
                    sender: Arc::from(item.sender.as_str()),
                    kind: item.kind,
                    body: item.body,
                    client_msg_id: item.fwd_id,
                    reply: reply.clone(),
                    received_ms: item.received_ms,
                    hops: item.hops,
                };
                if let Err((m, e)) = rooms.peer_send(&key, inbound) {
                    let code = match e {
                        RoomError::Overloaded => ErrorCode::RateLimited,
                        _ => ErrorCode::ServerBusy,
                    };
                    refuse(&m.reply, m.client_msg_id, code, &e.to_string());
                }
            }
        }
    }

    /// The answer queue for sends forwarded by `edge`: one task gathers
    /// what rooms answer and sends it back in as few bus messages as it can.
    pub(super) fn replier(&self, edge: &str) -> ReplyTx {
        let mut state = self.state();
        if let Some(r) = state.repliers.get(edge) {
            return r.clone();
        }
        let (tx, rx) = ReplyTx::channel(REPLY_QUEUE, || {
            metrics::counter!("throng_forward_replies_dropped_total").increment(1);
        });
        state.repliers.insert(edge.to_owned(), tx.clone());
        let links = Arc::clone(&self.cluster);
        let subject = bus::replies_subject(edge, self.edge_id());
        let shutdown = self.shutdown.clone();
        self.tasks.spawn(send_replies(links, subject, rx, shutdown));
        tx
    }

    /// Answers to sends this edge forwarded.
    pub(super) async fn hear_replies(self: Arc<Self>, mut sub: async_nats::Subscriber) {
        while let Some(Heard {
            body: replies, from, ..
        }) = self.next_from_edge::<Replies>(&mut sub, BusKind::Replies).await
        {
            let answered: Vec<(Pending, Outcome)> = {
                let mut state = self.state();
                let mut answered = Vec::new();
                for r in replies.items {
                    // Only the edge a send went to answers it.
                    if state.pending.get(&r.fwd_id).is_some_and(|p| p.origin == from)
                        && let Some(p) = state.pending.remove(&r.fwd_id)
                    {
                        answered.push((p, r.outcome));
                    }
                }
                answered
            };
            for (p, outcome) in answered {
                let frame = match outcome {
                    Outcome::Ack { seq, epoch } => EdgeFrame::Ack {
                        client_msg_id: p.client_msg_id,
                        seq,
                        epoch,
                    },
                    Outcome::Rejected { code, reason } => EdgeFrame::Rejected {
                        client_msg_id: p.client_msg_id,
                        code,
                        reason: crate::untrusted(&reason, crate::room::MAX_REASON),
                    },
                };
                let _ = p.reply.send(frame);
            }
        }
    }
}

/// Gathers a forwarding edge's answers: whatever the rooms answered by the
/// time the first is read goes in one bus message.
pub(super) async fn send_replies(
    cluster: Arc<Cluster>,
    subject: String,
    mut rx: mpsc::Receiver<Box<EdgeFrame>>,
    shutdown: CancellationToken,
) {
    loop {
        let first = tokio::select! {
            _ = shutdown.cancelled() => return,
            f = rx.recv() => match f { Some(f) => f, None => return },
        };
        // A room answers a whole tick at once; let the rest of it land.
        tokio::task::yield_now().await;
        let mut items = Vec::new();
        let mut size = 0;
        let mut next = Some(first);
        while let Some(frame) = next {
            let item = match *frame {
                EdgeFrame::Ack {
                    client_msg_id,
                    seq,
                    epoch,
                } => Some(Reply {
                    fwd_id: client_msg_id,
                    outcome: Outcome::Ack { seq, epoch },
                }),
                EdgeFrame::Rejected {
                    client_msg_id,
                    code,
                    reason,
                } => Some(Reply {
                    fwd_id: client_msg_id,
                    outcome: Outcome::Rejected { code, reason },
                }),
                _ => None,
            };
            if let Some(item) = item {
                size += 24
                    + match &item.outcome {
                        Outcome::Rejected { reason, .. } => reason.len(),
                        Outcome::Ack { .. } => 0,
                    };
                items.push(item);
            }
            if size >= bus::FORWARD_SPLIT_BYTES {
                break;
            }
            next = rx.try_recv().ok();
        }
        if items.is_empty() {
            continue;
        }
        if let Err(e) = cluster
            .publish(subject.clone(), BusKind::Replies, bus::encode(&Replies { items }))
            .await
        {
            tracing::debug!(error = %e, "replies not published; the senders' edge times them out");
        }
    }
}

/// Cuts one origin's gathered sends into bus messages that fit.
pub(super) fn split(items: Vec<Forwarded>) -> Vec<Vec<Forwarded>> {
    let mut out: Vec<Vec<Forwarded>> = vec![Vec::new()];
    let mut size = 0;
    for item in items {
        let s = item.size();
        if size + s > bus::FORWARD_SPLIT_BYTES && out.last().is_some_and(|l| !l.is_empty()) {
            out.push(Vec::new());
            size = 0;
        }
        size += s;
        if let Some(last) = out.last_mut() {
            last.push(item);
        }
    }
    out.retain(|l| !l.is_empty());
    out
}
