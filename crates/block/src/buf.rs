//! Owned, aligned I/O buffers.
//!
//! Every request carries its data in an [`IoBuf`] that the driver owns while the
//! request runs and hands back when it completes. Owned buffers let a blocking-pool
//! engine move the data to another thread and an io_uring engine keep it pinned until
//! the kernel is done, behind one trait. Buffers are always aligned to [`IO_ALIGN`], so
//! a `cache.direct` (O_DIRECT) file can use them without a bounce copy.
//!
//! Clones share their memory until one of them is written to (copy on write), so a
//! caller can keep a cheap copy of data it hands to a write: the backup engine keeps
//! the old data it is writing to a target this way, for a retry if the write fails.

use std::alloc::Layout;
use std::fmt;
use std::ops::Deref;
use std::ops::DerefMut;
use std::ptr::NonNull;
use std::sync::Arc;

/// Alignment of every [`IoBuf`] in memory: the largest logical block size O_DIRECT
/// asks for on the filesystems we run on.
pub const IO_ALIGN: usize = 4096;

/// One aligned, zero-initialised allocation.
struct Allocation {
    ptr: NonNull<u8>,
    capacity: usize,
}

// SAFETY: the allocation is plain memory owned by this value; IoBuf only hands out
// &mut access while it holds the only reference (see deref_mut).
unsafe impl Send for Allocation {}
// SAFETY: shared references only read.
unsafe impl Sync for Allocation {}

impl Allocation {
    fn zeroed(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        let layout = Self::layout(capacity);
        // SAFETY: the layout has a non-zero size and a power-of-two alignment.
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        Self { ptr, capacity }
    }

    fn layout(capacity: usize) -> Layout {
        Layout::from_size_align(capacity, IO_ALIGN).expect("I/O buffer size overflows")
    }
}

impl Drop for Allocation {
    fn drop(&mut self) {
        // SAFETY: ptr was allocated in `zeroed` with exactly this layout and is freed
        // only here.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.capacity)) }
    }
}

/// A heap buffer aligned to [`IO_ALIGN`], zero-filled when allocated; clones share
/// memory until written.
pub struct IoBuf {
    memory: Arc<Allocation>,
    len: usize,
}

impl IoBuf {
    /// A zero-filled buffer of `len` bytes.
    pub fn zeroed(len: usize) -> Self {
        Self {
            memory: Arc::new(Allocation::zeroed(len)),
            len,
        }
    }

    /// A buffer holding a copy of `data`.
    pub fn from_slice(data: &[u8]) -> Self {
        let mut buf = Self::zeroed(data.len());
        buf.copy_from_slice(data);
        buf
    }

    /// Bytes the buffer can hold without reallocating.
    pub fn capacity(&self) -> usize {
        self.memory.capacity
    }

    /// Changes the length within the capacity; bytes that become visible are zero.
    pub fn set_len(&mut self, len: usize) {
        assert!(
            len <= self.capacity(),
            "IoBuf::set_len({len}) beyond capacity {}",
            self.capacity()
        );
        if len > self.len {
            let old = self.len;
            self.len = len;
            self[old..].fill(0);
        } else {
            self.len = len;
        }
    }

    /// True when every byte is zero (what `detect-zeroes` and sparse copies ask).
    pub fn is_zero(&self) -> bool {
        is_zero(self)
    }
}

/// True when every byte of `bytes` is zero.
pub fn is_zero(bytes: &[u8]) -> bool {
    let (words, tail) = bytes.split_at(bytes.len() - bytes.len() % 8);
    words
        .chunks_exact(8)
        .all(|w| u64::from_ne_bytes(w.try_into().unwrap()) == 0)
        && tail.iter().all(|b| *b == 0)
}

impl Deref for IoBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: the allocation holds `capacity >= len` initialised bytes and lives as
        // long as self; nobody writes it while a shared reference exists (writers need
        // the only reference, see deref_mut).
        unsafe { std::slice::from_raw_parts(self.memory.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for IoBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        if Arc::get_mut(&mut self.memory).is_none() {
            // Shared with a clone: copy on write.
            let copy = Allocation::zeroed(self.memory.capacity);
            // SAFETY: both allocations hold at least `len` bytes and are distinct.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    self.memory.ptr.as_ptr(),
                    copy.ptr.as_ptr(),
                    self.len,
                );
            };
            self.memory = Arc::new(copy);
        }
        // SAFETY: the Arc is now unique (get_mut succeeded or we just made it), so this
        // is the only access to the allocation for the lifetime of &mut self.
        unsafe { std::slice::from_raw_parts_mut(self.memory.ptr.as_ptr(), self.len) }
    }
}

impl Clone for IoBuf {
    /// Shares the memory; the first write through either copy separates them.
    fn clone(&self) -> Self {
        Self {
            memory: self.memory.clone(),
            len: self.len,
        }
    }
}

impl fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IoBuf")
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

impl PartialEq for IoBuf {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_and_zeroed() {
        for len in [0, 1, 511, 4096, 1 << 20] {
            let buf = IoBuf::zeroed(len);
            assert_eq!(buf.as_ptr() as usize % IO_ALIGN, 0);
            assert_eq!(buf.len(), len);
            assert!(buf.is_zero());
        }
    }

    #[test]
    fn is_zero_sees_a_single_byte_anywhere() {
        for at in [0, 7, 8, 4095, 4100] {
            let mut buf = IoBuf::zeroed(4101);
            buf[at] = 1;
            assert!(!buf.is_zero(), "byte {at}");
        }
    }

    #[test]
    fn clones_share_until_written() {
        let original = IoBuf::from_slice(&[1; 4096]);
        let mut copy = original.clone();
        assert_eq!(original.as_ptr(), copy.as_ptr(), "a clone shares memory");
        copy[0] = 2;
        assert_ne!(original.as_ptr(), copy.as_ptr());
        assert_eq!(
            original[0], 1,
            "writing the clone leaves the original alone"
        );
        assert_eq!(copy[0], 2);
        assert_eq!(&copy[1..], &original[1..]);
    }

    #[test]
    fn growing_within_capacity_exposes_zeros() {
        let mut buf = IoBuf::from_slice(&[9; 16]);
        buf.set_len(4);
        buf.set_len(16);
        assert_eq!(&buf[..4], &[9; 4]);
        assert_eq!(&buf[4..], &[0; 12]);
    }
}
