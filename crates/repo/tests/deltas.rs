//! Deltas: an incremental's partly changed chunks stored as their changed runs over
//! the parent's chunk. They restore byte for byte, verify, survive the collection of
//! their parent, never lean on a condemned base, stop at the chain limit, and a wrong
//! base or a broken promise is reported as damage, never restored.

use repo::Compression;
use repo::Error;
use repo::LocalDir;
use repo::Repository;
use repo::format::MAX_DELTA_DEPTH;
use repo::repository::WriteStats;
use testkit::Rng;

const CHUNK: usize = 64 << 10;

fn init(dir: &std::path::Path, passphrase: Option<&[u8]>) -> Repository {
    let mut repo = Repository::init(
        Box::new(LocalDir::new(dir)),
        CHUNK as u64,
        Compression::Zstd,
        passphrase,
    )
    .unwrap();
    repo.set_condemn_margin(std::time::Duration::ZERO);
    repo
}

fn full(repo: &Repository, disk: &str, data: &[u8]) -> String {
    let mut w = repo.writer(disk, data.len() as u64, None).unwrap();
    for chunk in data.chunks(CHUNK) {
        w.add_chunk(chunk).unwrap();
    }
    w.commit().unwrap().0.id
}

/// An incremental of `new` over snapshot `parent`: the chunks `changed` names go
/// with their runs, every other chunk by the parent's id.
fn incremental(
    repo: &Repository,
    parent: &str,
    new: &[u8],
    changed: &[(usize, Vec<(u32, u32)>)],
) -> (String, WriteStats) {
    let (info, ids) = repo.read_snapshot(parent).unwrap();
    let mut w = repo
        .writer(&info.disk, new.len() as u64, Some(parent.to_string()))
        .unwrap();
    for (n, id) in ids.iter().enumerate() {
        match changed.iter().find(|(c, _)| *c == n) {
            Some((_, runs)) => {
                let data = new[n * CHUNK..((n + 1) * CHUNK).min(new.len())].to_vec();
                w.add_changed_at(n as u64, data, *id, runs.clone()).unwrap();
            }
            None => w.add_known_at(n as u64, vec![*id]).unwrap(),
        }
    }
    let (info, stats) = w.commit().unwrap();
    (info.id, stats)
}

/// Writes seeded random bytes over `runs` of chunk `n`.
fn change(data: &mut [u8], n: usize, runs: &[(u32, u32)], seed: u64) {
    let mut rng = Rng(seed);
    for &(at, len) in runs {
        let at = n * CHUNK + at as usize;
        data[at..at + len as usize].copy_from_slice(&rng.bytes(len as usize));
    }
}

fn restore(repo: &Repository, id: &str) -> repo::Result<Vec<u8>> {
    let index = repo.load_index()?;
    let (info, ids) = repo.read_snapshot(id)?;
    let mut out = vec![0; info.size as usize];
    let wanted = ids.iter().copied().zip(out.chunks_mut(CHUNK)).collect();
    repo.read_chunks_into(&index, wanted)?;
    Ok(out)
}

fn verify_clean(repo: &Repository) -> bool {
    repo.verify(&[]).unwrap().iter().all(|(_, p)| p.is_empty())
}

#[test]
fn partly_changed_chunks_are_stored_as_deltas_and_restore_verify_and_outlive_their_parent() {
    for passphrase in [None, Some(&b"pw"[..])] {
        let dir = tempfile::tempdir().unwrap();
        let repo = init(dir.path(), passphrase);
        let old = Rng(1).bytes(6 * CHUNK);
        let a = full(&repo, "d", &old);

        let mut new = old.clone();
        let runs0 = vec![(8192, 4096)];
        let runs2 = vec![(0, 4096), (32768, 8192)];
        // More than half of chunk 4 changed: stored whole.
        let runs4 = vec![(0, 40960)];
        change(&mut new, 0, &runs0, 2);
        change(&mut new, 2, &runs2, 3);
        change(&mut new, 4, &runs4, 4);
        let (b, stats) = incremental(&repo, &a, &new, &[(0, runs0), (2, runs2), (4, runs4)]);
        assert_eq!((stats.new_chunks, stats.delta_chunks), (3, 2), "{stats:?}");
        // The deltas hold 4 + 12 KiB of random bytes; chunk 4 is 64 KiB of them.
        assert!(
            stats.stored_bytes < (64 + 16 + 4) << 10,
            "{} bytes stored",
            stats.stored_bytes
        );
        assert_eq!(restore(&repo, &b).unwrap(), new);
        assert_eq!(restore(&repo, &a).unwrap(), old);
        assert!(verify_clean(&repo));

        // The parent forgotten and collected twice: the deltas' bases stay.
        repo.forget(std::slice::from_ref(&a)).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(5));
        let first = repo.gc().unwrap();
        let second = repo.gc().unwrap();
        assert_eq!(first.deleted_packs + second.deleted_packs, 0, "{second:?}");
        let repo = Repository::open(Box::new(LocalDir::new(dir.path())), passphrase).unwrap();
        assert_eq!(restore(&repo, &b).unwrap(), new);
        assert!(verify_clean(&repo));
    }
}

