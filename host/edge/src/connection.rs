//! One client connection: Hello, then control frames, and one writer task
//! per joined room.
//!
//! ```text
//! client ──control stream──▶ read loop ──Send──▶ room inbox
//!        ◀─control stream─── control writer ◀── acks/rejections (rooms, read loop)
//!        ◀─room stream────── room writer ◀── ViewerSlot ◀── room tick
//! ```

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::peer::{In, Out, Peer};
use bytes::Bytes;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use throng_wire::{
    Batch, ClientFrame, Counters, EdgeFrame, ErrorCode, FrameBuffer, Message, Resumed, encode, split_to_fit,
    validate_room_name,
};
use tokio::sync::mpsc;
use tracing::Instrument;

use crate::Shared;
use crate::admission::Unauthenticated;
use crate::auth::Grant;
use crate::config::GroupHistory;
use crate::group_store::GroupStore;
use crate::log::Admission;
use crate::room::{Creator, Inbound, Next, ReplyTx, RoomError, RoomHandle, RoomKey, ViewerSlot};

/// Largest read from a stream at once; bounds buffering beyond one frame.
const READ_CHUNK: usize = 64 * 1024;
/// Frames refused for rate within one window (from the window's first
/// refusal). A window, not a run of refusals in a row: a flood at many times
/// the rate lets one frame through every 1/rate seconds, which would end a
/// run for ever. Eight bytes: every idle viewer's task holds one.
#[derive(Debug, Default)]
struct Refusals {
    count: u32,
    /// When the window began, in milliseconds of a process-wide clock that
    /// wraps every 49 days (compared with wrapping arithmetic).
    since_ms: u32,
}

impl Refusals {
    const WINDOW_MS: u32 = 1_000;

    /// Counts one refusal; returns the refusals in the current window.
    fn count(&mut self) -> u32 {
        static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
        // Truncation is the wrap the comparison below expects.
        let now = EPOCH.get_or_init(std::time::Instant::now).elapsed().as_millis() as u32;
        if self.count > 0 && now.wrapping_sub(self.since_ms) <= Self::WINDOW_MS {
            self.count += 1;
        } else {
            self.since_ms = now;
            self.count = 1;
        }
        self.count
    }
}

/// How long a fatal error frame gets to reach the client before the close.
const LINGER_ON_ERROR: Duration = Duration::from_secs(1);

/// A fatal condition: sent as an `Error` frame, then the connection closes.
type Fatal = (ErrorCode, String);

/// Completes the handshake, then hands the connection to a task of its
/// own: the handshake's state is large and a task keeps its largest state
/// for life, so an idle viewer would carry it for hours.
pub(crate) async fn serve(
    incoming: quinn::Incoming,
    shared: Arc<Shared>,
    slot: Unauthenticated,
    tasks: tokio_util::task::TaskTracker,
) {
    let id = shared.next_connection_id();
    let remote = incoming.remote_address();
    let span = tracing::info_span!("conn", id, %remote, tenant = tracing::field::Empty, user = tracing::field::Empty);
    let handshake = tokio::time::timeout(shared.config.limits.handshake_timeout, incoming.into_future());
    let conn = match handshake.instrument(span.clone()).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            let _enter = span.enter();
            tracing::debug!(error = %e, "handshake failed");
            metrics::counter!("throng_handshakes_failed_total", "reason" => "error").increment(1);
            return;
        }
        Err(_) => {
            // Dropping the connecting future abandons the handshake.
            metrics::counter!("throng_handshakes_failed_total", "reason" => "timeout").increment(1);
            return;
        }
    };
    let conn = if negotiated_h3(&conn) {
        let Some(web) = shared.webtransport.as_ref() else {
            // `h3` is offered only with WebTransport on.
            conn.close(0u32.into(), b"WebTransport is off");
            return;
        };
        match web
            .accept(conn, shared.config.limits.hello_timeout)
            .instrument(span.clone())
            .await
        {
            Ok(session) => {
                metrics::counter!("throng_webtransport_sessions_total").increment(1);
                Peer::Web(Arc::new(session))
            }
            Err(e) => {
                // Debug, not info: anyone can make these by the thousand.
                let _enter = span.enter();
                tracing::debug!(error = %e, "WebTransport session refused");
                metrics::counter!("throng_webtransport_refused_total", "reason" => e.label()).increment(1);
                return;
            }
        }
    } else {
        if shared.webtransport.is_some() {
            // The handshake allowed a browser's HTTP/3 streams; a native
            // client needs its control stream and nothing more.
            conn.set_max_concurrent_bi_streams(1u32.into());
            conn.set_max_concurrent_uni_streams(0u32.into());
        }
        Peer::Quic(conn)
    };
    metrics::counter!("throng_connections_total").increment(1);
    metrics::gauge!("throng_connections").increment(1.0);
    shared
        .open_connections
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    tasks.spawn(
        async move {
            run(id, conn, &shared, slot).await;
            shared
                .open_connections
                .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            metrics::gauge!("throng_connections").decrement(1.0);
        }
        .instrument(span),
    );
}

/// Whether the handshake settled on HTTP/3, i.e. a browser's WebTransport.
fn negotiated_h3(conn: &quinn::Connection) -> bool {
    conn.handshake_data()
        .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|d| d.protocol)
        .is_some_and(|p| p == web_transport_quinn::ALPN.as_bytes())
}

