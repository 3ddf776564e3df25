//! Partial copy-before-write: old data saved for part of a cluster.
//!
//! A 4 KiB guest write into an uncopied 64 KiB cluster used to read the whole cluster's
//! old data before it could proceed. Where the target takes writes smaller than a
//! cluster (a file: see `BlockCopyOptions::partial_cbw`), the copy-before-write reads
//! only the guest's own range (rounded out to the target's block, the unit of zero
//! detection: 4 KiB for a file), stages it as a chunk
//! of its own, and leaves the cluster dirty with a note of the range saved: a
//! *fragment*. The source no longer holds the point-in-time data there, so whoever
//! copies the cluster later (the background pass, or a copy-before-write of a write
//! that covers the rest) writes only the parts no fragment covers. The two writes to
//! the target never overlap, so their order does not matter.
//!
//! Fragments change only while their cluster is dirty and unclaimed (a fragment is
//! added under a claim of its cluster, which then goes back to dirty), so a claim of a
//! run sees them stable until it ends. A claim that copied its run drops them; one
//! that failed leaves them, with the run dirty again.

use std::collections::BTreeMap;

/// Clusters with fragments, at most; past it a copy-before-write saves whole clusters
/// again, so the notes stay small (a few MiB) however the guest writes.
pub const MAX_FRAGMENTED_CLUSTERS: usize = 65536;

/// The fragments of every cluster that has some: cluster start to the saved ranges,
/// sorted and disjoint.
#[derive(Debug, Default)]
pub struct Fragments {
    clusters: BTreeMap<u64, Vec<(u64, u64)>>,
    /// The bytes the ranges cover, in all.
    bytes: u64,
}

impl Fragments {
    /// How many clusters have fragments.
    pub fn clusters(&self) -> usize {
        self.clusters.len()
    }

    /// How many bytes the fragments cover.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    fn cluster_bytes(ranges: &[(u64, u64)]) -> u64 {
        ranges.iter().map(|(s, e)| e - s).sum()
    }

    /// The parts of `[start, end)`, inside the cluster at `cluster`, that no fragment
    /// covers yet.
    pub fn missing(&self, cluster: u64, start: u64, end: u64) -> Vec<(u64, u64)> {
        let saved = self
            .clusters
            .get(&cluster)
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        gaps(start, end, saved)
    }

    /// Notes `ranges` (inside the cluster at `cluster`) as saved.
    pub fn add(&mut self, cluster: u64, ranges: &[(u64, u64)]) {
        let saved = self.clusters.entry(cluster).or_default();
        self.bytes -= Self::cluster_bytes(saved);
        saved.extend_from_slice(ranges);
        saved.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(saved.len());
        for &(s, e) in saved.iter() {
            match merged.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => merged.push((s, e)),
            }
        }
        self.bytes += Self::cluster_bytes(&merged);
        *saved = merged;
    }

    /// The fragments inside `[start, end)` (a claimed run of whole clusters).
    pub fn within(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        self.clusters
            .range(start..end)
            .flat_map(|(_, ranges)| ranges.iter().copied())
            .collect()
    }

    /// Forgets the fragments inside `[start, end)`: the run was copied around them.
    pub fn remove_within(&mut self, start: u64, end: u64) {
        let keys: Vec<u64> = self.clusters.range(start..end).map(|(&k, _)| k).collect();
        for key in keys {
            if let Some(ranges) = self.clusters.remove(&key) {
                self.bytes -= Self::cluster_bytes(&ranges);
            }
        }
    }
}

/// The parts of `[start, end)` outside the sorted, disjoint `covered` ranges.
pub fn gaps(start: u64, end: u64, covered: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut at = start;
    for &(s, e) in covered {
        if e <= at || s >= end {
            continue;
        }
        if s > at {
            out.push((at, s));
        }
        at = at.max(e);
    }
    if at < end {
        out.push((at, end));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_are_what_the_fragments_leave() {
        assert_eq!(gaps(0, 100, &[]), vec![(0, 100)]);
        assert_eq!(gaps(0, 100, &[(0, 100)]), vec![]);
        assert_eq!(
            gaps(0, 100, &[(10, 20), (50, 60)]),
            vec![(0, 10), (20, 50), (60, 100)]
        );
        assert_eq!(gaps(30, 55, &[(10, 40), (50, 60)]), vec![(40, 50)]);
        assert_eq!(gaps(0, 10, &[(20, 30)]), vec![(0, 10)]);
    }

    #[test]
    fn fragments_merge_and_go_with_their_cluster() {
        let mut f = Fragments::default();
        f.add(65536, &[(65536 + 8192, 65536 + 12288)]);
        f.add(65536, &[(65536 + 4096, 65536 + 8192)]);
        f.add(0, &[(4096, 8192)]);
        assert_eq!(f.clusters(), 2);
        assert_eq!(f.bytes(), 8192 + 4096);
        assert_eq!(f.within(65536, 131072), vec![(65536 + 4096, 65536 + 12288)]);
        assert_eq!(
            f.missing(65536, 65536, 65536 + 16384),
            vec![(65536, 65536 + 4096), (65536 + 12288, 65536 + 16384)]
        );
        assert_eq!(f.missing(65536, 65536 + 4096, 65536 + 12288), vec![]);
        assert_eq!(f.within(0, 131072).len(), 2);
        f.remove_within(0, 65536);
        assert_eq!(f.clusters(), 1);
        assert_eq!(f.bytes(), 8192);
        assert_eq!(f.within(0, 65536), vec![]);
    }
}
