//! Garbage collection, and the leases that keep it from racing a backup.
//!
//! Every snapshot writer holds a *lease* (`leases/ID`, its start time) from before it
//! loads the index until it has committed or given up. A garbage collection first
//! writes the `gc` marker, then lists the leases: it runs only when none is live, and a
//! writer, after writing its lease, gives up if it sees the marker. Each side writes
//! before it looks, so one of them always sees the other: a backup can never dedup
//! against a pack that a collection is deleting, nor commit a snapshot naming one. A
//! lease older than [`LEASE_TTL`] belongs to a writer that died and no longer counts.
//!
//! The collection deletes every pack no snapshot names (its index object first, so a
//! crash in between leaves a pack without an index, which the next collection finds
//! unreferenced too, never an index naming a missing pack), and index objects whose
//! pack is gone. Not yet: repacking packs that are mostly dead.

use std::collections::HashSet;
use std::time::Duration;

use super::Repository;
use super::now_ns;
use super::pack_key;
use crate::error::Error;
use crate::error::Result;

/// How long a lease counts without its writer finishing.
pub const LEASE_TTL: Duration = Duration::from_secs(24 * 3600);

/// A writer's claim on the repository; deleted when dropped.
#[derive(Debug)]
pub struct Lease<'r> {
    repo: &'r Repository,
    key: String,
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        let _ = self.repo.backend().delete(&self.key);
    }
}

/// What a collection did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct GcStats {
    /// Packs in the repository before.
    pub packs: u64,
    /// Packs deleted (no snapshot named a chunk in them).
    pub deleted_packs: u64,
    /// Index objects deleted (their pack was deleted, or missing).
    pub deleted_indexes: u64,
}

impl Repository {
    /// Takes a writer's lease; refused while a collection runs.
    pub fn lease(&self) -> Result<Lease<'_>> {
        let start = now_ns();
        let key = format!(
            "leases/{start}-{}-{}",
            std::process::id(),
            crate::hex::hex(&crate::crypto::random::<4>())
        );
        self.backend()
            .put_if_absent(&key, start.to_string().as_bytes())?;
        let lease = Lease { repo: self, key };
        match self.backend().get("gc", None) {
            Ok(_) => Err(Error::Invalid(
                "a garbage collection is running on this repository; try again when it ends".into(),
            )),
            Err(Error::NotFound(_)) => Ok(lease),
            Err(e) => Err(e),
        }
    }

    /// Deletes what no snapshot names; refused while a writer holds a live lease.
    pub fn gc(&self) -> Result<GcStats> {
        let backend = self.backend();
        if !backend.put_if_absent("gc", now_ns().to_string().as_bytes())? {
            return Err(Error::Invalid(
                "another garbage collection is running (if none is, one died: delete the \
                 repository's gc object)"
                    .into(),
            ));
        }
        let result = self.collect();
        let _ = backend.delete("gc");
        result
    }

    fn collect(&self) -> Result<GcStats> {
        let backend = self.backend();
        let now = now_ns();
        for key in backend.list("leases/")? {
            let start = backend
                .get(&key, None)
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .and_then(|t| t.trim().parse::<u64>().ok());
            match start {
                Some(start) if now.saturating_sub(start) > LEASE_TTL.as_nanos() as u64 => {
                    // A writer that died long ago.
                    backend.delete(&key)?;
                }
                _ => {
                    let age = start.map(|s| now.saturating_sub(s) / 1_000_000_000);
                    return Err(Error::Invalid(format!(
                        "a backup is writing to this repository (lease {key}, started {} s \
                         ago); run the garbage collection when no backup runs (the lease of \
                         a backup that died counts for 24 h; delete it if none runs)",
                        age.map_or("?".to_string(), |a| a.to_string())
                    )));
                }
            }
        }
        let index = self.load_index()?;
        let mut live: HashSet<&str> = HashSet::new();
        for snapshot in self.snapshots()? {
            let (_, chunks) = self.read_snapshot(&snapshot.id)?;
            for c in &chunks {
                if let Some((pack, _)) = index.get(c) {
                    live.insert(pack);
                }
            }
        }
        let mut stats = GcStats::default();
        let packs: Vec<String> = backend
            .list("packs/")?
            .into_iter()
            .filter_map(|k| k.rsplit('/').next().map(str::to_string))
            .collect();
        stats.packs = packs.len() as u64;
        for pack in &packs {
            if live.contains(pack.as_str()) {
                continue;
            }
            // The index first: never an index naming a missing pack.
            backend.delete(&format!("index/{pack}"))?;
            backend.delete(&pack_key(pack))?;
            stats.deleted_packs += 1;
            stats.deleted_indexes += 1;
        }
        let present: HashSet<&String> = packs.iter().collect();
        for key in backend.list("index/")? {
            let pack = key.trim_start_matches("index/").to_string();
            if !present.contains(&pack) && !live.contains(pack.as_str()) {
                backend.delete(&key)?;
                stats.deleted_indexes += 1;
            }
        }
        Ok(stats)
    }
}
