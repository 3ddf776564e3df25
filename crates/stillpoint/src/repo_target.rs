//! The `repository` block driver: a snapshot being written, as the target of one
//! backup job (`blockdev-add {"driver": "repository", "disk": ..., "size": ...}`), and
//! the opener of both repository nodes for the daemon (`snapshot`: an existing one,
//! read-only, see [`crate::repo_node`]).
//!
//! The backup's copy cluster is the repository's chunk size (the node reports it as its
//! cluster), so most writes are whole chunks, or zeros over whole chunks. Some come in
//! parts: a guest write into a chunk not copied yet saves only its own 4 KiB blocks of
//! old data (a fragment; reading the whole 256 KiB chunk first was the main cost of a
//! guest write during the backup), the background copies the rest around it, and zero
//! runs inside a chunk come as zeros. The node keeps the parts of such a chunk until
//! they cover it, each byte once, then stores it whole (`Partial`); the engine bounds
//! the fragments it lets wait (`ASSEMBLED_FRAGMENT_BYTES`). Writes are handed to a
//! feeder thread that owns the repository's snapshot writer (its worker
//! threads hash, compress and seal; its packer stores packs): the async side never
//! blocks a runtime thread, and waits only when the writer's queues are full. A write
//! therefore completes before its chunk is durable: nothing is durable before the
//! commit, which the backup job asks for once everything is copied and flushed
//! ([`BlockDriver::commit_backup`]). A backup that fails or is cancelled never commits:
//! its packs are left for a collection, or for the next attempt's dedup.
//!
//! Chunks never written by the time of the commit are the parent snapshot's (an
//! incremental backup copies only what its bitmap marks); a node without a parent of
//! the disk's size refuses to commit with chunks missing, rather than making a snapshot
//! with holes nobody wrote. A chunk still in parts at the commit fails it: taking the
//! parent's chunk there would mix old and new bytes.
//!
//! An incremental's bitmap is finer than a chunk (64 KiB against 256 KiB by default):
//! a chunk it marks only in part goes to the writer with the runs it marks and the
//! parent's chunk there ([`crate::changed_chunks`]), which stores only those runs (a
//! delta) when the chunk is new. A 64 KiB guest write then adds about 64 KiB to the
//! repository, not 256.
//!
//! The feeder and the writer's threads run at the lowest CPU priority (`SCHED_IDLE`),
//! and the repository's packs go to the device in 1 MiB writes: on a machine with few
//! cores, hashing, compressing and sealing at full speed took the CPU from the threads
//! serving the guest, and at nice 10 a guest request still waited for a worker's
//! slice to end (`bench/RESULTS.md`, issue 16).

use std::path::Path;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Mutex;

use async_trait::async_trait;
use block::BlockDriver;
use block::Error;
use block::ErrorKind;
use block::IoBuf;
use block::Limits;
use block::Result;
use block::WriteFlags;
use block::node::driver::ZeroFlags;
use block::options::DriverOptions;
use block::options::ParentSnapshot;
use block::options::RepositoryOptions;
use block::options::RepositoryRole;
use repo::ChunkId;
use repo::Repository;
use repo::repository::SnapshotWriter;
use serde_json::Value;
use serde_json::json;
use tokio::sync::mpsc;
use tokio::sync::oneshot;

use crate::repo_node::SnapshotDriver;

/// Opens `repository` nodes for the daemon's graph.
#[derive(Debug, Default)]
pub struct RepositoryDrivers;

#[async_trait]
impl block::graph::ExternalDrivers for RepositoryDrivers {
    async fn open(&self, options: &DriverOptions) -> Result<Box<dyn BlockDriver>> {
        let DriverOptions::Repository(options) = options else {
            return Err(Error::unsupported(
                "this driver is not available in the daemon",
            ));
        };
        let options = options.clone();
        tokio::task::spawn_blocking(move || open_node(&options))
            .await
            .map_err(|e| Error::new(ErrorKind::Io, format!("the open task failed: {e}")))?
    }
}

