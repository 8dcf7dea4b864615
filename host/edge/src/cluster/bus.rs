//! What edges say to each other on NATS: the subjects and messages of
//! `throng_wire::bus` (sans-IO, fuzzed there), named here as the rest of
//! `cluster/` has always named them.

pub use throng_wire::bus::*;
