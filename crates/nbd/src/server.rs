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

use std::collections::BTreeMap;
use std::io;
use std::sync::Arc;
use std::sync::RwLock;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering;
use std::time::Duration;

use block::Attachment;
use block::ErrorKind;
use block::IoBuf;
use block::WriteFlags;
use block::ZeroFlags;
use tokio::io::AsyncRead;
use tokio::io::AsyncReadExt;
use tokio::io::AsyncWrite;
use tokio::io::AsyncWriteExt;
use tokio::sync::OwnedSemaphorePermit;
use tokio::sync::Semaphore;
use tokio::sync::mpsc;
use tokio::sync::oneshot;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::listener::AcceptBackoff;
use crate::listener::accept_tcp;
use crate::listener::accept_unix;
use crate::proto::*;

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

/// Metadata contexts this server knows, with the ids it gives them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Context {
    /// `base:allocation`: HOLE and ZERO flags.
    Allocation,
    /// `qemu:allocation-depth`: 0 = allocated in no layer of the chain, else the
    /// allocating layer counted from 1 at the top.
    AllocationDepth,
    /// `qemu:dirty-bitmap:NAME`: the export's bitmap number n; flag 1 = dirty.
    DirtyBitmap(usize),
}

impl Context {
    fn id(self) -> u32 {
        match self {
            Context::Allocation => 1,
            Context::AllocationDepth => 2,
            Context::DirtyBitmap(n) => 3 + n as u32,
        }
    }

    fn name(self, export: &Export) -> String {
        match self {
            Context::Allocation => "base:allocation".into(),
            Context::AllocationDepth => "qemu:allocation-depth".into(),
            Context::DirtyBitmap(n) => format!("qemu:dirty-bitmap:{}", export.bitmaps[n].name()),
        }
    }

    /// Every context an export offers.
    fn all(export: &Export) -> Vec<Context> {
        let mut all = vec![Context::Allocation, Context::AllocationDepth];
        all.extend((0..export.bitmaps.len()).map(Context::DirtyBitmap));
        all
    }

    /// Contexts a query selects; `list` allows the namespace wildcards.
    fn matching(query: &str, list: bool, export: &Export) -> Vec<Context> {
        let bitmaps = (0..export.bitmaps.len()).map(Context::DirtyBitmap);
        match query {
            "base:allocation" => vec![Context::Allocation],
            "qemu:allocation-depth" => vec![Context::AllocationDepth],
            "base:" if list => vec![Context::Allocation],
            "qemu:" if list => std::iter::once(Context::AllocationDepth)
                .chain(bitmaps)
                .collect(),
            "qemu:dirty-bitmap:" if list => bitmaps.collect(),
            q => match q.strip_prefix("qemu:dirty-bitmap:") {
                Some(name) => bitmaps
                    .filter(|c| matches!(c, Context::DirtyBitmap(n) if export.bitmaps[*n].name() == name))
                    .collect(),
                None => Vec::new(),
            },
        }
    }
}

/// An NBD server holding a set of exports.
#[derive(Debug, Default)]
pub struct NbdServer {
    exports: RwLock<BTreeMap<String, Arc<Live>>>,
    limits: ServerLimits,
    /// One permit per connection when `max_connections` is set.
    connection_slots: Option<Arc<Semaphore>>,
}

/// Negotiation state of one connection.
struct Negotiation {
    structured: bool,
    no_zeroes: bool,
    /// Contexts chosen by SET_META_CONTEXT, and the export they were chosen for.
    contexts: Vec<Context>,
    contexts_for: Option<String>,
}

