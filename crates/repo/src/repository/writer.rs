//! Writing one snapshot, as a pipeline: the caller hands over chunks (in any order, by
//! position), worker threads (one per core) compute ids, decide dedup and compress and
//! seal what is new, and one packer thread appends the blobs to packs and stores each
//! full pack with its index object. The caller is never held by hashing or by storage
//! except when the bounded queues are full, so reading the disk, the CPU work and the
//! writes overlap; memory stays at a few batches plus one pack.
//!
//! Dedup decisions are made once per id: a worker claims a new id in a shared set
//! before it encodes it, so two workers meeting the same chunk store it once. The
//! repository's index, loaded when the writer starts, is read-only here; ids in packs a
//! collection condemned are not deduplicated against ([`super::gc`]).
//!
//! A chunk the caller knows to be an earlier chunk with some runs changed (an
//! incremental backup's chunk, whose dirty bitmap marks only part of it:
//! [`SnapshotWriter::add_changed_at`]) is stored as a *delta* of that chunk when it is
//! new: only the changed runs, so a 64 KiB write into a 256 KiB chunk stores about
//! 64 KiB, not the chunk. Its id is still the digest of the whole chunk, so dedup,
//! manifests and every reader see one chunk like any other; readers read the base
//! first, and a collection keeps a named delta's base.

use std::collections::HashSet;
use std::ops::Deref;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::thread::JoinHandle;

use super::PACK_TARGET_BYTES;
use super::Repository;
use super::gc::Lease;
use super::pack_key;
use crate::backend::Backend;
use crate::chunk_index::ChunkIndex;
use crate::crypto::Keys;
use crate::error::Error;
use crate::error::Result;
use crate::format;
use crate::format::ChunkId;
use crate::format::Compression;
use crate::format::PackBuilder;
use crate::format::SnapshotInfo;

/// What a snapshot writer did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteStats {
    /// Chunks given.
    pub chunks: u64,
    /// All-zero chunks (not stored).
    pub zero_chunks: u64,
    /// Chunks the repository had already.
    pub deduplicated: u64,
    /// New chunks stored.
    pub new_chunks: u64,
    /// Bytes of new chunks before compression.
    pub new_bytes: u64,
    /// Bytes written to packs (compressed).
    pub stored_bytes: u64,
    /// New chunks stored as deltas of an earlier chunk (counted in `new_chunks`).
    pub delta_chunks: u64,
    /// Packs written.
    pub packs: u64,
}

/// Bytes a caller hands over: a `Vec<u8>`, a block-layer buffer, anything owned.
pub type ChunkBytes = Box<dyn Deref<Target = [u8]> + Send>;

enum Job {
    Data {
        first: u64,
        data: ChunkBytes,
        /// For one chunk: the chunk it changes and the runs changed.
        changed: Option<Changed>,
    },
    Zeros {
        first: u64,
        count: u64,
    },
    /// Chunks an earlier snapshot holds (an incremental's unchanged chunks), by id.
    Known {
        first: u64,
        ids: Vec<ChunkId>,
    },
}

/// A chunk known to be `base` with `runs` (offset, length) changed.
struct Changed {
    base: ChunkId,
    runs: Vec<(u32, u32)>,
}

struct Blob {
    id: ChunkId,
    stored: Vec<u8>,
    raw_len: u32,
    codec: Compression,
    base: Option<ChunkId>,
}

struct Encoded {
    first: u64,
    ids: Vec<ChunkId>,
    blobs: Vec<Blob>,
    zero: u64,
    deduplicated: u64,
}

/// What the worker threads share.
struct Shared {
    index: ChunkIndex,
    /// Where a known chunk in a condemned pack is read back from, to be stored again.
    backend: Arc<dyn Backend>,
    /// Packs condemned when the writer started: never relied on, not even by name
    /// ([`store_pack`]).
    condemned: HashSet<String>,
    claimed: Mutex<HashSet<ChunkId>>,
    keys: Option<Keys>,
    compression: Compression,
    chunk_size: usize,
    /// Set when the packer failed: callers stop at once.
    failed: AtomicBool,
    /// Why a worker stopped (a known chunk that could not be had).
    known_failure: Mutex<Option<Error>>,
    /// Bytes the workers have taken in (for progress).
    taken: AtomicU64,
}

