//! Streaming ingest: the body is classified (zip structure vs data), chunked, hashed and deduplicated
//! while it arrives, and new chunks are packed and uploaded while the body is still arriving.
//!
//! ```text
//!  write(Bytes) ─► [boundary stage] zip scan + FastCDC ─► [hash stage] SHA-256, index lookup,
//!                                                          pack files, segment stream
//!                                                                │ full packs
//!                                                                ▼
//!                                   [uploader] up to PACKS_IN_FLIGHT per ingest, PACK_UPLOADS in all
//! ```
//! The two CPU stages run batch by batch on the blocking pool, in parallel with each other; an
//! upload holds a thread only while it has bytes to process, never while its client is silent.
//! Every queue is bounded, so a slow backend slows the client (TCP backpressure) instead of growing
//! memory. Memory per ingest: body queue ≤ 8 frames, a batch ≤ 1 MiB of body, chunker ≤ 256 KiB
//! of data (or one zip structure run up to `INLINE_RUN_MAX`), ≤ 2 queued batches of pieces, pack
//! writer 1 MiB and segment writer 64 KiB buffers: about 12 MiB at worst, 2 MiB typical, a few KiB
//! for an upload whose client dribbles. Packs are spooled to local files of at most `PACK_TARGET`
//! (smaller when new chunks arrive slowly: `PACK_EARLY_AGE`),
//! at most `PACKS_IN_FLIGHT + 2` per ingest. Nothing is published here: `finish` returns a `Staged`
//! body that `DedupStore::publish` turns into a manifest after the caller verified its digests;
//! packs of an ingest that is dropped or fails stay unreferenced and GC reclaims them.

use std::collections::{HashMap, HashSet};
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;

use super::chunker::{Piece, RunChunker};
use super::index::{
    ChunkIndex, IndexReader, Loc, encode_pack_index, new_pack_name, pack_index_key, with_offsets,
};
use super::manifest::{ChunkRef, SegmentWriter};
use super::zipscan::ZipScanner;
use super::{DedupError, DedupStore, Inflight, InflightGuard};
use crate::metrics::Metrics;
use crate::store::BlobStore;

/// New chunks are appended to a pack until it reaches this size: 16 MiB keeps a GiB of new data at
/// 128 pack PUTs + 128 index PUTs, far under the 1,100 requests/GiB budget, while a 64 MiB body
/// already uploads four packs in parallel.
pub const PACK_TARGET: u64 = 16 << 20;
/// A pack that has held new chunks this long is sealed and uploaded once it has
/// `PACK_EARLY_MIN` bytes, without waiting to fill: new data that arrives thinly (a body mostly
/// known) crosses the backend link while the body still arrives, instead of as one pack at its
/// end. The floor keeps the request budget: at most 1 GiB ÷ 4 MiB = 256 packs, 512 requests per
/// GiB with their index objects.
pub const PACK_EARLY_AGE: Duration = Duration::from_millis(200);
/// The smallest pack sealed for its age (see `PACK_EARLY_AGE`).
pub const PACK_EARLY_MIN: u64 = 4 << 20;
/// Packs one ingest uploads at once (parallel streams are what make a remote backend fast).
pub const PACKS_IN_FLIGHT: usize = 4;
/// Pack uploads in flight across all ingests of this process.
pub const PACK_UPLOADS: usize = 16;
/// Body frames queued for the boundary stage (and the most it cuts in one batch).
const BODY_QUEUE: usize = 8;
/// Body bytes the boundary stage cuts in one batch, at most (plus one frame).
const BATCH_BYTES: usize = 1 << 20;
/// Batches of pieces queued for the hash stage.
const PIECE_BATCHES: usize = 2;

/// A body chunked, its new packs uploaded, its segment stream spooled: ready to publish.
#[derive(Debug)]
pub struct Staged {
    pub(super) size: u64,
    pub(super) packs: Vec<String>,
    /// Packs this body reuses that it did not upload itself.
    pub(super) reused: HashSet<Arc<str>>,
    pub(super) segments: tempfile::NamedTempFile,
    pub(super) segment_count: u64,
    /// Keeps this body's packs from this process's GC until it is published or dropped.
    pub(super) inflight: InflightGuard,
    pub stats: IngestStats,
}

/// What an ingest found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct IngestStats {
    pub chunks_reused: u64,
    pub chunks_new: u64,
    pub bytes_reused: u64,
    pub bytes_new: u64,
    pub packs_uploaded: u64,
}

