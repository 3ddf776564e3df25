//! `file`: a host file or block device.
//!
//! Positional I/O (`pread`/`pwrite`) runs on tokio's blocking pool, so a slow disk never
//! stalls the async threads that serve sockets. Reads up to 64 KiB that the page cache
//! holds whole (`cachestat`) are served from it without blocking (`RWF_NOWAIT`); the
//! rest go to the pool. With `cache.direct` the file is opened
//! `O_DIRECT`; requests whose offset and length are multiples of [`DIRECT_ALIGN`] go
//! straight to the device from the (always aligned) [`IoBuf`]s, and the rest go through
//! a second, buffered descriptor of the same file. Linux keeps the two coherent (a
//! direct request writes back and invalidates the page-cache range it touches), so an
//! unaligned tail, such as the last 1 byte of a 4097-byte image, still works. A
//! buffered file does the same for writes flagged [`WriteFlags::uncached`] (a
//! backup's copies into its target), through an `O_DIRECT` descriptor it opens at
//! their first use.
//!
//! * Block status comes from `SEEK_DATA`/`SEEK_HOLE`: data runs are `data`, holes are
//!   `zero`; every byte is `allocated` (a hole in a raw file reads as zeros from this
//!   file, not from a backing file).
//! * Write-zeroes punches a hole when unmapping is allowed, else uses
//!   `FALLOC_FL_ZERO_RANGE`; where the filesystem supports neither it writes zeros
//!   (unless the caller asked for no fallback).
//! * Discard punches a hole; where that is unsupported it does nothing (discard is
//!   advisory).
//! * The length of a regular file is rounded up to whole 512-byte sectors, as QEMU's
//!   file driver reports it (every size QEMU's tools print and every QMP script
//!   assumes this): a 4097-byte image is a 4608-byte node whose last 511 bytes read as
//!   zeros until written, and a write there extends the file.
//! * Flush is `fdatasync`; FUA writes are followed by one. A flush returns only after
//!   an fdatasync that started after the writes it covers, and once an fdatasync has
//!   failed every later flush fails too (the kernel may have dropped the pages it was
//!   writing; see `sync_tracker`). This holds with `cache.direct` as well, because
//!   unaligned requests still go through the page cache.
//!
//! * Uncached direct reads (a backup's background pass while the guest is busy) go
//!   through io_uring where the kernel allows it (`async_direct`): a synchronous
//!   direct read holds the inode's lock until the device answers, and the guest's
//!   buffered writes to the same file wait for it. Elsewhere they use `pread`.
//!
//! Out of scope: image locking (refused in the options), io_uring for the other
//! requests (planned as a second engine behind the same trait), resizing.

use std::fs::File;
use std::fs::OpenOptions;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;

use async_trait::async_trait;

use crate::buf::IoBuf;
use crate::error::Error;
use crate::error::ErrorKind;
use crate::error::Result;
use crate::node::driver::BlockDriver;
use crate::node::driver::Extent;
use crate::node::driver::Limits;
use crate::node::driver::Status;
use crate::node::driver::WriteFlags;
use crate::node::driver::ZeroFlags;
use crate::node::driver::check_request;
use crate::node::driver::write_zeroes_by_writing;
use crate::sync_tracker::SyncTracker;

/// Alignment O_DIRECT requests need on the filesystems we support.
pub const DIRECT_ALIGN: u64 = 4096;