/// The packer's result.
struct Packed {
    chunks: Vec<ChunkId>,
    stats: WriteStats,
}

/// Writes one snapshot: chunks by position ([`SnapshotWriter::add_at`]) or in order
/// ([`SnapshotWriter::add_chunks`]), then [`SnapshotWriter::commit`]. Until the commit
/// nothing is visible; a writer dropped or failed leaves at most packs no snapshot
/// names (a collection deletes them, or the next backup's dedup uses them).
pub struct SnapshotWriter {
    lease: Lease,
    backend: Arc<dyn Backend>,
    keys: Option<Keys>,
    info: SnapshotInfo,
    next: u64,
    jobs: Option<mpsc::SyncSender<Job>>,
    workers: Vec<JoinHandle<()>>,
    packer: Option<JoinHandle<Result<Packed>>>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for SnapshotWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotWriter")
            .field("disk", &self.info.disk)
            .field("next", &self.next)
            .finish()
    }
}

/// The nice value a background writer's threads fall back to where `SCHED_IDLE` is
/// refused (`Repository::set_background`).
pub const BACKGROUND_NICE: i32 = 10;

/// Moves the calling thread to the `SCHED_IDLE` policy, or where that is refused to
/// nice [`BACKGROUND_NICE`]. On Linux both belong to a thread, so this leaves the rest
/// of the process alone. Callers ignore a failure (a sandbox refusing both): it costs
/// the guest some latency, never data.
///
/// Why `SCHED_IDLE` and not only a nice value: the scheduler lets a waking thread of
/// normal policy preempt a running `SCHED_IDLE` one at once, while a nice-10 thread
/// keeps its CPU until its slice runs out (milliseconds on this 2-core VM). A guest
/// request's runtime thread woke behind hashing and compression that long. Measured
/// (`bench/RESULTS.md`, issue 16, 2 GiB, QD1 guest through NBD): the guest's write
/// p99 during a backup into the repository 1.1-2.1 ms at nice 10, 0.56-0.86 ms with
/// `SCHED_IDLE`, the backup as fast. An idle-policy thread is not starved: it keeps a
/// small share of a CPU that normal threads keep busy, so a backup under a CPU-bound
/// host slows down but ends.
pub fn lower_thread_priority() -> std::io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: a pid of 0 names the calling thread; `param` lives across the call.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) } == 0 {
        return Ok(());
    }
    // SAFETY: gettid and setpriority take and return plain integers.
    let rc = unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, BACKGROUND_NICE)
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

impl SnapshotWriter {
    pub(super) fn start(
        repo: &Repository,
        lease: Lease,
        index: ChunkIndex,
        condemned: HashSet<String>,
        info: SnapshotInfo,
    ) -> Self {
        let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
        let shared = Arc::new(Shared {
            index,
            backend: repo.backend.clone(),
            condemned,
            claimed: Mutex::new(HashSet::new()),
            keys: repo.keys.clone(),
            compression: repo.config.compression,
            chunk_size: info.chunk_size as usize,
            failed: AtomicBool::new(false),
            known_failure: Mutex::new(None),
            taken: AtomicU64::new(0),
        });
        let (jobs, job_queue) = mpsc::sync_channel::<Job>(2 * workers);
        let (done, done_queue) = mpsc::sync_channel::<Encoded>(2 * workers);
        let job_queue = Arc::new(Mutex::new(job_queue));
        let background = repo.background;
        let workers = (0..workers)
            .map(|n| {
                let (shared, job_queue, done) = (shared.clone(), job_queue.clone(), done.clone());
                std::thread::Builder::new()
                    .name(format!("repo-chunk-{n}"))
                    .spawn(move || {
                        if background {
                            let _ = lower_thread_priority();
                        }
                        encode_jobs(&shared, &job_queue, &done);
                    })
                    .expect("a chunk worker starts")
            })
            .collect();
        drop(done);
        let chunk_count = info.size.div_ceil(info.chunk_size) as usize;
        let packer = {
            let (backend, shared) = (repo.backend.clone(), shared.clone());
            std::thread::Builder::new()
                .name("repo-packer".into())
                .spawn(move || {
                    if background {
                        let _ = lower_thread_priority();
                    }
                    let result = pack_blobs(&*backend, &shared, chunk_count, &done_queue);
                    if result.is_err() {
                        shared.failed.store(true, Ordering::SeqCst);
                    }
                    result
                })
                .expect("the packer starts")
        };
        Self {
            lease,
            backend: repo.backend.clone(),
            keys: repo.keys.clone(),
            info,
            next: 0,
            jobs: Some(jobs),
            workers,
            packer: Some(packer),
            shared,
        }
    }

