//! The copy-before-write filter: a node inserted above a backup's source.
//!
//! Writes, write-zeroes and discards first ask the block-copy engine to save the old
//! data of every cluster they touch (rounded out to clusters), then go to the source.
//! Reads, flushes and block status pass straight through. The graph inserts the filter
//! with a drain (see `block::graph`), so every request issued after the insertion
//! passes through it and the point in time is well defined; attachments made while it
//! is in place resolve to it, so no writer can bypass it.

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use block::Attachment;
use block::BlockDriver;
use block::Extent;
use block::IoBuf;
use block::Limits;
use block::Result;
use block::WriteFlags;
use block::ZeroFlags;

use crate::block_copy::BlockCopy;

/// The filter driver; the source is the engine's source attachment.
#[derive(Debug)]
pub struct CbwFilter {
    copy: Arc<BlockCopy>,
}

impl CbwFilter {
    /// A filter saving old data through `copy`.
    pub fn new(copy: Arc<BlockCopy>) -> Self {
        Self { copy }
    }

    fn source(&self) -> &Attachment {
        self.copy.source()
    }
}

#[async_trait]
impl BlockDriver for CbwFilter {
    fn driver_name(&self) -> &'static str {
        "copy-before-write"
    }

    fn length(&self) -> u64 {
        self.copy.len()
    }

    fn limits(&self) -> Limits {
        self.source().limits()
    }

    fn filename(&self) -> Option<PathBuf> {
        self.source().node().filename()
    }

    fn filtered_child(&self) -> Option<&Attachment> {
        Some(self.source())
    }

    async fn read(&self, offset: u64, buf: IoBuf) -> Result<IoBuf> {
        self.source().read(offset, buf).await
    }

    async fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> Result<IoBuf> {
        self.copy.before_write(offset, buf.len() as u64).await?;
        self.source().write(offset, buf, flags).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.copy.before_write(offset, len).await?;
        self.source().write_zeroes(offset, len, flags).await
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.copy.before_write(offset, len).await?;
        self.source().discard(offset, len).await
    }

    async fn flush(&self) -> Result<()> {
        self.source().flush().await
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        self.source().block_status(offset, len).await
    }

    async fn close(&self) -> Result<()> {
        Ok(())
    }
}
