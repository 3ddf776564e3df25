//! The background pass: workers take staged chunks first, then claim dirty runs,
//! read them, and write data, zeros or nothing (where the target reads zeros
//! already) to the target.

use super::BlockCopy;
use super::Chunk;
use super::CopyError;
use super::CopyState;
use super::PassControl;
use super::PassEnd;
use super::Payload;
use super::Work;
use super::guest;
use super::round_down;
use crate::job::IoOperation;
use crate::ratelimit::RateLimit;
use block::Error;
use block::ErrorKind;
use block::IoBuf;
use block::WriteFlags;
use block::ZeroFlags;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering;
use std::time::Instant;
use tokio::sync::Notify;
use tokio::task::JoinSet;

impl BlockCopy {
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

    pub(super) fn take_work(&self, state: &mut CopyState, control: &PassControl) -> Work {
        if let Some(chunk) = state.staged.pop_front().or_else(|| state.retry.pop_front()) {
            state.writing += 1;
            return Work::Write(chunk);
        }
        if control.background && !state.dirty.is_empty() {
            let max = self.options.chunk_size;
            let found = state
                .dirty
                .next_dirty_area(state.cursor, max)
                .or_else(|| state.dirty.next_dirty_area(0, max));
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

    pub(super) async fn worker(self: &Arc<Self>, control: &PassControl) -> Result<(), CopyError> {
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
            if peek_background && !self.guest.may_start_background() {
                // The guest is busy and a background copy is in flight: wait for it to
                // end, for staged work, or for the guest to go quiet.
                tokio::select! {
                    _ = changed => {}
                    _ = tokio::time::sleep(guest::QUIET) => {}
                    _ = control.stopped.notified() => return Ok(()),
                }
                continue;
            }
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
                    self.guest.background.fetch_add(1, Ordering::Relaxed);
                    let began = Instant::now();
                    let copied = self.copy_chunk(id, start, end, &control.rate).await;
                    if copied.is_ok() && self.guest.has_flushed() {
                        // In the copy's slot, so its pause covers this too.
                        self.save_held_early().await;
                    }
                    if copied.is_ok()
                        && let Some(pause) = self
                            .guest
                            .pause_after(began.elapsed(), self.options.busy_pause_ratio)
                        && !pause.is_zero()
                    {
                        // The slot stays taken: the guest has the disk to itself.
                        tokio::select! {
                            _ = tokio::time::sleep(pause) => {}
                            _ = control.stopped.notified() => {}
                        }
                    }
                    self.guest.background.fetch_sub(1, Ordering::Relaxed);
                    self.changed.notify_waiters();
                    copied?;
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
    pub(super) async fn copy_chunk(
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
                    self.write_back(start, end).await;
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
            // Past the page cache: no readahead for the guest to queue behind, and the
            // guest's cached data stays. While the guest is busy, with O_DIRECT: one
            // request to the disk however much of the range the cache holds, where a
            // buffered read made one per uncached gap. (Not while it is quiet: with
            // every worker reading that way, the idle backup took 1.6x as long.)
            match self
                .source
                .read_uncached(start, self.take_buffer(len), self.guest.busy())
                .await
            {
                Ok(buf) if buf.is_zero() => {
                    self.return_buffer(buf);
                    Payload::Zero
                }
                Ok(buf) => Payload::Memory(buf),
                Err(error) => {
                    self.lock().unclaim(id, start, end);
                    self.changed.notify_waiters();
                    return Err(CopyError {
                        operation: IoOperation::Read,
                        error,
                    });
                }
            }
        };
        let chunk = Chunk {
            offset: start,
            len,
            payload,
            staged_memory: false,
            record_zeros,
            progress: self.cluster_progress(len),
        };
        let pieces = {
            let mut state = self.lock();
            // The run is copied now: its fragments' ranges are left alone (their old
            // data is staged or on the target already) and the notes go.
            let holes = state.fragments.within(start, end);
            state.fragments.remove_within(start, end);
            let pieces = self.around_fragments(chunk, &holes);
            state.finish_reading(id);
            state.writing += pieces.len();
            pieces
        };
        self.changed.notify_waiters();
        // The old data is in hand: guest writes held for the run can go to the source.
        self.write_back(start, end).await;
        let mut first_error = None;
        for piece in pieces {
            // A failed piece waits in the retry queue; the others still go.
            if let Err(error) = self.write_chunk(piece).await {
                first_error.get_or_insert(error);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Writes a chunk in hand to the target; on failure it goes to the retry queue.
    /// The caller has counted it in `writing`.
    pub(super) async fn write_chunk(&self, chunk: Chunk) -> Result<(), CopyError> {
        // Nobody waits for these writes, and nobody reads them back soon.
        let result = self.write_payload(&chunk, true).await;
        let spilled = matches!(chunk.payload, Payload::Scratch { .. });
        let progress = chunk.progress;
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
        self.progress.add_done(progress);
        Ok(())
    }

    /// Returns the bytes written as data (the rest were zeros). `uncached`: past the
    /// target's page cache (see `write_sparse`).
    pub(super) async fn write_payload(&self, chunk: &Chunk, uncached: bool) -> Result<u64, Error> {
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
        self.write_sparse(chunk.offset, buf, chunk.record_zeros, uncached)
            .await
    }

    /// Writes `buf` at `offset`, leaving blocks of zeros sparse (as `cp
    /// --sparse=always` does), so a backup never takes more space than its source.
    /// Returns the bytes written as data.
    ///
    /// `uncached` writes go past the target's page cache ([`WriteFlags::uncached`]):
    /// left to the host's writeback, the background's writes would reach the disk
    /// later, in bursts, beside the guest's requests and outside the share of the disk
    /// the background leaves the guest (see `guest`), since the pause after a copy
    /// covers only the time the copy itself took. Measured (`bench/RESULTS.md`, issue
    /// 18, fourth step): the guest's write p99 during a backup down by about a third
    /// in process and a fifth through NBD (medians), the idle backup up to 8% slower
    /// on a sparse image.
    pub(super) async fn write_sparse(
        &self,
        offset: u64,
        buf: IoBuf,
        record_zeros: bool,
        uncached: bool,
    ) -> Result<u64, Error> {
        let block_len = self.options.sparse_block.max(512) as usize;
        let flags = WriteFlags {
            compressed: self.options.compress,
            uncached,
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
    pub(super) async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        record: bool,
    ) -> Result<(), Error> {
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
