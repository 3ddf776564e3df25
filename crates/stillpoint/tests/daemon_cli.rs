//! `stillpoint daemon` over QMP: the wire protocol, the command set and the event
//! sequences a qemu-storage-daemon client relies on.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::process::Stdio;
use std::time::Duration;

use common::Rng;
use common::daemon::DaemonProcess;
use common::daemon::Qmp;
use common::daemon::start;
use common::qemu_img;
use serde_json::Value;
use serde_json::json;

#[test]
fn wire_protocol_negotiation_errors_and_id_echo() {
    let dir = tempfile::tempdir().unwrap();
    let (_daemon, path) = start(dir.path(), &[]);
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let (mut q, greeting) = Qmp::connect(&path);
    assert_eq!(greeting["QMP"]["version"]["qemu"]["major"], 10);
    assert_eq!(
        q.cmd("query-version", json!({})),
        json!({"error":{"class":"CommandNotFound","desc":"Expecting capabilities negotiation with 'qmp_capabilities'"},"id":"query-version"})
    );
    assert_eq!(
        q.cmd("qmp_capabilities", json!({})),
        json!({"return":{},"id":"qmp_capabilities"})
    );
    assert_eq!(
        q.cmd("qmp_capabilities", json!({}))["error"]["class"],
        "CommandNotFound"
    );
    q.send_raw("{\"execute\": nope}\n");
    assert!(
        q.reply()["error"]["desc"]
            .as_str()
            .unwrap()
            .starts_with("JSON parse error")
    );
    q.send_raw("[1, 2]\n");
    assert_eq!(
        q.reply()["error"]["desc"],
        "QMP input must be a JSON object"
    );
    q.send_raw("{\"arguments\": {}}\n");
    assert_eq!(
        q.reply()["error"]["desc"],
        "QMP input lacks member 'execute'"
    );
    // Two commands in one write, split across lines arbitrarily.
    q.send_raw(
        "{\"execute\":\"query-version\",\"id\":1}{\"execute\":\n\"nosuch\",\"id\":{\"x\":2}}",
    );
    assert_eq!(q.reply()["id"], 1);
    assert_eq!(
        q.reply(),
        json!({"error":{"class":"CommandNotFound","desc":"The command nosuch has not been found"},"id":{"x":2}})
    );
    // A second client at the same time.
    let (mut other, _) = Qmp::connect(&path);
    assert_eq!(
        other.cmd("qmp_capabilities", json!({}))["return"],
        json!({})
    );
    let commands = other.cmd("query-commands", json!({}))["return"]
        .as_array()
        .unwrap()
        .len();
    assert!(commands >= 25, "{commands} commands");
    assert_eq!(q.cmd("quit", json!({}))["return"], json!({}));
}

/// The daemon serves every client on one thread: a client sending a long line in
/// pieces must not stall the others (the decoder used to re-parse the whole pending
/// line after every read; a 12 MiB line got no answer to anyone within 20 s).
#[test]
fn one_clients_long_unterminated_line_does_not_stall_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let (daemon, path) = start(dir.path(), &[]);
    let before = common::cpu_seconds(daemon.0.id());
    let (mut slow, _) = Qmp::connect(&path);
    slow.cmd("qmp_capabilities", json!({}));
    let (mut other, _) = Qmp::connect(&path);
    other.cmd("qmp_capabilities", json!({}));
    slow.send_raw("{\"execute\": \"");
    let piece = "x".repeat(64 << 10);
    for i in 0..192 {
        slow.send_raw(&piece);
        if i % 16 == 0 {
            // Answered while the line keeps coming (each read waits at most 30 s).
            let reply = other.cmd("query-version", json!({}));
            assert!(reply.get("return").is_some(), "{reply}");
        }
    }
    slow.send_raw("\"}\n");
    assert_eq!(slow.reply()["error"]["class"], "CommandNotFound");
    assert!(
        other
            .cmd("query-version", json!({}))
            .get("return")
            .is_some()
    );
    // The stall was CPU: decoding 12 MiB took the daemon about 10 CPU seconds (debug
    // build) when every read re-parsed the line; one pass takes a fraction of one.
    let used = common::cpu_seconds(daemon.0.id()) - before;
    assert!(
        used < 2.5,
        "decoding one 12 MiB line cost {used:.1} CPU seconds"
    );
}

