//! OPC UA front end: the connection guard in front of the server.

pub mod framing;
pub mod guard;
pub mod trust;
