//! Multipart uploads. Each part streams through the same ingest as a PUT and is published as a
//! part manifest; completing concatenates the parts' segment streams into the key's manifest, so no
//! object byte is read or written again. Backend layout:
//! `uploads/<bucket>/<id>/meta` (JSON `UploadMeta`) and `uploads/<bucket>/<id>/p<00001>` (part
//! manifests). GC keeps what parts reference while their upload is younger than
//! `GcOptions::expire_uploads`, then deletes the upload; parts without a `meta` (an upload
//! completed or aborted while a part was being written) are deleted after the grace period.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use md5::{Digest, Md5};
use serde::{Deserialize, Serialize};

use super::manifest::{
    Manifest, ObjectHeader, Segment, SegmentReader, SegmentSource, SegmentWriter,
};
use super::{
    DedupError, DedupStore, InflightGuard, NewObject, Staged, Version, manifest_key, unix_secs,
};
use crate::store::StoreError;

/// S3's limits: parts are numbered 1..=10000, and every part but the last holds at least 5 MiB.
pub const MAX_PART_NUMBER: u32 = 10_000;
pub const MIN_PART_SIZE: u64 = 5 << 20;

#[derive(Debug, thiserror::Error)]
pub enum MultipartError {
    #[error("upload {0} does not exist (completed, aborted or expired)")]
    NoSuchUpload(String),
    #[error("part {0} was not uploaded or its ETag does not match")]
    InvalidPart(u32),
    #[error("parts must be listed in ascending order without repeats (part {0})")]
    InvalidPartOrder(u32),
    #[error("part {part} holds {size} bytes; every part but the last needs at least 5 MiB")]
    EntityTooSmall { part: u32, size: u64 },
    #[error("the part list is empty")]
    NoParts,
    #[error(transparent)]
    Dedup(#[from] DedupError),
}

impl From<StoreError> for MultipartError {
    fn from(e: StoreError) -> Self {
        Self::Dedup(e.into())
    }
}

/// What `CreateMultipartUpload` recorded.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct UploadMeta {
    pub key: String,
    /// Unix seconds.
    pub initiated: u64,
    pub content_type: Option<String>,
    pub metadata: Vec<(String, String)>,
    #[serde(default)]
    pub attrs: super::manifest::ObjectAttrs,
}

/// A stored part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartInfo {
    pub number: u32,
    pub size: u64,
    pub etag: String,
    pub last_modified: u64,
}

fn upload_dir(bucket: &str, id: &str) -> String {
    format!("uploads/{bucket}/{id}/")
}

fn meta_key(bucket: &str, id: &str) -> String {
    format!("{}meta", upload_dir(bucket, id))
}

fn part_key(bucket: &str, id: &str, n: u32) -> String {
    format!("{}p{n:05}", upload_dir(bucket, id))
}

