//! Reads: stream a manifest's segments (never all of them in memory), coalesce neighbouring chunks
//! and the inline zip structure between them into backend range reads of up to `READ_SPAN_MAX`,
//! fetch a bounded number of those ahead, and verify every chunk's SHA-256 before any byte of it is
//! sent. A 100 k-entry zip stored by one upload needs about size ÷ 8 MiB range reads.

use std::io::Read;
use std::sync::Arc;

use bytes::Bytes;
use futures::Stream;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use super::manifest::{Manifest, ManifestError, Segment, SegmentReader, SegmentSource};
use super::{DedupError, DedupStore};
use crate::metrics::Metrics;
use crate::store::BlobStore;

/// One backend range read covers at most this much.
const READ_SPAN_MAX: u64 = 8 << 20;
/// Unneeded bytes we accept reading between two wanted chunks of the same pack to save a request.
const READ_GAP_MAX: u64 = 256 << 10;
/// Parts (chunks and inline spans) per group: bounds a group's bookkeeping for tiny zip entries.
const GROUP_PARTS_MAX: usize = 8192;
/// Inline bytes carried by one group.
const GROUP_INLINE_MAX: usize = 4 << 20;
/// Groups in flight per read: the one being sent and up to seven more. Parallel range reads are
/// what make a remote backend fast (one stream is slow, P3w); groups beyond the first take a permit
/// from `READ_AHEAD_BUDGET`, so many concurrent reads cannot hold more than that many extra groups.
const READ_AHEAD: usize = 8;
/// Extra in-flight groups across all reads (× `READ_SPAN_MAX` = 256 MiB at most).
pub(super) const READ_AHEAD_BUDGET: usize = 32;
/// Planned items queued between the segment decoder and the sender.
const PLAN_QUEUE: usize = 2;
/// External segment streams are read from the backend in pieces of this size.
const BODY_READ: u64 = 1 << 20;

/// One step of a read: bytes from the manifest, or a backend range read.
enum ReadItem {
    Inline(Bytes),
    Group(ReadGroup),
}

/// One backend range read and, in order, what the window needs from it.
struct ReadGroup {
    pack: String,
    offset: u64,
    len: u64,
    parts: Vec<Part>,
    inline_bytes: usize,
}

enum Part {
    /// Inline bytes between chunks (already cut to the window).
    Inline(Bytes),
    Chunk {
        /// Offset in the group's read.
        rel: usize,
        len: usize,
        sha256: [u8; 32],
        /// The part of the chunk inside the window.
        window: (usize, usize),
    },
}

/// Reads a segment stream stored in its own object, a piece at a time (on a blocking thread).
struct BlobReader {
    blob: Arc<dyn BlobStore>,
    rt: tokio::runtime::Handle,
    key: String,
    pos: u64,
    size: Option<u64>,
    buf: Bytes,
}

impl Read for BlobReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.buf.is_empty() {
            let size = if let Some(s) = self.size {
                s
            } else {
                let info = self
                    .rt
                    .block_on(self.blob.head(&self.key))
                    .map_err(std::io::Error::other)?
                    .ok_or_else(|| {
                        std::io::Error::other(format!("segment object {} is missing", self.key))
                    })?;
                self.size = Some(info.size);
                info.size
            };
            if self.pos >= size {
                return Ok(0);
            }
            let n = BODY_READ.min(size - self.pos);
            self.buf = self
                .rt
                .block_on(self.blob.get_range(&self.key, self.pos, n))
                .map_err(std::io::Error::other)?;
            if self.buf.is_empty() {
                return Err(std::io::Error::other("segment object ended early"));
            }
            self.pos += self.buf.len() as u64;
        }
        let n = out.len().min(self.buf.len());
        out[..n].copy_from_slice(&self.buf[..n]);
        let _ = self.buf.split_to(n);
        Ok(n)
    }
}

type Segments = Box<dyn Iterator<Item = Result<Segment, ManifestError>> + Send>;