enum OptionOutcome {
    Continue,
    Close,
    Transmit(Arc<Live>),
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
            Ok(Some((export, structured, contexts))) => {
                transmit(export, structured, contexts, reader, writer).await;
            }
            Ok(None) => {
                let _ = writer.shutdown().await;
            }
            Err(e) => tracing::debug!("NBD negotiation ended: {e}"),
        }
    }

    /// Fixed-newstyle negotiation (proto.md, "Newstyle negotiation"). Returns the
    /// export to serve, or None when the client aborted or misbehaved.
    async fn negotiate<R, W>(
        &self,
        reader: &mut R,
        writer: &mut W,
    ) -> io::Result<Option<(Arc<Live>, bool, Vec<Context>)>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let mut hello = Vec::with_capacity(18);
        hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
        hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
        hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        writer.write_all(&hello).await?;
        let client_flags = reader.read_u32().await?;
        if client_flags & CLIENT_FIXED_NEWSTYLE == 0
            || client_flags & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES) != 0
        {
            return Ok(None);
        }
        let mut state = Negotiation {
            structured: false,
            no_zeroes: client_flags & CLIENT_NO_ZEROES != 0,
            contexts: Vec::new(),
            contexts_for: None,
        };
        loop {
            if reader.read_u64().await? != IHAVEOPT {
                return Ok(None);
            }
            let option = reader.read_u32().await?;
            let length = reader.read_u32().await?;
            if length > MAX_OPTION_LEN {
                reply_error(writer, option, REP_ERR_TOO_BIG, "option data too large").await?;
                return Ok(None);
            }
            let mut data = vec![0u8; length as usize];
            reader.read_exact(&mut data).await?;
            match self
                .handle_option(option, &data, &mut state, writer)
                .await?
            {
                OptionOutcome::Continue => {}
                OptionOutcome::Close => return Ok(None),
                OptionOutcome::Transmit(export) => {
                    let contexts = if state.contexts_for.as_deref() == Some(export.name.as_str()) {
                        state.contexts.clone()
                    } else {
                        Vec::new()
                    };
                    return Ok(Some((export, state.structured, contexts)));
                }
            }
        }
    }

    async fn handle_option<W: AsyncWrite + Unpin>(
        &self,
        option: u32,
        data: &[u8],
        state: &mut Negotiation,
        writer: &mut W,
    ) -> io::Result<OptionOutcome> {
        match option {
            OPT_EXPORT_NAME => {
                let Some(export) = std::str::from_utf8(data).ok().and_then(|n| self.export(n))
                else {
                    // No way to report an error to EXPORT_NAME: the spec says close.
                    return Ok(OptionOutcome::Close);
                };
                let mut out = Vec::with_capacity(134);
                out.extend_from_slice(&export.disk.length().to_be_bytes());
                out.extend_from_slice(&export.transmission_flags(state.structured).to_be_bytes());
                if !state.no_zeroes {
                    out.extend_from_slice(&[0u8; 124]);
                }
                writer.write_all(&out).await?;
                Ok(OptionOutcome::Transmit(export))
            }
            OPT_ABORT => {
                writer.write_all(&option_reply(option, REP_ACK, 0)).await?;
                Ok(OptionOutcome::Close)
            }
            OPT_LIST => {
                if !data.is_empty() {
                    reply_error(writer, option, REP_ERR_INVALID, "LIST takes no data").await?;
                    return Ok(OptionOutcome::Continue);
                }
                for name in self.export_names() {
                    let mut payload = (name.len() as u32).to_be_bytes().to_vec();
                    payload.extend_from_slice(name.as_bytes());
                    writer
                        .write_all(&option_reply(option, REP_SERVER, payload.len() as u32))
                        .await?;
                    writer.write_all(&payload).await?;
                }
                writer.write_all(&option_reply(option, REP_ACK, 0)).await?;
                Ok(OptionOutcome::Continue)
            }
            OPT_STARTTLS => {
                reply_error(writer, option, REP_ERR_POLICY, "TLS is not supported").await?;
                Ok(OptionOutcome::Continue)
            }
            OPT_INFO | OPT_GO => self.info_or_go(option, data, state, writer).await,
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    reply_error(
                        writer,
                        option,
                        REP_ERR_INVALID,
                        "STRUCTURED_REPLY takes no data",
                    )
                    .await?;
                } else {
                    state.structured = true;
                    writer.write_all(&option_reply(option, REP_ACK, 0)).await?;
                }
                Ok(OptionOutcome::Continue)
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                self.meta_context(option, data, state, writer).await?;
                Ok(OptionOutcome::Continue)
            }
            _ => {
                reply_error(writer, option, REP_ERR_UNSUP, "option not supported").await?;
                Ok(OptionOutcome::Continue)
            }
        }
    }

    async fn info_or_go<W: AsyncWrite + Unpin>(
        &self,
        option: u32,
        data: &[u8],
        state: &Negotiation,
        writer: &mut W,
    ) -> io::Result<OptionOutcome> {
        let mut parser = Parser(data);
        let parsed = (|| {
            let name = parser.string()?;
            let count = parser.u16()?;
            let mut infos = Vec::with_capacity(count as usize);
            for _ in 0..count {
                infos.push(parser.u16()?);
            }
            parser.finish()?;
            Some((name, infos))
        })();
        let Some((name, infos)) = parsed else {
            reply_error(writer, option, REP_ERR_INVALID, "malformed INFO/GO request").await?;
            return Ok(OptionOutcome::Continue);
        };
        let Some(export) = self.export(&name) else {
            let message = format!("export '{name}' not present");
            reply_error(writer, option, REP_ERR_UNKNOWN, &message).await?;
            return Ok(OptionOutcome::Continue);
        };
        let mut info = INFO_EXPORT.to_be_bytes().to_vec();
        info.extend_from_slice(&export.disk.length().to_be_bytes());
        info.extend_from_slice(&export.transmission_flags(state.structured).to_be_bytes());
        send_info(writer, option, &info).await?;
        if infos.contains(&INFO_NAME) {
            let mut info = INFO_NAME.to_be_bytes().to_vec();
            info.extend_from_slice(export.name.as_bytes());
            send_info(writer, option, &info).await?;
        }
        if infos.contains(&INFO_DESCRIPTION) && !export.description.is_empty() {
            let mut info = INFO_DESCRIPTION.to_be_bytes().to_vec();
            info.extend_from_slice(export.description.as_bytes());
            send_info(writer, option, &info).await?;
        }
        let mut info = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
        for size in [1u32, 4096, MAX_PAYLOAD] {
            info.extend_from_slice(&size.to_be_bytes());
        }
        send_info(writer, option, &info).await?;
        writer.write_all(&option_reply(option, REP_ACK, 0)).await?;
        Ok(if option == OPT_GO {
            OptionOutcome::Transmit(export)
        } else {
            OptionOutcome::Continue
        })
    }

    async fn meta_context<W: AsyncWrite + Unpin>(
        &self,
        option: u32,
        data: &[u8],
        state: &mut Negotiation,
        writer: &mut W,
    ) -> io::Result<()> {
        if !state.structured {
            return reply_error(
                writer,
                option,
                REP_ERR_INVALID,
                "negotiate structured replies first",
            )
            .await;
        }
        let mut parser = Parser(data);
        let parsed = (|| {
            let name = parser.string()?;
            let count = parser.u32()?;
            let mut queries = Vec::new();
            for _ in 0..count {
                queries.push(parser.string()?);
            }
            parser.finish()?;
            Some((name, queries))
        })();
        let Some((name, queries)) = parsed else {
            return reply_error(
                writer,
                option,
                REP_ERR_INVALID,
                "malformed meta context request",
            )
            .await;
        };
        let Some(export) = self.export(&name) else {
            let message = format!("export '{name}' not present");
            return reply_error(writer, option, REP_ERR_UNKNOWN, &message).await;
        };
        let list = option == OPT_LIST_META_CONTEXT;
        let mut chosen: Vec<Context> = Vec::new();
        if list && queries.is_empty() {
            chosen = Context::all(&export);
        }
        for query in &queries {
            for context in Context::matching(query, list, &export) {
                if !chosen.contains(&context) {
                    chosen.push(context);
                }
            }
        }
        for context in &chosen {
            let mut payload = context.id().to_be_bytes().to_vec();
            payload.extend_from_slice(context.name(&export).as_bytes());
            writer
                .write_all(&option_reply(
                    option,
                    REP_META_CONTEXT,
                    payload.len() as u32,
                ))
                .await?;
            writer.write_all(&payload).await?;
        }
        if !list {
            state.contexts = chosen;
            state.contexts_for = Some(name);
        }
        writer.write_all(&option_reply(option, REP_ACK, 0)).await
    }
}

