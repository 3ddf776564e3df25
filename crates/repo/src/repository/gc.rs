//! Garbage collection beside running backups: packs are *condemned* by one collection
//! and deleted by a later one, and writer leases say when that is safe.
//!
//! Every snapshot writer holds a *lease* (`leases/ID`, holding its start time) from
//! before it loads the index until it has committed or given up. A collection:
//!
//! 1. Works out which packs the snapshots name, and how many of each pack's stored
//!    bytes they use (a chunk stored twice counts for the copy lookups prefer).
//! 2. Deletes the packs of earlier condemnations (`condemned/T-R`, a list of packs
//!    condemned at time T) that are still unreferenced, but only when no live lease
//!    started before T plus [`CONDEMN_MARGIN`]: such a writer may have deduplicated
//!    against them before they were condemned and may yet commit a snapshot naming
//!    them. A condemned pack a snapshot names again is kept (and no longer condemned).
//!    A list whose writers still run is left for the next collection.
//! 3. Repacks packs whose used bytes are less than [`REPACK_BELOW`] of them: their
//!    live blobs are checked and copied as they are (still compressed and sealed, a
//!    blob does not depend on its pack) into new packs, and the old packs condemned.
//! 4. Condemns every other pack no snapshot names, in a new list.
//!
//! Writers never deduplicate against condemned packs ([`crate::ChunkIndex`]), so a
//! writer that starts after a condemnation cannot come to depend on what the next
//! collection deletes. [`CONDEMN_MARGIN`] covers the time between reading the clock
//! and the list being visible, and clocks of hosts that share a repository being a
//! little apart. A lease not renewed for [`LEASE_TTL`] belongs to a writer that died and
//! no longer counts; holders renew theirs every [`LEASE_RENEW`] as they work. A lease
//! that cannot be read counts as a backup that runs until it has been unreadable for
//! [`LEASE_TTL`] ([`UNREADABLE_LEASES`]).
//!
//! Deleting a pack deletes its index object first, so a crash in between leaves a pack
//! without an index (unreferenced, condemned by the next collection), never an index
//! naming a missing pack. Two collections do not run at once: each holds the `gc`
//! object while it runs. A collection killed on this machine leaves that object
//! behind. The next collection replaces it once its process is gone, and only then; a
//! marker from another machine or an earlier boot needs a person to delete it.

use std::collections::HashMap;
use std::collections::HashSet;
use std::time::Duration;

use super::Repository;
use super::now_ns;
use super::pack_key;
use super::pack_list::PackList;
use super::writer::WriteStats;
use super::writer::store_pack;
use crate::error::Error;
use crate::error::Result;
use crate::format;
use crate::format::ChunkId;
use crate::format::PackBuilder;

/// How long a lease counts without its writer finishing.
pub const LEASE_TTL: Duration = Duration::from_secs(24 * 3600);

/// Writers whose lease started up to this long after a condemnation still hold up the
/// deletion of what it condemned.
pub const CONDEMN_MARGIN: Duration = Duration::from_secs(300);

/// A pack whose snapshots use less than this share of its stored bytes is repacked.
pub const REPACK_BELOW: f64 = 0.5;

/// How often a holder renews its lease (well inside [`LEASE_TTL`]).
pub const LEASE_RENEW: Duration = Duration::from_secs(3600);

/// A lease's content: its start and when its holder was last seen, in nanoseconds
/// (`START SEEN`; a lease written by the first slice holds `START` alone).
fn parse_lease(bytes: &[u8]) -> Option<(u64, u64)> {
    let text = std::str::from_utf8(bytes).ok()?;
    let mut parts = text.split_whitespace();
    let start = parts.next()?.parse::<u64>().ok()?;
    let seen = match parts.next() {
        Some(seen) => seen.parse::<u64>().ok()?,
        None => start,
    };
    Some((start, seen.max(start)))
}

/// A writer's (or a long reader's) claim on the repository; deleted when dropped.
/// It counts for [`LEASE_TTL`] after its holder was last seen: holders call
/// [`Lease::keep_alive`] as they work, which renews it every [`LEASE_RENEW`], so a
/// backup of many hours stays protected while one that died stops counting.
pub struct Lease {
    backend: std::sync::Arc<dyn crate::backend::Backend>,
    key: String,
    start: u64,
    renewed: std::time::Instant,
}

