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
//! # Modules, in layers (each uses only those above it)
//!
//! * [`buf`], [`error`], [`sync_tracker`]: owned aligned buffers, error kinds (a QMP
//!   class and an NBD errno each), "a sync that started after these writes".
//! * [`qapi`], [`options`]: QEMU's input syntax and `blockdev-add` options, with
//!   QEMU's error texts.
//! * [`dirty`]: dirty bitmaps, and [`dirty::PersistentBitmap`], how one is stored in an
//!   image.
//! * [`node`]: a node, the [`node::driver::BlockDriver`] trait (read, write with FUA,
//!   write_zeroes, discard, flush, block_status, length, limits; data moves in owned
//!   4 KiB-aligned [`buf::IoBuf`]s so a thread pool and io_uring can share it and
//!   O_DIRECT needs no bounce buffers), and attachments.
//! * [`drivers`]: file, raw, qcow2, null, snapshot-access, fault; they know nodes and
//!   attachments, never the graph.
//! * [`held_journal`]: the journal that keeps guest writes a backup holds in memory
//!   safe from a killed daemon, and its replay when the image is next opened.
//! * [`graph`]: the registry of named nodes, the factory that opens drivers from
//!   options (`graph/open.rs`, the only code that knows them), filter insertion and
//!   external snapshots; see that module for the draining rule. [`chain`] walks
//!   backing chains.
//!
//! The driver trait is small; what only some drivers can do is a capability behind an
//! accessor that answers `None` by default: `backing_file()` (qcow2's backing node),
//! `bitmap_store()` (bitmaps kept in the image) and `snapshot()` (the point-in-time
//! view a standalone copy-before-write filter keeps, which `snapshot-access` reads;
//! other nodes answer ENOTSUP).
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
pub mod drivers;
pub mod error;
pub mod graph;
pub mod held_journal;
pub mod node;
pub mod options;
pub mod qapi;
pub mod sync_tracker;

pub use buf::IoBuf;
pub use error::Error;
pub use error::ErrorKind;
pub use error::Result;
pub use graph::NodeGraph;
pub use node::AttachUser;
pub use node::Attachment;
pub use node::Node;
pub use node::driver::BlockDriver;
pub use node::driver::Extent;
pub use node::driver::Limits;
pub use node::driver::Status;
pub use node::driver::WriteFlags;
pub use node::driver::ZeroFlags;
pub use options::BlockdevOptions;
