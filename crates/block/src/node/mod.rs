//! A node: one driver instance with a name, and the generic block layer in front of it.
//!
//! A node, its driver and attachments refer to one another by nature (a node holds a
//! driver, a driver holds attachments to its children, an attachment points at a
//! node), so the three live in this one module, in three files:
//!
//! * `mod.rs`: [`Node`] and its [`NodePolicy`]. The node methods are the layer between
//!   attachments and drivers: request range checks, the read-only flag,
//!   `discard=ignore`, `detect-zeroes` and `cache.no-flush` are applied there once, for
//!   every driver, and every write, write-zeroes and discard marks the node's dirty
//!   bitmaps.
//! * [`driver`]: the [`driver::BlockDriver`] trait every driver implements.
//! * [`attach`]: [`Attachment`]s, the handles all users hold, and the slots and drain
//!   that let the graph move them.
//!
//! Nothing here knows the node graph or any driver: drivers (`crate::drivers`) are
//! built on this module, and the graph (`crate::graph`) on both.

pub mod attach;
pub mod driver;

pub use attach::AttachUser;
pub use attach::Attachment;
pub use attach::AttachmentView;

use crate::buf::IoBuf;
use crate::dirty::DirtyBitmap;
use crate::error::Error;
use crate::error::ErrorKind;
use crate::error::Result;
use crate::node::driver::BlockDriver;
use crate::node::driver::Extent;
use crate::node::driver::Limits;
use crate::node::driver::SnapshotSource;
use crate::node::driver::WriteFlags;
use crate::node::driver::ZeroFlags;
use crate::node::driver::check_request;
use crate::options::DetectZeroes;
use crate::options::DiscardMode;
use std::fmt;
use std::sync::Arc;
use std::sync::Mutex;

/// Generic behaviour of a node, resolved from its options and its parent's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NodePolicy {
    /// Writes, write-zeroes and discards fail with EPERM.
    pub read_only: bool,
    /// `cache.direct`.
    pub direct: bool,
    /// `cache.no-flush`: flush requests do nothing.
    pub no_flush: bool,
    /// Whether discards reach the driver.
    pub discard: DiscardMode,
    /// Whether all-zero writes become write-zeroes.
    pub detect_zeroes: DetectZeroes,
}

/// A named driver instance.
pub struct Node {
    pub(crate) name: String,
    /// Created inline as a child; deleted with its parent, not by the monitor.
    pub(crate) implicit: bool,
    /// Names of the implicit children this node created, or adopted (a backing node
    /// that `block-stream` with a base relinked it to).
    pub(crate) implicit_children: Mutex<Vec<String>>,
    pub(crate) policy: NodePolicy,
    /// Writes may extend the node past its end (the file under a qcow2 node).
    pub(crate) growable: std::sync::atomic::AtomicBool,
    /// Dirty bitmaps every write to this node marks.
    pub(crate) bitmaps: Mutex<Vec<Arc<DirtyBitmap>>>,
    /// For a filter a job inserted: the job, which alone may remove it.
    pub(crate) filter_owner: Option<AttachUser>,
    /// Made read-only after it was opened: an overlay took its place (external
    /// snapshot), and it is only a backing node now.
    pub(crate) demoted: std::sync::atomic::AtomicBool,
    pub(crate) driver: Box<dyn BlockDriver>,
}

impl fmt::Debug for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Node")
            .field("name", &self.name)
            .field("driver", &self.driver)
            .field("policy", &self.policy)
            .finish()
    }
}

impl Node {
    /// The node-name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the name was generated for an inline child.
    pub fn is_implicit(&self) -> bool {
        self.implicit
    }

    /// Generic behaviour flags.
    pub fn policy(&self) -> NodePolicy {
        NodePolicy {
            read_only: self.policy.read_only || self.is_demoted(),
            ..self.policy
        }
    }

    pub(crate) fn is_demoted(&self) -> bool {
        self.demoted.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The driver's QMP name.
    pub fn driver_name(&self) -> &'static str {
        self.driver.driver_name()
    }