/// An open host file.
#[derive(Debug)]
pub struct FileDriver {
    path: PathBuf,
    /// The descriptor requests use: O_DIRECT when `direct`.
    file: Arc<File>,
    /// A buffered descriptor for requests O_DIRECT cannot take (unaligned ones).
    buffered: Option<Arc<File>>,
    /// For a buffered file: a second descriptor of the same open file with readahead
    /// off, for [`read_uncached`](BlockDriver::read_uncached), opened at its first
    /// use (`None` inside when it could not be).
    uncached: OnceLock<Option<Arc<File>>>,
    /// For a buffered file: an O_DIRECT descriptor of the same open file for aligned
    /// [`WriteFlags::uncached`] writes, opened at their first use (`None` inside when
    /// the filesystem refuses O_DIRECT, as tmpfs did before Linux 6.6).
    direct_writes: OnceLock<Option<Arc<File>>>,
    /// Set once that descriptor refused an aligned write (`EINVAL`: a device with
    /// blocks larger than [`DIRECT_ALIGN`]), so later writes do not try it again.
    direct_writes_refused: Arc<AtomicBool>,
    /// For a buffered file: an O_DIRECT descriptor for aligned
    /// [`read_uncached`](BlockDriver::read_uncached) requests, opened at their first
    /// use, and whether it refused one (`EINVAL`, as for writes).
    direct_reads: OnceLock<Option<Arc<File>>>,
    direct_reads_refused: Arc<AtomicBool>,
    /// Current size; grows when a growable file is written past its end.
    length: AtomicU64,
    /// Writes may extend the file (set for the `file` child of a format that allocates,
    /// like qcow2; never for block devices).
    growable: AtomicBool,
    read_only: bool,
    block_device: bool,
    /// Writes, and the fdatasyncs that made them durable.
    sync: SyncTracker,
}

fn open_error(path: &Path, err: io::Error) -> Error {
    Error::from_io(format!("Could not open '{}'", path.display()), err)
}

impl FileDriver {
    /// Opens `path`. With `auto_read_only`, a file that cannot be opened for writing is
    /// opened read-only instead. Blocking: call from a blocking context.
    pub fn open(path: &Path, read_only: bool, direct: bool, auto_read_only: bool) -> Result<Self> {
        let metadata = std::fs::metadata(path).map_err(|e| open_error(path, e))?;
        let file_type = metadata.file_type();
        if file_type.is_dir() {
            return Err(open_error(path, io::Error::from_raw_os_error(libc::EISDIR)));
        }
        let block_device = file_type.is_block_device();
        if !file_type.is_file() && !block_device {
            return Err(Error::invalid(format!(
                "Could not open '{}': 'file' driver requires '{}' to be a regular file or \
                 a block device",
                path.display(),
                path.display()
            )));
        }
        let open = |read_only: bool, direct: bool| {
            let mut options = OpenOptions::new();
            options.read(true).write(!read_only);
            if direct {
                options.custom_flags(libc::O_DIRECT);
            }
            options.open(path)
        };
        let mut read_only = read_only;
        let file = match open(read_only, direct) {
            Ok(file) => file,
            Err(e)
                if auto_read_only
                    && !read_only
                    && matches!(
                        e.raw_os_error(),
                        Some(libc::EACCES | libc::EROFS | libc::EPERM)
                    ) =>
            {
                read_only = true;
                open(true, direct).map_err(|e| open_error(path, e))?
            }
            Err(e) if direct && e.raw_os_error() == Some(libc::EINVAL) => {
                return Err(Error::from_io(
                    format!(
                        "Could not open '{}': the filesystem does not support cache.direct \
                         (O_DIRECT)",
                        path.display()
                    ),
                    e,
                ));
            }
            Err(e) => return Err(open_error(path, e)),
        };
        let buffered = if direct {
            Some(Arc::new(
                open(read_only, false).map_err(|e| open_error(path, e))?,
            ))
        } else {
            None
        };
        let length = if block_device {
            device_length(&file).map_err(|e| open_error(path, e))?
        } else {
            round_to_sectors(metadata.len())
        };
        Ok(Self {
            path: path.to_path_buf(),
            file: Arc::new(file),
            buffered,
            uncached: OnceLock::new(),
            direct_writes: OnceLock::new(),
            direct_writes_refused: Arc::new(AtomicBool::new(false)),
            direct_reads: OnceLock::new(),
            direct_reads_refused: Arc::new(AtomicBool::new(false)),
            length: AtomicU64::new(length),
            growable: AtomicBool::new(false),
            read_only,
            block_device,
            sync: SyncTracker::new(),
        })
    }

