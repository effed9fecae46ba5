//! The on-disk encoding of pair metadata: the header record and its slots, the layout of the
//! maps, and the checked encoding of a bitmap page.

use super::*;

/// The persisted header.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct HeaderRecord {
    /// Header number (higher is newer).
    pub seq: u64,
    /// Pair name.
    pub name: String,
    /// Primary bdev.
    pub primary: String,
    /// Secondary bdev.
    pub secondary: String,
    /// Track size in bytes.
    pub track_size: u64,
    /// Number of tracks.
    pub tracks: u64,
    /// The pair's state.
    pub state: PersistedState,
    /// Copying S to P.
    pub reverse: bool,
    /// Split instant, ns since the epoch.
    pub split_at_ns: u64,
    /// Why the pair is suspended.
    pub error: Option<String>,
    /// The pair's instance: a number chosen when its metadata was made (0 in metadata made
    /// before instances), so a split journal record of an earlier pair of the same name is
    /// never taken for this one's.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub instance: u64,
    /// The pair's checkpoints, oldest first (format 2).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub checkpoints: Vec<CheckpointRecord>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A checkpoint as the header records it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CheckpointRecord {
    /// Name.
    pub name: String,
    /// The split instant it stands for, ns since the epoch.
    pub split_at_ns: u64,
    /// The backup that made it.
    pub backup_id: u64,
    /// Its slot: the map of the tracks P changed from its split to the next checkpoint's (the
    /// newest: to now).
    pub slot: u8,
}

/// A pair state as a header stores it: its name, `COPY`, `PAIR`, `PSUS` or `PSUE`
/// ([`PairState::as_str`]), a JSON string. A header holding any other name still decodes, as
/// `Unknown`: the newest header is then refused as a whole when it is applied to the pair,
/// rather than skipped for the older slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum PersistedState {
    /// A state of this engine.
    Known(PairState),
    /// A name that is none of them.
    Unknown(String),
}

impl From<PairState> for PersistedState {
    fn from(state: PairState) -> Self {
        PersistedState::Known(state)
    }
}

impl From<String> for PersistedState {
    fn from(name: String) -> Self {
        match PairState::from_name(&name) {
            Some(state) => PersistedState::Known(state),
            None => PersistedState::Unknown(name),
        }
    }
}

impl From<PersistedState> for String {
    fn from(state: PersistedState) -> Self {
        match state {
            PersistedState::Known(state) => state.as_str().to_string(),
            PersistedState::Unknown(name) => name,
        }
    }
}

/// Where things are on the metadata bdev.
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    /// Tracks of the pair.
    pub tracks: u64,
    /// Pages each map takes.
    pub pages_per_map: u64,
    /// Maps: the four every pair has, then the checkpoint slots' (format 2).
    pub maps: u64,
    /// The format headers are written in.
    pub format: u32,
}

impl Layout {
    /// The layout of new metadata for `tracks` tracks (the current format).
    pub fn new(tracks: u64) -> Self {
        Self::with_format(tracks, FORMAT)
    }

    /// The layout of metadata of `format` (1: no checkpoint slots).
    pub fn with_format(tracks: u64, format: u32) -> Self {
        let maps = if format == FORMAT_BASE_MAPS_ONLY {
            BASE_MAPS
        } else {
            BASE_MAPS + CHECKPOINT_SLOTS
        };
        Self {
            tracks,
            pages_per_map: tracks.div_ceil(TRACKS_PER_PAGE).max(1),
            maps: maps as u64,
            format,
        }
    }

    /// True when the layout has checkpoint slots.
    pub fn has_checkpoints(&self) -> bool {
        self.maps as usize > BASE_MAPS
    }

    /// Every map of the layout, in on-disk order.
    pub fn map_kinds(&self) -> impl Iterator<Item = MapKind> {
        let slots = self.maps as usize - BASE_MAPS;
        MAP_KINDS
            .into_iter()
            .chain((0..slots).map(MapKind::checkpoint))
    }

    /// The map stored `n`th.
    pub fn map_at(&self, n: u64) -> MapKind {
        match n as usize {
            i if i < BASE_MAPS => MAP_KINDS[i],
            i => MapKind::checkpoint(i - BASE_MAPS),
        }
    }

    /// Bytes the metadata bdev needs.
    pub fn size(&self) -> u64 {
        (HEADER_SLOTS + self.maps * self.pages_per_map) * BLOCK
    }

