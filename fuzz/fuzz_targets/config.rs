//! edge-config text through `throng_edge::Config::parse`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| throng_edge::fuzzing::config(data));
