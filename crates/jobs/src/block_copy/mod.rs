//! The block-copy engine: copies a source to a target cluster by cluster, exactly once
//! each, on behalf of both the background job and the copy-before-write filter.
//!
//! # Cluster life cycle
//!
//! ```text
//!   dirty --claim--> reading --read ok--> in hand --write ok--> done
//!     ^                 |                   (a worker's buffer, or the staging
//!     '---read failed---'                    area, or the retry queue)
//! ```
//!
//! * `dirty` (a bit in the copy bitmap): the cluster's point-in-time data exists only
//!   on the source.
//! * `reading`: someone is reading it from the source. A guest write touching it must
//!   wait, or it would change the data under the read. This is the *only* state a guest
//!   write ever waits for.
//! * `in hand`: the old data has been read and is held by the engine (a background
//!   worker's buffer, the staging area, or the retry queue after a failed target write).
//!   The source may now change freely; the data can no longer be re-read, so it is kept
//!   until the target has it.
//!
//! Every transition happens under one short mutex, so a cluster is claimed once: the
//! claim clears its bit, and only a failed source read sets it again.
//!
//! # Guest writes never wait for the target
//!
//! A write of whole pages over clusters whose old data is still only on the source
//! waits for nothing at all: it is held in memory until the background pass (or a
//! copy-before-write, or a flush) has the cluster's old data, then written to the
//! source (see `redirect`). What follows is the path of every other write.
//!
//! A copy-before-write claims the dirty clusters a guest write touches, reads their old
//! data from the source, and parks it in the staging area: memory up to a bound, then a
//! scratch file (beside the target by default). Then the guest write proceeds. The
//! target write happens later, in the job's workers, which take staged chunks before
//! any background work. So a guest write pays for one source read of its clusters, and
//! waits for at most one in-flight source read of a background chunk: never for the
//! target, and never behind the background queue. The background copy keeps at most
//! `workers` requests in flight on the source, read without readahead; while guest
//! requests are passing through the filter it keeps [`guest::BUSY_DEPTH`], with pauses
//! between them ([`guest`]), so a copy-before-write read or a guest read rarely queues
//! behind a background read at all.
//!
//! Where the target takes writes smaller than a cluster (a file), a guest write that
//! covers only part of an uncopied cluster saves just its own range's old data (a
//! fragment, see `fragments`), and the cluster is copied around it later: a 4 KiB
//! write reads 4 KiB of old data instead of the whole cluster.
//!
//! Staged data reaches the target before the job completes. If a target write fails
//! after the guest write that staged it was acknowledged, the data stays staged and the
//! job's `on-target-error` policy decides: `report` fails the job (the snapshot is
//! broken, the guest write stands); `stop` and `ignore` retry it.
//!
//! # Zeros
//!
//! Runs the source reports as zero, and buffers that turn out all-zero, become
//! write-zeroes on the target; where the target already reads zeros there (a fresh
//! sparse file), nothing is written at all, so the target stays sparse.
//!
//! # Files
//!
//! `mod.rs` holds the engine's state and the cluster life cycle above; `staging` the
//! copy-before-write path (claim, read old data, stage or write through, spill);
//! `worker` the background pass and every target write; `redirect` the guest writes
//! held until their clusters are copied; `snapshot_reads` the reads a standalone
//! filter's `snapshot-access` node makes.

mod fragments;
pub mod guest;
pub mod redirect;
mod snapshot_reads;
mod staging;
mod worker;

use std::collections::VecDeque;
use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;

use bitmap::Bitmap;
use block::Attachment;
use block::Error;
use block::IoBuf;
use tokio::sync::Notify;

use crate::job::IoOperation;
use crate::job::Progress;
use crate::ratelimit::RateLimit;

pub use block::options::OnCbwError;

/// One run of a snapshot read: its length, and the frozen-read registration when
/// the data is read from the source.
struct SnapshotRun {
    len: u64,
    frozen: Option<u64>,
}

/// EACCES, as QEMU fails snapshot reads outside the snapshot or after it broke.
fn access_denied(why: &str) -> Error {
    Error::from_io(
        format!("cannot read the snapshot: {why}"),
        std::io::Error::from_raw_os_error(libc::EACCES),
    )
}

