//! The NBD client driver: a remote export as a block-layer node.
//!
//! Negotiation asks for structured replies and `base:allocation`, then GO. After that,
//! any number of requests may be in flight: each gets a cookie and a one-shot channel,
//! a single reader task matches reply chunks to cookies and assembles reads (data and
//! hole chunks in any order) and block-status extents. Requests larger than the
//! server's maximum payload are split. If the connection breaks, every pending and
//! later request fails with EIO (no reconnect yet).
//!
//! # A server is not trusted
//!
//! Every reply is checked before it touches memory: offsets and lengths with checked
//! arithmetic (a chunk must lie inside its request), chunk sizes against the maximum
//! payload, and a successful read must have been covered by data or hole chunks
//! exactly once, byte for byte (otherwise the caller would get bytes nobody sent).
//! Block-status extents kept for one request are capped at [`MAX_KEPT_EXTENTS`]
//! whatever the server sends. A violation fails the request with EIO and closes the
//! connection, failing every other pending request too; even a panic in the reply task
//! fails them (a guard does it on unwind), so no request ever waits forever.

use std::collections::HashMap;
use std::io;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;

use async_trait::async_trait;
use block::BlockDriver;
use block::Error;
use block::ErrorKind;
use block::Extent;
use block::IoBuf;
use block::Limits;
use block::Status;
use block::WriteFlags;
use block::ZeroFlags;
use tokio::io::AsyncRead;
use tokio::io::AsyncReadExt;
use tokio::io::AsyncWrite;
use tokio::io::AsyncWriteExt;
use tokio::sync::oneshot;

use block::options::SocketAddress;

use crate::proto::*;

type Boxed<T> = Box<T>;
type Writer = Boxed<dyn AsyncWrite + Send + Unpin>;

/// Block-status extents kept per request; the driver asks with REQ_ONE and uses the
/// first, so more only cost memory.
pub const MAX_KEPT_EXTENTS: usize = 1024;

/// What a pending request collects until its reply is complete.
struct Pending {
    /// For reads: the buffer, filled at `chunk offset - request offset`.
    buf: Option<IoBuf>,
    offset: u64,
    /// For reads: the byte ranges (relative to `offset`) chunks have covered so far.
    covered: Vec<(usize, usize)>,
    extents: Vec<(u32, u32)>,
    error: Option<u32>,
    done: oneshot::Sender<Result<Completed, Error>>,
}

impl Pending {
    /// Records that `[start, start + len)` of the read buffer was filled; false if it
    /// overlaps a range filled before (a server may not send a byte twice).
    fn cover(&mut self, start: usize, len: usize) -> bool {
        let end = start + len;
        let at = self.covered.partition_point(|&(s, _)| s < start);
        let before_ok = at == 0 || self.covered[at - 1].1 <= start;
        let after_ok = at == self.covered.len() || end <= self.covered[at].0;
        if !(before_ok && after_ok) {
            return false;
        }
        self.covered.insert(at, (start, end));
        true
    }

    /// Whether every byte of the read buffer was covered.
    fn fully_covered(&self) -> bool {
        let len = self.buf.as_ref().map_or(0, |b| b.len());
        self.covered.iter().map(|&(s, e)| e - s).sum::<usize>() == len
    }
}

/// The map of requests waiting for replies; None once the connection is gone.
type PendingMap = Arc<Mutex<Option<HashMap<u64, Pending>>>>;

/// Fails every pending request and refuses new ones when dropped: the reply task holds
/// it, so however that task ends (an error, the server closing, a panic), nobody waits
/// forever.
struct FailPendingOnDrop(PendingMap);

impl Drop for FailPendingOnDrop {
    fn drop(&mut self) {
        if let Some(waiting) = self.0.lock().unwrap_or_else(|e| e.into_inner()).take() {
            for (_, p) in waiting {
                let _ = p
                    .done
                    .send(Err(protocol("the connection to the server was lost")));
            }
        }
    }
}

struct Completed {
    buf: Option<IoBuf>,
    extents: Vec<(u32, u32)>,
}

/// A connected client.
pub struct NbdClient {
    writer: tokio::sync::Mutex<Writer>,
    pending: PendingMap,
    /// The reply task, awaited by `disconnect`.
    replies: Mutex<Option<tokio::task::JoinHandle<()>>>,
    next_cookie: AtomicU64,
    size: u64,
    flags: u16,
    allocation_context: Option<u32>,
    max_payload: u32,
    name: String,
}

