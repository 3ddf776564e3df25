//! `stillpoint nbd IMAGE`: serve one image over NBD, in the manner of qemu-nbd.
//!
//! The export is read-only unless `--writable`; its name is "" (qemu-nbd's default)
//! unless `--name` is given. It serves until SIGINT or SIGTERM, then flushes the image,
//! removes its socket and exits 0.

use std::path::Path;

use anyhow::Context;
use block::AttachUser;
use block::NodeGraph;
use block::options::SocketAddress;
use nbd::Export;
use nbd::NbdServer;

use crate::image::Format;
use crate::image::resolve_format;
use crate::signals::Interrupts;

/// How to serve an image.
#[derive(Debug)]
pub struct ServeOptions {
    /// Where to listen.
    pub listen: SocketAddress,
    /// The image format; probed when None.
    pub format: Option<Format>,
    /// The export name.
    pub name: String,
    /// Whether clients may write.
    pub writable: bool,
    /// Connection and handshake limits.
    pub limits: nbd::ServerLimits,
}

/// Serves `image` until a signal arrives.
pub async fn run(image: &Path, options: ServeOptions) -> anyhow::Result<()> {
    let ServeOptions {
        listen,
        format,
        name,
        writable,
        limits,
    } = options;
    let format = resolve_format(image, format, "--format")?;
    // Watched before the image opens: a signal meanwhile stops the server as soon as
    // it is up, with the image closed cleanly (a qcow2's bitmaps stored), instead of
    // killing the process with the image open.
    let mut interrupts = Interrupts::watch()?;
    let graph = NodeGraph::new();
    graph
        .add(crate::image::node_options(
            image,
            format,
            !writable,
            Some("disk"),
        ))
        .await?;
    let result = serve(
        &graph,
        &mut interrupts,
        &image.display().to_string(),
        listen,
        name,
        writable,
        limits,
    )
    .await;
    // Close on every exit (a failed bind included), so a qcow2 image is left clean.
    let closed = graph.close_all().await;
    result?;
    closed.context("failed to close the image")
}

/// Serves a node over a driver built elsewhere (a repository snapshot), read-only.
pub async fn run_driver(
    what: &str,
    driver: Box<dyn block::BlockDriver>,
    options: ServeOptions,
) -> anyhow::Result<()> {
    let mut interrupts = Interrupts::watch()?;
    let graph = NodeGraph::new();
    graph.add_driver("disk", driver, true).await?;
    let result = serve(
        &graph,
        &mut interrupts,
        what,
        options.listen,
        options.name,
        false,
        options.limits,
    )
    .await;
    let closed = graph.close_all().await;
    result?;
    closed.context("failed to close the node")
}

async fn serve(
    graph: &NodeGraph,
    interrupts: &mut Interrupts,
    what: &str,
    listen: SocketAddress,
    name: String,
    writable: bool,
    limits: nbd::ServerLimits,
) -> anyhow::Result<()> {
    let flusher = graph.attach("disk", AttachUser::Other("nbd command".into()))?;
    let (serving, where_) = listen_and_serve(graph, &listen, &name, writable, limits).await?;
    eprintln!(
        "stillpoint: serving '{what}' as NBD export '{name}' ({}) on {where_}",
        if writable { "writable" } else { "read-only" }
    );
    interrupts.recv().await;
    stop_serving(serving, &listen);
    flusher.flush().await.context("failed to flush the image")?;
    // Closing writes a qcow2 image's metadata and clears its dirty bit.
    graph
        .close_all()
        .await
        .context("failed to close the image")?;
    eprintln!("stillpoint: NBD server stopped, image flushed");
    Ok(())
}

/// Exports node "disk" of `graph` as `name` and serves it on `listen` (a task);
/// returns the task and where it listens, as "unix:PATH" or "tcp:HOST:PORT".
pub async fn listen_and_serve(
    graph: &NodeGraph,
    listen: &SocketAddress,
    name: &str,
    writable: bool,
    limits: nbd::ServerLimits,
) -> anyhow::Result<(tokio::task::JoinHandle<()>, String)> {
    let disk = graph.attach("disk", AttachUser::Other(format!("NBD export '{name}'")))?;
    let server = NbdServer::with_limits(limits);
    server
        .add_export(Export {
            name: name.to_string(),
            description: String::new(),
            disk,
            writable,
            bitmaps: Vec::new(),
        })
        .map_err(anyhow::Error::msg)?;
    Ok(match listen {
        SocketAddress::Unix(path) => {
            let listener = nbd::listener::bind_unix(path, nbd::listener::NBD_SOCKET_MODE)
                .with_context(|| format!("cannot listen on '{}'", path.display()))?;
            let task = tokio::spawn(server.clone().serve_unix(listener));
            (task, format!("unix:{}", path.display()))
        }
        SocketAddress::Inet { .. } => {
            let addr = listen.to_string();
            let listener = tokio::net::TcpListener::bind(&addr)
                .await
                .with_context(|| format!("cannot listen on {addr}"))?;
            let bound = listener.local_addr().map(|a| a.to_string()).unwrap_or(addr);
            let task = tokio::spawn(server.clone().serve_tcp(listener));
            (task, format!("tcp:{bound}"))
        }
    })
}

/// Stops a server [`listen_and_serve`] started and removes its UNIX socket.
pub fn stop_serving(serving: tokio::task::JoinHandle<()>, listen: &SocketAddress) {
    serving.abort();
    if let SocketAddress::Unix(path) = listen {
        std::fs::remove_file(path).ok();
    }
}