async fn run(id: u64, conn: Peer, shared: &Arc<Shared>, slot: Unauthenticated) {
    let limits = &shared.config.limits;
    let (send, recv) = match tokio::time::timeout(limits.hello_timeout, conn.accept_bi()).await {
        Ok(Ok(streams)) => streams,
        Ok(Err(_)) => return,
        Err(_) => {
            close(&conn, ErrorCode::Unauthenticated, "no control stream opened in time");
            return;
        }
    };
    let closer = conn.clone();
    let (reply, replies) = ReplyTx::channel(limits.reply_queue as usize, move || {
        // The queue is full, so no error frame could get through: the
        // close carries the code. Closing twice is harmless.
        if !closer.is_closed() {
            tracing::info!(code = %ErrorCode::TooSlow, "closing: the client does not read its replies");
            metrics::counter!("throng_connections_closed_total", "reason" => "not_reading").increment(1);
            close(&closer, ErrorCode::TooSlow, "too slow: not reading replies");
        }
    });
    let writer = tokio::spawn(write_control(send, replies, conn.clone(), limits.max_frame_bytes));
    let mut reader = Reader {
        recv,
        buf: FrameBuffer::new(limits.max_frame_bytes),
    };

    let outcome = match tokio::time::timeout(limits.hello_timeout, reader.next()).await {
        Err(_) => Err((ErrorCode::Unauthenticated, "no Hello within the hello timeout".into())),
        Ok(Err(ReadError::Stream)) | Ok(Ok(None)) => Ok(None),
        Ok(Err(ReadError::Decode(fatal))) => Err(fatal),
        Ok(Ok(Some(ClientFrame::Hello { token }))) => shared
            .authenticator()
            .verify(&token)
            .map(Some)
            .map_err(|e| (e.code(), e.to_string())),
        Ok(Ok(Some(_))) => Err((ErrorCode::UnexpectedFrame, "the first frame must be Hello".into())),
    };
    let outcome = match outcome {
        // Authenticated: trade the half-open slot for a viewer's.
        Ok(Some(grant)) => match shared.admission.authenticate(slot) {
            Some(permit) => Ok(Some((grant, permit))),
            None => Err((ErrorCode::ServerBusy, "the edge is at max_connections".into())),
        },
        other => other.map(|_| None),
    };
    let (grant, _permit) = match outcome {
        Ok(Some(granted)) => granted,
        Ok(None) => return,
        Err(fatal) => {
            tracing::info!(code = %fatal.0, reason = %fatal.1, "refused");
            metrics::counter!("throng_auth_refused_total").increment(1);
            let _ = reply.send(error_frame(fatal));
            drop(reply);
            let _ = writer.await;
            return;
        }
    };
    let span = tracing::Span::current();
    span.record("tenant", grant.session.tenant.as_str());
    span.record("user", grant.session.user.as_str());
    let _ = reply.send(EdgeFrame::Welcome {
        session: grant.session.clone(),
        limits: shared.wire_limits.clone(),
        expires_at: grant.expires_at,
    });
    let expiry = expiry_deadline(grant.expires_at);

    shared.presence.connected(&grant.session.tenant, &grant.session.user);
    let mut session = Session {
        id,
        conn: conn.clone(),
        shared,
        rate_key: crate::rate_key(&grant.session.tenant, &grant.session.user),
        tenant: Arc::from(grant.session.tenant.as_str()),
        user: Arc::from(grant.session.user.as_str()),
        grant: Box::new(grant),
        reply: reply.clone(),
        joined: HashMap::new(),
        control: Box::new(RateLimiter::direct(
            Quota::per_second(crate::nonzero(limits.control_rate_per_sec))
                .allow_burst(crate::nonzero(limits.control_burst)),
        )),
        refused: Refusals::default(),
        rooms_created: 0,
        expiry,
        who_in_flight: Arc::default(),
    };
    // Boxed, and reset rather than remade: a timer is large, and this task
    // lives as long as the viewer.
    let mut expiry = Box::pin(tokio::time::sleep_until(session.expiry));
    let kick = shared.kicks.register(&session.rate_key, id);
    // Why the edge ends the connection, when it does: the close carries it
    // (fatal codes are closed by the writer already; this covers the rest).
    let mut last_words: Option<Fatal> = None;
    // Whether the client ended the session (else the edge did, with an
    // Error frame on the control stream).
    let mut client_left = false;
    loop {
        let frame = tokio::select! {
            _ = shared.shutdown.cancelled() => {
                let _ = reply.send(error_frame((ErrorCode::ShuttingDown, "the edge is shutting down".into())));
                break;
            }
            // A kick between two frames is kept (a stored permit), so a
            // fresh wait each time round loses none.
            reason = kick.rung() => {
                tracing::info!(%reason, "closing: disconnected through the admin API");
                metrics::counter!("throng_connections_closed_total", "reason" => "disconnected").increment(1);
                let fatal = (ErrorCode::Disconnected, reason);
                let _ = reply.send(error_frame(fatal.clone()));
                last_words = Some(fatal);
                break;
            }
            _ = &mut expiry => {
                // A token's `exp` holds for the whole session, not just its
                // start: without a Refresh, the session ends with it.
                tracing::info!(code = %ErrorCode::TokenExpired, "closing: the token expired");
                metrics::counter!("throng_connections_closed_total", "reason" => "token_expired").increment(1);
                let _ = reply.send(error_frame((
                    ErrorCode::TokenExpired,
                    "the token expired; send Refresh with a later token before it does".into(),
                )));
                break;
            }
            frame = reader.next() => frame,
        };
        match frame {
            Ok(Some(frame)) => {
                // Boxed: a join's state is large and only lives while joining.
                if let Err(fatal) = Box::pin(session.on_frame(frame)).await {
                    tracing::info!(code = %fatal.0, reason = %fatal.1, "closing on protocol error");
                    let _ = reply.send(error_frame(fatal.clone()));
                    last_words = Some(fatal);
                    break;
                }
                if expiry.deadline() != session.expiry {
                    expiry.as_mut().reset(session.expiry); // refreshed
                }
            }
            Ok(None) | Err(ReadError::Stream) => {
                client_left = true;
                break;
            }
            Err(ReadError::Decode(fatal)) => {
                tracing::info!(code = %fatal.0, reason = %fatal.1, "closing on bad frame");
                metrics::counter!("throng_bad_frames_total").increment(1);
                let _ = reply.send(error_frame(fatal));
                break;
            }
        }
    }
    let mut writer = writer;
    if !client_left {
        // The Error frame first, then the rooms' streams end: a client
        // that saw its room end before the error (a viewer whose token
        // expired reading "the edge ended room") would not know why. The
        // writer closes the connection itself after a fatal error, once the
        // frame is acknowledged or LINGER_ON_ERROR passed.
        let _ = tokio::time::timeout(LINGER_ON_ERROR * 2, &mut writer).await;
    }
    session.leave_all().await;
    session.shared.kicks.unregister(&session.rate_key, id);
    shared.presence.disconnected(&session.tenant, &session.user);
    drop(session);
    drop(reply);
    // Rooms may still hold a reply sender for a tick; the writer also stops
    // when the connection closes.
    // (A JoinHandle must not be polled again once it has answered.)
    if !writer.is_finished() && tokio::time::timeout(LINGER_ON_ERROR * 2, writer).await.is_err() {
        tracing::debug!("control writer did not finish in time");
    }
    match last_words {
        Some((code, text)) => close(&conn, code, &text),
        None => conn.close(0, b"bye"),
    }
}

