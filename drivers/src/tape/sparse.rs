//! Sparse and incremental images: which ranges of the image an archive stores ([`Layout`]),
//! and the GNU.sparse 1.0 map that describes them at the start of the member's data.
//!
//! The map is a sequence of decimal numbers, each ended by a newline: the number of entries,
//! then each entry's offset and size. It is padded with NULs to a 512-byte block, and the stored
//! data follows it. Like GNU tar, the writer adds an entry of size 0 at the image's end when the
//! last stored range stops before it, so an extracting tar makes the file its full size.

use std::ops::Range;

use super::format::{pad512, BLOCK};
use super::CHUNK_SIZE;

/// The ranges of an image of `volume_size` bytes that an archive stores: sorted, disjoint, not
/// empty, each starting on a [`CHUNK_SIZE`] boundary and ending on one or at the image's end.
/// A chunk is therefore either stored whole or not at all.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    volume_size: u64,
    stored: Vec<Range<u64>>,
    /// Where each range starts in the stored data (the member's data after the map).
    data_starts: Vec<u64>,
    stored_bytes: u64,
}

impl Layout {
    /// The whole image stored: a plain (not sparse) member.
    pub fn whole(volume_size: u64) -> Self {
        let mut stored = Vec::new();
        if volume_size > 0 {
            stored.push(0..volume_size);
        }
        Self {
            data_starts: vec![0; stored.len()],
            stored,
            volume_size,
            stored_bytes: volume_size,
        }
    }

    /// The ranges `stored` of an image of `volume_size` bytes; an error says which rule a range
    /// breaks.
    pub fn new(volume_size: u64, stored: &[Range<u64>]) -> Result<Self, String> {
        let mut data_starts = Vec::with_capacity(stored.len());
        let mut stored_bytes = 0u64;
        let mut prev_end = 0u64;
        for (i, r) in stored.iter().enumerate() {
            let what = || format!("stored range {i} ({}..{})", r.start, r.end);
            if r.start >= r.end {
                return Err(format!("{} is empty", what()));
            }
            if i > 0 && r.start < prev_end {
                return Err(format!(
                    "{} starts before the previous range ends ({prev_end}): ranges must be \
                     sorted and disjoint",
                    what()
                ));
            }
            if r.end > volume_size {
                return Err(format!(
                    "{} ends beyond the image ({volume_size} bytes)",
                    what()
                ));
            }
            if !r.start.is_multiple_of(CHUNK_SIZE)
                || (!r.end.is_multiple_of(CHUNK_SIZE) && r.end != volume_size)
            {
                return Err(format!(
                    "{} is not aligned to {CHUNK_SIZE}-byte chunks (it must start on a chunk \
                     boundary and end on one or at the image's end)",
                    what()
                ));
            }
            data_starts.push(stored_bytes);
            stored_bytes += r.end - r.start;
            prev_end = r.end;
        }
        Ok(Self {
            volume_size,
            stored: stored.to_vec(),
            data_starts,
            stored_bytes,
        })
    }

    /// The image's size.
    pub fn volume_size(&self) -> u64 {
        self.volume_size
    }

    /// The stored ranges, in order.
    pub fn stored(&self) -> &[Range<u64>] {
        &self.stored
    }

    /// The bytes of image data the archive holds.
    pub fn stored_bytes(&self) -> u64 {
        self.stored_bytes
    }

    /// True when every byte of the image is stored (a plain member, no map).
    pub fn is_whole(&self) -> bool {
        self.stored_bytes == self.volume_size
    }

    /// The number of [`CHUNK_SIZE`] chunks of stored data (one CRC-32C each).
    pub fn stored_chunks(&self) -> u64 {
        self.stored_bytes.div_ceil(CHUNK_SIZE)
    }

    /// Where the image byte at `image_offset` sits in the stored data, if it is stored.
    pub fn data_offset(&self, image_offset: u64) -> Option<u64> {
        let i = self.stored.partition_point(|r| r.end <= image_offset);
        let r = self.stored.get(i)?;
        (r.start <= image_offset).then(|| self.data_starts[i] + (image_offset - r.start))
    }

