//! Helpers shared by the CLI tests: running the binary and qemu-img, and seeded images.

#![allow(dead_code, unused_imports)] // each test file uses a different part

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::process::Output;

pub mod daemon;

pub use testkit::Rng;

pub fn stillpoint(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_stillpoint"))
        .args(args)
        .output()
        .unwrap()
}

pub fn qemu_img(args: &[&str]) -> Output {
    Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img is required for these tests (apt-get install qemu-utils)")
}

pub use testkit::tools::ok;
pub use testkit::tools::path_str as s;
pub use testkit::tools::run;

/// Runs stillpoint, which must succeed; returns its stdout.
pub fn ours(args: &[&str]) -> String {
    let out = stillpoint(args);
    assert!(
        out.status.success(),
        "stillpoint {args:?}: {}",
        stderr(&out)
    );
    stdout(&out)
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).unwrap()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8(out.stderr.clone()).unwrap()
}

pub fn fallocate(file: &File, mode: i32, offset: u64, len: u64) {
    // SAFETY: fallocate on a descriptor we own, integer arguments only.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset as i64, len as i64) };
    assert_eq!(rc, 0, "fallocate: {}", std::io::Error::last_os_error());
}

/// The length of the node over a raw file of `len` bytes: whole 512-byte sectors, as
/// QEMU reports it (the tail reads as zeros).
pub fn sectors(len: u64) -> u64 {
    len.div_ceil(512) * 512
}

/// Writes a seeded image: random data, literal zero bytes (data that happens to be
/// zero), punched holes and zeroed ranges, over a size that is often not aligned.
/// Returns the file's size (its node is [`sectors`] of it).
pub fn seeded_image(path: &Path, seed: u64) -> u64 {
    let mut rng = Rng(seed);
    let size = match rng.below(4) {
        0 => 4097,
        1 => 1 + rng.below(3 << 20),
        2 => (1 + rng.below(64)) << 16,
        _ => (1 << 20) + 3,
    };
    let file = File::create(path).unwrap();
    file.set_len(size).unwrap();
    for _ in 0..rng.below(12) {
        let offset = rng.below(size);
        let len = 1 + rng.below((size - offset).min(300 << 10));
        match rng.below(4) {
            0 => {
                let data: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8 | 1).collect();
                file.write_all_at(&data, offset).unwrap();
            }
            1 => file.write_all_at(&vec![0; len as usize], offset).unwrap(),
            2 => fallocate(
                &file,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            ),
            _ => fallocate(
                &file,
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            ),
        }
    }
    file.sync_all().unwrap();
    size
}

/// Space a file takes on disk.
pub fn disk_usage(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512
}

/// CPU seconds (user + system) a process has used: what a busy loop or quadratic work
/// costs, whatever else the machine is doing.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which is in parentheses and may hold spaces).
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf with a constant name.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks as f64 / per_second
}

/// A tmpfs of `size` (mount's spelling, such as `4m`) mounted at `dir` (created), for
/// tests of a full filesystem; unmounted when dropped. `None` where mounting needs
/// root: the caller skips.
pub fn small_tmpfs(dir: &Path, size: &str) -> Option<Tmpfs> {
    std::fs::create_dir(dir).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(dir)
        .output()
        .is_ok_and(|o| o.status.success());
    if !mounted {
        eprintln!("skipped: mounting a tmpfs needs root");
        return None;
    }
    Some(Tmpfs(dir.to_path_buf()))
}

/// A mounted tmpfs; see [`small_tmpfs`].
pub struct Tmpfs(std::path::PathBuf);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// A sparse file of `len` bytes.
pub fn sparse_file(path: &Path, len: u64) {
    File::create(path).unwrap().set_len(len).unwrap();
}

/// A `stillpoint` process that is killed and reaped when dropped, so a failing test
/// never leaves one running.
pub struct Running(pub std::process::Child);

impl Running {
    /// Starts `stillpoint ARGS` (after `configure` adjusts the command) and waits until
    /// `ready` exists (a socket it creates); panics if it exits or takes 10 s.
    // The child is reaped by Drop, which clippy cannot see.
    #[allow(clippy::zombie_processes)]
    pub fn start(args: &[&str], ready: &Path, configure: impl FnOnce(&mut Command)) -> Running {
        let mut command = Command::new(env!("CARGO_BIN_EXE_stillpoint"));
        command
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        configure(&mut command);
        let mut running = Running(command.spawn().unwrap());
        for _ in 0..1000 {
            if ready.exists() {
                return running;
            }
            if let Some(status) = running.0.try_wait().unwrap() {
                panic!("stillpoint {args:?} exited early: {status}");
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("{} never appeared", ready.display());
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.0.id()
    }

    /// SIGTERM, then the exit code.
    pub fn stop(mut self) -> Option<i32> {
        // SAFETY: kill(2) with SIGTERM on our child's pid.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        self.0.wait().unwrap().code()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
