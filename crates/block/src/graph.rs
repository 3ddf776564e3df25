//! The node graph: named nodes, their users, and attachments that follow filters.
//!
//! ```text
//!   export 'exp0' ---Attachment---+            (before a backup)
//!                                 v
//!                           [disk0: raw] --child 'file'--> [#block000: file]
//!
//!   export 'exp0' ---Attachment---+            (after insert_filter above disk0)
//!                                 v
//!                           [cbw0: filter] --fixed child--> [disk0: raw] --> ...
//! ```
//!
//! * A [`Node`] is a driver instance with a unique name. Nodes are created from
//!   [`BlockdevOptions`]; inline children get generated names (`#block000`...) and are
//!   deleted with their parent; children named by reference stay.
//! * An [`Attachment`] is how anything uses a node: parents' child links, exports,
//!   jobs. It points at a *slot* that the graph can retarget. When a filter is
//!   inserted above node N, every attachment to N that follows filters is retargeted
//!   to the filter, atomically with respect to its in-flight requests: each slot has a
//!   gate (a fair async read/write lock); requests hold it shared, retargeting takes it
//!   exclusively, which waits for requests in flight and holds new ones back (QEMU's
//!   "drain, change, resume"). The filter's own link to N is *fixed* and does not
//!   follow, or the filter would point at itself. Attachments made while a filter is in
//!   place resolve to the top of the filter chain, so no writer can bypass a filter.
//! * A node is *in use* while a live attachment targets it; in-use nodes cannot be
//!   deleted, and the error names the user as QEMU does ("Block device file0 is in
//!   use", "Node 'disk0' is busy: block device is in use by block job: backup").
//! * An external snapshot (`external_snapshot`) puts an overlay above a node: every
//!   attachment that follows filters moves to the overlay, the overlay takes the node
//!   as its `backing` child, and the node turns read-only; an overlay's backing node is
//!   busy ("Node 'X' is busy: node is used as backing hd of 'Y'"), as in QEMU.
//! * Structural changes (add, remove, insert or remove a filter) are serialised by one
//!   async lock; the state itself sits behind a short synchronous mutex that is never
//!   held across an await.
//!
//! The [`Node`] methods are the generic block layer between attachments and drivers:
//! request range checks, the read-only flag, `discard=ignore`, `detect-zeroes` and
//! `cache.no-flush` are applied there once, for every driver.

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::collections::HashSet;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::RwLock;
use std::sync::Weak;