    /// The image offset of the byte at `data_offset` in the stored data, if there is one.
    pub fn image_offset(&self, data_offset: u64) -> Option<u64> {
        let i = self.data_starts.partition_point(|&s| s <= data_offset);
        let i = i.checked_sub(1)?;
        let r = &self.stored[i];
        let at = r.start + (data_offset - self.data_starts[i]);
        (at < r.end).then_some(at)
    }

    /// The map entries a GNU.sparse 1.0 member has: each stored range, then `(volume_size, 0)`
    /// when the last range stops before the image's end.
    fn map_entries(&self) -> Vec<(u64, u64)> {
        let mut entries: Vec<(u64, u64)> = self
            .stored
            .iter()
            .map(|r| (r.start, r.end - r.start))
            .collect();
        if self.stored.last().map_or(0, |r| r.end) < self.volume_size {
            entries.push((self.volume_size, 0));
        }
        entries
    }

    /// The sparse map block(s): the map's text padded with NULs to a 512-byte block.
    pub fn encode_map(&self) -> Vec<u8> {
        let entries = self.map_entries();
        let mut text = format!("{}\n", entries.len());
        for (offset, size) in entries {
            text.push_str(&format!("{offset}\n{size}\n"));
        }
        let mut out = text.into_bytes();
        out.resize(pad512(out.len() as u64) as usize, 0);
        out
    }
}

/// The largest number of entries a map may announce for an image of `realsize` bytes: one per
/// chunk and the end entry (this format stores whole chunks, so no more can be meaningful).
pub(crate) fn max_map_entries(realsize: u64) -> u64 {
    realsize.div_ceil(CHUNK_SIZE) + 1
}

/// The longest a map's text can be for `count` entries: `2 * count + 1` numbers of at most 20
/// digits and a newline each, padded to a block.
pub(crate) fn max_map_len(count: u64) -> u64 {
    pad512(count.saturating_mul(2).saturating_add(1).saturating_mul(21))
}

/// Parses the leading decimal number and its newline of a map; `None` if the text does not yet
/// hold a whole line.
pub(crate) fn map_count(text: &[u8]) -> Option<Result<u64, String>> {
    let nl = text.iter().position(|&b| b == b'\n')?;
    Some(parse_number(&text[..nl], "the entry count"))
}

/// The number of newlines in `text`: a map is complete once it holds `2 * count + 1`.
pub(crate) fn map_lines(text: &[u8]) -> u64 {
    text.iter().filter(|&&b| b == b'\n').count() as u64
}

fn parse_number(digits: &[u8], what: &str) -> Result<u64, String> {
    if digits.is_empty() || digits.len() > 20 || !digits.iter().all(u8::is_ascii_digit) {
        return Err(format!(
            "{what} {:?} is not a decimal number",
            String::from_utf8_lossy(digits)
        ));
    }
    digits
        .iter()
        .try_fold(0u64, |acc, &b| {
            acc.checked_mul(10)?.checked_add(u64::from(b - b'0'))
        })
        .ok_or_else(|| format!("{what} {} overflows", String::from_utf8_lossy(digits)))
}

