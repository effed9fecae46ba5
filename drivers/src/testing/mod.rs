//! Fault-injecting wrappers for tests, not drivers: bdevs that misbehave on purpose so tests can
//! check how the engine copes. They are compiled into the crate (not `cfg(test)`) so the
//! integration tests of the other crates can use them; nothing registers them as drivers, so no
//! RPC or configuration can create one.
//!
//! - [`fault`]: delays requests by a random number of polls and injects I/O errors.
//! - [`powercut`]: a RAM disk with a volatile write cache that a simulated power cut loses.

pub mod fault;
pub mod powercut;