use crate::buf::IoBuf;
use crate::dirty::DirtyBitmap;
use crate::driver::BlockDriver;
use crate::driver::Extent;
use crate::driver::Limits;
use crate::driver::WriteFlags;
use crate::driver::ZeroFlags;
use crate::driver::check_request;
use crate::drivers::fault::FaultDriver;
use crate::drivers::file::FileDriver;
use crate::drivers::null::NullDriver;
use crate::drivers::qcow2;
use crate::drivers::qcow2::Qcow2Driver;
use crate::drivers::raw::RawDriver;
use crate::drivers::snapshot_access::SnapshotAccessDriver;
use crate::error::Error;
use crate::error::ErrorKind;
use crate::error::Result;
use crate::options::BackingRef;
use crate::options::BlockdevOptions;
use crate::options::BlockdevRef;
use crate::options::CbwOptions;
use crate::options::DetectZeroes;
use crate::options::DiscardMode;
use crate::options::DriverOptions;

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
    name: String,
    /// Created inline as a child; deleted with its parent, not by the monitor.
    implicit: bool,
    /// Names of the implicit children this node created.
    implicit_children: Vec<String>,
    policy: NodePolicy,
    /// Writes may extend the node past its end (the file under a qcow2 node).
    growable: std::sync::atomic::AtomicBool,
    /// Dirty bitmaps every write to this node marks.
    bitmaps: Mutex<Vec<Arc<DirtyBitmap>>>,
    /// For a filter a job inserted: the job, which alone may remove it.
    filter_owner: Option<AttachUser>,
    /// Made read-only after it was opened: an overlay took its place (external
    /// snapshot), and it is only a backing node now.
    demoted: std::sync::atomic::AtomicBool,
    driver: Box<dyn BlockDriver>,
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

    fn is_demoted(&self) -> bool {
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

    fn check_writable(&self, op: &str) -> Result<()> {
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
        if persistent && !self.driver.supports_persistent_bitmaps() {
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
    async fn close(&self) -> Result<()> {
        let stored: Vec<_> = self
            .bitmaps()
            .iter()
            .filter_map(|b| b.to_stored())
            .collect();
        let stored = self.driver.store_persistent_bitmaps(stored).await;
        if let Err(e) = &stored {
            tracing::warn!(node = self.name, "storing dirty bitmaps failed: {e}");
        }
        let closed = self.driver.close().await;
        if let Err(e) = &closed {
            tracing::warn!(node = self.name, "closing node failed: {e}");
        }
        stored.and(closed)
    }

    fn mark_dirty(&self, offset: u64, len: u64) {
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
    fn write_limit(&self) -> u64 {
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

    /// Reads the node's point-in-time snapshot (see [`BlockDriver::read_snapshot`]).
    pub async fn read_snapshot(&self, offset: u64, buf: IoBuf) -> Result<IoBuf> {
        check_request("read", offset, buf.len() as u64, self.length())?;
        if buf.is_empty() {
            return Ok(buf);
        }
        self.driver.read_snapshot(offset, buf).await
    }

    /// Status of the node's point-in-time snapshot.
    pub async fn block_status_snapshot(&self, offset: u64, len: u64) -> Result<Extent> {
        check_request("block status", offset, len, self.length())?;
        if len == 0 {
            return Err(Error::invalid("block status of an empty range"));
        }
        let extent = self.driver.block_status_snapshot(offset, len).await?;
        debug_assert!(extent.offset == offset && extent.length > 0 && extent.length <= len);
        Ok(extent)
    }

    /// Gives up a range of the node's point-in-time snapshot.
    pub async fn discard_snapshot(&self, offset: u64, len: u64) -> Result<()> {
        check_request("discard", offset, len, self.length())?;
        if len == 0 {
            return Ok(());
        }
        self.driver.discard_snapshot(offset, len).await
    }
}

/// Who holds an attachment; decides the "in use" message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttachUser {
    /// A parent node's child link.
    Parent {
        /// The parent's node-name.
        parent: String,
        /// The child role ("file", "backing").
        role: &'static str,
    },
    /// A filter's link to the node it filters; never retargeted.
    FilterChild {
        /// The filter's node-name.
        filter: String,
    },
    /// A block job using the node as its source or target.
    Job {
        /// The job type ("backup").
        job_type: String,
    },
    /// Anything else, an export...: a description of the user, for logs and tests.
    Other(String),
}

impl AttachUser {
    /// Why `blockdev-del` refuses a node this user holds, in QEMU's words: an overlay
    /// blocks its backing node ("Node 'X' is busy: node is used as backing hd of 'Y'"),
    /// other parents make "Block device X is in use", jobs "Node 'X' is busy: ...", and
    /// users like exports (QEMU's block backends) "Node X is in use".
    fn busy_error(&self, node: &str) -> Error {
        let message = match self {
            AttachUser::Parent {
                parent,
                role: "backing",
            } => format!("Node '{node}' is busy: node is used as backing hd of '{parent}'"),
            AttachUser::Parent { .. } | AttachUser::FilterChild { .. } => {
                format!("Block device {node} is in use")
            }
            AttachUser::Job { job_type } => {
                format!("Node '{node}' is busy: block device is in use by block job: {job_type}")
            }
            AttachUser::Other(_) => format!("Node {node} is in use"),
        };
        Error::new(ErrorKind::Busy, message)
    }
}

struct Slot {
    user: AttachUser,
    follows_filters: bool,
    target: RwLock<Arc<Node>>,
    /// Held shared by every request through the slot, exclusively while retargeting.
    gate: Arc<tokio::sync::RwLock<()>>,
}

/// A slot whose requests are held back (a filter is going in above its node).
type HeldSlot = (Arc<Slot>, tokio::sync::OwnedRwLockWriteGuard<()>);

/// A user's handle on a node: all I/O of exports, jobs and parents goes through one,
/// so the graph can insert a filter under their feet without them noticing.
pub struct Attachment {
    slot: Arc<Slot>,
}

impl fmt::Debug for Attachment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Attachment")
            .field("node", &self.node().name)
            .field("user", &self.slot.user)
            .finish()
    }
}

/// A look at where an attachment points, without holding it: what
/// `query-block-exports` reports after a snapshot or a filter moved the export.
#[derive(Clone)]
pub struct AttachmentView {
    slot: Weak<Slot>,
}

impl AttachmentView {
    /// The node the attachment's requests go to now, if it still exists.
    pub fn node(&self) -> Option<Arc<Node>> {
        let slot = self.slot.upgrade()?;
        let node = slot
            .target
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        Some(node)
    }
}

impl Attachment {
    /// A handle that follows this attachment's target and does not keep it alive.
    pub fn view(&self) -> AttachmentView {
        AttachmentView {
            slot: Arc::downgrade(&self.slot),
        }
    }

    /// The node requests currently go to.
    pub fn node(&self) -> Arc<Node> {
        self.slot
            .target
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Who holds this attachment.
    pub fn user(&self) -> &AttachUser {
        &self.slot.user
    }

    /// Size of the attached node in bytes.
    pub fn length(&self) -> u64 {
        self.node().length()
    }

    /// Limits of the attached node.
    pub fn limits(&self) -> Limits {
        self.node().limits()
    }

    /// See [`Node::read`].
    pub async fn read(&self, offset: u64, buf: IoBuf) -> Result<IoBuf> {
        let _in_flight = self.slot.gate.read().await;
        self.node().read(offset, buf).await
    }

    /// See [`Node::write`].
    pub async fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> Result<IoBuf> {
        let _in_flight = self.slot.gate.read().await;
        self.node().write(offset, buf, flags).await
    }

    /// See [`Node::write_zeroes`].
    pub async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        let _in_flight = self.slot.gate.read().await;
        self.node().write_zeroes(offset, len, flags).await
    }

    /// See [`Node::discard`].
    pub async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let _in_flight = self.slot.gate.read().await;
        self.node().discard(offset, len).await
    }

    /// See [`Node::flush`].
    pub async fn flush(&self) -> Result<()> {
        let _in_flight = self.slot.gate.read().await;
        self.node().flush().await
    }

    /// See [`Node::block_status`].
    pub async fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        let _in_flight = self.slot.gate.read().await;
        self.node().block_status(offset, len).await
    }

    /// See [`Node::read_snapshot`].
    pub async fn read_snapshot(&self, offset: u64, buf: IoBuf) -> Result<IoBuf> {
        let _in_flight = self.slot.gate.read().await;
        self.node().read_snapshot(offset, buf).await
    }

    /// See [`Node::block_status_snapshot`].
    pub async fn block_status_snapshot(&self, offset: u64, len: u64) -> Result<Extent> {
        let _in_flight = self.slot.gate.read().await;
        self.node().block_status_snapshot(offset, len).await
    }

    /// See [`Node::discard_snapshot`].
    pub async fn discard_snapshot(&self, offset: u64, len: u64) -> Result<()> {
        let _in_flight = self.slot.gate.read().await;
        self.node().discard_snapshot(offset, len).await
    }
}

