//! Generated dependency-tree cache archives (deflate, thousands of small files) and their versions:
//! content churn, mtime-only changes, and the ideal store size for a history of them.

use std::io::{Cursor, Write};

use zip::write::SimpleFileOptions;

const WORDS: &[&str] = &[
    "fn",
    "let",
    "mut",
    "pub",
    "struct",
    "impl",
    "return",
    "match",
    "self",
    "Some",
    "None",
    "Ok",
    "Err",
    "usize",
    "String",
    "vec",
    "iter",
    "map",
    "collect",
    "into",
    "clone",
    "unwrap",
    "value",
    "config",
    "request",
    "response",
    "error",
    "buffer",
    "module",
    "export",
    "require",
    "function",
    "const",
    "import",
    "from",
    "package",
    "version",
    "dependency",
    "=>",
    "{",
    "}",
];

/// A zip mtime: year, month, day, hour, minute, second.
pub type Mtime = (u16, u8, u8, u8, u8, u8);

/// A dependency tree: (path, content, mtime) per file.
pub struct Tree {
    pub files: Vec<(String, Vec<u8>, Mtime)>,
}

fn rng(seed: u64) -> impl FnMut() -> u64 {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    }
}

/// The content of generated file number `seed` (deterministic).
#[must_use]
pub fn source_file(seed: u64) -> Vec<u8> {
    let mut r = rng(seed);
    // Mostly small files with a long tail, like node_modules or a vendored crate tree.
    let lines = 20 + (r() % 120) + if r().is_multiple_of(10) { r() % 800 } else { 0 };
    let mut out = Vec::new();
    for _ in 0..lines {
        let n = 3 + r() % 9;
        for _ in 0..n {
            out.extend_from_slice(
                WORDS[usize::try_from(r() % WORDS.len() as u64).expect("small index")].as_bytes(),
            );
            out.push(b' ');
        }
        out.extend_from_slice(format!("{}\n", r() % 1000).as_bytes());
    }
    out
}

impl Tree {
    /// `files` generated source files, all with the same mtime.
    #[must_use]
    pub fn new(files: usize) -> Self {
        let files = (0..files)
            .map(|i| {
                (
                    format!("node_modules/pkg-{}/lib/file-{i}.js", i / 12),
                    source_file(i as u64 + 1),
                    (2026, 1, 1, 0, 0, 0),
                )
            })
            .collect();
        Self { files }
    }

    /// Change `percent` % of the files (content and mtime), chosen by `seed`.
    pub fn churn(&mut self, percent: u64, seed: u64, version: u8) {
        let mut r = rng(seed);
        for f in &mut self.files {
            if r() % 100 < percent {
                f.1.extend_from_slice(format!("// patched in version {version}\n").as_bytes());
                f.1.rotate_left(7);
                f.2 = (2026, 2, 1 + version, 12, 0, 0);
            }
        }
    }

    /// A new mtime on every file, contents unchanged.
    pub fn touch_all(&mut self) {
        for f in &mut self.files {
            f.2 = (2026, 3, 3, 3, 3, 4);
        }
    }

    /// The archive, like `gitlab-runner cache-archiver` writes it (deflate).
    #[must_use]
    pub fn zip(&self) -> Vec<u8> {
        let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
        for (name, data, (y, mo, d, h, mi, s)) in &self.files {
            let opts = SimpleFileOptions::default()
                .compression_method(zip::CompressionMethod::Deflated)
                .compression_level(Some(5))
                .last_modified_time(
                    zip::DateTime::from_date_and_time(*y, *mo, *d, *h, *mi, *s).unwrap(),
                );
            w.start_file(name.as_str(), opts).unwrap();
            w.write_all(data).unwrap();
        }
        w.finish().unwrap().into_inner()
    }
}

/// Sum of compressed entry data that is new compared with everything seen before (the ideal store).
#[must_use]
pub fn new_entry_bytes(
    zip_bytes: &[u8],
    seen: &mut std::collections::HashSet<(String, u32, u64), impl std::hash::BuildHasher>,
) -> u64 {
    let mut a = zip::ZipArchive::new(Cursor::new(zip_bytes)).unwrap();
    let mut total = 0;
    for i in 0..a.len() {
        let f = a.by_index_raw(i).unwrap();
        if seen.insert((
            f.name().expect("entry name").to_string(),
            f.crc32(),
            f.compressed_size(),
        )) {
            total += f.compressed_size();
        }
    }
    total
}
