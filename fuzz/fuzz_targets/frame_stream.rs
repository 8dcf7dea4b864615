//! host/wire's frame decoder fed a stream split at arbitrary points.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| throng_wire::fuzzing::frame_stream(data));