/// Tuning of one engine.
#[derive(Debug, Clone)]
pub struct BlockCopyOptions {
    /// Granularity of the copy bitmap (a power of two).
    pub cluster_size: u64,
    /// Largest background request (a multiple of the cluster size).
    pub chunk_size: u64,
    /// Bytes of old data the staging area keeps in memory before spilling.
    pub staging_memory: usize,
    /// Where the spill file goes.
    pub scratch_dir: PathBuf,
    /// Skip clusters the source does not allocate (sync=top).
    pub skip_unallocated: bool,
    /// A full backup: a range no layer of the source allocates may stay as it is on a
    /// target that already reads zeros there. Otherwise (incremental, top, bitmap,
    /// none) every range that reads as zeros is recorded in the target as zeros (a
    /// zero cluster in qcow2), because the target may be layered over another image
    /// later and must not let that image show through.
    pub unallocated_may_stay_sparse: bool,
    /// Copy-before-write failure mode.
    pub on_cbw_error: OnCbwError,
    /// Write data compressed (whole target clusters).
    pub compress: bool,
    /// Unit of zero detection on the way out: 4 KiB for files, the cluster for
    /// formats that allocate clusters (a partial-cluster write would make them copy
    /// on write and allocate the cluster anyway).
    pub sparse_block: u64,
    /// A filter of its own (`blockdev-add copy-before-write`), with no job to drain a
    /// staging area: a copy-before-write writes the old data to the target before the
    /// guest write proceeds, and the point-in-time view can be read (see
    /// [`BlockCopy::read_snapshot`]).
    pub standalone: bool,
    /// How long a copy-before-write may take before it counts as failed (ETIMEDOUT);
    /// the copy itself goes on in the background.
    pub cbw_timeout: Option<std::time::Duration>,
    /// A guest write over part of a cluster saves only its own range (a fragment) and
    /// the background copies the rest later. Only for a job whose background pass
    /// copies every dirty cluster (not sync=none or top) into a target that takes
    /// writes smaller than a cluster uncompressed (`sparse_block` below the cluster).
    pub partial_cbw: bool,
    /// Bytes of fragments noted at once, at most (their clusters not copied yet); past
    /// it a copy-before-write saves whole clusters again.
    pub max_fragment_bytes: u64,
    /// Aligned guest writes to clusters not copied yet are held in memory and written
    /// to the source once the cluster's old data is in hand, instead of waiting for a
    /// copy-before-write read (see `redirect`). Only for a job whose background pass
    /// copies every cluster (a write is held until its cluster is copied).
    pub redirect_writes: bool,
    /// While the guest is busy, each background copy is followed by a pause this many
    /// times as long as it took (`guest`).
    pub busy_pause_ratio: u32,
}

/// [`BlockCopyOptions::max_fragment_bytes`] for a target that assembles its clusters
/// (and so holds fragments in memory until their cluster is copied).
pub const ASSEMBLED_FRAGMENT_BYTES: u64 = 64 << 20;

/// A copy that failed in the background.
#[derive(Debug)]
pub struct CopyError {
    /// Source read or target write.
    pub operation: IoOperation,
    /// The failure.
    pub error: Error,
}

/// How a pass of the workers ended without error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PassEnd {
    /// Every cluster is on the target.
    Done,
    /// Stopped early (pause or cancel); the state is kept for the next pass.
    Interrupted,
}

/// Totals for reports: what was written as data, as zeros, or skipped.
#[derive(Debug, Default)]
pub struct CopyStats {
    /// Bytes written to the target as data.
    pub data_bytes: AtomicU64,
    /// Bytes that were zero (written as zeros, or already zero on the target).
    pub zero_bytes: AtomicU64,
    /// Bytes skipped as unallocated (sync=top).
    pub skipped_bytes: AtomicU64,
    /// Bytes whose old data a guest write staged.
    pub cbw_bytes: AtomicU64,
    /// Bytes that went through the scratch file.
    pub spilled_bytes: AtomicU64,
    /// Bytes of `cbw_bytes` saved as fragments (part of a cluster; see `fragments`).
    pub fragment_bytes: AtomicU64,
    /// Bytes of guest writes held in memory instead of a copy-before-write (see
    /// `redirect`).
    pub redirected_bytes: AtomicU64,
    /// Bytes of held guest writes that went to the source between background copies,
    /// before their clusters were copied (a guest that flushes; see `redirect`).
    pub saved_early_bytes: AtomicU64,
}

