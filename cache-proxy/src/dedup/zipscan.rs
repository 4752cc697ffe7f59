//! Streaming zip classifier: tells zip structure (local headers, data descriptors, the central
//! directory) from entry data as the body arrives, without waiting for the central directory.
//!
//! Zip headers carry mtimes, so structure and entry data must be chunked apart (reference/cache.md
//! §0.5: reuse fell from ~94 % to 4.5 % when they were mixed). Go's archive/zip (gitlab-runner's
//! cache archiver) sets flag bit 3 and writes sizes only in a data descriptor after the data, so an
//! entry's end is found by its descriptor: the signature `PK\x07\x08` followed by a compressed size
//! equal to the bytes seen since the entry's header. A body that is not a zip, or stops looking like
//! one, is classified as data (plain chunking) or structure from there on: never an error.

/// What a run of bytes holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Zip structure (literal bytes: kept inline or chunked apart).
    Structure,
    /// Entry data, or a whole non-zip body.
    Data,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// The first four bytes decide zip or not.
    Sniff,
    /// Not a zip: everything is data.
    Plain,
    /// At a local file header.
    LocalHeader,
    /// Entry data of known length.
    Known { remaining: u64 },
    /// Entry data whose end is its data descriptor.
    Unknown { seen: u64, zip64: bool },
    /// A data descriptor of this many bytes.
    Descriptor { len: usize },
    /// After an entry: another local header, or the end of the entries.
    AfterEntry,
    /// Central directory and end records (and anything after): structure to the end.
    Tail,
}

const LOCAL_SIG: &[u8; 4] = b"PK\x03\x04";
const DESCRIPTOR_SIG: &[u8; 4] = b"PK\x07\x08";
/// Feeds bytes in, emits `(Kind, &[u8])` runs in body order.
#[derive(Debug)]
pub struct ZipScanner {
    state: State,
    pending: Vec<u8>,
}

impl Default for ZipScanner {
    fn default() -> Self {
        Self::new()
    }
}

fn u16_at(b: &[u8], i: usize) -> u16 {
    u16::from_le_bytes([b[i], b[i + 1]])
}
fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], i: usize) -> u64 {
    u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"))
}

/// The zip64 extended-information extra field's compressed size, if present.
fn zip64_compressed(extra: &[u8]) -> Option<u64> {
    let mut i = 0;
    while i + 4 <= extra.len() {
        let (id, len) = (u16_at(extra, i), usize::from(u16_at(extra, i + 2)));
        let data = extra.get(i + 4..i + 4 + len)?;
        if id == 0x0001 {
            return (data.len() >= 16).then(|| u64_at(data, 8));
        }
        i += 4 + len;
    }
    None
}

impl ZipScanner {
    #[must_use]
    pub fn new() -> Self {
        Self {
            state: State::Sniff,
            pending: Vec::new(),
        }
    }

