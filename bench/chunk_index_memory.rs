//! The dedup index at scale: a synthetic repository of N chunk entries (10 million by
//! default: 2.4 TiB of unique data at the default 256 KiB chunks), written as index
//! objects of 128 entries each (a 32 MiB pack of 256 KiB chunks), then loaded the way
//! a backup loads it. Reports the resident memory the loaded index takes (and the peak
//! while loading), bytes per chunk, the load time, and lookups per second for ids that
//! are there and ids that are not.
//!
//! `bench-chunk-index [--chunks N] [--dir DIR]`; prints one JSON object. The index
//! files are written without fsync (they are test data); no pack is written, since
//! loading the index reads only index objects.

use std::time::Instant;

use repo::ChunkId;
use repo::Compression;
use repo::LocalDir;
use repo::Repository;
use repo::format::PackBuilder;
use testkit::Rng;

/// A `/proc/self/status` field in bytes (VmRSS, VmHWM).
fn status_bytes(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn id(rng: &mut Rng) -> ChunkId {
    let mut id = [0u8; 32];
    for part in id.chunks_mut(8) {
        part.copy_from_slice(&rng.next_u64().to_le_bytes());
    }
    ChunkId(id)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let chunks: u64 = flag("--chunks").map_or(10_000_000, |n| n.parse().expect("--chunks N"));
    let per_pack = 128u64;
    let base = flag("--dir").map_or_else(std::env::temp_dir, Into::into);
    let dir = tempfile_dir(&base);
    let repo = Repository::init(
        Box::new(LocalDir::new(&dir)),
        256 << 10,
        Compression::Zstd,
        None,
    )
    .expect("init");
    let started = Instant::now();
    std::fs::create_dir_all(dir.join("index")).unwrap();
    let mut rng = Rng(1);
    let mut written = 0u64;
    while written < chunks {
        let mut pack = PackBuilder::new();
        for _ in 0..per_pack.min(chunks - written) {
            pack.add(id(&mut rng), &[], 256 << 10, Compression::Zstd);
            written += 1;
        }
        let finished = pack.finish(None);
        std::fs::write(dir.join("index").join(&finished.id), &finished.index).unwrap();
    }
    let write_seconds = started.elapsed().as_secs_f64();
    drop(repo);

    let rss_before = status_bytes("VmRSS:");
    let started = Instant::now();
    let repo = Repository::open(Box::new(LocalDir::new(&dir)), None).expect("open");
    let index = repo.load_index().expect("load");
    let load_seconds = started.elapsed().as_secs_f64();
    let rss_after = status_bytes("VmRSS:");
    let peak = status_bytes("VmHWM:");
    assert_eq!(index.len() as u64, chunks);

    // Lookups: ids that are there (replayed from the same seed) and ids that are not.
    let lookups = 1_000_000u64.min(chunks);
    let mut known = Rng(1);
    let started = Instant::now();
    for _ in 0..lookups {
        assert!(index.contains(&id(&mut known)));
    }
    let hit_rate = lookups as f64 / started.elapsed().as_secs_f64();
    let mut unknown = Rng(2);
    let started = Instant::now();
    for _ in 0..lookups {
        assert!(!index.contains(&id(&mut unknown)));
    }
    let miss_rate = lookups as f64 / started.elapsed().as_secs_f64();
    let resident = rss_after.saturating_sub(rss_before);
    println!(
        "{}",
        serde_json::json!({
            "chunks": chunks,
            "index_objects": chunks.div_ceil(per_pack),
            "write_seconds": write_seconds,
            "load_seconds": load_seconds,
            "resident_bytes": resident,
            "resident_bytes_per_chunk": resident as f64 / chunks as f64,
            "peak_rss_bytes": peak,
            "index_memory_bytes": index.memory_bytes(),
            "entry_bytes": repo::chunk_index::BYTES_PER_CHUNK,
            "lookups_per_second_hit": hit_rate,
            "lookups_per_second_miss": miss_rate,
        })
    );
    drop(index);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A fresh directory under `base`.
fn tempfile_dir(base: &std::path::Path) -> std::path::PathBuf {
    let dir = base.join(format!("stillpoint-index-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
