//! Attachments: how anything uses a node (a parent's child link, an export, a job).
//!
//! An [`Attachment`] points at a *slot* the graph can retarget. When a filter goes in
//! above node N, every attachment to N that follows filters is moved to the filter,
//! atomically with respect to its in-flight requests: each slot has a gate (a fair
//! async read/write lock); requests hold it shared, retargeting takes it exclusively
//! (`drain`), which waits for the requests in flight and holds new ones back (QEMU's
//! "drain, change, resume"). A filter's own link to N is *fixed* and does not follow,
//! or the filter would point at itself.
//!
//! [`AttachUser`] says who holds an attachment; it decides the "in use" message a
//! `blockdev-del` gets, in QEMU's words.

use crate::buf::IoBuf;
use crate::error::Error;
use crate::error::ErrorKind;
use crate::error::Result;
use crate::node::Node;
use crate::node::driver::Extent;
use crate::node::driver::Limits;
use crate::node::driver::WriteFlags;
use crate::node::driver::ZeroFlags;
use std::fmt;
use std::sync::Arc;
use std::sync::RwLock;
use std::sync::Weak;

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
    pub(crate) fn busy_error(&self, node: &str) -> Error {
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

pub(crate) struct Slot {
    pub(crate) user: AttachUser,
    pub(crate) follows_filters: bool,
    pub(crate) target: RwLock<Arc<Node>>,
    /// Held shared by every request through the slot, exclusively while retargeting.
    pub(crate) gate: Arc<tokio::sync::RwLock<()>>,
}

/// A slot whose requests are held back (a filter is going in above its node).
pub(crate) type HeldSlot = (Arc<Slot>, tokio::sync::OwnedRwLockWriteGuard<()>);

/// A user's handle on a node: all I/O of exports, jobs and parents goes through one,
/// so the graph can insert a filter under their feet without them noticing.
pub struct Attachment {
    pub(crate) slot: Arc<Slot>,
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
    pub(crate) slot: Weak<Slot>,
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

    /// See [`Node::read_uncached`].
    pub async fn read_uncached(&self, offset: u64, buf: IoBuf, direct: bool) -> Result<IoBuf> {
        let _in_flight = self.slot.gate.read().await;
        self.node().read_uncached(offset, buf, direct).await
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

    /// See [`Node::commit_backup`].
    pub async fn commit_backup(&self) -> Result<()> {
        let _in_flight = self.slot.gate.read().await;
        self.node().commit_backup().await
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

/// Waits for the requests in flight on every slot and holds new ones back until the
/// guards are dropped. Slots are taken in a fixed order, so two drains cannot deadlock.
pub(crate) async fn drain(slots: &[Arc<Slot>]) -> Vec<tokio::sync::OwnedRwLockWriteGuard<()>> {
    let mut ordered: Vec<&Arc<Slot>> = slots.iter().collect();
    ordered.sort_by_key(|s| Arc::as_ptr(s) as usize);
    let mut drained = Vec::with_capacity(ordered.len());
    for slot in ordered {
        drained.push(slot.gate.clone().write_owned().await);
    }
    drained
}

/// Drains every slot, points each at its new node, and lets their requests resume.
pub(crate) async fn retarget_each(moves: Vec<(Arc<Slot>, Arc<Node>)>) {
    let slots: Vec<Arc<Slot>> = moves.iter().map(|(s, _)| s.clone()).collect();
    let drained = drain(&slots).await;
    for (slot, to) in &moves {
        *slot.target.write().unwrap_or_else(|e| e.into_inner()) = to.clone();
    }
    drop(drained);
}
