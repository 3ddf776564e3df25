//! `stillpoint restore --repo R SNAPSHOT disk.qcow2 --live --socket S`: the disk is
//! usable from the first second, over NBD, while the snapshot streams into it.
//!
//! ```text
//!   NBD client ──> [qcow2 disk.qcow2] ──backing──> [repository snapshot, read-only]
//!                        ^
//!                        └── block-stream: copies each cluster the image lacks
//! ```
//!
//! Reads of what has not arrived yet fall through to the snapshot; writes land in the
//! image and are never overwritten by the stream (see `jobs::stream`). When the stream
//! ends, the image stands alone.
//!
//! # An interrupted restore cannot pass for a whole disk
//!
//! Until the stream ends, the image's header names a backing file that cannot be
//! opened (`stillpoint-live-restore:SNAPSHOT-ID`), so neither QEMU nor Stillpoint opens
//! it alone and reads zeros where the snapshot's data has not arrived: they fail with
//! "Could not open backing file". The stream's end removes the name. Running the same
//! command again resumes: clusters already in the image (streamed or written) stay.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use anyhow::bail;
use block::NodeGraph;
use block::drivers::qcow2;
use block::options::SocketAddress;
use jobs::JobEvent;
use jobs::JobRegistry;
use jobs::JobStatus;
use serde_json::json;

/// The backing name an image being restored live carries in its header.
pub const MARKER_PREFIX: &str = "stillpoint-live-restore:";

/// What `restore --live` was asked.
pub struct LiveRestore<'a> {
    pub repo: &'a Path,
    pub pass_file: Option<&'a Path>,
    pub snapshot: &'a str,
    pub target: &'a Path,
    pub listen: SocketAddress,
    pub name: String,
    /// Stream speed limit, bytes per second (0: none).
    pub speed: u64,
}

/// Runs a live restore until a signal; see the module note.
pub async fn run(request: LiveRestore<'_>) -> anyhow::Result<()> {
    let started = Instant::now();
    let repo = crate::repo_cmd::open(request.repo, request.pass_file)?;
    let info = repo.find_snapshot(request.snapshot)?;
    let marker = format!("{MARKER_PREFIX}{}", info.id);
    let target = request.target;
    let resuming = match qcow2::read_file_header(target) {
        Err(_) if !target.exists() => false,
        Ok(Some(header)) if header.backing_file.as_deref() == Some(marker.as_str()) => {
            if header.size != info.size {
                bail!(
                    "{} is a live restore of snapshot {} but of another size",
                    target.display(),
                    info.id
                );
            }
            true
        }
        Ok(Some(header))
            if header
                .backing_file
                .as_deref()
                .is_some_and(|b| b.starts_with(MARKER_PREFIX)) =>
        {
            bail!(
                "{} is an unfinished live restore of another snapshot ({}); restore that \
                 one to finish it, or remove the file",
                target.display(),
                header.backing_file.unwrap_or_default()
            )
        }
        _ => bail!(
            "{} exists: a live restore writes a new image (or resumes its own)",
            target.display()
        ),
    };
    if !resuming {
        qcow2::create_file(
            target,
            &qcow2::header::CreateOptions {
                size: info.size,
                backing_file: Some(marker.clone()),
                ..Default::default()
            },
        )
        .with_context(|| format!("cannot create {}", target.display()))?;
    }
    let driver = crate::repo_node::SnapshotDriver::open(Arc::new(repo), &info.id)?;
    let mut interrupts = crate::signals::Interrupts::watch()?;
    let graph = Arc::new(NodeGraph::new());
    let outcome = async {
        graph.add_driver("snapshot", Box::new(driver), true).await?;
        graph
            .add(block::BlockdevOptions::from_json(json!({
                "driver": "qcow2", "node-name": "disk", "backing": "snapshot",
                "file": {"driver": "file", "filename": target}}))?)
            .await?;
        let limits = nbd::ServerLimits::default();
        let (serving, where_) = crate::nbd_cmd::listen_and_serve(
            &graph,
            &request.listen,
            &request.name,
            true,
            limits,
        )
        .await?;
        eprintln!(
            "stillpoint: {} snapshot {} of {} into {}; serving it as NBD export '{}' (writable) \
             on {where_} meanwhile",
            if resuming { "resuming the live restore of" } else { "live restore of" },
            info.id,
            info.disk,
            target.display(),
            request.name
        );
        let registry = JobRegistry::new();
        let mut events = registry.subscribe();
        let mut options = jobs::StreamOptions {
            job_id: "restore".into(),
            ..Default::default()
        };
        options.job.speed = request.speed;
        let job = jobs::start_stream(&graph, &registry, "disk", options)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let finished = loop {
            tokio::select! {
                event = events.recv() => match event {
                    Ok(JobEvent::Completed { error: Some(e), .. }) => {
                        break Err(anyhow::anyhow!("the restore failed: {e}"));
                    }
                    Ok(JobEvent::Completed { .. }) => break Ok(()),
                    Ok(JobEvent::StatusChange { status: JobStatus::Null, .. }) => break Ok(()),
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(_) => break Err(anyhow::anyhow!("the restore job vanished")),
                },
                how = interrupts.recv() => {
                    let _ = job.cancel(true);
                    // The job's end, so the image is closed with what it streamed.
                    while !matches!(job.status(), JobStatus::Null | JobStatus::Concluded) {
                        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    }
                    break Err(anyhow::anyhow!(
                        "live restore {how} before it finished; {} still needs the snapshot \
                         (its header names '{marker}', so it does not open alone): run the \
                         same command to resume",
                        target.display()
                    ));
                }
            }
        };
        if finished.is_ok() {
            let (done, _) = job.progress();
            eprintln!(
                "stillpoint: restored: {} holds snapshot {} whole (the stream went over {} in {:.2} s) and \
                 no longer needs the repository; still serving it until SIGINT/SIGTERM",
                target.display(),
                info.id,
                crate::info::human_size(done),
                started.elapsed().as_secs_f64()
            );
            interrupts.recv().await;
        }
        crate::nbd_cmd::stop_serving(serving, &request.listen);
        finished
    }
    .await;
    let closed = graph.close_all().await;
    outcome?;
    closed.context("failed to close the image")?;
    eprintln!("stillpoint: NBD server stopped, image closed");
    Ok(())
}
