//! Ending a user's sessions from outside (the server API's disconnect):
//! each authenticated connection registers under its tenant and user, and
//! a kick tells every one of them why they must go.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

/// One connection's doorbell.
#[derive(Debug, Default)]
pub struct Kick {
    notify: Notify,
    reason: Mutex<Option<String>>,
}

impl Kick {
    /// Waits for a kick; returns its reason.
    pub async fn rung(&self) -> String {
        self.notify.notified().await;
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .unwrap_or_default()
    }
}

/// A user's connections: id and doorbell each.
type Doorbells = Vec<(u64, Arc<Kick>)>;

/// Every authenticated connection, by tenant and user.
#[derive(Debug, Default)]
pub struct Kicks {
    users: Mutex<HashMap<String, Doorbells>>,
}

impl Kicks {
    /// Registers connection `id` of `key` ([`crate::rate_key`]).
    pub fn register(&self, key: &str, id: u64) -> Arc<Kick> {
        let kick = Arc::new(Kick::default());
        self.users
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key.to_owned())
            .or_default()
            .push((id, Arc::clone(&kick)));
        kick
    }

    pub fn unregister(&self, key: &str, id: u64) {
        let mut users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(list) = users.get_mut(key) {
            list.retain(|(i, _)| *i != id);
            if list.is_empty() {
                users.remove(key);
            }
        }
    }

    /// Rings every connection of `key`; returns how many.
    pub fn kick(&self, key: &str, reason: &str) -> usize {
        let users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        let Some(list) = users.get(key) else { return 0 };
        for (_, k) in list {
            *k.reason.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason.to_owned());
            // A stored permit: the connection sees it even if it is busy now.
            k.notify.notify_one();
        }
        list.len()
    }
}
