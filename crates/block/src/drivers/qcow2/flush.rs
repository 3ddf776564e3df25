//! Flushing qcow2 metadata, and closing the image.
//!
//! # Crash safety: the ordering rule
//!
//! `qemu-img check` must never find corruption after a crash, only leaks. Corruption is
//! a reference to a cluster whose refcount is too low; a leak is a refcount too high.
//! So metadata reaches the disk in this order, with a flush (fdatasync) between stages
//! (`flush_meta` below):
//!
//! 1. refcount blocks (new allocations counted before anything points at them);
//! 2. refcount table entries (a new block is on disk before the table names it);
//! 3. L2 tables (a new table is on disk before L1 names it; data clusters are written
//!    before their L2 entry is even changed in memory);
//! 4. L1 entries.
//!
//! Freed clusters go the other way: the L2 entry that dropped them must be on disk
//! before their refcount falls, so frees are queued and applied only after stage 4,
//! and only once every data request that might still address them has finished (the
//! gate's exclusive hold). Until then a freed cluster keeps its refcount and cannot be
//! handed out again. The header's dirty bit is set while the image is open for writing
//! and cleared after the final flush of a clean close.
//!
//! A FLUSH is acknowledged only when all of it is durable. A table stays dirty until
//! its write succeeded, and after a failed metadata flush the next one rewrites every
//! cached table before it may succeed. Each barrier above is a sync that started
//! after the writes it orders (`SyncTracker`: concurrent flushes share a sync rather
//! than skip one), and a failed sync of the file fails every later flush of the image:
//! the pages it was writing may be lost, guest data among them, and only the guest
//! could write them again. The image then keeps its dirty bit.

use super::Qcow2Driver;
use super::geometry::u64s_be;
use super::header;
use super::metadata::Meta;
use crate::buf::IoBuf;
use crate::error::Result;
use crate::node::driver::WriteFlags;

impl Qcow2Driver {
    pub(super) async fn write_dirty_refblocks(&self, m: &mut Meta) -> Result<bool> {
        let dirty: Vec<u64> = m
            .refblocks
            .iter()
            .filter(|(_, b)| b.dirty)
            .map(|(&i, _)| i)
            .collect();
        if dirty.is_empty() {
            return Ok(false);
        }
        for i in dirty {
            let offset = m.reftable[i as usize] & !511;
            let block = m.refblocks.get_mut(&i).unwrap();
            self.write_file(
                offset,
                IoBuf::from_slice(&block.data),
                WriteFlags::default(),
            )
            .await?;
            block.dirty = false;
        }
        self.sync_file().await?;
        Ok(true)
    }

    /// Writes all dirty metadata in the crash-safe order, then applies queued frees.
    ///
    /// A table stays dirty until its write succeeded, so a failed flush leaves the
    /// rest for the next one; after a failure the next flush rewrites every cached
    /// table (a failed write may have changed part of its range). A failed sync of the
    /// file fails this and every later flush (`SyncTracker`).
    pub(super) async fn flush_meta(&self, m: &mut Meta) -> Result<()> {
        if m.flush_failed {
            self.mark_all_meta_dirty(m);
        }
        let result = self.write_meta_in_order(m).await;
        m.flush_failed = result.is_err();
        result
    }

    /// After a failed flush: every table held in memory is written again.
    pub(super) fn mark_all_meta_dirty(&self, m: &mut Meta) {
        let cs = self.geo.cluster_size;
        for block in m.refblocks.values_mut() {
            block.dirty = true;
        }
        m.reftable_dirty.extend(0..m.reftable_clusters);
        for table in m.l2.values_mut() {
            table.dirty = true;
        }
        m.l1_dirty.extend(0..(m.l1.len() as u64 * 8).div_ceil(cs));
    }

    pub(super) async fn write_meta_in_order(&self, m: &mut Meta) -> Result<()> {
        let cs = self.geo.cluster_size;
        // 1. Refcount blocks.
        self.write_dirty_refblocks(m).await?;
        // 2. Refcount table.
        if !m.reftable_dirty.is_empty() {
            let per = (cs / 8) as usize;
            while let Some(&i) = m.reftable_dirty.first() {
                let from = i as usize * per;
                let to = (from + per).min(m.reftable.len());
                let bytes = u64s_be(&m.reftable[from..to]);
                self.write_file(
                    m.reftable_offset + i * cs,
                    IoBuf::from_slice(&bytes),
                    WriteFlags::default(),
                )
                .await?;
                m.reftable_dirty.remove(&i);
            }
            self.sync_file().await?;
        }
        // 3. L2 tables.
        let dirty: Vec<u64> =
            m.l2.iter()
                .filter(|(_, t)| t.dirty)
                .map(|(&o, _)| o)
                .collect();
        if !dirty.is_empty() {
            for offset in dirty {
                let table = m.l2.get_mut(&offset).unwrap();
                let bytes = u64s_be(&table.entries);
                self.write_file(offset, IoBuf::from_slice(&bytes), WriteFlags::default())
                    .await?;
                table.dirty = false;
            }
            self.sync_file().await?;
        }
        // 4. L1 table.
        if !m.l1_dirty.is_empty() {
            let per = (cs / 8) as usize;
            while let Some(&i) = m.l1_dirty.first() {
                let from = i as usize * per;
                let to = (from + per).min(m.l1.len());
                let bytes = u64s_be(&m.l1[from..to]);
                self.write_file(
                    self.header.l1_table_offset + i * cs,
                    IoBuf::from_slice(&bytes),
                    WriteFlags::default(),
                )
                .await?;
                m.l1_dirty.remove(&i);
            }
            self.sync_file().await?;
        }
        // 5. Frees, once nobody can still be addressing the clusters.
        if !m.pending_frees.is_empty() {
            let _exclusive = self.gate.write().await;
            for (first, count) in std::mem::take(&mut m.pending_frees) {
                for c in first..first + count {
                    self.add_refcount(m, c, -1).await?;
                }
                if m.compressed_tail.is_some_and(|t| {
                    let tc = t >> self.geo.cluster_bits;
                    tc >= first && tc < first + count
                }) {
                    // Never pack new data into a cluster whose count just fell.
                    m.compressed_tail = None;
                }
            }
        }
        Ok(())
    }

    /// Flushes everything and clears the dirty bit; the driver refuses I/O afterwards.
    pub(super) async fn close_image(&self) -> Result<()> {
        let mut m = self.meta.lock().await;
        if m.closed {
            return Ok(());
        }
        if self.read_only {
            m.closed = true;
            return Ok(());
        }
        self.flush_meta(&mut m).await?;
        // Frees applied by the first pass are refcount changes of their own.
        self.flush_meta(&mut m).await?;
        if m.dirty_bit {
            self.sync_file().await?;
            self.write_file(
                header::OFFSET_INCOMPATIBLE,
                IoBuf::from_slice(&self.header.incompatible.to_be_bytes()),
                WriteFlags::default(),
            )
            .await?;
            m.dirty_bit = false;
        }
        self.sync_file().await?;
        m.closed = true;
        Ok(())
    }
}
