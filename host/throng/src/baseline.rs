//! `throng bare-quinn` (hidden): the baseline `throng load --mode
//! bare-quinn` measures the edge against. It does what an edge's fanout
//! cannot do without: QUIC connections with the edge's TLS and transport
//! settings, one unidirectional stream per connection, and every tick the
//! same pre-encoded frame written to every stream. No Hello, auth, rooms,
//! policy or Wasm, so edge CPU over this CPU, for the same connections,
//! frame size and tick, is the cost of everything Throng adds.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use throng_edge::Config;
use tokio::sync::broadcast;

#[derive(Debug, clap::Args)]
pub struct BareQuinnArgs {
    /// UDP address to listen on; port 0 picks a free one.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Where the self-signed certificate is made (or reused), like the edge's data dir.
    #[arg(long)]
    cert_dir: PathBuf,
    /// How often the frame goes out to every connection.
    #[arg(long, default_value = "50ms", value_parser = humantime::parse_duration)]
    tick: Duration,
    /// Bytes per frame on the wire, the 4-byte length prefix included; 0
    /// sends nothing after the stream's opening marker (idle connections).
    #[arg(long, default_value_t = 0)]
    frame_bytes: usize,
    /// Start ticking only when a line arrives on stdin, so that frames do
    /// not compete with handshakes (the edge's rooms are quiet until the load
    /// generator's senders start, too).
    #[arg(long)]
    start_on_stdin: bool,
    /// Edge config whose [quic] settings (windows, buffers, timeouts) and
    /// rooms.viewer_queue_batches to use; default: the embedded dev config.
    #[arg(long)]
    config: Option<PathBuf>,
}

pub async fn run(a: BareQuinnArgs) -> Result<std::process::ExitCode> {
    if a.tick.is_zero() {
        bail!("--tick must be above 0");
    }
    if a.frame_bytes != 0
        && !(throng_wire::LENGTH_PREFIX + 1..=throng_wire::HARD_MAX_FRAME as usize).contains(&a.frame_bytes)
    {
        bail!(
            "--frame-bytes must be 0 or {}..={}",
            throng_wire::LENGTH_PREFIX + 1,
            throng_wire::HARD_MAX_FRAME
        );
    }
    let mut config = match &a.config {
        Some(p) => Config::load(p).with_context(|| format!("invalid config {}", p.display()))?,
        None => Config::dev().context("invalid embedded dev config")?,
    };
    config.data_dir = a.cert_dir.clone();
    config.listen = a.listen;
    // The edge's certificate handling and rustls setup, so the handshake
    // costs the same on both sides of the comparison.
    let identity = throng_edge::tls::identity(&config)?;
    let crypto = throng_edge::tls::server_crypto(&identity, None)?;
    let mut server = quinn::ServerConfig::with_crypto(crypto);
    server.transport_config(Arc::new(throng_edge::transport(&config)?));
    let endpoint = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(server),
        throng_edge::bind_udp(&config)?,
        Arc::new(quinn::TokioRuntime),
    )
    .with_context(|| format!("cannot listen on {}", a.listen))?;
    let local = endpoint.local_addr().context("no local address")?;
    let cert = std::fs::canonicalize(&identity.cert_path).unwrap_or(identity.cert_path);

    // Each connection has a bounded queue of frames like the edge's viewer
    // slots; one that falls behind loses the oldest.
    let (frames, _) = broadcast::channel::<Bytes>(config.rooms.viewer_queue_batches.max(1));
    if a.frame_bytes > 0 {
        let (frames, frame, every) = (frames.clone(), frame(a.frame_bytes), a.tick);
        let wait = a.start_on_stdin;
        tokio::spawn(async move {
            if wait {
                let mut line = String::new();
                let mut stdin = tokio::io::BufReader::new(tokio::io::stdin());
                // EOF counts as the signal too: the parent is gone or done.
                let _ = tokio::io::AsyncBufReadExt::read_line(&mut stdin, &mut line).await;
            }
            tick(frames, frame, every).await;
        });
    }
    println!("throng ready quic={local} cert={}", cert.display());
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => match i { Some(i) => i, None => break },
            _ = tokio::signal::ctrl_c() => break,
        };
        tokio::spawn(serve(incoming, frames.subscribe()));
    }
    endpoint.close(0u32.into(), b"bye");
    Ok(std::process::ExitCode::SUCCESS)
}

/// `len` bytes: a 4-byte big-endian length, then the payload, encoded once.
fn frame(len: usize) -> Bytes {
    let payload = len - throng_wire::LENGTH_PREFIX;
    let mut b = Vec::with_capacity(len);
    // payload ≤ HARD_MAX_FRAME (checked by the caller), which fits in u32.
    b.extend((payload as u32).to_be_bytes());
    b.resize(len, b'.');
    Bytes::from(b)
}

async fn tick(frames: broadcast::Sender<Bytes>, frame: Bytes, every: Duration) {
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        // Err only means nobody is connected right now.
        let _ = frames.send(frame.clone());
    }
}

async fn serve(incoming: quinn::Incoming, mut frames: broadcast::Receiver<Bytes>) {
    let Ok(conn) = incoming.await else { return };
    let Ok(mut stream) = conn.open_uni().await else { return };
    // An empty frame opens the stream at once, as the edge's Joined frame does.
    if stream.write_chunk(Bytes::from_static(&[0; 4])).await.is_err() {
        return;
    }
    loop {
        let frame = tokio::select! {
            f = frames.recv() => f,
            _ = conn.closed() => return,
        };
        match frame {
            Ok(bytes) => {
                if stream.write_chunk(bytes).await.is_err() {
                    return;
                }
            }
            // Fell behind: the oldest frames are gone, as with the edge's `missed`.
            Err(broadcast::error::RecvError::Lagged(_)) => {}
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_is_length_prefixed_to_the_asked_size() {
        let f = frame(300);
        assert_eq!(f.len(), 300);
        assert_eq!(u32::from_be_bytes([f[0], f[1], f[2], f[3]]), 296);
        let f = frame(5);
        assert_eq!(&f[..4], &[0, 0, 0, 1]);
    }
}