/// When a session whose token expires at `exp` (Unix seconds) must end.
fn expiry_deadline(exp: u64) -> tokio::time::Instant {
    let left = (exp + crate::auth::LEEWAY_SECS).saturating_sub(crate::auth::unix_now());
    // Far-future expiries would overflow an Instant; a year is forever here.
    tokio::time::Instant::now() + Duration::from_secs(left.min(365 * 24 * 3600))
}

fn error_frame((code, text): Fatal) -> EdgeFrame {
    EdgeFrame::Error {
        code: code.code(),
        text,
    }
}

fn close(conn: &Peer, code: ErrorCode, reason: &str) {
    conn.close(u32::from(code.code()), reason.as_bytes());
}

enum ReadError {
    Decode(Fatal),
    Stream,
}

struct Reader {
    recv: In,
    buf: FrameBuffer<ClientFrame>,
}

impl Reader {
    async fn next(&mut self) -> Result<Option<ClientFrame>, ReadError> {
        loop {
            if let Some(frame) = self
                .buf
                .next_frame()
                .map_err(|e| ReadError::Decode((e.code(), e.to_string())))?
            {
                return Ok(Some(frame));
            }
            match self.recv.read_chunk(READ_CHUNK).await {
                Ok(Some(chunk)) => self.buf.extend(&chunk),
                Ok(None) => {
                    return self
                        .buf
                        .finish()
                        .map(|()| None)
                        .map_err(|e| ReadError::Decode((e.code(), e.to_string())));
                }
                Err(_) => return Err(ReadError::Stream),
            }
        }
    }
}

/// Writes replies to the control stream. A fatal `Error` is the last frame:
/// the stream is finished, the client gets a moment to read it, then the
/// connection closes with the error's code.
async fn write_control(mut send: Out, mut replies: mpsc::Receiver<Box<EdgeFrame>>, conn: Peer, max_frame: u32) {
    // Acks and errors must not queue behind room batches.
    send.set_priority(10);
    loop {
        let frame = tokio::select! {
            f = replies.recv() => match f { Some(f) => f, None => break },
            _ = conn.closed() => return,
        };
        let fatal = match &*frame {
            EdgeFrame::Error { code, text } => ErrorCode::from_code(*code)
                .filter(|c| c.is_fatal())
                .map(|c| (c, text.clone())),
            _ => None,
        };
        let bytes = match encode(&frame, max_frame) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "reply does not fit a frame");
                continue;
            }
        };
        if send.write_chunk(bytes).await.is_err() {
            return;
        }
        if let Some((code, text)) = fatal {
            send.finish();
            let _ = tokio::time::timeout(LINGER_ON_ERROR, send.stopped()).await;
            if conn.is_web() {
                // Acknowledged is not read: a browser drops what its page
                // has not read yet when the session ends, and the session's
                // close ends the connection 100 ms after its capsule. The
                // page gets a moment to read the error (or to close the
                // session itself, having read it).
                let _ = tokio::time::timeout(LINGER_ON_ERROR, conn.closed()).await;
            }
            close(&conn, code, &text);
            return;
        }
    }
    send.finish();
    // The connection closes next: give the last replies (an error among
    // them, maybe) a moment to be read first.
    let _ = tokio::time::timeout(LINGER_ON_ERROR, send.stopped()).await;
}

