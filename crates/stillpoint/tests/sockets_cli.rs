//! The sockets the binary listens on: their modes whatever the umask, what an existing
//! file at the path means, and an accept loop that stays calm at the descriptor limit.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::time::Duration;

use common::Running;
use common::cpu_seconds;
use common::s;
use common::sparse_file;

/// Starts `stillpoint ARGS` with umask 000 (and at most `max_files` descriptors),
/// waits for `wait_for` to exist.
fn spawn(args: &[&str], max_files: Option<u64>, wait_for: &Path) -> Running {
    Running::start(args, wait_for, |command| {
        // SAFETY: umask and setrlimit are async-signal-safe and touch no memory of the
        // parent; they run in the child between fork and exec.
        unsafe {
            command.pre_exec(move || {
                libc::umask(0);
                if let Some(n) = max_files {
                    let limit = libc::rlimit {
                        rlim_cur: n,
                        rlim_max: n,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
    })
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn nbd_sockets_are_0660_and_qmp_sockets_0600_under_umask_000() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    sparse_file(&image, 1 << 20);

    let socket = dir.path().join("nbd.sock");
    let server = spawn(&["nbd", s(&image), "--socket", s(&socket)], None, &socket);
    assert_eq!(mode(&socket), 0o660, "stillpoint nbd socket");
    server.stop();

    let qmp = dir.path().join("qmp.sock");
    let nbd = dir.path().join("daemon-nbd.sock");
    let nbd_server = format!("addr.type=unix,addr.path={}", s(&nbd));
    let daemon = spawn(
        &["daemon", "--qmp", s(&qmp), "--nbd-server", &nbd_server],
        None,
        &qmp,
    );
    assert_eq!(mode(&qmp), 0o600, "QMP socket");
    assert_eq!(mode(&nbd), 0o660, "daemon NBD socket");
    daemon.stop();
}

#[test]
fn an_existing_file_that_is_not_a_socket_is_never_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let precious = dir.path().join("notes.txt");
    std::fs::write(&precious, b"do not delete").unwrap();
    let out = common::stillpoint(&["daemon", "--qmp", s(&precious)]);
    assert!(!out.status.success());
    assert!(
        common::stderr(&out).contains("is not a socket"),
        "{}",
        common::stderr(&out)
    );
    assert_eq!(std::fs::read(&precious).unwrap(), b"do not delete");

    let image = dir.path().join("disk.img");
    sparse_file(&image, 1 << 20);
    let out = common::stillpoint(&["nbd", s(&image), "--socket", s(&precious)]);
    assert!(!out.status.success());
    assert_eq!(std::fs::read(&precious).unwrap(), b"do not delete");
}

#[test]
fn at_the_descriptor_limit_the_accept_loop_waits_instead_of_spinning() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    sparse_file(&image, 1 << 20);
    let socket = dir.path().join("nbd.sock");
    // No handshake limit, so the silent clients below keep their descriptors.
    let server = spawn(
        &[
            "nbd",
            s(&image),
            "--socket",
            s(&socket),
            "--handshake-limit",
            "0",
        ],
        Some(40),
        &socket,
    );
    let clients: Vec<_> = (0..80)
        .map(|_| std::os::unix::net::UnixStream::connect(&socket).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let before = cpu_seconds(server.id());
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_seconds(server.id()) - before;
    assert!(
        used < 0.5,
        "the server used {used:.2} CPU seconds in 2 s while out of descriptors"
    );
    // Once descriptors are free again it serves new clients.
    drop(clients);
    let out = common::run(
        "nbdinfo",
        &["--size", &format!("nbd+unix:///?socket={}", s(&socket))],
    );
    assert_eq!(
        common::stdout(&out).trim(),
        "1048576",
        "{}",
        common::stderr(&out)
    );
    server.stop();
}
