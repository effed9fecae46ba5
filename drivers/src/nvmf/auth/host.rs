//! The host's side of DH-HMAC-CHAP: run once per queue right after a Connect whose response
//! asks for authentication, over whatever carries AUTH_Send and AUTH_Receive.

use super::dh::{DhGroup, KeyPair};
use super::messages::{why, Message};
use super::{
    random, random_seqnum, same, AuthError, HashId, HostKeys, Role, Transcript, RECEIVE_LEN,
};

/// What carries the messages: AUTH_Send and AUTH_Receive on one queue.
pub trait AuthTransport {
    /// AUTH_Send with `data`.
    fn auth_send(&mut self, data: &[u8]) -> Result<(), AuthError>;
    /// AUTH_Receive of at most `len` bytes.
    fn auth_receive(&mut self, len: u32) -> Result<Vec<u8>, AuthError>;
}

/// Gives up with a Failure2 (best effort: the error that caused it is what is reported).
fn give_up(t: &mut impl AuthTransport, tid: u16, why: u8, e: AuthError) -> AuthError {
    // The controller learns why; if even that fails, the original error still stands.
    let _ = t.auth_send(&Message::Failure2 { tid, why }.encode());
    e
}

/// Authenticates host `hostnqn` to subsystem `subnqn` with `keys` over `t`; with a controller
/// key, the controller must authenticate too. `tid` is the transaction id to use.
pub fn authenticate(
    t: &mut impl AuthTransport,
    keys: &HostKeys,
    hostnqn: &str,
    subnqn: &str,
    tid: u16,
) -> Result<(), AuthError> {
    let negotiate = Message::Negotiate {
        tid,
        sc_c: 0,
        hashes: vec![
            HashId::Sha256.id(),
            HashId::Sha384.id(),
            HashId::Sha512.id(),
        ],
        groups: vec![DhGroup::Ffdhe2048.id(), DhGroup::Null.id()],
    };
    t.auth_send(&negotiate.encode())?;
    let (hash, group, s1, c1, ctrl_value) = match Message::parse(&t.auth_receive(RECEIVE_LEN)?)? {
        Message::Challenge {
            tid: got,
            hash,
            group,
            seqnum,
            challenge,
            dh_value,
        } if got == tid => (hash, group, seqnum, challenge, dh_value),
        Message::Failure1 { why, .. } => return Err(AuthError::Refused(why)),
        other => {
            let e = AuthError::Protocol(format!("expected a Challenge, got {}", other.name()));
            return Err(give_up(t, tid, why::INCORRECT_MESSAGE, e));
        }
    };
    let Some(hash) = HashId::from_id(hash) else {
        let e = AuthError::Protocol(format!("the controller chose unknown hash {hash}"));
        return Err(give_up(t, tid, why::HASH_UNUSABLE, e));
    };
    let Some(group) = DhGroup::from_id(group) else {
        let e = AuthError::Protocol(format!(
            "the controller chose DH group {group}, not offered"
        ));
        return Err(give_up(t, tid, why::DHGROUP_UNUSABLE, e));
    };
    if c1.len() != hash.digest_len() || ctrl_value.len() != group.value_len() {
        let e = AuthError::Protocol("a Challenge with wrong lengths".into());
        return Err(give_up(t, tid, why::INCORRECT_PAYLOAD, e));
    }
    let (session_key, host_value) = match group {
        DhGroup::Null => (None, Vec::new()),
        DhGroup::Ffdhe2048 => {
            let kp = KeyPair::generate()?;
            match kp.shared(&ctrl_value) {
                Ok(k) => (Some(k), kp.public().to_vec()),
                Err(e) => return Err(give_up(t, tid, why::DHGROUP_UNUSABLE, e)),
            }
        }
    };
    let respond = |challenge: &[u8], seqnum: u32, key: &super::DhchapSecret, role: Role| {
        Transcript {
            hash,
            challenge,
            session_key: session_key.as_deref().map(|k| &k[..]),
            seqnum,
            tid,
            hostnqn,
            subnqn,
        }
        .response(key, role)
    };
    let response = respond(&c1, s1, &keys.key, Role::Host);
    // Bidirectional: a challenge of our own for the controller.
    let c2 = match &keys.ctrl_key {
        Some(key) => {
            let mut c = vec![0u8; hash.digest_len()];
            random(&mut c)?;
            Some((c, random_seqnum()?, key))
        }
        None => None,
    };
    let reply = Message::Reply {
        tid,
        response,
        challenge: c2.as_ref().map(|(c, _, _)| c.clone()),
        seqnum: c2.as_ref().map_or(0, |(_, s, _)| *s),
        dh_value: host_value,
    };
    t.auth_send(&reply.encode())?;
    match Message::parse(&t.auth_receive(RECEIVE_LEN)?)? {
        Message::Success1 {
            tid: got, response, ..
        } if got == tid => {
            let Some((c2, s2, ctrl_key)) = c2 else {
                return Ok(());
            };
            let Some(r2) = response else {
                let e = AuthError::ControllerNotAuthentic("it sent no response");
                return Err(give_up(t, tid, why::FAILED, e));
            };
            if !same(&respond(&c2, s2, ctrl_key, Role::Controller), &r2) {
                let e = AuthError::ControllerNotAuthentic("its response does not match the key");
                return Err(give_up(t, tid, why::FAILED, e));
            }
            t.auth_send(&Message::Success2 { tid }.encode())
        }
        Message::Failure1 { why, .. } => Err(AuthError::Refused(why)),
        other => {
            let e = AuthError::Protocol(format!("expected Success1, got {}", other.name()));
            Err(give_up(t, tid, why::INCORRECT_MESSAGE, e))
        }
    }
}
