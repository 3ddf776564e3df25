//! The handshake: fixed-newstyle options (EXPORT_NAME, LIST, INFO, GO, STRUCTURED_REPLY,
//! LIST/SET_META_CONTEXT, ABORT), their replies, and the metadata contexts an export
//! offers (`base:allocation`, `qemu:allocation-depth`, `qemu:dirty-bitmap:NAME`).

use super::ConnectionGuard;
use super::Export;
use super::NbdServer;
use crate::proto::*;
use std::io;
use tokio::io::AsyncRead;
use tokio::io::AsyncReadExt;
use tokio::io::AsyncWrite;
use tokio::io::AsyncWriteExt;

/// Negotiation state of one connection.
pub(super) struct Negotiation {
    structured: bool,
    no_zeroes: bool,
    /// Contexts chosen by SET_META_CONTEXT, and the export they were chosen for.
    contexts: Vec<Context>,
    contexts_for: Option<String>,
}

pub(super) enum OptionOutcome {
    Continue,
    Close,
    /// The export to serve, counted as connected from before the client was told it
    /// may start: a client that has its reply is always seen by a safe removal.
    Transmit(ConnectionGuard),
}

/// Metadata contexts this server knows, with the ids it gives them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Context {
    /// `base:allocation`: HOLE and ZERO flags.
    Allocation,
    /// `qemu:allocation-depth`: 0 = allocated in no layer of the chain, else the
    /// allocating layer counted from 1 at the top.
    AllocationDepth,
    /// `qemu:dirty-bitmap:NAME`: the export's bitmap number n; flag 1 = dirty.
    DirtyBitmap(usize),
}

impl Context {
    pub(super) fn id(self) -> u32 {
        match self {
            Context::Allocation => 1,
            Context::AllocationDepth => 2,
            Context::DirtyBitmap(n) => 3 + n as u32,
        }
    }

    pub(super) fn name(self, export: &Export) -> String {
        match self {
            Context::Allocation => "base:allocation".into(),
            Context::AllocationDepth => "qemu:allocation-depth".into(),
            Context::DirtyBitmap(n) => format!("qemu:dirty-bitmap:{}", export.bitmaps[n].name()),
        }
    }

    /// Every context an export offers.
    pub(super) fn all(export: &Export) -> Vec<Context> {
        let mut all = vec![Context::Allocation, Context::AllocationDepth];
        all.extend((0..export.bitmaps.len()).map(Context::DirtyBitmap));
        all
    }

    /// Contexts a query selects; `list` allows the namespace wildcards.
    pub(super) fn matching(query: &str, list: bool, export: &Export) -> Vec<Context> {
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

pub(super) async fn send_info<W: AsyncWrite + Unpin>(
    writer: &mut W,
    option: u32,
    info: &[u8],
) -> io::Result<()> {
    writer
        .write_all(&option_reply(option, REP_INFO, info.len() as u32))
        .await?;
    writer.write_all(info).await
}

pub(super) async fn reply_error<W: AsyncWrite + Unpin>(
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
pub(super) struct Parser<'a>(&'a [u8]);

impl Parser<'_> {
    pub(super) fn take(&mut self, n: usize) -> Option<&[u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }

    pub(super) fn u16(&mut self) -> Option<u16> {
        Some(u16::from_be_bytes(self.take(2)?.try_into().ok()?))
    }

    pub(super) fn u32(&mut self) -> Option<u32> {
        Some(u32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }

    pub(super) fn string(&mut self) -> Option<String> {
        let len = self.u32()? as usize;
        if len > 4096 {
            return None;
        }
        String::from_utf8(self.take(len)?.to_vec()).ok()
    }

    pub(super) fn finish(&self) -> Option<()> {
        self.0.is_empty().then_some(())
    }
}

impl NbdServer {
    /// Fixed-newstyle negotiation (proto.md, "Newstyle negotiation"). Returns the
    /// export to serve, or None when the client aborted or misbehaved.
    pub(super) async fn negotiate<R, W>(
        &self,
        reader: &mut R,
        writer: &mut W,
    ) -> io::Result<Option<(ConnectionGuard, bool, Vec<Context>)>>
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
                OptionOutcome::Transmit(connection) => {
                    let export = connection.live();
                    let contexts = if state.contexts_for.as_deref() == Some(export.name.as_str()) {
                        state.contexts.clone()
                    } else {
                        Vec::new()
                    };
                    return Ok(Some((connection, state.structured, contexts)));
                }
            }
        }
    }

    pub(super) async fn handle_option<W: AsyncWrite + Unpin>(
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
                let connection = ConnectionGuard::new(&export);
                writer.write_all(&out).await?;
                Ok(OptionOutcome::Transmit(connection))
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

    pub(super) async fn info_or_go<W: AsyncWrite + Unpin>(
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
        let connection = (option == OPT_GO).then(|| ConnectionGuard::new(&export));
        writer.write_all(&option_reply(option, REP_ACK, 0)).await?;
        Ok(match connection {
            Some(connection) => OptionOutcome::Transmit(connection),
            None => OptionOutcome::Continue,
        })
    }

    pub(super) async fn meta_context<W: AsyncWrite + Unpin>(
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
