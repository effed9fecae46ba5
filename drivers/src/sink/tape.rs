//! The tape target: the backup as a pax archive (see [`crate::tape`]) in a file standing for a
//! tape. The prologue puts the image data on a record boundary, so the image is written straight
//! from the backup's DMA buffers; only the archive's own headers and manifests are built in
//! memory. The archive is written as `PATH.partial` and renamed to `PATH` only once the final
//! manifest and the end marks are written and flushed (see [`super::partial`]): a cancelled or
//! failed backup leaves nothing under the final name, so GNU tar never sees half an archive.

use std::fs::OpenOptions;
use std::ops::Range;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use hugepages::{BufferPool, DmaBuf};

use super::partial::PartialFile;
use super::{Sink, SinkDone, SinkFull};
use crate::bdev::{Bdev, ChannelContext, IoChannel, IoCompletion, IoError, IoOp, IoRequest};
use crate::tape::{self, Layout, Manifest};
use crate::uring::UringBdev;
use crate::{IoBufs, SubmitErrorKind};

const PROLOGUE_TAG: u64 = u64::MAX;
const EPILOGUE_TAG: u64 = u64::MAX - 1;
const FLUSH_TAG: u64 = u64::MAX - 2;

/// A tape-archive target.
pub struct TapeSink {
    path: PathBuf,
    partial: PartialFile,
    record_size: usize,
    mtime: u64,
    prologue_len: u64,
    /// The ranges of the image the archive stores, back to back after the prologue.
    layout: Layout,
    channel: Box<dyn IoChannel>,
    scratch: Vec<IoCompletion>,
    meta_inflight: usize,
    stage: Stage,
    failed: Option<IoError>,
    finished: Option<Result<(), IoError>>,
    archive_len: u64,
}

#[derive(PartialEq, Eq)]
enum Stage {
    Data,
    Epilogue,
    Flush,
    Done,
}

/// Copies archive metadata (headers, manifests: never image data) into a DMA buffer.
fn meta_buf(bytes: &[u8]) -> Result<IoBufs, String> {
    let len = bytes.len().max(1).next_multiple_of(4096);
    let pool = BufferPool::new(len, 1).map_err(|e| e.to_string())?;
    let mut b: DmaBuf = pool.get().ok_or("no DMA buffer for archive metadata")?;
    b.set_len(bytes.len()).map_err(|e| e.to_string())?;
    b.as_mut_slice().copy_from_slice(bytes);
    let mut v = IoBufs::new();
    v.push(b);
    Ok(v)
}

impl TapeSink {
    /// Opens the archive's partial file and writes the prologue (initial manifest, headers).
    /// `stored` are the ranges of the image the archive holds (sorted, disjoint, each starting
    /// on a [`tape::CHUNK_SIZE`] boundary): the job submits exactly those bytes, in order. When
    /// they are not the whole image, `volume.img` is a sparse member holding them back to back.
    pub fn open(
        path: &Path,
        initial: &Manifest,
        record_size: usize,
        stored: &[Range<u64>],
        ctx: &ChannelContext,
    ) -> Result<Self, String> {
        let layout = Layout::new(initial.volume_size, stored)?;
        if let Ok(m) = std::fs::metadata(path) {
            let ft = m.file_type();
            if ft.is_char_device() || ft.is_fifo() {
                return Err(format!(
                    "{}: a tape device or pipe is written by the tape device target",
                    path.display()
                ));
            }
        }
        let mtime = initial.created_at_ns / 1_000_000_000;
        let prologue =
            tape::prologue(initial, &layout, record_size, mtime).map_err(|e| e.to_string())?;
        let prologue_len = prologue.len() as u64;
        // Room for the stored data and a generous epilogue; the file is cut to the archive's
        // exact length once the epilogue is written.
        let epilogue_bound = 8192 + layout.stored_chunks() * 12 + 2 * record_size as u64;
        let capacity =
            (prologue_len + layout.stored_bytes() + epilogue_bound).next_multiple_of(512);
        let partial = PartialFile::new(path)?;
        let bdev = UringBdev::open_with(
            "backup-tape",
            partial.partial(),
            512,
            Some(capacity),
            false,
            true,
        )
        .map_err(|e| e.to_string())?;
        let mut channel = bdev.open_channel(ctx).map_err(|e| e.to_string())?;
        let bufs = meta_buf(&prologue)?;
        channel
            .submit(IoRequest::write(0, bufs, PROLOGUE_TAG))
            .map_err(|e| format!("writing the archive prologue: {:?}", e.error))?;
        Ok(Self {
            path: path.to_path_buf(),
            partial,
            record_size,
            mtime,
            prologue_len,
            layout,
            channel,
            scratch: Vec::new(),
            meta_inflight: 1,
            stage: Stage::Data,
            failed: None,
            finished: None,
            archive_len: 0,
        })
    }

