//! The control plane's state as a cluster shares it, in JetStream: module
//! bytes in an object store, everything else in one KV bucket.
//!
//! | key                         | value                          |
//! |-----------------------------|--------------------------------|
//! | `m.<owner>.<sha256>`        | a [`ModuleRecord`]             |
//! | `n.<owner>.<name>.<label>`  | the sha256 that label names    |
//! | `d.<scope>.<version>`       | a [`Deployment`]               |
//! | `a.<scope>`                 | the scope's [`Activation`]     |
//! | `s.<scope>`                 | the [`Spec`] edge-config seeded |
//! | `e.<edge>`                  | an [`EdgeReport`]: what it runs |
//!
//! Owners, scopes, names and edge ids are hex in keys: tenants' ids may
//! hold characters a KV key may not. Versions are claimed with `create`
//! (one edge wins a number), activations and seeds are changed with
//! `update` against the revision read (two operators changing one scope on
//! two edges at once: one wins, the other is told to look again).
//!
//! Every edge keeps a copy in its own store (`store.rs`): rooms build from
//! that, so an edge restarts with what it last ran even when JetStream is
//! away, and the KV is read once per change, not per room.
//!
//! nats-server 2.9 does not answer the account call async-nats makes in
//! `create_key_value`, so the bucket's stream is made here directly, as
//! the group log's is.

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream::{self, kv, object_store, stream};
use bytes::Bytes;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::io::AsyncReadExt;

use super::ModuleRecord;
use super::spec::{Activation, Deployment, Spec};

/// The KV bucket.
pub const BUCKET: &str = "throng_control";
/// The object store of module bytes.
pub const OBJECTS: &str = "throng_modules";

/// How long one JetStream request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest value read from the bucket: a deployment of 1,000 rules
/// fits; a made-up value larger than NATS's payload limit cannot arrive.
pub const MAX_VALUE: usize = 1024 * 1024;
/// Keys read at start at most: more is not a control plane but a flood.
const MAX_KEYS: usize = 200_000;

/// JetStream did not answer, or answered no.
#[derive(Debug, Error)]
pub enum SharedError {
    #[error("cluster control store: {0}")]
    Unavailable(String),
    /// Another edge changed the same key first.
    #[error("{0}")]
    Conflict(String),
}

fn unavailable(what: &str) -> impl Fn(&dyn std::fmt::Display) -> SharedError + '_ {
    move |e| SharedError::Unavailable(format!("{what}: {e}"))
}

async fn within<T, E: std::fmt::Display>(
    what: &str,
    f: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, SharedError> {
    match tokio::time::timeout(REQUEST_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(SharedError::Unavailable(format!("{what}: {e}"))),
        Err(_) => Err(SharedError::Unavailable(format!(
            "{what}: no answer within {REQUEST_TIMEOUT:?}"
        ))),
    }
}

/// Hex of a name, for a KV key.
pub fn hex(s: &str) -> String {
    use std::fmt::Write;
    s.bytes().fold(String::with_capacity(s.len() * 2), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
}

fn unhex(s: &str) -> Option<String> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect();
    String::from_utf8(bytes?).ok()
}

/// What a key of the bucket is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key {
    Module { owner: String, sha256: String },
    Label,
    Deployment { scope: String, version: u64 },
    Active { scope: String },
    Seed,
    Edge { edge_id: String },
}

impl Key {
    /// A key as the bucket holds it; `None` for one no edge writes.
    pub fn parse(key: &str) -> Option<Key> {
        let mut parts = key.split('.');
        let kind = parts.next()?;
        let key = match kind {
            "m" => Key::Module {
                owner: unhex(parts.next()?)?,
                sha256: parts.next().filter(|s| is_sha256(s))?.to_owned(),
            },
            "n" => Key::Label,
            "d" => Key::Deployment {
                scope: unhex(parts.next()?)?,
                version: parts.next()?.parse().ok()?,
            },
            "a" => Key::Active {
                scope: unhex(parts.next()?)?,
            },
            "s" => Key::Seed,
            "e" => Key::Edge {
                edge_id: unhex(parts.next()?)?,
            },
            _ => return None,
        };
        Some(key)
    }
}

fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn module_key(owner: &str, sha256: &str) -> String {
    format!("m.{}.{sha256}", hex(owner))
}

fn label_key(owner: &str, name: &str, version: &str) -> String {
    format!("n.{}.{}.{}", hex(owner), hex(name), hex(version))
}

fn deployment_key(scope: &str, version: u64) -> String {
    format!("d.{}.{version}", hex(scope))
}

fn active_key(scope: &str) -> String {
    format!("a.{}", hex(scope))
}

fn seed_key(scope: &str) -> String {
    format!("s.{}", hex(scope))
}

fn edge_key(edge_id: &str) -> String {
    format!("e.{}", hex(edge_id))
}

/// What one edge runs, as it last told the cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EdgeReport {
    pub edge_id: String,
    pub region: String,
    pub at_ms: u64,
    /// The module set's generation on that edge.
    pub generation: u64,
    /// Each scope's activation it runs.
    pub running: BTreeMap<String, Activation>,
    /// Activations it could not build, with why: it runs the one before.
    #[serde(default)]
    pub failing: BTreeMap<String, Failing>,
}

/// An activation an edge could not build.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Failing {
    pub version: u64,
    pub reason: String,
}

/// One entry read back, with the revision to change it against.
#[derive(Debug, Clone)]
pub struct Versioned<T> {
    pub value: T,
    pub revision: u64,
}

/// The shared bucket and object store.
#[derive(Clone)]
pub struct Shared {
    js: jetstream::Context,
    kv: kv::Store,
    objects: object_store::ObjectStore,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("bucket", &BUCKET)
            .finish_non_exhaustive()
    }
}

impl Shared {
    /// Makes sure the bucket and the object store exist.
    pub async fn open(client: async_nats::Client) -> Result<Shared, SharedError> {
        let js = jetstream::new(client);
        let bucket = stream::Config {
            name: format!("KV_{BUCKET}"),
            subjects: vec![format!("$KV.{BUCKET}.>")],
            max_messages_per_subject: 1,
            max_message_size: MAX_VALUE as i32,
            storage: stream::StorageType::File,
            allow_rollup: true,
            deny_delete: true,
            allow_direct: true,
            discard: stream::DiscardPolicy::New,
            num_replicas: 1,
            ..Default::default()
        };
        within("create the control bucket", js.get_or_create_stream(bucket)).await?;
        let kv = within("open the control bucket", js.get_key_value(BUCKET)).await?;
        let objects = stream::Config {
            name: format!("OBJ_{OBJECTS}"),
            subjects: vec![format!("$O.{OBJECTS}.C.>"), format!("$O.{OBJECTS}.M.>")],
            storage: stream::StorageType::File,
            discard: stream::DiscardPolicy::New,
            allow_rollup: true,
            allow_direct: true,
            num_replicas: 1,
            ..Default::default()
        };
        within("create the module object store", js.get_or_create_stream(objects)).await?;
        let objects = within("open the module object store", js.get_object_store(OBJECTS)).await?;
        Ok(Shared { js, kv, objects })
    }

    /// The bucket's last revision: a watch from the one after sees every
    /// change made since.
    pub async fn last_revision(&self) -> Result<u64, SharedError> {
        let mut s = within("read the control bucket", self.js.get_stream(format!("KV_{BUCKET}"))).await?;
        let info = within("read the control bucket", s.info()).await?;
        Ok(info.state.last_sequence)
    }

    /// Every key and value now (each at most [`MAX_VALUE`]).
    pub async fn snapshot(&self) -> Result<Vec<(String, Bytes)>, SharedError> {
        let mut keys = within("list the control bucket", self.kv.keys()).await?;
        let mut names = Vec::new();
        loop {
            match tokio::time::timeout(REQUEST_TIMEOUT, keys.next()).await {
                Ok(None) => break,
                Ok(Some(Ok(k))) => names.push(k),
                Ok(Some(Err(e))) => return Err(unavailable("list the control bucket")(&e)),
                Err(_) => return Err(SharedError::Unavailable("list the control bucket: timed out".into())),
            }
            if names.len() > MAX_KEYS {
                return Err(SharedError::Unavailable(format!(
                    "the control bucket holds more than {MAX_KEYS} keys"
                )));
            }
        }
        let mut out = Vec::with_capacity(names.len());
        for k in names {
            if let Some(v) = within("read the control bucket", self.kv.get(k.clone())).await? {
                out.push((k, v));
            }
        }
        Ok(out)
    }