/// How a parent names an existing child node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChildLink {
    /// The top of the filters above it (an ordinary child).
    FollowsFilters,
    /// That very node (snapshot-access reading one copy-before-write node).
    Fixed,
}

/// Options a child inherits from its parent when it does not set them.
#[derive(Debug, Clone, Copy, Default)]
struct Inherited {
    read_only: Option<bool>,
    auto_read_only: Option<bool>,
    direct: Option<bool>,
    no_flush: Option<bool>,
    discard: Option<DiscardMode>,
    /// Opened as a child of another node in the same `blockdev-add`.
    nested: bool,
}

#[derive(Default)]
struct GraphState {
    nodes: BTreeMap<String, Arc<Node>>,
    slots: Vec<Weak<Slot>>,
    /// node-name -> name of the filter directly above it.
    filter_above: HashMap<String, String>,
    /// Nodes a filter is going in above right now, with the attachments made to them
    /// meanwhile: those are created held, and move to the filter with the others.
    filtering: HashMap<String, Vec<HeldSlot>>,
    next_implicit: u64,
}

impl GraphState {
    fn live_slots(&mut self) -> Vec<Arc<Slot>> {
        self.slots.retain(|s| s.strong_count() > 0);
        self.slots.iter().filter_map(Weak::upgrade).collect()
    }

    fn first_user(&mut self, node: &Arc<Node>) -> Option<AttachUser> {
        self.live_slots()
            .into_iter()
            .find(|s| Arc::ptr_eq(&s.target.read().unwrap_or_else(|e| e.into_inner()), node))
            .map(|s| s.user.clone())
    }

    /// The node at the top of the filter chain above `name`.
    fn top_of(&self, name: &str) -> Option<Arc<Node>> {
        let mut current = name;
        while let Some(above) = self.filter_above.get(current) {
            current = above;
        }
        self.nodes.get(current).cloned()
    }

    /// Takes filter `name` out of the filter chain above `below`.
    fn splice_out(&mut self, name: &str, below: &Node) {
        match self.filter_above.remove(name) {
            Some(upper) => self.filter_above.insert(below.name.clone(), upper),
            None => self.filter_above.remove(&below.name),
        };
    }

    fn implicit_name(&mut self) -> String {
        loop {
            let name = format!("#block{:03}", self.next_implicit);
            self.next_implicit += 1;
            if !self.nodes.contains_key(&name) {
                return name;
            }
        }
    }

    fn attach(&mut self, target: Arc<Node>, user: AttachUser, follows_filters: bool) -> Attachment {
        let held = follows_filters
            .then(|| self.filtering.get_mut(&target.name))
            .flatten();
        let slot = Arc::new(Slot {
            user,
            follows_filters,
            target: RwLock::new(target),
            gate: Arc::new(tokio::sync::RwLock::new(())),
        });
        if let Some(held) = held {
            let guard = slot
                .gate
                .clone()
                .try_write_owned()
                .expect("a new gate is free");
            held.push((slot.clone(), guard));
        }
        self.slots.retain(|s| s.strong_count() > 0);
        self.slots.push(Arc::downgrade(&slot));
        Attachment { slot }
    }
}

/// Checks QEMU's node-name rules: a letter first, then letters, digits, `-`, `.`,
/// `_`; at most 31 characters.
pub fn validate_node_name(name: &str) -> Result<()> {
    let mut chars = name.chars();
    let valid = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
        && name.len() <= 31;
    if valid {
        Ok(())
    } else {
        Err(Error::invalid(format!("Invalid node-name: '{name}'")))
    }
}

fn not_found(name: &str) -> Error {
    Error::new(
        ErrorKind::NotFound,
        format!("Cannot find device='{name}' nor node-name='{name}'"),
    )
}

type OpenFuture<'a> = Pin<Box<dyn Future<Output = Result<Arc<Node>>> + Send + 'a>>;

/// Opens drivers that live in crates above this one (the NBD client), so the graph
/// can create them from `blockdev-add` options without depending on those crates.
#[async_trait::async_trait]
pub trait ExternalDrivers: Send + Sync {
    /// Opens `options` (a driver this crate does not implement).
    async fn open(&self, options: &DriverOptions) -> Result<Box<dyn BlockDriver>>;

    /// Builds a standalone copy-before-write filter over `file` saving old data to
    /// `target`, protecting every cluster or only those `initial` marks. Called while
    /// every request to the filtered node is drained: that instant is the snapshot's.
    fn copy_before_write(
        &self,
        _options: &CbwOptions,
        _file: Attachment,
        _target: Attachment,
        _initial: Option<bitmap::Bitmap>,
    ) -> Result<Box<dyn BlockDriver>> {
        Err(Error::unsupported(
            "the copy-before-write driver is not available here",
        ))
    }
}

/// Work done at a filter insertion's instant (see [`NodeGraph::insert_filters_at`]).
pub type AtInstant = Box<dyn FnOnce() -> Result<()> + Send>;

/// Builds a filter driver from its fixed link to the filtered node.
pub type FilterBuild = Box<dyn FnOnce(Attachment) -> Result<Box<dyn BlockDriver>> + Send>;