/// A running ingest; see the module docs. Dropping it cancels the uploads still running.
pub struct Ingest {
    tx: Option<mpsc::Sender<Bytes>>,
    task: Option<tokio::task::JoinHandle<Result<Staged, DedupError>>>,
    /// Set when the ingest is dropped unfinished: its stages stop at their next batch (dropping
    /// their spool files) instead of chunking what was queued.
    cancelled: Arc<AtomicBool>,
}

impl Drop for Ingest {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            self.cancelled.store(true, Ordering::Relaxed);
            t.abort();
        }
    }
}

impl Ingest {
    /// Hand the next body bytes over (waits while the pipeline is full).
    pub async fn write(&mut self, data: Bytes) -> Result<(), DedupError> {
        if data.is_empty() {
            return Ok(());
        }
        let tx = self.tx.as_ref().expect("write after finish");
        if tx.send(data).await.is_err() {
            // The pipeline stopped early: report why.
            self.tx = None;
            return Err(self.join().await.err().unwrap_or(DedupError::Pipeline(
                "ingest pipeline ended before the body did",
            )));
        }
        Ok(())
    }

    /// The body is complete: wait for the chunking and the uploads.
    pub async fn finish(mut self) -> Result<Staged, DedupError> {
        self.tx = None;
        self.join().await
    }

    async fn join(&mut self) -> Result<Staged, DedupError> {
        let task = self.task.take().expect("joined once");
        task.await.map_err(|e| {
            DedupError::Pipeline(if e.is_panic() {
                "ingest panicked"
            } else {
                "ingest cancelled"
            })
        })?
    }
}

/// A full pack on its way to the backend.
struct FinishedPack {
    name: Arc<str>,
    file: tempfile::NamedTempFile,
    entries: Vec<([u8; 32], u32)>,
}

struct OpenPack {
    name: Arc<str>,
    index: u32,
    file: BufWriter<tempfile::NamedTempFile>,
    size: u64,
    entries: Vec<([u8; 32], u32)>,
    /// When its first chunk arrived.
    opened: Instant,
}

impl OpenPack {
    /// Full, or old enough and big enough to go now (`PACK_EARLY_AGE`).
    fn ready(&self) -> bool {
        self.size >= PACK_TARGET
            || (self.size >= PACK_EARLY_MIN && self.opened.elapsed() >= PACK_EARLY_AGE)
    }
}

/// Everything the hash stage needs, moved into it.
struct HashJob {
    index: Arc<ChunkIndex>,
    condemned: Arc<HashSet<String>>,
    spool_dir: PathBuf,
    inflight: Inflight,
    cancelled: Arc<AtomicBool>,
}

struct HashOutcome {
    size: u64,
    packs: Vec<String>,
    reused: HashSet<Arc<str>>,
    segments: tempfile::NamedTempFile,
    segment_count: u64,
    inflight: InflightGuard,
    stats: IngestStats,
}

impl DedupStore {
    /// Start ingesting a body.
    pub async fn begin_ingest(self: &Arc<Self>) -> Result<Ingest, DedupError> {
        let condemned = self.condemned_packs().await?;
        let (tx, body_rx) = mpsc::channel::<Bytes>(BODY_QUEUE);
        let cancelled = Arc::new(AtomicBool::new(false));
        let job = HashJob {
            index: self.index.clone(),
            condemned,
            spool_dir: self.spool_dir.clone(),
            inflight: self.inflight.clone(),
            cancelled: cancelled.clone(),
        };
        let task = tokio::spawn(run_pipeline(
            body_rx,
            job,
            self.blob.clone(),
            self.pack_uploads.clone(),
            self.metrics.clone(),
        ));
        Ok(Ingest {
            tx: Some(tx),
            task: Some(task),
            cancelled,
        })
    }
}

/// The first error that is a cause, not a consequence (a closed queue) of another stage's failure.
fn first_cause(results: Vec<Result<(), DedupError>>) -> Result<(), DedupError> {
    let mut consequence = None;
    for r in results {
        match r {
            Ok(()) => {}
            Err(e @ DedupError::Pipeline(_)) => consequence = consequence.or(Some(e)),
            Err(e) => return Err(e),
        }
    }
    consequence.map_or(Ok(()), Err)
}

