//! The host's check of a Wasm policy's tick plan.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| throng_edge::fuzzing::tick_plan(data));
