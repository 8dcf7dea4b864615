//! The host's check of a Wasm filter's verdicts.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| throng_edge::fuzzing::filter_verdicts(data));
