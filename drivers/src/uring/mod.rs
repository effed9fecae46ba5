//! The uring bdev: a file or block device driven through io_uring, one ring per reactor shared
//! by all its uring bdevs.
//!
//! Files are opened with O_DIRECT where the file system allows it (tmpfs does not), once per
//! bdev: the reactors' rings hold them in their fixed-file tables, and where the kernel can make
//! a descriptor from a fixed file again the bdev holds its file without one ([`held`]), so the
//! number of volumes is not bounded by the open file limit. DMA regions are registered as
//! fixed buffers so single-buffer requests skip the kernel's page pinning, and the ring signals
//! the reactor's eventfd so an idle reactor can park. Every file is locked for writing as soon as
//! it is open, before it is emptied or extended ([`LockedFile`]), and stays locked as long as
//! the bdev or one of its channels lives.
//!
//! Write-zeroes is a punched hole where it may deallocate and `fallocate(ZERO_RANGE)` where it
//! may not (each the other where the file system lacks it), and unmap a punched hole, so a
//! sparse file stays sparse; allocation queries report its holes with
//! `lseek(SEEK_DATA/SEEK_HOLE)`.

mod allocation;
mod held;
pub mod rpc;
mod sys;

pub use held::{file_holding_supported, set_file_holding};

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;

use crate::bdev::{
    invalid, Bdev, BdevError, ChannelContext, Extent, Geometry, IoChannel, IoCompletion, IoError,
    IoRequest, SubmitResult,
};
use crate::file_lock::{Access, LockedFile};
use held::BdevFile;

/// A bdev over a file or block device.
#[derive(Debug)]
pub struct UringBdev {
    name: String,
    path: PathBuf,
    /// Held by the bdev and each of its channels; unlocked when the last of them goes.
    file: Arc<BdevFile>,
    geometry: Geometry,
    direct: bool,
}

impl UringBdev {
    /// Opens `path` (creating a regular file if it does not exist). With `size`, a regular file
    /// is extended to at least that size; the bdev spans the whole file or device.
    pub fn open(
        name: &str,
        path: &Path,
        block_size: u32,
        size: Option<u64>,
    ) -> Result<Self, BdevError> {
        Self::open_with(name, path, block_size, size, true, false)
    }

    /// Like [`UringBdev::open`], choosing whether to try O_DIRECT and whether to empty an
    /// existing regular file first (backup targets start from nothing).
    pub fn open_with(
        name: &str,
        path: &Path,
        block_size: u32,
        size: Option<u64>,
        try_direct: bool,
        truncate: bool,
    ) -> Result<Self, BdevError> {
        let (file, direct) = open_file(path, try_direct)?;
        let file = LockedFile::lock(file, path, Access::Write)?;
        let file_ref = file.file();
        if truncate
            && file_ref
                .metadata()
                .map(|m| m.file_type().is_file())
                .unwrap_or(false)
        {
            file_ref
                .set_len(0)
                .map_err(|e| BdevError::io(format!("truncate {}", path.display()), e))?;
        }
        let meta = file_ref
            .metadata()
            .map_err(|e| BdevError::io(format!("stat {}", path.display()), e))?;
        let mut len = device_len(file_ref, path)?;
        if let Some(size) = size {
            if size > len {
                if meta.file_type().is_block_device() {
                    return Err(BdevError::Invalid(format!(
                        "size {size} is larger than the block device {} ({len} bytes)",
                        path.display()
                    )));
                }
                file_ref
                    .set_len(size)
                    .map_err(|e| BdevError::io(format!("extend {}", path.display()), e))?;
                len = size;
            }
        }
        let usable = len - len % block_size.max(1) as u64;
        let geometry = crate::check_geometry(usable, block_size)?;
        // A fact about the file system, not a fault: tmpfs and some others refuse O_DIRECT.
        // Files opened buffered on purpose (pair metadata, backup targets) say nothing.
        if try_direct && !direct {
            tracing::info!(
                bdev = name,
                path = %path.display(),
                "the file system of this file does not support O_DIRECT: its I/O goes through \
                 the page cache"
            );
        }
        Ok(Self {
            name: name.to_string(),
            path: path.to_path_buf(),
            file: Arc::new(BdevFile::new(file)),
            geometry,
            direct,
        })
    }

