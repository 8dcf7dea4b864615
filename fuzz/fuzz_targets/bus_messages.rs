//! Bus messages as an edge reads them off NATS: see
//! `throng_wire::fuzzing::bus_messages`.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| throng_wire::fuzzing::bus_messages(data));
