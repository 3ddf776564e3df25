//! The metadata cache: L2 tables and refcount blocks, loaded on demand, checked
//! against the file and the other metadata before use, and evicted when clean.

use super::Qcow2Driver;
use super::bitmaps;
use super::geometry::COMPRESSED;
use super::geometry::COPIED;
use super::geometry::Cluster;
use super::geometry::L2_RESERVED;
use super::geometry::OFFSET_MASK;
use super::geometry::ZERO;
use super::geometry::be_u64s;
use super::header::corrupt;
use crate::buf::IoBuf;
use crate::error::Error;
use crate::error::ErrorKind;
use crate::error::Result;
use std::collections::BTreeSet;
use std::collections::HashMap;
use std::collections::HashSet;

/// A cached L2 table.
pub(super) struct L2Table {
    pub(super) entries: Vec<u64>,
    pub(super) dirty: bool,
    pub(super) last_use: u64,
}

/// A cached refcount block (raw on-disk bytes).
pub(super) struct RefBlock {
    pub(super) data: Vec<u8>,
    pub(super) dirty: bool,
}

/// All metadata state; see the module note for the rules.
pub(super) struct Meta {
    pub(super) l1: Vec<u64>,
    /// L1 clusters (index into the table, in clusters) changed in memory.
    pub(super) l1_dirty: BTreeSet<u64>,
    pub(super) l2: HashMap<u64, L2Table>,
    pub(super) l2_capacity: usize,
    pub(super) tick: u64,
    pub(super) reftable: Vec<u64>,
    pub(super) reftable_offset: u64,
    pub(super) reftable_clusters: u64,
    pub(super) reftable_dirty: BTreeSet<u64>,
    pub(super) refblocks: HashMap<u64, RefBlock>,
    /// Host offsets of every L2 table and refcount block, for overlap checks.
    pub(super) l2_offsets: HashSet<u64>,
    pub(super) refblock_offsets: HashSet<u64>,
    /// Lowest cluster index that may be free.
    pub(super) free_hint: u64,
    /// One past the highest cluster index in use or in the file.
    pub(super) end: u64,
    /// Frees waiting for the L2 entries that dropped them to reach the disk:
    /// (first cluster, count).
    pub(super) pending_frees: Vec<(u64, u64)>,
    /// Guest clusters whose allocation is in flight.
    pub(super) allocating: HashSet<u64>,
    /// Free bytes after the last compressed cluster, in a cluster we own.
    pub(super) compressed_tail: Option<u64>,
    /// The bitmap directory on disk: offset, size, entries, and every host cluster
    /// the stored bitmaps use (freed when a new directory replaces it).
    pub(super) bitmap_dir: Option<(u64, u64, Vec<bitmaps::Entry>, Vec<u64>)>,
    /// The header extensions as on disk (the bitmaps one changes on close).
    pub(super) extensions: Vec<(u32, Vec<u8>)>,
    /// The backing file name in the header (`block-stream` removes it).
    pub(super) backing_file: Option<String>,
    /// The dirty bit is set on disk by us.
    pub(super) dirty_bit: bool,
    /// The last metadata flush failed part-way: the next one rewrites every cached
    /// table, not only those still marked dirty (a failed write may have torn one).
    pub(super) flush_failed: bool,
    /// Whether the image looks metadata-preallocated, decided at the first block
    /// status (see `looks_preallocated`).
    pub(super) preallocated: Option<bool>,
    pub(super) closed: bool,
}

impl Qcow2Driver {
    /// Checks the host offset of a data cluster (or the start of compressed bytes)
    /// before it is used.
    pub(super) fn check_host(&self, m: &Meta, host: u64, what: &str) -> Result<()> {
        let cs = self.geo.cluster_size;
        if host >= self.file.length().max(m.end * cs) {
            return Err(corrupt(format!(
                "{what} at {host:#x} lies beyond the end of the file"
            )));
        }
        let cluster = host & !(cs - 1);
        let metadata = self
            .fixed_metadata
            .iter()
            .any(|&(start, len)| cluster < start + len && start < cluster + cs)
            || m.l2_offsets.contains(&cluster)
            || m.refblock_offsets.contains(&cluster);
        if metadata {
            return Err(corrupt(format!("{what} at {host:#x} overlaps metadata")));
        }
        Ok(())
    }

