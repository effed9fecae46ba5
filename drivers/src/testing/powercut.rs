//! The power-cut bdev: a RAM disk with a volatile write cache, for crash tests. Writes are
//! visible at once but durable only after a flush (or when written with FUA). A simulated cut
//! keeps an arbitrary, seeded subset of the unflushed writes, applied in their order, and drops
//! the rest, as a device losing power with a write-back cache might (and as dm-log-writes
//! replays do). After the cut the device refuses every request, so the engine that used it can
//! change nothing more; [`PowerCutBdev::durable_copy`] gives the surviving content as a new
//! device to restart on.
//!
//! Devices that lose power together share a [`PowerSupply`]: switching it off stops all of them
//! at one instant, so the engine never sees one device dead while another still takes writes
//! (which a test thread stopping them one by one, preempted in between, would show it).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use crate::bdev::{
    push_extent, Allocation, Bdev, BdevError, ChannelContext, Extent, Geometry, IoChannel,
    IoCompletion, IoError, IoOp, IoRequest, SubmitResult, MAX_QUERY_EXTENTS,
};

struct Media {
    /// What reads see.
    current: Vec<u8>,
    /// What survives a cut.
    durable: Vec<u8>,
    /// Writes since the last flush, in order: (offset, data, written with FUA).
    unflushed: Vec<(u64, Vec<u8>, bool)>,
}

/// A power supply that one or more [`PowerCutBdev`]s run on.
#[derive(Debug, Clone, Default)]
pub struct PowerSupply(Arc<AtomicBool>);

impl PowerSupply {
    /// A supply that is on.
    pub fn new() -> Self {
        Self::default()
    }