    /// Hands over the chunks from position `first` on: `data` is a whole number of
    /// chunks, or ends at the end of the disk. Each position is given once.
    pub fn add_at<B>(&mut self, first: u64, data: B) -> Result<()>
    where
        B: Deref<Target = [u8]> + Send + 'static,
    {
        let chunk = self.info.chunk_size;
        let start = first.checked_mul(chunk);
        let end = start.and_then(|s| s.checked_add(data.len() as u64));
        let fits = match (start, end) {
            (Some(start), Some(end)) => {
                start < self.info.size
                    && end <= self.info.size
                    && !data.is_empty()
                    && ((data.len() as u64).is_multiple_of(chunk) || end == self.info.size)
            }
            _ => false,
        };
        if !fits {
            return Err(Error::Invalid(format!(
                "{} bytes at chunk {first} do not fit a disk of {} bytes in chunks of {chunk}",
                data.len(),
                self.info.size
            )));
        }
        self.send(Job::Data {
            first,
            data: Box::new(data),
            changed: None,
        })
    }

    /// Hands over chunk `index`, known to be chunk `base` (of an earlier snapshot of
    /// the disk) with only `runs` changed: (offset, length) in the chunk, sorted and
    /// apart. If the chunk is new to the repository it is stored as a delta of `base`
    /// when that pays: the runs are at most half of it, `base` is stored (outside
    /// condemned packs) with the same length and a chain shorter than
    /// [`format::MAX_DELTA_DEPTH`]. Otherwise as [`SnapshotWriter::add_at`].
    ///
    /// The caller vouches that every byte outside `runs` equals `base`'s (a dirty
    /// bitmap's promise); if it does not, the delta does not match the chunk's id and
    /// every read of it says the chunk is damaged, never returns other data.
    pub fn add_changed_at<B>(
        &mut self,
        index: u64,
        data: B,
        base: ChunkId,
        runs: Vec<(u32, u32)>,
    ) -> Result<()>
    where
        B: Deref<Target = [u8]> + Send + 'static,
    {
        let chunk = self.info.chunk_size;
        let start = index.checked_mul(chunk);
        let fits = start.is_some_and(|s| {
            s < self.info.size && data.len() as u64 == chunk.min(self.info.size - s)
        });
        if !fits {
            return Err(Error::Invalid(format!(
                "{} bytes are not chunk {index} of a disk of {} bytes in chunks of {chunk}",
                data.len(),
                self.info.size
            )));
        }
        self.send(Job::Data {
            first: index,
            data: Box::new(data),
            changed: Some(Changed { base, runs }),
        })
    }

    /// Marks `count` chunks from `first` on as all zeros, without their bytes.
    pub fn add_zeros_at(&mut self, first: u64, count: u64) -> Result<()> {
        let chunks = self.info.size.div_ceil(self.info.chunk_size);
        if count == 0 || first.checked_add(count).is_none_or(|end| end > chunks) {
            return Err(Error::Invalid(format!(
                "zero chunks {first}+{count} past the disk's {chunks}"
            )));
        }
        self.send(Job::Zeros { first, count })
    }

