//! Who is online on this edge, per tenant, for batched presence queries.
//!
//! A connection marks its user online after `Welcome` and offline when it
//! ends (a user with several connections stays online until the last one
//! ends). Nothing is broadcast per join: rooms carry online counts in their
//! batches at a low rate, and "which of these users are online" is answered
//! for thousands of users in one call under one lock.

use std::collections::HashMap;
use std::sync::Mutex;

/// Most users one query may ask about.
pub const MAX_QUERY_USERS: usize = 10_000;

/// Users online on this edge, by tenant.
#[derive(Debug, Default)]
pub struct Presence {
    tenants: Mutex<HashMap<String, HashMap<String, u32>>>,
}

impl Presence {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, HashMap<String, u32>>> {
        self.tenants.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One more connection of `user`.
    pub fn connected(&self, tenant: &str, user: &str) {
        let mut t = self.lock();
        let users = t.entry(tenant.to_owned()).or_default();
        match users.get_mut(user) {
            Some(n) => *n += 1,
            None => {
                users.insert(user.to_owned(), 1);
            }
        }
    }

    /// One connection of `user` fewer.
    pub fn disconnected(&self, tenant: &str, user: &str) {
        let mut t = self.lock();
        let Some(users) = t.get_mut(tenant) else { return };
        if let Some(n) = users.get_mut(user) {
            *n -= 1;
            if *n == 0 {
                users.remove(user);
            }
        }
        if users.is_empty() {
            t.remove(tenant);
        }
    }

    /// For each user, whether it is online in `tenant`.
    pub fn query(&self, tenant: &str, users: &[String]) -> Vec<bool> {
        let t = self.lock();
        match t.get(tenant) {
            Some(online) => users.iter().map(|u| online.contains_key(u.as_str())).collect(),
            None => vec![false; users.len()],
        }
    }

    /// Users online in `tenant`.
    pub fn count(&self, tenant: &str) -> usize {
        self.lock().get(tenant).map_or(0, HashMap::len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn online_until_the_last_connection_ends_and_per_tenant() {
        let p = Presence::default();
        p.connected("a", "alice");
        p.connected("a", "alice");
        p.connected("b", "bob");
        let q = |t: &str| p.query(t, &["alice".into(), "bob".into(), "carol".into()]);
        assert_eq!(q("a"), vec![true, false, false]);
        assert_eq!(q("b"), vec![false, true, false]);
        p.disconnected("a", "alice");
        assert_eq!(q("a"), vec![true, false, false]);
        p.disconnected("a", "alice");
        assert_eq!(q("a"), vec![false, false, false]);
        assert_eq!(p.count("a"), 0);
        p.disconnected("a", "nobody");
    }
}
