//! The read-only mirror: memory that holds the blocks of device tables
//! which the mirror pollers in `state` read, and from which sessions answer
//! reads that fall inside one block. The store knows nothing of sessions or
//! pools, so other front ends can read it as typed snapshots.

mod block;
mod store;

pub use block::{split, Piece};
pub use store::{DeviceMirror, Lookup, MirrorBlock, MirrorStore, Reachability, Snapshot};