/// A filter to insert: where, its name, and how to build its driver from its link to
/// the filtered node.
pub struct FilterSpec {
    /// The node to filter (the top of any filters already above it is used).
    pub above: String,
    /// The filter's node-name (generated when absent).
    pub name: Option<String>,
    /// Builds the filter driver from its fixed child attachment. It runs while every
    /// request to the filtered node is drained, so what it captures (a bitmap's bits)
    /// belongs to the same instant as the switch.
    pub build: FilterBuild,
    /// The job that owns the filter (it alone removes it); `None` for a filter the
    /// monitor added, which `blockdev-del` removes.
    pub owner: Option<AttachUser>,
    /// Inline children created for the filter, deleted with it.
    pub implicit_children: Vec<String>,
    /// The filter's `discard` mode, when it is not the filtered node's.
    pub discard: Option<DiscardMode>,
}

/// The set of nodes of one daemon (or one CLI invocation).
#[derive(Default)]
pub struct NodeGraph {
    state: Mutex<GraphState>,
    reconfigure: tokio::sync::Mutex<()>,
    external: Option<Arc<dyn ExternalDrivers>>,
}

impl fmt::Debug for NodeGraph {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeGraph")
            .field("nodes", &self.node_names())
            .finish()
    }
}

impl NodeGraph {
    /// An empty graph.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty graph that opens `external` drivers (such as `nbd`) through `drivers`.
    pub fn with_external(drivers: Arc<dyn ExternalDrivers>) -> Self {
        Self {
            external: Some(drivers),
            ..Self::default()
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, GraphState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `blockdev-add`: creates a node (and its inline children). The top node must be
    /// named; on failure nothing is left behind.
    pub async fn add(&self, options: BlockdevOptions) -> Result<Arc<Node>> {
        if options.node_name.is_none() {
            return Err(Error::invalid(
                "'node-name' must be specified for the root node",
            ));
        }
        self.open(options).await
    }

    /// Creates a node, generating a name for it when it has none (CLI use).
    pub async fn open(&self, options: BlockdevOptions) -> Result<Arc<Node>> {
        let _reconfigure = self.reconfigure.lock().await;
        let mut created = Vec::new();
        let result = self
            .open_node(options, Inherited::default(), &mut created)
            .await;
        if result.is_err() {
            // Roll back in reverse creation order: parents before their children.
            let mut state = self.state();
            for name in created.iter().rev() {
                state.nodes.remove(name);
            }
        }
        result
    }

    fn open_node<'a>(
        &'a self,
        options: BlockdevOptions,
        inherited: Inherited,
        created: &'a mut Vec<String>,
    ) -> OpenFuture<'a> {
        Box::pin(async move {
            let (name, implicit) = match &options.node_name {
                Some(name) => {
                    validate_node_name(name)?;
                    if self.state().nodes.contains_key(name) {
                        return Err(duplicate(name));
                    }
                    (name.clone(), false)
                }
                None => (self.state().implicit_name(), true),
            };
            let mut policy = NodePolicy {
                read_only: options.read_only.or(inherited.read_only).unwrap_or(false),
                direct: options.cache.direct.or(inherited.direct).unwrap_or(false),
                no_flush: options
                    .cache
                    .no_flush
                    .or(inherited.no_flush)
                    .unwrap_or(false),
                discard: options.discard.or(inherited.discard).unwrap_or_default(),
                detect_zeroes: options.detect_zeroes,
            };
            let auto_read_only = options
                .auto_read_only
                .or(inherited.auto_read_only)
                .unwrap_or(false);
            let inherit = Inherited {
                read_only: Some(policy.read_only),
                auto_read_only: Some(auto_read_only),
                direct: Some(policy.direct),
                no_flush: Some(policy.no_flush),
                discard: Some(policy.discard),
                nested: true,
            };
            let mut implicit_children = Vec::new();
            let driver: Box<dyn BlockDriver> = match options.driver {
                DriverOptions::CopyBeforeWrite(cbw) => {
                    if implicit || inherited.nested {
                        return Err(Error::unsupported(
                            "a copy-before-write node must be added on its own, with a \
                             node-name, not as an inline child",
                        ));
                    }
                    return self
                        .open_cbw(name, cbw, options.discard, inherit, created)
                        .await;
                }
                DriverOptions::SnapshotAccess(access) => {
                    let user = AttachUser::Parent {
                        parent: name.clone(),
                        role: "file",
                    };
                    // A fixed link to that very node: a filter inserted above it later
                    // must not come between the reader and the snapshot.
                    let node = self
                        .resolve_child(
                            access.file,
                            ChildLink::Fixed,
                            inherit,
                            created,
                            &mut implicit_children,
                        )
                        .await?;
                    let child = self.state().attach(node, user, false);
                    if child.node().driver_name() != "copy-before-write" {
                        return Err(Error::invalid(format!(
                            "Node '{}' is not a copy-before-write node: snapshot-access \
                             reads the snapshot one keeps",
                            child.node().name()
                        )));
                    }
                    Box::new(SnapshotAccessDriver::new(child))
                }
                DriverOptions::File(file) => {
                    let (read_only, direct) = (policy.read_only, policy.direct);
                    let driver = tokio::task::spawn_blocking(move || {
                        FileDriver::open(&file.filename, read_only, direct, auto_read_only)
                    })
                    .await
                    .map_err(|e| Error::new(ErrorKind::Io, format!("open task failed: {e}")))??;
                    policy.read_only = driver.is_read_only();
                    Box::new(driver)
                }
                DriverOptions::Null(null) => Box::new(NullDriver::new(&null)),
                DriverOptions::Raw(raw) => {
                    let child = self
                        .open_child(
                            raw.file,
                            &name,
                            "file",
                            inherit,
                            created,
                            &mut implicit_children,
                        )
                        .await?;
                    check_child_writable(&child, &mut policy, auto_read_only)?;
                    Box::new(RawDriver::new(child, raw.offset, raw.size)?.probed(raw.probed))
                }
                DriverOptions::Qcow2(q) => {
                    let child = self
                        .open_child(
                            q.file,
                            &name,
                            "file",
                            inherit,
                            created,
                            &mut implicit_children,
                        )
                        .await?;
                    check_child_writable(&child, &mut policy, auto_read_only)?;
                    let header = Qcow2Driver::read_header(&child).await?;
                    let backing_options = match q.backing {
                        BackingRef::None => None,
                        BackingRef::Node(reference) => Some(reference),
                        BackingRef::FromHeader => match &header.backing_file {
                            None => None,
                            Some(stored) => {
                                let image = child.node().filename();
                                let options =
                                    qcow2::backing_options(image.as_deref(), stored, &header)?;
                                Some(BlockdevRef::Inline(Box::new(options)))
                            }
                        },
                    };
                    let backing = match backing_options {
                        None => None,
                        Some(reference) => {
                            let backing_inherit = Inherited {
                                read_only: Some(true),
                                ..inherit
                            };
                            Some(
                                self.open_child(
                                    reference,
                                    &name,
                                    "backing",
                                    backing_inherit,
                                    created,
                                    &mut implicit_children,
                                )
                                .await?,
                            )
                        }
                    };
                    Box::new(
                        Qcow2Driver::open(
                            child,
                            header,
                            backing,
                            policy.read_only,
                            q.l2_cache_size,
                        )
                        .await?,
                    )
                }
                DriverOptions::Nbd(_) => match &self.external {
                    Some(external) => external.open(&options.driver).await?,
                    None => {
                        return Err(Error::unsupported(
                            "the nbd driver is not available in this graph",
                        ));
                    }
                },
                DriverOptions::Fault(fault) => {
                    let child = self
                        .open_child(
                            fault.image,
                            &name,
                            "image",
                            inherit,
                            created,
                            &mut implicit_children,
                        )
                        .await?;
                    check_child_writable(&child, &mut policy, auto_read_only)?;
                    Box::new(FaultDriver::new(child, fault.rules))
                }
            };
            let stored: Vec<Arc<DirtyBitmap>> = driver
                .take_persistent_bitmaps()
                .into_iter()
                .map(DirtyBitmap::from_stored)
                .collect();
            let node = Arc::new(Node {
                name: name.clone(),
                implicit,
                implicit_children,
                policy,
                growable: Default::default(),
                bitmaps: Mutex::new(stored),
                filter_owner: None,
                demoted: Default::default(),
                driver,
            });
            let mut state = self.state();
            if state.nodes.contains_key(&name) {
                return Err(duplicate(&name));
            }
            state.nodes.insert(name.clone(), node.clone());
            created.push(name);
            Ok(node)
        })
    }

