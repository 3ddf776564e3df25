//! Dirty bitmaps: which parts of a node were written since a point in time.
//!
//! A node holds any number of named bitmaps. Every write, write-zeroes and discard
//! that reaches the node (directly, through a filter above it, or from an NBD export)
//! marks every recording bitmap, whatever the driver below does; a failed request is
//! marked too, since it may have changed part of its range.
//!
//! A backup that uses a bitmap *freezes* it: the bitmap keeps its bits and becomes
//! busy (the user cannot change or remove it), and an anonymous *successor* records
//! the writes made while the job runs. When the job ends the two are combined by one of
//! QEMU's rules: [`DirtyBitmap::abdicate`] (the bitmap becomes the successor: only the
//! writes since the job started) or [`DirtyBitmap::reclaim`] (the bitmap keeps its old
//! bits plus the successor's).

use std::sync::Arc;
use std::sync::Mutex;

use bitmap::Bitmap;

use crate::error::Error;
use crate::error::Result;

/// A dirty bitmap stored in an image (qcow2's bitmaps extension), as the node layer
/// hands it to the driver on close and gets it back on open.
#[derive(Debug, Clone)]
pub struct PersistentBitmap {
    /// Name, unique in the image.
    pub name: String,
    /// The bits; their granularity is the bitmap's.
    pub bits: bitmap::Bitmap,
    /// Whether it records writes ("auto" on disk).
    pub recording: bool,
    /// Found marked in use: not saved cleanly, its bits cannot be trusted.
    pub inconsistent: bool,
}

/// Most bytes of bits a dirty bitmap may take, in memory and in an image: 512 MiB,
/// QEMU's limit for persistent bitmaps (`BME_MAX_PHYS_SIZE` in its qcow2 code), which
/// is 2^32 granules (a 512 TiB disk at 128 KiB granularity, 2 TiB at 512 bytes).
/// QEMU has no limit for the others and aborts when one cannot be allocated; here a
/// bitmap over the limit is refused.
pub const MAX_BITMAP_BYTES: u64 = 512 << 20;

/// Bytes of bits a bitmap of `size` bytes at `granularity` takes.
pub fn bitmap_bytes(size: u64, granularity: u64) -> u64 {
    size.div_ceil(granularity.max(1)).div_ceil(8)
}

/// "512 MiB", "128 GiB", "1.5 KiB": sizes in messages.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut scaled = bytes as f64;
    let mut unit = 0;
    while scaled >= 1024.0 && unit + 1 < UNITS.len() {
        scaled /= 1024.0;
        unit += 1;
    }
    match unit {
        0 => format!("{bytes} bytes"),
        _ if scaled.fract() == 0.0 => format!("{scaled:.0} {}", UNITS[unit]),
        _ => format!("{scaled:.1} {}", UNITS[unit]),
    }
}

/// The granularity QEMU picks when the user gives none: the node's cluster size
/// clamped to [4 KiB, 64 KiB], 64 KiB when it has no cluster size.
pub fn default_granularity(cluster_size: Option<u32>) -> u64 {
    match cluster_size {
        Some(cs) => u64::from(cs).clamp(4096, 65536),
        None => 65536,
    }
}

#[derive(Debug)]
struct State {
    bits: Bitmap,
    recording: bool,
    persistent: bool,
    busy: bool,
    inconsistent: bool,
    /// Writes made while a job holds the bitmap frozen.
    successor: Option<Bitmap>,
}

/// One named dirty bitmap of a node.
#[derive(Debug)]
pub struct DirtyBitmap {
    name: String,
    state: Mutex<State>,
}

/// What query-named-block-nodes reports about a bitmap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapInfo {
    /// Name.
    pub name: String,
    /// Bytes per bit.
    pub granularity: u64,
    /// Dirty bytes (bits times granularity).
    pub count: u64,
    /// Whether writes mark it.
    pub recording: bool,
    /// Used by a job or an export: cannot be changed or removed.
    pub busy: bool,
    /// Stored in the image on close.
    pub persistent: bool,
    /// Found not cleanly saved: only removal is allowed.
    pub inconsistent: bool,
}

