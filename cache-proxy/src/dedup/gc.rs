//! Garbage collection: expire keys, then mark live packs from manifest headers and sweep the rest in
//! two phases (condemn, delete a grace period later), so that replicas, the server's own GC timer and
//! the `gc` `CronJob` can share one backend. No lock is shared with ingests: an ingest only reuses
//! packs that are not condemned (its list is at most `CONDEMNED_REFRESH` old) and checks that reused
//! packs exist before it publishes, so GC is safe as long as the grace period exceeds the longest
//! upload plus `CONDEMNED_REFRESH`. The mark phase holds one small header at a time.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;

use super::index::{name_time, pack_index_key, pack_of_index_key};
use super::listing;
use super::manifest::Manifest;
use super::{
    DedupError, DedupStore, GcOptions, GcReport, Stats, TEMP_MIN_AGE, read_marker_key,
    sweep_stale_files, tombstone_key,
};
use crate::store::StoreError;

/// A manifest as GC sees it.
struct Marked {
    key: String,
    bucket: String,
    object: String,
    etag: String,
    size: u64,
    last_used: SystemTime,
    packs: Vec<String>,
    body: Option<String>,
}

impl DedupStore {
    /// Mark live packs from manifests (after expiry and size cap), sweep unreferenced packs past
    /// grace. An unreadable manifest is reported and skipped, and every pack or segment object that
    /// it might reference (all created before it was written) is kept until an operator removes it.
    pub async fn gc(&self, opts: &GcOptions) -> Result<GcReport, DedupError> {
        // Before the manifests are listed: what this process's uploads use from now on is kept.
        let in_use = self.inflight.watch();
        let mut report = GcReport::default();
        let markers: HashMap<String, SystemTime> = self
            .blob
            .list("reads/")
            .await?
            .into_iter()
            .map(|o| (o.key, o.modified))
            .collect();
        let mut live: Vec<Marked> = Vec::new();
        // Packs created up to this time are kept whatever the marks say (unreadable manifests).
        let mut keep_before: Option<SystemTime> = None;
        for info in self.blob.list("manifests/").await? {
            let bytes = match self.blob.get(&info.key).await {
                Ok(b) => b,
                Err(StoreError::NotFound(_)) => continue,
                Err(e) => return Err(e.into()),
            };
            let m = match Manifest::decode(bytes) {
                Ok(m) => m,
                Err(e) => {
                    tracing::error!(manifest = %info.key, error = %e, "unreadable manifest: keeping every pack it may reference; remove it to let gc reclaim them");
                    report.manifests_unreadable += 1;
                    keep_before = keep_before.max(Some(info.modified));
                    continue;
                }
            };
            let written = SystemTime::UNIX_EPOCH + Duration::from_secs(m.header.last_modified);
            let last_used = markers
                .get(&read_marker_key(&info.key))
                .copied()
                .map_or(written, |r| r.max(written));
            live.push(Marked {
                key: info.key,
                bucket: m.header.bucket,
                object: m.header.key,
                etag: m.header.etag,
                size: m.header.size,
                last_used,
                packs: m.header.packs,
                body: m.header.body,
            });
        }
        // Most recently used first; expire and cap from the tail.
        live.sort_by_key(|e| std::cmp::Reverse(e.last_used));
        let mut logical = 0u64;
        let mut referenced: HashSet<String> = HashSet::new();
        let mut listed: HashMap<(String, String), (u64, String)> = HashMap::new();
        for m in live {
            let durable = opts.durable_buckets.contains(&m.bucket);
            let too_old = !durable
                && opts.expire_unread.is_some_and(|max| {
                    opts.now.duration_since(m.last_used).unwrap_or_default() > max
                });
            let over_cap = !durable
                && opts
                    .max_logical_bytes
                    .is_some_and(|cap| logical + m.size > cap);
            if too_old || over_cap {
                tracing::info!(manifest = %m.key, too_old, over_cap, "expiring cache key");
                self.delete_key(&m.bucket, &m.object).await?;
                report.manifests_expired += 1;
            } else {
                if !durable {
                    logical += m.size;
                }
                report.manifests_live += 1;
                listed.insert((m.bucket, m.object), (m.size, m.etag));
                referenced.extend(m.packs);
                referenced.extend(m.body);
            }
        }
        self.gc_entries(opts, &listed, &mut report).await?;
        self.gc_uploads(opts, &mut referenced, &mut keep_before, &mut report)
            .await?;
        let protected =
            |name: &str| keep_before.is_some_and(|t| name_time(name).is_none_or(|made| made <= t));
        // Two phases, so that several processes can share a backend: an unreferenced pack past
        // grace is first condemned (a tombstone object), and deleted by a later run only if it is
        // still unreferenced once the tombstone is older than grace. Ingests stop reusing condemned
        // packs within CONDEMNED_REFRESH, so a manifest written after the mark phase of the deleting
        // run can only reference the pack if its upload took longer than grace - CONDEMNED_REFRESH;
        // such manifests written earlier are seen and rescue the pack.
        let tombstones: HashMap<String, SystemTime> = self
            .blob
            .list("condemned/")
            .await?
            .into_iter()
            .map(|o| {
                (
                    format!("packs/{}", o.key.trim_start_matches("condemned/")),
                    o.modified,
                )
            })
            .collect();
        let mut seen: HashSet<String> = HashSet::new();
        for pack in self.blob.list("packs/").await? {
            seen.insert(pack.key.clone());
            let tombstone = tombstones.get(&pack.key);
            if in_use.in_use(&pack.key) {
                report.packs_kept += 1; // an unpublished upload of this process uses it
                continue;
            }
            if referenced.contains(pack.key.as_str()) || protected(&pack.key) {
                if tombstone.is_some() {
                    self.blob.delete(&tombstone_key(&pack.key)).await?;
                    report.packs_rescued += 1;
                }
                report.packs_kept += 1;
                continue;
            }
            let age = opts.now.duration_since(pack.modified).unwrap_or_default();
            match tombstone {
                _ if age < opts.grace => report.packs_kept += 1,
                None => {
                    self.blob
                        .put_bytes(&tombstone_key(&pack.key), Bytes::new())
                        .await?;
                    report.packs_condemned += 1;
                    report.packs_kept += 1;
                }
                Some(at) if opts.now.duration_since(*at).unwrap_or_default() >= opts.grace => {
                    self.forget_pack(&pack.key).await;
                    self.blob.delete(&pack_index_key(&pack.key)).await?;
                    self.blob.delete(&pack.key).await?;
                    self.blob.delete(&tombstone_key(&pack.key)).await?;
                    report.packs_deleted += 1;
                    report.bytes_deleted += pack.size;
                }
                Some(_) => report.packs_kept += 1,
            }
        }
        // Tombstones of packs that are gone (deleted by a run that crashed before this cleanup).
        for pack in tombstones.keys().filter(|p| !seen.contains(*p)) {
            self.blob.delete(&tombstone_key(pack)).await?;
        }
        // Index objects whose pack is gone (a crash between the two deletes, or a failed upload).
        for idx in self.blob.list("packidx/").await? {
            let pack = pack_of_index_key(&idx.key);
            let age = opts.now.duration_since(idx.modified).unwrap_or_default();
            if !seen.contains(&pack) && age >= opts.grace {
                self.blob.delete(&idx.key).await?;
            }
        }
        // Segment objects of overwritten or expired versions. Nothing reuses them, so one phase;
        // grace covers a publish in progress (segment object written, manifest not yet).
        for body in self.blob.list("mbodies/").await? {
            let age = opts.now.duration_since(body.modified).unwrap_or_default();
            if !referenced.contains(&body.key)
                && !protected(&body.key)
                && !in_use.in_use(&body.key)
                && age >= opts.grace
            {
                self.blob.delete(&body.key).await?;
                report.bodies_deleted += 1;
            }
        }
        // This process stops reusing what it just condemned at once.
        *self.condemned.lock().await = (None, Arc::new(HashSet::new()));
        // Local files are judged by this machine's clock, never younger than TEMP_MIN_AGE, and the
        // spool files of uploads in progress are kept whatever their age.
        let stale = SystemTime::now()
            .checked_sub(opts.grace.max(TEMP_MIN_AGE))
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let (spool_dir, inflight) = (self.spool_dir.clone(), self.inflight.clone());
        report.temp_files_deleted += tokio::task::spawn_blocking(move || {
            sweep_stale_files(&spool_dir, stale, &|p| {
                inflight.contains(&p.to_string_lossy())
            })
        })
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))??;
        report.temp_files_deleted += self.blob.sweep_temp(stale).await?;
        Ok(report)
    }

    /// Listing entries: those of keys without a live manifest (a crash between the two deletes,
    /// or a stale version) are deleted past grace, and live keys without an entry get one.
    async fn gc_entries(
        &self,
        opts: &GcOptions,
        live: &HashMap<(String, String), (u64, String)>,
        report: &mut GcReport,
    ) -> Result<(), DedupError> {
        let mut found: HashSet<(String, String)> = HashSet::new();
        for o in self.blob.list("keys/").await? {
            let Some(bucket) = o
                .key
                .strip_prefix("keys/")
                .and_then(|r| r.split_once('/'))
                .map(|(b, _)| b.to_owned())
            else {
                continue;
            };
            let current = listing::parse_entry(&bucket, &o.key).ok().filter(|e| {
                live.get(&(bucket.clone(), e.key.clone()))
                    .is_some_and(|(size, etag)| *size == e.size && *etag == e.etag)
            });
            if let Some(e) = current {
                found.insert((bucket, e.key));
            } else if opts.now.duration_since(o.modified).unwrap_or_default() >= opts.grace {
                self.blob.delete(&o.key).await?;
                report.entries_deleted += 1;
            }
        }
        for ((bucket, key), _) in live.iter().filter(|(k, _)| !found.contains(*k)) {
            if let Some(m) = self.manifest(bucket, key).await? {
                self.write_entry(&m.header).await?;
                report.entries_written += 1;
            }
        }
        Ok(())
    }

    /// Multipart uploads: parts of live uploads are roots; uploads older than `expire_uploads`
    /// are deleted, and so are parts whose upload record is gone (past grace).
    async fn gc_uploads(
        &self,
        opts: &GcOptions,
        referenced: &mut HashSet<String>,
        keep_before: &mut Option<SystemTime>,
        report: &mut GcReport,
    ) -> Result<(), DedupError> {
        let objects = self.blob.list("uploads/").await?;
        let metas: HashMap<String, SystemTime> = objects
            .iter()
            .filter_map(|o| {
                o.key
                    .strip_suffix("meta")
                    .map(|d| (d.to_owned(), o.modified))
            })
            .collect();
        let mut expired: HashSet<&str> = HashSet::new();
        for o in &objects {
            let Some((dir, _)) = o.key.rsplit_once('/') else {
                continue;
            };
            let dir = &o.key[..=dir.len()];
            let age = |t: SystemTime| opts.now.duration_since(t).unwrap_or_default();
            let upload_gone = match metas.get(dir) {
                None => age(o.modified) >= opts.grace,
                Some(made) => age(*made) >= opts.expire_uploads,
            };
            if upload_gone {
                if metas.contains_key(dir) && expired.insert(dir) {
                    report.uploads_expired += 1;
                }
                self.blob.delete(&o.key).await?;
                continue;
            }
            if o.key.ends_with("/meta") {
                continue;
            }
            let bytes = match self.blob.get(&o.key).await {
                Ok(b) => b,
                Err(StoreError::NotFound(_)) => continue,
                Err(e) => return Err(e.into()),
            };
            match Manifest::decode(bytes) {
                Ok(m) => {
                    referenced.extend(m.header.packs);
                    referenced.extend(m.header.body);
                }
                Err(e) => {
                    tracing::error!(part = %o.key, error = %e, "unreadable part manifest: keeping every pack it may reference");
                    report.manifests_unreadable += 1;
                    *keep_before = (*keep_before).max(Some(o.modified));
                }
            }
        }
        Ok(())
    }

    /// Logical vs stored bytes.
    pub async fn stats(&self) -> Result<Stats, DedupError> {
        let mut st = Stats::default();
        for info in self.blob.list("manifests/").await? {
            st.manifest_bytes += info.size;
            let bytes = match self.blob.get(&info.key).await {
                Ok(b) => b,
                Err(StoreError::NotFound(_)) => continue,
                Err(e) => return Err(e.into()),
            };
            match Manifest::decode(bytes) {
                Ok(m) => {
                    st.keys += 1;
                    st.logical_bytes += m.header.size;
                }
                Err(_) => st.unreadable_manifests += 1,
            }
        }
        for body in self.blob.list("mbodies/").await? {
            st.manifest_bytes += body.size;
        }
        for idx in self.blob.list("packidx/").await? {
            st.manifest_bytes += idx.size;
        }
        for pack in self.blob.list("packs/").await? {
            st.packs += 1;
            st.pack_bytes += pack.size;
        }
        st.stored_bytes = st.pack_bytes + st.manifest_bytes;
        #[allow(clippy::cast_precision_loss)] // a ratio for humans
        if st.stored_bytes > 0 {
            st.dedup_ratio = st.logical_bytes as f64 / st.stored_bytes as f64;
        }
        Ok(st)
    }
}