    /// Takes chunks from position `first` on by id, as an earlier snapshot of the disk
    /// holds them (an incremental backup's unchanged chunks), without their bytes.
    /// Each id must be stored in the repository; one whose only copy a collection has
    /// condemned is read back and stored again, so the snapshot never relies on a pack
    /// about to go.
    pub fn add_known_at(&mut self, first: u64, ids: Vec<ChunkId>) -> Result<()> {
        let chunks = self.info.size.div_ceil(self.info.chunk_size);
        let count = ids.len() as u64;
        if count == 0 || first.checked_add(count).is_none_or(|end| end > chunks) {
            return Err(Error::Invalid(format!(
                "known chunks {first}+{count} past the disk's {chunks}"
            )));
        }
        self.send(Job::Known { first, ids })
    }

    /// Adds the next chunks in disk order (each a whole chunk, the last may be short).
    pub fn add_chunks(&mut self, chunks: &[&[u8]]) -> Result<()> {
        for data in chunks {
            self.add_at(self.next, data.to_vec())?;
            self.next += 1;
        }
        Ok(())
    }

    /// Adds the next chunk (the last may be short).
    pub fn add_chunk(&mut self, data: &[u8]) -> Result<()> {
        self.add_chunks(&[data])
    }

    fn send(&mut self, job: Job) -> Result<()> {
        if self.shared.failed.load(Ordering::SeqCst) {
            return Err(self.failure());
        }
        self.lease.keep_alive()?;
        let sent = self.jobs.as_ref().map(|jobs| jobs.send(job));
        match sent {
            Some(Ok(())) => Ok(()),
            _ => Err(self.failure()),
        }
    }

    /// The packer's error, once it has failed.
    fn failure(&mut self) -> Error {
        self.jobs = None;
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
        let packed = self.packer.take().map(JoinHandle::join);
        if let Some(e) = self.known_failure() {
            return e;
        }
        match packed {
            Some(Ok(Err(e))) => e,
            Some(Err(_)) => Error::Invalid("the packer thread panicked".into()),
            _ => Error::Invalid("the snapshot writer has failed".into()),
        }
    }