    /// Changes from `revision` on.
    pub async fn watch_from(&self, revision: u64) -> Result<kv::Watch, SharedError> {
        within("watch the control bucket", self.kv.watch_all_from_revision(revision)).await
    }

    async fn entry<T: serde::de::DeserializeOwned>(&self, key: String) -> Result<Option<Versioned<T>>, SharedError> {
        let entry = within("read the control bucket", self.kv.entry(key.clone())).await?;
        Ok(entry.filter(|e| e.operation == kv::Operation::Put).and_then(|e| {
            let value = serde_json::from_slice(&e.value).ok()?;
            Some(Versioned {
                value,
                revision: e.revision,
            })
        }))
    }

    /// Writes `value` at `key` if it is still at `revision` (`None`: if
    /// there is none).
    async fn swap<T: Serialize>(&self, key: String, value: &T, revision: Option<u64>) -> Result<u64, SharedError> {
        let bytes = Bytes::from(serde_json::to_vec(value).unwrap_or_default());
        let result = match revision {
            None => tokio::time::timeout(REQUEST_TIMEOUT, self.kv.create(&key, bytes))
                .await
                .map(|r| {
                    r.map_err(|e| match e.kind() {
                        kv::CreateErrorKind::AlreadyExists => {
                            SharedError::Conflict(format!("`{key}` was written by another edge first"))
                        }
                        _ => SharedError::Unavailable(format!("write `{key}`: {e}")),
                    })
                }),
            Some(rev) => tokio::time::timeout(REQUEST_TIMEOUT, self.kv.update(&key, bytes, rev))
                .await
                .map(|r| {
                    r.map_err(|e| match e.kind() {
                        kv::UpdateErrorKind::WrongLastRevision => {
                            SharedError::Conflict(format!("`{key}` was changed by another edge meanwhile"))
                        }
                        _ => SharedError::Unavailable(format!("write `{key}`: {e}")),
                    })
                }),
        };
        result.unwrap_or_else(|_| Err(SharedError::Unavailable(format!("write `{key}`: timed out"))))
    }

    // ---- modules ----

