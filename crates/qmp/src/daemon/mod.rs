//! The daemon's state; its command table is `commands.rs`, the commands are in files by
//! family (see the crate note).
//!
//! One [`Daemon`] owns the node graph, the jobs, the NBD server and its exports, and the
//! broadcast channel every QMP client's events come from. Commands parse their
//! arguments with the block layer's QAPI-style parser, so a wrong member gets QEMU's
//! words ("Parameter 'x' is missing"), and refuse what Stillpoint cannot honour yet
//! with a clear error instead of ignoring it.

pub mod bitmaps;
mod block_commands;
mod commands;
pub mod create;
mod job_commands;
pub mod legacy;
mod nbd_commands;
pub mod snapshot;
mod transaction;

pub use nbd_commands::nbd_server_limits;
pub use nbd_commands::parse_flat_address;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering;

use block::NodeGraph;
use block::qapi::Members;
use jobs::JobRegistry;
use nbd::NbdDrivers;
use nbd::NbdServer;
use serde_json::Map;
use serde_json::Value;
use serde_json::json;
use tokio::sync::Notify;
use tokio::sync::broadcast;

use crate::error::QmpError;
use crate::error::Reply;
use crate::wire;

struct NbdRunning {
    server: Arc<NbdServer>,
    task: tokio::task::JoinHandle<()>,
    socket: Option<PathBuf>,
}

struct ExportRecord {
    /// The node given at creation; reported when the export's attachment is gone.
    node_name: String,
    /// Follows the export's attachment: a snapshot moves it to the overlay.
    attached: block::node::AttachmentView,
    name: String,
    /// Bitmaps the export offers; busy until it is deleted.
    bitmaps: Vec<Arc<block::dirty::DirtyBitmap>>,
    /// Removal has begun; the record goes (with BLOCK_EXPORT_DELETED) once the
    /// export's running requests have finished.
    shutting_down: bool,
}

/// Everything one daemon serves.
pub struct Daemon {
    /// The node graph (with the NBD client driver available).
    pub graph: Arc<NodeGraph>,
    /// The jobs.
    pub jobs: JobRegistry,
    nbd: tokio::sync::Mutex<Option<NbdRunning>>,
    exports: Mutex<BTreeMap<String, ExportRecord>>,
    events: broadcast::Sender<Value>,
    quitting: AtomicBool,
    quit: Notify,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon")
            .field("graph", &self.graph)
            .finish_non_exhaustive()
    }
}

/// The version the greeting and query-version report: QEMU's shape, our package.
pub fn version() -> Value {
    json!({"qemu": {"major": 10, "minor": 0, "micro": 0},
           "package": concat!("stillpoint ", env!("CARGO_PKG_VERSION"))})
}

fn args(arguments: Value) -> Result<Members, QmpError> {
    match arguments {
        Value::Object(map) => Ok(Members::new(map, String::new())),
        Value::Null => Ok(Members::new(Map::new(), String::new())),
        _ => Err(QmpError::generic(
            "QMP input member 'arguments' must be an object",
        )),
    }
}

/// The drivers that live above the block crate: NBD client nodes, standalone
/// copy-before-write filters, and whatever the binary adds (the repository driver,
/// whose crate this one does not depend on).
#[derive(Default)]
struct DaemonDrivers {
    nbd: NbdDrivers,
    extra: Option<Arc<dyn block::graph::ExternalDrivers>>,
}

#[async_trait::async_trait]
impl block::graph::ExternalDrivers for DaemonDrivers {
    async fn open(
        &self,
        options: &block::options::DriverOptions,
    ) -> block::Result<Box<dyn block::BlockDriver>> {
        match (options, &self.extra) {
            (block::options::DriverOptions::Nbd(_), _) | (_, None) => self.nbd.open(options).await,
            (_, Some(extra)) => extra.open(options).await,
        }
    }

    fn copy_before_write(
        &self,
        options: &block::options::CbwOptions,
        file: block::Attachment,
        target: block::Attachment,
        initial: Option<bitmap::Bitmap>,
    ) -> block::Result<Box<dyn block::BlockDriver>> {
        jobs::copy_before_write::standalone(options, file, target, initial)
    }
}

impl Daemon {
    /// A daemon with nothing in it.
    pub fn new() -> Arc<Self> {
        Self::build(None)
    }

    /// A daemon that can also open the drivers `extra` opens (`blockdev-add` options
    /// this crate parses but does not implement, such as the repository's).
    pub fn with_drivers(extra: Arc<dyn block::graph::ExternalDrivers>) -> Arc<Self> {
        Self::build(Some(extra))
    }

    fn build(extra: Option<Arc<dyn block::graph::ExternalDrivers>>) -> Arc<Self> {
        let (events, _) = broadcast::channel(4096);
        let drivers = DaemonDrivers {
            nbd: NbdDrivers,
            extra,
        };
        let daemon = Arc::new(Self {
            graph: Arc::new(NodeGraph::with_external(Arc::new(drivers))),
            jobs: JobRegistry::new(),
            nbd: tokio::sync::Mutex::new(None),
            exports: Mutex::new(BTreeMap::new()),
            events,
            quitting: AtomicBool::new(false),
            quit: Notify::new(),
        });
        let mut job_events = daemon.jobs.subscribe();
        let forward = daemon.events.clone();
        tokio::spawn(async move {
            loop {
                match job_events.recv().await {
                    Ok(event) => {
                        let _ = forward.send(wire::event(event.name(), Some(event.data())));
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!("{n} job events were dropped");
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        daemon
    }

    /// Every event message from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Value> {
        self.events.subscribe()
    }

    /// Resolves when `quit` was executed.
    pub async fn quit_requested(&self) {
        loop {
            let notified = self.quit.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.quitting.load(Ordering::SeqCst) {
                return;
            }
            notified.await;
        }
    }

    /// Shuts everything down: cancels jobs (waiting for them to end), stops the NBD
    /// server, and flushes every node.
    pub async fn shutdown(&self) {
        let _ = self.events.send(wire::event(
            "SHUTDOWN",
            Some(json!({"guest": false, "reason": "host-qmp-quit"})),
        ));
        let mut rx = self.jobs.subscribe();
        let running: Vec<_> = self.jobs.list();
        for job in &running {
            let _ = job.cancel(true);
        }
        while !self
            .jobs
            .list()
            .iter()
            .all(|j| j.status() == jobs::JobStatus::Concluded)
        {
            let wait = tokio::time::timeout(std::time::Duration::from_secs(10), rx.recv()).await;
            if wait.is_err() {
                break;
            }
        }
        let running = self.nbd.lock().await.take();
        if let Some(running) = running {
            self.stop_nbd(running).await;
        }
        // Close parents before children: qcow2 writes its metadata and clears its
        // dirty bit while its file is still open.
        if let Err(e) = self.graph.close_all().await {
            tracing::warn!("closing nodes at shutdown failed: {e}");
        }
    }

    /// Executes one command: looks it up in the one table (`commands::COMMANDS`, which
    /// `query-commands` lists), parses its arguments and runs it.
    pub async fn execute(self: &Arc<Self>, name: &str, arguments: Value) -> Reply {
        let Some(command) = commands::find(name) else {
            return Err(QmpError {
                class: "CommandNotFound",
                desc: format!("The command {name} has not been found"),
            });
        };
        let m = args(arguments)?;
        (command.run)(self.clone(), command.name, m).await
    }
}

fn done(m: Members, value: Value) -> Reply {
    m.finish()?;
    Ok(value)
}
