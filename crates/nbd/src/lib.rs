//! NBD for Stillpoint: the wire codec ([`proto`]) and the server ([`server`]), written
//! from the protocol specification (NetworkBlockDevice/nbd, doc/proto.md).
//!
//! What is implemented: fixed-newstyle negotiation with NO_ZEROES; options
//! EXPORT_NAME, ABORT, LIST, INFO, GO, STRUCTURED_REPLY, LIST_META_CONTEXT,
//! SET_META_CONTEXT (STARTTLS and EXTENDED_HEADERS are refused, which clients handle by
//! falling back); commands READ, WRITE, DISC, FLUSH, TRIM, CACHE, WRITE_ZEROES (NO_HOLE,
//! FAST_ZERO) and BLOCK_STATUS; flags FUA, DF and REQ_ONE; metadata contexts
//! `base:allocation` and `qemu:allocation-depth`; block size information 1 / 4096 /
//! 32 MiB.
//!
//! Replies to READ are one OFFSET_DATA chunk (so DF always holds); errors on READ are
//! ERROR chunks; other commands get simple replies, which the spec allows after
//! structured replies were negotiated.
//!
//! The client ([`client`]) is a block driver for remote exports: structured replies,
//! `base:allocation` block status, many requests in flight; opened from QEMU's
//! `blockdev-add` options through [`NbdDrivers`].
//!
//! The client accepts OFFSET_DATA and OFFSET_HOLE chunks and checks every reply
//! against its request; the server never sends OFFSET_HOLE. [`listener`] creates the
//! listening sockets (modes, stale sockets, accept back-off) for NBD and QMP.
//!
//! Out of scope for now: extended headers, TLS, reconnect.

pub mod client;
pub mod listener;
pub mod proto;
pub mod server;

pub use client::NbdDrivers;
pub use server::Export;
pub use server::NbdServer;
pub use server::RemoveMode;
pub use server::ServerLimits;
