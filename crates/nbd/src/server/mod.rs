//! The NBD server: fixed-newstyle negotiation, then the transmission phase with many
//! requests in flight per connection and replies in completion order.
//!
//! ```text
//!   socket --read half--> request loop --spawn per request--> execute on the export's
//!                                                             attachment
//!   socket <-write half-- reply writer <--channel of whole reply frames--'
//! ```
//!
//! Each reply is one frame, written whole by a single writer task, so replies of
//! different requests never interleave on the wire. A malformed request (bad magic, a
//! write payload over the maximum, a truncated payload) closes that connection after
//! the requests already running have answered; the other connections never notice.
//! Writes go through the export's attachment, so when a backup inserts its filter
//! under the export every write after the insertion passes the filter.
//!
//! # What one client can hold
//!
//! * At most [`MAX_IN_FLIGHT`] requests, and request plus reply data of at most
//!   [`DATA_BUDGET_BYTES`] (128 MiB), taken before a buffer is allocated and given
//!   back only when the reply has been written to the socket: a client that pipelines
//!   reads and never reads the replies stops being read from, and holds no more.
//!   Idle read buffers kept for reuse add at most 8 MiB.
//! * The handshake must end within [`ServerLimits::handshake`] (QEMU's
//!   `handshake-max-seconds`, 10 s by default), or the connection is dropped.
//! * With [`ServerLimits::max_connections`], further clients wait in the listen
//!   backlog, not greeted, until one leaves (as QEMU does).
//!
//! # Removing an export
//!
//! [`RemoveMode::Safe`] (QMP's default) refuses while clients are connected;
//! [`RemoveMode::Hard`] closes their connections at once, without waiting for a client
//! to read anything. Either way new clients can no longer select the export, and the
//! returned [`ExportRemoval`] resolves when the requests that were running have
//! finished and the export's node is released.
//!
//! # Files
//!
//! `mod.rs` the server, its exports and limits; `negotiation` the handshake and the
//! metadata contexts; `transmission` the request loop, request execution and the
//! reply writer.

mod negotiation;
mod transmission;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::RwLock;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering;
use std::time::Duration;

use block::Attachment;
use tokio::io::AsyncRead;
use tokio::io::AsyncWrite;
use tokio::io::AsyncWriteExt;
use tokio::sync::OwnedSemaphorePermit;
use tokio::sync::Semaphore;
use tokio::sync::oneshot;
use tokio::sync::watch;

use crate::listener::AcceptBackoff;
use crate::listener::accept_tcp;
use crate::listener::accept_unix;
use crate::proto::*;
use transmission::transmit;

/// Requests one connection may have in flight.
pub const MAX_IN_FLIGHT: usize = 64;
/// Granularity of the per-connection data budget.
const BUDGET_UNIT: u32 = 64 << 10;
/// Request and reply data one connection may hold at once (four maximal requests).
/// Without it, 64 pipelined 32 MiB writes would pin 2 GiB per client.
pub const DATA_BUDGET_BYTES: usize = 128 << 20;
const DATA_BUDGET_UNITS: usize = DATA_BUDGET_BYTES / BUDGET_UNIT as usize;

/// Limits of one server: the members of QEMU's `nbd-server-start` that bound it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerLimits {
    /// `max-connections`: clients served at once, 0 for no limit (QEMU's default).
    pub max_connections: u32,
    /// `handshake-max-seconds`: how long negotiation may take; zero waits forever.
    pub handshake: Duration,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            max_connections: 0,
            handshake: Duration::from_secs(10),
        }
    }
}

/// How [`NbdServer::remove_export`] treats connected clients (QMP's
/// `BlockExportRemoveMode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemoveMode {
    /// Refuse while any client is connected.
    Safe,
    /// Close the connections at once.
    Hard,
}

/// Why an export could not be removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RemoveError {
    /// No export has that name.
    NotFound,
    /// [`RemoveMode::Safe`] and clients are connected.
    InUse,
}

/// Resolves when a removed export's running requests have finished and its node is
/// released.
#[derive(Debug)]
pub struct ExportRemoval(oneshot::Receiver<()>);