/// Parses a whole map (its text and NUL padding, `text.len()` a multiple of 512) of a member of
/// `realsize` bytes: the layout it describes. Entries must be sorted, disjoint, within
/// `realsize` and chunk-aligned; a size-0 entry is only allowed last, at `realsize`.
pub fn parse_map(text: &[u8], realsize: u64) -> Result<Layout, String> {
    if !(text.len() as u64).is_multiple_of(BLOCK) {
        return Err(format!("{} bytes, not whole blocks", text.len()));
    }
    let mut lines = text.split(|&b| b == b'\n');
    let mut next = |what: &str| -> Result<u64, String> {
        // The NUL padding after the last line is where the map's text ends.
        let line = lines
            .next()
            .filter(|l| l.first() != Some(&0))
            .ok_or_else(|| format!("the map ends before {what}"))?;
        parse_number(line, what)
    };
    let count = next("the entry count")?;
    if count > max_map_entries(realsize) {
        return Err(format!(
            "{count} entries for {realsize} bytes: more than one per {CHUNK_SIZE}-byte chunk"
        ));
    }
    let mut ranges = Vec::new();
    for i in 0..count {
        let offset = next(&format!("the offset of entry {i}"))?;
        let size = next(&format!("the size of entry {i}"))?;
        let end = offset
            .checked_add(size)
            .ok_or_else(|| format!("entry {i} ({offset} + {size}) overflows"))?;
        if end > realsize {
            return Err(format!(
                "entry {i} ({offset}..{end}) ends beyond the file's {realsize} bytes"
            ));
        }
        if size == 0 {
            if i + 1 != count || offset != realsize {
                return Err(format!(
                    "entry {i} has size 0 at {offset}: only the last entry, at the end \
                     ({realsize}), may be empty"
                ));
            }
            continue;
        }
        ranges.push(offset..end);
    }
    // What follows the last newline is the padding: NULs only.
    let used: usize = text
        .iter()
        .enumerate()
        .filter(|(_, &b)| b == b'\n')
        .nth(2 * count as usize)
        .map_or(text.len(), |(i, _)| i + 1);
    if text[used..].iter().any(|&b| b != 0) {
        return Err(format!(
            "{} bytes after the map's last entry are not NUL padding",
            text.len() - used
        ));
    }
    if pad512(used as u64) != text.len() as u64 {
        return Err(format!(
            "the map's padding runs {} bytes past its block",
            text.len() as u64 - pad512(used as u64)
        ));
    }
    Layout::new(realsize, &ranges)
}

