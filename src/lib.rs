//! sluice: a protocol-aware OT security gateway. The binary in `main.rs` is a
//! thin command line over these parts; `DESIGN.md` describes how they fit.

pub mod admin;
pub mod audit;
pub mod collect;
pub mod config;
pub mod daemon;
pub mod demo;
pub mod detect;
pub mod events;
pub mod identity;
pub mod metrics;
pub mod mirror;
pub mod modbus;
pub mod opcua;
pub mod policy;
pub mod state;
pub mod tags;
