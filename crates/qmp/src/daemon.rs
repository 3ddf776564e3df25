//! The daemon's state and its command table.
//!
//! One [`Daemon`] owns the node graph, the jobs, the NBD server and its exports, and the
//! broadcast channel every QMP client's events come from. Commands parse their
//! arguments with the block layer's QAPI-style parser, so a wrong member gets QEMU's
//! words ("Parameter 'x' is missing"), and refuse what Stillpoint cannot honour yet
//! with a clear error instead of ignoring it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering;

use block::AttachUser;
use block::BlockdevOptions;
use block::NodeGraph;
use block::options::DetectZeroes;
use block::qapi::Members;
use jobs::BackupOptions;
use jobs::JobRegistry;
use jobs::SyncMode;
use jobs::job::ErrorPolicy;
use jobs::job::JobError;
use nbd::Export;
use nbd::NbdDrivers;
use nbd::NbdServer;
use nbd::RemoveMode;
use nbd::ServerLimits;
use nbd::server::RemoveError;
use serde_json::Map;
use serde_json::Value;
use serde_json::json;
use tokio::sync::Notify;
use tokio::sync::broadcast;

use crate::wire;

/// A QMP error: class and human description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QmpError {
    /// QEMU's error class ("GenericError", "CommandNotFound", "DeviceNotActive").
    pub class: &'static str,
    /// Human text.
    pub desc: String,
}

impl QmpError {
    /// A GenericError.
    pub fn generic(desc: impl Into<String>) -> Self {
        Self {
            class: "GenericError",
            desc: desc.into(),
        }
    }
}

impl From<block::Error> for QmpError {
    fn from(e: block::Error) -> Self {
        Self {
            class: e.qmp_class(),
            desc: e.to_string(),
        }
    }
}

impl From<JobError> for QmpError {
    fn from(e: JobError) -> Self {
        Self {
            class: e.class,
            desc: e.desc,
        }
    }
}

/// What a command answers: its return value or a QMP error.
pub type Reply = Result<Value, QmpError>;

/// Names of the commands this daemon answers (for query-commands).
pub const COMMANDS: &[&str] = &[
    "qmp_capabilities",
    "query-version",
    "query-commands",
    "quit",
    "blockdev-add",
    "blockdev-del",
    "query-named-block-nodes",
    "blockdev-backup",
    "query-block-jobs",
    "blockdev-create",
    "block-dirty-bitmap-add",
    "block-dirty-bitmap-remove",
    "block-dirty-bitmap-clear",
    "block-dirty-bitmap-enable",
    "block-dirty-bitmap-disable",
    "block-dirty-bitmap-merge",
    "query-jobs",
    "block-job-set-speed",
    "block-job-cancel",
    "block-job-pause",
    "block-job-resume",
    "block-job-complete",
    "block-job-finalize",
    "block-job-dismiss",
    "job-pause",
    "job-resume",
    "job-cancel",
    "job-complete",
    "job-finalize",
    "job-dismiss",
    "nbd-server-start",
    "nbd-server-stop",
    "block-export-add",
    "block-export-del",
    "query-block-exports",
    "transaction",
    "blockdev-snapshot-sync",
    "blockdev-snapshot",
    "drive-backup",
    "nbd-server-add",
    "nbd-server-remove",
    "query-block",
];

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

fn block_job_missing(id: &str) -> QmpError {
    QmpError {
        class: "DeviceNotActive",
        desc: format!("Block job '{id}' not found"),
    }
}

/// The drivers that live above the block crate: NBD client nodes and standalone
/// copy-before-write filters.
#[derive(Debug, Default)]
struct DaemonDrivers {
    nbd: NbdDrivers,
}