    /// `blockdev-add` of a `copy-before-write` node: opens its target (and its file when
    /// given inline), then inserts it above the file like a job's filter, so every
    /// writer of the file goes through it from that instant on; the snapshot is the
    /// file as it was then.
    async fn open_cbw(
        &self,
        name: String,
        options: CbwOptions,
        discard: Option<DiscardMode>,
        inherit: Inherited,
        created: &mut Vec<String>,
    ) -> Result<Arc<Node>> {
        let external = self.external.clone().ok_or_else(|| {
            Error::unsupported("the copy-before-write driver is not available here")
        })?;
        let mut implicit_children = Vec::new();
        let below = self
            .resolve_child(
                options.file.clone(),
                ChildLink::FollowsFilters,
                inherit,
                created,
                &mut implicit_children,
            )
            .await?
            .name
            .clone();
        let target = self
            .open_child(
                options.target.clone(),
                &name,
                "target",
                inherit,
                created,
                &mut implicit_children,
            )
            .await?;
        if target.node().policy.read_only {
            return Err(Error::new(
                ErrorKind::PermissionDenied,
                "Block node is read-only",
            ));
        }
        let bitmap = match &options.bitmap {
            Some(bitmap) => {
                let node = self.node(&bitmap.node).ok_or_else(|| {
                    Error::new(
                        ErrorKind::NotFound,
                        format!("Node '{}' not found", bitmap.node),
                    )
                })?;
                Some(node.bitmap(&bitmap.name)?)
            }
            None => None,
        };
        let spec = FilterSpec {
            above: below,
            name: Some(name),
            build: Box::new(move |file| {
                let initial = match &bitmap {
                    Some(bitmap) => {
                        if bitmap.info().inconsistent {
                            return Err(Error::invalid(format!(
                                "Bitmap '{}' is inconsistent and cannot be used",
                                bitmap.name()
                            )));
                        }
                        Some(bitmap.snapshot())
                    }
                    None => None,
                };
                external.copy_before_write(&options, file, target, initial)
            }),
            owner: None,
            implicit_children,
            discard,
        };
        // Not recorded in `created`: the node is complete, and a copy-before-write
        // node is never an inline child, so nothing can fail after this.
        Ok(self
            .insert_filters_locked(vec![spec], None)
            .await?
            .remove(0))
    }

