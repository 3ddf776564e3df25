//! A hierarchical bitmap addressed in bytes of a device.
//!
//! # What it is for
//!
//! The backup engine tracks which clusters of a disk are still to be copied (the *copy
//! bitmap*) and which have changed since some point (*dirty bitmaps*). Both are sets of
//! fixed-size granules of a device, queried mostly as "where is the next set granule
//! after X?" and "how many are set?". A flat bit array answers the first in time
//! proportional to the gap it skips; on a 1 TiB disk that is mostly clean, that gap is
//! the whole disk. This crate layers summary words above the bits, in the spirit of
//! QEMU's HBitmap (the idea only; no code is taken from QEMU), so both questions are
//! answered in a handful of word operations.
//!
//! # Layout
//!
//! ```text
//!   level 2 (top, one word)   [ 1 0 0 ... ]            bit i set <=> word i of level 1 != 0
//!   level 1                   [ 1 1 0 ... ] [ 0 ... ]  bit j set <=> word j of level 0 != 0
//!   level 0 (the bits)        [w0][w1][w2] ...         bit k = granule k of the device
//! ```
//!
//! * Granule `k` covers device bytes `[k << shift, (k + 1) << shift)`; the last granule
//!   may extend past the device size (sizes need not be multiples of the granularity).
//! * Invariant: a bit of level `n + 1` is set exactly when the word it summarises in
//!   level `n` is non-zero; bits past the last granule are always zero. Every mutation
//!   keeps this, so a search descends only into words that have a set bit.
//! * Memory: level 0 costs one bit per granule and every level above costs 1/64 of the
//!   one below, so the total is about `granules / 8 * 64 / 63` bytes: a 1 TiB device at
//!   64 KiB granularity (16 Mi granules) costs about 2 MiB.
//! * The number of set granules is kept up to date on every change, so `count` is O(1).
//!
//! # Rounding
//!
//! Byte ranges are rounded *outward* to whole granules by both [`Bitmap::set`] and
//! [`Bitmap::reset`], and clipped to the device size. Callers that must not clear a
//! partially covered granule (the copy bitmap) pass granule-aligned ranges.
//!
//! # Serialization
//!
//! [`Bitmap::serialize`] writes a stable little-endian format (see [`FORMAT_MAGIC`]);
//! [`Bitmap::deserialize`] checks every field and refuses anything inconsistent with
//! [`Error::Corrupt`], so a damaged file is never loaded as a wrong bitmap.
//!
//! Out of scope here: names, enabled/disabled state and persistence inside qcow2; those
//! belong to the dirty-bitmap layer built on this type.

use std::fmt;

/// Bits per word at every level.
const WORD_BITS: u64 = 64;

/// Magic bytes that open a serialized bitmap.
pub const FORMAT_MAGIC: [u8; 8] = *b"SPBITMAP";
/// Version of the serialized format written by [`Bitmap::serialize`].
pub const FORMAT_VERSION: u32 = 1;
/// Size of the fixed header of the serialized format, in bytes.
///
/// ```text
///   offset size  field
///   0      8     magic "SPBITMAP"
///   8      4     version (u32 LE) = 1
///   12     4     granularity shift (u32 LE): granule = 1 << shift bytes
///   16     8     device size in bytes (u64 LE)
///   24     8     number of set granules (u64 LE), checked on load
///   32     8*n   level-0 words (u64 LE each), n = ceil(granules / 64);
///                bit b of word w is granule w * 64 + b
/// ```
pub const FORMAT_HEADER_LEN: usize = 32;

/// Errors from building or loading a bitmap.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// The granularity is zero or not a power of two.
    #[error("invalid bitmap granularity {0}: must be a power of two")]
    InvalidGranularity(u64),
    /// The bitmap would not fit in memory on this machine.
    #[error("bitmap for a {size}-byte device at granularity {granularity} is too large")]
    TooLarge {
        /// Device size in bytes.
        size: u64,
        /// Granularity in bytes.
        granularity: u64,
    },
    /// Two bitmaps that must cover the same device do not.
    #[error("failed to merge bitmaps: sizes differ ({0} and {1} bytes)")]
    SizeMismatch(u64, u64),
    /// Serialized bytes that are not a valid bitmap.
    #[error("failed to load bitmap: {0}")]
    Corrupt(String),
}

