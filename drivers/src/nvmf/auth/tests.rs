//! Both ends of the exchange run against each other in memory, with right and wrong keys, and
//! the controller's side fed garbage.

use super::messages::why;
use super::*;

/// AUTH_Send and AUTH_Receive straight into a controller's queue state.
struct Direct<'a> {
    ctrl: &'a mut CtrlAuth,
    gave_up: Option<u8>,
}

impl AuthTransport for Direct<'_> {
    fn auth_send(&mut self, data: &[u8]) -> Result<(), AuthError> {
        if let SendOutcome::HostGaveUp(w) = self.ctrl.send(data) {
            self.gave_up = Some(w);
        }
        Ok(())
    }

    fn auth_receive(&mut self, len: u32) -> Result<Vec<u8>, AuthError> {
        let mut m = self.ctrl.receive();
        // As on the wire: the whole allocation comes back, zero padded.
        m.resize(len as usize, 0);
        Ok(m)
    }
}

const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:11111111-2222-3333-4444-555555555555";
const SUBSYS: &str = "nqn.2026-12.io.quicksplit:auth";

fn secret(fill: u8, len: usize, transform: Option<HashId>) -> DhchapSecret {
    let text = DhchapSecret::encode(&vec![fill; len], transform);
    DhchapSecret::parse(text.as_bytes()).unwrap()
}

fn keys(host: DhchapSecret, ctrl: Option<DhchapSecret>) -> HostKeys {
    HostKeys {
        key: host,
        ctrl_key: ctrl,
    }
}

fn run(host: &HostKeys, ctrl: &HostKeys) -> (Result<(), AuthError>, CtrlAuth, Option<u8>) {
    let mut c = CtrlAuth::new(std::sync::Arc::new(ctrl.clone()), HOST, SUBSYS);
    let mut t = Direct {
        ctrl: &mut c,
        gave_up: None,
    };
    let r = authenticate(&mut t, host, HOST, SUBSYS, 7);
    let gave_up = t.gave_up;
    (r, c, gave_up)
}

#[test]
fn the_host_authenticates_with_the_right_key_in_both_groups() {
    for (transform, len) in [
        (None, 32),
        (Some(HashId::Sha256), 32),
        (Some(HashId::Sha384), 48),
        (Some(HashId::Sha512), 64),
    ] {
        let k = keys(secret(0x5a, len, transform), None);
        let (r, c, _) = run(&k, &k);
        r.unwrap();
        assert!(c.authenticated());
        // Offered both, the controller picks the Diffie-Hellman group and SHA-256.
        assert_eq!(c.chosen(), (HashId::Sha256, dh::DhGroup::Ffdhe2048));
    }
}

#[test]
fn bidirectional_authentication_proves_both_keys() {
    let k = keys(
        secret(1, 32, Some(HashId::Sha256)),
        Some(secret(2, 48, Some(HashId::Sha384))),
    );
    let (r, c, gave_up) = run(&k, &k);
    r.unwrap();
    assert!(c.authenticated() && gave_up.is_none());
}

#[test]
fn a_wrong_host_key_is_refused_with_failure1() {
    let right = keys(secret(1, 32, Some(HashId::Sha256)), None);
    let wrong = keys(secret(3, 32, Some(HashId::Sha256)), None);
    let (r, c, _) = run(&wrong, &right);
    match r {
        Err(AuthError::Refused(w)) => assert_eq!(w, why::FAILED),
        other => panic!("{other:?}"),
    }
    assert!(!c.authenticated());
    assert!(
        c.failure().unwrap().contains("does not match"),
        "{:?}",
        c.failure()
    );
    // The same key transformed for another host NQN does not pass either.
    let mut c = CtrlAuth::new(
        std::sync::Arc::new(right.clone()),
        "nqn.2014-08.org.nvmexpress:uuid:other",
        SUBSYS,
    );
    let mut t = Direct {
        ctrl: &mut c,
        gave_up: None,
    };
    assert!(authenticate(&mut t, &right, HOST, SUBSYS, 1).is_err());
    assert!(!c.authenticated());
}

#[test]
fn a_controller_without_the_hosts_controller_key_fails_to_authenticate() {
    let host = keys(secret(1, 32, None), Some(secret(2, 32, None)));
    // The controller holds another controller key: the host refuses it with Failure2.
    let ctrl = keys(secret(1, 32, None), Some(secret(9, 32, None)));
    let (r, c, gave_up) = run(&host, &ctrl);
    assert!(
        matches!(r, Err(AuthError::ControllerNotAuthentic(_))),
        "{r:?}"
    );
    assert_eq!(gave_up, Some(why::FAILED));
    assert!(!c.authenticated());
    // The controller holds none: it refuses the bidirectional exchange.
    let ctrl = keys(secret(1, 32, None), None);
    let (r, c, _) = run(&host, &ctrl);
    assert!(matches!(r, Err(AuthError::Refused(why::FAILED))), "{r:?}");
    assert!(!c.authenticated());
}

