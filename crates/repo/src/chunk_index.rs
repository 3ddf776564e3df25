//! Where every stored chunk is, in memory: the dedup index of a backup and the map a
//! restore reads by.
//!
//! Held compactly because it is the one structure that grows with the repository: one
//! 48-byte entry per stored chunk (the 32-byte id, the pack's number, the blob's
//! offset, stored length, and plain length with the codec in its top bits), in a
//! vector sorted by id and searched by bisection; pack ids are stored once per pack
//! (about 130 chunks). A HashMap of the same would take about 100 bytes per chunk.
//! Chunks added while the index is in use (a writer's own new packs) go into a small
//! map beside it. `bench/chunk_index_memory` measures a 10-million-chunk index.
//!
//! A delta ([`BlobRef::base`]) is rare (an incremental's partly changed chunks): its
//! entry has a flag, and its base's id sits in a map beside the entries, by the blob's
//! place, so the 48 bytes stay the common case.
//!
//! A chunk can be in two packs (two writers stored it at once, or a repack copied it);
//! lookups then prefer the copy in a pack that is not condemned ([`ChunkIndex::condemn`]).

use std::collections::HashMap;
use std::collections::HashSet;

use crate::format::BlobRef;
use crate::format::ChunkId;
use crate::format::Compression;

/// The top bit of `raw_and_codec`: the blob is a zstd frame.
const ZSTD_BIT: u32 = 1 << 31;
/// The next bit: the blob is a delta; its base is in [`ChunkIndex::bases`].
const DELTA_BIT: u32 = 1 << 30;
const LEN_MASK: u32 = DELTA_BIT - 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
struct Entry {
    id: [u8; 32],
    pack: u32,
    offset: u32,
    stored_len: u32,
    raw_and_codec: u32,
}

impl Entry {
    fn new(id: ChunkId, pack: u32, blob: &BlobRef) -> Option<Self> {
        let codec = match blob.codec {
            Compression::None => 0,
            Compression::Zstd => ZSTD_BIT,
        };
        let delta = if blob.base.is_some() { DELTA_BIT } else { 0 };
        if blob.raw_len > LEN_MASK {
            return None;
        }
        Some(Self {
            id: id.0,
            pack,
            offset: u32::try_from(blob.offset).ok()?,
            stored_len: blob.stored_len,
            raw_and_codec: blob.raw_len | codec | delta,
        })
    }

    /// The blob, its base looked up in `bases` when it is a delta.
    fn blob(&self, bases: &HashMap<(u32, u32), ChunkId>) -> BlobRef {
        BlobRef {
            offset: u64::from(self.offset),
            stored_len: self.stored_len,
            raw_len: self.raw_and_codec & LEN_MASK,
            codec: if self.raw_and_codec & ZSTD_BIT != 0 {
                Compression::Zstd
            } else {
                Compression::None
            },
            base: if self.raw_and_codec & DELTA_BIT != 0 {
                bases.get(&(self.pack, self.offset)).copied()
            } else {
                None
            },
        }
    }
}

/// Bytes of memory one stored chunk takes in a [`ChunkIndex`] (its pack's id aside).
pub const BYTES_PER_CHUNK: usize = std::mem::size_of::<Entry>();

/// The repository's chunks and where they are.
#[derive(Debug, Default)]
pub struct ChunkIndex {
    packs: Vec<String>,
    pack_numbers: HashMap<String, u32>,
    condemned: HashSet<u32>,
    sorted: Vec<Entry>,
    recent: HashMap<ChunkId, Entry>,
    /// The bases of deltas, by (pack number, offset).
    bases: HashMap<(u32, u32), ChunkId>,
    /// Entries pushed since the last sort.
    unsorted: bool,
}

impl ChunkIndex {
    /// An empty index.
    pub fn new() -> Self {
        Self::default()
    }

    fn pack_number(&mut self, pack: &str) -> u32 {
        if let Some(&n) = self.pack_numbers.get(pack) {
            return n;
        }
        let n = self.packs.len() as u32;
        self.packs.push(pack.to_string());
        self.pack_numbers.insert(pack.to_string(), n);
        n
    }

