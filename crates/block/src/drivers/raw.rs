//! `raw`: a format driver that passes its child's bytes through unchanged, optionally a
//! window `[offset, offset + size)` of them (QEMU's raw `offset`/`size` options, used to
//! expose one partition of a disk image).
//!
//! Requests are shifted by `offset` and forwarded through the child attachment;
//! block status reports the child's status with host offsets shifted the same way.
//!
//! A raw image whose format was *probed* (the user named no format) belongs to its
//! guest down to sector 0, and a guest that writes a qcow2 header there would make the
//! next probe open the disk as qcow2 and follow whatever backing file the guest named,
//! a host file included. So, QEMU's rule: on a probed raw node, a write to the first
//! 512 bytes that would make them probe as qcow2 fails with EPERM.

use std::path::PathBuf;

use async_trait::async_trait;

use crate::buf::IoBuf;
use crate::drivers::sidecar_bitmaps::SidecarBitmaps;
use crate::error::Error;
use crate::error::Result;
use crate::node::Attachment;
use crate::node::driver::BitmapStore;
use crate::node::driver::BlockDriver;
use crate::node::driver::Extent;
use crate::node::driver::Limits;
use crate::node::driver::WriteFlags;
use crate::node::driver::ZeroFlags;

/// A raw node over a child.
#[derive(Debug)]
pub struct RawDriver {
    child: Attachment,
    offset: u64,
    size: u64,
    /// The format was probed: guard the first sector (see the module note).
    probed: bool,
    /// Held from the check to the end of a write that touches the magic, so two
    /// writes of half a magic each cannot both pass.
    first_bytes: tokio::sync::Mutex<()>,
    /// Persistent dirty bitmaps, in a file beside the image (raw over a whole file).
    bitmaps: Option<SidecarBitmaps>,
}

/// What a format probe would say of a first sector: qcow2 by its magic (the only
/// other format we open).
fn probes_as_other_format(first_bytes: &[u8]) -> bool {
    first_bytes.len() >= 4 && first_bytes[..4] == *b"QFI\xfb"
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
            probed: false,
            first_bytes: tokio::sync::Mutex::new(()),
            bitmaps: None,
        })
    }

    /// Marks the node as opened with a probed format (see the module note).
    pub fn probed(mut self, probed: bool) -> Self {
        self.probed = probed;
        self
    }

    /// Keeps persistent dirty bitmaps in `store` (see [`crate::drivers::sidecar_bitmaps`]).
    pub fn with_bitmaps(mut self, store: SidecarBitmaps) -> Self {
        self.bitmaps = Some(store);
        self
    }

    /// Whether this node is the whole of its child (not a window): only then are its
    /// bitmaps the file's.
    pub fn is_whole_child(&self) -> bool {
        self.offset == 0 && self.size == self.child.length()
    }

    /// Refuses a write of `buf` at `offset` that would make the first sector of a
    /// probed image look like a qcow2 header.
    async fn check_first_sector(&self, offset: u64, buf: &[u8]) -> Result<()> {
        if !self.probed || offset >= 4 || buf.is_empty() {
            return Ok(());
        }
        // The four magic bytes as they would be after this write.
        let mut magic = [0u8; 4];
        let kept = self.size.min(4) as usize;
        if offset > 0 || buf.len() < 4 {
            let current = self.child.read(self.offset, IoBuf::zeroed(kept)).await?;
            magic[..kept].copy_from_slice(&current);
        }
        let from = offset as usize;
        let n = buf.len().min(4 - from);
        magic[from..from + n].copy_from_slice(&buf[..n]);
        if probes_as_other_format(&magic) {
            return Err(Error::new(
                crate::error::ErrorKind::PermissionDenied,
                "writing a qcow2 header to the first sector of an image probed as raw is \
                 refused (give the format explicitly to allow it)",
            ));
        }
        Ok(())
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

    fn bitmap_store(&self) -> Option<&dyn BitmapStore> {
        self.bitmaps.as_ref().map(|b| b as &dyn BitmapStore)
    }

    async fn read(&self, offset: u64, buf: IoBuf) -> Result<IoBuf> {
        self.child.read(self.offset + offset, buf).await
    }

    async fn read_uncached(&self, offset: u64, buf: IoBuf, direct: bool) -> Result<IoBuf> {
        self.child
            .read_uncached(self.offset + offset, buf, direct)
            .await
    }

    async fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> Result<IoBuf> {
        if self.probed && offset < 4 {
            let _one_at_a_time = self.first_bytes.lock().await;
            self.check_first_sector(offset, &buf).await?;
            return self.child.write(self.offset + offset, buf, flags).await;
        }
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