    /// Opens or finds a child and attaches the parent to it.
    async fn open_child(
        &self,
        reference: BlockdevRef,
        parent: &str,
        role: &'static str,
        inherit: Inherited,
        created: &mut Vec<String>,
        implicit_children: &mut Vec<String>,
    ) -> Result<Attachment> {
        let user = AttachUser::Parent {
            parent: parent.to_string(),
            role,
        };
        let child = self
            .resolve_child(
                reference,
                ChildLink::FollowsFilters,
                inherit,
                created,
                implicit_children,
            )
            .await?;
        Ok(self.state().attach(child, user, true))
    }

    /// The node a child reference means: an existing node by name (the top of the
    /// filters above it, unless the link is fixed), or a new one opened inline and
    /// recorded as the parent's implicit child.
    async fn resolve_child(
        &self,
        reference: BlockdevRef,
        link: ChildLink,
        inherit: Inherited,
        created: &mut Vec<String>,
        implicit_children: &mut Vec<String>,
    ) -> Result<Arc<Node>> {
        match reference {
            BlockdevRef::Node(child_name) => {
                let state = self.state();
                let node = match link {
                    ChildLink::FollowsFilters => state.top_of(&child_name),
                    ChildLink::Fixed => state.nodes.get(&child_name).cloned(),
                };
                node.ok_or_else(|| not_found(&child_name))
            }
            BlockdevRef::Inline(child_options) => {
                let child = self.open_node(*child_options, inherit, created).await?;
                if child.implicit {
                    implicit_children.push(child.name.clone());
                }
                Ok(child)
            }
        }
    }

    /// Attaches a user to the node `name` (or to the top of the filters above it).
    pub fn attach(&self, name: &str, user: AttachUser) -> Result<Attachment> {
        let mut state = self.state();
        let target = state.top_of(name).ok_or_else(|| not_found(name))?;
        Ok(state.attach(target, user, true))
    }

    /// The node named `name`, if any.
    pub fn node(&self, name: &str) -> Option<Arc<Node>> {
        self.state().nodes.get(name).cloned()
    }

    /// Every node, ordered by name.
    pub fn nodes(&self) -> Vec<Arc<Node>> {
        self.state().nodes.values().cloned().collect()
    }

    /// Every node-name, sorted.
    pub fn node_names(&self) -> Vec<String> {
        self.state().nodes.keys().cloned().collect()
    }

    /// The first user of a node, if it is in use.
    pub fn user_of(&self, name: &str) -> Option<AttachUser> {
        let mut state = self.state();
        let node = state.nodes.get(name)?.clone();
        state.first_user(&node)
    }

    /// Every user of a node, including the users of the filters above it (a job on
    /// the node under a backup filter shows up here).
    pub fn users_of(&self, name: &str) -> Vec<AttachUser> {
        let mut state = self.state();
        let mut chain = Vec::new();
        let mut current = name.to_string();
        while let Some(node) = state.nodes.get(&current).cloned() {
            chain.push(node);
            match state.filter_above.get(&current) {
                Some(above) => current = above.clone(),
                None => break,
            }
        }
        state
            .live_slots()
            .into_iter()
            .filter(|s| {
                let target = s.target.read().unwrap_or_else(|e| e.into_inner());
                chain.iter().any(|n| Arc::ptr_eq(n, &target))
            })
            .map(|s| s.user.clone())
            .collect()
    }

