//! Token verification with an HS256 and an ES256 tenant configured.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| throng_edge::fuzzing::token(data));
