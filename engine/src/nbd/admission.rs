//! Which connections get a handshake, and for how long, so that clients that connect and stall
//! cannot lock the others out.
//!
//! A handshake runs on a thread of its own with blocking I/O; an honest client finishes it in
//! milliseconds. Three rules bound what stalled ones cost:
//! - a peer (a Unix-socket client process, by its pid; a TCP client, by its address) has at
//!   most [`MAX_HANDSHAKES_PER_PEER`] handshakes in progress; a connection over that is refused
//!   with a reason (an `NBD_REP_ERR_POLICY` reply to its first option) and closed;
//! - a handshake has a deadline for the whole negotiation, not per read (a client sending a
//!   byte now and then does not keep it open), and the deadline shrinks from
//!   [`HANDSHAKE_TIMEOUT`] to [`MIN_HANDSHAKE_TIMEOUT`] as the table of handshakes in progress
//!   fills;
//! - when [`MAX_HANDSHAKES`] are in progress, a new connection takes the place of the oldest
//!   one (whose socket is shut down): under a flood of stalled connections from many peers the
//!   oldest is almost surely one of them, and a new client still gets its turn.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::export::Stream;

/// Handshakes in progress at once, all peers together.
pub const MAX_HANDSHAKES: usize = 128;
/// Handshakes in progress at once from one peer (a client process on a Unix socket, a client
/// address on TCP). A client with several connections (multi-conn) opens them one after the
/// other, each handshake taking milliseconds, so this is far above what one needs.
pub const MAX_HANDSHAKES_PER_PEER: usize = 8;
/// Time for a whole handshake while the table is at most a quarter full.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time for a whole handshake that starts when the table is full.
pub const MIN_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(1);
/// Refused connections being told why at once; past that, they are closed without a reply.
pub const MAX_REFUSALS: usize = 16;
/// Time a refused connection has to send the option that gets the refusal.
pub const REFUSAL_TIMEOUT: Duration = Duration::from_secs(2);
/// At most one warning about refused or evicted connections per this (the others are counted
/// in the next one), so a flood of connections does not flood the log.
const WARN_EVERY: Duration = Duration::from_secs(1);

/// Who is on the other end of a connection, as far as the limits are concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    /// A process on a Unix socket.
    Process {
        /// Its pid.
        pid: i32,
        /// Its user.
        uid: u32,
    },
    /// A TCP client address.
    Host(IpAddr),
    /// Neither could be found out (all such connections count as one peer).
    Unknown,
}

impl Peer {
    /// The peer of `stream`.
    pub fn of(stream: &Stream) -> Peer {
        match stream {
            Stream::Unix(s) => match rustix::net::sockopt::socket_peercred(s) {
                Ok(c) => Peer::Process {
                    pid: c.pid.as_raw_nonzero().get(),
                    uid: c.uid.as_raw(),
                },
                Err(_) => Peer::Unknown,
            },
            Stream::Tcp(s) => s.peer_addr().map_or(Peer::Unknown, |a| Peer::Host(a.ip())),
        }
    }
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Peer::Process { pid, uid } => write!(f, "process {pid} (uid {uid})"),
            Peer::Host(a) => write!(f, "{a}"),
            Peer::Unknown => write!(f, "an unknown peer"),
        }
    }
}

/// The deadline of a handshake starting with `pending` in progress (itself included).
pub fn handshake_timeout(pending: usize) -> Duration {
    let quarter = MAX_HANDSHAKES / 4;
    if pending <= quarter {
        return HANDSHAKE_TIMEOUT;
    }
    let left = MAX_HANDSHAKES.saturating_sub(pending) as u32;
    let span = (MAX_HANDSHAKES - quarter) as u32;
    MIN_HANDSHAKE_TIMEOUT + (HANDSHAKE_TIMEOUT - MIN_HANDSHAKE_TIMEOUT) * left / span
}

struct Pending {
    peer: Peer,
    /// The same socket, to shut down when the handshake is evicted.
    sock: Stream,
}

