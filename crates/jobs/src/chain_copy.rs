//! What a stream copies into its image (`crate::stream`), shared by the job's own pass
//! and by the copy-on-read filter above the image (`crate::copy_on_read`): everything
//! the backing chain supplies, or only what the layers above a base that stays
//! allocate, cluster by cluster through the format's `populate_from_backing` (which
//! never overwrites a guest write; see the stream's notes).

use std::sync::Arc;

use block::Attachment;
use block::Node;
use block::node::driver::BackingFile;

/// What a stream copies into its image, for the job's pass and its filter alike.
#[derive(Debug)]
pub(crate) struct ChainCopy {
    /// `bottom` was the top: copy nothing, keep the link.
    pub(crate) nothing: bool,
    /// The node that stays below, if any.
    pub(crate) base: Option<Base>,
}

/// A stream's base: the node that stays the image's backing node.
#[derive(Debug)]
pub(crate) struct Base {
    pub(crate) node: Arc<Node>,
    /// Its place in the chain: 0 for the image's backing node, 1 below it, and so on.
    pub(crate) depth: u32,
    /// The name the image's header gets for it.
    pub(crate) header_name: String,
}

impl ChainCopy {
    /// Copies what needs it from `offset` on, up to `end`: one cluster, or a run the
    /// layers above the base leave to it (skipped). Returns the bytes settled and
    /// whether any were copied.
    pub(crate) async fn copy_some(
        &self,
        format: &dyn BackingFile,
        backing: &Attachment,
        offset: u64,
        end: u64,
    ) -> block::Result<(u64, bool)> {
        if self.nothing {
            return Ok((end - offset, false));
        }
        let Some(base) = &self.base else {
            let n = format
                .populate_from_backing(offset, end - offset, false)
                .await?;
            return Ok((n, true));
        };
        let status = block::chain::block_status_above(backing, offset, end - offset).await?;
        let run = status.extent.length.max(1).min(end - offset);
        if !status.extent.status.allocated || status.depth >= base.depth {
            // The base's own (or nobody's): it stays below.
            return Ok((run, false));
        }
        let n = format.populate_from_backing(offset, run, true).await?;
        Ok((n, true))
    }
}
