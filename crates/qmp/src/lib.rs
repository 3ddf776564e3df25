//! Stillpoint's QMP server: the control plane qemu-storage-daemon users already know.
//!
//! * [`wire`]: the JSON stream in both directions (objects need not be one per line;
//!   malformed input is answered as QEMU's streamer answers it; output lines end in
//!   CRLF; events carry realtime timestamps).
//! * [`server`]: connections, the greeting, capabilities negotiation, `id` echo, error
//!   replies that keep the connection open, events to every negotiated client.
//! * [`daemon`]: the state (graph, jobs, NBD server, exports) and the command table
//!   (`daemon/commands.rs`: one table; `query-commands` lists it and nothing else
//!   runs), with the commands in files by family: nodes (`block_commands`), jobs
//!   (`job_commands`), NBD (`nbd_commands`), `transaction` (grouped completion),
//!   [`daemon::bitmaps`] (the `block-dirty-bitmap-*` commands and transaction actions),
//!   [`daemon::create`] (`blockdev-create` and its job), [`daemon::snapshot`] (external
//!   snapshots) and [`daemon::legacy`] (older commands QEMU's documentation and scripts
//!   still use: `drive-backup`, `nbd-server-add`/`-remove`, `query-block`). QEMU's
//!   argument checks and messages where they are known.
//! * [`error`]: QMP errors (class and description), from block and job errors.
//!
//! The greeting advertises no capabilities: out-of-band execution is not implemented,
//! and asking for it is refused. `query-version` reports QEMU 10.0.0's shape with the
//! package "stillpoint VERSION". Out of scope for now: `query-qmp-schema`, mirror,
//! commit, `block-stream`.

pub mod daemon;
pub mod error;
pub mod server;
pub mod wire;

pub use daemon::Daemon;
