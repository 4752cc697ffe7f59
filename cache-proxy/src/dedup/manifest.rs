//! `ManifestV1`: the per-key record listing an object's segments, and its compact, versioned binary
//! encodings. The model is unchanged since version 1; version 2 only stores it smaller.
//!
//! Version 1 (still decoded): `b"SRM"`, version byte `1`, u32-LE length + JSON header (everything but
//! segments), varint segment count, then per segment a tag byte: `0` inline (varint len, bytes) or `1`
//! chunk (varint pack index, varint offset, varint len, 32-byte SHA-256). Binary because a JSON chunk
//! list with hex digests is ~3× larger and manifests are stored per version.
//!
//! Version 2 (written): `b"SRM"`, version byte `2`, u32-LE length of a raw DEFLATE stream, the stream,
//! then one 32-byte SHA-256 per chunk segment in segment order. The stream inflates to: u32-LE length
//! and JSON header, varint segment count, then per segment a tag byte: `0` inline (varint len, bytes) or
//! `1` chunk (varint pack index, zigzag varint of offset minus the end of the previous chunk segment
//! (0 before the first), varint len). Why: inline zip structure (local headers, the central directory)
//! is mostly names and repeated fields that deflate to a fraction, consecutive chunks of a pack make
//! the offset delta 0, and digests stay outside the stream because random bytes do not compress.

use std::io::{Read, Write};

use serde::{Deserialize, Serialize};

const MAGIC: &[u8; 3] = b"SRM";
/// The version `encode` writes.
const VERSION: u8 = 2;
/// Inflated size above which a version-2 body is rejected (a 4 GiB object needs a few MiB).
const MAX_INFLATED: u64 = 1 << 30;
/// Largest chunk offset a manifest may name. Packs are far smaller; the bound keeps every offset and
/// every version-2 offset delta inside `i64`, so whatever decodes also encodes (found by fuzzing: a
/// version-1 offset above 2^63 decoded but its re-encoded delta wrapped).
const MAX_OFFSET: u64 = 1 << 62;

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
    /// Version 3: how many segments the segment stream holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub segments: Option<u64>,
    /// Version 3: the object holding the segment stream, when it is not embedded in the manifest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    /// Stored response headers and checksums (absent in manifests of earlier releases).
    #[serde(default, skip_serializing_if = "ObjectAttrs::is_empty")]
    pub attrs: ObjectAttrs,
    /// Version 3: the segment stream as zstd frames in packs (`delta`), when it is neither embedded
    /// nor in `body`: one link (the stream alone) or two (a similar stream, then this one as a
    /// delta against it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chain: Vec<StreamLink>,
}

/// One zstd frame of a chained segment stream: the whole of pack `packs[pack]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamLink {
    /// Index into `ObjectHeader::packs`.
    pub pack: u32,
    /// Bytes of the frame (the pack's size).
    pub len: u32,
    /// SHA-256 of the frame, hex.
    pub sha256: String,
    /// Bytes it decompresses to.
    pub raw: u32,
}

/// Response headers stored with an object, and the checksums verified when it was written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObjectAttrs {
    /// `(lowercase header name, value)`: Content-Disposition, Cache-Control, Content-Encoding,
    /// Content-Language, Expires.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<(String, String)>,
    /// `(x-amz-checksum-<algorithm>, base64 value)` of the whole object (single PUT).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub checksums: Vec<(String, String)>,
}

impl ObjectAttrs {
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.headers.is_empty() && self.checksums.is_empty()
    }
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
    #[error("manifest version {0} is not supported (this build reads versions 1 and 2)")]
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

fn zigzag(v: i64) -> u64 {
    #[allow(clippy::cast_sign_loss)] // the zigzag mapping, bit for bit
    let z = ((v << 1) ^ (v >> 63)) as u64;
    z
}

fn unzigzag(z: u64) -> i64 {
    #[allow(clippy::cast_possible_wrap)] // the zigzag mapping, bit for bit
    let v = (z >> 1) as i64 ^ -((z & 1) as i64);
    v
}

