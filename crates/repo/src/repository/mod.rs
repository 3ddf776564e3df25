//! A repository: its configuration, writing snapshots (dedup against what is stored,
//! chunks packed), reading them back, listing and verifying them.

pub mod gc;
pub mod pack_list;
mod read;
pub mod sync;
pub mod verify;
pub mod writer;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::SystemTime;

use serde::Deserialize;
use serde::Serialize;

pub use self::writer::SnapshotWriter;
pub use self::writer::WriteStats;
use crate::backend::Backend;
use crate::chunk_index::ChunkIndex;
use crate::crypto::KeyFile;
use crate::crypto::Keys;
use crate::error::Error;
use crate::error::Result;
use crate::format;
use crate::format::ChunkId;
use crate::format::Compression;
use crate::format::SnapshotInfo;

/// Smallest and largest chunk sizes a repository may use.
pub const CHUNK_SIZES: std::ops::RangeInclusive<u64> = (64 << 10)..=format::MAX_CHUNK;

/// The chunk size `repo init` chooses when none is given.
pub const DEFAULT_CHUNK_SIZE: u64 = 256 << 10;

/// A pack is written once it holds this much.
pub const PACK_TARGET_BYTES: usize = 32 << 20;

/// The repository's `config` object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Config {
    /// Format version ([`format::FORMAT_VERSION`]).
    pub version: u32,
    /// Chunk size in bytes, one for the whole repository.
    pub chunk_size: u64,
    /// How chunks are compressed.
    pub compression: Compression,
    /// Random id, told apart from other repositories.
    pub id: String,
    /// The wrapped master key of an encrypted repository.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<KeyFile>,
}

/// An open repository.
pub struct Repository {
    backend: Arc<dyn Backend>,
    config: Config,
    keys: Option<Keys>,
    condemn_margin: std::time::Duration,
    /// Writers' threads run at a lower CPU priority (see [`Repository::set_background`]).
    background: bool,
}

impl std::fmt::Debug for Repository {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Repository")
            .field("config", &self.config)
            .finish()
    }
}

pub(crate) fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

pub(crate) fn pack_key(id: &str) -> String {
    format!("packs/{}/{id}", &id[..2])
}

impl Repository {
    /// Creates a repository in `backend`, refusing one that already holds a repository;
    /// encrypted with a new master key wrapped by `passphrase` when one is given.
    pub fn init(
        backend: Box<dyn Backend>,
        chunk_size: u64,
        compression: Compression,
        passphrase: Option<&[u8]>,
    ) -> Result<Self> {
        if !chunk_size.is_power_of_two() || !CHUNK_SIZES.contains(&chunk_size) {
            return Err(Error::Invalid(format!(
                "chunk size {chunk_size} must be a power of two from 64K to 4M"
            )));
        }
        let seed = format!(
            "{:?}-{}-{}",
            SystemTime::now(),
            std::process::id(),
            chunk_size
        );
        let keys = passphrase.map(|_| Keys::generate());
        let config = Config {
            version: format::FORMAT_VERSION,
            chunk_size,
            compression,
            id: crate::hex::hex(&blake3::hash(seed.as_bytes()).as_bytes()[..16]),
            encryption: keys.as_ref().zip(passphrase).map(|(k, p)| k.wrap(p)),
        };
        let bytes = serde_json::to_vec_pretty(&config).expect("config serializes");
        if !backend.put_if_absent("config", &bytes)? {
            return Err(Error::Invalid("a repository exists there already".into()));
        }
        Ok(Self {
            backend: Arc::from(backend),
            config,
            keys,
            condemn_margin: gc::CONDEMN_MARGIN,
            background: false,
        })
    }

    /// Opens the repository in `backend`; an encrypted one needs its passphrase.
    pub fn open(backend: Box<dyn Backend>, passphrase: Option<&[u8]>) -> Result<Self> {
        let bytes = backend.get("config", None).map_err(|e| match e {
            Error::NotFound(_) => Error::NotFound("no repository there (no config)".into()),
            other => other,
        })?;
        let config: Config =
            serde_json::from_slice(&bytes).map_err(|e| Error::damaged("config", e.to_string()))?;
        if config.version != format::FORMAT_VERSION {
            return Err(Error::Invalid(format!(
                "repository format {} (this stillpoint reads {})",
                config.version,
                format::FORMAT_VERSION
            )));
        }
        if !config.chunk_size.is_power_of_two() || !CHUNK_SIZES.contains(&config.chunk_size) {
            return Err(Error::damaged("config", "bad chunk size"));
        }
        let keys = match (&config.encryption, passphrase) {
            (None, _) => None,
            (Some(file), Some(passphrase)) => Some(file.unwrap(passphrase)?),
            (Some(_), None) => {
                return Err(Error::Invalid(
                    "the repository is encrypted: give its passphrase \
                     (--passphrase-file or STILLPOINT_PASSPHRASE)"
                        .into(),
                ));
            }
        };
        Ok(Self {
            backend: Arc::from(backend),
            config,
            keys,
            condemn_margin: gc::CONDEMN_MARGIN,
            background: false,
        })
    }

