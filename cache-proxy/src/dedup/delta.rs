//! Segment streams stored as deltas against a similar earlier stream.
//!
//! Versions of one cache (the same tree a few files apart, under the same key or under new keys)
//! have segment streams that differ in a few percent of their bytes, yet each version used to store
//! its stream whole: for a 3,000-file `node_modules` zip about 230 KiB per version, a third of it
//! chunk digests that random bytes do not compress (P5). Here a stream of at most
//! [`DELTA_RAW_MAX`] bytes is stored as a zstd frame in a pack of its own, and a later stream that
//! shares its first chunks is stored as a zstd frame that uses the earlier one's bytes as its prefix
//! (zstd's "patch from"): about a tenth of the size.
//!
//! The chain is at most two links, a whole stream and one delta against it (never a delta of a
//! delta), so a read fetches at most two small packs and holds at most two streams of
//! [`DELTA_RAW_MAX`] bytes while it resolves them. A delta is kept only while it is at most half
//! of its stream stored alone; past that the stream is stored alone and becomes the base for the
//! versions after it.
//!
//! The frames live in packs, so the packs' rules cover them: a manifest lists its links' packs
//! with its chunk packs, GC keeps a pack any manifest lists, and a base is only reused if its
//! pack is neither condemned nor dead, as with chunks. Which earlier stream to use is a hint of
//! this process ([`Bases`]): a miss (another replica, a restart) costs the delta, never data.

use std::collections::HashMap;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};

use super::manifest::{ManifestError, ObjectHeader, Segment, SegmentReader, StreamLink};

/// Largest segment stream stored as a chain (uncompressed). Larger streams are read as they
/// stream; these are held whole while read: about 12 k zip entries or 2 GiB of plain data.
pub const DELTA_RAW_MAX: usize = 2 << 20;
/// zstd window: covers a base and its delta (2 × `DELTA_RAW_MAX`). Decoders refuse larger ones.
const WINDOW_LOG: u32 = 22;
const LEVEL: i32 = 3;
/// Chunk digests from the start of a stream that name it in [`Bases`].
const HINT_CHUNKS: usize = 16;
/// Bases this process remembers, and their bytes in all.
const BASES_MAX: usize = 32;
const BASES_BYTES: usize = 16 << 20;

/// A stream stored alone that later streams may be stored against.
#[derive(Debug, Clone)]
pub struct Base {
    pub pack: Arc<str>,
    pub len: u32,
    pub sha256: [u8; 32],
    pub raw: Arc<[u8]>,
}

impl Base {
    /// Its link, with `pack` its index in the manifest being written.
    #[must_use]
    pub fn link(&self, pack: u32) -> StreamLink {
        StreamLink {
            pack,
            len: self.len,
            sha256: hex::encode(self.sha256),
            raw: u32::try_from(self.raw.len()).expect("bounded by DELTA_RAW_MAX"),
        }
    }
}

/// The bases this process stored last, found by the chunk digests their streams start with.
#[derive(Default)]
pub struct Bases {
    inner: Mutex<BasesInner>,
}

impl std::fmt::Debug for Bases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let inner = self.inner.lock().expect("bases lock");
        f.debug_struct("Bases")
            .field("count", &inner.bases.len())
            .field("bytes", &inner.bytes)
            .finish()
    }
}

#[derive(Default)]
struct BasesInner {
    next: u64,
    order: VecDeque<u64>,
    bases: HashMap<u64, (Base, Vec<[u8; 32]>)>,
    by_digest: HashMap<[u8; 32], u64>,
    bytes: usize,
}

impl Bases {
    /// The remembered base sharing most of `digests` (the first chunk digests of a new stream).
    pub fn find(&self, digests: &[[u8; 32]]) -> Option<Base> {
        let inner = self.inner.lock().expect("bases lock");
        let mut votes: HashMap<u64, usize> = HashMap::new();
        for d in digests {
            if let Some(id) = inner.by_digest.get(d) {
                *votes.entry(*id).or_default() += 1;
            }
        }
        let (id, _) = votes.into_iter().max_by_key(|(id, n)| (*n, *id))?;
        inner.bases.get(&id).map(|(b, _)| b.clone())
    }

