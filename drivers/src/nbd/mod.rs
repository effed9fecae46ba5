//! The NBD protocol: wire constants and typed message builders shared by quicksplit's NBD
//! server (in the engine) and its NBD backup target (a client).

pub mod proto;
pub mod stream;