#[test]
fn backup_events_pause_resume_and_bad_arguments_over_qmp() {
    let dir = tempfile::tempdir().unwrap();
    let (src, tgt, small) = (
        dir.path().join("src.img"),
        dir.path().join("tgt.img"),
        dir.path().join("small.img"),
    );
    let tgt2 = dir.path().join("tgt2.img");
    std::fs::File::create(&tgt2)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    std::fs::write(&src, Rng(12).bytes(16 << 20)).unwrap();
    std::fs::File::create(&tgt)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    std::fs::File::create(&small)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let blockdevs = [
        format!(
            "driver=raw,node-name=src,file.driver=file,file.filename={}",
            src.display()
        ),
        format!(
            r#"{{"driver":"raw","node-name":"tgt","file":{{"driver":"file","filename":"{}"}}}}"#,
            tgt.display()
        ),
        format!(
            "driver=raw,node-name=small,file.driver=file,file.filename={}",
            small.display()
        ),
        format!(
            "raw,node-name=tgt2,file.driver=file,file.filename={}",
            tgt2.display()
        ),
    ];
    let mut extra = Vec::new();
    for b in &blockdevs {
        extra.push("--blockdev".to_string());
        extra.push(b.clone());
    }
    let pidfile = dir.path().join("pid");
    extra.extend(["--pidfile".to_string(), pidfile.display().to_string()]);
    let (mut daemon, path) = start(dir.path(), &extra);
    let (mut q, _) = Qmp::connect(&path);
    q.cmd("qmp_capabilities", json!({}));
    assert!(pidfile.exists());

    let desc = |q: &mut Qmp, args: Value| {
        q.cmd("blockdev-backup", args)["error"]["desc"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(
        desc(
            &mut q,
            json!({"job-id":"j","device":"nosuch","target":"tgt","sync":"full"})
        ),
        "Cannot find device='nosuch' nor node-name='nosuch'"
    );
    assert_eq!(
        desc(
            &mut q,
            json!({"job-id":"j","device":"src","target":"small","sync":"full"})
        ),
        "Source and target image have different sizes"
    );
    assert_eq!(
        desc(
            &mut q,
            json!({"job-id":"j","device":"src","target":"src","sync":"full"})
        ),
        "Source and target cannot be the same"
    );
    assert_eq!(
        desc(
            &mut q,
            json!({"job-id":"j","device":"src","target":"tgt","sync":"full","speed":-1})
        ),
        "Parameter 'speed' expects a non-negative value"
    );
    assert_eq!(
        desc(
            &mut q,
            json!({"job-id":"j","device":"src","target":"tgt","sync":"fast"})
        ),
        "Parameter 'sync' does not accept value 'fast'"
    );
    assert_eq!(
        desc(&mut q, json!({"job-id":"j","device":"src","target":"tgt"})),
        "Parameter 'sync' is missing"
    );
    assert_eq!(
        desc(
            &mut q,
            json!({"job-id":"j","device":1,"target":"tgt","sync":"full"})
        ),
        "Invalid parameter type for 'device', expected: string"
    );
    assert_eq!(
        desc(
            &mut q,
            json!({"job-id":"j","device":"src","target":"tgt","sync":"full","compress":true})
        ),
        "Compression is not supported for this drive tgt"
    );

    let started = q.cmd(
        "blockdev-backup",
        json!({"job-id":"j","device":"src","target":"tgt","sync":"full","speed": 4 << 20}),
    );
    assert_eq!(started["return"], json!({}));
    assert_eq!(
        desc(
            &mut q,
            json!({"job-id":"j","device":"small","target":"small","sync":"full"})
        ),
        "Source and target cannot be the same"
    );
    assert_eq!(
        desc(
            &mut q,
            json!({"job-id":"k","device":"small","target":"tgt","sync":"full"})
        ),
        "Node 'tgt' is busy: block device is in use by block job: backup"
    );
    assert_eq!(
        desc(
            &mut q,
            json!({"job-id":"j","device":"src","target":"tgt2","sync":"full"})
        ),
        "Job ID 'j' already in use"
    );
    assert_eq!(
        q.cmd("block-job-pause", json!({"device":"j"}))["return"],
        json!({})
    );
    q.wait_event("JOB_STATUS_CHANGE");
    while q.cmd("query-jobs", json!({}))["return"][0]["status"] != "paused" {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        q.cmd("block-job-cancel", json!({"device":"j"}))["error"]["desc"],
        "The block job for device 'j' is currently paused"
    );
    assert_eq!(
        q.cmd("job-finalize", json!({"id":"j"}))["error"]["desc"],
        "Job 'j' in state 'paused' cannot accept command verb 'finalize'"
    );
    assert_eq!(
        q.cmd("block-job-pause", json!({"device":"nosuch"}))["error"]["class"],
        "DeviceNotActive"
    );
    assert_eq!(
        q.cmd("job-pause", json!({"id":"nosuch"}))["error"]["desc"],
        "Job not found"
    );
    assert_eq!(
        q.cmd("blockdev-del", json!({"node-name":"tgt"}))["error"]["desc"],
        "Node 'tgt' is busy: block device is in use by block job: backup"
    );
    q.cmd("block-job-resume", json!({"device":"j"}));
    q.cmd("block-job-set-speed", json!({"device":"j","speed":0}));
    let completed = q.wait_event("BLOCK_JOB_COMPLETED");
    assert_eq!(
        completed["data"],
        json!({"type":"backup","device":"j","len":16 << 20,"offset":16 << 20,"speed":0})
    );
    assert!(completed["timestamp"]["seconds"].as_u64().unwrap() > 0);
    let history = q.job_history();
    let expected = [
        "created",
        "running",
        "paused",
        "running",
        "waiting",
        "pending",
        "BLOCK_JOB_COMPLETED",
    ];
    let mut at = 0;
    for item in &history {
        if at < expected.len() && item == expected[at] {
            at += 1;
        }
    }
    assert_eq!(at, expected.len(), "events out of order: {history:?}");
    let compare = qemu_img(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        src.to_str().unwrap(),
        tgt.to_str().unwrap(),
    ]);
    assert!(compare.status.success());
    assert_eq!(
        q.cmd("blockdev-del", json!({"node-name":"small"}))["return"],
        json!({})
    );

    // SIGTERM: flush, remove the sockets and the pidfile, exit 0.
    // SAFETY: kill(2) with SIGTERM on our child's pid.
    unsafe { libc::kill(daemon.0.id() as i32, libc::SIGTERM) };
    assert_eq!(daemon.0.wait().unwrap().code(), Some(0));
    assert!(!path.exists() && !pidfile.exists());
}

#[test]
fn the_demo_passes_on_a_small_disk() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_stillpoint"))
        .args([
            "demo",
            "--size",
            "16",
            "--dir",
            dir.path().to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("demo: PASS"), "{text}");
    assert!(text.contains("guest writes"), "{text}");
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "the demo cleans up"
    );
}

