//! Redirected guest writes: a write to a range whose point-in-time data is still only
//! on the source is held in memory instead of waiting for a copy-before-write read.
//!
//! A copy-before-write makes the guest's write wait for a read of old data from a
//! disk that the background copy keeps busy; that read is most of what a guest write
//! pays during a backup (`bench/RESULTS.md`, issue 18: with the read skipped, which
//! loses the snapshot and was only a measurement, the write p99 during a backup halved
//! in process and through NBD). Here the guest's data waits instead of the guest:
//!
//! * An aligned write (whole [`BLOCK`]s, no FUA) whose every block lies in a cluster
//!   still dirty or being read, or is held already, is copied into memory, block by
//!   block, and acknowledged. The source keeps the old data, so the background pass
//!   reads the point-in-time data where it always does, and no extra read happens at
//!   all.
//! * When a cluster's old data is in hand (the background read of it, or a
//!   copy-before-write, ended), its held blocks are written to the source
//!   (`BlockCopy::write_back`).
//! * Reads through the filter see held blocks over the source; block status reports
//!   them as data.
//! * Every other write (unaligned, FUA, write-zeroes, discard, or the memory bound
//!   reached) first writes back the held blocks it overlaps, after a copy-before-write
//!   of their clusters, then takes the copy-before-write path. So the source only ever
//!   receives a range's writes in the order the guest made them.
//! * A flush writes back every held block (copy-before-write first where the cluster is
//!   still dirty, several at once) before it flushes the source: what a flush covers
//!   is in the image itself, readable by any tool. The job writes back the rest before
//!   its filter goes.
//! * Once the guest has flushed, the background pass also saves the old data of a few
//!   held blocks between its copies and writes them back
//!   (`BlockCopy::save_held_early`), so the next flush finds little left to do. A
//!   guest that never flushes keeps its blocks held until their clusters are copied,
//!   which costs no read at all.
//!
//! A held write reads nothing from the source when it is made, so `on-cbw-error` can
//! only apply to it where a flush or a later overlapping write copies its cluster
//! first (the flush, or that write, fails with the error); a failed read of its
//! cluster by the background pass is the job's source error (`on-source-error`), as for
//! any cluster, and the write stays held until the cluster is read.
//!
//! A held write is appended to a journal beside the image
//! ([`block::held_journal`]) before it is acknowledged, and each block's write-back
//! appends a release. So a daemon killed at any moment loses no acknowledged write:
//! the next read-write open of the image writes the blocks still held into it. A
//! source with no host file (or whose journal cannot be created) holds nothing. One
//! lock orders every hold (sequence number, journal record, held set), so the journal
//! read in file order gives the held set back; releases need no such order, because a
//! release drops a block only if its sequence is still the one written back, in the
//! journal as in memory. A guest flush syncs the journal (emptied first when nothing
//! is held), alongside the source's flush; the job's end writes everything back,
//! flushes the source and deletes the journal. A write-back that fails is kept and
//! retried, and the next flush fails with its error.
//!
//! A block being written back is marked; a guest write to it updates its data and
//! sequence number, and the write-back, seeing the number changed, leaves it for the
//! next round instead of dropping newer data.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use block::Attachment;
use block::Error;
use block::ErrorKind;
use block::IoBuf;
use block::held_journal::HeldJournal;
use block::held_journal::journal_path;

use super::BlockCopy;
use super::CopyState;
use super::round_down;

/// The unit held: guests write whole 4 KiB pages.
pub const BLOCK: u64 = block::held_journal::BLOCK;

/// At most this many bytes held at once; past it, writes take the copy-before-write
/// path.
///
/// A guest writing at random holds about a quarter of what it writes during the
/// backup at the peak (half-way, half the disk is copied and half the writes so far
/// were held): a QD1 guest writing 21 MB/s through NBD during a 30 s backup of a
/// 4 GiB disk peaked near 160 MB. At 64 MiB the rest took the copy-before-write path,
/// and into a repository (256 KiB chunks, fragments bounded) about 1,300 writes read
/// a whole chunk first: the guest's write p99 was 600-770 us against 530-660 us during
/// a backup into a raw file. At 256 MiB nothing went through copy-before-write there,
/// and the p99 was 435-479 us against 427-491 us (`bench/RESULTS.md`, issue 16).
pub const MAX_HELD_BYTES: usize = 256 << 20;

