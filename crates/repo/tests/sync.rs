//! Off-site copies ([`Repository::sync_to`]): from a local repository into a local
//! directory and into a bucket on a real S3 server alike. Every copied snapshot
//! restores byte for byte at the other end, a second sync copies nothing, damage in
//! the source stops the sync before the damaged snapshot (never carried over), a rerun
//! resumes, and an encrypted repository stays encrypted with the same passphrase.

mod common;

use common::Store;
use repo::Compression;
use repo::Error;
use repo::Repository;
use repo::format::ChunkId;
use testkit::Rng;

const CHUNK: usize = 64 << 10;

fn backup(repo: &Repository, disk: &str, data: &[u8]) -> String {
    let mut w = repo.writer(disk, data.len() as u64, None).unwrap();
    for chunk in data.chunks(CHUNK) {
        w.add_chunk(chunk).unwrap();
    }
    w.commit().unwrap().0.id
}

/// An incremental of `new` over `parent` whose chunk 0 changed in its first 4 KiB:
/// stored as a delta of the parent's chunk.
fn with_a_delta(repo: &Repository, parent: &str, new: &[u8]) -> String {
    let (info, ids) = repo.read_snapshot(parent).unwrap();
    let mut w = repo
        .writer(&info.disk, new.len() as u64, Some(parent.into()))
        .unwrap();
    w.add_changed_at(0, new[..CHUNK].to_vec(), ids[0], vec![(0, 4096)])
        .unwrap();
    w.add_known_at(1, ids[1..].to_vec()).unwrap();
    let (info, stats) = w.commit().unwrap();
    assert_eq!(stats.delta_chunks, 1);
    info.id
}

fn restore(repo: &Repository, id: &str) -> Vec<u8> {
    let index = repo.load_index().unwrap();
    let (info, ids) = repo.read_snapshot(id).unwrap();
    let mut out = vec![0; info.size as usize];
    let wanted = ids.iter().copied().zip(out.chunks_mut(CHUNK)).collect();
    repo.read_chunks_into(&index, wanted).unwrap();
    out
}

fn syncs_only_what_is_missing_and_stops_before_damage(dest_store: Store) {
    let pass: &[u8] = b"same on both sides";
    let source_store = Store::local();
    let source = Repository::init(
        source_store.backend(),
        CHUNK as u64,
        Compression::Zstd,
        Some(pass),
    )
    .unwrap();
    let a = Rng(1).bytes(6 * CHUNK);
    let mut a2 = a.clone();
    a2[..4096].copy_from_slice(&Rng(2).bytes(4096));
    let mut b = a.clone();
    b[3 * CHUNK..].copy_from_slice(&Rng(3).bytes(3 * CHUNK));
    let s1 = backup(&source, "a", &a);
    let s2 = with_a_delta(&source, &s1, &a2);
    let s3 = backup(&source, "b", &b);

    // Only disk a, the first time.
    let dest = source.copy_into(dest_store.backend(), Some(pass)).unwrap();
    let stats = source.sync_to(&dest, Some("a"), |_| {}).unwrap();
    assert_eq!(
        (stats.snapshots_copied, stats.chunks_copied),
        (2, 7),
        "{stats:?}"
    );
    assert_eq!(restore(&dest, &s1), a);
    assert_eq!(restore(&dest, &s2), a2);

    // Then everything: only b's three new chunks travel.
    let stats = source.sync_to(&dest, None, |_| {}).unwrap();
    assert_eq!(
        (
            stats.snapshots_copied,
            stats.snapshots_present,
            stats.chunks_copied
        ),
        (1, 2, 3),
        "{stats:?}"
    );
    assert_eq!(restore(&dest, &s3), b);
    let again = source.sync_to(&dest, None, |_| {}).unwrap();
    assert_eq!((again.snapshots_copied, again.chunks_copied), (0, 0));
    assert!(dest.verify(&[]).unwrap().iter().all(|(_, p)| p.is_empty()));

    // Encrypted at the other end: the same passphrase opens it, no other does.
    let reopened = Repository::open(dest_store.backend(), Some(pass)).unwrap();
    assert_eq!(restore(&reopened, &s2), a2);
    let wrong = Repository::open(dest_store.backend(), Some(b"other")).unwrap_err();
    assert_eq!(wrong.to_string(), "wrong passphrase");
    let none = Repository::open(dest_store.backend(), None).unwrap_err();
    assert!(none.to_string().contains("encrypted"), "{none}");

    // Another repository is not a sync's destination.
    let other_store = dest_store.another();
    Repository::init(other_store.backend(), CHUNK as u64, Compression::Zstd, None).unwrap();
    let err = source
        .copy_into(other_store.backend(), Some(pass))
        .unwrap_err();
    assert!(err.to_string().contains("another repository"), "{err}");

    // A new snapshot whose new chunk is damaged in the source: the sync stops with
    // the damage and the destination has no such snapshot; repaired, a rerun copies it.
    let mut c = b.clone();
    c[5 * CHUNK..].copy_from_slice(&Rng(4).bytes(CHUNK));
    let before: Vec<String> = source_store.keys("packs/");
    let s4 = backup(&source, "b", &c);
    let new_pack = source_store
        .keys("packs/")
        .into_iter()
        .find(|k| !before.contains(k))
        .unwrap();
    let original = source_store.read(&new_pack);
    let mut bad = original.clone();
    bad[40] ^= 0x10;
    source_store.overwrite(&new_pack, &bad);
    let err = source.sync_to(&dest, None, |_| {}).unwrap_err();
    assert!(matches!(err, Error::Damaged { .. }), "{err}");
    assert!(!dest.snapshots().unwrap().iter().any(|s| s.id == s4));
    source_store.overwrite(&new_pack, &original);
    let stats = source.sync_to(&dest, None, |_| {}).unwrap();
    assert_eq!(
        (stats.snapshots_copied, stats.chunks_copied),
        (1, 1),
        "{stats:?}"
    );
    assert_eq!(restore(&dest, &s4), c);
    let (_, ids) = dest.read_snapshot(&s4).unwrap();
    assert!(ids.iter().all(|id| *id != ChunkId::ZERO));
}

#[test]
fn a_sync_into_a_local_directory_copies_only_what_is_missing() {
    syncs_only_what_is_missing_and_stops_before_damage(Store::local());
}

#[test]
fn a_sync_into_s3_copies_only_what_is_missing() {
    syncs_only_what_is_missing_and_stops_before_damage(Store::s3());
}
