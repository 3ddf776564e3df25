//! NBD wire constants and the request header, from NBD proto.md (fixed newstyle
//! negotiation, transmission phase, structured replies). All integers on the wire are
//! big-endian. Pure data: no I/O here, so the parser can be fuzzed on its own.

/// Handshake: first 8 bytes the server sends, "NBDMAGIC".
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// Handshake: newstyle magic "IHAVEOPT", also the prefix of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

/// Server handshake flag (u16): fixed newstyle negotiation.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Server handshake flag (u16): the client may ask to skip the 124 zero bytes.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag (u32): fixed newstyle.
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag (u32): no zero padding after NBD_OPT_EXPORT_NAME.
pub const CLIENT_NO_ZEROES: u32 = 1 << 1;

/// Option: select an export and end negotiation, no error reporting.
pub const OPT_EXPORT_NAME: u32 = 1;
/// Option: abort negotiation.
pub const OPT_ABORT: u32 = 2;
/// Option: list exports.
pub const OPT_LIST: u32 = 3;
/// Option: upgrade to TLS.
pub const OPT_STARTTLS: u32 = 5;
/// Option: describe an export.
pub const OPT_INFO: u32 = 6;
/// Option: describe an export and enter transmission.
pub const OPT_GO: u32 = 7;
/// Option: use structured replies.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// Option: list metadata contexts.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// Option: select metadata contexts.
pub const OPT_SET_META_CONTEXT: u32 = 10;
/// Option: 32-byte extended headers (not implemented here).
pub const OPT_EXTENDED_HEADERS: u32 = 11;

/// Option reply: done.
pub const REP_ACK: u32 = 1;
/// Option reply: one export of a LIST.
pub const REP_SERVER: u32 = 2;
/// Option reply: one INFO item.
pub const REP_INFO: u32 = 3;
/// Option reply: one metadata context.
pub const REP_META_CONTEXT: u32 = 4;
/// Option error: unknown or unsupported option.
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
/// Option error: refused by policy.
pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
/// Option error: malformed option.
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
/// Option error: no such export.
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
/// Option error: option data too large.
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

/// INFO item: size and transmission flags (u64 + u16).
pub const INFO_EXPORT: u16 = 0;
/// INFO item: export name.
pub const INFO_NAME: u16 = 1;
/// INFO item: description.
pub const INFO_DESCRIPTION: u16 = 2;
/// INFO item: block sizes (three u32: minimum, preferred, maximum payload).
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flag: the flags field is valid (always set).
pub const TF_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag: read-only export.
pub const TF_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: FLUSH supported.
pub const TF_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag: FUA supported.
pub const TF_SEND_FUA: u16 = 1 << 3;
/// Transmission flag: TRIM supported.
pub const TF_SEND_TRIM: u16 = 1 << 5;
/// Transmission flag: WRITE_ZEROES supported.
pub const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Transmission flag: DF (don't fragment reads) supported.
pub const TF_SEND_DF: u16 = 1 << 7;
/// Transmission flag: several connections see one consistent cache.
pub const TF_CAN_MULTI_CONN: u16 = 1 << 8;
/// Transmission flag: CACHE supported.
pub const TF_SEND_CACHE: u16 = 1 << 10;
/// Transmission flag: FAST_ZERO supported.
pub const TF_SEND_FAST_ZERO: u16 = 1 << 11;

/// Magic of a (compact) request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Size of a compact request header.
pub const REQUEST_LEN: usize = 28;

/// Command: read.
pub const CMD_READ: u16 = 0;
/// Command: write (payload follows the header).
pub const CMD_WRITE: u16 = 1;
/// Command: disconnect (no reply).
pub const CMD_DISC: u16 = 2;
/// Command: flush.
pub const CMD_FLUSH: u16 = 3;
/// Command: trim (discard).
pub const CMD_TRIM: u16 = 4;
/// Command: prefetch hint.
pub const CMD_CACHE: u16 = 5;
/// Command: write zeroes.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// Command: block status of selected metadata contexts.
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flag: force unit access.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag (WRITE_ZEROES): do not punch holes.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Command flag (READ): reply in one data chunk.
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// Command flag (BLOCK_STATUS): one extent per context.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// Command flag (WRITE_ZEROES): fail with ENOTSUP rather than write slowly.
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

/// Structured chunk flag: last chunk of the reply.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// Chunk type: no payload (only with DONE).
pub const REPLY_TYPE_NONE: u16 = 0;
/// Chunk type: `u64 offset` + data.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Chunk type: `u32 context id` + extents of `{u32 length, u32 flags}`.
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Chunk type: `u64 offset` + `u32 length` of a read range that reads as zeros.
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Chunk type: `u32 error, u16 message length, message`.
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

/// `base:allocation` flag: not allocated.
pub const STATE_HOLE: u32 = 1 << 0;
/// `base:allocation` flag: reads as zeros.
pub const STATE_ZERO: u32 = 1 << 1;

/// Largest payload we accept or send (the spec's interoperable maximum).
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Largest option data we read during negotiation.
pub const MAX_OPTION_LEN: u32 = 64 << 10;

/// Error values on the wire, fixed by the NBD protocol (proto.md, "Error values"): they
/// match Linux errno numbers but are protocol constants, so they are not taken from libc.
pub mod errno {
    /// Operation not permitted (write to a read-only export).
    pub const EPERM: u32 = 1;
    /// I/O error.
    pub const EIO: u32 = 5;
    /// Invalid argument.
    pub const EINVAL: u32 = 22;
    /// No space (write past the end).
    pub const ENOSPC: u32 = 28;
    /// Value too large (a DF read that cannot be one chunk).
    pub const EOVERFLOW: u32 = 75;
    /// Not supported (FAST_ZERO that would be slow).
    pub const ENOTSUP: u32 = 95;
    /// Server shutting down.
    pub const ESHUTDOWN: u32 = 108;
}

/// A transmission-phase request header (28 bytes, proto.md "Request message").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags (u16).
    pub flags: u16,
    /// Command type (u16).
    pub command: u16,
    /// Opaque cookie echoed in the reply (u64).
    pub cookie: u64,
    /// Byte offset (u64).
    pub offset: u64,
    /// Length (u32): of the payload for WRITE, of the effect otherwise.
    pub length: u32,
}

