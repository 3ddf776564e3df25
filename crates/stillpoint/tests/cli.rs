//! The `stillpoint` binary against qemu-img, the oracle: `map` must print exactly what
//! `qemu-img map --output=json` prints for the same raw image, and bad input must give
//! one clear line and exit 1, never a panic.
//!
//! Images are generated from a seed, so a failure names the seed that reproduces it.

mod common;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use common::qemu_img;
use common::seeded_image;
use common::stderr;
use common::stdout;
use common::stillpoint;

fn assert_maps_agree(path: &Path, extra: &[&str], what: &str) -> String {
    let p = path.to_str().unwrap();
    let mut ours_args = vec!["map", "--output", "json"];
    ours_args.extend_from_slice(extra);
    ours_args.push(p);
    let ours = stillpoint(&ours_args);
    assert!(
        ours.status.success(),
        "{what}: stillpoint failed: {}",
        stderr(&ours)
    );
    let mut theirs_args = vec!["map", "--output=json", "-f", "raw"];
    theirs_args.extend_from_slice(extra);
    theirs_args.push(p);
    let theirs = qemu_img(&theirs_args);
    assert!(
        theirs.status.success(),
        "{what}: qemu-img failed: {}",
        stderr(&theirs)
    );
    assert_eq!(
        stdout(&ours),
        stdout(&theirs),
        "{what}: map differs from qemu-img's"
    );
    // Equal text is stronger than equal JSON, but check it parses as JSON too.
    serde_json::from_str::<serde_json::Value>(&stdout(&ours)).unwrap();
    stdout(&ours)
}

#[test]
fn map_equals_qemu_img_on_seeded_images() {
    let dir = tempfile::tempdir().unwrap();
    let (mut data_runs, mut zero_runs, mut multi_run_maps) = (0, 0, 0);
    for seed in 0..24 {
        let path = dir.path().join(format!("seed-{seed}.img"));
        let size = seeded_image(&path, seed);
        let map = assert_maps_agree(&path, &[], &format!("seed {seed} (size {size})"));
        data_runs += map.matches("\"data\": true").count();
        zero_runs += map.matches("\"zero\": true").count();
        multi_run_maps += usize::from(map.lines().count() > 2);
    }
    // The seeds must actually produce mixed images, or the comparison proves little.
    assert!(
        data_runs >= 20 && zero_runs >= 20 && multi_run_maps >= 10,
        "images too uniform: {data_runs} data runs, {zero_runs} zero runs, {multi_run_maps} mixed maps"
    );
}

#[test]
fn map_windows_equal_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("window.img");
    let size = seeded_image(&path, 7);
    let size_s = size.to_string();
    let past = (size + 100_000).to_string();
    for (start, len) in [
        ("0", "1"),
        ("4096", "8192"),
        ("1000", "100"),
        (&*size_s, "512"),
        (&*past, "1"),
    ] {
        assert_maps_agree(
            &path,
            &["--start-offset", start, "--max-length", len],
            &format!("start {start} length {len}"),
        );
    }
    assert_maps_agree(&path, &["--start-offset", "1K"], "start 1K");
}

#[test]
fn map_of_an_unaligned_4097_byte_image_matches_qemus_sector_rounding() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("odd.img");
    let file = File::create(&path).unwrap();
    file.write_all_at(b"x", 0).unwrap();
    file.set_len(4097).unwrap();
    assert_maps_agree(&path, &[], "4097 bytes, data then hole");
    file.write_all_at(&[1; 4097], 0).unwrap();
    assert_maps_agree(&path, &[], "4097 bytes of data");
    let out = stillpoint(&["map", "--output", "json", path.to_str().unwrap()]);
    assert!(
        stdout(&out).contains("\"start\": 4097, \"length\": 511"),
        "{}",
        stdout(&out)
    );
}

#[test]
fn map_of_an_empty_image_matches_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("empty.img");
    File::create(&path).unwrap();
    assert_maps_agree(&path, &[], "empty image");
}

#[test]
fn human_map_equals_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("human.img");
    seeded_image(&path, 3);
    let p = path.to_str().unwrap();
    let ours = stillpoint(&["map", p]);
    let theirs = qemu_img(&["map", "-f", "raw", p]);
    assert_eq!(stdout(&ours), stdout(&theirs));
}

