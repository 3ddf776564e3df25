//! Listening sockets for the daemon's servers (NBD here, QMP in the `qmp` crate).
//!
//! * A UNIX socket gets its mode before it has a name: the descriptor is `fchmod`ed
//!   before `bind`, and Linux creates the socket file with that mode (less the umask),
//!   so there is no moment when another local user could connect (binding first and
//!   then calling chmod leaves such a window, and under umask 000 the mode was 0777).
//!   It is bound and listening under a temporary name in the same directory, then
//!   renamed into place, so the path never names a socket that refuses connections
//!   (a client that saw the file appear between `bind` and `listen` got ECONNREFUSED).
//! * An existing file at the path is replaced only if it is a stale socket (from a
//!   killed daemon: nothing accepts on it); a socket a live server listens on, or any
//!   other file, is an error and left alone.
//! * Accept errors (EMFILE at the descriptor limit, ENOBUFS...) pause the accept loop,
//!   doubling from 10 ms to 1 s: the pending connection stays in the backlog, so
//!   retrying at once would spin a core without making progress.

use std::io;
use std::os::fd::FromRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::time::Duration;

/// Mode of NBD sockets: owner and group (QEMU leaves it to the umask).
pub const NBD_SOCKET_MODE: u32 = 0o660;
/// Mode of QMP sockets: owner only (QMP can open any file the daemon can).
pub const QMP_SOCKET_MODE: u32 = 0o600;

/// Binds a listening UNIX socket at `path` with `mode` from the start; see the module
/// note. Must run inside a tokio runtime.
pub fn bind_unix(path: &Path, mode: u32) -> io::Result<tokio::net::UnixListener> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("'{}' is in use by a running server", path.display()),
                ));
            }
            // A stale socket: the rename below replaces it.
        }
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("'{}' exists and is not a socket", path.display()),
            ));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    // Clients connect by this path, so it must fit even though binding does not use it.
    socket_address(path)?;
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let temporary = path.with_file_name(format!(".sp-{}-{n}.sock", std::process::id()));
    if socket_address(&temporary).is_err() {
        // The temporary name does not fit where the path itself does: bind in place.
        if std::fs::symlink_metadata(path).is_ok() {
            std::fs::remove_file(path)?;
        }
        return listen_at(path, mode);
    }
    let listener = listen_at(&temporary, mode)?;
    if let Err(e) = std::fs::rename(&temporary, path) {
        let _ = std::fs::remove_file(&temporary);
        return Err(e);
    }
    Ok(listener)
}

/// The socket address of `path`, or why it cannot be one.
fn socket_address(path: &Path) -> io::Result<libc::sockaddr_un> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: an all-zero sockaddr_un is a valid (empty) address.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "'{}' is too long for a UNIX socket path (at most {} bytes)",
                path.display(),
                addr.sun_path.len() - 1
            ),
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, &src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = src as libc::c_char;
    }
    Ok(addr)
}

/// A listening socket bound at `path` with `mode`.
fn listen_at(path: &Path, mode: u32) -> io::Result<tokio::net::UnixListener> {
    let addr = socket_address(path)?;
    // SAFETY: plain socket creation; the descriptor is owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns; the listener closes it.
    let listener = unsafe { std::os::unix::net::UnixListener::from_raw_fd(fd) };
    let check = |rc: libc::c_int| {
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    };
    // SAFETY: fchmod, bind and listen on the descriptor owned by `listener`, with an
    // address that lives across the calls and its true length.
    unsafe {
        check(libc::fchmod(fd, mode as libc::mode_t))?;
        check(libc::bind(
            fd,
            (&raw const addr).cast(),
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        ))?;
        check(libc::listen(fd, 128))?;
    }
    tokio::net::UnixListener::from_std(listener)
}

/// The pause between failed accepts; see the module note.
#[derive(Debug)]
pub struct AcceptBackoff {
    delay: Duration,
}

impl Default for AcceptBackoff {
    fn default() -> Self {
        Self { delay: Self::FIRST }
    }
}

impl AcceptBackoff {
    const FIRST: Duration = Duration::from_millis(10);
    const MAX: Duration = Duration::from_secs(1);

    /// A connection was accepted: the next failure starts from the shortest pause.
    pub fn reset(&mut self) {
        self.delay = Self::FIRST;
    }

    /// Logs a failed accept of `server` (only when the pause grows to its maximum, so
    /// a descriptor shortage does not flood the log) and waits.
    pub async fn failed(&mut self, server: &str, err: &io::Error) {
        if self.delay < Self::MAX {
            tracing::warn!(
                "{server} accept failed: {err}; retrying in {:?}",
                self.delay
            );
        }
        tokio::time::sleep(self.delay).await;
        self.delay = (self.delay * 2).min(Self::MAX);
    }
}

/// The next client of a UNIX listener; failures back off and retry.
pub async fn accept_unix(
    listener: &tokio::net::UnixListener,
    server: &str,
    backoff: &mut AcceptBackoff,
) -> tokio::net::UnixStream {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                backoff.reset();
                return stream;
            }
            Err(e) => backoff.failed(server, &e).await,
        }
    }
}

/// The next client of a TCP listener (with Nagle off); failures back off and retry.
pub async fn accept_tcp(
    listener: &tokio::net::TcpListener,
    server: &str,
    backoff: &mut AcceptBackoff,
) -> tokio::net::TcpStream {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                backoff.reset();
                let _ = stream.set_nodelay(true);
                return stream;
            }
            Err(e) => backoff.failed(server, &e).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[tokio::test]
    async fn a_socket_has_its_mode_whatever_the_umask_and_replaces_only_sockets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        // SAFETY: umask only changes the process's file-creation mask.
        let old = unsafe { libc::umask(0) };
        let first = bind_unix(&path, QMP_SOCKET_MODE);
        // SAFETY: as above, restoring the previous mask.
        unsafe { libc::umask(old) };
        let first = first.unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // A socket someone listens on is not replaced; a stale one is.
        let live = bind_unix(&path, NBD_SOCKET_MODE).unwrap_err();
        assert!(live.to_string().contains("in use"), "{live}");
        drop(first);
        let again = bind_unix(&path, NBD_SOCKET_MODE).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode & !0o660, 0, "mode {mode:o}");
        drop(again);
        // A regular file is not.
        let file = dir.path().join("precious");
        std::fs::write(&file, b"keep me").unwrap();
        let err = bind_unix(&file, QMP_SOCKET_MODE).unwrap_err();
        assert!(err.to_string().contains("is not a socket"), "{err}");
        assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
    }

    #[tokio::test]
    async fn a_path_too_long_for_a_socket_is_refused_clearly() {
        let long = std::path::PathBuf::from(format!("/tmp/{}", "x".repeat(200)));
        let err = bind_unix(&long, QMP_SOCKET_MODE).unwrap_err();
        assert!(err.to_string().contains("too long"), "{err}");
    }
}