#[derive(Debug)]
enum Payload {
    Zero,
    Memory(IoBuf),
    Scratch { at: u64 },
}

#[derive(Debug)]
struct Chunk {
    offset: u64,
    len: u64,
    payload: Payload,
    /// The payload's memory counts against the staging bound (guest-write chunks).
    staged_memory: bool,
    /// Zeros in the payload are written as zeros even where the target already reads
    /// zeros without allocating them (see `unallocated_may_stay_sparse`).
    record_zeros: bool,
    /// Bytes of job progress the chunk accounts for once on the target: whole clusters,
    /// or nothing for a fragment (its cluster counts when the rest is copied).
    progress: u64,
}

#[derive(Debug)]
struct Reading {
    id: u64,
    start: u64,
    end: u64,
    done: Arc<Notify>,
}

#[derive(Debug)]
struct CopyState {
    /// Set = point-in-time data only on the source.
    dirty: Bitmap,
    /// Claims being copied: source reads (and, standalone, the target writes after).
    reading: Vec<Reading>,
    /// Snapshot reads of the source in progress: guest writes over them wait.
    frozen: Vec<Reading>,
    /// Standalone only: clusters the snapshot may be read at (the initial copy bitmap,
    /// minus what the reader discarded).
    access: Option<Bitmap>,
    /// Chunks staged by guest writes, written first.
    staged: VecDeque<Chunk>,
    /// Chunks whose target write failed, kept for a retry.
    retry: VecDeque<Chunk>,
    /// Chunks being written to the target right now.
    writing: usize,
    staged_memory: usize,
    next_id: u64,
    /// Where the background scan resumes.
    cursor: u64,
    /// Old data saved for parts of dirty clusters.
    fragments: fragments::Fragments,
    /// Guest writes held until their clusters' old data is in hand.
    redirected: redirect::Redirected,
}

impl CopyState {
    fn claim(&mut self, start: u64, end: u64) -> Reading {
        self.dirty.reset(start, end - start);
        self.next_id += 1;
        Reading {
            id: self.next_id,
            start,
            end,
            done: Arc::new(Notify::new()),
        }
    }

    /// Ends a claim that copied nothing (a failed read, a claim never read, a partial
    /// copy-before-write): its clusters are dirty again.
    fn unclaim(&mut self, id: u64, start: u64, end: u64) {
        self.dirty.set(start, end - start);
        self.finish_reading(id);
    }

    /// Ends a read: removes the range and wakes whoever waits on it.
    fn finish_reading(&mut self, id: u64) {
        if let Some(i) = self.reading.iter().position(|r| r.id == id) {
            let reading = self.reading.swap_remove(i);
            reading.done.notify_waiters();
        }
    }

    /// Registers a snapshot read of the source over `[start, end)`.
    fn freeze(&mut self, start: u64, end: u64) -> u64 {
        self.next_id += 1;
        self.frozen.push(Reading {
            id: self.next_id,
            start,
            end,
            done: Arc::new(Notify::new()),
        });
        self.next_id
    }

    fn unfreeze(&mut self, id: u64) {
        if let Some(i) = self.frozen.iter().position(|r| r.id == id) {
            self.frozen.swap_remove(i).done.notify_waiters();
        }
    }

    fn is_complete(&self) -> bool {
        self.dirty.is_empty()
            && self.reading.is_empty()
            && self.staged.is_empty()
            && self.retry.is_empty()
            && self.writing == 0
    }
}

/// The spill file of the staging area: append-only while anything is spilled, emptied
/// when the last spilled chunk has reached the target.
#[derive(Debug)]
struct Scratch {
    file: Arc<File>,
    next: u64,
    live: usize,
}

enum Work {
    Write(Chunk),
    Copy { id: u64, start: u64, end: u64 },
    Idle { complete: bool },
}

