//! Key-level operations beside PUT and GET: listing (over `listing` entries), delete, and copy (a
//! new manifest naming the source's packs and segment stream: no object byte moves).

use std::sync::Arc;

use bytes::Bytes;

use super::listing::{self, Entry};
use super::manifest::{Manifest, ObjectHeader, Segment, SegmentSource, SegmentWriter};
use super::{
    DedupError, DedupStore, InflightGuard, NewObject, Version, manifest_key, read_marker_key,
    unix_secs,
};
use crate::metrics::Metrics;

/// Backend names read per listing round trip.
const SCAN_PAGE: usize = 1000;

/// One page of a listing.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Listed {
    pub entries: Vec<Entry>,
    pub common_prefixes: Vec<String>,
    /// More keys follow; resume after `last`.
    pub truncated: bool,
    /// The last key or common prefix returned (the next page starts after it).
    pub last: Option<Resume>,
}

/// Where a listing resumes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resume {
    /// After this key.
    Key(String),
    /// After every key under this common prefix.
    Prefix(String),
}

/// A listing request.
#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    pub prefix: String,
    pub delimiter: Option<String>,
    pub after: Option<Resume>,
    pub max_keys: usize,
}

impl DedupStore {
    /// Write the listing entry of a version just published, then drop entries of older versions
    /// (a concurrent writer's newer entry is never dropped: see `listing`).
    pub(crate) async fn write_entry(&self, h: &ObjectHeader) -> Result<(), DedupError> {
        // Milliseconds, so that versions written within one second still order.
        let now_ms = u64::try_from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_millis(),
        )
        .unwrap_or(u64::MAX);
        let mtime_ms = now_ms.max(h.last_modified * 1000);
        let e = Entry {
            key: h.key.clone(),
            size: h.size,
            mtime: mtime_ms,
            etag: h.etag.clone(),
        };
        let name = listing::entry_name(&h.bucket, &e);
        self.blob.put_bytes(&name, Bytes::new()).await?;
        for old in self
            .blob
            .list(&listing::key_entries_prefix(&h.bucket, &h.key))
            .await?
        {
            if old.key == name {
                continue;
            }
            match listing::parse_entry(&h.bucket, &old.key) {
                Ok(o) if o.mtime < e.mtime => self.blob.delete(&old.key).await?,
                Ok(_) => {}
                Err(err) => tracing::warn!(error = %err, "skipping listing entry"),
            }
        }
        Ok(())
    }

    /// Delete a key (S3 `DeleteObject`: deleting a missing key succeeds). The manifest goes first:
    /// a crash leaves at most a stale listing entry, which listings check and GC removes.
    pub async fn delete_key(&self, bucket: &str, key: &str) -> Result<(), DedupError> {
        let mkey = manifest_key(bucket, key);
        self.blob.delete(&mkey).await?;
        for e in self
            .blob
            .list(&listing::key_entries_prefix(bucket, key))
            .await?
        {
            self.blob.delete(&e.key).await?;
        }
        self.blob.delete(&read_marker_key(&mkey)).await?;
        Ok(())
    }

    /// One page of keys in byte order (S3 `ListObjects` semantics: prefix, delimiter rolled up into
    /// common prefixes, resume point, at most `max_keys` keys and prefixes together).
    pub async fn list_keys(&self, bucket: &str, q: &ListQuery) -> Result<Listed, DedupError> {
        let (backend_prefix, start) = listing::scan_for_prefix(bucket, &q.prefix);
        let mut after = match &q.after {
            Some(Resume::Key(k)) => listing::after_key(bucket, k),
            Some(Resume::Prefix(p)) => listing::after_prefix(bucket, p),
            None => String::new(),
        };
        if after < start {
            after = start;
        }
        let mut out = Listed::default();
        if q.max_keys == 0 {
            return Ok(out);
        }
        // Entries of one key (normally one; more after a crash or a race) are gathered first.
        let mut pending: Vec<Entry> = Vec::new();
        'scan: loop {
            let (page, more) = self
                .blob
                .list_page(&backend_prefix, &after, SCAN_PAGE)
                .await?;
            let mut jumped = false;
            for obj in &page {
                after.clone_from(&obj.key);
                let e = match listing::parse_entry(bucket, &obj.key) {
                    Ok(e) => e,
                    Err(err) => {
                        tracing::warn!(error = %err, "skipping listing entry");
                        continue;
                    }
                };
                if !e.key.starts_with(&q.prefix) {
                    if e.key.as_str() > q.prefix.as_str() {
                        break 'scan; // past the prefix: keys with it are contiguous
                    }
                    continue;
                }
                if let Some(d) = q.delimiter.as_deref().filter(|d| !d.is_empty())
                    && let Some(i) = e.key[q.prefix.len()..].find(d)
                {
                    let cp = e.key[..q.prefix.len() + i + d.len()].to_owned();
                    if self
                        .flush(bucket, &mut pending, &mut out, q.max_keys)
                        .await?
                    {
                        break 'scan;
                    }
                    if out.entries.len() + out.common_prefixes.len() == q.max_keys {
                        out.truncated = true;
                        break 'scan;
                    }
                    out.common_prefixes.push(cp.clone());
                    after = listing::after_prefix(bucket, &cp);
                    out.last = Some(Resume::Prefix(cp));
                    jumped = true;
                    break;
                }
                if pending.first().is_some_and(|p| p.key != e.key)
                    && self
                        .flush(bucket, &mut pending, &mut out, q.max_keys)
                        .await?
                {
                    break 'scan;
                }
                pending.push(e);
            }
            if !more && !jumped {
                break;
            }
        }
        if !out.truncated {
            self.flush(bucket, &mut pending, &mut out, q.max_keys)
                .await?;
        }
        Ok(out)
    }

    /// Emit the gathered entries of one key (resolving duplicates against its manifest). Returns
    /// true when the page was already full: the key is left for the next page.
    async fn flush(
        &self,
        bucket: &str,
        pending: &mut Vec<Entry>,
        out: &mut Listed,
        max: usize,
    ) -> Result<bool, DedupError> {
        if pending.is_empty() {
            return Ok(false);
        }
        if out.entries.len() + out.common_prefixes.len() >= max {
            out.truncated = true;
            return Ok(true);
        }
        let e = if pending.len() == 1 {
            pending.pop()
        } else {
            let key = pending[0].key.clone();
            let current = self.manifest(bucket, &key).await.ok().flatten();
            let chosen = current.map(|m| {
                let h = &m.header;
                pending
                    .iter()
                    .filter(|e| e.etag == h.etag && e.size == h.size)
                    .max_by_key(|e| e.mtime)
                    .cloned()
                    .unwrap_or(Entry {
                        key,
                        size: h.size,
                        mtime: h.last_modified * 1000,
                        etag: h.etag.clone(),
                    })
            });
            pending.clear();
            chosen
        };
        pending.clear();
        if let Some(e) = e {
            out.last = Some(Resume::Key(e.key.clone()));
            out.entries.push(e);
        }
        Ok(false)
    }

    /// Copy `src` to `dst` as a new manifest over the same packs and segments. `dst` supplies the
    /// key, metadata and attributes (S3's COPY or REPLACE directive is applied by the caller).
    pub async fn copy_key(
        &self,
        src: &Manifest,
        dst: NewObject,
    ) -> Result<ObjectHeader, DedupError> {
        let mut hold = InflightGuard::new(&self.inflight);
        for p in &src.header.packs {
            hold.hold(&Arc::from(p.as_str()));
        }
        let (body, embedded): (Option<String>, Bytes) = match &src.segments {
            SegmentSource::Embedded(b) => (None, b.clone()),
            // The links are packs of `src.header.packs`, held above and listed in the copy.
            SegmentSource::Chain(_) => (None, Bytes::new()),
            SegmentSource::External(name) => {
                hold.hold(&Arc::from(name.as_str()));
                // The segment object is shared: GC keeps it while any manifest names it.
                (Some(name.clone()), Bytes::new())
            }
            SegmentSource::Legacy(segs) => {
                // Written by an earlier release: re-encoded as a version-3 segment stream.
                let file = tempfile::NamedTempFile::new_in(&self.spool_dir)?;
                let mut w = SegmentWriter::new(std::io::BufWriter::new(file.reopen()?));
                for s in segs.iter() {
                    match s {
                        Segment::Inline(b) => w.inline(b)?,
                        Segment::Chunk(c) => w.chunk(c)?,
                    }
                }
                std::io::Write::flush(&mut w.finish()?)?;
                let v = Version {
                    size: src.header.size,
                    packs: src.header.packs.clone(),
                    segment_count: segs.len() as u64,
                };
                let mkey = manifest_key(&dst.bucket, &dst.key);
                let header = self
                    .write_version(v, file.path(), dst, &mut hold, &mkey)
                    .await?;
                self.write_entry(&header).await?;
                return Ok(header);
            }
        };
        let header = ObjectHeader {
            bucket: dst.bucket,
            key: dst.key,
            size: src.header.size,
            etag: dst.etag,
            last_modified: unix_secs(std::time::SystemTime::now()),
            content_type: dst.content_type,
            metadata: dst.metadata,
            packs: src.header.packs.clone(),
            segments: src.header.segments,
            body,
            attrs: dst.attrs,
            chain: src.header.chain.clone(),
        };
        let encoded = Bytes::from(Manifest::encode_v3(&header, &embedded));
        let mkey = manifest_key(&header.bucket, &header.key);
        self.put_manifest(&mkey, encoded).await?;
        self.write_entry(&header).await?;
        Metrics::add(&self.metrics.dedup_bytes, header.size);
        drop(hold);
        Ok(header)
    }
}
