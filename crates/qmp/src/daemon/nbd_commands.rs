//! The NBD commands: `nbd-server-start`/`-stop`, `block-export-add`/`-del`,
//! `query-block-exports`, and the socket addresses they take.

use super::Daemon;
use super::ExportRecord;
use super::NbdRunning;
use crate::error::QmpError;
use crate::error::Reply;
use crate::wire;
use block::AttachUser;
use block::options::SocketAddress;
use block::qapi::Members;
use nbd::Export;
use nbd::NbdServer;
use nbd::RemoveMode;
use nbd::ServerLimits;
use nbd::server::RemoveError;
use serde_json::Value;
use serde_json::json;
use std::sync::Arc;

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
pub(super) fn parse_legacy_address(mut a: Members) -> Result<SocketAddress, QmpError> {
    let kind = a.required("type", |m, k, v| m.enumeration(k, v, &["unix", "inet"]))?;
    let mut data = a.required("data", Members::object)?;
    a.finish()?;
    parse_flat_address(&kind, &mut data)
}

/// The flat form (`--nbd-server addr.type=unix,addr.path=...`) after `type`.
pub fn parse_flat_address(kind: &str, data: &mut Members) -> Result<SocketAddress, QmpError> {
    Ok(SocketAddress::parse(kind, data)?)
}

impl Daemon {
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
    pub(super) fn forget_export(&self, id: &str) {
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
    pub(super) async fn stop_nbd(&self, running: NbdRunning) {
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

    pub(super) async fn nbd_server_start(&self, mut m: Members) -> Reply {
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
    pub async fn start_nbd(&self, listen: SocketAddress, limits: ServerLimits) -> Reply {
        let mut running = self.nbd.lock().await;
        if running.is_some() {
            return Err(QmpError::generic("NBD server already running"));
        }
        let server = NbdServer::with_limits(limits);
        let (task, socket) = match listen {
            SocketAddress::Unix(path) => {
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
            SocketAddress::Inet { .. } => {
                let addr = listen.to_string();
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
                            .map(|a| a.node())
                            .or_else(|| n.backing().map(|a| a.node()));
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
