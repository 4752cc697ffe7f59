//! The dedup store: bodies are chunked while they arrive (zip-aware `FastCDC`, SHA-256), new chunks
//! packed into large objects, and each key gets a manifest, published last. Reads verify every
//! chunk's SHA-256 before any byte of it is sent.
//!
//! Flows, one module each: `ingest` (streaming PUT), `read` (streaming GET), `index` (the chunk
//! index), `gc` (expiry and sweep). Backend layout: `packs/<time><rand>` chunk packs and
//! `packidx/<same>` their chunk lists; `manifests/<bucket>/<hh>/<sha256(key)>` one per key;
//! `mbodies/<time><rand>` segment streams too large to embed in their manifest and too large to
//! chain (`delta`: chained streams are zstd frames in packs of their own);
//! `condemned/<pack>` GC tombstones; `reads/<manifest>` last-read markers.

pub mod chunker;
pub mod delta;
pub mod gc;
pub mod index;
pub mod ingest;
pub mod keys;
pub mod listing;
pub mod manifest;
pub mod multipart;
pub mod read;
pub mod zip;
pub mod zipscan;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use sha2::{Digest, Sha256};

use crate::metrics::Metrics;
use crate::store::{BlobStore, StoreError};
pub use chunker::{DATA_CDC, META_CDC};
use delta::DELTA_RAW_MAX;
use index::ChunkIndex;
pub use ingest::{Ingest, IngestStats, PACK_TARGET, Staged};
use manifest::{EMBED_MAX, Manifest, ManifestError, ObjectHeader};

