//! `stillpoint repo ...`, `backup --repo` and `restore --repo`: the CLI of the backup
//! repository (`crates/repo`). One-line summaries, `--json` for scripts, exit 1 with
//! one line on failure.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use anyhow::bail;
use block::AttachUser;
use block::IoBuf;
use block::NodeGraph;
use repo::Compression;
use repo::Repository;
use repo::repository::gc::LEASE_TTL;
use serde_json::json;

use crate::image::Format;
use crate::image::ImageFormat;
use crate::image::node_options;
use crate::image::resolve_format;
use crate::repo_location;

/// The passphrase: the first line of `file`, else `STILLPOINT_PASSPHRASE`, else none.
pub(crate) fn passphrase(file: Option<&Path>) -> anyhow::Result<Option<Vec<u8>>> {
    let pass = match file {
        Some(file) => {
            let text = std::fs::read(file)
                .with_context(|| format!("cannot read the passphrase file {}", file.display()))?;
            let line = text
                .split(|&b| b == b'\n')
                .next()
                .unwrap_or_default()
                .to_vec();
            Some(line)
        }
        None => std::env::var_os("STILLPOINT_PASSPHRASE").map(|p| p.into_encoded_bytes()),
    };
    if pass.as_ref().is_some_and(|p| p.is_empty()) {
        bail!("the passphrase is empty");
    }
    Ok(pass)
}

/// Opens the repository at `dir` (a directory or `s3://BUCKET/PREFIX`, reached with
/// the command line's `--s3-*` flags), with the passphrase if one is given.
pub fn open(dir: &Path, pass_file: Option<&Path>) -> anyhow::Result<Repository> {
    open_with(dir, pass_file, &repo_location::flags())
}

/// [`open`], reaching S3 with `flags`.
pub fn open_with(
    dir: &Path,
    pass_file: Option<&Path>,
    flags: &repo_location::S3Flags,
) -> anyhow::Result<Repository> {
    let pass = passphrase(pass_file)?;
    repo_location::backend(dir, flags, false)
        .and_then(|backend| Ok(Repository::open(backend, pass.as_deref())?))
        .with_context(|| format!("cannot open the repository {}", dir.display()))
}

/// `repo init DIR`, encrypted with `--encrypt`.
pub fn init(
    dir: &Path,
    chunk_size: u64,
    compression: Compression,
    encrypt: bool,
    pass_file: Option<&Path>,
) -> anyhow::Result<()> {
    let pass = if encrypt {
        let Some(pass) = passphrase(pass_file)? else {
            bail!("--encrypt needs a passphrase: --passphrase-file FILE or STILLPOINT_PASSPHRASE");
        };
        Some(pass)
    } else {
        None
    };
    let repo = repo_location::backend(dir, &repo_location::flags(), true)
        .and_then(|backend| {
            Ok(Repository::init(
                backend,
                chunk_size,
                compression,
                pass.as_deref(),
            )?)
        })
        .with_context(|| format!("cannot create a repository in {}", dir.display()))?;
    println!(
        "created repository {} in {} (chunk size {}, compression {:?}{})",
        repo.config().id,
        dir.display(),
        crate::info::human_size(chunk_size),
        compression,
        if encrypt { ", encrypted" } else { "" }
    );
    Ok(())
}

/// `backup SOURCE --repo DIR --disk NAME [--bitmap B]`.
pub struct RepoBackup<'a> {
    pub source: &'a Path,
    pub source_format: Option<Format>,
    pub dir: &'a Path,
    pub pass_file: Option<&'a Path>,
    pub disk: &'a str,
    /// The source's persistent dirty bitmap that makes the backup incremental.
    pub bitmap: Option<&'a str>,
    /// Granularity of a bitmap this backup creates.
    pub granularity: Option<u64>,
    pub json: bool,
}

/// What a backup reads.
enum Reading {
    /// Every chunk; `why`, when there is a bitmap and it could not be used.
    Whole { why: Option<String> },
    /// Only the chunks the bitmap marks; the rest are the parent's.
    Changed {
        parent: Vec<repo::ChunkId>,
        marked: bitmap::Bitmap,
    },
}