impl Lease {
    /// Renews the lease if [`LEASE_RENEW`] has passed since it was written: a new
    /// object with the same start and the time now, then the old one deleted (objects
    /// are written once; there is always one).
    pub fn keep_alive(&mut self) -> Result<()> {
        if self.renewed.elapsed() < LEASE_RENEW {
            return Ok(());
        }
        self.renew()
    }

    /// Renews the lease now.
    pub fn renew(&mut self) -> Result<()> {
        let key = lease_key(self.start);
        let content = format!("{} {}", self.start, now_ns());
        self.backend.put_if_absent(&key, content.as_bytes())?;
        let old = std::mem::replace(&mut self.key, key);
        self.renewed = std::time::Instant::now();
        self.backend.delete(&old)
    }
}

fn lease_key(start: u64) -> String {
    format!(
        "leases/{start}-{}-{}",
        std::process::id(),
        crate::hex::hex(&crate::crypto::random::<4>())
    )
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease").field("key", &self.key).finish()
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let _ = self.backend.delete(&self.key);
    }
}

/// What a collection did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct GcStats {
    /// Packs in the repository before.
    pub packs: u64,
    /// Packs deleted (condemned by an earlier collection, still unreferenced).
    pub deleted_packs: u64,
    /// Index objects deleted (their pack was deleted, or missing).
    pub deleted_indexes: u64,
    /// Packs condemned now, to be deleted by a later collection.
    pub condemned_packs: u64,
    /// Condemned packs kept for now: a backup that started before their condemnation
    /// still runs.
    pub deferred_packs: u64,
    /// Mostly-dead packs whose live chunks were copied into new packs.
    pub repacked_packs: u64,
    /// New packs those copies went into.
    pub new_packs: u64,
    /// Stored bytes of the packs deleted.
    pub freed_bytes: u64,
    /// The process id of a collection on this machine that died and left its `gc`
    /// marker, which this one replaced.
    pub stale_marker_pid: Option<u32>,
    /// Leases that could not be read, still counted as backups that run (see
    /// [`UNREADABLE_LEASES`]).
    pub unreadable_leases: u64,
    /// Unreadable leases found by a collection more than [`LEASE_TTL`] ago, deleted now.
    pub expired_unreadable_leases: u64,
}

/// Where a collection notes when it first found a lease it cannot read:
/// `leases-unreadable/NAME` for `leases/NAME`, holding that time in nanoseconds.
///
/// Such a lease (damaged on disk, or written by a newer version) holds up deletions
/// as if its backup still ran, since nothing says when its holder was last seen. It
/// does not hold them up for ever: a holder that lives renews its lease within
/// [`LEASE_RENEW`] by writing a new object and deleting this one, whatever this one
/// holds. So a lease still there [`LEASE_TTL`] after a collection first found it
/// unreadable was not renewed for at least that long, the same test a readable lease
/// fails when its holder died, and it goes.
pub const UNREADABLE_LEASES: &str = "leases-unreadable/";

/// The object that says a collection runs.
const GC_MARKER: &str = "gc";

/// Claims of collections on backends whose `put_if_absent` is not exclusive
/// ([`Repository::claim_gc`]).
pub const GC_CLAIMS: &str = "gc-claims/";

/// What a running collection writes into `gc`: when it started and which process it
/// is, as `START BOOT_ID PID_NAMESPACE PID` (a marker of the first slice holds `START`
/// alone). A process id names a process only within one boot of one machine and one
/// PID namespace (containers have their own), so only a marker of this boot and
/// namespace whose process is gone counts as left by a collection that died.
#[derive(Debug, Clone, PartialEq, Eq)]
struct GcMarker {
    start: u64,
    boot_id: String,
    pid_namespace: String,
    pid: u32,
}

impl GcMarker {
    fn ours() -> Self {
        Self {
            start: now_ns(),
            boot_id: boot_id(),
            pid_namespace: pid_namespace(),
            pid: std::process::id(),
        }
    }