impl std::fmt::Debug for NbdClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdClient")
            .field("export", &self.name)
            .field("size", &self.size)
            .finish()
    }
}

fn io_err(context: &str, e: io::Error) -> Error {
    Error::from_io(format!("NBD: {context}"), e)
}

fn protocol(message: impl Into<String>) -> Error {
    Error::new(ErrorKind::Io, format!("NBD: {}", message.into()))
}

async fn option<W: AsyncWrite + Unpin>(w: &mut W, option: u32, data: &[u8]) -> io::Result<()> {
    let mut out = IHAVEOPT.to_be_bytes().to_vec();
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    w.write_all(&out).await
}

async fn option_reply<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<(u32, Vec<u8>)> {
    if r.read_u64().await? != OPT_REPLY_MAGIC {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "bad option reply magic",
        ));
    }
    let _option = r.read_u32().await?;
    let kind = r.read_u32().await?;
    let len = r.read_u32().await?;
    if len > MAX_OPTION_LEN {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "option reply too large",
        ));
    }
    let mut data = vec![0; len as usize];
    r.read_exact(&mut data).await?;
    Ok((kind, data))
}

fn named(name: &str) -> Vec<u8> {
    let mut out = (name.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(name.as_bytes());
    out
}

/// How long connecting and negotiating may take, as long as qemu-nbd and
/// qemu-storage-daemon give a client to finish its handshake (`handshake-max-seconds`).
/// Without a limit, a server that accepts and never answers held `blockdev-add`, and
/// with it every change to the node graph and the daemon's shutdown, forever
/// (qemu-storage-daemon freezes whole in that case).
pub const CONNECT_LIMIT: std::time::Duration = std::time::Duration::from_secs(10);

impl NbdClient {
    /// Connects to `address` and opens `export`, within [`CONNECT_LIMIT`].
    pub async fn connect(address: &SocketAddress, export: &str) -> Result<Arc<Self>, Error> {
        Self::connect_within(address, export, CONNECT_LIMIT).await
    }

    /// [`NbdClient::connect`] with another limit.
    pub async fn connect_within(
        address: &SocketAddress,
        export: &str,
        limit: std::time::Duration,
    ) -> Result<Arc<Self>, Error> {
        match tokio::time::timeout(limit, Self::connect_unbounded(address, export)).await {
            Ok(result) => result,
            Err(_) => Err(io_err(
                &format!(
                    "{address}: no answer to the handshake within {} s",
                    limit.as_secs_f64()
                ),
                io::Error::from(io::ErrorKind::TimedOut),
            )),
        }
    }

    async fn connect_unbounded(address: &SocketAddress, export: &str) -> Result<Arc<Self>, Error> {
        let describe = || address.to_string();
        let failed = |e| io_err(&format!("failed to connect to {}", describe()), e);
        let (reader, writer): (Boxed<dyn AsyncRead + Send + Unpin>, Writer) = match address {
            SocketAddress::Unix(path) => {
                let (r, w) = tokio::net::UnixStream::connect(path)
                    .await
                    .map_err(failed)?
                    .into_split();
                (Box::new(r), Box::new(w))
            }
            SocketAddress::Inet { host, port } => {
                let stream = tokio::net::TcpStream::connect(format!("{host}:{port}"))
                    .await
                    .map_err(failed)?;
                let _ = stream.set_nodelay(true);
                let (r, w) = stream.into_split();
                (Box::new(r), Box::new(w))
            }
        };
        Self::handshake(reader, writer, export)
            .await
            .map_err(|e| e.context(describe()))
    }

    /// Negotiates `export` over an already connected stream (tests and fuzzing drive
    /// the client with a scripted server this way).
    pub async fn over<S>(stream: S, export: &str) -> Result<Arc<Self>, Error>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (reader, writer) = tokio::io::split(stream);
        Self::handshake(Box::new(reader), Box::new(writer), export).await
    }

    /// Ends the session: NBD_CMD_DISC, then waits (at most 5 s) for the server to
    /// close the connection. Requests still pending fail; later ones are refused.
    pub async fn disconnect(&self) {
        {
            let mut w = self.writer.lock().await;
            let disc = Request {
                flags: 0,
                command: CMD_DISC,
                cookie: 0,
                offset: 0,
                length: 0,
            }
            .encode();
            let _ = w.write_all(&disc).await;
            let _ = w.shutdown().await;
        }
        let replies = self
            .replies
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(task) = replies {
            let waited = tokio::time::timeout(std::time::Duration::from_secs(5), task).await;
            if waited.is_err() {
                tracing::warn!("NBD server did not close the connection after NBD_CMD_DISC");
            }
        }
        FailPendingOnDrop(self.pending.clone());
    }

    async fn handshake(
        mut r: Boxed<dyn AsyncRead + Send + Unpin>,
        mut w: Writer,
        export: &str,
    ) -> Result<Arc<Self>, Error> {
        fn e(what: &'static str) -> impl Fn(io::Error) -> Error {
            move |err| io_err(what, err)
        }
        if r.read_u64().await.map_err(e("handshake"))? != NBDMAGIC
            || r.read_u64().await.map_err(e("handshake"))? != IHAVEOPT
        {
            return Err(protocol("the server does not speak fixed newstyle NBD"));
        }
        let server_flags = r.read_u16().await.map_err(e("handshake"))?;
        if server_flags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(protocol(
                "the server does not support fixed newstyle negotiation",
            ));
        }
        let mut flags = CLIENT_FIXED_NEWSTYLE;
        if server_flags & FLAG_NO_ZEROES != 0 {
            flags |= CLIENT_NO_ZEROES;
        }
        w.write_u32(flags).await.map_err(e("handshake"))?;

        option(&mut w, OPT_STRUCTURED_REPLY, &[])
            .await
            .map_err(e("negotiation"))?;
        let structured = option_reply(&mut r).await.map_err(e("negotiation"))?.0 == REP_ACK;
        let mut allocation_context = None;
        if structured {
            let mut data = named(export);
            data.extend_from_slice(&1u32.to_be_bytes());
            data.extend_from_slice(&named("base:allocation"));
            option(&mut w, OPT_SET_META_CONTEXT, &data)
                .await
                .map_err(e("negotiation"))?;
            loop {
                let (kind, data) = option_reply(&mut r).await.map_err(e("negotiation"))?;
                if kind == REP_META_CONTEXT && data.len() >= 4 && &data[4..] == b"base:allocation" {
                    allocation_context = Some(u32::from_be_bytes(data[..4].try_into().unwrap()));
                } else if kind == REP_ACK || kind & (1 << 31) != 0 {
                    break;
                }
            }
        }
        let mut data = named(export);
        data.extend_from_slice(&1u16.to_be_bytes());
        data.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        option(&mut w, OPT_GO, &data)
            .await
            .map_err(e("negotiation"))?;
        let (mut size, mut tflags, mut max_payload) = (None, 0u16, MAX_PAYLOAD);
        loop {
            let (kind, data) = option_reply(&mut r).await.map_err(e("negotiation"))?;
            match kind {
                REP_INFO if data.len() >= 2 => {
                    let info = u16::from_be_bytes(data[..2].try_into().unwrap());
                    if info == INFO_EXPORT && data.len() == 12 {
                        size = Some(u64::from_be_bytes(data[2..10].try_into().unwrap()));
                        tflags = u16::from_be_bytes(data[10..12].try_into().unwrap());
                    } else if info == INFO_BLOCK_SIZE && data.len() == 14 {
                        max_payload = u32::from_be_bytes(data[10..14].try_into().unwrap())
                            .clamp(512, MAX_PAYLOAD);
                    }
                }
                REP_ACK => break,
                REP_ERR_UNKNOWN => {
                    return Err(Error::new(
                        ErrorKind::NotFound,
                        format!(
                            "NBD: export '{export}' not found: {}",
                            String::from_utf8_lossy(&data)
                        ),
                    ));
                }
                kind if kind & (1 << 31) != 0 => {
                    return Err(protocol(format!(
                        "the server refused export '{export}' (error {:#x}): {}",
                        kind,
                        String::from_utf8_lossy(&data)
                    )));
                }
                _ => {}
            }
        }
        let size = size.ok_or_else(|| protocol("the server sent no export size"))?;
        let client = Arc::new(Self {
            writer: tokio::sync::Mutex::new(w),
            pending: Arc::new(Mutex::new(Some(HashMap::new()))),
            replies: Mutex::new(None),
            next_cookie: AtomicU64::new(1),
            size,
            flags: tflags,
            allocation_context,
            max_payload,
            name: export.to_string(),
        });
        let pending = client.pending.clone();
        let task = tokio::spawn(async move {
            // Fails whatever is still waiting, and refuses new requests, however this
            // task ends.
            let _fail = FailPendingOnDrop(pending.clone());
            if let Err(e) = read_replies(r, &pending, structured).await {
                tracing::warn!("NBD connection lost: {e}");
            }
        });
        *client.replies.lock().unwrap_or_else(|e| e.into_inner()) = Some(task);
        Ok(client)
    }

    /// Export size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    fn can(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }

    async fn request(
        &self,
        command: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: Option<&[u8]>,
        read_into: Option<IoBuf>,
    ) -> Result<Completed, Error> {
        let cookie = self.next_cookie.fetch_add(1, Ordering::Relaxed);
        let (done, wait) = oneshot::channel();
        {
            let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            let Some(pending) = pending.as_mut() else {
                return Err(protocol("the connection to the server was lost"));
            };
            pending.insert(
                cookie,
                Pending {
                    buf: read_into,
                    offset,
                    covered: Vec::new(),
                    extents: Vec::new(),
                    error: None,
                    done,
                },
            );
        }
        let header = Request {
            flags,
            command,
            cookie,
            offset,
            length,
        }
        .encode();
        {
            let mut w = self.writer.lock().await;
            let sent = async {
                w.write_all(&header).await?;
                if let Some(data) = payload {
                    w.write_all(data).await?;
                }
                Ok::<_, io::Error>(())
            }
            .await;
            if let Err(e) = sent {
                if let Some(p) = self
                    .pending
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .as_mut()
                {
                    p.remove(&cookie);
                }
                return Err(io_err("failed to send a request", e));
            }
        }
        wait.await
            .map_err(|_| protocol("the connection to the server was lost"))?
    }
}

