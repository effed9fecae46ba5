//! The controller's side of DH-HMAC-CHAP for one queue. The host drives the exchange: each
//! AUTH_Send brings a message ([`CtrlAuth::send`]), each AUTH_Receive asks for the next one
//! ([`CtrlAuth::receive`]). A message out of order, a wrong response or an unusable proposal
//! turns the next AUTH_Receive into a Failure1; the queue is authenticated only once the host
//! proved it holds its key (and, when it asked, accepted the controller's proof).

use std::sync::Arc;

use zeroize::Zeroizing;

use super::dh::{DhGroup, KeyPair};
use super::messages::{why, Message};
use super::{random, random_seqnum, same, AuthError, HashId, HostKeys, Role, Transcript};

/// What happened to an AUTH_Send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendOutcome {
    /// Taken; the exchange goes on (or is complete, see [`CtrlAuth::authenticated`]).
    Accepted,
    /// The host ended the exchange as failed (Failure2), with its explanation.
    HostGaveUp(u8),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Waiting for AUTH_Negotiate.
    Negotiate,
    /// The next AUTH_Receive returns the challenge.
    Challenge,
    /// Waiting for the Reply.
    Reply,
    /// The next AUTH_Receive returns Success1.
    Success1,
    /// Waiting for Success2 (bidirectional).
    Success2,
    /// The next AUTH_Receive returns Failure1 with this explanation.
    Failure1(u8),
    /// Finished, either way.
    Done,
}

/// One queue's authentication state.
pub struct CtrlAuth {
    keys: Arc<HostKeys>,
    hostnqn: String,
    subnqn: String,
    step: Step,
    tid: u16,
    hash: HashId,
    group: DhGroup,
    keypair: Option<KeyPair>,
    c1: Vec<u8>,
    s1: u32,
    /// The host's challenge and sequence number, when it authenticates the controller.
    c2: Option<(Vec<u8>, u32)>,
    session_key: Option<Zeroizing<Vec<u8>>>,
    authenticated: bool,
    /// Why it failed, once it did.
    failure: Option<String>,
}

impl CtrlAuth {
    /// A queue of host `hostnqn` on subsystem `subnqn`, which must authenticate with `keys`.
    pub fn new(keys: Arc<HostKeys>, hostnqn: &str, subnqn: &str) -> Self {
        Self {
            keys,
            hostnqn: hostnqn.to_string(),
            subnqn: subnqn.to_string(),
            step: Step::Negotiate,
            tid: 0,
            hash: HashId::Sha256,
            group: DhGroup::Null,
            keypair: None,
            c1: Vec::new(),
            s1: 0,
            c2: None,
            session_key: None,
            authenticated: false,
            failure: None,
        }
    }

    /// The host has authenticated (and the controller too, when asked).
    pub fn authenticated(&self) -> bool {
        self.authenticated
    }

    /// Why the exchange failed, once it has (for the log).
    pub fn failure(&self) -> Option<&str> {
        self.failure.as_deref()
    }

    /// The hash and DH group chosen (for the log).
    pub fn chosen(&self) -> (HashId, DhGroup) {
        (self.hash, self.group)
    }

    fn fail(&mut self, explanation: u8, detail: impl Into<String>) {
        self.step = Step::Failure1(explanation);
        self.authenticated = false;
        self.failure = Some(detail.into());
    }

    /// An AUTH_Send's data.
    pub fn send(&mut self, data: &[u8]) -> SendOutcome {
        let m = match Message::parse(data) {
            Ok(m) => m,
            Err(e) => {
                self.fail(why::INCORRECT_PAYLOAD, e.to_string());
                return SendOutcome::Accepted;
            }
        };
        match (self.step, m) {
            // A Negotiate (re)starts the exchange at any point.
            (
                _,
                Message::Negotiate {
                    tid,
                    sc_c,
                    hashes,
                    groups,
                },
            ) => {
                self.tid = tid;
                self.c2 = None;
                self.session_key = None;
                self.negotiate(sc_c, &hashes, &groups);
            }
            (_, m) if m.tid() != self.tid => self.fail(
                why::INCORRECT_PAYLOAD,
                format!("{} in transaction {}, not {}", m.name(), m.tid(), self.tid),
            ),
            (
                Step::Reply,
                Message::Reply {
                    response,
                    challenge,
                    seqnum,
                    dh_value,
                    ..
                },
            ) => self.reply(&response, challenge, seqnum, &dh_value),
            (Step::Success2, Message::Success2 { .. }) => {
                self.authenticated = true;
                self.step = Step::Done;
            }
            (_, Message::Failure2 { why, .. }) => {
                self.authenticated = false;
                self.step = Step::Done;
                self.failure = Some(format!(
                    "the host refused the controller: {}",
                    super::messages::explain(why)
                ));
                return SendOutcome::HostGaveUp(why);
            }
            (_, m) => self.fail(why::INCORRECT_MESSAGE, format!("unexpected {}", m.name())),
        }
        SendOutcome::Accepted
    }

