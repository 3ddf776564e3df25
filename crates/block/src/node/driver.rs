//! The driver interface every node implements.
//!
//! One async trait, [`BlockDriver`], with honest defaults for what a driver cannot do
//! natively: `write_zeroes` falls back to writing zero buffers, `discard` is a no-op
//! (discard is advisory), `flush` has nothing to do, and `block_status` reports
//! everything as allocated data. Drivers receive requests that the node layer
//! ([`crate::node::Node`]) has already checked against the device length and the
//! node's read-only flag, but a protocol driver still refuses out-of-range requests
//! itself, because it can be opened and used on its own.

use std::fmt;
use std::path::PathBuf;

use async_trait::async_trait;

use crate::buf::IoBuf;
use crate::dirty::PersistentBitmap;
use crate::error::Error;
use crate::error::ErrorKind;
use crate::error::Result;
use crate::node::Attachment;

/// Flags of a write request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteFlags {
    /// Force unit access: the data is on stable storage when the request completes.
    pub fua: bool,
    /// Store the data compressed (qcow2; whole clusters only). Drivers without
    /// compression refuse it (see [`BlockDriver::supports_compression`]).
    pub compressed: bool,
    /// A bulk write nobody reads back soon (a backup's copies into its target): past
    /// the host's page cache where the driver can, so the host's writeback does not
    /// later queue bursts of it in front of other requests on the same disk. Same
    /// result as without; drivers that cannot ignore it.
    pub uncached: bool,
}

/// Flags of a write-zeroes request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ZeroFlags {
    /// The range may be deallocated (punched) as long as it reads back as zeros.
    pub may_unmap: bool,
    /// Force unit access, as for writes.
    pub fua: bool,
    /// Fail with [`ErrorKind::Unsupported`] instead of writing zero buffers when the
    /// driver cannot zero efficiently (NBD's FAST_ZERO).
    pub no_fallback: bool,
}

/// Geometry and transfer limits of a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Requests should start and end on multiples of this (1 = byte granular).
    pub request_alignment: u32,
    /// Allocation unit of the format (qcow2 cluster), if it has one.
    pub cluster_size: Option<u32>,
    /// Largest request the driver accepts in one call.
    pub max_transfer: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            request_alignment: 1,
            cluster_size: None,
            max_transfer: 32 << 20,
        }
    }
}

/// What a range of a node holds (QEMU's BDRV_BLOCK_* flags, NBD's base:allocation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    /// Reads return data stored for this range (not known to be zero).
    pub data: bool,
    /// Reads return zeros.
    pub zero: bool,
    /// This node itself supplies the content; false means a read falls through to a
    /// backing node. Every byte of a file is allocated, holes included.
    pub allocated: bool,
    /// Where the range lives in the bottom-most file, when that is meaningful.
    pub host_offset: Option<u64>,
    /// Stored compressed (qcow2); such data has no host offset of its own.
    pub compressed: bool,
}

/// A run of bytes with one status, as returned by [`BlockDriver::block_status`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// First byte of the run.
    pub offset: u64,
    /// Length of the run in bytes, at least 1.
    pub length: u64,
    /// What the run holds.
    pub status: Status,
}

/// A block driver: a format (raw), a protocol (file) or a filter, behind a node.
///
/// Offsets and lengths are in bytes. Every method may be called concurrently from many
/// tasks; a driver serialises internally what must be serialised.
#[async_trait]
pub trait BlockDriver: Send + Sync + fmt::Debug {
    /// The driver's name as in QMP's `driver` field ("file", "raw", "null-co").
    fn driver_name(&self) -> &'static str;

    /// Size of the device in bytes.
    fn length(&self) -> u64;

    /// Alignment and transfer limits.
    fn limits(&self) -> Limits {
        Limits::default()
    }

    /// The host file this node ultimately reads (through its children), if any.
    fn filename(&self) -> Option<PathBuf> {
        None
    }

    /// The child a filter forwards to, so the graph can splice the filter out again.
    fn filtered_child(&self) -> Option<&Attachment> {
        None
    }

    /// The backing file capability of a format that has one (qcow2).
    fn backing_file(&self) -> Option<&dyn BackingFile> {
        None
    }

    /// The dirty-bitmap store of a format that keeps bitmaps in the image (qcow2).
    fn bitmap_store(&self) -> Option<&dyn BitmapStore> {
        None
    }

    /// The point-in-time view of a standalone copy-before-write filter, which
    /// `snapshot-access` nodes read.
    fn snapshot(&self) -> Option<&dyn SnapshotSource> {
        None
    }