    /// The descriptor for bulk reads of a buffered file: the same file opened again
    /// (through `/proc/self/fd`, so it is the same file even if its path changed),
    /// with readahead off (`POSIX_FADV_RANDOM` is per open file, so the guest's own
    /// descriptor keeps its readahead).
    fn uncached_fd(&self) -> Option<Arc<File>> {
        self.uncached
            .get_or_init(|| {
                let path = format!("/proc/self/fd/{}", self.file.as_raw_fd());
                let file = match File::open(&path) {
                    Ok(file) => file,
                    Err(e) => {
                        tracing::debug!(
                            "'{}': bulk reads with readahead ({e})",
                            self.path.display()
                        );
                        return None;
                    }
                };
                // SAFETY: fadvise on a descriptor we own; integer arguments only.
                let rc =
                    unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM) };
                (rc == 0).then(|| Arc::new(file))
            })
            .clone()
    }

    /// The descriptor for uncached writes of a buffered, writable file: the same file
    /// opened again with O_DIRECT (through `/proc/self/fd`, as for `uncached_fd`).
    fn direct_write_fd(&self) -> Option<Arc<File>> {
        self.direct_writes
            .get_or_init(|| self.open_direct(true))
            .clone()
    }

    /// The descriptor for aligned uncached reads of a buffered file, O_DIRECT.
    fn direct_read_fd(&self) -> Option<Arc<File>> {
        self.direct_reads
            .get_or_init(|| self.open_direct(false))
            .clone()
    }

    /// The same open file again with O_DIRECT, or `None` where the filesystem
    /// refuses it (as tmpfs did before Linux 6.6).
    fn open_direct(&self, write: bool) -> Option<Arc<File>> {
        let path = format!("/proc/self/fd/{}", self.file.as_raw_fd());
        match std::fs::OpenOptions::new()
            .read(!write)
            .write(write)
            .custom_flags(libc::O_DIRECT)
            .open(&path)
        {
            Ok(file) => Some(Arc::new(file)),
            Err(e) => {
                tracing::debug!(
                    "'{}': uncached {} through the page cache ({e})",
                    self.path.display(),
                    if write { "writes" } else { "reads" }
                );
                None
            }
        }
    }

    /// Whether the file ended up open read-only (asked for, or `auto-read-only`).
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// The descriptor for a request: the O_DIRECT one only when it is aligned.
    fn fd_for(&self, offset: u64, len: u64) -> Arc<File> {
        match &self.buffered {
            Some(buffered)
                if !offset.is_multiple_of(DIRECT_ALIGN) || !len.is_multiple_of(DIRECT_ALIGN) =>
            {
                buffered.clone()
            }
            _ => self.file.clone(),
        }
    }

    fn check(&self, op: &str, offset: u64, len: u64) -> Result<()> {
        check_request(op, offset, len, self.length.load(Ordering::Acquire))
            .map_err(|e| e.context(format!("'{}'", self.path.display())))
    }

    /// Checks a write and returns its end; a growable file accepts writes past its end.
    fn check_write(&self, op: &str, offset: u64, len: u64) -> Result<u64> {
        if self.growable.load(Ordering::Acquire) {
            check_request(op, offset, len, u64::MAX)
                .map_err(|e| e.context(format!("'{}'", self.path.display())))?;
        } else {
            self.check(op, offset, len)?;
        }
        Ok(offset + len)
    }

    fn check_writable(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::new(
                ErrorKind::PermissionDenied,
                format!("'{}' is open read-only", self.path.display()),
            ));
        }
        Ok(())
    }

    fn flush_error(&self, err: io::Error) -> Error {
        Error::from_io(format!("failed to flush '{}'", self.path.display()), err)
    }

    fn io_error(&self, op: &str, offset: u64, err: io::Error) -> Error {
        Error::from_io(
            format!(
                "failed to {op} '{}' at offset {offset}",
                self.path.display()
            ),
            err,
        )
    }
}

