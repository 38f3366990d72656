//! Modbus/TCP: frame codec, listeners, sessions, upstream pools and the
//! simulated PLC used by `sluice demo` and the tests.

pub mod frame;
pub mod pdu;
pub mod access;
pub mod sim;
pub mod upstream;
pub mod generation;
pub mod listener;
pub mod registry;
pub mod session;
