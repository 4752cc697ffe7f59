//! The dedup store: spooled bodies → zip-aware `FastCDC` chunks packed into large objects + one manifest
//! per key; reads verify every chunk's SHA-256 before any byte of it is sent.

pub mod manifest;
pub mod zip;

use std::collections::{HashMap, HashSet};
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures::Stream;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use crate::metrics::Metrics;
use crate::store::{BlobStore, StoreError};
use manifest::{ChunkRef, ManifestError, ManifestV1, ObjectHeader, Segment};
use zip::SpanKind;

/// `FastCDC` (min, avg, max) for entry data and plain bodies.
pub const DATA_CDC: (u32, u32, u32) = (16 << 10, 64 << 10, 256 << 10);
/// Smaller chunks for zip structure too large to keep inline (a central directory over `INLINE_MAX`).
pub const META_CDC: (u32, u32, u32) = (1 << 10, 4 << 10, 16 << 10);
/// Zip structure up to this size lives inline in the (deflated) manifest. The central directory holds
/// every entry's mtime and CRC, so with 5 % of files changed nearly every 4 KiB chunk of it changed
/// and was stored again (issue 5); inline it deflates to about a fifth. 8 MiB covers ~100k entries
/// while keeping a manifest, which GET/HEAD read whole, small.
pub const INLINE_MAX: u64 = 8 << 20;
/// New chunks are appended to a pack until it reaches this size: 32 MiB keeps a GiB upload at ~32
/// backend PUTs, far under the 1,100 requests/GiB budget.
pub const PACK_TARGET: u64 = 32 << 20;
/// One backend range read covers at most this much.
const READ_SPAN_MAX: u64 = 8 << 20;
/// Unneeded bytes we accept reading between two wanted chunks of the same pack to save a request.
const READ_GAP_MAX: u64 = 256 << 10;
/// How often an ingest re-reads the list of condemned packs (written by any process's GC). Safety
/// needs `grace` > longest upload + this interval: see `DedupStore::gc`.
const CONDEMNED_REFRESH: Duration = Duration::from_secs(30);
/// Read markers (for expiry of unread keys) are rewritten at most this often per key.
const READ_MARK_EVERY: Duration = Duration::from_hours(1);

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
    #[error("chunk {sha} in {pack} failed SHA-256 verification")]
    Corrupt { pack: String, sha: String },
    #[error("refusing to sweep: manifest {0:?} could not be decoded (its packs would be lost)")]
    UnreadableManifest(String),
}

#[derive(Debug, Clone)]
struct Loc {
    pack: Arc<str>,
    offset: u64,
    len: u32,
}

/// Attributes of an object being stored.
#[derive(Debug, Clone)]
pub struct NewObject {
    pub bucket: String,
    pub key: String,
    pub etag: String,
    pub content_type: Option<String>,
    pub metadata: Vec<(String, String)>,
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
    pub now: SystemTime,
}

#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct GcReport {
    pub manifests_live: usize,
    pub manifests_expired: usize,
    pub packs_kept: usize,
    /// Unreferenced packs past grace marked for deletion by a later run (tombstones written).
    pub packs_condemned: usize,
    /// Condemned packs found referenced again (their tombstones removed).
    pub packs_rescued: usize,
    pub packs_deleted: usize,
    pub bytes_deleted: u64,
    /// Leftovers of uploads interrupted by a crash: spool files and the store's temp files.
    pub temp_files_deleted: usize,
}

#[derive(Debug, Default, Clone, PartialEq, serde::Serialize)]
pub struct Stats {
    pub keys: usize,
    pub logical_bytes: u64,
    pub pack_bytes: u64,
    pub manifest_bytes: u64,
    pub stored_bytes: u64,
    pub packs: usize,
    /// logical / stored.
    pub dedup_ratio: f64,
}

