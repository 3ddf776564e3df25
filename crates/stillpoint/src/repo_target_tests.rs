//! The invariant for backups into the repository, under stress, in one process: a
//! daemon serves a raw disk over NBD, three NBD clients hammer it with writes,
//! write-zeroes, discards and reads (unaligned, overlapping, 512 B to 1 MiB) while a
//! backup copies it into a `repository` node; the committed snapshot, read back from
//! the repository, equals the disk as it was when the backup started, and the disk
//! equals every write applied. Half the seeds are incrementals over a parent snapshot
//! (a dirty bitmap added with the parent's backup), so inherited chunks are judged too,
//! and chunks the bitmap marks in part, stored as deltas of the parent's.
//!
//! Each seed picks the disk's size (with a short last chunk on some), the chunk size,
//! workers, speed and whether the backup is full or incremental. `STILLPOINT_SEEDS=N`
//! sets how many run (default 12); `STILLPOINT_SEED_BASE=B` starts at B;
//! `STILLPOINT_SEED=S` runs just S.

use std::path::Path;
use std::sync::Arc;
use std::sync::Mutex;

use block::BlockDriver;

use super::SnapshotTarget;
use super::Stage;
use block::IoBuf;
use block::WriteFlags;
use block::node::driver::ZeroFlags;
use block::options::SocketAddress;
use nbd::client::NbdClient;
use nbd::client::NbdDriver;
use qmp::Daemon;
use repo::ChunkId;
use repo::LocalDir;
use repo::Repository;
use serde_json::Value;
use serde_json::json;
use testkit::Rng;

use super::RepositoryDrivers;

fn seeds(default: u64) -> Vec<u64> {
    let number = |name: &str| {
        std::env::var(name)
            .ok()
            .map(|v| v.parse::<u64>().expect("a number"))
    };
    if let Some(seed) = number("STILLPOINT_SEED") {
        return vec![seed];
    }
    let base = number("STILLPOINT_SEED_BASE").unwrap_or(0);
    (base..base + number("STILLPOINT_SEEDS").unwrap_or(default)).collect()
}

async fn qmp(daemon: &Arc<Daemon>, name: &str, args: Value) -> Value {
    daemon
        .execute(name, args.clone())
        .await
        .unwrap_or_else(|e| panic!("{name} {args}: {}", e.desc))
}

/// Waits for the job's BLOCK_JOB_COMPLETED (or CANCELLED) event.
async fn job_end(events: &mut tokio::sync::broadcast::Receiver<Value>, job: &str) -> Value {
    loop {
        let e = events.recv().await.expect("events flow");
        let name = e["event"].as_str().unwrap_or_default();
        if matches!(name, "BLOCK_JOB_COMPLETED" | "BLOCK_JOB_CANCELLED")
            && e["data"]["device"] == job
        {
            return e;
        }
    }
}

/// The snapshot the repository node `node` committed.
async fn committed(daemon: &Arc<Daemon>, node: &str) -> String {
    let nodes = qmp(daemon, "query-named-block-nodes", json!({})).await;
    let node = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == node)
        .unwrap();
    let data = &node["image"]["format-specific"]["data"];
    assert_eq!(data["state"], "committed", "{data}");
    data["snapshot"].as_str().unwrap().to_string()
}

/// A snapshot's bytes, read back chunk by chunk (each checked against its id).
fn snapshot_bytes(dir: &Path, id: &str) -> Vec<u8> {
    let repo = Repository::open(Box::new(LocalDir::new(dir)), None).unwrap();
    let index = repo.load_index().unwrap();
    let (info, chunks) = repo.read_snapshot(id).unwrap();
    let mut out = Vec::with_capacity(info.size as usize);
    for (i, c) in chunks.iter().enumerate() {
        let len = (info.size - i as u64 * info.chunk_size).min(info.chunk_size) as usize;
        if *c == ChunkId::ZERO {
            out.resize(out.len() + len, 0);
        } else {
            out.extend(repo.read_chunk(&index, c).unwrap());
        }
    }
    out
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    if a.len() != b.len() {
        return Some(a.len().min(b.len()));
    }
    a.iter().zip(b).position(|(x, y)| x != y)
}