fn repo_error(dir: &Path, e: impl std::fmt::Display) -> Error {
    Error::new(ErrorKind::Io, format!("repository {}: {e}", dir.display()))
}

/// Opens the repository (the passphrase's key derivation takes a while: this runs on
/// the blocking pool) and the node the options ask for.
fn open_node(options: &RepositoryOptions) -> Result<Box<dyn BlockDriver>> {
    let dir = &options.repository;
    let mut flags = crate::repo_location::flags();
    let members = &options.s3;
    flags.endpoint = members.endpoint.clone().or(flags.endpoint);
    flags.region = members.region.clone().or(flags.region);
    flags.virtual_hosted = members.virtual_hosted.unwrap_or(flags.virtual_hosted);
    let mut repo = crate::repo_cmd::open_with(dir, options.passphrase_file.as_deref(), &flags)
        .map_err(|e| Error::invalid(format!("{e:#}")))?;
    // A live backup's hashing, compression and sealing give way to the guest.
    repo.set_background(true);
    let repo = Arc::new(repo);
    match &options.role {
        RepositoryRole::Read { snapshot } => {
            let info = repo
                .find_snapshot(snapshot)
                .map_err(|e| repo_error(dir, e))?;
            let driver = SnapshotDriver::open(repo, &info.id).map_err(|e| repo_error(dir, e))?;
            Ok(Box::new(driver))
        }
        RepositoryRole::Write {
            disk,
            size,
            parent,
            bitmap,
        } => {
            let parent = find_parent(&repo, dir, disk, parent)?;
            let target =
                SnapshotTarget::start(repo, dir.clone(), disk, *size, parent, bitmap.clone())?;
            Ok(Box::new(target))
        }
    }
}

/// The parent snapshot's id and, when it has the disk's size, its chunk list.
fn find_parent(
    repo: &Repository,
    dir: &Path,
    disk: &str,
    parent: &ParentSnapshot,
) -> Result<Option<(String, u64, Vec<ChunkId>)>> {
    let info = match parent {
        ParentSnapshot::None => return Ok(None),
        ParentSnapshot::Latest => repo
            .snapshots()
            .map_err(|e| repo_error(dir, e))?
            .into_iter()
            .rfind(|s| s.disk == disk)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "disk '{disk}' has no snapshot in {} yet: its first backup needs \
                     \"parent\": null",
                    dir.display()
                ))
            })?,
        ParentSnapshot::Id(id) => {
            let info = repo.find_snapshot(id).map_err(|e| repo_error(dir, e))?;
            if info.disk != disk {
                return Err(Error::invalid(format!(
                    "parent snapshot {} is of disk '{}', not '{disk}'",
                    info.id, info.disk
                )));
            }
            info
        }
    };
    let (_, chunks) = repo
        .read_snapshot(&info.id)
        .map_err(|e| repo_error(dir, e))?;
    Ok(Some((info.id, info.size, chunks)))
}

/// What the feeder thread is asked to do.
enum Feed {
    Data {
        first: u64,
        data: IoBuf,
    },
    Zeros {
        first: u64,
        count: u64,
    },
    Commit {
        /// Unwritten runs, taken from the parent by id.
        inherit: Vec<(u64, Vec<ChunkId>)>,
        done: oneshot::Sender<std::result::Result<String, String>>,
    },
}

/// Where the snapshot stands.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Stage {
    Writing,
    Committed(String),
    Failed(String),
}

struct Progress {
    /// Chunks written (data or zeros), by position.
    given: Vec<bool>,
    /// What an incremental backup copies ([`BlockDriver::backup_copies_only`]): with
    /// the parent's chunks, the runs a chunk's delta holds.
    changed: Option<Arc<bitmap::Bitmap>>,
    /// Chunks written in parts so far, until they are whole (see [`Partial`]).
    partial: std::collections::HashMap<u64, Partial>,
    stage: Stage,
}

/// A chunk written in parts: the guest's blocks a copy-before-write saved (a fragment),
/// the rest around them, zero runs inside it. Each part once; the chunk goes to the
/// writer when they cover it.
#[derive(Default)]
struct Partial {
    /// (offset in the chunk, length, data or `None` for zeros), in arrival order.
    pieces: Vec<(u64, u64, Option<IoBuf>)>,
    covered: u64,
}

