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
//! # A base that stays
//!
//! With `base`, `base-node` or a `bottom` inside the chain, only what the layers above
//! the base allocate is copied (the chain's block status says which layer holds each
//! run); what only the base or its own chain holds stays there. Zeros such a layer
//! records are written as zero clusters, since the base would show through an
//! unallocated cluster once the layers between are gone.
//!
//! # The end
//!
//! After the last cluster the image's metadata is flushed and synced, then its header
//! stops naming a backing file and the link is dropped (the backing node can then be
//! deleted); with a base, the header names the base (`backing-file`, or the base's
//! file name) and its format, and the link goes to the base. The layers left out of
//! the chain close if the image's header had opened them. A job that fails or is
//! cancelled leaves the link, and what it copied (which reads the same as before).
//!
//! # The filter
//!
//! While the job runs, a copy-on-read filter sits above the image (as QEMU's does,
//! named by `filter-node-name` or generated): a guest read copies what it covers from
//! the layers being streamed into the image first (`crate::copy_on_read`), so a live
//! restore fetches what the guest reads once. The filter goes before the link changes
//! at the end, and with the job whatever way it ends.

use std::sync::Arc;
use std::sync::Mutex;

use async_trait::async_trait;
use block::AttachUser;
use block::Attachment;
use block::Node;
use block::graph::FilterSpec;
use block::graph::NodeGraph;
use block::node::driver::BackingFile;

use crate::chain_copy::Base;
use crate::chain_copy::ChainCopy;
use crate::copy_on_read::CorFilter;
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
    /// `filter-node-name`: the copy-on-read filter's name (generated when absent).
    pub filter_node_name: Option<String>,
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
    /// What to copy; the copy-on-read filter shares it.
    copy: Arc<ChainCopy>,
    /// The copy-on-read filter's node name, until the filter is removed.
    filter: Mutex<Option<String>>,
}