#[test]
fn exports_are_added_listed_and_deleted_with_an_event() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let nbd = dir.path().join("nbd.sock");
    let extra = [
        "--blockdev".to_string(),
        format!(
            "driver=raw,node-name=disk,file.driver=file,file.filename={}",
            image.display()
        ),
        "--nbd-server".to_string(),
        format!("addr.type=unix,addr.path={}", nbd.display()),
    ];
    let (_daemon, path) = start(dir.path(), &extra);
    let (mut q, _) = Qmp::connect(&path);
    q.cmd("qmp_capabilities", json!({}));
    let add = json!({"type":"nbd","id":"exp0","node-name":"disk","name":"disk","writable":true});
    assert_eq!(q.cmd("block-export-add", add.clone())["return"], json!({}));
    assert_eq!(
        q.cmd("block-export-add", add)["error"]["desc"],
        "Block export id 'exp0' is already in use"
    );
    assert_eq!(
        q.cmd("query-block-exports", json!({}))["return"],
        json!([{"id":"exp0","type":"nbd","node-name":"disk","shutting-down":false}])
    );
    let uri = format!("nbd+unix:///disk?socket={}", nbd.display());
    let info = Command::new("nbdinfo")
        .arg(&uri)
        .output()
        .expect("nbdinfo is required");
    assert!(
        info.status.success(),
        "{}",
        String::from_utf8_lossy(&info.stderr)
    );
    assert_eq!(
        q.cmd("blockdev-del", json!({"node-name":"disk"}))["error"]["desc"],
        "Node disk is in use"
    );
    assert_eq!(
        q.cmd("block-export-del", json!({"id":"exp0"}))["return"],
        json!({})
    );
    assert_eq!(
        q.wait_event("BLOCK_EXPORT_DELETED")["data"],
        json!({"id":"exp0"})
    );
    assert_eq!(
        q.cmd("block-export-del", json!({"id":"exp0"}))["error"]["desc"],
        "Export 'exp0' is not found"
    );
    assert_eq!(q.cmd("query-block-exports", json!({}))["return"], json!([]));
    let gone = Command::new("nbdinfo").arg(&uri).output().unwrap();
    assert!(
        !gone.status.success(),
        "a deleted export is no longer served"
    );
    assert_eq!(q.cmd("nbd-server-stop", json!({}))["return"], json!({}));
    assert_eq!(
        q.cmd("nbd-server-stop", json!({}))["error"]["desc"],
        "NBD server not running"
    );
    assert_eq!(
        q.cmd("blockdev-del", json!({"node-name":"disk"}))["return"],
        json!({})
    );
}