/// How often an ingest re-reads the list of condemned packs (written by any process's GC). Safety
/// needs `grace` > longest upload + this interval: see `gc`.
const CONDEMNED_REFRESH: Duration = Duration::from_secs(30);
/// Read markers (for expiry of unread keys) are rewritten at most this often per key.
const READ_MARK_EVERY: Duration = Duration::from_hours(1);
/// Local temporaries (spool files, the disk store's temp files) younger than this are never swept,
/// whatever the GC's clock and grace say: they belong to writes in progress.
const TEMP_MIN_AGE: Duration = Duration::from_hours(1);
/// How often a server loads other replicas' new pack index objects.
pub const INDEX_REFRESH_EVERY: Duration = Duration::from_secs(30);
/// Manifest writes throttled by the backend (GCS allows one write per second per object name) are
/// retried this many times with jittered exponential backoff from `MANIFEST_RETRY_BASE`.
const MANIFEST_ATTEMPTS: u32 = 10;
const MANIFEST_RETRY_BASE: Duration = Duration::from_millis(100);
const MANIFEST_RETRY_MAX: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum DedupError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("manifest of {key:?}: {source}")]
    Manifest {
        key: String,
        #[source]
        source: ManifestError,
    },
    #[error("local spool: {0}")]
    Spool(#[from] std::io::Error),
    #[error(transparent)]
    Index(#[from] index::IndexError),
    #[error("chunk {sha} in {pack} failed SHA-256 verification")]
    Corrupt { pack: String, sha: String },
    /// A stage of an ingest stopped because another one failed (or the ingest was cancelled).
    #[error("ingest: {0}")]
    Pipeline(&'static str),
    /// Retryable: packs this body reused were deleted by another process's GC meanwhile.
    #[error("{0} reused pack(s) were deleted by a concurrent gc; the upload must be retried")]
    ReusedPacksGone(usize),
}

/// Attributes of an object being stored.
#[derive(Debug, Clone)]
pub struct NewObject {
    pub bucket: String,
    pub key: String,
    pub etag: String,
    pub content_type: Option<String>,
    pub metadata: Vec<(String, String)>,
    /// Stored response headers and checksums (`ObjectHeader::attrs`).
    pub attrs: manifest::ObjectAttrs,
}

/// What a manifest's segment stream covers.
#[derive(Debug)]
pub(crate) struct Version {
    pub size: u64,
    pub packs: Vec<String>,
    pub segment_count: u64,
}

/// GC policy for one run.
#[derive(Debug, Clone)]
pub struct GcOptions {
    /// Unreferenced packs younger than this are kept (in-flight uploads, downloads of old versions).
    pub grace: Duration,
    /// Keys neither written nor read for this long are deleted.
    pub expire_unread: Option<Duration>,
    /// Least recently used keys are deleted until the logical total fits.
    pub max_logical_bytes: Option<u64>,
    /// Multipart uploads neither completed nor aborted for this long are deleted with their parts.
    pub expire_uploads: Duration,
    /// Buckets whose keys are never expired or evicted (`expire_unread` and `max_logical_bytes`
    /// apply to the other, cache, buckets).
    pub durable_buckets: Vec<String>,
    pub now: SystemTime,
}

#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct GcReport {
    pub manifests_live: usize,
    pub manifests_expired: usize,
    /// Manifests that could not be decoded: skipped, and what they may reference kept.
    pub manifests_unreadable: usize,
    pub packs_kept: usize,
    /// Unreferenced packs past grace marked for deletion by a later run (tombstones written).
    pub packs_condemned: usize,
    /// Condemned packs found referenced again (their tombstones removed).
    pub packs_rescued: usize,
    pub packs_deleted: usize,
    pub bytes_deleted: u64,
    /// Segment objects of overwritten or expired versions.
    pub bodies_deleted: usize,
    /// Leftovers of uploads interrupted by a crash: spool files and the store's temp files.
    pub temp_files_deleted: usize,
    /// Multipart uploads past `expire_uploads`, deleted with their parts.
    pub uploads_expired: usize,
    /// Listing entries of deleted or overwritten versions removed, and missing ones rewritten.
    pub entries_deleted: usize,
    pub entries_written: usize,
}

#[derive(Debug, Default, Clone, PartialEq, serde::Serialize)]
pub struct Stats {
    pub keys: usize,
    pub unreadable_manifests: usize,
    pub logical_bytes: u64,
    pub pack_bytes: u64,
    /// Manifests, segment objects and pack index objects.
    pub manifest_bytes: u64,
    pub stored_bytes: u64,
    pub packs: usize,
    /// logical / stored.
    pub dedup_ratio: f64,
}

#[derive(Debug)]
pub struct DedupStore {
    blob: Arc<dyn BlobStore>,
    index: Arc<ChunkIndex>,
    spool_dir: PathBuf,
    metrics: Arc<Metrics>,
    recent_reads: Mutex<HashMap<String, Instant>>,
    /// Packs some GC (this process or another) has condemned, and when the list was read; chunks in
    /// them are never reused.
    condemned: tokio::sync::Mutex<(Option<Instant>, Arc<HashSet<String>>)>,
    /// How old that list (and a pack's existence check) may be, in milliseconds.
    condemned_refresh_ms: std::sync::atomic::AtomicU64,
    /// Reused packs seen in the backend recently (saves a HEAD per pack per upload).
    verified: Mutex<HashMap<Arc<str>, Instant>>,
    /// Permits for read-ahead groups beyond each read's first.
    read_ahead: Arc<tokio::sync::Semaphore>,
    /// Pack uploads in flight across all ingests.
    pack_uploads: Arc<tokio::sync::Semaphore>,
    /// Packs and segment objects that ingests of this process created or reused and have not
    /// published yet: this process's GC keeps them whatever its grace period.
    inflight: Inflight,
    /// Segment streams stored alone lately, for later similar streams to be stored against.
    bases: delta::Bases,
}

/// Names in use by unpublished ingests, counted (several ingests may reuse one pack), and for each
/// GC of this process that is running, every name held since its mark phase began: a pack reused
/// by an upload that published after GC listed the manifests is not in GC's marks, so GC must know
/// it was in use meanwhile.
#[derive(Debug, Clone, Default)]
pub struct Inflight(Arc<Mutex<InflightState>>);

#[derive(Debug, Default)]
struct InflightState {
    counts: HashMap<Arc<str>, usize>,
    watches: HashMap<u64, HashSet<Arc<str>>>,
    next_watch: u64,
}

impl Inflight {
    #[must_use]
    pub fn contains(&self, name: &str) -> bool {
        self.0
            .lock()
            .expect("inflight lock")
            .counts
            .contains_key(name)
    }

    /// Start watching (before a GC lists manifests): names in use now and every name held until the
    /// watch is dropped count as in use for it.
    #[must_use]
    pub fn watch(&self) -> InflightWatch {
        let mut st = self.0.lock().expect("inflight lock");
        let id = st.next_watch;
        st.next_watch += 1;
        let now: HashSet<Arc<str>> = st.counts.keys().cloned().collect();
        st.watches.insert(id, now);
        InflightWatch {
            set: self.clone(),
            id,
        }
    }
}

/// See `Inflight::watch`.
#[derive(Debug)]
pub struct InflightWatch {
    set: Inflight,
    id: u64,
}

impl InflightWatch {
    /// In use now, or at any time since the watch began.
    #[must_use]
    pub fn in_use(&self, name: &str) -> bool {
        let st = self.set.0.lock().expect("inflight lock");
        st.counts.contains_key(name)
            || st
                .watches
                .get(&self.id)
                .is_some_and(|seen| seen.contains(name))
    }
}

impl Drop for InflightWatch {
    fn drop(&mut self) {
        self.set
            .0
            .lock()
            .expect("inflight lock")
            .watches
            .remove(&self.id);
    }
}

/// Holds names in `Inflight` until dropped.
#[derive(Debug)]
pub struct InflightGuard {
    set: Inflight,
    names: HashSet<Arc<str>>,
}

impl InflightGuard {
    #[must_use]
    pub fn new(set: &Inflight) -> Self {
        Self {
            set: set.clone(),
            names: HashSet::new(),
        }
    }

    pub fn hold(&mut self, name: &Arc<str>) {
        if self.names.insert(name.clone()) {
            let mut st = self.set.0.lock().expect("inflight lock");
            *st.counts.entry(name.clone()).or_default() += 1;
            for seen in st.watches.values_mut() {
                seen.insert(name.clone());
            }
        }
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        let mut st = self.set.0.lock().expect("inflight lock");
        for n in &self.names {
            if let Some(c) = st.counts.get_mut(n) {
                *c -= 1;
                if *c == 0 {
                    st.counts.remove(n);
                }
            }
        }
    }
}

#[must_use]
pub fn manifest_key(bucket: &str, key: &str) -> String {
    let h = hex::encode(Sha256::digest(key.as_bytes()));
    format!("manifests/{bucket}/{}/{h}", &h[..2])
}

fn tombstone_key(pack: &str) -> String {
    format!("condemned/{}", pack.trim_start_matches("packs/"))
}

fn read_marker_key(manifest_key: &str) -> String {
    format!("reads/{}", manifest_key.trim_start_matches("manifests/"))
}

/// The local chunk index of a store whose spool directory is `spool_dir` (a subdirectory: the
/// spool's stale-file sweep only touches files directly in it).
#[must_use]
pub fn index_path(spool_dir: &Path) -> PathBuf {
    spool_dir.join("index").join("chunks.redb")
}

impl DedupStore {
    /// Open the store and its local chunk index under `spool_dir`. A new (or deleted) index is
    /// loaded from every pack index object before the store is used, so it dedups like the others
    /// at once; an existing one is brought up to date by `refresh_index`, which `serve` runs in the
    /// background at once and then every `INDEX_REFRESH_EVERY`: start-up time does not grow with
    /// the store.
    pub async fn open(
        blob: Arc<dyn BlobStore>,
        spool_dir: PathBuf,
        metrics: Arc<Metrics>,
    ) -> Result<Self, DedupError> {
        std::fs::create_dir_all(&spool_dir)?;
        let path = index_path(&spool_dir);
        let index = tokio::task::spawn_blocking(move || ChunkIndex::open(&path))
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))??;
        let this = Self::with_index(blob, spool_dir, metrics, index);
        let ix = this.index.clone();
        let fresh = tokio::task::spawn_blocking(move || ix.watermark())
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))??
            .is_none();
        if fresh {
            this.refresh_index().await?;
        }
        Ok(this)
    }

    /// Open the store for `gc` and `stats` beside a running server: the server holds the local
    /// index (redb allows one process per file), and these need no dedup decisions, so the index is
    /// an empty one in memory.
    pub fn open_for_maintenance(
        blob: Arc<dyn BlobStore>,
        spool_dir: PathBuf,
        metrics: Arc<Metrics>,
    ) -> Result<Self, DedupError> {
        std::fs::create_dir_all(&spool_dir)?;
        Ok(Self::with_index(
            blob,
            spool_dir,
            metrics,
            ChunkIndex::in_memory()?,
        ))
    }

    fn with_index(
        blob: Arc<dyn BlobStore>,
        spool_dir: PathBuf,
        metrics: Arc<Metrics>,
        index: ChunkIndex,
    ) -> Self {
        Self {
            blob,
            index: Arc::new(index),
            spool_dir,
            metrics,
            recent_reads: Mutex::new(HashMap::new()),
            condemned: tokio::sync::Mutex::new((None, Arc::new(HashSet::new()))),
            condemned_refresh_ms: std::sync::atomic::AtomicU64::new(
                u64::try_from(CONDEMNED_REFRESH.as_millis()).expect("small"),
            ),
            verified: Mutex::new(HashMap::new()),
            read_ahead: Arc::new(tokio::sync::Semaphore::new(read::READ_AHEAD_BUDGET)),
            pack_uploads: Arc::new(tokio::sync::Semaphore::new(ingest::PACK_UPLOADS)),
            inflight: Inflight::default(),
            bases: delta::Bases::default(),
        }
    }

    #[must_use]
    pub fn blob(&self) -> &Arc<dyn BlobStore> {
        &self.blob
    }

    #[must_use]
    pub fn spool_dir(&self) -> &Path {
        &self.spool_dir
    }

    /// How stale this process's view of condemned packs may get (default `CONDEMNED_REFRESH`); GC
    /// safety across processes needs `grace` > longest upload + this. Tests shorten it.
    pub fn set_condemned_refresh(&self, every: Duration) {
        self.condemned_refresh_ms.store(
            u64::try_from(every.as_millis()).unwrap_or(u64::MAX),
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    fn condemned_refresh(&self) -> Duration {
        Duration::from_millis(
            self.condemned_refresh_ms
                .load(std::sync::atomic::Ordering::Relaxed),
        )
    }

    #[must_use]
    pub fn chunk_index(&self) -> &Arc<ChunkIndex> {
        &self.index
    }

    /// Load pack index objects written since the watermark (by any replica); returns how many packs
    /// were added. Listing starts `REFRESH_LOOKBACK` before the watermark: an index object appears
    /// when its upload ends, after the time in its name.
    pub async fn refresh_index(&self) -> Result<usize, DedupError> {
        let ix = self.index.clone();
        let watermark = tokio::task::spawn_blocking(move || ix.watermark())
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))??;
        let start_after = watermark.as_deref().map(|w| {
            let t = index::pack_of_index_key(w);
            index::name_time(&t).map_or_else(String::new, |t| {
                index::index_key_at(t.checked_sub(index::REFRESH_LOOKBACK).unwrap_or(t))
            })
        });
        let listed = self
            .blob
            .list_after("packidx/", start_after.as_deref().unwrap_or(""))
            .await?;
        let mut added = 0;
        let mut newest = watermark;
        if let Some(last) = listed.last() {
            // Listed in key order: the newest index object is the new watermark.
            if newest.as_deref().is_none_or(|n| last.key.as_str() > n) {
                newest = Some(last.key.clone());
            }
        }
        let names: Vec<String> = listed
            .iter()
            .map(|o| index::pack_of_index_key(&o.key))
            .collect();
        let ix = self.index.clone();
        let unknown = tokio::task::spawn_blocking(move || ix.unknown_packs(names))
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))??;
        for pack in unknown {
            let key = index::pack_index_key(&pack);
            let bytes = match self.blob.get(&key).await {
                Ok(b) => b,
                Err(StoreError::NotFound(_)) => continue, // deleted by GC meanwhile
                Err(e) => return Err(e.into()),
            };
            let ix = self.index.clone();
            // Decoded as it is inserted: no copy of a big pack's entries.
            let loaded = tokio::task::spawn_blocking(move || {
                match index::decode_pack_index(&key, &bytes) {
                    Ok(entries) => ix.add_pack(&pack, entries).map(|()| true),
                    Err(e) => {
                        // A damaged index object only costs the dedup of its pack's chunks.
                        tracing::warn!(error = %e, "skipping a pack index object");
                        Ok(false)
                    }
                }
            })
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))??;
            added += usize::from(loaded);
        }
        if let Some(w) = newest {
            let ix = self.index.clone();
            tokio::task::spawn_blocking(move || ix.set_watermark(&w))
                .await
                .map_err(|e| std::io::Error::other(e.to_string()))??;
        }
        Ok(added)
    }

    /// Never reuse `pack` again (its deletion is under way or done).
    async fn forget_pack(&self, pack: &str) {
        self.verified.lock().expect("verified lock").remove(pack);
        let (ix, p) = (self.index.clone(), pack.to_owned());
        match tokio::task::spawn_blocking(move || ix.forget_pack(&p)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(pack, error = %e, "could not mark a pack gone in the local index");
            }
            Err(e) => {
                tracing::warn!(pack, error = %e, "could not mark a pack gone in the local index");
            }
        }
    }

    /// The current manifest of a key, if any (its header; segments are streamed by `read`).
    pub async fn manifest(
        &self,
        bucket: &str,
        key: &str,
    ) -> Result<Option<Arc<Manifest>>, DedupError> {
        let mkey = manifest_key(bucket, key);
        let bytes = match self.blob.get(&mkey).await {
            Ok(b) => b,
            Err(StoreError::NotFound(_)) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let m = Manifest::decode(bytes).map_err(|source| DedupError::Manifest {
            key: mkey.clone(),
            source,
        })?;
        // A hash collision on the manifest name would show up as a different key inside.
        Ok((m.header.bucket == bucket && m.header.key == key).then(|| Arc::new(m)))
    }

    /// Ingest a body held in memory and publish it (tests, tools and benchmarks).
    pub async fn put_bytes(
        self: &Arc<Self>,
        body: Bytes,
        obj: NewObject,
    ) -> Result<ObjectHeader, DedupError> {
        let mut ing = self.begin_ingest().await?;
        let mut at = 0;
        while at < body.len() {
            let n = (body.len() - at).min(256 << 10);
            ing.write(body.slice(at..at + n)).await?;
            at += n;
        }
        let staged = ing.finish().await?;
        self.publish(staged, obj).await
    }

    /// Make a staged body the key's current version: check the packs it reuses, write its segment
    /// object if it does not embed, then the manifest (last; retried while the backend throttles),
    /// then the key's listing entry.
    pub async fn publish(
        &self,
        staged: Staged,
        obj: NewObject,
    ) -> Result<ObjectHeader, DedupError> {
        let mkey = manifest_key(&obj.bucket, &obj.key);
        let header = self.publish_at(staged, obj, &mkey).await?;
        self.write_entry(&header).await?;
        Ok(header)
    }

    /// `publish` to the manifest name `mkey`, without a listing entry (multipart parts).
    pub(crate) async fn publish_at(
        &self,
        mut staged: Staged,
        obj: NewObject,
        mkey: &str,
    ) -> Result<ObjectHeader, DedupError> {
        let missing = self.missing_reused_packs(&staged.reused).await?;
        if !missing.is_empty() {
            tracing::warn!(
                packs = missing.len(),
                "reused packs are gone from the backend (deleted by another process's gc)"
            );
            for p in &missing {
                self.forget_pack(p).await;
            }
            return Err(DedupError::ReusedPacksGone(missing.len()));
        }
        let version = Version {
            size: staged.size,
            packs: std::mem::take(&mut staged.packs),
            segment_count: staged.segment_count,
        };
        let header = self
            .write_version(
                version,
                staged.segments.path(),
                obj,
                &mut staged.inflight,
                mkey,
            )
            .await?;
        let st = staged.stats;
        Metrics::add(&self.metrics.chunk_hits, st.chunks_reused);
        Metrics::add(&self.metrics.chunk_misses, st.chunks_new);
        Metrics::add(&self.metrics.dedup_bytes, st.bytes_reused);
        Metrics::add(&self.metrics.stored_bytes_in, st.bytes_new);
        Ok(header)
    }

    /// Write a manifest for a segment stream in the local file `segments`: embedded when small,
    /// chained (`delta`) when it inflates to at most `DELTA_RAW_MAX`, else in its own segment
    /// object first.
    pub(crate) async fn write_version(
        &self,
        v: Version,
        segments: &Path,
        obj: NewObject,
        inflight: &mut InflightGuard,
        mkey: &str,
    ) -> Result<ObjectHeader, DedupError> {
        let mut header = ObjectHeader {
            bucket: obj.bucket,
            key: obj.key,
            size: v.size,
            etag: obj.etag,
            last_modified: unix_secs(SystemTime::now()),
            content_type: obj.content_type,
            metadata: obj.metadata,
            packs: v.packs,
            segments: Some(v.segment_count),
            body: None,
            attrs: obj.attrs,
            chain: Vec::new(),
        };
        let seg_len = std::fs::metadata(segments)?.len();
        if seg_len > EMBED_MAX as u64 {
            let file = segments.to_path_buf();
            let raw = tokio::task::spawn_blocking(move || inflate_at_most(&file, DELTA_RAW_MAX))
                .await
                .map_err(|e| std::io::Error::other(e.to_string()))??;
            if let Some(raw) = raw {
                return self.write_chained(header, raw, inflight, mkey).await;
            }
        }
        let mut embedded = Vec::new();
        if seg_len <= EMBED_MAX as u64 {
            embedded = std::fs::read(segments)?;
        } else {
            let name = format!(
                "mbodies/{}",
                index::new_pack_name(SystemTime::now()).trim_start_matches("packs/")
            );
            inflight.hold(&Arc::from(name.as_str()));
            self.blob
                .put_file(&name, segments)
                .await
                .inspect_err(|_| Metrics::add(&self.metrics.backend_errors, 1))?;
            header.body = Some(name);
        }
        let encoded = Bytes::from(Manifest::encode_v3(&header, &embedded));
        self.put_manifest(mkey, encoded).await?;
        Ok(header)
    }

    /// `write_version` for a stream of at most `DELTA_RAW_MAX` bytes (`raw`): stored against a
    /// similar stream this process stored alone lately, or else the base of the version this write
    /// replaces, when that makes it at most half the size; else alone (and remembered as a base).
    async fn write_chained(
        &self,
        mut header: ObjectHeader,
        raw: Vec<u8>,
        inflight: &mut InflightGuard,
        mkey: &str,
    ) -> Result<ObjectHeader, DedupError> {
        let digests = delta::first_digests(&raw, &header);
        let mut base = match self.bases.find(&digests) {
            Some(b) if self.base_usable(&b).await? => Some(b),
            _ => None,
        };
        // Not a multipart part (its header names the object it will be part of).
        if base.is_none() && mkey == manifest_key(&header.bucket, &header.key) {
            base = match self.replaced_base(&header.bucket, &header.key).await {
                Some((b, named_by)) if self.base_usable(&b).await? => {
                    self.bases.add(b.clone(), named_by);
                    Some(b)
                }
                _ => None,
            };
        }
        let raw: Arc<[u8]> = raw.into();
        let (for_pool, base_for_pool) = (raw.clone(), base.clone());
        let (alone, against) = tokio::task::spawn_blocking(move || {
            let alone = delta::compress(&for_pool, None)?;
            let against = base_for_pool
                .map(|b| delta::compress(&for_pool, Some(&b.raw)))
                .transpose()?;
            Ok::<_, std::io::Error>((alone, against))
        })
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))??;
        let raw_len = u32::try_from(raw.len()).expect("bounded by DELTA_RAW_MAX");
        match (base, against) {
            (Some(base), Some(d)) if d.len() * 2 <= alone.len() => {
                inflight.hold(&base.pack);
                let at = push_pack(&mut header.packs, &base.pack);
                let (link, _) = self
                    .put_stream_pack(d, raw_len, &mut header.packs, inflight)
                    .await?;
                header.chain = vec![base.link(at), link];
                Metrics::add(&self.metrics.segment_deltas, 1);
            }
            _ => {
                let len = u32::try_from(alone.len()).expect("bounded by DELTA_RAW_MAX");
                let (link, pack) = self
                    .put_stream_pack(alone, raw_len, &mut header.packs, inflight)
                    .await?;
                let mut sha256 = [0u8; 32];
                hex::decode_to_slice(&link.sha256, &mut sha256).expect("hex we wrote");
                header.chain = vec![link];
                self.bases.add(
                    delta::Base {
                        pack,
                        len,
                        sha256,
                        raw,
                    },
                    digests,
                );
            }
        }
        let encoded = Bytes::from(Manifest::encode_v3(&header, &[]));
        self.put_manifest(mkey, encoded).await?;
        Ok(header)
    }

    /// The base frame of the version stored under `bucket`/`key` now, if its stream is chained,
    /// and the chunk digests its stream starts with. It is found in the backend, so a process that
    /// did not store it (restarted, or another replica) still stores the next version of a cache
    /// key as a delta, and the per-process hints need not hold every key a fleet writes. Anything
    /// wrong with it (gone, corrupt) only costs the delta.
    async fn replaced_base(&self, bucket: &str, key: &str) -> Option<(delta::Base, Vec<[u8; 32]>)> {
        let m = match self.manifest(bucket, key).await {
            Ok(m) => m?,
            Err(e) => {
                tracing::debug!(error = %e, "no base from the replaced version");
                return None;
            }
        };
        // The first link is always a frame of its own (a chain is never a delta of a delta).
        let first = m.header.chain.first()?;
        let raw = match self
            .resolve_chain(&m.header, std::slice::from_ref(first))
            .await
        {
            Ok(raw) => raw,
            Err(e) => {
                tracing::debug!(error = %e, "no base from the replaced version");
                return None;
            }
        };
        let mut sha256 = [0u8; 32];
        hex::decode_to_slice(&first.sha256, &mut sha256).ok()?;
        let named_by = delta::first_digests(&raw, &m.header);
        let base = delta::Base {
            pack: Arc::from(m.header.packs.get(first.pack as usize)?.as_str()),
            len: first.len,
            sha256,
            raw: raw.into(),
        };
        Some((base, named_by))
    }

    /// A remembered base may be used: its pack is not condemned, dead, or gone.
    async fn base_usable(&self, base: &delta::Base) -> Result<bool, DedupError> {
        if self.condemned_packs().await?.contains(&*base.pack) || self.index.is_dead(&base.pack) {
            return Ok(false);
        }
        let one = HashSet::from([base.pack.clone()]);
        Ok(self.missing_reused_packs(&one).await?.is_empty())
    }

    /// Store one zstd frame of a segment stream as a pack of its own (with its index object, like
    /// any pack) and add it to `packs`; its link and pack name.
    async fn put_stream_pack(
        &self,
        frame: Vec<u8>,
        raw: u32,
        packs: &mut Vec<String>,
        inflight: &mut InflightGuard,
    ) -> Result<(manifest::StreamLink, Arc<str>), DedupError> {
        let name: Arc<str> = index::new_pack_name(SystemTime::now()).into();
        inflight.hold(&name);
        let sha: [u8; 32] = Sha256::digest(&frame).into();
        let len = u32::try_from(frame.len()).expect("bounded by DELTA_RAW_MAX");
        self.blob
            .put_bytes(&name, Bytes::from(frame))
            .await
            .inspect_err(|_| Metrics::add(&self.metrics.backend_errors, 1))?;
        self.blob
            .put_bytes(
                &index::pack_index_key(&name),
                Bytes::from(index::encode_pack_index(&[(sha, len)])),
            )
            .await
            .inspect_err(|_| Metrics::add(&self.metrics.backend_errors, 1))?;
        let pack = push_pack(packs, &name);
        Ok((
            manifest::StreamLink {
                pack,
                len,
                sha256: hex::encode(sha),
                raw,
            },
            name,
        ))
    }

    /// The uncompressed segment stream of a chained manifest (its frames fetched and verified).
    pub(crate) async fn resolve_chain(
        &self,
        header: &ObjectHeader,
        links: &[manifest::StreamLink],
    ) -> Result<Vec<u8>, DedupError> {
        let manifest_err = |source| DedupError::Manifest {
            key: header.key.clone(),
            source,
        };
        let mut frames = Vec::with_capacity(links.len());
        for l in links {
            match self.blob.get(&header.packs[l.pack as usize]).await {
                Ok(b) => frames.push(b),
                Err(StoreError::NotFound(_)) => {
                    return Err(manifest_err(ManifestError::Malformed(
                        "segment pack missing",
                    )));
                }
                Err(e) => return Err(e.into()),
            }
        }
        let mut frames = frames.into_iter();
        delta::resolve(links, |_| {
            Ok(frames.next().map(|b| b.to_vec()).unwrap_or_default())
        })
        .map_err(manifest_err)
    }

    /// Write a manifest; a throttled or unavailable backend (a hot key written by many jobs: GCS
    /// answers 429 to a second write of one name within a second) is retried with jittered
    /// exponential backoff. Concurrent writers of one key all succeed; the last one wins.
    async fn put_manifest(&self, mkey: &str, encoded: Bytes) -> Result<(), DedupError> {
        let mut delay = MANIFEST_RETRY_BASE;
        for attempt in 1..=MANIFEST_ATTEMPTS {
            match self.blob.put_bytes(mkey, encoded.clone()).await {
                Ok(()) => return Ok(()),
                Err(StoreError::Unavailable { .. }) if attempt < MANIFEST_ATTEMPTS => {
                    Metrics::add(&self.metrics.manifest_retries, 1);
                    let jitter = rand::random::<f64>() * 0.5 + 0.75;
                    tokio::time::sleep(delay.mul_f64(jitter)).await;
                    delay = (delay * 2).min(MANIFEST_RETRY_MAX);
                }
                Err(e) => {
                    Metrics::add(&self.metrics.backend_errors, 1);
                    return Err(e.into());
                }
            }
        }
        unreachable!("the last attempt returns")
    }

    /// Reused packs that are not (recently verified to be) in the backend. (A pack condemned since
    /// the lookup is fine: this manifest, published before the deleting GC run marks, rescues it.)
    async fn missing_reused_packs(
        &self,
        reused: &HashSet<Arc<str>>,
    ) -> Result<HashSet<Arc<str>>, DedupError> {
        let to_check: Vec<&Arc<str>> = {
            let verified = self.verified.lock().expect("verified lock");
            let every = self.condemned_refresh();
            reused
                .iter()
                .filter(|p| verified.get(*p).is_none_or(|t| t.elapsed() >= every))
                .collect()
        };
        // Checked concurrently: each is a round trip to the backend, on the publish path.
        let found =
            futures::future::try_join_all(to_check.iter().map(|p| self.blob.head(p))).await?;
        let mut missing = HashSet::new();
        let mut verified = self.verified.lock().expect("verified lock");
        if verified.len() > 100_000 {
            let every = self.condemned_refresh();
            verified.retain(|_, t| t.elapsed() < every);
        }
        for (pack, info) in to_check.into_iter().zip(found) {
            if info.is_some() {
                verified.insert(pack.clone(), Instant::now());
            } else {
                missing.insert(pack.clone());
            }
        }
        Ok(missing)
    }

    /// The packs condemned by any GC, re-listed when the cached list is older than
    /// `CONDEMNED_REFRESH`.
    async fn condemned_packs(&self) -> Result<Arc<HashSet<String>>, DedupError> {
        let mut slot = self.condemned.lock().await;
        if slot
            .0
            .is_some_and(|at| at.elapsed() < self.condemned_refresh())
        {
            return Ok(slot.1.clone());
        }
        let set: HashSet<String> = self
            .blob
            .list("condemned/")
            .await?
            .into_iter()
            .map(|o| format!("packs/{}", o.key.trim_start_matches("condemned/")))
            .collect();
        *slot = (Some(Instant::now()), Arc::new(set));
        Ok(slot.1.clone())
    }

    /// Remember that a key was read (for expiry), writing a marker object at most hourly per key.
    pub async fn note_read(&self, bucket: &str, key: &str) {
        let mkey = manifest_key(bucket, key);
        {
            let mut recent = self.recent_reads.lock().expect("reads lock");
            let now = Instant::now();
            if recent
                .get(&mkey)
                .is_some_and(|t| now.duration_since(*t) < READ_MARK_EVERY)
            {
                return;
            }
            if recent.len() > 100_000 {
                recent.retain(|_, t| now.duration_since(*t) < READ_MARK_EVERY);
            }
            recent.insert(mkey.clone(), now);
        }
        if let Err(e) = self
            .blob
            .put_bytes(&read_marker_key(&mkey), Bytes::new())
            .await
        {
            tracing::warn!(error = %e, "could not record read time");
        }
    }
}

