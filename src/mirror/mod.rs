//! The read-only mirror: memory that contains the blocks of device tables
//! which the mirror pollers in `state` read, and from which sessions serve
//! reads that fall inside one block. The store does not depend on sessions or
//! pools, so other front ends can read it as typed snapshots.
//!
//! A reader takes the store from the current generation and requests a
//! range of a device: `generation.mirror.find("press-1")` returns the device's
//! `DeviceMirror`, and its `snapshot(kind, address, count, Instant::now())`
//! returns the values, when the oldest of them was polled, whether they are
//! fresh, and whether the device responded to its latest poll.

mod block;
mod store;

pub use block::{split, Piece};
pub use store::{DeviceMirror, Lookup, MirrorBlock, MirrorStore, Reachability, Snapshot};