    /// Remember `base`, named by `digests`; the oldest bases are forgotten past the bounds.
    pub fn add(&self, base: Base, digests: Vec<[u8; 32]>) {
        if digests.is_empty() {
            return;
        }
        let mut inner = self.inner.lock().expect("bases lock");
        let id = inner.next;
        inner.next += 1;
        for d in &digests {
            inner.by_digest.insert(*d, id);
        }
        inner.bytes += base.raw.len();
        inner.bases.insert(id, (base, digests));
        inner.order.push_back(id);
        while inner.order.len() > BASES_MAX || inner.bytes > BASES_BYTES {
            let Some(old) = inner.order.pop_front() else {
                break;
            };
            if let Some((b, ds)) = inner.bases.remove(&old) {
                inner.bytes -= b.raw.len();
                for d in ds {
                    if inner.by_digest.get(&d) == Some(&old) {
                        inner.by_digest.remove(&d);
                    }
                }
            }
        }
    }
}

/// The first chunk digests of an uncompressed segment stream (those that name it in [`Bases`]).
#[must_use]
pub fn first_digests(raw: &[u8], header: &ObjectHeader) -> Vec<[u8; 32]> {
    SegmentReader::raw(std::io::Cursor::new(raw), header)
        .map_while(Result::ok)
        .filter_map(|s| match s {
            Segment::Chunk(c) => Some(c.sha256),
            Segment::Inline(_) => None,
        })
        .take(HINT_CHUNKS)
        .collect()
}

/// A zstd frame of `raw`, with `base`'s bytes as its prefix when given.
pub fn compress(raw: &[u8], base: Option<&[u8]>) -> std::io::Result<Vec<u8>> {
    use zstd::zstd_safe::{CCtx, CParameter};
    let err = |c: usize| std::io::Error::other(zstd::zstd_safe::get_error_name(c));
    let mut cctx = CCtx::create();
    cctx.set_parameter(CParameter::CompressionLevel(LEVEL))
        .map_err(err)?;
    cctx.set_parameter(CParameter::WindowLog(WINDOW_LOG))
        .map_err(err)?;
    cctx.set_parameter(CParameter::ContentSizeFlag(true))
        .map_err(err)?;
    if let Some(b) = base {
        cctx.ref_prefix(b).map_err(err)?;
    }
    let mut out = Vec::with_capacity(zstd::zstd_safe::compress_bound(raw.len()));
    cctx.compress2(&mut out, raw).map_err(err)?;
    Ok(out)
}

/// The bytes of one frame, which must be exactly `raw` long (a frame that claims more is refused
/// before it is decoded further: memory stays bounded by the link).
pub fn decompress(frame: &[u8], raw: usize, base: Option<&[u8]>) -> Result<Vec<u8>, ManifestError> {
    use zstd::zstd_safe::{DCtx, DParameter};
    let bad = |_| ManifestError::Malformed("segment stream frame does not decompress");
    let mut dctx = DCtx::create();
    dctx.set_parameter(DParameter::WindowLogMax(WINDOW_LOG))
        .map_err(bad)?;
    if let Some(b) = base {
        dctx.ref_prefix(b).map_err(bad)?;
    }
    let mut out = Vec::with_capacity(raw);
    dctx.decompress(&mut out, frame).map_err(bad)?;
    if out.len() != raw {
        return Err(ManifestError::Malformed(
            "segment stream frame has the wrong length",
        ));
    }
    Ok(out)
}