    /// Adds a pack's entries while loading; [`ChunkIndex::finish_loading`] sorts them.
    /// Returns false when an entry does not fit the compact form (a blob offset past
    /// 4 GiB, which no pack this tool writes has): the caller treats that as damage.
    pub fn load_pack(&mut self, pack: &str, entries: &[(ChunkId, BlobRef)]) -> bool {
        let n = self.pack_number(pack);
        self.sorted.reserve(entries.len());
        for (id, blob) in entries {
            match Entry::new(*id, n, blob) {
                Some(e) => {
                    if let Some(base) = blob.base {
                        self.bases.insert((n, e.offset), base);
                    }
                    self.sorted.push(e);
                }
                None => return false,
            }
        }
        self.unsorted = true;
        true
    }

    /// Marks a pack as condemned (a collection will delete it): lookups prefer any
    /// other copy of its chunks.
    pub fn condemn(&mut self, pack: &str) {
        if let Some(&n) = self.pack_numbers.get(pack) {
            self.condemned.insert(n);
            self.unsorted = true;
        }
    }

    /// Sorts what was loaded, keeping one entry per chunk (one outside a condemned pack
    /// where there is one, a whole one before a delta), and gives back spare capacity.
    pub fn finish_loading(&mut self) {
        if !self.unsorted {
            return;
        }
        let condemned = &self.condemned;
        // A whole copy before a delta of the same chunk: it reads without a base, and
        // a collection then need not keep the base for it.
        self.sorted.sort_unstable_by_key(|e| {
            (
                e.id,
                condemned.contains(&e.pack),
                e.raw_and_codec & DELTA_BIT != 0,
                e.pack,
            )
        });
        self.sorted.dedup_by(|later, first| later.id == first.id);
        self.sorted.shrink_to_fit();
        self.unsorted = false;
    }

    /// Files a chunk written after loading (a writer's own pack).
    pub fn insert(&mut self, id: ChunkId, pack: &str, blob: BlobRef) {
        let n = self.pack_number(pack);
        // The offsets of packs this tool writes fit; a pack that did not would be one
        // we failed to write, so the assertion guards our own writer.
        let entry = Entry::new(id, n, &blob).expect("a pack we wrote has small offsets");
        if let Some(base) = blob.base {
            self.bases.insert((n, entry.offset), base);
        }
        self.recent.insert(id, entry);
    }

    fn find(&self, id: &ChunkId) -> Option<&Entry> {
        debug_assert!(!self.unsorted, "lookup before finish_loading");
        if let Ok(i) = self.sorted.binary_search_by(|e| e.id.cmp(&id.0)) {
            let entry = &self.sorted[i];
            if !self.condemned.contains(&entry.pack) {
                return Some(entry);
            }
            return self.recent.get(id).or(Some(entry));
        }
        self.recent.get(id)
    }

    /// Where `id` is: its pack and blob.
    pub fn get(&self, id: &ChunkId) -> Option<(&str, BlobRef)> {
        self.find(id)
            .map(|e| (self.packs[e.pack as usize].as_str(), e.blob(&self.bases)))
    }

    /// The base `id` is a delta of, if it is one.
    pub fn base_of(&self, id: &ChunkId) -> Option<ChunkId> {
        self.find(id)
            .filter(|e| e.raw_and_codec & DELTA_BIT != 0)
            .and_then(|e| self.bases.get(&(e.pack, e.offset)).copied())
    }

    /// How many bases reading `id` reads first (0 for a whole chunk), up to `limit`
    /// (a longer chain, or a loop in a damaged index, answers `limit`).
    pub fn delta_depth(&self, id: &ChunkId, limit: usize) -> usize {
        let mut at = *id;
        for depth in 0..limit {
            match self.base_of(&at) {
                Some(base) => at = base,
                None => return depth,
            }
        }
        limit
    }

    /// Whether the repository has `id`.
    pub fn contains(&self, id: &ChunkId) -> bool {
        self.find(id).is_some()
    }

