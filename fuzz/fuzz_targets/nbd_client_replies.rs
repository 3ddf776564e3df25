//! `nbd_client_replies`: see the harness of the same name in `crates/fuzzing`.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzzing::nbd_client_replies(data));