/// `backup SOURCE --repo DIR --disk NAME`: a snapshot of SOURCE as it is now (nobody
/// else may write it: without a bitmap it is opened read-only). With `--bitmap`, the
/// source's persistent bitmap says what changed since the disk's latest snapshot, if
/// that snapshot was taken with this bitmap (the manifest records it): only those
/// chunks are read, the rest are taken from that snapshot by id. The bitmap is cleared
/// once the new snapshot is committed, never before, so a failure anywhere leaves it
/// marking at least everything that changed.
pub async fn backup(args: RepoBackup<'_>) -> anyhow::Result<()> {
    let started = Instant::now();
    let repo = open(args.dir, args.pass_file)?;
    let format = resolve_format(args.source, args.source_format, "--source-format")?;
    let graph = NodeGraph::new();
    let result = backup_on(&graph, &repo, &args, format).await;
    // Closing stores the bitmaps (a cleared or a new one) and marks a qcow2 clean.
    let closed = graph.close_all().await;
    let summary = result?;
    if let Err(e) = closed {
        bail!(
            "snapshot {} is committed, but closing the source failed: {e}; its bitmap may \
             mark more than changed (the next backup reads more, loses nothing)",
            summary.snapshot
        );
    }
    summary.print(args.json, started.elapsed().as_secs_f64());
    Ok(())
}

/// What `backup --repo` prints.
struct BackupSummary {
    snapshot: String,
    disk: String,
    size: u64,
    parent: Option<String>,
    read: u64,
    stats: repo::repository::WriteStats,
    bitmap: Option<String>,
    incremental: bool,
    whole_read_why: Option<String>,
}

impl BackupSummary {
    fn print(&self, json: bool, seconds: f64) {
        let stats = &self.stats;
        if json {
            let summary = json!({
                "snapshot": self.snapshot, "disk": self.disk, "size": self.size,
                "parent": self.parent, "read": self.read, "new": stats.new_bytes,
                "stored": stats.stored_bytes, "chunks": stats.chunks,
                "zero_chunks": stats.zero_chunks, "deduplicated_chunks": stats.deduplicated,
                "new_chunks": stats.new_chunks, "delta_chunks": stats.delta_chunks,
                "seconds": seconds,
                "bitmap": self.bitmap, "incremental": self.incremental,
                "whole_read_because": self.whole_read_why,
            });
            println!("{summary}");
            return;
        }
        let how = match (&self.bitmap, self.incremental, &self.whole_read_why) {
            (Some(b), true, _) => format!(" (incremental by bitmap {b})"),
            (Some(_), false, Some(why)) => format!(" (the whole disk read: {why})"),
            _ => String::new(),
        };
        let deltas = match stats.delta_chunks {
            0 => String::new(),
            n => format!(", {n} of them as deltas of their parent's"),
        };
        println!(
            "snapshot {} of {}: {} read{how}, {} new ({} stored{deltas}), {} of {} chunks \
             already in the repository, {} zero, {seconds:.2} s",
            self.snapshot,
            self.disk,
            crate::info::human_size(self.read),
            crate::info::human_size(stats.new_bytes),
            crate::info::human_size(stats.stored_bytes),
            stats.deduplicated,
            stats.chunks,
            stats.zero_chunks
        );
    }
}

