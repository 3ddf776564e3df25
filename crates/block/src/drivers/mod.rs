//! The drivers of this crate: one module per driver.
//!
//! * `file`: protocol driver for host files and block devices.
//! * `raw`: format driver that passes bytes through, optionally a window of its child.
//! * `null`: a device that stores nothing (`null-co`/`null-aio`), for tests and benchmarks.
//! * `fault`: fails chosen requests of its child, for testing error paths.
//! * `qcow2`: QEMU's copy-on-write image format.
//! * `snapshot_access`: reads the point-in-time view of a copy-before-write node.
//! * `sidecar_bitmaps`: persistent dirty bitmaps of raw images, in a file beside them.

pub mod fault;
pub mod file;
pub mod null;
pub mod qcow2;
pub mod raw;
pub mod sidecar_bitmaps;
pub mod snapshot_access;
