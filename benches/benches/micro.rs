//! Criterion micro-benchmarks of the cache proxy's hot loops: `FastCDC` chunking, SHA-256, the zip
//! walker, manifest encode/decode and `SigV4` presigned-URL verification.

use std::hint::black_box;
use std::io::Cursor;
use std::time::{Duration, SystemTime};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use sha2::{Digest, Sha256};
use spotrun_benches::data::unique_bytes;
use spotrun_cache_proxy::auth::{self, RequestParts};
use spotrun_cache_proxy::config::AccessKey;
use spotrun_cache_proxy::dedup::manifest::{
    ChunkRef, ManifestV1, ObjectHeader, Segment, SegmentReader, SegmentWriter,
};
use spotrun_cache_proxy::dedup::{DATA_CDC, zip::zip_spans};
use spotrun_cache_proxy::sigv4;
use spotrun_testkit::harness::CacheConfig;
use spotrun_testkit::ziptree::Tree;

const MIB: usize = 1 << 20;

fn chunker_and_sha(c: &mut Criterion) {
    let data = unique_bytes(16 * MIB, 1);
    let mut g = c.benchmark_group("bytes");
    g.throughput(Throughput::Bytes(data.len() as u64));
    g.sample_size(20);
    g.bench_function("sha256 16 MiB", |b| {
        b.iter(|| Sha256::digest(black_box(&data[..])));
    });
    let (min, avg, max) = DATA_CDC;
    g.bench_function("fastcdc boundaries 16 MiB", |b| {
        b.iter(|| fastcdc::v2020::FastCDC::new(black_box(&data[..]), min, avg, max).count());
    });
    g.bench_function("fastcdc stream + sha256 16 MiB", |b| {
        b.iter(|| {
            let mut n = 0u8;
            for chunk in fastcdc::v2020::StreamCDC::new(Cursor::new(&data[..]), min, avg, max) {
                n ^= Sha256::digest(&chunk.expect("in-memory read").data)[0];
            }
            n
        });
    });
    g.finish();
}

fn zip_walker(c: &mut Criterion) {
    let z = Tree::new(1500).zip();
    let mut g = c.benchmark_group("zip");
    g.throughput(Throughput::Elements(1500));
    g.bench_function("zip_spans 1500 entries", |b| {
        b.iter(|| zip_spans(&mut Cursor::new(black_box(&z)), z.len() as u64).expect("valid zip"));
    });
    g.finish();
}

fn sample_manifest(chunks: u32) -> ManifestV1 {
    let mut segments = Vec::new();
    let mut offset = 0;
    for i in 0..chunks {
        let mut header = b"PK\x03\x04".to_vec();
        header.extend_from_slice(format!("node_modules/pkg-{}/lib/file-{i}.js", i / 12).as_bytes());
        segments.push(Segment::Inline(header));
        let len = 20_000 + (i % 7) * 1000;
        segments.push(Segment::Chunk(ChunkRef {
            pack: 0,
            offset,
            len,
            sha256: Sha256::digest(i.to_le_bytes()).into(),
        }));
        offset += u64::from(len);
    }
    let size = segments.iter().map(Segment::len).sum();
    ManifestV1 {
        header: ObjectHeader {
            bucket: "runner-cache".into(),
            key: "runner/abc/project/1/deps-main".into(),
            size,
            etag: "\"0123456789abcdef0123456789abcdef\"".into(),
            last_modified: 1_790_000_000,
            content_type: None,
            metadata: vec![("cachekey".into(), "deps-main".into())],
            packs: vec!["packs/0123456789abcdef0123456789abcdef".into()],
            segments: Some(segments.len() as u64),
            body: None,
            attrs: spotrun_cache_proxy::dedup::manifest::ObjectAttrs::default(),
            chain: Vec::new(),
        },
        segments,
    }
}

/// The version-3 segment stream (what ingest writes and GET reads).
fn encode_stream(m: &ManifestV1) -> Vec<u8> {
    let mut w = SegmentWriter::new(Vec::new());
    for seg in &m.segments {
        match seg {
            Segment::Inline(b) => w.inline(b).expect("to a Vec"),
            Segment::Chunk(c) => w.chunk(c).expect("to a Vec"),
        }
    }
    w.finish().expect("to a Vec")
}

fn manifest(c: &mut Criterion) {
    let m = sample_manifest(1500);
    let enc = encode_stream(&m);
    let mut g = c.benchmark_group("manifest");
    g.throughput(Throughput::Elements(3000));
    g.bench_function("encode 3000 segments", |b| {
        b.iter(|| encode_stream(black_box(&m)));
    });
    g.bench_function("decode 3000 segments", |b| {
        b.iter(|| {
            SegmentReader::new(black_box(&enc[..]), &m.header)
                .collect::<Result<Vec<_>, _>>()
                .expect("valid stream")
        });
    });
    g.finish();
}

fn sigv4_verify(c: &mut Criterion) {
    let cfg = CacheConfig {
        server_address: "127.0.0.1:9000".into(),
        bucket: "runner-cache".into(),
        access_key: "runner-key".into(),
        secret_key: "runner-secret-0123456789".into(),
        region: "us-east-1".into(),
        expires: Duration::from_secs(3600),
    };
    let keys = vec![AccessKey {
        id: cfg.access_key.clone(),
        secret: cfg.secret_key.clone(),
        buckets: Vec::new(),
        prefix: None,
    }];
    let object = "runner/abc/project/1/deps-main";
    let (url, signed) = cfg.presign("PUT", object);
    let target = url.split_once("9000").expect("url has the port").1;
    let (path, query) = target.split_once('?').expect("presigned query");
    let query = sigv4::parse_query(query).expect("valid query");
    let mut headers = http::HeaderMap::new();
    for (k, v) in &signed {
        headers.insert(
            http::HeaderName::from_bytes(k.to_ascii_lowercase().as_bytes()).expect("name"),
            v.parse().expect("value"),
        );
    }
    let parts = RequestParts {
        method: "PUT",
        path: path.as_bytes(),
        query: &query,
        headers: &headers,
        bucket: "runner-cache",
        key: object,
    };
    auth::authenticate(&keys, "us-east-1", &parts, SystemTime::now()).expect("signature verifies");
    c.bench_function("sigv4 verify presigned PUT", |b| {
        b.iter(|| {
            auth::authenticate(&keys, "us-east-1", black_box(&parts), SystemTime::now())
                .expect("signature verifies")
        });
    });
}

criterion_group!(benches, chunker_and_sha, zip_walker, manifest, sigv4_verify);
criterion_main!(benches);