async fn run_pipeline(
    body_rx: mpsc::Receiver<Bytes>,
    job: HashJob,
    blob: Arc<dyn BlobStore>,
    global: Arc<Semaphore>,
    metrics: Arc<Metrics>,
) -> Result<Staged, DedupError> {
    let (piece_tx, piece_rx) = mpsc::channel::<Vec<Piece>>(PIECE_BATCHES);
    let (pack_tx, pack_rx) = mpsc::channel::<FinishedPack>(1);
    let index = job.index.clone();
    let cancelled = job.cancelled.clone();
    let (boundary, hashed, uploaded) = tokio::join!(
        boundary_stage(body_rx, piece_tx, cancelled),
        hash_stage(piece_rx, pack_tx, job),
        upload_loop(pack_rx, blob, global, index, metrics),
    );
    let (hashed, hash_result) = match hashed {
        Ok(h) => (Some(h), Ok(())),
        Err(e) => (None, Err(e)),
    };
    let (packs_uploaded, upload_result) = match uploaded {
        Ok(n) => (n, Ok(())),
        Err(e) => (0, Err(e)),
    };
    first_cause(vec![upload_result, hash_result, boundary])?;
    let h = hashed.expect("no error, so the hasher finished");
    let mut stats = h.stats;
    stats.packs_uploaded = packs_uploaded;
    Ok(Staged {
        size: h.size,
        packs: h.packs,
        reused: h.reused,
        segments: h.segments,
        segment_count: h.segment_count,
        inflight: h.inflight,
        stats,
    })
}

/// Runs `work` on the blocking pool. Each stage hands its state to the pool only while it has
/// input to process, so an upload that dribbles holds no thread between its bytes: 500 slow
/// uploads once held 1,000 pool threads (tokio's limit is 512) and every other upload queued
/// behind them (issue 16 soak).
async fn on_pool<T: Send + 'static>(
    what: &'static str,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, DedupError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|_| DedupError::Pipeline(what))
}

/// The boundary stage's state: zip classification and content-defined cuts.
struct Boundary {
    scanner: ZipScanner,
    chunker: RunChunker,
}

impl Boundary {
    /// Classify and cut `frames` (`end`: the body is complete), returning the pieces made.
    fn cut(&mut self, frames: &[Bytes], end: bool) -> Result<Vec<Piece>, DedupError> {
        let mut pieces = Vec::new();
        let mut send = |p: Piece| {
            pieces.push(p);
            Ok::<(), DedupError>(())
        };
        let chunker = &mut self.chunker;
        let mut emit = |kind, bytes: &[u8]| chunker.push(kind, bytes, &mut send);
        for data in frames {
            self.scanner.feed(data, &mut emit)?;
        }
        if end {
            self.scanner.finish(&mut emit)?;
            chunker.finish(&mut send)?;
        }
        Ok(pieces)
    }
}

/// Boundary stage: takes the frames queued so far as one batch (more under load, one when the
/// client is slow), cuts them on the blocking pool and passes the pieces on.
async fn boundary_stage(
    mut body_rx: mpsc::Receiver<Bytes>,
    piece_tx: mpsc::Sender<Vec<Piece>>,
    cancelled: Arc<AtomicBool>,
) -> Result<(), DedupError> {
    let mut state = Box::new(Boundary {
        scanner: ZipScanner::new(),
        chunker: RunChunker::new(),
    });
    let mut open = true;
    while open {
        let mut frames = Vec::with_capacity(BODY_QUEUE);
        match body_rx.recv().await {
            Some(f) => frames.push(f),
            None => open = false,
        }
        let mut bytes = frames.first().map_or(0, Bytes::len);
        while open && frames.len() < BODY_QUEUE && bytes < BATCH_BYTES {
            match body_rx.try_recv() {
                Ok(f) => {
                    bytes += f.len();
                    frames.push(f);
                }
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => open = false,
            }
        }
        if cancelled.load(Ordering::Relaxed) {
            return Err(DedupError::Pipeline("ingest cancelled"));
        }
        let end = !open;
        let (back, pieces) = on_pool("chunker panicked", move || {
            let pieces = state.cut(&frames, end);
            (state, pieces)
        })
        .await?;
        state = back;
        let pieces = pieces?;
        if !pieces.is_empty() && piece_tx.send(pieces).await.is_err() {
            return Err(DedupError::Pipeline("hash thread stopped"));
        }
    }
    Ok(())
}

/// The hash stage's state: SHA-256 per chunk, dedup decisions, the open pack and the segment
/// stream of one body.
struct Hasher {
    job: HashJob,
    reader: IndexReader,
    inflight: InflightGuard,
    seg: SegmentWriter<BufWriter<tempfile::NamedTempFile>>,
    local: HashMap<[u8; 32], (u32, u64, u32)>,
    packs: Vec<String>,
    pack_ids: HashMap<Arc<str>, u32>,
    reused: HashSet<Arc<str>>,
    current: Option<OpenPack>,
    stats: IngestStats,
}

