//! Pair snapshots for planned restarts: on a clean stop, after host writes have drained, each
//! pair's state, split point and bitmaps are written to `<state-dir>/pairs/<name>.snapshot` (new
//! file, fsync, rename) with a CRC-32C over all of it. On start the pair is restored from it,
//! keeping its image and resuming its copy with the pending tracks only, and the file is removed
//! at once: after a crash there is no snapshot and the pair starts over with a full copy, never
//! from stale bitmaps. A snapshot that fails its checksum puts the pair in PSUE.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{Pair, PairState};

const FORMAT: &str = "quicksplit-pair-snapshot-1";

/// What the snapshot says about the pair besides its bitmaps.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Header {
    format: String,
    /// Pair name.
    pub name: String,
    /// Primary bdev.
    pub primary: String,
    /// Secondary bdev.
    pub secondary: String,
    /// Track size.
    pub track_size: u64,
    /// Tracks.
    pub tracks: u64,
    /// State (`COPY`, `PAIR`, `PSUS`, `PSUE`).
    pub state: String,
    /// Copying S to P.
    pub reverse: bool,
    /// Split instant.
    pub split_at_ns: u64,
    /// Error of a PSUE pair.
    pub error: Option<String>,
}

/// A loaded snapshot.
#[derive(Debug)]
pub struct Snapshot {
    /// Header.
    pub header: Header,
    /// Pending, changed on P, changed on S, to restore: one bit per track.
    pub sets: [Vec<u64>; 4],
}

/// Where the snapshot of pair `name` lives.
pub fn path_for(state_dir: &Path, name: &str) -> PathBuf {
    state_dir.join("pairs").join(format!("{name}.snapshot"))
}

fn put_words(out: &mut Vec<u8>, words: &[u64]) {
    out.extend_from_slice(&(words.len() as u64).to_le_bytes());
    for w in words {
        out.extend_from_slice(&w.to_le_bytes());
    }
}

/// Writes the snapshot of `pair` (host writes must be drained).
pub fn save(pair: &Pair, path: &Path) -> std::io::Result<()> {
    let header = Header {
        format: FORMAT.into(),
        name: pair.name().to_string(),
        primary: pair.primary().name().to_string(),
        secondary: pair.secondary().name().to_string(),
        track_size: pair.track_size(),
        tracks: pair.tracks(),
        state: pair.state().as_str().to_string(),
        reverse: pair.reversing(),
        split_at_ns: pair.split_at_ns(),
        error: pair.error(),
    };
    let json = serde_json::to_vec(&header).map_err(std::io::Error::other)?;
    let mut out = Vec::new();
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    put_words(&mut out, &pair.pending.to_words());
    put_words(&mut out, &pair.changed_p.to_words());
    put_words(&mut out, &pair.changed_s.to_words());
    put_words(&mut out, &pair.restore.to_words());
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension("snapshot.new");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&out)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

/// Reads and checks a snapshot.
pub fn load(path: &Path) -> Result<Snapshot, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let bad = |what: &str| format!("snapshot {}: {what}", path.display());
    if bytes.len() < 12 {
        return Err(bad("truncated"));
    }
    let (body, crc) = bytes.split_at(bytes.len() - 4);
    let stored = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
    if crc32c::crc32c(body) != stored {
        return Err(bad("fails its checksum"));
    }
    let mut at = 0usize;
    let mut take = |n: usize| -> Result<&[u8], String> {
        let end = at
            .checked_add(n)
            .filter(|&e| e <= body.len())
            .ok_or_else(|| bad("truncated"))?;
        let s = &body[at..end];
        at = end;
        Ok(s)
    };
    let u64_at = |b: &[u8]| {
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        u64::from_le_bytes(a)
    };
    let hlen = u64_at(take(8)?) as usize;
    let header: Header = serde_json::from_slice(take(hlen)?).map_err(|e| bad(&e.to_string()))?;
    if header.format != FORMAT {
        return Err(bad("unknown format"));
    }
    let mut sets: [Vec<u64>; 4] = Default::default();
    for set in sets.iter_mut() {
        let n = u64_at(take(8)?) as usize;
        let raw = take(n.checked_mul(8).ok_or_else(|| bad("truncated"))?)?;
        *set = raw.chunks_exact(8).map(u64_at).collect();
    }
    Ok(Snapshot { header, sets })
}

/// Puts `pair` (just created) in the snapshot's state. The snapshot must be of this pair.
pub fn apply(pair: &Pair, snap: &Snapshot) -> Result<(), String> {
    let h = &snap.header;
    if h.name != pair.name()
        || h.primary != pair.primary().name()
        || h.secondary != pair.secondary().name()
        || h.track_size != pair.track_size()
        || h.tracks != pair.tracks()
    {
        return Err(format!(
            "the snapshot is of another pair ({} over {} and {}, {} tracks of {} bytes)",
            h.name, h.primary, h.secondary, h.tracks, h.track_size
        ));
    }
    let state = match h.state.as_str() {
        "COPY" => PairState::Copy,
        "PAIR" => PairState::Pair,
        "PSUS" => PairState::Psus,
        "PSUE" => PairState::Psue,
        other => return Err(format!("unknown state {other}")),
    };
    pair.pending.load_words(&snap.sets[0]);
    pair.changed_p.load_words(&snap.sets[1]);
    pair.changed_s.load_words(&snap.sets[2]);
    pair.restore.load_words(&snap.sets[3]);
    pair.restore_state(state, h.reverse, h.split_at_ns, h.error.clone());
    Ok(())
}