#[cfg(test)]
// Lists of stored ranges may be one range long.
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use super::*;

    const MIB: u64 = CHUNK_SIZE;

    #[test]
    fn whole_layout() {
        let l = Layout::whole(5 * MIB + 7);
        assert!(l.is_whole());
        assert_eq!(l.stored(), &[0..5 * MIB + 7]);
        assert_eq!(l.stored_chunks(), 6);
        assert_eq!(Layout::new(5 * MIB + 7, &[0..5 * MIB + 7]).unwrap(), l);
    }

    #[test]
    fn offsets_map_both_ways() {
        let l = Layout::new(
            10 * MIB + 5,
            &[MIB..3 * MIB, 6 * MIB..7 * MIB, 9 * MIB..10 * MIB + 5],
        )
        .unwrap();
        assert!(!l.is_whole());
        assert_eq!(l.stored_bytes(), 4 * MIB + 5);
        assert_eq!(l.stored_chunks(), 5);
        assert_eq!(l.data_offset(0), None);
        assert_eq!(l.data_offset(MIB), Some(0));
        assert_eq!(l.data_offset(3 * MIB - 1), Some(2 * MIB - 1));
        assert_eq!(l.data_offset(3 * MIB), None);
        assert_eq!(l.data_offset(6 * MIB + 3), Some(2 * MIB + 3));
        assert_eq!(l.data_offset(10 * MIB + 4), Some(4 * MIB + 4));
        assert_eq!(l.data_offset(10 * MIB + 5), None);
        for d in [0, 2 * MIB - 1, 2 * MIB, 3 * MIB, 4 * MIB + 4] {
            assert_eq!(l.data_offset(l.image_offset(d).unwrap()), Some(d));
        }
        assert_eq!(l.image_offset(4 * MIB + 5), None);
    }

    #[test]
    fn layouts_breaking_the_rules_are_refused() {
        let bad: &[&[Range<u64>]] = &[
            &[MIB..MIB],
            &[2 * MIB..3 * MIB, 0..MIB],
            &[0..2 * MIB, MIB..3 * MIB],
            &[0..5 * MIB],
            &[4096..MIB],
            &[0..MIB + 4096],
        ];
        for stored in bad {
            assert!(Layout::new(4 * MIB, stored).is_err(), "{stored:?}");
        }
        // Adjacent ranges and a short last chunk at the end are fine.
        assert!(Layout::new(4 * MIB + 1, &[0..MIB, MIB..2 * MIB, 4 * MIB..4 * MIB + 1]).is_ok());
        assert!(Layout::new(4 * MIB, &[]).is_ok());
    }

    #[test]
    fn map_text_is_what_gnu_tar_writes() {
        let l = Layout::new(8 * MIB, &[MIB..2 * MIB, 4 * MIB..5 * MIB]).unwrap();
        let m = l.encode_map();
        assert_eq!(m.len(), 512);
        let text = "3\n1048576\n1048576\n4194304\n1048576\n8388608\n0\n";
        assert_eq!(&m[..text.len()], text.as_bytes());
        assert!(m[text.len()..].iter().all(|&b| b == 0));
        assert_eq!(parse_map(&m, 8 * MIB).unwrap(), l);
        // Reaching the end: no end entry.
        let l = Layout::new(3 * MIB + 9, &[2 * MIB..3 * MIB + 9]).unwrap();
        let m = l.encode_map();
        assert!(m.starts_with(b"1\n2097152\n1048585\n\0"));
        assert_eq!(parse_map(&m, 3 * MIB + 9).unwrap(), l);
        // Nothing stored: the end entry alone.
        let l = Layout::new(3 * MIB, &[]).unwrap();
        let m = l.encode_map();
        assert!(m.starts_with(b"1\n3145728\n0\n\0"));
        assert_eq!(parse_map(&m, 3 * MIB).unwrap(), l);
    }

    #[test]
    fn long_maps_span_blocks() {
        let ranges: Vec<Range<u64>> = (0..300).map(|i| 2 * i * MIB..(2 * i + 1) * MIB).collect();
        let l = Layout::new(600 * MIB, &ranges).unwrap();
        let m = l.encode_map();
        assert!(m.len() > 512);
        assert_eq!(m.len() % 512, 0);
        assert!(m.len() as u64 <= max_map_len(301));
        assert_eq!(parse_map(&m, 600 * MIB).unwrap(), l);
        assert_eq!(map_count(&m), Some(Ok(301)));
        assert_eq!(map_lines(&m), 2 * 301 + 1);
    }

    fn padded(text: &str) -> Vec<u8> {
        let mut v = text.as_bytes().to_vec();
        v.resize(pad512(v.len() as u64) as usize, 0);
        v
    }

    #[test]
    fn malformed_maps_are_refused() {
        let size = 8 * MIB;
        let cases: &[(&str, &str)] = &[
            ("", "entry count"),
            ("x\n", "not a decimal"),
            ("2\n0\n1048576\n", "ends before"),
            ("1\n0\n-5\n", "not a decimal"),
            ("1\n 0\n1048576\n", "not a decimal"),
            ("2\n2097152\n1048576\n0\n1048576\n", "sorted"),
            ("2\n0\n2097152\n1048576\n1048576\n", "sorted"),
            ("1\n7340032\n2097152\n", "beyond"),
            ("1\n18446744073709551615\n2\n", "overflows"),
            ("1\n4096\n1048576\n", "aligned"),
            ("1\n0\n4096\n", "aligned"),
            ("2\n0\n0\n1048576\n1048576\n", "size 0"),
            ("1\n1048576\n0\n", "size 0"),
            ("1\n0\n1048576\nstray", "not NUL"),
            ("99999\n", "more than one per"),
            ("99999999999999999999999\n", "not a decimal"),
        ];
        for (text, want) in cases {
            let err = parse_map(&padded(text), size).unwrap_err();
            assert!(err.contains(want), "{text:?}: {err}");
        }
        // Padding must end at the first block boundary after the text.
        let mut long = padded("1\n0\n1048576\n");
        long.extend_from_slice(&[0; 512]);
        assert!(parse_map(&long, size).unwrap_err().contains("padding"));
        assert!(parse_map(b"1\n0\n1048576\n", size)
            .unwrap_err()
            .contains("whole blocks"));
    }
}
