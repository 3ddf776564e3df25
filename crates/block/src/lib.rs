//! Stillpoint's block layer: the ground the backup engine, the NBD server and the QMP
//! daemon stand on.
//!
//! # Shape
//!
//! ```text
//!   users (exports, jobs, CLI)      hold an Attachment
//!          |
//!          v
//!   Attachment --slot--> Node        generic layer: range checks, read-only,
//!                         |          discard/detect-zeroes/no-flush policy
//!                         v
//!                    BlockDriver     file | raw | qcow2 | null-co | snapshot-access | fault
//!                         |          (nbd and copy-before-write live in other crates)
//!                         |
//!                    child Attachment (format drivers and filters have children)
//! ```
//!
//! * [`driver::BlockDriver`] is the one async interface: read, write (FUA),
//!   write_zeroes (may-unmap), discard, flush, block_status, length, limits. Data moves
//!   in owned, 4 KiB-aligned [`buf::IoBuf`]s so a thread-pool engine and an io_uring
//!   engine can share the interface and O_DIRECT needs no bounce buffers.
//! * [`graph::NodeGraph`] creates nodes from [`options::BlockdevOptions`] (QEMU's
//!   `blockdev-add` JSON), names them, counts their users and inserts or removes
//!   filters under live attachments; see that module for the draining rule.
//! * [`error::Error`] carries a kind that maps to a QMP error class and an NBD errno.
//! * [`dirty::DirtyBitmap`]s hang off nodes; the node layer marks them on every write,
//!   write-zeroes and discard, and hands persistent ones to the driver (qcow2) to
//!   store on close.
//! * The snapshot API ([`driver::BlockDriver::read_snapshot`], `block_status_snapshot`,
//!   `discard_snapshot`) is how a `snapshot-access` node reads the point-in-time view a
//!   standalone copy-before-write filter keeps; other drivers answer ENOTSUP.
//!
//! # Invariants
//!
//! * No request reaches a driver outside `[0, length)`: the node layer checks every
//!   request, and the file driver checks again because it can be used alone.
//! * A node that a live attachment targets cannot be removed.
//! * Retargeting an attachment waits for its in-flight requests and holds new ones until
//!   the change is done, so a filter sees every request issued after its insertion. A
//!   filter is built inside that drained section, so what it captures (a bitmap's bits)
//!   belongs to the same instant, and attachments made meanwhile are held and moved too.
//!
//! Out of scope for now: image locking, io_uring, resize. (The NBD client driver lives in
//! the `nbd` crate and the standalone copy-before-write filter in `jobs`; both plug in
//! through [`graph::ExternalDrivers`].)

pub mod buf;
pub mod chain;
pub mod dirty;
pub mod driver;
pub mod drivers;
pub mod error;
pub mod graph;
pub mod options;
pub mod sync_tracker;

pub use buf::IoBuf;
pub use driver::BlockDriver;
pub use driver::Extent;
pub use driver::Limits;
pub use driver::Status;
pub use driver::WriteFlags;
pub use driver::ZeroFlags;
pub use error::Error;
pub use error::ErrorKind;
pub use error::Result;
pub use graph::AttachUser;
pub use graph::Attachment;
pub use graph::Node;
pub use graph::NodeGraph;
pub use options::BlockdevOptions;