/// A set of granules of a device, with fast search and O(1) count.
#[derive(Clone, PartialEq, Eq)]
pub struct Bitmap {
    /// Device size in bytes.
    size: u64,
    /// log2 of the granularity in bytes.
    shift: u32,
    /// Number of granules: `ceil(size / granularity)`.
    granules: u64,
    /// `levels[0]` holds the granule bits; each following level summarises the one
    /// below, one bit per word, up to a top level of exactly one word.
    levels: Vec<Vec<u64>>,
    /// Number of set granules.
    count: u64,
}

impl fmt::Debug for Bitmap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bitmap")
            .field("size", &self.size)
            .field("granularity", &self.granularity())
            .field("count", &self.count)
            .finish_non_exhaustive()
    }
}

/// Mask of bits `lo..hi` of a word, `lo < hi <= 64`.
fn word_mask(lo: u64, hi: u64) -> u64 {
    debug_assert!(lo < hi && hi <= WORD_BITS);
    let width = hi - lo;
    if width == WORD_BITS {
        !0
    } else {
        ((1u64 << width) - 1) << lo
    }
}

/// `n` zero words, or None when the allocator refuses. Zeroed pages come lazily from
/// the kernel, so a large, mostly empty bitmap costs memory only where bits are set.
fn zeroed_words(n: usize) -> Option<Vec<u64>> {
    if n == 0 {
        return Some(Vec::new());
    }
    let layout = std::alloc::Layout::array::<u64>(n).ok()?;
    // SAFETY: the layout has a non-zero size (n > 0).
    let ptr = unsafe { std::alloc::alloc_zeroed(layout) }.cast::<u64>();
    if ptr.is_null() {
        return None;
    }
    // SAFETY: `ptr` was allocated by the global allocator with the layout of
    // `[u64; n]`, which is what a Vec<u64> of capacity n uses, and its n elements are
    // initialised (all-zero bytes are a valid u64).
    Some(unsafe { Vec::from_raw_parts(ptr, n, n) })
}

fn words_for(bits: u64) -> u64 {
    bits.div_ceil(WORD_BITS).max(1)
}

impl Bitmap {
    /// An empty bitmap for a device of `size` bytes, one bit per `granularity` bytes.
    pub fn new(size: u64, granularity: u64) -> Result<Self, Error> {
        if granularity == 0 || !granularity.is_power_of_two() {
            return Err(Error::InvalidGranularity(granularity));
        }
        let shift = granularity.trailing_zeros();
        let granules = size.div_ceil(granularity);
        let too_large = || Error::TooLarge { size, granularity };
        // Refuse before allocating: more than 2^40 granules (128 GiB of bits) is a
        // caller's mistake, not a bitmap anyone can hold.
        if granules > 1 << 40 {
            return Err(too_large());
        }
        let mut levels = Vec::new();
        let mut bits = granules;
        loop {
            let words = words_for(bits);
            let words_usize = usize::try_from(words).map_err(|_| too_large())?;
            // An allocation the system refuses is an error, not an abort: a bitmap's
            // size comes from a QMP client or an image header.
            levels.push(zeroed_words(words_usize).ok_or_else(too_large)?);
            if words == 1 {
                break;
            }
            bits = words;
        }
        Ok(Self {
            size,
            shift,
            granules,
            levels,
            count: 0,
        })
    }

    /// Device size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Bytes covered by one bit.
    pub fn granularity(&self) -> u64 {
        1 << self.shift
    }

    /// Number of granules (bits) in the map.
    pub fn granules(&self) -> u64 {
        self.granules
    }

    /// Number of set granules, in O(1).
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Number of device bytes covered by set granules, in O(1); the last granule counts
    /// only the bytes inside the device.
    pub fn count_bytes(&self) -> u64 {
        let full = self.count << self.shift;
        if self.count > 0 && self.get_granule(self.granules - 1) {
            let overshoot = (self.granules << self.shift) - self.size;
            full - overshoot
        } else {
            full
        }
    }