struct JoinedRoom {
    handle: RoomHandle,
    /// Group rooms: the room's highest sequence so far (see `Seen`).
    head: Option<Arc<std::sync::atomic::AtomicU64>>,
}

struct Session<'a> {
    id: u64,
    conn: Peer,
    shared: &'a Arc<Shared>,
    /// Boxed: read on every frame, but large, and an idle viewer keeps it.
    grant: Box<Grant>,
    tenant: Arc<str>,
    user: Arc<str>,
    rate_key: String,
    reply: ReplyTx,
    joined: HashMap<String, JoinedRoom>,
    /// Control frames (all but Send) of this connection.
    control: Box<DefaultDirectRateLimiter>,
    /// Frames refused for rate (control frames over the connection's rate,
    /// Sends over the user's); more than `control_burst` in one window and
    /// the connection closes, so a flood does not cost the edge a decode
    /// and a reply for ever. One count for both: every idle viewer's task
    /// holds it.
    refused: Refusals,
    /// Rooms this connection's joins created.
    rooms_created: u32,
    /// When the session's token expires (with the leeway).
    expiry: tokio::time::Instant,
    /// Cluster-wide presence queries of this connection under way.
    who_in_flight: Arc<std::sync::atomic::AtomicUsize>,
}

/// Presence queries one connection may have under way across the cluster.
const MAX_WHO_PER_CONNECTION: usize = 4;