/// Delete regular files in `dir` last modified before `stale`, except those `keep` names (files of
/// uploads in progress). Returns how many were deleted.
pub fn sweep_stale_files(
    dir: &Path,
    stale: SystemTime,
    keep: &dyn Fn(&Path) -> bool,
) -> std::io::Result<usize> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut n = 0;
    for entry in entries {
        let entry = entry?;
        let meta = match entry.metadata() {
            Ok(m) => m,
            // Removed meanwhile (an upload finished with it, or another sweep).
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        if meta.is_file() && meta.modified()? < stale && !keep(&entry.path()) {
            match std::fs::remove_file(entry.path()) {
                Ok(()) => n += 1,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(n)
}

#[must_use]
pub fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The index of `name` in `packs`, appended if it is not there.
fn push_pack(packs: &mut Vec<String>, name: &str) -> u32 {
    let at = packs.iter().position(|p| p == name).unwrap_or_else(|| {
        packs.push(name.to_owned());
        packs.len() - 1
    });
    u32::try_from(at).expect("fewer than 4G packs")
}

/// The DEFLATE segment stream in `path`, inflated, when it is at most `max` bytes.
fn inflate_at_most(path: &Path, max: usize) -> std::io::Result<Option<Vec<u8>>> {
    use std::io::Read;
    let mut raw = Vec::new();
    flate2::read::DeflateDecoder::new(std::io::BufReader::new(std::fs::File::open(path)?))
        .take(max as u64 + 1)
        .read_to_end(&mut raw)?;
    Ok((raw.len() <= max).then_some(raw))
}

#[cfg(test)]
#[allow(clippy::many_single_char_names)] // test bodies: z, h, m, a, b
mod tests {
    use super::*;
    use crate::store::disk::DiskStore;
    use futures::StreamExt;

    async fn store() -> (tempfile::TempDir, Arc<DedupStore>) {
        let dir = tempfile::tempdir().unwrap();
        let blob = Arc::new(DiskStore::open(dir.path().join("data")).unwrap());
        let s = DedupStore::open(blob, dir.path().join("spool"), Arc::new(Metrics::default()))
            .await
            .unwrap();
        (dir, Arc::new(s))
    }

    fn obj(key: &str) -> NewObject {
        NewObject {
            bucket: "b".into(),
            key: key.into(),
            etag: "\"e\"".into(),
            content_type: None,
            metadata: vec![],
            attrs: manifest::ObjectAttrs::default(),
        }
    }

    /// Another process on the store of `store()`'s `dir`, with its own spool and local index.
    async fn another_process(dir: &Path, spool: &str) -> Arc<DedupStore> {
        let blob = Arc::new(DiskStore::open(dir.join("data")).unwrap());
        let s = DedupStore::open(blob, dir.join(spool), Arc::new(Metrics::default()))
            .await
            .unwrap();
        Arc::new(s)
    }

    async fn put(s: &Arc<DedupStore>, _dir: &Path, key: &str, body: &[u8]) -> ObjectHeader {
        s.put_bytes(Bytes::copy_from_slice(body), obj(key))
            .await
            .unwrap()
    }

    async fn get(
        s: &Arc<DedupStore>,
        key: &str,
        start: u64,
        end: u64,
    ) -> Result<Vec<u8>, std::io::Error> {
        let m = s.manifest("b", key).await.unwrap().unwrap();
        let mut out = Vec::new();
        let mut st = std::pin::pin!(s.read(m, start, end));
        while let Some(b) = st.next().await {
            out.extend_from_slice(&b?);
        }
        Ok(out)
    }

    /// GC with a one-minute grace, run as if two minutes from now (past the grace of anything
    /// written so far), expiring nothing.
    fn after_grace() -> GcOptions {
        GcOptions {
            expire_uploads: std::time::Duration::from_secs(7 * 86_400),
            durable_buckets: Vec::new(),
            grace: Duration::from_mins(1),
            expire_unread: None,
            max_logical_bytes: None,
            now: SystemTime::now() + Duration::from_mins(2),
        }
    }

    fn noise(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed.wrapping_mul(6_364_136_223_846_793_005) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x.to_le_bytes()[0]
            })
            .collect()
    }

    /// A read spanning many groups returns exact bytes, for whole and ranged windows, with the
    /// read-ahead budget free, exhausted by other reads (each read still gets its one group), and
    /// with a reader that stops early (its fetches end and hand their permits back).
    #[tokio::test]
    async fn reads_with_read_ahead_are_exact_and_bounded_by_the_budget() {
        let (dir, s) = store().await;
        let body = noise(40 << 20, 77);
        put(&s, dir.path(), "big", &body).await;
        let len = body.len() as u64;
        assert_eq!(get(&s, "big", 0, len).await.unwrap(), body);
        let (a, z) = (9_000_001_usize, 27_000_017_usize);
        assert_eq!(
            get(&s, "big", a as u64, z as u64).await.unwrap(),
            &body[a..z]
        );

        let all = s
            .read_ahead
            .clone()
            .acquire_many_owned(u32::try_from(read::READ_AHEAD_BUDGET).unwrap())
            .await
            .unwrap();
        assert_eq!(
            get(&s, "big", 0, len).await.unwrap(),
            body,
            "no budget left"
        );
        drop(all);

        let m = s.manifest("b", "big").await.unwrap().unwrap();
        {
            let mut st = std::pin::pin!(s.read(m, 0, len));
            let _first = st.next().await.unwrap().unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while s.read_ahead.available_permits() < read::READ_AHEAD_BUDGET {
            assert!(
                Instant::now() < deadline,
                "read-ahead permits were not returned"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn plain_body_round_trips_ranges_and_dedups_a_second_copy() {
        let (dir, s) = store().await;
        let body = noise(3 << 20, 1);
        put(&s, dir.path(), "k1", &body).await;
        assert_eq!(get(&s, "k1", 0, body.len() as u64).await.unwrap(), body);
        assert_eq!(
            get(&s, "k1", 100_000, 1_500_000).await.unwrap(),
            &body[100_000..1_500_000]
        );
        let before = s.stats().await.unwrap().pack_bytes;
        put(&s, dir.path(), "k2", &body).await;
        let st = s.stats().await.unwrap();
        assert_eq!(
            st.pack_bytes, before,
            "identical body must add no pack bytes"
        );
        assert_eq!(st.logical_bytes, 2 * body.len() as u64);
    }

    #[tokio::test]
    async fn corrupt_pack_aborts_the_read() {
        let (dir, s) = store().await;
        let body = noise(1 << 20, 2);
        let m = put(&s, dir.path(), "k", &body).await;
        let pack = dir.path().join("data").join(&m.packs[0]);
        let mut bytes = std::fs::read(&pack).unwrap();
        bytes[500_000] ^= 0xFF;
        std::fs::write(&pack, bytes).unwrap();
        let err = get(&s, "k", 0, body.len() as u64).await.unwrap_err();
        assert!(
            err.to_string().contains("failed SHA-256 verification"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn gc_sweeps_only_unreferenced_packs_past_grace() {
        let (dir, s) = store().await;
        put(&s, dir.path(), "k", &noise(1 << 20, 3)).await;
        put(&s, dir.path(), "k", &noise(1 << 20, 4)).await; // overwrite: first pack now unreferenced
        let now = SystemTime::now();
        let opts = GcOptions {
            expire_uploads: std::time::Duration::from_secs(7 * 86_400),
            durable_buckets: Vec::new(),
            grace: Duration::from_hours(1),
            expire_unread: None,
            max_logical_bytes: None,
            now,
        };
        assert_eq!(
            s.gc(&opts).await.unwrap().packs_deleted,
            0,
            "grace protects young packs"
        );
        let later = GcOptions {
            expire_uploads: std::time::Duration::from_secs(7 * 86_400),
            durable_buckets: Vec::new(),
            grace: Duration::from_mins(1),
            now: now + Duration::from_mins(2),
            ..opts.clone()
        };
        // First run condemns the unreferenced pack, a run after grace deletes it.
        let r = s.gc(&later).await.unwrap();
        assert_eq!(
            (
                r.packs_condemned,
                r.packs_deleted,
                r.packs_kept,
                r.manifests_live
            ),
            (1, 0, 2, 1)
        );
        let r = s.gc(&later).await.unwrap();
        assert_eq!((r.packs_deleted, r.packs_kept, r.manifests_live), (1, 1, 1));
        assert_eq!(get(&s, "k", 0, 1 << 20).await.unwrap(), noise(1 << 20, 4));
        let expire = GcOptions {
            expire_uploads: std::time::Duration::from_secs(7 * 86_400),
            durable_buckets: Vec::new(),
            expire_unread: Some(Duration::from_mins(1)),
            ..later
        };
        let r = s.gc(&expire).await.unwrap();
        assert_eq!((r.manifests_expired, r.packs_condemned), (1, 1));
        let r = s.gc(&expire).await.unwrap();
        assert_eq!(r.packs_deleted, 1);
        assert!(s.blob().list("condemned/").await.unwrap().is_empty());
        assert!(s.manifest("b", "k").await.unwrap().is_none());
    }

    /// Versions of one tree under new keys (P5's case): the first stores its segment stream alone,
    /// the later ones as small deltas against it. Each reads back byte-identical, here and from a
    /// fresh process; deleting the first key leaves the later ones whole through GC (their
    /// manifests list the base's pack); a base whose pack GC condemned is not used again.
    #[tokio::test]
    async fn versions_of_a_tree_store_their_segment_streams_as_deltas_against_the_first() {
        let (dir, s) = store().await;
        let mut tree = spotrun_testkit::ziptree::Tree::new(3000);
        let mut zips = Vec::new();
        for v in 0..4u8 {
            if v > 0 {
                tree.churn(5, 1000 + u64::from(v), v);
            }
            let z = tree.zip();
            let h = put(&s, dir.path(), &format!("deps-v{v}"), &z).await;
            assert_eq!(h.chain.len(), if v == 0 { 1 } else { 2 }, "version {v}");
            zips.push(z);
        }
        assert_eq!(
            s.metrics
                .segment_deltas
                .load(std::sync::atomic::Ordering::Relaxed),
            3
        );
        let header = |k: &str| {
            let s = s.clone();
            let k = k.to_owned();
            async move { s.manifest("b", &k).await.unwrap().unwrap().header.clone() }
        };
        let (first, last) = (header("deps-v0").await, header("deps-v3").await);
        assert_eq!(
            (last.chain[0].len, &last.chain[0].sha256),
            (first.chain[0].len, &first.chain[0].sha256)
        );
        assert_eq!(
            last.packs[last.chain[0].pack as usize],
            first.packs[first.chain[0].pack as usize]
        );
        assert!(
            last.chain[1].len * 4 < first.chain[0].len,
            "delta {} vs base {}",
            last.chain[1].len,
            first.chain[0].len
        );
        let fresh = another_process(dir.path(), "spool2").await;
        for (v, z) in zips.iter().enumerate() {
            let got = get(&fresh, &format!("deps-v{v}"), 0, z.len() as u64).await;
            assert!(
                got.unwrap() == *z,
                "version {v} reads back from a fresh process"
            );
        }
        s.delete_key("b", "deps-v0").await.unwrap();
        let gc = after_grace();
        s.gc(&gc).await.unwrap();
        s.gc(&gc).await.unwrap();
        for (v, z) in zips.iter().enumerate().skip(1) {
            let got = get(&s, &format!("deps-v{v}"), 0, z.len() as u64).await;
            assert!(got.unwrap() == *z, "version {v} reads back after GC");
        }
        for v in 1..4 {
            s.delete_key("b", &format!("deps-v{v}")).await.unwrap();
        }
        let r = s.gc(&gc).await.unwrap();
        assert!(r.packs_condemned > 0);
        tree.churn(5, 2000, 9);
        let h = put(&s, dir.path(), "deps-v4", &tree.zip()).await;
        assert_eq!(h.chain.len(), 1, "a condemned base is not used");
    }

    /// A process that did not store the version a PUT replaces (restarted, or another replica)
    /// has no hint for it, and still stores the new version's stream as a delta: against the base
    /// of the version under the same key, found in the backend. That base outlives the version it
    /// came from, which the PUT replaced.
    #[tokio::test]
    async fn a_new_version_of_a_key_deltas_against_the_replaced_versions_base_in_any_process() {
        let (dir, s) = store().await;
        let mut tree = spotrun_testkit::ziptree::Tree::new(3000);
        let v0 = put(&s, dir.path(), "deps", &tree.zip()).await;
        assert_eq!(v0.chain.len(), 1, "stored alone");
        tree.churn(5, 11, 1);
        let z1 = tree.zip();
        // A second process, under a new key: no hint, no replaced version, stored alone.
        let other = another_process(dir.path(), "spool2").await;
        assert_eq!(
            put(&other, dir.path(), "deps-copy", &z1).await.chain.len(),
            1
        );
        // A third, replacing "deps": a delta against v0's frame.
        let third = another_process(dir.path(), "spool3").await;
        let v1 = put(&third, dir.path(), "deps", &z1).await;
        assert_eq!(v1.chain.len(), 2, "stored as a delta");
        assert_eq!(
            (&v1.packs[v1.chain[0].pack as usize], &v1.chain[0].sha256),
            (&v0.packs[v0.chain[0].pack as usize], &v0.chain[0].sha256)
        );
        assert!(v1.chain[1].len * 4 < v0.chain[0].len);
        assert_eq!(
            third
                .metrics
                .segment_deltas
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
        // v0's manifest is gone; GC keeps the base v1 lists.
        let gc = after_grace();
        s.gc(&gc).await.unwrap();
        s.gc(&gc).await.unwrap();
        let reader = another_process(dir.path(), "spool4").await;
        let got = get(&reader, "deps", 0, z1.len() as u64).await;
        assert!(got.unwrap() == z1, "v1 reads back after GC");
        // The base found that way is a hint now: the next version, under a new key, uses it too.
        tree.churn(5, 12, 2);
        assert_eq!(
            put(&third, dir.path(), "deps-v2", &tree.zip())
                .await
                .chain
                .len(),
            2
        );
    }

    /// The replaced version's base frame damaged: no base, the new version is stored alone and
    /// reads back whole.
    #[tokio::test]
    async fn a_damaged_base_of_the_replaced_version_only_costs_the_delta() {
        let (dir, s) = store().await;
        let mut tree = spotrun_testkit::ziptree::Tree::new(3000);
        let v0 = put(&s, dir.path(), "deps", &tree.zip()).await;
        let base = v0.packs[v0.chain[0].pack as usize].clone();
        let frame = s.blob().get(&base).await.unwrap();
        let mut bad = frame.to_vec();
        bad[frame.len() / 2] ^= 0xFF;
        s.blob().put_bytes(&base, Bytes::from(bad)).await.unwrap();
        tree.churn(5, 11, 1);
        let z1 = tree.zip();
        let fresh = another_process(dir.path(), "spool2").await;
        assert_eq!(put(&fresh, dir.path(), "deps", &z1).await.chain.len(), 1);
        assert!(get(&fresh, "deps", 0, z1.len() as u64).await.unwrap() == z1);
    }

    /// A chained segment stream whose base frame is corrupt or gone fails the read with what is
    /// wrong; no byte of the object is sent as if it were whole.
    #[tokio::test]
    async fn a_corrupt_or_missing_base_frame_fails_the_read() {
        let (dir, s) = store().await;
        let mut tree = spotrun_testkit::ziptree::Tree::new(3000);
        put(&s, dir.path(), "v0", &tree.zip()).await;
        tree.churn(5, 7, 1);
        let z = tree.zip();
        let h = put(&s, dir.path(), "v1", &z).await;
        assert_eq!(h.chain.len(), 2);
        let base = h.packs[h.chain[0].pack as usize].clone();
        let frame = s.blob().get(&base).await.unwrap();
        let mut bad = frame.to_vec();
        bad[frame.len() / 2] ^= 0xFF;
        s.blob().put_bytes(&base, Bytes::from(bad)).await.unwrap();
        let err = get(&s, "v1", 0, z.len() as u64).await.unwrap_err();
        assert!(
            err.to_string().contains("does not match its digest"),
            "{err}"
        );
        s.blob().delete(&base).await.unwrap();
        let err = get(&s, "v1", 0, z.len() as u64).await.unwrap_err();
        assert!(err.to_string().contains("segment pack missing"), "{err}");
        s.blob().put_bytes(&base, frame).await.unwrap();
        assert!(get(&s, "v1", 0, z.len() as u64).await.unwrap() == z);
    }

    /// Two processes on one backend (replicas, or the server and the `gc` CronJob): one's GC never
    /// leaves the other publishing manifests over deleted or condemned packs.
    #[tokio::test]
    async fn gc_in_another_process_never_breaks_this_ones_manifests() {
        let dir = tempfile::tempdir().unwrap();
        let open = |spool: &str| {
            let blob = Arc::new(DiskStore::open(dir.path().join("data")).unwrap());
            DedupStore::open(blob, dir.path().join(spool), Arc::new(Metrics::default()))
        };
        let a = open("spool-a").await.unwrap();
        let b = open("spool-b").await.unwrap();
        let a = Arc::new(a);
        let (old, new) = (noise(1 << 20, 5), noise(1 << 20, 6));
        put(&a, dir.path(), "k", &old).await;
        put(&a, dir.path(), "k", &new).await; // `old`'s pack is unreferenced, still in a's index
        let gc = after_grace();
        assert_eq!(b.gc(&gc).await.unwrap().packs_condemned, 1);
        // Once its list of condemned packs is stale (30 s; forced here), a re-lists it and stores
        // `old` afresh instead of reusing the condemned pack.
        a.condemned.lock().await.0 = None;
        let packs_before = a.blob().list("packs/").await.unwrap().len();
        put(&a, dir.path(), "k2", &old).await;
        assert_eq!(
            a.blob().list("packs/").await.unwrap().len(),
            packs_before + 1
        );
        assert_eq!(b.gc(&gc).await.unwrap().packs_deleted, 1);
        assert_eq!(get(&a, "k2", 0, 1 << 20).await.unwrap(), old);

        // A pack deleted while a process did not look (its tombstone gone too): caught by the
        // existence check before the manifest is published.
        let (gone, other) = (noise(1 << 20, 7), noise(1 << 20, 8));
        put(&a, dir.path(), "k3", &gone).await;
        put(&a, dir.path(), "k3", &other).await;
        b.gc(&gc).await.unwrap();
        assert_eq!(b.gc(&gc).await.unwrap().packs_deleted, 1);
        a.condemned.lock().await.1 = Arc::new(HashSet::new()); // as if listed before the condemning
        a.verified.lock().unwrap().clear();
        let err = a
            .put_bytes(Bytes::from(gone.clone()), obj("k4"))
            .await
            .unwrap_err();
        assert!(matches!(err, DedupError::ReusedPacksGone(1)), "{err}");
        assert!(
            a.manifest("b", "k4").await.unwrap().is_none(),
            "nothing published"
        );
        // The gone pack is forgotten, so the client's retry stores the chunks afresh.
        put(&a, dir.path(), "k4", &gone).await;
        assert_eq!(get(&a, "k4", 0, 1 << 20).await.unwrap(), gone);
    }

    /// A disk store that counts range reads and, like GCS, refuses a second write of one manifest
    /// name within a second (`Unavailable`, what a 429 becomes).
    #[derive(Debug)]
    struct Throttled {
        inner: DiskStore,
        ranges: std::sync::atomic::AtomicU64,
        last_write: Mutex<HashMap<String, Instant>>,
        refused: std::sync::atomic::AtomicU64,
    }

    #[async_trait::async_trait]
    impl BlobStore for Throttled {
        async fn put_file(&self, key: &str, path: &Path) -> Result<(), StoreError> {
            self.inner.put_file(key, path).await
        }
        async fn put_bytes(&self, key: &str, data: Bytes) -> Result<(), StoreError> {
            if key.starts_with("manifests/") {
                let mut last = self.last_write.lock().unwrap();
                if last
                    .get(key)
                    .is_some_and(|t| t.elapsed() < Duration::from_secs(1))
                {
                    self.refused
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    return Err(StoreError::unavailable("put", key, "429 SlowDown"));
                }
                last.insert(key.to_owned(), Instant::now());
            }
            self.inner.put_bytes(key, data).await
        }
        async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
            self.inner.get(key).await
        }
        async fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Bytes, StoreError> {
            self.ranges
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.inner.get_range(key, offset, len).await
        }
        async fn head(&self, key: &str) -> Result<Option<crate::store::ObjectInfo>, StoreError> {
            self.inner.head(key).await
        }
        async fn list(&self, prefix: &str) -> Result<Vec<crate::store::ObjectInfo>, StoreError> {
            self.inner.list(prefix).await
        }
        async fn delete(&self, key: &str) -> Result<(), StoreError> {
            self.inner.delete(key).await
        }
        async fn ping(&self) -> Result<(), StoreError> {
            self.inner.ping().await
        }
    }

    async fn throttled_store() -> (tempfile::TempDir, Arc<Throttled>, Arc<DedupStore>) {
        let dir = tempfile::tempdir().unwrap();
        let blob = Arc::new(Throttled {
            inner: DiskStore::open(dir.path().join("data")).unwrap(),
            ranges: 0.into(),
            last_write: Mutex::new(HashMap::new()),
            refused: 0.into(),
        });
        let s = DedupStore::open(
            blob.clone(),
            dir.path().join("spool"),
            Arc::new(Metrics::default()),
        )
        .await
        .unwrap();
        (dir, blob, Arc::new(s))
    }

    /// A stored zip of `n` small entries (deflated text, distinct per entry).
    fn many_entry_zip(n: usize) -> Vec<u8> {
        use std::io::Write as _;
        let mut w = ::zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        let opts = ::zip::write::SimpleFileOptions::default()
            .compression_method(::zip::CompressionMethod::Stored);
        for i in 0..n {
            w.start_file(format!("node_modules/pkg{i}/index.js"), opts)
                .unwrap();
            write!(w, "module.exports = {i}; // {}", "x".repeat(i % 200)).unwrap();
        }
        w.finish().unwrap().into_inner()
    }

    /// A zip of many entries round-trips byte-identical; its header alone answers HEAD (no segment
    /// stream decoded); a whole GET needs about one range read per 8 MiB, not one per entry.
    #[tokio::test]
    async fn a_many_entry_zip_reads_back_with_few_range_reads_and_head_decodes_no_segments() {
        let (dir, blob, s) = throttled_store().await;
        let z = many_entry_zip(20_000);
        let h = put(&s, dir.path(), "deps.zip", &z).await;
        assert!(
            h.segments.unwrap() > 40_000,
            "a segment per header and entry"
        );
        let before = s
            .metrics
            .segment_streams
            .load(std::sync::atomic::Ordering::Relaxed);
        let m = s.manifest("b", "deps.zip").await.unwrap().unwrap();
        assert_eq!(m.header.size, z.len() as u64);
        assert_eq!(
            s.metrics
                .segment_streams
                .load(std::sync::atomic::Ordering::Relaxed),
            before,
            "the header answers HEAD"
        );
        assert!(
            matches!(m.segments, manifest::SegmentSource::External(_)),
            "a 40k-segment stream lives in its own object"
        );
        let reads_before = blob.ranges.load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(get(&s, "deps.zip", 0, z.len() as u64).await.unwrap(), z);
        let reads = blob.ranges.load(std::sync::atomic::Ordering::Relaxed) - reads_before;
        // One pack of ~1 MiB of entry data: a few reads for the data, a few for the segment object.
        assert!(reads <= 8, "{reads} range reads for {} entries", 20_000);
        let (a, b) = (123_457_usize, z.len() - 99_999);
        assert_eq!(
            get(&s, "deps.zip", a as u64, b as u64).await.unwrap(),
            &z[a..b]
        );
    }

    /// An upload that is cut (dropped before `finish`) or fails its checks (dropped after `finish`)
    /// publishes nothing; GC reclaims the packs it uploaded.
    #[tokio::test]
    async fn a_cut_upload_publishes_nothing_and_gc_reclaims_its_packs() {
        let (_dir, s) = store().await;
        let body = noise(40 << 20, 11);
        let mut ing = s.begin_ingest().await.unwrap();
        for part in body[..36 << 20].chunks(1 << 20) {
            ing.write(Bytes::copy_from_slice(part)).await.unwrap();
        }
        drop(ing); // the client went away
        let mut ing = s.begin_ingest().await.unwrap();
        ing.write(Bytes::from(body.clone())).await.unwrap();
        let staged = ing.finish().await.unwrap();
        assert!(
            staged.stats.packs_uploaded >= 2,
            "packs went up while the body arrived"
        );
        drop(staged); // e.g. a Content-MD5 mismatch
        assert!(s.manifest("b", "k").await.unwrap().is_none());
        assert!(s.blob().list("manifests/").await.unwrap().is_empty());
        // Uploads cancelled mid-way may finish a moment later; wait for them to settle.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let packs = s.blob().list("packs/").await.unwrap().len();
        assert!(packs >= 2, "{packs}");
        let opts = after_grace();
        assert_eq!(s.gc(&opts).await.unwrap().packs_condemned, packs);
        assert_eq!(s.gc(&opts).await.unwrap().packs_deleted, packs);
        assert!(s.blob().list("packs/").await.unwrap().is_empty());
        assert!(s.blob().list("packidx/").await.unwrap().is_empty());
    }

    /// New data that arrives thinly (a slow client, or a body mostly known) is not held back for
    /// a full pack: a pack with `PACK_EARLY_MIN` bytes that has been open `PACK_EARLY_AGE` goes to
    /// the backend while the body still arrives. (Without that, 6 MiB, under `PACK_TARGET`, would
    /// be one pack uploaded at `finish`: nothing would be in the store before it.)
    #[tokio::test]
    async fn thin_new_data_goes_up_in_smaller_packs_while_the_body_arrives() {
        let (_dir, s) = store().await;
        let body = noise(6 << 20, 31);
        let mut ing = s.begin_ingest().await.unwrap();
        for part in body.chunks(1 << 20) {
            ing.write(Bytes::copy_from_slice(part)).await.unwrap();
            tokio::time::sleep(ingest::PACK_EARLY_AGE).await;
        }
        // Before the body ends, a pack is in the store (bounded wait for its upload).
        let t = std::time::Instant::now();
        while s.blob().list("packs/").await.unwrap().is_empty() {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "no pack went up before the body ended"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let staged = ing.finish().await.unwrap();
        assert_eq!(staged.stats.packs_uploaded, 2, "{:?}", staged.stats);
        s.publish(staged, obj("slow")).await.unwrap();
        assert_eq!(get(&s, "slow", 0, body.len() as u64).await.unwrap(), body);
        let sizes: Vec<u64> = s
            .blob()
            .list("packs/")
            .await
            .unwrap()
            .iter()
            .map(|o| o.size)
            .collect();
        assert!(
            sizes
                .iter()
                .any(|&n| (ingest::PACK_EARLY_MIN..PACK_TARGET).contains(&n)),
            "{sizes:?}"
        );
    }

    /// The local index is a cache of the backend's pack index objects: deleted, it is rebuilt at
    /// start and makes the same dedup decisions.
    #[tokio::test]
    async fn a_deleted_local_index_is_rebuilt_with_the_same_dedup_decisions() {
        let dir = tempfile::tempdir().unwrap();
        let open = || async {
            let blob = Arc::new(DiskStore::open(dir.path().join("data")).unwrap());
            Arc::new(
                DedupStore::open(blob, dir.path().join("spool"), Arc::new(Metrics::default()))
                    .await
                    .unwrap(),
            )
        };
        let (a, b) = (noise(3 << 20, 21), noise(3 << 20, 22));
        let mixed: Vec<u8> = [&a[..1 << 20], &b[..], &a[2 << 20..]].concat();
        let decide = |s: Arc<DedupStore>| {
            let mixed = mixed.clone();
            async move {
                let mut ing = s.begin_ingest().await.unwrap();
                ing.write(Bytes::from(mixed)).await.unwrap();
                ing.finish().await.unwrap().stats
            }
        };
        let s = open().await;
        put(&s, dir.path(), "a", &a).await;
        put(&s, dir.path(), "b", &b).await;
        // The first decision uploads the chunks new at the joins (indexed, unpublished); from then on
        // every chunk is known.
        decide(s.clone()).await;
        let warm = decide(s.clone()).await;
        drop(s);
        std::fs::remove_dir_all(dir.path().join("spool/index")).unwrap();
        let s = open().await;
        assert!(s.blob().list("packidx/").await.unwrap().len() >= 2);
        assert!(
            s.chunk_index().len().unwrap() > 60,
            "reloaded from the index objects"
        );
        let cold = decide(s).await;
        assert_eq!(
            (cold.chunks_reused, cold.chunks_new, cold.bytes_new),
            (warm.chunks_reused, warm.chunks_new, warm.bytes_new)
        );
        assert!(cold.chunks_reused > 40 && cold.bytes_new == 0, "{cold:?}");
    }

    /// A damaged pack index object is skipped when a process loads the index: it costs the dedup of
    /// that pack's chunks, never a failed start or upload, and the other packs still load.
    #[tokio::test]
    async fn a_damaged_pack_index_object_only_costs_its_packs_dedup() {
        let (dir, s) = store().await;
        let (a, b) = (noise(1 << 20, 41), noise(1 << 20, 42));
        put(&s, dir.path(), "a", &a).await;
        put(&s, dir.path(), "b", &b).await;
        let ha = s.manifest("b", "a").await.unwrap().unwrap().header.clone();
        let key = index::pack_index_key(&ha.packs[0]);
        let mut bad = s.blob().get(&key).await.unwrap().to_vec();
        bad[20] ^= 0xFF;
        s.blob().put_bytes(&key, Bytes::from(bad)).await.unwrap();
        let fresh = another_process(dir.path(), "spool2").await;
        assert!(
            !fresh.chunk_index().knows_pack(&ha.packs[0]).unwrap(),
            "the damaged pack is not loaded"
        );
        let hb = fresh
            .manifest("b", "b")
            .await
            .unwrap()
            .unwrap()
            .header
            .clone();
        assert!(
            fresh.chunk_index().knows_pack(&hb.packs[0]).unwrap(),
            "the others are"
        );
        // `a` again: stored anew (no dedup for the damaged pack), read back whole.
        let h = fresh
            .put_bytes(Bytes::from(a.clone()), obj("a2"))
            .await
            .unwrap();
        assert_ne!(
            h.packs, ha.packs,
            "chunks of the damaged pack are not reused"
        );
        assert!(get(&fresh, "a2", 0, a.len() as u64).await.unwrap() == a);
    }

    /// Concurrent PUTs of one key against a backend that throttles a second write of a name within a
    /// second (GCS): all succeed, and the key holds one of the bodies, whole.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_puts_of_one_hot_key_all_succeed_through_throttling() {
        let (dir, blob, s) = throttled_store().await;
        let bodies: Vec<Vec<u8>> = (0..4).map(|i| noise(200_000, 30 + i)).collect();
        let mut tasks = Vec::new();
        for b in &bodies {
            let (s, b) = (s.clone(), b.clone());
            tasks.push(tokio::spawn(async move {
                s.put_bytes(Bytes::from(b), obj("hot")).await
            }));
        }
        for t in tasks {
            t.await.unwrap().expect("every writer succeeds");
        }
        assert!(
            blob.refused.load(std::sync::atomic::Ordering::Relaxed) > 0,
            "the backend throttled some writes"
        );
        let got = get(&s, "hot", 0, 200_000).await.unwrap();
        assert!(bodies.contains(&got));
        // The last write wins: a later PUT (after the throttle window) is what reads return.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        put(&s, dir.path(), "hot", &bodies[0]).await;
        assert_eq!(get(&s, "hot", 0, 200_000).await.unwrap(), bodies[0]);
    }

    /// A zip of empty entries separated by megabytes of junk (issue 16): inline structure stops at
    /// the per-object budget, the manifest stays small and decodes, and the body reads back.
    #[tokio::test]
    async fn gap_filled_zips_make_manifests_that_decode() {
        let (dir, s) = store().await;
        let gap = noise(chunker::INLINE_RUN_MAX - 1000, 41);
        let mut body = Vec::new();
        for i in 0..10u8 {
            body.extend_from_slice(b"PK\x03\x04");
            body.extend_from_slice(&[20, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
            body.extend_from_slice(&[0; 12]);
            body.extend_from_slice(&[1, 0, 0, 0, b'a' + i]);
            body.extend_from_slice(&gap);
        }
        let h = put(&s, dir.path(), "gaps.zip", &body).await;
        let mkey = manifest_key("b", "gaps.zip");
        let m_size = s.blob().get(&mkey).await.unwrap().len();
        assert!(m_size < 64 << 10, "manifest of {m_size} bytes");
        assert!(h.segments.is_some());
        assert_eq!(
            get(&s, "gaps.zip", 0, body.len() as u64).await.unwrap(),
            body
        );
    }

    /// One unreadable manifest does not stop GC: it is reported, and every pack written before it
    /// is kept; other keys' garbage is still collected.
    #[tokio::test]
    async fn gc_skips_an_unreadable_manifest_and_keeps_what_it_may_reference() {
        let (dir, s) = store().await;
        put(&s, dir.path(), "victim", &noise(1 << 20, 51)).await;
        std::fs::write(
            dir.path().join("data").join(manifest_key("b", "victim")),
            b"SRM\x03garbage",
        )
        .unwrap();
        let opts = after_grace();
        let r = s.gc(&opts).await.unwrap();
        assert_eq!(
            (r.manifests_unreadable, r.packs_condemned, r.packs_kept),
            (1, 0, 1)
        );
        let err = s.manifest("b", "victim").await.unwrap_err();
        assert!(err.to_string().contains("manifest"), "{err}");
        // A store reopened over it starts fine.
        let blob = Arc::new(DiskStore::open(dir.path().join("data")).unwrap());
        DedupStore::open(
            blob,
            dir.path().join("spool2"),
            Arc::new(Metrics::default()),
        )
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn durable_buckets_never_expire_and_abandoned_uploads_do() {
        let (dir, s) = store().await;
        put(&s, dir.path(), "cache-key", b"cached bytes").await;
        let artifact = NewObject {
            bucket: "artifacts".into(),
            ..obj("job/1/artifacts.zip")
        };
        s.put_bytes(Bytes::from_static(b"artifact bytes"), artifact)
            .await
            .unwrap();
        let meta = multipart::UploadMeta {
            key: "backup.tar".into(),
            initiated: 0,
            content_type: None,
            metadata: vec![],
            attrs: manifest::ObjectAttrs::default(),
        };
        let id = s.create_upload("artifacts", &meta).await.unwrap();
        let mut ing = s.begin_ingest().await.unwrap();
        ing.write(Bytes::from(vec![7u8; 100_000])).await.unwrap();
        let staged = ing.finish().await.unwrap();
        s.publish_part(staged, "artifacts", &id, 1, "\"p\"".into())
            .await
            .unwrap();
        let later = |days: u64| GcOptions {
            grace: Duration::from_secs(1),
            expire_unread: Some(Duration::from_hours(24)),
            max_logical_bytes: Some(1),
            expire_uploads: Duration::from_hours(7 * 24),
            durable_buckets: vec!["artifacts".into()],
            now: SystemTime::now() + Duration::from_hours(24 * days),
        };
        // Two days on: the cache key expires, the artifact stays, the upload is still young.
        let r = s.gc(&later(2)).await.unwrap();
        assert_eq!((r.manifests_expired, r.manifests_live), (1, 1), "{r:?}");
        assert!(s.manifest("b", "cache-key").await.unwrap().is_none());
        assert!(
            s.manifest("artifacts", "job/1/artifacts.zip")
                .await
                .unwrap()
                .is_some()
        );
        assert_eq!(s.list_parts("artifacts", &id).await.unwrap().len(), 1);
        assert_eq!(r.uploads_expired, 0);
        // Eight days on: the abandoned upload is deleted with its part; the artifact stays.
        let r = s.gc(&later(8)).await.unwrap();
        assert_eq!(r.uploads_expired, 1, "{r:?}");
        assert!(matches!(
            s.list_parts("artifacts", &id).await,
            Err(multipart::MultipartError::NoSuchUpload(_))
        ));
        assert!(
            s.manifest("artifacts", "job/1/artifacts.zip")
                .await
                .unwrap()
                .is_some()
        );
        assert!(s.blob().list("uploads/").await.unwrap().is_empty());
        // The cache key's listing entry went with it; the artifact's is there.
        assert!(s.blob().list("keys/b/").await.unwrap().is_empty());
        assert_eq!(s.blob().list("keys/artifacts/").await.unwrap().len(), 1);
    }
}