#[async_trait::async_trait]
impl block::graph::ExternalDrivers for DaemonDrivers {
    async fn open(
        &self,
        options: &block::options::DriverOptions,
    ) -> block::Result<Box<dyn block::BlockDriver>> {
        self.nbd.open(options).await
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
        let (events, _) = broadcast::channel(4096);
        let daemon = Arc::new(Self {
            graph: Arc::new(NodeGraph::with_external(Arc::new(DaemonDrivers::default()))),
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

    /// Executes one command.
    pub async fn execute(self: &Arc<Self>, name: &str, arguments: Value) -> Reply {
        // One table says what exists: query-commands lists it, and nothing else runs.
        if !COMMANDS.contains(&name) && !crate::bitmaps::COMMANDS.contains(&name) {
            return Err(QmpError {
                class: "CommandNotFound",
                desc: format!("The command {name} has not been found"),
            });
        }
        let m = args(arguments)?;
        match name {
            "qmp_capabilities" => Err(QmpError {
                class: "CommandNotFound",
                desc: "Capabilities negotiation is already complete, command ignored".into(),
            }),
            "query-version" => done(m, version()),
            "query-commands" => {
                let list: Vec<Value> = COMMANDS.iter().map(|c| json!({"name": c})).collect();
                done(m, Value::Array(list))
            }
            "quit" => {
                m.finish()?;
                self.quitting.store(true, Ordering::SeqCst);
                self.quit.notify_waiters();
                Ok(json!({}))
            }
            "blockdev-add" => {
                let options = BlockdevOptions::from_members(m)?;
                self.graph.add(options).await?;
                Ok(json!({}))
            }
            "blockdev-del" => {
                let mut m = m;
                let name = m.required("node-name", Members::string)?;
                m.finish()?;
                self.graph.remove(&name).await?;
                Ok(json!({}))
            }
            "query-named-block-nodes" => {
                let mut m = m;
                m.optional("flat", Members::boolean)?;
                m.finish()?;
                Ok(Value::Array(
                    self.graph.nodes().iter().map(|n| node_info(n)).collect(),
                ))
            }
            "blockdev-backup" => self.blockdev_backup(m).await,
            name if crate::bitmaps::COMMANDS.contains(&name) => {
                let action = crate::bitmaps::parse(name, m)?;
                crate::bitmaps::apply(&self.graph, &action)?;
                Ok(json!({}))
            }
            "blockdev-create" => {
                crate::create::blockdev_create(&self.graph, &self.jobs, m)?;
                Ok(json!({}))
            }
            "transaction" => self.transaction(m).await,
            "query-block-jobs" => {
                m.finish()?;
                let list = self.jobs.list();
                Ok(Value::Array(
                    list.iter()
                        .filter(|j| j.job_type().is_block_job())
                        .map(|j| serde_json::to_value(j.block_job_info()).unwrap())
                        .collect(),
                ))
            }
            "query-jobs" => {
                m.finish()?;
                let list = self.jobs.list();
                Ok(Value::Array(
                    list.iter()
                        .map(|j| serde_json::to_value(j.job_info()).unwrap())
                        .collect(),
                ))
            }
            "block-job-set-speed"
            | "block-job-cancel"
            | "block-job-pause"
            | "block-job-resume"
            | "block-job-complete"
            | "block-job-finalize"
            | "block-job-dismiss" => self.block_job_verb(name, m),
            "job-pause" | "job-resume" | "job-cancel" | "job-complete" | "job-finalize"
            | "job-dismiss" => {
                let mut m = m;
                let id = m.required("id", Members::string)?;
                m.finish()?;
                let job = self
                    .jobs
                    .get(&id)
                    .ok_or_else(|| QmpError::generic("Job not found"))?;
                match name {
                    "job-pause" => job.pause()?,
                    "job-resume" => job.resume()?,
                    "job-cancel" => job.cancel(false)?,
                    "job-complete" => job.complete()?,
                    "job-finalize" => job.finalize()?,
                    _ => job.dismiss()?,
                }
                Ok(json!({}))
            }
            "nbd-server-start" => self.nbd_server_start(m).await,
            "nbd-server-stop" => {
                m.finish()?;
                let running = self
                    .nbd
                    .lock()
                    .await
                    .take()
                    .ok_or_else(|| QmpError::generic("NBD server not running"))?;
                self.stop_nbd(running).await;
                Ok(json!({}))
            }
            "block-export-add" => self.block_export_add(m).await,
            "block-export-del" => {
                let mut m = m;
                let id = m.required("id", Members::string)?;
                let mode = m.optional("mode", |m, k, v| m.enumeration(k, v, &["safe", "hard"]))?;
                m.finish()?;
                self.block_export_del(&id, mode.as_deref()).await
            }
            "blockdev-snapshot-sync" => {
                crate::snapshot::blockdev_snapshot_sync(&self.graph, m).await
            }
            "blockdev-snapshot" => crate::snapshot::blockdev_snapshot(&self.graph, m).await,
            "drive-backup" => crate::legacy::drive_backup(self, m).await,
            "nbd-server-add" => crate::legacy::nbd_server_add(self, m).await,
            "nbd-server-remove" => crate::legacy::nbd_server_remove(self, m).await,
            "query-block" => done(m, json!([])),
            "query-block-exports" => {
                m.finish()?;
                let exports = self.exports.lock().unwrap();
                let list = exports.iter().map(|(id, e)| {
                    let node_name = e.attached.node().map(|n| n.name().to_owned());
                    let node_name = node_name.unwrap_or_else(|| e.node_name.clone());
                    json!({"id": id, "type": "nbd", "node-name": node_name,
                           "shutting-down": e.shutting_down})
                });
                Ok(Value::Array(list.collect()))
            }
            other => Err(QmpError {
                class: "CommandNotFound",
                desc: format!("The command {other} has not been found"),
            }),
        }
    }

    /// `block-export-del` (and `nbd-server-remove`): `mode` safe (the default) or hard.
    pub(crate) async fn block_export_del(self: &Arc<Self>, id: &str, mode: Option<&str>) -> Reply {
        let id = id.to_string();
        let mode = match mode {
            Some("hard") => RemoveMode::Hard,
            _ => RemoveMode::Safe,
        };
        let server = self.nbd.lock().await.as_ref().map(|r| r.server.clone());
        let removal = {
            let mut exports = self.exports.lock().unwrap();
            let record = exports
                .get_mut(&id)
                .ok_or_else(|| QmpError::generic(format!("Export '{id}' is not found")))?;
            if record.shutting_down {
                return Err(QmpError::generic(format!(
                    "Export '{id}' is already shutting down"
                )));
            }
            let server = server.expect("exports exist only while the server runs");
            let removal = server
                .remove_export(&record.name, mode)
                .map_err(|e| match e {
                    RemoveError::InUse => QmpError::generic(format!("export '{id}' still in use")),
                    RemoveError::NotFound => {
                        QmpError::generic(format!("Export '{id}' is not found"))
                    }
                })?;
            record.shutting_down = true;
            removal
        };
        // The export is gone for new clients; its record goes, with the event,
        // once its running requests have finished (QEMU's order).
        let daemon = self.clone();
        tokio::spawn(async move {
            removal.await;
            daemon.forget_export(&id);
        });
        Ok(json!({}))
    }

    /// The last step of removing an export, once its node is released: the record,
    /// the bitmaps' busy mark, and the event.
    fn forget_export(&self, id: &str) {
        let record = self.exports.lock().unwrap().remove(id);
        if let Some(record) = record {
            for bitmap in &record.bitmaps {
                bitmap.set_busy(false);
            }
            let _ = self
                .events
                .send(wire::event("BLOCK_EXPORT_DELETED", Some(json!({"id": id}))));
        }
    }

    /// Stops a running NBD server: removes every export the hard way (clients are
    /// disconnected, nobody waits for a client to read), waits for their running
    /// requests, then stops listening and removes the socket.
    async fn stop_nbd(&self, running: NbdRunning) {
        running.task.abort();
        let removals: Vec<_> = {
            let mut exports = self.exports.lock().unwrap();
            exports
                .iter_mut()
                .filter(|(_, record)| !record.shutting_down)
                .filter_map(|(id, record)| {
                    record.shutting_down = true;
                    let removal = running.server.remove_export(&record.name, RemoveMode::Hard);
                    Some((id.clone(), removal.ok()?))
                })
                .collect()
        };
        for (id, removal) in removals {
            removal.await;
            self.forget_export(&id);
        }
        if let Some(path) = running.socket {
            let _ = std::fs::remove_file(path);
        }
    }

    fn block_job_verb(&self, name: &str, mut m: Members) -> Reply {
        let key = if matches!(name, "block-job-finalize" | "block-job-dismiss") {
            "id"
        } else {
            "device"
        };
        let id = m.required(key, Members::string)?;
        let speed = if name == "block-job-set-speed" {
            Some(m.required("speed", |m, k, v| match v.as_i64() {
                Some(n) => Ok(n),
                None => Err(m.type_error(k, "integer")),
            })?)
        } else {
            None
        };
        let force = if name == "block-job-cancel" {
            m.optional("force", Members::boolean)?.unwrap_or(false)
        } else {
            false
        };
        m.finish()?;
        let job = self
            .jobs
            .get(&id)
            .filter(|j| j.job_type().is_block_job())
            .ok_or_else(|| block_job_missing(&id))?;
        match name {
            "block-job-set-speed" => job.set_speed(speed.unwrap_or(0))?,
            "block-job-cancel" => {
                if !force && job.is_user_paused() {
                    return Err(QmpError::generic(format!(
                        "The block job for device '{id}' is currently paused"
                    )));
                }
                job.cancel(force)?;
            }
            "block-job-pause" => job.pause()?,
            "block-job-resume" => job.resume()?,
            "block-job-complete" => job.complete()?,
            "block-job-finalize" => job.finalize()?,
            _ => job.dismiss()?,
        }
        Ok(json!({}))
    }

    pub(crate) async fn blockdev_backup(&self, m: Members) -> Reply {
        let request = parse_backup(m)?;
        jobs::start_backup(
            &self.graph,
            &self.jobs,
            &request.device,
            &request.target,
            request.options,
        )
        .await?;
        Ok(json!({}))
    }

    async fn transaction(&self, mut m: Members) -> Reply {
        let actions = m.required("actions", |m, k, v| match v {
            Value::Array(items) => Ok(items),
            _ => Err(m.type_error(k, "array")),
        })?;
        let grouped = match m.optional("properties", Members::object)? {
            Some(mut p) => {
                let mode = p.optional("completion-mode", |m, k, v| {
                    m.enumeration(k, v, &["individual", "grouped"])
                })?;
                p.finish()?;
                mode.as_deref() == Some("grouped")
            }
            None => false,
        };
        m.finish()?;
        let mut requests = Vec::with_capacity(actions.len());
        let mut bitmap_actions = Vec::new();
        for (i, action) in actions.into_iter().enumerate() {
            let Value::Object(map) = action else {
                return Err(QmpError::generic(format!(
                    "Invalid parameter type for 'actions[{i}]', expected: object"
                )));
            };
            let mut a = Members::new(map, format!("actions[{i}]."));
            let kind = a.required("type", Members::string)?;
            let is_bitmap = crate::bitmaps::COMMANDS.contains(&kind.as_str());
            if kind != "blockdev-backup" && !is_bitmap {
                return Err(QmpError::generic(format!(
                    "Transaction action '{kind}' is not supported by stillpoint yet \
                     (blockdev-backup and block-dirty-bitmap-* are)"
                )));
            }
            let data = a.required("data", Members::object)?;
            a.finish()?;
            if is_bitmap {
                bitmap_actions.push(crate::bitmaps::parse(&kind, data)?);
            } else {
                requests.push(parse_backup(data)?);
            }
        }
        // Bitmap actions alone are applied in order, all or nothing. With backups,
        // bitmap changes happen at the backups' instant, under the same drain (see the
        // bitmaps module): adds and removes now (adds are cleared again at the
        // instant); clear, enable, disable and merge checked now and applied then.
        let deferred = |action: &crate::bitmaps::BitmapAction| {
            !requests.is_empty() && action.waits_for_instant()
        };
        let mut undos = Vec::new();
        let rollback = |undos: Vec<crate::bitmaps::Undo>| {
            for u in undos.into_iter().rev() {
                crate::bitmaps::undo(&self.graph, u);
            }
        };
        for action in &bitmap_actions {
            let checked = if deferred(action) {
                crate::bitmaps::check(&self.graph, action)
            } else {
                crate::bitmaps::apply(&self.graph, action).map(|u| undos.push(u))
            };
            if let Err(e) = checked {
                rollback(undos);
                return Err(e);
            }
        }
        if requests.is_empty() {
            return Ok(json!({}));
        }
        let at_instant_undos = Arc::new(Mutex::new(Vec::new()));
        let at_instant: block::graph::AtInstant = {
            let graph = self.graph.clone();
            let undos = at_instant_undos.clone();
            Box::new(move || {
                for action in &bitmap_actions {
                    let applied = if action.waits_for_instant() {
                        crate::bitmaps::apply(&graph, action)
                            .map(|u| undos.lock().unwrap_or_else(|e| e.into_inner()).push(u))
                    } else {
                        crate::bitmaps::start_at_instant(&graph, action)
                    };
                    applied.map_err(|e| block::Error::invalid(e.desc))?;
                }
                Ok(())
            })
        };
        // Grouped completion: the jobs finish together or not at all.
        let group = grouped.then(jobs::CompletionGroup::new);
        let started = jobs::start_backups_at(
            &self.graph,
            &self.jobs,
            requests,
            Some(at_instant),
            group.as_ref(),
        )
        .await;
        if let Err(e) = started {
            let applied =
                std::mem::take(&mut *at_instant_undos.lock().unwrap_or_else(|e| e.into_inner()));
            rollback(undos.into_iter().chain(applied).collect());
            return Err(e.into());
        }
        Ok(json!({}))
    }

    async fn nbd_server_start(&self, mut m: Members) -> Reply {
        let addr = m.required("addr", Members::object)?;
        let limits = nbd_server_limits(&mut m)?;
        if m.optional("tls-creds", Members::string)?.is_some()
            || m.optional("tls-authz", Members::string)?.is_some()
        {
            return Err(QmpError::generic("TLS is not supported by stillpoint yet"));
        }
        m.finish()?;
        let listen = parse_legacy_address(addr)?;
        self.start_nbd(listen, limits).await
    }

    /// Starts the NBD server on `listen` (shared by QMP and `--nbd-server`).
    pub async fn start_nbd(&self, listen: Listen, limits: ServerLimits) -> Reply {
        let mut running = self.nbd.lock().await;
        if running.is_some() {
            return Err(QmpError::generic("NBD server already running"));
        }
        let server = NbdServer::with_limits(limits);
        let (task, socket) = match listen {
            Listen::Unix(path) => {
                let listener = nbd::listener::bind_unix(&path, nbd::listener::NBD_SOCKET_MODE)
                    .map_err(|e| {
                        QmpError::generic(format!(
                            "Failed to bind socket to {}: {e}",
                            path.display()
                        ))
                    })?;
                (
                    tokio::spawn(server.clone().serve_unix(listener)),
                    Some(path),
                )
            }
            Listen::Inet(addr) => {
                let listener = tokio::net::TcpListener::bind(&addr).await.map_err(|e| {
                    QmpError::generic(format!("Failed to bind socket to {addr}: {e}"))
                })?;
                (tokio::spawn(server.clone().serve_tcp(listener)), None)
            }
        };
        *running = Some(NbdRunning {
            server,
            task,
            socket,
        });
        Ok(json!({}))
    }

    /// `block-export-add` (also `--export`).
    pub async fn block_export_add(&self, mut m: Members) -> Reply {
        m.required("type", |m, k, v| m.enumeration(k, v, &["nbd"]))?;
        let id = m.required("id", Members::string)?;
        let node_name = m.required("node-name", Members::string)?;
        let name = m
            .optional("name", Members::string)?
            .unwrap_or_else(|| node_name.clone());
        let description = m
            .optional("description", Members::string)?
            .unwrap_or_default();
        let writable = m.optional("writable", Members::boolean)?.unwrap_or(false);
        m.optional("writethrough", Members::boolean)?;
        let allocation_depth = m.optional("allocation-depth", Members::boolean)?;
        let bitmap_refs = m
            .optional("bitmaps", |m, k, v| match v {
                Value::Array(items) => Ok(items),
                _ => Err(m.type_error(k, "array")),
            })?
            .unwrap_or_default();
        for key in ["iothread", "fixed-iothread"] {
            if m.optional(key, |_, _, v| Ok(v))?.is_some() {
                return Err(QmpError::generic(format!(
                    "{key} is not supported by stillpoint"
                )));
            }
        }
        m.finish()?;
        let _ = allocation_depth; // always offered; QEMU makes it opt-in
        let server = {
            let running = self.nbd.lock().await;
            running
                .as_ref()
                .map(|r| r.server.clone())
                .ok_or_else(|| QmpError::generic("NBD server not running"))?
        };
        if self.exports.lock().unwrap().contains_key(&id) {
            return Err(QmpError::generic(format!(
                "Block export id '{id}' is already in use"
            )));
        }
        let disk = self.graph.attach(
            &node_name,
            AttachUser::Other(format!("block device is in use by export '{id}'")),
        )?;
        if writable && disk.node().policy().read_only {
            return Err(QmpError::generic("Block node is read-only"));
        }
        // Bitmaps: a name is looked up on the node and down its backing chain, a
        // {node, name} pair on that node.
        let mut bitmaps = Vec::new();
        for item in bitmap_refs {
            let bitmap = match item {
                Value::String(bname) => {
                    let mut node = Some(disk.node());
                    let mut found = None;
                    while let Some(n) = node {
                        if let Ok(b) = n.bitmap(&bname) {
                            found = Some(b);
                            break;
                        }
                        node = n
                            .driver()
                            .filtered_child()
                            .or(n.driver().backing())
                            .map(|a| a.node());
                    }
                    found.ok_or_else(|| {
                        QmpError::generic(format!("Bitmap '{bname}' is not found"))
                    })?
                }
                Value::Object(map) => {
                    let mut b = Members::new(map, "bitmaps.".into());
                    let bnode = b.required("node", Members::string)?;
                    let bname = b.required("name", Members::string)?;
                    b.finish()?;
                    self.graph
                        .node(&bnode)
                        .ok_or_else(|| QmpError::generic(format!("Node '{bnode}' not found")))?
                        .bitmap(&bname)
                        .map_err(|e| QmpError::generic(e.message()))?
                }
                _ => {
                    return Err(QmpError::generic(
                        "Invalid parameter type for 'bitmaps', expected: BlockDirtyBitmapOrStr",
                    ));
                }
            };
            bitmap
                .check_usable()
                .map_err(|e| QmpError::generic(e.message()))?;
            let node_read_only = disk.node().policy().read_only;
            if !writable && !node_read_only && bitmap.info().recording {
                return Err(QmpError::generic(format!(
                    "Enabled bitmap '{}' incompatible with readonly export",
                    bitmap.name()
                )));
            }
            bitmaps.push(bitmap);
        }
        let attached = disk.view();
        server
            .add_export(Export {
                name: name.clone(),
                description,
                disk,
                writable,
                bitmaps: bitmaps.clone(),
            })
            .map_err(QmpError::generic)?;
        for bitmap in &bitmaps {
            bitmap.set_busy(true);
        }
        self.exports.lock().unwrap().insert(
            id,
            ExportRecord {
                node_name,
                attached,
                name,
                bitmaps,
                shutting_down: false,
            },
        );
        Ok(json!({}))
    }
}

fn done(m: Members, value: Value) -> Reply {
    m.finish()?;
    Ok(value)
}

/// Where the NBD server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// A UNIX socket.
    Unix(PathBuf),
    /// `host:port`.
    Inet(String),
}

/// `max-connections` and `handshake-max-seconds` of `nbd-server-start` (and of
/// `--nbd-server`), with QEMU's defaults: no connection limit, 10 s.
pub fn nbd_server_limits(m: &mut Members) -> Result<ServerLimits, QmpError> {
    let mut limits = ServerLimits::default();
    if let Some(n) = m.optional("max-connections", Members::uint32)? {
        limits.max_connections = n;
    }
    if let Some(seconds) = m.optional("handshake-max-seconds", Members::uint32)? {
        limits.handshake = std::time::Duration::from_secs(seconds.into());
    }
    Ok(limits)
}

/// QMP's nbd-server-start takes the legacy `{"type":..,"data":{..}}` address.
fn parse_legacy_address(mut a: Members) -> Result<Listen, QmpError> {
    let kind = a.required("type", |m, k, v| m.enumeration(k, v, &["unix", "inet"]))?;
    let mut data = a.required("data", Members::object)?;
    a.finish()?;
    parse_flat_address(&kind, &mut data)
}

/// The flat form (`--nbd-server addr.type=unix,addr.path=...`) after `type`.
pub fn parse_flat_address(kind: &str, data: &mut Members) -> Result<Listen, QmpError> {
    let listen = if kind == "unix" {
        Listen::Unix(PathBuf::from(data.required("path", Members::string)?))
    } else {
        let host = data.required("host", Members::string)?;
        let port = data.required("port", |m, k, v| match v {
            Value::Number(n) => Ok(n.to_string()),
            other => m.string(k, other),
        })?;
        Listen::Inet(format!("{host}:{port}"))
    };
    Ok(listen)
}

fn node_info(node: &block::Node) -> Value {
    let policy = node.policy();
    let filename = node
        .filename()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let detect = match policy.detect_zeroes {
        DetectZeroes::Off => "off",
        DetectZeroes::On => "on",
        DetectZeroes::Unmap => "unmap",
    };
    // The backing chain: its depth and the first backing file's name.
    let mut depth = 0;
    let mut backing_name = None;
    let mut below = node.driver().backing().map(|b| b.node());
    while let Some(b) = below {
        depth += 1;
        if backing_name.is_none() {
            backing_name = b.filename().map(|p| p.display().to_string());
        }
        below = b.driver().backing().map(|a| a.node());
    }
    let mut image = json!({
        "filename": filename, "format": node.driver_name(), "virtual-size": node.length(),
        "dirty-flag": false,
    });
    if let Some(cs) = node.limits().cluster_size {
        image["cluster-size"] = json!(cs);
    }
    let mut info = json!({
        "node-name": node.name(), "drv": node.driver_name(), "ro": policy.read_only, "file": filename,
        "backing_file_depth": depth, "encrypted": false, "detect_zeroes": detect, "active": true,
        "bps": 0, "bps_rd": 0, "bps_wr": 0, "iops": 0, "iops_rd": 0, "iops_wr": 0,
        "write_threshold": 0,
        "cache": {"writeback": true, "direct": policy.direct, "no-flush": policy.no_flush},
        "image": image,
    });
    if let Some(name) = backing_name {
        info["image"]["backing-filename"] = json!(name);
        info["backing_file"] = json!(name);
    }
    if let Some(bitmaps) = crate::bitmaps::node_bitmaps(node) {
        info["dirty-bitmaps"] = bitmaps;
    }
    info
}

/// Parses `blockdev-backup` arguments, applying QEMU's rules and refusing what
/// Stillpoint cannot do yet.
fn parse_backup(mut m: Members) -> Result<jobs::BackupRequest, QmpError> {
    let device = m.required("device", Members::string)?;
    let target = m.required("target", Members::string)?;
    let sync = m.required("sync", |m, k, v| {
        m.enumeration(k, v, &["top", "full", "none", "incremental", "bitmap"])
    })?;
    // QEMU names a job after its device's block backend when no id is given;
    // qemu-storage-daemon has none, so an id-less job is refused ("Invalid job ID ''")
    // when it is created, after the other checks, and so is ours.
    let job_id = m.optional("job-id", Members::string)?.unwrap_or_default();
    let speed = m.optional("speed", |m, k, v| match v.as_i64() {
        Some(n) if n < 0 => Err(block::Error::invalid(
            "Parameter 'speed' expects a non-negative value",
        )),
        Some(n) => Ok(n as u64),
        None => Err(m.type_error(k, "integer")),
    })?;
    let bitmap = m.optional("bitmap", Members::string)?;
    let bitmap_mode = m.optional("bitmap-mode", |m, k, v| {
        m.enumeration(k, v, &["on-success", "never", "always"])
    })?;
    let compress = m.optional("compress", Members::boolean)?.unwrap_or(false);
    let policy = |m: &Members, k: &str, v: Value| -> block::Result<ErrorPolicy> {
        Ok(
            match m
                .enumeration(k, v, &["report", "ignore", "enospc", "stop", "auto"])?
                .as_str()
            {
                "ignore" => ErrorPolicy::Ignore,
                "enospc" => ErrorPolicy::Enospc,
                "stop" => ErrorPolicy::Stop,
                "auto" => ErrorPolicy::Auto,
                _ => ErrorPolicy::Report,
            },
        )
    };
    let on_source_error = m.optional("on-source-error", policy)?.unwrap_or_default();
    let on_target_error = m.optional("on-target-error", policy)?.unwrap_or_default();
    let auto_finalize = m
        .optional("auto-finalize", Members::boolean)?
        .unwrap_or(true);
    let auto_dismiss = m
        .optional("auto-dismiss", Members::boolean)?
        .unwrap_or(true);
    let filter_node_name = m.optional("filter-node-name", Members::string)?;
    let discard_source = m
        .optional("discard-source", Members::boolean)?
        .unwrap_or(false);
    let mut perf = (false, None, None, None);
    if let Some(mut p) = m.optional("x-perf", Members::object)? {
        perf.0 = p
            .optional("use-copy-range", Members::boolean)?
            .unwrap_or(false);
        perf.1 = p.optional("max-workers", Members::unsigned)?;
        perf.2 = p.optional("max-chunk", Members::unsigned)?;
        perf.3 = p.optional("min-cluster-size", Members::unsigned)?;
        p.finish()?;
    }
    m.finish()?;

    // `incremental` is `bitmap` with mode on-success; the other bitmap rules need the
    // graph and are checked when the job is prepared, in QEMU's order.
    let mut sync = sync;
    let mut bitmap_mode = bitmap_mode;
    if sync == "incremental" {
        if bitmap.is_none() {
            return Err(QmpError::generic(
                "must provide a valid bitmap name for 'incremental' sync mode",
            ));
        }
        if bitmap_mode.as_deref().is_some_and(|m| m != "on-success") {
            return Err(QmpError::generic(
                "Bitmap sync mode must be 'on-success' when using sync mode 'incremental'",
            ));
        }
        sync = "bitmap".into();
        bitmap_mode = Some("on-success".into());
    }
    if discard_source {
        return Err(QmpError::generic(
            "discard-source is not supported by stillpoint yet",
        ));
    }
    if perf.0 {
        return Err(QmpError::generic(
            "x-perf.use-copy-range is not supported by stillpoint yet",
        ));
    }
    let mut options = BackupOptions::new(job_id);
    options.sync = match sync.as_str() {
        "top" => SyncMode::Top,
        "none" => SyncMode::None,
        "bitmap" => SyncMode::Bitmap,
        _ => SyncMode::Full,
    };
    options.bitmap = bitmap;
    options.bitmap_mode = bitmap_mode.map(|m| match m.as_str() {
        "never" => jobs::BitmapMode::Never,
        "always" => jobs::BitmapMode::Always,
        _ => jobs::BitmapMode::OnSuccess,
    });
    options.job.speed = speed.unwrap_or(0);
    options.job.auto_finalize = auto_finalize;
    options.job.auto_dismiss = auto_dismiss;
    options.on_source_error = on_source_error;
    options.on_target_error = on_target_error;
    options.filter_node_name = filter_node_name;
    options.compress = compress;
    if let Some(w) = perf.1 {
        options.max_workers = usize::try_from(w).unwrap_or(0);
    }
    if let Some(c) = perf.2 {
        options.max_chunk = c;
    }
    options.min_cluster_size = perf.3;
    Ok(jobs::BackupRequest {
        device,
        target,
        options,
    })
}
