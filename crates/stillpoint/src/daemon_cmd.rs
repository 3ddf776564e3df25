//! `stillpoint daemon`: the long-running storage daemon, configured like
//! qemu-storage-daemon and controlled over QMP.
//!
//! Options are applied in this order: `--pidfile`, `--blockdev` (JSON or the dotted
//! key=value form), `--nbd-server`, `--export`, then the QMP sockets (`--qmp PATH`, or QEMU's
//! `--chardev socket,id=ID,path=PATH,server=on,wait=off` with `--monitor chardev=ID`),
//! created mode 0600. SIGINT, SIGTERM, SIGHUP and the QMP `quit`
//! command cancel running jobs, stop the NBD server, flush every node, remove the
//! sockets and the pidfile, and exit 0, as qemu-storage-daemon does. They do so during
//! start-up too: the signals are watched before the first option is applied.
//!
//! The pid file is locked (`lockf`) for as long as the daemon runs: a second daemon
//! given the same file refuses to start, with QEMU's message, instead of overwriting
//! it and deleting it on exit.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use anyhow::anyhow;
use anyhow::bail;
use block::BlockdevOptions;
use block::qapi::Members;
use block::qapi::parse_keyval;
use qmp::Daemon;
use serde_json::Map;
use serde_json::Value;

/// The command line of `stillpoint daemon`.
#[derive(Debug, Default)]
pub struct DaemonArgs {
    /// QMP sockets to listen on.
    pub qmp: Vec<PathBuf>,
    /// `--blockdev` values.
    pub blockdev: Vec<String>,
    /// `--nbd-server` value.
    pub nbd_server: Option<String>,
    /// `--export` values.
    pub export: Vec<String>,
    /// `--chardev` values.
    pub chardev: Vec<String>,
    /// `--monitor` values.
    pub monitor: Vec<String>,
    /// `--pidfile` value.
    pub pidfile: Option<PathBuf>,
    /// `--state-dir` value: where raw images' bitmap files go.
    pub state_dir: Option<PathBuf>,
}

/// JSON (when it starts with `{`) or the dotted form, as members.
fn members(text: &str, implied: Option<&str>) -> anyhow::Result<Members> {
    let map: Map<String, Value> = if text.trim_start().starts_with('{') {
        match serde_json::from_str(text).context("invalid JSON")? {
            Value::Object(map) => map,
            _ => bail!("expected a JSON object: {text}"),
        }
    } else {
        return Ok(Members::keyval(parse_keyval(text, implied)?));
    };
    Ok(Members::new(map, String::new()))
}

/// Runs the daemon until a signal or `quit`.
pub async fn run(args: DaemonArgs) -> anyhow::Result<()> {
    if let Some(dir) = &args.state_dir {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the state directory {}", dir.display()))?;
    }
    let daemon = Daemon::with_drivers(std::sync::Arc::new(crate::repo_target::RepositoryDrivers));
    // Before any node opens: raw nodes find their bitmap files there.
    daemon.graph.set_state_dir(args.state_dir.clone());
    let result = serve(&daemon, &args).await;
    if result.is_err() {
        // A start-up failure after some nodes opened: close them cleanly (qcow2
        // metadata, bitmaps, dirty bit) before exiting.
        daemon.shutdown().await;
    }
    result
}

/// What start-up has made so far, for the shutdown to undo.
#[derive(Default)]
struct Started {
    /// The locked pid file, once written.
    pid_lock: Option<std::fs::File>,
    /// The QMP sockets listening, and their servers.
    sockets: Vec<PathBuf>,
    serving: Vec<tokio::task::JoinHandle<()>>,
}

async fn serve(daemon: &Arc<Daemon>, args: &DaemonArgs) -> anyhow::Result<()> {
    // Watched from the start: a signal while the options are applied stops the
    // daemon as cleanly as one after. Unwatched, it killed the process, and a qcow2
    // opened for writing by then kept its persistent bitmaps marked in use (so they
    // were inconsistent at the next open, and the next backup had to be full).
    let mut signals = crate::signals::Interrupts::watch_with_hangup()?;
    let mut started = Started::default();
    let stopped_in_start_up = {
        let start = start(daemon, args, &mut started);
        tokio::pin!(start);
        tokio::select! {
            biased;
            result = &mut start => {
                result?;
                false
            }
            _ = signals.recv() => true,
        }
    };
    if !stopped_in_start_up {
        eprintln!(
            "stillpoint: daemon ready ({} QMP socket{})",
            started.sockets.len(),
            if started.sockets.len() == 1 { "" } else { "s" }
        );
        let quitting = Arc::clone(daemon);
        tokio::select! {
            _ = signals.recv() => {}
            _ = quitting.quit_requested() => {}
        }
    }
    daemon.shutdown().await;
    for task in &started.serving {
        task.abort();
    }
    for path in &started.sockets {
        let _ = std::fs::remove_file(path);
    }
    if let (Some(pidfile), Some(_)) = (&args.pidfile, &started.pid_lock) {
        let _ = std::fs::remove_file(pidfile);
    }
    if stopped_in_start_up {
        eprintln!("stillpoint: daemon stopped by a signal during start-up, nodes flushed");
    } else {
        eprintln!("stillpoint: daemon stopped, nodes flushed");
    }
    Ok(())
}

