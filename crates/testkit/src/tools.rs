//! Running the external tools the tests take as oracles (qemu-img, qemu-io, nbdinfo...).
//! A missing tool is a test failure that names it, never a silent skip.

use std::path::Path;
use std::process::Command;
use std::process::Output;

/// Runs `program`, which the tests require, and returns what it did.
pub fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} is required for these tests: {e}"))
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

/// A path as the `&str` command lines want.
pub fn path_str(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}
