//! An edge that goes silent (killed, or cut off) says nothing: its
//! viewers notice by the silence alone. With the client library's
//! defaults a viewer notices within `idle_timeout` of the edge's last
//! packet (on a090a11 it took idle timeout plus keep-alive: 15 s where the
//! docs said about 10 s), and not before the edge had its due.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use throng_client::{Client, ConnectOptions};
use throng_tests::TestEdge;
use tokio::net::UdpSocket;
use tokio::sync::Mutex;
use tokio::time::Instant;

/// A UDP relay between one client and the edge that, once `cut` is set,
/// forwards nothing more after the next packet from the edge: to the
/// client the edge goes silent right after a packet it received. The
/// instant of that last packet is kept.
struct Relay {
    addr: SocketAddr,
    cut: Arc<AtomicBool>,
    last_from_edge: Arc<Mutex<Option<Instant>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn start(edge: SocketAddr) -> Relay {
        let front = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let back = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        back.connect(edge).await.expect("connect");
        let addr = front.local_addr().expect("addr");
        let cut = Arc::new(AtomicBool::new(false));
        let last_from_edge = Arc::new(Mutex::new(None));
        let (c, last) = (Arc::clone(&cut), Arc::clone(&last_from_edge));
        let task = tokio::spawn(async move {
            let (mut up, mut down) = (vec![0u8; 65_536], vec![0u8; 65_536]);
            let mut client = None;
            let mut silent = false;
            loop {
                tokio::select! {
                    r = front.recv_from(&mut up) => {
                        let Ok((n, from)) = r else { return };
                        client = Some(from);
                        if !silent {
                            let _ = back.send(&up[..n]).await;
                        }
                    }
                    r = back.recv(&mut down) => {
                        let Ok(n) = r else { return };
                        if silent {
                            continue;
                        }
                        if let Some(to) = client {
                            let _ = front.send_to(&down[..n], to).await;
                            *last.lock().await = Some(Instant::now());
                        }
                        silent = c.load(Ordering::SeqCst);
                    }
                }
            }
        });
        Relay {
            addr,
            cut,
            last_from_edge,
            task,
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_edge_is_noticed_within_the_idle_timeout_with_the_defaults() {
    let edge = TestEdge::start(|_| {}).await;
    let relay = Relay::start(edge.addr().parse().expect("edge addr")).await;
    let direct = edge.options(edge.token("acme", "viewer", "viewer", "*"));
    let opts = ConnectOptions {
        server: relay.addr.to_string(),
        ..direct
    };
    let defaults = ConnectOptions::new("", Vec::new(), "");
    assert_eq!(opts.idle_timeout, defaults.idle_timeout, "the library's defaults");
    let client = Client::connect(opts.clone()).await.expect("connects through the relay");
    let _room = client.join("lobby").await.expect("join");

    // A few keep-alives pass first, so the cut falls anywhere in their
    // cycle; then the edge goes silent after its next packet.
    tokio::time::sleep(opts.keep_alive * 2).await;
    relay.cut.store(true, Ordering::SeqCst);
    let why = tokio::time::timeout(opts.idle_timeout * 3, client.closed())
        .await
        .expect("the viewer noticed the silence at all");
    let last = relay.last_from_edge.lock().await.expect("the edge spoke");
    let waited = last.elapsed();
    eprintln!("silent edge noticed after {waited:?} ({why})");
    // A second for timers on two busy cores; the edge is given at least
    // the idle timeout less a keep-alive.
    assert!(
        waited <= opts.idle_timeout + Duration::from_secs(1),
        "noticed after {waited:?}, past the idle timeout {:?}",
        opts.idle_timeout
    );
    assert!(
        waited + opts.keep_alive >= opts.idle_timeout,
        "gave up after {waited:?}: too soon for an idle timeout of {:?}",
        opts.idle_timeout
    );
    edge.edge.shutdown().await;
}