/// Blocks written back at once by a flush.
const FLUSH_PARALLEL: usize = 16;

/// Held blocks saved and written back after each background copy, at most, once the
/// guest has flushed ([`BlockCopy::save_held_early`]).
const EARLY_BLOCKS: usize = 16;

/// Held blocks looked at for them, at most.
const EARLY_LOOK: usize = 256;

/// Past this many journal bytes no new write is held until nothing is (a guest that
/// never flushes cannot grow the journal without bound).
const JOURNAL_LIMIT: u64 = 4 * MAX_HELD_BYTES as u64;

/// A journal this long is emptied as soon as nothing is held.
const COMPACT_AT: u64 = 1 << 20;

/// The journal of a backup's source, or `None` (writes are not held) when the source
/// has no host file or the journal cannot be created there.
pub(super) fn open_journal(source: &Attachment) -> Option<HeldJournal> {
    let node = source.node();
    if node.policy().read_only {
        // No guest can write to it (the CLI backs up images opened read-only).
        return None;
    }
    let image = node.filename()?;
    let driver = node.driver();
    match HeldJournal::create(&image, driver.driver_name(), driver.length()) {
        Ok(journal) => Some(journal),
        Err(e) => {
            tracing::warn!(
                "guest writes go through copy-before-write during this backup: cannot \
                 create '{}': {e}",
                journal_path(&image).display()
            );
            None
        }
    }
}

fn lock_journal(
    journal: &std::sync::Mutex<Option<HeldJournal>>,
) -> std::sync::MutexGuard<'_, Option<HeldJournal>> {
    journal.lock().unwrap_or_else(|e| e.into_inner())
}

fn task_failed(what: &str, e: tokio::task::JoinError) -> Error {
    Error::new(ErrorKind::Io, format!("{what} failed: {e}"))
}

#[derive(Debug)]
struct Held {
    data: Arc<[u8]>,
    seq: u64,
    writing_back: bool,
}

/// The held blocks, by offset.
#[derive(Debug, Default)]
pub(super) struct Redirected {
    blocks: BTreeMap<u64, Held>,
    next_seq: u64,
    /// Where [`BlockCopy::save_held_early`] looks next.
    early_cursor: u64,
    /// Whether its last attempt failed (logged once per run of failures).
    early_failing: bool,
}

impl Redirected {
    fn overlaps(&self, start: u64, end: u64) -> bool {
        self.blocks
            .range(round_down(start, BLOCK)..end)
            .next()
            .is_some()
    }
}

/// What [`BlockCopy::redirect`] did with a write.
pub enum Redirect {
    /// Held: the guest's write is done.
    Held(IoBuf),
    /// Not held: the write takes the copy-before-write path.
    Pass(IoBuf),
    /// The attempt failed and took the data with it (a panicked task).
    Failed(Error),
}

/// Blocks taken for a write-back: `(offset, data, seq)` in offset order.
type Taken = Vec<(u64, Arc<[u8]>, u64)>;

/// The runs of neighbouring blocks in `taken`, as index ranges: each run is one
/// write to the source and one release in the journal.
fn neighbour_runs(taken: &Taken) -> Vec<std::ops::Range<usize>> {
    let mut runs: Vec<std::ops::Range<usize>> = Vec::new();
    for (i, (at, _, _)) in taken.iter().enumerate() {
        match runs.last_mut() {
            Some(run) if taken[run.end - 1].0 + BLOCK == *at => run.end = i + 1,
            _ => runs.push(i..i + 1),
        }
    }
    runs
}

/// Whether cluster `c`'s old data is still only on the source (dirty, or being read):
/// its copy will write back what is held there.
fn old_data_on_source(state: &CopyState, c: u64) -> bool {
    state.dirty.get(c) || state.reading.iter().any(|r| r.start <= c && c < r.end)
}

impl BlockCopy {
    fn held_bytes(&self) -> usize {
        self.held_bytes.load(Ordering::Relaxed)
    }

