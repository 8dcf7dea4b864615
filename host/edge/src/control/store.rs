//! The control plane's durable state in one redb file
//! (`<data_dir>/control.redb`): module records, deployments, which version
//! each scope runs, and the audit log. Module bytes live beside it, one
//! file per content hash (`<data_dir>/modules/<sha256>.wasm`), the layout
//! edge-config's `sha256:` references already read.
//!
//! Values are JSON: small, few, and readable with any redb tool.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::Serialize;
use serde::de::DeserializeOwned;
use thiserror::Error;

use super::spec::{Activation, Deployment, Spec};
use super::{AuditEntry, ModuleRecord};

/// `<owner>/<sha256>` → [`ModuleRecord`]. The owner is `operator` or
/// `tenant:<id>`: two tenants uploading the same bytes own two records.
const MODULES: TableDefinition<&str, &[u8]> = TableDefinition::new("modules");
/// (scope, version) → [`Deployment`].
const DEPLOYMENTS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("deployments");
/// scope → [`Activation`].
const ACTIVE: TableDefinition<&str, &[u8]> = TableDefinition::new("active");
/// scope → the [`Spec`] edge-config last seeded, so an unchanged file on
/// reload adds no version.
const SEEDS: TableDefinition<&str, &[u8]> = TableDefinition::new("seeds");
/// sequence → [`AuditEntry`].
const AUDIT: TableDefinition<u64, &[u8]> = TableDefinition::new("audit");

/// Audit entries kept; older ones are removed as new ones come.
const MAX_AUDIT: u64 = 100_000;

/// The store could not be read or written.
#[derive(Debug, Error)]
#[error("control store {path}: {reason}")]
pub struct StoreError {
    pub path: PathBuf,
    pub reason: String,
}

/// The control plane's files.
#[derive(Clone)]
pub struct ControlStore {
    db: Arc<Database>,
    path: PathBuf,
    modules_dir: PathBuf,
}

impl std::fmt::Debug for ControlStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlStore").field("path", &self.path).finish()
    }
}

fn json<T: Serialize>(v: &T) -> Vec<u8> {
    // Serializing these plain types cannot fail.
    serde_json::to_vec(v).unwrap_or_default()
}

