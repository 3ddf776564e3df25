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

#[test]
fn a_live_restore_serves_the_disk_at_once_keeps_writes_resumes_and_ends_standalone() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    ours(&["repo", "init", s(&repo), "--chunk-size", "64K"]);
    let disk = dir.path().join("disk.raw");
    // Data, zeros and a hole; not a whole number of chunks.
    let mut rng = Rng(16);
    let mut data = rng.bytes(3 << 20);
    data.extend(vec![0u8; 1 << 20]);
    data.extend(rng.bytes((2 << 20) + 12288));
    std::fs::write(&disk, &data).unwrap();
    let file = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
    file.set_len(8 << 20).unwrap();
    drop(file);
    ours(&["backup", s(&disk), "--repo", s(&repo), "--disk", "vm"]);
    // What the restored disk must hold at the end: the snapshot under the writes.
    let expect = dir.path().join("expect.raw");
    std::fs::copy(&disk, &expect).unwrap();
    let writes = [
        "write -P 0x61 1M 64k",
        "write -P 0x62 5000k 4k",
        "write -z 7M 128k",
    ];
    let out = qemu_io(s(&expect), &writes);
    assert!(out.status.success(), "{}", stderr(&out));

    let out_image = dir.path().join("restored.qcow2");
    let socket = dir.path().join("nbd.sock");
    let uri = format!("nbd+unix:///?socket={}", socket.display());
    let live = |speed: Option<&str>, log: std::fs::File| {
        let mut args = vec![
            "restore",
            "--repo",
            s(&repo),
            "vm",
            s(&out_image),
            "--live",
            "--socket",
            s(&socket),
        ];
        if let Some(speed) = speed {
            args.extend(["--speed", speed]);
        }
        Running::start(&args, &socket, |c| {
            c.stderr(log);
        })
    };

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
    let same = run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "raw",
            s(&out_image),
            s(&expect),
        ],
    );
    assert!(same.status.success(), "{}", stdout(&same));
    let check = run("qemu-img", &["check", s(&out_image)]);
    assert!(check.status.success(), "{}", stdout(&check));
}