    /// Whether `[offset, offset + len)` may be held in `state`: redirection on, aligned,
    /// and every block either held already or in a cluster whose old data is still
    /// only on the source.
    fn may_hold(&self, state: &CopyState, offset: u64, len: u64) -> bool {
        let cluster = self.options.cluster_size;
        let end = offset + len;
        let mut new_bytes = 0;
        let mut at = offset;
        // The cluster last found with its old data on the source: a large write asks
        // once per cluster, not once per page.
        let mut checked = None;
        while at < end {
            if !state.redirected.blocks.contains_key(&at) {
                let c = round_down(at, cluster);
                if checked != Some(c) {
                    if !old_data_on_source(state, c) {
                        return false;
                    }
                    checked = Some(c);
                }
                new_bytes += BLOCK as usize;
            }
            at += BLOCK;
        }
        self.held_bytes() + new_bytes <= MAX_HELD_BYTES
    }

    /// The clusters of `[offset, end)` whose old data is no longer only on the source
    /// (in hand, or on the target): what is held there may be written back.
    fn copied_clusters(&self, state: &CopyState, offset: u64, end: u64) -> Vec<(u64, u64)> {
        let cluster = self.options.cluster_size;
        let mut copied: Vec<(u64, u64)> = Vec::new();
        let mut c = round_down(offset, cluster);
        while c < end {
            if !old_data_on_source(state, c) {
                let (from, to) = (c.max(offset), (c + cluster).min(end));
                match copied.last_mut() {
                    Some(run) if run.1 == from => run.1 = to,
                    _ => copied.push((from, to)),
                }
            }
            c += cluster;
        }
        copied
    }

    /// Holds a guest write where it may be (see the module note): recorded in the
    /// journal, then in memory, before the guest hears it is done.
    pub async fn redirect(self: &Arc<Self>, offset: u64, buf: IoBuf, fua: bool) -> Redirect {
        let len = buf.len() as u64;
        if !self.options.redirect_writes
            || !self.journaled.load(Ordering::Relaxed)
            || self.redirect_closed.load(Ordering::Relaxed)
            || fua
            || len == 0
            || !offset.is_multiple_of(BLOCK)
            || !len.is_multiple_of(BLOCK)
            || offset + len > self.len
            || self.snapshot_error().is_some()
        {
            return Redirect::Pass(buf);
        }
        // A first look, so writes that will not be held skip the blocking pool.
        if !self.may_hold(&self.lock(), offset, len) {
            return Redirect::Pass(buf);
        }
        let engine = self.clone();
        match tokio::task::spawn_blocking(move || engine.hold(offset, buf)).await {
            Ok((redirect, copied_meanwhile)) => {
                // Clusters copied while the record was written, after their copy
                // looked for held blocks: what is held there is written back now (only
                // there: the write's other clusters still need their old data).
                for (from, to) in copied_meanwhile {
                    self.write_back(from, to).await;
                }
                redirect
            }
            Err(e) => Redirect::Failed(task_failed("holding a guest write", e)),
        }
    }

    /// On the blocking pool, under the journal's lock: the sequence numbers, the
    /// journal record, then the held set. Also answers which parts of the write lie in
    /// clusters copied while the record was written.
    fn hold(&self, offset: u64, buf: IoBuf) -> (Redirect, Vec<(u64, u64)>) {
        let len = buf.len() as u64;
        let mut journal = lock_journal(&self.journal);
        let Some(journal) = journal.as_mut() else {
            return (Redirect::Pass(buf), Vec::new());
        };
        if journal.len() > JOURNAL_LIMIT || self.redirect_closed.load(Ordering::SeqCst) {
            return (Redirect::Pass(buf), Vec::new());
        }
        let first_seq = {
            let mut state = self.lock();
            if !self.may_hold(&state, offset, len) {
                return (Redirect::Pass(buf), Vec::new());
            }
            let first = state.redirected.next_seq + 1;
            state.redirected.next_seq += len / BLOCK;
            first
        };
        if let Err(e) = journal.append_write(offset, first_seq, &buf) {
            tracing::warn!(
                "a guest write goes through copy-before-write: '{}' cannot take it: {e}",
                journal.path().display()
            );
            return (Redirect::Pass(buf), Vec::new());
        }
        let mut state = self.lock();
        let mut added = 0;
        for (i, block) in buf.chunks(BLOCK as usize).enumerate() {
            let seq = first_seq + i as u64;
            let at = offset + i as u64 * BLOCK;
            let data: Arc<[u8]> = Arc::from(block);
            match state.redirected.blocks.get_mut(&at) {
                Some(held) => {
                    held.data = data;
                    held.seq = seq;
                }
                None => {
                    state.redirected.blocks.insert(
                        at,
                        Held {
                            data,
                            seq,
                            writing_back: false,
                        },
                    );
                    added += BLOCK as usize;
                }
            }
        }
        let copied_meanwhile = self.copied_clusters(&state, offset, offset + len);
        self.held_bytes.fetch_add(added, Ordering::Relaxed);
        drop(state);
        self.stats
            .redirected_bytes
            .fetch_add(len, Ordering::Relaxed);
        (Redirect::Held(buf), copied_meanwhile)
    }

