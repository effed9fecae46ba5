//! Open files held without a descriptor, so the number of volumes is not bounded by the
//! process's open file limit.
//!
//! An appliance with ten thousand pairs keeps thirty thousand files open (each pair's primary,
//! secondary and metadata), more than many hosts let a process have descriptors (the hard limit
//! may be 20,000 and not ours to raise). io_uring's fixed-file tables hold open files without
//! descriptors: a uring bdev's file is *held* in the table of a ring that does no I/O (a holding
//! ring), and a descriptor is made from it for a moment when one is needed (to put the file in
//! a reactor's ring, to ask for its holes, to unlock it) with `IORING_OP_FIXED_FD_INSTALL`
//! (Linux 6.8). On kernels without that operation, a file keeps its descriptor.
//!
//! The file's lock (an open file description lock) stays with the held open file: closing the
//! descriptor it was opened with, or one made from it, does not drop it.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use io_uring::{opcode, types, IoUring};

use crate::file_lock::{self, LockedFile};

/// Slots of one holding ring's table (fewer when the open file limit is lower: the kernel
/// sizes no table beyond it).
const HOLDING_SLOTS: u32 = 4096;

/// Whether files may be held (tests turn it off to exercise descriptors).
static HOLDING: AtomicBool = AtomicBool::new(true);
static HOLDER: Mutex<Holder> = Mutex::new(Holder {
    supported: None,
    rings: Vec::new(),
});

/// Lets uring bdevs opened from now on hold their files in holding rings (the default, where
/// the kernel can), or makes them keep descriptors.
pub fn set_file_holding(enabled: bool) {
    HOLDING.store(enabled, Ordering::Relaxed);
}

/// True when this kernel can hold files without descriptors (Linux 6.8 and later).
pub fn file_holding_supported() -> bool {
    HOLDER.lock().unwrap_or_else(|e| e.into_inner()).supported()
}

struct HoldingRing {
    ring: IoUring,
    free: Vec<u32>,
}

struct Holder {
    /// Whether this kernel makes descriptors from fixed files; learnt on first use.
    supported: Option<bool>,
    rings: Vec<HoldingRing>,
}

impl Holder {
    /// A free slot, in a new holding ring if every ring's table is full.
    fn free_slot(&mut self) -> std::io::Result<(usize, u32)> {
        if let Some(i) = self.rings.iter().position(|r| !r.free.is_empty()) {
            if let Some(slot) = self.rings[i].free.pop() {
                return Ok((i, slot));
            }
        }
        let slots = HOLDING_SLOTS.min(open_file_limit());
        let ring = IoUring::new(4)?;
        ring.submitter().register_files_sparse(slots)?;
        self.rings.push(HoldingRing {
            ring,
            free: (0..slots).rev().collect(),
        });
        let i = self.rings.len() - 1;
        let slot = self.rings[i].free.pop().ok_or(std::io::ErrorKind::Other)?;
        Ok((i, slot))
    }

    fn supported(&mut self) -> bool {
        *self.supported.get_or_insert_with(|| {
            let Ok(ring) = IoUring::new(4) else {
                return false;
            };
            let mut probe = io_uring::Probe::new();
            ring.submitter().register_probe(&mut probe).is_ok()
                && probe.is_supported(opcode::FixedFdInstall::CODE)
        })
    }
}

/// The soft limit on open files: no fixed-file table may be larger.
pub(super) fn open_file_limit() -> u32 {
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    limit
        .current
        .map_or(u32::MAX, |n| u32::try_from(n).unwrap_or(u32::MAX))
}

/// An open file in a holding ring's table.
#[derive(Debug)]
pub(super) struct HeldFile {
    ring: usize,
    slot: u32,
}

