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

use std::collections::BTreeMap;
use std::io;
use std::sync::Arc;
use std::sync::RwLock;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering;

use block::Attachment;
use block::ErrorKind;
use block::IoBuf;
use block::WriteFlags;
use block::ZeroFlags;
use tokio::io::AsyncRead;
use tokio::io::AsyncReadExt;
use tokio::io::AsyncWrite;
use tokio::io::AsyncWriteExt;
use tokio::sync::Notify;
use tokio::sync::Semaphore;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::proto::*;

/// Requests one connection may have in flight.
const MAX_IN_FLIGHT: usize = 64;
/// Granularity of the per-connection data budget.
const BUDGET_UNIT: u32 = 64 << 10;
/// Request and reply data one connection may hold at once: 128 MiB (four maximal
/// requests), in [`BUDGET_UNIT`]s. Without it, 64 pipelined 32 MiB writes would pin
/// 2 GiB per client.
const DATA_BUDGET_UNITS: usize = (128 << 20) / BUDGET_UNIT as usize;

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

/// An export while it is served: the configuration plus what removal needs.
#[derive(Debug)]
struct Live {
    export: Export,
    /// Set by `remove_export`: requests get ESHUTDOWN and connections close.
    removed: AtomicBool,
    /// Requests running now, so removal can wait for them.
    in_flight: AtomicUsize,
    idle: Notify,
}

impl std::ops::Deref for Live {
    type Target = Export;

    fn deref(&self) -> &Export {
        &self.export
    }
}

impl Live {
    fn finish_request(&self) {
        if self.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.idle.notify_waiters();
        }
    }
}