/// Returns whether the disk changed after the instant (the writers raced the backup).
/// Runs one seed: whether the disk changed during the backup, and how many chunks the
/// repository holds as deltas.
async fn run_seed(seed: u64) -> (bool, u64) {
    let mut rng = Rng(seed ^ 0x7e90);
    let dir = tempfile::tempdir().unwrap();
    let size: u64 = match rng.below(3) {
        0 => 1 << 20,
        1 => (2 << 20) + 4096 * rng.below(16),
        _ => (3 << 20) + 512 * (1 + rng.below(100)), // a short last chunk
    };
    let chunk = [64u64 << 10, 128 << 10, 256 << 10][rng.below(3) as usize];
    let incremental = rng.below(2) == 0;
    let repo_dir = dir.path().join("repo");
    std::fs::create_dir(&repo_dir).unwrap();
    Repository::init(
        Box::new(LocalDir::new(&repo_dir)),
        chunk,
        repo::Compression::Zstd,
        None,
    )
    .unwrap();
    let image = dir.path().join("disk.raw");
    let mut data = rng.bytes(size as usize);
    for _ in 0..4 {
        let at = rng.below(size) as usize;
        let len = (rng.below(400 << 10) as usize).min(size as usize - at);
        data[at..at + len].fill(0);
    }
    std::fs::write(&image, &data).unwrap();

    let daemon = Daemon::with_drivers(Arc::new(RepositoryDrivers));
    let mut events = daemon.subscribe();
    qmp(
        &daemon,
        "blockdev-add",
        json!({"driver":"raw","node-name":"src","file":{"driver":"file","filename":image}}),
    )
    .await;
    let socket = dir.path().join("nbd.sock");
    qmp(
        &daemon,
        "nbd-server-start",
        json!({"addr":{"type":"unix","data":{"path":socket}}}),
    )
    .await;
    qmp(
        &daemon,
        "block-export-add",
        json!({"type":"nbd","id":"e0","node-name":"src","name":"disk","writable":true}),
    )
    .await;
    let add_target = |name: &str, parent: Value| {
        json!({"driver":"repository","node-name":name,"repository":repo_dir,
               "disk":"vm","size":size,"parent":parent})
    };
    let granularity = [65536u64, 131072][rng.below(2) as usize];
    if incremental {
        // The parent: a quiet full backup, and the bitmap from that instant.
        qmp(&daemon, "blockdev-add", add_target("base", Value::Null)).await;
        qmp(
            &daemon,
            "transaction",
            json!({"actions":[
                {"type":"block-dirty-bitmap-add","data":{"node":"src","name":"b",
                    "granularity": granularity}},
                {"type":"blockdev-backup","data":{"job-id":"base","device":"src",
                    "target":"base","sync":"full"}}]}),
        )
        .await;
        let end = job_end(&mut events, "base").await;
        assert!(end["data"].get("error").is_none(), "seed {seed}: {end}");
        qmp(&daemon, "blockdev-del", json!({"node-name":"base"})).await;
    }
    let target = if incremental {
        add_target("tgt", json!("latest"))
    } else {
        add_target("tgt", Value::Null)
    };
    qmp(&daemon, "blockdev-add", target).await;

    let address = SocketAddress::Unix(socket.clone());
    let model = Arc::new(Mutex::new(std::fs::read(&image).unwrap()));
    let pause = Arc::new(tokio::sync::RwLock::new(()));
    let locks = Arc::new(Mutex::new(Vec::<(u64, u64)>::new()));
    let mut writers = Vec::new();
    for w in 0..3u64 {
        let client = NbdClient::connect(&address, "disk").await.unwrap();
        let disk = NbdDriver::new(client);
        let (model, pause, locks) = (model.clone(), pause.clone(), locks.clone());
        let mut rng = Rng(seed.wrapping_mul(37).wrapping_add(w));
        writers.push(tokio::spawn(async move {
            for _ in 0..16 {
                let offset = rng.below(size);
                let max = if rng.below(2) == 0 { 16 << 10 } else { 1 << 20 };
                let len = (512 + rng.below(max)).min(size - offset);
                let end = offset + len;
                let _paused = pause.read().await;
                // Overlapping requests of different writers run one after the other,
                // so the model is defined.
                loop {
                    {
                        let mut held = locks.lock().unwrap();
                        if !held.iter().any(|&(s, e)| s < end && offset < e) {
                            held.push((offset, end));
                            break;
                        }
                    }
                    tokio::task::yield_now().await;
                }
                let range = offset as usize..end as usize;
                match rng.below(6) {
                    0 => {
                        let flags = ZeroFlags {
                            may_unmap: rng.below(2) == 0,
                            ..ZeroFlags::default()
                        };
                        disk.write_zeroes(offset, len, flags).await.unwrap();
                        model.lock().unwrap()[range].fill(0);
                    }
                    1 => {
                        let read = disk
                            .read(offset, IoBuf::zeroed(len as usize))
                            .await
                            .unwrap();
                        let at = first_difference(&read, &model.lock().unwrap()[range]);
                        assert!(at.is_none(), "seed {seed}: a read at {offset} differs");
                    }
                    _ => {
                        let data = rng.bytes(len as usize);
                        disk.write(offset, IoBuf::from_slice(&data), WriteFlags::default())
                            .await
                            .unwrap();
                        model.lock().unwrap()[range].copy_from_slice(&data);
                    }
                }
                let mut held = locks.lock().unwrap();
                let i = held.iter().position(|&r| r == (offset, end)).unwrap();
                held.swap_remove(i);
            }
        }));
    }

    // The instant: every acknowledged write is in the file, none is running.
    tokio::time::sleep(std::time::Duration::from_millis(rng.below(20))).await;
    let instant = {
        let _all = pause.write().await;
        let copy = model.lock().unwrap().clone();
        let mut args = json!({"job-id":"job","device":"src","target":"tgt",
                              "x-perf": {"max-workers": 1 + rng.below(4)}});
        if incremental {
            args["sync"] = json!("incremental");
            args["bitmap"] = json!("b");
        } else {
            args["sync"] = json!("full");
        }
        if rng.below(2) == 0 {
            args["speed"] = json!(16 << 20);
        }
        qmp(&daemon, "blockdev-backup", args).await;
        copy
    };
    for writer in writers {
        writer.await.unwrap();
    }
    let end = job_end(&mut events, "job").await;
    assert_eq!(end["event"], "BLOCK_JOB_COMPLETED", "seed {seed}: {end}");
    assert!(end["data"].get("error").is_none(), "seed {seed}: {end}");
    let id = committed(&daemon, "tgt").await;
    let snapshot = snapshot_bytes(&repo_dir, &id);
    if let Some(at) = first_difference(&snapshot, &instant) {
        panic!(
            "seed {seed}: the snapshot differs from the disk at the backup's start at byte \
             {at} (size {size}, chunk {chunk}, incremental {incremental})"
        );
    }
    daemon.shutdown().await;
    let disk = std::fs::read(&image).unwrap();
    if let Some(at) = first_difference(&disk, &model.lock().unwrap()) {
        panic!("seed {seed}: the disk lost a write at byte {at}");
    }
    let repo = Repository::open(Box::new(LocalDir::new(&repo_dir)), None).unwrap();
    (disk != instant, repo.stats().unwrap().delta_chunks)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_equals_the_disk_at_the_backups_start_while_nbd_clients_hammer_it() {
    let seeds = seeds(12);
    let (mut raced, mut deltas) = (0, 0);
    for &seed in &seeds {
        match tokio::spawn(run_seed(seed)).await {
            Ok((changed, made)) => {
                raced += u64::from(changed);
                deltas += made;
            }
            Err(panic) => {
                eprintln!("FAILED seed {seed}; reproduce with STILLPOINT_SEED={seed}");
                std::panic::resume_unwind(panic.into_panic());
            }
        }
    }
    // Writes after the instant are what copy-before-write keeps out of the snapshot.
    assert!(
        seeds.len() < 4 || raced * 2 >= seeds.len() as u64,
        "only {raced} of {} seeds wrote during their backup",
        seeds.len()
    );
    // Some incremental snapshots held deltas, so those were judged too.
    assert!(
        seeds.len() < 12 || deltas > 0,
        "no seed of {} stored a delta",
        seeds.len()
    );
}

/// A chunk written in parts (pieces of data and of zeros, in any order, across chunk
/// boundaries) is stored as the bytes the parts make; a byte written twice is refused;
/// and a chunk still in parts at the commit fails it instead of taking the parent's.
#[tokio::test]
async fn chunks_written_in_parts_are_assembled_once_and_a_part_missing_fails_the_commit() {
    const CHUNK: u64 = 64 << 10;
    let dir = tempfile::tempdir().unwrap();
    let repo_dir = dir.path().join("repo");
    std::fs::create_dir(&repo_dir).unwrap();
    let repo = Arc::new(
        Repository::init(
            Box::new(LocalDir::new(&repo_dir)),
            CHUNK,
            repo::Compression::Zstd,
            None,
        )
        .unwrap(),
    );
    // Three chunks and a short fourth.
    let size = 3 * CHUNK + 12288;
    let mut rng = testkit::Rng(77);
    let expect = {
        let mut data = rng.bytes(size as usize);
        data[(CHUNK + 4096) as usize..(CHUNK + 12288) as usize].fill(0);
        data
    };
    let target =
        SnapshotTarget::start(repo.clone(), repo_dir.clone(), "d", size, None, None).unwrap();
    let write = |from: u64, to: u64| {
        target.write(
            from,
            IoBuf::from_slice(&expect[from as usize..to as usize]),
            WriteFlags::default(),
        )
    };
    // Chunk 1 in four parts, out of order, one of them zeros; a piece across the
    // boundary of chunks 2 and 3 and the rest of each; chunk 0 whole.
    write(CHUNK + 12288, 2 * CHUNK - 4096).await.unwrap();
    write(CHUNK, CHUNK + 4096).await.unwrap();
    target
        .write_zeroes(CHUNK + 4096, 8192, ZeroFlags::default())
        .await
        .unwrap();
    let twice = write(CHUNK + 8192, CHUNK + 16384).await.unwrap_err();
    assert!(twice.to_string().contains("written already"), "{twice}");
    write(2 * CHUNK - 4096, 2 * CHUNK).await.unwrap();
    write(3 * CHUNK - 4096, 3 * CHUNK + 4096).await.unwrap();
    write(2 * CHUNK, 3 * CHUNK - 4096).await.unwrap();
    write(0, CHUNK).await.unwrap();
    let whole_again = write(0, CHUNK).await.unwrap_err();
    assert!(
        whole_again.to_string().contains("written already"),
        "{whole_again}"
    );
    // The short last chunk still lacks its end: the commit refuses.
    let refused = target.commit_backup().await.unwrap_err();
    assert!(
        refused
            .to_string()
            .contains("chunk 3 was written only in part"),
        "{refused}"
    );
    target.close().await.unwrap();

    // The same parts with the last one given: the snapshot is the bytes.
    let target =
        SnapshotTarget::start(repo.clone(), repo_dir.clone(), "d", size, None, None).unwrap();
    let write = |from: u64, to: u64| {
        target.write(
            from,
            IoBuf::from_slice(&expect[from as usize..to as usize]),
            WriteFlags::default(),
        )
    };
    write(3 * CHUNK + 4096, size).await.unwrap();
    write(CHUNK + 12288, 2 * CHUNK).await.unwrap();
    target
        .write_zeroes(CHUNK + 4096, 8192, ZeroFlags::default())
        .await
        .unwrap();
    write(CHUNK, CHUNK + 4096).await.unwrap();
    write(0, CHUNK).await.unwrap();
    write(2 * CHUNK, 3 * CHUNK + 4096).await.unwrap();
    target.commit_backup().await.unwrap();
    let id = match &target.progress().stage {
        Stage::Committed(id) => id.clone(),
        other => panic!("{other:?}"),
    };
    target.close().await.unwrap();
    let got = snapshot_bytes(&repo_dir, &id);
    assert!(
        got == expect,
        "differs at {:?}",
        first_difference(&got, &expect)
    );
}
