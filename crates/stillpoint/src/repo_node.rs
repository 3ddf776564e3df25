//! A repository snapshot as a read-only block driver, so the block layer (and the NBD
//! server over it) reads a snapshot like any image: `stillpoint nbd --repo`. All-zero
//! chunks are holes in block status. Chunks are read, opened and checked on the
//! blocking pool. A read covering several whole chunks fetches them at once (the
//! repository coalesces neighbours in a pack and reads packs on several threads:
//! restore and `qemu-img convert` read this way); for the chunks a read covers in part,
//! the last one read is kept, so small sequential reads fetch each chunk once.

use std::sync::Arc;
use std::sync::Mutex;

use async_trait::async_trait;
use block::BlockDriver;
use block::Error;
use block::ErrorKind;
use block::Extent;
use block::IoBuf;
use block::Result;
use block::Status;
use block::WriteFlags;
use repo::ChunkId;
use repo::ChunkIndex;
use repo::Repository;

/// One snapshot, read-only.
pub struct SnapshotDriver {
    repo: Arc<Repository>,
    index: Arc<ChunkIndex>,
    chunks: Vec<ChunkId>,
    size: u64,
    chunk_size: u64,
    last: Mutex<Option<(usize, Arc<Vec<u8>>)>>,
    /// Held while the snapshot is open: a collection does not delete packs condemned
    /// meanwhile (a repack's old copies, which the loaded index may still point at).
    lease: Mutex<repo::repository::gc::Lease>,
}

impl std::fmt::Debug for SnapshotDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotDriver")
            .field("size", &self.size)
            .finish()
    }
}

impl SnapshotDriver {
    /// The snapshot `id` of `repo`.
    pub fn open(repo: Arc<Repository>, id: &str) -> repo::Result<Self> {
        let lease = repo.lease()?;
        let (info, chunks) = repo.read_snapshot(id)?;
        let index = Arc::new(repo.load_index()?);
        Ok(Self {
            repo,
            index,
            chunks,
            size: info.size,
            chunk_size: info.chunk_size,
            last: Mutex::new(None),
            lease: Mutex::new(lease),
        })
    }

    async fn chunk(&self, i: usize) -> Result<Arc<Vec<u8>>> {
        if let Some((at, data)) = &*self.last.lock().unwrap_or_else(|e| e.into_inner())
            && *at == i
        {
            return Ok(data.clone());
        }
        let (repo, index, id) = (self.repo.clone(), self.index.clone(), self.chunks[i]);
        let data = tokio::task::spawn_blocking(move || repo.read_chunk(&index, &id))
            .await
            .map_err(|e| Error::new(ErrorKind::Io, format!("read task failed: {e}")))?
            .map_err(|e| Error::new(ErrorKind::Io, e.to_string()))?;
        let data = Arc::new(data);
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some((i, data.clone()));
        Ok(data)
    }
}

#[async_trait]
impl BlockDriver for SnapshotDriver {
    fn driver_name(&self) -> &'static str {
        "repository-snapshot"
    }

    fn length(&self) -> u64 {
        self.size
    }

    async fn read(&self, offset: u64, mut buf: IoBuf) -> Result<IoBuf> {
        // Renewed (rarely: once an hour) as the export is read. A failure to renew is
        // not the reader's error: the read goes on, and the lease is tried again.
        let _ = self
            .lease
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keep_alive();
        let end = offset + buf.len() as u64;
        let chunk_end = |i: u64| ((i + 1) * self.chunk_size).min(self.size);
        // The chunks wholly inside the read, fetched together when there are several.
        let first = offset.div_ceil(self.chunk_size);
        let mut last = end / self.chunk_size;
        if end == self.size {
            last = self.chunks.len() as u64;
        }
        let whole = if last > first + 1 {
            let (from, to) = (first * self.chunk_size, chunk_end(last - 1));
            let (repo, index) = (self.repo.clone(), self.index.clone());
            let ids = self.chunks[first as usize..last as usize].to_vec();
            let chunk_size = self.chunk_size as usize;
            let at = (from - offset) as usize;
            buf = tokio::task::spawn_blocking(move || {
                let area = &mut buf[at..at + (to - from) as usize];
                let wanted = ids.into_iter().zip(area.chunks_mut(chunk_size)).collect();
                repo.read_chunks_into(&index, wanted).map(|()| buf)
            })
            .await
            .map_err(|e| Error::new(ErrorKind::Io, format!("read task failed: {e}")))?
            .map_err(|e| Error::new(ErrorKind::Io, e.to_string()))?;
            Some(from..to)
        } else {
            None
        };
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            if let Some(whole) = &whole
                && whole.contains(&at)
            {
                done += (whole.end - at) as usize;
                continue;
            }
            let i = (at / self.chunk_size) as usize;
            let within = (at % self.chunk_size) as usize;
            let chunk_len = (self.size - i as u64 * self.chunk_size).min(self.chunk_size) as usize;
            let n = (chunk_len - within).min(buf.len() - done);
            let out = &mut buf[done..done + n];
            if self.chunks[i] == ChunkId::ZERO {
                out.fill(0);
            } else {
                let data = self.chunk(i).await?;
                out.copy_from_slice(&data[within..within + n]);
            }
            done += n;
        }
        Ok(buf)
    }

    async fn write(&self, _offset: u64, _buf: IoBuf, _flags: WriteFlags) -> Result<IoBuf> {
        Err(Error::new(
            ErrorKind::PermissionDenied,
            "a repository snapshot is read-only",
        ))
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        let first = (offset / self.chunk_size) as usize;
        let zero = self.chunks[first] == ChunkId::ZERO;
        let mut end = ((first as u64 + 1) * self.chunk_size).min(self.size);
        let mut i = first + 1;
        while end < offset + len
            && i < self.chunks.len()
            && (self.chunks[i] == ChunkId::ZERO) == zero
        {
            end = ((i as u64 + 1) * self.chunk_size).min(self.size);
            i += 1;
        }
        Ok(Extent {
            offset,
            length: end.min(offset + len) - offset,
            status: Status {
                data: !zero,
                zero,
                allocated: true,
                host_offset: None,
                compressed: false,
            },
        })
    }
}
