//! The file target: the image as a raw file (or onto a block device), written with io_uring
//! straight from the backup's DMA buffers. A regular file is written as `<path>.partial` and
//! renamed once complete and durable (see [`super::partial`]), so a cancelled or failed backup
//! never leaves a file that could pass for a complete image. A block device is written in
//! place: it cannot be renamed. An incremental backup is written in place too, onto the file
//! holding its base image (only the changed tracks: renaming a copy would mean copying the
//! rest).

use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use super::image_mark::ImageMark;
use super::partial::PartialFile;
use super::{Sink, SinkDone, SinkFull};
use crate::bdev::{Bdev, ChannelContext, IoChannel, IoCompletion, IoError, IoOp, IoRequest};
use crate::tape::Manifest;
use crate::uring::UringBdev;
use crate::{IoBufs, SubmitErrorKind};

const FLUSH_TAG: u64 = u64::MAX;

/// A raw-image target.
pub struct FileSink {
    path: PathBuf,
    /// Where the bytes go, when it is a regular file: it gets the image's mark at the end.
    marked: Option<PathBuf>,
    partial: Option<PartialFile>,
    channel: Box<dyn IoChannel>,
    scratch: Vec<IoCompletion>,
    finishing: bool,
    finished: Option<Result<(), IoError>>,
    failed: Option<IoError>,
}

impl FileSink {
    /// Opens the target for an image of `size` bytes on the calling reactor: a new image, or
    /// with `in_place` the existing one an incremental backup writes its changes onto.
    pub fn open(
        path: &Path,
        size: u64,
        block_size: u32,
        in_place: bool,
        ctx: &ChannelContext,
    ) -> Result<Self, String> {
        let meta = std::fs::metadata(path);
        let is_block = meta
            .as_ref()
            .map(|m| m.file_type().is_block_device())
            .unwrap_or(false);
        if in_place {
            match meta {
                Ok(m) if is_block || m.len() == size => {}
                Ok(m) => {
                    return Err(format!(
                        "{} holds {} bytes, not an image of {size}",
                        path.display(),
                        m.len()
                    ))
                }
                Err(e) => return Err(format!("{}: {e}", path.display())),
            }
        }
        let partial = (!is_block && !in_place)
            .then(|| PartialFile::new(path))
            .transpose()?;
        let target = partial.as_ref().map_or(path, |p| p.partial());
        if in_place && !is_block {
            // Written in place: until it is complete, it holds no image to trust.
            super::image_mark::clear(path)?;
        }
        let marked = (!is_block).then(|| target.to_path_buf());
        let bdev = UringBdev::open_with(
            "backup-file",
            target,
            block_size,
            Some(size),
            true,
            !in_place,
        )
        .map_err(|e| e.to_string())?;
        if bdev.geometry().size() < size {
            return Err(format!(
                "{} holds {} bytes, the image needs {size}",
                path.display(),
                bdev.geometry().size()
            ));
        }
        let channel = bdev.open_channel(ctx).map_err(|e| e.to_string())?;
        Ok(Self {
            path: path.to_path_buf(),
            marked,
            partial,
            channel,
            scratch: Vec::new(),
            finishing: false,
            finished: None,
            failed: None,
        })
    }
}

impl Sink for FileSink {
    fn submit(&mut self, offset: u64, bufs: IoBufs) -> Result<(), SinkFull> {
        if let Some(e) = &self.failed {
            return Err(SinkFull::Failed(e.clone(), bufs));
        }
        super::submit_write(self.channel.as_mut(), offset, bufs, offset)
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), SinkFull> {
        if let Some(e) = &self.failed {
            return Err(SinkFull::Failed(e.clone(), IoBufs::new()));
        }
        super::submit_zeroes(self.channel.as_mut(), offset, len, offset)
    }

    fn poll(&mut self, out: &mut Vec<SinkDone>) {
        self.channel.poll(&mut self.scratch);
        for c in self.scratch.drain(..) {
            if c.tag == FLUSH_TAG {
                match (c.result, self.partial.as_mut()) {
                    (Ok(()), Some(p)) => p.commit(),
                    (result, _) => self.finished = Some(result),
                }
                continue;
            }
            if let Err(e) = &c.result {
                self.failed.get_or_insert(e.clone());
            }
            let len = c.bufs.iter().map(|b| b.len() as u64).sum();
            out.push(SinkDone {
                offset: c.tag,
                // A write of zeroes counts no bytes of the image written.
                len,
                bufs: c.bufs,
                result: c.result,
            });
        }
        if let Some(done) = self.partial.as_mut().and_then(PartialFile::committed) {
            self.finished = Some(done.map_err(IoError::Refused));
        }
    }

    fn in_flight(&self) -> usize {
        let renaming = self.partial.as_ref().is_some_and(PartialFile::committing);
        self.channel.in_flight() + usize::from(renaming)
    }

    fn finish(&mut self, manifest: &Manifest) -> Result<(), IoError> {
        if self.finishing {
            return Ok(());
        }
        self.finishing = true;
        // The flush below makes the mark durable with the data.
        if let (Some(path), Some(digest)) = (&self.marked, &manifest.digest) {
            let mark = ImageMark {
                pair: manifest.pair.clone(),
                digest: digest.clone(),
                checkpoint: manifest.checkpoint.clone(),
            };
            super::image_mark::set(path, &mark).map_err(IoError::Refused)?;
        }
        self.channel
            .submit(IoRequest::without_data(IoOp::Flush, 0, 0, FLUSH_TAG))
            .map_err(|e| match e.error {
                SubmitErrorKind::Invalid(err) => err,
                SubmitErrorKind::QueueFull => IoError::Device(libc::EAGAIN),
            })
    }

    fn finished(&mut self) -> Option<Result<(), IoError>> {
        self.finished.clone()
    }

    fn describe(&self) -> String {
        format!("file {}", self.path.display())
    }

    fn abandon(&mut self) {
        if let Some(p) = self.partial.as_mut() {
            p.discard();
        }
    }
}