/// Starts streaming the whole backing chain of node `device` into it, or the part
/// above the base the options name, with a copy-on-read filter above the image.
pub async fn start_stream(
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
    let file_name = |n: &Arc<Node>| n.filename().map(|f| f.to_string_lossy().into_owned());
    // The base, by its place in the chain, and the name the header will give it.
    let mut base: Option<(usize, String)> = None;
    if let Some(name) = &options.base_node {
        let Some(at) = chain.iter().position(|n| n.name() == name) else {
            return Err(JobError::generic(format!(
                "Node '{name}' is not a backing image of '{device}'"
            )));
        };
        base = Some((at, file_name(&chain[at]).unwrap_or_default()));
    }
    if let Some(file) = &options.base_file {
        let Some(at) = chain
            .iter()
            .position(|n| file_name(n).as_deref() == Some(file.as_str()))
        else {
            return Err(JobError::generic(format!(
                "Can't find '{file}' in the backing chain"
            )));
        };
        base = Some((at, file.clone()));
    }
    // `bottom` at the top itself streams nothing (a job of length 0, as QEMU's); at
    // the chain's lowest node, everything; inside the chain, the node below it stays.
    let mut nothing = false;
    if let Some(bottom) = &options.bottom {
        if bottom == device {
            nothing = true;
        } else {
            let Some(at) = chain.iter().position(|n| n.name() == bottom) else {
                return Err(JobError::generic(format!(
                    "Node '{bottom}' is not in the backing chain of '{device}'"
                )));
            };
            if at + 1 < chain.len() {
                base = Some((at + 1, file_name(&chain[at + 1]).unwrap_or_default()));
            }
        }
    }
    // A node some job holds (the image, or a stream's own filter above it) is busy,
    // checked before the rest, as QEMU checks its blockers.
    let busy = graph
        .users_of(device)
        .into_iter()
        .find(|u| matches!(u, AttachUser::Job { .. }));
    if let Some(AttachUser::Job { job_type }) = busy {
        return Err(JobError::generic(format!(
            "Node '{device}' is busy: block device is in use by block job: {job_type}"
        )));
    }
    if options.backing_file.is_some() && base.is_none() {
        return Err(JobError::generic(
            "backing file specified, but streaming the entire chain",
        ));
    }
    let base = base.map(|(at, name)| Base {
        node: chain[at].clone(),
        depth: at as u32,
        header_name: options.backing_file.clone().unwrap_or(name),
    });
    if let Some(base) = base.as_ref().filter(|b| b.header_name.is_empty()) {
        // An empty name would leave the header without a backing file while the data
        // below the image still lives in the base: a reopened image would read zeros.
        return Err(JobError::generic(format!(
            "Node '{}' has no file name to record as the backing file: give backing-file",
            base.node.name()
        )));
    }
    if top.driver().backing_file().is_none() && top.backing().is_none() {
        // A raw node has no backing chain to stream, and nowhere to put one.
        return Err(JobError::generic(format!(
            "Node '{device}' is a {} node: only formats with backing files stream",
            top.driver_name()
        )));
    }
    let job = registry.create(&options.job_id, JobType::Stream, options.job)?;
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
    let copy = Arc::new(ChainCopy { nothing, base });
    let filter_copy = copy.clone();
    let spec = FilterSpec {
        above: device.to_string(),
        name: options.filter_node_name.clone(),
        build: Box::new(move |image| {
            Ok(Box::new(CorFilter::new(image, filter_copy)) as Box<dyn block::BlockDriver>)
        }),
        // "Node X is in use" to blockdev-del, as QEMU answers for its stream filter.
        owner: Some(AttachUser::Other("stream".into())),
        implicit_children: Vec::new(),
        discard: None,
    };
    let filter = match graph.insert_filters(vec![spec]).await {
        Ok(mut filters) => filters.remove(0),
        Err(e) => {
            drop(hold);
            registry.discard(&job);
            return Err(JobError::generic(format!("Could not create node: {e}")));
        }
    };
    job.start(Arc::new(StreamJob {
        graph: graph.clone(),
        top,
        hold: Mutex::new(Some(hold)),
        on_error: options.on_error,
        copy,
        filter: Mutex::new(Some(filter.name().to_string())),
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
        // Nothing below, or nothing between the image and its base: nothing to copy,
        // and QEMU reports a length of 0.
        let Some(backing) = self.top.backing() else {
            return Ok(());
        };
        if self.copy.nothing {
            return Ok(());
        }
        if self.copy.base.as_ref().is_some_and(|b| b.depth == 0) {
            return self.finish(job.id(), format).await;
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
            let done = self.copy.copy_some(format, &backing, offset, len).await;
            job.set_busy(false);
            match done {
                Ok((n, copied)) => {
                    offset += n;
                    job.progress_meter().add_done(n);
                    if copied {
                        job.rate_limit().throttle(n).await;
                    }
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
        drop(backing);
        self.finish(job.id(), format).await
    }

    async fn clean(&self, job: &Arc<Job>) {
        self.remove_filter(job.id()).await;
        self.hold.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}

impl StreamJob {
    /// Takes the copy-on-read filter out, once: its users go back to the image.
    async fn remove_filter(&self, job: &str) {
        let name = self.filter.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(name) = name
            && let Err(e) = self.graph.remove_filter(&name).await
        {
            tracing::error!(job, "failed to remove the stream's filter {name}: {e}");
        }
    }

    /// The job's end: the link dropped, or moved to the base, in the header too; and
    /// the layers left out closed if the header had opened them (one the monitor added
    /// stays, for the user to delete).
    async fn finish(&self, job: &str, format: &dyn BackingFile) -> Result<(), JobFailure> {
        // The filter copies for the chain as it is; it goes before the chain changes.
        self.remove_filter(job).await;
        let former = self.top.backing().map(|b| b.node());
        match &self.copy.base {
            None => format
                .drop_backing()
                .await
                .map_err(|e| JobFailure::Failed(format!("could not drop the backing file: {e}")))?,
            Some(base) => {
                let link = self.graph.attach_backing(&self.top, &base.node);
                format
                    .relink_backing(link, &base.header_name, base.node.driver_name())
                    .await
                    .map_err(|e| {
                        JobFailure::Failed(format!("could not change the backing file: {e}"))
                    })?;
            }
        }
        if let Some(former) = former {
            let name = former.name().to_string();
            drop(former);
            self.graph.close_if_unused_implicit(&name).await;
        }
        Ok(())
    }
}
