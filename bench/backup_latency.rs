//! Guest latency during a live backup, in process (no protocol in the way): QD1 random
//! 4 KiB writes and reads to the source, alternating, first alone, then while a
//! full-speed backup runs.
//! `bench/backup_vs_qsd.py` also measures the same through the daemon's NBD export.
//!
//! `bench-backup-latency SOURCE TARGET [--ops N]` writes to SOURCE (use a scratch copy)
//! and backs it up to TARGET (created sparse). `BENCH_DIRECT_SOURCE=1` and
//! `BENCH_DIRECT_TARGET=1` open them with `cache.direct` (a guest with `cache=none`);
//! `BENCH_WORKERS` and `BENCH_CHUNK` set the job's `x-perf` workers and chunk;
//! `BENCH_HOT_MIB=N` keeps the guest's requests in N MiB in the middle of the disk;
//! `BENCH_RUNTIME=current` runs on one runtime thread, as the daemon does (the default
//! is two worker threads); `BENCH_FLUSH_EVERY=N` flushes after every N writes (a guest
//! that syncs: a flush during a backup writes the writes the filter holds into the
//! image, copy-before-write first) and reports the flushes' latency too. Prints one
//! JSON object: latency percentiles in microseconds for both phases, and the backup's
//! wall time.
//! Driven by `bench/backup_vs_qsd.py`, which runs the same measurement against
//! qemu-storage-daemon.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering;
use std::time::Instant;

use block::AttachUser;
use block::Attachment;
use block::BlockdevOptions;
use block::IoBuf;
use block::NodeGraph;
use block::WriteFlags;
use jobs::BackupOptions;
use jobs::JobEvent;
use jobs::JobRegistry;
use jobs::JobStatus;
use jobs::start_backup;
use testkit::Rng;

fn percentiles(mut samples: Vec<f64>) -> serde_json::Value {
    if samples.is_empty() {
        return serde_json::json!({"count": 0});
    }
    samples.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let at = |p: f64| samples[((samples.len() - 1) as f64 * p).round() as usize];
    serde_json::json!({
        "count": samples.len(), "p50_us": at(0.50), "p99_us": at(0.99), "max_us": at(1.0),
    })
}

/// The blocks the guest touches: all of the disk, or with `BENCH_HOT_MIB=N` only N MiB
/// in its middle (a guest with locality, as a database's is).
#[derive(Clone, Copy)]
struct Region {
    first: u64,
    blocks: u64,
}

impl Region {
    fn pick(&self, rng: &mut Rng) -> u64 {
        (self.first + rng.next_u64() % self.blocks) * 4096
    }
}

/// One QD1 random 4 KiB read; returns its latency in microseconds.
async fn one_read(disk: &Attachment, rng: &mut Rng, blocks: Region, buf: IoBuf) -> (f64, IoBuf) {
    let offset = blocks.pick(rng);
    let start = Instant::now();
    let buf = disk.read(offset, buf).await.expect("guest read");
    (start.elapsed().as_secs_f64() * 1e6, buf)
}

/// One QD1 random 4 KiB write; returns its latency in microseconds.
async fn one_write(disk: &Attachment, rng: &mut Rng, blocks: Region, buf: IoBuf) -> (f64, IoBuf) {
    let offset = blocks.pick(rng);
    let start = Instant::now();
    let buf = disk
        .write(offset, buf, WriteFlags::default())
        .await
        .expect("guest write");
    (start.elapsed().as_secs_f64() * 1e6, buf)
}

/// One flush; returns its latency in microseconds.
async fn one_flush(disk: &Attachment) -> f64 {
    let start = Instant::now();
    disk.flush().await.expect("guest flush");
    start.elapsed().as_secs_f64() * 1e6
}

fn main() {
    // `BENCH_RUNTIME=current`: one runtime thread, as `stillpoint daemon` runs.
    let runtime = if std::env::var("BENCH_RUNTIME").is_ok_and(|r| r == "current") {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
    };
    runtime.expect("the runtime starts").block_on(measure());
}