impl Partial {
    /// The chunk's bytes, or `None` when every piece is zeros.
    fn assemble(self, len: u64) -> Option<IoBuf> {
        if self.pieces.iter().all(|(_, _, data)| data.is_none()) {
            return None;
        }
        let mut out = IoBuf::zeroed(len as usize);
        for (at, n, data) in self.pieces {
            if let Some(data) = data {
                out[at as usize..(at + n) as usize].copy_from_slice(&data);
            }
        }
        Some(out)
    }
}

/// A new snapshot of one disk, written by one backup.
pub struct SnapshotTarget {
    dir: PathBuf,
    disk: String,
    size: u64,
    chunk_size: u64,
    parent: Option<String>,
    /// The parent's chunks, when it has the disk's size (else nothing is inherited).
    parent_chunks: Option<Arc<Vec<ChunkId>>>,
    /// Taken away when the node closes.
    feed: Mutex<Option<mpsc::Sender<Feed>>>,
    progress: Arc<Mutex<Progress>>,
    feeder: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl std::fmt::Debug for SnapshotTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotTarget")
            .field("disk", &self.disk)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

impl SnapshotTarget {
    fn start(
        repo: Arc<Repository>,
        dir: PathBuf,
        disk: &str,
        size: u64,
        parent: Option<(String, u64, Vec<ChunkId>)>,
        bitmap: Option<String>,
    ) -> Result<Self> {
        let chunk_size = repo.config().chunk_size;
        let parent_id = parent.as_ref().map(|p| p.0.clone());
        let mut writer = repo
            .writer(disk, size, parent_id.clone())
            .map_err(|e| repo_error(&dir, e))?;
        writer.set_bitmap(bitmap);
        // Shared with the feeder (deltas' bases): a 10 TiB disk's list is 1.3 GB.
        let parent_chunks =
            parent.and_then(|(_, psize, chunks)| (psize == size).then_some(Arc::new(chunks)));
        let chunks = size.div_ceil(chunk_size) as usize;
        let progress = Arc::new(Mutex::new(Progress {
            given: vec![false; chunks],
            changed: None,
            partial: std::collections::HashMap::new(),
            stage: Stage::Writing,
        }));
        // A few requests queued: the writer's own queues hold the rest.
        let (feed, queue) = mpsc::channel(4);
        let feeder = {
            let progress = progress.clone();
            let deltas = parent_chunks.clone().map(|parent| Deltas {
                parent,
                chunk_size: chunk_size as usize,
            });
            std::thread::Builder::new()
                .name("repo-target".into())
                .spawn(move || {
                    let _ = repo::repository::writer::lower_thread_priority();
                    feed_writer(writer, queue, &progress, deltas.as_ref());
                })
                .map_err(|e| Error::new(ErrorKind::Io, format!("cannot start a thread: {e}")))?
        };
        Ok(Self {
            dir,
            disk: disk.to_string(),
            size,
            chunk_size,
            parent: parent_id,
            parent_chunks,
            feed: Mutex::new(Some(feed)),
            progress,
            feeder: Mutex::new(Some(feeder)),
        })
    }

    fn progress(&self) -> std::sync::MutexGuard<'_, Progress> {
        self.progress.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether writes are still taken.
    fn check_writing(progress: &Progress) -> Result<()> {
        match &progress.stage {
            Stage::Writing => Ok(()),
            Stage::Committed(id) => Err(Error::invalid(format!(
                "snapshot {id} is committed: a new backup needs a new repository node"
            ))),
            Stage::Failed(why) => Err(Error::new(ErrorKind::Io, why.clone())),
        }
    }

    /// The length of chunk `index` (the last one may be short).
    fn chunk_len(&self, index: u64) -> u64 {
        self.chunk_size.min(self.size - index * self.chunk_size)
    }