/// How a write-zeroes by `fallocate` went.
enum Zeroed {
    /// The range reads as zeros; with FUA, the result of the sync that followed.
    Done(Option<io::Result<()>>),
    /// Neither mode is supported here: write zeros instead.
    Unsupported,
    Failed(io::Error),
}

/// Bytes in whole 512-byte sectors: the length QEMU reports for a file.
pub fn round_to_sectors(len: u64) -> u64 {
    len.div_ceil(512) * 512
}

/// Size of a block device: seek to its end.
fn device_length(file: &File) -> io::Result<u64> {
    // SAFETY: lseek on a valid descriptor owned by `file`; it only moves the offset,
    // which this driver never uses (all I/O is positional).
    let end = unsafe { libc::lseek(file.as_raw_fd(), 0, libc::SEEK_END) };
    if end < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(end as u64)
    }
}

/// Runs blocking file work on tokio's blocking pool.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| Error::new(ErrorKind::Io, format!("I/O task failed: {e}")))?
}

/// Reads until `buf` is full; bytes past the end of the file read as zeros (the file
/// can shrink under us; the request was checked against the length at open).
fn pread_full(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => {
                buf[done..].fill(0);
                break;
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Largest read tried without blocking first. Bigger reads are streaming (backups,
/// pulls): there a partial non-blocking read and a pool read for the rest made cold
/// sequential reads slower, so they go to the pool directly.
const NOWAIT_MAX: usize = 64 << 10;

/// Reads what the page cache already holds, without blocking (`preadv2` with
/// `RWF_NOWAIT`): a cache hit needs no trip through the blocking pool, which cost two
/// thread switches per request. Returns how many bytes were read, 0 when none were
/// cached (or the kernel cannot tell without blocking); the caller reads the rest on
/// the pool.
///
/// `RWF_NOWAIT` does not mean "no I/O": on a miss the kernel still starts readahead,
/// and submitting it (a request, a doorbell to the virtual disk, and a wait for a
/// request slot when the disk's queue is full) would happen on the async thread that
/// serves every socket. So a range the cache does not hold whole (`cachestat`, Linux
/// 6.5) goes to the pool without trying, unless it is a hole: there the "readahead"
/// only zeroes pages and does no I/O, and the pool's round trip made reading a hole
/// several times slower (4 KiB reads through NBD: p50 108-121 us against 22-27 us,
/// `bench/RESULTS.md`).
fn pread_cached(file: &File, buf: &mut [u8], offset: u64) -> usize {
    let len = buf.len() as u64;
    if !cache_holds(file, offset, len) && !is_hole(file, offset, len) {
        return 0;
    }
    let iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: one iovec over a live, exclusively borrowed buffer; the kernel writes at
    // most `iov_len` bytes into it and touches nothing else.
    let n = unsafe { libc::preadv2(file.as_raw_fd(), &iov, 1, offset as i64, libc::RWF_NOWAIT) };
    if n > 0 { n as usize } else { 0 }
}

/// `cachestat`'s number, the same on every architecture (the libc crate names it only
/// for some).
const SYS_CACHESTAT: libc::c_long = 451;

/// `struct cachestat_range` of `<linux/mman.h>`.
#[repr(C)]
struct CachestatRange {
    off: u64,
    len: u64,
}

/// `struct cachestat` of `<linux/mman.h>`: page counts over the range.
#[repr(C)]
#[derive(Default)]
struct Cachestat {
    nr_cache: u64,
    nr_dirty: u64,
    nr_writeback: u64,
    nr_evicted: u64,
    nr_recently_evicted: u64,
}

/// Set once `cachestat` turned out to be missing (a kernel before 6.5, or a seccomp
/// filter): then every small read tries `RWF_NOWAIT` as before.
static NO_CACHESTAT: AtomicBool = AtomicBool::new(false);

/// Whether the page cache holds every page of `len` bytes at `offset`. Errs towards
/// yes where the kernel cannot tell, so a small read still tries the cache first.
fn cache_holds(file: &File, offset: u64, len: u64) -> bool {
    if len == 0 || NO_CACHESTAT.load(Ordering::Relaxed) {
        return true;
    }
    let page = page_size();
    let pages = (offset + len).div_ceil(page) - offset / page;
    let range = CachestatRange { off: offset, len };
    let mut stat = Cachestat::default();
    // SAFETY: cachestat reads one range struct and writes one stat struct, both live
    // and of the kernel's layout; flags must be 0.
    let rc = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            file.as_raw_fd(),
            &range as *const CachestatRange,
            &mut stat as *mut Cachestat,
            0u32,
        )
    };
    if rc != 0 {
        // ENOSYS: a kernel before 6.5; EPERM: a seccomp filter that does not know it
        // (container runtimes refuse syscalls newer than their profile that way).
        if matches!(
            io::Error::last_os_error().raw_os_error(),
            Some(libc::ENOSYS | libc::EPERM)
        ) {
            NO_CACHESTAT.store(true, Ordering::Relaxed);
        }
        return true;
    }
    stat.nr_cache >= pages
}

/// Whether `[offset, offset + len)` holds no data (`SEEK_DATA` finds none before its
/// end). Where the filesystem cannot say, no.
fn is_hole(file: &File, offset: u64, len: u64) -> bool {
    match lseek(file, offset, libc::SEEK_DATA) {
        Ok(None) => true,
        Ok(Some(data)) => data >= offset + len,
        Err(_) => false,
    }
}

fn page_size() -> u64 {
    // SAFETY: sysconf only reads a configuration value.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if size > 0 { size as u64 } else { 4096 }
}

fn fallocate(file: &File, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: fallocate on a valid descriptor with plain integer arguments; it does not
    // touch memory we own.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset as i64, len as i64) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn unsupported(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL)
    )
}

