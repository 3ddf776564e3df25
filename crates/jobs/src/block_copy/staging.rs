//! Copy-before-write: a guest write's clusters are claimed, their old data read from
//! the source and parked in the staging area (memory up to a bound, then a scratch
//! file), or, for a standalone filter, written straight to the target.

use super::BlockCopy;
use super::Chunk;
use super::OnCbwError;
use super::Payload;
use super::Scratch;
use super::round_down;
use block::Error;
use block::ErrorKind;
use block::IoBuf;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::Ordering;

impl BlockCopy {
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
    pub(super) async fn save_old_data(&self, start: u64, end: u64) -> Result<(), Error> {
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

    pub(super) fn cbw_failed(&self, error: Error) -> Result<(), Error> {
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
    pub(super) async fn stage(&self, id: u64, start: u64, end: u64) -> Result<(), Error> {
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
    pub(super) async fn copy_through(&self, id: u64, start: u64, end: u64) -> Result<(), Error> {
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

    pub(super) async fn spill(&self, buf: IoBuf) -> Result<u64, Error> {
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

    pub(super) async fn unspill(&self, at: u64, len: u64) -> Result<IoBuf, Error> {
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
    pub(super) async fn release_scratch(&self) {
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
}
