//! `stillpoint nbd` against real NBD clients: qemu-io, qemu-img, nbdinfo, nbdcopy and
//! python3-libnbd.

mod common;

use std::io::BufRead;
use std::io::BufReader;
use std::path::Path;
use std::path::PathBuf;
use std::process::Child;
use std::process::Command;
use std::process::Stdio;
use std::time::Duration;

use common::qemu_img;
use common::seeded_image;
use common::stderr;
use common::stdout;

struct Server {
    child: Child,
    socket: PathBuf,
}

impl Server {
    // The child is reaped by Server's Drop, which clippy cannot see.
    #[allow(clippy::zombie_processes)]
    fn start(image: &Path, socket: &Path, extra: &[&str]) -> Server {
        let mut args = vec![
            "nbd",
            image.to_str().unwrap(),
            "--socket",
            socket.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let child = Command::new(env!("CARGO_BIN_EXE_stillpoint"))
            .args(&args)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        for _ in 0..500 {
            if socket.exists() {
                return Server {
                    child,
                    socket: socket.to_path_buf(),
                };
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("the NBD server did not create its socket");
    }

    fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }

    /// SIGTERM; returns the exit code.
    fn stop(mut self) -> Option<i32> {
        // SAFETY: kill(2) with SIGTERM on our child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.child.wait().unwrap().code()
    }
}

impl Drop for Server {
    /// A failing test must not leave the server running.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run(program: &str, args: &[&str]) -> std::process::Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} is required for these tests: {e}"))
}

#[test]
fn qemu_io_qemu_img_nbdinfo_and_nbdcopy_work_against_our_server() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    // An aligned size: qemu-img rounds the tail of an unaligned raw file up to a sector
    // locally, which an NBD export of the exact size cannot mirror.
    let size = seeded_image(&image, 21);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&image)
        .unwrap()
        .set_len(size.div_ceil(65536) * 65536)
        .unwrap();
    let server = Server::start(&image, &dir.path().join("nbd.sock"), &["--writable"]);
    let uri = server.uri("");

    let io = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0xab 0 64k",
            "-c",
            "read -P 0xab 0 64k",
            "-c",
            "write -z 64k 64k",
            "-c",
            "write -z -u 128k 64k",
            "-c",
            "discard 192k 64k",
            "-c",
            "read -P 0 64k 192k",
            "-c",
            "flush",
            &uri,
        ],
    );
    assert!(io.status.success(), "{}{}", stdout(&io), stderr(&io));
    assert!(
        !stdout(&io).contains("Pattern verification failed"),
        "{}",
        stdout(&io)
    );

    let compare = qemu_img(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        image.to_str().unwrap(),
        &uri,
    ]);
    assert!(compare.status.success(), "{}", stdout(&compare));

    // The allocation map through NBD (base:allocation) matches the file's.
    let strip = |out: &std::process::Output| -> Vec<serde_json::Value> {
        let mut v: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
        for e in &mut v {
            e.as_object_mut().unwrap().remove("offset");
        }
        v
    };
    let via_nbd = qemu_img(&["map", "--output=json", "-f", "raw", &uri]);
    let direct = qemu_img(&["map", "--output=json", "-f", "raw", image.to_str().unwrap()]);
    assert_eq!(strip(&via_nbd), strip(&direct));

    let info = run("nbdinfo", &["--map", &uri]);
    assert!(info.status.success(), "{}", stderr(&info));
    let map = stdout(&info);
    assert!(map.contains("data") && map.contains("hole,zero"), "{map}");

    let copy = dir.path().join("copy.img");
    let nbdcopy = run("nbdcopy", &[&uri, copy.to_str().unwrap()]);
    assert!(nbdcopy.status.success(), "{}", stderr(&nbdcopy));
    assert_eq!(
        std::fs::read(&copy).unwrap(),
        std::fs::read(&image).unwrap()
    );

    // Metadata contexts through python3-libnbd.
    let script = r#"
import sys
sys.path.append("/usr/lib/python3/dist-packages")
import nbd
h = nbd.NBD()
h.add_meta_context("base:allocation")
h.add_meta_context("qemu:allocation-depth")
h.connect_uri(sys.argv[1])
seen = {}
def cb(ctx, offset, entries, err):
    seen[ctx] = entries
h.block_status(h.get_size(), 0, cb)
import json
print(json.dumps([h.can_meta_context("base:allocation"), h.can_meta_context("qemu:allocation-depth"),
                  seen["base:allocation"], seen["qemu:allocation-depth"], h.get_size()]))
"#;
    let py = run("python3", &["-c", script, &uri]);
    assert!(py.status.success(), "{}", stderr(&py));
    let seen: serde_json::Value = serde_json::from_str(stdout(&py).trim()).unwrap();
    assert_eq!(
        (&seen[0], &seen[1]),
        (&serde_json::json!(true), &serde_json::json!(true))
    );
    // base:allocation: the 0xab write at 0 is data (flags 0) for at least 64 KiB, and
    // the extents cover the export; allocation depth: one layer, all allocated.
    let base = seen[2].as_array().unwrap();
    assert_eq!(base[1], 0);
    assert!(base[0].as_u64().unwrap() >= 65536, "{seen}");
    let covered: u64 = base.chunks(2).map(|e| e[0].as_u64().unwrap()).sum();
    assert_eq!(covered, seen[4].as_u64().unwrap(), "{seen}");
    assert_eq!(seen[3], serde_json::json!([seen[4], 1]));

    assert_eq!(server.stop(), Some(0));
    assert!(
        !dir.path().join("nbd.sock").exists(),
        "the socket is removed on exit"
    );
}

#[test]
fn read_only_by_default_with_a_named_export_over_tcp() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    seeded_image(&image, 22);
    let before = std::fs::read(&image).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_stillpoint"))
        .args([
            "nbd",
            image.to_str().unwrap(),
            "--bind",
            "127.0.0.1:0",
            "--name",
            "backup",
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stderr.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port = line.trim().rsplit(':').next().unwrap().to_string();
    let uri = format!("nbd://127.0.0.1:{port}/backup");

    let compare = qemu_img(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        image.to_str().unwrap(),
        &uri,
    ]);
    assert!(
        compare.status.success(),
        "{line}: {}{}",
        stdout(&compare),
        stderr(&compare)
    );
    let write = run("qemu-io", &["-f", "raw", "-c", "write -P 1 0 512", &uri]);
    let said = format!("{}{}", stdout(&write), stderr(&write));
    assert!(
        !write.status.success() || said.contains("ermission") || said.contains("read-only"),
        "{said}"
    );
    assert!(
        !said.contains("wrote 512/512"),
        "a read-only export took a write: {said}"
    );
    let wrong = run("nbdinfo", &[&format!("nbd://127.0.0.1:{port}/nosuch")]);
    assert!(!wrong.status.success());

    // SAFETY: kill(2) with SIGINT on our child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    assert_eq!(child.wait().unwrap().code(), Some(0));
    assert_eq!(std::fs::read(&image).unwrap(), before);
}