impl DedupStore {
    /// The segments of `m`, decoded as they are consumed (call on a blocking thread: an external
    /// segment stream is fetched from the backend as it is read).
    fn segments(&self, m: &Manifest) -> Segments {
        Metrics::add(&self.metrics.segment_streams, 1);
        match &m.segments {
            SegmentSource::Legacy(segs) => {
                let segs = segs.clone();
                Box::new((0..segs.len()).map(move |i| Ok(segs[i].clone())))
            }
            SegmentSource::Embedded(b) => Box::new(SegmentReader::new(
                std::io::Cursor::new(b.clone()),
                &m.header,
            )),
            SegmentSource::Chain(links) => {
                let rt = tokio::runtime::Handle::current();
                match rt.block_on(self.resolve_chain(&m.header, links)) {
                    Ok(raw) => Box::new(SegmentReader::raw(std::io::Cursor::new(raw), &m.header)),
                    Err(DedupError::Manifest { source, .. }) => {
                        Box::new(std::iter::once(Err(source)))
                    }
                    Err(_) => Box::new(std::iter::once(Err(ManifestError::Malformed(
                        "segment pack could not be read",
                    )))),
                }
            }
            SegmentSource::External(key) => Box::new(SegmentReader::new(
                BlobReader {
                    blob: self.blob.clone(),
                    rt: tokio::runtime::Handle::current(),
                    key: key.clone(),
                    pos: 0,
                    size: None,
                    buf: Bytes::new(),
                },
                &m.header,
            )),
        }
    }