    /// Whether the target takes parts of a cluster and puts each cluster together
    /// itself before storing it whole (the repository node). A backup into it then
    /// saves only the guest's own blocks of a cluster in a copy-before-write (a
    /// fragment), as into a file, though the cluster is the unit it stores.
    fn assembles_clusters(&self) -> bool {
        false
    }

    /// Whether writes with [`WriteFlags::compressed`] are stored compressed.
    fn supports_compression(&self) -> bool {
        false
    }

    /// Lets writes extend the device past its end, as a format driver allocating at
    /// the end of its file needs. Returns false when the driver cannot grow.
    fn make_growable(&self) -> bool {
        false
    }

    /// Reads `buf.len()` bytes at `offset` into `buf` and returns it.
    async fn read(&self, offset: u64, buf: IoBuf) -> Result<IoBuf>;

    /// A bulk read (a backup's background pass) that should neither trigger the host's
    /// readahead nor fill its page cache, so a guest's requests on the same disk do not
    /// queue behind megabytes it never asked for and keep their cached data. Same
    /// result as [`read`](Self::read), which the default calls. With `direct` the
    /// read goes past the page cache altogether where the driver can (`O_DIRECT`):
    /// one request to the device, whatever the cache holds of its range.
    async fn read_uncached(&self, offset: u64, buf: IoBuf, _direct: bool) -> Result<IoBuf> {
        self.read(offset, buf).await
    }

    /// Writes `buf` at `offset` and returns the buffer for reuse.
    async fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> Result<IoBuf>;

    /// Makes `[offset, offset + len)` read as zeros.
    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        write_zeroes_by_writing(self, offset, len, flags).await
    }

    /// Tells the driver the range's content is no longer needed; reads afterwards may
    /// return old data or zeros. Advisory: the default does nothing.
    async fn discard(&self, _offset: u64, _len: u64) -> Result<()> {
        Ok(())
    }

    /// Makes every completed write durable.
    async fn flush(&self) -> Result<()> {
        Ok(())
    }

    /// Status of the run starting at `offset`, at most `len` bytes long (`len > 0`).
    async fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        let status = Status {
            data: true,
            zero: false,
            allocated: true,
            host_offset: None,
            compressed: false,
        };
        Ok(Extent {
            offset,
            length: len,
            status,
        })
    }

    /// Flushes and releases resources; the node is gone afterwards.
    async fn close(&self) -> Result<()> {
        self.flush().await
    }

    /// A target that keeps each backup as a snapshot of its own (the repository
    /// node): what it was given is kept only once [`BlockDriver::commit_backup`]
    /// succeeds, so a backup that ends any other way has copied nothing that lasts.
    fn commits_backups(&self) -> bool {
        false
    }

    /// The backup writing into this node copies only what `changed` marks (`sync:
    /// bitmap`), frozen at the backup's instant: every byte it does not mark is as it
    /// was when the bitmap started recording. A repository node whose parent is that
    /// earlier state stores a chunk the bitmap marks only in part as the changed runs
    /// over the parent's chunk. Called once, before the first write.
    fn backup_copies_only(&self, changed: &bitmap::Bitmap) {
        let _ = changed;
    }

    /// Whether a backup may start writing into this node now (a repository node that
    /// committed its snapshot takes no second backup).
    fn check_backup_target(&self) -> Result<()> {
        Ok(())
    }

    /// The backup writing into this node has copied everything and flushed: a target
    /// that [`commits_backups`](BlockDriver::commits_backups) makes its snapshot durable
    /// and visible now; its failure is the backup's.
    async fn commit_backup(&self) -> Result<()> {
        Ok(())
    }

    /// Driver-specific facts for `query-named-block-nodes` (`image.format-specific`).
    fn format_specific(&self) -> Option<serde_json::Value> {
        None
    }
}

/// A format whose unallocated ranges fall through to a backing node (qcow2).
#[async_trait]
pub trait BackingFile: Send + Sync {
    /// `block-stream`: copies what the backing chain reads at `offset` into this image,
    /// for the cluster there, unless the image has data of its own there (a guest write
    /// that came first wins). Returns how many bytes from `offset` on that settled (at
    /// least one, at most `len`). Where the chain reads zeros nothing is written, unless
    /// `keep_zeros`: a stream that keeps a base below must record those zeros, or the
    /// base would show through once the layers between are gone.
    async fn populate_from_backing(&self, offset: u64, len: u64, keep_zeros: bool) -> Result<u64>;