    /// The driver, for callers that need more than the node methods.
    pub fn driver(&self) -> &dyn BlockDriver {
        self.driver.as_ref()
    }

    /// Size in bytes.
    pub fn length(&self) -> u64 {
        self.driver.length()
    }

    /// Alignment and transfer limits.
    pub fn limits(&self) -> Limits {
        self.driver.limits()
    }

    /// The host file behind the node, if any.
    pub fn filename(&self) -> Option<std::path::PathBuf> {
        self.driver.filename()
    }

    pub(crate) fn check_writable(&self, op: &str) -> Result<()> {
        if self.policy.read_only || self.is_demoted() {
            return Err(Error::new(
                ErrorKind::PermissionDenied,
                format!("Cannot {op} node '{}': Block node is read-only", self.name),
            ));
        }
        Ok(())
    }

    /// `block-dirty-bitmap-add`: a new bitmap named `name` (unique on this node).
    pub fn add_bitmap(
        &self,
        name: &str,
        granularity: Option<u64>,
        persistent: bool,
        disabled: bool,
    ) -> Result<Arc<DirtyBitmap>> {
        if name.is_empty() {
            return Err(Error::invalid("Bitmap name cannot be empty"));
        }
        if persistent && name.len() > 1023 {
            return Err(Error::invalid("Bitmap name is too long"));
        }
        let granularity = granularity
            .unwrap_or_else(|| crate::dirty::default_granularity(self.limits().cluster_size));
        if !granularity.is_power_of_two() || !(512..=1 << 31).contains(&granularity) {
            return Err(Error::invalid(
                "Granularity must be power of 2 and at least 512",
            ));
        }
        if persistent && !self.driver.bitmap_store().is_some_and(|s| s.writable()) {
            return Err(Error::unsupported(format!(
                "Can't store persistent bitmaps to {}: Operation not supported",
                self.name
            )));
        }
        if persistent {
            // QEMU's rule: the bitmap's data, in whole clusters, fits the limit.
            let cluster = u64::from(self.limits().cluster_size.unwrap_or(65536));
            let stored =
                crate::dirty::bitmap_bytes(self.length(), granularity).div_ceil(cluster) * cluster;
            if stored > crate::dirty::MAX_BITMAP_BYTES {
                return Err(Error::invalid(format!(
                    "Can't make bitmap '{name}' persistent in '{}': Too much space will be \
                     occupied by the bitmap. Use larger granularity",
                    self.name
                )));
            }
        }
        let mut bitmaps = self.bitmaps.lock().unwrap_or_else(|e| e.into_inner());
        if bitmaps.iter().any(|b| b.name() == name) {
            return Err(Error::invalid(format!("Bitmap already exists: {name}")));
        }
        if persistent && let Some(store) = self.driver.bitmap_store() {
            store.prepare_persistent().map_err(|e| {
                Error::new(
                    e.kind(),
                    format!("Can't store persistent bitmaps to {}: {e}", self.name),
                )
            })?;
        }
        let bitmap = DirtyBitmap::new(name, self.length(), granularity, !disabled, persistent)?;
        bitmaps.push(bitmap.clone());
        Ok(bitmap)
    }

