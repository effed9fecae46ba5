//! How a command's data is described to the controller: PRP entries and lists, or SGL
//! descriptors when the buffers are not page-shaped and the controller offers SGLs; and how a
//! request is cut into commands no larger than the controller's transfer limit.

use smallvec::SmallVec;

use super::spec::{DataPointer, PAGE_SIZE};

/// Entries of one PRP list page; commands are cut so one page always suffices.
pub const PRP_LIST_ENTRIES: usize = PAGE_SIZE / 8;
/// SGL descriptors of one segment page.
pub const SGL_LIST_ENTRIES: usize = PAGE_SIZE / 16;

/// A contiguous piece of a command's data in device address space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Device address.
    pub iova: u64,
    /// Bytes.
    pub len: u64,
}

/// The segments of one command.
pub type Segments = SmallVec<[Segment; 4]>;

/// Why data cannot be described.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DataError {
    /// PRPs need page-aligned joins and the controller has no SGL support.
    #[error("the buffers are not page-aligned at their joins and the controller has no SGLs")]
    NotPageShaped,
    /// Addresses and lengths must be multiples of 4 bytes.
    #[error("a buffer is not dword aligned")]
    Unaligned,
    /// More entries than one list page holds.
    #[error("{0} data pointer entries exceed one list page")]
    TooManyEntries(usize),
    /// No data.
    #[error("no data")]
    Empty,
}

fn page_shaped(segments: &[Segment]) -> bool {
    let page = PAGE_SIZE as u64;
    let last = segments.len() - 1;
    segments.iter().enumerate().all(|(i, s)| {
        (i == 0 || s.iova.is_multiple_of(page))
            && (i == last || (s.iova + s.len).is_multiple_of(page))
    })
}

/// Builds the data pointer of `segments`. A list, when one is needed, is written with
/// `write_list(byte_offset, value)` into the page the device sees at `list_iova`.
pub fn build(
    segments: &[Segment],
    sgl_supported: bool,
    list_iova: u64,
    write_list: &mut dyn FnMut(usize, u64),
) -> Result<DataPointer, DataError> {
    if segments.is_empty() || segments.iter().any(|s| s.len == 0) {
        return Err(DataError::Empty);
    }
    if segments.iter().any(|s| s.iova % 4 != 0 || s.len % 4 != 0) {
        return Err(DataError::Unaligned);
    }
    if page_shaped(segments) {
        return build_prp(segments, list_iova, write_list);
    }
    if sgl_supported {
        return build_sgl(segments, list_iova, write_list);
    }
    Err(DataError::NotPageShaped)
}

fn build_prp(
    segments: &[Segment],
    list_iova: u64,
    write_list: &mut dyn FnMut(usize, u64),
) -> Result<DataPointer, DataError> {
    let page = PAGE_SIZE as u64;
    let mut entries: SmallVec<[u64; 8]> = SmallVec::new();
    let mut listed = 0usize;
    for s in segments {
        let mut at = s.iova;
        let end = s.iova + s.len;
        while at < end {
            if entries.len() < 2 {
                entries.push(at);
            } else {
                if entries.len() == 2 && listed == 0 {
                    // The second entry moves into the list once a third appears.
                    write_list(0, entries[1]);
                    listed = 1;
                }
                if listed >= PRP_LIST_ENTRIES {
                    return Err(DataError::TooManyEntries(listed + 2));
                }
                write_list(8 * listed, at);
                listed += 1;
            }
            at = (at / page + 1) * page;
        }
    }
    Ok(match (entries.len(), listed) {
        (1, _) => DataPointer::Prp(entries[0], 0),
        (_, 0) => DataPointer::Prp(entries[0], entries[1]),
        _ => DataPointer::Prp(entries[0], list_iova),
    })
}

/// SGL descriptor identifiers: a data block, and the last segment of a list.
const SGL_DATA_BLOCK: u64 = 0x00;
const SGL_LAST_SEGMENT: u64 = 0x30;

fn descriptor(iova: u64, len: u64, id: u64) -> [u32; 4] {
    [
        iova as u32,
        (iova >> 32) as u32,
        len as u32,
        (id as u32) << 24,
    ]
}

fn build_sgl(
    segments: &[Segment],
    list_iova: u64,
    write_list: &mut dyn FnMut(usize, u64),
) -> Result<DataPointer, DataError> {
    if let [one] = segments {
        return Ok(DataPointer::Sgl(descriptor(
            one.iova,
            one.len,
            SGL_DATA_BLOCK,
        )));
    }
    if segments.len() > SGL_LIST_ENTRIES {
        return Err(DataError::TooManyEntries(segments.len()));
    }
    for (i, s) in segments.iter().enumerate() {
        write_list(16 * i, s.iova);
        write_list(16 * i + 8, s.len | SGL_DATA_BLOCK << 56);
    }
    Ok(DataPointer::Sgl(descriptor(
        list_iova,
        16 * segments.len() as u64,
        SGL_LAST_SEGMENT,
    )))
}

/// The segments covering bytes `start..start+len` of data spread over `bufs` (device address and
/// length of each, in order).
pub fn slice(bufs: &[(u64, u64)], start: u64, len: u64) -> Segments {
    let mut out = Segments::new();
    let end = start + len;
    let mut pos = 0u64;
    for &(iova, blen) in bufs {
        let (b_start, b_end) = (pos, pos + blen);
        pos = b_end;
        if b_end <= start {
            continue;
        }
        if b_start >= end {
            break;
        }
        let from = start.max(b_start);
        let to = end.min(b_end);
        out.push(Segment {
            iova: iova + (from - b_start),
            len: to - from,
        });
    }
    out
}

/// Cuts `len` bytes into command-sized pieces of at most `max` bytes (a multiple of the block
/// size): `(start, len)` of each.
pub fn pieces(len: u64, max: u64) -> impl Iterator<Item = (u64, u64)> {
    let max = max.max(1);
    (0..len.div_ceil(max)).map(move |i| (i * max, max.min(len - i * max)))
}
