//! Test module: a `message-filter` that tries everything the host's WASI
//! context must not give a guest (files, sockets, name lookups, the
//! environment, arguments) and answers every message with a rewrite
//! reporting what it got, so a test can read the sandbox from a viewer's
//! screen. It prints a line to stdout and one to stderr, which the host
//! writes to its log.
//!
//! Params: `file`, a host path that exists, and `connect`, a host address
//! that accepts TCP connections: a test sets them so that an open sandbox
//! would answer `yes`.

use std::cell::RefCell;
use std::net::ToSocketAddrs;

wit_bindgen::generate!({
    world: "message-filter",
    path: "../../wit",
});

thread_local! {
    /// (`file`, `connect`) from the params (Wasm is single-threaded).
    static TARGETS: RefCell<(String, String)> = const { RefCell::new((String::new(), String::new())) };
}

struct WasiProbe;

impl Guest for WasiProbe {
    fn configure(params: Params) -> Result<(), String> {
        let get = |key: &str| {
            params
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.clone())
                .ok_or(format!("missing param `{key}`"))
        };
        let targets = (get("file")?, get("connect")?);
        TARGETS.with(|t| *t.borrow_mut() = targets);
        Ok(())
    }

    fn filter(batch: Vec<Message>) -> Vec<Verdict> {
        let report = probe();
        println!("wasi-probe says hello on stdout: {report}");
        eprintln!("wasi-probe says hello on stderr");
        batch
            .iter()
            .map(|_| Verdict::Rewrite(report.clone().into_bytes()))
            .collect()
    }
}

/// One `name=yes|no` (or a count) per thing tried.
fn probe() -> String {
    let yes = |ok: bool| if ok { "yes" } else { "no" };
    let (file, connect) = TARGETS.with(|t| t.borrow().clone());
    let read_file = std::fs::read(&file).is_ok() || std::fs::read("Cargo.toml").is_ok();
    let list_dir = std::fs::read_dir("/").is_ok() || std::fs::read_dir(".").is_ok();
    let write_file =
        std::fs::write("wasi-probe.txt", b"x").is_ok() || std::fs::write("/tmp/wasi-probe.txt", b"x").is_ok();
    let tcp_listen = std::net::TcpListener::bind("127.0.0.1:0").is_ok();
    let tcp_connect = std::net::TcpStream::connect(&connect).is_ok();
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").is_ok();
    let dns = ("localhost", 80).to_socket_addrs().is_ok();
    let env = std::env::vars_os().count();
    let args = std::env::args_os().count();
    format!(
        "read_file={} list_dir={} write_file={} tcp_listen={} tcp_connect={} udp={} dns={} env={env} args={args}",
        yes(read_file),
        yes(list_dir),
        yes(write_file),
        yes(tcp_listen),
        yes(tcp_connect),
        yes(udp),
        yes(dns),
    )
}

export!(WasiProbe);