impl DirtyBitmap {
    /// An empty bitmap for a node of `size` bytes.
    pub fn new(
        name: &str,
        size: u64,
        granularity: u64,
        recording: bool,
        persistent: bool,
    ) -> Result<Arc<Self>> {
        let bytes = bitmap_bytes(size, granularity);
        if bytes > MAX_BITMAP_BYTES {
            return Err(Error::invalid(format!(
                "Bitmap '{name}' would take {} of memory, more than the {} a dirty bitmap \
                 may take: use a larger granularity",
                human_size(bytes),
                human_size(MAX_BITMAP_BYTES)
            )));
        }
        let bits = Bitmap::new(size, granularity).map_err(|e| Error::invalid(e.to_string()))?;
        Ok(Arc::new(Self {
            name: name.to_string(),
            state: Mutex::new(State {
                bits,
                recording,
                persistent,
                busy: false,
                inconsistent: false,
                successor: None,
            }),
        }))
    }

    /// A bitmap loaded from an image.
    pub fn from_stored(stored: crate::dirty::PersistentBitmap) -> Arc<Self> {
        Arc::new(Self {
            name: stored.name,
            state: Mutex::new(State {
                bits: stored.bits,
                recording: stored.recording,
                persistent: true,
                busy: false,
                inconsistent: stored.inconsistent,
                successor: None,
            }),
        })
    }