/// An 8 MiB raw disk at `image` (a seeded pattern) exported writable over NBD by a
/// fresh daemon in `dir`, with a backup into `dir/backup.img` throttled to 64 KiB/s, so
/// the background copy stays near the start while a test writes past 5 MiB. Returns
/// the daemon, its QMP socket and connection, and the NBD socket.
fn throttled_backup_under_nbd(
    dir: &Path,
    image: &Path,
) -> (DaemonProcess, std::path::PathBuf, Qmp, std::path::PathBuf) {
    let size = 8u64 << 20;
    let data: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
    std::fs::write(image, data).unwrap();
    let target = dir.join("backup.img");
    std::fs::File::create(&target)
        .unwrap()
        .set_len(size)
        .unwrap();
    let nbd = dir.join("nbd.sock");
    let (daemon, path) = start(dir, &[]);
    let (mut q, _) = Qmp::connect(&path);
    q.cmd("qmp_capabilities", json!({}));
    for (name, file) in [("disk", image), ("tgt", target.as_path())] {
        assert_eq!(
            q.cmd("blockdev-add", raw_node(name, file, false))["return"],
            json!({})
        );
    }
    q.cmd(
        "nbd-server-start",
        json!({"addr":{"type":"unix","data":{"path":nbd}}}),
    );
    q.cmd(
        "block-export-add",
        json!({"type":"nbd","id":"e","node-name":"disk","writable":true}),
    );
    let backup = json!({"job-id":"b","device":"disk","target":"tgt","sync":"full","speed":65536});
    assert_eq!(q.cmd("blockdev-backup", backup)["return"], json!({}));
    (daemon, path, q, nbd)
}

fn raw_node(name: &str, path: &Path, read_only: bool) -> Value {
    json!({"driver":"raw","node-name":name,"read-only":read_only,
           "file":{"driver":"file","filename":path}})
}

/// Writes `count` 64 KiB blocks from `first` through the export, block i filled with
/// the byte i + 1, with libnbd's client (its Python binding; the system Python has
/// it), which sends no flush before it disconnects, so held writes stay held (qemu-io
/// would flush on close).
fn nbd_writes(nbd: &Path, first: u64, count: u64) {
    let script = format!(
        "import nbd\nh = nbd.NBD()\nh.connect_uri('nbd+unix:///disk?socket={}')\n\
         for i in range({count}):\n    h.pwrite(bytes([i + 1]) * 65536, {first} + i * 65536)\n\
         h.shutdown()\n",
        nbd.display()
    );
    let write = Command::new("/usr/bin/python3")
        .args(["-c", &script])
        .output()
        .expect("python3 with libnbd's binding is required");
    assert!(
        write.status.success(),
        "every write succeeds: {}",
        String::from_utf8_lossy(&write.stderr)
    );
}

/// Whether `image` has the block [`nbd_writes`] wrote as its `i`th from `first`.
fn has_nbd_write(image: &Path, first: u64, i: u64) -> bool {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; 65536];
    std::fs::File::open(image)
        .unwrap()
        .read_exact_at(&mut buf, first + i * 65536)
        .unwrap();
    buf.iter().all(|&b| b == i as u8 + 1)
}

/// SIGKILLs `daemon` and starts another in `dir`, ready for commands.
fn kill_and_restart(daemon: DaemonProcess, dir: &Path, qmp: &Path) -> (DaemonProcess, Qmp) {
    drop(daemon); // SIGKILL
    // The killed daemon's socket file is left; the next one replaces it, and `start`
    // waits for it to appear.
    std::fs::remove_file(qmp).unwrap();
    let (daemon, path) = start(dir, &[]);
    let (mut q, _) = Qmp::connect(&path);
    q.cmd("qmp_capabilities", json!({}));
    (daemon, q)
}