async fn backup_on(
    graph: &NodeGraph,
    repo: &Repository,
    args: &RepoBackup<'_>,
    format: ImageFormat,
) -> anyhow::Result<BackupSummary> {
    let disk = args.disk;
    let top = open_direct(
        graph,
        node_options(args.source, format, args.bitmap.is_none(), None),
    )
    .await?;
    let node = graph.attach(top.name(), AttachUser::Other("backup".into()))?;
    let size = node.length();
    let chunk = repo.config().chunk_size;
    let latest = repo.snapshots()?.into_iter().rfind(|s| s.disk == disk);
    let parent = latest.as_ref().map(|s| s.id.clone());
    // What the bitmap allows, and the bitmap to clear once the snapshot is committed.
    let mut tracking = None;
    let reading = match args.bitmap {
        None => Reading::Whole { why: None },
        Some(name) => {
            let (bitmap, why) = match top.bitmap(name) {
                Err(_) => (
                    top.add_bitmap(name, args.granularity, true, false)?,
                    Some(format!("bitmap {name} was created")),
                ),
                Ok(b) if b.info().inconsistent => {
                    // Not saved cleanly (a crash): it may miss changes.
                    top.remove_bitmap(name)?;
                    let fresh = top.add_bitmap(name, args.granularity, true, false)?;
                    (
                        fresh,
                        Some(format!("bitmap {name} was inconsistent, made anew")),
                    )
                }
                Ok(b) if !b.info().recording => {
                    bail!(
                        "bitmap {name} of '{}' is disabled: it does not record changes",
                        args.source.display()
                    );
                }
                Ok(b) => (b, None),
            };
            let reading = match (why, &latest) {
                (Some(why), _) => Reading::Whole { why: Some(why) },
                (None, None) => Reading::Whole {
                    why: Some(format!("no snapshot of {disk} yet")),
                },
                (None, Some(p)) if p.bitmap.as_deref() != Some(name) => Reading::Whole {
                    why: Some(format!(
                        "the latest snapshot of {disk}, {}, was not taken with bitmap {name}",
                        p.id
                    )),
                },
                (None, Some(p)) if p.size != size => Reading::Whole {
                    why: Some(format!(
                        "the disk is {size} bytes, its latest snapshot {} bytes",
                        p.size
                    )),
                },
                (None, Some(p)) => Reading::Changed {
                    parent: repo.read_snapshot(&p.id)?.1,
                    marked: bitmap.snapshot(),
                },
            };
            tracking = Some((name.to_string(), bitmap));
            reading
        }
    };
    let mut writer = repo.writer(disk, size, parent.clone())?;
    writer.set_bitmap(tracking.as_ref().map(|(name, _)| name.clone()));
    let bar = crate::backup::progress_bar(size, args.json);
    let mut read = 0u64;
    // Reads of several chunks at a time (each read and block-status query is a trip
    // through the blocking pool), handed to the writer's threads whole: the next read
    // runs while they hash, compress and store this one.
    let batch = chunk.max(4 << 20);
    let chunks = size.div_ceil(chunk);
    let mut first = 0u64;
    while first < chunks {
        let mut count = (batch / chunk).min(chunks - first);
        if let Reading::Changed { parent, marked } = &reading {
            // A run of chunks all marked, or all unmarked, from `first`.
            let marked_at = |i: u64| {
                marked
                    .next_set(i * chunk)
                    .is_some_and(|at| at < ((i + 1) * chunk).min(size))
            };
            let changed = marked_at(first);
            count = (1..count)
                .find(|&n| marked_at(first + n) != changed)
                .unwrap_or(count);
            if !changed {
                let ids = parent[first as usize..(first + count) as usize].to_vec();
                writer.add_known_at(first, ids)?;
                first += count;
                if let Some(bar) = &bar {
                    bar.set_position((first * chunk).min(size));
                }
                continue;
            }
        }
        let offset = first * chunk;
        let len = (count * chunk).min(size - offset);
        // A range the image says reads as zeros is not read.
        let extent = node.block_status(offset, len).await?;
        if extent.status.zero && extent.length >= len {
            writer.add_zeros_at(first, count)?;
        } else {
            let buf = node.read(offset, IoBuf::zeroed(len as usize)).await?;
            read += len;
            match &reading {
                // A chunk the bitmap marks in part goes as a delta of its parent's.
                Reading::Changed { parent, marked } => {
                    crate::changed_chunks::add(
                        &mut writer,
                        parent,
                        chunk as usize,
                        marked,
                        first,
                        buf,
                    )?;
                }
                Reading::Whole { .. } => writer.add_at(first, buf)?,
            }
        }
        first += count;
        if let Some(bar) = &bar {
            bar.set_position(offset + len);
        }
    }
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    drop(node);
    let (info, stats) = writer.commit()?;
    // Committed: from now on the bitmap records changes since this snapshot.
    if let Some((_, bitmap)) = &tracking {
        bitmap.clear()?;
    }
    let (incremental, whole_read_why) = match reading {
        Reading::Changed { .. } => (true, None),
        Reading::Whole { why } => (false, why),
    };
    Ok(BackupSummary {
        snapshot: info.id,
        disk: disk.to_string(),
        size,
        parent,
        read,
        stats,
        bitmap: tracking.map(|(name, _)| name),
        incremental,
        whole_read_why,
    })
}