    /// True when no granule is set.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Heap bytes held by the bitmap (all levels).
    pub fn memory_bytes(&self) -> usize {
        self.levels.iter().map(|l| l.len() * 8).sum()
    }

    /// Granule range `[first, end)` covering bytes `[offset, offset + len)`, rounded
    /// outward and clipped to the device; `None` when it covers nothing.
    fn granule_range(&self, offset: u64, len: u64) -> Option<(u64, u64)> {
        let end = offset.saturating_add(len).min(self.size);
        if offset >= end {
            return None;
        }
        let first = offset >> self.shift;
        let last = (end - 1) >> self.shift;
        Some((first, last + 1))
    }

    /// Whether the granule containing byte `offset` is set; false past the end.
    pub fn get(&self, offset: u64) -> bool {
        offset < self.size && self.get_granule(offset >> self.shift)
    }

    fn get_granule(&self, granule: u64) -> bool {
        let word = self.levels[0][(granule / WORD_BITS) as usize];
        word & (1 << (granule % WORD_BITS)) != 0
    }

    /// Sets every granule touched by `[offset, offset + len)`.
    pub fn set(&mut self, offset: u64, len: u64) {
        if let Some((first, end)) = self.granule_range(offset, len) {
            self.set_granules(first, end);
        }
    }

    /// Clears every granule touched by `[offset, offset + len)`.
    pub fn reset(&mut self, offset: u64, len: u64) {
        if let Some((first, end)) = self.granule_range(offset, len) {
            self.reset_granules(first, end);
        }
    }

    /// Clears the whole map.
    pub fn clear(&mut self) {
        for level in &mut self.levels {
            level.fill(0);
        }
        self.count = 0;
    }

    /// Sets every granule of the device.
    pub fn fill(&mut self) {
        self.set_granules(0, self.granules);
    }

    fn set_granules(&mut self, first: u64, end: u64) {
        let mut bit = first;
        while bit < end {
            let w = bit / WORD_BITS;
            let lo = bit % WORD_BITS;
            let hi = (end - w * WORD_BITS).min(WORD_BITS);
            let slot = &mut self.levels[0][w as usize];
            let old = *slot;
            let new = old | word_mask(lo, hi);
            if new != old {
                *slot = new;
                self.count += u64::from(new.count_ones() - old.count_ones());
                if old == 0 {
                    self.mark_summary(w);
                }
            }
            bit = (w + 1) * WORD_BITS;
        }
    }

    fn reset_granules(&mut self, first: u64, end: u64) {
        let mut bit = first;
        while bit < end {
            let w = bit / WORD_BITS;
            let lo = bit % WORD_BITS;
            let hi = (end - w * WORD_BITS).min(WORD_BITS);
            let slot = &mut self.levels[0][w as usize];
            let old = *slot;
            let new = old & !word_mask(lo, hi);
            if new != old {
                *slot = new;
                self.count -= u64::from(old.count_ones() - new.count_ones());
                if new == 0 {
                    self.unmark_summary(w);
                }
            }
            bit = (w + 1) * WORD_BITS;
        }
    }

    /// Word `index` of level 0 became non-zero: set its summary bits upward, stopping
    /// at the first summary word that was already non-zero.
    fn mark_summary(&mut self, mut index: u64) {
        for level in &mut self.levels[1..] {
            let slot = &mut level[(index / WORD_BITS) as usize];
            let was_zero = *slot == 0;
            *slot |= 1 << (index % WORD_BITS);
            if !was_zero {
                return;
            }
            index /= WORD_BITS;
        }
    }

    /// Word `index` of level 0 became zero: clear its summary bits upward, stopping at
    /// the first summary word that stays non-zero.
    fn unmark_summary(&mut self, mut index: u64) {
        for level in &mut self.levels[1..] {
            let slot = &mut level[(index / WORD_BITS) as usize];
            *slot &= !(1 << (index % WORD_BITS));
            if *slot != 0 {
                return;
            }
            index /= WORD_BITS;
        }
    }

