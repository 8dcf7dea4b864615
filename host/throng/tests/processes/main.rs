//! The tests that run the `throng` binary as a user, an operator or a fault
//! injector would, in one test binary: each file was its own once, and a
//! release link of this crate's dependencies costs about half a minute.
#![cfg(unix)]

mod common;

mod cli;
mod cluster;
mod control_cli;
mod durability;
mod faults;
mod load;
mod readme;
mod reload;
