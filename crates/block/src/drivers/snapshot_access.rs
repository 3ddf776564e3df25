//! `snapshot-access`: a read-only view of the point-in-time snapshot a standalone
//! `copy-before-write` node keeps (QEMU 7.0's fleecing without a temporary qcow2).
//!
//! ```text
//!   NBD export 'fleece' --> [fl-access: snapshot-access] --fixed--> [fl-cbw] --> [src]
//!                                                                      '--> [fl-tmp]
//! ```
//!
//! Reads, block status and discards call the child's snapshot API
//! ([`SnapshotSource`](crate::node::driver::SnapshotSource)); the copy-before-write node answers
//! from the source or from its target, whichever holds the old data. The link to the
//! child is fixed: it names that very node, so a filter inserted above it later (a
//! backup of the same disk) does not come between the reader and the snapshot.
//! Writes fail with ENOTSUP, as in QEMU; a discard (with `discard=unmap`) tells the
//! filter the reader is done with the range.

use std::path::PathBuf;

use async_trait::async_trait;

use crate::buf::IoBuf;
use crate::error::Error;
use crate::error::Result;
use crate::node::Attachment;
use crate::node::driver::BlockDriver;
use crate::node::driver::Extent;
use crate::node::driver::Limits;
use crate::node::driver::WriteFlags;
use crate::node::driver::ZeroFlags;

/// The snapshot-access driver.
#[derive(Debug)]
pub struct SnapshotAccessDriver {
    child: Attachment,
}

impl SnapshotAccessDriver {
    /// A view of the snapshot of `child`.
    pub fn new(child: Attachment) -> Self {
        Self { child }
    }
}

fn read_only() -> Error {
    Error::unsupported("a snapshot-access node cannot be written")
}

#[async_trait]
impl BlockDriver for SnapshotAccessDriver {
    fn driver_name(&self) -> &'static str {
        "snapshot-access"
    }

    fn length(&self) -> u64 {
        self.child.length()
    }

    fn limits(&self) -> Limits {
        self.child.limits()
    }

    fn filename(&self) -> Option<PathBuf> {
        self.child.node().filename()
    }

    async fn read(&self, offset: u64, buf: IoBuf) -> Result<IoBuf> {
        self.child.read_snapshot(offset, buf).await
    }

    async fn write(&self, _offset: u64, _buf: IoBuf, _flags: WriteFlags) -> Result<IoBuf> {
        Err(read_only())
    }

    async fn write_zeroes(&self, _offset: u64, _len: u64, _flags: ZeroFlags) -> Result<()> {
        Err(read_only())
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.child.discard_snapshot(offset, len).await
    }

    async fn flush(&self) -> Result<()> {
        Ok(())
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        self.child.block_status_snapshot(offset, len).await
    }

    async fn close(&self) -> Result<()> {
        Ok(())
    }
}
