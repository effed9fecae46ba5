//! The one raw call of the NVMe/TCP driver.

use std::os::fd::{BorrowedFd, OwnedFd, RawFd};

/// Duplicates a descriptor given as a raw number (the reactor's eventfd, which the bdev
/// interface passes as [`RawFd`]).
pub fn dup_fd(fd: RawFd) -> std::io::Result<OwnedFd> {
    // SAFETY: callers pass the eventfd of the reactor opening a channel; the reactor keeps it
    // open while it runs, and it is borrowed only for this call, which duplicates it.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    rustix::io::fcntl_dupfd_cloexec(borrowed, 0).map_err(Into::into)
}