    fn known_failure(&self) -> Option<Error> {
        self.shared
            .known_failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    /// Records that `bitmap` of the disk is cleared as this snapshot is taken (see
    /// [`SnapshotInfo::bitmap`]).
    pub fn set_bitmap(&mut self, bitmap: Option<String>) {
        self.info.bitmap = bitmap;
    }

    /// Dates the snapshot now (its backup's start, when the writer was made ahead of
    /// the backup).
    pub fn set_time_now(&mut self) {
        self.info.time_ns = super::now_ns();
    }

    /// Bytes handed to the workers so far.
    pub fn bytes_taken(&self) -> u64 {
        self.shared.taken.load(Ordering::Relaxed)
    }

    /// Makes the snapshot durable and visible: every pack and its index first, then
    /// the manifest. Returns the snapshot's header (with its id).
    pub fn commit(mut self) -> Result<(SnapshotInfo, WriteStats)> {
        self.jobs = None;
        for w in self.workers.drain(..) {
            w.join()
                .map_err(|_| Error::Invalid("a chunk worker panicked".into()))?;
        }
        let packed = self.packer.take().map(JoinHandle::join);
        if let Some(e) = self.known_failure() {
            return Err(e);
        }
        let packed = match packed {
            Some(Ok(result)) => result?,
            _ => return Err(Error::Invalid("the packer thread panicked".into())),
        };
        let Packed { chunks, stats } = packed;
        let given = stats.chunks;
        if given != chunks.len() as u64 {
            return Err(Error::Invalid(format!(
                "the snapshot has {given} chunks, the disk {}",
                chunks.len()
            )));
        }
        let mut info = self.info.clone();
        info.stored = stats.stored_bytes;
        let (id, bytes) = format::encode_manifest(&info, &chunks);
        let bytes = format::seal_manifest(bytes, self.keys.as_ref());
        self.backend
            .put_if_absent(&format!("snapshots/{id}"), &bytes)?;
        info.id = id;
        Ok((info, stats))
    }
}

impl Drop for SnapshotWriter {
    fn drop(&mut self) {
        self.jobs = None;
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
        if let Some(p) = self.packer.take() {
            let _ = p.join();
        }
    }
}

/// A worker: ids, dedup claims, compression and sealing, job after job.
fn encode_jobs(
    shared: &Shared,
    jobs: &Mutex<mpsc::Receiver<Job>>,
    done: &mpsc::SyncSender<Encoded>,
) {
    loop {
        let job = match jobs.lock().unwrap_or_else(|e| e.into_inner()).recv() {
            Ok(job) => job,
            Err(_) => return,
        };
        let encoded = match job {
            Job::Zeros { first, count } => Encoded {
                first,
                ids: vec![ChunkId::ZERO; count as usize],
                blobs: Vec::new(),
                zero: count,
                deduplicated: 0,
            },
            Job::Data {
                first,
                data,
                changed,
            } => encode(shared, first, &data, changed.as_ref()),
            Job::Known { first, ids } => match known(shared, first, ids) {
                Ok(encoded) => encoded,
                Err(e) => {
                    // The packer reports it: a snapshot missing a chunk is never made.
                    *shared
                        .known_failure
                        .lock()
                        .unwrap_or_else(|e| e.into_inner()) = Some(e);
                    shared.failed.store(true, Ordering::SeqCst);
                    return;
                }
            },
        };
        if done.send(encoded).is_err() {
            return;
        }
    }
}

fn encode(shared: &Shared, first: u64, data: &[u8], changed: Option<&Changed>) -> Encoded {
    shared.taken.fetch_add(data.len() as u64, Ordering::Relaxed);
    let keys = shared.keys.as_ref();
    let mut out = Encoded {
        first,
        ids: Vec::with_capacity(data.len().div_ceil(shared.chunk_size)),
        blobs: Vec::new(),
        zero: 0,
        deduplicated: 0,
    };
    for chunk in data.chunks(shared.chunk_size) {
        let id = ChunkId::keyed(keys, chunk);
        out.ids.push(id);
        if id == ChunkId::ZERO {
            out.zero += 1;
            continue;
        }
        let known = shared.index.contains_live(&id)
            || !shared
                .claimed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(id);
        if known {
            out.deduplicated += 1;
            continue;
        }
        let delta = changed
            .filter(|c| delta_pays(shared, id, chunk.len(), c))
            .and_then(|c| {
                format::encode_delta(chunk, &c.runs, shared.compression)
                    .map(|(stored, codec)| (stored, codec, Some(c.base)))
            });
        let (stored, codec, base) = delta.unwrap_or_else(|| {
            let (stored, codec) = format::encode_blob(chunk, shared.compression);
            (stored, codec, None)
        });
        // Sealed after compression; the id is the associated data, so a blob cannot
        // be passed off as another chunk.
        let stored = match keys {
            Some(keys) => keys.seal(&id.0, &stored),
            None => stored,
        };
        out.blobs.push(Blob {
            id,
            stored,
            raw_len: chunk.len() as u32,
            codec,
            base,
        });
    }
    out
}

/// Whether chunk `id` (`len` bytes) is better stored as a delta: its changed runs are
/// at most half of it, and its base can be read without surprises (stored outside
/// condemned packs, of the same length, a chain short enough to extend).
fn delta_pays(shared: &Shared, id: ChunkId, len: usize, changed: &Changed) -> bool {
    let changed_bytes: u64 = changed.runs.iter().map(|&(_, n)| u64::from(n)).sum();
    let base = changed.base;
    changed_bytes * 2 <= len as u64
        && base != ChunkId::ZERO
        && base != id
        && shared.index.contains_live(&base)
        && shared
            .index
            .get(&base)
            .is_some_and(|(_, b)| b.raw_len as usize == len)
        && shared.index.delta_depth(&base, format::MAX_DELTA_DEPTH) < format::MAX_DELTA_DEPTH
}

/// Chunks by id: those stored outside condemned packs are taken as they are; one only
/// a condemned pack holds is read, checked and stored again (as new data).
fn known(shared: &Shared, first: u64, ids: Vec<ChunkId>) -> Result<Encoded> {
    let mut out = Encoded {
        first,
        ids: Vec::with_capacity(ids.len()),
        blobs: Vec::new(),
        zero: 0,
        deduplicated: 0,
    };
    for (n, id) in ids.into_iter().enumerate() {
        if id == ChunkId::ZERO {
            out.ids.push(id);
            out.zero += 1;
            continue;
        }
        if shared.index.contains_live(&id) {
            out.ids.push(id);
            out.deduplicated += 1;
            continue;
        }
        if !shared.index.contains(&id) {
            return Err(Error::NotFound(format!(
                "chunk {} (position {}) of the parent snapshot is in no pack",
                id.hex(),
                first + n as u64
            )));
        }
        let reader = super::read::ChunkReader {
            backend: &*shared.backend,
            keys: shared.keys.as_ref(),
        };
        let data = reader.read_chunk(&shared.index, &id)?;
        let again = encode(shared, first + n as u64, &data, None);
        out.ids.extend(again.ids);
        out.blobs.extend(again.blobs);
        out.zero += again.zero;
        out.deduplicated += again.deduplicated;
    }
    Ok(out)
}

/// The packer: blobs into packs, each full pack stored with its index object, the
/// chunk list filled in by position. Packs are stored by up to
/// [`Backend::uploads_in_flight`] threads at once: on S3 a pack's upload is mostly
/// waiting on the network, so several overlap while the next pack fills; on a local
/// disk the packer stores one at a time itself, which keeps the device's queue short
/// for a guest sharing it. Memory: the pack being filled plus that many.
fn pack_blobs(
    backend: &dyn Backend,
    shared: &Shared,
    chunk_count: usize,
    done: &mpsc::Receiver<Encoded>,
) -> Result<Packed> {
    let lanes = backend.uploads_in_flight().max(1);
    if lanes == 1 {
        return fill_packs(shared, chunk_count, done, &mut |finished| {
            put_pack(backend, &finished)?;
            Ok(Some(finished.bytes))
        });
    }
    let (tx, rx) = mpsc::sync_channel::<format::FinishedPack>(lanes);
    let rx = Mutex::new(rx);
    let error: Mutex<Option<Error>> = Mutex::new(None);
    let failed = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let uploaders: Vec<_> = (0..lanes)
            .map(|_| {
                scope.spawn(|| {
                    loop {
                        let next = rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
                        let Ok(finished) = next else { return };
                        if failed.load(Ordering::SeqCst) {
                            continue;
                        }
                        if let Err(e) = put_pack(backend, &finished) {
                            failed.store(true, Ordering::SeqCst);
                            error
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .get_or_insert(e);
                        }
                    }
                })
            })
            .collect();
        let first_error = || {
            error
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take()
                .unwrap_or_else(|| Error::Invalid("a pack upload failed".into()))
        };
        let packed = fill_packs(shared, chunk_count, done, &mut |finished| {
            if failed.load(Ordering::SeqCst) {
                return Err(first_error());
            }
            tx.send(finished)
                .map_err(|_| Error::Invalid("the pack uploaders stopped".into()))?;
            Ok(None)
        });
        drop(tx);
        for uploader in uploaders {
            if uploader.join().is_err() {
                return Err(Error::Invalid("a pack uploader panicked".into()));
            }
        }
        // Every pack is stored (or one failed) before the snapshot may be committed.
        if failed.load(Ordering::SeqCst) {
            return Err(first_error());
        }
        packed
    })
}