impl HeldFile {
    /// Puts `file` in a holding ring's table; the caller may then close its descriptor. None
    /// when holding is off, unsupported by this kernel, or failed (the caller keeps the
    /// descriptor).
    fn hold(file: &File) -> Option<HeldFile> {
        if !HOLDING.load(Ordering::Relaxed) {
            return None;
        }
        let mut holder = HOLDER.lock().unwrap_or_else(|e| e.into_inner());
        if !holder.supported() {
            return None;
        }
        let (ring, slot) = match holder.free_slot() {
            Ok(found) => found,
            Err(err) => {
                tracing::debug!(%err, "no holding ring: the file keeps its descriptor");
                return None;
            }
        };
        let holding = &mut holder.rings[ring];
        match holding
            .ring
            .submitter()
            .register_files_update(slot, &[file.as_raw_fd()])
        {
            Ok(_) => Some(HeldFile { ring, slot }),
            Err(err) => {
                tracing::debug!(%err, "file not held: it keeps its descriptor");
                holding.free.push(slot);
                None
            }
        }
    }

    /// A new descriptor of the held open file (close-on-exec), for the caller to close soon.
    pub(super) fn descriptor(&self) -> std::io::Result<File> {
        let mut holder = HOLDER.lock().unwrap_or_else(|e| e.into_inner());
        let ring = &mut holder.rings[self.ring].ring;
        let install = opcode::FixedFdInstall::new(types::Fixed(self.slot), 0)
            .build()
            .user_data(u64::from(self.slot));
        // SAFETY: the operation reads no memory of ours (its only argument is the slot).
        unsafe { ring.submission().push(&install) }
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::WouldBlock))?;
        loop {
            match ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(e),
            }
            // A request left by a failed call before may finish first: its descriptor, made
            // for nobody, is closed.
            let mut mine = None;
            for cqe in ring.completion() {
                let fd = cqe.result();
                if fd < 0 {
                    if cqe.user_data() == u64::from(self.slot) {
                        mine = Some(Err(std::io::Error::from_raw_os_error(-fd)));
                    }
                    continue;
                }
                // SAFETY: the kernel just installed `fd` in this process's table for this
                // ring's request; nothing else owns it.
                let file = unsafe { File::from_raw_fd(fd) };
                if cqe.user_data() == u64::from(self.slot) && mine.is_none() {
                    mine = Some(Ok(file));
                }
            }
            if let Some(result) = mine {
                return result;
            }
        }
    }
}

impl Drop for HeldFile {
    fn drop(&mut self) {
        let mut holder = HOLDER.lock().unwrap_or_else(|e| e.into_inner());
        let holding = &mut holder.rings[self.ring];
        // The kernel closes the open file once no request uses the slot (holding rings run
        // none); its lock was dropped by the owner before.
        match holding
            .ring
            .submitter()
            .register_files_update(self.slot, &[-1])
        {
            Ok(_) => holding.free.push(self.slot),
            Err(err) => tracing::warn!(%err, "holding ring slot not cleared"),
        }
    }
}

/// A uring bdev's open and locked file: held without a descriptor where the kernel allows it,
/// its descriptor otherwise. Unlocked as it is dropped.
#[derive(Debug)]
pub(super) enum BdevFile {
    Descriptor(LockedFile),
    Held(HeldFile),
}

impl BdevFile {
    /// Holds `file` (its descriptor is closed) or keeps it as it is.
    pub(super) fn new(file: LockedFile) -> Self {
        match HeldFile::hold(file.file()) {
            Some(held) => {
                // The lock belongs to the open file, which the holding ring keeps.
                file.close_keeping_lock();
                BdevFile::Held(held)
            }
            None => BdevFile::Descriptor(file),
        }
    }

    /// Runs `f` with a descriptor of the file (one made for the call if the file is held).
    pub(super) fn with_file<R>(&self, f: impl FnOnce(&File) -> R) -> std::io::Result<R> {
        match self {
            BdevFile::Descriptor(file) => Ok(f(file.file())),
            BdevFile::Held(held) => Ok(f(&held.descriptor()?)),
        }
    }
}

impl Drop for BdevFile {
    fn drop(&mut self) {
        // A `Descriptor` unlocks itself; a held file is unlocked through a descriptor made for
        // it, so that the next user finds it free at once (the kernel closes it a moment later).
        if let BdevFile::Held(held) = self {
            let unlocked = held.descriptor().and_then(|file| file_lock::unlock(&file));
            if let Err(err) = unlocked {
                tracing::warn!(%err, "unlocking a held file failed: it stays locked until the kernel closes it");
            }
        }
    }
}
