//! The chunk index: SHA-256 → where a stored copy of the chunk is.
//!
//! Persistent and incremental. Each pack has an index object in the backend (`packidx/…`: its
//! chunks' digests and lengths) written right after the pack; each replica keeps a local embedded
//! database (redb) as its cache of them, refreshed from the index objects newer than its watermark
//! (pack names start with their creation time, so a listing can start after the watermark). Lookups
//! read a snapshot (no lock shared with writers). The local index is only a hint: an entry missing is
//! a missed dedup; an entry pointing at a condemned or deleted pack is filtered out before use, and
//! the publish step checks that every reused pack still exists.

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

/// digest → (pack, offset, len)
const CHUNKS: TableDefinition<&[u8; 32], (&str, u64, u32)> = TableDefinition::new("chunks");
/// packs whose chunks are in `CHUNKS` → chunk count
const PACKS: TableDefinition<&str, u64> = TableDefinition::new("packs");
/// packs known to be gone (deleted or condemned by a GC): their chunks are never used
const DEAD: TableDefinition<&str, ()> = TableDefinition::new("dead");
/// "watermark" → the newest pack index object loaded
const META: TableDefinition<&str, &str> = TableDefinition::new("meta");

/// Index objects are listed from this long before the watermark: a pack's index object is written
/// when its upload ends, which can be well after the time in its name.
pub const REFRESH_LOOKBACK: Duration = Duration::from_mins(30);
/// Every this many commits one is made durable (redb frees pages only on durable commits); the
/// others may be lost by a crash, which only costs dedup hits.
const DURABLE_EVERY: u64 = 64;

/// redb page cache of the local index (its write buffer is half of it). It bounds what the index
/// holds in memory, at start too (recovery after an unclean stop reads through it): lookups that
/// miss it read the file through the OS page cache.
const INDEX_CACHE_BYTES: usize = 8 << 20;

/// Where a chunk is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loc {
    pub pack: Arc<str>,
    pub offset: u64,
    pub len: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("local chunk index {path}: {source}")]
    Local {
        path: String,
        #[source]
        source: redb::Error,
    },
    #[error("pack index object {key}: {reason}")]
    Object { key: String, reason: &'static str },
}

/// A new pack's name: `packs/` + 13 hex digits of Unix milliseconds + 16 random hex digits, so names
/// sort by creation time.
#[must_use]
pub fn new_pack_name(now: SystemTime) -> String {
    format!(
        "packs/{:013x}{:016x}",
        now.duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis()),
        rand::random::<u64>()
    )
}

/// The creation time in a generated pack or segment-object name (`<prefix>/<13 hex ms><16 hex>`);
/// `None` for names of earlier releases (random only).
#[must_use]
pub fn name_time(name: &str) -> Option<SystemTime> {
    let tail = name.rsplit('/').next()?;
    if tail.len() != 29 {
        return None;
    }
    let ms = u64::from_str_radix(&tail[..13], 16).ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_millis(ms))
}

/// The index object of `pack`.
#[must_use]
pub fn pack_index_key(pack: &str) -> String {
    format!("packidx/{}", pack.trim_start_matches("packs/"))
}

/// The pack an index object describes.
#[must_use]
pub fn pack_of_index_key(key: &str) -> String {
    format!("packs/{}", key.trim_start_matches("packidx/"))
}

/// The listing start for index objects of packs created after `t`.
#[must_use]
pub fn index_key_at(t: SystemTime) -> String {
    format!(
        "packidx/{:013x}",
        t.duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis())
    )
}

const PACKIDX_MAGIC: &[u8; 4] = b"SRP1";