    /// The whole chunks `offset..offset+len` covers (the last one may end at the
    /// disk's end), not written before; marks them written.
    fn claim(&self, offset: u64, len: u64) -> Result<(u64, u64)> {
        let first = offset / self.chunk_size;
        let count = len.div_ceil(self.chunk_size);
        let mut progress = self.progress();
        Self::check_writing(&progress)?;
        let range = first as usize..(first + count) as usize;
        if let Some(n) = progress.given[range.clone()].iter().position(|&g| g) {
            return Err(Error::invalid(format!(
                "chunk {} of the snapshot was written already",
                first as usize + n
            )));
        }
        if let Some(n) = (first..first + count).find(|i| progress.partial.contains_key(i)) {
            return Err(Error::invalid(format!(
                "chunk {n} of the snapshot was written in part already"
            )));
        }
        progress.given[range].fill(true);
        Ok((first, count))
    }

    /// Takes a part of chunk `index`: `len` bytes at `at` inside it, `data` or zeros.
    /// Returns the chunk when this part completes it (its bytes, or `None` for zeros).
    fn add_part(
        &self,
        index: u64,
        at: u64,
        len: u64,
        data: Option<IoBuf>,
    ) -> Result<Option<Option<IoBuf>>> {
        let chunk_len = self.chunk_len(index);
        let mut progress = self.progress();
        Self::check_writing(&progress)?;
        if progress.given[index as usize] {
            return Err(Error::invalid(format!(
                "chunk {index} of the snapshot was written already"
            )));
        }
        let partial = progress.partial.entry(index).or_default();
        if let Some(&(s, n, _)) = partial
            .pieces
            .iter()
            .find(|&&(s, n, _)| s < at + len && at < s + n)
        {
            return Err(Error::invalid(format!(
                "bytes {}..{} of chunk {index} were written already",
                s.max(at),
                (s + n).min(at + len)
            )));
        }
        partial.pieces.push((at, len, data));
        partial.covered += len;
        if partial.covered < chunk_len {
            return Ok(None);
        }
        let whole = progress.partial.remove(&index).expect("just added");
        progress.given[index as usize] = true;
        drop(progress);
        Ok(Some(whole.assemble(chunk_len)))
    }

    /// Takes `len` bytes at `offset` (`data`, or zeros when `None`): whole chunks go
    /// to the writer as they are, parts of chunks wait in [`Partial`] until whole.
    async fn take(&self, op: &str, offset: u64, len: u64, data: Option<&IoBuf>) -> Result<()> {
        block::node::driver::check_request(op, offset, len, self.size)?;
        if len == 0 {
            return Err(Error::invalid(format!("{op} of 0 bytes")));
        }
        let end = offset + len;
        let cs = self.chunk_size;
        // The whole chunks in the middle, [whole_start, whole_end).
        let whole_start = offset.div_ceil(cs) * cs;
        let whole_end = if end == self.size { end } else { end / cs * cs };
        let slice = |from: u64, to: u64| -> Option<IoBuf> {
            data.map(|d| {
                if from == offset && to == end {
                    d.clone() // shares the memory
                } else {
                    IoBuf::from_slice(&d[(from - offset) as usize..(to - offset) as usize])
                }
            })
        };
        let mut parts = Vec::new();
        if whole_start < whole_end {
            if offset < whole_start {
                parts.push((offset, whole_start));
            }
            let (first, count) = self.claim(whole_start, whole_end - whole_start)?;
            let feed = match slice(whole_start, whole_end) {
                Some(data) => Feed::Data { first, data },
                None => Feed::Zeros { first, count },
            };
            self.send(feed).await?;
            if whole_end < end {
                parts.push((whole_end, end));
            }
        } else {
            // Inside one chunk, or across one chunk boundary.
            let mut at = offset;
            while at < end {
                let next = ((at / cs + 1) * cs).min(end);
                parts.push((at, next));
                at = next;
            }
        }
        for (from, to) in parts {
            let index = from / cs;
            let done = self.add_part(index, from - index * cs, to - from, slice(from, to))?;
            match done {
                None => {}
                Some(Some(data)) => self.send(Feed::Data { first: index, data }).await?,
                Some(None) => {
                    self.send(Feed::Zeros {
                        first: index,
                        count: 1,
                    })
                    .await?;
                }
            }
        }
        Ok(())
    }