    /// What to store in the image at close: every bit, the successor's too (a job
    /// still running at close has not settled them).
    pub fn to_stored(&self) -> Option<crate::dirty::PersistentBitmap> {
        let s = self.lock();
        if !s.persistent {
            return None;
        }
        let mut bits = s.bits.clone();
        if let Some(successor) = &s.successor {
            let _ = bits.merge(successor);
        }
        Some(crate::dirty::PersistentBitmap {
            name: self.name.clone(),
            bits,
            recording: s.recording,
            inconsistent: s.inconsistent,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Marks `[offset, offset + len)` written.
    pub fn mark(&self, offset: u64, len: u64) {
        let mut s = self.lock();
        if !s.recording {
            return;
        }
        // A frozen bitmap's successor records for it (and, like QEMU's, only if the
        // bitmap itself was recording).
        match s.successor.as_mut() {
            Some(successor) => successor.set(offset, len),
            None => s.bits.set(offset, len),
        }
    }

    /// The status QMP reports.
    pub fn info(&self) -> BitmapInfo {
        let s = self.lock();
        BitmapInfo {
            name: self.name.clone(),
            granularity: s.bits.granularity(),
            count: s.bits.count_bytes(),
            recording: s.recording,
            busy: s.busy,
            persistent: s.persistent,
            inconsistent: s.inconsistent,
        }
    }

    /// The anonymous successor of a frozen bitmap (QEMU lists it as a nameless
    /// bitmap): granularity, dirty bytes, recording.
    pub fn successor_info(&self) -> Option<(u64, u64, bool)> {
        let s = self.lock();
        s.successor
            .as_ref()
            .map(|b| (b.granularity(), b.count_bytes(), s.recording))
    }

    /// A copy of the bits.
    pub fn snapshot(&self) -> Bitmap {
        self.lock().bits.clone()
    }

    /// Size of the device the bitmap covers, in bytes.
    pub fn size(&self) -> u64 {
        self.lock().bits.size()
    }

    /// Refuses operations on a busy or inconsistent bitmap, in QEMU's words.
    pub fn check_usable(&self) -> Result<()> {
        let s = self.lock();
        if s.busy {
            return Err(Error::invalid(format!(
                "Bitmap '{}' is currently in use by another operation and cannot be used",
                self.name
            )));
        }
        if s.inconsistent {
            return Err(Error::invalid(format!(
                "Bitmap '{}' is inconsistent and cannot be used",
                self.name
            )));
        }
        Ok(())
    }

    /// Clears every bit.
    pub fn clear(&self) -> Result<()> {
        self.check_usable()?;
        self.lock().bits.clear();
        Ok(())
    }

    /// Starts or stops recording.
    pub fn set_recording(&self, recording: bool) -> Result<()> {
        self.check_usable()?;
        self.lock().recording = recording;
        Ok(())
    }

    /// Adds another bitmap's bits (any granularity, same size).
    pub fn merge_from(&self, other: &Bitmap) -> Result<()> {
        self.check_usable()?;
        self.lock()
            .bits
            .merge(other)
            .map_err(|e| Error::invalid(e.to_string()))
    }

    /// Puts back bits and the recording state saved earlier (transaction rollback).
    pub fn restore(&self, bits: Bitmap, recording: bool) {
        let mut s = self.lock();
        s.bits = bits;
        s.recording = recording;
    }

    /// Marks the bitmap busy while an export (or another user) reads it, or frees it.
    pub fn set_busy(&self, busy: bool) {
        self.lock().busy = busy;
    }

    /// Runs of `[offset, offset + len)`: (length, dirty), at most `max` of them.
    pub fn runs(&self, offset: u64, len: u64, max: usize) -> Vec<(u64, bool)> {
        let s = self.lock();
        let end = offset + len;
        let mut out = Vec::new();
        let mut at = offset;
        while at < end && out.len() < max {
            let dirty = s.bits.get(at);
            let next = if dirty {
                s.bits.next_clear(at)
            } else {
                s.bits.next_set(at)
            }
            .unwrap_or(end)
            .clamp(at + 1, end);
            out.push((next - at, dirty));
            at = next;
        }
        out
    }

    /// Freezes the bitmap for a job: it becomes busy and a successor records writes
    /// from now on. Returns the bits at this instant.
    pub fn freeze(&self) -> Result<Bitmap> {
        self.check_usable()?;
        let mut s = self.lock();
        let successor = Bitmap::new(s.bits.size(), s.bits.granularity())
            .map_err(|e| Error::invalid(e.to_string()))?;
        s.successor = Some(successor);
        s.busy = true;
        Ok(s.bits.clone())
    }

    /// Ends a freeze keeping only the writes made during it (the bits become the
    /// successor's), then adds `extra` (bits a failed job did not copy), if any.
    pub fn abdicate(&self, extra: Option<&Bitmap>) {
        let mut s = self.lock();
        if let Some(successor) = s.successor.take() {
            s.bits = successor;
        }
        if let Some(extra) = extra {
            let _ = s.bits.merge(extra);
        }
        s.busy = false;
    }

    /// Ends a freeze keeping the old bits and adding the writes made during it.
    pub fn reclaim(&self) {
        let mut s = self.lock();
        if let Some(successor) = s.successor.take() {
            let _ = s.bits.merge(&successor);
        }
        s.busy = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_like_people_write_them() {
        assert_eq!(human_size(512), "512 bytes");
        assert_eq!(human_size(1536), "1.5 KiB");
        assert_eq!(human_size(MAX_BITMAP_BYTES), "512 MiB");
        assert_eq!(human_size(1 << 49), "512 TiB");
    }

    #[test]
    fn a_bitmap_over_the_limit_is_refused_before_it_is_allocated() {
        let err = DirtyBitmap::new("t", 1 << 49, 512, true, false).unwrap_err();
        assert_eq!(
            err.to_string(),
            "Bitmap 't' would take 128 GiB of memory, more than the 512 MiB a dirty \
             bitmap may take: use a larger granularity"
        );
        // The largest allowed one exists (its pages stay untouched until bits are set).
        DirtyBitmap::new("t", 1 << 41, 512, true, false).unwrap();
    }

    #[test]
    fn a_frozen_bitmap_sends_writes_to_its_successor_and_ends_by_either_rule() {
        let b = DirtyBitmap::new("b", 1 << 20, 65536, true, false).unwrap();
        b.mark(0, 1);
        let at_start = b.freeze().unwrap();
        assert_eq!(at_start.count_bytes(), 65536);
        assert!(b.clear().is_err(), "busy bitmaps refuse changes");
        b.mark(5 * 65536, 10);
        assert_eq!(b.info().count, 65536, "the frozen bits do not change");
        b.abdicate(None);
        assert_eq!(
            b.snapshot().dirty_areas().collect::<Vec<_>>(),
            [(5 * 65536, 65536)]
        );

        b.freeze().unwrap();
        b.mark(0, 1);
        b.reclaim();
        assert_eq!(b.info().count, 2 * 65536);
        assert!(!b.info().busy);

        // A disabled bitmap records nothing, frozen or not.
        b.set_recording(false).unwrap();
        b.mark(9 * 65536, 1);
        b.freeze().unwrap();
        b.mark(9 * 65536, 1);
        b.reclaim();
        assert_eq!(b.info().count, 2 * 65536);
    }

    #[test]
    fn default_granularity_follows_qemu() {
        assert_eq!(default_granularity(None), 65536);
        assert_eq!(default_granularity(Some(512)), 4096);
        assert_eq!(default_granularity(Some(2 << 20)), 65536);
        assert_eq!(default_granularity(Some(16384)), 16384);
    }
}