#[test]
fn create_then_info_reports_what_qemu_img_reports() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("new.img");
    let p = path.to_str().unwrap();
    for (size, bytes) in [
        ("512", 512u64),
        ("64K", 65536),
        ("1M", 1 << 20),
        ("10G", 10 << 30),
        ("2T", 2 << 40),
    ] {
        let out = stillpoint(&["create", "-f", "raw", p, size]);
        assert!(out.status.success(), "{}", stderr(&out));
        assert_eq!(
            stdout(&out),
            format!("Formatting '{p}', fmt=raw size={bytes}\n")
        );
        let ours: serde_json::Value =
            serde_json::from_str(&stdout(&stillpoint(&["info", "--output", "json", p]))).unwrap();
        let theirs: serde_json::Value =
            serde_json::from_slice(&qemu_img(&["info", "--output=json", "-f", "raw", p]).stdout)
                .unwrap();
        for key in [
            "virtual-size",
            "format",
            "actual-size",
            "dirty-flag",
            "filename",
        ] {
            assert_eq!(ours[key], theirs[key], "{key} for size {size}");
        }
    }
    let human = stdout(&stillpoint(&["info", p]));
    assert!(
        human.contains("virtual size: 2 TiB (2199023255552 bytes)"),
        "{human}"
    );
}

#[test]
fn bad_input_gets_one_clear_line_and_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("ok.img");
    File::create(&image).unwrap().set_len(1 << 20).unwrap();
    let img = image.to_str().unwrap();
    let missing = dir.path().join("missing.img");
    let missing = missing.to_str().unwrap();
    let d = dir.path().to_str().unwrap();
    let qcow2 = dir.path().join("q.qcow2");
    assert!(
        qemu_img(&["create", "-q", "-f", "qcow2", qcow2.to_str().unwrap(), "1M"])
            .status
            .success()
    );
    let mut bytes = std::fs::read(&qcow2).unwrap();
    bytes[56..60].copy_from_slice(&u32::MAX.to_be_bytes());
    std::fs::write(&qcow2, bytes).unwrap();
    let cases: Vec<(Vec<&str>, String)> = vec![
        (
            vec!["map", "--output", "json", missing],
            format!("Could not open '{missing}': No such file or directory"),
        ),
        (
            vec!["info", missing],
            format!("Could not open '{missing}': No such file or directory"),
        ),
        (
            vec!["map", d],
            format!("Could not open '{d}': Is a directory"),
        ),
        (
            vec!["info", "--output", "json", d],
            format!("Could not open '{d}': Is a directory"),
        ),
        (
            vec!["create", "-f", "raw", img, "12Q"],
            "invalid size '12Q': unknown suffix".into(),
        ),
        (
            vec!["create", img, "-5"],
            "invalid size '-5': negative".into(),
        ),
        (
            vec!["create", img, "8E"],
            "invalid size '8E': too large".into(),
        ),
        (
            vec!["create", "/nonexistent-dir/x.img", "1M"],
            "Could not create '/nonexistent-dir/x.img': No such file or directory".into(),
        ),
        (
            vec!["map", "--start-offset", "-1", img],
            "invalid --start-offset: invalid size '-1': negative".into(),
        ),
        (
            vec!["map", "--start-offset", "99999999999999999999", img],
            "invalid size '99999999999999999999': too large".into(),
        ),
        (
            vec!["map", "--max-length", "18446744073709551616", img],
            "invalid size '18446744073709551616': too large".into(),
        ),
        (
            vec!["map", qcow2.to_str().unwrap()],
            "corrupt qcow2 image: the refcount table (4294967295 clusters) is larger than 8 MiB"
                .into(),
        ),
    ];
    for (args, expected) in cases {
        let out = stillpoint(&args);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(
            err.contains(&expected),
            "{args:?}: expected {expected:?} in {err:?}"
        );
        assert_eq!(err.lines().count(), 1, "{args:?}: one line, got {err:?}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert!(stdout(&out).is_empty(), "{args:?} printed {}", stdout(&out));
    }
    // Refusals left the good image untouched.
    assert_eq!(std::fs::metadata(&image).unwrap().len(), 1 << 20);
}

#[test]
fn map_past_the_end_is_empty_like_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("small.img");
    File::create(&path).unwrap().set_len(8192).unwrap();
    assert_maps_agree(&path, &["--start-offset", "1G"], "start past the end");
    assert_maps_agree(&path, &["--max-length", "0"], "zero length");
}