/// A time in nanoseconds since the epoch as UTC ISO 8601, to the second.
fn iso_time(ns: u64) -> String {
    let secs = ns / 1_000_000_000;
    let (year, month, day) = repo::retention::civil((secs / 86400) as i64);
    let rest = secs % 86400;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rest / 3600,
        rest / 60 % 60,
        rest % 60
    )
}

/// The snapshots of `disk` (all when none is given), oldest first.
fn snapshots_of(
    repo: &Repository,
    disk: Option<&str>,
) -> anyhow::Result<Vec<repo::format::SnapshotInfo>> {
    Ok(repo
        .snapshots()?
        .into_iter()
        .filter(|s| disk.is_none_or(|d| s.disk == d))
        .collect())
}

/// `repo snapshots DIR [--disk NAME] [--json]`.
pub fn snapshots(
    dir: &Path,
    pass_file: Option<&Path>,
    disk: Option<&str>,
    json: bool,
) -> anyhow::Result<()> {
    let repo = open(dir, pass_file)?;
    let list = snapshots_of(&repo, disk)?;
    if json {
        let out: Vec<_> = list
            .iter()
            .map(|s| {
                json!({"id": s.id, "disk": s.disk, "time": iso_time(s.time_ns),
                       "size": s.size, "stored": s.stored, "parent": s.parent,
                       "bitmap": s.bitmap})
            })
            .collect();
        println!("{}", serde_json::Value::Array(out));
        return Ok(());
    }
    println!(
        "{:<16}  {:<20}  {:<20}  {:>10}  {:>10}",
        "ID", "DISK", "TIME", "SIZE", "STORED"
    );
    for s in &list {
        println!(
            "{:<16}  {:<20}  {:<20}  {:>10}  {:>10}",
            s.id,
            s.disk,
            iso_time(s.time_ns),
            crate::info::human_size(s.size),
            crate::info::human_size(s.stored)
        );
    }
    Ok(())
}

/// Opens an image with `cache.direct` where its filesystem allows, else buffered. A
/// backup reads every byte once and a restore writes every byte once and syncs: the
/// page cache would only cost a copy (and evict what the host had cached); on this VM
/// a buffered write and sync of 1 GiB took 3.5 s, a direct one 0.8 s.
async fn open_direct(
    graph: &NodeGraph,
    mut options: block::options::BlockdevOptions,
) -> anyhow::Result<Arc<block::Node>> {
    options.cache.direct = Some(true);
    match graph.open(options.clone()).await {
        Ok(node) => Ok(node),
        Err(e) if e.to_string().contains("cache.direct") => {
            options.cache.direct = None;
            Ok(graph.open(options).await?)
        }
        Err(e) => Err(e.into()),
    }
}

/// Bytes copied per request in a restore: many chunks, so one request reads several
/// packs' ranges in parallel.
const RESTORE_STEP: u64 = 8 << 20;

/// Bytes of data being read ahead of the extent being written.
const READ_AHEAD: u64 = 32 << 20;

