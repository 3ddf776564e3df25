//! Snapshot reads, for a standalone copy-before-write filter's `snapshot-access`
//! node: a run still on the source is read under a frozen range guest writes wait
//! for, a saved run is read from the target, and ranges outside the snapshot are
//! refused. Both are bulk reads (`read_uncached`, no readahead): a puller reads the
//! whole snapshot in requests of its own size.

use super::BlockCopy;
use super::CopyState;
use super::Reading;
use super::SnapshotRun;
use super::access_denied;
use super::round_down;
use block::Error;
use block::Extent;
use block::IoBuf;
use std::sync::Arc;
use tokio::sync::Notify;

impl BlockCopy {
    /// Waits until no snapshot read of `[start, end)` is reading the source.
    pub(super) async fn wait_for_snapshot_reads(&self, start: u64, end: u64) {
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
    pub(super) async fn wait_ended(
        &self,
        done: &Arc<Notify>,
        which: fn(&CopyState) -> &Vec<Reading>,
    ) {
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
    pub(super) async fn snapshot_run(&self, offset: u64, len: u64) -> Result<SnapshotRun, Error> {
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
    pub(super) fn end_snapshot_read(&self, run: &SnapshotRun) -> Result<(), Error> {
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
            if run.len == len {
                // One run covers the request: read straight into the caller's buffer.
                let read = self.read_run(&run, at, buf).await;
                let ended = self.end_snapshot_read(&run);
                let full = read?;
                ended?;
                return Ok(full);
            }
            let read = self
                .read_run(&run, at, IoBuf::zeroed(run.len as usize))
                .await;
            let ended = self.end_snapshot_read(&run);
            let part = read?;
            ended?;
            let d = done as usize;
            buf[d..d + part.len()].copy_from_slice(&part);
            done += run.len;
        }
        Ok(buf)
    }

    /// Reads one run of a snapshot read: from the source where it is still there, else
    /// from the target. Both as bulk reads, without the host's readahead: a puller
    /// streams the whole snapshot in requests of its own size, and readahead read
    /// megabytes past each of them (this VM's disk reads ahead 8 MiB), mostly into the
    /// holes after a data extent or around a saved cluster, where it only zeroes
    /// pages. That kernel zeroing was a sixth of the daemon's time in an `nbdcopy`
    /// pull, and the pull took up to twice as long (bench/RESULTS.md).
    async fn read_run(&self, run: &SnapshotRun, at: u64, buf: IoBuf) -> Result<IoBuf, Error> {
        let from = if run.frozen.is_some() {
            &self.source
        } else {
            &self.target
        };
        from.read_uncached(at, buf, false).await
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
}