    /// Every segment of `m` (tests and tools; memory grows with the segment count).
    pub async fn all_segments(
        self: &Arc<Self>,
        m: Arc<Manifest>,
    ) -> Result<Vec<Segment>, DedupError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let key = m.header.key.clone();
            this.segments(&m)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|source| DedupError::Manifest { key, source })
        })
        .await
        .map_err(|e| DedupError::Spool(std::io::Error::other(e)))?
    }

    /// Stream bytes `start..end` of a manifest's object. A corrupt chunk or segment stream ends the
    /// stream with an error (the connection is cut short), so no wrong byte is ever presented as a
    /// complete body.
    pub fn read(
        self: &Arc<Self>,
        m: Arc<Manifest>,
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

    /// Plans on a blocking thread (segment decoding), fetches groups ahead, sends in order.
    async fn pump(
        self: &Arc<Self>,
        m: &Arc<Manifest>,
        start: u64,
        end: u64,
        tx: &mpsc::Sender<Result<Bytes, std::io::Error>>,
    ) -> Result<(), DedupError> {
        let (plan_tx, mut plan_rx) = mpsc::channel::<Result<ReadItem, DedupError>>(PLAN_QUEUE);
        let (this, m2) = (self.clone(), m.clone());
        let planner = tokio::task::spawn_blocking(move || {
            let segs = this.segments(&m2);
            plan_read(segs, &m2, start, end, &plan_tx);
        });
        let _stop_planner = AbortOnDrop(planner);
        let mut queue = ReadQueue::default();
        let mut planned_all = false;
        loop {
            while queue.fetches < READ_AHEAD && !planned_all {
                // The first group needs no permit (every read progresses); read-ahead does.
                let permit = if queue.fetches == 0 {
                    None
                } else {
                    match self.read_ahead.clone().try_acquire_owned() {
                        Ok(p) => Some(p),
                        Err(_) => break,
                    }
                };
                // Waiting for the planner keeps the read-ahead full: planning is CPU (or one 1 MiB
                // read of a segment object) and far quicker than a group's fetch.
                let item = plan_rx.recv().await;
                match item {
                    None => planned_all = true,
                    Some(Err(e)) => return Err(e),
                    Some(Ok(ReadItem::Inline(b))) => queue.items.push_back(Ahead::Ready(vec![b])),
                    Some(Ok(ReadItem::Group(g))) => {
                        queue.fetches += 1;
                        queue.items.push_back(Ahead::Fetch(
                            tokio::spawn(fetch_group(self.blob.clone(), self.metrics.clone(), g)),
                            permit,
                        ));
                    }
                }
            }
            let (parts, _permit) = match queue.items.pop_front() {
                // Empty only once planning ended: an empty queue waits for the planner above.
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
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The reads that produce bytes `start..end` of `m`, in order, sent as they are planned. Stops early
/// when the receiver is gone.
#[allow(clippy::needless_pass_by_value, clippy::many_single_char_names)] // the iterator is consumed; a/z/g/b/c read like the maths
fn plan_read(
    segs: Segments,
    m: &Manifest,
    start: u64,
    end: u64,
    tx: &mpsc::Sender<Result<ReadItem, DedupError>>,
) {
    let send = |item| tx.blocking_send(item).is_ok();
    let mut pos = 0u64;
    let mut group: Option<ReadGroup> = None;
    for seg in segs {
        if pos >= end {
            break;
        }
        let seg = match seg {
            Ok(s) => s,
            Err(source) => {
                send(Err(DedupError::Manifest {
                    key: m.header.key.clone(),
                    source,
                }));
                return;
            }
        };
        let len = seg.len();
        if pos + len <= start {
            pos += len;
            continue;
        }
        let (a, z) = window(pos, len, start, end);
        pos += len;
        match seg {
            Segment::Inline(b) => {
                let part = Bytes::from(b).slice(a..z);
                match group.as_mut() {
                    Some(g)
                        if g.parts.len() < GROUP_PARTS_MAX
                            && g.inline_bytes + part.len() <= GROUP_INLINE_MAX =>
                    {
                        g.inline_bytes += part.len();
                        g.parts.push(Part::Inline(part));
                    }
                    _ => {
                        if let Some(g) = group.take()
                            && !send(Ok(ReadItem::Group(g)))
                        {
                            return;
                        }
                        if !send(Ok(ReadItem::Inline(part))) {
                            return;
                        }
                    }
                }
            }
            Segment::Chunk(c) => {
                let pack = &m.header.packs[c.pack as usize];
                let c_end = c.offset + u64::from(c.len);
                let fits = group.as_ref().is_some_and(|g| {
                    let g_end = g.offset + g.len;
                    g.pack == *pack
                        && g.parts.len() < GROUP_PARTS_MAX
                        && c.offset >= g_end
                        && c.offset - g_end <= READ_GAP_MAX
                        && c_end - g.offset <= READ_SPAN_MAX
                });
                if !fits {
                    if let Some(g) = group.take()
                        && !send(Ok(ReadItem::Group(g)))
                    {
                        return;
                    }
                    group = Some(ReadGroup {
                        pack: pack.clone(),
                        offset: c.offset,
                        len: 0,
                        parts: Vec::new(),
                        inline_bytes: 0,
                    });
                }
                let g = group.as_mut().expect("just ensured");
                g.len = c_end - g.offset;
                g.parts.push(Part::Chunk {
                    rel: usize::try_from(c.offset - g.offset).expect("bounded by READ_SPAN_MAX"),
                    len: c.len as usize,
                    sha256: c.sha256,
                    window: (a, z),
                });
            }
        }
    }
    if let Some(g) = group {
        send(Ok(ReadItem::Group(g)));
    }
}

/// Reads one group and verifies every chunk the window needs (SHA-256 on a blocking thread);
/// returns the window's bytes in order (slices of one buffer, no copy).
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
        let mut out = Vec::with_capacity(g.parts.len());
        for p in g.parts {
            match p {
                Part::Inline(b) => out.push(b),
                Part::Chunk {
                    rel,
                    len,
                    sha256,
                    window: (a, z),
                } => {
                    let intact = data
                        .get(rel..rel + len)
                        .is_some_and(|bytes| <[u8; 32]>::from(Sha256::digest(bytes)) == sha256);
                    if !intact {
                        Metrics::add(&metrics.corrupt_chunks, 1);
                        return Err(DedupError::Corrupt {
                            pack: g.pack.clone(),
                            sha: hex::encode(sha256),
                        });
                    }
                    out.push(data.slice(rel + a..rel + z));
                }
            }
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

/// The part of a segment at `pos..pos+len` that falls inside `start..end`, as offsets into it.
fn window(pos: u64, len: u64, start: u64, end: u64) -> (usize, usize) {
    let a = start.saturating_sub(pos).min(len);
    let z = (end - pos).min(len);
    (
        usize::try_from(a).expect("segment offsets fit usize"),
        usize::try_from(z).expect("segment offsets fit usize"),
    )
}