impl ManifestV1 {
    /// Encode as version 2.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let header = serde_json::to_vec(&self.header).expect("header serialises");
        let mut body = Vec::with_capacity(header.len() + self.segments.len() * 8 + 16);
        body.extend_from_slice(
            &u32::try_from(header.len())
                .expect("header under 4 GiB")
                .to_le_bytes(),
        );
        body.extend_from_slice(&header);
        put_varint(&mut body, self.segments.len() as u64);
        let mut digests = Vec::new();
        let mut prev_end = 0u64;
        for seg in &self.segments {
            match seg {
                Segment::Inline(b) => {
                    body.push(0);
                    put_varint(&mut body, b.len() as u64);
                    body.extend_from_slice(b);
                }
                Segment::Chunk(c) => {
                    body.push(1);
                    put_varint(&mut body, u64::from(c.pack));
                    debug_assert!(c.offset <= MAX_OFFSET, "chunk offset {}", c.offset);
                    #[allow(clippy::cast_possible_wrap)] // offsets are at most 2^62 (MAX_OFFSET)
                    put_varint(&mut body, zigzag(c.offset as i64 - prev_end as i64));
                    put_varint(&mut body, u64::from(c.len));
                    digests.extend_from_slice(&c.sha256);
                    prev_end = c.offset + u64::from(c.len);
                }
            }
        }
        let mut z = flate2::write::DeflateEncoder::new(
            Vec::with_capacity(body.len() / 3 + 64),
            flate2::Compression::default(),
        );
        z.write_all(&body).expect("writing to a Vec");
        let packed = z.finish().expect("writing to a Vec");
        let mut out = Vec::with_capacity(8 + packed.len() + digests.len());
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        out.extend_from_slice(
            &u32::try_from(packed.len())
                .expect("manifest under 4 GiB")
                .to_le_bytes(),
        );
        out.extend_from_slice(&packed);
        out.extend_from_slice(&digests);
        out
    }

    /// Decode version 1 or 2.
    pub fn decode(b: &[u8]) -> Result<Self, ManifestError> {
        let mut r = Reader { b, i: 0 };
        if r.take(3).map_err(|_| ManifestError::Magic)? != MAGIC {
            return Err(ManifestError::Magic);
        }
        match r.take(1)?[0] {
            1 => {
                let (header, segments) = decode_segments(&mut r, None, false)?;
                finish(&r, header, segments)
            }
            2 => {
                let zlen = u32::from_le_bytes(r.take(4)?.try_into().expect("4 bytes")) as usize;
                let mut body = Vec::new();
                flate2::read::DeflateDecoder::new(r.take(zlen)?)
                    .take(MAX_INFLATED + 1)
                    .read_to_end(&mut body)
                    .map_err(|_| ManifestError::Malformed("compressed body"))?;
                if body.len() as u64 > MAX_INFLATED {
                    return Err(ManifestError::Malformed("compressed body too large"));
                }
                let mut inner = Reader { b: &body, i: 0 };
                let (header, segments) = decode_segments(&mut inner, Some(&mut r), true)?;
                if inner.i != body.len() {
                    return Err(ManifestError::Malformed(
                        "trailing bytes in compressed body",
                    ));
                }
                finish(&r, header, segments)
            }
            v => Err(ManifestError::Version(v)),
        }
    }
}

/// Header and segments from `r`; digests from `digests` when given (version 2) or inline (version 1).
fn decode_segments(
    r: &mut Reader<'_>,
    mut digests: Option<&mut Reader<'_>>,
    delta_offsets: bool,
) -> Result<(ObjectHeader, Vec<Segment>), ManifestError> {
    let hlen = u32::from_le_bytes(r.take(4)?.try_into().expect("4 bytes")) as usize;
    let header: ObjectHeader = serde_json::from_slice(r.take(hlen)?)
        .map_err(|_| ManifestError::Malformed("header JSON"))?;
    let count = r.varint()?;
    let mut segments = Vec::with_capacity(usize::try_from(count.min(1 << 20)).unwrap_or(0));
    let mut prev_end = 0u64;
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
                let raw = r.varint()?;
                let offset = if delta_offsets {
                    prev_end
                        .checked_add_signed(unzigzag(raw))
                        .ok_or(ManifestError::Malformed("chunk offset"))?
                } else {
                    raw
                };
                if offset > MAX_OFFSET {
                    return Err(ManifestError::Malformed("chunk offset beyond any pack"));
                }
                let len = u32::try_from(r.varint()?)
                    .map_err(|_| ManifestError::Malformed("chunk length"))?;
                let sha256 = match digests.as_deref_mut() {
                    Some(d) => d.take(32)?,
                    None => r.take(32)?,
                }
                .try_into()
                .expect("32 bytes");
                prev_end = offset
                    .checked_add(u64::from(len))
                    .ok_or(ManifestError::Malformed("chunk offset"))?;
                Segment::Chunk(ChunkRef {
                    pack,
                    offset,
                    len,
                    sha256,
                })
            }
            _ => return Err(ManifestError::Malformed("unknown segment tag")),
        };
        segments.push(seg);
    }
    Ok((header, segments))
}

