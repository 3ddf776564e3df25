//! `sidecar_bitmaps`: see the harness of the same name in `crates/fuzzing`.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzzing::sidecar_bitmaps(data));