/// Pack index object: `b"SRP1"`, u32-LE count, then per chunk in pack order its SHA-256 and u32-LE
/// length (chunks are stored back to back, so offsets are implied), then a CRC32 of all before it.
#[must_use]
pub fn encode_pack_index(entries: &[([u8; 32], u32)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(12 + entries.len() * 36);
    out.extend_from_slice(PACKIDX_MAGIC);
    out.extend_from_slice(
        &u32::try_from(entries.len())
            .expect("fewer than 4G chunks per pack")
            .to_le_bytes(),
    );
    for (sha, len) in entries {
        out.extend_from_slice(sha);
        out.extend_from_slice(&len.to_le_bytes());
    }
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// Entries of a pack index object as `(sha, offset, len)`, checked whole first and then decoded as
/// they are consumed (a pack of tiny chunks has a few hundred thousand).
pub fn decode_pack_index<'a>(
    key: &str,
    b: &'a [u8],
) -> Result<impl Iterator<Item = ([u8; 32], u64, u32)> + Send + 'a, IndexError> {
    let bad = |reason| IndexError::Object {
        key: key.to_owned(),
        reason,
    };
    if b.len() < 12 || &b[..4] != PACKIDX_MAGIC {
        return Err(bad("no SRP1 magic"));
    }
    let (body, crc) = b.split_at(b.len() - 4);
    if crc32fast::hash(body).to_le_bytes() != crc {
        return Err(bad("checksum mismatch"));
    }
    let count = u32::from_le_bytes(body[4..8].try_into().expect("4 bytes")) as usize;
    if body.len() != 8 + count * 36 {
        return Err(bad("length does not match the chunk count"));
    }
    let entries = body[8..].chunks_exact(36).map(|e| {
        let sha: [u8; 32] = e[..32].try_into().expect("32 bytes");
        (
            sha,
            u32::from_le_bytes(e[32..].try_into().expect("4 bytes")),
        )
    });
    Ok(with_offsets(entries))
}

/// `(sha, len)` of chunks stored back to back, as `(sha, offset, len)`.
pub fn with_offsets(
    entries: impl Iterator<Item = ([u8; 32], u32)>,
) -> impl Iterator<Item = ([u8; 32], u64, u32)> {
    entries.scan(0u64, |offset, (sha, len)| {
        let at = *offset;
        *offset += u64::from(len);
        Some((sha, at, len))
    })
}

/// The local database.
pub struct ChunkIndex {
    db: redb::Database,
    path: String,
    commits: std::sync::atomic::AtomicU64,
    /// In-memory copy of `DEAD` (small: packs deleted since this index was made).
    dead: Mutex<HashSet<Arc<str>>>,
}