/// Applies the options in order; what it makes goes into `started` as it is made.
async fn start(
    daemon: &Arc<Daemon>,
    args: &DaemonArgs,
    started: &mut Started,
) -> anyhow::Result<()> {
    // First: a second daemon with the same pid file must not touch anything.
    if let Some(pidfile) = &args.pidfile {
        started.pid_lock = Some(write_pidfile(pidfile)?);
    }
    for text in &args.blockdev {
        let options = if text.trim_start().starts_with('{') {
            BlockdevOptions::from_json(
                serde_json::from_str(text).context("--blockdev: invalid JSON")?,
            )
        } else {
            BlockdevOptions::from_keyval(text)
        }
        .with_context(|| format!("--blockdev {text}"))?;
        daemon
            .graph
            .add(options)
            .await
            .with_context(|| format!("--blockdev {text}"))?;
    }
    if let Some(text) = &args.nbd_server {
        let mut m = members(text, None)?;
        let mut addr = m
            .required("addr", Members::object)
            .map_err(|e| anyhow!("--nbd-server: {e}"))?;
        let kind = addr
            .required("type", |m, k, v| m.enumeration(k, v, &["unix", "inet"]))
            .map_err(|e| anyhow!("--nbd-server: {e}"))?;
        let listen = qmp::daemon::parse_flat_address(&kind, &mut addr)
            .map_err(|e| anyhow!("--nbd-server: {}", e.desc))?;
        addr.finish().map_err(|e| anyhow!("--nbd-server: {e}"))?;
        let limits = qmp::daemon::nbd_server_limits(&mut m)
            .map_err(|e| anyhow!("--nbd-server: {}", e.desc))?;
        m.finish().map_err(|e| anyhow!("--nbd-server: {e}"))?;
        daemon
            .start_nbd(listen, limits)
            .await
            .map_err(|e| anyhow!("--nbd-server: {}", e.desc))?;
    }
    for text in &args.export {
        let m = members(text, Some("type"))?;
        daemon
            .block_export_add(m)
            .await
            .map_err(|e| anyhow!("--export {text}: {}", e.desc))?;
    }
    let mut chardevs: HashMap<String, PathBuf> = HashMap::new();
    for text in &args.chardev {
        let mut m = members(text, Some("backend"))?;
        let backend = m.required("backend", Members::string)?;
        let id = m.required("id", Members::string)?;
        if backend != "socket" {
            bail!("--chardev {text}: only socket chardevs are supported");
        }
        let path = m
            .required("path", Members::string)
            .map_err(|e| anyhow!("--chardev {text}: {e}"))?;
        let server = m.optional("server", Members::boolean)?.unwrap_or(false);
        m.optional("wait", Members::boolean)?;
        m.finish().map_err(|e| anyhow!("--chardev {text}: {e}"))?;
        if !server {
            bail!("--chardev {text}: only server=on sockets are supported");
        }
        chardevs.insert(id, PathBuf::from(path));
    }
    let mut sockets = args.qmp.clone();
    for text in &args.monitor {
        let mut m = members(text, Some("chardev"))?;
        let id = m.required("chardev", Members::string)?;
        let mode = m.optional("mode", Members::string)?;
        if mode.is_some_and(|mode| mode != "control") {
            bail!("--monitor {text}: only mode=control (QMP) is supported");
        }
        m.optional("pretty", Members::boolean)?;
        m.finish().map_err(|e| anyhow!("--monitor {text}: {e}"))?;
        let path = chardevs
            .get(&id)
            .ok_or_else(|| anyhow!("--monitor {text}: no chardev '{id}'"))?;
        sockets.push(path.clone());
    }
    for path in sockets {
        // Mode 0600 from the moment the socket exists; a stale socket is replaced,
        // any other file is left alone.
        let listener = nbd::listener::bind_unix(&path, nbd::listener::QMP_SOCKET_MODE)
            .with_context(|| format!("cannot listen on '{}'", path.display()))?;
        started.serving.push(tokio::spawn(qmp::server::serve_unix(
            daemon.clone(),
            listener,
        )));
        started.sockets.push(path);
    }
    Ok(())
}

/// Writes this process's pid to `path` under a lock held as long as the returned file
/// lives (QEMU's rule: "cannot create PID file: Cannot lock pid file: ...").
fn write_pidfile(path: &std::path::Path) -> anyhow::Result<std::fs::File> {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    let fail = |what: &str, e: std::io::Error| {
        anyhow!(
            "cannot create PID file: {what}: {}",
            crate::image::os_text(&e)
        )
    };
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| fail(&format!("Cannot open pid file '{}'", path.display()), e))?;
    // SAFETY: lockf on a descriptor owned by `file`, integer arguments only.
    if unsafe { libc::lockf(file.as_raw_fd(), libc::F_TLOCK, 0) } != 0 {
        return Err(fail(
            "Cannot lock pid file",
            std::io::Error::last_os_error(),
        ));
    }
    file.set_len(0)
        .and_then(|()| writeln!(file, "{}", std::process::id()))
        .map_err(|e| fail("Failed to write pid file", e))?;
    Ok(file)
}