fn nbd_error(errno: u32) -> Error {
    Error::from_io(
        "NBD server error",
        io::Error::from_raw_os_error(errno as i32),
    )
}

/// Where a chunk for `[at, at + n)` lands in the read buffer of `p`, if it lies
/// inside the request (checked arithmetic: a server controls both numbers).
fn chunk_range(p: &Pending, at: u64, n: u64) -> Option<(usize, usize)> {
    let len = p.buf.as_ref()?.len() as u64;
    let start = at.checked_sub(p.offset)?;
    let end = start.checked_add(n)?;
    (end <= len).then_some((start as usize, n as usize))
}

async fn read_replies<R: AsyncRead + Unpin>(
    mut r: R,
    pending: &Mutex<Option<HashMap<u64, Pending>>>,
    structured: bool,
) -> io::Result<()> {
    let take = |cookie: u64| {
        pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
            .and_then(|p| p.remove(&cookie))
    };
    let put = |cookie: u64, p: Pending| {
        if let Some(map) = pending.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            map.insert(cookie, p);
        }
    };
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
    // A request whose reply broke the protocol fails with EIO (its waiter learns why
    // from the log), then the connection closes.
    let violation = |p: Pending, what: &str| {
        let _ = p
            .done
            .send(Err(protocol(format!("bad reply from the server: {what}"))));
        Err(bad(what))
    };
    loop {
        let magic = r.read_u32().await?;
        if magic == SIMPLE_REPLY_MAGIC {
            let error = r.read_u32().await?;
            let cookie = r.read_u64().await?;
            let mut p = take(cookie).ok_or_else(|| bad("reply to an unknown cookie"))?;
            if error == 0 && p.buf.is_some() && structured {
                // proto.md: with structured replies, a successful read answers in
                // chunks; a simple reply would leave the buffer unfilled.
                return violation(p, "a simple reply to a read after structured replies");
            }
            if let (0, Some(buf)) = (error, p.buf.as_mut()) {
                r.read_exact(buf).await?;
            }
            let result = if error != 0 {
                Err(nbd_error(error))
            } else {
                Ok(Completed {
                    buf: p.buf,
                    extents: p.extents,
                })
            };
            let _ = p.done.send(result);
        } else if magic == STRUCTURED_REPLY_MAGIC {
            let flags = r.read_u16().await?;
            let kind = r.read_u16().await?;
            let cookie = r.read_u64().await?;
            let length = r.read_u32().await?;
            if length > MAX_PAYLOAD + 64 {
                return Err(bad("reply chunk too large"));
            }
            let mut p = take(cookie).ok_or_else(|| bad("chunk for an unknown cookie"))?;
            match kind {
                REPLY_TYPE_OFFSET_DATA if length >= 8 => {
                    let at = r.read_u64().await?;
                    let Some((start, n)) = chunk_range(&p, at, u64::from(length - 8)) else {
                        return violation(p, "a data chunk outside its read request");
                    };
                    if !p.cover(start, n) {
                        return violation(p, "data chunks that overlap");
                    }
                    let buf = p.buf.as_mut().expect("chunk_range checked the buffer");
                    r.read_exact(&mut buf[start..start + n]).await?;
                }
                REPLY_TYPE_OFFSET_HOLE if length == 12 => {
                    let at = r.read_u64().await?;
                    let n = r.read_u32().await?;
                    let Some((start, n)) = chunk_range(&p, at, u64::from(n)) else {
                        return violation(p, "a hole chunk outside its read request");
                    };
                    if !p.cover(start, n) {
                        return violation(p, "hole chunks that overlap");
                    }
                    let buf = p.buf.as_mut().expect("chunk_range checked the buffer");
                    buf[start..start + n].fill(0);
                }
                REPLY_TYPE_BLOCK_STATUS if length >= 4 && (length - 4) % 8 == 0 => {
                    let _context = r.read_u32().await?;
                    // Read in blocks of 64 KiB: bounded memory, few reads.
                    let mut left = (length as usize - 4) / 8;
                    let mut block = vec![0u8; 8 * left.min(8192)];
                    while left > 0 {
                        let n = left.min(8192);
                        r.read_exact(&mut block[..8 * n]).await?;
                        for extent in block[..8 * n].chunks_exact(8) {
                            if p.extents.len() == MAX_KEPT_EXTENTS {
                                break;
                            }
                            let len = u32::from_be_bytes(extent[..4].try_into().unwrap());
                            let flags = u32::from_be_bytes(extent[4..].try_into().unwrap());
                            p.extents.push((len, flags));
                        }
                        left -= n;
                    }
                }
                REPLY_TYPE_NONE if length == 0 => {}
                k if k & (1 << 15) != 0 => {
                    let mut data = vec![0; length as usize];
                    r.read_exact(&mut data).await?;
                    let errno = if data.len() >= 4 {
                        u32::from_be_bytes(data[..4].try_into().unwrap())
                    } else {
                        errno::EIO
                    };
                    p.error.get_or_insert(errno.max(1));
                }
                _ => return violation(p, "an unexpected reply chunk"),
            }
            if flags & REPLY_FLAG_DONE != 0 {
                if p.error.is_none() && p.buf.is_some() && !p.fully_covered() {
                    return violation(p, "a read reply that did not cover the whole request");
                }
                let result = match p.error {
                    Some(errno) => Err(nbd_error(errno)),
                    None => Ok(Completed {
                        buf: p.buf,
                        extents: p.extents,
                    }),
                };
                let _ = p.done.send(result);
            } else {
                put(cookie, p);
            }
        } else {
            return Err(bad("bad reply magic"));
        }
    }
}