/// Shared between the workers of one pass.
struct PassControl {
    stop: AtomicBool,
    stopped: Notify,
    rate: Arc<RateLimit>,
    background: bool,
}

impl PassControl {
    fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.stopped.notify_waiters();
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }
}

/// The engine. Shared by the copy-before-write filter and the job.
#[derive(Debug)]
pub struct BlockCopy {
    source: Attachment,
    target: Attachment,
    len: u64,
    options: BlockCopyOptions,
    state: Mutex<CopyState>,
    /// Any change workers may be waiting for (work staged, a read ended...).
    changed: Notify,
    scratch: Mutex<Option<Scratch>>,
    snapshot_error: Mutex<Option<String>>,
    progress: Arc<Progress>,
    stats: Arc<CopyStats>,
    /// Chunk-sized buffers for reuse: allocating and faulting in fresh memory for every
    /// chunk doubled the kernel time of a backup.
    buffers: Mutex<Vec<IoBuf>>,
    /// Guest requests through the filter, so the background pass gives way to them.
    guest: guest::GuestActivity,
    /// Bytes of guest writes held (`redirect`), readable without the state lock.
    held_bytes: std::sync::atomic::AtomicUsize,
    /// No more writes are held: the job is ending.
    redirect_closed: AtomicBool,
    /// A held write that could not be written to the source, for the next flush.
    write_back_error: Mutex<Option<String>>,
    /// Where held writes are recorded before they are acknowledged (`redirect`);
    /// `None` when writes are not held (never, or no longer).
    journal: Arc<Mutex<Option<block::held_journal::HeldJournal>>>,
    /// Whether `journal` is there, readable without its lock (which a hold keeps while
    /// it writes).
    journaled: AtomicBool,
}

fn round_down(v: u64, to: u64) -> u64 {
    v / to * to
}

impl BlockCopy {
    /// An engine copying `source` to `target` (same length): every cluster, or only
    /// the clusters `initial` marks (rounded out to whole clusters). The point in time
    /// is the moment this returns.
    pub fn new(
        source: Attachment,
        target: Attachment,
        options: BlockCopyOptions,
        progress: Arc<Progress>,
        initial: Option<&Bitmap>,
    ) -> Result<Self, Error> {
        let len = source.length();
        let mut dirty = Bitmap::new(len, options.cluster_size)
            .map_err(|e| Error::invalid(format!("cannot track copies: {e}")))?;
        match initial {
            Some(bits) => dirty
                .merge(bits)
                .map_err(|e| Error::invalid(format!("cannot use the sync bitmap: {e}")))?,
            None => dirty.fill(),
        }
        // Progress is counted in whole clusters, the last (short) one included, as
        // QEMU counts it: a job over 8 MiB + 4097 bytes reports 129 x 64 KiB.
        progress.set_total(dirty.count() * options.cluster_size);
        let access = options.standalone.then(|| dirty.clone());
        let journal = if options.redirect_writes {
            redirect::open_journal(&source)
        } else {
            None
        };
        Ok(Self {
            source,
            target,
            len,
            options,
            state: Mutex::new(CopyState {
                dirty,
                reading: Vec::new(),
                frozen: Vec::new(),
                access,
                staged: VecDeque::new(),
                retry: VecDeque::new(),
                writing: 0,
                staged_memory: 0,
                next_id: 0,
                cursor: 0,
                fragments: fragments::Fragments::default(),
                redirected: redirect::Redirected::default(),
            }),
            changed: Notify::new(),
            scratch: Mutex::new(None),
            snapshot_error: Mutex::new(None),
            progress,
            stats: Arc::new(CopyStats::default()),
            buffers: Mutex::new(Vec::new()),
            guest: guest::GuestActivity::default(),
            held_bytes: std::sync::atomic::AtomicUsize::new(0),
            redirect_closed: AtomicBool::new(false),
            write_back_error: Mutex::new(None),
            journaled: AtomicBool::new(journal.is_some()),
            journal: Arc::new(Mutex::new(journal)),
        })
    }