    fn negotiate(&mut self, sc_c: u8, hashes: &[u8], groups: &[u8]) {
        if sc_c != 0 {
            return self.fail(
                why::CONCAT_MISMATCH,
                "secure channel concatenation is not offered",
            );
        }
        // SHA-256 when offered, else the first hash offered that is known.
        let hash = hashes
            .iter()
            .copied()
            .find(|&h| h == HashId::Sha256.id())
            .or_else(|| {
                hashes
                    .iter()
                    .copied()
                    .find(|&h| HashId::from_id(h).is_some())
            })
            .and_then(HashId::from_id);
        let Some(hash) = hash else {
            return self.fail(why::HASH_UNUSABLE, "no hash function in common");
        };
        // A Diffie-Hellman exchange when the host offers one this side has.
        let group = [DhGroup::Ffdhe2048, DhGroup::Null]
            .into_iter()
            .find(|g| groups.contains(&g.id()));
        let Some(group) = group else {
            return self.fail(why::DHGROUP_UNUSABLE, "no DH group in common");
        };
        self.hash = hash;
        self.group = group;
        self.step = Step::Challenge;
    }

    fn reply(&mut self, response: &[u8], c2: Option<Vec<u8>>, s2: u32, dh_value: &[u8]) {
        let hl = self.hash.digest_len();
        if response.len() != hl || c2.as_ref().is_some_and(|c| c.len() != hl) {
            return self.fail(why::INCORRECT_PAYLOAD, "a response of the wrong length");
        }
        self.session_key = match (&self.keypair, dh_value.is_empty()) {
            (None, true) => None,
            (Some(kp), false) => match kp.shared(dh_value) {
                Ok(k) => Some(k),
                Err(e) => return self.fail(why::DHGROUP_UNUSABLE, e.to_string()),
            },
            _ => {
                return self.fail(
                    why::INCORRECT_PAYLOAD,
                    "a DH value that does not match the group",
                )
            }
        };
        let expected = self
            .transcript(&self.c1, self.s1)
            .response(&self.keys.key, Role::Host);
        if !same(&expected, response) {
            return self.fail(why::FAILED, "the host's response does not match its key");
        }
        match c2 {
            // Sequence number 0: the host carries C2 without asking for a proof.
            Some(c) if s2 != 0 => {
                if self.keys.ctrl_key.is_none() {
                    return self.fail(
                        why::FAILED,
                        "the host asks the controller to authenticate, and no controller key is set",
                    );
                }
                self.c2 = Some((c, s2));
            }
            _ => self.authenticated = true,
        }
        self.step = Step::Success1;
    }

    fn transcript<'a>(&'a self, challenge: &'a [u8], seqnum: u32) -> Transcript<'a> {
        Transcript {
            hash: self.hash,
            challenge,
            session_key: self.session_key.as_deref().map(|k| &k[..]),
            seqnum,
            tid: self.tid,
            hostnqn: &self.hostnqn,
            subnqn: &self.subnqn,
        }
    }

    /// The data of an AUTH_Receive: the next message.
    pub fn receive(&mut self) -> Vec<u8> {
        let tid = self.tid;
        match self.step {
            Step::Challenge => match self.challenge() {
                Ok(m) => {
                    self.step = Step::Reply;
                    m.encode()
                }
                Err(e) => {
                    self.fail(why::FAILED, e.to_string());
                    self.receive()
                }
            },
            Step::Success1 => {
                let response = self.c2.as_ref().and_then(|(c2, s2)| {
                    let key = self.keys.ctrl_key.as_ref()?;
                    Some(self.transcript(c2, *s2).response(key, Role::Controller))
                });
                self.step = match response {
                    Some(_) => Step::Success2,
                    None => Step::Done,
                };
                Message::Success1 {
                    tid,
                    hl: self.hash.digest_len() as u8,
                    response,
                }
                .encode()
            }
            Step::Failure1(why) => {
                self.step = Step::Done;
                Message::Failure1 { tid, why }.encode()
            }
            Step::Negotiate | Step::Reply | Step::Success2 | Step::Done => {
                self.fail(why::INCORRECT_MESSAGE, "AUTH_Receive out of order");
                self.step = Step::Done;
                Message::Failure1 {
                    tid,
                    why: why::INCORRECT_MESSAGE,
                }
                .encode()
            }
        }
    }

    fn challenge(&mut self) -> Result<Message, AuthError> {
        let mut c1 = vec![0u8; self.hash.digest_len()];
        random(&mut c1)?;
        self.s1 = random_seqnum()?;
        self.keypair = match self.group {
            DhGroup::Null => None,
            DhGroup::Ffdhe2048 => Some(KeyPair::generate()?),
        };
        self.c1 = c1.clone();
        Ok(Message::Challenge {
            tid: self.tid,
            hash: self.hash.id(),
            group: self.group.id(),
            seqnum: self.s1,
            challenge: c1,
            dh_value: self
                .keypair
                .as_ref()
                .map_or_else(Vec::new, |k| k.public().to_vec()),
        })
    }
}