/// Upload ids are 32 hex digits: they name backend objects, so anything else is refused.
#[must_use]
pub fn valid_upload_id(id: &str) -> bool {
    id.len() == 32
        && id
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// S3's multipart `ETag`: the MD5 of the parts' binary MD5s, then `-<count>`.
#[must_use]
pub fn multipart_etag(part_etags: &[String]) -> String {
    let mut h = Md5::new();
    for e in part_etags {
        h.update(hex::decode(e.trim_matches('"')).unwrap_or_default());
    }
    format!("\"{}-{}\"", hex::encode(h.finalize()), part_etags.len())
}

impl DedupStore {
    pub async fn create_upload(
        &self,
        bucket: &str,
        meta: &UploadMeta,
    ) -> Result<String, DedupError> {
        let id = hex::encode(rand::random::<[u8; 16]>());
        let json = serde_json::to_vec(meta).expect("upload meta serialises");
        self.blob
            .put_bytes(&meta_key(bucket, &id), Bytes::from(json))
            .await?;
        Ok(id)
    }

    pub async fn upload_meta(&self, bucket: &str, id: &str) -> Result<UploadMeta, MultipartError> {
        if !valid_upload_id(id) {
            return Err(MultipartError::NoSuchUpload(id.to_owned()));
        }
        match self.blob.get(&meta_key(bucket, id)).await {
            Ok(b) => serde_json::from_slice(&b).map_err(|_| {
                MultipartError::Dedup(DedupError::Pipeline("upload record is malformed"))
            }),
            Err(StoreError::NotFound(_)) => Err(MultipartError::NoSuchUpload(id.to_owned())),
            Err(e) => Err(e.into()),
        }
    }

    /// Publish a staged part (the upload must exist; checked again after the part is written, so
    /// a part racing an abort or a complete is left for GC, never attached to another upload).
    pub async fn publish_part(
        &self,
        staged: Staged,
        bucket: &str,
        id: &str,
        number: u32,
        etag: String,
    ) -> Result<ObjectHeader, MultipartError> {
        let meta = self.upload_meta(bucket, id).await?;
        let obj = NewObject {
            bucket: bucket.to_owned(),
            key: meta.key,
            etag,
            content_type: None,
            metadata: Vec::new(),
            attrs: super::manifest::ObjectAttrs::default(),
        };
        let h = self
            .publish_at(staged, obj, &part_key(bucket, id, number))
            .await?;
        Ok(h)
    }

    /// Parts uploaded so far, by number.
    pub async fn list_parts(
        &self,
        bucket: &str,
        id: &str,
    ) -> Result<Vec<PartInfo>, MultipartError> {
        self.upload_meta(bucket, id).await?;
        let mut out = Vec::new();
        for o in self.blob.list(&upload_dir(bucket, id)).await? {
            let Some(n) = o
                .key
                .rsplit('/')
                .next()
                .and_then(|p| p.strip_prefix('p'))
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let m = match self.blob.get(&o.key).await {
                Ok(b) => Manifest::decode(b).map_err(|source| DedupError::Manifest {
                    key: o.key.clone(),
                    source,
                })?,
                Err(StoreError::NotFound(_)) => continue,
                Err(e) => return Err(e.into()),
            };
            out.push(PartInfo {
                number: n,
                size: m.header.size,
                etag: m.header.etag,
                last_modified: m.header.last_modified,
            });
        }
        out.sort_by_key(|p| p.number);
        Ok(out)
    }

    /// Uploads in progress in `bucket`: (id, meta), ordered by key then upload id.
    pub async fn list_uploads(
        &self,
        bucket: &str,
    ) -> Result<Vec<(String, UploadMeta)>, DedupError> {
        let mut out = Vec::new();
        for o in self.blob.list(&format!("uploads/{bucket}/")).await? {
            let Some(id) = o
                .key
                .strip_suffix("/meta")
                .and_then(|d| d.rsplit('/').next())
            else {
                continue;
            };
            match self.upload_meta(bucket, id).await {
                Ok(m) => out.push((id.to_owned(), m)),
                Err(MultipartError::NoSuchUpload(_)) => {}
                Err(MultipartError::Dedup(e)) => return Err(e),
                Err(e) => tracing::warn!(error = %e, "skipping upload record"),
            }
        }
        // By key, then upload id: the order markers resume in.
        out.sort_by(|a, b| (&a.1.key, &a.0).cmp(&(&b.1.key, &b.0)));
        Ok(out)
    }

    /// Abort: the record goes first (new parts are refused), then the parts.
    pub async fn abort_upload(&self, bucket: &str, id: &str) -> Result<(), MultipartError> {
        self.upload_meta(bucket, id).await?;
        self.blob.delete(&meta_key(bucket, id)).await?;
        for o in self.blob.list(&upload_dir(bucket, id)).await? {
            self.blob.delete(&o.key).await?;
        }
        Ok(())
    }

    /// Complete: validate the part list (S3's rules and error codes), concatenate the parts'
    /// segment streams into one manifest for the key, publish it, then remove the upload.
    pub async fn complete_upload(
        &self,
        bucket: &str,
        id: &str,
        parts: &[(u32, String)],
    ) -> Result<ObjectHeader, MultipartError> {
        let meta = self.upload_meta(bucket, id).await?;
        if parts.is_empty() {
            return Err(MultipartError::NoParts);
        }
        let mut prev = 0;
        for (n, _) in parts {
            if *n <= prev || *n > MAX_PART_NUMBER {
                return Err(MultipartError::InvalidPartOrder(*n));
            }
            prev = *n;
        }
        let mut manifests = Vec::with_capacity(parts.len());
        for (i, (n, etag)) in parts.iter().enumerate() {
            let m = match self.blob.get(&part_key(bucket, id, *n)).await {
                Ok(b) => Manifest::decode(b).map_err(|source| DedupError::Manifest {
                    key: part_key(bucket, id, *n),
                    source,
                })?,
                Err(StoreError::NotFound(_)) => return Err(MultipartError::InvalidPart(*n)),
                Err(e) => return Err(e.into()),
            };
            if m.header.etag.trim_matches('"') != etag.trim().trim_matches('"') {
                return Err(MultipartError::InvalidPart(*n));
            }
            if i + 1 < parts.len() && m.header.size < MIN_PART_SIZE {
                return Err(MultipartError::EntityTooSmall {
                    part: *n,
                    size: m.header.size,
                });
            }
            manifests.push(m);
        }
        let mut hold = InflightGuard::new(&self.inflight);
        let file = tempfile::NamedTempFile::new_in(&self.spool_dir).map_err(DedupError::from)?;
        let mut writer = Some(SegmentWriter::new(std::io::BufWriter::new(
            file.reopen().map_err(DedupError::from)?,
        )));
        let mut packs: Vec<String> = Vec::new();
        let mut pack_ids: HashMap<String, u32> = HashMap::new();
        let mut size = 0u64;
        for m in &manifests {
            // (bytes, whether they are uncompressed: a resolved chain)
            let stream = match &m.segments {
                SegmentSource::Embedded(b) => Some((b.clone(), false)),
                SegmentSource::External(name) => Some((self.blob.get(name).await?, false)),
                SegmentSource::Chain(links) => Some((
                    Bytes::from(self.resolve_chain(&m.header, links).await?),
                    true,
                )),
                SegmentSource::Legacy(_) => None,
            };
            // Part-local pack indexes become indexes into the union of the parts' packs.
            let remap: Vec<u32> = m
                .header
                .packs
                .iter()
                .map(|p| {
                    hold.hold(&Arc::from(p.as_str()));
                    let next = u32::try_from(packs.len()).expect("pack count fits u32");
                    *pack_ids.entry(p.clone()).or_insert_with(|| {
                        packs.push(p.clone());
                        next
                    })
                })
                .collect();
            let header = m.header.clone();
            let legacy = match &m.segments {
                SegmentSource::Legacy(s) => Some(s.clone()),
                _ => None,
            };
            let mut w = writer.take().expect("writer");
            w = tokio::task::spawn_blocking(move || -> Result<_, DedupError> {
                let mut put = |seg: Segment| -> Result<(), DedupError> {
                    match seg {
                        Segment::Inline(b) => w.inline(&b)?,
                        Segment::Chunk(mut c) => {
                            c.pack = remap[c.pack as usize];
                            w.chunk(&c)?;
                        }
                    }
                    Ok(())
                };
                if let Some(segs) = legacy {
                    for s in segs.iter() {
                        put(s.clone())?;
                    }
                } else if let Some((b, raw)) = stream {
                    let segments: Box<dyn Iterator<Item = _>> = if raw {
                        Box::new(SegmentReader::raw(std::io::Cursor::new(b), &header))
                    } else {
                        Box::new(SegmentReader::new(std::io::Cursor::new(b), &header))
                    };
                    for s in segments {
                        put(s.map_err(|source| DedupError::Manifest {
                            key: header.key.clone(),
                            source,
                        })?)?;
                    }
                }
                Ok(w)
            })
            .await
            .map_err(|e| DedupError::Spool(std::io::Error::other(e.to_string())))??;
            writer = Some(w);
            size += m.header.size;
        }
        let w = writer.take().expect("writer");
        let (segment_count, _) = w.counts();
        std::io::Write::flush(&mut w.finish().map_err(DedupError::from)?)
            .map_err(DedupError::from)?;
        let etags: Vec<String> = manifests.iter().map(|m| m.header.etag.clone()).collect();
        let obj = NewObject {
            bucket: bucket.to_owned(),
            key: meta.key.clone(),
            etag: multipart_etag(&etags),
            content_type: meta.content_type,
            metadata: meta.metadata,
            attrs: meta.attrs,
        };
        let v = Version {
            size,
            packs,
            segment_count,
        };
        let mkey = manifest_key(bucket, &meta.key);
        let header = self
            .write_version(v, file.path(), obj, &mut hold, &mkey)
            .await?;
        self.write_entry(&header).await?;
        // The object is whole; what remains of the upload is garbage (GC collects it if this stops).
        if let Err(e) = self.drop_upload(bucket, id).await {
            tracing::warn!(error = %e, "completed upload left for gc");
        }
        Ok(header)
    }

    async fn drop_upload(&self, bucket: &str, id: &str) -> Result<(), StoreError> {
        self.blob.delete(&meta_key(bucket, id)).await?;
        for o in self.blob.list(&upload_dir(bucket, id)).await? {
            self.blob.delete(&o.key).await?;
        }
        Ok(())
    }
}

/// Unix seconds of now (upload records).
#[must_use]
pub fn now_secs() -> u64 {
    unix_secs(SystemTime::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etag_of_parts_matches_s3() {
        // Two parts whose MD5s are those of "a" and "b".
        let a = "\"0cc175b9c0f1b6a831c399e269772661\"".to_owned();
        let b = "92eb5ffee6ae2fec3ad71c777531578f".to_owned();
        let mut h = Md5::new();
        h.update(hex::decode("0cc175b9c0f1b6a831c399e269772661").unwrap());
        h.update(hex::decode("92eb5ffee6ae2fec3ad71c777531578f").unwrap());
        assert_eq!(
            multipart_etag(&[a, b]),
            format!("\"{}-2\"", hex::encode(h.finalize()))
        );
    }

    #[test]
    fn upload_ids_are_checked() {
        assert!(valid_upload_id(&"a".repeat(32)));
        assert!(!valid_upload_id("../meta"));
        assert!(!valid_upload_id(&"A".repeat(32)));
        assert!(!valid_upload_id(&"a".repeat(31)));
    }
}