/// `restore --repo DIR SNAPSHOT TARGET`: a copy, through the block layer, from the
/// snapshot's read-only node to a new sparse raw file or qcow2 image. All-zero chunks
/// are holes in the snapshot's block status and are not written; the next range is
/// read while the last one is written.
pub async fn restore(
    dir: &Path,
    pass_file: Option<&Path>,
    spec: &str,
    target: &Path,
    target_format: Option<Format>,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let repo = open(dir, pass_file)?;
    let info = repo.find_snapshot(spec)?;
    // A new image only: restoring over an existing one would destroy it before the
    // snapshot is known to be readable.
    if target.exists() {
        bail!("{} exists: restore writes a new image", target.display());
    }
    let format = target_format.unwrap_or(Format::Raw);
    let driver = crate::repo_node::SnapshotDriver::open(Arc::new(repo), &info.id)?;
    let size = info.size;
    // Watched before the image exists, so a Ctrl-C or SIGTERM never leaves a
    // half-written image that looks like a whole one.
    let mut interrupts = crate::signals::Interrupts::watch()?;
    crate::backup::create_target(target, format, size, None)?;
    let copied = tokio::select! {
        copied = copy_snapshot(Box::new(driver), target, format, size) => copied,
        how = interrupts.recv() => Err(anyhow::anyhow!(
            "restore {how}; the half-written image '{}' was removed",
            target.display()
        )),
    };
    if copied.is_err() {
        let _ = std::fs::remove_file(target);
    }
    let written = copied?;
    println!(
        "restored snapshot {} of {} to {} ({}): {} written, {} left as holes, {:.2} s",
        info.id,
        info.disk,
        target.display(),
        match format {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        },
        crate::info::human_size(written),
        crate::info::human_size(size - written),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Copies what `snapshot` reads into the image at `target`; returns the bytes written.
async fn copy_snapshot(
    snapshot: Box<dyn block::BlockDriver>,
    target: &Path,
    format: Format,
    size: u64,
) -> anyhow::Result<u64> {
    let graph = NodeGraph::new();
    let copied = async {
        graph.add_driver("snapshot", snapshot, true).await?;
        let image = ImageFormat::given(format);
        open_direct(&graph, node_options(target, image, false, Some("target"))).await?;
        let from = Arc::new(graph.attach("snapshot", AttachUser::Other("restore".into()))?);
        let to = graph.attach("target", AttachUser::Other("restore".into()))?;
        let bar = crate::backup::progress_bar(size, false);
        let mut written = 0u64;
        let mut offset = 0u64;
        let mut reads: std::collections::VecDeque<(
            u64,
            tokio::task::JoinHandle<block::Result<IoBuf>>,
        )> = std::collections::VecDeque::new();
        let mut ahead = 0u64;
        loop {
            // Keep up to READ_AHEAD bytes of data extents being read while one is
            // written. Each extent (at most RESTORE_STEP) is one request: its chunks
            // come from their packs in parallel, and its buffer is written as it is,
            // so holes stay holes and nothing is copied.
            while ahead < READ_AHEAD && offset < size {
                let extent = from
                    .block_status(offset, RESTORE_STEP.min(size - offset))
                    .await?;
                let (at, len) = (offset, extent.length);
                offset += len;
                if extent.status.zero {
                    continue;
                }
                let from = from.clone();
                ahead += len;
                reads.push_back((
                    at,
                    tokio::spawn(async move { from.read(at, IoBuf::zeroed(len as usize)).await }),
                ));
            }
            let Some((at, next)) = reads.pop_front() else {
                break;
            };
            let buf = next.await.context("a restore read task failed")??;
            let len = buf.len() as u64;
            ahead -= len;
            to.write(at, buf, block::WriteFlags::default()).await?;
            written += len;
            if let Some(bar) = &bar {
                bar.set_position(at + len);
            }
        }
        to.flush().await?;
        if let Some(bar) = &bar {
            bar.finish_and_clear();
        }
        anyhow::Ok(written)
    }
    .await;
    // Closing writes a qcow2 target's metadata and marks it clean.
    let closed = graph.close_all().await;
    let written = copied?;
    closed.context("cannot close the restored image")?;
    Ok(written)
}

/// `repo verify DIR [SNAPSHOT...] [--json]`: exit 1 naming every damaged snapshot.
pub fn verify(
    dir: &Path,
    pass_file: Option<&Path>,
    specs: &[String],
    only_new: bool,
    json: bool,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let repo = open(dir, pass_file)?;
    let mut ids = Vec::new();
    for spec in specs {
        ids.push(repo.find_snapshot(spec)?.id);
    }
    let full = repo.verify_with(&ids, only_new)?;
    let report = &full.snapshots;
    let damaged: Vec<&str> = report
        .iter()
        .filter(|(_, problems)| !problems.is_empty())
        .map(|(id, _)| id.as_str())
        .collect();
    if json {
        let out: Vec<_> = report
            .iter()
            .map(
                |(id, problems)| json!({"id": id, "ok": problems.is_empty(), "problems": problems}),
            )
            .collect();
        println!("{}", serde_json::Value::Array(out));
    } else {
        for (id, problems) in report {
            if problems.is_empty() {
                println!("{id}: ok");
            }
            for p in problems {
                println!("{id}: {p}");
            }
        }
        println!(
            "verified {} snapshots: {} packs read ({}), {} skipped as verified before, {:.2} s",
            report.len(),
            full.packs_read,
            crate::info::human_size(full.bytes_read),
            full.packs_skipped,
            started.elapsed().as_secs_f64()
        );
    }
    if !damaged.is_empty() {
        bail!("damaged snapshots: {}", damaged.join(", "));
    }
    Ok(())
}

/// `repo prune DIR --keep-...`: deletes the snapshots no rule keeps (per disk).
pub fn prune(
    dir: &Path,
    pass_file: Option<&Path>,
    disk: Option<&str>,
    policy: &repo::retention::Policy,
    dry_run: bool,
) -> anyhow::Result<()> {
    if policy.is_empty() {
        bail!("give at least one --keep-* rule (prune would delete every snapshot)");
    }
    let repo = open(dir, pass_file)?;
    let all = snapshots_of(&repo, disk)?;
    let kept = repo::retention::keep(&all, policy);
    let remove: Vec<String> = all
        .iter()
        .filter(|s| !kept.contains(&s.id))
        .map(|s| s.id.clone())
        .collect();
    for s in &all {
        let verdict = if kept.contains(&s.id) {
            "keep"
        } else if dry_run {
            "would remove"
        } else {
            "remove"
        };
        println!(
            "{verdict:<12}  {}  {:<20}  {}",
            s.id,
            s.disk,
            iso_time(s.time_ns)
        );
    }
    if !dry_run {
        repo.forget(&remove)?;
    }
    println!(
        "{} kept, {} {} (`repo gc` frees the space only they used)",
        kept.len(),
        remove.len(),
        if dry_run {
            "would be removed"
        } else {
            "removed"
        }
    );
    Ok(())
}

/// `repo forget DIR ID...`: deletes exactly these snapshots. Every id is checked before
/// any is deleted, so a typo deletes nothing (and a disk's name is not taken for its
/// latest snapshot here, unlike `restore`: forgetting is not undone).
pub fn forget(dir: &Path, pass_file: Option<&Path>, ids: &[String]) -> anyhow::Result<()> {
    let repo = open(dir, pass_file)?;
    let all = repo.snapshots()?;
    let unknown: Vec<&str> = ids
        .iter()
        .filter(|id| !all.iter().any(|s| &s.id == *id))
        .map(String::as_str)
        .collect();
    if !unknown.is_empty() {
        bail!(
            "no snapshot with id {} (nothing was deleted; `repo snapshots` lists the ids)",
            unknown.join(", ")
        );
    }
    let mut unique = ids.to_vec();
    unique.sort();
    unique.dedup();
    repo.forget(&unique)?;
    println!(
        "{} removed (`repo gc` frees the space only they used)",
        unique.len()
    );
    Ok(())
}

/// `repo stats DIR [--json]`.
pub fn stats(dir: &Path, pass_file: Option<&Path>, json: bool) -> anyhow::Result<()> {
    let stats = open(dir, pass_file)?.stats()?;
    if json {
        println!("{}", serde_json::to_value(stats)?);
        return Ok(());
    }
    let ratio = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    let deltas = match stats.delta_chunks {
        0 => String::new(),
        n => format!(", {n} of them deltas"),
    };
    println!(
        "{} snapshots of {} in all; {} unique chunks ({} plain, {} stored{deltas}) in {} \
         packs; logical / stored = {:.2}",
        stats.snapshots,
        crate::info::human_size(stats.logical_bytes),
        stats.chunks,
        crate::info::human_size(stats.chunk_bytes),
        crate::info::human_size(stats.stored_bytes),
        stats.packs,
        ratio(stats.logical_bytes, stats.stored_bytes)
    );
    Ok(())
}

/// `repo gc DIR`.
/// `repo sync SRC DST [--disk NAME]`: copies SRC's snapshots that DST lacks.
pub fn sync(
    src: &Path,
    dst: &Path,
    disk: Option<&str>,
    pass_file: Option<&Path>,
    json: bool,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let source = open(src, pass_file)?;
    let pass = passphrase(pass_file)?;
    let dest = repo_location::backend(dst, &repo_location::flags(), true)
        .and_then(|backend| Ok(source.copy_into(backend, pass.as_deref())?))
        .with_context(|| {
            format!(
                "cannot open {} as a copy of {}",
                dst.display(),
                src.display()
            )
        })?;
    let stats = source
        .sync_to(&dest, disk, |snapshot| {
            if !json {
                println!(
                    "copied snapshot {} of {} ({})",
                    snapshot.id,
                    snapshot.disk,
                    crate::info::human_size(snapshot.size)
                );
            }
        })
        .with_context(|| format!("sync from {} to {} stopped", src.display(), dst.display()))?;
    let seconds = started.elapsed().as_secs_f64();
    if json {
        let summary = json!({
            "snapshots_copied": stats.snapshots_copied,
            "snapshots_present": stats.snapshots_present,
            "chunks_copied": stats.chunks_copied, "bytes_copied": stats.bytes_copied,
            "packs": stats.packs, "seconds": seconds,
        });
        println!("{summary}");
    } else {
        println!(
            "synced {} to {}: {} snapshots copied, {} there already; {} chunks ({}) in {} \
             packs; {seconds:.2} s",
            src.display(),
            dst.display(),
            stats.snapshots_copied,
            stats.snapshots_present,
            stats.chunks_copied,
            crate::info::human_size(stats.bytes_copied),
            stats.packs
        );
    }
    Ok(())
}

pub fn gc(dir: &Path, pass_file: Option<&Path>) -> anyhow::Result<()> {
    let started = Instant::now();
    let stats = open(dir, pass_file)?.gc()?;
    if let Some(pid) = stats.stale_marker_pid {
        println!(
            "an earlier garbage collection (process {pid} of this machine) died and left \
             its gc marker; replaced it"
        );
    }
    if stats.unreadable_leases > 0 {
        println!(
            "{} lease(s) under leases/ could not be read; each counts as a backup that still \
             runs, holding up deletions, until {} h after a collection first found it \
             unreadable (leases-unreadable/ says when); delete one whose backup you know \
             has ended to lift that sooner",
            stats.unreadable_leases,
            LEASE_TTL.as_secs() / 3600
        );
    }
    if stats.expired_unreadable_leases > 0 {
        println!(
            "deleted {} lease(s) unreadable for more than {} h: their holders stopped \
             renewing them",
            stats.expired_unreadable_leases,
            LEASE_TTL.as_secs() / 3600
        );
    }
    println!(
        "garbage collection: {} packs; {} deleted ({} freed), {} index objects deleted; \
         {} repacked into {} new; {} condemned now (deleted by the next collection); \
         {} held back while backups that started before their condemnation run; {:.2} s",
        stats.packs,
        stats.deleted_packs,
        crate::info::human_size(stats.freed_bytes),
        stats.deleted_indexes,
        stats.repacked_packs,
        stats.new_packs,
        stats.condemned_packs,
        stats.deferred_packs,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