    /// Whether `id` is stored outside condemned packs (what a writer may dedup
    /// against), and so is every base it is a delta of: a delta whose base only a
    /// condemned pack holds would be lost with that pack.
    pub fn contains_live(&self, id: &ChunkId) -> bool {
        let mut at = *id;
        for _ in 0..=crate::format::MAX_DELTA_DEPTH {
            if self
                .find(&at)
                .is_none_or(|e| self.condemned.contains(&e.pack))
            {
                return false;
            }
            match self.base_of(&at) {
                Some(base) => at = base,
                None => return true,
            }
        }
        false
    }

    /// Whether a pack is condemned.
    pub fn is_condemned(&self, pack: &str) -> bool {
        self.pack_numbers
            .get(pack)
            .is_some_and(|n| self.condemned.contains(n))
    }

    /// Unique chunks.
    pub fn len(&self) -> usize {
        self.sorted.len()
            + self
                .recent
                .keys()
                .filter(|id| self.sorted.binary_search_by(|e| e.id.cmp(&id.0)).is_err())
                .count()
    }

    /// Whether there is no chunk.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every chunk (one location each), in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (ChunkId, &str, BlobRef)> + '_ {
        let sorted = self
            .sorted
            .iter()
            .filter(|e| !self.recent.contains_key(&ChunkId(e.id)));
        sorted.chain(self.recent.values()).map(|e| {
            (
                ChunkId(e.id),
                self.packs[e.pack as usize].as_str(),
                e.blob(&self.bases),
            )
        })
    }

    /// The packs the index names.
    pub fn packs(&self) -> &[String] {
        &self.packs
    }

    /// Bytes of memory the entries take (capacity, not length).
    pub fn memory_bytes(&self) -> usize {
        self.sorted.capacity() * BYTES_PER_CHUNK
            + self.recent.capacity() * (32 + BYTES_PER_CHUNK + 8)
            + self.bases.capacity() * (8 + 32 + 8)
            + self
                .packs
                .iter()
                .map(|p| 2 * p.capacity() + 64)
                .sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob(offset: u64, len: u32, codec: Compression) -> BlobRef {
        BlobRef {
            offset,
            stored_len: len,
            raw_len: len * 2,
            codec,
            base: None,
        }
    }

    #[test]
    fn entries_are_48_bytes_and_round_trip() {
        assert_eq!(BYTES_PER_CHUNK, 48);
        let mut index = ChunkIndex::new();
        let a = ChunkId::of(b"a");
        let b = ChunkId::of(b"b");
        assert!(index.load_pack("p1", &[(a, blob(5, 10, Compression::Zstd))]));
        assert!(index.load_pack("p2", &[(b, blob(15, 20, Compression::None))]));
        index.finish_loading();
        assert_eq!(index.get(&a), Some(("p1", blob(5, 10, Compression::Zstd))));
        assert_eq!(index.get(&b), Some(("p2", blob(15, 20, Compression::None))));
        assert!(index.get(&ChunkId::of(b"c")).is_none());
        let c = ChunkId::of(b"c");
        index.insert(c, "p3", blob(5, 1, Compression::None));
        assert_eq!(index.get(&c).unwrap().0, "p3");
        assert_eq!(index.len(), 3);
        assert_eq!(index.iter().count(), 3);
        // A hostile index with an offset past 4 GiB does not fit, and says so.
        assert!(!index.load_pack("p4", &[(c, blob(1 << 33, 1, Compression::None))]));
    }

    #[test]
    fn a_chunk_in_two_packs_is_found_outside_the_condemned_one() {
        let a = ChunkId::of(b"a");
        for (condemn, expect) in [("p1", "p2"), ("p2", "p1")] {
            let mut index = ChunkIndex::new();
            index.load_pack("p1", &[(a, blob(5, 10, Compression::None))]);
            index.load_pack("p2", &[(a, blob(50, 10, Compression::None))]);
            index.condemn(condemn);
            index.finish_loading();
            assert_eq!(index.get(&a).unwrap().0, expect);
            assert!(index.contains_live(&a));
            assert_eq!(index.len(), 1);
        }
        let mut index = ChunkIndex::new();
        index.load_pack("p1", &[(a, blob(5, 10, Compression::None))]);
        index.condemn("p1");
        index.finish_loading();
        assert!(index.contains(&a), "readers still find it");
        assert!(
            !index.contains_live(&a),
            "writers must not dedup against it"
        );
    }
}
