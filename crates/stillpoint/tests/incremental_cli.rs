//! Incremental backups from the command line (iotest 124's simple chain): a full
//! backup that creates a persistent bitmap in the qcow2 source, writes by QEMU's own
//! qemu-io (which maintains the bitmap), incrementals into qcow2 files backed by the
//! previous backup, and `restore` of each point; plus a crash that leaves the bitmap
//! inconsistent and an incremental refused because of it.

mod common;

use std::path::Path;
use std::process::Command;
use std::process::Stdio;
use std::time::Duration;

use common::*;

/// The guest-visible bytes of an image, as qemu-img reads them.
fn contents(image: &Path, dir: &Path) -> Vec<u8> {
    let raw = dir.join("view.raw");
    ok("qemu-img", &["convert", "-O", "raw", s(image), s(&raw)]);
    let bytes = std::fs::read(&raw).unwrap();
    std::fs::remove_file(raw).unwrap();
    bytes
}

fn qemu_io(image: &Path, commands: &[&str]) {
    let mut args = Vec::new();
    for c in commands {
        args.push("-c");
        args.push(c);
    }
    args.push(s(image));
    ok("qemu-io", &args);
}

fn chain(granularity: &str, target_cluster: &str) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let disk = d.join("disk.qcow2");
    ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", s(&disk), "24M"],
    );
    qemu_io(
        &disk,
        &["write -P 1 0 6M", "write -P 2 12M 2M", "write -z 20M 1M"],
    );

    // Full backup, starting the chain.
    ours(&[
        "backup",
        s(&disk),
        s(&d.join("full.qcow2")),
        "--target-format",
        "qcow2",
        "--bitmap",
        "daily",
        "--granularity",
        granularity,
    ]);
    let mut expected = vec![contents(&disk, d)];
    assert!(contents(&d.join("full.qcow2"), d) == expected[0]);

    let rounds: [&[&str]; 2] = [
        &[
            "write -P 3 100k 10k",
            "write -P 4 7M 300k",
            "write -z 13M 64k",
        ],
        &["write -z 0 200k", "write -P 5 23M 1M", "write -P 6 12M 4k"],
    ];
    let mut previous = "full.qcow2".to_string();
    for (i, writes) in rounds.iter().enumerate() {
        qemu_io(&disk, writes);
        let name = format!("inc{}.qcow2", i + 1);
        let target = d.join(&name);
        // The target: a qcow2 backed by the previous backup, with the cluster size
        // under test.
        ok(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                &format!("cluster_size={target_cluster}"),
                "-b",
                &previous,
                "-F",
                "qcow2",
                s(&target),
            ],
        );
        // The target names a backing file, so its format must be given: a probed
        // image never follows one.
        let summary = ours(&[
            "backup",
            s(&disk),
            s(&target),
            "--target-format",
            "qcow2",
            "--incremental",
            "--bitmap",
            "daily",
            "--json",
        ]);
        let summary: serde_json::Value = serde_json::from_str(&summary).unwrap();
        let copied = summary["bytes"].as_u64().unwrap();
        assert!(
            copied < 4 << 20,
            "round {i}: an incremental copied {copied} bytes"
        );
        expected.push(contents(&disk, d));
        let check = Command::new("qemu-img")
            .args(["check", s(&target)])
            .output()
            .unwrap();
        assert!(check.status.success(), "{}", stdout(&check));
        // Each point of the chain reads as the disk did at that backup.
        assert!(
            contents(&target, d) == expected[i + 1],
            "granularity {granularity}, target clusters {target_cluster}: incremental {} \
             differs from the disk at its backup",
            i + 1
        );
        let restored = d.join(format!("restored{i}.raw"));
        ours(&["restore", s(&target), s(&restored)]);
        assert!(std::fs::read(&restored).unwrap() == expected[i + 1]);
        previous = name;
    }
    // The older points are intact too.
    assert!(contents(&d.join("full.qcow2"), d) == expected[0]);
    assert!(contents(&d.join("inc1.qcow2"), d) == expected[1]);
    ok("qemu-img", &["check", s(&disk)]);
}