/// The handshakes in progress.
#[derive(Default)]
pub struct Handshakes {
    pending: Mutex<BTreeMap<u64, Pending>>,
    next_id: AtomicU64,
    refusing: Arc<AtomicUsize>,
    warned: Mutex<Option<Instant>>,
    unwarned: AtomicU64,
}

/// A handshake's place in the table, given back when dropped.
pub struct Ticket {
    handshakes: Arc<Handshakes>,
    id: u64,
    deadline: Instant,
}

impl Ticket {
    /// When the handshake must be over.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.handshakes.table().remove(&self.id);
    }
}

/// A connection refused for now, and the reason it is told.
pub struct Refusal {
    /// Why, for the client and the log.
    pub reason: String,
}

impl Handshakes {
    fn table(&self) -> MutexGuard<'_, BTreeMap<u64, Pending>> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Handshakes in progress.
    pub fn in_progress(&self) -> usize {
        self.table().len()
    }

    /// A place for a handshake with `peer` over `stream`, or why not.
    pub fn admit(self: &Arc<Self>, peer: &Peer, stream: &Stream) -> Result<Ticket, Refusal> {
        let sock = stream.try_clone().map_err(|e| Refusal {
            reason: format!("the server cannot take the connection now: {e}"),
        })?;
        let mut table = self.table();
        if table.values().filter(|p| p.peer == *peer).count() >= MAX_HANDSHAKES_PER_PEER {
            return Err(Refusal {
                reason: format!(
                    "too many NBD handshakes in progress from {peer} \
                     (at most {MAX_HANDSHAKES_PER_PEER} at once): finish or close them first"
                ),
            });
        }
        if table.len() >= MAX_HANDSHAKES {
            if let Some((_, oldest)) = table.pop_first() {
                let _ = oldest.sock.shutdown();
                self.warn(format_args!(
                    "{MAX_HANDSHAKES} NBD handshakes in progress: the oldest, from {}, closed \
                     to make room for one from {peer}",
                    oldest.peer
                ));
            }
        }
        let deadline = Instant::now() + handshake_timeout(table.len() + 1);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        table.insert(
            id,
            Pending {
                peer: peer.clone(),
                sock,
            },
        );
        Ok(Ticket {
            handshakes: Arc::clone(self),
            id,
            deadline,
        })
    }

    /// Tells the client on `stream` why it is refused (on a thread of its own, with
    /// [`REFUSAL_TIMEOUT`]), or closes it at once when [`MAX_REFUSALS`] are being told already.
    pub fn refuse(&self, mut stream: Stream, peer: &Peer, refusal: Refusal) {
        self.warn(format_args!(
            "NBD connection from {peer} refused: {}",
            refusal.reason
        ));
        if self.refusing.fetch_add(1, Ordering::SeqCst) >= MAX_REFUSALS {
            self.refusing.fetch_sub(1, Ordering::SeqCst);
            return;
        }
        let refusing = Arc::clone(&self.refusing);
        let spawned = std::thread::Builder::new()
            .name("nbd_refuse".into())
            .spawn(move || {
                let deadline = Instant::now() + REFUSAL_TIMEOUT;
                if stream.set_mode(Some(REFUSAL_TIMEOUT)).is_ok() {
                    let mut s = Deadlined::new(&mut stream, deadline);
                    let _ = super::handshake::refuse(&mut s, &refusal.reason);
                }
                refusing.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            self.refusing.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// A warning, at most one per [`WARN_EVERY`]; the ones held back are counted in the next
    /// (and logged at debug).
    pub fn warn(&self, what: std::fmt::Arguments<'_>) {
        let mut warned = self.warned.lock().unwrap_or_else(PoisonError::into_inner);
        if warned.is_some_and(|at| at.elapsed() < WARN_EVERY) {
            self.unwarned.fetch_add(1, Ordering::Relaxed);
            tracing::debug!("{what}");
            return;
        }
        *warned = Some(Instant::now());
        let held_back = self.unwarned.swap(0, Ordering::Relaxed);
        if held_back > 0 {
            tracing::warn!("{what} ({held_back} more like it since the last warning)");
        } else {
            tracing::warn!("{what}");
        }
    }
}

/// A stream whose reads and writes fail once `deadline` has passed: the whole handshake has
/// that long, however the client spreads its bytes.
pub struct Deadlined<'a> {
    stream: &'a mut Stream,
    deadline: Instant,
}

impl<'a> Deadlined<'a> {
    /// `stream` (blocking) with `deadline`.
    pub fn new(stream: &'a mut Stream, deadline: Instant) -> Self {
        Self { stream, deadline }
    }

    fn time_left(&self) -> std::io::Result<()> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "handshake deadline passed",
            ));
        }
        self.stream.set_mode(Some(left))
    }
}