impl ControlStore {
    /// Opens (or creates) the store under `data_dir`.
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        let path = data_dir.join("control.redb");
        let fail = |reason: String| StoreError {
            path: path.clone(),
            reason,
        };
        std::fs::create_dir_all(data_dir.join("modules")).map_err(|e| fail(e.to_string()))?;
        let db = Database::create(&path).map_err(|e| fail(e.to_string()))?;
        let w = db.begin_write().map_err(|e| fail(e.to_string()))?;
        w.open_table(MODULES).map_err(|e| fail(e.to_string()))?;
        w.open_table(DEPLOYMENTS).map_err(|e| fail(e.to_string()))?;
        w.open_table(ACTIVE).map_err(|e| fail(e.to_string()))?;
        w.open_table(SEEDS).map_err(|e| fail(e.to_string()))?;
        w.open_table(AUDIT).map_err(|e| fail(e.to_string()))?;
        w.commit().map_err(|e| fail(e.to_string()))?;
        Ok(Self {
            db: Arc::new(db),
            modules_dir: data_dir.join("modules"),
            path,
        })
    }

    fn err(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError {
            path: self.path.clone(),
            reason: e.to_string(),
        }
    }

    /// Where a module's bytes are.
    pub fn module_path(&self, sha256: &str) -> PathBuf {
        self.modules_dir.join(format!("{sha256}.wasm"))
    }

    /// Writes a module's bytes under their hash (atomically: a crash leaves
    /// the old file or the new, never half of one).
    pub fn put_bytes(&self, sha256: &str, bytes: &[u8]) -> Result<(), StoreError> {
        let path = self.module_path(sha256);
        if std::fs::metadata(&path).is_ok_and(|m| m.len() == bytes.len() as u64) {
            return Ok(());
        }
        let tmp = self.modules_dir.join(format!(".{sha256}.{}.tmp", std::process::id()));
        std::fs::write(&tmp, bytes).map_err(|e| self.err(e))?;
        std::fs::rename(&tmp, &path).map_err(|e| self.err(e))
    }

    /// A module's bytes, checked against its hash.
    pub fn bytes(&self, sha256: &str) -> Result<Vec<u8>, StoreError> {
        let path = self.module_path(sha256);
        let bytes = std::fs::read(&path).map_err(|e| self.err(format!("cannot read {}: {e}", path.display())))?;
        let actual = crate::wasm::ModuleHash::of(&bytes).hex();
        if actual != sha256 {
            return Err(self.err(format!("{} has hash {actual}, not {sha256}", path.display())));
        }
        Ok(bytes)
    }

    pub fn put_module(&self, record: &ModuleRecord) -> Result<(), StoreError> {
        self.write(|w| {
            w.open_table(MODULES)?
                .insert(record.key().as_str(), json(record).as_slice())?;
            Ok(())
        })
    }

    pub fn module(&self, owner: &str, sha256: &str) -> Result<Option<ModuleRecord>, StoreError> {
        let key = format!("{owner}/{sha256}");
        self.read(|r| {
            let t = r.open_table(MODULES)?;
            Ok(t.get(key.as_str())?.map(|v| v.value().to_vec()))
        })
        .map(|v| v.and_then(|b| serde_json::from_slice(&b).ok()))
    }

    /// Every module record, in key order.
    pub fn modules(&self) -> Result<Vec<ModuleRecord>, StoreError> {
        self.read(|r| {
            let t = r.open_table(MODULES)?;
            let mut out = Vec::new();
            for row in t.iter()? {
                let (_, v) = row?;
                out.push(v.value().to_vec());
            }
            Ok(out)
        })
        .map(parse_all)
    }

    pub fn put_deployment(&self, d: &Deployment) -> Result<(), StoreError> {
        self.write(|w| {
            w.open_table(DEPLOYMENTS)?
                .insert((d.scope.as_str(), d.version), json(d).as_slice())?;
            Ok(())
        })
    }

    pub fn deployment(&self, scope: &str, version: u64) -> Result<Option<Deployment>, StoreError> {
        self.read(|r| {
            let t = r.open_table(DEPLOYMENTS)?;
            Ok(t.get((scope, version))?.map(|v| v.value().to_vec()))
        })
        .map(|v| v.and_then(|b| serde_json::from_slice(&b).ok()))
    }

    /// A scope's deployments, oldest first.
    pub fn deployments(&self, scope: &str) -> Result<Vec<Deployment>, StoreError> {
        self.read(|r| {
            let t = r.open_table(DEPLOYMENTS)?;
            let mut out = Vec::new();
            for row in t.range((scope, 0)..=(scope, u64::MAX))? {
                let (_, v) = row?;
                out.push(v.value().to_vec());
            }
            Ok(out)
        })
        .map(parse_all)
    }

    /// How many versions of a scope are kept (none parsed).
    pub fn deployment_count(&self, scope: &str) -> Result<usize, StoreError> {
        self.read(|r| {
            let t = r.open_table(DEPLOYMENTS)?;
            let mut n = 0;
            for row in t.range((scope, 0)..=(scope, u64::MAX))? {
                row?;
                n += 1;
            }
            Ok(n)
        })
    }

    /// The newest version of a scope (0: none yet).
    pub fn last_version(&self, scope: &str) -> Result<u64, StoreError> {
        self.read(|r| {
            let t = r.open_table(DEPLOYMENTS)?;
            let last = t.range((scope, 0)..=(scope, u64::MAX))?.next_back().transpose()?;
            Ok(last.map_or(0, |(k, _)| k.value().1))
        })
    }

    pub fn set_active(&self, scope: &str, a: &Activation) -> Result<(), StoreError> {
        self.write(|w| {
            w.open_table(ACTIVE)?.insert(scope, json(a).as_slice())?;
            Ok(())
        })
    }

    pub fn active(&self, scope: &str) -> Result<Option<Activation>, StoreError> {
        self.read(|r| {
            let t = r.open_table(ACTIVE)?;
            Ok(t.get(scope)?.map(|v| v.value().to_vec()))
        })
        .map(|v| v.and_then(|b| serde_json::from_slice(&b).ok()))
    }

    /// Every scope's activation.
    pub fn actives(&self) -> Result<Vec<(String, Activation)>, StoreError> {
        self.read(|r| {
            let t = r.open_table(ACTIVE)?;
            let mut out = Vec::new();
            for row in t.iter()? {
                let (k, v) = row?;
                out.push((k.value().to_owned(), v.value().to_vec()));
            }
            Ok(out)
        })
        .map(|rows| {
            rows.into_iter()
                .filter_map(|(k, v)| serde_json::from_slice(&v).ok().map(|a| (k, a)))
                .collect()
        })
    }

    pub fn seed(&self, scope: &str) -> Result<Option<Spec>, StoreError> {
        self.read(|r| {
            let t = r.open_table(SEEDS)?;
            Ok(t.get(scope)?.map(|v| v.value().to_vec()))
        })
        .map(|v| v.and_then(|b| serde_json::from_slice(&b).ok()))
    }

    pub fn set_seed(&self, scope: &str, spec: &Spec) -> Result<(), StoreError> {
        self.write(|w| {
            w.open_table(SEEDS)?.insert(scope, json(spec).as_slice())?;
            Ok(())
        })
    }

    /// Appends an audit entry, numbering it; drops the oldest beyond
    /// [`MAX_AUDIT`].
    pub fn audit(&self, mut entry: AuditEntry) -> Result<AuditEntry, StoreError> {
        self.write(|w| {
            let mut t = w.open_table(AUDIT)?;
            let next = t.last()?.map_or(1, |(k, _)| k.value() + 1);
            entry.seq = next;
            t.insert(next, json(&entry).as_slice())?;
            if next > MAX_AUDIT {
                let cut = next - MAX_AUDIT;
                t.retain_in(..=cut, |_, _| false)?;
            }
            Ok(())
        })?;
        Ok(entry)
    }

    /// Audit entries after `after`, oldest first, at most `limit`, that
    /// `keep` lets through. Rows are read and parsed one at a time up to
    /// the page's end, so a page costs what it holds (plus the entries
    /// `keep` skips), not the whole log.
    pub fn audit_log(
        &self,
        after: u64,
        limit: usize,
        keep: impl Fn(&AuditEntry) -> bool,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        self.read(|r| {
            let t = r.open_table(AUDIT)?;
            let mut out = Vec::new();
            for row in t.range(after.saturating_add(1)..)? {
                if out.len() >= limit {
                    break;
                }
                let (_, v) = row?;
                if let Ok(e) = serde_json::from_slice::<AuditEntry>(v.value())
                    && keep(&e)
                {
                    out.push(e);
                }
            }
            Ok(out)
        })
    }

    fn read<T>(&self, f: impl FnOnce(&redb::ReadTransaction) -> Result<T, redb::Error>) -> Result<T, StoreError> {
        let r = self.db.begin_read().map_err(|e| self.err(e))?;
        f(&r).map_err(|e| self.err(e))
    }

    fn write(&self, f: impl FnOnce(&redb::WriteTransaction) -> Result<(), redb::Error>) -> Result<(), StoreError> {
        let w = self.db.begin_write().map_err(|e| self.err(e))?;
        f(&w).map_err(|e| self.err(e))?;
        w.commit().map_err(|e| self.err(e))
    }
}

fn parse_all<T: DeserializeOwned>(rows: Vec<Vec<u8>>) -> Vec<T> {
    rows.into_iter()
        .filter_map(|b| serde_json::from_slice(&b).ok())
        .collect()
}