    /// First set granule at or after `from`.
    fn next_set_granule(&self, from: u64) -> Option<u64> {
        if from >= self.granules {
            return None;
        }
        // Climb until a word has a set bit at or after the position, then descend
        // along the lowest set bits, which the summary invariant guarantees lead to a
        // set granule.
        let mut level = 0;
        let mut index = from;
        loop {
            let w = index / WORD_BITS;
            let word = self.levels[level][w as usize] & (!0u64 << (index % WORD_BITS));
            if word != 0 {
                index = w * WORD_BITS + u64::from(word.trailing_zeros());
                break;
            }
            level += 1;
            if level == self.levels.len() {
                return None;
            }
            index = w + 1;
            if index >= self.levels[level - 1].len() as u64 {
                return None;
            }
        }
        while level > 0 {
            level -= 1;
            let word = self.levels[level][index as usize];
            debug_assert_ne!(word, 0, "summary bit set over an empty word");
            index = index * WORD_BITS + u64::from(word.trailing_zeros());
        }
        Some(index)
    }

    /// First clear granule in `[from, limit)`, `limit <= granules`.
    fn next_clear_granule(&self, from: u64, limit: u64) -> Option<u64> {
        let mut bit = from;
        while bit < limit {
            let w = bit / WORD_BITS;
            let word = !self.levels[0][w as usize] & (!0u64 << (bit % WORD_BITS));
            if word != 0 {
                let found = w * WORD_BITS + u64::from(word.trailing_zeros());
                return (found < limit).then_some(found);
            }
            bit = (w + 1) * WORD_BITS;
        }
        None
    }

    /// Byte offset of the first set byte at or after `from`: `from` itself when its
    /// granule is set, else the start of the next set granule.
    pub fn next_set(&self, from: u64) -> Option<u64> {
        if from >= self.size {
            return None;
        }
        let granule = self.next_set_granule(from >> self.shift)?;
        Some((granule << self.shift).max(from))
    }

    /// Byte offset of the first clear byte at or after `from`, if any before the end.
    pub fn next_clear(&self, from: u64) -> Option<u64> {
        if from >= self.size {
            return None;
        }
        let granule = self.next_clear_granule(from >> self.shift, self.granules)?;
        Some((granule << self.shift).max(from))
    }

    /// The next run of set bytes at or after `from`, at most `max_len` long:
    /// `(offset, len)` with `len > 0`, clipped to the device size.
    pub fn next_dirty_area(&self, from: u64, max_len: u64) -> Option<(u64, u64)> {
        if max_len == 0 {
            return None;
        }
        let start = self.next_set(from)?;
        let bound = start.saturating_add(max_len).min(self.size);
        // Granules fully before `bound` are the only ones worth scanning.
        let limit = bound.div_ceil(self.granularity()).min(self.granules);
        let end = match self.next_clear_granule(start >> self.shift, limit) {
            Some(clear) => (clear << self.shift).min(bound),
            None => bound,
        };
        Some((start, end - start))
    }

