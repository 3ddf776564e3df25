//! `stillpoint restore --repo R SNAPSHOT OUT.qcow2 --live --socket S`: the restoring
//! disk is served over NBD at once, takes writes while the snapshot streams in, cannot
//! be opened alone until the stream has finished, resumes when run again, and ends as
//! a standalone qcow2 image holding the snapshot under the writes. Judged by qemu-io,
//! qemu-img compare (also over NBD) and qemu-img check.

mod common;

use std::path::Path;

use common::*;

fn stderr_file(dir: &Path, name: &str) -> (std::path::PathBuf, std::fs::File) {
    let path = dir.join(name);
    let file = std::fs::File::create(&path).unwrap();
    (path, file)
}

fn wait_for(log: &Path, text: &str) {
    for _ in 0..3000 {
        if std::fs::read_to_string(log)
            .unwrap_or_default()
            .contains(text)
        {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    panic!(
        "never saw {text:?}: {}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

fn qemu_io(uri: &str, commands: &[&str]) -> std::process::Output {
    let mut args = vec!["-f", "raw", uri];
    for c in commands {
        args.extend(["-c", c]);
    }
    run("qemu-io", &args)
}

fn run(program: &str, args: &[&str]) -> std::process::Output {
    std::process::Command::new(program)
        .args(args)
        .output()
        .unwrap()
}

/// What the guest writes during a live restore.
const WRITES: [&str; 3] = [
    "write -P 0x61 1M 64k",
    "write -P 0x62 5000k 4k",
    "write -z 7M 128k",
];

/// A repository in `dir` with one snapshot of disk `vm` (data, zeros and a hole; not a
/// whole number of chunks), and `expect.raw`: that snapshot under [`WRITES`], what a
/// restored disk the guest wrote to must hold at the end.
fn snapshot_and_expected(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let repo = dir.join("repo");
    ours(&["repo", "init", s(&repo), "--chunk-size", "64K"]);
    let disk = dir.join("disk.raw");
    let mut rng = Rng(16);
    let mut data = rng.bytes(3 << 20);
    data.extend(vec![0u8; 1 << 20]);
    data.extend(rng.bytes((2 << 20) + 12288));
    std::fs::write(&disk, &data).unwrap();
    let file = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
    file.set_len(8 << 20).unwrap();
    drop(file);
    ours(&["backup", s(&disk), "--repo", s(&repo), "--disk", "vm"]);
    let expect = dir.join("expect.raw");
    std::fs::copy(&disk, &expect).unwrap();
    let out = qemu_io(s(&expect), &WRITES);
    assert!(out.status.success(), "{}", stderr(&out));
    (repo, expect)
}

/// `restore --live` of `vm` into `out_image`, served at `socket`, at `speed` (bytes
/// per second) or full speed, its stderr into `log`.
fn live(
    repo: &Path,
    out_image: &Path,
    socket: &Path,
    speed: Option<&str>,
    log: std::fs::File,
) -> Running {
    let mut args = vec![
        "restore",
        "--repo",
        s(repo),
        "vm",
        s(out_image),
        "--live",
        "--socket",
        s(socket),
    ];
    if let Some(speed) = speed {
        args.extend(["--speed", speed]);
    }
    Running::start(&args, socket, |c| {
        c.stderr(log);
    })
}

/// qemu-img's verdict on the restored qcow2 image against the expected raw one.
fn restored_as_expected(out_image: &Path, expect: &Path) -> std::process::Output {
    run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "raw",
            s(out_image),
            s(expect),
        ],
    )
}

#[test]
fn a_live_restore_serves_the_disk_at_once_keeps_writes_resumes_and_ends_standalone() {
    let dir = tempfile::tempdir().unwrap();
    let (repo, expect) = snapshot_and_expected(dir.path());
    let writes = WRITES;
    let out_image = dir.path().join("restored.qcow2");
    let socket = dir.path().join("nbd.sock");
    let uri = format!("nbd+unix:///?socket={}", socket.display());
    let live =
        |speed: Option<&str>, log: std::fs::File| live(&repo, &out_image, &socket, speed, log);

    // Slow, so the guest works while most of the disk is still in the repository.
    let (log, file) = stderr_file(dir.path(), "first.log");
    let first = live(Some("1M"), file);
    let out = qemu_io(&uri, &writes);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = qemu_io(
        &uri,
        &[
            "read -P 0x61 1M 64k",
            "read -P 0x62 5000k 4k",
            "read -P 0 7M 128k",
        ],
    );
    assert!(
        out.status.success() && !stdout(&out).contains("verification failed"),
        "{}",
        stdout(&out)
    );
    // The whole disk, over NBD, already reads as it must, streamed or not.
    let over_nbd = run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", &uri, s(&expect)],
    );
    assert!(over_nbd.status.success(), "{}", stdout(&over_nbd));
    // Interrupted: the image refuses to open alone instead of reading zeros.
    assert_ne!(first.stop(), Some(0));
    let said = std::fs::read_to_string(&log).unwrap();
    assert!(said.contains("run the same command to resume"), "{said}");
    let alone = run("qemu-img", &["compare", s(&out_image), s(&expect)]);
    assert!(!alone.status.success());
    assert!(
        stderr(&alone).contains("Could not open backing file"),
        "{}",
        stderr(&alone)
    );
    // Another image is not overwritten, and a raw target is refused.
    let refused = stillpoint(&[
        "restore",
        "--repo",
        s(&repo),
        "vm",
        s(&expect),
        "--live",
        "--socket",
        s(&socket),
    ]);
    assert!(!refused.status.success());
    assert!(stderr(&refused).contains("exists"), "{}", stderr(&refused));

    // Resumed at full speed: it finishes, and the writes are still there.
    let (log, file) = stderr_file(dir.path(), "second.log");
    let second = live(None, file);
    wait_for(&log, "restored:");
    let said = std::fs::read_to_string(&log).unwrap();
    assert!(said.contains("resuming"), "{said}");
    assert_eq!(second.stop(), Some(0));
    let info = run("qemu-img", &["info", "--output=json", s(&out_image)]);
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert!(info.get("backing-filename").is_none(), "{info}");
    let same = restored_as_expected(&out_image, &expect);
    assert!(same.status.success(), "{}", stdout(&same));
    let check = run("qemu-img", &["check", s(&out_image)]);
    assert!(check.status.success(), "{}", stdout(&check));
}

/// A live restore killed (SIGKILL) while it streams, after the guest's writes were
/// acknowledged and flushed: the image checks without corruption, still refuses to
/// open alone, and the same command resumes it to the snapshot under the writes.
#[test]
fn a_live_restore_killed_mid_stream_keeps_the_guests_writes_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let (repo, expect) = snapshot_and_expected(dir.path());
    let out_image = dir.path().join("restored.qcow2");
    let socket = dir.path().join("nbd.sock");
    let uri = format!("nbd+unix:///?socket={}", socket.display());
    let (_, file) = stderr_file(dir.path(), "first.log");
    let first = live(&repo, &out_image, &socket, Some("1M"), file);
    let mut writes = WRITES.to_vec();
    writes.push("flush");
    let out = qemu_io(&uri, &writes);
    assert!(out.status.success(), "{}", stderr(&out));
    // Some of the stream lands first (1 MiB/s), then SIGKILL (what dropping it
    // sends): no handler runs.
    std::thread::sleep(std::time::Duration::from_millis(300));
    drop(first);
    let _ = std::fs::remove_file(&socket);
    // qemu-img check of the image itself (its backing name opens nothing, by design):
    // exit 0 clean, 3 leaked clusters only; 2 would be corruption.
    let alone = format!(
        r#"json:{{"driver":"qcow2","backing":null,"file":{{"driver":"file","filename":"{}"}}}}"#,
        out_image.display()
    );
    let check = run("qemu-img", &["check", &alone]);
    assert!(
        matches!(check.status.code(), Some(0 | 3)),
        "{}{}",
        stdout(&check),
        stderr(&check)
    );
    let alone = run("qemu-img", &["compare", s(&out_image), s(&expect)]);
    assert!(
        stderr(&alone).contains("Could not open backing file"),
        "{}",
        stderr(&alone)
    );

    let (log, file) = stderr_file(dir.path(), "second.log");
    let second = live(&repo, &out_image, &socket, None, file);
    wait_for(&log, "restored:");
    assert!(std::fs::read_to_string(&log).unwrap().contains("resuming"));
    assert_eq!(second.stop(), Some(0));
    let same = restored_as_expected(&out_image, &expect);
    assert!(same.status.success(), "{}", stdout(&same));
}
