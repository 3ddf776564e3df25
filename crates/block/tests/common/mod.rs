//! What the block crate's integration tests share: running QEMU's tools, the oracles.

#![allow(dead_code)] // each test file uses a different part

use std::path::Path;
use std::process::Command;

/// Runs a program the tests require (qemu-img, qemu-io).
pub fn run(program: &str, args: &[&str]) -> std::process::Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

/// Runs a program that must succeed; returns its stdout.
pub fn ok(program: &str, args: &[&str]) -> String {
    let out = run(program, args);
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A path as the &str command lines want.
pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}