    /// Switches the supply off: every device on it refuses every request from now on.
    pub fn off(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    fn is_off(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// A RAM disk whose writes are volatile until flushed.
pub struct PowerCutBdev {
    name: String,
    geometry: Geometry,
    media: Arc<Mutex<Media>>,
    supply: PowerSupply,
}

impl PowerCutBdev {
    /// A zeroed device of `blocks` blocks of `block_size` bytes.
    pub fn new(name: &str, block_size: u32, blocks: u64) -> Self {
        Self::with_content(
            name,
            block_size,
            vec![0; (blocks * block_size as u64) as usize],
        )
    }

    fn with_content(name: &str, block_size: u32, content: Vec<u8>) -> Self {
        let blocks = content.len() as u64 / block_size as u64;
        Self {
            name: name.to_string(),
            geometry: Geometry {
                block_size,
                num_blocks: blocks,
            },
            media: Arc::new(Mutex::new(Media {
                current: content.clone(),
                durable: content,
                unflushed: Vec::new(),
            })),
            supply: PowerSupply::new(),
        }
    }

    /// The same device, run on `supply` (shared with other devices) instead of its own.
    pub fn on_supply(mut self, supply: &PowerSupply) -> Self {
        self.supply = supply.clone();
        self
    }

    fn media(&self) -> std::sync::MutexGuard<'_, Media> {
        self.media.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Switches the device's supply off (and so every device sharing it): every request fails
    /// from now on. (Several devices losing power together share a supply, switched off before
    /// any of them is [`PowerCutBdev::cut`].)
    pub fn power_off(&self) {
        self.supply.off();
    }

    /// Cuts the power: each unflushed write survives when `keep(index)` says so (FUA writes
    /// always do); from now on every request fails. Returns (unflushed, kept).
    pub fn cut(&self, mut keep: impl FnMut(usize) -> bool) -> (usize, usize) {
        self.supply.off();
        let mut m = self.media();
        let writes = std::mem::take(&mut m.unflushed);
        let mut kept = 0;
        for (i, (off, data, fua)) in writes.iter().enumerate() {
            // FUA writes are already in `durable`; replaying the kept ones in order puts any
            // later overlapping write back on top.
            if *fua || keep(i) {
                let o = *off as usize;
                m.durable[o..o + data.len()].copy_from_slice(data);
                kept += 1;
            }
        }
        let durable = m.durable.clone();
        m.current = durable;
        (writes.len(), kept)
    }

    /// A new device (named `name`) holding what survived the cut.
    pub fn durable_copy(&self, name: &str) -> Self {
        let content = self.media().durable.clone();
        Self::with_content(name, self.geometry.block_size, content)
    }

    /// The content reads see now.
    pub fn content(&self) -> Vec<u8> {
        self.media().current.clone()
    }

    /// Runs `f` on what the device holds: what reads see, what survives a cut without any
    /// unflushed write, and the unflushed writes in order (offset, data, FUA). The device
    /// changes nothing meanwhile, so nesting calls over several devices sees them at one
    /// instant.
    pub fn inspect<R>(&self, f: impl FnOnce(&[u8], &[u8], &[(u64, Vec<u8>, bool)]) -> R) -> R {
        let m = self.media();
        f(&m.current, &m.durable, &m.unflushed)
    }

    /// Writes not yet flushed.
    pub fn unflushed(&self) -> usize {
        self.media().unflushed.len()
    }
}

impl Bdev for PowerCutBdev {
    fn name(&self) -> &str {
        &self.name
    }

    fn driver(&self) -> &'static str {
        "powercut"
    }

    fn geometry(&self) -> Geometry {
        self.geometry
    }

    fn open_channel(&self, _ctx: &ChannelContext) -> Result<Box<dyn IoChannel>, BdevError> {
        Ok(Box::new(PowerCutChannel {
            geometry: self.geometry,
            media: Arc::clone(&self.media),
            supply: self.supply.clone(),
            done: VecDeque::new(),
        }))
    }

    fn config(&self) -> serde_json::Value {
        serde_json::Value::Null
    }

    /// Blocks that read as zeroes are "zero", the others "data" (as a RAM disk knows them).
    fn allocation(&self, offset: u64, len: u64, out: &mut Vec<Extent>) -> Result<(), IoError> {
        let media = self.media.lock().unwrap_or_else(PoisonError::into_inner);
        let bs = u64::from(self.geometry.block_size);
        let end = offset.saturating_add(len).min(media.current.len() as u64);
        let first = out.len();
        let mut at = offset;
        while at < end && out.len() - first < MAX_QUERY_EXTENTS {
            let next = ((at / bs + 1) * bs).min(end);
            let zero = media.current[at as usize..next as usize]
                .iter()
                .all(|&b| b == 0);
            let state = if zero {
                Allocation::Zero
            } else {
                Allocation::Data
            };
            push_extent(out, next - at, state);
            at = next;
        }
        Ok(())
    }
}

struct PowerCutChannel {
    geometry: Geometry,
    media: Arc<Mutex<Media>>,
    supply: PowerSupply,
    done: VecDeque<IoCompletion>,
}

impl PowerCutChannel {
    fn run(&self, req: &mut IoRequest) -> Result<(), IoError> {
        let mut m = self.media.lock().unwrap_or_else(PoisonError::into_inner);
        // Checked under the media lock, which `cut` takes after switching the supply off: a
        // request either ran wholly before the power went or fails.
        if self.supply.is_off() {
            return Err(IoError::Device(libc::EIO));
        }
        let off = req.offset as usize;
        match req.op {
            IoOp::Read => {
                let mut at = off;
                for b in req.bufs.iter_mut() {
                    let n = b.len();
                    b.as_mut_slice().copy_from_slice(&m.current[at..at + n]);
                    at += n;
                }
            }
            IoOp::Write { fua } => {
                let mut data = Vec::with_capacity(req.len as usize);
                for b in req.bufs.iter() {
                    data.extend_from_slice(b.as_slice());
                }
                m.current[off..off + data.len()].copy_from_slice(&data);
                if fua {
                    m.durable[off..off + data.len()].copy_from_slice(&data);
                }
                m.unflushed.push((req.offset, data, fua));
            }
            IoOp::WriteZeroes { .. } | IoOp::Unmap => {
                let data = vec![0u8; req.len as usize];
                m.current[off..off + data.len()].copy_from_slice(&data);
                m.unflushed.push((req.offset, data, false));
            }
            IoOp::Flush => {
                let current = std::mem::take(&mut m.current);
                m.durable.copy_from_slice(&current);
                m.current = current;
                m.unflushed.clear();
            }
        }
        Ok(())
    }
}

impl IoChannel for PowerCutChannel {
    fn submit(&mut self, mut req: IoRequest) -> SubmitResult {
        if let Err(e) = self.geometry.validate(&req) {
            return crate::bdev::invalid(req, e);
        }
        let result = self.run(&mut req);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bdev::IoBufs;
    use hugepages::BufferPool;

    fn write(ch: &mut dyn IoChannel, pool: &BufferPool, off: u64, byte: u8, fua: bool) {
        let mut b = pool.get().unwrap();
        b.as_mut_slice().fill(byte);
        let mut bufs = IoBufs::new();
        bufs.push(b);
        let mut req = IoRequest::write(off, bufs, 0);
        req.op = IoOp::Write { fua };
        ch.submit(req).unwrap();
        let mut out = Vec::new();
        ch.poll(&mut out);
        assert!(out[0].result.is_ok());
    }

    #[test]
    fn a_cut_keeps_flushed_and_fua_writes_and_the_chosen_unflushed_ones() {
        let dev = PowerCutBdev::new("pc", 4096, 8);
        let pool = BufferPool::new(4096, 4).unwrap();
        let mut ch = dev
            .open_channel(&ChannelContext {
                wake_fd: None,
                fd_watch: None,
                queue_depth: 4,
            })
            .unwrap();
        write(ch.as_mut(), &pool, 0, 1, false);
        ch.submit(IoRequest::without_data(IoOp::Flush, 0, 0, 0))
            .unwrap();
        write(ch.as_mut(), &pool, 4096, 2, false); // dropped
        write(ch.as_mut(), &pool, 8192, 3, true); // FUA: kept
        write(ch.as_mut(), &pool, 12288, 4, false); // kept
        write(ch.as_mut(), &pool, 0, 5, false); // dropped
        assert_eq!(dev.unflushed(), 4);
        let (unflushed, kept) = dev.cut(|i| i == 2);
        assert_eq!((unflushed, kept), (4, 2));
        let c = dev.durable_copy("after").content();
        assert!(c[..4096].iter().all(|&b| b == 1));
        assert!(c[4096..8192].iter().all(|&b| b == 0));
        assert!(c[8192..12288].iter().all(|&b| b == 3));
        assert!(c[12288..16384].iter().all(|&b| b == 4));
        // The cut device refuses everything.
        let mut bufs = IoBufs::new();
        bufs.push(pool.get().unwrap());
        ch.submit(IoRequest::read(0, bufs, 9)).unwrap();
        let mut out = Vec::new();
        ch.poll(&mut out);
        assert!(matches!(out[0].result, Err(IoError::Device(_))));
    }

    #[test]
    fn devices_on_one_supply_stop_together_and_a_device_alone_does_not() {
        let supply = PowerSupply::new();
        let devs = ["a", "b"].map(|n| PowerCutBdev::new(n, 4096, 2).on_supply(&supply));
        let alone = PowerCutBdev::new("c", 4096, 2);
        let pool = BufferPool::new(4096, 4).unwrap();
        let ctx = ChannelContext {
            wake_fd: None,
            fd_watch: None,
            queue_depth: 4,
        };
        let mut chans: Vec<_> = [&devs[0], &devs[1], &alone]
            .iter()
            .map(|d| d.open_channel(&ctx).unwrap())
            .collect();
        devs[0].power_off();
        let mut results = Vec::new();
        for ch in chans.iter_mut() {
            let mut bufs = IoBufs::new();
            bufs.push(pool.get().unwrap());
            ch.submit(IoRequest::read(0, bufs, 0)).unwrap();
            let mut out = Vec::new();
            ch.poll(&mut out);
            results.push(out.remove(0).result.is_ok());
        }
        assert_eq!(results, [false, false, true]);
    }
}