/// Checks that `r` was consumed exactly and that the segments add up to the object size.
fn finish(
    r: &Reader<'_>,
    header: ObjectHeader,
    segments: Vec<Segment>,
) -> Result<ManifestV1, ManifestError> {
    if r.i != r.b.len() {
        return Err(ManifestError::Malformed("trailing bytes"));
    }
    let total: u64 = segments.iter().map(Segment::len).sum();
    if total != header.size {
        return Err(ManifestError::Malformed(
            "segment lengths do not add up to the object size",
        ));
    }
    Ok(ManifestV1 { header, segments })
}

/// Largest inline segment a version-3 stream holds: readers hold one segment at a time, so this
/// bounds their memory (longer zip structure is split, and beyond a per-object budget chunked).
pub const INLINE_SEG_MAX: usize = 1 << 20;
/// Version-3 manifests whose segment stream compresses to at most this are one object; larger
/// streams live in their own object (`ObjectHeader::body`) so HEAD and GC read only the header.
pub const EMBED_MAX: usize = 64 << 10;
/// Largest version-3 header (JSON): the pack list of a huge object stays far below it.
const HEADER_MAX: usize = 64 << 20;

/// Where a decoded manifest's segments are.
#[derive(Debug, Clone)]
pub enum SegmentSource {
    /// Version 3, the DEFLATE segment stream following the header in the manifest object.
    Embedded(bytes::Bytes),
    /// Version 3, the segment stream in its own object (`ObjectHeader::body`).
    External(String),
    /// Versions 1 and 2 (written by earlier releases), decoded whole.
    Legacy(std::sync::Arc<Vec<Segment>>),
    /// Version 3, the segment stream uncompressed from `ObjectHeader::chain` (see `delta`).
    Chain(Vec<StreamLink>),
}

/// A manifest as readers hold it: the header, and where to stream the segments from. Its memory does
/// not depend on the number of segments (except for legacy versions).
#[derive(Debug, Clone)]
pub struct Manifest {
    pub header: ObjectHeader,
    pub segments: SegmentSource,
}

impl Manifest {
    /// Version 3 layout: `b"SRM"`, version byte `3`, u32-LE length + JSON header, then (when
    /// neither `header.body` nor `header.chain` names it elsewhere) the segment stream to the end
    /// of the object. Why: HEAD, GC and the size of a pinned read need only the header; GET streams
    /// the segments. A chained stream (`delta`) is the same segment encoding, uncompressed, in
    /// zstd frames.
    #[must_use]
    pub fn encode_v3(header: &ObjectHeader, embedded: &[u8]) -> Vec<u8> {
        let json = serde_json::to_vec(header).expect("header serialises");
        let mut out = Vec::with_capacity(8 + json.len() + embedded.len());
        out.extend_from_slice(MAGIC);
        out.push(3);
        out.extend_from_slice(
            &u32::try_from(json.len())
                .expect("header under 4 GiB")
                .to_le_bytes(),
        );
        out.extend_from_slice(&json);
        out.extend_from_slice(embedded);
        out
    }

