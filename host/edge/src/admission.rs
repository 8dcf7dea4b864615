//! Who may take the edge's connection slots, and when.
//!
//! A connection is counted twice over its life: while it is not yet
//! authenticated (QUIC handshake, then until a valid Hello) it holds an
//! [`Unauthenticated`] slot, from a pool of its own and limited per source
//! address; once its Hello verifies it takes one of `max_connections`
//! authenticated slots and gives the first back. So a crowd of half-open
//! connections (a flood of Initial packets, clients that never say Hello)
//! runs out of its own slots and never of the viewers'.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::LimitsConfig;

/// The edge's connection slots.
#[derive(Debug)]
pub(crate) struct Admission {
    unauthenticated: Arc<Semaphore>,
    max_unauthenticated: usize,
    per_ip: Mutex<HashMap<IpAddr, u32>>,
    max_per_ip: u32,
    authenticated: Arc<Semaphore>,
    /// Above this many unauthenticated connections, new ones must validate
    /// their address first.
    retry_above: usize,
}

/// A slot of a connection not yet authenticated; given back on drop.
#[derive(Debug)]
pub(crate) struct Unauthenticated {
    _permit: OwnedSemaphorePermit,
    ip: IpAddr,
    admission: Arc<Admission>,
}

impl Drop for Unauthenticated {
    fn drop(&mut self) {
        let mut per_ip = self.admission.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                per_ip.remove(&self.ip);
            }
        }
    }
}

/// Why a connection was not let in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Too many connections are not yet authenticated.
    Crowded,
    /// Too many from this address are not yet authenticated.
    Address,
}

impl Refusal {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Refusal::Crowded => "unauthenticated",
            Refusal::Address => "per_address",
        }
    }
}

impl Admission {
    pub(crate) fn new(limits: &LimitsConfig) -> Arc<Self> {
        Arc::new(Self {
            unauthenticated: Arc::new(Semaphore::new(limits.max_unauthenticated as usize)),
            max_unauthenticated: limits.max_unauthenticated as usize,
            per_ip: Mutex::new(HashMap::new()),
            max_per_ip: limits.max_unauthenticated_per_ip,
            authenticated: Arc::new(Semaphore::new(limits.max_connections as usize)),
            retry_above: limits.retry_above as usize,
        })
    }

    /// Connections not yet authenticated.
    pub(crate) fn unauthenticated(&self) -> usize {
        self.max_unauthenticated - self.unauthenticated.available_permits()
    }

    /// Whether a new connection should prove its address first.
    pub(crate) fn wants_retry(&self) -> bool {
        self.unauthenticated() >= self.retry_above
    }

    /// A slot for a new connection from `ip`, if there is one.
    pub(crate) fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Unauthenticated, Refusal> {
        let permit = Arc::clone(&self.unauthenticated)
            .try_acquire_owned()
            .map_err(|_| Refusal::Crowded)?;
        let mut per_ip = self.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        let n = per_ip.entry(ip).or_default();
        if *n >= self.max_per_ip {
            if *n == 0 {
                per_ip.remove(&ip);
            }
            return Err(Refusal::Address);
        }
        *n += 1;
        drop(per_ip);
        Ok(Unauthenticated {
            _permit: permit,
            ip,
            admission: Arc::clone(self),
        })
    }

    /// An authenticated slot, in exchange for the connection's
    /// unauthenticated one (given back either way).
    pub(crate) fn authenticate(&self, slot: Unauthenticated) -> Option<OwnedSemaphorePermit> {
        drop(slot);
        Arc::clone(&self.authenticated).try_acquire_owned().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(total: u32, per_ip: u32, connections: u32) -> LimitsConfig {
        let config = "[tenants.t]\nhs256_secret = \"0123456789abcdef0123\"\n";
        let mut l = crate::Config::parse(config, "test", std::path::Path::new("."))
            .expect("a minimal config")
            .limits;
        l.max_unauthenticated = total;
        l.max_unauthenticated_per_ip = per_ip;
        l.max_connections = connections;
        l
    }

    #[test]
    fn half_open_connections_never_take_authenticated_slots() {
        let a = Admission::new(&limits(4, 2, 1));
        let ip1: IpAddr = "10.0.0.1".parse().expect("ip");
        let ip2: IpAddr = "10.0.0.2".parse().expect("ip");
        let s1 = a.admit(ip1).expect("first");
        let _s2 = a.admit(ip1).expect("second");
        assert_eq!(a.admit(ip1).unwrap_err(), Refusal::Address);
        let s3 = a.admit(ip2).expect("another address");
        let _s4 = a.admit(ip2).expect("another address, second");
        assert_eq!(a.admit(ip2).unwrap_err(), Refusal::Crowded);
        assert_eq!(a.unauthenticated(), 4);
        // Authenticating frees the half-open slot and takes a real one.
        let viewer = a.authenticate(s1).expect("a slot for the first viewer");
        assert_eq!(a.unauthenticated(), 3);
        assert!(a.authenticate(s3).is_none(), "max_connections = 1");
        assert_eq!(a.unauthenticated(), 2);
        drop(viewer);
        assert!(a.admit(ip1).is_ok(), "the address has a free slot again");
    }
}