    async fn send(&self, feed: Feed) -> Result<()> {
        let sender = self.feed.lock().unwrap_or_else(|e| e.into_inner()).clone();
        match sender {
            Some(sender) if sender.send(feed).await.is_ok() => Ok(()),
            _ => Err(self.failure()),
        }
    }

    fn failure(&self) -> Error {
        match &self.progress().stage {
            Stage::Failed(why) => Error::new(ErrorKind::Io, why.clone()),
            _ => Error::new(ErrorKind::Io, "the snapshot writer has stopped"),
        }
    }
}

/// What the feeder needs to hand chunks over as changed runs of the parent's.
struct Deltas {
    parent: Arc<Vec<ChunkId>>,
    chunk_size: usize,
}

/// The feeder thread: requests into the snapshot writer, in order; the first failure
/// is kept for every later request.
fn feed_writer(
    mut writer: SnapshotWriter,
    mut queue: mpsc::Receiver<Feed>,
    progress: &Mutex<Progress>,
    deltas: Option<&Deltas>,
) {
    let fail = |why: String| {
        progress.lock().unwrap_or_else(|e| e.into_inner()).stage = Stage::Failed(why);
    };
    let mut timed = false;
    while let Some(feed) = queue.blocking_recv() {
        let result = match feed {
            Feed::Data { first, data } => {
                if !timed {
                    // The snapshot's time is its backup's start, not the node's.
                    writer.set_time_now();
                    timed = true;
                }
                let changed = progress
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .changed
                    .clone();
                match (deltas, changed) {
                    (Some(deltas), Some(changed)) => crate::changed_chunks::add(
                        &mut writer,
                        &deltas.parent,
                        deltas.chunk_size,
                        &changed,
                        first,
                        data,
                    ),
                    _ => writer.add_at(first, data),
                }
            }
            Feed::Zeros { first, count } => writer.add_zeros_at(first, count),
            Feed::Commit { inherit, done } => {
                let mut result = Ok(());
                for (first, ids) in inherit {
                    result = writer.add_known_at(first, ids);
                    if result.is_err() {
                        break;
                    }
                }
                let committed = result.and_then(|()| writer.commit());
                let reply = match committed {
                    Ok((info, _)) => {
                        progress.lock().unwrap_or_else(|e| e.into_inner()).stage =
                            Stage::Committed(info.id.clone());
                        Ok(info.id)
                    }
                    Err(e) => {
                        let why = format!("the snapshot was not committed: {e}");
                        fail(why.clone());
                        Err(why)
                    }
                };
                let _ = done.send(reply);
                return;
            }
        };
        if let Err(e) = result {
            fail(format!("the snapshot writer failed: {e}"));
            return;
        }
    }
    // The node went without a commit: nothing becomes visible (dropping the writer
    // waits for its threads; what they stored is left for a collection).
}

#[async_trait]
impl BlockDriver for SnapshotTarget {
    fn driver_name(&self) -> &'static str {
        "repository"
    }

    fn length(&self) -> u64 {
        self.size
    }

    fn limits(&self) -> Limits {
        Limits {
            cluster_size: u32::try_from(self.chunk_size).ok(),
            ..Limits::default()
        }
    }

    async fn read(&self, _offset: u64, _buf: IoBuf) -> Result<IoBuf> {
        Err(Error::unsupported(
            "a repository snapshot being written cannot be read",
        ))
    }

    async fn write(&self, offset: u64, buf: IoBuf, _flags: WriteFlags) -> Result<IoBuf> {
        self.take("write", offset, buf.len() as u64, Some(&buf))
            .await?;
        Ok(buf)
    }

    async fn write_zeroes(&self, offset: u64, len: u64, _flags: ZeroFlags) -> Result<()> {
        self.take("write zeroes", offset, len, None).await
    }

    fn assembles_clusters(&self) -> bool {
        true
    }