/// The block-layer driver over a connected client.
#[derive(Debug)]
pub struct NbdDriver {
    client: Arc<NbdClient>,
}

impl NbdDriver {
    /// A driver over `client`.
    pub fn new(client: Arc<NbdClient>) -> Self {
        Self { client }
    }

    fn check_writable(&self) -> Result<(), Error> {
        if self.client.can(TF_READ_ONLY) {
            return Err(Error::new(
                ErrorKind::PermissionDenied,
                "NBD: the export is read-only",
            ));
        }
        Ok(())
    }

    fn pieces(&self, offset: u64, len: u64, max: u64) -> impl Iterator<Item = (u64, u64)> {
        let end = offset + len;
        (offset..end)
            .step_by(max as usize)
            .map(move |at| (at, (end - at).min(max)))
    }
}

#[async_trait]
impl BlockDriver for NbdDriver {
    fn driver_name(&self) -> &'static str {
        "nbd"
    }

    fn length(&self) -> u64 {
        self.client.size
    }

    fn limits(&self) -> Limits {
        Limits {
            max_transfer: self.client.max_payload,
            ..Limits::default()
        }
    }

    async fn read(&self, offset: u64, mut buf: IoBuf) -> Result<IoBuf, Error> {
        let max = u64::from(self.client.max_payload);
        if buf.len() as u64 <= max {
            let len = buf.len() as u32;
            let done = self
                .client
                .request(CMD_READ, 0, offset, len, None, Some(buf))
                .await?;
            return Ok(done.buf.expect("a read returns its buffer"));
        }
        for (at, n) in self.pieces(offset, buf.len() as u64, max) {
            let part = IoBuf::zeroed(n as usize);
            let done = self
                .client
                .request(CMD_READ, 0, at, n as u32, None, Some(part))
                .await?;
            let start = (at - offset) as usize;
            buf[start..start + n as usize].copy_from_slice(&done.buf.expect("read buffer"));
        }
        Ok(buf)
    }

    async fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> Result<IoBuf, Error> {
        self.check_writable()?;
        let fua = if flags.fua && self.client.can(TF_SEND_FUA) {
            CMD_FLAG_FUA
        } else {
            0
        };
        let max = u64::from(self.client.max_payload);
        for (at, n) in self.pieces(offset, buf.len() as u64, max) {
            let start = (at - offset) as usize;
            let data = &buf[start..start + n as usize];
            self.client
                .request(CMD_WRITE, fua, at, n as u32, Some(data), None)
                .await?;
        }
        if flags.fua && !self.client.can(TF_SEND_FUA) {
            self.flush().await?;
        }
        Ok(buf)
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<(), Error> {
        self.check_writable()?;
        if !self.client.can(TF_SEND_WRITE_ZEROES) {
            return block::node::driver::write_zeroes_by_writing(self, offset, len, flags).await;
        }
        let mut cmd_flags = 0;
        if !flags.may_unmap {
            cmd_flags |= CMD_FLAG_NO_HOLE;
        }
        if flags.fua && self.client.can(TF_SEND_FUA) {
            cmd_flags |= CMD_FLAG_FUA;
        }
        if flags.no_fallback {
            if !self.client.can(TF_SEND_FAST_ZERO) {
                return Err(Error::unsupported("NBD: the server cannot zero fast"));
            }
            cmd_flags |= CMD_FLAG_FAST_ZERO;
        }
        for (at, n) in self.pieces(offset, len, 1 << 30) {
            self.client
                .request(CMD_WRITE_ZEROES, cmd_flags, at, n as u32, None, None)
                .await?;
        }
        Ok(())
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<(), Error> {
        self.check_writable()?;
        if !self.client.can(TF_SEND_TRIM) {
            return Ok(());
        }
        for (at, n) in self.pieces(offset, len, 1 << 30) {
            self.client
                .request(CMD_TRIM, 0, at, n as u32, None, None)
                .await?;
        }
        Ok(())
    }

    async fn close(&self) -> Result<(), Error> {
        self.client.disconnect().await;
        Ok(())
    }

    async fn flush(&self) -> Result<(), Error> {
        if !self.client.can(TF_SEND_FLUSH) || self.client.can(TF_READ_ONLY) {
            return Ok(());
        }
        self.client
            .request(CMD_FLUSH, 0, 0, 0, None, None)
            .await
            .map(drop)
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Extent, Error> {
        let all_data = Status {
            data: true,
            zero: false,
            allocated: true,
            host_offset: None,
            compressed: false,
        };
        if self.client.allocation_context.is_none() {
            return Ok(Extent {
                offset,
                length: len,
                status: all_data,
            });
        }
        let ask = len.min(1 << 30) as u32;
        let done = self
            .client
            .request(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, offset, ask, None, None)
            .await?;
        let Some(&(length, flags)) = done.extents.first() else {
            return Ok(Extent {
                offset,
                length: len,
                status: all_data,
            });
        };
        let length = u64::from(length).clamp(1, len);
        let status = Status {
            data: flags & STATE_HOLE == 0,
            zero: flags & STATE_ZERO != 0,
            allocated: true,
            host_offset: None,
            compressed: false,
        };
        Ok(Extent {
            offset,
            length,
            status,
        })
    }
}

/// Opens `nbd` nodes for a [`block::NodeGraph`]: pass it to
/// `NodeGraph::with_external`.
#[derive(Debug, Default)]
pub struct NbdDrivers;

#[async_trait]
impl block::graph::ExternalDrivers for NbdDrivers {
    async fn open(
        &self,
        options: &block::options::DriverOptions,
    ) -> Result<Box<dyn BlockDriver>, Error> {
        let block::options::DriverOptions::Nbd(nbd) = options else {
            return Err(Error::unsupported("not an nbd node"));
        };
        let client = NbdClient::connect(&nbd.server, &nbd.export).await?;
        Ok(Box::new(NbdDriver::new(client)))
    }
}
