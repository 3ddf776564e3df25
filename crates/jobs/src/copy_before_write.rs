//! The copy-before-write filter: a node inserted above a backup's source, or added on
//! its own with `blockdev-add` for pull-mode backup (fleecing).
//!
//! Writes, write-zeroes and discards first ask the block-copy engine to save the old
//! data of every cluster they touch (rounded out to clusters), then go to the source.
//! Reads, flushes and block status pass straight through. The graph inserts the filter
//! with a drain (see `block::graph`), so every request issued after the insertion
//! passes through it and the point in time is well defined; attachments made while it
//! is in place resolve to it, so no writer can bypass it.
//!
//! A standalone filter ([`standalone`], QEMU's `copy-before-write` driver) has no job:
//! old data goes straight to its target before the guest write proceeds, and a
//! `snapshot-access` node reads the point-in-time view through the snapshot API
//! (source where the data is unchanged, target where it was saved).

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use bitmap::Bitmap;
use block::Attachment;
use block::BlockDriver;
use block::Extent;
use block::IoBuf;
use block::Limits;
use block::Result;
use block::WriteFlags;
use block::ZeroFlags;
use block::node::driver::SnapshotSource;
use block::options::CbwOptions;

use crate::block_copy::BlockCopy;
use crate::block_copy::BlockCopyOptions;
use crate::block_copy::redirect::Redirect;
use crate::cluster_size::check_min_cluster_size;
use crate::cluster_size::copy_cluster_size;
use crate::job::Progress;

/// External drivers for a graph that offers standalone copy-before-write nodes (tools
/// and tests without NBD; the daemon's own set adds the NBD client).
#[derive(Debug, Default)]
pub struct CbwDrivers;

#[async_trait]
impl block::graph::ExternalDrivers for CbwDrivers {
    async fn open(&self, _options: &block::options::DriverOptions) -> Result<Box<dyn BlockDriver>> {
        Err(block::Error::unsupported(
            "this graph opens no external drivers but copy-before-write",
        ))
    }

    fn copy_before_write(
        &self,
        options: &CbwOptions,
        file: Attachment,
        target: Attachment,
        initial: Option<Bitmap>,
    ) -> Result<Box<dyn BlockDriver>> {
        standalone(options, file, target, initial)
    }
}

/// Builds the driver of a `copy-before-write` node added with `blockdev-add`: saves
/// the old data of `file` to `target`, for every cluster or only those `initial`
/// marks. The graph calls this while `file`'s writers are drained.
pub fn standalone(
    options: &CbwOptions,
    file: Attachment,
    target: Attachment,
    initial: Option<Bitmap>,
) -> Result<Box<dyn BlockDriver>> {
    let target_node = target.node();
    if Arc::ptr_eq(&file.node(), &target_node) {
        return Err(block::Error::invalid(
            "Source and target cannot be the same",
        ));
    }
    // QEMU accepts a smaller target and fails the guest writes that land past its
    // end; refusing up front loses nothing.
    if target.length() < file.length() {
        return Err(block::Error::invalid(format!(
            "The target '{}' ({} bytes) is smaller than the node it protects ({} bytes)",
            target_node.name(),
            target.length(),
            file.length()
        )));
    }
    check_min_cluster_size(options.min_cluster_size.unwrap_or(0)).map_err(block::Error::invalid)?;
    let target_cluster = u64::from(target.limits().cluster_size.unwrap_or(0));
    let cluster = copy_cluster_size(target.limits(), options.min_cluster_size.unwrap_or(0));
    let copy_options = BlockCopyOptions {
        cluster_size: cluster,
        chunk_size: cluster,
        staging_memory: 0,
        scratch_dir: std::env::temp_dir(),
        skip_unallocated: false,
        unallocated_may_stay_sparse: false,
        on_cbw_error: options.on_cbw_error,
        compress: false,
        sparse_block: target_cluster.max(4096),
        standalone: true,
        cbw_timeout: (options.cbw_timeout > 0)
            .then(|| std::time::Duration::from_secs(options.cbw_timeout)),
        // Snapshot reads would have to merge fragments: whole clusters only.
        partial_cbw: false,
        max_fragment_bytes: u64::MAX,
        // No background pass copies the clusters: a held write would wait for ever.
        redirect_writes: false,
        busy_pause_ratio: crate::block_copy::guest::BUSY_PAUSE_RATIO,
    };
    let copy = BlockCopy::new(
        file,
        target,
        copy_options,
        Arc::new(Progress::default()),
        initial.as_ref(),
    )?;
    Ok(Box::new(CbwFilter::new(Arc::new(copy))))
}

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

    // Every guest request is counted while it runs, so the background pass gives way
    // to it (block_copy::guest).
    async fn read(&self, offset: u64, buf: IoBuf) -> Result<IoBuf> {
        let _guest = self.copy.guest_request();
        self.copy.read_through(offset, buf).await
    }

    // A write is held in memory where its clusters are not copied yet
    // (block_copy::redirect); otherwise the held writes it overlaps go to the source
    // first, so the source sees a range's writes in the guest's order.
    async fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> Result<IoBuf> {
        let _guest = self.copy.guest_request();
        let buf = match self.copy.redirect(offset, buf, flags.fua).await {
            Redirect::Held(buf) => return Ok(buf),
            Redirect::Pass(buf) => buf,
            Redirect::Failed(e) => return Err(e),
        };
        let len = buf.len() as u64;
        self.copy.flush_held(offset, offset + len, true).await?;
        self.copy.before_write(offset, len).await?;
        self.source().write(offset, buf, flags).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        let _guest = self.copy.guest_request();
        self.copy.flush_held(offset, offset + len, true).await?;
        self.copy.before_write(offset, len).await?;
        self.source().write_zeroes(offset, len, flags).await
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let _guest = self.copy.guest_request();
        self.copy.flush_held(offset, offset + len, true).await?;
        self.copy.before_write(offset, len).await?;
        self.source().discard(offset, len).await
    }

    // What a flush covers is in the image itself; the journal of held writes is
    // synced at the same time, so none of its releases is lost with the power. A flush
    // is a guest request like the others (the background gives way while it runs),
    // and it tells the engine this guest flushes, so held writes are saved early
    // (block_copy::redirect).
    async fn flush(&self) -> Result<()> {
        let _guest = self.copy.guest_flush();
        self.copy.flush_all_held().await?;
        let (journal, source) = tokio::join!(self.copy.sync_journal(), self.source().flush());
        journal?;
        source
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        self.copy.block_status_through(offset, len).await
    }

    async fn close(&self) -> Result<()> {
        Ok(())
    }

    fn snapshot(&self) -> Option<&dyn SnapshotSource> {
        Some(self)
    }
}

#[async_trait]
impl SnapshotSource for CbwFilter {
    async fn read_snapshot(&self, offset: u64, buf: IoBuf) -> Result<IoBuf> {
        self.copy.read_snapshot(offset, buf).await
    }

    async fn block_status_snapshot(&self, offset: u64, len: u64) -> Result<Extent> {
        self.copy.block_status_snapshot(offset, len).await
    }

    async fn discard_snapshot(&self, offset: u64, len: u64) -> Result<()> {
        self.copy.discard_snapshot(offset, len).await
    }
}