/// Fills packs with the workers' blobs and hands each full one to `store`, which may
/// give its buffer back for the next pack.
fn fill_packs(
    shared: &Shared,
    chunk_count: usize,
    done: &mpsc::Receiver<Encoded>,
    store: &mut dyn FnMut(format::FinishedPack) -> Result<Option<Vec<u8>>>,
) -> Result<Packed> {
    let mut chunks = vec![ChunkId::ZERO; chunk_count];
    let mut given = vec![false; chunk_count];
    let mut stats = WriteStats::default();
    let mut pack = PackBuilder::new();
    let keys = shared.keys.as_ref();
    let mut seal = |pack: PackBuilder, stats: &mut WriteStats| -> Result<PackBuilder> {
        let finished = finish_pack(keys, pack, &shared.condemned)?;
        stats.packs += 1;
        Ok(store(finished)?.map_or_else(PackBuilder::new, PackBuilder::reusing))
    };
    for encoded in done {
        for (n, id) in encoded.ids.iter().enumerate() {
            let at = encoded.first as usize + n;
            if std::mem::replace(&mut given[at], true) {
                return Err(Error::Invalid(format!("chunk {at} was given twice")));
            }
            chunks[at] = *id;
        }
        stats.chunks += encoded.ids.len() as u64;
        stats.zero_chunks += encoded.zero;
        stats.deduplicated += encoded.deduplicated;
        for blob in encoded.blobs {
            pack.add_blob(blob.id, &blob.stored, blob.raw_len, blob.codec, blob.base);
            stats.new_chunks += 1;
            stats.delta_chunks += u64::from(blob.base.is_some());
            stats.new_bytes += u64::from(blob.raw_len);
            stats.stored_bytes += blob.stored.len() as u64;
            if pack.len() >= PACK_TARGET_BYTES {
                pack = seal(pack, &mut stats)?;
            }
        }
    }
    if !pack.is_empty() {
        seal(pack, &mut stats)?;
    }
    Ok(Packed { chunks, stats })
}

