//! A probed format never opens host files: a guest's raw disk whose first sector the
//! guest wrote as a qcow2 header naming a host file as its backing file must not put
//! that host file into a backup or serve it over NBD, and a probed raw image refuses
//! writes that would make it probe as qcow2.

mod common;

use std::path::Path;
use std::path::PathBuf;

use common::Running;
use common::ok;
use common::ours;
use common::run;
use common::s;
use common::stderr;
use common::stillpoint;

const SECRET: &[u8] = b"root:$6$a-host-secret-that-must-never-leave:19000:0:99999:7:::\n";

/// A 4 MiB "raw guest disk" whose first bytes are a qcow2 header with the backing file
/// `secret` (what a guest can write to its own sector 0), and the secret itself.
fn evil_disk(dir: &Path) -> (PathBuf, PathBuf) {
    let secret = dir.join("shadow");
    std::fs::write(&secret, SECRET.repeat(64)).unwrap();
    let header = dir.join("header.qcow2");
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            s(&secret),
            "-F",
            "raw",
            s(&header),
            "4M",
        ],
    );
    let mut disk = std::fs::read(&header).unwrap();
    disk.resize(4 << 20, 0);
    let evil = dir.join("evil.raw");
    std::fs::write(&evil, &disk).unwrap();
    (evil, secret)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn a_probed_image_that_names_a_backing_file_is_refused_by_every_command() {
    let dir = tempfile::tempdir().unwrap();
    let (evil, _secret) = evil_disk(dir.path());
    let out_path = dir.path().join("out.raw");

    let backup = stillpoint(&["backup", s(&evil), s(&out_path)]);
    assert_eq!(backup.status.code(), Some(1), "{}", stderr(&backup));
    assert!(
        stderr(&backup).contains("--source-format qcow2"),
        "{}",
        stderr(&backup)
    );
    assert!(
        std::fs::read(&out_path).map_or(true, |b| !contains(&b, SECRET)),
        "a host file reached the backup"
    );
    for args in [
        vec!["info", s(&evil)],
        vec!["map", "--output", "json", s(&evil)],
        vec!["nbd", s(&evil), "--socket", "/nonexistent/never-bound.sock"],
    ] {
        let out = stillpoint(&args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("--format qcow2") && stderr(&out).contains("backing file"),
            "{args:?}: {}",
            stderr(&out)
        );
    }
}

#[test]
fn a_format_given_explicitly_is_trusted_either_way() {
    let dir = tempfile::tempdir().unwrap();
    let (evil, _secret) = evil_disk(dir.path());
    // As the guest's raw disk: the backup is the disk's own bytes, header and all.
    let out_path = dir.path().join("out.raw");
    ours(&["backup", s(&evil), s(&out_path), "--source-format", "raw"]);
    assert_eq!(
        std::fs::read(&out_path).unwrap(),
        std::fs::read(&evil).unwrap()
    );
    let info = ours(&["info", "--format", "raw", s(&evil)]);
    assert!(info.contains("file format: raw"), "{info}");
    // As a qcow2 image (the user says so): its backing file is followed.
    let chained = dir.path().join("chained.raw");
    ours(&["backup", s(&evil), s(&chained), "--source-format", "qcow2"]);
    assert!(contains(&std::fs::read(&chained).unwrap(), SECRET));
}

fn serve(image: &Path, socket: &Path, extra: &[&str]) -> Running {
    let mut args = vec!["nbd", s(image), "--socket", s(socket), "--writable"];
    args.extend_from_slice(extra);
    Running::start(&args, socket, |_| {})
}

/// qemu-io writes the bytes of `pattern_file` at offset 0 of the export.
fn write_start(socket: &Path, pattern_file: &Path) -> std::process::Output {
    let uri = format!("nbd+unix:///?socket={}", s(socket));
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            &format!("write -s {} 0 4", s(pattern_file)),
            &uri,
        ],
    )
}

#[test]
fn a_probed_raw_image_refuses_a_qcow2_header_in_its_first_sector() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("guest.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let magic = dir.path().join("magic");
    std::fs::write(&magic, b"QFI\xfb").unwrap();
    let plain = dir.path().join("plain");
    std::fs::write(&plain, b"boot").unwrap();

    let socket = dir.path().join("probed.sock");
    let server = serve(&disk, &socket, &[]);
    let refused = write_start(&socket, &magic);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&refused.stdout),
        String::from_utf8_lossy(&refused.stderr)
    );
    assert!(
        text.contains("Operation not permitted"),
        "the qcow2 magic was written: {text}"
    );
    // Ordinary data in sector 0 (a boot sector) is the guest's business.
    let allowed = write_start(&socket, &plain);
    assert!(
        allowed.status.success(),
        "{}",
        String::from_utf8_lossy(&allowed.stdout)
    );
    drop(server);
    assert_eq!(&std::fs::read(&disk).unwrap()[..4], b"boot");

    // With the format given, the guest may write what it likes.
    let socket = dir.path().join("given.sock");
    let _server = serve(&disk, &socket, &["--format", "raw"]);
    let written = write_start(&socket, &magic);
    assert!(
        !String::from_utf8_lossy(&written.stdout).contains("not permitted"),
        "{}",
        String::from_utf8_lossy(&written.stdout)
    );
}

#[test]
fn a_backup_into_an_existing_probed_raw_target_keeps_its_format_or_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let (evil, _secret) = evil_disk(dir.path());
    let target = dir.path().join("existing.raw");
    std::fs::write(&target, vec![0u8; 4 << 20]).unwrap();
    // The source's first sector looks like qcow2; writing it into a target whose format
    // was probed would make the target probe as qcow2 next time.
    let out = stillpoint(&["backup", s(&evil), s(&target), "--source-format", "raw"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("probed as raw"), "{}", stderr(&out));
    ours(&[
        "backup",
        s(&evil),
        s(&target),
        "--source-format",
        "raw",
        "--target-format",
        "raw",
    ]);
    assert_eq!(
        std::fs::read(&target).unwrap(),
        std::fs::read(&evil).unwrap()
    );
}