fn lseek(file: &File, offset: u64, whence: i32) -> io::Result<Option<u64>> {
    // SAFETY: lseek on a valid descriptor; SEEK_DATA/SEEK_HOLE only report offsets.
    let pos = unsafe { libc::lseek(file.as_raw_fd(), offset as i64, whence) };
    if pos >= 0 {
        return Ok(Some(pos as u64));
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::ENXIO) {
        Ok(None)
    } else {
        Err(err)
    }
}

#[async_trait]
impl BlockDriver for FileDriver {
    fn driver_name(&self) -> &'static str {
        "file"
    }

    fn length(&self) -> u64 {
        self.length.load(Ordering::Acquire)
    }

    fn make_growable(&self) -> bool {
        if self.block_device || self.read_only {
            return false;
        }
        self.growable.store(true, Ordering::Release);
        true
    }

    fn limits(&self) -> Limits {
        // Unaligned requests work in direct mode too (through the buffered descriptor),
        // so the alignment is a preference for speed, reported for callers that split.
        let request_alignment = if self.buffered.is_some() {
            DIRECT_ALIGN as u32
        } else {
            1
        };
        Limits {
            request_alignment,
            ..Limits::default()
        }
    }

    fn filename(&self) -> Option<PathBuf> {
        Some(self.path.clone())
    }

    async fn read(&self, offset: u64, mut buf: IoBuf) -> Result<IoBuf> {
        self.check("read", offset, buf.len() as u64)?;
        let file = self.fd_for(offset, buf.len() as u64);
        let direct = self.buffered.is_some() && Arc::ptr_eq(&file, &self.file);
        let cached = if direct || buf.len() > NOWAIT_MAX {
            0
        } else {
            pread_cached(&file, &mut buf, offset)
        };
        if cached == buf.len() {
            return Ok(buf);
        }
        let result = blocking(move || {
            let r = pread_full(&file, &mut buf[cached..], offset + cached as u64);
            Ok((buf, r))
        })
        .await?;
        match result {
            (buf, Ok(())) => Ok(buf),
            (_, Err(e)) => Err(self.io_error("read", offset, e)),
        }
    }

    async fn read_uncached(&self, offset: u64, buf: IoBuf, direct: bool) -> Result<IoBuf> {
        // A file opened with cache.direct reads past the cache already.
        if self.buffered.is_some() {
            return self.read(offset, buf).await;
        }
        let len = buf.len() as u64;
        self.check("read", offset, len)?;
        // With `direct`, aligned requests go past the page cache, as one request to
        // the device whatever the cache holds of their range: a buffered read of a
        // range the cache holds scattered pages of goes to the disk as one request
        // per gap (dozens for a 512 KiB chunk, measured), and a guest request queues
        // behind all of them. Linux keeps the two descriptors coherent: a direct read
        // first writes back the dirty pages of its range.
        let direct = (direct
            && offset.is_multiple_of(DIRECT_ALIGN)
            && len.is_multiple_of(DIRECT_ALIGN)
            && !self.direct_reads_refused.load(Ordering::Relaxed))
        .then(|| self.direct_read_fd())
        .flatten();
        // The rest (an unaligned tail, or no O_DIRECT here) reads without readahead.
        let fallback = match self.uncached_fd() {
            Some(file) => file,
            None if direct.is_none() => return self.read(offset, buf).await,
            None => self.file.clone(),
        };
        let refused = self.direct_reads_refused.clone();
        let result = blocking(move || {
            // Direct reads go through io_uring where it works: a synchronous direct
            // read holds the inode's lock until the device answers, and guest writes
            // to the file wait for it (see `async_direct`).
            let (mut buf, direct_result) = match direct {
                Some(direct) => match async_direct::read_full(&direct, buf, offset) {
                    Ok((buf, r)) => (buf, Some(r)),
                    Err(mut buf) => {
                        let r = pread_full(&direct, &mut buf, offset);
                        (buf, Some(r))
                    }
                },
                None => (buf, None),
            };
            let r = match direct_result {
                // A device whose blocks are larger than DIRECT_ALIGN refuses it.
                Some(Err(e)) if e.raw_os_error() == Some(libc::EINVAL) => {
                    refused.store(true, Ordering::Relaxed);
                    pread_full(&fallback, &mut buf, offset)
                }
                Some(result) => result,
                None => pread_full(&fallback, &mut buf, offset),
            };
            Ok((buf, r))
        })
        .await?;
        match result {
            (buf, Ok(())) => Ok(buf),
            (_, Err(e)) => Err(self.io_error("read", offset, e)),
        }
    }

    async fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> Result<IoBuf> {
        self.check_writable()?;
        let len = buf.len() as u64;
        let end = self.check_write("write", offset, len)?;
        let file = self.fd_for(offset, len);
        // An uncached write of a buffered file goes past the page cache where it is
        // aligned (IoBufs always are in memory). Linux keeps the two descriptors
        // coherent: a direct write writes back and drops the cached pages it covers.
        let direct = (flags.uncached
            && self.buffered.is_none()
            && offset.is_multiple_of(DIRECT_ALIGN)
            && len.is_multiple_of(DIRECT_ALIGN)
            && !self.direct_writes_refused.load(Ordering::Relaxed))
        .then(|| self.direct_write_fd())
        .flatten();
        let refused = self.direct_writes_refused.clone();
        let (buf, written, synced) = blocking(move || {
            let written = match direct.map(|direct| direct.write_all_at(&buf, offset)) {
                // A device whose blocks are larger than DIRECT_ALIGN refuses it.
                Some(Err(e)) if e.raw_os_error() == Some(libc::EINVAL) => {
                    refused.store(true, Ordering::Relaxed);
                    file.write_all_at(&buf, offset)
                }
                Some(result) => result,
                None => file.write_all_at(&buf, offset),
            };
            let synced = (written.is_ok() && flags.fua).then(|| file.sync_data());
            Ok((buf, written, synced))
        })
        .await?;
        // Even a failed write may have changed part of its range.
        self.sync.wrote();
        written.map_err(|e| self.io_error("write", offset, e))?;
        self.length
            .fetch_max(round_to_sectors(end), Ordering::AcqRel);
        if let Some(Err(e)) = synced {
            let err = self.flush_error(e);
            self.sync.poison(&err).await;
            return Err(err);
        }
        Ok(buf)
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.check_writable()?;
        self.check("write zeroes", offset, len)?;
        let file = self.file.clone();
        let block_device = self.block_device;
        let done = blocking(move || {
            if block_device {
                return Ok(Zeroed::Unsupported);
            }
            let mut modes = Vec::with_capacity(2);
            if flags.may_unmap {
                modes.push(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE);
            }
            modes.push(libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE);
            for mode in modes {
                match fallocate(&file, mode, offset, len) {
                    Ok(()) if flags.fua => return Ok(Zeroed::Done(Some(file.sync_data()))),
                    Ok(()) => return Ok(Zeroed::Done(None)),
                    Err(e) if unsupported(&e) => continue,
                    Err(e) => return Ok(Zeroed::Failed(e)),
                }
            }
            Ok(Zeroed::Unsupported)
        })
        .await;
        match done? {
            Zeroed::Done(synced) => {
                self.sync.wrote();
                if let Some(Err(e)) = synced {
                    let err = self.flush_error(e);
                    self.sync.poison(&err).await;
                    return Err(err);
                }
                Ok(())
            }
            // Writes of zeros count themselves (they go through `write`).
            Zeroed::Unsupported => write_zeroes_by_writing(self, offset, len, flags).await,
            Zeroed::Failed(e) => {
                self.sync.wrote();
                Err(self.io_error("write zeroes to", offset, e))
            }
        }
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        self.check("discard", offset, len)?;
        if self.block_device {
            return Ok(());
        }
        let file = self.file.clone();
        let result = blocking(move || {
            Ok(fallocate(
                &file,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            ))
        })
        .await?;
        self.sync.wrote();
        match result {
            Ok(()) => Ok(()),
            Err(e) if unsupported(&e) => Ok(()),
            Err(e) => Err(self.io_error("discard", offset, e)),
        }
    }

    async fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.sync
            .sync(|| async {
                let file = self.file.clone();
                let result = blocking(move || Ok(file.sync_data())).await?;
                result.map_err(|e| self.flush_error(e))
            })
            .await
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        self.check("block status", offset, len)?;
        let file = self.file.clone();
        let length = self.length();
        let block_device = self.block_device;
        let result = blocking(move || {
            if block_device {
                return Ok(Ok((true, len)));
            }
            let run = (|| -> io::Result<(bool, u64)> {
                let end = offset + len;
                match lseek(&file, offset, libc::SEEK_DATA)? {
                    // No data after offset: a hole to the end of the file.
                    None => Ok((false, len)),
                    Some(data) if data > offset => Ok((false, data.min(end) - offset)),
                    Some(_) => {
                        let hole = lseek(&file, offset, libc::SEEK_HOLE)?.unwrap_or(length);
                        Ok((true, hole.min(end).max(offset + 1) - offset))
                    }
                }
            })();
            Ok(run)
        })
        .await?;
        let (data, length) = match result {
            Ok(run) => run,
            // A filesystem without SEEK_DATA: everything is data, as QEMU assumes.
            Err(e) if unsupported(&e) => (true, len),
            Err(e) => return Err(self.io_error("query block status of", offset, e)),
        };
        let status = Status {
            data,
            zero: !data,
            allocated: true,
            host_offset: Some(offset),
            compressed: false,
        };
        Ok(Extent {
            offset,
            length,
            status,
        })
    }
}

mod async_direct;
#[cfg(test)]
mod tests;
