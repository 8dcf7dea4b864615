//! A client's transport: a native QUIC connection (`throng/3`) or a
//! browser's WebTransport session (`h3`). Both carry the same protocol —
//! one bidirectional control stream, one unidirectional stream per joined
//! room — so the connection code is written once against these.
//!
//! Enums, not trait objects: the room writers are the hot path and the
//! per-viewer tasks hold these for hours, so they stay small and static.

use std::sync::Arc;

use bytes::Bytes;

/// The two ends of a client's transport.
#[derive(Clone)]
pub(crate) enum Peer {
    Quic(quinn::Connection),
    /// Boxed behind an `Arc`: a session is a few hundred bytes and every
    /// joined room's slow-viewer hook keeps a copy.
    Web(Arc<web_transport_quinn::Session>),
}

/// A stream the edge writes to. The WebTransport variants are boxed: they
/// are twice a quinn stream's size, and every idle viewer's tasks hold
/// these (see `connection::tests::long_lived_per_viewer_tasks_stay_small`).
pub(crate) enum Out {
    Quic(quinn::SendStream),
    Web(Box<web_transport_quinn::SendStream>),
}

/// A stream the edge reads from.
pub(crate) enum In {
    Quic(quinn::RecvStream),
    Web(Box<web_transport_quinn::RecvStream>),
}

/// The stream or the whole transport is gone; why is logged where it
/// matters, so callers only need to stop.
#[derive(Debug)]
pub(crate) struct Gone;

impl Peer {
    /// The client's control stream.
    pub(crate) async fn accept_bi(&self) -> Result<(Out, In), Gone> {
        match self {
            Self::Quic(c) => c
                .accept_bi()
                .await
                .map(|(s, r)| (Out::Quic(s), In::Quic(r)))
                .map_err(|e| {
                    tracing::debug!(error = %e, "closed before opening a control stream");
                    Gone
                }),
            Self::Web(s) => s
                .accept_bi()
                .await
                .map(|(s, r)| (Out::Web(Box::new(s)), In::Web(Box::new(r))))
                .map_err(|e| {
                    tracing::debug!(error = %e, "session closed before opening a control stream");
                    Gone
                }),
        }
    }

    /// A new stream for a joined room.
    pub(crate) async fn open_uni(&self) -> Result<Out, Gone> {
        match self {
            Self::Quic(c) => c.open_uni().await.map(Out::Quic).map_err(|_| Gone),
            Self::Web(s) => s.open_uni().await.map(|s| Out::Web(Box::new(s))).map_err(|_| Gone),
        }
    }

    /// Ends the transport with an error code (a [`throng_wire::ErrorCode`]
    /// number, or 0) the client sees as the close code.
    pub(crate) fn close(&self, code: u32, reason: &[u8]) {
        match self {
            Self::Quic(c) => c.close(code.into(), reason),
            // A WebTransport close travels as a capsule that browsers
            // report as `closeCode` and `reason`.
            Self::Web(s) => s.close(code, reason),
        }
    }

    /// Whether this is a browser's WebTransport session.
    pub(crate) fn is_web(&self) -> bool {
        matches!(self, Self::Web(_))
    }

    pub(crate) fn is_closed(&self) -> bool {
        match self {
            Self::Quic(c) => c.close_reason().is_some(),
            Self::Web(s) => s.close_reason().is_some(),
        }
    }

    pub(crate) async fn closed(&self) {
        match self {
            Self::Quic(c) => {
                c.closed().await;
            }
            Self::Web(s) => {
                s.closed().await;
            }
        }
    }

    pub(crate) fn stable_id(&self) -> usize {
        match self {
            Self::Quic(c) => c.stable_id(),
            Self::Web(s) => s.stable_id(),
        }
    }
}

impl Out {
    pub(crate) async fn write_chunk(&mut self, bytes: Bytes) -> Result<(), Gone> {
        match self {
            Self::Quic(s) => s.write_chunk(bytes).await.map_err(|_| Gone),
            Self::Web(s) => s.write_chunk(bytes).await.map_err(|_| Gone),
        }
    }

    pub(crate) fn finish(&mut self) {
        match self {
            Self::Quic(s) => {
                let _ = s.finish();
            }
            Self::Web(s) => {
                let _ = s.finish();
            }
        }
    }

    pub(crate) fn reset(&mut self, code: u32) {
        match self {
            Self::Quic(s) => {
                let _ = s.reset(code.into());
            }
            Self::Web(s) => {
                let _ = s.reset(code);
            }
        }
    }

    pub(crate) fn set_priority(&self, priority: i32) {
        match self {
            Self::Quic(s) => {
                let _ = s.set_priority(priority);
            }
            Self::Web(s) => {
                let _ = s.set_priority(priority);
            }
        }
    }

    /// Resolves when the client has read everything (or stopped the stream).
    pub(crate) async fn stopped(&self) {
        match self {
            Self::Quic(s) => {
                let _ = s.stopped().await;
            }
            Self::Web(s) => {
                let _ = s.stopped().await;
            }
        }
    }
}

impl In {
    /// The next bytes, `None` at the end of the stream.
    pub(crate) async fn read_chunk(&mut self, max: usize) -> Result<Option<Bytes>, Gone> {
        let chunk = match self {
            Self::Quic(r) => r.read_chunk(max, true).await.map_err(|_| Gone)?,
            Self::Web(r) => r.read_chunk(max, true).await.map_err(|_| Gone)?,
        };
        Ok(chunk.map(|c| c.bytes))
    }
}