impl std::future::Future for ExportRemoval {
    type Output = ();

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        // Nothing is ever sent: the sender lives in the export and drops with it.
        std::pin::Pin::new(&mut self.0).poll(cx).map(|_| ())
    }
}

/// One exported node.
#[derive(Debug)]
pub struct Export {
    /// Export name clients ask for ("" is the default name).
    pub name: String,
    /// Free text for NBD_INFO_DESCRIPTION.
    pub description: String,
    /// The node, through an attachment that follows filters.
    pub disk: Attachment,
    /// Whether clients may write.
    pub writable: bool,
    /// Dirty bitmaps offered as `qemu:dirty-bitmap:NAME` metadata contexts.
    pub bitmaps: Vec<Arc<block::dirty::DirtyBitmap>>,
}

impl Export {
    fn transmission_flags(&self, structured: bool) -> u16 {
        let mut flags =
            TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA | TF_SEND_CACHE | TF_CAN_MULTI_CONN;
        if self.writable {
            flags |= TF_SEND_TRIM | TF_SEND_WRITE_ZEROES | TF_SEND_FAST_ZERO;
        } else {
            flags |= TF_READ_ONLY;
        }
        if structured {
            flags |= TF_SEND_DF;
        }
        flags
    }
}

/// An export while it is served: the configuration plus what removal needs. Every
/// connection and running request holds it; it drops (releasing the node) when the
/// last one ends.
#[derive(Debug)]
struct Live {
    export: Export,
    /// Set by `remove_export`: a request that still arrives gets ESHUTDOWN.
    removed: AtomicBool,
    /// Connections in the transmission phase with this export.
    connections: AtomicUsize,
    /// Set to true to close every connection at once (hard removal).
    closing: watch::Sender<bool>,
    /// Taken by `remove_export` to wait for the drop of `released` below.
    removal: std::sync::Mutex<Option<oneshot::Receiver<()>>>,
    /// Dropped with the export, after `export` (fields drop in order), which tells
    /// the removal that the node is released.
    _released: oneshot::Sender<()>,
}

impl std::ops::Deref for Live {
    type Target = Export;

    fn deref(&self) -> &Export {
        &self.export
    }
}

/// Counts one connection of an export for as long as it lives.
struct ConnectionGuard(Arc<Live>);

impl ConnectionGuard {
    fn new(live: &Arc<Live>) -> Self {
        live.connections.fetch_add(1, Ordering::SeqCst);
        Self(live.clone())
    }

