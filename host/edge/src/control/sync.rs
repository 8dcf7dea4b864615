//! An edge following its cluster's control bucket.
//!
//! At start (and after every lost watch) the edge reads the whole bucket:
//! modules first (fetching bytes it lacks from the object store), then
//! deployments, then activations; then it watches for changes from the
//! revision it read. Applying is idempotent, so reading a change twice
//! costs a comparison. Each activation that differs from what this edge
//! runs is built before it replaces anything, as a local one is; one that
//! does not build is reported (`e.<edge>`, the log, a metric) and the edge
//! keeps the version before.
//!
//! Values in the bucket are bus input: each is size-checked and parsed,
//! and one that does not parse or does not match its key is counted and
//! skipped.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_nats::jetstream::kv;
use futures::StreamExt;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::shared::{Failing, Key, MAX_VALUE, Shared};
use super::spec::{Activation, Deployment, Scope};
use super::{AuditEntry, ControlPlane, ModuleRecord, describe};

/// Between two attempts to reach the bucket.
const RETRY: Duration = Duration::from_secs(2);
/// A module record is a few hundred bytes; more is not one.
const MAX_RECORD: usize = 64 * 1024;
/// What audit entries say of a change another edge made.
const FROM_CLUSTER: &str = "applied from the cluster's control bucket";

/// Follows the bucket until `shutdown`. `synced` turns true once the
/// first full read is applied.
pub(super) async fn run(
    plane: Arc<ControlPlane>,
    client: async_nats::Client,
    synced: watch::Sender<bool>,
    shutdown: CancellationToken,
) {
    // Cancelled wherever it is: every step either completes or changes
    // nothing (the local copy is written after a build, in one go).
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = follow(plane, client, synced) => {}
    }
}

