//! Durable registry state behind the [`RegistryStore`] trait, with one implementation on the
//! local file system.
//!
//! [`FileStore`] writes the whole registry as JSON to a temporary file, fsyncs it, renames it
//! over the live file and fsyncs the directory, so after `kill -9` at any moment the file holds
//! either the state before or after the write, and every write that returned is on disk. A
//! file that cannot be parsed is an error, never an empty registry.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Current on-disk format version.
pub const FORMAT_VERSION: u32 = 1;

/// One app as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppRecord {
    /// App name.
    pub name: String,
    /// Normalised endpoint URLs, in registration order.
    pub endpoints: Vec<String>,
    /// Encoded [`super::token::TokenHash`]; `None` for a provisioned name not yet bound.
    pub token_hash: Option<String>,
    /// Created by the admin (pre-provisioned) rather than by self-registration.
    pub provisioned: bool,
    /// First registration, Unix milliseconds.
    pub registered_at_ms: u64,
    /// Last change, Unix milliseconds.
    pub updated_at_ms: u64,
    /// Backend selection chosen at registration; `None` follows `proxy.balance`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balance: Option<crate::balance::Balance>,
    /// Scaling spec, if the app asked to be scaled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scaling: Option<crate::scaler::spec::ScalingSpec>,
    /// The spec came from a `[scaling.{app}]` table in the config file (and goes when the
    /// table does).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub declared: bool,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    version: u32,
    apps: Vec<AppRecord>,
}

/// A store failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Reading or writing failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The state exists but cannot be understood.
    #[error("registry state {path} is corrupt: {reason}. Refusing to start with an empty registry; restore the file from a backup or move it away deliberately")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The blocking task running the IO died.
    #[error("registry store task failed: {0}")]
    Task(String),
}

/// Where registrations live. Implementations must make `save` durable before returning.
#[async_trait]
pub trait RegistryStore: Send + Sync {
    /// Every stored app.
    async fn load(&self) -> Result<Vec<AppRecord>, StoreError>;
    /// Replace the stored state with `apps`, durably.
    async fn save(&self, apps: Vec<AppRecord>) -> Result<(), StoreError>;
}

/// A JSON file in the state directory.
#[derive(Debug, Clone)]
pub struct FileStore {
    path: PathBuf,
}

impl FileStore {
    /// The store at `{dir}/registry.json`.
    pub fn new(dir: &Path) -> Self {
        Self {
            path: dir.join("registry.json"),
        }
    }

    /// The live file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
        move |source| StoreError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }

    fn load_blocking(path: &Path) -> Result<Vec<AppRecord>, StoreError> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Self::io("reading", path)(e)),
        };
        let corrupt = |reason: String| StoreError::Corrupt {
            path: path.to_path_buf(),
            reason,
        };
        let state: StateFile =
            serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
        if state.version != FORMAT_VERSION {
            return Err(corrupt(format!(
                "unsupported format version {} (this build reads {FORMAT_VERSION})",
                state.version
            )));
        }
        let mut seen = std::collections::HashSet::new();
        for app in &state.apps {
            if !seen.insert(app.name.as_str()) {
                return Err(corrupt(format!("app `{}` appears twice", app.name)));
            }
        }
        Ok(state.apps)
    }

    fn save_blocking(path: &Path, apps: Vec<AppRecord>) -> Result<(), StoreError> {
        let state = StateFile {
            version: FORMAT_VERSION,
            apps,
        };
        let body = serde_json::to_vec_pretty(&state)
            .map_err(|e| StoreError::Task(format!("encoding registry: {e}")))?;
        write_atomic(path, &body)
    }
}

/// Replace `path` with `body` durably: write a temporary file, fsync it, rename it over
/// `path`, fsync the directory. After a crash the file holds the old or the new body, whole.
pub fn write_atomic(path: &Path, body: &[u8]) -> Result<(), StoreError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = path.with_extension("json.tmp");
    {
        let mut f = std::fs::File::create(&tmp).map_err(FileStore::io("creating", &tmp))?;
        f.write_all(body).map_err(FileStore::io("writing", &tmp))?;
        f.sync_all().map_err(FileStore::io("syncing", &tmp))?;
    }
    std::fs::rename(&tmp, path).map_err(FileStore::io("renaming into", path))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(FileStore::io("syncing directory", dir))?;
    Ok(())
}

#[async_trait]
impl RegistryStore for FileStore {
    async fn load(&self) -> Result<Vec<AppRecord>, StoreError> {
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || Self::load_blocking(&path))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))?
    }

    async fn save(&self, apps: Vec<AppRecord>) -> Result<(), StoreError> {
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || Self::save_blocking(&path, apps))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(name: &str) -> AppRecord {
        AppRecord {
            balance: None,
            scaling: None,
            name: name.into(),
            endpoints: vec!["http://127.0.0.1:1".into()],
            token_hash: None,
            provisioned: false,
            registered_at_ms: 1,
            updated_at_ms: 2,
            declared: false,
        }
    }

    #[tokio::test]
    async fn missing_file_is_empty_and_round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = FileStore::new(dir.path());
        assert!(store.load().await.expect("load").is_empty());
        store.save(vec![rec("a"), rec("b")]).await.expect("save");
        let back = store.load().await.expect("load");
        assert_eq!(back, vec![rec("a"), rec("b")]);
        assert!(!dir.path().join("registry.json.tmp").exists());
    }

    #[tokio::test]
    async fn corrupt_file_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = FileStore::new(dir.path());
        for bad in [&b"{not json"[..], b"", br#"{"version":99,"apps":[]}"#] {
            std::fs::write(store.path(), bad).expect("write");
            let err = store.load().await.expect_err("corrupt");
            assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
            assert!(err.to_string().contains("corrupt"));
        }
    }
}