    /// A guest read through the filter: the source, with held blocks over it.
    pub async fn read_through(&self, offset: u64, buf: IoBuf) -> Result<IoBuf, Error> {
        if self.held_bytes() == 0 {
            return self.source.read(offset, buf).await;
        }
        let end = offset + buf.len() as u64;
        // Taken before the source is read: a block written back and dropped while the
        // read runs is on the source by the time it is dropped, so nothing a read
        // must see can fall between the two.
        let held: Vec<(u64, Arc<[u8]>)> = {
            let state = self.lock();
            state
                .redirected
                .blocks
                .range(round_down(offset, BLOCK)..end)
                .map(|(&at, h)| (at, h.data.clone()))
                .collect()
        };
        let mut buf = self.source.read(offset, buf).await?;
        for (at, data) in held {
            let from = at.max(offset);
            let to = (at + BLOCK).min(end);
            buf[(from - offset) as usize..(to - offset) as usize]
                .copy_from_slice(&data[(from - at) as usize..(to - at) as usize]);
        }
        Ok(buf)
    }

    /// Block status through the filter: held blocks are data.
    pub async fn block_status_through(
        &self,
        offset: u64,
        len: u64,
    ) -> Result<block::Extent, Error> {
        let first_held = if self.held_bytes() == 0 {
            None
        } else {
            let state = self.lock();
            let blocks = &state.redirected.blocks;
            blocks
                .range(round_down(offset, BLOCK)..offset + len)
                .next()
                .map(|(&at, _)| {
                    // The run of held blocks from `at`.
                    let mut run_end = at + BLOCK;
                    while blocks.contains_key(&run_end) && run_end < offset + len {
                        run_end += BLOCK;
                    }
                    (at, run_end)
                })
        };
        match first_held {
            Some((at, run_end)) if at <= offset => Ok(block::Extent {
                offset,
                length: run_end.min(offset + len) - offset,
                status: block::Status {
                    data: true,
                    zero: false,
                    allocated: true,
                    host_offset: None,
                    compressed: false,
                },
            }),
            Some((at, _)) => {
                let mut extent = self.source.block_status(offset, at - offset).await?;
                extent.length = extent.length.min(at - offset);
                Ok(extent)
            }
            None => self.source.block_status(offset, len).await,
        }
    }

    /// Takes the held blocks of `[start, end)` nobody is writing back. `None` when some
    /// are being written back by someone else (wait and look again).
    fn take_held(&self, state: &mut CopyState, start: u64, end: u64) -> Option<Taken> {
        let mut taken = Vec::new();
        let mut busy = false;
        for (&at, held) in state
            .redirected
            .blocks
            .range_mut(round_down(start, BLOCK)..end)
        {
            if held.writing_back {
                busy = true;
            } else {
                held.writing_back = true;
                taken.push((at, held.data.clone(), held.seq));
            }
        }
        if busy && taken.is_empty() {
            None
        } else {
            Some(taken)
        }
    }

