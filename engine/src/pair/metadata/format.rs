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
}

impl Layout {
    /// The layout for `tracks` tracks.
    pub fn new(tracks: u64) -> Self {
        Self {
            tracks,
            pages_per_map: tracks.div_ceil(TRACKS_PER_PAGE).max(1),
        }
    }

    /// Bytes the metadata bdev needs.
    pub fn size(&self) -> u64 {
        (HEADER_SLOTS + 4 * self.pages_per_map) * BLOCK
    }

    /// Byte offset of a page.
    pub fn page_offset(&self, map: MapKind, page: u64) -> u64 {
        (HEADER_SLOTS + map as u64 * self.pages_per_map + page) * BLOCK
    }

    /// Words a map holds (whole pages).
    pub(super) fn words(&self) -> u64 {
        self.pages_per_map * WORDS_PER_PAGE
    }
}

pub(super) fn encode_header(rec: &HeaderRecord, out: &mut [u8]) -> Result<(), MetaError> {
    let json = serde_json::to_vec(rec).map_err(|e| MetaError::Io(e.to_string()))?;
    if json.len() > BLOCK as usize - 20 {
        return Err(MetaError::Io("pair header does not fit its block".into()));
    }
    out.fill(0);
    out[..8].copy_from_slice(&MAGIC);
    out[8..12].copy_from_slice(&FORMAT.to_le_bytes());
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

pub(super) fn decode_header(buf: &[u8]) -> Result<HeaderRecord, String> {
    if buf[..8] != MAGIC {
        return Err("no header magic".into());
    }
    if crc32c::crc32c(&buf[..BLOCK as usize - 4]) != u32_at(buf, BLOCK as usize - 4) {
        return Err("header checksum mismatch".into());
    }
    if u32_at(buf, 8) != FORMAT {
        return Err(format!("unknown format {}", u32_at(buf, 8)));
    }
    let len = u32_at(buf, 12) as usize;
    if len > BLOCK as usize - 20 {
        return Err("header length out of range".into());
    }
    serde_json::from_slice(&buf[16..16 + len]).map_err(|e| e.to_string())
}

pub(super) fn encode_page(map: MapKind, page: u64, words: &[u64], out: &mut [u8]) {
    for (i, w) in words.iter().enumerate() {
        out[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
    }
    let t = WORDS_PER_PAGE as usize * 8;
    out[t..t + 4].copy_from_slice(&(map as u32).to_le_bytes());
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
        || u32_at(buf, t) != map as u32
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