impl Session<'_> {
    async fn on_frame(&mut self, frame: ClientFrame) -> Result<(), Fatal> {
        // Leaving a joined room only frees state, and the client does not
        // wait for an answer: dropped, the two would disagree on the rooms.
        let exempt = match &frame {
            ClientFrame::Send { .. } => true,
            ClientFrame::Leave { room } => self.joined.contains_key(room),
            _ => false,
        };
        if !exempt && self.control.check().is_err() {
            let refused = self.refused.count();
            metrics::counter!("throng_control_frames_refused_total").increment(1);
            if refused > self.shared.config.limits.control_burst {
                return Err((
                    ErrorCode::RateLimited,
                    "control frames far beyond the rate limit".into(),
                ));
            }
            // A frame the client waits on gets its refusal, or the client
            // would wait for ever; the others get one notice per window.
            let code = ErrorCode::RateLimited.code();
            let text = "control frames too fast; slow down".to_owned();
            let answer = match frame {
                ClientFrame::Join { room, .. } => Some(EdgeFrame::JoinRefused { room, code, text }),
                ClientFrame::Presence { query_id, .. } => Some(EdgeFrame::PresenceRefused { query_id, code, text }),
                ClientFrame::Refresh { .. } => Some(EdgeFrame::RefreshRefused { code, text }),
                // Still counted above; the answer to "are you there" is yes.
                ClientFrame::Ping { nonce } => Some(EdgeFrame::Pong { nonce }),
                _ if refused == 1 => Some(EdgeFrame::Error { code, text }),
                _ => None,
            };
            if let Some(answer) = answer {
                let _ = self.reply.send(answer);
            }
            return Ok(());
        }
        match frame {
            ClientFrame::Hello { .. } => {
                return Err((ErrorCode::UnexpectedFrame, "Hello was already received".into()));
            }
            ClientFrame::Join {
                room,
                resume_from,
                epoch,
            } => self.join(room, resume_from, epoch).await,
            ClientFrame::Leave { room } => match self.joined.remove(&room) {
                Some(r) => r.handle.leave(self.id).await,
                None => {
                    let _ = self.reply.send(EdgeFrame::Error {
                        code: ErrorCode::NotJoined.code(),
                        text: format!("not in room `{room}`"),
                    });
                }
            },
            ClientFrame::Send {
                room,
                kind,
                body,
                client_msg_id,
            } => {
                let refuse = |code: ErrorCode, reason: String| EdgeFrame::Rejected {
                    client_msg_id,
                    code: code.code(),
                    reason,
                };
                let limits = &self.shared.config.limits;
                // The rate limit comes first: every Send costs the sender,
                // whatever is wrong with it.
                if self.shared.limiter.check_key(&self.rate_key).is_err() {
                    metrics::counter!("throng_rate_limited_total", "where" => "edge").increment(1);
                    if self.refused.count() > limits.control_burst {
                        return Err((ErrorCode::RateLimited, "sends far beyond the rate limit".into()));
                    }
                    let _ = self
                        .reply
                        .send(refuse(ErrorCode::RateLimited, "send rate exceeded; slow down".into()));
                    return Ok(());
                }
                let Some(joined) = self.joined.get(&room) else {
                    let _ = self.reply.send(refuse(
                        ErrorCode::NotJoined,
                        format!("join `{}` before sending", crate::untrusted(&room, 64)),
                    ));
                    return Ok(());
                };
                let verdict = if body.len() > limits.max_body_bytes as usize {
                    Err((
                        ErrorCode::BodyTooLarge,
                        format!("body is {} bytes; the limit is {}", body.len(), limits.max_body_bytes),
                    ))
                } else if !self.grant.session.role.may_send(kind) {
                    Err((
                        ErrorCode::Forbidden,
                        format!(
                            "role {} may not send {} messages",
                            self.grant.session.role.as_str(),
                            kind.as_str()
                        ),
                    ))
                } else {
                    let inbound = Inbound {
                        sender: Arc::clone(&self.user),
                        kind,
                        body,
                        client_msg_id,
                        reply: self.reply.clone(),
                        received_ms: crate::unix_now_ms(),
                        hops: 0,
                    };
                    joined.handle.send(inbound).map_err(|(_, e)| match e {
                        RoomError::Overloaded | RoomError::Limit(_) => {
                            (ErrorCode::RateLimited, "room is overloaded; retry later".into())
                        }
                        RoomError::ShuttingDown => (ErrorCode::ShuttingDown, "the edge is shutting down".into()),
                        // Only joins meet a room that cannot start.
                        RoomError::Unavailable => (ErrorCode::ServerBusy, e.to_string()),
                    })
                };
                if let Err((code, reason)) = verdict {
                    let _ = self.reply.send(refuse(code, reason));
                }
            }
            ClientFrame::Seen { room, seq } => match self.joined.get(&room).map(|r| r.head.as_ref()) {
                None => {
                    let _ = self.reply.send(EdgeFrame::Error {
                        code: ErrorCode::NotJoined.code(),
                        text: format!("not in room `{room}`"),
                    });
                }
                // A cursor past the room's end would skip whatever comes
                // next, for good: refuse it and keep the cursor.
                Some(Some(head)) if seq > head.load(std::sync::atomic::Ordering::Acquire) => {
                    let _ = self.reply.send(EdgeFrame::Error {
                        code: ErrorCode::SeqOutOfRange.code(),
                        text: format!(
                            "seen {seq} is beyond room `{room}`'s last message {}",
                            head.load(std::sync::atomic::Ordering::Acquire)
                        ),
                    });
                }
                Some(Some(_)) => {
                    let name: Arc<str> = Arc::from(room.as_str());
                    // Never moves a cursor back (see GroupLog::set_cursor).
                    self.shared.rooms.log().set_cursor(&self.tenant, &name, &self.user, seq);
                }
                Some(None) => {} // livecast rooms keep no cursors
            },
            ClientFrame::Refresh { token } => self.refresh(&token).await,
            ClientFrame::Ping { nonce } => {
                let _ = self.reply.send(EdgeFrame::Pong { nonce });
            }
            ClientFrame::Presence { query_id, users } => {
                let answer = if users.len() > crate::presence::MAX_QUERY_USERS {
                    EdgeFrame::PresenceRefused {
                        query_id,
                        code: ErrorCode::QueryTooLarge.code(),
                        text: format!(
                            "{} users in one query; at most {}",
                            users.len(),
                            crate::presence::MAX_QUERY_USERS
                        ),
                    }
                } else {
                    // A tenant sees only its own users.
                    let here = self.shared.presence.query(&self.tenant, &users);
                    match &self.shared.links {
                        Some(links) => {
                            self.ask_cluster(Arc::clone(links), query_id, users, here);
                            return Ok(());
                        }
                        None => EdgeFrame::Presence { query_id, online: here },
                    }
                };
                let _ = self.reply.send(answer);
            }
        }
        Ok(())
    }

    /// Answers a presence query from every edge of the cluster, off the
    /// connection's frame loop: the other edges have up to
    /// [`WHO_DEADLINE`](crate::cluster::links::WHO_DEADLINE) to answer.
    fn ask_cluster(
        &self,
        links: Arc<crate::cluster::links::Links>,
        query_id: u64,
        users: Vec<String>,
        here: Vec<bool>,
    ) {
        let in_flight = Arc::clone(&self.who_in_flight);
        if in_flight.fetch_add(1, std::sync::atomic::Ordering::AcqRel) >= MAX_WHO_PER_CONNECTION {
            in_flight.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
            let _ = self.reply.send(EdgeFrame::PresenceRefused {
                query_id,
                code: ErrorCode::RateLimited.code(),
                text: format!("at most {MAX_WHO_PER_CONNECTION} presence queries under way per connection"),
            });
            return;
        }
        let reply = self.reply.clone();
        let tenant = Arc::clone(&self.tenant);
        tokio::spawn(async move {
            let answer = match links.who_is_online(&tenant, users, here).await {
                Some(online) => EdgeFrame::Presence { query_id, online },
                None => EdgeFrame::PresenceRefused {
                    query_id,
                    code: ErrorCode::ServerBusy.code(),
                    text: "too many presence queries under way on this edge; ask again".into(),
                },
            };
            in_flight.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
            let _ = reply.send(answer);
        });
    }

    /// Takes a later token for the same tenant and user: its rights and
    /// expiry from now on, for the rooms already joined too (a room the new
    /// token does not allow is left, and the client told). A refused one
    /// changes nothing.
    async fn refresh(&mut self, token: &str) {
        let answer = match self.shared.authenticator().verify(token) {
            Ok(g) if g.session.tenant != self.grant.session.tenant || g.session.user != self.grant.session.user => {
                EdgeFrame::RefreshRefused {
                    code: ErrorCode::Forbidden.code(),
                    text: "a refresh token must be for the same tenant and user".into(),
                }
            }
            Ok(g) => {
                let expires_at = g.expires_at;
                self.expiry = expiry_deadline(expires_at);
                *self.grant = g;
                metrics::counter!("throng_token_refreshes_total").increment(1);
                let _ = self.reply.send(EdgeFrame::Refreshed { expires_at });
                let narrowed: Vec<String> = self
                    .joined
                    .keys()
                    .filter(|room| !self.grant.may_join(room))
                    .cloned()
                    .collect();
                for room in narrowed {
                    if let Some(r) = self.joined.remove(&room) {
                        r.handle.leave(self.id).await;
                    }
                    let _ = self.reply.send(EdgeFrame::Error {
                        code: ErrorCode::Forbidden.code(),
                        text: format!("the refreshed token does not allow room `{room}`; this session left it"),
                    });
                }
                return;
            }
            Err(e) => EdgeFrame::RefreshRefused {
                code: e.code().code(),
                text: e.to_string(),
            },
        };
        let _ = self.reply.send(answer);
    }

    async fn join(&mut self, room: String, resume_from: Option<u64>, epoch: u64) {
        let limits = &self.shared.config.limits;
        let refusal = if let Err(e) = validate_room_name(&room) {
            Some((ErrorCode::BadRoomName, e))
        } else if self.joined.contains_key(&room) {
            Some((ErrorCode::UnexpectedFrame, format!("already in room `{room}`")))
        } else if !self.grant.may_join(&room) {
            Some((ErrorCode::Forbidden, format!("token does not allow room `{room}`")))
        } else if self.joined.len() >= limits.max_rooms_per_connection as usize {
            Some((
                ErrorCode::TooManyRooms,
                format!("already in {} rooms, the limit", self.joined.len()),
            ))
        } else {
            None
        };
        if let Some((code, text)) = refusal {
            let _ = self.reply.send(EdgeFrame::JoinRefused {
                room,
                code: code.code(),
                text,
            });
            return;
        }
        let admission = if self.shared.rooms.is_group(&room) {
            match self.membership(&room).await {
                Ok(a) => Some(a),
                Err((code, text)) => {
                    let _ = self.reply.send(EdgeFrame::JoinRefused {
                        room,
                        code: code.code(),
                        text,
                    });
                    return;
                }
            }
        } else {
            None
        };
        // A returning member without a sequence of its own resumes after
        // what it last said it had seen; under `since_join` nobody reads
        // from before they joined, whatever they ask for.
        // A number of another log (one made anew) is not one of this log's:
        // the member resumes after its cursor here, and is told.
        let foreign = match (&admission, resume_from) {
            (Some(_), Some(_)) if epoch != 0 => match self.shared.rooms.log().epoch(&self.tenant).await {
                Ok(ours) => epoch != ours,
                Err(e) => {
                    let _ = self.reply.send(EdgeFrame::JoinRefused {
                        room,
                        code: ErrorCode::ServerBusy.code(),
                        text: format!("the group log cannot be read now; try again ({e})"),
                    });
                    return;
                }
            },
            _ => false,
        };
        let resume_from = if foreign { None } else { resume_from };
        let requested = resume_from;
        let since_join = self.shared.config.rooms.group_history == GroupHistory::SinceJoin;
        let resume_from = match admission {
            None => resume_from,
            Some(Admission::Member { cursor, joined_at }) => {
                let floor = if since_join { joined_at } else { 0 };
                Some(resume_from.unwrap_or(cursor).max(floor))
            }
            Some(Admission::New { joined_at }) if since_join || foreign => {
                Some(resume_from.unwrap_or(joined_at).max(joined_at))
            }
            Some(Admission::New { .. }) => resume_from,
            // `membership` turns a full room into a refusal.
            Some(Admission::Full { .. }) => return,
        };
        let Ok(stream) = self.conn.open_uni().await else {
            return; // the connection is gone; the read loop will notice
        };
        let key = RoomKey {
            tenant: Arc::clone(&self.tenant),
            name: Arc::from(room.as_str()),
        };
        let rooms_config = &self.shared.config.rooms;
        let conn = self.conn.clone();
        let slot = ViewerSlot::new(rooms_config.viewer_queue_batches, rooms_config.max_behind, move || {
            tracing::info!(
                connection = conn.stable_id(),
                "viewer too slow for too long; disconnecting"
            );
            close(&conn, ErrorCode::TooSlow, "too slow: fell behind for too long");
        });
        let creator = Creator {
            user: &self.rate_key,
            connection_may_create: self.rooms_created < limits.max_room_creations_per_connection,
            peer: false,
        };
        let (handle, info, created) = match self
            .shared
            .rooms
            .join(&key, self.id, Arc::clone(&slot), resume_from, epoch, creator)
            .await
        {
            Ok(joined) => joined,
            Err(e) => {
                let code = match e {
                    RoomError::Limit(_) => ErrorCode::RoomLimit,
                    RoomError::Unavailable | RoomError::Overloaded => ErrorCode::ServerBusy,
                    RoomError::ShuttingDown => ErrorCode::ShuttingDown,
                };
                let _ = self.reply.send(EdgeFrame::JoinRefused {
                    room,
                    code: code.code(),
                    text: e.to_string(),
                });
                return;
            }
        };
        self.rooms_created += u32::from(created);
        if let Some(Admission::New { joined_at }) = admission {
            // A member since admit; its cursor starts where it starts
            // reading (never before it joined: set_cursor only moves up).
            // Nor past the room's end: that would skip what comes next.
            let at = requested.unwrap_or(info.last_seq).min(info.last_seq).max(joined_at);
            self.shared
                .rooms
                .log()
                .set_cursor(&self.tenant, &key.name, &self.user, at);
        }
        let joined_frame = joined_frame(
            &room,
            info.online,
            info.recent,
            (info.epoch, info.resumed),
            limits.max_frame_bytes,
        );
        let catch_up = CatchUp {
            epoch: info.epoch,
            log: info.catch_up.map(|range| (self.shared.rooms.log().clone(), range)),
            stored: info.stored,
            key: key.clone(),
            tail: info.tail,
            online: info.online,
        };
        let max_frame = limits.max_frame_bytes;
        // Not in the connection's span: see write_live.
        info.writer
            .spawn(write_room(stream, joined_frame, catch_up, slot, max_frame));
        self.joined.insert(
            room,
            JoinedRoom {
                handle,
                head: info.head,
            },
        );
    }

    /// Makes this user a member of a group room, or finds it is one:
    /// refused with `RoomFull` when the room has its maximum (checked and
    /// recorded in one log transaction, so the cap is exact however many
    /// join at once).
    async fn membership(&self, room: &str) -> Result<Admission, Fatal> {
        let max = self.shared.config.rooms.group_max_members;
        let looked_up = self.shared.rooms.log().admit(&self.tenant, room, &self.user, max).await;
        match looked_up {
            Ok(Admission::Full { members }) => Err((
                ErrorCode::RoomFull,
                format!("the group has {members} members, its maximum"),
            )),
            Ok(admission) => Ok(admission),
            Err(e) => {
                tracing::error!(error = %e, "cannot read group membership");
                Err((ErrorCode::Internal, "cannot read the group's membership".into()))
            }
        }
    }

    async fn leave_all(&mut self) {
        for (_, r) in self.joined.drain() {
            r.handle.leave(self.id).await;
        }
    }
}