/// Metadata contexts this server knows, with the ids it gives them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Context {
    /// `base:allocation`: HOLE and ZERO flags.
    Allocation,
    /// `qemu:allocation-depth`: 0 = unallocated, 1 = this layer.
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
    /// A server with no exports.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Adds an export; names are unique.
    pub fn add_export(&self, export: Export) -> Result<(), String> {
        let mut exports = self.exports.write().unwrap_or_else(|e| e.into_inner());
        if exports.contains_key(&export.name) {
            return Err(format!("NBD export '{}' already exists", export.name));
        }
        let live = Live {
            export,
            removed: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            idle: Notify::new(),
        };
        exports.insert(live.export.name.clone(), Arc::new(live));
        Ok(())
    }

    /// Removes an export: new clients can no longer select it, requests that arrive
    /// from now on fail with ESHUTDOWN and close their connection, and this waits until
    /// the requests already running have answered. Returns whether it existed.
    pub async fn remove_export(&self, name: &str) -> bool {
        let removed = self
            .exports
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
        let Some(live) = removed else { return false };
        live.removed.store(true, Ordering::SeqCst);
        loop {
            let idle = live.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            if live.in_flight.load(Ordering::SeqCst) == 0 {
                return true;
            }
            idle.await;
        }
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

    /// Serves clients from a UNIX listener until the task is dropped.
    pub async fn serve_unix(self: Arc<Self>, listener: tokio::net::UnixListener) {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let server = self.clone();
                    tokio::spawn(async move { server.serve_connection(stream).await });
                }
                Err(e) => tracing::warn!("NBD accept failed: {e}"),
            }
        }
    }

    /// Serves clients from a TCP listener until the task is dropped.
    pub async fn serve_tcp(self: Arc<Self>, listener: tokio::net::TcpListener) {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    let server = self.clone();
                    tokio::spawn(async move { server.serve_connection(stream).await });
                }
                Err(e) => tracing::warn!("NBD accept failed: {e}"),
            }
        }
    }

    /// Serves one client to the end; protocol violations close just this connection.
    pub async fn serve_connection<S>(self: Arc<Self>, stream: S)
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let (mut reader, mut writer) = tokio::io::split(stream);
        match self.negotiate(&mut reader, &mut writer).await {
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
    mut writer: W,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Send + Unpin + 'static,
{
    let (replies, mut outbox) = mpsc::channel::<Frame>(MAX_IN_FLIGHT);
    let buffers = Arc::new(ReadBuffers::default());
    let pool = buffers.clone();
    let write_task = tokio::spawn(async move {
        while let Some(frame) = outbox.recv().await {
            let data: &[u8] = frame.data.as_deref().unwrap_or(&[]);
            let sent = write_frame(&mut writer, &frame.head, data).await;
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
    });
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let data_budget = Arc::new(Semaphore::new(DATA_BUDGET_UNITS));
    let contexts = Arc::new(contexts);
    let mut running = JoinSet::new();
    loop {
        let mut header = [0u8; REQUEST_LEN];
        if reader.read_exact(&mut header).await.is_err() {
            break; // disconnected
        }
        let Ok(request) = Request::parse(&header) else {
            tracing::debug!("NBD request with a bad magic: closing the connection");
            break;
        };
        if request.command == CMD_DISC {
            break;
        }
        if request.command == CMD_WRITE && request.length > MAX_PAYLOAD {
            // The stream cannot be trusted to resynchronise after this.
            tracing::debug!(
                "NBD write of {} bytes: closing the connection",
                request.length
            );
            break;
        }
        // Bound the memory one connection can hold in request and reply data: a slot
        // per request, and budget units for the bytes of reads and writes, taken before
        // any buffer is allocated.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            break;
        };
        let data_len = match request.command {
            CMD_READ | CMD_WRITE => request.length.min(MAX_PAYLOAD),
            _ => 0,
        };
        let units = data_len.div_ceil(BUDGET_UNIT).max(1);
        let Ok(budget) = data_budget.clone().acquire_many_owned(units).await else {
            break;
        };
        let payload = if request.command == CMD_WRITE {
            let mut buf = IoBuf::zeroed(request.length as usize);
            if reader.read_exact(&mut buf).await.is_err() {
                break; // disconnected mid-request
            }
            Some(buf)
        } else {
            None
        };
        export.in_flight.fetch_add(1, Ordering::SeqCst);
        if export.removed.load(Ordering::SeqCst) {
            // The export is going away: answer this request, then close.
            let _ = replies
                .send(Frame::from(simple_reply(errno::ESHUTDOWN, request.cookie)))
                .await;
            export.finish_request();
            break;
        }
        let (export, contexts, replies) = (export.clone(), contexts.clone(), replies.clone());
        let buffers = buffers.clone();
        running.spawn(async move {
            let frame = execute(&export, structured, &contexts, &buffers, request, payload).await;
            let _ = replies.send(frame).await;
            export.finish_request();
            drop((slot, budget));
        });
        while running.try_join_next().is_some() {}
    }
    // Requests already running still answer before the connection closes.
    while running.join_next().await.is_some() {}
    drop(replies);
    let _ = write_task.await;
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

/// One encoded reply: its header, and read data sent straight from the read buffer.
struct Frame {
    head: Vec<u8>,
    data: Option<IoBuf>,
}

impl From<Vec<u8>> for Frame {
    fn from(head: Vec<u8>) -> Self {
        Self { head, data: None }
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
            }
        }
        Ok(Reply::Data(data)) => Frame {
            head: simple_reply(0, request.cookie),
            data: Some(data),
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
    // Runs of the node: (length, data, zero, allocated).
    let mut runs: Vec<(u64, bool, bool, bool)> = Vec::new();
    // Only when asked: a client that negotiated just a dirty bitmap must not fail
    // because the node's own status cannot be read (a snapshot's discarded range).
    let node_status = contexts
        .iter()
        .any(|c| !matches!(c, Context::DirtyBitmap(_)));
    let mut at = request.offset;
    while node_status && at < end && runs.len() < MAX_EXTENTS {
        let extent = export
            .disk
            .block_status(at, end - at)
            .await
            .map_err(|e| block_failure(&e, false))?;
        // Extent lengths are u32 on the wire; keep them sector-aligned when split.
        let length = extent.length.min(u64::from(u32::MAX) & !511).max(1);
        runs.push((
            length,
            extent.status.data,
            extent.status.zero,
            extent.status.allocated,
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
                .map(|&(length, data, zero, allocated)| {
                    let flags = match context {
                        Context::AllocationDepth => u32::from(allocated),
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
