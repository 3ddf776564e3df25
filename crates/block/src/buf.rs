//! Owned, aligned I/O buffers.
//!
//! Every request carries its data in an [`IoBuf`] that the driver owns while the
//! request runs and hands back when it completes. Owned buffers let a blocking-pool
//! engine move the data to another thread and an io_uring engine keep it pinned until
//! the kernel is done, behind one trait. Buffers are always aligned to [`IO_ALIGN`], so
//! a `cache.direct` (O_DIRECT) file can use them without a bounce copy.

use std::alloc::Layout;
use std::fmt;
use std::ops::Deref;
use std::ops::DerefMut;
use std::ptr::NonNull;

/// Alignment of every [`IoBuf`] in memory: the largest logical block size O_DIRECT
/// asks for on the filesystems we run on.
pub const IO_ALIGN: usize = 4096;

/// A heap buffer aligned to [`IO_ALIGN`], zero-filled when allocated.
pub struct IoBuf {
    ptr: NonNull<u8>,
    len: usize,
    capacity: usize,
}

// SAFETY: IoBuf owns its allocation exclusively (like Vec<u8>); moving it to another
// thread moves that ownership, and shared references only allow reads.
unsafe impl Send for IoBuf {}
// SAFETY: &IoBuf only exposes &[u8]; there is no interior mutability.
unsafe impl Sync for IoBuf {}

impl IoBuf {
    /// A zero-filled buffer of `len` bytes.
    pub fn zeroed(len: usize) -> Self {
        let capacity = len.max(1);
        let layout = Self::layout(capacity);
        // SAFETY: the layout has a non-zero size (capacity >= 1) and a valid
        // power-of-two alignment, as alloc_zeroed requires.
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        Self { ptr, len, capacity }
    }

    /// A buffer holding a copy of `data`.
    pub fn from_slice(data: &[u8]) -> Self {
        let mut buf = Self::zeroed(data.len());
        buf.copy_from_slice(data);
        buf
    }

    fn layout(capacity: usize) -> Layout {
        Layout::from_size_align(capacity, IO_ALIGN).expect("I/O buffer size overflows")
    }

    /// Bytes the buffer can hold without reallocating.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Changes the length within the capacity; bytes that become visible are zero.
    pub fn set_len(&mut self, len: usize) {
        assert!(
            len <= self.capacity,
            "IoBuf::set_len({len}) beyond capacity {}",
            self.capacity
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
        let (words, tail) = self.split_at(self.len - self.len % 8);
        words
            .chunks_exact(8)
            .all(|w| u64::from_ne_bytes(w.try_into().unwrap()) == 0)
            && tail.iter().all(|b| *b == 0)
    }
}

impl Deref for IoBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: ptr points to an allocation of `capacity >= len` bytes that was
        // zero-initialised at allocation and is owned by self for its lifetime.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for IoBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in deref; &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for IoBuf {
    fn drop(&mut self) {
        // SAFETY: ptr was allocated in `zeroed` with exactly this layout and is freed
        // only here.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.capacity)) }
    }
}

impl Clone for IoBuf {
    fn clone(&self) -> Self {
        Self::from_slice(self)
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
    fn growing_within_capacity_exposes_zeros() {
        let mut buf = IoBuf::from_slice(&[9; 16]);
        buf.set_len(4);
        buf.set_len(16);
        assert_eq!(&buf[..4], &[9; 4]);
        assert_eq!(&buf[4..], &[0; 12]);
    }
}
