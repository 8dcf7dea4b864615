//! A real `nats-server` for a test: its own free loopback port and store
//! dir, stopped when dropped.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running nats-server with JetStream on, on 127.0.0.1.
#[derive(Debug)]
pub struct NatsServer {
    child: Option<Child>,
    port: u16,
    store: PathBuf,
    /// A config file (gateways) passed with `-c`.
    conf: Option<PathBuf>,
    /// With [`NatsServer::secured`]: each user's nkey seed file, by name.
    seeds: std::collections::BTreeMap<String, PathBuf>,
    _dir: tempfile::TempDir,
}

impl NatsServer {
    /// Starts one and waits (bounded) until it takes connections.
    pub fn start() -> NatsServer {
        Self::launch(tempfile::tempdir().expect("tempdir for nats-server"), None)
    }

    /// One server with `conf` (nats-server config syntax) besides the
    /// usual port and JetStream store.
    pub fn start_with(conf: &str) -> NatsServer {
        let dir = tempfile::tempdir().expect("tempdir for nats-server");
        let path = dir.path().join("nats.conf");
        std::fs::write(&path, conf).expect("nats-server config");
        Self::launch(dir, Some(path))
    }

    /// One server with JetStream that takes only the users `throng
    /// nats-auth` makes: an nkey per edge id in `edges` (it may publish on
    /// the bus only as itself) and per name in `apps` (it may not use the
    /// bus at all). [`NatsServer::seed_file`] has each one's seed.
    pub fn secured(edges: &[&str], apps: &[&str]) -> NatsServer {
        let own = |names: &[&str]| names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>();
        let users = throng_edge::cluster::nats_auth::users(&own(edges), &own(apps)).expect("nkeys");
        let dir = tempfile::tempdir().expect("tempdir for nats-server");
        let store = dir.path().join("jetstream");
        let conf = format!(
            "jetstream {{ store_dir: \"{}\" }}\n{}",
            store.display(),
            throng_edge::cluster::nats_auth::authorization(&users)
        );
        let path = dir.path().join("nats.conf");
        std::fs::write(&path, conf).expect("nats-server config");
        let mut seeds = std::collections::BTreeMap::new();
        for u in &users {
            let seed = dir.path().join(format!("{}.nk", u.name));
            std::fs::write(&seed, &u.seed).expect("seed file");
            seeds.insert(u.name.clone(), seed);
        }
        let mut server = Self::launch(dir, Some(path));
        server.seeds = seeds;
        server
    }

    /// The nkey seed file of a user of a [`NatsServer::secured`] server.
    pub fn seed_file(&self, name: &str) -> Option<PathBuf> {
        self.seeds.get(name).cloned()
    }

    /// A client of this server as `name` (a user of a secured server), or
    /// with no credentials.
    pub async fn connect_as(&self, name: Option<&str>) -> async_nats::Client {
        let mut options = async_nats::ConnectOptions::new();
        if let Some(name) = name {
            let path = self.seed_file(name).expect("a user of this server");
            let seed = std::fs::read_to_string(path).expect("seed");
            options = options.nkey(seed.trim().to_owned());
        }
        options.connect(self.url()).await.expect("test client connects")
    }

    /// Starts one in `dir` (its store, and `conf` if given) on a free port.
    fn launch(dir: tempfile::TempDir, conf: Option<PathBuf>) -> NatsServer {
        let mut server = NatsServer {
            child: None,
            port: 0,
            store: dir.path().join("jetstream"),
            conf,
            seeds: Default::default(),
            _dir: dir,
        };
        // The port is free when asked; another process could take it before
        // nats-server binds it, so try a few.
        for _ in 0..5 {
            server.port = free_port();
            if server.spawn() {
                return server;
            }
        }
        panic!("nats-server did not start on any of 5 free ports");
    }

    /// One server per region, named after it, joined by gateways into a
    /// supercluster, as regions are in production. Each serves clients on
    /// its own free port; messages cross to another region only where that
    /// region has interest.
    pub fn supercluster(regions: &[&str]) -> Vec<NatsServer> {
        let gateway_ports: Vec<u16> = regions.iter().map(|_| free_port()).collect();
        let gateways: String = regions
            .iter()
            .zip(&gateway_ports)
            .map(|(r, p)| format!("    {{ name: \"{r}\", url: \"nats://127.0.0.1:{p}\" }}\n"))
            .collect();
        let mut servers = Vec::new();
        for (region, port) in regions.iter().zip(&gateway_ports) {
            let dir = tempfile::tempdir().expect("tempdir for nats-server");
            let conf = dir.path().join("nats.conf");
            let text = format!(
                "server_name: \"{region}\"\ngateway {{\n  name: \"{region}\"\n  host: \"127.0.0.1\"\n  port: {port}\n  gateways: [\n{gateways}  ]\n}}\n"
            );
            std::fs::write(&conf, text).expect("nats-server config");
            servers.push(Self::launch(dir, Some(conf)));
        }
        servers
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills it (SIGKILL) and waits for it to go.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port with the same store.
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.spawn() {
            assert!(
                Instant::now() < deadline,
                "nats-server did not restart on port {}",
                self.port
            );
        }
    }

    fn spawn(&mut self) -> bool {
        let mut command = Command::new("nats-server");
        match &self.conf {
            // Gateways: JetStream across regions would need domains; the
            // tests that run regions do not use it.
            Some(conf) => command
                .arg("-c")
                .arg(conf)
                .args(["-a", "127.0.0.1", "-p", &self.port.to_string()]),
            None => command
                .args(["-a", "127.0.0.1", "-p", &self.port.to_string(), "-js", "-sd"])
                .arg(&self.store),
        };
        let child = command.stdout(Stdio::null()).stderr(Stdio::null()).spawn();
        let mut child = match child {
            Ok(c) => c,
            Err(e) => panic!("cannot run nats-server ({e}); install it: apt-get install -y nats-server"),
        };
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return false; // exited: the port was taken
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                self.child = Some(child);
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        false
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A loopback TCP port nobody listens on now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}
