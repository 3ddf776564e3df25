//! The copy-on-read filter a stream puts above its image for as long as it runs
//! (QEMU's `copy-on-read` node; named with `block-stream`'s `filter-node-name`,
//! generated otherwise).
//!
//! A read through it first copies what the layers being streamed supply for the
//! clusters it covers into the image, exactly as the stream's own pass would (the
//! same [`ChainCopy`]), then reads the image. So what a guest reads during a live
//! restore is fetched from the backing chain once: the stream's pass then finds
//! those clusters allocated and skips them, and the guest's next read of them is
//! local. Writes, flushes and block status pass straight through.
//!
//! A copy that fails does not fail the read: the read falls through to the chain as
//! it would without the filter, and the stream's own pass meets (and reports, as its
//! `on-error` says) whatever made the copy fail.

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

use crate::chain_copy::ChainCopy;

/// The filter: its fixed link to the image being streamed, and what to copy.
#[derive(Debug)]
pub(crate) struct CorFilter {
    image: Attachment,
    copy: Arc<ChainCopy>,
}

impl CorFilter {
    pub(crate) fn new(image: Attachment, copy: Arc<ChainCopy>) -> Self {
        Self { image, copy }
    }

    /// Copies what the chain supplies for `[offset, end)` into the image.
    async fn copy_in(&self, offset: u64, end: u64) -> Result<()> {
        let image = self.image.node();
        let (Some(format), Some(backing)) = (image.driver().backing_file(), image.backing()) else {
            return Ok(());
        };
        let mut at = offset;
        while at < end {
            let (n, _) = self.copy.copy_some(format, &backing, at, end).await?;
            at += n;
        }
        Ok(())
    }
}

#[async_trait]
impl BlockDriver for CorFilter {
    fn driver_name(&self) -> &'static str {
        "copy-on-read"
    }

    fn length(&self) -> u64 {
        self.image.node().length()
    }

    fn limits(&self) -> Limits {
        self.image.node().limits()
    }

    fn filename(&self) -> Option<PathBuf> {
        self.image.node().filename()
    }

    fn filtered_child(&self) -> Option<&Attachment> {
        Some(&self.image)
    }

    async fn read(&self, offset: u64, buf: IoBuf) -> Result<IoBuf> {
        let end = offset + buf.len() as u64;
        if let Err(e) = self.copy_in(offset, end).await {
            tracing::debug!("copy-on-read of {offset}..{end} failed, reading through: {e}");
        }
        self.image.read(offset, buf).await
    }

    async fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> Result<IoBuf> {
        self.image.write(offset, buf, flags).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.image.write_zeroes(offset, len, flags).await
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.image.discard(offset, len).await
    }

    async fn flush(&self) -> Result<()> {
        self.image.flush().await
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        self.image.block_status(offset, len).await
    }

    // The image is the graph's to close, not the filter's.
    async fn close(&self) -> Result<()> {
        Ok(())
    }
}