    fn submit_meta(&mut self, req: IoRequest) -> Result<(), IoError> {
        self.channel.submit(req).map_err(|e| match e.error {
            SubmitErrorKind::Invalid(err) => err,
            SubmitErrorKind::QueueFull => IoError::Device(libc::EAGAIN),
        })?;
        self.meta_inflight += 1;
        Ok(())
    }

    fn fail(&mut self, e: IoError) {
        self.failed.get_or_insert(e.clone());
        if self.stage != Stage::Data && self.finished.is_none() {
            self.finished = Some(Err(e));
        }
    }
}

impl Sink for TapeSink {
    fn submit(&mut self, offset: u64, bufs: IoBufs) -> Result<(), SinkFull> {
        if let Some(e) = &self.failed {
            return Err(SinkFull::Failed(e.clone(), bufs));
        }
        let len: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        // The piece must lie in one stored range: its bytes are then contiguous in the archive.
        let at = match self.layout.data_offset(offset) {
            Some(at)
                if self.layout.data_offset(offset + len.max(1) - 1)
                    == Some(at + len.max(1) - 1) =>
            {
                at
            }
            _ => {
                let why = format!(
                    "image bytes {offset}..{} are not within one stored range of the archive",
                    offset + len
                );
                return Err(SinkFull::Failed(IoError::Refused(why), bufs));
            }
        };
        super::submit_write(self.channel.as_mut(), self.prologue_len + at, bufs, offset)
    }

    fn poll(&mut self, out: &mut Vec<SinkDone>) {
        self.channel.poll(&mut self.scratch);
        let done: Vec<IoCompletion> = self.scratch.drain(..).collect();
        for c in done {
            match c.tag {
                PROLOGUE_TAG | EPILOGUE_TAG | FLUSH_TAG => {
                    self.meta_inflight -= 1;
                    if let Err(e) = c.result {
                        self.fail(e);
                        continue;
                    }
                    if c.tag == EPILOGUE_TAG {
                        // Cut the file to the archive's length, then make it durable.
                        let cut = OpenOptions::new()
                            .write(true)
                            .open(self.partial.partial())
                            .and_then(|f| f.set_len(self.archive_len));
                        if let Err(e) = cut {
                            self.fail(IoError::Device(e.raw_os_error().unwrap_or(libc::EIO)));
                            continue;
                        }
                        self.stage = Stage::Flush;
                        if let Err(e) =
                            self.submit_meta(IoRequest::without_data(IoOp::Flush, 0, 0, FLUSH_TAG))
                        {
                            self.fail(e);
                        }
                    } else if c.tag == FLUSH_TAG {
                        self.partial.commit();
                    }
                }
                offset => {
                    if let Err(e) = &c.result {
                        self.failed.get_or_insert(e.clone());
                    }
                    let len = c.bufs.iter().map(|b| b.len() as u64).sum();
                    out.push(SinkDone {
                        offset,
                        len,
                        bufs: c.bufs,
                        result: c.result,
                    });
                }
            }
        }
        match self.partial.committed() {
            Some(Ok(())) => {
                self.stage = Stage::Done;
                self.finished = Some(Ok(()));
            }
            Some(Err(e)) => self.fail(IoError::Refused(e)),
            None => {}
        }
    }

    fn in_flight(&self) -> usize {
        self.channel.in_flight() + usize::from(self.partial.committing())
    }

    fn finish(&mut self, manifest: &Manifest) -> Result<(), IoError> {
        if self.stage != Stage::Data {
            return Ok(());
        }
        let epilogue = tape::epilogue(manifest, &self.layout, self.record_size, self.mtime)
            .map_err(|e| IoError::Refused(format!("archive epilogue: {e}")))?;
        let at = self.prologue_len + self.layout.stored_bytes();
        self.archive_len = at + epilogue.len() as u64;
        let bufs = meta_buf(&epilogue).map_err(IoError::Refused)?;
        self.stage = Stage::Epilogue;
        self.submit_meta(IoRequest::write(at, bufs, EPILOGUE_TAG))
    }

    fn finished(&mut self) -> Option<Result<(), IoError>> {
        if self.meta_inflight > 0 && self.stage == Stage::Data {
            return None;
        }
        self.finished.clone()
    }

    fn describe(&self) -> String {
        format!("tape archive {}", self.path.display())
    }

    fn abandon(&mut self) {
        self.partial.discard();
    }
}
