//! Durable hub state: the channels apps declared public. Kept in `{state_dir}/hub.json`,
//! written with the registry's atomic write (temporary file, fsync, rename, directory fsync)
//! before a change is acknowledged. A file that cannot be read stops startup.

use crate::registry::store::{write_atomic, StoreError};
use parking_lot::RwLock;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

const FORMAT_VERSION: u32 = 1;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct HubFile {
    version: u32,
    public: BTreeSet<String>,
}

/// Public channels, read lock-free-ish on the subscribe path, written durably.
pub struct HubStore {
    path: PathBuf,
    public: RwLock<Arc<BTreeSet<String>>>,
    write: tokio::sync::Mutex<()>,
}

impl HubStore {
    /// Load `{dir}/hub.json` (missing: empty).
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let path = dir.join("hub.json");
        let file = match std::fs::read(&path) {
            Ok(bytes) => {
                let corrupt = |reason: String| StoreError::Corrupt {
                    path: path.clone(),
                    reason,
                };
                let f: HubFile =
                    serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
                if f.version != FORMAT_VERSION {
                    return Err(corrupt(format!("unsupported format version {}", f.version)));
                }
                f
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => HubFile::default(),
            Err(source) => {
                return Err(StoreError::Io {
                    op: "reading",
                    path,
                    source,
                })
            }
        };
        Ok(Self {
            path,
            public: RwLock::new(Arc::new(file.public)),
            write: tokio::sync::Mutex::new(()),
        })
    }

    /// Whether `channel` (`app/channel`) was declared public.
    pub fn is_public(&self, channel: &str) -> bool {
        self.public.read().contains(channel)
    }

    /// Public channels of `app`.
    pub fn public_of(&self, app: &str) -> Vec<String> {
        let prefix = format!("{app}/");
        self.public
            .read()
            .iter()
            .filter(|c| c.starts_with(&prefix))
            .cloned()
            .collect()
    }

    /// Declare `channel` public or private, durably. Returns whether anything changed.
    pub async fn set_public(&self, channel: &str, public: bool) -> Result<bool, StoreError> {
        let _guard = self.write.lock().await;
        let mut next = (**self.public.read()).clone();
        let changed = if public {
            next.insert(channel.to_string())
        } else {
            next.remove(channel)
        };
        if !changed {
            return Ok(false);
        }
        let file = HubFile {
            version: FORMAT_VERSION,
            public: next.clone(),
        };
        let body = serde_json::to_vec_pretty(&file).map_err(|e| StoreError::Task(e.to_string()))?;
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || write_atomic(&path, &body))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))??;
        *self.public.write() = Arc::new(next);
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn public_channels_survive_reopen_and_corruption_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = HubStore::open(dir.path()).expect("open");
        assert!(s.set_public("a/news", true).await.expect("set"));
        assert!(!s.set_public("a/news", true).await.expect("set"));
        assert!(s.set_public("b/x", true).await.expect("set"));
        let s = HubStore::open(dir.path()).expect("reopen");
        assert!(s.is_public("a/news"));
        assert_eq!(s.public_of("a"), vec!["a/news".to_string()]);
        assert!(s.set_public("a/news", false).await.expect("unset"));
        assert!(!HubStore::open(dir.path())
            .expect("reopen")
            .is_public("a/news"));
        std::fs::write(dir.path().join("hub.json"), b"{nope").expect("write");
        assert!(matches!(
            HubStore::open(dir.path()),
            Err(StoreError::Corrupt { .. })
        ));
    }
}
