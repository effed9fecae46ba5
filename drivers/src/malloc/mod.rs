//! The malloc bdev: a RAM disk in DMA memory (hugepages when reserved). Requests are carried out
//! at submission and reported by the next poll, as a device's completions would be. Channels on
//! several reactors share the memory; stripe locks ([`StripeLocks`]) make every block's reads
//! and writes whole, as a disk's are. A bit per 4 KiB chunk (or block, when larger) says which
//! chunks were written, for allocation queries: the others read as zeroes.

mod chunks;
pub mod rpc;

use std::collections::VecDeque;
use std::sync::Arc;

use hugepages::{DmaRegion, RegionSlice};

use crate::in_place::{InPlaceRead, StripeLocks};
use crate::iostat::{counted_direct, IoStats};
use chunks::WrittenChunks;

use crate::bdev::{
    invalid, Bdev, BdevError, ChannelContext, Extent, Geometry, IoChannel, IoCompletion, IoError,
    IoOp, IoRequest, SubmitResult,
};

/// A RAM-backed bdev.
#[derive(Debug)]
pub struct MallocBdev {
    name: String,
    geometry: Geometry,
    mem: Arc<DmaRegion>,
    locks: Arc<StripeLocks>,
    written: Arc<WrittenChunks>,
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
            locks: Arc::new(StripeLocks::new(size)),
            written: Arc::new(WrittenChunks::new(size, u64::from(block_size.max(4096)))),
        })
    }
}

impl MallocBdev {
    fn channel(&self) -> MallocChannel {
        MallocChannel {
            geometry: self.geometry,
            mem: Arc::clone(&self.mem),
            locks: Arc::clone(&self.locks),
            written: Arc::clone(&self.written),
            done: VecDeque::new(),
        }
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
        Ok(Box::new(self.channel()))
    }

    fn open_counted_channel(
        &self,
        _ctx: &ChannelContext,
        stats: &Arc<IoStats>,
    ) -> Result<Box<dyn IoChannel>, BdevError> {
        Ok(counted_direct(self.channel(), stats))
    }

    /// Chunks never written (or zeroed whole since) read as zeroes; the memory is allocated
    /// and pinned, so none is a hole.
    fn allocation(&self, offset: u64, len: u64, out: &mut Vec<Extent>) -> Result<(), IoError> {
        self.written.extents(offset, len, out);
        Ok(())
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
    locks: Arc<StripeLocks>,
    written: Arc<WrittenChunks>,
    done: VecDeque<IoCompletion>,
}

impl MallocChannel {
    /// `len` bytes at `offset` as a region offset and length, if whole blocks on the device.
    fn in_range(&self, offset: u64, len: u64) -> Result<(usize, usize), IoError> {
        self.geometry.validate_range(offset, len)?;
        // Within the geometry, hence within the region, which is in memory.
        Ok((offset as usize, len as usize))
    }

    fn out_of_range(&self, offset: u64, len: u64) -> IoError {
        IoError::OutOfRange {
            offset,
            len,
            size: self.geometry.size(),
        }
    }

    fn execute(&self, req: &mut IoRequest) -> Result<(), IoError> {
        // Offsets were validated against the geometry, which is within the region.
        let mut offset = req.offset as usize;
        let _held = match req.op {
            IoOp::Read => Some(self.locks.read(req.offset, req.len)),
            IoOp::Write { .. } | IoOp::WriteZeroes { .. } | IoOp::Unmap => {
                Some(self.locks.write(req.offset, req.len))
            }
            IoOp::Flush => None,
        };
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
            IoOp::WriteZeroes { .. } | IoOp::Unmap => self.mem.zero_at(offset, req.len as usize),
            IoOp::Flush => Ok(()),
        };
        // Under the stripe locks still held, so overlapping requests mark in their order.
        match req.op {
            IoOp::Write { .. } if res.is_ok() => self.written.mark_written(req.offset, req.len),
            IoOp::WriteZeroes { .. } | IoOp::Unmap if res.is_ok() => {
                self.written.mark_zeroed(req.offset, req.len)
            }
            _ => {}
        }
        res.map_err(|_| self.out_of_range(req.offset, req.len))
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

    fn in_place(&self) -> bool {
        true
    }

    fn read_in_place(&mut self, offset: u64, len: u64) -> Option<Result<InPlaceRead, IoError>> {
        Some(self.in_range(offset, len).and_then(|(at, n)| {
            RegionSlice::new(Arc::clone(&self.mem), at, n)
                .map(|slice| InPlaceRead::new(slice, Arc::clone(&self.locks), offset))
                .map_err(|_| self.out_of_range(offset, len))
        }))
    }

    fn write_in_place(&mut self, offset: u64, data: &[u8]) -> Option<Result<(), IoError>> {
        let len = data.len() as u64;
        Some(self.in_range(offset, len).and_then(|(at, _)| {
            let _held = self.locks.write(offset, len);
            self.mem
                .write_streaming_at(at, data)
                .map_err(|_| self.out_of_range(offset, len))?;
            self.written.mark_written(offset, len);
            Ok(())
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bdev::IoBufs;
    use hugepages::BufferPool;

    #[test]
    fn in_place_reads_and_writes_meet_submitted_ones() {
        let bdev = MallocBdev::create("m", 1 << 20, 4096).expect("bdev");
        let mut ch = bdev
            .open_channel(&ChannelContext::default())
            .expect("channel");
        assert!(ch.in_place());
        let data: Vec<u8> = (0..8192u32).map(|i| (i * 7 + 1) as u8).collect();
        assert_eq!(ch.write_in_place(4096, &data), Some(Ok(())));
        // A submitted read sees what was written in place.
        let pool = BufferPool::new(8192, 1).expect("pool");
        let mut bufs = IoBufs::new();
        bufs.push(pool.get().expect("buffer"));
        ch.submit(IoRequest::read(4096, bufs, 1)).expect("submit");
        let mut out = Vec::new();
        ch.poll(&mut out);
        let done = out.pop().expect("completion");
        assert_eq!(done.result, Ok(()));
        assert_eq!(done.bufs[0].as_slice(), &data[..]);
        // A read in place holds the memory, not a copy: it sees a later write.
        let slice = ch
            .read_in_place(4096, 8192)
            .expect("memory")
            .expect("in range");
        let mut bufs = done.bufs;
        bufs[0].as_mut_slice().fill(0);
        slice.read_into(&mut bufs).expect("read");
        assert_eq!(bufs[0].as_slice(), &data[..]);
        assert_eq!(ch.write_in_place(8192, &[9u8; 4096]), Some(Ok(())));
        slice.read_into(&mut bufs).expect("read");
        assert!(bufs[0].as_slice()[4096..].iter().all(|&b| b == 9));
        assert_eq!(bufs[0].as_slice()[..4096], data[..4096]);
        // Bad ranges are refused like submitted requests.
        assert!(matches!(
            ch.read_in_place((1 << 20) - 4096, 8192),
            Some(Err(IoError::OutOfRange { .. }))
        ));
        assert!(matches!(
            ch.write_in_place(100, &data),
            Some(Err(IoError::Unaligned { .. }))
        ));
        assert!(matches!(
            ch.write_in_place(1 << 20, &data[..4096]),
            Some(Err(IoError::OutOfRange { .. }))
        ));
    }
}
