//! `ManifestV1`: the per-key record listing an object's segments; a compact, versioned binary format.
//!
//! Layout: `b"SRM"`, version byte `1`, u32-LE length + JSON header (everything but segments), varint
//! segment count, then per segment a tag byte: `0` inline (varint len, bytes) or `1` chunk (varint pack
//! index, varint offset, varint len, 32-byte SHA-256). Binary because a JSON chunk list with hex digests
//! is ~3× larger and manifests are stored per version.

use serde::{Deserialize, Serialize};

const MAGIC: &[u8; 3] = b"SRM";
const VERSION: u8 = 1;

/// A chunk stored in a pack object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkRef {
    /// Index into `ManifestV1::packs`.
    pub pack: u32,
    pub offset: u64,
    pub len: u32,
    pub sha256: [u8; 32],
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    /// Small zip structure bytes kept in the manifest itself.
    Inline(Vec<u8>),
    Chunk(ChunkRef),
}

impl Segment {
    #[must_use]
    pub fn len(&self) -> u64 {
        match self {
            Segment::Inline(b) => b.len() as u64,
            Segment::Chunk(c) => u64::from(c.len),
        }
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Object attributes returned on GET/HEAD.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObjectHeader {
    pub bucket: String,
    pub key: String,
    pub size: u64,
    /// Quoted MD5 of the body, like a single-PUT S3 `ETag`.
    pub etag: String,
    /// Unix seconds of the PUT.
    pub last_modified: u64,
    pub content_type: Option<String>,
    /// `x-amz-meta-*` pairs, names lowercase without the prefix.
    pub metadata: Vec<(String, String)>,
    pub packs: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestV1 {
    pub header: ObjectHeader,
    pub segments: Vec<Segment>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ManifestError {
    #[error("manifest has no SRM magic")]
    Magic,
    #[error("manifest version {0} is not supported (this build reads version 1)")]
    Version(u8),
    #[error("manifest is truncated or malformed: {0}")]
    Malformed(&'static str),
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(u8::try_from(v & 0x7F).expect("7 bits") | 0x80);
        v >>= 7;
    }
    out.push(u8::try_from(v).expect("< 0x80"));
}

struct Reader<'a> {
    b: &'a [u8],
    i: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], ManifestError> {
        // checked_add: a corrupt length near usize::MAX must be "truncated", not an overflow (fuzzing).
        let s = self
            .i
            .checked_add(n)
            .and_then(|end| self.b.get(self.i..end))
            .ok_or(ManifestError::Malformed("truncated"))?;
        self.i += n;
        Ok(s)
    }
    fn varint(&mut self) -> Result<u64, ManifestError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = self.take(1)?[0];
            v |= u64::from(byte & 0x7F) << shift;
            if byte & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(ManifestError::Malformed("varint too long"))
    }
}

impl ManifestV1 {
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let header = serde_json::to_vec(&self.header).expect("header serialises");
        let mut out = Vec::with_capacity(header.len() + self.segments.len() * 48 + 16);
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        out.extend_from_slice(
            &u32::try_from(header.len())
                .expect("header under 4 GiB")
                .to_le_bytes(),
        );
        out.extend_from_slice(&header);
        put_varint(&mut out, self.segments.len() as u64);
        for seg in &self.segments {
            match seg {
                Segment::Inline(b) => {
                    out.push(0);
                    put_varint(&mut out, b.len() as u64);
                    out.extend_from_slice(b);
                }
                Segment::Chunk(c) => {
                    out.push(1);
                    put_varint(&mut out, u64::from(c.pack));
                    put_varint(&mut out, c.offset);
                    put_varint(&mut out, u64::from(c.len));
                    out.extend_from_slice(&c.sha256);
                }
            }
        }
        out
    }