#[derive(Debug)]
pub struct DedupStore {
    blob: Arc<dyn BlobStore>,
    index: std::sync::RwLock<HashMap<[u8; 32], Loc>>,
    spool_dir: PathBuf,
    metrics: Arc<Metrics>,
    /// Ingests hold it shared from chunk lookup to manifest write; GC holds it exclusively, so a
    /// chunk found in the index cannot be swept before the manifest referencing it exists.
    gc_lock: tokio::sync::RwLock<()>,
    recent_reads: Mutex<HashMap<String, Instant>>,
    /// Packs some GC (this process or another) has condemned, and when the list was read; chunks in
    /// them are never reused.
    condemned: tokio::sync::Mutex<(Option<Instant>, Arc<HashSet<String>>)>,
    /// Reused packs seen in the backend recently (saves a HEAD per pack per upload).
    verified: Mutex<HashMap<Arc<str>, Instant>>,
    /// Permits for read-ahead groups beyond each read's first (`READ_AHEAD_BUDGET`).
    read_ahead: Arc<tokio::sync::Semaphore>,
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

/// The result of chunking one spooled body (blocking part of an ingest).
struct Plan {
    segments: Vec<PlannedSegment>,
    packs: Vec<(Arc<str>, tempfile::NamedTempFile)>,
    new_chunks: Vec<([u8; 32], Loc)>,
    hits: u64,
    misses: u64,
    dedup_bytes: u64,
    stored_bytes: u64,
}

enum PlannedSegment {
    Inline(Vec<u8>),
    Chunk(Loc, [u8; 32]),
}

struct PackWriter<'a> {
    spool_dir: &'a Path,
    current: Option<(Arc<str>, BufWriter<tempfile::NamedTempFile>, u64)>,
    done: Vec<(Arc<str>, tempfile::NamedTempFile)>,
}

impl PackWriter<'_> {
    fn append(&mut self, data: &[u8]) -> std::io::Result<Loc> {
        if self.current.is_none() {
            let name: Arc<str> = format!("packs/{:032x}", rand::random::<u128>()).into();
            let file = tempfile::NamedTempFile::new_in(self.spool_dir)?;
            self.current = Some((name, BufWriter::with_capacity(1 << 20, file), 0));
        }
        let (name, w, size) = self.current.as_mut().expect("just created");
        w.write_all(data)?;
        let loc = Loc {
            pack: name.clone(),
            offset: *size,
            len: u32::try_from(data.len()).expect("chunks are small"),
        };
        *size += data.len() as u64;
        if *size >= PACK_TARGET {
            self.finish_current()?;
        }
        Ok(loc)
    }

    fn finish_current(&mut self) -> std::io::Result<()> {
        if let Some((name, w, _)) = self.current.take() {
            let file = w
                .into_inner()
                .map_err(std::io::IntoInnerError::into_error)?;
            self.done.push((name, file));
        }
        Ok(())
    }
}

fn plan_chunks(
    spool: &Path,
    size: u64,
    spool_dir: &Path,
    lookup: &dyn Fn(&[u8; 32]) -> Option<Loc>,
) -> std::io::Result<Plan> {
    let mut file = std::fs::File::open(spool)?;
    let spans = match zip::zip_spans(&mut file, size) {
        Ok(spans) => spans,
        Err(e) => {
            if !matches!(e, zip::ZipError::NotZip) {
                tracing::info!(error = %e, "zip parse failed; chunking the body as plain data");
            }
            vec![zip::Span {
                offset: 0,
                len: size,
                kind: SpanKind::Data,
            }]
        }
    };
    let mut plan = Plan {
        segments: Vec::new(),
        packs: Vec::new(),
        new_chunks: Vec::new(),
        hits: 0,
        misses: 0,
        dedup_bytes: 0,
        stored_bytes: 0,
    };
    let mut local: HashMap<[u8; 32], Loc> = HashMap::new();
    let mut packs = PackWriter {
        spool_dir,
        current: None,
        done: Vec::new(),
    };
    for span in spans.into_iter().filter(|s| s.len > 0) {
        file.seek(SeekFrom::Start(span.offset))?;
        if span.kind == SpanKind::Literal && span.len <= INLINE_MAX {
            let mut buf = vec![0; usize::try_from(span.len).expect("small")];
            file.read_exact(&mut buf)?;
            plan.segments.push(PlannedSegment::Inline(buf));
            continue;
        }
        let (min, avg, max) = if span.kind == SpanKind::Data {
            DATA_CDC
        } else {
            META_CDC
        };
        for chunk in fastcdc::v2020::StreamCDC::new((&mut file).take(span.len), min, avg, max) {
            let chunk = chunk.map_err(|e| std::io::Error::other(e.to_string()))?;
            let sha: [u8; 32] = Sha256::digest(&chunk.data).into();
            let loc = if let Some(loc) = local.get(&sha).cloned().or_else(|| lookup(&sha)) {
                plan.hits += 1;
                plan.dedup_bytes += chunk.data.len() as u64;
                loc
            } else {
                let loc = packs.append(&chunk.data)?;
                plan.misses += 1;
                plan.stored_bytes += chunk.data.len() as u64;
                local.insert(sha, loc.clone());
                plan.new_chunks.push((sha, loc.clone()));
                loc
            };
            plan.segments.push(PlannedSegment::Chunk(loc, sha));
        }
    }
    packs.finish_current()?;
    plan.packs = packs.done;
    for (_, f) in &plan.packs {
        f.as_file().sync_all()?;
    }
    Ok(plan)
}

