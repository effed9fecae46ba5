//! Memory the controller reads and writes while the driver also uses it: queue rings and PRP or
//! SGL list pages. No Rust reference to these bytes is ever made (the device writes them
//! concurrently); every access is a bounds-checked volatile read or write through the owned
//! [`DmaBuf`]'s address. This and `vfio.rs` are the driver's only unsafe code.

use std::sync::atomic::{fence, Ordering};

use hugepages::DmaBuf;

/// An owned DMA buffer accessed only with volatile operations.
pub(crate) struct DeviceMemory {
    buf: DmaBuf,
}

impl DeviceMemory {
    /// Takes the buffer and zeroes it (the device does not know it yet, so a slice is fine).
    pub(crate) fn new(mut buf: DmaBuf) -> Self {
        buf.as_mut_slice().fill(0);
        Self { buf }
    }

    /// The address the device uses.
    pub(crate) fn iova(&self) -> u64 {
        self.buf.iova()
    }

    /// Length in bytes.
    pub(crate) fn len(&self) -> usize {
        self.buf.len()
    }

    fn check(&self, offset: usize, len: usize) {
        // Offsets come from queue indexes below the ring's size: a miss is a driver bug, and
        // stopping beats writing outside the buffer.
        assert!(
            offset.is_multiple_of(4) && offset + len <= self.buf.len(),
            "device memory access {offset}+{len} outside {} bytes",
            self.buf.len()
        );
    }

    /// Zeroes the whole buffer (only while the device has no queue on it).
    pub(crate) fn clear(&self) {
        for off in (0..self.len()).step_by(4) {
            self.write_u32(off, 0);
        }
    }

    /// Reads a dword.
    pub(crate) fn read_u32(&self, offset: usize) -> u32 {
        self.check(offset, 4);
        // SAFETY: the range lies inside the buffer (checked above), which this value owns and
        // which stays mapped while it lives; the pointer is 4-byte aligned (the buffer is page
        // aligned and the offset a multiple of 4). Volatile: the device writes it concurrently.
        unsafe { std::ptr::read_volatile(self.buf.as_ptr().add(offset).cast::<u32>()) }
    }

    /// Writes a dword.
    pub(crate) fn write_u32(&self, offset: usize, value: u32) {
        self.check(offset, 4);
        // SAFETY: as in `read_u32`; the device only reads the parts the driver writes.
        unsafe { std::ptr::write_volatile(self.buf.as_ptr().add(offset).cast::<u32>(), value) }
    }

    /// Writes consecutive dwords from `offset`.
    pub(crate) fn write_u32s(&self, offset: usize, values: &[u32]) {
        for (i, v) in values.iter().enumerate() {
            self.write_u32(offset + 4 * i, *v);
        }
    }

    /// Writes a little-endian quadword as two dwords.
    pub(crate) fn write_u64(&self, offset: usize, value: u64) {
        self.write_u32(offset, value as u32);
        self.write_u32(offset + 4, (value >> 32) as u32);
    }

    /// Copies the buffer's bytes out (Identify data, after the command completed).
    pub(crate) fn read_bytes(&self, out: &mut [u8]) {
        let n = out.len().min(self.len()) / 4;
        for i in 0..n {
            out[4 * i..4 * i + 4].copy_from_slice(&self.read_u32(4 * i).to_le_bytes());
        }
    }
}

/// Orders the driver's writes to queue memory before the doorbell write that publishes them.
pub(crate) fn publish() {
    fence(Ordering::SeqCst);
}

/// Orders the read of a completion's phase tag before the reads of the rest of it.
pub(crate) fn acquire() {
    fence(Ordering::Acquire);
}

/// Copies `out.len()` bytes at device address `iova` into `out` (controller models in tests).
///
/// # Safety
/// `iova..iova+out.len()` must lie inside a live DMA region (IOVA equals the address here) that
/// no Rust reference covers during the call.
#[cfg(test)]
pub(crate) unsafe fn copy_from_iova(iova: u64, out: &mut [u8]) {
    // SAFETY: the caller guarantees the source range is mapped and not referenced; `out` is a
    // distinct exclusive slice.
    unsafe {
        std::ptr::copy_nonoverlapping(iova as usize as *const u8, out.as_mut_ptr(), out.len())
    }
}

/// Copies `data` to device address `iova` (controller models in tests).
///
/// # Safety
/// As for [`copy_from_iova`].
#[cfg(test)]
pub(crate) unsafe fn copy_to_iova(iova: u64, data: &[u8]) {
    // SAFETY: as above, with the destination the mapped range.
    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), iova as usize as *mut u8, data.len()) }
}
