//! `stillpoint backup SOURCE TARGET`: a one-shot live backup of a local image.
//!
//! The same engine as the daemon's `blockdev-backup`: the source gets a
//! copy-before-write filter, the background copy runs, the target is flushed. Here
//! nobody else writes the source, so it is opened read-only. A missing target is
//! created sparse with the source's size. Progress goes to stderr (a bar on a terminal,
//! a plain line every few seconds otherwise); the summary goes to stdout (or a JSON
//! object with `--json`). Ctrl-C cancels the job and says the target is incomplete.

use std::io::IsTerminal;
use std::path::Path;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use std::time::Instant;

use anyhow::bail;
use block::NodeGraph;
use indicatif::ProgressBar;
use indicatif::ProgressStyle;
use jobs::BackupOptions;
use jobs::JobEvent;
use jobs::JobRegistry;
use jobs::JobStatus;
use jobs::SyncMode;
use jobs::start_backup;
use serde_json::json;

use crate::image::Format;
use crate::image::ImageFormat;
use crate::image::node_options;
use crate::image::os_text;
use crate::image::probe;
use crate::image::resolve_format;

/// The arguments of `stillpoint backup`.
#[derive(Debug)]
pub struct BackupArgs {
    /// Image to back up.
    pub source: PathBuf,
    /// Image to write (created sparse when missing).
    pub target: PathBuf,
    /// Source format (probed when absent).
    pub source_format: Option<Format>,
    /// Target format (probed when the target exists, else raw).
    pub target_format: Option<Format>,
    /// What to copy.
    pub sync: SyncMode,
    /// Bytes/s, 0 = unlimited.
    pub speed: u64,
    /// Job cluster size lower bound.
    pub cluster_size: Option<u64>,
    /// Parallel background requests.
    pub workers: usize,
    /// Print the summary as JSON.
    pub json: bool,
    /// Write the target's clusters compressed (qcow2 targets).
    pub compress: bool,
    /// Largest background request (default [`CLI_CHUNK`]).
    pub chunk_size: Option<u64>,
    /// A persistent dirty bitmap of the (qcow2) source: created by a full backup when
    /// missing, copied from by an incremental one, and reset to "no changes since this
    /// backup" when the backup succeeds.
    pub bitmap: Option<String>,
    /// Granularity of a bitmap this backup creates.
    pub granularity: Option<u64>,
    /// Copy only what `bitmap` marks (sync=bitmap, mode on-success).
    pub incremental: bool,
    /// Backing file of a qcow2 target this backup creates (the previous backup).
    pub backing: Option<PathBuf>,
}

impl BackupArgs {
    /// A full backup of `source` to `target` with every option at its default.
    pub fn new(source: PathBuf, target: PathBuf) -> Self {
        Self {
            source,
            target,
            source_format: None,
            target_format: None,
            sync: SyncMode::Full,
            speed: 0,
            cluster_size: None,
            workers: jobs::backup::DEFAULT_WORKERS,
            json: false,
            compress: false,
            chunk_size: None,
            bitmap: None,
            granularity: None,
            incremental: false,
            backing: None,
        }
    }
}

/// A progress bar on stderr when it is a terminal (and the output is not JSON).
pub(crate) fn progress_bar(total: u64, json: bool) -> Option<ProgressBar> {
    (!json && std::io::stderr().is_terminal()).then(|| {
        let bar = ProgressBar::new(total);
        bar.set_style(
            ProgressStyle::with_template(
                "{bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
            )
            .expect("valid template"),
        );
        bar
    })
}

/// Background request size of the one-shot CLI. The daemon keeps 512 KiB requests so a
/// guest write waits less behind them; here nobody writes the source, and 2 MiB
/// requests measured faster (bench/RESULTS.md, "qcow2").
pub const CLI_CHUNK: u64 = 2 << 20;

/// The format of a source or target: given, probed (under the probing rules), or raw
/// for a target this backup creates.
fn format_of(path: &Path, format: Option<Format>, flag: &str) -> anyhow::Result<ImageFormat> {
    match format {
        None if !path.exists() => Ok(ImageFormat::given(Format::Raw)),
        format => resolve_format(path, format, flag),
    }
}