impl std::fmt::Debug for ChunkIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkIndex")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl ChunkIndex {
    /// Open (or create) the database at `path`. A file redb cannot open is moved aside and a new one
    /// started: it is a cache of the backend's index objects.
    pub fn open(path: &Path) -> Result<Self, IndexError> {
        let shown = path.display().to_string();
        let err = |e: redb::Error| IndexError::Local {
            path: shown.clone(),
            source: e,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| err(redb::Error::Io(e)))?;
        }
        // redb's page cache defaults to 1 GiB; the index is a hint, so a small cache bounds memory.
        let builder = || {
            let mut b = redb::Builder::new();
            b.set_cache_size(INDEX_CACHE_BYTES);
            b
        };
        let db = match builder().create(path) {
            Ok(db) => db,
            Err(e @ redb::DatabaseError::DatabaseAlreadyOpen) => return Err(err(e.into())),
            Err(e) => {
                tracing::warn!(path = %shown, error = %e, "local chunk index unreadable; starting a new one");
                let aside = path.with_extension("corrupt");
                std::fs::rename(path, &aside).map_err(|e| err(redb::Error::Io(e)))?;
                builder().create(path).map_err(|e| err(e.into()))?
            }
        };
        let this = Self {
            db,
            path: shown,
            commits: std::sync::atomic::AtomicU64::new(0),
            dead: Mutex::new(HashSet::new()),
        };
        let dead = this.with_write(|txn| {
            txn.open_table(CHUNKS)?;
            txn.open_table(PACKS)?;
            txn.open_table(META)?;
            let t = txn.open_table(DEAD)?;
            let mut dead = HashSet::new();
            for item in t.iter()? {
                let (k, _) = item?;
                dead.insert(Arc::from(k.value()));
            }
            Ok(dead)
        })?;
        *this.dead.lock().expect("dead lock") = dead;
        Ok(this)
    }

    /// An empty index in memory, for maintenance commands (`gc`, `stats`) that run beside a
    /// server holding the on-disk one and need no dedup decisions.
    pub fn in_memory() -> Result<Self, IndexError> {
        let err = |e: redb::Error| IndexError::Local {
            path: "(memory)".into(),
            source: e,
        };
        let db = redb::Builder::new()
            .create_with_backend(redb::backends::InMemoryBackend::new())
            .map_err(|e| err(e.into()))?;
        let this = Self {
            db,
            path: "(memory)".into(),
            commits: std::sync::atomic::AtomicU64::new(0),
            dead: Mutex::new(HashSet::new()),
        };
        this.with_write(|txn| {
            txn.open_table(CHUNKS)?;
            txn.open_table(PACKS)?;
            txn.open_table(META)?;
            txn.open_table(DEAD)?;
            Ok(())
        })?;
        Ok(this)
    }

    fn err(&self, e: impl Into<redb::Error>) -> IndexError {
        IndexError::Local {
            path: self.path.clone(),
            source: e.into(),
        }
    }

    fn with_write<T>(
        &self,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<T, redb::Error>,
    ) -> Result<T, IndexError> {
        let mut txn = self.db.begin_write().map_err(|e| self.err(e))?;
        let n = self
            .commits
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if !n.is_multiple_of(DURABLE_EVERY) {
            txn.set_durability(redb::Durability::None)
                .map_err(|e| self.err(e))?;
        }
        let out = f(&txn).map_err(|e| self.err(e))?;
        txn.commit().map_err(|e| self.err(e))?;
        Ok(out)
    }

    /// A snapshot for lookups.
    pub fn reader(&self) -> Result<IndexReader, IndexError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = txn.open_table(CHUNKS).map_err(|e| self.err(e))?;
        Ok(IndexReader { table })
    }

    /// Whether `pack`'s chunks are already loaded (or the pack is known gone).
    pub fn knows_pack(&self, pack: &str) -> Result<bool, IndexError> {
        if self.is_dead(pack) {
            return Ok(true);
        }
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = txn.open_table(PACKS).map_err(|e| self.err(e))?;
        Ok(t.get(pack).map_err(|e| self.err(e))?.is_some())
    }

    /// Those of `packs` whose chunks are not loaded yet (and that are not known gone), in order;
    /// one snapshot for the lot.
    pub fn unknown_packs(&self, packs: Vec<String>) -> Result<Vec<String>, IndexError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = txn.open_table(PACKS).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for p in packs {
            if !self.is_dead(&p) && t.get(p.as_str()).map_err(|e| self.err(e))?.is_none() {
                out.push(p);
            }
        }
        Ok(out)
    }

    #[must_use]
    pub fn is_dead(&self, pack: &str) -> bool {
        self.dead.lock().expect("dead lock").contains(pack)
    }

    /// Record a stored pack's chunks (newest location wins).
    pub fn add_pack(
        &self,
        pack: &str,
        entries: impl IntoIterator<Item = ([u8; 32], u64, u32)>,
    ) -> Result<(), IndexError> {
        if self.is_dead(pack) {
            return Ok(());
        }
        self.with_write(|txn| {
            let mut chunks = txn.open_table(CHUNKS)?;
            let mut count = 0u64;
            for (sha, offset, len) in entries {
                chunks.insert(&sha, (pack, offset, len))?;
                count += 1;
            }
            txn.open_table(PACKS)?.insert(pack, count)?;
            Ok(())
        })
    }

    /// Never use `pack` again (deleted, condemned, or found missing).
    pub fn forget_pack(&self, pack: &str) -> Result<(), IndexError> {
        self.dead.lock().expect("dead lock").insert(Arc::from(pack));
        self.with_write(|txn| {
            txn.open_table(PACKS)?.remove(pack)?;
            txn.open_table(DEAD)?.insert(pack, ())?;
            Ok(())
        })
    }

    pub fn watermark(&self) -> Result<Option<String>, IndexError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = txn.open_table(META).map_err(|e| self.err(e))?;
        Ok(t.get("watermark")
            .map_err(|e| self.err(e))?
            .map(|v| v.value().to_owned()))
    }

    pub fn set_watermark(&self, key: &str) -> Result<(), IndexError> {
        self.with_write(|txn| {
            txn.open_table(META)?.insert("watermark", key)?;
            Ok(())
        })
    }

    /// Number of chunks indexed (for stats and tests).
    pub fn len(&self) -> Result<u64, IndexError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = txn.open_table(CHUNKS).map_err(|e| self.err(e))?;
        t.len().map_err(|e| self.err(e))
    }

    pub fn is_empty(&self) -> Result<bool, IndexError> {
        Ok(self.len()? == 0)
    }
}