impl Read for Deadlined<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.time_left()?;
        self.stream.read(buf)
    }
}

impl Write for Deadlined<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.time_left()?;
        self.stream.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_deadline_shrinks_as_the_table_fills() {
        assert_eq!(handshake_timeout(1), HANDSHAKE_TIMEOUT);
        assert_eq!(handshake_timeout(MAX_HANDSHAKES / 4), HANDSHAKE_TIMEOUT);
        let half = handshake_timeout(MAX_HANDSHAKES / 2);
        assert!(
            half < HANDSHAKE_TIMEOUT && half > MIN_HANDSHAKE_TIMEOUT,
            "{half:?}"
        );
        assert!(handshake_timeout(MAX_HANDSHAKES - 1) < half);
        assert_eq!(handshake_timeout(MAX_HANDSHAKES), MIN_HANDSHAKE_TIMEOUT);
        assert_eq!(handshake_timeout(MAX_HANDSHAKES + 5), MIN_HANDSHAKE_TIMEOUT);
    }

    fn unix_pair() -> (Stream, std::os::unix::net::UnixStream) {
        let (a, b) = std::os::unix::net::UnixStream::pair().expect("pair");
        (Stream::Unix(a), b)
    }

    #[test]
    fn a_peer_over_its_limit_is_refused_and_a_full_table_evicts_the_oldest() {
        let h = Arc::new(Handshakes::default());
        let me = Peer::Host("10.0.0.1".parse().expect("address"));
        let mut tickets = Vec::new();
        let mut clients = Vec::new();
        for _ in 0..MAX_HANDSHAKES_PER_PEER {
            let (s, c) = unix_pair();
            tickets.push(h.admit(&me, &s).ok().expect("admitted"));
            clients.push(c);
        }
        let (s, _c) = unix_pair();
        let refused = h.admit(&me, &s).err().expect("over the limit");
        assert!(
            refused.reason.contains("too many NBD handshakes"),
            "{}",
            refused.reason
        );
        // A place given back is free again.
        tickets.pop();
        assert!(h.admit(&me, &s).is_ok());

        // Fill the table from other peers: the next one evicts the oldest, whose client sees
        // its connection end.
        let mut others = Vec::new();
        let mut n = 0u32;
        while h.in_progress() < MAX_HANDSHAKES {
            let (s, c) = unix_pair();
            let peer = Peer::Host(IpAddr::from([10, 1, (n / 200) as u8, (n % 200) as u8]));
            n += 1;
            others.push((h.admit(&peer, &s).ok().expect("room"), c));
        }
        let (s, _c) = unix_pair();
        let newcomer = Peer::Host("10.2.0.1".parse().expect("address"));
        let ticket = h.admit(&newcomer, &s).ok().expect("makes room");
        assert_eq!(h.in_progress(), MAX_HANDSHAKES);
        assert!(ticket.deadline() <= Instant::now() + MIN_HANDSHAKE_TIMEOUT);
        let mut byte = [0u8; 1];
        assert_eq!(clients[0].read(&mut byte).expect("end of stream"), 0);
    }
}