    /// Decodes an L2 entry.
    pub(super) fn classify(&self, m: &Meta, entry: u64) -> Result<Cluster> {
        if entry & COMPRESSED != 0 {
            let (start, end) = self.geo.compressed_range(entry);
            self.check_host(m, start, "compressed cluster")?;
            return Ok(Cluster::Compressed { start, end });
        }
        if entry & L2_RESERVED != 0 {
            return Err(corrupt(format!(
                "L2 entry {entry:#x} has reserved bits set"
            )));
        }
        let host = entry & OFFSET_MASK;
        if !host.is_multiple_of(self.geo.cluster_size) {
            return Err(corrupt(format!(
                "L2 entry {entry:#x} points to an unaligned host offset"
            )));
        }
        if entry & ZERO != 0 {
            if !self.geo.v3 {
                return Err(corrupt("a version 2 image has a zero cluster"));
            }
            if host != 0 {
                self.check_host(m, host, "zero cluster")?;
            }
            return Ok(Cluster::Zero {
                host: (host != 0).then_some(host),
            });
        }
        if host == 0 {
            if entry != 0 {
                return Err(corrupt(format!("L2 entry {entry:#x} has no host offset")));
            }
            return Ok(Cluster::Unallocated);
        }
        self.check_host(m, host, "data cluster")?;
        Ok(Cluster::Data {
            host,
            copied: entry & COPIED != 0,
        })
    }

    /// Makes sure the L2 table at `offset` is cached (evicting if needed).
    pub(super) async fn load_l2(&self, m: &mut Meta, offset: u64) -> Result<()> {
        m.tick += 1;
        let tick = m.tick;
        if let Some(t) = m.l2.get_mut(&offset) {
            t.last_use = tick;
            return Ok(());
        }
        if m.l2.len() >= m.l2_capacity {
            self.evict_l2(m).await?;
        }
        let cs = self.geo.cluster_size as usize;
        let buf = self.file.read(offset, IoBuf::zeroed(cs)).await?;
        m.l2.insert(
            offset,
            L2Table {
                entries: be_u64s(&buf),
                dirty: false,
                last_use: tick,
            },
        );
        Ok(())
    }

    pub(super) async fn evict_l2(&self, m: &mut Meta) -> Result<()> {
        if !m.l2.values().any(|t| !t.dirty) {
            self.flush_meta(m).await?;
        }
        if let Some((&victim, _)) =
            m.l2.iter()
                .filter(|(_, t)| !t.dirty)
                .min_by_key(|(_, t)| t.last_use)
        {
            m.l2.remove(&victim);
        }
        Ok(())
    }

    /// The L2 entry of guest cluster `cluster`, 0 when its table is unallocated.
    pub(super) async fn l2_entry(&self, m: &mut Meta, cluster: u64) -> Result<u64> {
        let l1_index = self.geo.l1_index(cluster);
        let table = m.l1[l1_index] & OFFSET_MASK;
        if table == 0 {
            return Ok(0);
        }
        self.load_l2(m, table).await?;
        Ok(m.l2[&table].entries[self.geo.l2_index(cluster)])
    }

    /// The decoded L2 entry of guest cluster `cluster`.
    pub(super) async fn cluster(&self, m: &mut Meta, cluster: u64) -> Result<Cluster> {
        let entry = self.l2_entry(m, cluster).await?;
        self.classify(m, entry)
    }

    /// Sets the L2 entry of a guest cluster whose table exists.
    pub(super) fn set_l2_entry(&self, m: &mut Meta, cluster: u64, entry: u64) {
        let table = m.l1[self.geo.l1_index(cluster)] & OFFSET_MASK;
        let t =
            m.l2.get_mut(&table)
                .expect("L2 table loaded before it is changed");
        t.entries[self.geo.l2_index(cluster)] = entry;
        t.dirty = true;
    }

    /// Makes sure the L2 table for `cluster` exists and is cached.
    pub(super) async fn ensure_l2(&self, m: &mut Meta, cluster: u64) -> Result<()> {
        let l1_index = self.geo.l1_index(cluster);
        let table = m.l1[l1_index] & OFFSET_MASK;
        if table != 0 {
            return self.load_l2(m, table).await;
        }
        if m.l2.len() >= m.l2_capacity {
            self.evict_l2(m).await?;
        }
        let offset = self.alloc_clusters(m, 1).await?;
        // Written at once (empty): its blocks are taken on the host file now, so the
        // flush that fills it in cannot run out of space after data filled the disk.
        self.reserve_cluster(offset, vec![0; self.geo.cluster_size as usize])
            .await?;
        m.tick += 1;
        m.l2.insert(
            offset,
            L2Table {
                entries: vec![0; self.geo.l2_entries as usize],
                dirty: true,
                last_use: m.tick,
            },
        );
        m.l2_offsets.insert(offset);
        m.l1[l1_index] = offset | COPIED;
        m.l1_dirty
            .insert(l1_index as u64 * 8 / self.geo.cluster_size);
        Ok(())
    }

    pub(super) fn check_open(&self, m: &Meta) -> Result<()> {
        if m.closed {
            return Err(Error::new(ErrorKind::Io, "the qcow2 image is closed"));
        }
        Ok(())
    }
}