async fn follow(plane: Arc<ControlPlane>, client: async_nats::Client, synced: watch::Sender<bool>) {
    let Some(link) = plane.link.as_ref() else { return };
    let shared = loop {
        match Shared::open(client.clone()).await {
            Ok(s) => break s,
            Err(e) => {
                tracing::warn!(error = %e, "the cluster's control bucket is not ready; trying again");
                tokio::time::sleep(RETRY).await;
            }
        }
    };
    let shared = link.shared.get_or_init(|| async { shared }).await;
    let mut first = true;
    loop {
        let from = match catch_up(&plane, shared).await {
            Ok(last) => last + 1,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the cluster's control bucket; trying again");
                tokio::time::sleep(RETRY).await;
                continue;
            }
        };
        if first {
            first = false;
            synced.send_replace(true);
            // edge-config could not reach the bucket at start: now it can.
            let config = link.config.lock().unwrap_or_else(|e| e.into_inner()).clone();
            if link.needs_seed.load(Ordering::Relaxed)
                && let Some(config) = config
                && let Err(e) = plane.reload(&config).await
            {
                tracing::error!(error = %e, "edge-config could not be seeded into the cluster's control bucket");
            }
            plane.report(shared).await;
        }
        let mut changes = match shared.watch_from(from).await {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch the cluster's control bucket; trying again");
                tokio::time::sleep(RETRY).await;
                continue;
            }
        };
        loop {
            match changes.next().await {
                Some(Ok(entry)) if entry.operation == kv::Operation::Put => {
                    take(&plane, shared, &entry.key, &entry.value).await;
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "the watch of the cluster's control bucket failed; reading it again");
                    break;
                }
                None => break,
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Reads the whole bucket and applies it; returns the revision it read
/// up to.
async fn catch_up(plane: &ControlPlane, shared: &Shared) -> Result<u64, super::shared::SharedError> {
    let last = shared.last_revision().await?;
    let mut modules = Vec::new();
    let mut deployments = Vec::new();
    let mut desired = BTreeMap::new();
    for (k, v) in shared.snapshot().await? {
        match Key::parse(&k) {
            Some(Key::Module { owner, sha256 }) => modules.push((owner, sha256, v)),
            Some(Key::Deployment { scope, version }) => deployments.push((scope, version, v)),
            Some(Key::Active { scope }) => {
                if let Some(a) = activation(&scope, &v) {
                    desired.insert(scope, a);
                }
            }
            Some(Key::Edge { edge_id }) => plane.take_report(&edge_id, &v),
            Some(_) => {}
            None => malformed(&k, &"not a key any edge writes"),
        }
    }
    for (owner, sha256, v) in modules {
        plane.take_module(shared, &owner, &sha256, &v).await;
    }
    for (scope, version, v) in deployments {
        plane.take_deployment(&scope, version, &v);
    }
    if let Some(link) = &plane.link {
        *link.desired.lock().unwrap_or_else(|e| e.into_inner()) = desired;
    }
    plane.reconcile(shared, true).await;
    Ok(last)
}

async fn take(plane: &ControlPlane, shared: &Shared, key: &str, value: &[u8]) {
    match Key::parse(key) {
        Some(Key::Module { owner, sha256 }) => {
            if plane.take_module(shared, &owner, &sha256, value).await {
                plane.reconcile(shared, true).await;
            }
        }
        Some(Key::Deployment { scope, version }) => {
            if plane.take_deployment(&scope, version, value) {
                plane.reconcile(shared, true).await;
            }
        }
        Some(Key::Active { scope }) => {
            if let Some(a) = activation(&scope, value) {
                if let Some(link) = &plane.link {
                    link.desired.lock().unwrap_or_else(|e| e.into_inner()).insert(scope, a);
                }
                plane.reconcile(shared, false).await;
            }
        }
        Some(Key::Edge { edge_id }) => plane.take_report(&edge_id, value),
        Some(_) => {}
        None => malformed(key, &"not a key any edge writes"),
    }
}

fn activation(scope: &str, value: &[u8]) -> Option<Activation> {
    if Scope::parse(scope).is_none() {
        malformed(scope, &"not a scope");
        return None;
    }
    match serde_json::from_slice::<Activation>(value) {
        Ok(a) if a.percent <= 100 && a.version > 0 => Some(a),
        Ok(_) => {
            malformed(scope, &"an activation out of range");
            None
        }
        Err(e) => {
            malformed(scope, &e);
            None
        }
    }
}

fn malformed(key: &str, why: &dyn std::fmt::Display) {
    metrics::counter!("throng_control_sync_malformed_total").increment(1);
    tracing::warn!(key = %crate::untrusted(key, 120), %why, "skipped a value in the cluster's control bucket");
}

impl ControlPlane {
    /// Keeps a module another edge stored: its bytes (from the object
    /// store, checked against the hash) and its record. `true` if new here.
    async fn take_module(&self, shared: &Shared, owner: &str, sha256: &str, value: &[u8]) -> bool {
        if value.len() > MAX_RECORD {
            malformed(sha256, &"a module record over 64 KiB");
            return false;
        }
        let record: ModuleRecord = match serde_json::from_slice(value) {
            Ok(r) => r,
            Err(e) => {
                malformed(sha256, &e);
                return false;
            }
        };
        if record.owner != owner || record.sha256 != sha256 {
            malformed(sha256, &"a module record under another module's key");
            return false;
        }
        if matches!(self.store.module(owner, sha256), Ok(Some(_))) {
            return false;
        }
        let _one = self.change.lock().await;
        if matches!(self.store.module(owner, sha256), Ok(Some(_))) {
            return false;
        }
        let stored = async {
            let have = std::fs::metadata(self.store.module_path(sha256)).is_ok_and(|m| m.len() == record.size);
            if !have {
                let bytes = shared.module_bytes(sha256, self.max_module_bytes).await?;
                self.store.put_bytes(sha256, &bytes)?;
            }
            self.store.put_module(&record)?;
            Ok::<_, super::ControlError>(())
        };
        if let Err(e) = stored.await {
            metrics::counter!("throng_control_sync_failures_total", "what" => "module").increment(1);
            tracing::error!(module = %sha256, error = %e, "cannot keep a module another edge stored");
            return false;
        }
        let mut entry = AuditEntry::new(&record.uploader, "module.upload", format!("sha256:{sha256}"));
        entry.tenant = record.tenant().map(str::to_owned);
        entry.to = Some(format!(
            "{} {} ({})",
            record.name,
            record.version,
            record.world.as_str()
        ));
        entry.detail = Some(FROM_CLUSTER.into());
        let _ = self.store.audit(entry);
        tracing::info!(module = %sha256, name = %record.name, "module from the cluster stored");
        true
    }

    /// Keeps another edge's report of what it runs.
    fn take_report(&self, edge_id: &str, value: &[u8]) {
        let Some(link) = &self.link else { return };
        if value.len() > MAX_RECORD {
            malformed(edge_id, &"an edge report over 64 KiB");
            return;
        }
        match serde_json::from_slice::<super::shared::EdgeReport>(value) {
            Ok(r) if r.edge_id == edge_id => {
                let mut reports = link.reports.lock().unwrap_or_else(|e| e.into_inner());
                // A report per edge id ever seen: bounded by what a flood
                // of made-up ids could add before the next restart.
                if reports.len() < 10_000 || reports.contains_key(edge_id) {
                    reports.insert(edge_id.to_owned(), r);
                }
            }
            Ok(_) => malformed(edge_id, &"a report under another edge's key"),
            Err(e) => malformed(edge_id, &e),
        }
    }

    /// Keeps a deployment (immutable; the bucket's copy wins). `true` if
    /// it was new here.
    fn take_deployment(&self, scope: &str, version: u64, value: &[u8]) -> bool {
        if value.len() > MAX_VALUE {
            malformed(scope, &"a deployment over the size limit");
            return false;
        }
        let d: Deployment = match serde_json::from_slice(value) {
            Ok(d) => d,
            Err(e) => {
                malformed(scope, &e);
                return false;
            }
        };
        if d.scope != scope || d.version != version || Scope::parse(scope).is_none() {
            malformed(scope, &"a deployment under another one's key");
            return false;
        }
        match self.store.deployment(scope, version) {
            Ok(Some(mine)) if mine == d => false,
            _ => match self.store.put_deployment(&d) {
                Ok(()) => true,
                Err(e) => {
                    tracing::error!(%scope, version, error = %e, "cannot keep a deployment from the cluster");
                    false
                }
            },
        }
    }

    /// Builds and puts in force every activation of the bucket this edge
    /// does not run yet. One that failed before is tried again only when
    /// `retry` (a module or deployment arrived since).
    async fn reconcile(&self, shared: &Shared, retry: bool) {
        let Some(link) = &self.link else { return };
        let one_change = self.change.lock().await;
        let desired = link.desired.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let local: BTreeMap<String, Activation> = match self.store.actives() {
            Ok(a) => a.into_iter().collect(),
            Err(e) => {
                tracing::error!(error = %e, "cannot read this edge's deployments");
                return;
            }
        };
        let mut changed = false;
        for (key, a) in desired {
            let Some(scope) = Scope::parse(&key) else { continue };
            if local.get(&key) == Some(&a) {
                if link
                    .failing
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&key)
                    .is_some()
                {
                    changed = true;
                }
                continue;
            }
            let failed_before = link
                .failing
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&key)
                .is_some_and(|f| f.version == a.version);
            if failed_before && !retry {
                continue;
            }
            changed = true;
            match self.build(&[(scope, a.clone())]).await {
                Ok(set) => {
                    if let Err(e) = self.store.set_active(&key, &a) {
                        tracing::error!(error = %e, "cannot keep an activation from the cluster");
                        continue;
                    }
                    let mut entry = AuditEntry::new(&a.by, "deployment.activate", key.clone());
                    entry.tenant = Scope::parse(&key).and_then(|s| s.tenant().map(str::to_owned));
                    entry.from = local.get(&key).map(describe);
                    entry.to = Some(describe(&a));
                    entry.detail = Some(FROM_CLUSTER.into());
                    let _ = self.store.audit(entry);
                    tracing::info!(scope = %key, version = a.version, percent = a.percent, generation = set.generation,
                        "deployment from the cluster in force");
                    self.modules.send_replace(Arc::new(set));
                    link.failing.lock().unwrap_or_else(|e| e.into_inner()).remove(&key);
                }
                Err(e) => {
                    metrics::counter!("throng_control_sync_failures_total", "what" => "activation").increment(1);
                    tracing::error!(scope = %key, version = a.version, error = %e,
                        "a deployment from the cluster does not build on this edge; it keeps the version before");
                    link.failing.lock().unwrap_or_else(|e| e.into_inner()).insert(
                        key,
                        Failing {
                            version: a.version,
                            reason: e.to_string(),
                        },
                    );
                }
            }
        }
        drop(one_change);
        if changed {
            self.report(shared).await;
        }
    }
}
