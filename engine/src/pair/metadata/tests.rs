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
