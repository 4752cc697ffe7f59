//! Structure-aware (issue 16): the input is a script that lays out a zip-like body — local entries
//! stored or "compressed", with and without data descriptors (32- and 64-bit), gaps of junk, raw
//! bytes, central directories with right or wrong offsets, zip64 end records, comments, truncation —
//! which is then ingested and read back through the dedup store on the disk backend. Every body
//! must round-trip byte-identical (whole and a range) and every manifest written must decode.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use spotrun_cache_proxy::dedup::{DedupStore, NewObject};
use spotrun_cache_proxy::metrics::Metrics;
use spotrun_cache_proxy::store::disk::DiskStore;

struct Env {
    rt: tokio::runtime::Runtime,
    store: Arc<DedupStore>,
    _dir: tempfile::TempDir,
}

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let blob = Arc::new(DiskStore::open(dir.path().join("data")).unwrap());
        let store = rt
            .block_on(DedupStore::open(
                blob,
                dir.path().join("spool"),
                Arc::new(Metrics::default()),
            ))
            .unwrap();
        Env {
            rt,
            store: Arc::new(store),
            _dir: dir,
        }
    })
}

/// Reads the script; running out of input ends it (every byte string is a valid script).
struct Script<'a>(&'a [u8]);

impl Script<'_> {
    fn u8(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes([self.u8()?, self.u8()?]))
    }
    fn bytes(&mut self, n: usize) -> &[u8] {
        let (a, b) = self.0.split_at(n.min(self.0.len()));
        self.0 = b;
        a
    }
}

/// Cheap deterministic filler: long gaps and entry bodies without long inputs.
fn filler(seed: u8, n: usize) -> Vec<u8> {
    let mut x = u64::from(seed).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(n + 8);
    while out.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(n);
    out
}

struct Entry {
    offset: u32,
    name: Vec<u8>,
    method: u16,
    flags: u16,
    size: u32,
}