impl Hasher {
    fn new(job: HashJob) -> Result<Self, DedupError> {
        let reader = job.index.reader()?;
        let mut inflight = InflightGuard::new(&job.inflight);
        let segment_file = tempfile::NamedTempFile::new_in(&job.spool_dir)?;
        inflight.hold(&Arc::from(segment_file.path().to_string_lossy()));
        // Segments are ~40 bytes per chunk: a small buffer, since slow uploads each hold one.
        let seg = SegmentWriter::new(BufWriter::with_capacity(64 << 10, segment_file));
        Ok(Self {
            job,
            reader,
            inflight,
            seg,
            local: HashMap::new(),
            packs: Vec::new(),
            pack_ids: HashMap::new(),
            reused: HashSet::new(),
            current: None,
            stats: IngestStats::default(),
        })
    }

    fn pack_id(&mut self, name: &Arc<str>) -> u32 {
        let packs = &mut self.packs;
        *self.pack_ids.entry(name.clone()).or_insert_with(|| {
            packs.push(name.to_string());
            u32::try_from(packs.len() - 1).expect("fewer than 4G packs")
        })
    }

    /// Hash and place `pieces`; returns the packs that filled up, ready to upload.
    fn absorb(&mut self, pieces: Vec<Piece>) -> Result<Vec<FinishedPack>, DedupError> {
        if self.job.cancelled.load(Ordering::Relaxed) {
            return Err(DedupError::Pipeline("ingest cancelled"));
        }
        let mut full = Vec::new();
        for piece in pieces {
            let chunk = match piece {
                Piece::Inline(b) => {
                    self.seg.inline(&b)?;
                    continue;
                }
                Piece::Chunk(c) => c,
            };
            let sha: [u8; 32] = Sha256::digest(&chunk).into();
            let len = u32::try_from(chunk.len()).expect("chunks are small");
            let (pack, offset) = if let Some(&(pack, offset, _)) = self.local.get(&sha) {
                self.stats.chunks_reused += 1;
                self.stats.bytes_reused += u64::from(len);
                (pack, offset)
            } else if let Some(loc) = self.known(&sha, len)? {
                self.stats.chunks_reused += 1;
                self.stats.bytes_reused += u64::from(len);
                let id = self.pack_id(&loc.pack);
                self.inflight.hold(&loc.pack);
                self.reused.insert(loc.pack);
                (id, loc.offset)
            } else {
                let at = self.append(&chunk, sha, len)?;
                if self.current.as_ref().is_some_and(OpenPack::ready) {
                    full.push(close_pack(self.current.take().expect("open"))?);
                }
                at
            };
            self.seg.chunk(&ChunkRef {
                pack,
                offset,
                len,
                sha256: sha,
            })?;
        }
        Ok(full)
    }

    /// Where another upload already stored this chunk, in a pack that may still be referenced.
    fn known(&self, sha: &[u8; 32], len: u32) -> Result<Option<Loc>, DedupError> {
        let loc = self.reader.get(sha).map_err(|e| {
            DedupError::Index(super::index::IndexError::Local {
                path: "chunk index".into(),
                source: e.into(),
            })
        })?;
        Ok(loc.filter(|l| {
            l.len == len
                && !self.job.condemned.contains(&*l.pack)
                && !self.job.index.is_dead(&l.pack)
        }))
    }

    /// Append a new chunk to the open pack (opening one if needed); its place.
    fn append(&mut self, chunk: &[u8], sha: [u8; 32], len: u32) -> Result<(u32, u64), DedupError> {
        if self.current.is_none() {
            let name: Arc<str> = new_pack_name(SystemTime::now()).into();
            self.inflight.hold(&name);
            let index = self.pack_id(&name);
            let file = tempfile::NamedTempFile::new_in(&self.job.spool_dir)?;
            self.inflight
                .hold(&Arc::from(file.path().to_string_lossy()));
            self.current = Some(OpenPack {
                name,
                index,
                file: BufWriter::with_capacity(1 << 20, file),
                size: 0,
                entries: Vec::new(),
                opened: Instant::now(),
            });
        }
        let p = self.current.as_mut().expect("just opened");
        p.file.write_all(chunk)?;
        let at = (p.index, p.size);
        p.size += u64::from(len);
        p.entries.push((sha, len));
        self.local.insert(sha, (at.0, at.1, len));
        self.stats.chunks_new += 1;
        self.stats.bytes_new += u64::from(len);
        Ok(at)
    }

