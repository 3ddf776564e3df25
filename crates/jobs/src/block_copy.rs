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
//! A copy-before-write claims the dirty clusters a guest write touches, reads their old
//! data from the source, and parks it in the staging area: memory up to a bound, then a
//! scratch file (beside the target by default). Then the guest write proceeds. The
//! target write happens later, in the job's workers, which take staged chunks before
//! any background work. So a guest write pays for one source read of its clusters, and
//! waits for at most one in-flight source read of a background chunk: never for the
//! target, and never behind the background queue. The background copy keeps at most
//! `workers` requests in flight on the source.
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

use std::collections::VecDeque;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;

use bitmap::Bitmap;
use block::Attachment;
use block::Error;
use block::ErrorKind;
use block::Extent;
use block::IoBuf;
use block::WriteFlags;
use block::ZeroFlags;
use tokio::sync::Notify;
use tokio::task::JoinSet;

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
}

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
            }),
            changed: Notify::new(),
            scratch: Mutex::new(None),
            snapshot_error: Mutex::new(None),
            progress,
            stats: Arc::new(CopyStats::default()),
            buffers: Mutex::new(Vec::new()),
        })
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

    /// Clusters still to copy, in bytes (not counting data in hand).
    pub fn dirty_bytes(&self) -> u64 {
        self.lock().dirty.count_bytes()
    }

    /// Why the snapshot is broken, if a `break-snapshot` copy-before-write failed.
    pub fn snapshot_error(&self) -> Option<String> {
        self.snapshot_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Copy-before-write: makes sure the point-in-time data of every cluster touched
    /// by `[offset, offset + len)` is safe (in hand or on the target) before the caller
    /// overwrites the source, and that no snapshot read of those clusters is still
    /// reading the source.
    pub async fn before_write(self: &Arc<Self>, offset: u64, len: u64) -> Result<(), Error> {
        if len == 0 || offset >= self.len || self.snapshot_error().is_some() {
            return Ok(());
        }
        let cluster = self.options.cluster_size;
        let start = round_down(offset, cluster);
        let end = offset
            .saturating_add(len)
            .div_ceil(cluster)
            .saturating_mul(cluster)
            .min(self.len);
        let saved = match self.options.cbw_timeout {
            None => self.save_old_data(start, end).await,
            Some(limit) => {
                // In a task of its own, so a copy that outlives the limit still
                // finishes (and releases its claims) after the guest write gave up.
                let engine = self.clone();
                let copy = tokio::spawn(async move { engine.save_old_data(start, end).await });
                match tokio::time::timeout(limit, copy).await {
                    Ok(Ok(result)) => result,
                    Ok(Err(join)) => Err(Error::new(
                        ErrorKind::Io,
                        format!("copy-before-write task failed: {join}"),
                    )),
                    Err(_) => Err(Error::from_io(
                        format!(
                            "copy-before-write took longer than {} s",
                            limit.as_secs_f64()
                        ),
                        std::io::Error::from_raw_os_error(libc::ETIMEDOUT),
                    )),
                }
            }
        };
        if let Err(error) = saved {
            self.cbw_failed(error)?;
        }
        // Only a standalone filter has snapshot readers; a backup's guest writes skip
        // the extra lock.
        if self.options.standalone {
            self.wait_for_snapshot_reads(start, end).await;
        }
        Ok(())
    }

    /// Claims the dirty clusters of `[start, end)` and saves their old data; waits for
    /// copies of the range others have in flight.
    async fn save_old_data(&self, start: u64, end: u64) -> Result<(), Error> {
        loop {
            let (claims, other) = {
                let mut state = self.lock();
                let mut claims = Vec::new();
                let mut at = start;
                while let Some((o, l)) = state.dirty.next_dirty_area(at, end - at) {
                    if o >= end {
                        break;
                    }
                    let l = l.min(end - o);
                    let reading = state.claim(o, o + l);
                    claims.push((reading.id, o, o + l));
                    state.reading.push(reading);
                    at = o + l;
                }
                let other = state
                    .reading
                    .iter()
                    .find(|r| r.start < end && start < r.end && !claims.iter().any(|c| c.0 == r.id))
                    .map(|r| r.done.clone());
                (claims, other)
            };
            for (i, &(id, o, e)) in claims.iter().enumerate() {
                if let Err(error) = self.stage(id, o, e).await {
                    // Release the claims not staged yet: their old data is still on
                    // the source, so they simply become dirty again.
                    let mut state = self.lock();
                    for &(id, o, e) in &claims[i + 1..] {
                        state.dirty.set(o, e - o);
                        state.finish_reading(id);
                    }
                    drop(state);
                    self.changed.notify_waiters();
                    return Err(error);
                }
            }
            let Some(done) = other else {
                return Ok(());
            };
            self.wait_ended(&done, |s| &s.reading).await;
            // Re-check: the other read may have failed and left its clusters dirty.
        }
    }

    /// Waits until no snapshot read of `[start, end)` is reading the source.
    async fn wait_for_snapshot_reads(&self, start: u64, end: u64) {
        loop {
            let done = {
                let state = self.lock();
                match state.frozen.iter().find(|r| r.start < end && start < r.end) {
                    Some(r) => r.done.clone(),
                    None => return,
                }
            };
            self.wait_ended(&done, |s| &s.frozen).await;
        }
    }

    /// Waits until the reading (in the list `which` picks) that owns `done` has ended.
    /// The wait is enabled before the check under the lock, so no wake-up is lost.
    async fn wait_ended(&self, done: &Arc<Notify>, which: fn(&CopyState) -> &Vec<Reading>) {
        let notified = done.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let still = which(&self.lock())
            .iter()
            .any(|r| Arc::ptr_eq(&r.done, done));
        if still {
            notified.await;
        }
    }

    /// Where the snapshot's data for the run at `offset` (at most `len` bytes) is, once
    /// no copy of it is in flight. A source run comes registered as a frozen read:
    /// guest writes over it wait until [`BlockCopy::end_snapshot_read`].
    async fn snapshot_run(&self, offset: u64, len: u64) -> Result<SnapshotRun, Error> {
        let cluster = self.options.cluster_size;
        let end = offset + len;
        loop {
            let in_flight = {
                let mut state = self.lock();
                if let Some(broken) = self.snapshot_error() {
                    return Err(access_denied(&broken));
                }
                let Some(access) = &state.access else {
                    return Err(Error::unsupported(
                        "only a copy-before-write node added with blockdev-add has a \
                         snapshot to read",
                    ));
                };
                if access.next_clear(offset).is_some_and(|at| at < end) {
                    return Err(access_denied(
                        "the range is outside the snapshot (not in its bitmap, or \
                         discarded by the reader)",
                    ));
                }
                let on_source = state.dirty.get(offset);
                let run_end = if on_source {
                    state.dirty.next_clear(offset)
                } else {
                    state.dirty.next_set(offset)
                }
                .unwrap_or(self.len)
                .min(end);
                let (a, b) = (
                    round_down(offset, cluster),
                    run_end.div_ceil(cluster) * cluster,
                );
                match state.reading.iter().find(|r| r.start < b && a < r.end) {
                    Some(copy) => copy.done.clone(),
                    None if on_source => {
                        let id = state.freeze(a, b);
                        return Ok(SnapshotRun {
                            len: run_end - offset,
                            frozen: Some(id),
                        });
                    }
                    None => {
                        return Ok(SnapshotRun {
                            len: run_end - offset,
                            frozen: None,
                        });
                    }
                }
            };
            // A copy of the run is in flight: once it ends the data is on the target
            // (or, if it failed, still on the source).
            self.wait_ended(&in_flight, |s| &s.reading).await;
        }
    }

    /// Ends a frozen read; fails it if the snapshot broke meanwhile (a guest write
    /// that could not save the old data may have overwritten what was read).
    fn end_snapshot_read(&self, run: &SnapshotRun) -> Result<(), Error> {
        if let Some(id) = run.frozen {
            self.lock().unfreeze(id);
        }
        match self.snapshot_error() {
            Some(broken) => Err(access_denied(&broken)),
            None => Ok(()),
        }
    }

    /// Snapshot API: reads the point-in-time data, from the source where it is still
    /// there and from the target where a copy-before-write saved it. Fails with EACCES
    /// outside the snapshot or once it is broken.
    pub async fn read_snapshot(&self, offset: u64, mut buf: IoBuf) -> Result<IoBuf, Error> {
        let len = buf.len() as u64;
        let mut done = 0;
        while done < len {
            let at = offset + done;
            let run = self.snapshot_run(at, len - done).await?;
            let from = if run.frozen.is_some() {
                &self.source
            } else {
                &self.target
            };
            if run.len == len {
                // One run covers the request: read straight into the caller's buffer.
                let read = from.read(at, buf).await;
                let ended = self.end_snapshot_read(&run);
                let full = read?;
                ended?;
                return Ok(full);
            }
            let read = from.read(at, IoBuf::zeroed(run.len as usize)).await;
            let ended = self.end_snapshot_read(&run);
            let part = read?;
            ended?;
            let d = done as usize;
            buf[d..d + part.len()].copy_from_slice(&part);
            done += run.len;
        }
        Ok(buf)
    }

    /// Snapshot API: status of the point-in-time data. Runs saved on the target are
    /// always reported allocated (the snapshot has data there, whatever the target's
    /// own allocation says).
    pub async fn block_status_snapshot(&self, offset: u64, len: u64) -> Result<Extent, Error> {
        let run = self.snapshot_run(offset, len).await?;
        let status = if run.frozen.is_some() {
            self.source.block_status(offset, run.len).await
        } else {
            self.target
                .block_status(offset, run.len)
                .await
                .map(|mut e| {
                    e.status.allocated = true;
                    e.status.host_offset = None;
                    e
                })
        };
        let ended = self.end_snapshot_read(&run);
        let extent = status?;
        ended?;
        Ok(extent)
    }

    /// Snapshot API: the reader is done with the whole clusters of the range. They are
    /// no longer protected or readable, and the target gives their space back.
    pub async fn discard_snapshot(&self, offset: u64, len: u64) -> Result<(), Error> {
        let cluster = self.options.cluster_size;
        let start = offset.div_ceil(cluster) * cluster;
        let end = if offset + len == self.len {
            self.len
        } else {
            round_down(offset + len, cluster)
        };
        if end <= start {
            return Ok(());
        }
        {
            let mut state = self.lock();
            let Some(access) = &mut state.access else {
                return Err(Error::unsupported(
                    "only a copy-before-write node added with blockdev-add has a snapshot",
                ));
            };
            access.reset(start, end - start);
            state.dirty.reset(start, end - start);
        }
        self.target.discard(start, end - start).await
    }

    fn cbw_failed(&self, error: Error) -> Result<(), Error> {
        match self.options.on_cbw_error {
            OnCbwError::BreakGuestWrite => Err(error),
            OnCbwError::BreakSnapshot => {
                let mut broken = self
                    .snapshot_error
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                if broken.is_none() {
                    *broken = Some(format!(
                        "copy-before-write failed, the snapshot is broken: {error}"
                    ));
                }
                drop(broken);
                self.changed.notify_waiters();
                Ok(())
            }
        }
    }

    /// Reads the old data of a claimed run and parks it in the staging area (or, for
    /// a standalone filter, writes it to the target).
    async fn stage(&self, id: u64, start: u64, end: u64) -> Result<(), Error> {
        if self.options.standalone {
            return self.copy_through(id, start, end).await;
        }
        let len = end - start;
        let staged = async {
            let buf = self.source.read(start, IoBuf::zeroed(len as usize)).await?;
            if buf.is_zero() {
                return Ok(Payload::Zero);
            }
            let in_memory = {
                let mut state = self.lock();
                if state.staged_memory + len as usize <= self.options.staging_memory {
                    state.staged_memory += len as usize;
                    true
                } else {
                    false
                }
            };
            if in_memory {
                Ok(Payload::Memory(buf))
            } else {
                let at = self.spill(buf).await?;
                self.stats.spilled_bytes.fetch_add(len, Ordering::Relaxed);
                Ok(Payload::Scratch { at })
            }
        }
        .await;
        let mut state = self.lock();
        match staged {
            Ok(payload) => {
                let staged_memory = matches!(payload, Payload::Memory(_));
                // Old data saved before a guest write: its zeros are recorded.
                state.staged.push_back(Chunk {
                    offset: start,
                    len,
                    payload,
                    staged_memory,
                    record_zeros: true,
                });
                state.finish_reading(id);
                drop(state);
                self.stats.cbw_bytes.fetch_add(len, Ordering::Relaxed);
                self.changed.notify_waiters();
                Ok(())
            }
            Err(error) => {
                state.dirty.set(start, len);
                state.finish_reading(id);
                drop(state);
                self.changed.notify_waiters();
                Err(error)
            }
        }
    }

    /// Standalone copy-before-write of a claimed run: reads the old data and writes it
    /// to the target. The claim stays until the target has it, so a snapshot read of
    /// the run waits and then finds the data on the target.
    async fn copy_through(&self, id: u64, start: u64, end: u64) -> Result<(), Error> {
        let len = end - start;
        let copied = async {
            // A pooled buffer: a fresh zeroed one per guest write cost a memset (and
            // page faults) on the guest's path.
            let buf = self.source.read(start, self.take_buffer(len)).await?;
            let payload = if buf.is_zero() {
                self.return_buffer(buf);
                Payload::Zero
            } else {
                Payload::Memory(buf)
            };
            let chunk = Chunk {
                offset: start,
                len,
                payload,
                staged_memory: false,
                record_zeros: true,
            };
            let written = self.write_payload(&chunk).await;
            if let Payload::Memory(buf) = chunk.payload {
                self.return_buffer(buf);
            }
            written
        }
        .await;
        let mut state = self.lock();
        if copied.is_err() {
            state.dirty.set(start, len);
        }
        state.finish_reading(id);
        drop(state);
        self.changed.notify_waiters();
        let data = copied?;
        self.stats.cbw_bytes.fetch_add(len, Ordering::Relaxed);
        self.stats.data_bytes.fetch_add(data, Ordering::Relaxed);
        self.stats
            .zero_bytes
            .fetch_add(len - data, Ordering::Relaxed);
        self.progress
            .add_done(len.div_ceil(self.options.cluster_size) * self.options.cluster_size);
        Ok(())
    }

    async fn spill(&self, buf: IoBuf) -> Result<u64, Error> {
        let (file, at) = {
            let mut scratch = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
            if scratch.is_none() {
                let file = tempfile::tempfile_in(&self.options.scratch_dir).map_err(|e| {
                    Error::from_io(
                        format!(
                            "failed to create a staging file in '{}'",
                            self.options.scratch_dir.display()
                        ),
                        e,
                    )
                })?;
                *scratch = Some(Scratch {
                    file: Arc::new(file),
                    next: 0,
                    live: 0,
                });
            }
            let s = scratch.as_mut().unwrap();
            let at = s.next;
            s.next += buf.len() as u64;
            s.live += 1;
            (s.file.clone(), at)
        };
        let result = tokio::task::spawn_blocking(move || file.write_all_at(&buf, at))
            .await
            .map_err(|e| Error::new(ErrorKind::Io, format!("staging task failed: {e}")))?;
        match result {
            Ok(()) => Ok(at),
            Err(e) => {
                self.release_scratch().await;
                Err(Error::from_io(
                    "failed to stage old data in the scratch file",
                    e,
                ))
            }
        }
    }

    async fn unspill(&self, at: u64, len: u64) -> Result<IoBuf, Error> {
        let file = self
            .scratch
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|s| s.file.clone())
            .ok_or_else(|| Error::new(ErrorKind::Io, "staging file vanished"))?;
        let mut buf = IoBuf::zeroed(len as usize);
        let result = tokio::task::spawn_blocking(move || {
            let r = file.read_exact_at(&mut buf, at);
            (buf, r)
        })
        .await
        .map_err(|e| Error::new(ErrorKind::Io, format!("staging task failed: {e}")))?;
        match result {
            (buf, Ok(())) => Ok(buf),
            (_, Err(e)) => Err(Error::from_io("failed to read staged data back", e)),
        }
    }

    /// One spilled chunk is on the target: when none is left, empty the file.
    ///
    /// The truncation happens under the lock, synchronously: done later, it could wipe
    /// data a new spill wrote at offset 0 in between (the stress test caught that).
    async fn release_scratch(&self) {
        let mut scratch = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
        let Some(s) = scratch.as_mut() else { return };
        s.live -= 1;
        if s.live == 0 {
            s.next = 0;
            if let Err(e) = s.file.set_len(0) {
                tracing::warn!("failed to empty the staging file: {e}");
            }
        }
    }

    /// Runs `workers` workers until every cluster is on the target, the job asks to
    /// stop (`stop_requested`), or a copy fails. With `background` false (sync=none)
    /// the workers only write what guest writes staged, and the pass never completes
    /// on its own.
    pub async fn run_pass(
        self: &Arc<Self>,
        workers: usize,
        background: bool,
        rate: Arc<RateLimit>,
        job: &crate::job::Job,
    ) -> Result<PassEnd, CopyError> {
        let control = Arc::new(PassControl {
            stop: AtomicBool::new(false),
            stopped: Notify::new(),
            rate,
            background,
        });
        let mut set = JoinSet::new();
        for _ in 0..workers.max(1) {
            let engine = self.clone();
            let control = control.clone();
            set.spawn(async move { engine.worker(&control).await });
        }
        let mut first_error = None;
        loop {
            let changed = job.changed();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if job.pause_requested() || job.is_cancelled() || self.snapshot_error().is_some() {
                control.stop();
            }
            tokio::select! {
                joined = set.join_next() => match joined {
                    None => break,
                    Some(Ok(Ok(()))) => {}
                    Some(Ok(Err(e))) => {
                        control.stop();
                        first_error.get_or_insert(e);
                    }
                    Some(Err(panic)) => {
                        control.stop();
                        first_error.get_or_insert(CopyError {
                            operation: IoOperation::Write,
                            error: Error::new(ErrorKind::Io, format!("copy worker died: {panic}")),
                        });
                    }
                },
                _ = changed => {}
            }
        }
        if let Some(error) = first_error {
            return Err(error);
        }
        if background && self.lock().is_complete() {
            Ok(PassEnd::Done)
        } else {
            Ok(PassEnd::Interrupted)
        }
    }

    fn take_work(&self, state: &mut CopyState, control: &PassControl) -> Work {
        if let Some(chunk) = state.staged.pop_front().or_else(|| state.retry.pop_front()) {
            state.writing += 1;
            return Work::Write(chunk);
        }
        if control.background && !state.dirty.is_empty() {
            let found = state
                .dirty
                .next_dirty_area(state.cursor, self.options.chunk_size)
                .or_else(|| state.dirty.next_dirty_area(0, self.options.chunk_size));
            if let Some((start, len)) = found {
                let reading = state.claim(start, start + len);
                let id = reading.id;
                state.reading.push(reading);
                state.cursor = start + len;
                return Work::Copy {
                    id,
                    start,
                    end: start + len,
                };
            }
        }
        Work::Idle {
            complete: control.background && state.is_complete(),
        }
    }

    async fn worker(&self, control: &PassControl) -> Result<(), CopyError> {
        loop {
            if control.stopping() || self.snapshot_error().is_some() {
                return Ok(());
            }
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let peek_background = {
                let state = self.lock();
                state.staged.is_empty()
                    && state.retry.is_empty()
                    && control.background
                    && !state.dirty.is_empty()
            };
            let chunk = self.options.chunk_size;
            if peek_background {
                // Take the speed limit's budget for a whole chunk before claiming, so a
                // throttled worker never holds a claim (and a guest write) while it
                // sleeps; what the claim does not use is given back below.
                while !control.rate.try_charge(chunk) {
                    tokio::select! {
                        _ = control.rate.ready() => {}
                        _ = control.stopped.notified() => return Ok(()),
                    }
                    if control.stopping() {
                        return Ok(());
                    }
                }
            }
            let work = {
                let mut state = self.lock();
                self.take_work(&mut state, control)
            };
            if peek_background {
                let claimed = match work {
                    Work::Copy { start, end, .. } => end - start,
                    _ => 0,
                };
                control.rate.refund(chunk.saturating_sub(claimed));
            }
            match work {
                Work::Write(chunk) => self.write_chunk(chunk).await?,
                Work::Copy { id, start, end } => {
                    self.copy_chunk(id, start, end, &control.rate).await?;
                }
                Work::Idle { complete: true } => return Ok(()),
                Work::Idle { complete: false } => {
                    tokio::select! {
                        _ = changed => {}
                        _ = control.stopped.notified() => return Ok(()),
                    }
                }
            }
        }
    }

    /// Background copy of a claimed run: status, read, release the claim, write. The
    /// speed limit ends up charged what is copied (data or zeros; QEMU counts both):
    /// what the claim hands back after block status, and a skipped run, are refunded.
    async fn copy_chunk(
        &self,
        id: u64,
        start: u64,
        end: u64,
        rate: &RateLimit,
    ) -> Result<(), CopyError> {
        let cluster = self.options.cluster_size;
        let mut end = end;
        let mut known_zero = false;
        // Unknown allocation counts as allocated: its zeros are recorded.
        let mut record_zeros = true;
        // The status a reader of the source sees, through its backing chain.
        if let Ok(chained) =
            block::chain::block_status_above(&self.source, start, end - start).await
        {
            let extent = chained.extent;
            let run_end = start + extent.length;
            // Trust a run only in whole clusters (or up to the device end). A run
            // shorter than a cluster says nothing about the rest of it: copy just that
            // cluster, as data.
            let usable = if run_end == self.len {
                run_end
            } else {
                round_down(run_end, cluster)
            };
            let (new_end, trusted) = if usable > start {
                (usable.min(end), true)
            } else {
                ((start + cluster).min(end), false)
            };
            if new_end < end {
                // Handed back uncopied: not charged.
                rate.refund(end - new_end);
                let mut state = self.lock();
                state.dirty.set(new_end, end - new_end);
                if let Some(r) = state.reading.iter_mut().find(|r| r.id == id) {
                    r.end = new_end;
                }
                drop(state);
                self.changed.notify_waiters();
                end = new_end;
            }
            if trusted {
                // sync=top copies what the source's own layer allocates.
                let allocated_here = extent.status.allocated && chained.depth == 0;
                if self.options.skip_unallocated && !allocated_here {
                    // Skipped ranges are free.
                    rate.refund(end - start);
                    self.lock().finish_reading(id);
                    self.progress
                        .remove_work((end - start).div_ceil(cluster) * cluster);
                    self.stats
                        .skipped_bytes
                        .fetch_add(end - start, Ordering::Relaxed);
                    self.changed.notify_waiters();
                    return Ok(());
                }
                known_zero = extent.status.zero;
                record_zeros = extent.status.allocated || !self.options.unallocated_may_stay_sparse;
            }
        }
        let len = end - start;
        let payload = if known_zero {
            Payload::Zero
        } else {
            match self.source.read(start, self.take_buffer(len)).await {
                Ok(buf) if buf.is_zero() => {
                    self.return_buffer(buf);
                    Payload::Zero
                }
                Ok(buf) => Payload::Memory(buf),
                Err(error) => {
                    let mut state = self.lock();
                    state.dirty.set(start, len);
                    state.finish_reading(id);
                    drop(state);
                    self.changed.notify_waiters();
                    return Err(CopyError {
                        operation: IoOperation::Read,
                        error,
                    });
                }
            }
        };
        {
            let mut state = self.lock();
            state.finish_reading(id);
            state.writing += 1;
        }
        self.changed.notify_waiters();
        self.write_chunk(Chunk {
            offset: start,
            len,
            payload,
            staged_memory: false,
            record_zeros,
        })
        .await
    }

    /// Writes a chunk in hand to the target; on failure it goes to the retry queue.
    /// The caller has counted it in `writing`.
    async fn write_chunk(&self, chunk: Chunk) -> Result<(), CopyError> {
        let result = self.write_payload(&chunk).await;
        let spilled = matches!(chunk.payload, Payload::Scratch { .. });
        let (offset_len, failure) = {
            let mut state = self.lock();
            state.writing -= 1;
            match result {
                Ok(data) => {
                    if chunk.staged_memory {
                        state.staged_memory -= chunk.len as usize;
                    }
                    if let Payload::Memory(buf) = chunk.payload {
                        self.return_buffer(buf);
                    }
                    (Some((chunk.len, data)), None)
                }
                Err(error) => {
                    state.retry.push_front(chunk);
                    (None, Some(error))
                }
            }
        };
        self.changed.notify_waiters();
        if let Some(error) = failure {
            return Err(CopyError {
                operation: IoOperation::Write,
                error,
            });
        }
        let (len, data) = offset_len.expect("success carries its length");
        if spilled {
            self.release_scratch().await;
        }
        self.stats.data_bytes.fetch_add(data, Ordering::Relaxed);
        self.stats
            .zero_bytes
            .fetch_add(len - data, Ordering::Relaxed);
        self.progress
            .add_done(len.div_ceil(self.options.cluster_size) * self.options.cluster_size);
        Ok(())
    }

    /// Returns the bytes written as data (the rest were zeros).
    async fn write_payload(&self, chunk: &Chunk) -> Result<u64, Error> {
        let buf = match &chunk.payload {
            Payload::Zero => {
                self.write_zeroes(chunk.offset, chunk.len, chunk.record_zeros)
                    .await?;
                return Ok(0);
            }
            // A clone shares the memory: the chunk keeps the data for a retry.
            Payload::Memory(buf) => buf.clone(),
            Payload::Scratch { at } => self.unspill(*at, chunk.len).await?,
        };
        self.write_sparse(chunk.offset, buf, chunk.record_zeros)
            .await
    }

    /// Writes `buf` at `offset`, leaving blocks of zeros sparse (as `cp
    /// --sparse=always` does), so a backup never takes more space than its source.
    /// Returns the bytes written as data.
    async fn write_sparse(
        &self,
        offset: u64,
        buf: IoBuf,
        record_zeros: bool,
    ) -> Result<u64, Error> {
        let block_len = self.options.sparse_block.max(512) as usize;
        let flags = WriteFlags {
            compressed: self.options.compress,
            ..WriteFlags::default()
        };
        let mut runs: Vec<(usize, usize, bool)> = Vec::new();
        for (i, block) in buf.chunks(block_len).enumerate() {
            let zero = block::buf::is_zero(block);
            let at = i * block_len;
            match runs.last_mut() {
                Some(run) if run.2 == zero => run.1 = at + block.len(),
                _ => runs.push((at, at + block.len(), zero)),
            }
        }
        if let [(_, _, false)] = runs[..] {
            let len = buf.len() as u64;
            self.target.write(offset, buf, flags).await?;
            return Ok(len);
        }
        let mut data = 0;
        for (from, to, zero) in runs {
            let at = offset + from as u64;
            if zero {
                self.write_zeroes(at, (to - from) as u64, record_zeros)
                    .await?;
            } else {
                self.target
                    .write(at, IoBuf::from_slice(&buf[from..to]), flags)
                    .await?;
                data += (to - from) as u64;
            }
        }
        Ok(data)
    }

    /// Zeros on the target, skipped where the target already reads zeros.
    async fn write_zeroes(&self, offset: u64, len: u64, record: bool) -> Result<(), Error> {
        let mut at = offset;
        let end = offset + len;
        while at < end {
            let extent = self.target.block_status(at, end - at).await?;
            // Zeros the target holds itself (a zero cluster, a hole in a file) can
            // stay; zeros it only falls back to (an unallocated qcow2 cluster) are
            // written when they must be recorded.
            let holds_zeros = extent.status.zero && (extent.status.allocated || !record);
            if !holds_zeros {
                let flags = ZeroFlags {
                    may_unmap: true,
                    ..ZeroFlags::default()
                };
                self.target.write_zeroes(at, extent.length, flags).await?;
            }
            at += extent.length;
        }
        Ok(())
    }

    /// Writes whatever is in hand to the target, once each, ignoring failures (used
    /// when a sync=none job ends, so the overlay gets what guest writes staged).
    pub async fn drain_best_effort(&self) {
        loop {
            let chunk = {
                let mut state = self.lock();
                let chunk = state.staged.pop_front().or_else(|| state.retry.pop_front());
                if chunk.is_some() {
                    state.writing += 1;
                }
                chunk
            };
            let Some(chunk) = chunk else { return };
            if let Err(e) = self.write_chunk(chunk).await {
                tracing::warn!("dropping staged data after a failed write: {}", e.error);
                let mut state = self.lock();
                state.retry.pop_front();
            }
        }
    }
}
