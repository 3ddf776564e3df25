//! Off-site copies: [`Repository::sync_to`] copies snapshots into another repository
//! (another directory, another bucket, another S3 server) that holds a copy of this
//! one's `config`, and so the same chunk size, the same chunk ids and, when encrypted,
//! the same master key under the same passphrase.
//!
//! Only what the destination lacks travels. Blobs are copied as they are stored
//! (compressed and sealed: an encrypted repository stays encrypted on the way and at
//! the other end), each one checked first (opened, decompressed, its id recomputed,
//! a delta with its base), so damage is never carried over; a delta's base goes with it
//! when the destination lacks it. The destination's writes follow the repository's
//! commit order (packs, their indexes, then the manifest, byte for byte the source's),
//! under a lease there, so a collection at the destination never deletes what a sync in
//! progress relies on. A sync that stops (killed, a dead server) leaves packs no
//! snapshot names yet, which the rerun finds in the destination's index and does not
//! copy again: it resumes.

use std::collections::BTreeMap;
use std::collections::HashSet;

use super::Repository;
use super::pack_key;
use super::writer::WriteStats;
use super::writer::store_pack;
use crate::backend::Backend;
use crate::error::Error;
use crate::error::Result;
use crate::format::ChunkId;
use crate::format::PackBuilder;

/// What [`Repository::sync_to`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SyncStats {
    /// Snapshots copied.
    pub snapshots_copied: u64,
    /// Snapshots the destination held already.
    pub snapshots_present: u64,
    /// Stored chunks copied (deltas and their bases included).
    pub chunks_copied: u64,
    /// Their stored (compressed, sealed) bytes.
    pub bytes_copied: u64,
    /// Packs written at the destination.
    pub packs: u64,
}

impl Repository {
    /// Creates, in `backend`, a repository that is a copy of this one (its `config`
    /// byte for byte: same id, chunk size and wrapped key) for [`Repository::sync_to`],
    /// and opens it. A `backend` that holds a copy of this repository already is
    /// opened as it is; one that holds another repository is refused.
    pub fn copy_into(&self, backend: Box<dyn Backend>, passphrase: Option<&[u8]>) -> Result<Self> {
        let config = self.backend().get("config", None)?;
        backend.put_if_absent("config", &config)?;
        let copy = Self::open(backend, passphrase)?;
        if copy.config.id != self.config.id {
            return Err(Error::Invalid(format!(
                "the destination is another repository ({}, not a copy of {}): a sync \
                 copies into an empty place or a copy made by an earlier sync",
                copy.config.id, self.config.id
            )));
        }
        Ok(copy)
    }

    /// Copies this repository's snapshots (of `disk` only, if given) that `dest` lacks,
    /// and the chunks they name that `dest` lacks; see the module's note. `each` is told
    /// every snapshot copied, as it is committed.
    pub fn sync_to(
        &self,
        dest: &Repository,
        disk: Option<&str>,
        mut each: impl FnMut(&crate::format::SnapshotInfo),
    ) -> Result<SyncStats> {
        if dest.config.id != self.config.id {
            return Err(Error::Invalid(
                "the destination is not a copy of this repository".into(),
            ));
        }
        let _source_lease = self.lease()?;
        let _dest_lease = dest.lease()?;
        let source_index = self.load_index()?;
        let dest_index = dest.load_index()?;
        let condemned = dest.condemned_packs()?;
        let present: HashSet<String> = dest
            .backend()
            .list("snapshots/")?
            .into_iter()
            .map(|k| k.trim_start_matches("snapshots/").to_string())
            .collect();
        let mut stats = SyncStats::default();
        let mut copied: HashSet<ChunkId> = HashSet::new();
        for snapshot in self.snapshots()? {
            if disk.is_some_and(|d| d != snapshot.disk) {
                continue;
            }
            if present.contains(&snapshot.id) {
                stats.snapshots_present += 1;
                continue;
            }
            // Read once: the bytes checked are the bytes copied.
            let key = format!("snapshots/{}", snapshot.id);
            let manifest = self.backend().get(&key, None)?;
            let (_, chunks) =
                crate::format::open_manifest(&key, &snapshot.id, &manifest, self.keys.as_ref())?;
            // What the destination lacks, with the bases of deltas it lacks.
            let has = |c: &ChunkId, copied: &HashSet<ChunkId>| {
                copied.contains(c) || dest_index.contains_live(c)
            };
            let mut wanted: Vec<ChunkId> = Vec::new();
            let mut seen: HashSet<ChunkId> = HashSet::new();
            let mut queue: Vec<ChunkId> = chunks
                .iter()
                .filter(|c| **c != ChunkId::ZERO)
                .copied()
                .collect();
            while let Some(c) = queue.pop() {
                if has(&c, &copied) || !seen.insert(c) {
                    continue;
                }
                let (_, blob) = source_index.get(&c).ok_or_else(|| {
                    Error::damaged(
                        &format!("snapshots/{}", snapshot.id),
                        format!("chunk {} is in no pack", c.hex()),
                    )
                })?;
                if let Some(base) = blob.base {
                    queue.push(base);
                }
                wanted.push(c);
            }
            // By source pack and offset: one read per pack.
            let mut by_pack: BTreeMap<String, Vec<(u64, ChunkId)>> = BTreeMap::new();
            for c in &wanted {
                let (pack, blob) = source_index.get(c).expect("found above");
                by_pack
                    .entry(pack.to_string())
                    .or_default()
                    .push((blob.offset, *c));
            }
            let mut written = WriteStats::default();
            let mut store = |pack| {
                store_pack(
                    dest.backend(),
                    dest.keys.as_ref(),
                    pack,
                    &condemned,
                    &mut written,
                )
            };
            let mut pack = PackBuilder::new();
            for (source_pack, mut blobs) in by_pack {
                blobs.sort_unstable();
                let key = pack_key(&source_pack);
                let first = blobs[0].0;
                let (_, last_blob) = source_index.get(&blobs[blobs.len() - 1].1).expect("found");
                let end = last_blob.offset + u64::from(last_blob.stored_len);
                let bytes = self.backend().get(&key, Some(first..end))?;
                for (offset, c) in &blobs {
                    let (_, blob) = source_index.get(c).expect("found above");
                    let at = (offset - first) as usize;
                    let stored = bytes
                        .get(at..at + blob.stored_len as usize)
                        .ok_or_else(|| Error::damaged(&key, "shorter than its index says"))?;
                    // Checked before it travels: damage is never copied.
                    self.decode_stored(&source_index, &key, c, &blob, stored)?;
                    pack.add_blob(*c, stored, blob.raw_len, blob.codec, blob.base);
                    stats.chunks_copied += 1;
                    stats.bytes_copied += stored.len() as u64;
                    if pack.len() >= super::PACK_TARGET_BYTES {
                        pack = store(pack)?;
                    }
                }
            }
            if !pack.is_empty() {
                store(pack)?;
            }
            stats.packs += written.packs;
            copied.extend(wanted);
            // Every chunk is durable at the destination: now the manifest, as it is.
            dest.backend()
                .put_if_absent(&format!("snapshots/{}", snapshot.id), &manifest)?;
            stats.snapshots_copied += 1;
            each(&snapshot);
        }
        Ok(stats)
    }
}
