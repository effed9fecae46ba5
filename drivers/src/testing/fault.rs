//! The fault bdev: a wrapper that delays requests and injects I/O errors, for tests and fault
//! drills. Delays hold each request for a random number of polls before it reaches the inner
//! device and again before its completion is reported, so a write lands at a random moment
//! between its submission and its completion, as on a real device.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use crate::bdev::{
    Bdev, BdevError, ChannelContext, Extent, Geometry, IoChannel, IoCompletion, IoError, IoOp,
    IoRequest, SubmitErrorKind, SubmitResult,
};

/// What to inject; shared by every channel of the bdev and changeable while it runs.
#[derive(Debug, Default)]
pub struct FaultConfig {
    /// Each request waits up to this many polls before submission and before completion.
    pub max_delay_polls: AtomicU32,
    /// Fail reads with `errno` while set.
    pub fail_reads: AtomicBool,
    /// Fail writes (and write-zeroes, unmap) with `errno` while set.
    pub fail_writes: AtomicBool,
    /// The errno of injected failures (EIO when 0).
    pub errno: AtomicI32,
    /// Requests failed so far.
    pub injected: AtomicU64,
}

impl FaultConfig {
    fn errno(&self) -> i32 {
        match self.errno.load(Ordering::Relaxed) {
            0 => libc::EIO,
            e => e,
        }
    }
}

/// A bdev wrapping another with delays and injected errors.
pub struct FaultBdev {
    name: String,
    inner: Arc<dyn Bdev>,
    config: Arc<FaultConfig>,
    seed: AtomicU64,
}

impl FaultBdev {
    /// Wraps `inner` under a new name.
    pub fn new(name: &str, inner: Arc<dyn Bdev>, config: Arc<FaultConfig>) -> Self {
        Self {
            name: name.to_string(),
            inner,
            config,
            seed: AtomicU64::new(0x9e37_79b9_7f4a_7c15),
        }
    }

    /// The shared fault settings.
    pub fn config(&self) -> &Arc<FaultConfig> {
        &self.config
    }
}

impl Bdev for FaultBdev {
    fn name(&self) -> &str {
        &self.name
    }

    fn driver(&self) -> &'static str {
        "fault"
    }

    fn geometry(&self) -> Geometry {
        self.inner.geometry()
    }

    fn open_channel(&self, ctx: &ChannelContext) -> Result<Box<dyn IoChannel>, BdevError> {
        let seed = self
            .seed
            .fetch_add(0x2545_f491_4f6c_dd1d, Ordering::Relaxed);
        Ok(Box::new(FaultChannel {
            geometry: self.inner.geometry(),
            inner: self.inner.open_channel(ctx)?,
            config: Arc::clone(&self.config),
            rng: seed | 1,
            to_submit: VecDeque::new(),
            to_complete: VecDeque::new(),
            scratch: Vec::new(),
        }))
    }

    fn config(&self) -> serde_json::Value {
        serde_json::Value::Null
    }

    /// The inner device's answer, what a read of it now would see (injected errors are for
    /// the I/O requests).
    fn allocation(&self, offset: u64, len: u64, out: &mut Vec<Extent>) -> Result<(), IoError> {
        self.inner.allocation(offset, len, out)
    }
}

struct FaultChannel {
    geometry: Geometry,
    inner: Box<dyn IoChannel>,
    config: Arc<FaultConfig>,
    rng: u64,
    to_submit: VecDeque<(u32, IoRequest)>,
    to_complete: VecDeque<(u32, IoCompletion)>,
    scratch: Vec<IoCompletion>,
}

impl FaultChannel {
    fn delay(&mut self) -> u32 {
        let max = self.config.max_delay_polls.load(Ordering::Relaxed);
        if max == 0 {
            return 0;
        }
        // xorshift64
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng % (max as u64 + 1)) as u32
    }

    fn injected_error(&self, op: IoOp) -> Option<IoError> {
        let fail = match op {
            IoOp::Read => self.config.fail_reads.load(Ordering::Relaxed),
            IoOp::Flush => false,
            _ => self.config.fail_writes.load(Ordering::Relaxed),
        };
        fail.then(|| {
            self.config.injected.fetch_add(1, Ordering::Relaxed);
            IoError::Device(self.config.errno())
        })
    }
}

impl IoChannel for FaultChannel {
    fn submit(&mut self, req: IoRequest) -> SubmitResult {
        if let Err(e) = self.geometry.validate(&req) {
            return crate::bdev::invalid(req, e);
        }
        let d = self.delay();
        self.to_submit.push_back((d, req));
        Ok(())
    }

    fn poll(&mut self, out: &mut Vec<IoCompletion>) -> usize {
        // Requests whose delay ran out go to the inner device (or fail, when injecting).
        for _ in 0..self.to_submit.len() {
            let Some((d, req)) = self.to_submit.pop_front() else {
                break;
            };
            if d > 0 {
                self.to_submit.push_back((d - 1, req));
                continue;
            }
            if let Some(err) = self.injected_error(req.op) {
                let d = self.delay();
                self.to_complete.push_back((
                    d,
                    IoCompletion {
                        tag: req.tag,
                        result: Err(err),
                        bufs: req.bufs,
                    },
                ));
                continue;
            }
            if let Err(e) = self.inner.submit(req) {
                let e = *e;
                match e.error {
                    SubmitErrorKind::QueueFull => self.to_submit.push_back((0, e.req)),
                    SubmitErrorKind::Invalid(err) => self.to_complete.push_back((
                        0,
                        IoCompletion {
                            tag: e.req.tag,
                            result: Err(err),
                            bufs: e.req.bufs,
                        },
                    )),
                }
            }
        }
        let mut scratch = std::mem::take(&mut self.scratch);
        self.inner.poll(&mut scratch);
        for c in scratch.drain(..) {
            let d = self.delay();
            self.to_complete.push_back((d, c));
        }
        self.scratch = scratch;
        let mut n = 0;
        for _ in 0..self.to_complete.len() {
            let Some((d, c)) = self.to_complete.pop_front() else {
                break;
            };
            if d > 0 {
                self.to_complete.push_back((d - 1, c));
            } else {
                out.push(c);
                n += 1;
            }
        }
        n
    }

    fn in_flight(&self) -> usize {
        self.to_submit.len() + self.to_complete.len() + self.inner.in_flight()
    }
}