/// Why a request header could not be parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestError {
    /// The first four bytes are not the request magic: the stream is out of sync.
    BadMagic(u32),
}

impl Request {
    /// Parses a 28-byte header.
    pub fn parse(header: &[u8; REQUEST_LEN]) -> Result<Self, RequestError> {
        let magic = u32::from_be_bytes(header[0..4].try_into().unwrap());
        if magic != REQUEST_MAGIC {
            return Err(RequestError::BadMagic(magic));
        }
        Ok(Self {
            flags: u16::from_be_bytes(header[4..6].try_into().unwrap()),
            command: u16::from_be_bytes(header[6..8].try_into().unwrap()),
            cookie: u64::from_be_bytes(header[8..16].try_into().unwrap()),
            offset: u64::from_be_bytes(header[16..24].try_into().unwrap()),
            length: u32::from_be_bytes(header[24..28].try_into().unwrap()),
        })
    }

    /// Encodes the header (used by tests and clients).
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut out = [0u8; REQUEST_LEN];
        out[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        out[4..6].copy_from_slice(&self.flags.to_be_bytes());
        out[6..8].copy_from_slice(&self.command.to_be_bytes());
        out[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        out[16..24].copy_from_slice(&self.offset.to_be_bytes());
        out[24..28].copy_from_slice(&self.length.to_be_bytes());
        out
    }
}

/// A simple reply header: `u32 magic, u32 error, u64 cookie`.
pub fn simple_reply(error: u32, cookie: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(16);
    out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out
}

/// A structured chunk header: `u32 magic, u16 flags, u16 type, u64 cookie, u32 length`.
pub fn chunk_header(flags: u16, kind: u16, cookie: u64, length: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(20);
    out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&length.to_be_bytes());
    out
}

/// An option reply header: `u64 magic, u32 option, u32 type, u32 length`.
pub fn option_reply(option: u32, kind: u32, length: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(20);
    out.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&length.to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_bad_magic_is_refused() {
        let request = Request {
            flags: CMD_FLAG_FUA,
            command: CMD_WRITE,
            cookie: 7,
            offset: 4096,
            length: 512,
        };
        assert_eq!(Request::parse(&request.encode()), Ok(request));
        let mut bad = request.encode();
        bad[0] = 0;
        assert!(matches!(
            Request::parse(&bad),
            Err(RequestError::BadMagic(_))
        ));
    }

    #[test]
    fn headers_are_big_endian() {
        assert_eq!(
            simple_reply(22, 1)[..8],
            [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 22]
        );
        assert_eq!(
            chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_NONE, 2, 0).len(),
            20
        );
        assert_eq!(
            &option_reply(OPT_GO, REP_ACK, 0)[..8],
            &OPT_REPLY_MAGIC.to_be_bytes()
        );
    }
}