#[test]
fn incremental_chain_at_32k_64k_and_128k_granularity() {
    chain("32K", "64k");
    chain("64K", "64k");
    chain("128K", "64k");
}

#[test]
fn incremental_chain_into_targets_with_128k_clusters() {
    chain("64K", "128k");
}

#[test]
fn a_crash_leaves_the_bitmap_inconsistent_and_the_incremental_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let disk = d.join("disk.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", s(&disk), "8M"]);
    qemu_io(&disk, &["write -P 1 0 1M"]);
    ours(&[
        "backup",
        s(&disk),
        s(&d.join("full.qcow2")),
        "--target-format",
        "qcow2",
        "--bitmap",
        "daily",
    ]);
    // Open the disk for writing in a process that then dies without closing it.
    let socket = d.join("nbd.sock");
    let mut server = Command::new(env!("CARGO_BIN_EXE_stillpoint"))
        .args(["nbd", s(&disk), "--writable", "--socket", s(&socket)])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    for _ in 0..500 {
        if socket.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let uri = format!("nbd+unix:///?socket={}", socket.display());
    ok("qemu-io", &["-f", "raw", "-c", "write -P 9 2M 64k", &uri]);
    server.kill().unwrap();
    server.wait().unwrap();
    let info = ok("qemu-img", &["info", "-U", s(&disk)]);
    assert!(info.contains("in-use"), "{info}");
    let target = d.join("inc.qcow2");
    let out = stillpoint(&[
        "backup",
        s(&disk),
        s(&target),
        "--target-format",
        "qcow2",
        "--backing",
        "full.qcow2",
        "--incremental",
        "--bitmap",
        "daily",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("Bitmap 'daily' is inconsistent and cannot be used"),
        "{}",
        stderr(&out)
    );
    assert!(!target.exists(), "a refused backup left a target behind");
    // An incremental into a target that does not read through to the previous backup
    // would lose the unchanged clusters: refused before anything is written.
    for args in [
        vec![
            "backup",
            s(&disk),
            s(&d.join("x.raw")),
            "--incremental",
            "--bitmap",
            "daily",
        ],
        vec![
            "backup",
            s(&disk),
            s(&d.join("x.qcow2")),
            "--target-format",
            "qcow2",
            "--incremental",
            "--bitmap",
            "daily",
        ],
    ] {
        let out = stillpoint(&args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(
            stderr(&out).contains("needs a qcow2 target backed by the previous backup"),
            "{}",
            stderr(&out)
        );
    }
    assert!(!d.join("x.raw").exists() && !d.join("x.qcow2").exists());
}

#[test]
fn a_refused_backup_leaves_the_source_and_its_bitmaps_clean() {
    // The source is opened for writing (to store its bitmap), so every exit must close
    // it: a refusal after the open once left the bitmaps in use, i.e. inconsistent.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let disk = d.join("disk.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", s(&disk), "8M"]);
    ok("qemu-img", &["bitmap", "--add", s(&disk), "daily"]);
    let target = d.join("t.qcow2");
    for granularity in ["1000", "256"] {
        let out = stillpoint(&[
            "backup",
            s(&disk),
            s(&target),
            "--target-format",
            "qcow2",
            "--bitmap",
            "new",
            "--granularity",
            granularity,
        ]);
        assert_eq!(out.status.code(), Some(1));
        assert!(
            stderr(&out).contains("Granularity must be power of 2"),
            "{}",
            stderr(&out)
        );
    }
    let info = ok("qemu-img", &["info", "--output=json", s(&disk)]);
    assert!(!info.contains("in-use"), "{info}");
    assert!(info.contains("\"dirty-flag\": false"), "{info}");
    assert!(!target.exists());
    ok("qemu-img", &["check", s(&disk)]);
}