    /// Iterates over maximal runs of set bytes, in order, as `(offset, len)`.
    pub fn dirty_areas(&self) -> DirtyAreas<'_> {
        DirtyAreas {
            bitmap: self,
            next: 0,
        }
    }

    /// Adds every granule set in `other` (a union). Same-granularity maps merge word by
    /// word; otherwise `other`'s runs are rounded outward to this map's granules.
    pub fn merge(&mut self, other: &Bitmap) -> Result<(), Error> {
        if other.size != self.size {
            return Err(Error::SizeMismatch(self.size, other.size));
        }
        if other.shift == self.shift {
            for (mine, theirs) in self.levels[0].iter_mut().zip(&other.levels[0]) {
                *mine |= *theirs;
            }
            self.rebuild_summaries();
        } else {
            for (offset, len) in other.dirty_areas() {
                self.set(offset, len);
            }
        }
        Ok(())
    }

    /// Recomputes the count and every summary level from level 0.
    fn rebuild_summaries(&mut self) {
        self.count = self.levels[0]
            .iter()
            .map(|w| u64::from(w.count_ones()))
            .sum();
        for level in 1..self.levels.len() {
            let (below, above) = self.levels.split_at_mut(level);
            let below = &below[level - 1];
            let above = &mut above[0];
            above.fill(0);
            for (i, word) in below.iter().enumerate() {
                if *word != 0 {
                    above[i / 64] |= 1 << (i % 64);
                }
            }
        }
    }

    /// The stable little-endian serialization described by [`FORMAT_HEADER_LEN`].
    pub fn serialize(&self) -> Vec<u8> {
        let words = words_for(self.granules) as usize;
        let mut out = Vec::with_capacity(FORMAT_HEADER_LEN + words * 8);
        out.extend_from_slice(&FORMAT_MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&self.shift.to_le_bytes());
        out.extend_from_slice(&self.size.to_le_bytes());
        out.extend_from_slice(&self.count.to_le_bytes());
        for word in &self.levels[0][..words] {
            out.extend_from_slice(&word.to_le_bytes());
        }
        out
    }

    /// Loads a bitmap written by [`Bitmap::serialize`], checking every field.
    pub fn deserialize(bytes: &[u8]) -> Result<Self, Error> {
        let corrupt = |what: String| Error::Corrupt(what);
        if bytes.len() < FORMAT_HEADER_LEN {
            return Err(corrupt(format!(
                "{} bytes is shorter than the {FORMAT_HEADER_LEN}-byte header",
                bytes.len()
            )));
        }
        let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
        let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap());
        if bytes[..8] != FORMAT_MAGIC {
            return Err(corrupt("bad magic".into()));
        }
        let version = u32_at(8);
        if version != FORMAT_VERSION {
            return Err(corrupt(format!("unsupported format version {version}")));
        }
        let shift = u32_at(12);
        if shift >= 63 {
            return Err(corrupt(format!("granularity shift {shift} out of range")));
        }
        let size = u64_at(16);
        let count = u64_at(24);
        // Check the payload length against the header before allocating anything, so
        // a forged header cannot make us allocate a huge map.
        let granules = size.div_ceil(1 << shift);
        let payload = &bytes[FORMAT_HEADER_LEN..];
        let words = words_for(granules);
        if words.checked_mul(8) != Some(payload.len() as u64) {
            return Err(corrupt(format!(
                "expected {} bytes of bits for {granules} granules, found {}",
                words.saturating_mul(8),
                payload.len()
            )));
        }
        let mut bitmap = Self::new(size, 1 << shift).map_err(|e| corrupt(e.to_string()))?;
        let words = bitmap.levels[0].len();
        for (word, chunk) in bitmap.levels[0].iter_mut().zip(payload.chunks_exact(8)) {
            *word = u64::from_le_bytes(chunk.try_into().unwrap());
        }
        let tail_bits = bitmap.granules % WORD_BITS;
        if tail_bits != 0 && bitmap.levels[0][words - 1] >> tail_bits != 0 {
            return Err(corrupt("bits set past the last granule".into()));
        }
        if bitmap.granules == 0 && bitmap.levels[0][0] != 0 {
            return Err(corrupt("bits set in an empty bitmap".into()));
        }
        bitmap.rebuild_summaries();
        if bitmap.count != count {
            return Err(corrupt(format!(
                "header says {count} set granules, bits say {}",
                bitmap.count
            )));
        }
        Ok(bitmap)
    }
}

/// Iterator over maximal runs of set bytes; see [`Bitmap::dirty_areas`].
pub struct DirtyAreas<'a> {
    bitmap: &'a Bitmap,
    next: u64,
}

impl Iterator for DirtyAreas<'_> {
    type Item = (u64, u64);

    fn next(&mut self) -> Option<(u64, u64)> {
        let area = self.bitmap.next_dirty_area(self.next, u64::MAX)?;
        self.next = area.0 + area.1;
        Some(area)
    }
}

#[cfg(test)]
mod tests;
