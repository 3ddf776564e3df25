//! `stillpoint daemon`: the long-running storage daemon, configured like
//! qemu-storage-daemon and controlled over QMP.
//!
//! Options are applied in this order: `--blockdev` (JSON or the dotted key=value
//! form), `--nbd-server`, `--export`, then the QMP sockets (`--qmp PATH`, or QEMU's
//! `--chardev socket,id=ID,path=PATH,server=on,wait=off` with `--monitor chardev=ID`),
//! created mode 0600, then `--pidfile`. SIGINT, SIGTERM and the QMP `quit` command
//! cancel running jobs, stop the NBD server, flush every node, remove the sockets and
//! the pidfile, and exit 0.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use anyhow::anyhow;
use anyhow::bail;
use block::BlockdevOptions;
use block::options::Members;
use block::options::parse_keyval;
use qmp::Daemon;
use serde_json::Map;
use serde_json::Value;
use tokio::signal::unix::SignalKind;
use tokio::signal::unix::signal;

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
    let daemon = Daemon::new();
    let result = serve(&daemon, &args).await;
    if result.is_err() {
        // A start-up failure after some nodes opened: close them cleanly (qcow2
        // metadata, bitmaps, dirty bit) before exiting.
        daemon.shutdown().await;
    }
    result
}

async fn serve(daemon: &Arc<Daemon>, args: &DaemonArgs) -> anyhow::Result<()> {
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
    let mut serving = Vec::new();
    for path in &sockets {
        // Mode 0600 from the moment the socket exists; a stale socket is replaced,
        // any other file is left alone.
        let listener = nbd::listener::bind_unix(path, nbd::listener::QMP_SOCKET_MODE)
            .with_context(|| format!("cannot listen on '{}'", path.display()))?;
        serving.push(tokio::spawn(qmp::server::serve_unix(
            daemon.clone(),
            listener,
        )));
    }
    if let Some(pidfile) = &args.pidfile {
        std::fs::write(pidfile, format!("{}\n", std::process::id()))
            .with_context(|| format!("cannot write '{}'", pidfile.display()))?;
    }
    eprintln!(
        "stillpoint: daemon ready ({} QMP socket{})",
        sockets.len(),
        if sockets.len() == 1 { "" } else { "s" }
    );
    let mut sigterm = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let quitting = Arc::clone(daemon);
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = sigterm.recv() => {}
        _ = quitting.quit_requested() => {}
    }
    daemon.shutdown().await;
    for task in serving {
        task.abort();
    }
    for path in &sockets {
        let _ = std::fs::remove_file(path);
    }
    if let Some(pidfile) = &args.pidfile {
        let _ = std::fs::remove_file(pidfile);
    }
    eprintln!("stillpoint: daemon stopped, nodes flushed");
    Ok(())
}