/// The first frame of a room stream. Recent messages that would not fit in
/// one frame are dropped oldest first.
fn joined_frame(
    room: &str,
    online: u64,
    mut recent: Vec<Message>,
    (epoch, resumed): (u64, Resumed),
    max_frame: u32,
) -> Bytes {
    loop {
        let frame = EdgeFrame::Joined {
            room: room.to_owned(),
            online,
            recent,
            epoch,
            resumed,
        };
        if let Ok(bytes) = encode(&frame, max_frame) {
            return bytes;
        }
        let EdgeFrame::Joined { recent: r, .. } = frame else {
            return Bytes::new();
        };
        recent = r;
        if recent.is_empty() {
            // Room names are bounded well below a frame; this cannot happen.
            return Bytes::new();
        }
        let drop = (recent.len() / 4).max(1);
        recent.drain(..drop);
    }
}

/// What a returning group member missed, sent between `Joined` and live batches.
struct CatchUp {
    /// The room's numbering, in the catch-up's batches.
    epoch: u64,
    log: Option<(GroupStore, (u64, u64))>,
    /// How far the room's log is stored, kept current.
    stored: Option<Arc<std::sync::atomic::AtomicU64>>,
    key: RoomKey,
    tail: Vec<Message>,
    online: u64,
}

/// Why a catch-up stopped when its stream went away.
const CLOSED: &str = "the room stream closed";

