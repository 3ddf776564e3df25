//! The repository's library, end to end: snapshots round-trip, a second backup stores
//! only what changed, every flipped byte is found, collections run beside backups.
//! The tests marked `store_matrix!` run twice: on a local directory and on a bucket
//! of a real S3 server (SeaweedFS) with the local cache.

mod common;

use common::Store;
use repo::ChunkId;
use repo::Compression;
use repo::Error;
use repo::LocalDir;
use repo::Repository;
use repo::repository::gc;
use testkit::Rng;

const CHUNK: u64 = 64 << 10;

/// A disk of `chunks` chunks plus `tail` bytes: random data, zeros, compressible text.
fn disk(seed: u64, chunks: u64, tail: u64) -> Vec<u8> {
    let mut rng = Rng(seed);
    let mut out = Vec::new();
    for i in 0..chunks {
        match i % 3 {
            0 => out.extend(rng.bytes(CHUNK as usize)),
            1 => out.extend(std::iter::repeat_n(0u8, CHUNK as usize)),
            _ => out.extend(
                format!("chunk {i} ")
                    .repeat(CHUNK as usize / 4)
                    .bytes()
                    .take(CHUNK as usize),
            ),
        }
    }
    out.extend(rng.bytes(tail as usize));
    out
}

fn backup(
    repo: &Repository,
    name: &str,
    data: &[u8],
) -> (repo::format::SnapshotInfo, repo::repository::WriteStats) {
    let mut w = repo.writer(name, data.len() as u64, None).unwrap();
    for chunk in data.chunks(CHUNK as usize) {
        w.add_chunk(chunk).unwrap();
    }
    w.commit().unwrap()
}

fn restore(repo: &Repository, id: &str) -> Vec<u8> {
    let index = repo.load_index().unwrap();
    let (info, chunks) = repo.read_snapshot(id).unwrap();
    let mut out = Vec::new();
    for (i, c) in chunks.iter().enumerate() {
        let len = (info.size - i as u64 * info.chunk_size).min(info.chunk_size) as usize;
        if *c == ChunkId::ZERO {
            out.extend(std::iter::repeat_n(0u8, len));
        } else {
            out.extend(repo.read_chunk(&index, c).unwrap());
        }
    }
    out
}

/// A new repository in `store`.
fn init(
    store: &Store,
    chunk: u64,
    compression: Compression,
    passphrase: Option<&[u8]>,
) -> repo::Result<Repository> {
    Repository::init(store.backend(), chunk, compression, passphrase)
}

fn open(store: &Store) -> Repository {
    open_with(store, None)
}

fn open_with(store: &Store, passphrase: Option<&[u8]>) -> Repository {
    Repository::open(store.backend(), passphrase).unwrap()
}