#[test]
fn a_delta_over_a_damaged_base_or_a_broken_promise_is_damage_never_data() {
    let dir = tempfile::tempdir().unwrap();
    let repo = init(dir.path(), None);
    let old = Rng(11).bytes(2 * CHUNK);
    let a = full(&repo, "d", &old);

    // The caller promised only bytes 0..4096 changed, but 60000 did too.
    let mut new = old.clone();
    change(&mut new, 0, &[(0, 4096), (60000, 1)], 12);
    let (b, stats) = incremental(&repo, &a, &new, &[(0, vec![(0, 4096)])]);
    assert_eq!(stats.delta_chunks, 1);
    let err = restore(&repo, &b).unwrap_err();
    assert!(
        matches!(&err, Error::Damaged { why, .. } if why.contains("does not match its id")),
        "{err}"
    );
    let problems: Vec<String> = repo
        .verify(std::slice::from_ref(&b))
        .unwrap()
        .into_iter()
        .flat_map(|(_, p)| p)
        .collect();
    assert_eq!(problems.len(), 1, "{problems:?}");

    // A sound delta whose base's pack is damaged: reading it says so.
    let mut newer = old.clone();
    change(&mut newer, 1, &[(4096, 4096)], 13);
    let (c, _) = incremental(&repo, &a, &newer, &[(1, vec![(4096, 4096)])]);
    assert_eq!(restore(&repo, &c).unwrap(), newer);
    let index = repo.load_index().unwrap();
    let (_, a_ids) = repo.read_snapshot(&a).unwrap();
    let (pack, blob) = index.get(&a_ids[1]).unwrap();
    let path = dir.path().join(format!("packs/{}/{pack}", &pack[..2]));
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[blob.offset as usize + 100] ^= 0x01;
    std::fs::write(&path, bytes).unwrap();
    let err = restore(&repo, &c).unwrap_err();
    assert!(matches!(err, Error::Damaged { .. }), "{err}");
}

#[test]
fn a_chain_of_deltas_stops_at_the_limit_and_every_link_restores() {
    let dir = tempfile::tempdir().unwrap();
    let repo = init(dir.path(), None);
    let mut data = Rng(21).bytes(CHUNK);
    let mut snapshots = vec![(full(&repo, "d", &data), data.clone())];
    let mut kinds = Vec::new();
    for round in 0..MAX_DELTA_DEPTH + 2 {
        let runs = vec![((round * 4096) as u32, 4096)];
        change(&mut data, 0, &runs, 100 + round as u64);
        let parent = &snapshots.last().unwrap().0;
        let (id, stats) = incremental(&repo, parent, &data, &[(0, runs)]);
        kinds.push(stats.delta_chunks);
        snapshots.push((id, data.clone()));
    }
    // Four links of deltas, then a whole chunk, then a delta of that.
    let mut expect = vec![1; MAX_DELTA_DEPTH];
    expect.extend([0, 1]);
    assert_eq!(kinds, expect);
    // Only the newest kept: its chain is whole after a collection.
    let old: Vec<String> = snapshots[..snapshots.len() - 1]
        .iter()
        .map(|(id, _)| id.clone())
        .collect();
    repo.forget(&old).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(5));
    repo.gc().unwrap();
    repo.gc().unwrap();
    let (last, bytes) = snapshots.last().unwrap();
    assert_eq!(&restore(&repo, last).unwrap(), bytes);
    assert!(verify_clean(&repo));
}

#[test]
fn a_delta_whose_base_is_condemned_is_not_deduplicated_against() {
    let dir = tempfile::tempdir().unwrap();
    let repo = init(dir.path(), None);
    let old = Rng(31).bytes(2 * CHUNK);
    let a = full(&repo, "d", &old);
    // b: chunk 0 a delta of a's chunk 0, chunk 1 new and whole, in one pack.
    let mut new = old.clone();
    change(&mut new, 0, &[(0, 4096)], 32);
    change(&mut new, 1, &[(0, CHUNK as u32)], 33);
    let (b, stats) = incremental(
        &repo,
        &a,
        &new,
        &[(0, vec![(0, 4096)]), (1, vec![(0, CHUNK as u32)])],
    );
    assert_eq!((stats.new_chunks, stats.delta_chunks), (2, 1));
    // x names only b's whole chunk, so b's pack stays live while a's is condemned.
    let x = full(&repo, "x", &new[CHUNK..]);
    repo.forget(&[a.clone(), b.clone()]).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(5));
    assert_eq!(repo.gc().unwrap().condemned_packs, 1);
    std::thread::sleep(std::time::Duration::from_millis(5));
    // The delta's bytes again: stored whole, not deduplicated against the delta whose
    // base is about to go.
    let mut w = repo.writer("y", CHUNK as u64, None).unwrap();
    w.add_chunk(&new[..CHUNK]).unwrap();
    let (y, stats) = w.commit().unwrap();
    assert_eq!((stats.new_chunks, stats.delta_chunks), (1, 0), "{stats:?}");
    assert_eq!(repo.gc().unwrap().deleted_packs, 1);
    assert_eq!(restore(&repo, &y.id).unwrap(), &new[..CHUNK]);
    assert_eq!(restore(&repo, &x).unwrap(), &new[CHUNK..]);
    assert!(verify_clean(&repo));
}
