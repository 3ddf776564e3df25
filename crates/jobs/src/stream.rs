//! The stream job (QEMU's `block-stream`): copies what a qcow2 image's backing chain
//! supplies into the image itself, then drops the backing link, so the image stands
//! alone while it stays in use.
//!
//! This is what makes a restore live: a qcow2 overlay over a read-only repository
//! snapshot serves reads and writes from the first second, and the stream moves the
//! snapshot's data in underneath.
//!
//! # Why a guest write is never overwritten
//!
//! Each cluster goes through the format's `populate_from_backing`: the backing data is
//! read first (the chain is read-only, so it cannot change), then, under the image's
//! metadata lock and after any allocation in flight there has settled, the cluster is
//! allocated with that data only if it is still unallocated. A guest write that got
//! there first has allocated the cluster (it is skipped); one that comes later waits
//! for the allocation and then overwrites it. Clusters the chain reads as zeros are not
//! written: once the link is gone, unallocated clusters read zeros too.
//!
//! # The end
//!
//! After the last cluster the image's metadata is flushed and synced, then its header
//! stops naming a backing file and the link is dropped (the backing node can then be
//! deleted). A job that fails or is cancelled leaves the link, and what it copied
//! (which reads the same as before).
//!
//! Not supported yet: `base`/`base-node` other than "stream everything" (refused), and
//! `filter-node-name` (QEMU's copy-on-read filter; refused).

use std::sync::Arc;
use std::sync::Mutex;

use async_trait::async_trait;
use block::AttachUser;
use block::Attachment;
use block::Node;
use block::graph::NodeGraph;

use crate::job::ErrorAction;
use crate::job::ErrorPolicy;
use crate::job::IoOperation;
use crate::job::Job;
use crate::job::JobDriver;
use crate::job::JobError;
use crate::job::JobFailure;
use crate::job::JobOptions;
use crate::job::JobRegistry;
use crate::job::JobType;

/// `block-stream`'s arguments, parsed.
#[derive(Debug, Clone, Default)]
pub struct StreamOptions {
    /// `job-id`; QEMU has no default for a node given by name.
    pub job_id: String,
    /// `base-node`: stream only what lies above it.
    pub base_node: Option<String>,
    /// `base`: the same, the node given by its file name.
    pub base_file: Option<String>,
    /// `bottom`: the lowest node to stream from.
    pub bottom: Option<String>,
    /// `backing-file`: the name to write into the header (only with a base).
    pub backing_file: Option<String>,
    /// `on-error`.
    pub on_error: ErrorPolicy,
    /// Finalize, dismiss, speed.
    pub job: JobOptions,
}

struct StreamJob {
    graph: Arc<NodeGraph>,
    /// The image the data goes into (the qcow2 node itself, whatever filters go in
    /// above it meanwhile).
    top: Arc<Node>,
    /// Holds the node for the job ("in use by block job: stream").
    hold: Mutex<Option<Attachment>>,
    on_error: ErrorPolicy,
    /// `bottom` was the top: copy nothing, keep the link.
    nothing: bool,
}