/// Creates an empty target of `len` bytes: a sparse raw file or a fresh qcow2 image,
/// optionally backed by the previous backup of a chain.
pub(crate) fn create_target(
    path: &Path,
    format: Format,
    len: u64,
    backing: Option<&Path>,
) -> anyhow::Result<()> {
    match format {
        Format::Raw => {
            let file = std::fs::File::create(path).map_err(|e| {
                anyhow::anyhow!("Could not create '{}': {}", path.display(), os_text(&e))
            })?;
            file.set_len(len).map_err(|e| {
                anyhow::anyhow!("Could not resize '{}': {}", path.display(), os_text(&e))
            })?;
        }
        Format::Qcow2 => {
            let backing_format = backing
                .map(|b| -> anyhow::Result<String> {
                    let resolved = match path.parent() {
                        Some(dir) if b.is_relative() && !dir.as_os_str().is_empty() => dir.join(b),
                        _ => b.to_path_buf(),
                    };
                    Ok(match probe(&resolved)? {
                        Format::Qcow2 => "qcow2".into(),
                        Format::Raw => "raw".into(),
                    })
                })
                .transpose()?;
            let options = block::drivers::qcow2::header::CreateOptions {
                size: len,
                backing_file: backing.map(|b| b.display().to_string()),
                backing_format,
                ..Default::default()
            };
            block::drivers::qcow2::create_file(path, &options)?;
        }
    }
    Ok(())
}

/// Runs the backup; returns an error (and leaves an incomplete target) on failure.
pub async fn run(args: BackupArgs) -> anyhow::Result<()> {
    let source = format_of(&args.source, args.source_format, "--source-format")?;
    let target = format_of(&args.target, args.target_format, "--target-format")?;
    let target_format = target.format;
    std::fs::metadata(&args.source).map_err(|e| {
        anyhow::anyhow!(
            "Could not open '{}': {}",
            args.source.display(),
            os_text(&e)
        )
    })?;
    if args.compress && target_format != Format::Qcow2 {
        bail!("--compress needs a qcow2 target (--target-format qcow2)");
    }
    if args.incremental && args.bitmap.is_none() {
        bail!("--incremental needs --bitmap NAME");
    }
    if args.incremental {
        // Unchanged clusters must read through to the previous backup.
        let backed = match (target_format, args.target.exists()) {
            (Format::Qcow2, false) => args.backing.is_some(),
            (Format::Qcow2, true) => block::drivers::qcow2::read_file_header(&args.target)
                .ok()
                .flatten()
                .is_some_and(|h| h.backing_file.is_some()),
            (Format::Raw, _) => false,
        };
        if !backed {
            bail!(
                "an incremental backup needs a qcow2 target backed by the previous backup \
                 (--target-format qcow2 --backing PREVIOUS)"
            );
        }
    }
    if args.backing.is_some() && (target_format != Format::Qcow2 || args.target.exists()) {
        bail!("--backing applies to a qcow2 target this backup creates (--target-format qcow2)");
    }
    if let (Ok(a), Ok(b)) = (
        std::fs::metadata(&args.source),
        std::fs::metadata(&args.target),
    ) {
        use std::os::unix::fs::MetadataExt;
        if (a.dev(), a.ino()) == (b.dev(), b.ino()) {
            bail!("Source and target cannot be the same");
        }
    }
    let graph = Arc::new(NodeGraph::new());
    let result = run_on(&graph, &args, source, target).await;
    // Every exit closes what was opened: a qcow2 opened for writing must have its
    // bitmaps stored and its dirty bit cleared, even when the backup never started.
    // (A second close after the one run_on does is a no-op.)
    let closed = graph.close_all().await;
    result?;
    closed.map_err(|e| anyhow::anyhow!("closing the images failed: {e}"))
}

