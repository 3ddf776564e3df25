//! Every committed seed and every saved crash input runs through its harness in an
//! ordinary build: a crash the fuzzer found once (its input copied into
//! `fuzz/regressions/TARGET/`) fails this test until it is fixed, and stays fixed.

use std::path::Path;
use std::path::PathBuf;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz")
}

/// The files of `dir` (none when it does not exist), dotfiles skipped.
fn inputs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .filter(|p| !p.file_name().unwrap().to_string_lossy().starts_with('.'))
        .collect();
    files.sort();
    files
}

fn replay(target: &str, harness: fuzzing::Harness, extra: &[PathBuf]) -> usize {
    let mut files = inputs(&fuzz_dir().join("corpus").join(target));
    files.extend(inputs(&fuzz_dir().join("regressions").join(target)));
    files.extend_from_slice(extra);
    for file in &files {
        let data = std::fs::read(file).unwrap();
        eprintln!("{target}: {}", file.display());
        harness(&data);
    }
    files.len()
}

#[test]
fn every_seed_and_saved_crash_runs_cleanly_through_its_harness() {
    let generated = tempfile::tempdir().unwrap();
    let status = std::process::Command::new("bash")
        .arg(fuzz_dir().join("../scripts/fuzz.sh"))
        .args(["seeds", generated.path().to_str().unwrap()])
        .status()
        .expect("bash runs scripts/fuzz.sh");
    assert!(status.success(), "generating the qcow2 seeds failed");
    for &(target, harness) in fuzzing::TARGETS {
        let extra = if target == "qcow2_open" {
            inputs(generated.path())
        } else {
            Vec::new()
        };
        let n = replay(target, harness, &extra);
        assert!(n > 0, "{target} has no seeds");
    }
}

#[test]
fn every_harness_has_a_cargo_fuzz_target_and_a_regressions_folder() {
    let manifest = std::fs::read_to_string(fuzz_dir().join("Cargo.toml")).unwrap();
    for &(target, _) in fuzzing::TARGETS {
        assert!(
            manifest.contains(&format!("name = \"{target}\"")),
            "fuzz/Cargo.toml has no target {target}"
        );
        let source =
            std::fs::read_to_string(fuzz_dir().join("fuzz_targets").join(format!("{target}.rs")))
                .unwrap();
        assert!(source.contains(&format!("fuzzing::{target}(data)")));
        assert!(fuzz_dir().join("regressions").join(target).is_dir());
    }
}