impl DedupStore {
    /// Open the store and rebuild the chunk index from the live manifests.
    pub async fn open(
        blob: Arc<dyn BlobStore>,
        spool_dir: PathBuf,
        metrics: Arc<Metrics>,
    ) -> Result<Self, DedupError> {
        std::fs::create_dir_all(&spool_dir)?;
        let this = Self {
            blob,
            index: std::sync::RwLock::new(HashMap::new()),
            spool_dir,
            metrics,
            gc_lock: tokio::sync::RwLock::new(()),
            recent_reads: Mutex::new(HashMap::new()),
            condemned: tokio::sync::Mutex::new((None, Arc::new(HashSet::new()))),
            verified: Mutex::new(HashMap::new()),
            read_ahead: Arc::new(tokio::sync::Semaphore::new(READ_AHEAD_BUDGET)),
        };
        this.reload_index().await?;
        Ok(this)
    }

    #[must_use]
    pub fn blob(&self) -> &Arc<dyn BlobStore> {
        &self.blob
    }

    #[must_use]
    pub fn spool_dir(&self) -> &Path {
        &self.spool_dir
    }

    /// Only chunks referenced by a live manifest are dedup candidates, so the index can be rebuilt
    /// from manifests alone (no separate pack index objects to keep consistent).
    pub async fn reload_index(&self) -> Result<(), DedupError> {
        let mut fresh = HashMap::new();
        for info in self.blob.list("manifests/").await? {
            let Some(m) = self.load_manifest_at(&info.key).await? else {
                continue;
            };
            let packs: Vec<Arc<str>> = m
                .header
                .packs
                .iter()
                .map(|p| Arc::from(p.as_str()))
                .collect();
            for seg in &m.segments {
                if let Segment::Chunk(c) = seg {
                    fresh.insert(
                        c.sha256,
                        Loc {
                            pack: packs[c.pack as usize].clone(),
                            offset: c.offset,
                            len: c.len,
                        },
                    );
                }
            }
        }
        *self.index.write().expect("index lock") = fresh;
        Ok(())
    }

    async fn load_manifest_at(&self, mkey: &str) -> Result<Option<ManifestV1>, DedupError> {
        let bytes = match self.blob.get(mkey).await {
            Ok(b) => b,
            Err(StoreError::NotFound(_)) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        ManifestV1::decode(&bytes)
            .map(Some)
            .map_err(|source| DedupError::Manifest {
                key: mkey.to_owned(),
                source,
            })
    }

    /// The current manifest of a key, if any.
    pub async fn manifest(
        &self,
        bucket: &str,
        key: &str,
    ) -> Result<Option<Arc<ManifestV1>>, DedupError> {
        let m = self.load_manifest_at(&manifest_key(bucket, key)).await?;
        // A hash collision on the manifest name would show up as a different key inside.
        Ok(
            m.filter(|m| m.header.bucket == bucket && m.header.key == key)
                .map(Arc::new),
        )
    }

    /// Chunk a fully received, verified body from `spool` and publish it: packs first, manifest last.
    pub async fn ingest(
        &self,
        spool: &Path,
        size: u64,
        obj: NewObject,
    ) -> Result<ManifestV1, DedupError> {
        let _gc_guard = self.gc_lock.read().await;
        let plan = loop {
            let (spool, spool_dir) = (spool.to_owned(), self.spool_dir.clone());
            let condemned = self.condemned_packs().await?;
            let index_snapshot = self.index_reader(condemned);
            let plan = tokio::task::spawn_blocking(move || {
                plan_chunks(&spool, size, &spool_dir, &*index_snapshot)
            })
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))??;
            // Another process's GC may have deleted packs this index still points at: never publish
            // a manifest over a missing pack. Forgetting them makes the second plan store afresh.
            let missing = self.missing_reused_packs(&plan).await?;
            if missing.is_empty() {
                break plan;
            }
            tracing::warn!(
                packs = missing.len(),
                "reused packs are gone from the backend (deleted by another process's gc); re-chunking"
            );
            self.index
                .write()
                .expect("index lock")
                .retain(|_, loc| !missing.contains(&loc.pack));
        };
        for (name, file) in &plan.packs {
            self.blob
                .put_file(name, file.path())
                .await
                .inspect_err(|_| Metrics::add(&self.metrics.backend_errors, 1))?;
        }
        Metrics::add(&self.metrics.chunk_hits, plan.hits);
        Metrics::add(&self.metrics.chunk_misses, plan.misses);
        Metrics::add(&self.metrics.dedup_bytes, plan.dedup_bytes);
        Metrics::add(&self.metrics.stored_bytes_in, plan.stored_bytes);