    /// Writes taken blocks to the source, coalescing neighbours; then drops those no
    /// guest write changed meanwhile. On failure every taken block stays held.
    async fn write_taken(&self, taken: &Taken) -> Result<(), Error> {
        let mut result = Ok(());
        for run in neighbour_runs(taken) {
            let blocks = &taken[run];
            let mut buf = IoBuf::zeroed(blocks.len() * BLOCK as usize);
            for (k, (_, data, _)) in blocks.iter().enumerate() {
                buf[k * BLOCK as usize..(k + 1) * BLOCK as usize].copy_from_slice(data);
            }
            result = self
                .source
                .write(blocks[0].0, buf, block::WriteFlags::default())
                .await
                .map(drop);
            if result.is_err() {
                break;
            }
        }
        if result.is_ok() {
            result = self.journal_release(taken).await;
        }
        let mut state = self.lock();
        let mut dropped = 0;
        for (at, _, seq) in taken {
            let Some(held) = state.redirected.blocks.get_mut(at) else {
                continue;
            };
            held.writing_back = false;
            if result.is_ok() && held.seq == *seq {
                state.redirected.blocks.remove(at);
                dropped += BLOCK as usize;
            }
        }
        let none_held = state.redirected.blocks.is_empty();
        drop(state);
        self.held_bytes.fetch_sub(dropped, Ordering::Relaxed);
        self.changed.notify_waiters();
        if result.is_ok()
            && none_held
            && let Err(e) = self.compact_journal(COMPACT_AT)
        {
            tracing::warn!("{e}");
        }
        result
    }

    /// Appends the releases of blocks written back (runs of neighbours, each block
    /// with the sequence it was taken at). Until this returns they stay held: a
    /// replay must not find a write whose release it lacks once a later write may have
    /// gone to the source directly.
    async fn journal_release(&self, taken: &Taken) -> Result<(), Error> {
        let runs: Vec<(u64, Vec<u64>)> = neighbour_runs(taken)
            .into_iter()
            .map(|run| {
                let blocks = &taken[run];
                (blocks[0].0, blocks.iter().map(|b| b.2).collect())
            })
            .collect();
        let journal = self.journal.clone();
        tokio::task::spawn_blocking(move || {
            let mut journal = lock_journal(&journal);
            let Some(journal) = journal.as_mut() else {
                return Ok(());
            };
            for (start, seqs) in &runs {
                journal.append_release(*start, seqs).map_err(|e| {
                    Error::from_io(
                        format!(
                            "cannot record a held write as written in '{}'",
                            journal.path().display()
                        ),
                        e,
                    )
                })?;
            }
            Ok(())
        })
        .await
        .map_err(|e| task_failed("recording held writes as written", e))?
    }

    /// Empties the journal if nothing is held and it has grown past `at_least` bytes.
    /// The held set is looked at under the journal's lock, and holds keep that lock for
    /// their whole course, so none can be half done. It runs where it is called (the
    /// runtime thread, after a write-back): a truncate is a short metadata change, made
    /// at most once per `at_least` bytes, and a journal whose lock is taken is left as
    /// it is rather than waited for (a hold or a release is writing to it, so there is
    /// no empty moment to catch anyway).
    fn compact_journal(&self, at_least: u64) -> Result<(), Error> {
        let mut journal = match self.journal.try_lock() {
            Ok(guard) => guard,
            Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return Ok(()),
        };
        let Some(j) = journal.as_mut() else {
            return Ok(());
        };
        if j.is_empty() || j.len() <= at_least || !self.lock().redirected.blocks.is_empty() {
            return Ok(());
        }
        j.clear()
            .map_err(|e| Error::from_io(format!("cannot empty '{}'", j.path().display()), e))
    }

    /// A guest flush's part of the journal: emptied if nothing is held, then synced,
    /// so no release a flushed write depends on can be lost with the power.
    pub async fn sync_journal(&self) -> Result<(), Error> {
        if !self.journaled.load(Ordering::SeqCst) {
            return Ok(());
        }
        self.compact_journal(0)?;
        let journal = self.journal.clone();
        tokio::task::spawn_blocking(move || {
            let mut journal = lock_journal(&journal);
            match journal.as_mut() {
                Some(j) => j.sync().map_err(|e| {
                    Error::from_io(format!("cannot sync '{}'", j.path().display()), e)
                }),
                None => Ok(()),
            }
        })
        .await
        .map_err(|e| task_failed("syncing the journal of held writes", e))?
    }