    /// Decode any version; versions 1 and 2 are decoded whole (bounded as before), version 3 only
    /// as far as its header.
    #[allow(clippy::needless_pass_by_value)] // the embedded segment stream is a slice of it
    pub fn decode(b: bytes::Bytes) -> Result<Self, ManifestError> {
        if b.len() < 4 || &b[..3] != MAGIC {
            return Err(ManifestError::Magic);
        }
        if b[3] != 3 {
            let m = ManifestV1::decode(&b)?;
            return Ok(Self {
                header: m.header,
                segments: SegmentSource::Legacy(std::sync::Arc::new(m.segments)),
            });
        }
        let mut r = Reader { b: &b, i: 4 };
        let hlen = u32::from_le_bytes(r.take(4)?.try_into().expect("4 bytes")) as usize;
        if hlen > HEADER_MAX {
            return Err(ManifestError::Malformed("header too large"));
        }
        let header: ObjectHeader = serde_json::from_slice(r.take(hlen)?)
            .map_err(|_| ManifestError::Malformed("header JSON"))?;
        if header.segments.is_none() {
            return Err(ManifestError::Malformed(
                "version 3 header without a segment count",
            ));
        }
        let rest = b.slice(r.i..);
        if !header.chain.is_empty() {
            super::delta::check_chain(&header)?;
            if header.body.is_some() || !rest.is_empty() {
                return Err(ManifestError::Malformed(
                    "a chained segment stream with another one",
                ));
            }
            let chain = header.chain.clone();
            return Ok(Self {
                header,
                segments: SegmentSource::Chain(chain),
            });
        }
        let segments = match &header.body {
            Some(name) if rest.is_empty() => SegmentSource::External(name.clone()),
            Some(_) => return Err(ManifestError::Malformed("trailing bytes")),
            None => SegmentSource::Embedded(rest),
        };
        Ok(Self { header, segments })
    }
}

impl Manifest {
    /// Every segment, loading an external segment stream (or the packs of a chained one) with
    /// `load` (tools and tests; memory grows with the segment count).
    pub fn collect_segments(
        &self,
        mut load: impl FnMut(&str) -> std::io::Result<Vec<u8>>,
    ) -> Result<Vec<Segment>, ManifestError> {
        match &self.segments {
            SegmentSource::Legacy(s) => Ok(s.as_ref().clone()),
            SegmentSource::Embedded(b) => {
                SegmentReader::new(std::io::Cursor::new(b.clone()), &self.header).collect()
            }
            SegmentSource::External(key) => {
                let b =
                    load(key).map_err(|_| ManifestError::Malformed("segment object missing"))?;
                SegmentReader::new(std::io::Cursor::new(b), &self.header).collect()
            }
            SegmentSource::Chain(links) => {
                let raw = super::delta::resolve(links, |l| {
                    let name = &self.header.packs[l.pack as usize];
                    load(name).map_err(|_| ManifestError::Malformed("segment pack missing"))
                })?;
                SegmentReader::raw(std::io::Cursor::new(raw), &self.header).collect()
            }
        }
    }
}

/// Writes a version-3 segment stream: raw DEFLATE of, per segment, a tag byte `0` inline (varint
/// len, bytes) or `1` chunk (varint pack index, zigzag varint of offset minus the end of the previous
/// chunk, varint len, 32-byte SHA-256).
pub struct SegmentWriter<W: Write> {
    z: Deflate<W>,
    prev_end: u64,
    count: u64,
    len: u64,
    scratch: Vec<u8>,
}

/// A DEFLATE stream started only once there is more to compress than `LAZY_DEFLATE` bytes: an
/// encoder holds ~300 KiB of state, and 500 uploads that dribble a few bytes each held one each
/// (issue 16 soak).
enum Deflate<W: Write> {
    Pending(W, Vec<u8>),
    Started(flate2::write::DeflateEncoder<W>),
    /// Only while switching from one to the other.
    Switching,
}

const LAZY_DEFLATE: usize = 16 << 10;

impl<W: Write> Deflate<W> {
    fn start(&mut self) -> std::io::Result<&mut flate2::write::DeflateEncoder<W>> {
        if let Self::Pending(..) = self
            && let Self::Pending(w, pending) = std::mem::replace(self, Self::Switching)
        {
            let mut z = flate2::write::DeflateEncoder::new(w, flate2::Compression::fast());
            z.write_all(&pending)?;
            *self = Self::Started(z);
        }
        match self {
            Self::Started(z) => Ok(z),
            _ => Err(std::io::Error::other("segment stream failed earlier")),
        }
    }

    fn write_all(&mut self, b: &[u8]) -> std::io::Result<()> {
        match self {
            Self::Pending(_, pending) if pending.len() + b.len() <= LAZY_DEFLATE => {
                pending.extend_from_slice(b);
                Ok(())
            }
            _ => self.start()?.write_all(b),
        }
    }

