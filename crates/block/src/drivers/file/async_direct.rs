//! Direct reads submitted through io_uring, so the file's inode lock is not held while
//! the device works.
//!
//! Why not `pread` on the `O_DIRECT` descriptor: ext4 (and XFS) take the inode's lock
//! shared around a direct read, and a *synchronous* one keeps it until the device
//! answers. A buffered write to the same file needs that lock exclusive, so a guest
//! write waited for the background pass's whole 512 KiB read at the device. An
//! *asynchronous* direct read (io_uring, or Linux AIO) drops the lock once its request
//! is built and submitted. Measured on this project's VM (`bench/RESULTS.md`, ninth
//! step of issue 18): 4 KiB buffered writes beside back-to-back 512 KiB direct reads
//! of the same ext4 file took 1.06-1.09 ms at the p50 with `pread`, 8-9 us with
//! Linux AIO reads (3000 writes, two rounds, a C program); in the daemon, guest
//! writes' waits for that lock during a backup fell from 460 (262 ms in all) to 72
//! (16 ms) with this module (off-CPU profile of one benchmark round each).
//!
//! Each read takes a small ring from a process-wide pool (made at first use, kept for
//! the next read), submits, and waits for its completion on the calling thread, which
//! is one of tokio's blocking threads: to the caller it is a `pread`. Where io_uring
//! cannot be set up (`ENOSYS`, or `EPERM` from a seccomp filter or
//! `kernel.io_uring_disabled`), [`read_full`] says so once and for all, and the caller
//! reads with `pread` as before.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Mutex;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering;

use io_uring::IoUring;
use io_uring::opcode;
use io_uring::types;

use crate::buf::IoBuf;

/// Set once io_uring turned out to be unavailable to this process.
static UNAVAILABLE: AtomicBool = AtomicBool::new(false);

/// Rings not in use. One read uses one ring at a time, so this holds as many as reads
/// ever ran at once, up to [`POOL_MAX`].
static POOL: Mutex<Vec<IoUring>> = Mutex::new(Vec::new());

/// Rings kept for later reads; more are closed after use (each holds a descriptor and
/// two small mappings).
const POOL_MAX: usize = 8;

/// The longest single request: a read's length is a `u32` in the ring's entries, and
/// this keeps every request aligned.
const REQUEST_MAX: usize = 1 << 30;

/// Reads `buf.len()` bytes at `offset` from `file` (an `O_DIRECT` descriptor; `buf`
/// and `offset` aligned for it), filling past the end of the file with zeros as
/// `pread_full` does. `Err(buf)` hands the buffer back untouched where io_uring is
/// unavailable: read it another way.
pub(super) fn read_full(
    file: &File,
    mut buf: IoBuf,
    offset: u64,
) -> Result<(IoBuf, io::Result<()>), IoBuf> {
    let Some(mut ring) = take_ring() else {
        return Err(buf);
    };
    let mut done = 0;
    let result = loop {
        if done == buf.len() {
            break Ok(());
        }
        let rest = &mut buf[done..];
        let len = rest.len().min(REQUEST_MAX);
        let entry = opcode::Read::new(types::Fd(file.as_raw_fd()), rest.as_mut_ptr(), len as u32)
            .offset(offset + done as u64)
            .build();
        // SAFETY: the entry points into `buf`, which stays alive and is not touched
        // until the request completes: `wait` returns only with its completion, and
        // where it cannot tell, the buffer is leaked below rather than freed.
        if unsafe { ring.submission().push(&entry) }.is_err() {
            // Cannot happen (one entry in flight at most); nothing was submitted.
            break Err(io::Error::other("io_uring submission queue full"));
        }
        match wait(&mut ring) {
            Ok(n) if n == -libc::EINTR || n == -libc::EAGAIN => {}
            Ok(n) if n < 0 => break Err(io::Error::from_raw_os_error(-n)),
            Ok(0) => {
                buf[done..].fill(0);
                break Ok(());
            }
            Ok(n) => done += n as usize,
            Err(e) => {
                // The request may still be in flight, and the kernel may still write
                // into the buffer: neither it nor the ring may be freed. Both leak;
                // the caller gets an error (never EINVAL, which would send it to
                // another read into this empty buffer) and an empty buffer.
                tracing::warn!("io_uring wait failed with a read in flight: {e}");
                std::mem::forget(buf);
                std::mem::forget(ring);
                let e = io::Error::other(format!("io_uring wait failed: {e}"));
                return Ok((IoBuf::zeroed(0), Err(e)));
            }
        }
    };
    give_back(ring);
    Ok((buf, result))
}

/// Submits what the ring holds and waits for one completion; returns its result (a
/// byte count, or a negated errno).
fn wait(ring: &mut IoUring) -> io::Result<i32> {
    loop {
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
        if let Some(completion) = ring.completion().next() {
            return Ok(completion.result());
        }
    }
}

fn take_ring() -> Option<IoUring> {
    if UNAVAILABLE.load(Ordering::Relaxed) {
        return None;
    }
    if let Some(ring) = POOL.lock().unwrap_or_else(|e| e.into_inner()).pop() {
        return Some(ring);
    }
    match IoUring::new(2) {
        Ok(ring) => Some(ring),
        Err(e) => {
            // ENOSYS: no io_uring in this kernel; EPERM: a seccomp filter or
            // kernel.io_uring_disabled. Anything else (out of descriptors or memory)
            // may pass: try again next time.
            if matches!(e.raw_os_error(), Some(libc::ENOSYS | libc::EPERM)) {
                UNAVAILABLE.store(true, Ordering::Relaxed);
            }
            tracing::debug!("direct reads with pread: io_uring unavailable ({e})");
            None
        }
    }
}

fn give_back(ring: IoUring) {
    let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
    if pool.len() < POOL_MAX {
        pool.push(ring);
    }
}

/// Whether the last [`read_full`] could use io_uring (for tests).
#[cfg(test)]
pub(super) fn available() -> bool {
    !UNAVAILABLE.load(Ordering::Relaxed)
}