async fn measure() {
    let mut args = std::env::args().skip(1);
    let source = PathBuf::from(args.next().expect("usage: SOURCE TARGET [--ops N]"));
    let target = PathBuf::from(args.next().expect("usage: SOURCE TARGET [--ops N]"));
    let mut ops = 2000;
    while let Some(arg) = args.next() {
        if arg == "--ops" {
            ops = args.next().and_then(|n| n.parse().ok()).expect("--ops N");
        }
    }
    let size = std::fs::metadata(&source).unwrap().len();
    std::fs::File::create(&target)
        .unwrap()
        .set_len(size)
        .unwrap();

    let graph = Arc::new(NodeGraph::new());
    let mut src = BlockdevOptions::raw_file(&source, false);
    src.node_name = Some("src".into());
    src.cache.direct = std::env::var("BENCH_DIRECT_SOURCE").ok().map(|v| v == "1");
    graph.add(src).await.unwrap();
    let mut tgt = BlockdevOptions::raw_file(&target, false);
    tgt.node_name = Some("tgt".into());
    tgt.cache.direct = std::env::var("BENCH_DIRECT_TARGET").ok().map(|v| v == "1");
    tgt.discard = Some(block::options::DiscardMode::Unmap);
    graph.add(tgt).await.unwrap();
    let disk = graph
        .attach("src", AttachUser::Other("guest".into()))
        .unwrap();
    let blocks = match std::env::var("BENCH_HOT_MIB")
        .ok()
        .and_then(|m| m.parse::<u64>().ok())
    {
        Some(mib) => Region {
            first: size / 2 / 4096,
            blocks: (mib << 20) / 4096,
        },
        None => Region {
            first: 0,
            blocks: size / 4096,
        },
    };
    let mut rng = Rng(42);
    let mut buf = IoBuf::from_slice(&[0x5a; 4096]);
    let flush_every: usize = std::env::var("BENCH_FLUSH_EVERY")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let flush = |n: usize| flush_every > 0 && n.is_multiple_of(flush_every);
    let (mut flushes_alone, mut flushes_during) = (Vec::new(), Vec::new());

    // Writes and reads alternate (reads of random blocks, mostly not in the page
    // cache: the image is bigger than what the bench has touched).
    let mut rbuf = IoBuf::zeroed(4096);
    let mut alone = Vec::with_capacity(ops);
    let mut alone_reads = Vec::with_capacity(ops);
    for _ in 0..ops {
        let (us, b) = one_write(&disk, &mut rng, blocks, buf).await;
        buf = b;
        alone.push(us);
        if flush(alone.len()) {
            flushes_alone.push(one_flush(&disk).await);
        }
        let (us, b) = one_read(&disk, &mut rng, blocks, rbuf).await;
        rbuf = b;
        alone_reads.push(us);
    }

    let registry = JobRegistry::new();
    let mut events = registry.subscribe();
    let started = Instant::now();
    let mut options = BackupOptions::new("bench");
    if let Some(w) = std::env::var("BENCH_WORKERS")
        .ok()
        .and_then(|w| w.parse().ok())
    {
        options.max_workers = w;
    }
    if let Some(c) = std::env::var("BENCH_CHUNK")
        .ok()
        .and_then(|c| c.parse().ok())
    {
        options.max_chunk = c;
    }
    let (job, _) = start_backup(&graph, &registry, "src", "tgt", options)
        .await
        .expect("backup starts");
    let done = Arc::new(AtomicBool::new(false));
    let watcher = {
        let done = done.clone();
        let id = job.id().to_string();
        tokio::spawn(async move {
            loop {
                match events.recv().await {
                    Ok(JobEvent::StatusChange {
                        id: i,
                        status: JobStatus::Concluded,
                    }) if i == id => break,
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
            done.store(true, Ordering::SeqCst);
            started.elapsed().as_secs_f64()
        })
    };
    let mut during = Vec::new();
    let mut during_reads = Vec::new();
    while !done.load(Ordering::SeqCst) {
        let (us, b) = one_write(&disk, &mut rng, blocks, buf).await;
        buf = b;
        during.push(us);
        if flush(during.len()) {
            flushes_during.push(one_flush(&disk).await);
        }
        let (us, b) = one_read(&disk, &mut rng, blocks, rbuf).await;
        rbuf = b;
        during_reads.push(us);
    }
    let backup_seconds = watcher.await.unwrap();
    let mut report = serde_json::json!({
        "alone": percentiles(alone),
        "during_backup": percentiles(during),
        "reads_alone": percentiles(alone_reads),
        "reads_during_backup": percentiles(during_reads),
        "backup_seconds": backup_seconds,
    });
    if flush_every > 0 {
        report["flushes_alone"] = percentiles(flushes_alone);
        report["flushes_during_backup"] = percentiles(flushes_during);
    }
    println!("{report}");
}