/// Runs each test body (`fn NAME(store: Store)`) on a local directory (`NAME_local`)
/// and on S3 (`NAME_s3`).
macro_rules! store_matrix {
    ($($name:ident),* $(,)?) => {
        mod local {
            $(#[test] fn $name() { super::$name(super::Store::local()) })*
        }
        mod s3 {
            $(#[test] fn $name() { super::$name(super::Store::s3()) })*
        }
    };
}

store_matrix!(
    a_snapshot_restores_byte_for_byte_and_a_second_backup_stores_only_what_changed,
    a_flipped_byte_in_any_pack_index_or_manifest_is_detected,
    a_flipped_byte_in_an_encrypted_repository_is_detected_too,
    gc_condemns_then_deletes_and_a_backup_running_beside_it_stays_complete,
    a_writer_never_relies_on_a_condemned_pack_it_makes_again,
    gc_repacks_a_mostly_dead_pack_and_the_snapshot_still_restores,
    verify_new_reads_only_packs_written_since_the_last_verify,
    concurrent_backups_prune_and_gc_keep_every_surviving_snapshot_whole,
    an_incremental_takes_unchanged_chunks_by_id_and_stores_again_those_only_a_condemned_pack_holds,
);

fn a_snapshot_restores_byte_for_byte_and_a_second_backup_stores_only_what_changed(store: Store) {
    let repo = init(&store, CHUNK, Compression::Zstd, None).unwrap();
    assert!(init(&store, CHUNK, Compression::Zstd, None).is_err());
    let first = disk(1, 30, 4097);
    let (a, stats) = backup(&repo, "vm1", &first);
    assert_eq!(stats.chunks, 31);
    assert_eq!(stats.zero_chunks, 10);
    assert_eq!(stats.new_chunks, 21);
    assert!(
        stats.stored_bytes < stats.new_bytes,
        "the text chunks compress"
    );
    assert_eq!(restore(&open(&store), &a.id), first);

    // Change two chunks: only they are new.
    let mut second = first.clone();
    second[5 * CHUNK as usize] ^= 1;
    second[(7 * CHUNK + 100) as usize] = 0xaa;
    let (b, stats) = backup(&repo, "vm1", &second);
    // Chunk 7 was zeros and is data now: 22 data chunks, 2 of them new.
    assert_eq!((stats.new_chunks, stats.deduplicated), (2, 20));
    assert_eq!(restore(&repo, &b.id), second);
    assert_eq!(restore(&repo, &a.id), first);

    // Another disk with the same data stores nothing new.
    let (_, stats) = backup(&repo, "vm2", &first);
    assert_eq!(stats.new_chunks, 0);

    let list = repo.snapshots().unwrap();
    assert_eq!(list.len(), 3);
    assert_eq!(repo.find_snapshot("vm1").unwrap().id, b.id);
    assert_eq!(repo.find_snapshot(&a.id).unwrap().disk, "vm1");
    assert!(matches!(
        repo.find_snapshot("nosuch"),
        Err(Error::NotFound(_))
    ));
    assert!(
        repo.verify(&[])
            .unwrap()
            .iter()
            .all(|(_, problems)| problems.is_empty())
    );
}

#[test]
fn a_writer_refuses_chunks_of_the_wrong_size_and_an_unfinished_snapshot_is_not_visible() {
    let store = Store::local();
    let repo = init(&store, CHUNK, Compression::None, None).unwrap();
    let mut w = repo.writer("d", 3 * CHUNK, None).unwrap();
    assert!(w.add_chunk(&[1; 100]).is_err());
    w.add_chunk(&vec![1; CHUNK as usize]).unwrap();
    drop(w);
    assert!(repo.snapshots().unwrap().is_empty());
    let mut w = repo.writer("d", 3 * CHUNK, None).unwrap();
    w.add_chunk(&vec![1; CHUNK as usize]).unwrap();
    assert!(w.commit().is_err(), "two chunks are missing");
    assert!(init(&store, 3000, Compression::None, None).is_err());
}

/// Flips one byte in the middle of every object under `prefix` in turn; each time,
/// reading or verifying must report damage, and putting the byte back heals it.
fn flipped_bytes_are_detected(store: &Store, passphrase: Option<&[u8]>) {
    let repo = init(store, CHUNK, Compression::Zstd, passphrase).unwrap();
    let data = disk(7, 12, 0);
    let (snap, _) = backup(&repo, "vm1", &data);
    let mut keys = Vec::new();
    for prefix in ["packs/", "index/", "snapshots/"] {
        keys.extend(store.keys(prefix));
    }
    assert!(keys.len() >= 3);
    // Opened once: it reads every object afresh on each verify (on S3, its cache holds
    // the index objects and manifests, and must not serve a copy the bucket no longer
    // holds).
    let reopened = open_with(store, passphrase);
    assert_eq!(restore(&reopened, &snap.id), data);
    let mut rng = Rng(3);
    let flips = if store.is_s3() { 3 } else { 8 };
    for key in keys {
        let original = store.read(&key);
        for _ in 0..flips {
            let mut bad = original.clone();
            let at = rng.below(bad.len() as u64) as usize;
            bad[at] ^= 1 << rng.below(8);
            store.overwrite(&key, &bad);
            let found = match reopened.verify(std::slice::from_ref(&snap.id)) {
                Ok(report) => !report[0].1.is_empty(),
                Err(_) => true,
            };
            assert!(found, "a flip at {at} of {key} went unnoticed");
        }
        store.overwrite(&key, &original);
        assert_eq!(restore(&reopened, &snap.id), data);
    }
}

fn a_flipped_byte_in_any_pack_index_or_manifest_is_detected(store: Store) {
    flipped_bytes_are_detected(&store, None);
}

fn a_flipped_byte_in_an_encrypted_repository_is_detected_too(store: Store) {
    flipped_bytes_are_detected(&store, Some(b"correct horse"));
}

#[test]
fn an_encrypted_repository_needs_its_passphrase_and_shows_no_plaintext() {
    let store = Store::local();
    let pass: &[u8] = b"correct horse";
    let repo = init(&store, CHUNK, Compression::None, Some(pass)).unwrap();
    // Text that would show in a plain pack.
    let data = "a secret line of the guest's disk\n".repeat(2 * CHUNK as usize / 34 + 1);
    let data = &data.as_bytes()[..2 * CHUNK as usize];
    let (snap, _) = backup(&repo, "vm1", data);
    for file in walk(store.path()) {
        let bytes = std::fs::read(&file).unwrap();
        assert!(
            !bytes.windows(10).any(|w| w == b"a secret l"),
            "{} shows plaintext",
            file.display()
        );
        assert!(
            !bytes.windows(3).any(|w| w == b"vm1") || file.ends_with("config"),
            "{} names the disk",
            file.display()
        );
    }
    let no = Repository::open(Box::new(LocalDir::new(store.path())), None).unwrap_err();
    assert!(no.to_string().contains("encrypted"), "{no}");
    let wrong =
        Repository::open(Box::new(LocalDir::new(store.path())), Some(b"wrong")).unwrap_err();
    assert_eq!(wrong.to_string(), "wrong passphrase");
    let repo = open_with(&store, Some(pass));
    assert_eq!(restore(&repo, &snap.id), data);
    // The same data in a plain repository gets other ids: ids are keyed.
    let plain_dir = Store::local();
    let plain = init(&plain_dir, CHUNK, Compression::None, None).unwrap();
    backup(&plain, "vm1", data);
    let (_, enc_chunks) = repo.read_snapshot(&snap.id).unwrap();
    let plain_snap = plain.snapshots().unwrap().remove(0);
    let (_, plain_chunks) = plain.read_snapshot(&plain_snap.id).unwrap();
    assert_ne!(enc_chunks[0], plain_chunks[0]);
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

fn gc_condemns_then_deletes_and_a_backup_running_beside_it_stays_complete(store: Store) {
    let repo = init(&store, CHUNK, Compression::Zstd, None).unwrap();
    let a_data = disk(21, 9, 0);
    // Nothing in common with a's (the text chunks of disk() repeat across seeds).
    let b_data = Rng(22).bytes(9 * CHUNK as usize);
    let (a, _) = backup(&repo, "a", &a_data);
    let (b, _) = backup(&repo, "b", &b_data);
    assert_eq!(store.keys("packs/").len(), 2);
    assert_eq!(
        repo.gc().unwrap().condemned_packs,
        0,
        "both packs are named"
    );

    // A backup that starts before the collection deduplicates against a's pack, which
    // no snapshot names any more; the collections while it runs must not delete it.
    repo.forget(std::slice::from_ref(&a.id)).unwrap();
    let mut writer = repo.writer("c", a_data.len() as u64, None).unwrap();
    for chunk in a_data.chunks(CHUNK as usize) {
        writer.add_chunk(chunk).unwrap();
    }
    let first = repo.gc().unwrap();
    assert_eq!((first.condemned_packs, first.deleted_packs), (1, 0));
    let second = repo.gc().unwrap();
    assert_eq!((second.deferred_packs, second.deleted_packs), (1, 0));
    let (c, stats) = writer.commit().unwrap();
    assert_eq!(stats.new_chunks, 0, "every chunk was deduplicated");
    let third = repo.gc().unwrap();
    assert_eq!(third.deleted_packs, 0, "c names the condemned pack: kept");
    assert_eq!(restore(&repo, &c.id), a_data);
    assert!(repo.verify(&[]).unwrap().iter().all(|(_, p)| p.is_empty()));

    // Unreferenced again: condemned by one collection, deleted by the next; a lease
    // left by a writer that died long ago does not hold that up.
    store.overwrite("leases/1-1-dead", b"1");
    repo.forget(std::slice::from_ref(&c.id)).unwrap();
    assert_eq!(repo.gc().unwrap().condemned_packs, 1);
    let stats = repo.gc().unwrap();
    assert_eq!((stats.packs, stats.deleted_packs), (2, 1));
    assert!(store.keys("leases/").is_empty());
    assert_eq!(store.keys("packs/").len(), 1);
    assert_eq!(store.keys("index/").len(), 1);
    assert_eq!(restore(&repo, &b.id), b_data);

    // A writer that starts after a condemnation stores the chunks again rather than
    // depend on a pack about to go.
    repo.forget(std::slice::from_ref(&b.id)).unwrap();
    assert_eq!(repo.gc().unwrap().condemned_packs, 1);
    let (b2, stats) = backup(&repo, "b", &b_data);
    assert_eq!(stats.new_chunks, 9);
    // (Had its threads packed the chunks in b's order, the pack would be b's, by name:
    // it is stored under another name rather than rely on a condemned pack.)
    assert_eq!(repo.gc().unwrap().deleted_packs, 1);
    assert_eq!(restore(&repo, &b2.id), b_data);
    assert!(repo.verify(&[]).unwrap().iter().all(|(_, p)| p.is_empty()));

    // Two collections never run at once.
    store.overwrite("gc", b"1");
    assert!(repo.gc().is_err(), "a second collection");
}

fn a_writer_never_relies_on_a_condemned_pack_it_makes_again(store: Store) {
    // Packs are named by their digest: one chunk, unencrypted, makes the same pack
    // every time. A writer that starts after that pack's condemnation (past the
    // margin, so no collection waits for it) must not find "its" pack already there
    // and rely on it: the next collection deletes what was condemned.
    let mut repo = init(&store, CHUNK, Compression::Zstd, None).unwrap();
    repo.set_condemn_margin(std::time::Duration::ZERO);
    let data = Rng(31).bytes(CHUNK as usize);
    let (a, _) = backup(&repo, "a", &data);
    repo.forget(std::slice::from_ref(&a.id)).unwrap();
    assert_eq!(repo.gc().unwrap().condemned_packs, 1);
    std::thread::sleep(std::time::Duration::from_millis(5));
    let (b, stats) = backup(&repo, "b", &data);
    assert_eq!(
        stats.new_chunks, 1,
        "not deduplicated against the condemned pack"
    );
    assert_eq!(
        store.keys("packs/").len(),
        2,
        "stored under a name of its own"
    );
    let gc = repo.gc().unwrap();
    assert_eq!((gc.deleted_packs, gc.packs), (1, 2));
    assert_eq!(restore(&repo, &b.id), data);
    assert!(repo.verify(&[]).unwrap().iter().all(|(_, p)| p.is_empty()));
}

fn gc_repacks_a_mostly_dead_pack_and_the_snapshot_still_restores(store: Store) {
    for passphrase in [None, Some(&b"pw"[..])] {
        let store = store.another();
        let repo = init(&store, CHUNK, Compression::Zstd, passphrase).unwrap();
        let old = Rng(31).bytes(8 * CHUNK as usize);
        let mut new = old.clone();
        new[2 * CHUNK as usize..].copy_from_slice(&Rng(32).bytes(6 * CHUNK as usize));
        let (s1, _) = backup(&repo, "d", &old);
        let (s2, _) = backup(&repo, "d", &new);
        repo.forget(std::slice::from_ref(&s1.id)).unwrap();
        let stats = repo.gc().unwrap();
        assert_eq!(
            (stats.repacked_packs, stats.new_packs, stats.condemned_packs),
            (1, 1, 1),
            "{stats:?}"
        );
        assert_eq!(restore(&repo, &s2.id), new);
        let stats = repo.gc().unwrap();
        assert_eq!(stats.deleted_packs, 1, "{stats:?}");
        assert_eq!(store.keys("packs/").len(), 2);
        let repo = open_with(&store, passphrase);
        assert_eq!(restore(&repo, &s2.id), new);
        assert!(repo.verify(&[]).unwrap().iter().all(|(_, p)| p.is_empty()));
        let stored = repo.stats().unwrap();
        assert_eq!(stored.chunks, 8, "only the live chunks remain");
    }
}

fn verify_new_reads_only_packs_written_since_the_last_verify(store: Store) {
    let repo = init(&store, CHUNK, Compression::Zstd, None).unwrap();
    let (a, _) = backup(&repo, "a", &Rng(41).bytes(5 * CHUNK as usize));
    let first = repo.verify_with(&[], true).unwrap();
    assert_eq!((first.packs_read, first.packs_skipped), (1, 0));
    let a_pack = store.keys("packs/");
    let (b, _) = backup(&repo, "b", &Rng(42).bytes(5 * CHUNK as usize));
    let b_pack: Vec<_> = store
        .keys("packs/")
        .into_iter()
        .filter(|p| !a_pack.contains(p))
        .collect();
    let second = repo.verify_with(&[], true).unwrap();
    assert_eq!((second.packs_read, second.packs_skipped), (1, 1));
    let third = repo.verify_with(&[], true).unwrap();
    assert_eq!((third.packs_read, third.packs_skipped), (0, 2));
    assert_eq!(store.keys("verified/").len(), 1, "one list kept");

    // Damage in a pack verified before: --new does not read it, a full verify finds it.
    let flip = |key: &str| {
        let mut bytes = store.read(key);
        bytes[100] ^= 1;
        store.overwrite(key, &bytes);
    };
    flip(&a_pack[0]);
    let quick = repo.verify_with(&[], true).unwrap();
    assert!(quick.snapshots.iter().all(|(_, p)| p.is_empty()));
    let full = repo.verify_with(&[], false).unwrap();
    let bad: Vec<&str> = full
        .snapshots
        .iter()
        .filter(|(_, p)| !p.is_empty())
        .map(|(id, _)| id.as_str())
        .collect();
    assert_eq!(bad, vec![a.id.as_str()]);
    // A pack found damaged is not recorded sound: --new reads it again and fails.
    let again = repo.verify_with(&[], true).unwrap();
    assert_eq!(again.packs_read, 1);
    assert!(!again.snapshots.iter().all(|(_, p)| p.is_empty()));

    // A new pack damaged before its first verify is read by --new.
    let (c, _) = backup(&repo, "c", &Rng(43).bytes(5 * CHUNK as usize));
    let c_pack: Vec<_> = store
        .keys("packs/")
        .into_iter()
        .filter(|p| !a_pack.contains(p) && !b_pack.contains(p))
        .collect();
    flip(&c_pack[0]);
    let quick = repo.verify_with(std::slice::from_ref(&c.id), true).unwrap();
    assert!(!quick.snapshots[0].1.is_empty(), "{quick:?}");
    assert!(
        repo.verify(std::slice::from_ref(&b.id)).unwrap()[0]
            .1
            .is_empty()
    );
}

/// Three disks backed up over and over into one repository at once, while a fourth
/// thread prunes each disk to its newest two snapshots and collects garbage: at the end
/// every surviving snapshot verifies and restores to exactly the disk it was taken of,
/// and the collections did delete packs along the way.
fn concurrent_backups_prune_and_gc_keep_every_surviving_snapshot_whole(store: Store) {
    use std::collections::HashMap;
    use std::sync::Mutex;
    use std::sync::atomic::AtomicBool;
    use std::sync::atomic::Ordering;

    init(&store, CHUNK, Compression::Zstd, None).unwrap();
    let mut repo = open(&store);
    // Writers here share one clock, and a list is visible long before a second passes.
    repo.set_condemn_margin(std::time::Duration::from_secs(1));
    let repo = &repo;
    let taken: Mutex<HashMap<String, Vec<u8>>> = Mutex::new(HashMap::new());
    let done = AtomicBool::new(false);
    let deleted = std::sync::atomic::AtomicU64::new(0);
    std::thread::scope(|scope| {
        let writers: Vec<_> = (0..3u64)
            .map(|d| {
                let taken = &taken;
                scope.spawn(move || {
                    let mut rng = Rng(100 + d);
                    // Shared chunks across disks (the same seeded base), so dedup
                    // crosses writers, and fresh ones each round.
                    let mut data = Rng(7).bytes(12 * CHUNK as usize);
                    let mut history: Vec<Vec<u8>> = Vec::new();
                    for round in 0..12 {
                        // Now and then the disk goes back to an earlier state (a
                        // rollback): its chunks are then only in packs of snapshots
                        // pruned, perhaps condemned, which is what GC must not delete
                        // under a writer that deduplicates against them.
                        if history.len() >= 3 && rng.below(2) == 0 {
                            data = history[history.len() - 3 + rng.below(1) as usize].clone();
                        }
                        for _ in 0..3 {
                            let at = rng.below(12) as usize * CHUNK as usize;
                            let fresh = rng.bytes(CHUNK as usize);
                            data[at..at + CHUNK as usize].copy_from_slice(&fresh);
                        }
                        history.push(data.clone());
                        // Slowly, so that collections run while it writes.
                        let name = format!("disk{d}");
                        let mut w = repo.writer(&name, data.len() as u64, None).unwrap();
                        for chunk in data.chunks(CHUNK as usize) {
                            w.add_chunk(chunk).unwrap();
                            std::thread::sleep(std::time::Duration::from_millis(20 + round));
                        }
                        let (info, _) = w.commit().unwrap();
                        taken.lock().unwrap().insert(info.id, data.clone());
                    }
                })
            })
            .collect();
        let collector = scope.spawn(|| {
            while !done.load(Ordering::SeqCst) {
                let all = repo.snapshots().unwrap();
                let mut forget = Vec::new();
                for d in 0..3 {
                    let mine: Vec<_> = all
                        .iter()
                        .filter(|s| s.disk == format!("disk{d}"))
                        .collect();
                    if mine.len() > 2 {
                        forget.extend(mine[..mine.len() - 2].iter().map(|s| s.id.clone()));
                    }
                }
                repo.forget(&forget).unwrap();
                let stats = repo.gc().unwrap();
                deleted.fetch_add(stats.deleted_packs, Ordering::SeqCst);
                std::thread::sleep(std::time::Duration::from_millis(150));
            }
        });
        // Every writer's end is awaited before the collector is stopped, and a writer
        // that panicked fails the test afterwards (rather than leave the collector
        // running forever).
        let ended: Vec<_> = writers.into_iter().map(|w| w.join()).collect();
        done.store(true, Ordering::SeqCst);
        collector.join().unwrap();
        for e in ended {
            if let Err(panic) = e {
                std::panic::resume_unwind(panic);
            }
        }
    });
    std::thread::sleep(std::time::Duration::from_millis(1100));
    repo.gc().unwrap();
    deleted.fetch_add(repo.gc().unwrap().deleted_packs, Ordering::SeqCst);
    assert!(
        deleted.load(Ordering::SeqCst) > 0,
        "the collections deleted nothing"
    );
    let survivors = repo.snapshots().unwrap();
    assert!(survivors.len() >= 6, "{} survivors", survivors.len());
    let report = repo.verify(&[]).unwrap();
    assert!(report.iter().all(|(_, p)| p.is_empty()), "{report:?}");
    let taken = taken.into_inner().unwrap();
    for s in &survivors {
        assert_eq!(
            restore(repo, &s.id),
            taken[&s.id],
            "snapshot {} of {}",
            s.id,
            s.disk
        );
    }
}

#[test]
fn a_renewed_lease_holds_up_deletion_for_a_long_backup_and_a_stale_one_does_not() {
    let store = Store::local();
    let repo = init(&store, CHUNK, Compression::Zstd, None).unwrap();
    let (a, _) = backup(&repo, "a", &Rng(51).bytes(3 * CHUNK as usize));
    repo.forget(std::slice::from_ref(&a.id)).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let two_days = 2 * 86_400 * 1_000_000_000u64;
    // A backup that started two days ago and renewed its lease just now.
    let lease = store.path().join("leases/1-1-long");
    std::fs::write(&lease, format!("{} {now}", now - two_days)).unwrap();
    assert_eq!(repo.gc().unwrap().condemned_packs, 1);
    let held = repo.gc().unwrap();
    assert_eq!((held.deferred_packs, held.deleted_packs), (1, 0));
    // Not seen for two days: its holder died.
    std::fs::write(&lease, format!("{} {}", now - two_days, now - two_days)).unwrap();
    assert_eq!(repo.gc().unwrap().deleted_packs, 1);
    assert!(!lease.exists());

    // Renewing writes a new object with the same start and drops the old one.
    let start = |p: &std::path::Path| {
        let text = std::fs::read_to_string(p).unwrap();
        text.split_whitespace().next().unwrap().to_string()
    };
    let mut held = repo.lease().unwrap();
    let before = walk(&store.path().join("leases"));
    let started = start(&before[0]);
    held.renew().unwrap();
    let after = walk(&store.path().join("leases"));
    assert_eq!(after.len(), 1);
    assert_ne!(before, after);
    assert_eq!(start(&after[0]), started);
    drop(held);
    assert!(store.keys("leases/").is_empty());
}

#[test]
fn an_unreadable_lease_holds_up_deletion_for_a_day_after_it_is_found_not_for_ever() {
    let store = Store::local();
    let repo = init(&store, CHUNK, Compression::Zstd, None).unwrap();
    let (a, _) = backup(&repo, "a", &Rng(52).bytes(3 * CHUNK as usize));
    let (b, _) = backup(&repo, "b", &Rng(53).bytes(2 * CHUNK as usize));
    repo.forget(std::slice::from_ref(&a.id)).unwrap();
    let lease = store.path().join("leases/1-1-torn");
    let note = store.path().join("leases-unreadable/1-1-torn");
    std::fs::write(&lease, "not a lease").unwrap();
    let first = repo.gc().unwrap();
    assert_eq!((first.condemned_packs, first.unreadable_leases), (1, 1));
    let first_seen: u64 = std::fs::read_to_string(&note).unwrap().parse().unwrap();
    let held = repo.gc().unwrap();
    assert_eq!((held.deferred_packs, held.deleted_packs), (1, 0));
    assert_eq!(held.unreadable_leases, 1);
    assert_eq!(
        std::fs::read_to_string(&note)
            .unwrap()
            .parse::<u64>()
            .unwrap(),
        first_seen,
        "the first finding stands"
    );
    assert!(lease.exists());

    // Found unreadable more than a day ago: a holder that lived would have replaced it.
    let day_and_more = gc::LEASE_TTL.as_nanos() as u64 + 1_000_000_000;
    std::fs::remove_file(&note).unwrap();
    std::fs::write(&note, (first_seen - day_and_more).to_string()).unwrap();
    let stats = repo.gc().unwrap();
    assert_eq!(stats.expired_unreadable_leases, 1);
    assert_eq!((stats.deleted_packs, stats.unreadable_leases), (1, 0));
    assert!(!lease.exists() && !note.exists());
    assert_eq!(restore(&repo, &b.id), Rng(53).bytes(2 * CHUNK as usize));

    // A note whose lease is gone goes too; so does a damaged note, which starts again.
    std::fs::write(&lease, "").unwrap();
    store.overwrite("leases-unreadable/1-1-gone", b"5");
    std::fs::write(&note, "garbage").unwrap();
    let stats = repo.gc().unwrap();
    assert_eq!(
        (stats.unreadable_leases, stats.expired_unreadable_leases),
        (1, 0)
    );
    assert_eq!(
        walk(&store.path().join("leases-unreadable")),
        vec![note.clone()]
    );
    let again: u64 = std::fs::read_to_string(&note).unwrap().parse().unwrap();
    assert!(again >= first_seen);
    std::fs::remove_file(&lease).unwrap();
    repo.gc().unwrap();
    assert!(walk(&store.path().join("leases-unreadable")).is_empty());
}

#[test]
fn a_collection_that_died_on_this_machine_does_not_block_the_next() {
    // What a `repo gc` killed mid-run leaves is its `gc` marker. The next collection
    // replaces a marker whose process is gone (same boot, same PID namespace), and
    // refuses every other one, leaving it as it was.
    let store = Store::local();
    let repo = init(&store, CHUNK, Compression::Zstd, None).unwrap();
    let data = Rng(41).bytes(3 * CHUNK as usize);
    let (a, _) = backup(&repo, "a", &data);
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    let boot = boot.trim();
    let ns = std::fs::read_link("/proc/self/ns/pid").unwrap();
    let ns = ns.to_str().unwrap();
    let marker = store.path().join("gc");
    let mut child = std::process::Command::new("true").spawn().unwrap();
    child.wait().unwrap();
    let dead = child.id();
    let mut live = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .unwrap();

    // Refused, and left alone: a live process, another boot, the first slice's format,
    // a takeover already under way.
    let takeover = store.path().join("gc-takeover").join(format!("5-{dead}"));
    std::fs::create_dir_all(takeover.parent().unwrap()).unwrap();
    std::fs::write(&takeover, "x").unwrap();
    for (held, says) in [
        (format!("5 {boot} {ns} {}", live.id()), "of this machine"),
        (
            format!("5 another-boot {ns} {dead}"),
            "another machine or boot",
        ),
        ("5".to_string(), "another garbage collection is running"),
        (format!("5 {boot} {ns} {dead}"), "taking over from process"),
    ] {
        std::fs::write(&marker, &held).unwrap();
        let err = repo.gc().unwrap_err().to_string();
        assert!(err.contains(says), "{held}: {err}");
        assert_eq!(std::fs::read_to_string(&marker).unwrap(), held, "untouched");
    }
    live.kill().unwrap();
    live.wait().unwrap();
    std::fs::remove_file(&takeover).unwrap();

    // Replaced: a marker of this machine whose process has ended.
    std::fs::write(&marker, format!("5 {boot} {ns} {dead}")).unwrap();
    repo.forget(std::slice::from_ref(&a.id)).unwrap();
    let stats = repo.gc().unwrap();
    assert_eq!(stats.stale_marker_pid, Some(dead));
    assert_eq!(stats.condemned_packs, 1, "it collected");
    assert!(!marker.exists(), "its own marker is gone when it ends");
    assert!(!takeover.exists());
    assert_eq!(
        std::fs::read_dir(store.path().join("gc-takeover"))
            .unwrap()
            .count(),
        0,
        "no takeover record left behind"
    );
    assert_eq!(repo.gc().unwrap().stale_marker_pid, None);
}

fn an_incremental_takes_unchanged_chunks_by_id_and_stores_again_those_only_a_condemned_pack_holds(
    store: Store,
) {
    let mut repo = init(&store, CHUNK, Compression::Zstd, None).unwrap();
    repo.set_condemn_margin(std::time::Duration::ZERO);
    let old = disk(41, 8, 100);
    let (a, _) = backup(&repo, "d", &old);
    let (_, a_ids) = repo.read_snapshot(&a.id).unwrap();

    // Chunk 0 changed; the rest by id, without their bytes.
    let mut new = old.clone();
    new[..CHUNK as usize].copy_from_slice(&Rng(42).bytes(CHUNK as usize));
    let mut w = repo
        .writer("d", new.len() as u64, Some(a.id.clone()))
        .unwrap();
    w.add_at(0, new[..CHUNK as usize].to_vec()).unwrap();
    w.add_known_at(1, a_ids[1..].to_vec()).unwrap();
    let (b, stats) = w.commit().unwrap();
    assert_eq!(stats.new_chunks, 1, "{stats:?}");
    assert_eq!(restore(&repo, &b.id), new);

    // Both snapshots forgotten and collected: every pack is condemned. An incremental
    // that names their chunks now must store them again, not rely on packs about to go.
    repo.forget(&[a.id.clone(), b.id.clone()]).unwrap();
    assert!(repo.gc().unwrap().condemned_packs >= 1);
    std::thread::sleep(std::time::Duration::from_millis(5));
    let mut w = repo.writer("d", old.len() as u64, None).unwrap();
    w.add_known_at(0, a_ids.clone()).unwrap();
    let (c, stats) = w.commit().unwrap();
    assert!(stats.new_chunks >= 5, "stored again: {stats:?}");
    let gc = repo.gc().unwrap();
    assert!(gc.deleted_packs >= 1, "{gc:?}");
    assert_eq!(restore(&repo, &c.id), old);
    assert!(repo.verify(&[]).unwrap().iter().all(|(_, p)| p.is_empty()));

    // Ids the repository does not hold at all: the snapshot is refused, not made.
    let mut w = repo.writer("d", 2 * CHUNK, None).unwrap();
    w.add_known_at(0, vec![ChunkId([7; 32]), ChunkId::ZERO])
        .unwrap();
    let err = w.commit().unwrap_err().to_string();
    assert!(err.contains("in no pack"), "{err}");
    assert_eq!(repo.snapshots().unwrap().len(), 1);
}

/// A store whose put-if-absent is not exclusive, as on an S3 server that ignores
/// `If-None-Match` (Garage): it asks whether the object exists, then writes it, so
/// two racing writers may both "create" it.
struct NotExclusive(LocalDir);

impl repo::Backend for NotExclusive {
    fn put_if_absent(&self, key: &str, data: &[u8]) -> repo::Result<bool> {
        if self.0.get(key, None).is_ok() {
            return Ok(false);
        }
        self.0.delete(key)?;
        self.0.put_if_absent(key, data)
    }
    fn get(&self, key: &str, range: Option<std::ops::Range<u64>>) -> repo::Result<Vec<u8>> {
        self.0.get(key, range)
    }
    fn list(&self, prefix: &str) -> repo::Result<Vec<String>> {
        self.0.list(prefix)
    }
    fn delete(&self, key: &str) -> repo::Result<()> {
        self.0.delete(key)
    }
    fn honours_put_if_absent(&self) -> bool {
        false
    }
}

#[test]
fn where_put_if_absent_is_not_exclusive_a_collection_runs_only_on_a_claim_it_alone_holds() {
    let store = Store::local();
    init(&store, CHUNK, Compression::Zstd, None).unwrap();
    let repo = Repository::open(Box::new(NotExclusive(LocalDir::new(store.path()))), None).unwrap();
    let data = Rng(51).bytes(3 * CHUNK as usize);
    let (a, _) = backup(&repo, "a", &data);
    repo.forget(std::slice::from_ref(&a.id)).unwrap();
    let claims = store.path().join(gc::GC_CLAIMS.trim_end_matches('/'));

    // Another collection's claim (of another machine): this one gives way, withdraws
    // its own claim and touches nothing.
    std::fs::create_dir_all(&claims).unwrap();
    let theirs = claims.join("5-77-abcd");
    std::fs::write(&theirs, "5 another-boot pid:[1] 77").unwrap();
    let err = repo.gc().unwrap_err().to_string();
    assert!(
        err.contains("another garbage collection is running"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_dir(&claims).unwrap().count(),
        1,
        "ours withdrawn"
    );
    assert!(
        repo.condemnations().unwrap().is_empty(),
        "nothing collected"
    );

    // Alone: it collects, and leaves neither claim nor marker behind.
    std::fs::remove_file(&theirs).unwrap();
    assert_eq!(repo.gc().unwrap().condemned_packs, 1);
    assert_eq!(repo.gc().unwrap().deleted_packs, 1);
    assert_eq!(std::fs::read_dir(&claims).unwrap().count(), 0);
    assert!(!store.path().join("gc").exists());

    // A claim left by a collection of this machine that died is cleared.
    let mut child = std::process::Command::new("true").spawn().unwrap();
    child.wait().unwrap();
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    let ns = std::fs::read_link("/proc/self/ns/pid").unwrap();
    let dead = format!("5 {} {} {}", boot.trim(), ns.to_str().unwrap(), child.id());
    std::fs::write(claims.join("5-1-dead"), dead).unwrap();
    repo.gc().unwrap();
    assert_eq!(std::fs::read_dir(&claims).unwrap().count(), 0);
}
