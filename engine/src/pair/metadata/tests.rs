use super::*;

fn header(seq: u64) -> HeaderRecord {
    HeaderRecord {
        seq,
        name: "p".into(),
        primary: "a".into(),
        secondary: "b".into(),
        track_size: 65536,
        tracks: 100_000,
        state: PairState::Psus.into(),
        reverse: false,
        split_at_ns: 42,
        error: None,
        instance: 0,
        checkpoints: Vec::new(),
    }
}

#[test]
fn headers_encode_as_earlier_builds_wrote_them() {
    let json = r#"{"seq":7,"name":"p","primary":"a","secondary":"b","track_size":65536,"tracks":100000,"state":"PSUS","reverse":false,"split_at_ns":42,"error":null}"#;
    assert_eq!(serde_json::to_string(&header(7)).unwrap(), json);
    assert_eq!(
        serde_json::from_str::<HeaderRecord>(json).unwrap(),
        header(7)
    );
    for state in [
        PairState::Copy,
        PairState::Pair,
        PairState::Psus,
        PairState::Psue,
    ] {
        let rec = HeaderRecord {
            state: state.into(),
            ..header(7)
        };
        let text = serde_json::to_string(&rec).unwrap();
        assert_eq!(text, json.replace("PSUS", state.as_str()));
        assert_eq!(serde_json::from_str::<HeaderRecord>(&text).unwrap(), rec);
    }
    // A name no state has still decodes, and encodes back as it was.
    let other = json.replace("PSUS", "SPLIT");
    let rec: HeaderRecord = serde_json::from_str(&other).unwrap();
    assert_eq!(rec.state, PersistedState::Unknown("SPLIT".into()));
    assert_eq!(serde_json::to_string(&rec).unwrap(), other);
}

#[test]
fn header_and_page_round_trip_and_any_flipped_bit_is_caught() {
    let mut b = vec![0u8; BLOCK as usize];
    encode_header(&header(7), FORMAT, &mut b).unwrap();
    assert_eq!(decode_header(&b).unwrap(), (header(7), FORMAT));
    for i in [0usize, 20, 300, 4095] {
        let mut c = b.clone();
        c[i] ^= 0x10;
        assert!(decode_header(&c).is_err(), "flip at {i} not caught");
    }
    let words: Vec<u64> = (0..WORDS_PER_PAGE).map(|i| i * 0x9e37_79b9).collect();
    encode_page(MapKind::ChangedS, 3, &words, &mut b);
    let mut back = vec![0u64; WORDS_PER_PAGE as usize];
    decode_page(MapKind::ChangedS, 3, &b, &mut back).unwrap();
    assert_eq!(back, words);
    assert!(decode_page(MapKind::ChangedP, 3, &b, &mut back).is_err());
    assert!(decode_page(MapKind::ChangedS, 4, &b, &mut back).is_err());
    b[100] ^= 1;
    assert!(decode_page(MapKind::ChangedS, 3, &b, &mut back).is_err());
    // A page never written (zeroes) is not a valid empty page.
    assert!(decode_page(MapKind::ChangedS, 3, &[0u8; 4096], &mut back).is_err());
}

#[test]
fn maps_keep_one_bit_a_track_in_memory_and_whole_pages_on_disk() {
    use drivers::malloc::MallocBdev;
    // Six pages a map, the last partly used: the image (2 + 12 * 6 blocks) takes more than
    // one request.
    let tracks = 5 * TRACKS_PER_PAGE + 100;
    let layout = Layout::new(tracks);
    assert_eq!(layout.pages_per_map, 6);
    assert!(layout.size() / BLOCK > blocking_io::PAGES_PER_IO as u64);
    assert_eq!(layout.words(), tracks.div_ceil(64));
    let last = layout.page_words(5);
    assert_eq!(last, 5 * WORDS_PER_PAGE as usize..layout.words() as usize);
    let mut words = vec![0u64; layout.words() as usize];
    for t in [0, 63, TRACKS_PER_PAGE, 5 * TRACKS_PER_PAGE, tracks - 1] {
        words[(t / 64) as usize] |= 1 << (t % 64);
    }
    // The page buffer held other data before: the unused words are written as zeroes.
    let mut stale = vec![0xffu8; BLOCK as usize];
    encode_page(MapKind::Pending, 5, &words[last.clone()], &mut stale);
    let mut full = vec![0u64; WORDS_PER_PAGE as usize];
    decode_page(MapKind::Pending, 5, &stale, &mut full).unwrap();
    assert_eq!(&full[..last.len()], &words[last.clone()]);
    assert!(full[last.len()..].iter().all(|&w| w == 0));
    // A new pair's metadata, written as one image: every track pending, the other maps empty,
    // each page where the layout puts it.
    let bdev: Arc<dyn Bdev> = Arc::new(MallocBdev::create("m", layout.size(), 4096).unwrap());
    let rec = HeaderRecord {
        tracks,
        ..header(1)
    };
    drop(Metadata::initialize(Arc::clone(&bdev), &rec).unwrap());
    let mut io = BlockingIo::open(&bdev).unwrap();
    let mut all = vec![u64::MAX; layout.words() as usize];
    if !tracks.is_multiple_of(64) {
        *all.last_mut().unwrap() = (1u64 << (tracks % 64)) - 1;
    }
    assert_eq!(io.read_map(&layout, MapKind::Pending).unwrap(), all);
    for map in layout.map_kinds().skip(1) {
        assert!(
            io.read_map(&layout, map).unwrap().iter().all(|&w| w == 0),
            "{map:?}"
        );
    }
    drop(io);
    let (_, loaded) = Metadata::load(bdev, tracks).unwrap();
    assert_eq!(loaded.header.seq, 1);
    // A small volume's maps take a few words, not a page each.
    assert_eq!(Layout::new(256).words(), 4);
    assert_eq!(PersistedSet::new(&Layout::new(256)).want.len(), 4);
}
