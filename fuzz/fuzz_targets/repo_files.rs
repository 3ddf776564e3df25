//! `repo_files`: see the harness of the same name in `crates/fuzzing`.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzzing::repo_files(data));