    fn parse(bytes: &[u8]) -> Option<Self> {
        let text = std::str::from_utf8(bytes).ok()?;
        let mut parts = text.split_whitespace();
        let marker = Self {
            start: parts.next()?.parse().ok()?,
            boot_id: parts.next()?.to_string(),
            pid_namespace: parts.next()?.to_string(),
            pid: parts.next()?.parse().ok()?,
        };
        parts.next().is_none().then_some(marker)
    }

    /// Left by a collection of this boot and namespace whose process has ended.
    fn is_dead_here(&self) -> bool {
        let here = Self::ours();
        !self.boot_id.is_empty()
            && self.boot_id == here.boot_id
            && !self.pid_namespace.is_empty()
            && self.pid_namespace == here.pid_namespace
            && self.pid != here.pid
            && !process_exists(self.pid)
    }
}

impl std::fmt::Display for GcMarker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} {} {}",
            self.start, self.boot_id, self.pid_namespace, self.pid
        )
    }
}

/// This boot's id ("" where the kernel does not say: then no marker counts as dead).
fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// This process's PID namespace, as `pid:[INODE]` ("" where unknown).
fn pid_namespace() -> String {
    std::fs::read_link("/proc/self/ns/pid")
        .ok()
        .and_then(|p| p.to_str().map(str::to_string))
        .filter(|p| !p.contains(char::is_whitespace))
        .unwrap_or_default()
}

fn process_exists(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return true; // not a pid this kernel hands out: do not call it dead
    };
    // SAFETY: signal 0 sends nothing; it only checks that the process exists.
    let rc = unsafe { libc::kill(pid, 0) };
    // EPERM: it exists, and belongs to someone else.
    rc == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// The refusal when another collection holds `gc`.
fn running(holder: Option<&GcMarker>) -> Error {
    let who = match holder {
        Some(m) => format!(
            " (process {} of {}, started {} s ago)",
            m.pid,
            if m.boot_id == boot_id() && m.pid_namespace == pid_namespace() {
                "this machine"
            } else {
                "another machine or boot"
            },
            now_ns().saturating_sub(m.start) / 1_000_000_000
        ),
        None => String::new(),
    };
    Error::Invalid(format!(
        "another garbage collection is running{who}; if none is (one died on another \
         machine, or before this machine's last boot), delete the repository's gc object"
    ))
}

struct PackUse {
    total: u64,
    live: u64,
}

impl Repository {
    /// Takes a lease: until it is dropped (or [`LEASE_TTL`] has passed), no collection
    /// deletes packs condemned after its start. Writers take one before they load the
    /// index; so does a snapshot served over NBD, whose index stays loaded.
    pub fn lease(&self) -> Result<Lease> {
        let start = now_ns();
        let key = lease_key(start);
        self.backend()
            .put_if_absent(&key, format!("{start} {start}").as_bytes())?;
        Ok(Lease {
            backend: self.backend.clone(),
            key,
            start,
            renewed: std::time::Instant::now(),
        })
    }

    /// The condemnation lists, with their keys.
    pub fn condemnations(&self) -> Result<Vec<(String, PackList)>> {
        self.pack_lists("condemned/")
    }

    /// Every pack some condemnation names.
    pub(crate) fn condemned_packs(&self) -> Result<HashSet<String>> {
        Ok(self
            .condemnations()?
            .into_iter()
            .flat_map(|(_, c)| c.packs)
            .collect())
    }

