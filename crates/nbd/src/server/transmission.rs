//! The transmission phase: the request loop (bounded by the in-flight count and the
//! data budget), one task per request, and the single writer of whole reply frames.

use super::BUDGET_UNIT;
use super::ConnectionGuard;
use super::DATA_BUDGET_UNITS;
use super::Export;
use super::MAX_IN_FLIGHT;
use super::closed;
use super::negotiation::Context;
use crate::proto::*;
use block::ErrorKind;
use block::IoBuf;
use block::WriteFlags;
use block::ZeroFlags;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use tokio::io::AsyncRead;
use tokio::io::AsyncReadExt;
use tokio::io::AsyncWrite;
use tokio::io::AsyncWriteExt;
use tokio::sync::OwnedSemaphorePermit;
use tokio::sync::Semaphore;
use tokio::sync::mpsc;
use tokio::sync::watch;
use tokio::task::JoinSet;

/// The transmission phase of one connection.
pub(super) async fn transmit<R, W>(
    connection: ConnectionGuard,
    structured: bool,
    contexts: Vec<Context>,
    mut reader: R,
    writer: W,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Send + Unpin + 'static,
{
    let export = connection.live().clone();
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
pub(super) type Held = (OwnedSemaphorePermit, OwnedSemaphorePermit);

/// Reads the next request (and a write's payload) once a request slot and budget for
/// its data are free. None when the connection should close.
pub(super) async fn next_request<R: AsyncRead + Unpin>(
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
pub(super) async fn write_replies<W: AsyncWrite + Unpin>(
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
pub(super) struct ReadBuffers(std::sync::Mutex<Vec<IoBuf>>);

impl ReadBuffers {
    /// At most this many idle buffers, of at most `KEEP_SIZE` bytes each: 16 MiB per
    /// connection, on top of what its requests in flight hold. As many as a connection
    /// may have requests in flight (`nbdcopy` keeps 64 going): with 32, half of a
    /// pull's reads allocated and faulted in a fresh buffer.
    const KEEP: usize = super::MAX_IN_FLIGHT;
    const KEEP_SIZE: usize = 256 << 10;

    /// The smallest idle buffer that holds `len` bytes, else a new one. Taking the last
    /// one given back instead made a pull whose reads vary in size (extents) drop a
    /// small buffer and allocate for most of its large reads.
    pub(super) fn take(&self, len: usize) -> IoBuf {
        let pooled = {
            let mut pool = self.0.lock().unwrap_or_else(|e| e.into_inner());
            pool.iter()
                .enumerate()
                .filter(|(_, b)| b.capacity() >= len)
                .min_by_key(|(_, b)| b.capacity())
                .map(|(i, _)| i)
                .map(|i| pool.swap_remove(i))
        };
        match pooled {
            Some(mut buf) => {
                buf.set_len(len);
                buf
            }
            None => IoBuf::zeroed(len),
        }
    }

    pub(super) fn give_back(&self, buf: IoBuf) {
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
pub(super) struct Frame {
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
pub(super) async fn write_frame<W: AsyncWrite + Unpin>(
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
pub(super) async fn execute(
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

pub(super) enum Reply {
    Done,
    Data(IoBuf),
    /// Pre-encoded structured chunks (block status).
    Chunks(Vec<u8>),
}

pub(super) type Failure = (u32, String);

pub(super) fn fail(errno: u32, message: impl Into<String>) -> Failure {
    (errno, message.into())
}

pub(super) fn block_failure(e: &block::Error, writing: bool) -> Failure {
    let errno = if writing && e.kind() == ErrorKind::OutOfBounds {
        errno::ENOSPC
    } else {
        e.nbd_errno()
    };
    (errno, e.to_string())
}

pub(super) async fn run(
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
pub(super) const MAX_EXTENTS: usize = 1024;

pub(super) async fn block_status(
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

#[cfg(test)]
mod tests {
    use super::ReadBuffers;
    use block::IoBuf;

    #[test]
    fn a_read_takes_the_smallest_idle_buffer_that_holds_it() {
        let pool = ReadBuffers::default();
        for len in [256 << 10, 4096, 64 << 10] {
            pool.give_back(IoBuf::zeroed(len));
        }
        // The last one given back (64 KiB) is too small for 128 KiB: the 256 KiB one
        // is used, not a fresh allocation.
        let big = pool.take(128 << 10);
        assert_eq!((big.len(), big.capacity()), (128 << 10, 256 << 10));
        let small = pool.take(4096);
        assert_eq!(small.capacity(), 4096, "the smallest that fits");
        let mid = pool.take(8192);
        assert_eq!(mid.capacity(), 64 << 10);
        assert!(mid.iter().all(|&b| b == 0));
        assert_eq!(pool.take(4096).capacity(), 4096, "none idle: a new one");
        // Larger buffers than KEEP_SIZE are not kept; the pool holds at most KEEP.
        pool.give_back(IoBuf::zeroed(ReadBuffers::KEEP_SIZE + 4096));
        assert_eq!(
            pool.take(ReadBuffers::KEEP_SIZE + 4096).len(),
            ReadBuffers::KEEP_SIZE + 4096
        );
        for _ in 0..ReadBuffers::KEEP + 5 {
            pool.give_back(IoBuf::zeroed(4096));
        }
        assert_eq!(pool.0.lock().unwrap().len(), ReadBuffers::KEEP);
    }
}