    /// Closes every node for shutdown, parents before their children, so a format
    /// driver writes its metadata (and clears its dirty bit) while its file is still
    /// open. Nodes stay in the graph; drivers that track it refuse I/O afterwards.
    /// Returns the first error after trying every node.
    pub async fn close_all(&self) -> Result<()> {
        let _reconfigure = self.reconfigure.lock().await;
        let mut remaining = self.nodes();
        let mut first_error = None;
        while !remaining.is_empty() {
            let names: HashSet<String> = remaining.iter().map(|n| n.name.clone()).collect();
            let parents_open = |node: &Arc<Node>| {
                self.users_of(&node.name).iter().any(|user| match user {
                    AttachUser::Parent { parent, .. } => names.contains(parent),
                    AttachUser::FilterChild { filter } => names.contains(filter),
                    _ => false,
                })
            };
            let (mut ready, rest): (Vec<_>, Vec<_>) =
                remaining.into_iter().partition(|n| !parents_open(n));
            if ready.is_empty() {
                // Cannot happen in a tree; close the rest in any order rather than hang.
                ready = rest;
                remaining = Vec::new();
            } else {
                remaining = rest;
            }
            for node in ready {
                if let Err(e) = node.close().await {
                    first_error.get_or_insert(e);
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// `blockdev-del`: removes an unused, monitor-owned node, then the inline children
    /// it created. Nodes are flushed as they are closed.
    ///
    /// A filter the monitor added (`copy-before-write`) is spliced out: attachments
    /// that follow filters go back to the node below it, drained like an insertion.
    /// Only users pinned to the filter itself (a `snapshot-access` node, a filter above
    /// it) keep it in use. A job's filter belongs to the job.
    pub async fn remove(&self, name: &str) -> Result<()> {
        self.remove_node(name, false).await
    }

    /// Removes a node a command created under a generated name (`drive-backup`'s
    /// target), which `blockdev-del` may not remove, once nothing uses it.
    pub async fn remove_unnamed(&self, name: &str) -> Result<()> {
        self.remove_node(name, true).await
    }

    async fn remove_node(&self, name: &str, unnamed: bool) -> Result<()> {
        let _reconfigure = self.reconfigure.lock().await;
        let (node, moves) = {
            let mut state = self.state();
            let node = state.nodes.get(name).cloned().ok_or_else(|| {
                Error::new(
                    ErrorKind::NotFound,
                    format!("Failed to find node with node-name='{name}'"),
                )
            })?;
            if node.implicit != unnamed {
                return Err(Error::invalid(format!(
                    "Node {name} is not owned by the monitor"
                )));
            }
            if let Some(owner) = &node.filter_owner {
                return Err(owner.busy_error(name));
            }
            let mut moves = Vec::new();
            if state.filter_above.values().any(|f| f == name) {
                let users = slots_targeting(&mut state, &node, false);
                if let Some(pinned) = users.iter().find(|s| !s.follows_filters) {
                    return Err(pinned.user.busy_error(name));
                }
                let below = node
                    .driver
                    .filtered_child()
                    .expect("a filter has a filtered child")
                    .node();
                state.splice_out(name, &below);
                moves = users.into_iter().map(|s| (s, below.clone())).collect();
            } else if let Some(user) = state.first_user(&node) {
                return Err(user.busy_error(name));
            }
            state.nodes.remove(name);
            (node, moves)
        };
        retarget_each(moves).await;
        self.close_tree(node).await;
        Ok(())
    }

    /// Closes a node already out of the map, then its implicit children that nobody
    /// else uses.
    async fn close_tree(&self, node: Arc<Node>) {
        let mut pending = vec![node];
        while let Some(node) = pending.pop() {
            // Failures are logged by close; removal goes on regardless.
            let _ = node.close().await;
            let children = node.implicit_children.clone();
            // Dropping the node drops its driver and with it the child attachments.
            drop(node);
            let mut state = self.state();
            for child in children {
                let Some(child_node) = state.nodes.get(&child).cloned() else {
                    continue;
                };
                if state.first_user(&child_node).is_none() {
                    state.nodes.remove(&child);
                    pending.push(child_node);
                }
            }
        }
    }

    /// Inserts a filter above the node `above` (or above the filters already there).
    /// `build` receives the filter's fixed link to the filtered node and returns the
    /// filter driver. Every attachment that followed `above` is retargeted to the filter
    /// once its in-flight requests have finished; new requests wait meanwhile.
    pub async fn insert_filter(
        &self,
        above: &str,
        filter_name: Option<String>,
        build: impl FnOnce(Attachment) -> Result<Box<dyn BlockDriver>> + Send + 'static,
    ) -> Result<Arc<Node>> {
        let spec = FilterSpec {
            above: above.to_string(),
            name: filter_name,
            build: Box::new(build),
            owner: None,
            implicit_children: Vec::new(),
            discard: None,
        };
        Ok(self.insert_filters(vec![spec]).await?.remove(0))
    }

    /// Inserts several filters at one instant: every attachment of every filtered node
    /// is drained together, the filters are built, all attachments are retargeted, then
    /// all resume. This is what lets a transaction capture several disks at one point in
    /// time. All or nothing: if a filter cannot be built, none is inserted.
    pub async fn insert_filters(&self, specs: Vec<FilterSpec>) -> Result<Vec<Arc<Node>>> {
        let _reconfigure = self.reconfigure.lock().await;
        self.insert_filters_locked(specs, None).await
    }

    /// [`NodeGraph::insert_filters`], running `at_instant` while the filtered nodes are
    /// drained, before the filters are built: what it changes (a transaction's dirty
    /// bitmaps) changes at the filters' instant. If it fails, nothing is inserted.
    pub async fn insert_filters_at(
        &self,
        specs: Vec<FilterSpec>,
        at_instant: AtInstant,
    ) -> Result<Vec<Arc<Node>>> {
        let _reconfigure = self.reconfigure.lock().await;
        self.insert_filters_locked(specs, Some(at_instant)).await
    }

    /// [`NodeGraph::insert_filters`] for a caller holding the reconfiguration lock.
    ///
    /// 1. Under the state lock: resolve each filtered node, collect the attachments
    ///    that follow it, and mark it as being filtered, so attachments made from now
    ///    on are created held (see [`GraphState::attach`]) and cannot slip past.
    /// 2. Drain the collected attachments (wait for their requests in flight).
    /// 3. Build the filters: whatever they capture belongs to this instant.
    /// 4. Under the state lock: insert the filters and point every drained or held
    ///    attachment at its filter; then let requests resume.
    async fn insert_filters_locked(
        &self,
        specs: Vec<FilterSpec>,
        at_instant: Option<AtInstant>,
    ) -> Result<Vec<Arc<Node>>> {
        struct Plan {
            below: Arc<Node>,
            name: String,
            implicit: bool,
            build: Option<FilterBuild>,
            owner: Option<AttachUser>,
            implicit_children: Vec<String>,
            discard: Option<DiscardMode>,
        }
        let mut plans: Vec<Plan> = Vec::with_capacity(specs.len());
        let slots = {
            let mut state = self.state();
            for spec in specs {
                let below = state
                    .top_of(&spec.above)
                    .ok_or_else(|| not_found(&spec.above))?;
                if plans.iter().any(|p| Arc::ptr_eq(&p.below, &below)) {
                    return Err(Error::invalid(format!(
                        "Node '{}' cannot take two filters at the same instant",
                        spec.above
                    )));
                }
                let (name, implicit) = match &spec.name {
                    Some(name) => {
                        validate_node_name(name)?;
                        if state.nodes.contains_key(name) || plans.iter().any(|p| &p.name == name) {
                            return Err(duplicate(name));
                        }
                        (name.clone(), false)
                    }
                    None => (state.implicit_name(), true),
                };
                plans.push(Plan {
                    below,
                    name,
                    implicit,
                    build: Some(spec.build),
                    owner: spec.owner,
                    implicit_children: spec.implicit_children,
                    discard: spec.discard,
                });
            }
            let mut slots = Vec::new();
            for plan in &plans {
                state.filtering.insert(plan.below.name.clone(), Vec::new());
                slots.extend(slots_targeting(&mut state, &plan.below, true));
            }
            slots
        };
        let drained = drain(&slots).await;
        let mut built: Vec<(Arc<Node>, Arc<Node>)> = Vec::with_capacity(plans.len());
        let mut failure = at_instant.and_then(|f| f().err());
        for plan in plans.iter_mut() {
            if failure.is_some() {
                break;
            }
            let child = self.state().attach(
                plan.below.clone(),
                AttachUser::FilterChild {
                    filter: plan.name.clone(),
                },
                false,
            );
            let build = plan.build.take().expect("each filter is built once");
            match build(child) {
                Ok(driver) => {
                    let policy = NodePolicy {
                        detect_zeroes: DetectZeroes::Off,
                        discard: plan.discard.unwrap_or(plan.below.policy.discard),
                        ..plan.below.policy
                    };
                    let filter = Arc::new(Node {
                        name: plan.name.clone(),
                        implicit: plan.implicit,
                        implicit_children: std::mem::take(&mut plan.implicit_children),
                        policy,
                        growable: Default::default(),
                        bitmaps: Default::default(),
                        filter_owner: plan.owner.clone(),
                        demoted: Default::default(),
                        driver,
                    });
                    built.push((plan.below.clone(), filter));
                }
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        let held = {
            let mut state = self.state();
            let mut held = Vec::new();
            for plan in &plans {
                held.extend(state.filtering.remove(&plan.below.name).unwrap_or_default());
            }
            if failure.is_none() {
                for (below, filter) in &built {
                    state.nodes.insert(filter.name.clone(), filter.clone());
                    state
                        .filter_above
                        .insert(below.name.clone(), filter.name.clone());
                }
                let moving = slots.iter().chain(held.iter().map(|(slot, _)| slot));
                for slot in moving {
                    let mut target = slot.target.write().unwrap_or_else(|e| e.into_inner());
                    if let Some((_, filter)) = built.iter().find(|(b, _)| Arc::ptr_eq(b, &target)) {
                        *target = filter.clone();
                    }
                }
            }
            held
        };
        drop(drained);
        drop(held);
        match failure {
            Some(e) => Err(e),
            None => Ok(built.into_iter().map(|(_, filter)| filter).collect()),
        }
    }

    /// Removes a filter inserted by [`NodeGraph::insert_filter`]: its users go back to
    /// the node below it, drained the same way.
    pub async fn remove_filter(&self, name: &str) -> Result<()> {
        let _reconfigure = self.reconfigure.lock().await;
        let (filter, below, slots) = {
            let mut state = self.state();
            let filter = state
                .nodes
                .get(name)
                .cloned()
                .ok_or_else(|| not_found(name))?;
            let below = filter
                .driver
                .filtered_child()
                .ok_or_else(|| Error::invalid(format!("Node '{name}' is not a filter")))?
                .node();
            state.splice_out(name, &below);
            let slots = slots_targeting(&mut state, &filter, false);
            (filter, below, slots)
        };
        retarget_each(
            slots
                .into_iter()
                .map(|slot| (slot, below.clone()))
                .collect(),
        )
        .await;
        self.state().nodes.remove(name);
        drop(filter);
        Ok(())
    }
}

/// A writable parent needs a writable child (or falls back with auto-read-only).
fn check_child_writable(
    child: &Attachment,
    policy: &mut NodePolicy,
    auto_read_only: bool,
) -> Result<()> {
    if !policy.read_only && child.node().policy.read_only {
        if auto_read_only {
            policy.read_only = true;
        } else {
            return Err(Error::new(
                ErrorKind::PermissionDenied,
                "Block node is read-only",
            ));
        }
    }
    Ok(())
}

fn duplicate(name: &str) -> Error {
    Error::new(
        ErrorKind::InvalidArgument,
        format!("Duplicate nodes with node-name='{name}'"),
    )
}

/// Live slots pointing at `node`; only those that follow filters when `following`.
fn slots_targeting(state: &mut GraphState, node: &Arc<Node>, following: bool) -> Vec<Arc<Slot>> {
    state
        .live_slots()
        .into_iter()
        .filter(|s| !following || s.follows_filters)
        .filter(|s| Arc::ptr_eq(&s.target.read().unwrap_or_else(|e| e.into_inner()), node))
        .collect()
}

/// Waits for the requests in flight on every slot and holds new ones back until the
/// guards are dropped. Slots are taken in a fixed order, so two drains cannot deadlock.
async fn drain(slots: &[Arc<Slot>]) -> Vec<tokio::sync::OwnedRwLockWriteGuard<()>> {
    let mut ordered: Vec<&Arc<Slot>> = slots.iter().collect();
    ordered.sort_by_key(|s| Arc::as_ptr(s) as usize);
    let mut drained = Vec::with_capacity(ordered.len());
    for slot in ordered {
        drained.push(slot.gate.clone().write_owned().await);
    }
    drained
}

/// Drains every slot, points each at its new node, and lets their requests resume.
async fn retarget_each(moves: Vec<(Arc<Slot>, Arc<Node>)>) {
    let slots: Vec<Arc<Slot>> = moves.iter().map(|(s, _)| s.clone()).collect();
    let drained = drain(&slots).await;
    for (slot, to) in &moves {
        *slot.target.write().unwrap_or_else(|e| e.into_inner()) = to.clone();
    }
    drop(drained);
}

mod external_snapshot;

#[cfg(test)]
mod tests;
