//! Refcounts and cluster allocation: finding free runs, growing the refcount table,
//! packing compressed clusters, and queueing frees until their L2 entries are durable.

use super::Qcow2Driver;
use super::geometry::Cluster;
use super::geometry::u64s_be;
use super::header;
use super::header::corrupt;
use super::metadata::Meta;
use super::metadata::RefBlock;
use super::refcount;
use crate::buf::IoBuf;
use crate::error::Error;
use crate::error::ErrorKind;
use crate::error::Result;
use crate::node::driver::WriteFlags;

impl Qcow2Driver {
    pub(super) async fn load_refblock(&self, m: &mut Meta, index: u64) -> Result<bool> {
        if m.refblocks.contains_key(&index) {
            return Ok(true);
        }
        let Some(&entry) = m.reftable.get(index as usize) else {
            return Ok(false);
        };
        let offset = entry & !511;
        if offset == 0 {
            return Ok(false);
        }
        let cs = self.geo.cluster_size as usize;
        let buf = self.file.read(offset, IoBuf::zeroed(cs)).await?;
        m.refblocks.insert(
            index,
            RefBlock {
                data: buf.to_vec(),
                dirty: false,
            },
        );
        Ok(true)
    }

    pub(super) async fn refcount(&self, m: &mut Meta, cluster: u64) -> Result<u64> {
        let index = cluster / self.geo.rb_entries;
        if !self.load_refblock(m, index).await? {
            return Ok(0);
        }
        Ok(refcount::get(
            &m.refblocks[&index].data,
            self.geo.refcount_order,
            cluster % self.geo.rb_entries,
        ))
    }

    /// Adds `delta` to a covered cluster's refcount.
    pub(super) async fn add_refcount(&self, m: &mut Meta, cluster: u64, delta: i64) -> Result<()> {
        let index = cluster / self.geo.rb_entries;
        if !self.load_refblock(m, index).await? {
            return Err(corrupt(format!("cluster {cluster} has no refcount block")));
        }
        let order = self.geo.refcount_order;
        let block = m.refblocks.get_mut(&index).unwrap();
        let slot = cluster % self.geo.rb_entries;
        let old = refcount::get(&block.data, order, slot);
        let new = old
            .checked_add_signed(delta)
            .filter(|&n| n <= refcount::max(order));
        let Some(new) = new else {
            return Err(corrupt(format!(
                "refcount of cluster {cluster} would leave its range ({old} {delta:+})"
            )));
        };
        refcount::set(&mut block.data, order, slot, new);
        block.dirty = true;
        if new == 0 {
            m.free_hint = m.free_hint.min(cluster);
        }
        Ok(())
    }

    /// First cluster of a run of `n` free clusters at or after the free hint.
    pub(super) async fn find_free_run(&self, m: &mut Meta, n: u64) -> Result<u64> {
        let mut c = m.free_hint;
        let mut start = c;
        let mut first_free = None;
        // Holes too small for this run should not make every allocation rescan the
        // whole image: after this many clusters, continue from the end.
        let mut budget = 1u64 << 16;
        while c - start < n {
            if budget == 0 && c < m.end {
                c = m.end;
                start = c;
            }
            budget = budget.saturating_sub(1);
            if c >= m.end && m.reftable.len() as u64 * self.geo.rb_entries <= c {
                break; // nothing beyond this is counted: all free
            }
            if self.refcount(m, c).await? != 0 {
                c += 1;
                start = c;
            } else {
                first_free.get_or_insert(c);
                c += 1;
            }
        }
        m.free_hint = first_free.unwrap_or(start);
        Ok(start)
    }