    /// Byte offset of a page.
    pub fn page_offset(&self, map: MapKind, page: u64) -> u64 {
        (HEADER_SLOTS + map.index() as u64 * self.pages_per_map + page) * BLOCK
    }

    /// Words a map holds in memory: one bit a track. On disk each map takes whole pages; the
    /// words of its last page past the last track are zero there and not kept in memory (a
    /// small volume's maps would otherwise cost a page each).
    pub(super) fn words(&self) -> u64 {
        self.tracks.div_ceil(64).max(1)
    }

    /// The words of page `page`: from its first to the map's last or the page's end.
    pub(super) fn page_words(&self, page: u64) -> std::ops::Range<usize> {
        let lo = (page * WORDS_PER_PAGE).min(self.words());
        let hi = ((page + 1) * WORDS_PER_PAGE).min(self.words());
        lo as usize..hi as usize
    }
}

pub(super) fn encode_header(
    rec: &HeaderRecord,
    format: u32,
    out: &mut [u8],
) -> Result<(), MetaError> {
    let json = serde_json::to_vec(rec).map_err(|e| MetaError::Io(e.to_string()))?;
    if json.len() > BLOCK as usize - 20 {
        return Err(MetaError::Io("pair header does not fit its block".into()));
    }
    out.fill(0);
    out[..8].copy_from_slice(&MAGIC);
    out[8..12].copy_from_slice(&format.to_le_bytes());
    out[12..16].copy_from_slice(&(json.len() as u32).to_le_bytes());
    out[16..16 + json.len()].copy_from_slice(&json);
    let crc = crc32c::crc32c(&out[..BLOCK as usize - 4]);
    out[BLOCK as usize - 4..].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

pub(super) fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

/// The header in `buf` and the format it was written in.
pub(super) fn decode_header(buf: &[u8]) -> Result<(HeaderRecord, u32), String> {
    if buf[..8] != MAGIC {
        return Err("no header magic".into());
    }
    if crc32c::crc32c(&buf[..BLOCK as usize - 4]) != u32_at(buf, BLOCK as usize - 4) {
        return Err("header checksum mismatch".into());
    }
    let format = u32_at(buf, 8);
    if format != FORMAT && format != FORMAT_BASE_MAPS_ONLY {
        return Err(format!("unknown format {format}"));
    }
    let len = u32_at(buf, 12) as usize;
    if len > BLOCK as usize - 20 {
        return Err("header length out of range".into());
    }
    let rec = serde_json::from_slice(&buf[16..16 + len]).map_err(|e| e.to_string())?;
    Ok((rec, format))
}

/// Writes page `page` of `map` into `out` (`BLOCK` bytes): `words` (at most `WORDS_PER_PAGE`;
/// the rest of the page is zero), its place and a checksum.
pub(super) fn encode_page(map: MapKind, page: u64, words: &[u64], out: &mut [u8]) {
    for (i, w) in words.iter().enumerate() {
        out[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
    }
    let t = WORDS_PER_PAGE as usize * 8;
    out[words.len() * 8..t].fill(0);
    out[t..t + 4].copy_from_slice(&(map.index() as u32).to_le_bytes());
    out[t + 4..t + 8].copy_from_slice(&(page as u32).to_le_bytes());
    out[t + 8..t + 12].copy_from_slice(&MAGIC[..4]);
    let crc = crc32c::crc32c(&out[..BLOCK as usize - 4]);
    out[BLOCK as usize - 4..].copy_from_slice(&crc.to_le_bytes());
}

/// Reads page `page` of `map` from its block (`BLOCK` bytes) into `words`
/// (`WORDS_PER_PAGE` of them); an error when the block is damaged, torn or another page.
pub fn decode_page(map: MapKind, page: u64, buf: &[u8], words: &mut [u64]) -> Result<(), String> {
    let t = WORDS_PER_PAGE as usize * 8;
    if crc32c::crc32c(&buf[..BLOCK as usize - 4]) != u32_at(buf, BLOCK as usize - 4)
        || u32_at(buf, t) != map.index() as u32
        || u32_at(buf, t + 4) != page as u32
        || buf[t + 8..t + 12] != MAGIC[..4]
    {
        return Err(format!("{map:?} page {page} is damaged or misplaced"));
    }
    for (i, w) in words.iter_mut().enumerate() {
        let mut a = [0u8; 8];
        a.copy_from_slice(&buf[i * 8..i * 8 + 8]);
        *w = u64::from_le_bytes(a);
    }
    Ok(())
}