async fn run_on(
    graph: &Arc<NodeGraph>,
    args: &BackupArgs,
    source_format: ImageFormat,
    target_format: ImageFormat,
) -> anyhow::Result<()> {
    // With a bitmap the source is opened for writing, so the bitmap can be stored
    // back; nothing else writes it.
    graph
        .add(node_options(
            &args.source,
            source_format,
            args.bitmap.is_none(),
            Some("source"),
        ))
        .await?;
    let source_node = graph.node("source").expect("just added");
    let source_len = source_node.length();
    if let Some(name) = &args.bitmap
        && source_node.bitmap(name).is_err()
    {
        if args.incremental {
            let _ = graph.close_all().await;
            bail!(
                "Bitmap '{name}' could not be found in '{}': start the chain with a full \
                 backup and --bitmap {name}",
                args.source.display()
            );
        }
        // A full backup starts the chain: the bitmap records from this instant.
        source_node.add_bitmap(name, args.granularity, true, false)?;
    }
    if target_format.probed && target_format.format == Format::Raw && source_len >= 4 {
        // The raw driver would refuse the first chunk anyway (EPERM); say why first.
        let first = source_node.read(0, block::IoBuf::zeroed(4)).await?;
        if first[..] == *b"QFI\xfb" {
            bail!(
                "the source begins with a qcow2 header, and writing it into '{}', whose \
                 format was only probed as raw, would make that image probe as qcow2: \
                 give --target-format raw to write it anyway",
                args.target.display()
            );
        }
    }
    // Ctrl-C and SIGTERM are watched from before the target exists (see
    // `Interrupts`): a signal before the loop below starts cancels the job at its
    // first turn instead of killing the process or being lost.
    let mut interrupts = crate::signals::Interrupts::watch()?;
    let created = !args.target.exists();
    if created {
        create_target(
            &args.target,
            target_format.format,
            source_len,
            args.backing.as_deref(),
        )?;
    }
    if let Err(e) = graph
        .add(node_options(
            &args.target,
            target_format,
            false,
            Some("target"),
        ))
        .await
    {
        if created {
            let _ = std::fs::remove_file(&args.target);
        }
        return Err(e.into());
    }
    let registry = JobRegistry::new();
    let mut events = registry.subscribe();
    let mut options = BackupOptions::new("backup");
    options.sync = args.sync;
    options.job.speed = args.speed;
    options.min_cluster_size = args.cluster_size;
    options.max_workers = args.workers;
    options.max_chunk = args.chunk_size.unwrap_or(CLI_CHUNK);
    options.compress = args.compress;
    if let Some(name) = &args.bitmap {
        options.bitmap = Some(name.clone());
        options.bitmap_mode = Some(jobs::BitmapMode::OnSuccess);
        if args.incremental {
            options.sync = SyncMode::Bitmap;
        }
    }
    let started = Instant::now();
    let (job, stats) = match start_backup(graph, &registry, "source", "target", options).await {
        Ok(started) => started,
        Err(e) => {
            let _ = graph.close_all().await;
            if created {
                let _ = std::fs::remove_file(&args.target);
            }
            bail!("{}", e.desc);
        }
    };

    let bar = progress_bar(job.progress().1, args.json);
    let mut last_line = Instant::now();
    let mut outcome: Option<Result<(), String>> = None;
    let mut interrupted: Option<&str> = None;
    loop {
        tokio::select! {
            event = events.recv() => match event {
                Ok(JobEvent::Completed { error, .. }) => outcome = Some(error.map_or(Ok(()), Err)),
                Ok(JobEvent::Cancelled { .. }) => outcome = Some(Err("cancelled".into())),
                Ok(JobEvent::StatusChange { status: JobStatus::Null, .. }) => break,
                Ok(_) => {}
                Err(_) => {
                    if job.status() == JobStatus::Null {
                        break;
                    }
                }
            },
            how = interrupts.recv(), if interrupted.is_none() => {
                interrupted = Some(how);
                let _ = job.cancel(true);
            }
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
        let (done, total) = job.progress();
        if let Some(bar) = &bar {
            bar.set_length(total);
            bar.set_position(done);
        } else if !args.json && last_line.elapsed() >= Duration::from_secs(2) {
            eprintln!(
                "backup: {done} of {total} bytes ({:.0}%)",
                percent(done, total)
            );
            last_line = Instant::now();
        }
    }
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let seconds = started.elapsed().as_secs_f64();
    // Closing writes a qcow2 target's metadata and marks it clean.
    let closed = graph.close_all().await;
    let target = args.target.display();
    match outcome {
        Some(Ok(())) => {}
        Some(Err(_)) if let Some(how) = interrupted => {
            bail!("backup cancelled ({how}); the target '{target}' is incomplete")
        }
        Some(Err(e)) => bail!("backup failed: {e}; the target '{target}' is incomplete"),
        None => bail!("backup ended without a result; the target '{target}' is incomplete"),
    }
    if let Err(e) = closed {
        bail!("closing the images failed: {e}; the target '{target}' may be incomplete");
    }
    let (data, zero, skipped) = (
        stats.data_bytes.load(Ordering::Relaxed),
        stats.zero_bytes.load(Ordering::Relaxed),
        stats.skipped_bytes.load(Ordering::Relaxed),
    );
    // The bytes the backup covered (the image's size for a full backup). The job's own
    // progress counts whole clusters, as QEMU's does, so it can be a little more.
    let len = data + zero + skipped;
    let mb_per_s = len as f64 / 1e6 / seconds.max(1e-9);
    if args.json {
        let summary = json!({
            "source": args.source, "target": args.target, "sync": format!("{:?}", args.sync).to_lowercase(),
            "bytes": len, "data-bytes": data, "zero-bytes": zero, "skipped-bytes": skipped,
            "seconds": seconds, "mb-per-second": mb_per_s,
        });
        println!("{summary}");
    } else {
        println!(
            "backed up {len} bytes in {seconds:.2} s ({mb_per_s:.1} MB/s): {data} bytes of data \
             copied, {zero} bytes of zeros left sparse, {skipped} bytes skipped"
        );
    }
    Ok(())
}

fn percent(done: u64, total: u64) -> f64 {
    if total == 0 {
        100.0
    } else {
        done as f64 * 100.0 / total as f64
    }
}
