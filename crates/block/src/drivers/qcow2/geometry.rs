//! How a qcow2 image's geometry and entries are read: sizes derived from the header,
//! the bits of L1 and L2 entries, and what an L2 entry says about one cluster.

use super::header::CompressionType;
use super::header::Header;

/// Bits 9..55 of an L1/L2/refcount-table entry: a host offset.
pub(super) const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// "Refcount is exactly one": the cluster may be written in place.
pub(super) const COPIED: u64 = 1 << 63;
/// The L2 entry describes compressed bytes.
pub(super) const COMPRESSED: u64 = 1 << 62;
/// The cluster reads as zeros (version 3).
pub(super) const ZERO: u64 = 1;
/// Bits of a standard L2 entry that must be zero.
pub(super) const L2_RESERVED: u64 = 0x3f00_0000_0000_01fe;
/// Bits of an L1 entry that must be zero.
pub(super) const L1_RESERVED: u64 = 0x7f00_0000_0000_01ff;

/// Sizes derived from the header.
#[derive(Debug, Clone, Copy)]
pub(super) struct Geometry {
    pub(super) cluster_bits: u32,
    pub(super) cluster_size: u64,
    /// Entries per L2 table.
    pub(super) l2_entries: u64,
    pub(super) refcount_order: u32,
    /// Entries per refcount block.
    pub(super) rb_entries: u64,
    pub(super) size: u64,
    pub(super) v3: bool,
    pub(super) compression: CompressionType,
    /// Compressed descriptor: bits below this are the byte offset.
    pub(super) csize_shift: u32,
    /// Compressed descriptor: mask of the additional-sectors field.
    pub(super) csize_mask: u64,
}

impl Geometry {
    pub(super) fn new(h: &Header) -> Self {
        let cs = h.cluster_size();
        let csize_shift = 62 - (h.cluster_bits - 8);
        Self {
            cluster_bits: h.cluster_bits,
            cluster_size: cs,
            l2_entries: cs / 8,
            refcount_order: h.refcount_order,
            rb_entries: (cs * 8) >> h.refcount_order,
            size: h.size,
            v3: h.version == 3,
            compression: h.compression,
            csize_shift,
            csize_mask: (1 << (h.cluster_bits - 8)) - 1,
        }
    }

    pub(super) fn cluster_of(&self, offset: u64) -> u64 {
        offset >> self.cluster_bits
    }

    pub(super) fn l1_index(&self, cluster: u64) -> usize {
        (cluster / self.l2_entries) as usize
    }

    pub(super) fn l2_index(&self, cluster: u64) -> usize {
        (cluster % self.l2_entries) as usize
    }

    /// Host byte range `[start, end)` of a compressed descriptor.
    pub(super) fn compressed_range(&self, entry: u64) -> (u64, u64) {
        let offset = entry & ((1 << self.csize_shift) - 1);
        let sectors = ((entry >> self.csize_shift) & self.csize_mask) + 1;
        let end = ((offset & !511) + sectors * 512).max(offset + 1);
        (offset, end)
    }
}

/// What an L2 entry says about one guest cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Cluster {
    /// Falls through to the backing node (zeros without one).
    Unallocated,
    /// Reads as zeros; may keep a preallocated host cluster.
    Zero { host: Option<u64> },
    /// Stored at `host`; `copied` means refcount 1 (writable in place).
    Data { host: u64, copied: bool },
    /// Compressed bytes at `[start, end)` (end rounded to sectors).
    Compressed { start: u64, end: u64 },
}

impl Cluster {
    /// Host clusters this entry holds a reference to (freed when it is replaced).
    pub(super) fn owned(self, geo: &Geometry) -> Option<(u64, u64)> {
        match self {
            Cluster::Zero { host: Some(h) } | Cluster::Data { host: h, .. } => {
                Some((h >> geo.cluster_bits, 1))
            }
            Cluster::Compressed { start, end } => {
                let first = start >> geo.cluster_bits;
                let last = (end - 1) >> geo.cluster_bits;
                Some((first, last - first + 1))
            }
            _ => None,
        }
    }

    /// Whether two adjacent clusters continue one run (same kind, contiguous host).
    pub(super) fn continues(self, next: Cluster, cs: u64) -> bool {
        match (self, next) {
            (Cluster::Unallocated, Cluster::Unallocated) => true,
            (Cluster::Zero { host: None }, Cluster::Zero { host: None }) => true,
            (Cluster::Zero { host: Some(a) }, Cluster::Zero { host: Some(b) }) => a + cs == b,
            (Cluster::Data { host: a, copied: x }, Cluster::Data { host: b, copied: y }) => {
                a + cs == b && x == y
            }
            _ => false,
        }
    }
}

/// One run of a request with a single mapping.
#[derive(Debug, Clone, Copy)]
pub(super) struct Run {
    pub(super) kind: Cluster,
    /// Length of the run in bytes from the request's position.
    pub(super) len: u64,
    /// For data/zero-with-host runs: host offset of the run's first byte.
    pub(super) host: Option<u64>,
}

pub(super) fn be_u64s(bytes: &[u8]) -> Vec<u64> {
    bytes
        .chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().unwrap()))
        .collect()
}

pub(super) fn u64s_be(values: &[u64]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_be_bytes()).collect()
}
