//! The `BlobStore` seam: where packs, manifests and read markers live (local disk or S3-compatible).

use std::path::Path;
use std::time::SystemTime;

use bytes::Bytes;

pub mod disk;
pub mod gtoken;
pub mod s3;

/// One stored object as seen by `list`/`head`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    pub key: String,
    pub size: u64,
    pub modified: SystemTime,
}

/// Backend failures, split by what the caller should do about them.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("object {0:?} not found")]
    NotFound(String),
    /// Retryable: the backend is down, slow or throttling (the client gets 503 `SlowDown`).
    #[error("backend unavailable during {op} of {key:?}: {source}")]
    Unavailable {
        op: &'static str,
        key: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Not retryable: bad configuration or a backend answer we cannot use.
    #[error("backend rejected {op} of {key:?}: {message}")]
    Rejected {
        op: &'static str,
        key: String,
        message: String,
    },
}

impl StoreError {
    pub fn unavailable(
        op: &'static str,
        key: &str,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Self::Unavailable {
            op,
            key: key.to_owned(),
            source: source.into(),
        }
    }
}

/// Object storage as the dedup store needs it. Writes are whole-object and atomic: a reader sees the
/// old object or the new one, never a prefix (disk: temp + fsync + rename; S3: single PUT).
#[async_trait::async_trait]
pub trait BlobStore: Send + Sync + std::fmt::Debug {
    /// Upload a local file (packs are spooled to disk first, so memory stays bounded). The file
    /// must not be written to afterwards: the disk store hard-links it when it can.
    async fn put_file(&self, key: &str, path: &Path) -> Result<(), StoreError>;
    /// Upload a small object (manifests, markers).
    async fn put_bytes(&self, key: &str, data: Bytes) -> Result<(), StoreError>;
    /// Read a whole small object.
    async fn get(&self, key: &str) -> Result<Bytes, StoreError>;
    /// Read `len` bytes at `offset`; callers keep `len` bounded (a few MiB).
    async fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Bytes, StoreError>;
    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>, StoreError>;
    /// Every object whose key starts with `prefix`.
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError>;
    /// Objects whose key starts with `prefix` and sorts after `start_after` (S3's `start-after`),
    /// in key order.
    async fn list_after(
        &self,
        prefix: &str,
        start_after: &str,
    ) -> Result<Vec<ObjectInfo>, StoreError> {
        let mut all = self.list(prefix).await?;
        all.retain(|o| o.key.as_str() > start_after);
        all.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(all)
    }
    /// At most `limit` objects of `list_after`, and whether more follow (one backend round trip
    /// where the backend pages).
    async fn list_page(
        &self,
        prefix: &str,
        start_after: &str,
        limit: usize,
    ) -> Result<(Vec<ObjectInfo>, bool), StoreError> {
        let mut all = self.list_after(prefix, start_after).await?;
        let more = all.len() > limit;
        all.truncate(limit);
        Ok((all, more))
    }
    /// Delete; deleting a missing object is not an error.
    async fn delete(&self, key: &str) -> Result<(), StoreError>;
    /// Cheap reachability probe for `/readyz`.
    async fn ping(&self) -> Result<(), StoreError>;
    /// Delete the store's own temporary files older than `stale` (left by a crash mid-write);
    /// returns how many. Stores without local temporaries have nothing to do.
    async fn sweep_temp(&self, stale: SystemTime) -> Result<usize, StoreError> {
        let _ = stale;
        Ok(0)
    }
}