    /// Counts a guest request (through the filter) while the guard lives.
    pub fn guest_request(&self) -> guest::GuestRequest<'_> {
        self.guest.request()
    }

    /// Counts a guest flush as a guest request while the guard lives, and notes that
    /// this guest flushes (see `BlockCopy::save_held_early`).
    pub fn guest_flush(&self) -> guest::GuestRequest<'_> {
        self.guest.note_flush();
        self.guest.request()
    }

    /// A buffer of `len` bytes, reused when a free one is big enough (a copy-before-write
    /// run can span more than a chunk).
    fn take_buffer(&self, len: u64) -> IoBuf {
        let pooled = self
            .buffers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop()
            .filter(|b| b.capacity() >= len as usize);
        let mut buf =
            pooled.unwrap_or_else(|| IoBuf::zeroed(self.options.chunk_size.max(len) as usize));
        buf.set_len(len as usize);
        buf
    }

    /// Gives a chunk buffer back for reuse (16 at most).
    fn return_buffer(&self, buf: IoBuf) {
        // Chunk-sized ones only: a buffer for one large guest write is not kept.
        let chunk = self.options.chunk_size as usize;
        if (chunk..=2 * chunk).contains(&buf.capacity()) {
            let mut pool = self.buffers.lock().unwrap_or_else(|e| e.into_inner());
            if pool.len() < 16 {
                pool.push(buf);
            }
        }
    }

    /// Whole clusters' worth of progress for `len` bytes of claimed run.
    fn cluster_progress(&self, len: u64) -> u64 {
        len.div_ceil(self.options.cluster_size) * self.options.cluster_size
    }

    /// The pieces of a claimed run in hand (zeros or memory) that the target still
    /// needs: all of it, or the gaps its clusters' fragments (`holes`) leave. The first
    /// piece carries the run's progress; a run the fragments cover whole is counted
    /// here.
    fn around_fragments(&self, chunk: Chunk, holes: &[(u64, u64)]) -> Vec<Chunk> {
        if holes.is_empty() {
            return vec![chunk];
        }
        let mut progress = chunk.progress;
        let pieces: Vec<Chunk> = fragments::gaps(chunk.offset, chunk.offset + chunk.len, holes)
            .into_iter()
            .map(|(start, end)| {
                let payload = match &chunk.payload {
                    Payload::Memory(buf) => {
                        let from = (start - chunk.offset) as usize;
                        let to = (end - chunk.offset) as usize;
                        Payload::Memory(IoBuf::from_slice(&buf[from..to]))
                    }
                    Payload::Zero => Payload::Zero,
                    Payload::Scratch { .. } => {
                        unreachable!("runs are split around fragments before they spill")
                    }
                };
                Chunk {
                    offset: start,
                    len: end - start,
                    payload,
                    staged_memory: false,
                    record_zeros: chunk.record_zeros,
                    progress: std::mem::take(&mut progress),
                }
            })
            .collect();
        if let Payload::Memory(buf) = chunk.payload {
            self.return_buffer(buf);
        }
        if progress > 0 {
            self.progress.add_done(progress);
        }
        pieces
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CopyState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The clusters whose point-in-time data is not on the target yet: still dirty,
    /// being read, or in hand (staged by guest writes, or kept after a failed target
    /// write). A failed `bitmap-mode=always` backup keeps exactly these.
    pub fn remaining(&self) -> Bitmap {
        let state = self.lock();
        let mut remaining = state.dirty.clone();
        for r in &state.reading {
            remaining.set(r.start, r.end - r.start);
        }
        for chunk in state.staged.iter().chain(&state.retry) {
            remaining.set(chunk.offset, chunk.len);
        }
        remaining
    }

    /// The source (the filter's child).
    pub fn source(&self) -> &Attachment {
        &self.source
    }

    /// The target.
    pub fn target(&self) -> &Attachment {
        &self.target
    }

    /// Device length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the device is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The copy granularity.
    pub fn cluster_size(&self) -> u64 {
        self.options.cluster_size
    }

    /// Totals so far.
    pub fn stats(&self) -> &Arc<CopyStats> {
        &self.stats
    }

    /// Why the snapshot is broken, if a `break-snapshot` copy-before-write failed.
    pub fn snapshot_error(&self) -> Option<String> {
        self.snapshot_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}