    pub fn decode(b: &[u8]) -> Result<Self, ManifestError> {
        let mut r = Reader { b, i: 0 };
        if r.take(3).map_err(|_| ManifestError::Magic)? != MAGIC {
            return Err(ManifestError::Magic);
        }
        let v = r.take(1)?[0];
        if v != VERSION {
            return Err(ManifestError::Version(v));
        }
        let hlen = u32::from_le_bytes(r.take(4)?.try_into().expect("4 bytes")) as usize;
        let header: ObjectHeader = serde_json::from_slice(r.take(hlen)?)
            .map_err(|_| ManifestError::Malformed("header JSON"))?;
        let count = r.varint()?;
        let mut segments = Vec::with_capacity(usize::try_from(count.min(1 << 20)).unwrap_or(0));
        let mut total = 0u64;
        for _ in 0..count {
            let seg = match r.take(1)?[0] {
                0 => {
                    let n = usize::try_from(r.varint()?)
                        .map_err(|_| ManifestError::Malformed("inline length"))?;
                    Segment::Inline(r.take(n)?.to_vec())
                }
                1 => {
                    let pack = u32::try_from(r.varint()?)
                        .map_err(|_| ManifestError::Malformed("pack index"))?;
                    if pack as usize >= header.packs.len() {
                        return Err(ManifestError::Malformed("pack index out of range"));
                    }
                    let offset = r.varint()?;
                    let len = u32::try_from(r.varint()?)
                        .map_err(|_| ManifestError::Malformed("chunk length"))?;
                    let sha256 = r.take(32)?.try_into().expect("32 bytes");
                    Segment::Chunk(ChunkRef {
                        pack,
                        offset,
                        len,
                        sha256,
                    })
                }
                _ => return Err(ManifestError::Malformed("unknown segment tag")),
            };
            total += seg.len();
            segments.push(seg);
        }
        if r.i != b.len() {
            return Err(ManifestError::Malformed("trailing bytes"));
        }
        if total != header.size {
            return Err(ManifestError::Malformed(
                "segment lengths do not add up to the object size",
            ));
        }
        Ok(Self { header, segments })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ManifestV1 {
        ManifestV1 {
            header: ObjectHeader {
                bucket: "b".into(),
                key: "project/1/main".into(),
                size: 5 + 300,
                etag: "\"abc\"".into(),
                last_modified: 1_700_000_000,
                content_type: None,
                metadata: vec![("cachekey".into(), "main".into())],
                packs: vec!["p1".into()],
            },
            segments: vec![
                Segment::Inline(b"PK\x03\x04x".to_vec()),
                Segment::Chunk(ChunkRef {
                    pack: 0,
                    offset: 200,
                    len: 300,
                    sha256: [7; 32],
                }),
            ],
        }
    }

    #[test]
    fn round_trips_and_has_the_documented_layout() {
        let m = sample();
        let enc = m.encode();
        assert_eq!(&enc[..4], b"SRM\x01");
        let tail = &enc[enc.len() - (1 + 1 + 1 + 5 + 1 + 1 + 2 + 2 + 32)..];
        assert_eq!(&tail[..10], &[2, 0, 5, b'P', b'K', 3, 4, b'x', 1, 0]);
        assert_eq!(&tail[10..14], &[0xC8, 0x01, 0xAC, 0x02]);
        assert_eq!(ManifestV1::decode(&enc).unwrap(), m);
    }

    #[test]
    fn rejects_other_versions_truncation_and_size_mismatch() {
        let mut enc = sample().encode();
        assert_eq!(
            ManifestV1::decode(&enc[..enc.len() - 1]),
            Err(ManifestError::Malformed("truncated"))
        );
        enc[3] = 2;
        assert_eq!(ManifestV1::decode(&enc), Err(ManifestError::Version(2)));
        let mut m = sample();
        m.header.size = 1;
        assert!(matches!(
            ManifestV1::decode(&m.encode()),
            Err(ManifestError::Malformed(_))
        ));
        assert_eq!(ManifestV1::decode(b"nope"), Err(ManifestError::Magic));
    }
}
