//! Stillpoint's QMP server: the control plane qemu-storage-daemon users already know.
//!
//! * [`wire`]: the JSON stream in both directions (objects need not be one per line;
//!   output lines end in CRLF; events carry realtime timestamps).
//! * [`server`]: connections, the greeting, capabilities negotiation, `id` echo, error
//!   replies that keep the connection open, events to every negotiated client.
//! * [`daemon`]: the state (graph, jobs, NBD server, exports) and the command table,
//!   with QEMU's argument checks and messages where they are known.
//!
//! The greeting advertises no capabilities: out-of-band execution is not implemented,
//! and asking for it is refused. `query-version` reports QEMU 10.0.0's shape with the
//! package "stillpoint VERSION". Out of scope for now: `transaction`, dirty bitmaps,
//! `query-qmp-schema`, the dotted `--blockdev` form.

pub mod bitmaps;
pub mod create;
pub mod daemon;
pub mod server;
pub mod wire;

pub use daemon::Daemon;