    fn finish(mut self) -> std::io::Result<W> {
        self.start()?;
        match self {
            Self::Started(z) => z.finish(),
            _ => unreachable!("started above"),
        }
    }
}

impl<W: Write> SegmentWriter<W> {
    pub fn new(w: W) -> Self {
        Self {
            z: Deflate::Pending(w, Vec::new()),
            prev_end: 0,
            count: 0,
            len: 0,
            scratch: Vec::with_capacity(64),
        }
    }

    /// Append an inline segment (at most `INLINE_SEG_MAX` bytes).
    pub fn inline(&mut self, b: &[u8]) -> std::io::Result<()> {
        assert!(
            b.len() <= INLINE_SEG_MAX,
            "inline segment of {} bytes",
            b.len()
        );
        self.scratch.clear();
        self.scratch.push(0);
        put_varint(&mut self.scratch, b.len() as u64);
        self.z.write_all(&self.scratch)?;
        self.z.write_all(b)?;
        self.count += 1;
        self.len += b.len() as u64;
        Ok(())
    }

    pub fn chunk(&mut self, c: &ChunkRef) -> std::io::Result<()> {
        debug_assert!(c.offset <= MAX_OFFSET, "chunk offset {}", c.offset);
        self.scratch.clear();
        self.scratch.push(1);
        put_varint(&mut self.scratch, u64::from(c.pack));
        #[allow(clippy::cast_possible_wrap)] // offsets are at most 2^62 (MAX_OFFSET)
        put_varint(
            &mut self.scratch,
            zigzag(c.offset as i64 - self.prev_end as i64),
        );
        put_varint(&mut self.scratch, u64::from(c.len));
        self.scratch.extend_from_slice(&c.sha256);
        self.z.write_all(&self.scratch)?;
        self.prev_end = c.offset + u64::from(c.len);
        self.count += 1;
        self.len += u64::from(c.len);
        Ok(())
    }

    /// Segments written and the object bytes they cover.
    #[must_use]
    pub fn counts(&self) -> (u64, u64) {
        (self.count, self.len)
    }

    pub fn finish(self) -> std::io::Result<W> {
        self.z.finish()
    }
}

/// Reads a version-3 segment stream one segment at a time, checking it against its header: pack
/// indexes in range, inline segments bounded, exactly `segments` of them adding up to `size`.
pub struct SegmentReader<R: Read> {
    z: Source<R>,
    remaining: u64,
    packs: usize,
    size: u64,
    pos: u64,
    prev_end: u64,
    failed: bool,
}

/// Where a segment reader's bytes come from.
enum Source<R: Read> {
    /// A DEFLATE stream (embedded or external).
    Deflate(Box<std::io::BufReader<flate2::read::DeflateDecoder<R>>>),
    /// Uncompressed bytes (a chained stream, already resolved).
    Raw(R),
}

impl<R: Read> Read for Source<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Self::Deflate(z) => z.read(buf),
            Self::Raw(r) => r.read(buf),
        }
    }
}

impl<R: Read> SegmentReader<R> {
    /// Segments from a version-3 DEFLATE segment stream.
    pub fn new(r: R, header: &ObjectHeader) -> Self {
        Self::with_source(
            Source::Deflate(Box::new(std::io::BufReader::with_capacity(
                64 << 10,
                flate2::read::DeflateDecoder::new(r),
            ))),
            header,
        )
    }

    /// Segments from an uncompressed segment stream (a resolved chain).
    pub fn raw(r: R, header: &ObjectHeader) -> Self {
        Self::with_source(Source::Raw(r), header)
    }

    fn with_source(z: Source<R>, header: &ObjectHeader) -> Self {
        Self {
            z,
            remaining: header.segments.unwrap_or(0),
            packs: header.packs.len(),
            size: header.size,
            pos: 0,
            prev_end: 0,
            failed: false,
        }
    }

    fn byte(&mut self) -> Result<u8, ManifestError> {
        let mut b = [0u8; 1];
        self.z
            .read_exact(&mut b)
            .map_err(|_| ManifestError::Malformed("segment stream truncated"))?;
        Ok(b[0])
    }

