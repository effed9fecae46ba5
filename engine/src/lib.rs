//! The quicksplit engine.
//!
//! This crate owns everything that runs: the [`reactor`]s (pinned poller threads and the
//! lock-free rings between them) and CPU [`topology`]; [`pair`]s with their split, copy before
//! write, background copier and crash-safe metadata; [`backup`] jobs and their targets;
//! [`verify`] jobs comparing P and S; the
//! [`export`] layer with its two protocols, [`nbd`] and [`nvmf`] (NVMe/TCP); the control plane
//! ([`app`]: the engine's state, one file per subsystem) and its JSON-RPC server ([`rpc`]); the
//! [`keyring`] of secrets in files, the [`logging`] set-up, the Prometheus [`metrics`] endpoint; and the `quicksplit` binary.

pub mod app;
pub mod backup;
pub mod export;
pub mod keyring;
pub mod logging;
pub mod metrics;
pub mod nbd;
pub mod nvmf;
pub mod pair;
pub mod rate;
pub mod reactor;
pub mod rpc;
pub mod staging;
pub mod topology;
pub mod units;
pub mod verify;
