//! Modbus/TCP and MODBUS/TCP Security: frame codec, listeners, TLS
//! handshakes, sessions, upstream pools and the simulated PLC used by
//! `sluice demo` and the tests.

pub mod access;
pub mod frame;
pub mod generation;
pub mod listener;
pub mod mirror;
pub mod pdu;
pub mod registry;
pub mod session;
pub mod session_threads;
pub mod sim;
pub mod tls;
pub mod upstream;
mod upstream_io;
