//! The NBD protocol: wire constants and typed message builders shared by quicksplit's NBD
//! server (in the engine) and its NBD backup target (a client), and TLS for both.

pub mod proto;
pub mod stream;
pub mod tls;