        let mut pack_names: Vec<String> = Vec::new();
        let mut pack_ids: HashMap<Arc<str>, u32> = HashMap::new();
        let segments = plan
            .segments
            .into_iter()
            .map(|s| match s {
                PlannedSegment::Inline(b) => Segment::Inline(b),
                PlannedSegment::Chunk(loc, sha256) => {
                    let pack = *pack_ids.entry(loc.pack.clone()).or_insert_with(|| {
                        pack_names.push(loc.pack.to_string());
                        u32::try_from(pack_names.len() - 1).expect("fewer than 4G packs")
                    });
                    Segment::Chunk(ChunkRef {
                        pack,
                        offset: loc.offset,
                        len: loc.len,
                        sha256,
                    })
                }
            })
            .collect();
        let manifest = ManifestV1 {
            header: ObjectHeader {
                bucket: obj.bucket,
                key: obj.key,
                size,
                etag: obj.etag,
                last_modified: unix_secs(SystemTime::now()),
                content_type: obj.content_type,
                metadata: obj.metadata,
                packs: pack_names,
            },
            segments,
        };
        let mkey = manifest_key(&manifest.header.bucket, &manifest.header.key);
        self.blob
            .put_bytes(&mkey, Bytes::from(manifest.encode()))
            .await
            .inspect_err(|_| Metrics::add(&self.metrics.backend_errors, 1))?;
        let mut index = self.index.write().expect("index lock");
        for (sha, loc) in plan.new_chunks {
            index.entry(sha).or_insert(loc);
        }
        Ok(manifest)
    }

    #[allow(clippy::type_complexity)] // a one-off closure type
    fn index_reader(
        &self,
        condemned: Arc<HashSet<String>>,
    ) -> Box<dyn Fn(&[u8; 32]) -> Option<Loc> + Send> {
        // A snapshot keeps the blocking chunker off the lock; chunks added meanwhile are only a missed
        // dedup opportunity, never an error.
        let snapshot: HashMap<[u8; 32], Loc> = self.index.read().expect("index lock").clone();
        Box::new(move |sha| {
            snapshot
                .get(sha)
                .filter(|loc| !condemned.contains(&*loc.pack))
                .cloned()
        })
    }

    /// Packs an ingest plan reuses that are not (recently verified to be) in the backend.
    async fn missing_reused_packs(&self, plan: &Plan) -> Result<HashSet<Arc<str>>, DedupError> {
        let new: HashSet<&Arc<str>> = plan.packs.iter().map(|(n, _)| n).collect();
        let reused: HashSet<Arc<str>> = plan
            .segments
            .iter()
            .filter_map(|s| match s {
                PlannedSegment::Chunk(loc, _) if !new.contains(&loc.pack) => Some(loc.pack.clone()),
                _ => None,
            })
            .collect();
        let mut missing = HashSet::new();
        for pack in reused {
            let fresh = self
                .verified
                .lock()
                .expect("verified lock")
                .get(&pack)
                .is_some_and(|t| t.elapsed() < CONDEMNED_REFRESH);
            if fresh {
                continue;
            }
            if self.blob.head(&pack).await?.is_some() {
                let mut verified = self.verified.lock().expect("verified lock");
                if verified.len() > 100_000 {
                    verified.retain(|_, t| t.elapsed() < CONDEMNED_REFRESH);
                }
                verified.insert(pack, Instant::now());
            } else {
                missing.insert(pack);
            }
        }
        Ok(missing)
    }

    /// The packs condemned by any GC, re-listed when the cached list is older than
    /// `CONDEMNED_REFRESH`.
    async fn condemned_packs(&self) -> Result<Arc<HashSet<String>>, DedupError> {
        let mut slot = self.condemned.lock().await;
        if slot.0.is_some_and(|at| at.elapsed() < CONDEMNED_REFRESH) {
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

    /// Stream bytes `start..end` of a manifest's object. A corrupt chunk ends the stream with an error
    /// (the connection is cut short), so no wrong byte is ever presented as a complete body.
    pub fn read(
        self: &Arc<Self>,
        m: Arc<ManifestV1>,
        start: u64,
        end: u64,
    ) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
        let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(2);
        let this = Arc::clone(self);
        tokio::spawn(async move {
            if let Err(e) = this.pump(&m, start, end, &tx).await {
                tracing::error!(bucket = %m.header.bucket, key = %m.header.key, error = %e, "aborting object read");
                let _ = tx.send(Err(std::io::Error::other(e.to_string()))).await;
            }
        });
        futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        })
    }

    /// Sends the window `start..end`: inline segments as they are, chunks fetched in groups (one
    /// backend range read per run of neighbouring chunks of a pack) and verified. Each group is
    /// fetched and verified (SHA-256 on a blocking thread) by its own task, up to `READ_AHEAD`
    /// groups at once, so the backend's latency and the hashing overlap with the client's download;
    /// a read holds at most `READ_AHEAD` groups of `READ_SPAN_MAX` bytes, and all reads together
    /// at most one group each plus `READ_AHEAD_BUDGET`.
    async fn pump(
        &self,
        m: &ManifestV1,
        start: u64,
        end: u64,
        tx: &mpsc::Sender<Result<Bytes, std::io::Error>>,
    ) -> Result<(), DedupError> {
        let mut items = plan_read(m, start, end).into_iter();
        let mut queue = ReadQueue::default();
        loop {
            while queue.fetches < READ_AHEAD {
                // The first group needs no permit (every read progresses); read-ahead does.
                let permit = if queue.fetches == 0 {
                    None
                } else {
                    match self.read_ahead.clone().try_acquire_owned() {
                        Ok(p) => Some(p),
                        Err(_) => break,
                    }
                };
                match items.next() {
                    Some(ReadItem::Inline(b)) => queue.items.push_back(Ahead::Ready(vec![b])),
                    Some(ReadItem::Group(g)) => {
                        queue.fetches += 1;
                        queue.items.push_back(Ahead::Fetch(
                            tokio::spawn(fetch_group(self.blob.clone(), self.metrics.clone(), g)),
                            permit,
                        ));
                    }
                    None => break,
                }
            }
            let (parts, _permit) = match queue.items.pop_front() {
                None => return Ok(()),
                Some(Ahead::Ready(parts)) => (parts, None),
                Some(Ahead::Fetch(task, permit)) => {
                    queue.fetches -= 1;
                    let parts = task
                        .await
                        .map_err(|e| DedupError::Spool(std::io::Error::other(e)))??;
                    (parts, permit)
                }
            };
            for part in parts {
                if tx.send(Ok(part)).await.is_err() {
                    return Ok(()); // the client went away; the queue's drop stops the fetches
                }
            }
        }
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

    /// Mark live packs from manifests (after expiry and size cap), sweep unreferenced packs past grace.
    pub async fn gc(&self, opts: &GcOptions) -> Result<GcReport, DedupError> {
        let _guard = self.gc_lock.write().await;
        let mut report = GcReport::default();
        let markers: HashMap<String, SystemTime> = self
            .blob
            .list("reads/")
            .await?
            .into_iter()
            .map(|o| (o.key, o.modified))
            .collect();
        let mut live: Vec<(String, ManifestV1, SystemTime)> = Vec::new();
        for info in self.blob.list("manifests/").await? {
            let m = match self.load_manifest_at(&info.key).await {
                Ok(Some(m)) => m,
                Ok(None) => continue,
                Err(DedupError::Manifest { .. }) => {
                    return Err(DedupError::UnreadableManifest(info.key));
                }
                Err(e) => return Err(e),
            };
            let written = SystemTime::UNIX_EPOCH + Duration::from_secs(m.header.last_modified);
            let last_used = markers
                .get(&read_marker_key(&info.key))
                .copied()
                .map_or(written, |r| r.max(written));
            live.push((info.key, m, last_used));
        }
        // Most recently used first; expire and cap from the tail.
        live.sort_by_key(|e| std::cmp::Reverse(e.2));
        let mut logical = 0u64;
        let mut keep = Vec::new();
        for (mkey, m, last_used) in live {
            let too_old = opts
                .expire_unread
                .is_some_and(|max| opts.now.duration_since(last_used).unwrap_or_default() > max);
            let over_cap = opts
                .max_logical_bytes
                .is_some_and(|cap| logical + m.header.size > cap);
            if too_old || over_cap {
                tracing::info!(bucket = %m.header.bucket, key = %m.header.key, too_old, over_cap, "expiring cache key");
                self.blob.delete(&mkey).await?;
                self.blob.delete(&read_marker_key(&mkey)).await?;
                report.manifests_expired += 1;
            } else {
                logical += m.header.size;
                keep.push(m);
            }
        }
        report.manifests_live = keep.len();
        let referenced: HashSet<&str> = keep
            .iter()
            .flat_map(|m| m.header.packs.iter().map(String::as_str))
            .collect();
        // Two phases, so that several processes (replicas, the CLI) can share a backend: an
        // unreferenced pack past grace is first condemned (a tombstone object), and deleted by a later
        // run only if it is still unreferenced once the tombstone is older than grace. Ingests stop
        // reusing chunks of condemned packs within CONDEMNED_REFRESH, so a manifest written after the
        // mark phase of the deleting run can only reference the pack if its upload took longer than
        // grace - CONDEMNED_REFRESH; such manifests written earlier are seen and rescue the pack.
        let tombstones: HashMap<String, SystemTime> = self
            .blob
            .list("condemned/")
            .await?
            .into_iter()
            .map(|o| {
                (
                    format!("packs/{}", o.key.trim_start_matches("condemned/")),
                    o.modified,
                )
            })
            .collect();
        let mut seen: HashSet<String> = HashSet::new();
        for pack in self.blob.list("packs/").await? {
            seen.insert(pack.key.clone());
            let tombstone = tombstones.get(&pack.key);
            if referenced.contains(pack.key.as_str()) {
                if tombstone.is_some() {
                    self.blob.delete(&tombstone_key(&pack.key)).await?;
                    report.packs_rescued += 1;
                }
                report.packs_kept += 1;
                continue;
            }
            let age = opts.now.duration_since(pack.modified).unwrap_or_default();
            match tombstone {
                _ if age < opts.grace => report.packs_kept += 1,
                None => {
                    self.blob
                        .put_bytes(&tombstone_key(&pack.key), Bytes::new())
                        .await?;
                    report.packs_condemned += 1;
                    report.packs_kept += 1;
                }
                Some(at) if opts.now.duration_since(*at).unwrap_or_default() >= opts.grace => {
                    self.blob.delete(&pack.key).await?;
                    self.blob.delete(&tombstone_key(&pack.key)).await?;
                    report.packs_deleted += 1;
                    report.bytes_deleted += pack.size;
                }
                Some(_) => report.packs_kept += 1,
            }
        }
        // Tombstones of packs that are gone (deleted by a run that crashed before this cleanup).
        for pack in tombstones.keys().filter(|p| !seen.contains(*p)) {
            self.blob.delete(&tombstone_key(pack)).await?;
        }
        // This process stops reusing what it just condemned at once.
        *self.condemned.lock().await = (None, Arc::new(HashSet::new()));
        let stale = opts
            .now
            .checked_sub(opts.grace)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let spool_dir = self.spool_dir.clone();
        report.temp_files_deleted +=
            tokio::task::spawn_blocking(move || sweep_stale_files(&spool_dir, stale))
                .await
                .map_err(|e| std::io::Error::other(e.to_string()))??;
        report.temp_files_deleted += self.blob.sweep_temp(stale).await?;
        // Forget chunks of expired keys too: they may be swept by a later run.
        let mut fresh = HashMap::new();
        for m in &keep {
            for seg in &m.segments {
                if let Segment::Chunk(c) = seg {
                    let pack = &m.header.packs[c.pack as usize];
                    fresh.insert(
                        c.sha256,
                        Loc {
                            pack: Arc::from(pack.as_str()),
                            offset: c.offset,
                            len: c.len,
                        },
                    );
                }
            }
        }
        *self.index.write().expect("index lock") = fresh;
        Ok(report)
    }

    /// Logical vs stored bytes.
    pub async fn stats(&self) -> Result<Stats, DedupError> {
        let mut st = Stats::default();
        for info in self.blob.list("manifests/").await? {
            st.manifest_bytes += info.size;
            if let Some(m) = self.load_manifest_at(&info.key).await? {
                st.keys += 1;
                st.logical_bytes += m.header.size;
            }
        }
        for pack in self.blob.list("packs/").await? {
            st.packs += 1;
            st.pack_bytes += pack.size;
        }
        st.stored_bytes = st.pack_bytes + st.manifest_bytes;
        #[allow(clippy::cast_precision_loss)] // a ratio for humans
        if st.stored_bytes > 0 {
            st.dedup_ratio = st.logical_bytes as f64 / st.stored_bytes as f64;
        }
        Ok(st)
    }
}

