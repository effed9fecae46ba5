//! The quicksplit engine.
//!
//! This crate owns everything that runs: the [`reactor`]s (pinned poller threads and the
//! lock-free rings between them), CPU [`topology`], pairs with their split, copy and backup
//! jobs, the JSON-RPC control plane, the NBD server, and the `quicksplit` binary.

pub mod app;
pub mod backup;
pub mod export;
pub mod nbd;
pub mod nvmf;
pub mod pair;
pub mod rate;
pub mod reactor;
pub mod rpc;
pub mod topology;
pub mod units;