    /// Start times of the live leases; expired ones are deleted. An unreadable lease
    /// counts as started now (the safe side) until it has been unreadable for
    /// [`LEASE_TTL`] (see [`UNREADABLE_LEASES`]).
    fn live_lease_starts(&self, now: u64, stats: &mut GcStats) -> Result<Vec<u64>> {
        let backend = self.backend();
        let ttl = LEASE_TTL.as_nanos() as u64;
        let mut starts = Vec::new();
        let mut unreadable = HashSet::new();
        for key in backend.list("leases/")? {
            let times = match backend.get(&key, None) {
                Ok(bytes) => parse_lease(&bytes),
                Err(Error::NotFound(_)) => continue,
                Err(Error::Damaged { .. }) => None,
                Err(e) => return Err(e),
            };
            match times {
                Some((_, seen)) if now.saturating_sub(seen) > ttl => {
                    backend.delete(&key)?;
                }
                Some((start, _)) => starts.push(start),
                None => {
                    let note = format!("{UNREADABLE_LEASES}{}", &key["leases/".len()..]);
                    let first_seen = self.first_seen_unreadable(&note, now)?;
                    if now.saturating_sub(first_seen) > ttl {
                        backend.delete(&key)?;
                        backend.delete(&note)?;
                        stats.expired_unreadable_leases += 1;
                    } else {
                        starts.push(now);
                        unreadable.insert(note);
                        stats.unreadable_leases += 1;
                    }
                }
            }
        }
        // Notes of leases that are gone (renewed, dropped, or deleted above).
        for note in backend.list(UNREADABLE_LEASES)? {
            if !unreadable.contains(&note) {
                backend.delete(&note)?;
            }
        }
        Ok(starts)
    }

