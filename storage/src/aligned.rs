//! Page-aligned heap buffers: O_DIRECT reads need the buffer address, length and file offset all
//! aligned to the logical block size, and 4096 covers every device we target.

use std::alloc::{self, Layout};
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

use crate::PAGE_SIZE;

/// A zero-initialised heap buffer whose start is aligned to [`PAGE_SIZE`] and whose allocation is
/// a whole number of pages. `len()` is the logical length (at most the allocation).
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    /// Logical length: what the slice views expose.
    len: usize,
    /// Allocated bytes, a multiple of PAGE_SIZE; 0 means nothing was allocated.
    cap: usize,
}

// SAFETY: AlignedBuf owns its allocation exclusively (like Vec<u8>); &AlignedBuf only hands out
// shared slices, so sending or sharing it between threads is as safe as for Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: see Send above; no interior mutability.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes; the allocation is rounded up to whole pages.
    pub fn zeroed(len: usize) -> AlignedBuf {
        // Like Vec, a size no allocation can have is a capacity overflow, never a wrapped one.
        let cap = len
            .checked_next_multiple_of(PAGE_SIZE)
            .expect("AlignedBuf capacity overflow");
        if cap == 0 {
            return AlignedBuf {
                ptr: NonNull::dangling(),
                len: 0,
                cap: 0,
            };
        }
        let layout = Self::layout(cap);
        // SAFETY: layout has a non-zero size (cap > 0) and a valid power-of-two alignment.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout)
        };
        AlignedBuf { ptr, len, cap }
    }

    /// An aligned copy of `bytes`.
    pub fn from_slice(bytes: &[u8]) -> AlignedBuf {
        let mut b = AlignedBuf::zeroed(bytes.len());
        b.as_mut_slice().copy_from_slice(bytes);
        b
    }

    fn layout(cap: usize) -> Layout {
        Layout::from_size_align(cap, PAGE_SIZE).expect("page-rounded size fits a Layout")
    }

    /// Logical length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Allocated bytes (a multiple of PAGE_SIZE, at least `len()`).
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Shortens the logical length to `len` (no-op if already shorter); the memory stays allocated.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for cap >= len initialised (zeroed) bytes, or dangling with len 0,
        // which from_raw_parts allows for an empty slice; we own the memory for &self's lifetime.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in as_slice; &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.cap > 0 {
            // SAFETY: ptr was returned by alloc_zeroed with exactly this layout and not freed yet.
            unsafe { alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.cap)) }
        }
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.as_mut_slice()
    }
}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl Clone for AlignedBuf {
    fn clone(&self) -> Self {
        AlignedBuf::from_slice(self.as_slice())
    }
}

impl PartialEq for AlignedBuf {
    fn eq(&self, other: &Self) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl Eq for AlignedBuf {}

impl fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .field("capacity", &self.cap)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alignment_and_lengths() {
        for len in [0usize, 1, 4095, 4096, 4097, 3 * 4096] {
            let mut b = AlignedBuf::zeroed(len);
            assert_eq!(b.len(), len);
            assert_eq!(b.capacity() % PAGE_SIZE, 0);
            assert!(b.capacity() >= len);
            assert!(b.iter().all(|&x| x == 0));
            if len > 0 {
                assert_eq!(b.as_ptr() as usize % PAGE_SIZE, 0);
                b[len - 1] = 7;
                assert_eq!(b.as_slice()[len - 1], 7);
            }
            let c = b.clone();
            assert_eq!(c, b);
            b.truncate(len / 2);
            assert_eq!(b.len(), len / 2);
            b.truncate(len + 10);
            assert_eq!(b.len(), len / 2);
        }
    }

    #[test]
    fn send_sync() {
        fn check<T: Send + Sync>() {}
        check::<AlignedBuf>();
    }
}