    /// Writes the held blocks of `[start, end)` to the source; only where their old
    /// data is safe already (in hand, on the target, or no longer needed). A failure
    /// keeps the blocks and is reported by the next flush.
    pub(super) async fn write_back(&self, start: u64, end: u64) {
        if self.held_bytes() == 0 {
            return;
        }
        loop {
            let taken = {
                let mut state = self.lock();
                if !state.redirected.overlaps(start, end) {
                    return;
                }
                self.take_held(&mut state, start, end)
            };
            let Some(taken) = taken else {
                // Someone else is writing these back: theirs to finish.
                return;
            };
            if taken.is_empty() {
                return;
            }
            if let Err(error) = self.write_taken(&taken).await {
                self.note_write_back_failure(error);
                return;
            }
        }
    }

    fn note_write_back_failure(&self, error: Error) {
        tracing::warn!("writing a held guest write to the source failed: {error}");
        let mut failed = self
            .write_back_error
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        failed.get_or_insert_with(|| error.to_string());
    }

    /// Writes every held block of `[start, end)` to the source, each after a
    /// copy-before-write of its cluster when `save_old`, waiting for write-backs
    /// others have in flight there. Returns once none is held there.
    pub async fn flush_held(
        self: &Arc<Self>,
        start: u64,
        end: u64,
        save_old: bool,
    ) -> Result<(), Error> {
        if self.held_bytes() == 0 {
            return Ok(());
        }
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let taken = {
                let mut state = self.lock();
                if !state.redirected.overlaps(start, end) {
                    return Ok(());
                }
                self.take_held(&mut state, start, end)
            };
            let Some(taken) = taken else {
                changed.await;
                continue;
            };
            if taken.is_empty() {
                changed.await;
                continue;
            }
            self.save_and_write_back(taken, save_old).await?;
        }
    }

    /// Writes taken blocks to the source, runs of neighbours several at once, each
    /// after a copy-before-write of its range when `save_old`. Blocks not written stay
    /// held; the first error is returned.
    async fn save_and_write_back(
        self: &Arc<Self>,
        taken: Taken,
        save_old: bool,
    ) -> Result<(), Error> {
        // Runs of neighbouring blocks, several at once: each may wait for a read
        // of old data.
        let runs = neighbour_runs(&taken);
        let mut blocks = taken.into_iter();
        let mut set = tokio::task::JoinSet::new();
        let mut first_error = None;
        for run in runs {
            let run: Taken = blocks.by_ref().take(run.len()).collect();
            while set.len() >= FLUSH_PARALLEL {
                if let Some(Ok(Err(e))) = set.join_next().await {
                    first_error.get_or_insert(e);
                }
            }
            let engine = self.clone();
            set.spawn(async move {
                let from = run[0].0;
                let to = run[run.len() - 1].0 + BLOCK;
                if save_old && let Err(e) = engine.before_write(from, to - from).await {
                    engine.release_taken(&run);
                    return Err(e);
                }
                engine.write_taken(&run).await
            });
        }
        while let Some(joined) = set.join_next().await {
            match joined {
                Ok(Err(e)) => {
                    first_error.get_or_insert(e);
                }
                Err(panic) => {
                    first_error.get_or_insert(Error::new(
                        ErrorKind::Io,
                        format!("writing held guest writes back failed: {panic}"),
                    ));
                }
                Ok(Ok(())) => {}
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Between two background copies, for a guest that flushes: up to
    /// [`EARLY_BLOCKS`] held blocks, in offset order from where the last call stopped,
    /// have their old data saved (only their own pages, where partial copy-before-write
    /// is on) and go to the source. The guest's next flush then finds only the blocks
    /// held since, instead of every block held since the last flush each with a read
    /// of old data, and the background's duty cycle (`guest`) covers these reads too.
    ///
    /// Not for a guest that never flushes: its held blocks cost no read at all when
    /// their clusters' copies write them back, and saving them early made the backup
    /// and the guest's writes slower (`bench/RESULTS.md`, issue 18, twelfth step).
    /// Failures leave the blocks held; the next flush or the cluster's copy tries again.
    pub(super) async fn save_held_early(self: &Arc<Self>) {
        if self.held_bytes() == 0 {
            return;
        }
        let taken = {
            let mut state = self.lock();
            let from = state.redirected.early_cursor;
            let mut taken: Taken = Vec::new();
            let (mut next, mut looked) = (0, 0);
            // Blocks a flush is writing back are passed over; a bounded look, so
            // the lock is never held for a walk of the whole set.
            let blocks = state.redirected.blocks.range_mut(from..).take(EARLY_LOOK);
            for (&at, held) in blocks {
                next = at + BLOCK;
                looked += 1;
                if !held.writing_back {
                    held.writing_back = true;
                    taken.push((at, held.data.clone(), held.seq));
                    if taken.len() == EARLY_BLOCKS {
                        break;
                    }
                }
            }
            // Past the last block held: start again from the lowest.
            let stopped = taken.len() == EARLY_BLOCKS || looked == EARLY_LOOK;
            state.redirected.early_cursor = if stopped { next } else { 0 };
            taken
        };
        if taken.is_empty() {
            return;
        }
        let bytes = taken.len() as u64 * BLOCK;
        let result = self.save_and_write_back(taken, true).await;
        let failing_before = {
            let mut state = self.lock();
            std::mem::replace(&mut state.redirected.early_failing, result.is_err())
        };
        match result {
            Ok(()) => {
                self.stats
                    .saved_early_bytes
                    .fetch_add(bytes, Ordering::Relaxed);
            }
            // Once per run of failures: a bad sector would otherwise log after every
            // background copy. The next flush tries again and fails if this does.
            Err(e) if !failing_before => {
                tracing::warn!("held guest writes stay held until the next flush: {e}");
            }
            Err(e) => tracing::debug!("held guest writes stay held: {e}"),
        }
    }

    /// Gives taken blocks back unwritten.
    fn release_taken(&self, taken: &Taken) {
        let mut state = self.lock();
        for (at, _, _) in taken {
            if let Some(held) = state.redirected.blocks.get_mut(at) {
                held.writing_back = false;
            }
        }
        drop(state);
        self.changed.notify_waiters();
    }

    /// A guest flush: every held block into the image, then the failure of an
    /// earlier write-back, if any (once).
    pub async fn flush_all_held(self: &Arc<Self>) -> Result<(), Error> {
        self.flush_held(0, self.len, true).await?;
        let failed = self
            .write_back_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        match failed {
            Some(message) => Err(Error::new(
                ErrorKind::Io,
                format!("an earlier write could not reach the disk: {message}"),
            )),
            None => Ok(()),
        }
    }

    /// The job is ending: holds no more writes and writes back what it holds (no old
    /// data is needed any more).
    ///
    /// Then the source is flushed and the journal deleted. On failure the journal is
    /// kept (it still matches what is held) for [`BlockCopy::abandon_held`] or a retry.
    pub async fn close_redirects(self: &Arc<Self>) -> Result<(), Error> {
        self.redirect_closed.store(true, Ordering::SeqCst);
        // A hold runs under the journal's lock from its check of the flag to its
        // insert: once the lock is had, none is half done.
        drop(lock_journal(&self.journal));
        self.flush_held(0, self.len, false).await?;
        if !self.journaled.load(Ordering::SeqCst) {
            return Ok(());
        }
        // Deleting the journal is what makes the image the only copy of the blocks.
        self.source.flush().await?;
        self.remove_journal().await
    }

    /// The filter is going with blocks still held that cannot be written to the
    /// source: they are lost, and so is the journal, which a later direct write would
    /// make stale (a replay would put old data over it).
    pub async fn abandon_held(&self) {
        let lost = self.held_bytes();
        if lost > 0 {
            tracing::error!(
                "{lost} bytes of guest writes held during the backup are lost: the source \
                 does not take them"
            );
        }
        if let Err(e) = self.remove_journal().await {
            tracing::error!("{e}");
        }
    }

    async fn remove_journal(&self) -> Result<(), Error> {
        let Some(journal) = lock_journal(&self.journal).take() else {
            return Ok(());
        };
        self.journaled.store(false, Ordering::SeqCst);
        tokio::task::spawn_blocking(move || {
            let path = journal.path().to_path_buf();
            journal.remove().map_err(|e| {
                Error::from_io(
                    format!(
                        "cannot delete '{}' (its writes are in the image: delete it before \
                         the image is next opened)",
                        path.display()
                    ),
                    e,
                )
            })
        })
        .await
        .map_err(|e| task_failed("deleting the journal of held writes", e))?
    }
}