/// A read snapshot of the index.
pub struct IndexReader {
    table: redb::ReadOnlyTable<&'static [u8; 32], (&'static str, u64, u32)>,
}

impl IndexReader {
    pub fn get(&self, sha: &[u8; 32]) -> Result<Option<Loc>, redb::StorageError> {
        Ok(self.table.get(sha)?.map(|v| {
            let (pack, offset, len) = v.value();
            Loc {
                pack: Arc::from(pack),
                offset,
                len,
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_index_objects_round_trip_and_reject_damage() {
        let entries = [([1u8; 32], 10u32), ([2u8; 32], 20), ([3u8; 32], 5)];
        let enc = encode_pack_index(&entries);
        assert_eq!(enc.len(), 8 + 3 * 36 + 4);
        assert_eq!(
            decode_pack_index("k", &enc).unwrap().collect::<Vec<_>>(),
            vec![([1u8; 32], 0, 10), ([2u8; 32], 10, 20), ([3u8; 32], 30, 5)]
        );
        let mut bad = enc.clone();
        bad[20] ^= 1;
        assert!(matches!(
            decode_pack_index("k", &bad),
            Err(IndexError::Object {
                reason: "checksum mismatch",
                ..
            })
        ));
        assert!(decode_pack_index("k", &enc[..enc.len() - 1]).is_err());
        assert!(decode_pack_index("k", b"nope").is_err());
    }

    #[test]
    fn pack_names_sort_by_time_and_map_to_index_keys() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let (a, b) = (
            new_pack_name(t),
            new_pack_name(t + Duration::from_millis(1)),
        );
        assert!(a < b);
        assert_eq!(a.len(), "packs/".len() + 29);
        assert_eq!(pack_of_index_key(&pack_index_key(&a)), a);
        assert!(index_key_at(t) < pack_index_key(&a));
        assert_eq!(name_time(&a), Some(t));
        assert_eq!(name_time(&format!("packs/{:032x}", 7u128)), None);
        assert!(pack_index_key(&a) < index_key_at(t + Duration::from_millis(1)));
    }

    #[test]
    fn lookups_see_added_packs_and_never_dead_ones_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index/chunks.redb");
        {
            let ix = ChunkIndex::open(&path).unwrap();
            ix.add_pack("packs/a", [([1; 32], 0, 10), ([2; 32], 10, 5)])
                .unwrap();
            let r = ix.reader().unwrap();
            assert_eq!(
                r.get(&[2; 32]).unwrap(),
                Some(Loc {
                    pack: "packs/a".into(),
                    offset: 10,
                    len: 5
                })
            );
            assert!(ix.knows_pack("packs/a").unwrap());
            ix.forget_pack("packs/a").unwrap();
            ix.add_pack("packs/a", [([9; 32], 0, 1)]).unwrap();
            ix.set_watermark("packidx/x").unwrap();
        }
        let ix = ChunkIndex::open(&path).unwrap();
        assert!(ix.is_dead("packs/a"));
        assert_eq!(ix.reader().unwrap().get(&[9; 32]).unwrap(), None);
        assert_eq!(ix.watermark().unwrap().as_deref(), Some("packidx/x"));
    }

    #[test]
    fn an_unreadable_database_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chunks.redb");
        std::fs::write(&path, vec![0xAB; 10_000]).unwrap();
        let ix = ChunkIndex::open(&path).unwrap();
        assert!(ix.is_empty().unwrap());
        assert!(path.with_extension("corrupt").exists());
    }
}