/// The daemon killed (SIGKILL) during a backup, with a guest write held in memory
/// (block_copy::redirect): the write was acknowledged to the NBD client, so it must not
/// be lost. It is in the journal beside the image; the next daemon's read-write open
/// of the image writes it there, and a read-only open is refused until then.
#[test]
fn a_write_held_when_the_daemon_is_killed_is_in_the_image_after_the_next_open() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    let journal = dir.path().join("disk.img.stillpoint-held");
    let (daemon, path, _q, nbd) = throttled_backup_under_nbd(dir.path(), &image);
    assert!(
        journal.exists(),
        "the backup makes the journal of held writes"
    );
    let at = 7u64 << 20;
    nbd_writes(&nbd, at, 1);
    assert!(
        std::fs::metadata(&journal).unwrap().len() > 65536,
        "the journal holds the write"
    );
    assert!(
        !has_nbd_write(&image, at, 0),
        "the write is held: not in the image yet"
    );

    let (_daemon, mut q) = kill_and_restart(daemon, dir.path(), &path);
    let refused = q.cmd("blockdev-add", raw_node("ro", &image, true));
    let desc = refused["error"]["desc"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        desc.contains("stillpoint-held") && desc.contains("read-write"),
        "a read-only open would read the image without the write: {refused}"
    );
    assert!(!has_nbd_write(&image, at, 0));
    assert_eq!(
        q.cmd("blockdev-add", raw_node("disk", &image, false))["return"],
        json!({})
    );
    assert!(
        has_nbd_write(&image, at, 0),
        "the acknowledged write is in the image"
    );
    assert!(!journal.exists(), "an applied journal is deleted");
}

/// A full disk under the journal of held writes: writes that no longer fit in it are
/// not held but written through copy-before-write, so none is lost when the daemon is
/// then killed, and the next open puts the ones that were held into the image.
#[test]
fn writes_the_journal_has_no_room_for_go_through_copy_before_write_and_none_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let fs = dir.path().join("fs");
    // 8 MiB of image, about 1 MiB left: room for a few 64 KiB records, not 40.
    let Some(_tmpfs) = common::small_tmpfs(&fs, "9m") else {
        return;
    };
    let image = fs.join("disk.img");
    let (daemon, path, _q, nbd) = throttled_backup_under_nbd(dir.path(), &image);
    let (first, count) = (5u64 << 20, 40u64);
    nbd_writes(&nbd, first, count);
    let held = (0..count)
        .filter(|&i| !has_nbd_write(&image, first, i))
        .count();
    assert!(
        held > 0 && held < count as usize,
        "some writes held (journalled), the rest written through: {held} of {count} held"
    );
    eprintln!("{held} of {count} writes held before the journal's filesystem was full");

    let (_daemon, mut q) = kill_and_restart(daemon, dir.path(), &path);
    assert_eq!(
        q.cmd("blockdev-add", raw_node("disk", &image, false))["return"],
        json!({})
    );
    let missing: Vec<u64> = (0..count)
        .filter(|&i| !has_nbd_write(&image, first, i))
        .collect();
    assert!(missing.is_empty(), "writes lost: {missing:?}");
}

/// A SIGTERM while the daemon is still applying its options (here: an NBD node whose
/// server never answers the handshake, after a qcow2 opened for writing) stops it as
/// cleanly as one after: exit 0, and the qcow2's persistent bitmap is stored, not left
/// in use. Unwatched, the signal killed the daemon there and the bitmap was
/// inconsistent at the next open, so the next backup had to be a full one.
#[test]
fn a_sigterm_during_start_up_stops_cleanly_and_keeps_the_bitmaps() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.qcow2");
    let disk_name = disk.display().to_string();
    assert!(
        qemu_img(&["create", "-q", "-f", "qcow2", &disk_name, "1M"])
            .status
            .success()
    );
    assert!(
        qemu_img(&["bitmap", "--add", &disk_name, "daily"])
            .status
            .success()
    );
    // Connections queue in the backlog and are never answered.
    let silent = dir.path().join("silent.sock");
    let _silent = std::os::unix::net::UnixListener::bind(&silent).unwrap();
    let qmp = dir.path().join("qmp.sock");
    let disk_node = json!({"driver": "qcow2", "node-name": "d",
        "file": {"driver": "file", "filename": disk}});
    let nbd_node = json!({"driver": "nbd", "node-name": "n", "export": "x",
        "server": {"type": "unix", "path": silent}});
    let child = Command::new(env!("CARGO_BIN_EXE_stillpoint"))
        .args(["daemon", "--blockdev", &disk_node.to_string()])
        .args(["--blockdev", &nbd_node.to_string()])
        .args(["--qmp", &qmp.display().to_string()])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let in_use = || {
        let info = qemu_img(&["info", "-U", &disk_name]);
        String::from_utf8_lossy(&info.stdout).contains("in-use")
    };
    for _ in 0..500 {
        if in_use() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(in_use(), "the daemon never opened the qcow2 for writing");
    // SAFETY: kill(2) on the child's pid with an integer signal number.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("stopped by a signal during start-up"), "{err}");
    assert!(!in_use(), "the bitmap was left in use");
    assert!(!qmp.exists(), "no QMP socket was made, and none is left");
}
