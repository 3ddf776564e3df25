//! Block status through a backing chain (QEMU's "block status above"): what a reader
//! of the top node sees, and which layer holds it.
//!
//! A range the top layer does not allocate reads from its backing node, so its status
//! is the backing node's, and so on down: the first layer that allocates the start of
//! the range decides, for as long a run as every layer above leaves unallocated.
//! Filters (copy-before-write, fault...) are not layers: a filter answers with its
//! child's status, and the walk continues from the format node under it. `map`, the NBD
//! `base:allocation` and `qemu:allocation-depth` contexts all see the chain this way, as
//! qemu-img and QEMU's NBD server do.

use std::sync::Arc;

use crate::error::Result;
use crate::node::Attachment;
use crate::node::Node;
use crate::node::driver::Extent;

/// The status of a run through the chain, and the layer that decided it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainStatus {
    /// The run, with the status of the layer that decided it.
    pub extent: Extent,
    /// That layer: 0 for the top node, 1 for its backing node, and so on; for a run
    /// no layer allocates, the bottom layer's depth.
    pub depth: u32,
}

impl ChainStatus {
    /// QEMU's `qemu:allocation-depth` value: 0 where no layer allocates the run,
    /// otherwise the allocating layer counted from 1 at the top.
    pub fn allocation_depth(&self) -> u32 {
        if self.extent.status.allocated {
            self.depth + 1
        } else {
            0
        }
    }
}

/// The format node under any filters above it.
fn below_filters(mut node: Arc<Node>) -> Arc<Node> {
    while let Some(child) = node.driver().filtered_child() {
        node = child.node();
    }
    node
}

/// The status of `[offset, offset + len)` as a reader of `top` sees it (see the module
/// note). The run returned starts at `offset` and may be shorter than `len`.
pub async fn block_status_above(top: &Attachment, offset: u64, len: u64) -> Result<ChainStatus> {
    let mut extent = top.block_status(offset, len).await?;
    let mut layer = top.node();
    let mut depth = 0;
    loop {
        if extent.status.allocated {
            break;
        }
        let format = below_filters(layer);
        let Some(backing) = format.backing() else {
            break;
        };
        if offset >= backing.length() {
            // Past the end of the backing node: zeros, as the layer above says.
            break;
        }
        let run = extent.length.min(backing.length() - offset);
        extent = backing.block_status(offset, run).await?;
        layer = backing.node();
        depth += 1;
    }
    Ok(ChainStatus { extent, depth })
}