    /// When a collection first found the lease `note` is about unreadable; notes it
    /// now if none did. A note that cannot be read itself starts again from now.
    fn first_seen_unreadable(&self, note: &str, now: u64) -> Result<u64> {
        let backend = self.backend();
        for _ in 0..2 {
            if backend.put_if_absent(note, now.to_string().as_bytes())? {
                return Ok(now);
            }
            match backend.get(note, None) {
                Ok(bytes) => {
                    let first_seen = std::str::from_utf8(&bytes)
                        .ok()
                        .and_then(|t| t.trim().parse::<u64>().ok());
                    match first_seen {
                        Some(t) => return Ok(t),
                        None => backend.delete(note)?,
                    }
                }
                Err(Error::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(now)
    }

    /// Deletes what no snapshot names (condemned by an earlier collection) and repacks
    /// mostly-dead packs; safe while backups run.
    pub fn gc(&self) -> Result<GcStats> {
        let backend = self.backend();
        let marker = GcMarker::ours();
        let claim = if backend.honours_put_if_absent() {
            None
        } else {
            Some(self.claim_gc(&marker)?)
        };
        let result = (|| {
            let mut took_over = None;
            if !backend.put_if_absent(GC_MARKER, marker.to_string().as_bytes())? {
                took_over = self.take_over_gc_marker(&marker)?;
            }
            let result = self.collect().map(|mut stats| {
                stats.stale_marker_pid = took_over;
                stats
            });
            let _ = backend.delete(GC_MARKER);
            result
        })();
        if let Some(claim) = claim {
            let _ = backend.delete(&claim);
        }
        result
    }

    /// Where [`crate::Backend::put_if_absent`] is not exclusive (an S3 server that
    /// ignores `If-None-Match`), two collections could both "create" the `gc` marker.
    /// So each first writes a claim under [`GC_CLAIMS`] and lists them: it goes on only
    /// if its claim is the only one, and withdraws it otherwise. With listings that
    /// show every object written before them (S3's read-after-write consistency), two
    /// collections cannot both see only their own claim: whichever lists second sees
    /// the first. Two that see each other both give way. Claims of collections of
    /// this machine that died are removed, as their markers are.
    fn claim_gc(&self, ours: &GcMarker) -> Result<String> {
        let backend = self.backend();
        let key = format!(
            "{GC_CLAIMS}{}-{}-{}",
            ours.start,
            ours.pid,
            crate::hex::hex(&crate::crypto::random::<4>())
        );
        backend.put_if_absent(&key, ours.to_string().as_bytes())?;
        let mut others = Vec::new();
        for claim in backend.list(GC_CLAIMS)? {
            if claim == key {
                continue;
            }
            let theirs = match backend.get(&claim, None) {
                Ok(bytes) => GcMarker::parse(&bytes),
                Err(Error::NotFound(_)) => continue,
                Err(e) => {
                    let _ = backend.delete(&key);
                    return Err(e);
                }
            };
            match theirs {
                Some(m) if m.is_dead_here() => backend.delete(&claim)?,
                other => others.push(other),
            }
        }
        if let Some(other) = others.first() {
            let _ = backend.delete(&key);
            return Err(running(other.as_ref()));
        }
        Ok(key)
    }

    /// `gc` exists: if a collection of this machine that is gone left it, replaces it
    /// with `ours` and returns the dead collection's process id; else says who holds it.
    ///
    /// Only one process may replace a given stale marker: it must first create
    /// `gc-takeover/START-PID` (named by that marker), and it deletes the marker only if
    /// `gc` still holds those bytes. Nothing else deletes a marker it did not write, so
    /// between that check and the delete no one can have put a live marker there.
    fn take_over_gc_marker(&self, ours: &GcMarker) -> Result<Option<u32>> {
        let backend = self.backend();
        let held = match backend.get(GC_MARKER, None) {
            Ok(bytes) => bytes,
            // Ended since: try once more, as if it had never been there.
            Err(Error::NotFound(_)) => {
                if backend.put_if_absent(GC_MARKER, ours.to_string().as_bytes())? {
                    return Ok(None);
                }
                return Err(running(None));
            }
            Err(e) => return Err(e),
        };
        let theirs = GcMarker::parse(&held);
        let dead = match &theirs {
            Some(m) if m.is_dead_here() => m.clone(),
            other => return Err(running(other.as_ref())),
        };
        let takeover = format!("gc-takeover/{}-{}", dead.start, dead.pid);
        if !backend.put_if_absent(&takeover, ours.to_string().as_bytes())? {
            return Err(Error::Invalid(format!(
                "another garbage collection is taking over from process {} (dead); if none \
                 is, delete the repository's gc and {takeover} objects",
                dead.pid
            )));
        }
        let replaced = (|| {
            if backend.get(GC_MARKER, None)? != held {
                return Err(running(None));
            }
            backend.delete(GC_MARKER)?;
            if !backend.put_if_absent(GC_MARKER, ours.to_string().as_bytes())? {
                return Err(running(None));
            }
            Ok(Some(dead.pid))
        })();
        let _ = backend.delete(&takeover);
        replaced
    }

    fn collect(&self) -> Result<GcStats> {
        let backend = self.backend();
        let now = now_ns();
        let mut stats = GcStats::default();
        // The leases before the snapshots: a writer whose lease is gone by now has
        // committed (or given up) before, so its snapshot is in the listing below.
        // The other order would miss a snapshot committed between the two and delete
        // its packs.
        let starts = self.live_lease_starts(now, &mut stats)?;
        let mut usage: HashMap<String, PackUse> = HashMap::new();
        let index = self.load_index_with(|pack, entries| {
            usage.insert(
                pack.to_string(),
                PackUse {
                    total: entries.iter().map(|(_, b)| u64::from(b.stored_len)).sum(),
                    live: 0,
                },
            );
        })?;
        // Which chunks the snapshots name, and so which packs and how much of each.
        let mut named: HashSet<ChunkId> = HashSet::new();
        for snapshot in self.snapshots()? {
            let chunks = match self.read_snapshot(&snapshot.id) {
                Ok((_, chunks)) => chunks,
                // Forgotten since the listing: it names nothing any more.
                Err(Error::NotFound(_)) => continue,
                Err(e) => return Err(e),
            };
            for c in chunks {
                // A named delta names its base, and the base's base (a chain is at
                // most MAX_DELTA_DEPTH long; the bound also ends a damaged loop).
                let mut next = Some(c);
                for _ in 0..=format::MAX_DELTA_DEPTH {
                    let Some(c) = next.take() else { break };
                    if c == ChunkId::ZERO || !named.insert(c) {
                        break;
                    }
                    if let Some((pack, blob)) = index.get(&c) {
                        if let Some(u) = usage.get_mut(pack) {
                            u.live += u64::from(blob.stored_len);
                        }
                        next = blob.base;
                    }
                }
            }
        }
        let live = |pack: &str| usage.get(pack).is_some_and(|u| u.live > 0);
        let packs = self.pack_ids()?;
        stats.packs = packs.len() as u64;
        let present: HashSet<&str> = packs.iter().map(String::as_str).collect();

        // Earlier condemnations: delete what is still dead, unless a writer that
        // started before (or just after) the condemnation still runs.
        let mut still_condemned: HashSet<String> = HashSet::new();
        for (key, list) in self.condemnations()? {
            let horizon = list.time_ns + self.condemn_margin.as_nanos() as u64;
            if starts.iter().any(|&s| s < horizon) {
                stats.deferred_packs += list.packs.len() as u64;
                still_condemned.extend(list.packs);
                continue;
            }
            for pack in &list.packs {
                if live(pack) {
                    continue;
                }
                // The index first: never an index naming a missing pack.
                backend.delete(&format!("index/{pack}"))?;
                if present.contains(pack.as_str()) {
                    stats.freed_bytes += usage.get(pack).map_or(0, |u| u.total);
                    backend.delete(&pack_key(pack))?;
                    stats.deleted_packs += 1;
                }
                stats.deleted_indexes += 1;
            }
            backend.delete(&key)?;
        }
        // Index objects whose pack is gone (a crash between the two deletions). The
        // indexes are listed before the packs are listed again: a writer stores a pack
        // before its index, so an index seen first whose pack is not in the later
        // listing is an orphan, while one of a pack stored since the first listing
        // is not mistaken for one.
        let indexes = backend.list("index/")?;
        let packs_now: HashSet<String> = self.pack_ids()?.into_iter().collect();
        for key in indexes {
            let pack = key.trim_start_matches("index/");
            if !packs_now.contains(pack) && !still_condemned.contains(pack) {
                backend.delete(&key)?;
                stats.deleted_indexes += 1;
            }
        }

        // Mostly-dead packs: copy their live blobs, then condemn them with the dead.
        let mut condemn: Vec<String> = Vec::new();
        let sparse: HashSet<&str> = usage
            .iter()
            .filter(|(pack, u)| {
                u.live > 0
                    && (u.live as f64) < REPACK_BELOW * u.total as f64
                    && present.contains(pack.as_str())
                    && !still_condemned.contains(pack.as_str())
            })
            .map(|(pack, _)| pack.as_str())
            .collect();
        if !sparse.is_empty() {
            let mut moved: HashMap<&str, Vec<ChunkId>> = HashMap::new();
            for c in &named {
                if let Some((pack, _)) = index.get(c)
                    && let Some(&p) = sparse.get(pack)
                {
                    moved.entry(p).or_default().push(*c);
                }
            }
            let mut pack = PackBuilder::new();
            let mut written = WriteStats::default();
            // New packs never take the name of a pack still condemned (see store_pack).
            let mut store = |pack| {
                store_pack(
                    backend,
                    self.keys.as_ref(),
                    pack,
                    &still_condemned,
                    &mut written,
                )
            };
            let mut sources: Vec<&str> = moved.keys().copied().collect();
            sources.sort();
            for source in sources {
                let key = pack_key(source);
                let whole = backend.get(&key, None)?;
                for c in &moved[source] {
                    let (_, blob) = index.get(c).expect("filed above");
                    let at = blob.offset as usize;
                    let stored = whole
                        .get(at..at + blob.stored_len as usize)
                        .ok_or_else(|| Error::damaged(&key, "shorter than its index says"))?;
                    // Checked before it is copied (a delta with its base): damage is
                    // never carried on. A delta stays a delta of the same base.
                    self.decode_stored(&index, &key, c, &blob, stored)?;
                    pack.add_blob(*c, stored, blob.raw_len, blob.codec, blob.base);
                    if pack.len() >= super::PACK_TARGET_BYTES {
                        pack = store(pack)?;
                    }
                }
                stats.repacked_packs += 1;
                condemn.push(source.to_string());
            }
            if !pack.is_empty() {
                store(pack)?;
            }
            stats.new_packs = written.packs;
        }
        for pack in &packs {
            if !live(pack) && !still_condemned.contains(pack) {
                condemn.push(pack.clone());
            }
        }
        if !condemn.is_empty() {
            condemn.sort();
            condemn.dedup();
            stats.condemned_packs = condemn.len() as u64;
            self.write_pack_list("condemned/", condemn)?;
        }
        Ok(stats)
    }
}
