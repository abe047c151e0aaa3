//! Durable hub state: the channels apps declared public and the webhook subscriptions. Kept in `{state_dir}/hub.json`,
//! written with the registry's atomic write (temporary file, fsync, rename, directory fsync)
//! before a change is acknowledged. A file that cannot be read stops startup.

use super::webhook::WebhookRecord;
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
    #[serde(default)]
    subscriptions: Vec<WebhookRecord>,
}

/// Public channels and webhook subscriptions: a snapshot read without waiting on the
/// subscribe path, replaced whole after each durable write.
pub struct HubStore {
    path: PathBuf,
    state: RwLock<Arc<HubFile>>,
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
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => HubFile {
                version: FORMAT_VERSION,
                ..HubFile::default()
            },
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
            state: RwLock::new(Arc::new(file)),
            write: tokio::sync::Mutex::new(()),
        })
    }

    /// Apply `change` to a copy of the state; when it reports a change, write the copy
    /// durably and only then make it current.
    async fn update<T>(
        &self,
        change: impl FnOnce(&mut HubFile) -> Option<T>,
    ) -> Result<Option<T>, StoreError> {
        let _guard = self.write.lock().await;
        let mut next = (**self.state.read()).clone();
        let Some(out) = change(&mut next) else {
            return Ok(None);
        };
        let body = serde_json::to_vec_pretty(&next).map_err(|e| StoreError::Task(e.to_string()))?;
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || write_atomic(&path, &body))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))??;
        *self.state.write() = Arc::new(next);
        Ok(Some(out))
    }

    /// Every webhook subscription.
    pub fn subscriptions(&self) -> Vec<WebhookRecord> {
        self.state.read().subscriptions.clone()
    }

    /// Store a new webhook subscription.
    pub async fn add_subscription(&self, r: WebhookRecord) -> Result<(), StoreError> {
        self.update(|f| {
            f.subscriptions.push(r);
            Some(())
        })
        .await
        .map(drop)
    }

    /// Remove a webhook subscription; `None` when there was none with that id.
    pub async fn remove_subscription(&self, id: &str) -> Result<Option<WebhookRecord>, StoreError> {
        self.update(|f| {
            let i = f.subscriptions.iter().position(|r| r.id == id)?;
            Some(f.subscriptions.remove(i))
        })
        .await
    }

    /// Whether `channel` (`app/channel`) was declared public.
    pub fn is_public(&self, channel: &str) -> bool {
        self.state.read().public.contains(channel)
    }

    /// Public channels of `app`.
    pub fn public_of(&self, app: &str) -> Vec<String> {
        let prefix = format!("{app}/");
        self.state
            .read()
            .public
            .iter()
            .filter(|c| c.starts_with(&prefix))
            .cloned()
            .collect()
    }

    /// Declare `channel` public or private, durably. Returns whether anything changed.
    pub async fn set_public(&self, channel: &str, public: bool) -> Result<bool, StoreError> {
        let changed = self
            .update(|f| {
                let changed = if public {
                    f.public.insert(channel.to_string())
                } else {
                    f.public.remove(channel)
                };
                changed.then_some(())
            })
            .await?;
        Ok(changed.is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn state_survives_reopen_and_corruption_is_an_error() {
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
        let r = WebhookRecord {
            id: "w1".into(),
            app: "b".into(),
            channel: "a/news".into(),
            path: "/hook".into(),
            created_ms: 1,
        };
        s.add_subscription(r.clone()).await.expect("add");
        let s = HubStore::open(dir.path()).expect("reopen");
        assert_eq!(s.subscriptions(), vec![r.clone()]);
        assert_eq!(s.remove_subscription("w1").await.expect("remove"), Some(r));
        assert_eq!(s.remove_subscription("w1").await.expect("remove"), None);
        assert!(HubStore::open(dir.path())
            .expect("reopen")
            .subscriptions()
            .is_empty());
        std::fs::write(dir.path().join("hub.json"), b"{nope").expect("write");
        assert!(matches!(
            HubStore::open(dir.path()),
            Err(StoreError::Corrupt { .. })
        ));
    }
}
