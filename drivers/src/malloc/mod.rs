//! The malloc bdev: a RAM disk in DMA memory (hugepages when reserved). Requests are carried out
//! at submission and reported by the next poll, as a device's completions would be.

pub mod rpc;

use std::collections::VecDeque;
use std::sync::Arc;

use hugepages::DmaRegion;

use crate::bdev::{
    invalid, Bdev, BdevError, ChannelContext, Geometry, IoChannel, IoCompletion, IoError, IoOp,
    IoRequest, SubmitResult,
};

/// A RAM-backed bdev.
#[derive(Debug)]
pub struct MallocBdev {
    name: String,
    geometry: Geometry,
    mem: Arc<DmaRegion>,
}

impl MallocBdev {
    /// Creates a malloc bdev of `size` bytes (a non-zero multiple of `block_size`).
    pub fn create(name: &str, size: u64, block_size: u32) -> Result<Self, BdevError> {
        let geometry = crate::check_geometry(size, block_size)?;
        let len = usize::try_from(size)
            .map_err(|_| BdevError::Invalid(format!("size {size} does not fit in memory")))?;
        // A RAM disk larger than the memory the kernel can give would be faulted in until the
        // OOM killer ends the engine: refuse it up front.
        if let Some(avail) = available_memory() {
            if size > avail {
                return Err(BdevError::Invalid(format!(
                    "size {size} exceeds the available memory ({avail} bytes)"
                )));
            }
        }
        let mem = Arc::new(DmaRegion::allocate(len)?);
        Ok(Self {
            name: name.to_string(),
            geometry,
            mem,
        })
    }
}

/// `MemAvailable` of /proc/meminfo, in bytes.
fn available_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

impl Bdev for MallocBdev {
    fn name(&self) -> &str {
        &self.name
    }

    fn driver(&self) -> &'static str {
        "malloc"
    }

    fn geometry(&self) -> Geometry {
        self.geometry
    }

    fn open_channel(&self, _ctx: &ChannelContext) -> Result<Box<dyn IoChannel>, BdevError> {
        Ok(Box::new(MallocChannel {
            geometry: self.geometry,
            mem: Arc::clone(&self.mem),
            done: VecDeque::new(),
        }))
    }

    fn config(&self) -> serde_json::Value {
        serde_json::json!({
            "method": "bdev_malloc_create",
            "params": {
                "name": self.name,
                "size": self.geometry.size(),
                "block_size": self.geometry.block_size,
            }
        })
    }
}

struct MallocChannel {
    geometry: Geometry,
    mem: Arc<DmaRegion>,
    done: VecDeque<IoCompletion>,
}

impl MallocChannel {
    fn execute(&self, req: &mut IoRequest) -> Result<(), IoError> {
        // Offsets were validated against the geometry, which is within the region.
        let mut offset = req.offset as usize;
        let res = match req.op {
            IoOp::Read => req.bufs.iter_mut().try_for_each(|b| {
                let r = self.mem.read_at(offset, b.as_mut_slice());
                offset += b.len();
                r
            }),
            IoOp::Write { .. } => req.bufs.iter().try_for_each(|b| {
                let r = self.mem.write_streaming_at(offset, b.as_slice());
                offset += b.len();
                r
            }),
            IoOp::WriteZeroes | IoOp::Unmap => self.mem.zero_at(offset, req.len as usize),
            IoOp::Flush => Ok(()),
        };
        res.map_err(|_| IoError::OutOfRange {
            offset: req.offset,
            len: req.len,
            size: self.geometry.size(),
        })
    }
}

impl IoChannel for MallocChannel {
    fn submit(&mut self, mut req: IoRequest) -> SubmitResult {
        if let Err(e) = self.geometry.validate(&req) {
            return invalid(req, e);
        }
        let result = self.execute(&mut req);
        self.done.push_back(IoCompletion {
            tag: req.tag,
            result,
            bufs: req.bufs,
        });
        Ok(())
    }

    fn poll(&mut self, out: &mut Vec<IoCompletion>) -> usize {
        let n = self.done.len();
        out.extend(self.done.drain(..));
        n
    }

    fn in_flight(&self) -> usize {
        self.done.len()
    }
}