/// Starts streaming the whole backing chain of node `device` into it.
pub fn start_stream(
    graph: &Arc<NodeGraph>,
    registry: &JobRegistry,
    device: &str,
    options: StreamOptions,
) -> Result<Arc<Job>, JobError> {
    let top = graph.node(device).ok_or_else(|| {
        JobError::generic(format!(
            "Cannot find device='{device}' nor node-name='{device}'"
        ))
    })?;
    // The backing chain below the top, top first.
    let mut chain = Vec::new();
    let mut below = top.backing().map(|b| b.node());
    while let Some(node) = below {
        below = node.backing().map(|b| b.node());
        chain.push(node);
    }
    let unsupported = || {
        JobError::generic(
            "block-stream of part of a backing chain is not supported yet: only the whole \
             chain streams (leave out base and base-node, or give the lowest node as bottom)",
        )
    };
    if let Some(base) = &options.base_node {
        if !chain.iter().any(|n| n.name() == base) {
            return Err(JobError::generic(format!(
                "Node '{base}' is not a backing image of '{device}'"
            )));
        }
        return Err(unsupported());
    }
    if let Some(base) = &options.base_file {
        let named = |n: &Arc<Node>| n.filename().is_some_and(|f| f.to_string_lossy() == *base);
        if !chain.iter().any(named) {
            return Err(JobError::generic(format!(
                "Can't find '{base}' in the backing chain"
            )));
        }
        return Err(unsupported());
    }
    // `bottom` at the top itself streams nothing (a job of length 0, as QEMU's); at
    // the chain's lowest node, everything.
    let mut nothing = false;
    if let Some(bottom) = &options.bottom {
        if bottom == device {
            nothing = true;
        } else if chain.last().is_none_or(|n| n.name() != bottom) {
            if chain.iter().any(|n| n.name() == bottom) {
                return Err(unsupported());
            }
            return Err(JobError::generic(format!(
                "Node '{bottom}' is not in the backing chain of '{device}'"
            )));
        }
    }
    if options.backing_file.is_some() {
        return Err(JobError::generic(
            "backing file specified, but streaming the entire chain",
        ));
    }
    if top.driver().backing_file().is_none() && top.backing().is_none() {
        // A raw node has no backing chain to stream, and nowhere to put one.
        return Err(JobError::generic(format!(
            "Node '{device}' is a {} node: only formats with backing files stream",
            top.driver_name()
        )));
    }
    let job = registry.create(&options.job_id, JobType::Stream, options.job)?;
    let busy = graph
        .users_of(device)
        .into_iter()
        .find(|u| matches!(u, AttachUser::Job { .. }));
    if let Some(AttachUser::Job { job_type }) = busy {
        registry.discard(&job);
        return Err(JobError::generic(format!(
            "Node '{device}' is busy: block device is in use by block job: {job_type}"
        )));
    }
    let hold = match graph.attach(
        device,
        AttachUser::Job {
            job_type: "stream".into(),
        },
    ) {
        Ok(hold) => hold,
        Err(e) => {
            registry.discard(&job);
            return Err(JobError::generic(e.to_string()));
        }
    };
    job.start(Arc::new(StreamJob {
        graph: graph.clone(),
        top,
        hold: Mutex::new(Some(hold)),
        on_error: options.on_error,
        nothing,
    }));
    Ok(job)
}

#[async_trait]
impl JobDriver for StreamJob {
    async fn run(&self, job: &Arc<Job>) -> Result<(), JobFailure> {
        let Some(format) = self.top.driver().backing_file() else {
            return Err(JobFailure::Failed(
                "the image has no backing file support".into(),
            ));
        };
        // Nothing below: nothing to copy, and QEMU reports a length of 0.
        if self.nothing || self.top.backing().is_none() {
            return Ok(());
        }
        let len = self.top.length();
        job.progress_meter().set_total(len);
        let mut offset = 0;
        while offset < len {
            if job.is_cancelled() {
                return Err(JobFailure::Cancelled);
            }
            job.pause_point().await;
            if job.is_cancelled() {
                continue;
            }
            job.set_busy(true);
            let done = format.populate_from_backing(offset, len - offset).await;
            job.set_busy(false);
            match done {
                Ok(n) => {
                    offset += n;
                    job.progress_meter().add_done(n);
                    job.rate_limit().throttle(n).await;
                }
                Err(e) => {
                    // One request reads the chain and writes the image; QEMU reports
                    // a stream's errors as reads.
                    match job.handle_error(self.on_error, IoOperation::Read, e.errno()) {
                        ErrorAction::Report => return Err(JobFailure::Failed(e.to_string())),
                        ErrorAction::Ignore | ErrorAction::Stop => {
                            tracing::warn!(job = job.id(), "stream copy failed, retrying: {e}");
                        }
                    }
                }
            }
        }
        let former = self.top.backing().map(|b| b.node());
        format
            .drop_backing()
            .await
            .map_err(|e| JobFailure::Failed(format!("could not drop the backing file: {e}")))?;
        // The chain the header had opened is closed now that nothing uses it; one the
        // monitor added stays, for the user to delete.
        if let Some(former) = former {
            let name = former.name().to_string();
            drop(former);
            self.graph.close_if_unused_implicit(&name).await;
        }
        Ok(())
    }

    async fn clean(&self, _job: &Arc<Job>) {
        self.hold.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}