    /// Sets how long after a condemnation a writer's start still holds up the deletion
    /// ([`gc::CONDEMN_MARGIN`] by default). Shorter is safe only where every writer
    /// shares this host's clock and objects are visible within the margin (tests).
    pub fn set_condemn_margin(&mut self, margin: std::time::Duration) {
        self.condemn_margin = margin;
    }

    /// Makes later writers give way to a running disk's guest: their threads (chunk
    /// workers and packer) run at the lowest CPU priority
    /// ([`writer::lower_thread_priority`]), and the backend is told to keep its device
    /// requests short ([`Backend::set_background`]). On an idle machine the backup runs
    /// as fast.
    pub fn set_background(&mut self, background: bool) {
        self.background = background;
        self.backend.set_background(background);
    }

    /// The storage under the repository.
    pub(crate) fn backend(&self) -> &dyn Backend {
        &*self.backend
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Where every stored chunk is, from the index objects; chunks in packs a
    /// collection has condemned are found only where no other copy exists.
    pub fn load_index(&self) -> Result<ChunkIndex> {
        self.load_index_with(|_, _| {})
    }

    /// [`Repository::load_index`], showing `each` every pack's entries as they load.
    pub(crate) fn load_index_with(
        &self,
        mut each: impl FnMut(&str, &[(ChunkId, format::BlobRef)]),
    ) -> Result<ChunkIndex> {
        let mut index = ChunkIndex::new();
        let keys = self.backend.list("index/")?;
        // Fetched (and opened) a window at a time, by several threads where the backend
        // waits on a network: a cold S3 cache would otherwise pay one round trip per
        // pack in turn. The window bounds what is held at once.
        let lanes = self.backend.reads_in_flight().max(1);
        for window in keys.chunks(lanes * 8) {
            let loaded = parallel_map(window, lanes, |key| self.index_object(key));
            for (key, entries) in window.iter().zip(loaded) {
                // None: a collection deleted it (and its pack) since the listing.
                let Some(entries) = entries? else { continue };
                let pack = key.trim_start_matches("index/");
                if !index.load_pack(pack, &entries) {
                    return Err(Error::damaged(key, "a blob offset past 4 GiB"));
                }
                each(pack, &entries);
            }
        }
        for pack in self.condemned_packs()? {
            index.condemn(&pack);
        }
        index.finish_loading();
        Ok(index)
    }

    /// The entries of the index object `key`; `None` if it is gone.
    fn index_object(&self, key: &str) -> Result<Option<Vec<(ChunkId, format::BlobRef)>>> {
        let bytes = match self.backend.get(key, None) {
            Ok(bytes) => bytes,
            Err(Error::NotFound(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        let bytes = format::open_index_object(key, &bytes, self.keys.as_ref())?;
        Ok(Some(format::decode_index(key, &bytes, None)?))
    }

    /// A snapshot's header and chunk list.
    pub fn read_snapshot(&self, id: &str) -> Result<(SnapshotInfo, Vec<ChunkId>)> {
        let key = format!("snapshots/{id}");
        let bytes = self.backend.get(&key, None).map_err(|e| match e {
            Error::NotFound(_) => Error::NotFound(format!("no snapshot {id}")),
            other => other,
        })?;
        format::open_manifest(&key, id, &bytes, self.keys.as_ref())
    }

    /// Every snapshot, oldest first.
    pub fn snapshots(&self) -> Result<Vec<SnapshotInfo>> {
        let mut out = Vec::new();
        let keys = self.backend.list("snapshots/")?;
        // Several at a time where each read waits on a network (a cold S3 cache); at
        // most 4, since a manifest holds its disk's whole chunk list (128 MiB for
        // 1 TiB at 256 KiB chunks) until its header is taken.
        let lanes = self.backend.reads_in_flight().clamp(1, 4);
        let read = parallel_map(&keys, lanes, |key| {
            self.read_snapshot(key.trim_start_matches("snapshots/"))
                .map(|(info, _)| info)
        });
        for info in read {
            match info {
                Ok(info) => out.push(info),
                // Forgotten (pruned) since the listing.
                Err(Error::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        out.sort_by(|a, b| (a.time_ns, &a.id).cmp(&(b.time_ns, &b.id)));
        Ok(out)
    }

    /// The snapshot `spec` names: an id, or a disk name for that disk's latest.
    pub fn find_snapshot(&self, spec: &str) -> Result<SnapshotInfo> {
        let all = self.snapshots()?;
        if let Some(s) = all.iter().find(|s| s.id == spec) {
            return Ok(s.clone());
        }
        all.into_iter().rfind(|s| s.disk == spec).ok_or_else(|| {
            Error::NotFound(format!("no snapshot '{spec}' (neither an id nor a disk)"))
        })
    }

    /// A stored blob's plaintext, checked against its id, when the caller has its
    /// stored bytes (verify, repack): a delta's base is read from the repository.
    pub(crate) fn decode_stored(
        &self,
        index: &ChunkIndex,
        key: &str,
        id: &ChunkId,
        blob: &format::BlobRef,
        stored: &[u8],
    ) -> Result<Vec<u8>> {
        if u64::from(blob.raw_len) > format::MAX_CHUNK {
            return format::decode_blob(key, self.keys.as_ref(), id, blob, stored);
        }
        let base = match blob.base {
            Some(base) => Some(self.read_chunk(index, &base)?),
            None => None,
        };
        let mut stored = stored.to_vec();
        let mut out = vec![0; blob.raw_len as usize];
        format::decode_delta_into(
            key,
            self.keys.as_ref(),
            id,
            blob,
            &mut stored,
            base.as_deref(),
            &mut out,
        )?;
        Ok(out)
    }

    /// Starts a snapshot of `disk`, `size` bytes long; chunks are added in order.
    pub fn writer(&self, disk: &str, size: u64, parent: Option<String>) -> Result<SnapshotWriter> {
        if disk.is_empty() || disk.contains('/') {
            return Err(Error::Invalid(format!("bad disk name '{disk}'")));
        }
        // The lease first, then the index: a collection that condemns packs after the
        // lease's start waits for it before deleting them.
        let lease = self.lease()?;
        let index = self.load_index()?;
        let condemned = self.condemned_packs()?;
        let info = SnapshotInfo {
            bitmap: None,
            id: String::new(),
            disk: disk.to_string(),
            time_ns: now_ns(),
            size,
            chunk_size: self.config.chunk_size,
            parent,
            stored: 0,
            tool: format!("stillpoint {}", env!("CARGO_PKG_VERSION")),
        };
        Ok(SnapshotWriter::start(self, lease, index, condemned, info))
    }

    /// Deletes the manifests of these snapshots. Their chunks stay in the packs until
    /// a garbage collection ([`Repository::gc`]) removes what no snapshot names.
    pub fn forget(&self, ids: &[String]) -> Result<()> {
        for id in ids {
            self.backend.delete(&format!("snapshots/{id}"))?;
        }
        Ok(())
    }

    /// What the repository holds.
    pub fn stats(&self) -> Result<RepoStats> {
        let index = self.load_index()?;
        let snapshots = self.snapshots()?;
        let packs: HashSet<&str> = index.iter().map(|(_, pack, _)| pack).collect();
        let mut stats = RepoStats {
            snapshots: snapshots.len() as u64,
            logical_bytes: snapshots.iter().map(|s| s.size).sum(),
            chunks: index.len() as u64,
            packs: packs.len() as u64,
            ..RepoStats::default()
        };
        for (_, _, blob) in index.iter() {
            stats.chunk_bytes += u64::from(blob.raw_len);
            stats.stored_bytes += u64::from(blob.stored_len);
            stats.delta_chunks += u64::from(blob.base.is_some());
        }
        Ok(stats)
    }
}

/// `repo stats`: logical size against what is stored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct RepoStats {
    /// Snapshots.
    pub snapshots: u64,
    /// Sum of the snapshots' disk sizes.
    pub logical_bytes: u64,
    /// Unique chunks stored.
    pub chunks: u64,
    /// Their plain size.
    pub chunk_bytes: u64,
    /// Their stored (compressed) size.
    pub stored_bytes: u64,
    /// Packs holding them.
    pub packs: u64,
    /// Chunks stored as deltas of another (counted in `chunks`).
    pub delta_chunks: u64,
}

/// `work` applied to every item on up to `lanes` threads, results in the items' order.
pub(crate) fn parallel_map<T: Sync, R: Send>(
    items: &[T],
    lanes: usize,
    work: impl Fn(&T) -> R + Sync,
) -> Vec<R> {
    if lanes <= 1 || items.len() <= 1 {
        return items.iter().map(work).collect();
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let slots: Vec<std::sync::Mutex<Option<R>>> =
        items.iter().map(|_| std::sync::Mutex::new(None)).collect();
    std::thread::scope(|scope| {
        for _ in 0..lanes.min(items.len()) {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(item) = items.get(i) else { return };
                    let result = work(item);
                    *slots[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(result);
                }
            });
        }
    });
    slots
        .into_iter()
        .map(|slot| {
            slot.into_inner()
                .unwrap_or_else(|e| e.into_inner())
                .expect("every item was worked on")
        })
        .collect()
}
