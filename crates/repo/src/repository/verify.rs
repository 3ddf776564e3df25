//! Verify: every manifest named, and every pack holding one of its chunks read whole
//! and checked (its id, its own index against the index object, each blob opened,
//! decompressed and hashed back to its id). Packs are checked on several threads.
//!
//! A verify records the packs it found sound in a `verified/T-R` object (a JSON list,
//! replacing the earlier lists: the new one is written first, then the old deleted),
//! so `verify --new` reads only packs written since: the manifests and chunk lists of
//! every snapshot asked about are still checked, and a chunk missing from every pack
//! is still found. A full verify (the default) reads everything again, which is what
//! finds bit rot in old packs.

use std::collections::HashMap;
use std::collections::HashSet;
use std::sync::Mutex;

use super::Repository;
use super::pack_key;
use super::pack_list::PackList;
use super::read::READ_THREADS;
use crate::chunk_index::ChunkIndex;
use crate::error::Error;
use crate::error::Result;
use crate::format;
use crate::format::ChunkId;

/// One pack's check: its id, the bytes read, and each bad chunk's problem.
type PackCheck = (String, u64, Vec<(ChunkId, String)>);

/// What a verify found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Per snapshot, the problems found (none for a sound one).
    pub snapshots: Vec<(String, Vec<String>)>,
    /// Packs read and checked.
    pub packs_read: u64,
    /// Bytes of those packs.
    pub bytes_read: u64,
    /// Packs not read: a verify found them sound before (`only_new`).
    pub packs_skipped: u64,
}

impl Repository {
    /// Checks snapshots (all when `ids` is empty); see [`VerifyReport`].
    pub fn verify(&self, ids: &[String]) -> Result<Vec<(String, Vec<String>)>> {
        Ok(self.verify_with(ids, false)?.snapshots)
    }

    /// Checks snapshots (all when `ids` is empty), reading only packs no earlier verify
    /// found sound when `only_new`; records the packs found sound.
    pub fn verify_with(&self, ids: &[String], only_new: bool) -> Result<VerifyReport> {
        let index = self.load_index()?;
        let listed = ids.is_empty();
        // Listed even when named: a backend's cache (S3's) trusts a copy of a manifest
        // only as the bucket's latest listing shows that object, and a verify must
        // read what the repository holds now.
        let mut all: Vec<String> = self
            .backend
            .list("snapshots/")?
            .into_iter()
            .map(|k| k.trim_start_matches("snapshots/").to_string())
            .collect();
        all.sort();
        let ids: Vec<String> = if listed { all } else { ids.to_vec() };
        let earlier = self.pack_lists("verified/")?;
        let known_sound: HashSet<&str> = earlier
            .iter()
            .flat_map(|(_, v)| v.packs.iter().map(String::as_str))
            .collect();
        let mut report = VerifyReport::default();
        let mut manifests = Vec::new();
        let mut wanted: HashMap<String, HashSet<ChunkId>> = HashMap::new();
        let mut chunk_problem: HashMap<ChunkId, String> = HashMap::new();
        let mut kept = Vec::new();
        for id in ids {
            let read = self.read_snapshot(&id);
            if listed && matches!(read, Err(Error::NotFound(_))) {
                // Listed, then forgotten by a prune: not a damaged snapshot.
                continue;
            }
            kept.push(id);
            if let Ok((_, chunks)) = &read {
                for c in chunks.iter().filter(|c| **c != ChunkId::ZERO) {
                    match index.get(c) {
                        Some((pack, _)) => {
                            wanted.entry(pack.to_string()).or_default().insert(*c);
                        }
                        None => {
                            chunk_problem.insert(*c, format!("chunk {} is in no pack", c.hex()));
                        }
                    }
                }
            }
            manifests.push(read);
        }
        let mut packs: Vec<(String, HashSet<ChunkId>)> = Vec::new();
        for (pack, chunks) in wanted {
            if only_new && known_sound.contains(pack.as_str()) {
                report.packs_skipped += 1;
            } else {
                packs.push((pack, chunks));
            }
        }
        let queue = Mutex::new(packs);
        let results: Mutex<Vec<PackCheck>> = Mutex::new(Vec::new());
        let threads = READ_THREADS.min(queue.lock().map_or(0, |q| q.len())).max(1);
        std::thread::scope(|scope| {
            for _ in 0..threads {
                scope.spawn(|| {
                    loop {
                        let next = queue.lock().unwrap_or_else(|e| e.into_inner()).pop();
                        let Some((pack, chunks)) = next else { return };
                        let (bytes, problems) = self.check_pack(&index, &pack, &chunks);
                        results
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push((pack, bytes, problems));
                    }
                });
            }
        });
        let mut sound: Vec<String> = Vec::new();
        let mut damaged: HashSet<String> = HashSet::new();
        for (pack, bytes, problems) in results.into_inner().unwrap_or_else(|e| e.into_inner()) {
            report.packs_read += 1;
            report.bytes_read += bytes;
            if problems.is_empty() {
                sound.push(pack);
            } else {
                damaged.insert(pack);
            }
            chunk_problem.extend(problems);
        }
        for (id, read) in kept.into_iter().zip(manifests) {
            let mut problems = Vec::new();
            match read {
                Err(e) => problems.push(e.to_string()),
                Ok((_, chunks)) => {
                    for c in &chunks {
                        if let Some(p) = chunk_problem.get(c)
                            && !problems.contains(p)
                        {
                            problems.push(p.clone());
                        }
                    }
                }
            }
            report.snapshots.push((id, problems));
        }
        self.record_sound(&earlier, sound, &damaged)?;
        Ok(report)
    }

