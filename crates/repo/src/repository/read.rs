//! Reading many chunks at once, for restore and for the snapshot driver's large reads:
//! the wanted blobs are grouped by pack and sorted by offset, neighbours less than
//! [`COALESCE_GAP`] apart are fetched as one range (at most [`MAX_RANGE`]), and the
//! ranges are fetched, opened, decompressed and checked on [`READ_THREADS`] threads
//! (more than the cores: a thread waiting on the disk or, later, on S3 does not
//! compute). Each chunk lands in the caller's buffer for it. A delta's base is read
//! first, the same way, into a buffer of its own ([`format::MAX_DELTA_DEPTH`] bounds
//! the rounds).

use std::collections::HashMap;
use std::sync::Mutex;

use super::Repository;
use super::pack_key;
use crate::backend::Backend;
use crate::chunk_index::ChunkIndex;
use crate::crypto::Keys;
use crate::error::Error;
use crate::error::Result;
use crate::format;
use crate::format::BlobRef;
use crate::format::ChunkId;

/// Blobs closer than this in one pack are read with one request.
pub const COALESCE_GAP: u64 = 256 << 10;

/// The longest range read with one request.
pub const MAX_RANGE: u64 = 4 << 20;

/// Threads reading ranges.
pub const READ_THREADS: usize = 4;

struct Target<'a> {
    id: ChunkId,
    blob: BlobRef,
    /// A delta's base, read.
    base: Option<&'a [u8]>,
    out: &'a mut [u8],
}

struct RangeRead<'a> {
    pack: String,
    start: u64,
    end: u64,
    targets: Vec<Target<'a>>,
}

impl Repository {
    /// Reads the chunks `wanted` names into their buffers (each exactly its chunk's
    /// length); all-zero ids are filled with zeros. Every chunk is checked against its
    /// id; the first failure is returned.
    pub fn read_chunks_into(
        &self,
        index: &ChunkIndex,
        wanted: Vec<(ChunkId, &mut [u8])>,
    ) -> Result<()> {
        self.reader().read_chunks_at_depth(index, wanted, 0)
    }

    /// One chunk's plaintext, checked against its id (a delta's base read first).
    pub fn read_chunk(&self, index: &ChunkIndex, id: &ChunkId) -> Result<Vec<u8>> {
        self.reader().read_chunk(index, id)
    }

    pub(crate) fn reader(&self) -> ChunkReader<'_> {
        ChunkReader {
            backend: &*self.backend,
            keys: self.keys.as_ref(),
        }
    }
}

/// What reading chunks needs: the backend holding the packs and the keys that open
/// them. The repository reads through one, and so do a snapshot writer's workers,
/// which hold no `Repository` (a chunk only a condemned pack holds is read back).
pub(crate) struct ChunkReader<'a> {
    pub(crate) backend: &'a dyn Backend,
    pub(crate) keys: Option<&'a Keys>,
}