    fn varint(&mut self) -> Result<u64, ManifestError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = self.byte()?;
            v |= u64::from(byte & 0x7F) << shift;
            if byte & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(ManifestError::Malformed("varint too long"))
    }

    fn segment(&mut self) -> Result<Segment, ManifestError> {
        let seg = match self.byte()? {
            0 => {
                let n = self.varint()?;
                if n > INLINE_SEG_MAX as u64 {
                    return Err(ManifestError::Malformed("inline segment too long"));
                }
                let mut b = vec![0; usize::try_from(n).expect("bounded")];
                self.z
                    .read_exact(&mut b)
                    .map_err(|_| ManifestError::Malformed("segment stream truncated"))?;
                Segment::Inline(b)
            }
            1 => {
                let pack = u32::try_from(self.varint()?)
                    .map_err(|_| ManifestError::Malformed("pack index"))?;
                if pack as usize >= self.packs {
                    return Err(ManifestError::Malformed("pack index out of range"));
                }
                let offset = self
                    .prev_end
                    .checked_add_signed(unzigzag(self.varint()?))
                    .filter(|o| *o <= MAX_OFFSET)
                    .ok_or(ManifestError::Malformed("chunk offset"))?;
                let len = u32::try_from(self.varint()?)
                    .map_err(|_| ManifestError::Malformed("chunk length"))?;
                let mut sha256 = [0u8; 32];
                self.z
                    .read_exact(&mut sha256)
                    .map_err(|_| ManifestError::Malformed("segment stream truncated"))?;
                self.prev_end = offset + u64::from(len);
                Segment::Chunk(ChunkRef {
                    pack,
                    offset,
                    len,
                    sha256,
                })
            }
            _ => return Err(ManifestError::Malformed("unknown segment tag")),
        };
        self.pos = self
            .pos
            .checked_add(seg.len())
            .filter(|p| *p <= self.size)
            .ok_or(ManifestError::Malformed(
                "segment lengths do not add up to the object size",
            ))?;
        Ok(seg)
    }

    fn end(&mut self) -> Result<(), ManifestError> {
        if self.pos != self.size {
            return Err(ManifestError::Malformed(
                "segment lengths do not add up to the object size",
            ));
        }
        let mut b = [0u8; 1];
        match self.z.read(&mut b) {
            Ok(0) => Ok(()),
            Ok(_) => Err(ManifestError::Malformed("trailing bytes in segment stream")),
            Err(_) => Err(ManifestError::Malformed("segment stream")),
        }
    }
}

impl<R: Read> Iterator for SegmentReader<R> {
    type Item = Result<Segment, ManifestError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        let item = if self.remaining == 0 {
            match self.end() {
                Ok(()) => return None,
                Err(e) => Err(e),
            }
        } else {
            self.remaining -= 1;
            self.segment()
        };
        self.failed = item.is_err();
        Some(item)
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
                segments: None,
                body: None,
                attrs: ObjectAttrs::default(),
                chain: Vec::new(),
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