    fn backup_copies_only(&self, changed: &bitmap::Bitmap) {
        // Only of use with a parent to take the unchanged runs from.
        if self.parent_chunks.is_some() && changed.size() == self.size {
            self.progress().changed = Some(Arc::new(changed.clone()));
        }
    }

    fn commits_backups(&self) -> bool {
        true
    }

    fn check_backup_target(&self) -> Result<()> {
        match &self.progress().stage {
            Stage::Writing => Ok(()),
            Stage::Committed(id) => Err(Error::invalid(format!(
                "the repository node holds snapshot {id}, committed: the next backup \
                 needs a new repository node"
            ))),
            Stage::Failed(why) => Err(Error::invalid(format!(
                "the repository node's snapshot failed ({why}): the next backup needs a \
                 new repository node"
            ))),
        }
    }

    async fn commit_backup(&self) -> Result<()> {
        let inherit = {
            let progress = self.progress();
            if progress.stage != Stage::Writing {
                drop(progress);
                return Err(match &self.progress().stage {
                    Stage::Committed(id) => {
                        Error::invalid(format!("snapshot {id} is committed already"))
                    }
                    _ => self.failure(),
                });
            }
            // A chunk written in part is a bug above (the backup copies every cluster
            // whole, in one piece or around its fragments), never something to fill
            // from the parent: that would keep the parent's bytes beside the new ones.
            if let Some((index, partial)) = progress.partial.iter().min_by_key(|(i, _)| **i) {
                return Err(Error::new(
                    ErrorKind::Io,
                    format!(
                        "chunk {index} was written only in part ({} of {} bytes, {} more \
                         chunks in part): the snapshot is not committed",
                        partial.covered,
                        self.chunk_len(*index),
                        progress.partial.len() - 1
                    ),
                ));
            }
            let mut runs: Vec<(u64, u64)> = Vec::new();
            for (i, &given) in progress.given.iter().enumerate() {
                if given {
                    continue;
                }
                match runs.last_mut() {
                    Some((start, end)) if *end == i as u64 => *end += 1,
                    _ => runs.push((i as u64, i as u64 + 1)),
                }
            }
            let missing: u64 = runs.iter().map(|(s, e)| e - s).sum();
            match (&self.parent_chunks, missing) {
                (_, 0) => Vec::new(),
                (Some(parent), _) => runs
                    .iter()
                    .map(|&(s, e)| (s, parent[s as usize..e as usize].to_vec()))
                    .collect(),
                (None, _) => {
                    let why = match &self.parent {
                        Some(p) => format!("its parent snapshot {p} is not of the disk's size"),
                        None => "the node has no parent snapshot to take them from".into(),
                    };
                    return Err(Error::invalid(format!(
                        "{missing} of {} chunks were never written and {why}",
                        progress.given.len()
                    )));
                }
            }
        };
        let (done, reply) = oneshot::channel();
        self.send(Feed::Commit { inherit, done }).await?;
        match reply.await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(why)) => Err(Error::new(ErrorKind::Io, why)),
            Err(_) => Err(self.failure()),
        }
    }

    async fn close(&self) -> Result<()> {
        // Closing the queue stops the feeder, which drops an uncommitted writer (and
        // waits for its threads) on its own thread.
        self.feed.lock().unwrap_or_else(|e| e.into_inner()).take();
        let feeder = self.feeder.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(feeder) = feeder {
            let _ = tokio::task::spawn_blocking(move || feeder.join()).await;
        }
        Ok(())
    }

    fn format_specific(&self) -> Option<Value> {
        let (state, snapshot) = match &self.progress().stage {
            Stage::Writing => ("writing", Value::Null),
            Stage::Committed(id) => ("committed", json!(id)),
            Stage::Failed(_) => ("failed", Value::Null),
        };
        Some(json!({"type": "repository", "data": {
            "repository": self.dir.display().to_string(),
            "disk": self.disk,
            "chunk-size": self.chunk_size,
            "parent": self.parent,
            "snapshot": snapshot,
            "state": state,
        }}))
    }
}

#[cfg(test)]
#[path = "repo_target_tests.rs"]
mod tests;
