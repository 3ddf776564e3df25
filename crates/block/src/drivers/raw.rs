//! `raw`: a format driver that passes its child's bytes through unchanged, optionally a
//! window `[offset, offset + size)` of them (QEMU's raw `offset`/`size` options, used to
//! expose one partition of a disk image).
//!
//! Requests are shifted by `offset` and forwarded through the child attachment;
//! block status reports the child's status with host offsets shifted the same way.

use std::path::PathBuf;

use async_trait::async_trait;

use crate::buf::IoBuf;
use crate::driver::BlockDriver;
use crate::driver::Extent;
use crate::driver::Limits;
use crate::driver::WriteFlags;
use crate::driver::ZeroFlags;
use crate::error::Error;
use crate::error::Result;
use crate::graph::Attachment;

/// A raw node over a child.
#[derive(Debug)]
pub struct RawDriver {
    child: Attachment,
    offset: u64,
    size: u64,
}

impl RawDriver {
    /// A raw view of `child`, from `offset` (default 0) for `size` bytes (default: the
    /// rest of the child).
    pub fn new(child: Attachment, offset: Option<u64>, size: Option<u64>) -> Result<Self> {
        let child_len = child.length();
        let offset = offset.unwrap_or(0);
        if offset > child_len {
            return Err(Error::invalid(format!(
                "The offset ({offset}) is larger than the size of the containing file \
                 ({child_len})"
            )));
        }
        let size = size.unwrap_or(child_len - offset);
        if offset.checked_add(size).is_none_or(|end| end > child_len) {
            // QEMU's text, including its double space.
            return Err(Error::invalid(format!(
                "The sum of offset ({offset}) and size ({size}) has to be smaller or equal \
                 to the  actual size of the containing file ({child_len})"
            )));
        }
        Ok(Self {
            child,
            offset,
            size,
        })
    }
}

#[async_trait]
impl BlockDriver for RawDriver {
    fn driver_name(&self) -> &'static str {
        "raw"
    }

    fn length(&self) -> u64 {
        self.size
    }

    fn limits(&self) -> Limits {
        self.child.limits()
    }

    fn filename(&self) -> Option<PathBuf> {
        self.child.node().filename()
    }

    async fn read(&self, offset: u64, buf: IoBuf) -> Result<IoBuf> {
        self.child.read(self.offset + offset, buf).await
    }

    async fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> Result<IoBuf> {
        self.child.write(self.offset + offset, buf, flags).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.child
            .write_zeroes(self.offset + offset, len, flags)
            .await
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.child.discard(self.offset + offset, len).await
    }

    async fn flush(&self) -> Result<()> {
        self.child.flush().await
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        let mut extent = self.child.block_status(self.offset + offset, len).await?;
        extent.offset = offset;
        Ok(extent)
    }
}