    /// True when the file was opened with O_DIRECT.
    pub fn is_direct(&self) -> bool {
        self.direct
    }
}

fn open_file(path: &Path, try_direct: bool) -> Result<(File, bool), BdevError> {
    let mut opts = OpenOptions::new();
    opts.read(true).write(true).create(true).truncate(false);
    if !try_direct {
        return opts
            .open(path)
            .map(|f| (f, false))
            .map_err(|e| BdevError::io(format!("open {}", path.display()), e));
    }
    let direct = opts.clone().custom_flags(libc::O_DIRECT).open(path);
    match direct {
        Ok(f) => Ok((f, true)),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => opts
            .open(path)
            .map(|f| (f, false))
            .map_err(|e| BdevError::io(format!("open {}", path.display()), e)),
        Err(e) => Err(BdevError::io(format!("open {}", path.display()), e)),
    }
}

fn device_len(file: &File, path: &Path) -> Result<u64, BdevError> {
    // Seeking to the end gives the size of block devices as well as of regular files.
    let mut f = file;
    f.seek(SeekFrom::End(0))
        .map_err(|e| BdevError::io(format!("size of {}", path.display()), e))
}

impl Bdev for UringBdev {
    fn name(&self) -> &str {
        &self.name
    }

    fn driver(&self) -> &'static str {
        "uring"
    }

    fn geometry(&self) -> Geometry {
        self.geometry
    }

    fn open_channel(&self, ctx: &ChannelContext) -> Result<Box<dyn IoChannel>, BdevError> {
        let ring = sys::SharedRing::for_thread(ctx.wake_fd)
            .map_err(|e| BdevError::io(format!("io_uring for {}", self.name), e))?;
        let depth = ctx.queue_depth.clamp(32, 4096) as usize;
        let key = ring
            .open_channel(&self.file, depth)
            .map_err(|e| BdevError::io(format!("opening {} on io_uring", self.name), e))?;
        Ok(Box::new(UringChannel {
            geometry: self.geometry,
            ring,
            key,
            _file: Arc::clone(&self.file),
        }))
    }

    fn backing_file(&self) -> Option<&Path> {
        Some(&self.path)
    }

    /// The file's holes read as zeroes: `lseek` finds them (a block device is all data).
    fn allocation(&self, offset: u64, len: u64, out: &mut Vec<Extent>) -> Result<(), IoError> {
        let block = self.geometry.block_size as u64;
        self.file
            .with_file(|file| allocation::file_extents(file, offset, len, block, out))
            .map_err(|e| IoError::Device(e.raw_os_error().unwrap_or(libc::EIO)))
    }

    fn config(&self) -> serde_json::Value {
        serde_json::json!({
            "method": "bdev_uring_create",
            "params": {
                "name": self.name,
                "filename": self.path,
                "block_size": self.geometry.block_size,
                "size": self.geometry.size(),
            }
        })
    }
}

struct UringChannel {
    geometry: Geometry,
    ring: Rc<sys::SharedRing>,
    key: sys::ChannelKey,
    /// Keeps the file open (and locked) while the channel lives.
    _file: Arc<BdevFile>,
}

impl Drop for UringChannel {
    fn drop(&mut self) {
        self.ring.close_channel(self.key);
    }
}

impl IoChannel for UringChannel {
    fn submit(&mut self, req: IoRequest) -> SubmitResult {
        if let Err(e) = self.geometry.validate(&req) {
            return invalid(req, e);
        }
        self.ring.push(self.key, req)
    }

    fn poll(&mut self, out: &mut Vec<IoCompletion>) -> usize {
        self.ring.reap(self.key, out)
    }

    fn in_flight(&self) -> usize {
        self.ring.in_flight(self.key)
    }
}

/// Maps a negative io_uring result to the request's error.
fn errno_error(res: i32) -> IoError {
    IoError::Device(-res)
}