    /// The body ended: the last (partial) pack and the outcome.
    fn finish(mut self) -> Result<(Option<FinishedPack>, HashOutcome), DedupError> {
        let last = self.current.take().map(close_pack).transpose()?;
        let (segment_count, size) = self.seg.counts();
        let segments = self
            .seg
            .finish()?
            .into_inner()
            .map_err(std::io::IntoInnerError::into_error)?;
        Ok((
            last,
            HashOutcome {
                size,
                packs: self.packs,
                reused: self.reused,
                segments,
                segment_count,
                inflight: self.inflight,
                stats: self.stats,
            },
        ))
    }
}

/// Hash stage: each batch of pieces is hashed on the blocking pool; full packs go to the uploader
/// (waiting while it is busy, which stops the batches and, through the queues, the client).
async fn hash_stage(
    mut piece_rx: mpsc::Receiver<Vec<Piece>>,
    pack_tx: mpsc::Sender<FinishedPack>,
    job: HashJob,
) -> Result<HashOutcome, DedupError> {
    let stopped = |_| DedupError::Pipeline("pack uploader stopped");
    let mut state = Box::new(on_pool("hasher panicked", move || Hasher::new(job)).await??);
    while let Some(pieces) = piece_rx.recv().await {
        let (back, full) = on_pool("hasher panicked", move || {
            let full = state.absorb(pieces);
            (state, full)
        })
        .await?;
        state = back;
        for pack in full? {
            pack_tx.send(pack).await.map_err(stopped)?;
        }
    }
    let (last, outcome) = on_pool("hasher panicked", move || state.finish()).await??;
    if let Some(pack) = last {
        pack_tx.send(pack).await.map_err(stopped)?;
    }
    Ok(outcome)
}

fn close_pack(p: OpenPack) -> Result<FinishedPack, DedupError> {
    let file = p
        .file
        .into_inner()
        .map_err(std::io::IntoInnerError::into_error)?;
    Ok(FinishedPack {
        name: p.name,
        file,
        entries: p.entries,
    })
}

/// Uploads packs as they fill, several at once; returns how many. The first failure stops the
/// ingest (dropping the queue makes the hash thread stop).
async fn upload_loop(
    mut pack_rx: mpsc::Receiver<FinishedPack>,
    blob: Arc<dyn BlobStore>,
    global: Arc<Semaphore>,
    index: Arc<ChunkIndex>,
    metrics: Arc<Metrics>,
) -> Result<u64, DedupError> {
    let mut uploads: JoinSet<Result<(), DedupError>> = JoinSet::new();
    let mut done = 0u64;
    loop {
        tokio::select! {
            // A failed upload ends the ingest at once, not after the body.
            Some(r) = uploads.join_next(), if !uploads.is_empty() => {
                r.map_err(|_| DedupError::Pipeline("pack upload panicked"))??;
                done += 1;
            }
            pack = pack_rx.recv(), if uploads.len() < PACKS_IN_FLIGHT => {
                let Some(pack) = pack else { break };
                let permit = global.clone().acquire_owned().await.expect("never closed");
                let (blob, index, metrics) = (blob.clone(), index.clone(), metrics.clone());
                uploads.spawn(async move {
                    let _permit = permit;
                    upload_pack(&*blob, &index, pack)
                        .await
                        .inspect_err(|_| Metrics::add(&metrics.backend_errors, 1))
                });
            }
        }
    }
    while let Some(r) = uploads.join_next().await {
        r.map_err(|_| DedupError::Pipeline("pack upload panicked"))??;
        done += 1;
    }
    Ok(done)
}

/// Pack, then its index object, then this replica's local index.
async fn upload_pack(
    blob: &dyn BlobStore,
    index: &Arc<ChunkIndex>,
    pack: FinishedPack,
) -> Result<(), DedupError> {
    blob.put_file(&pack.name, pack.file.path()).await?;
    blob.put_bytes(
        &pack_index_key(&pack.name),
        Bytes::from(encode_pack_index(&pack.entries)),
    )
    .await?;
    let (index, name, entries) = (index.clone(), pack.name.clone(), pack.entries);
    // The local index is a hint: a failure here costs dedup hits, never data.
    match tokio::task::spawn_blocking(move || {
        index.add_pack(&name, with_offsets(entries.into_iter()))
    })
    .await
    {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::warn!(pack = %pack.name, error = %e, "could not add a pack to the local chunk index");
        }
        Err(e) => {
            tracing::warn!(pack = %pack.name, error = %e, "could not add a pack to the local chunk index");
        }
    }
    Ok(())
}
