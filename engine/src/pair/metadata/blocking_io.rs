//! Synchronous metadata I/O from a control thread, before the pair serves.

use std::sync::OnceLock;

use super::*;

/// Synchronous I/O on a bdev from a control thread, through a channel of its own: used to
/// initialise and load metadata before the pair serves.
pub(crate) struct BlockingIo {
    ch: Box<dyn IoChannel>,
    /// Made only when the shared buffers run short.
    own_pool: Option<BufferPool>,
    done: Vec<IoCompletion>,
}

/// Buffers kept for blocking metadata I/O (pair creation and loading, the split journal's
/// scan): making a DMA region for each use (map, lock, zero, unmap) cost more than the I/O.
const SHARED_BUFFERS: usize = 512;

fn shared_pool() -> Option<&'static BufferPool> {
    static POOL: OnceLock<Option<BufferPool>> = OnceLock::new();
    POOL.get_or_init(|| BufferPool::new(BLOCK as usize, SHARED_BUFFERS).ok())
        .as_ref()
}

/// Pages moved per request when reading or writing whole maps.
pub(crate) const PAGES_PER_IO: usize = 64;
const IO_TIMEOUT: Duration = Duration::from_secs(60);

impl BlockingIo {
    pub(crate) fn open(bdev: &Arc<dyn Bdev>) -> Result<Self, MetaError> {
        let ch = bdev
            .open_channel(&ChannelContext {
                wake_fd: None,
                fd_watch: None,
                queue_depth: 8,
            })
            .map_err(|e| MetaError::Io(e.to_string()))?;
        Ok(Self {
            ch,
            own_pool: None,
            done: Vec::new(),
        })
    }

    pub(crate) fn run(&mut self, req: IoRequest) -> Result<IoBufs, MetaError> {
        if let Err(e) = self.ch.submit(req) {
            return Err(MetaError::Io(format!("refused: {:?}", e.error)));
        }
        let end = Instant::now() + IO_TIMEOUT;
        loop {
            self.ch.poll(&mut self.done);
            if let Some(c) = self.done.pop() {
                return match c.result {
                    Ok(()) => Ok(c.bufs),
                    Err(e) => Err(MetaError::Io(e.to_string())),
                };
            }
            if Instant::now() > end {
                return Err(MetaError::Io("no completion within 60 s".into()));
            }
            std::thread::sleep(Duration::from_micros(20));
        }
    }

    pub(crate) fn bufs(&mut self, n: usize) -> Result<IoBufs, MetaError> {
        if let Some(shared) = shared_pool() {
            let bufs: IoBufs = (0..n).map_while(|_| shared.get()).collect();
            if bufs.len() == n {
                return Ok(bufs);
            }
        }
        // Many at once: this one makes its own.
        let pool = match &mut self.own_pool {
            Some(pool) => pool,
            None => self.own_pool.insert(
                BufferPool::new(BLOCK as usize, PAGES_PER_IO)
                    .map_err(|e| MetaError::Io(e.to_string()))?,
            ),
        };
        (0..n)
            .map(|_| {
                pool.get()
                    .ok_or_else(|| MetaError::Io("no buffer for metadata I/O".into()))
            })
            .collect()
    }

    /// Writes `blocks` (of [`BLOCK`] bytes at most each) from `offset`, [`PAGES_PER_IO`] to a
    /// request.
    pub(crate) fn write(&mut self, offset: u64, blocks: &[&[u8]]) -> Result<(), MetaError> {
        for (i, chunk) in blocks.chunks(PAGES_PER_IO).enumerate() {
            let mut bufs = self.bufs(chunk.len())?;
            for (b, data) in bufs.iter_mut().zip(chunk) {
                b.as_mut_slice()[..data.len()].copy_from_slice(data);
            }
            let at = offset + (i * PAGES_PER_IO) as u64 * BLOCK;
            self.run(IoRequest::write(at, bufs, 0))?;
        }
        Ok(())
    }

    /// Reads `len` bytes (whole blocks) from `offset`, [`PAGES_PER_IO`] blocks to a request.
    pub(crate) fn read(&mut self, offset: u64, len: usize) -> Result<Vec<u8>, MetaError> {
        let mut out = Vec::with_capacity(len);
        let blocks = len.div_ceil(BLOCK as usize);
        let mut done = 0;
        while done < blocks {
            let n = (blocks - done).min(PAGES_PER_IO);
            let bufs = self.bufs(n)?;
            let at = offset + done as u64 * BLOCK;
            let bufs = self.run(IoRequest::read(at, bufs, 0))?;
            out.extend(bufs.iter().flat_map(|b| b.as_slice().to_vec()));
            done += n;
        }
        Ok(out)
    }

    pub(crate) fn flush(&mut self) -> Result<(), MetaError> {
        self.run(IoRequest::without_data(IoOp::Flush, 0, 0, 0))
            .map(|_| ())
    }

    pub(crate) fn read_map(
        &mut self,
        layout: &Layout,
        map: MapKind,
    ) -> Result<Vec<u64>, MetaError> {
        let mut words = vec![0u64; layout.words() as usize];
        let mut page = 0;
        while page < layout.pages_per_map {
            let n = (layout.pages_per_map - page).min(PAGES_PER_IO as u64);
            let bytes = self.read(layout.page_offset(map, page), (n * BLOCK) as usize)?;
            for (i, p) in (page..page + n).enumerate() {
                decode_page(
                    map,
                    p,
                    &bytes[i * BLOCK as usize..(i + 1) * BLOCK as usize],
                    &mut words[layout.page_words(p)],
                )
                .map_err(MetaError::Corrupt)?;
            }
            page += n;
        }
        // Bits past the last track are never trusted.
        let tracks = layout.tracks;
        for (w, v) in words.iter_mut().enumerate() {
            let first = w as u64 * 64;
            if first >= tracks {
                *v = 0;
            } else if first + 64 > tracks {
                *v &= (1u64 << (tracks - first)) - 1;
            }
        }
        Ok(words)
    }
}

/// Blocks written in order from offset 0, a request's worth at a time (a new pair's
/// metadata, without holding all of it in memory).
pub(crate) struct Image<'a> {
    io: &'a mut BlockingIo,
    blocks: Vec<Vec<u8>>,
    /// Blocks written so far.
    written: u64,
}

impl<'a> Image<'a> {
    pub(crate) fn new(io: &'a mut BlockingIo) -> Self {
        Self {
            io,
            blocks: Vec::with_capacity(PAGES_PER_IO),
            written: 0,
        }
    }

    /// The byte offset of the next block.
    pub(crate) fn offset(&self) -> u64 {
        (self.written + self.blocks.len() as u64) * BLOCK
    }

    /// The next block, zeroed, for the caller to fill; the blocks before it go out once a
    /// request's worth is ready.
    pub(crate) fn next_block(&mut self) -> Result<&mut [u8], MetaError> {
        if self.blocks.len() == PAGES_PER_IO {
            self.write_out()?;
        }
        self.blocks.push(vec![0u8; BLOCK as usize]);
        let last = self.blocks.len() - 1;
        Ok(self.blocks[last].as_mut_slice())
    }

    /// Writes what is left.
    pub(crate) fn finish(mut self) -> Result<(), MetaError> {
        self.write_out()
    }

    fn write_out(&mut self) -> Result<(), MetaError> {
        if self.blocks.is_empty() {
            return Ok(());
        }
        let refs: Vec<&[u8]> = self.blocks.iter().map(Vec::as_slice).collect();
        self.io.write(self.written * BLOCK, &refs)?;
        self.written += self.blocks.len() as u64;
        self.blocks.clear();
        Ok(())
    }
}