/// Messages per catch-up read (and at most per batch frame).
const CATCH_UP_CHUNK: usize = 256;

/// Longest a catch-up waits for its origin to store the end of its range.
const CATCH_UP_WAIT: Duration = Duration::from_secs(3);

impl CatchUp {
    /// Writes the missed messages in order, as batches of tick 0.
    async fn write(self, stream: &mut Out, max_frame: u32) -> Result<(), String> {
        // `missed` in a catch-up batch counts sequence numbers retention
        // removed before the member came back.
        let batch = |messages: Vec<Message>, missed: u64| {
            encode(
                &EdgeFrame::Batch(Batch {
                    room: self.key.name.to_string(),
                    tick: 0,
                    messages,
                    counters: Counters::default(),
                    pinned: Vec::new(),
                    online: self.online,
                    missed,
                    epoch: self.epoch,
                }),
                max_frame,
            )
            .map_err(|e| e.to_string())
        };
        if let Some((log, (mut from, to))) = self.log.clone() {
            // What retention removed is gone: start after it, and say in
            // the first batch how many sequence numbers were lost.
            let (tenant, room) = (&self.key.tenant, &self.key.name);
            let pruned = log.pruned_through(tenant, room).await.map_err(|e| e.to_string())?;
            let mut missed = 0;
            if pruned >= from {
                missed = pruned.min(to) - from + 1;
                from = pruned + 1;
            }
            let waiting_since = tokio::time::Instant::now();
            while from <= to {
                let chunk = log
                    .read(tenant, room, from, to, CATCH_UP_CHUNK)
                    .await
                    .map_err(|e| e.to_string())?;
                let Some(last) = chunk.last().map(|m| m.seq) else {
                    // In a cluster a relay's range may end beyond what the
                    // origin has stored yet (it never held those messages):
                    // they are stored within the origin's window.
                    let behind = self
                        .stored
                        .as_ref()
                        .is_some_and(|s| s.load(std::sync::atomic::Ordering::Acquire) < to);
                    if behind && waiting_since.elapsed() < CATCH_UP_WAIT {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                    break;
                };
                from = last + 1;
                for frame in split_to_fit(chunk, max_frame, 0) {
                    stream
                        .write_chunk(batch(frame, std::mem::take(&mut missed))?)
                        .await
                        .map_err(|_| CLOSED.to_owned())?;
                }
            }
            if missed > 0 {
                // Everything asked for was removed: an empty batch says so.
                stream
                    .write_chunk(batch(Vec::new(), missed)?)
                    .await
                    .map_err(|_| CLOSED.to_owned())?;
            }
        }
        if !self.tail.is_empty() {
            for frame in split_to_fit(self.tail.clone(), max_frame, 0) {
                stream
                    .write_chunk(batch(frame, 0)?)
                    .await
                    .map_err(|_| CLOSED.to_owned())?;
            }
        }
        Ok(())
    }
}

/// Writes `Joined`, then what a returning member missed, then drains the
/// viewer's slot into its room stream. Runs on the room's class pool.
async fn write_room(mut stream: Out, joined: Bytes, catch_up: CatchUp, slot: Arc<ViewerSlot>, max_frame: u32) {
    if open_room(&mut stream, joined, catch_up, &slot, max_frame).await {
        // A task of its own: the catch-up's state is three times the size
        // of the live loop's, and the live loop runs for hours.
        tokio::spawn(write_live(stream, slot, max_frame));
    }
}

/// Drains the viewer's slot; follows the room to another class's pool when
/// it moves there. Not instrumented: entering a span on every wake-up of
/// 10,000 writers costs more than the few lines they log.
async fn write_live(mut stream: Out, slot: Arc<ViewerSlot>, max_frame: u32) {
    if let Drained::Moved(pool) = drain_room(&mut stream, &slot, max_frame).await {
        move_writer(&pool, stream, slot, max_frame);
    }
}

fn move_writer(pool: &tokio::runtime::Handle, stream: Out, slot: Arc<ViewerSlot>, max_frame: u32) {
    pool.spawn(write_live(stream, slot, max_frame));
}

/// How a writer's drain ended.
enum Drained {
    /// The room closed the slot (the viewer left, or the room retired).
    Done,
    /// The room moved to another class's pool.
    Moved(tokio::runtime::Handle),
    /// The slot closed the connection: too slow for too long.
    Evicted,
}

/// Writes `Joined` and the catch-up; false if the stream is unusable.
async fn open_room(stream: &mut Out, joined: Bytes, catch_up: CatchUp, slot: &ViewerSlot, max_frame: u32) -> bool {
    if stream.write_chunk(joined).await.is_err() {
        slot.close();
        return false;
    }
    if let Err(e) = catch_up.write(stream, max_frame).await {
        tracing::warn!(error = %e, "catch-up failed; closing the room stream");
        slot.close();
        stream.reset(u32::from(ErrorCode::Internal.code()));
        return false;
    }
    true
}

/// Writes batches until the room closes the slot, moves, or evicts.
async fn drain_room(stream: &mut Out, slot: &ViewerSlot, max_frame: u32) -> Drained {
    loop {
        let (deliveries, missed) = match slot.next().await {
            Next::Batches(deliveries, missed) => (deliveries, missed),
            Next::Move(pool) => return Drained::Moved(pool),
            Next::Evicted => return Drained::Evicted,
            Next::Done => break,
        };
        for (i, d) in deliveries.iter().enumerate() {
            let frame = if i == 0 && missed > 0 {
                // Rare path: this viewer fell behind, so it gets its own copy
                // saying how many batches it lost.
                let mut batch = d.batch.clone();
                batch.missed = missed;
                encode(&EdgeFrame::Batch(batch), max_frame).unwrap_or_else(|_| d.frame.clone())
            } else {
                d.frame.clone()
            };
            if stream.write_chunk(frame).await.is_err() {
                slot.close();
                return Drained::Done;
            }
        }
    }
    stream.finish();
    Drained::Done
}

#[cfg(test)]
mod tests {
    use super::*;

    fn size3<A, B, C, F>(_: fn(A, B, C) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    fn size4<A, B, C, D, F>(_: fn(A, B, C, D) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// A task holds its future's largest state for as long as it lives, and
    /// these live as long as a viewer stays: an idle viewer costs what they
    /// weigh. (With this toolchain: 1,448, 376 and 376 bytes; `run` grew
    /// from 1,072 when sessions got their token's expiry timer, a control
    /// frame limiter and an admission permit, by 72 bytes when the admin
    /// API could disconnect them, and by 32 when a fatal error waited to be
    /// delivered before the session's rooms end.)
    #[test]
    fn long_lived_per_viewer_tasks_stay_small() {
        assert!(size4(run) <= 1472, "run: {}", size4(run));
        assert!(size3(write_live) <= 512, "write_live: {}", size3(write_live));
        assert!(size4(write_control) <= 512, "write_control: {}", size4(write_control));
    }
}