#[test]
fn secrets_parse_as_nvme_cli_prints_them_and_bad_ones_are_refused() {
    let text = DhchapSecret::encode(&[0xab; 32], Some(HashId::Sha256));
    assert!(text.starts_with("DHHC-1:01:") && text.ends_with(':'));
    let s = DhchapSecret::parse(format!("  {}\n", *text).as_bytes()).unwrap();
    assert_eq!(s, secret(0xab, 32, Some(HashId::Sha256)));
    assert!(!format!("{s:?}").contains("ab"), "Debug shows no key bytes");
    // Without the trailing ':' too, as the kernel takes it.
    assert!(DhchapSecret::parse(text.trim_end_matches(':').as_bytes()).is_ok());
    let mut bad_crc = text.to_string();
    bad_crc.replace_range(12..13, if &bad_crc[12..13] == "A" { "B" } else { "A" });
    for bad in [
        "".to_string(),
        "DHHC-2:01:AAAA:".into(),
        text.replace("DHHC-1:01:", "DHHC-1:04:"),
        text.replace("DHHC-1:01:", "DHHC-1:1:"),
        "DHHC-1:00:AAAA:".into(),
        "DHHC-1:00:!!!!:".into(),
        bad_crc,
    ] {
        assert!(DhchapSecret::parse(bad.as_bytes()).is_err(), "{bad}");
    }
    assert!(DhchapSecret::parse(&[0xff, 0xfe]).is_err());
}

#[test]
fn transformed_keys_depend_on_the_nqn() {
    let s = secret(4, 32, Some(HashId::Sha256));
    assert_ne!(*s.transformed("nqn.a"), *s.transformed("nqn.b"));
    assert_eq!(s.transformed("nqn.a").len(), 32);
    let plain = secret(4, 32, None);
    assert_eq!(*plain.transformed("nqn.a"), vec![4u8; 32]);
}

#[test]
fn messages_round_trip() {
    let ms = [
        Message::Negotiate {
            tid: 3,
            sc_c: 0,
            hashes: vec![1, 2, 3],
            groups: vec![0, 1],
        },
        Message::Challenge {
            tid: 3,
            hash: 1,
            group: 1,
            seqnum: 77,
            challenge: vec![9; 32],
            dh_value: vec![8; 256],
        },
        Message::Reply {
            tid: 3,
            response: vec![1; 48],
            challenge: Some(vec![2; 48]),
            seqnum: 5,
            dh_value: vec![],
        },
        Message::Reply {
            tid: 3,
            response: vec![1; 32],
            challenge: None,
            seqnum: 0,
            dh_value: vec![4; 256],
        },
        Message::Success1 {
            tid: 3,
            hl: 32,
            response: Some(vec![6; 32]),
        },
        Message::Success1 {
            tid: 3,
            hl: 32,
            response: None,
        },
        Message::Success2 { tid: 3 },
        Message::Failure1 { tid: 3, why: 4 },
        Message::Failure2 { tid: 3, why: 1 },
    ];
    for m in ms {
        let mut b = m.encode();
        assert_eq!(Message::parse(&b).unwrap(), m);
        b.resize(4096, 0);
        assert_eq!(Message::parse(&b).unwrap(), m, "padding is ignored");
    }
}

use messages::Message;

#[test]
fn garbage_never_authenticates_nor_panics() {
    use rand::{Rng, SeedableRng};
    let k = keys(secret(1, 32, None), Some(secret(2, 32, None)));
    let mut rng = rand::rngs::SmallRng::seed_from_u64(0xa117);
    let valid = Message::Negotiate {
        tid: 1,
        sc_c: 0,
        hashes: vec![1],
        groups: vec![0],
    }
    .encode();
    for round in 0..3000 {
        let mut c = CtrlAuth::new(std::sync::Arc::new(k.clone()), HOST, SUBSYS);
        for _ in 0..rng.gen_range(1..6) {
            let mut m = match rng.gen_range(0..3) {
                // Random bytes of any length.
                0 => (0..rng.gen_range(0..600))
                    .map(|_| rng.gen())
                    .collect::<Vec<u8>>(),
                // A valid Negotiate with bytes flipped.
                1 => valid.clone(),
                // A header that claims a message type, then noise.
                _ => {
                    let mut v: Vec<u8> = (0..rng.gen_range(8..400)).map(|_| rng.gen()).collect();
                    v[0] = rng.gen_range(0..2);
                    v[1] = [0, 1, 2, 3, 4, 0xf0, 0xf1][rng.gen_range(0..7)];
                    v
                }
            };
            if !m.is_empty() && rng.gen_bool(0.5) {
                let at = rng.gen_range(0..m.len());
                m[at] ^= 1 << rng.gen_range(0..8);
            }
            c.send(&m);
            if rng.gen_bool(0.5) {
                let r = c.receive();
                assert!(
                    Message::parse(&r).is_ok(),
                    "round {round}: the controller's own message"
                );
            }
            let _ = Message::parse(&m);
        }
        assert!(!c.authenticated(), "round {round}");
    }
}