    /// Reads pack `pack` whole and checks it and the chunks wanted from it; returns
    /// the bytes read and the problem of each bad chunk.
    fn check_pack(
        &self,
        index: &ChunkIndex,
        pack: &str,
        chunks: &HashSet<ChunkId>,
    ) -> (u64, Vec<(ChunkId, String)>) {
        let key = pack_key(pack);
        let keys = self.keys.as_ref();
        let checked = self.backend.get(&key, None).and_then(|bytes| {
            let (tail, blobs_end) = format::pack_tail(&key, &bytes, keys)?;
            let own = format::decode_index(&key, &tail, Some(blobs_end))?;
            let index_key = format!("index/{pack}");
            let filed =
                format::open_index_object(&index_key, &self.backend.get(&index_key, None)?, keys)?;
            let filed = format::decode_index(&index_key, &filed, None)?;
            if own != filed || crate::hex::hex(blake3::hash(&bytes).as_bytes()) != *pack {
                return Err(Error::damaged(
                    &key,
                    "the pack does not match its id or index",
                ));
            }
            Ok(bytes)
        });
        let bytes = match checked {
            Err(e) => return (0, chunks.iter().map(|c| (*c, e.to_string())).collect()),
            Ok(bytes) => bytes,
        };
        let mut problems = Vec::new();
        for c in chunks {
            let (_, blob) = index.get(c).expect("filed by the caller");
            let start = blob.offset as usize;
            let stored = bytes.get(start..start + blob.stored_len as usize);
            let checked = match stored {
                // A delta is checked whole: its base is read too.
                Some(stored) => self.decode_stored(index, &key, c, &blob, stored).map(drop),
                None => Err(Error::damaged(&key, "shorter than its index says")),
            };
            if let Err(e) = checked {
                problems.push((*c, e.to_string()));
            }
        }
        (bytes.len() as u64, problems)
    }

    /// One list of every pack found sound (earlier lists' packs that still exist and
    /// were not found `damaged` now, and `sound`), written before the earlier lists
    /// are deleted.
    fn record_sound(
        &self,
        earlier: &[(String, PackList)],
        sound: Vec<String>,
        damaged: &HashSet<String>,
    ) -> Result<()> {
        if sound.is_empty() && damaged.is_empty() {
            return Ok(());
        }
        let present: HashSet<String> = self.pack_ids()?.into_iter().collect();
        let mut packs: Vec<String> = earlier
            .iter()
            .flat_map(|(_, v)| v.packs.iter().cloned())
            .chain(sound)
            .filter(|p| present.contains(p) && !damaged.contains(p))
            .collect();
        packs.sort();
        packs.dedup();
        self.write_pack_list("verified/", packs)?;
        for (old, _) in earlier {
            self.backend.delete(old)?;
        }
        Ok(())
    }
}