/// Finishes a pack under a name no condemned pack has.
///
/// Packs are named by their digest, so the same blobs in the same order (an unencrypted
/// repository backing up data it held before) make a pack that may already exist. If
/// that existing pack is `condemned` (by a collection this writer's lease does not hold
/// up), relying on it would lose it at the next collection: the pack is stored under
/// another name instead, with padding in front of its blobs.
fn finish_pack(
    keys: Option<&Keys>,
    pack: PackBuilder,
    condemned: &HashSet<String>,
) -> Result<format::FinishedPack> {
    let mut finished = pack.finish(keys);
    let mut pad = 0;
    while condemned.contains(&finished.id) {
        pad += 1;
        if pad > 64 {
            return Err(Error::Invalid(format!(
                "pack {} and 64 padded variants of it are all condemned",
                finished.id
            )));
        }
        finished = PackBuilder::padded(&finished, pad).finish(keys);
    }
    Ok(finished)
}

/// Stores a finished pack, then its index object (the commit order).
fn put_pack(backend: &dyn Backend, finished: &format::FinishedPack) -> Result<()> {
    backend.put_if_absent(&pack_key(&finished.id), &finished.bytes)?;
    backend.put_if_absent(&format!("index/{}", finished.id), &finished.index)?;
    Ok(())
}

/// Stores a pack ([`finish_pack`], [`put_pack`]); returns an empty pack in the same
/// buffer.
pub(super) fn store_pack(
    backend: &dyn Backend,
    keys: Option<&Keys>,
    pack: PackBuilder,
    condemned: &HashSet<String>,
    stats: &mut WriteStats,
) -> Result<PackBuilder> {
    let finished = finish_pack(keys, pack, condemned)?;
    put_pack(backend, &finished)?;
    stats.packs += 1;
    Ok(PackBuilder::reusing(finished.bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_background_thread_takes_the_idle_policy_and_leaves_the_others_alone() {
        let lowered = std::thread::spawn(|| {
            lower_thread_priority().unwrap();
            // SAFETY: plain integer calls about the calling thread.
            unsafe { libc::sched_getscheduler(0) }
        })
        .join()
        .unwrap();
        // SAFETY: as above.
        let here = unsafe { libc::sched_getscheduler(0) };
        assert_eq!(here, libc::SCHED_OTHER);
        // Any thread may lower its own policy to SCHED_IDLE, root or not.
        assert_eq!(lowered, libc::SCHED_IDLE);
    }
}