    /// Puts a module's bytes (unless there already) and its record.
    pub async fn put_module(&self, record: &ModuleRecord, bytes: &[u8]) -> Result<(), SharedError> {
        let there = matches!(
            tokio::time::timeout(REQUEST_TIMEOUT, self.objects.info(&record.sha256)).await,
            Ok(Ok(info)) if info.size == bytes.len()
        );
        if !there {
            let mut reader = bytes;
            within(
                "store the module's bytes",
                self.objects.put(record.sha256.as_str(), &mut reader),
            )
            .await?;
        }
        match self.swap(module_key(&record.owner, &record.sha256), record, None).await {
            // The same owner's same bytes: the first record stands.
            Ok(_) | Err(SharedError::Conflict(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Claims `owner`'s `name` `version` for `sha256`; the hash it names
    /// already if another edge claimed it first for other bytes.
    pub async fn claim_label(
        &self,
        owner: &str,
        name: &str,
        version: &str,
        sha256: &str,
    ) -> Result<Option<String>, SharedError> {
        let key = label_key(owner, name, version);
        match self.swap(key.clone(), &sha256, None).await {
            Ok(_) => Ok(None),
            Err(SharedError::Conflict(_)) => {
                let held: Option<Versioned<String>> = self.entry(key).await?;
                Ok(held.map(|v| v.value).filter(|s| s != sha256))
            }
            Err(e) => Err(e),
        }
    }

    /// A module's bytes, at most `max` of them, checked against the hash.
    pub async fn module_bytes(&self, sha256: &str, max: usize) -> Result<Vec<u8>, SharedError> {
        let what = "fetch the module's bytes";
        let mut object = within(what, self.objects.get(sha256)).await?;
        if object.info.size > max {
            return Err(SharedError::Unavailable(format!(
                "module {sha256} is {} bytes; this edge takes at most {max}",
                object.info.size
            )));
        }
        let mut bytes = Vec::with_capacity(object.info.size);
        // A made-up object may claim one size and hold more: read one past.
        let mut limited = (&mut object).take(max as u64 + 1);
        let read = limited.read_to_end(&mut bytes);
        tokio::time::timeout(REQUEST_TIMEOUT * 6, read)
            .await
            .map_err(|_| SharedError::Unavailable(format!("{what}: timed out")))?
            .map_err(|e| unavailable(what)(&e))?;
        let actual = crate::wasm::ModuleHash::of(&bytes).hex();
        if bytes.len() > max || actual != sha256 {
            return Err(SharedError::Unavailable(format!(
                "module {sha256}: the object store holds {} bytes of hash {actual}",
                bytes.len()
            )));
        }
        Ok(bytes)
    }

    // ---- deployments ----

    /// Claims `d.version`: `Conflict` if another edge numbered one so first.
    pub async fn claim_version(&self, d: &Deployment) -> Result<(), SharedError> {
        let bytes = serde_json::to_vec(d).unwrap_or_default();
        if bytes.len() > MAX_VALUE {
            return Err(SharedError::Unavailable(format!(
                "the deployment is {} bytes of JSON; a cluster takes at most {MAX_VALUE}",
                bytes.len()
            )));
        }
        self.swap(deployment_key(&d.scope, d.version), d, None).await.map(drop)
    }

    pub async fn deployment(&self, scope: &str, version: u64) -> Result<Option<Deployment>, SharedError> {
        Ok(self.entry(deployment_key(scope, version)).await?.map(|v| v.value))
    }

    pub async fn active(&self, scope: &str) -> Result<Option<Versioned<Activation>>, SharedError> {
        self.entry(active_key(scope)).await
    }

    pub async fn set_active(&self, scope: &str, a: &Activation, revision: Option<u64>) -> Result<(), SharedError> {
        self.swap(active_key(scope), a, revision).await.map(drop)
    }

    /// Sets a scope's activation whatever it was (edge-config's word).
    pub async fn put_active(&self, scope: &str, a: &Activation) -> Result<(), SharedError> {
        self.put(active_key(scope), a).await
    }

    pub async fn put_seed(&self, scope: &str, spec: &Spec) -> Result<(), SharedError> {
        self.put(seed_key(scope), spec).await
    }

    async fn put<T: Serialize>(&self, key: String, value: &T) -> Result<(), SharedError> {
        let bytes = Bytes::from(serde_json::to_vec(value).unwrap_or_default());
        within("write the control bucket", self.kv.put(key, bytes))
            .await
            .map(drop)
    }

    pub async fn seed(&self, scope: &str) -> Result<Option<Versioned<Spec>>, SharedError> {
        self.entry(seed_key(scope)).await
    }

    pub async fn set_seed(&self, scope: &str, spec: &Spec, revision: Option<u64>) -> Result<(), SharedError> {
        self.swap(seed_key(scope), spec, revision).await.map(drop)
    }

    // ---- edges ----

    pub async fn report(&self, r: &EdgeReport) -> Result<(), SharedError> {
        self.put(edge_key(&r.edge_id), r).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_whatever_a_tenant_is_called() {
        let sha = "ab".repeat(32);
        for owner in ["operator", "tenant:acme", "tenant:a.b-c_d:e"] {
            assert_eq!(
                Key::parse(&module_key(owner, &sha)),
                Some(Key::Module {
                    owner: owner.into(),
                    sha256: sha.clone()
                })
            );
        }
        assert_eq!(
            Key::parse(&deployment_key("filters/a.b", 12)),
            Some(Key::Deployment {
                scope: "filters/a.b".into(),
                version: 12
            })
        );
        assert_eq!(
            Key::parse(&active_key("policies")),
            Some(Key::Active {
                scope: "policies".into()
            })
        );
        assert_eq!(
            Key::parse(&edge_key("edge-1")),
            Some(Key::Edge {
                edge_id: "edge-1".into()
            })
        );
        for bad in ["", "x", "m.zz.00", "m.6f.short", "d.6f.x", "a.6", "a.zz", "q.00"] {
            assert_eq!(Key::parse(bad), None, "{bad}");
        }
    }
}