async fn send_info<W: AsyncWrite + Unpin>(
    writer: &mut W,
    option: u32,
    info: &[u8],
) -> io::Result<()> {
    writer
        .write_all(&option_reply(option, REP_INFO, info.len() as u32))
        .await?;
    writer.write_all(info).await
}

async fn reply_error<W: AsyncWrite + Unpin>(
    writer: &mut W,
    option: u32,
    kind: u32,
    message: &str,
) -> io::Result<()> {
    writer
        .write_all(&option_reply(option, kind, message.len() as u32))
        .await?;
    writer.write_all(message.as_bytes()).await
}

/// A bounds-checked reader over option data.
struct Parser<'a>(&'a [u8]);

impl Parser<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }

    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_be_bytes(self.take(2)?.try_into().ok()?))
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }

    fn string(&mut self) -> Option<String> {
        let len = self.u32()? as usize;
        if len > 4096 {
            return None;
        }
        String::from_utf8(self.take(len)?.to_vec()).ok()
    }

    fn finish(&self) -> Option<()> {
        self.0.is_empty().then_some(())
    }
}

/// The transmission phase of one connection.
async fn transmit<R, W>(
    export: Arc<Live>,
    structured: bool,
    contexts: Vec<Context>,
    mut reader: R,
    writer: W,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Send + Unpin + 'static,
{
    let connection = ConnectionGuard::new(&export);
    let mut closing = export.closing.subscribe();
    let (replies, outbox) = mpsc::channel::<Frame>(MAX_IN_FLIGHT);
    let buffers = Arc::new(ReadBuffers::default());
    let write_task = tokio::spawn(write_replies(
        writer,
        outbox,
        buffers.clone(),
        export.closing.subscribe(),
    ));
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let data_budget = Arc::new(Semaphore::new(DATA_BUDGET_UNITS));
    let contexts = Arc::new(contexts);
    let mut running = JoinSet::new();
    loop {
        let next = tokio::select! {
            biased;
            () = closed(&mut closing) => break,
            next = next_request(&mut reader, &slots, &data_budget) => next,
        };
        let Some((request, payload, held)) = next else {
            break;
        };
        if export.removed.load(Ordering::SeqCst) {
            // The export is going away: answer this request, then close.
            let _ = replies
                .send(Frame::from(simple_reply(errno::ESHUTDOWN, request.cookie)))
                .await;
            break;
        }
        let (export, contexts, replies) = (export.clone(), contexts.clone(), replies.clone());
        let buffers = buffers.clone();
        running.spawn(async move {
            let mut frame =
                execute(&export, structured, &contexts, &buffers, request, payload).await;
            frame.held = Some(held);
            let _ = replies.send(frame).await;
        });
        while running.try_join_next().is_some() {}
    }
    // Nothing more is read; the socket closes when the writer is done too.
    drop(reader);
    // Requests already running still answer (unless the connection is being closed).
    while running.join_next().await.is_some() {}
    // Uncounted before the socket closes: a client that saw its connection end can
    // remove the export (safe mode) at once.
    drop(connection);
    drop(replies);
    let _ = write_task.await;
}

/// What a request holds from its arrival until its reply is on the socket: a request
/// slot and the budget for its data.
type Held = (OwnedSemaphorePermit, OwnedSemaphorePermit);

/// Reads the next request (and a write's payload) once a request slot and budget for
/// its data are free. None when the connection should close.
async fn next_request<R: AsyncRead + Unpin>(
    reader: &mut R,
    slots: &Arc<Semaphore>,
    data_budget: &Arc<Semaphore>,
) -> Option<(Request, Option<IoBuf>, Held)> {
    let mut header = [0u8; REQUEST_LEN];
    // An error is a disconnection.
    reader.read_exact(&mut header).await.ok()?;
    let Ok(request) = Request::parse(&header) else {
        tracing::debug!("NBD request with a bad magic: closing the connection");
        return None;
    };
    if request.command == CMD_DISC {
        return None;
    }
    if request.command == CMD_WRITE && request.length > MAX_PAYLOAD {
        // The stream cannot be trusted to resynchronise after this.
        tracing::debug!(
            "NBD write of {} bytes: closing the connection",
            request.length
        );
        return None;
    }
    // Bound the memory one connection can hold in request and reply data: a slot per
    // request, and budget units for the bytes of reads and writes, taken before any
    // buffer is allocated and kept until the reply has been written.
    let slot = slots.clone().acquire_owned().await.ok()?;
    let data_len = match request.command {
        CMD_READ | CMD_WRITE => request.length.min(MAX_PAYLOAD),
        _ => 0,
    };
    let units = data_len.div_ceil(BUDGET_UNIT).max(1);
    let budget = data_budget.clone().acquire_many_owned(units).await.ok()?;
    let payload = if request.command == CMD_WRITE {
        let mut buf = IoBuf::zeroed(request.length as usize);
        // An error is a disconnection mid-request.
        reader.read_exact(&mut buf).await.ok()?;
        Some(buf)
    } else {
        None
    };
    Some((request, payload, (slot, budget)))
}

/// The writer task of one connection: writes whole frames in the order they are
/// ready, gives read buffers back, and releases each request's slot and budget once
/// its reply is on the socket. Stops at once when the connection is being closed.
async fn write_replies<W: AsyncWrite + Unpin>(
    mut writer: W,
    mut outbox: mpsc::Receiver<Frame>,
    pool: Arc<ReadBuffers>,
    mut closing: watch::Receiver<bool>,
) {
    loop {
        let frame = tokio::select! {
            biased;
            () = closed(&mut closing) => return,
            frame = outbox.recv() => frame,
        };
        let Some(frame) = frame else { break };
        let data: &[u8] = frame.data.as_deref().unwrap_or(&[]);
        let sent = tokio::select! {
            biased;
            () = closed(&mut closing) => return,
            sent = write_frame(&mut writer, &frame.head, data) => sent,
        };
        if let Some(data) = frame.data {
            pool.give_back(data);
        }
        if sent.is_err() {
            // The client is gone; keep draining so senders never block.
            while outbox.recv().await.is_some() {}
            return;
        }
    }
    let _ = writer.flush().await;
    let _ = writer.shutdown().await;
}

/// Read buffers of one connection, reused once their reply is on the socket: a fresh
/// zeroed buffer per read cost a memset and page faults on every request. Drivers fill
/// a read buffer entirely, so a reused one never shows old bytes (and it only ever held
/// this connection's reads).
#[derive(Default)]
struct ReadBuffers(std::sync::Mutex<Vec<IoBuf>>);

impl ReadBuffers {
    /// At most this many idle buffers, of at most `KEEP_SIZE` bytes each: 8 MiB per
    /// connection, on top of what its requests in flight hold.
    const KEEP: usize = 32;
    const KEEP_SIZE: usize = 256 << 10;

    fn take(&self, len: usize) -> IoBuf {
        let pooled = self.0.lock().unwrap_or_else(|e| e.into_inner()).pop();
        match pooled {
            Some(mut buf) if buf.capacity() >= len => {
                buf.set_len(len);
                buf
            }
            _ => IoBuf::zeroed(len),
        }
    }

    fn give_back(&self, buf: IoBuf) {
        if buf.capacity() > Self::KEEP_SIZE {
            return;
        }
        let mut pool = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if pool.len() < Self::KEEP {
            pool.push(buf);
        }
    }
}

/// One encoded reply: its header, read data sent straight from the read buffer, and
/// what its request holds until the frame is written.
struct Frame {
    head: Vec<u8>,
    data: Option<IoBuf>,
    held: Option<Held>,
}

impl From<Vec<u8>> for Frame {
    fn from(head: Vec<u8>) -> Self {
        Self {
            head,
            data: None,
            held: None,
        }
    }
}

/// Writes a reply's header and data with vectored writes, so both leave in one system
/// call (two writes woke the client twice per reply).
async fn write_frame<W: AsyncWrite + Unpin>(
    writer: &mut W,
    mut head: &[u8],
    mut data: &[u8],
) -> std::io::Result<()> {
    if data.is_empty() {
        return writer.write_all(head).await;
    }
    while !head.is_empty() {
        let slices = [std::io::IoSlice::new(head), std::io::IoSlice::new(data)];
        let n = writer.write_vectored(&slices).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        if n < head.len() {
            head = &head[n..];
        } else {
            data = &data[n - head.len()..];
            head = &[];
        }
    }
    writer.write_all(data).await
}

/// Runs one request and encodes its whole reply.
async fn execute(
    export: &Export,
    structured: bool,
    contexts: &[Context],
    buffers: &ReadBuffers,
    request: Request,
    payload: Option<IoBuf>,
) -> Frame {
    match run(export, structured, contexts, buffers, &request, payload).await {
        Ok(Reply::Done) => simple_reply(0, request.cookie).into(),
        Ok(Reply::Data(data)) if structured => {
            let mut head = chunk_header(
                REPLY_FLAG_DONE,
                REPLY_TYPE_OFFSET_DATA,
                request.cookie,
                8 + data.len() as u32,
            );
            head.extend_from_slice(&request.offset.to_be_bytes());
            Frame {
                head,
                data: Some(data),
                held: None,
            }
        }
        Ok(Reply::Data(data)) => Frame {
            head: simple_reply(0, request.cookie),
            data: Some(data),
            held: None,
        },
        Ok(Reply::Chunks(chunks)) => chunks.into(),
        Err((errno, message)) if structured && request.command == CMD_READ => {
            let mut out = chunk_header(
                REPLY_FLAG_DONE,
                REPLY_TYPE_ERROR,
                request.cookie,
                6 + message.len() as u32,
            );
            out.extend_from_slice(&errno.to_be_bytes());
            out.extend_from_slice(&(message.len() as u16).to_be_bytes());
            out.extend_from_slice(message.as_bytes());
            out.into()
        }
        Err((errno, _)) => simple_reply(errno, request.cookie).into(),
    }
}

enum Reply {
    Done,
    Data(IoBuf),
    /// Pre-encoded structured chunks (block status).
    Chunks(Vec<u8>),
}

type Failure = (u32, String);

fn fail(errno: u32, message: impl Into<String>) -> Failure {
    (errno, message.into())
}

fn block_failure(e: &block::Error, writing: bool) -> Failure {
    let errno = if writing && e.kind() == ErrorKind::OutOfBounds {
        errno::ENOSPC
    } else {
        e.nbd_errno()
    };
    (errno, e.to_string())
}

async fn run(
    export: &Export,
    structured: bool,
    contexts: &[Context],
    buffers: &ReadBuffers,
    request: &Request,
    payload: Option<IoBuf>,
) -> Result<Reply, Failure> {
    let allowed = match request.command {
        CMD_READ => CMD_FLAG_DF,
        CMD_WRITE | CMD_TRIM => CMD_FLAG_FUA,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
        CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
        CMD_FLUSH | CMD_CACHE => 0,
        other => return Err(fail(errno::EINVAL, format!("unknown command {other}"))),
    };
    if request.flags & !allowed != 0 {
        return Err(fail(errno::EINVAL, "unsupported command flags"));
    }
    let writing = matches!(request.command, CMD_WRITE | CMD_WRITE_ZEROES | CMD_TRIM);
    if writing && !export.writable {
        return Err(fail(errno::EPERM, "the export is read-only"));
    }
    if request.command == CMD_FLUSH {
        export
            .disk
            .flush()
            .await
            .map_err(|e| block_failure(&e, false))?;
        return Ok(Reply::Done);
    }
    let length = u64::from(request.length);
    if length == 0 {
        return Err(fail(errno::EINVAL, "zero-length request"));
    }
    let size = export.disk.length();
    if request
        .offset
        .checked_add(length)
        .is_none_or(|end| end > size)
    {
        // proto.md: writing past the end is ENOSPC; reading or trimming it is EINVAL.
        let grows = matches!(request.command, CMD_WRITE | CMD_WRITE_ZEROES);
        let errno = if grows { errno::ENOSPC } else { errno::EINVAL };
        return Err(fail(errno, "request past the end of the export"));
    }
    let fua = request.flags & CMD_FLAG_FUA != 0;
    match request.command {
        CMD_READ => {
            if request.length > MAX_PAYLOAD {
                return Err(fail(errno::EINVAL, "read larger than the maximum payload"));
            }
            let buf = export
                .disk
                .read(request.offset, buffers.take(request.length as usize))
                .await
                .map_err(|e| block_failure(&e, false))?;
            Ok(Reply::Data(buf))
        }
        CMD_WRITE => {
            let buf = payload.expect("write payload read with the header");
            export
                .disk
                .write(
                    request.offset,
                    buf,
                    WriteFlags {
                        fua,
                        ..WriteFlags::default()
                    },
                )
                .await
                .map_err(|e| block_failure(&e, true))?;
            Ok(Reply::Done)
        }
        CMD_WRITE_ZEROES => {
            let flags = ZeroFlags {
                may_unmap: request.flags & CMD_FLAG_NO_HOLE == 0,
                fua,
                no_fallback: request.flags & CMD_FLAG_FAST_ZERO != 0,
            };
            match export
                .disk
                .write_zeroes(request.offset, length, flags)
                .await
            {
                Ok(()) => Ok(Reply::Done),
                Err(e) if flags.no_fallback && e.kind() == ErrorKind::Unsupported => {
                    Err(fail(errno::ENOTSUP, "zeroing would not be fast"))
                }
                Err(e) => Err(block_failure(&e, true)),
            }
        }
        CMD_TRIM => {
            export
                .disk
                .discard(request.offset, length)
                .await
                .map_err(|e| block_failure(&e, true))?;
            if fua {
                export
                    .disk
                    .flush()
                    .await
                    .map_err(|e| block_failure(&e, true))?;
            }
            Ok(Reply::Done)
        }
        CMD_CACHE => Ok(Reply::Done),
        CMD_BLOCK_STATUS => {
            if !structured || contexts.is_empty() {
                return Err(fail(errno::EINVAL, "no metadata context was negotiated"));
            }
            block_status(export, contexts, request).await
        }
        _ => unreachable!("commands were filtered above"),
    }
}

/// Most extents sent in one block-status chunk (the spec allows up to 2^20).
const MAX_EXTENTS: usize = 1024;

async fn block_status(
    export: &Export,
    contexts: &[Context],
    request: &Request,
) -> Result<Reply, Failure> {
    let one = request.flags & CMD_FLAG_REQ_ONE != 0;
    let end = request.offset + u64::from(request.length);
    // Runs of the node through its backing chain, as QEMU's server reports them:
    // (length, data, zero, allocation depth).
    let mut runs: Vec<(u64, bool, bool, u32)> = Vec::new();
    // Only when asked: a client that negotiated just a dirty bitmap must not fail
    // because the node's own status cannot be read (a snapshot's discarded range).
    let node_status = contexts
        .iter()
        .any(|c| !matches!(c, Context::DirtyBitmap(_)));
    let mut at = request.offset;
    while node_status && at < end && runs.len() < MAX_EXTENTS {
        let chained = block::chain::block_status_above(&export.disk, at, end - at)
            .await
            .map_err(|e| block_failure(&e, false))?;
        let extent = chained.extent;
        // Extent lengths are u32 on the wire; keep them sector-aligned when split.
        let length = extent.length.min(u64::from(u32::MAX) & !511).max(1);
        runs.push((
            length,
            extent.status.data,
            extent.status.zero,
            chained.allocation_depth(),
        ));
        at += length;
        if one {
            break;
        }
    }
    let mut out = Vec::new();
    for (i, context) in contexts.iter().enumerate() {
        let mut extents: Vec<(u32, u32)> = Vec::new();
        // A bitmap context has its own runs; the others follow the node's.
        let context_runs: Vec<(u64, u32)> = match context {
            Context::DirtyBitmap(n) => {
                let max = if one { 1 } else { MAX_EXTENTS };
                export.bitmaps[*n]
                    .runs(request.offset, end - request.offset, max)
                    .into_iter()
                    .map(|(length, dirty)| {
                        (
                            length.min(u64::from(u32::MAX) & !511).max(1),
                            u32::from(dirty),
                        )
                    })
                    .collect()
            }
            _ => runs
                .iter()
                .map(|&(length, data, zero, depth)| {
                    let flags = match context {
                        Context::AllocationDepth => depth,
                        _ => {
                            (if data { 0 } else { STATE_HOLE })
                                | (if zero { STATE_ZERO } else { 0 })
                        }
                    };
                    (length, flags)
                })
                .collect(),
        };
        for &(length, flags) in &context_runs {
            match extents.last_mut() {
                Some(last)
                    if last.1 == flags && u64::from(last.0) + length <= u64::from(u32::MAX) =>
                {
                    last.0 += length as u32;
                }
                _ => extents.push((length as u32, flags)),
            }
        }
        let done = if i + 1 == contexts.len() {
            REPLY_FLAG_DONE
        } else {
            0
        };
        out.extend(chunk_header(
            done,
            REPLY_TYPE_BLOCK_STATUS,
            request.cookie,
            4 + 8 * extents.len() as u32,
        ));
        out.extend_from_slice(&context.id().to_be_bytes());
        for (length, flags) in extents {
            out.extend_from_slice(&length.to_be_bytes());
            out.extend_from_slice(&flags.to_be_bytes());
        }
    }
    Ok(Reply::Chunks(out))
}
