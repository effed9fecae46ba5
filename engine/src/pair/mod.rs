//! Pairs: a primary volume P mirrored to a secondary S, split at an instant, resynced after.
//!
//! A [`Pair`] holds everything about one pair in one place (configuration, state, split point,
//! error, the pending, changed and restore track sets, per-track locks, counters), shaped so
//! that it can be persisted and restored as a whole.
//!
//! Who does what:
//! - hosts reach P and the image through [`channel::PairChannel`]s (the channels of the
//!   [`channel::PairView`] bdevs, primary and image), one per reactor;
//! - the copier poller ([`copier`]) copies pending tracks P to S (and, in a restore, S to P);
//! - the control poller ([`control`]) applies transitions that must not interleave with host
//!   writes (split, resync): it closes the gate of the pairs involved, waits for the writes in
//!   flight to finish, applies the transition and reopens the gate. That wait is bounded by one
//!   host write, not by the volume size or the pending set.
//!
//! Where things are:
//! - `state.rs`: the [`Pair`] type, its configuration, state and accessors;
//! - `transitions.rs`: how the state changes (split, resync, end of copy, suspension) and what
//!   host writes pass and wait for meanwhile (the gate, mirrored writes in flight, a backup);
//! - `persistence.rs`: what a pair keeps in its [`metadata`] and when it is durable;
//! - `stats.rs`: its counters, what `pair_get` reports, and the watch on host activity;
//! - [`bitmap`]: the track sets and track locks.

pub mod bitmap;
pub mod channel;
pub mod checkpoints;
pub mod control;
pub mod copier;
pub mod metadata;
mod persistence;
pub mod split_journal;
mod state;
mod stats;
mod transitions;
pub(crate) mod zero_copy;

pub(crate) use persistence::{Durability, HostWrite};
pub use state::{now_ns, Pair, PairConfig, PairError, PairState, DEFAULT_TRACK_SIZE, MAX_TRACKS};
pub(crate) use stats::HostWatch;
pub use stats::{PairInfo, PairStats};
