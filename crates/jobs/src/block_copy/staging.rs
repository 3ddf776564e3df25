//! Copy-before-write: a guest write's clusters are claimed, their old data read from
//! the source and parked in the staging area (memory up to a bound, then a scratch
//! file), or, for a standalone filter, written straight to the target.

use super::BlockCopy;
use super::Chunk;
use super::OnCbwError;
use super::Payload;
use super::Scratch;
use super::fragments;
use super::round_down;
use block::Error;
use block::ErrorKind;
use block::IoBuf;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::Ordering;

/// A claim of one cluster for the parts of it a guest write needs saved.
struct PartialClaim {
    id: u64,
    /// The cluster, claimed whole while the parts are read.
    cluster: (u64, u64),
    /// The parts to save: inside the guest's range, outside earlier fragments.
    needed: Vec<(u64, u64)>,
}

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
        let guest = (offset, offset.saturating_add(len).min(self.len));
        let saved = match self.options.cbw_timeout {
            None => self.save_old_data(start, end, guest).await,
            Some(limit) => {
                // In a task of its own, so a copy that outlives the limit still
                // finishes (and releases its claims) after the guest write gave up.
                let engine = self.clone();
                let copy =
                    tokio::spawn(async move { engine.save_old_data(start, end, guest).await });
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
    /// copies of the range others have in flight. `guest` is the range the guest
    /// writes: with partial copy-before-write, a cluster it covers only in part gets
    /// just that part saved (a fragment) and stays dirty.
    pub(super) async fn save_old_data(
        &self,
        start: u64,
        end: u64,
        guest: (u64, u64),
    ) -> Result<(), Error> {
        loop {
            let (claims, partial, other) = {
                let mut state = self.lock();
                let (whole, partial) = self.partial_claims(&mut state, start, end, guest);
                let mut claims = Vec::new();
                let mut at = whole.0;
                while let Some((o, l)) = state.dirty.next_dirty_area(at, whole.1 - at) {
                    if o >= whole.1 {
                        break;
                    }
                    let l = l.min(whole.1 - o);
                    let reading = state.claim(o, o + l);
                    // Fragments stay as they are while the run is claimed.
                    claims.push((reading.id, o, o + l, state.fragments.within(o, o + l)));
                    state.reading.push(reading);
                    at = o + l;
                }
                let other = state
                    .reading
                    .iter()
                    .find(|r| {
                        r.start < end
                            && start < r.end
                            && !claims.iter().any(|c| c.0 == r.id)
                            && !partial.iter().any(|p: &PartialClaim| p.id == r.id)
                    })
                    .map(|r| r.done.clone());
                (claims, partial, other)
            };
            let mut failed = None;
            for p in &partial {
                if failed.is_some() {
                    // Not read: the cluster's old data is still on the source.
                    self.lock().unclaim(p.id, p.cluster.0, p.cluster.1);
                } else if let Err(error) = self.stage_fragments(p).await {
                    failed = Some(error);
                }
            }
            for (id, o, e, holes) in claims {
                if failed.is_some() {
                    self.lock().unclaim(id, o, e);
                } else if let Err(error) = self.stage(id, o, e, &holes).await {
                    failed = Some(error);
                } else {
                    // The old data is in hand: guest writes held there can go.
                    self.write_back(o, e).await;
                }
            }
            if let Some(error) = failed {
                // Claims not staged were released above: they simply became dirty
                // again.
                self.changed.notify_waiters();
                return Err(error);
            }
            let Some(done) = other else {
                return Ok(());
            };
            self.wait_ended(&done, |s| &s.reading).await;
            // Re-check: the other read may have failed and left its clusters dirty.
        }
    }

    /// With partial copy-before-write, claims the (at most two) clusters at the ends
    /// of `[start, end)` that the guest's range covers only in part, for the parts no
    /// fragment has saved yet. Returns the range left for whole-cluster claims, and the
    /// partial claims.
    fn partial_claims(
        &self,
        state: &mut super::CopyState,
        start: u64,
        end: u64,
        guest: (u64, u64),
    ) -> ((u64, u64), Vec<PartialClaim>) {
        let mut whole = (start, end);
        let mut partial = Vec::new();
        if !self.options.partial_cbw
            || state.fragments.clusters() >= fragments::MAX_FRAGMENTED_CLUSTERS
            || state.fragments.bytes() >= self.options.max_fragment_bytes
        {
            return (whole, partial);
        }
        let cluster = self.options.cluster_size;
        // Fragments are whole target blocks (the unit of zero detection).
        let block = self.options.sparse_block;
        let g = (
            round_down(guest.0, block),
            guest.1.div_ceil(block).saturating_mul(block).min(self.len),
        );
        let first = start;
        let last = round_down(end - 1, cluster);
        let ends: &[u64] = if first == last {
            &[first]
        } else {
            &[first, last]
        };
        for &c in ends {
            let c_end = (c + cluster).min(self.len);
            if g.0 <= c && c_end <= g.1 {
                continue; // covered whole: its old data is read whole
            }
            // An end cluster covered in part: never claimed whole for this write.
            if c == whole.0 {
                whole.0 = c_end.min(whole.1);
            }
            if c_end == whole.1 {
                whole.1 = c.max(whole.0);
            }
            if !state.dirty.get(c) {
                continue; // copied already, or claimed (waited for as `other`)
            }
            let needed = state.fragments.missing(c, g.0.max(c), g.1.min(c_end));
            if needed.is_empty() {
                continue; // saved by an earlier write
            }
            let reading = state.claim(c, c_end);
            partial.push(PartialClaim {
                id: reading.id,
                cluster: (c, c_end),
                needed,
            });
            state.reading.push(reading);
        }
        (whole, partial)
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

    /// Reads the old data of a partial claim's ranges, stages each as a chunk of its
    /// own (counting no progress: the cluster counts when the rest is copied), notes
    /// them as fragments, and gives the cluster back to the dirty set.
    async fn stage_fragments(&self, claim: &PartialClaim) -> Result<(), Error> {
        let mut chunks = Vec::with_capacity(claim.needed.len());
        let mut read = Ok(());
        for &(s, e) in &claim.needed {
            match self.read_and_park(s, e - s, 0, &[]).await {
                Ok(parked) => chunks.extend(parked),
                Err(error) => {
                    read = Err(error);
                    break;
                }
            }
        }
        let (c, c_end) = claim.cluster;
        if let Err(error) = read {
            // Nothing noted: the cluster's old data (outside older fragments) is still
            // on the source.
            for chunk in chunks {
                self.unpark(chunk).await;
            }
            self.lock().unclaim(claim.id, c, c_end);
            self.changed.notify_waiters();
            return Err(error);
        }
        let bytes: u64 = chunks.iter().map(|c| c.len).sum();
        let mut state = self.lock();
        state.fragments.add(c, &claim.needed);
        state.staged.extend(chunks);
        // The rest of the cluster is still to copy.
        state.unclaim(claim.id, c, c_end);
        drop(state);
        self.changed.notify_waiters();
        self.stats.cbw_bytes.fetch_add(bytes, Ordering::Relaxed);
        self.stats
            .fragment_bytes
            .fetch_add(bytes, Ordering::Relaxed);
        Ok(())
    }

    /// Reads the old data of a claimed run and parks it in the staging area (or, for
    /// a standalone filter, writes it to the target).
    /// `holes` are the run's fragments, found when it was claimed.
    pub(super) async fn stage(
        &self,
        id: u64,
        start: u64,
        end: u64,
        holes: &[(u64, u64)],
    ) -> Result<(), Error> {
        if self.options.standalone {
            return self.copy_through(id, start, end).await;
        }
        let len = end - start;
        let staged = self
            .read_and_park(start, len, self.cluster_progress(len), holes)
            .await;
        let mut state = self.lock();
        match staged {
            Ok(chunks) => {
                let bytes: u64 = chunks.iter().map(|c| c.len).sum();
                state.fragments.remove_within(start, end);
                state.staged.extend(chunks);
                state.finish_reading(id);
                drop(state);
                self.stats.cbw_bytes.fetch_add(bytes, Ordering::Relaxed);
                self.changed.notify_waiters();
                Ok(())
            }
            Err(error) => {
                state.unclaim(id, start, end);
                drop(state);
                self.changed.notify_waiters();
                Err(error)
            }
        }
    }

    /// Reads `[start, start + len)` from the source and parks the parts its
    /// fragments (`holes`) leave, as staged chunks; the first carries `progress`.
    async fn read_and_park(
        &self,
        start: u64,
        len: u64,
        progress: u64,
        holes: &[(u64, u64)],
    ) -> Result<Vec<Chunk>, Error> {
        let buf = self.source.read(start, IoBuf::zeroed(len as usize)).await?;
        // Old data saved before a guest write: its zeros are recorded.
        let chunk = Chunk {
            offset: start,
            len,
            payload: if buf.is_zero() {
                Payload::Zero
            } else {
                Payload::Memory(buf)
            },
            staged_memory: false,
            record_zeros: true,
            progress,
        };
        let mut parked = Vec::new();
        for piece in self.around_fragments(chunk, holes) {
            match self.park(piece).await {
                Ok(piece) => parked.push(piece),
                Err(error) => {
                    for piece in parked {
                        self.unpark(piece).await;
                    }
                    return Err(error);
                }
            }
        }
        Ok(parked)
    }

    /// Keeps a staged chunk's data in memory, up to the staging bound, or else in the
    /// scratch file.
    async fn park(&self, mut chunk: Chunk) -> Result<Chunk, Error> {
        if !matches!(chunk.payload, Payload::Memory(_)) {
            return Ok(chunk);
        }
        let len = chunk.len as usize;
        {
            let mut state = self.lock();
            if state.staged_memory + len <= self.options.staging_memory {
                state.staged_memory += len;
                chunk.staged_memory = true;
                return Ok(chunk);
            }
        }
        let Payload::Memory(buf) = std::mem::replace(&mut chunk.payload, Payload::Zero) else {
            unreachable!("checked above");
        };
        let at = self.spill(buf).await?;
        self.stats
            .spilled_bytes
            .fetch_add(chunk.len, Ordering::Relaxed);
        chunk.payload = Payload::Scratch { at };
        Ok(chunk)
    }

    /// Gives back what a parked chunk holds (its share of the memory bound, its place
    /// in the scratch file) when it is dropped unwritten.
    async fn unpark(&self, chunk: Chunk) {
        if chunk.staged_memory {
            self.lock().staged_memory -= chunk.len as usize;
        }
        if let Payload::Scratch { .. } = chunk.payload {
            self.release_scratch().await;
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
                progress: 0,
            };
            // Through the page cache: the guest's write waits for this one, and
            // snapshot reads (fleecing) read it back soon.
            let written = self.write_payload(&chunk, false).await;
            if let Payload::Memory(buf) = chunk.payload {
                self.return_buffer(buf);
            }
            written
        }
        .await;
        let mut state = self.lock();
        if copied.is_err() {
            state.unclaim(id, start, end);
        } else {
            state.finish_reading(id);
        }
        drop(state);
        self.changed.notify_waiters();
        let data = copied?;
        self.stats.cbw_bytes.fetch_add(len, Ordering::Relaxed);
        self.stats.data_bytes.fetch_add(data, Ordering::Relaxed);
        self.stats
            .zero_bytes
            .fetch_add(len - data, Ordering::Relaxed);
        self.progress.add_done(self.cluster_progress(len));
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