fn layout(data: &[u8]) -> Vec<u8> {
    let mut s = Script(data);
    let mut out = Vec::new();
    let mut entries: Vec<Entry> = Vec::new();
    while let Some(op) = s.u8() {
        if out.len() > 4 << 20 {
            break;
        }
        match op % 7 {
            // A local entry, optionally followed by a data descriptor.
            0 | 1 => {
                let Some(p) = s.u8() else { break };
                let descriptor = op % 7 == 1;
                let method = if p & 1 == 0 { 0 } else { 8 };
                let name = s.bytes(usize::from(p >> 3) + 1).to_vec();
                let len = usize::from(s.u16().unwrap_or(0)) << (p & 6);
                let body = filler(p, len);
                let size = u32::try_from(body.len()).unwrap();
                let flags = if descriptor { 8 } else { 0 };
                entries.push(Entry {
                    offset: u32::try_from(out.len()).unwrap_or(u32::MAX),
                    name: name.clone(),
                    method,
                    flags,
                    size,
                });
                out.extend_from_slice(b"PK\x03\x04\x14\x00");
                out.extend_from_slice(&flags.to_le_bytes());
                out.extend_from_slice(&method.to_le_bytes());
                out.extend_from_slice(&[0; 8]); // time, date, crc
                let sz = if descriptor { 0 } else { size };
                out.extend_from_slice(&sz.to_le_bytes());
                out.extend_from_slice(&sz.to_le_bytes());
                out.extend_from_slice(&u16::try_from(name.len()).unwrap().to_le_bytes());
                out.extend_from_slice(&0u16.to_le_bytes());
                out.extend_from_slice(&name);
                out.extend_from_slice(&body);
                if descriptor {
                    if p & 0x80 != 0 {
                        out.extend_from_slice(b"PK\x07\x08");
                    }
                    out.extend_from_slice(&[0; 4]);
                    if p & 0x40 != 0 {
                        out.extend_from_slice(&u64::from(size).to_le_bytes());
                        out.extend_from_slice(&u64::from(size).to_le_bytes());
                    } else {
                        out.extend_from_slice(&size.to_le_bytes());
                        out.extend_from_slice(&size.to_le_bytes());
                    }
                }
            }
            // A gap of junk, up to 256 KiB.
            2 => {
                let (Some(seed), Some(len)) = (s.u8(), s.u16()) else {
                    break;
                };
                out.extend(filler(seed, usize::from(len) * 4));
            }
            // Raw bytes from the input (signatures, truncated records, anything).
            3 => {
                let n = usize::from(s.u8().unwrap_or(0));
                out.extend_from_slice(s.bytes(n));
            }
            // A central directory of the entries so far, right or skewed offsets, then its end.
            4 | 5 => {
                let skew = u32::from(s.u8().unwrap_or(0));
                let cd_start = out.len();
                for e in &entries {
                    out.extend_from_slice(b"PK\x01\x02\x14\x00\x14\x00");
                    out.extend_from_slice(&e.flags.to_le_bytes());
                    out.extend_from_slice(&e.method.to_le_bytes());
                    out.extend_from_slice(&[0; 8]);
                    out.extend_from_slice(&e.size.to_le_bytes());
                    out.extend_from_slice(&e.size.to_le_bytes());
                    out.extend_from_slice(&u16::try_from(e.name.len()).unwrap().to_le_bytes());
                    out.extend_from_slice(&[0; 12]);
                    out.extend_from_slice(&e.offset.wrapping_add(skew).to_le_bytes());
                    out.extend_from_slice(&e.name);
                }
                let cd_len = out.len() - cd_start;
                let n = u16::try_from(entries.len()).unwrap_or(u16::MAX);
                if op % 7 == 5 {
                    // zip64 end of central directory record and locator.
                    let eocd64 = out.len();
                    out.extend_from_slice(b"PK\x06\x06");
                    out.extend_from_slice(&44u64.to_le_bytes());
                    out.extend_from_slice(&[45, 0, 45, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
                    out.extend_from_slice(&(entries.len() as u64).to_le_bytes());
                    out.extend_from_slice(&(entries.len() as u64).to_le_bytes());
                    out.extend_from_slice(&(cd_len as u64).to_le_bytes());
                    out.extend_from_slice(&(cd_start as u64).to_le_bytes());
                    out.extend_from_slice(b"PK\x06\x07\x00\x00\x00\x00");
                    out.extend_from_slice(&(eocd64 as u64).to_le_bytes());
                    out.extend_from_slice(&1u32.to_le_bytes());
                }
                let comment = s.bytes(skew as usize % 32).to_vec();
                out.extend_from_slice(b"PK\x05\x06\x00\x00\x00\x00");
                out.extend_from_slice(&n.to_le_bytes());
                out.extend_from_slice(&n.to_le_bytes());
                out.extend_from_slice(&u32::try_from(cd_len).unwrap().to_le_bytes());
                out.extend_from_slice(&u32::try_from(cd_start).unwrap_or(u32::MAX).to_le_bytes());
                out.extend_from_slice(&u16::try_from(comment.len()).unwrap().to_le_bytes());
                out.extend_from_slice(&comment);
            }
            // Truncate: the cut archive of a killed job.
            _ => {
                let keep = usize::from(s.u16().unwrap_or(0));
                out.truncate(out.len().saturating_sub(keep));
            }
        }
    }
    out
}

async fn read_back(store: &Arc<DedupStore>, key: &str, start: u64, end: u64) -> Vec<u8> {
    use futures_util::StreamExt as _;
    let m = store
        .manifest("b", key)
        .await
        .expect("every manifest written decodes")
        .expect("the key was just written");
    let mut body = Vec::new();
    let mut st = std::pin::pin!(store.read(m, start, end));
    while let Some(b) = st.next().await {
        body.extend_from_slice(&b.expect("a stored body reads back"));
    }
    body
}

fuzz_target!(|data: &[u8]| {
    let body = layout(data);
    let env = env();
    // Few key names: later bodies overwrite earlier ones and dedup against them.
    let key = format!("cache-{}.zip", data.first().copied().unwrap_or(0) % 4);
    env.rt.block_on(async {
        let obj = NewObject {
            bucket: "b".into(),
            key: key.clone(),
            etag: "\"e\"".into(),
            content_type: None,
            metadata: Vec::new(),
            attrs: Default::default(),
        };
        let h = env
            .store
            .put_bytes(body.clone().into(), obj)
            .await
            .expect("ingest of any body succeeds");
        assert_eq!(h.size, body.len() as u64);
        let size = body.len() as u64;
        assert!(read_back(&env.store, &key, 0, size).await == body, "whole body differs");
        let (a, b) = (size / 3, size - size / 5);
        assert!(
            read_back(&env.store, &key, a, b).await == body[a as usize..b as usize],
            "range {a}..{b} differs"
        );
    });
});