    /// `block-stream`'s end: drops the backing link, in the image's header too.
    async fn drop_backing(&self) -> Result<()>;

    /// `block-stream`'s end with a base: the header names `name` (of format `format`)
    /// as the backing file and the link goes to `base`.
    async fn relink_backing(&self, base: Attachment, name: &str, format: &str) -> Result<()>;

    /// The backing node, if any.
    fn backing(&self) -> Option<std::sync::Arc<Attachment>>;

    /// Takes `backing` as the backing node of an image opened without one
    /// (`blockdev-snapshot` of an overlay opened with `backing: null`); refused if it
    /// has one already.
    fn set_backing(&self, backing: Attachment) -> Result<()>;
}

/// A format that keeps dirty bitmaps: in the image (qcow2), or beside it (raw).
#[async_trait]
pub trait BitmapStore: Send + Sync {
    /// Whether bitmaps can be stored (`persistent: true`): not in a read-only image.
    fn writable(&self) -> bool;

    /// The bitmaps found in the image when it was opened (taken once, by the node).
    fn take_persistent_bitmaps(&self) -> Vec<PersistentBitmap>;

    /// A persistent bitmap is being added: make sure a crash from now on leaves it
    /// marked inconsistent, not silently missing changes (the raw sidecar creates its
    /// file, marked in use). Its failure fails the add.
    fn prepare_persistent(&self) -> Result<()> {
        Ok(())
    }

    /// Stores exactly these bitmaps in the image (called before [`BlockDriver::close`];
    /// bitmaps stored before and missing here are removed).
    async fn store_persistent_bitmaps(&self, bitmaps: Vec<PersistentBitmap>) -> Result<()>;
}

/// The point-in-time view a standalone copy-before-write filter keeps, which a
/// `snapshot-access` node reads instead of the current data.
#[async_trait]
pub trait SnapshotSource: Send + Sync {
    /// Reads the view.
    async fn read_snapshot(&self, offset: u64, buf: IoBuf) -> Result<IoBuf>;

    /// Status of the view.
    async fn block_status_snapshot(&self, offset: u64, len: u64) -> Result<Extent>;

    /// The reader is done with the range; it stops being protected and readable, and
    /// the space its saved data took is given back.
    async fn discard_snapshot(&self, offset: u64, len: u64) -> Result<()>;
}

/// Largest zero buffer the write-zeroes fallback writes in one request.
const ZERO_CHUNK: u64 = 1 << 20;

/// The portable write-zeroes: write zero-filled buffers, chunk by chunk.
pub async fn write_zeroes_by_writing<D: BlockDriver + ?Sized>(
    driver: &D,
    offset: u64,
    len: u64,
    flags: ZeroFlags,
) -> Result<()> {
    if flags.no_fallback {
        return Err(Error::unsupported(format!(
            "{} cannot write zeroes without writing data",
            driver.driver_name()
        )));
    }
    let mut buf = IoBuf::zeroed(len.min(ZERO_CHUNK) as usize);
    let mut done = 0;
    while done < len {
        let n = (len - done).min(ZERO_CHUNK) as usize;
        buf.set_len(n);
        buf = driver
            .write(
                offset + done,
                buf,
                WriteFlags {
                    fua: flags.fua,
                    ..WriteFlags::default()
                },
            )
            .await?;
        done += n as u64;
    }
    Ok(())
}

/// Checks a request `[offset, offset + len)` against a device of `length` bytes.
pub fn check_request(op: &str, offset: u64, len: u64, length: u64) -> Result<()> {
    match offset.checked_add(len) {
        None => Err(Error::new(
            ErrorKind::OutOfBounds,
            format!("{op} at offset {offset} length {len} overflows a 64-bit offset"),
        )),
        Some(end) if end > length => Err(Error::new(
            ErrorKind::OutOfBounds,
            format!(
                "{op} at offset {offset} length {len} is past the end of the device \
                 ({length} bytes)"
            ),
        )),
        Some(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_past_the_end_or_overflowing_are_refused() {
        assert!(check_request("read", 0, 10, 10).is_ok());
        assert!(check_request("read", 10, 0, 10).is_ok());
        let err = check_request("read", 5, 6, 10).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::OutOfBounds);
        assert!(err.to_string().contains("past the end"), "{err}");
        let err = check_request("write", u64::MAX, 2, u64::MAX).unwrap_err();
        assert!(err.to_string().contains("overflows"), "{err}");
    }
}
