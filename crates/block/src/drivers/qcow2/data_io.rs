//! Guest data I/O: looking a range up (waiting for allocations in flight), reading
//! runs from the file, the backing node or compressed bytes, writing pieces and
//! allocating their clusters, zeroing.

use super::MAX_ALLOC_RUN_BYTES;
use super::Qcow2Driver;
use super::compress;
use super::geometry::COMPRESSED;
use super::geometry::COPIED;
use super::geometry::Cluster;
use super::geometry::OFFSET_MASK;
use super::geometry::Run;
use super::geometry::ZERO;
use super::metadata::Meta;
use crate::buf::IoBuf;
use crate::error::Error;
use crate::error::ErrorKind;
use crate::error::Result;
use crate::node::driver::BlockDriver;
use crate::node::driver::WriteFlags;
use crate::node::driver::ZeroFlags;

impl Qcow2Driver {
    /// Waits while any of the guest clusters in `[first, last]` is being allocated.
    /// Returns the lock when none is.
    pub(super) async fn lock_settled(
        &self,
        first: u64,
        last: u64,
    ) -> tokio::sync::MutexGuard<'_, Meta> {
        loop {
            let m = self.meta.lock().await;
            let busy = !m.allocating.is_empty()
                && (first..=last.min(first + 4096)).any(|c| m.allocating.contains(&c))
                || (last > first + 4096 && m.allocating.iter().any(|&c| c >= first && c <= last));
            if !busy {
                return m;
            }
            let wait = self.allocated.notified();
            drop(m);
            wait.await;
        }
    }

    /// The run of identically mapped clusters at `offset`, at most `max` bytes.
    pub(super) async fn lookup(&self, m: &mut Meta, offset: u64, max: u64) -> Result<Run> {
        let geo = self.geo;
        let cs = geo.cluster_size;
        let first = geo.cluster_of(offset);
        let kind = self.cluster(m, first).await?;
        let mut len = (first + 1) * cs - offset;
        // Extend within the same L2 table (or across unallocated L1 entries).
        let mut prev = kind;
        let mut c = first + 1;
        while len < max {
            if m.allocating.contains(&c) {
                break;
            }
            if c.is_multiple_of(geo.l2_entries) && !(kind == Cluster::Unallocated) {
                break;
            }
            if c * cs >= geo.size {
                break;
            }
            let l1_index = geo.l1_index(c);
            let next = if m.l1[l1_index] & OFFSET_MASK == 0 {
                if kind == Cluster::Unallocated {
                    // The whole table is unallocated: skip to its end.
                    let table_end = (l1_index as u64 + 1) * geo.l2_entries;
                    len += (table_end - c) * cs;
                    c = table_end;
                    continue;
                }
                Cluster::Unallocated
            } else {
                let table = m.l1[l1_index] & OFFSET_MASK;
                if !m.l2.contains_key(&table) {
                    break; // do not load tables just to extend a run
                }
                let entry = m.l2[&table].entries[geo.l2_index(c)];
                self.classify(m, entry)?
            };
            if !prev.continues(next, cs) {
                break;
            }
            prev = next;
            len += cs;
            c += 1;
        }
        let len = len.min(max);
        let within = offset - first * cs;
        let host = match kind {
            Cluster::Data { host, .. } | Cluster::Zero { host: Some(host) } => Some(host + within),
            _ => None,
        };
        Ok(Run { kind, len, host })
    }

    /// Reads `out.len()` bytes of host data at `host`, zero-filling past the end of the
    /// file (the last cluster of an image may be short).
    pub(super) async fn read_host(&self, host: u64, len: usize) -> Result<IoBuf> {
        let file_len = self.file.length();
        let have = file_len.saturating_sub(host).min(len as u64) as usize;
        if have == len {
            return self.file.read(host, IoBuf::zeroed(len)).await;
        }
        let mut out = IoBuf::zeroed(len);
        if have > 0 {
            let part = self.file.read(host, IoBuf::zeroed(have)).await?;
            out[..have].copy_from_slice(&part);
        }
        Ok(out)
    }

    /// Reads from the backing node, zeros past its end.
    pub(super) async fn read_backing(&self, offset: u64, len: usize) -> Result<IoBuf> {
        let mut out = IoBuf::zeroed(len);
        if let Some(backing) = self.backing_link() {
            let blen = backing.length();
            let have = blen.saturating_sub(offset).min(len as u64) as usize;
            if have == len {
                return backing.read(offset, out).await;
            }
            if have > 0 {
                let part = backing.read(offset, IoBuf::zeroed(have)).await?;
                out[..have].copy_from_slice(&part);
            }
        }
        Ok(out)
    }

    pub(super) async fn read_compressed(&self, start: u64, end: u64) -> Result<Vec<u8>> {
        let stored = self.read_host(start, (end - start) as usize).await?;
        let mut out = vec![0u8; self.geo.cluster_size as usize];
        let kind = self.geo.compression;
        tokio::task::spawn_blocking(move || {
            compress::decompress(kind, &stored, &mut out).map(|_| out)
        })
        .await
        .map_err(|e| Error::new(ErrorKind::Io, format!("decompression task failed: {e}")))?
    }

    /// Reads `len` bytes at guest `offset` that map to `run` (the caller holds the gate).
    pub(super) async fn read_run(&self, offset: u64, run: Run) -> Result<IoBuf> {
        let len = run.len as usize;
        match run.kind {
            Cluster::Data { .. } => self.read_host(run.host.unwrap(), len).await,
            Cluster::Zero { .. } => Ok(IoBuf::zeroed(len)),
            Cluster::Unallocated => self.read_backing(offset, len).await,
            Cluster::Compressed { start, end } => {
                let cluster = self.read_compressed(start, end).await?;
                let within = (offset % self.geo.cluster_size) as usize;
                Ok(IoBuf::from_slice(&cluster[within..within + len]))
            }
        }
    }

    /// Writes the request `buf` (at guest `offset`) from byte `pos` on, as far as one
    /// mapping reaches; returns how many bytes it wrote (at least one).
    pub(super) async fn write_piece(
        &self,
        buf: &IoBuf,
        offset: u64,
        pos: u64,
        flags: WriteFlags,
    ) -> Result<u64> {
        let geo = self.geo;
        let cs = geo.cluster_size;
        let at = offset + pos;
        let len = buf.len() as u64 - pos;
        let first = geo.cluster_of(at);
        let last = geo.cluster_of(at + len - 1);
        let mut m = self.lock_settled(first, last).await;
        self.check_open(&m)?;
        let run = self.lookup(&mut m, at, len).await?;
        if let Cluster::Data { copied: true, .. } = run.kind {
            // Overwrite in place: no metadata changes.
            let host = run.host.unwrap();
            let _io = self.gate.read().await;
            drop(m);
            let data = if pos == 0 && run.len == len {
                buf.clone() // shares the memory, no copy
            } else {
                IoBuf::from_slice(&buf[pos as usize..(pos + run.len) as usize])
            };
            self.write_file(host, data, flags).await?;
            return Ok(run.len);
        }
        // Allocate: a run of clusters that are not writable in place, within one L2
        // table and at most MAX_ALLOC_RUN_BYTES.
        let table_end = (geo.l1_index(first) as u64 + 1) * geo.l2_entries;
        let max_clusters = (MAX_ALLOC_RUN_BYTES / cs).max(1);
        let mut n = 1;
        let mut olds = vec![self.cluster(&mut m, first).await?];
        while first + n <= last && first + n < table_end && n < max_clusters {
            let c = first + n;
            if m.allocating.contains(&c) {
                break;
            }
            let old = self.cluster(&mut m, c).await?;
            if matches!(old, Cluster::Data { copied: true, .. }) {
                break;
            }
            olds.push(old);
            n += 1;
        }
        self.ensure_l2(&mut m, first).await?;
        let host = self.alloc_clusters(&mut m, n).await?;
        for c in first..first + n {
            m.allocating.insert(c);
        }
        let io = self.gate.read().await;
        drop(m);

        let covered = (at + len).min((first + n) * cs) - at;
        let whole_clusters =
            at.is_multiple_of(cs) && (covered.is_multiple_of(cs) || at + covered == geo.size);
        let result = if whole_clusters && pos == 0 && covered == len {
            // The request is exactly these clusters: write it as it is, no copy.
            self.write_file(host, buf.clone(), flags).await.map(drop)
        } else {
            let data = &buf[pos as usize..(pos + covered) as usize];
            self.fill_new_clusters(at, data, first, n, host, &olds, flags)
                .await
        };
        drop(io);
        self.finish_allocation(first, n, host, &olds, result, flags)
            .await?;
        Ok(covered)
    }

    /// Ends an allocating write of clusters `[first, first + n)` at `host` whose data
    /// write ended with `result`: points their L2 entries at the new clusters (the old
    /// ones freed), or on failure gives the new clusters back; then wakes the requests
    /// that waited for them.
    async fn finish_allocation(
        &self,
        first: u64,
        n: u64,
        host: u64,
        olds: &[Cluster],
        result: Result<()>,
        flags: WriteFlags,
    ) -> Result<()> {
        let geo = self.geo;
        let cs = geo.cluster_size;
        let mut m = self.meta.lock().await;
        for c in first..first + n {
            m.allocating.remove(&c);
        }
        let outcome = match result {
            Ok(()) => {
                // The table may have been evicted while the data was written.
                let table = m.l1[geo.l1_index(first)] & OFFSET_MASK;
                match self.load_l2(&mut m, table).await {
                    Ok(()) => {
                        for (i, old) in olds.iter().enumerate() {
                            self.set_l2_entry(
                                &mut m,
                                first + i as u64,
                                (host + i as u64 * cs) | COPIED,
                            );
                            self.queue_free(&mut m, *old);
                        }
                        Ok(())
                    }
                    Err(e) => Err(e),
                }
            }
            Err(e) => Err(e),
        };
        if outcome.is_err() {
            // Nothing points at the new clusters: give them back at once.
            for c in 0..n {
                let _ = self
                    .add_refcount(&mut m, (host >> geo.cluster_bits) + c, -1)
                    .await;
            }
        }
        let fua = flags.fua && outcome.is_ok();
        let outcome = if fua {
            self.flush_meta(&mut m).await
        } else {
            outcome
        };
        drop(m);
        self.allocated.notify_waiters();
        outcome
    }

    /// `block-stream`'s copy of one cluster: if the image has nothing of its own there
    /// (unallocated), what the backing chain reads there is written into a new cluster.
    /// The backing chain is read-only, so its data can be read before the check; the
    /// check and the allocation happen under the metadata lock, after any allocation in
    /// flight there settled, so a guest write that got there first wins and one that
    /// comes later waits for the new cluster and then overwrites it. Where the chain
    /// reads zeros nothing is written: once the backing link is dropped an unallocated
    /// cluster reads zeros too. Returns whether it wrote.
    pub(super) async fn populate_cluster(&self, cluster: u64, keep_zeros: bool) -> Result<bool> {
        let geo = self.geo;
        let cs = geo.cluster_size;
        let start = cluster * cs;
        let len = cs.min(geo.size - start) as usize;
        {
            let mut m = self.lock_settled(cluster, cluster).await;
            self.check_open(&m)?;
            if !matches!(self.cluster(&mut m, cluster).await?, Cluster::Unallocated) {
                return Ok(false);
            }
        }
        let data = self.read_backing(start, len).await?;
        let zeros = data.iter().all(|&b| b == 0);
        if zeros && !keep_zeros {
            return Ok(false);
        }
        let mut m = self.lock_settled(cluster, cluster).await;
        self.check_open(&m)?;
        if self.read_only {
            return Err(Error::new(
                ErrorKind::PermissionDenied,
                "the image is read-only: it cannot take its backing file's data",
            ));
        }
        let old = self.cluster(&mut m, cluster).await?;
        if !matches!(old, Cluster::Unallocated) {
            return Ok(false);
        }
        self.ensure_l2(&mut m, cluster).await?;
        if zeros && self.geo.v3 {
            // A zero cluster: no data, and it hides whatever lies below it. (Version 2
            // has no zero flag: the zeros are written as data below.)
            self.set_l2_entry(&mut m, cluster, ZERO);
            return Ok(true);
        }
        let host = self.alloc_clusters(&mut m, 1).await?;
        m.allocating.insert(cluster);
        let io = self.gate.read().await;
        drop(m);
        let flags = WriteFlags::default();
        let result = self
            .fill_new_clusters(start, &data, cluster, 1, host, &[old], flags)
            .await;
        drop(io);
        self.finish_allocation(cluster, 1, host, &[old], result, flags)
            .await?;
        Ok(true)
    }

    /// Writes the clusters `[first, first + n)` at `host`: the request's bytes, with
    /// the parts of the first and last clusters it does not cover copied from their
    /// old contents (backing file, zeros, old or compressed cluster).
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn fill_new_clusters(
        &self,
        offset: u64,
        data: &[u8],
        first: u64,
        n: u64,
        host: u64,
        olds: &[Cluster],
        flags: WriteFlags,
    ) -> Result<()> {
        let cs = self.geo.cluster_size;
        let span_start = first * cs;
        let span = n * cs;
        let covered = data.len() as u64;
        let head = offset - span_start;
        let tail_start = head + covered;
        let mut buf = IoBuf::zeroed(span as usize);
        if head > 0 {
            let old = self.old_cluster(olds[0], first).await?;
            buf[..head as usize].copy_from_slice(&old[..head as usize]);
        }
        if tail_start < span {
            let old = self
                .old_cluster(olds[n as usize - 1], first + n - 1)
                .await?;
            let from = (tail_start - (n - 1) * cs) as usize;
            buf[tail_start as usize..].copy_from_slice(&old[from..]);
        }
        buf[head as usize..tail_start as usize].copy_from_slice(&data[..covered as usize]);
        // The last cluster of a disk whose size is not cluster aligned: write only up
        // to the end of the guest disk rounded to sectors.
        let guest_end = (self.geo.size.div_ceil(512) * 512).max(span_start);
        let write_len = span.min(guest_end.saturating_sub(span_start).max(1).div_ceil(512) * 512);
        buf.set_len(write_len as usize);
        self.write_file(host, buf, flags).await?;
        Ok(())
    }

    /// The old contents of one guest cluster, for copy-on-write.
    pub(super) async fn old_cluster(&self, old: Cluster, cluster: u64) -> Result<IoBuf> {
        let cs = self.geo.cluster_size;
        match old {
            Cluster::Unallocated => self.read_backing(cluster * cs, cs as usize).await,
            Cluster::Zero { .. } => Ok(IoBuf::zeroed(cs as usize)),
            Cluster::Data { host, .. } => self.read_host(host, cs as usize).await,
            Cluster::Compressed { start, end } => {
                Ok(IoBuf::from_slice(&self.read_compressed(start, end).await?))
            }
        }
    }

    /// Writes one whole cluster compressed (or plainly when it does not compress).
    pub(super) async fn write_compressed_cluster(&self, cluster: u64, data: &[u8]) -> Result<bool> {
        let geo = self.geo;
        let cs = geo.cluster_size;
        let mut plain = vec![0u8; cs as usize];
        plain[..data.len()].copy_from_slice(data);
        let kind = geo.compression;
        let compressed =
            tokio::task::spawn_blocking(move || compress::compress(kind, &plain, plain.len() - 1))
                .await
                .map_err(|e| Error::new(ErrorKind::Io, format!("compression task failed: {e}")))?;
        let Some(compressed) = compressed else {
            return Ok(false);
        };
        let mut m = self.lock_settled(cluster, cluster).await;
        self.check_open(&m)?;
        let old = self.cluster(&mut m, cluster).await?;
        self.ensure_l2(&mut m, cluster).await?;
        let len = compressed.len() as u64;
        let at = self.alloc_compressed(&mut m, len).await?;
        m.allocating.insert(cluster);
        let io = self.gate.read().await;
        drop(m);
        let result = self
            .write_file(at, IoBuf::from_slice(&compressed), WriteFlags::default())
            .await;
        drop(io);
        let mut m = self.meta.lock().await;
        m.allocating.remove(&cluster);
        let outcome = match result {
            Ok(_) => {
                let table = m.l1[geo.l1_index(cluster)] & OFFSET_MASK;
                let loaded = self.load_l2(&mut m, table).await;
                loaded.map(|()| {
                    let extra = ((at + len - 1) >> 9) - (at >> 9);
                    let entry = COMPRESSED | (extra << geo.csize_shift) | at;
                    self.set_l2_entry(&mut m, cluster, entry);
                    self.queue_free(&mut m, old);
                })
            }
            Err(e) => Err(e),
        };
        if outcome.is_err() {
            let first = at >> geo.cluster_bits;
            let last = (at + len - 1) >> geo.cluster_bits;
            for c in first..=last {
                let _ = self.add_refcount(&mut m, c, -1).await;
            }
            m.compressed_tail = None;
        }
        drop(m);
        self.allocated.notify_waiters();
        outcome.map(|()| true)
    }

    /// Sets whole clusters `[first, first + n)` to read as zeros (`zero`) or to be
    /// discarded, freeing their host clusters where allowed.
    pub(super) async fn zero_clusters(
        &self,
        first: u64,
        n: u64,
        unmap: bool,
        discard: bool,
    ) -> Result<()> {
        let geo = self.geo;
        let mut m = self.lock_settled(first, first + n - 1).await;
        self.check_open(&m)?;
        for c in first..first + n {
            let old = self.cluster(&mut m, c).await?;
            let new = if !geo.v3 {
                // No zero flag: deallocate (the caller made sure there is no backing
                // for zeroing).
                0
            } else {
                match old {
                    // An unallocated cluster reads as zeros only while no backing file
                    // is set; a zero cluster stays zeros under a later rebase (QEMU
                    // marks it too). A discard may leave it unallocated.
                    Cluster::Unallocated if self.backing_link().is_none() && discard => continue,
                    Cluster::Zero { host: None } => continue,
                    Cluster::Zero { host: Some(_) } if !unmap && !discard => continue,
                    Cluster::Data { host, copied: true } if !unmap && !discard => {
                        // Keep the allocation (preallocated zero cluster).
                        self.ensure_l2(&mut m, c).await?;
                        self.set_l2_entry(&mut m, c, host | COPIED | ZERO);
                        continue;
                    }
                    _ => ZERO,
                }
            };
            if new == 0 && old == Cluster::Unallocated {
                continue;
            }
            self.ensure_l2(&mut m, c).await?;
            self.set_l2_entry(&mut m, c, new);
            self.queue_free(&mut m, old);
        }
        Ok(())
    }

    /// Whether the guest range reads as zeros already (a cheap check for partial
    /// clusters of write_zeroes).
    pub(super) async fn reads_zero(&self, offset: u64, len: u64) -> Result<bool> {
        let mut m = self.meta.lock().await;
        let run = self.lookup(&mut m, offset, len).await?;
        Ok(run.len >= len
            && match run.kind {
                Cluster::Zero { .. } => true,
                Cluster::Unallocated => self.backing_link().is_none(),
                _ => false,
            })
    }

    pub(super) async fn zero_partial(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        if self.reads_zero(offset, len).await? {
            return Ok(());
        }
        if flags.no_fallback {
            return Err(Error::unsupported(
                "qcow2 cannot zero part of a cluster without writing data",
            ));
        }
        let buf = IoBuf::zeroed(len as usize);
        self.write(
            offset,
            buf,
            WriteFlags {
                fua: flags.fua,
                ..WriteFlags::default()
            },
        )
        .await?;
        Ok(())
    }
}