    /// The export connected to.
    fn live(&self) -> &Arc<Live> {
        &self.0
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Resolves when `closing` is set (or can no longer be).
async fn closed(closing: &mut watch::Receiver<bool>) {
    let _ = closing.wait_for(|&closing| closing).await;
}

/// An NBD server holding a set of exports.
#[derive(Debug, Default)]
pub struct NbdServer {
    exports: RwLock<BTreeMap<String, Arc<Live>>>,
    limits: ServerLimits,
    /// One permit per connection when `max_connections` is set.
    connection_slots: Option<Arc<Semaphore>>,
}

impl NbdServer {
    /// A server with no exports and the default limits.
    pub fn new() -> Arc<Self> {
        Self::with_limits(ServerLimits::default())
    }

    /// A server with no exports and `limits`.
    pub fn with_limits(limits: ServerLimits) -> Arc<Self> {
        let connection_slots = (limits.max_connections > 0)
            .then(|| Arc::new(Semaphore::new(limits.max_connections as usize)));
        Arc::new(Self {
            exports: RwLock::default(),
            limits,
            connection_slots,
        })
    }

    /// The limits this server was made with.
    pub fn limits(&self) -> ServerLimits {
        self.limits
    }

    /// Adds an export; names are unique.
    pub fn add_export(&self, export: Export) -> Result<(), String> {
        let mut exports = self.exports.write().unwrap_or_else(|e| e.into_inner());
        if exports.contains_key(&export.name) {
            return Err(format!("NBD export '{}' already exists", export.name));
        }
        let (released, removal) = oneshot::channel();
        let live = Live {
            export,
            removed: AtomicBool::new(false),
            connections: AtomicUsize::new(0),
            closing: watch::Sender::new(false),
            removal: std::sync::Mutex::new(Some(removal)),
            _released: released,
        };
        exports.insert(live.export.name.clone(), Arc::new(live));
        Ok(())
    }

    /// Clients connected to export `name` now (0 when there is no such export).
    pub fn connections(&self, name: &str) -> usize {
        self.export(name)
            .map_or(0, |live| live.connections.load(Ordering::SeqCst))
    }

    /// Removes an export; see the module note for the modes. New clients can no longer
    /// select it at once; await the returned removal for the node to be released.
    pub fn remove_export(
        &self,
        name: &str,
        mode: RemoveMode,
    ) -> Result<ExportRemoval, RemoveError> {
        let live = {
            let mut exports = self.exports.write().unwrap_or_else(|e| e.into_inner());
            let live = exports.get(name).ok_or(RemoveError::NotFound)?;
            if mode == RemoveMode::Safe && live.connections.load(Ordering::SeqCst) > 0 {
                return Err(RemoveError::InUse);
            }
            exports.remove(name).expect("looked up under the same lock")
        };
        live.removed.store(true, Ordering::SeqCst);
        // Even in safe mode: a client that selected the export while it was being
        // removed must not start using it.
        live.closing.send_replace(true);
        let removal = live
            .removal
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .expect("an export is removed once");
        Ok(ExportRemoval(removal))
    }

    fn export(&self, name: &str) -> Option<Arc<Live>> {
        self.exports
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    fn export_names(&self) -> Vec<String> {
        self.exports
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    /// A connection slot, waited for when `max_connections` are all taken (the next
    /// client stays in the listen backlog meanwhile).
    async fn connection_slot(&self) -> Option<OwnedSemaphorePermit> {
        match &self.connection_slots {
            Some(slots) => slots.clone().acquire_owned().await.ok(),
            None => None,
        }
    }

    /// Serves clients from a UNIX listener until the task is dropped.
    pub async fn serve_unix(self: Arc<Self>, listener: tokio::net::UnixListener) {
        let mut backoff = AcceptBackoff::default();
        loop {
            let slot = self.connection_slot().await;
            let stream = accept_unix(&listener, "NBD", &mut backoff).await;
            let server = self.clone();
            tokio::spawn(async move { server.serve_connection_in(stream, slot).await });
        }
    }

    /// Serves clients from a TCP listener until the task is dropped.
    pub async fn serve_tcp(self: Arc<Self>, listener: tokio::net::TcpListener) {
        let mut backoff = AcceptBackoff::default();
        loop {
            let slot = self.connection_slot().await;
            let stream = accept_tcp(&listener, "NBD", &mut backoff).await;
            let server = self.clone();
            tokio::spawn(async move { server.serve_connection_in(stream, slot).await });
        }
    }

    /// Serves one client to the end; protocol violations close just this connection.
    pub async fn serve_connection<S>(self: Arc<Self>, stream: S)
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        self.serve_connection_in(stream, None).await;
    }

    /// Serves one client holding `_slot`, its place under `max_connections`.
    async fn serve_connection_in<S>(self: Arc<Self>, stream: S, _slot: Option<OwnedSemaphorePermit>)
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let (mut reader, mut writer) = tokio::io::split(stream);
        let negotiation = self.negotiate(&mut reader, &mut writer);
        let negotiated = if self.limits.handshake.is_zero() {
            negotiation.await
        } else {
            match tokio::time::timeout(self.limits.handshake, negotiation).await {
                Ok(outcome) => outcome,
                Err(_) => {
                    tracing::debug!(
                        "NBD client did not finish its handshake within {:?}: closing",
                        self.limits.handshake
                    );
                    return;
                }
            }
        };
        match negotiated {
            Ok(Some((connection, structured, contexts))) => {
                transmit(connection, structured, contexts, reader, writer).await;
            }
            Ok(None) => {
                let _ = writer.shutdown().await;
            }
            Err(e) => tracing::debug!("NBD negotiation ended: {e}"),
        }
    }
}