/// Delete regular files in `dir` last modified before `stale` (files of live uploads are written
/// continuously, so only leftovers of crashed ones are that old). Returns how many were deleted.
pub fn sweep_stale_files(dir: &Path, stale: SystemTime) -> std::io::Result<usize> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut n = 0;
    for entry in entries {
        let entry = entry?;
        let meta = entry.metadata()?;
        if meta.is_file() && meta.modified()? < stale {
            match std::fs::remove_file(entry.path()) {
                Ok(()) => n += 1,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(n)
}

/// The part of a segment at `pos..pos+len` that falls inside `start..end`, as offsets into the segment.
/// Groups in flight per read: the one being sent and up to three more, which keeps a read from
/// one backend close to a direct read (P3). Groups beyond the first take a permit from
/// `READ_AHEAD_BUDGET`, so many concurrent reads cannot hold more than that many extra groups.
const READ_AHEAD: usize = 4;
/// Extra in-flight groups across all reads (× `READ_SPAN_MAX` = 256 MiB at most).
const READ_AHEAD_BUDGET: usize = 32;

/// One step of a read: bytes from the manifest, or a backend range read of chunks.
enum ReadItem {
    Inline(Bytes),
    Group(ReadGroup),
}

/// One backend range read and the chunks in it that the window needs.
struct ReadGroup {
    pack: String,
    offset: u64,
    len: u64,
    chunks: Vec<WantedChunk>,
}

/// A chunk of a group the window needs.
struct WantedChunk {
    /// Offset in the group's read.
    rel: usize,
    len: usize,
    sha256: [u8; 32],
    /// The part of the chunk inside the window.
    window: (usize, usize),
}

/// The reads that produce bytes `start..end` of `m`, in order.
#[allow(clippy::many_single_char_names)] // offsets a/z/i/j read like the maths they are
fn plan_read(m: &ManifestV1, start: u64, end: u64) -> Vec<ReadItem> {
    let segs = &m.segments;
    let mut out = Vec::new();
    let mut pos = 0u64;
    let mut i = 0;
    while i < segs.len() && pos < end {
        let seg_len = segs[i].len();
        if pos + seg_len <= start {
            pos += seg_len;
            i += 1;
            continue;
        }
        match &segs[i] {
            Segment::Inline(b) => {
                let (a, z) = window(pos, seg_len, start, end);
                out.push(ReadItem::Inline(Bytes::copy_from_slice(&b[a..z])));
                pos += seg_len;
                i += 1;
            }
            Segment::Chunk(first) => {
                // Group following chunks of the same pack into one backend read.
                let mut j = i + 1;
                let mut group_end_off = first.offset + u64::from(first.len);
                let mut group_pos_end = pos + seg_len;
                while j < segs.len() && group_pos_end < end {
                    let Segment::Chunk(next) = &segs[j] else {
                        break;
                    };
                    let next_end = next.offset + u64::from(next.len);
                    if next.pack != first.pack
                        || next.offset < group_end_off
                        || next.offset - group_end_off > READ_GAP_MAX
                        || next_end - first.offset > READ_SPAN_MAX
                    {
                        break;
                    }
                    group_end_off = next_end;
                    group_pos_end += u64::from(next.len);
                    j += 1;
                }
                let mut chunks = Vec::new();
                for seg in &segs[i..j] {
                    let Segment::Chunk(c) = seg else {
                        unreachable!("group holds chunks only")
                    };
                    let seg_len = u64::from(c.len);
                    if pos + seg_len > start && pos < end {
                        let rel = usize::try_from(c.offset - first.offset)
                            .expect("bounded by READ_SPAN_MAX");
                        chunks.push(WantedChunk {
                            rel,
                            len: c.len as usize,
                            sha256: c.sha256,
                            window: window(pos, seg_len, start, end),
                        });
                    }
                    pos += seg_len;
                }
                out.push(ReadItem::Group(ReadGroup {
                    pack: m.header.packs[first.pack as usize].clone(),
                    offset: first.offset,
                    len: group_end_off - first.offset,
                    chunks,
                }));
                i = j;
            }
        }
    }
    out
}

/// Reads one group and verifies every chunk the window needs (SHA-256 on a blocking thread);
/// returns the window's part of each of those chunks, in order (slices of one buffer, no copy).
async fn fetch_group(
    blob: Arc<dyn BlobStore>,
    metrics: Arc<Metrics>,
    g: ReadGroup,
) -> Result<Vec<Bytes>, DedupError> {
    let data = blob
        .get_range(&g.pack, g.offset, g.len)
        .await
        .inspect_err(|_| Metrics::add(&metrics.backend_errors, 1))?;
    tokio::task::spawn_blocking(move || {
        let mut out = Vec::with_capacity(g.chunks.len());
        for c in &g.chunks {
            let intact = data
                .get(c.rel..c.rel + c.len)
                .is_some_and(|bytes| <[u8; 32]>::from(Sha256::digest(bytes)) == c.sha256);
            if !intact {
                Metrics::add(&metrics.corrupt_chunks, 1);
                return Err(DedupError::Corrupt {
                    pack: g.pack.clone(),
                    sha: hex::encode(c.sha256),
                });
            }
            let (a, z) = c.window;
            out.push(data.slice(c.rel + a..c.rel + z));
        }
        Ok(out)
    })
    .await
    .map_err(|e| DedupError::Spool(std::io::Error::other(e)))?
}

/// What a read sends next: bytes at hand, or a group being fetched.
enum Ahead {
    Ready(Vec<Bytes>),
    /// The permit (for read-ahead groups) is held until the group's bytes are sent.
    Fetch(
        tokio::task::JoinHandle<Result<Vec<Bytes>, DedupError>>,
        Option<tokio::sync::OwnedSemaphorePermit>,
    ),
}

/// The read's queue; dropping it (client gone, error) stops the fetches still running.
#[derive(Default)]
struct ReadQueue {
    items: std::collections::VecDeque<Ahead>,
    fetches: usize,
}

impl Drop for ReadQueue {
    fn drop(&mut self) {
        for item in &self.items {
            if let Ahead::Fetch(task, _) = item {
                task.abort();
            }
        }
    }
}

fn window(pos: u64, len: u64, start: u64, end: u64) -> (usize, usize) {
    let a = start.saturating_sub(pos).min(len);
    let z = (end - pos).min(len);
    (
        usize::try_from(a).expect("segment offsets fit usize"),
        usize::try_from(z).expect("segment offsets fit usize"),
    )
}

#[must_use]
pub fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
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
        }
    }

    async fn put(s: &DedupStore, dir: &Path, key: &str, body: &[u8]) -> ManifestV1 {
        let p = dir.join(format!("body-{}", rand::random::<u64>()));
        std::fs::write(&p, body).unwrap();
        s.ingest(&p, body.len() as u64, obj(key)).await.unwrap()
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
            .acquire_many_owned(u32::try_from(READ_AHEAD_BUDGET).unwrap())
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
        while s.read_ahead.available_permits() < READ_AHEAD_BUDGET {
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
        let pack = dir.path().join("data").join(&m.header.packs[0]);
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

    /// Two processes on one backend (replicas, or the server and the `gc` CronJob): one's GC never
    /// leaves the other publishing manifests over deleted or condemned packs.
    #[tokio::test]
    async fn gc_in_another_process_never_breaks_this_ones_manifests() {
        let dir = tempfile::tempdir().unwrap();
        let open = |spool: &str| {
            let blob = Arc::new(DiskStore::open(dir.path().join("data")).unwrap());
            DedupStore::open(blob, dir.path().join(spool), Arc::new(Metrics::default()))
        };
        let a = Arc::new(open("spool-a").await.unwrap());
        let b = open("spool-b").await.unwrap();
        let (old, new) = (noise(1 << 20, 5), noise(1 << 20, 6));
        put(&a, dir.path(), "k", &old).await;
        put(&a, dir.path(), "k", &new).await; // `old`'s pack is unreferenced, still in a's index
        let gc = GcOptions {
            grace: Duration::from_mins(1),
            expire_unread: None,
            max_logical_bytes: None,
            now: SystemTime::now() + Duration::from_mins(2),
        };
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
        put(&a, dir.path(), "k4", &gone).await;
        assert_eq!(get(&a, "k4", 0, 1 << 20).await.unwrap(), gone);
    }
}