/// The header's chain is well formed: one or two links, in its pack list, within the bounds.
pub fn check_chain(header: &ObjectHeader) -> Result<(), ManifestError> {
    if header.chain.len() > 2 {
        return Err(ManifestError::Malformed("segment chain longer than two"));
    }
    for l in &header.chain {
        if l.pack as usize >= header.packs.len() {
            return Err(ManifestError::Malformed("segment link pack out of range"));
        }
        if l.raw as usize > DELTA_RAW_MAX {
            return Err(ManifestError::Malformed("segment link too large"));
        }
        if l.sha256.len() != 64 || hex::decode(&l.sha256).is_err() {
            return Err(ManifestError::Malformed("segment link digest"));
        }
    }
    Ok(())
}

/// The uncompressed stream of `links`, each frame fetched with `fetch` and checked against its
/// digest before it is decoded.
pub fn resolve(
    links: &[StreamLink],
    mut fetch: impl FnMut(&StreamLink) -> Result<Vec<u8>, ManifestError>,
) -> Result<Vec<u8>, ManifestError> {
    let mut prev: Option<Vec<u8>> = None;
    for l in links {
        let frame = fetch(l)?;
        if frame.len() != l.len as usize || hex::encode(Sha256::digest(&frame)) != l.sha256 {
            return Err(ManifestError::Malformed(
                "segment stream frame does not match its digest",
            ));
        }
        prev = Some(decompress(&frame, l.raw as usize, prev.as_deref())?);
    }
    prev.ok_or(ManifestError::Malformed("empty segment chain"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(n: usize, changed: &[usize]) -> Vec<u8> {
        let mut out = Vec::new();
        for i in 0..n {
            let mut rec = format!("node_modules/pkg-{}/lib/file-{i}.js", i / 12).into_bytes();
            let salt = if changed.contains(&i) { b"v2" } else { b"v1" };
            rec.extend_from_slice(&Sha256::digest([&i.to_le_bytes()[..], salt].concat()));
            out.extend_from_slice(&rec);
        }
        out
    }

    #[test]
    fn a_delta_against_a_similar_stream_is_a_fraction_of_it_and_decodes_back() {
        let v1 = stream(3000, &[]);
        let changed: Vec<usize> = (0..3000).step_by(20).collect();
        let v2 = stream(3000, &changed);
        let alone = compress(&v2, None).unwrap();
        let delta = compress(&v2, Some(&v1)).unwrap();
        assert!(
            delta.len() * 4 < alone.len(),
            "delta {} vs alone {}",
            delta.len(),
            alone.len()
        );
        assert_eq!(decompress(&alone, v2.len(), None).unwrap(), v2);
        assert_eq!(decompress(&delta, v2.len(), Some(&v1)).unwrap(), v2);
        // Without its base, or with an unrelated one, the delta does not decode to the stream
        // (which is why a base's frame is checked against its digest first).
        assert!(decompress(&delta, v2.len(), None).is_err_or_differs(&v2));
        let unrelated = vec![7u8; v1.len()];
        assert!(decompress(&delta, v2.len(), Some(&unrelated)).is_err_or_differs(&v2));
    }

    trait ErrOrDiffers {
        fn is_err_or_differs(&self, want: &[u8]) -> bool;
    }
    impl ErrOrDiffers for Result<Vec<u8>, ManifestError> {
        fn is_err_or_differs(&self, want: &[u8]) -> bool {
            self.as_ref().map_or(true, |got| got != want)
        }
    }

    #[test]
    fn a_frame_longer_than_its_link_says_is_refused() {
        let v = stream(100, &[]);
        let frame = compress(&v, None).unwrap();
        assert_eq!(
            decompress(&frame, v.len() - 1, None).unwrap_err(),
            ManifestError::Malformed("segment stream frame does not decompress")
        );
        assert!(decompress(b"not zstd", 10, None).is_err());
    }

    #[test]
    fn resolve_checks_each_frame_against_its_digest() {
        let v1 = stream(200, &[]);
        let v2 = stream(200, &[3, 150]);
        let (f1, f2) = (
            compress(&v1, None).unwrap(),
            compress(&v2, Some(&v1)).unwrap(),
        );
        let link = |pack, f: &[u8], raw: &[u8]| StreamLink {
            pack,
            len: u32::try_from(f.len()).unwrap(),
            sha256: hex::encode(Sha256::digest(f)),
            raw: u32::try_from(raw.len()).unwrap(),
        };
        let links = [link(0, &f1, &v1), link(1, &f2, &v2)];
        let frames = [f1.clone(), f2.clone()];
        assert_eq!(
            resolve(&links, |l| Ok(frames[l.pack as usize].clone())).unwrap(),
            v2
        );
        let mut tampered = f2.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        let frames = [f1, tampered];
        assert_eq!(
            resolve(&links, |l| Ok(frames[l.pack as usize].clone())).unwrap_err(),
            ManifestError::Malformed("segment stream frame does not match its digest")
        );
    }

    #[test]
    fn a_manifest_with_a_malformed_chain_is_refused_with_what_is_wrong() {
        use super::super::manifest::{Manifest, ObjectAttrs};
        let link = |pack| StreamLink {
            pack,
            len: 10,
            sha256: "ab".repeat(32),
            raw: 100,
        };
        let header = |chain: Vec<StreamLink>, body: Option<&str>| ObjectHeader {
            bucket: "b".into(),
            key: "k".into(),
            size: 1,
            etag: "\"e\"".into(),
            last_modified: 0,
            content_type: None,
            metadata: vec![],
            packs: vec!["packs/a".into(), "packs/b".into()],
            segments: Some(1),
            body: body.map(str::to_owned),
            attrs: ObjectAttrs::default(),
            chain,
        };
        let decode = |h: &ObjectHeader, embedded: &[u8]| {
            Manifest::decode(Manifest::encode_v3(h, embedded).into()).map(|m| m.segments)
        };
        assert!(matches!(
            decode(&header(vec![link(0), link(1)], None), b""),
            Ok(super::super::manifest::SegmentSource::Chain(l)) if l.len() == 2
        ));
        let refused = |h: ObjectHeader, embedded: &[u8], why: &'static str| {
            assert_eq!(
                decode(&h, embedded).unwrap_err(),
                ManifestError::Malformed(why)
            );
        };
        refused(
            header(vec![link(0); 3], None),
            b"",
            "segment chain longer than two",
        );
        refused(
            header(vec![link(2)], None),
            b"",
            "segment link pack out of range",
        );
        let mut bad = link(0);
        bad.sha256 = "xy".repeat(32);
        refused(header(vec![bad], None), b"", "segment link digest");
        let mut big = link(0);
        big.raw = u32::try_from(DELTA_RAW_MAX).unwrap() + 1;
        refused(header(vec![big], None), b"", "segment link too large");
        refused(
            header(vec![link(0)], Some("mbodies/x")),
            b"",
            "a chained segment stream with another one",
        );
        refused(
            header(vec![link(0)], None),
            b"junk",
            "a chained segment stream with another one",
        );
    }

    #[test]
    fn bases_are_found_by_shared_digests_and_forgotten_oldest_first() {
        let bases = Bases::default();
        let base = |n: u8| Base {
            pack: format!("packs/{n}").into(),
            len: 1,
            sha256: [n; 32],
            raw: Arc::from(vec![0u8; BASES_BYTES / 3 + 1]),
        };
        bases.add(base(1), vec![[1; 32], [2; 32]]);
        bases.add(base(2), vec![[3; 32]]);
        assert_eq!(&*bases.find(&[[9; 32], [2; 32]]).unwrap().pack, "packs/1");
        assert_eq!(&*bases.find(&[[3; 32]]).unwrap().pack, "packs/2");
        assert!(bases.find(&[[9; 32]]).is_none());
        // A third exceeds the byte bound: the oldest goes, with its digests.
        bases.add(base(3), vec![[4; 32]]);
        assert!(bases.find(&[[1; 32]]).is_none());
        assert!(bases.find(&[[2; 32]]).is_none());
        assert_eq!(&*bases.find(&[[3; 32]]).unwrap().pack, "packs/2");
        assert_eq!(&*bases.find(&[[4; 32]]).unwrap().pack, "packs/3");
    }
}