    /// The version-1 encoder as it shipped, to prove old manifests still decode.
    fn encode_v1(m: &ManifestV1) -> Vec<u8> {
        let header = serde_json::to_vec(&m.header).unwrap();
        let mut out = b"SRM\x01".to_vec();
        out.extend_from_slice(&u32::try_from(header.len()).unwrap().to_le_bytes());
        out.extend_from_slice(&header);
        put_varint(&mut out, m.segments.len() as u64);
        for seg in &m.segments {
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

    #[test]
    fn round_trips_and_has_the_documented_layout() {
        let m = sample();
        let enc = m.encode();
        assert_eq!(&enc[..4], b"SRM\x02");
        let zlen = u32::from_le_bytes(enc[4..8].try_into().unwrap()) as usize;
        assert_eq!(enc.len(), 8 + zlen + 32, "one digest after the stream");
        assert_eq!(&enc[8 + zlen..], &[7; 32]);
        let mut body = Vec::new();
        flate2::read::DeflateDecoder::new(&enc[8..8 + zlen])
            .read_to_end(&mut body)
            .unwrap();
        let hlen = u32::from_le_bytes(body[..4].try_into().unwrap()) as usize;
        // count 2; inline "PK\x03\x04x"; chunk: pack 0, offset 200 - 0 zigzagged = 400, len 300.
        assert_eq!(
            &body[4 + hlen..],
            &[
                2, 0, 5, b'P', b'K', 3, 4, b'x', 1, 0, 0x90, 0x03, 0xAC, 0x02
            ]
        );
        assert_eq!(ManifestV1::decode(&enc).unwrap(), m);
    }

    #[test]
    fn consecutive_chunks_and_backward_offsets_round_trip() {
        let mut m = sample();
        m.header.packs.push("p2".into());
        let chunk = |pack, offset, len| {
            Segment::Chunk(ChunkRef {
                pack,
                offset,
                len,
                sha256: [u8::try_from(offset % 251).unwrap(); 32],
            })
        };
        m.segments = vec![
            chunk(0, 1000, 10),
            chunk(0, 1010, 20),
            chunk(1, 0, 5),
            chunk(0, 3, 7),
            Segment::Inline(vec![9; 5000]),
            chunk(1, u64::from(u32::MAX) * 3, 8),
        ];
        m.header.size = m.segments.iter().map(Segment::len).sum();
        let enc = m.encode();
        assert_eq!(ManifestV1::decode(&enc).unwrap(), m);
        assert!(
            enc.len() < 8 + 5 * 32 + 200,
            "inline bytes compress: {}",
            enc.len()
        );
    }

    #[test]
    fn offsets_beyond_any_pack_are_rejected_in_both_versions() {
        let mut m = sample();
        let Segment::Chunk(c) = &mut m.segments[1] else {
            unreachable!()
        };
        c.offset = MAX_OFFSET;
        assert_eq!(ManifestV1::decode(&encode_v1(&m)).unwrap(), m);
        assert_eq!(ManifestV1::decode(&m.encode()).unwrap(), m);
        // The fuzzer's case: a version-1 offset of 2^63 + x decoded, and its re-encoding did not.
        for offset in [MAX_OFFSET + 1, 1 << 63, u64::MAX - 300] {
            let mut bad = m.clone();
            let Segment::Chunk(c) = &mut bad.segments[1] else {
                unreachable!()
            };
            c.offset = offset;
            assert_eq!(
                ManifestV1::decode(&encode_v1(&bad)),
                Err(ManifestError::Malformed("chunk offset beyond any pack")),
                "{offset}"
            );
        }
    }

    #[test]
    fn version_1_manifests_still_decode() {
        let m = sample();
        let v1 = encode_v1(&m);
        assert_eq!(ManifestV1::decode(&v1).unwrap(), m);
        assert_eq!(
            ManifestV1::decode(&v1[..v1.len() - 1]),
            Err(ManifestError::Malformed("truncated"))
        );
    }

    #[test]
    fn rejects_other_versions_truncation_corruption_and_size_mismatch() {
        let enc = sample().encode();
        assert_eq!(
            ManifestV1::decode(&enc[..enc.len() - 1]),
            Err(ManifestError::Malformed("truncated"))
        );
        assert_eq!(
            ManifestV1::decode(&enc[..12]),
            Err(ManifestError::Malformed("truncated"))
        );
        let mut extra = enc.clone();
        extra.push(0);
        assert_eq!(
            ManifestV1::decode(&extra),
            Err(ManifestError::Malformed("trailing bytes"))
        );
        // A cut-short deflate stream (its length field shrunk to match) is rejected, not misread.
        let zlen = u32::from_le_bytes(enc[4..8].try_into().unwrap());
        let mut short = enc[..4].to_vec();
        short.extend_from_slice(&(zlen - 4).to_le_bytes());
        short.extend_from_slice(&enc[8..8 + zlen as usize - 4]);
        short.extend_from_slice(&[7; 32]);
        assert!(
            matches!(ManifestV1::decode(&short), Err(ManifestError::Malformed(_))),
            "{:?}",
            ManifestV1::decode(&short)
        );
        let mut garbled = enc.clone();
        for b in &mut garbled[8..8 + zlen as usize] {
            *b ^= 0x5A;
        }
        assert!(matches!(
            ManifestV1::decode(&garbled),
            Err(ManifestError::Malformed(_))
        ));
        let mut v3 = enc.clone();
        v3[3] = 3;
        assert_eq!(ManifestV1::decode(&v3), Err(ManifestError::Version(3)));
        let mut m = sample();
        m.header.size = 1;
        assert_eq!(
            ManifestV1::decode(&m.encode()),
            Err(ManifestError::Malformed(
                "segment lengths do not add up to the object size"
            ))
        );
        assert_eq!(ManifestV1::decode(b"nope"), Err(ManifestError::Magic));
    }
}