    /// Classify `input`; `emit` gets runs in order (a kind change ends a run).
    pub fn feed<E>(
        &mut self,
        input: &[u8],
        emit: &mut impl FnMut(Kind, &[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        // Fast paths: bulk data and structure pass through without being copied.
        if self.pending.is_empty() {
            match self.state {
                State::Plain => return emit(Kind::Data, input),
                State::Tail => return emit(Kind::Structure, input),
                State::Known { remaining } if remaining >= input.len() as u64 => {
                    self.state = State::Known {
                        remaining: remaining - input.len() as u64,
                    };
                    return emit(Kind::Data, input);
                }
                _ => {}
            }
        }
        self.pending.extend_from_slice(input);
        let mut at = 0;
        while let Some(used) = self.step(at, false, emit)? {
            at += used;
        }
        self.pending.drain(..at);
        Ok(())
    }

    /// The body ended: emit what is held back.
    pub fn finish<E>(
        &mut self,
        emit: &mut impl FnMut(Kind, &[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut at = 0;
        while let Some(used) = self.step(at, true, emit)? {
            at += used;
        }
        let rest = &self.pending[at..];
        if !rest.is_empty() {
            let kind = match self.state {
                State::Plain | State::Sniff | State::Known { .. } | State::Unknown { .. } => {
                    Kind::Data
                }
                _ => Kind::Structure,
            };
            emit(kind, rest)?;
        }
        self.pending.clear();
        Ok(())
    }

    /// One step from `pending[at..]`: `Some(bytes consumed)` (possibly 0 after a state change), or
    /// `None` when more input is needed.
    fn step<E>(
        &mut self,
        at: usize,
        eof: bool,
        emit: &mut impl FnMut(Kind, &[u8]) -> Result<(), E>,
    ) -> Result<Option<usize>, E> {
        let buf = &self.pending[at..];
        if buf.is_empty() {
            return Ok(None);
        }
        match self.state {
            State::Sniff => {
                if buf.len() < 4 {
                    if eof {
                        self.state = State::Plain;
                        return Ok(Some(0));
                    }
                    return Ok(None);
                }
                self.state = if &buf[..4] == LOCAL_SIG {
                    State::LocalHeader
                } else {
                    State::Plain
                };
                Ok(Some(0))
            }
            State::Plain => {
                emit(Kind::Data, buf)?;
                Ok(Some(buf.len()))
            }
            State::Tail => {
                emit(Kind::Structure, buf)?;
                Ok(Some(buf.len()))
            }
            State::AfterEntry => {
                if buf.len() < 4 {
                    if eof {
                        self.state = State::Tail;
                        return Ok(Some(0));
                    }
                    return Ok(None);
                }
                self.state = if &buf[..4] == LOCAL_SIG {
                    State::LocalHeader
                } else {
                    State::Tail
                };
                Ok(Some(0))
            }
            State::LocalHeader => {
                if buf.len() < 30 {
                    if eof {
                        self.state = State::Tail;
                        return Ok(Some(0));
                    }
                    return Ok(None);
                }
                let flags = u16_at(buf, 6);
                let csize = u32_at(buf, 18);
                let total = 30 + usize::from(u16_at(buf, 26)) + usize::from(u16_at(buf, 28));
                if buf.len() < total {
                    if eof {
                        self.state = State::Tail;
                        return Ok(Some(0));
                    }
                    return Ok(None);
                }
                let extra = &buf[30 + usize::from(u16_at(buf, 26))..total];
                let zip64 = zip64_compressed(extra);
                self.state = if flags & 0x8 != 0 {
                    State::Unknown {
                        seen: 0,
                        zip64: zip64.is_some(),
                    }
                } else {
                    let remaining = if csize == u32::MAX {
                        zip64.unwrap_or(u64::from(csize))
                    } else {
                        u64::from(csize)
                    };
                    State::Known { remaining }
                };
                emit(Kind::Structure, &buf[..total])?;
                if self.state == (State::Known { remaining: 0 }) {
                    self.state = State::AfterEntry;
                }
                Ok(Some(total))
            }
            State::Known { remaining } => {
                let n = usize::try_from(remaining.min(buf.len() as u64)).expect("fits");
                emit(Kind::Data, &buf[..n])?;
                self.state = if remaining == n as u64 {
                    State::AfterEntry
                } else {
                    State::Known {
                        remaining: remaining - n as u64,
                    }
                };
                Ok(Some(n))
            }
            State::Unknown { seen, zip64 } => {
                let need = if zip64 { 24 } else { 16 };
                let mut p = 0;
                let mut undecided = None;
                while let Some(i) = memchr::memmem::find(&buf[p..], DESCRIPTOR_SIG) {
                    let cand = p + i;
                    if cand + need > buf.len() {
                        undecided = Some(cand); // its size field has not arrived yet
                        break;
                    }
                    let data_len = seen + cand as u64;
                    let matches = if zip64 {
                        u64_at(buf, cand + 8) == data_len
                    } else {
                        u64::from(u32_at(buf, cand + 8)) == data_len
                    };
                    if matches {
                        if cand > 0 {
                            emit(Kind::Data, &buf[..cand])?;
                        }
                        self.state = State::Descriptor { len: need };
                        return Ok(Some(cand));
                    }
                    p = cand + 1;
                }
                // Everything before a possible (undecided or partly arrived) signature is data.
                let safe = if eof {
                    buf.len()
                } else {
                    undecided.unwrap_or(buf.len().saturating_sub(DESCRIPTOR_SIG.len() - 1))
                };
                if safe == 0 {
                    return Ok(None);
                }
                emit(Kind::Data, &buf[..safe])?;
                self.state = State::Unknown {
                    seen: seen + safe as u64,
                    zip64,
                };
                Ok(Some(safe))
            }
            State::Descriptor { len } => {
                if buf.len() < len {
                    if eof {
                        self.state = State::Tail;
                        return Ok(Some(0));
                    }
                    return Ok(None);
                }
                emit(Kind::Structure, &buf[..len])?;
                self.state = State::AfterEntry;
                Ok(Some(len))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// Runs of `body` fed in pieces of `step` bytes, adjacent runs of one kind merged.
    fn runs(body: &[u8], step: usize) -> Vec<(Kind, Vec<u8>)> {
        let mut out: Vec<(Kind, Vec<u8>)> = Vec::new();
        let mut emit = |k: Kind, b: &[u8]| -> Result<(), ()> {
            match out.last_mut() {
                Some((last, bytes)) if *last == k => bytes.extend_from_slice(b),
                _ => out.push((k, b.to_vec())),
            }
            Ok(())
        };
        let mut s = ZipScanner::new();
        for piece in body.chunks(step.max(1)) {
            s.feed(piece, &mut emit).unwrap();
        }
        s.finish(&mut emit).unwrap();
        out
    }

    fn zip_of(entries: &[(&str, &[u8])], method: zip::CompressionMethod) -> Vec<u8> {
        let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        for (name, data) in entries {
            w.start_file(
                *name,
                zip::write::SimpleFileOptions::default().compression_method(method),
            )
            .unwrap();
            w.write_all(data).unwrap();
        }
        w.finish().unwrap().into_inner()
    }

    /// What Go's archive/zip writes: flag bit 3, zero sizes in the local header, a signed data
    /// descriptor after the data.
    fn go_style_zip(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut central = Vec::new();
        for (name, data) in entries {
            let offset = u32::try_from(out.len()).unwrap();
            let crc = crc32fast::hash(data);
            let mut lh = Vec::new();
            lh.extend_from_slice(LOCAL_SIG);
            lh.extend_from_slice(&[20, 0, 8, 0, 0, 0, 0, 0, 0, 0]); // version, flags=8, stored, time, date
            lh.extend_from_slice(&[0; 12]); // crc, sizes: in the descriptor
            lh.extend_from_slice(&u16::try_from(name.len()).unwrap().to_le_bytes());
            lh.extend_from_slice(&[0, 0]);
            lh.extend_from_slice(name.as_bytes());
            out.extend_from_slice(&lh);
            out.extend_from_slice(data);
            out.extend_from_slice(DESCRIPTOR_SIG);
            out.extend_from_slice(&crc.to_le_bytes());
            let n = u32::try_from(data.len()).unwrap().to_le_bytes();
            out.extend_from_slice(&n);
            out.extend_from_slice(&n);
            central.extend_from_slice(b"PK\x01\x02");
            central.extend_from_slice(&[0; 38]);
            central.extend_from_slice(&offset.to_le_bytes());
            central.extend_from_slice(name.as_bytes());
        }
        out.extend_from_slice(&central);
        out.extend_from_slice(b"PK\x05\x06");
        out.extend_from_slice(&[0; 18]);
        out
    }

    fn data_of(r: &[(Kind, Vec<u8>)]) -> Vec<Vec<u8>> {
        r.iter()
            .filter(|(k, _)| *k == Kind::Data)
            .map(|(_, b)| b.clone())
            .collect()
    }

    #[test]
    fn plain_bodies_are_one_data_run() {
        for body in [&b""[..], b"abc", b"PK", b"not a zip at all, just bytes"] {
            for step in [1, 3, 1000] {
                let r = runs(body, step);
                let joined: Vec<u8> = r.iter().flat_map(|(_, b)| b.clone()).collect();
                assert_eq!(joined, body);
                assert!(r.iter().all(|(k, _)| *k == Kind::Data), "{r:?}");
            }
        }
    }

    #[test]
    fn entry_data_is_told_from_structure_at_any_feed_size() {
        let payload_a = vec![b'a'; 5000];
        let payload_b =
            b"PK\x07\x08 looks like a descriptor but its size field does not match".repeat(50);
        for zipped in [
            zip_of(
                &[("a.txt", &payload_a), ("b.bin", &payload_b), ("empty", b"")],
                zip::CompressionMethod::Stored,
            ),
            go_style_zip(&[("a.txt", &payload_a), ("b.bin", &payload_b), ("empty", b"")]),
        ] {
            for step in [1, 7, 64, 4096, 1 << 20] {
                let r = runs(&zipped, step);
                let joined: Vec<u8> = r.iter().flat_map(|(_, b)| b.clone()).collect();
                assert_eq!(joined, zipped, "runs cover the body in order");
                assert_eq!(
                    data_of(&r),
                    vec![payload_a.clone(), payload_b.clone()],
                    "step {step}"
                );
            }
        }
    }

    #[test]
    fn deflated_entries_are_data_and_headers_structure() {
        let text = b"hello world, hello zip ".repeat(1000);
        let z = zip_of(&[("t.txt", &text)], zip::CompressionMethod::Deflated);
        let r = runs(&z, 100);
        assert_eq!(r[0].0, Kind::Structure);
        assert_eq!(r[1].0, Kind::Data);
        assert!(r[1].1.len() < text.len(), "compressed data");
        assert_eq!(r[2].0, Kind::Structure);
        assert_eq!(r.len(), 3);
    }

    #[test]
    fn a_truncated_or_garbled_zip_is_still_covered_exactly() {
        let z = go_style_zip(&[("a", &[1u8; 100]), ("b", &[2u8; 100])]);
        for cut in [3, 10, 40, 60, 150, z.len() - 5] {
            let r = runs(&z[..cut], 9);
            let joined: Vec<u8> = r.iter().flat_map(|(_, b)| b.clone()).collect();
            assert_eq!(joined, &z[..cut]);
        }
        let mut bad = z.clone();
        bad[26] = 0xFF; // name length beyond the body
        let r = runs(&bad, 5);
        let joined: Vec<u8> = r.iter().flat_map(|(_, b)| b.clone()).collect();
        assert_eq!(joined, bad);
    }
}