    /// The bitmap named `name`, with QEMU's message when there is none.
    pub fn bitmap(&self, name: &str) -> Result<Arc<DirtyBitmap>> {
        self.bitmaps
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|b| b.name() == name)
            .cloned()
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::NotFound,
                    format!("Dirty bitmap '{name}' not found"),
                )
            })
    }

    /// Every bitmap of this node, in creation order.
    pub fn bitmaps(&self) -> Vec<Arc<DirtyBitmap>> {
        self.bitmaps
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// `block-dirty-bitmap-remove`: refused while the bitmap is busy.
    pub fn remove_bitmap(&self, name: &str) -> Result<Arc<DirtyBitmap>> {
        let bitmap = self.bitmap(name)?;
        if bitmap.info().busy {
            return Err(Error::invalid(format!(
                "Bitmap '{name}' is currently in use by another operation and cannot be used"
            )));
        }
        self.bitmaps
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|b| !Arc::ptr_eq(b, &bitmap));
        Ok(bitmap)
    }

    /// Puts back a bitmap taken out by [`Node::remove_bitmap`] (transaction rollback).
    pub fn restore_bitmap(&self, bitmap: Arc<DirtyBitmap>) {
        self.bitmaps
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(bitmap);
    }

    /// Closes the driver after handing it the node's persistent bitmaps to store
    /// (inconsistent ones stay marked in use). Tries both; returns the first error and
    /// logs each.
    pub(crate) async fn close(&self) -> Result<()> {
        let stored: Vec<_> = self
            .bitmaps()
            .iter()
            .filter_map(|b| b.to_stored())
            .collect();
        let stored = match self.driver.bitmap_store() {
            Some(store) => store.store_persistent_bitmaps(stored).await,
            None if stored.is_empty() => Ok(()),
            None => Err(Error::unsupported(format!(
                "{} cannot store dirty bitmaps",
                self.driver.driver_name()
            ))),
        };
        if let Err(e) = &stored {
            tracing::warn!(node = self.name, "storing dirty bitmaps failed: {e}");
        }
        let closed = self.driver.close().await;
        if let Err(e) = &closed {
            tracing::warn!(node = self.name, "closing node failed: {e}");
        }
        stored.and(closed)
    }

    pub(crate) fn mark_dirty(&self, offset: u64, len: u64) {
        let bitmaps = self.bitmaps.lock().unwrap_or_else(|e| e.into_inner());
        for bitmap in bitmaps.iter() {
            bitmap.mark(offset, len);
        }
    }

    /// Lets writes extend the node past its end, if its driver can grow (a host file).
    /// Format drivers that allocate at the end of their file call this on their child.
    pub fn make_growable(&self) -> bool {
        let grows = self.driver.make_growable();
        if grows {
            self.growable
                .store(true, std::sync::atomic::Ordering::Release);
        }
        grows
    }

    /// The length a write must stay within: unlimited for a growable node.
    pub(crate) fn write_limit(&self) -> u64 {
        if self.growable.load(std::sync::atomic::Ordering::Acquire) {
            u64::MAX
        } else {
            self.length()
        }
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub async fn read(&self, offset: u64, buf: IoBuf) -> Result<IoBuf> {
        check_request("read", offset, buf.len() as u64, self.length())?;
        if buf.is_empty() {
            return Ok(buf);
        }
        self.driver.read(offset, buf).await
    }

    /// [`read`](Self::read), bypassing the host page cache where the driver can
    /// (see [`BlockDriver::read_uncached`]).
    pub async fn read_uncached(&self, offset: u64, buf: IoBuf, direct: bool) -> Result<IoBuf> {
        check_request("read", offset, buf.len() as u64, self.length())?;
        if buf.is_empty() {
            return Ok(buf);
        }
        self.driver.read_uncached(offset, buf, direct).await
    }

    /// Writes `buf` at `offset`; all-zero buffers become write-zeroes when the node
    /// has `detect-zeroes` set.
    pub async fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> Result<IoBuf> {
        self.check_writable("write")?;
        check_request("write", offset, buf.len() as u64, self.write_limit())?;
        if buf.is_empty() {
            return Ok(buf);
        }
        if flags.compressed && !self.driver.supports_compression() {
            return Err(Error::unsupported(format!(
                "Compression is not supported for this drive {}",
                self.name
            )));
        }
        if self.policy.detect_zeroes != DetectZeroes::Off && buf.is_zero() && !flags.compressed {
            let zero = ZeroFlags {
                may_unmap: self.policy.detect_zeroes == DetectZeroes::Unmap,
                fua: flags.fua,
                no_fallback: false,
            };
            self.write_zeroes(offset, buf.len() as u64, zero).await?;
            return Ok(buf);
        }
        let len = buf.len() as u64;
        let result = self.driver.write(offset, buf, flags).await;
        self.mark_dirty(offset, len);
        result
    }

    /// Makes the range read as zeros; unmapping only when `discard=unmap`.
    pub async fn write_zeroes(&self, offset: u64, len: u64, mut flags: ZeroFlags) -> Result<()> {
        self.check_writable("write zeroes to")?;
        check_request("write zeroes", offset, len, self.length())?;
        if len == 0 {
            return Ok(());
        }
        flags.may_unmap &= self.policy.discard == DiscardMode::Unmap;
        let result = self.driver.write_zeroes(offset, len, flags).await;
        self.mark_dirty(offset, len);
        result
    }

    /// Discards the range if the node passes discards down (`discard=unmap`).
    pub async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable("discard on")?;
        check_request("discard", offset, len, self.length())?;
        if len == 0 || self.policy.discard == DiscardMode::Ignore {
            return Ok(());
        }
        let result = self.driver.discard(offset, len).await;
        self.mark_dirty(offset, len);
        result
    }

    /// Makes completed writes durable, unless `cache.no-flush` is set.
    pub async fn flush(&self) -> Result<()> {
        if self.policy.no_flush || self.policy.read_only {
            return Ok(());
        }
        self.driver.flush().await
    }

    /// See [`BlockDriver::commits_backups`].
    pub fn commits_backups(&self) -> bool {
        self.driver.commits_backups()
    }

    /// See [`BlockDriver::commit_backup`].
    pub async fn commit_backup(&self) -> Result<()> {
        self.driver.commit_backup().await
    }

    /// Status of the run at `offset`, at most `len` bytes (`len > 0`, in range).
    pub async fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        check_request("block status", offset, len, self.length())?;
        if len == 0 {
            return Err(Error::invalid("block status of an empty range"));
        }
        let extent = self.driver.block_status(offset, len).await?;
        debug_assert!(extent.offset == offset && extent.length > 0 && extent.length <= len);
        Ok(extent)
    }

    /// The backing node reads of unallocated ranges fall through to (qcow2), if any.
    pub fn backing(&self) -> Option<std::sync::Arc<Attachment>> {
        self.driver.backing_file().and_then(|b| b.backing())
    }

    /// The point-in-time view this node keeps (a standalone copy-before-write filter).
    fn snapshot(&self) -> Result<&dyn SnapshotSource> {
        self.driver.snapshot().ok_or_else(|| {
            Error::unsupported(format!(
                "a {} node has no point-in-time snapshot to read \
                 (snapshot-access needs a copy-before-write node)",
                self.driver.driver_name()
            ))
        })
    }

    /// Reads the node's point-in-time snapshot (see [`SnapshotSource::read_snapshot`]).
    pub async fn read_snapshot(&self, offset: u64, buf: IoBuf) -> Result<IoBuf> {
        check_request("read", offset, buf.len() as u64, self.length())?;
        if buf.is_empty() {
            return Ok(buf);
        }
        self.snapshot()?.read_snapshot(offset, buf).await
    }

    /// Status of the node's point-in-time snapshot.
    pub async fn block_status_snapshot(&self, offset: u64, len: u64) -> Result<Extent> {
        check_request("block status", offset, len, self.length())?;
        if len == 0 {
            return Err(Error::invalid("block status of an empty range"));
        }
        let extent = self.snapshot()?.block_status_snapshot(offset, len).await?;
        debug_assert!(extent.offset == offset && extent.length > 0 && extent.length <= len);
        Ok(extent)
    }

    /// Gives up a range of the node's point-in-time snapshot.
    pub async fn discard_snapshot(&self, offset: u64, len: u64) -> Result<()> {
        check_request("discard", offset, len, self.length())?;
        if len == 0 {
            return Ok(());
        }
        self.snapshot()?.discard_snapshot(offset, len).await
    }
}