    /// Allocates `n` contiguous clusters (refcount 1 each) and returns the byte offset.
    pub(super) async fn alloc_clusters(&self, m: &mut Meta, n: u64) -> Result<u64> {
        let rbe = self.geo.rb_entries;
        let cs = self.geo.cluster_size;
        'search: loop {
            let start = self.find_free_run(m, n).await?;
            let last = start + n - 1;
            for t in start / rbe..=last / rbe {
                if (t as usize) >= m.reftable.len() {
                    self.grow_reftable(m, t).await?;
                    continue 'search;
                }
                if m.reftable[t as usize] & !511 != 0 {
                    continue;
                }
                // A new refcount block for range t, placed in the first cluster of the
                // run that t covers, so it counts itself; then search again.
                let c = start.max(t * rbe);
                let mut data = vec![0u8; cs as usize];
                refcount::set(&mut data, self.geo.refcount_order, c - t * rbe, 1);
                // Taken on the host file now, as a new L2 table is (see ensure_l2).
                self.reserve_cluster(c * cs, data.clone()).await?;
                m.refblocks.insert(t, RefBlock { data, dirty: true });
                m.reftable[t as usize] = c * cs;
                m.reftable_dirty.insert(t * 8 / cs);
                m.refblock_offsets.insert(c * cs);
                m.end = m.end.max(c + 1);
                continue 'search;
            }
            for c in start..=last {
                self.add_refcount(m, c, 1).await?;
            }
            m.end = m.end.max(last + 1);
            if m.free_hint == start {
                m.free_hint = last + 1;
            }
            return Ok(start * cs);
        }
    }

    /// Writes a new metadata cluster's first contents where it was allocated, before
    /// anything names it (so a crash leaves at worst an unreferenced cluster): its
    /// blocks on the host file are then taken, and no later flush of it needs space.
    pub(super) async fn reserve_cluster(&self, offset: u64, data: Vec<u8>) -> Result<()> {
        self.write_file(offset, IoBuf::from_slice(&data), WriteFlags::default())
            .await
            .map(drop)
    }

    /// Grows the refcount table so that entry `needed` exists. The new table and the
    /// refcount blocks describing it go at the end of the file; the header switches to
    /// it only after both are durable.
    pub(super) async fn grow_reftable(&self, m: &mut Meta, needed: u64) -> Result<()> {
        let cs = self.geo.cluster_size;
        let rbe = self.geo.rb_entries;
        let per_cluster = cs / 8;
        let old_entries = m.reftable.len() as u64;
        let base = m.end;
        let mut k = (m.reftable_clusters * 2).max((needed + 1).div_ceil(per_cluster));
        let mut b = 0u64;
        let (first, last) = loop {
            let total = k + b;
            let first = base / rbe;
            let last = (base + total - 1) / rbe;
            let uncovered = (first..=last)
                .filter(|&i| i >= old_entries || m.reftable[i as usize] & !511 == 0)
                .count() as u64;
            let need_k = (needed + 1).max(last + 1).div_ceil(per_cluster);
            if uncovered <= b && need_k <= k {
                break (first, last);
            }
            b = b.max(uncovered);
            k = k.max(need_k);
        };
        if k * cs > header::MAX_REFTABLE_BYTES {
            return Err(Error::new(
                ErrorKind::NoSpace,
                "the qcow2 refcount table would exceed 8 MiB: the image is too large for \
                 its cluster size",
            ));
        }
        // Everything pointed to by the new table must be on disk first.
        self.write_dirty_refblocks(m).await?;
        let mut table = m.reftable.clone();
        table.resize((k * per_cluster) as usize, 0);
        let mut next_block = base + k;
        let mut new_blocks = Vec::new();
        for i in first..=last {
            if table[i as usize] & !511 != 0 {
                continue;
            }
            table[i as usize] = next_block * cs;
            new_blocks.push((i, next_block));
            next_block += 1;
        }
        let used_end = next_block;
        // Existing blocks count the new clusters that fall in their range.
        for c in base..used_end {
            let i = c / rbe;
            if new_blocks.iter().any(|&(j, _)| j == i) {
                continue;
            }
            self.add_refcount(m, c, 1).await?;
        }
        self.write_dirty_refblocks(m).await?;
        for &(i, at) in &new_blocks {
            let mut data = vec![0u8; cs as usize];
            for c in base.max(i * rbe)..used_end.min((i + 1) * rbe) {
                refcount::set(&mut data, self.geo.refcount_order, c - i * rbe, 1);
            }
            self.write_file(at * cs, IoBuf::from_slice(&data), WriteFlags::default())
                .await?;
            m.refblocks.insert(i, RefBlock { data, dirty: false });
            m.refblock_offsets.insert(at * cs);
        }
        self.write_file(
            base * cs,
            IoBuf::from_slice(&u64s_be(&table)),
            WriteFlags::default(),
        )
        .await?;
        self.sync_file().await?;
        let mut pointer = Vec::with_capacity(12);
        pointer.extend_from_slice(&(base * cs).to_be_bytes());
        pointer.extend_from_slice(&(k as u32).to_be_bytes());
        self.write_file(
            header::OFFSET_REFCOUNT_TABLE,
            IoBuf::from_slice(&pointer),
            WriteFlags::default(),
        )
        .await?;
        self.sync_file().await?;
        // The old table is unreferenced now that the header is durable.
        let old_offset = m.reftable_offset;
        let old_clusters = m.reftable_clusters;
        m.reftable = table;
        m.reftable_offset = base * cs;
        m.reftable_clusters = k;
        m.reftable_dirty.clear();
        m.end = m.end.max(used_end);
        for c in 0..old_clusters {
            self.add_refcount(m, (old_offset >> self.geo.cluster_bits) + c, -1)
                .await?;
        }
        Ok(())
    }

    /// Allocates `len` bytes for a compressed cluster, packing several into one host
    /// cluster when they fit (each cluster touched gains one reference).
    pub(super) async fn alloc_compressed(&self, m: &mut Meta, len: u64) -> Result<u64> {
        let cs = self.geo.cluster_size;
        if let Some(tail) = m.compressed_tail.take() {
            let room = cs - (tail % cs);
            let cluster = tail / cs;
            if len <= room
                && self.refcount(m, cluster).await? < refcount::max(self.geo.refcount_order)
            {
                self.add_refcount(m, cluster, 1).await?;
                if len < room {
                    m.compressed_tail = Some(tail + len);
                }
                return Ok(tail);
            }
        }
        let n = len.div_ceil(cs);
        let start = self.alloc_clusters(m, n).await?;
        if len < n * cs && refcount::max(self.geo.refcount_order) > 1 {
            m.compressed_tail = Some(start + len);
        }
        Ok(start)
    }

    pub(super) fn queue_free(&self, m: &mut Meta, old: Cluster) {
        if let Some(range) = old.owned(&self.geo) {
            m.pending_frees.push(range);
        }
    }

    /// Whether the image looks metadata-preallocated: more clusters are counted in use
    /// than the host file has blocks for, by QEMU's measure (at least 10/9 of the
    /// allocated clusters, and 2 more). Refcounts are scanned from the start of the
    /// file until that many are found. A file whose allocation cannot be read does not
    /// look preallocated.
    pub(super) async fn looks_preallocated(&self, m: &mut Meta) -> Result<bool> {
        use std::os::unix::fs::MetadataExt;
        let cs = self.geo.cluster_size;
        let Some(allocated) = self
            .file
            .node()
            .filename()
            .and_then(|path| std::fs::metadata(path).ok())
            .map(|meta| meta.blocks() * 512)
        else {
            return Ok(false);
        };
        let real_clusters = allocated / cs;
        let threshold = (real_clusters * 10 / 9).max(real_clusters + 2);
        let end = self.file.length().div_ceil(cs);
        let mut counted = 0;
        let mut cluster = 0;
        while cluster < end && counted < threshold {
            if self.refcount(m, cluster).await? != 0 {
                counted += 1;
            }
            cluster += 1;
        }
        Ok(counted >= threshold)
    }
}