impl ChunkReader<'_> {
    /// One chunk's plaintext, checked against its id (a delta's base read first).
    pub(crate) fn read_chunk(&self, index: &ChunkIndex, id: &ChunkId) -> Result<Vec<u8>> {
        let (pack, blob) = index
            .get(id)
            .ok_or_else(|| Error::NotFound(format!("chunk {} is in no pack", id.hex())))?;
        if u64::from(blob.raw_len) > format::MAX_CHUNK {
            return Err(Error::damaged(
                &pack_key(pack),
                format!("chunk {} claims {} bytes", id.hex(), blob.raw_len),
            ));
        }
        let mut out = vec![0; blob.raw_len as usize];
        self.read_chunks_at_depth(index, vec![(*id, &mut out[..])], 0)?;
        Ok(out)
    }

    fn read_chunks_at_depth(
        &self,
        index: &ChunkIndex,
        wanted: Vec<(ChunkId, &mut [u8])>,
        depth: usize,
    ) -> Result<()> {
        let mut bases: HashMap<ChunkId, Vec<u8>> = HashMap::new();
        for (id, _) in &wanted {
            let Some(base) = index.base_of(id) else {
                continue;
            };
            if depth >= format::MAX_DELTA_DEPTH {
                let pack = index.get(id).map_or("", |(p, _)| p);
                return Err(Error::damaged(
                    &pack_key(pack),
                    format!(
                        "chunk {} is a delta more than {} deep",
                        id.hex(),
                        format::MAX_DELTA_DEPTH
                    ),
                ));
            }
            // A missing base is reported by the read below; a length no chunk has is
            // damage, not a reason to allocate it.
            let len = index.get(&base).map_or(0, |(_, b)| b.raw_len);
            if u64::from(len) > format::MAX_CHUNK {
                let pack = index.get(&base).map_or("", |(p, _)| p);
                return Err(Error::damaged(
                    &pack_key(pack),
                    format!("chunk {} claims {len} bytes", base.hex()),
                ));
            }
            bases.entry(base).or_insert_with(|| vec![0; len as usize]);
        }
        if !bases.is_empty() {
            let wanted = bases.iter_mut().map(|(id, b)| (*id, &mut b[..])).collect();
            self.read_chunks_at_depth(index, wanted, depth + 1)?;
        }
        let mut by_pack: HashMap<String, Vec<Target<'_>>> = HashMap::new();
        for (id, out) in wanted {
            if id == ChunkId::ZERO {
                out.fill(0);
                continue;
            }
            let (pack, blob) = index
                .get(&id)
                .ok_or_else(|| Error::NotFound(format!("chunk {} is in no pack", id.hex())))?;
            if out.len() != blob.raw_len as usize {
                return Err(Error::damaged(
                    &pack_key(pack),
                    format!(
                        "chunk {} holds {} bytes where the snapshot needs {}",
                        id.hex(),
                        blob.raw_len,
                        out.len()
                    ),
                ));
            }
            by_pack.entry(pack.to_string()).or_default().push(Target {
                id,
                blob,
                base: blob.base.and_then(|b| bases.get(&b)).map(|b| &b[..]),
                out,
            });
        }
        let mut ranges: Vec<RangeRead<'_>> = Vec::new();
        for (pack, mut targets) in by_pack {
            targets.sort_by_key(|t| t.blob.offset);
            for t in targets {
                let (start, end) = (t.blob.offset, t.blob.offset + u64::from(t.blob.stored_len));
                match ranges.last_mut() {
                    Some(r)
                        if r.pack == pack
                            && start <= r.end + COALESCE_GAP
                            && end.max(r.end) - r.start <= MAX_RANGE =>
                    {
                        r.end = r.end.max(end);
                        r.targets.push(t);
                    }
                    _ => ranges.push(RangeRead {
                        pack: pack.clone(),
                        start,
                        end,
                        targets: vec![t],
                    }),
                }
            }
        }
        let threads = READ_THREADS.min(ranges.len());
        if threads <= 1 {
            return ranges.into_iter().try_for_each(|r| self.read_range(r));
        }
        let queue = Mutex::new(ranges);
        let failure: Mutex<Option<Error>> = Mutex::new(None);
        std::thread::scope(|scope| {
            for _ in 0..threads {
                scope.spawn(|| {
                    loop {
                        let next = queue.lock().unwrap_or_else(|e| e.into_inner()).pop();
                        let Some(range) = next else { return };
                        if let Err(e) = self.read_range(range) {
                            failure
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .get_or_insert(e);
                            queue.lock().unwrap_or_else(|e| e.into_inner()).clear();
                            return;
                        }
                    }
                });
            }
        });
        match failure.into_inner().unwrap_or_else(|e| e.into_inner()) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn read_range(&self, range: RangeRead<'_>) -> Result<()> {
        let key = pack_key(&range.pack);
        let mut bytes = self.backend.get(&key, Some(range.start..range.end))?;
        // A chunk wanted at two places is opened once; the second place copies it.
        let mut done: Option<(ChunkId, &[u8])> = None;
        for t in range.targets {
            if let Some((id, data)) = done
                && id == t.id
            {
                t.out.copy_from_slice(data);
                continue;
            }
            let at = (t.blob.offset - range.start) as usize;
            let stored = &mut bytes[at..at + t.blob.stored_len as usize];
            format::decode_delta_into(&key, self.keys, &t.id, &t.blob, stored, t.base, t.out)?;
            done = Some((t.id, &*t.out));
        }
        Ok(())
    }
}
