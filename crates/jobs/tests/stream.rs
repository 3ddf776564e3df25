//! `block-stream` under guest writes: a qcow2 image over a seeded raw backing file is
//! streamed while two writers write and zero random, unaligned ranges of it (one in
//! each half, so the final content is defined). Afterwards the image reads exactly the
//! backing data under every write, its backing link and header name are gone, and a
//! fresh open of the file alone reads the same.
//!
//! And down to a base that stays: the image over a qcow2 layer (seeded data and zeros)
//! over the raw file, streamed with `base` naming the raw file. Afterwards the header
//! names the raw file, the middle layer is deleted, and a fresh open over the raw file
//! alone reads the same (so the layer's zeros were kept where the raw file has data).
//!
//! A reader reads random ranges meanwhile, through the stream's copy-on-read filter,
//! whose copies race the writers' writes.
//!
//! Each seed picks the size, the cluster size (4 KiB to 64 KiB) and the speed.
//! `STILLPOINT_SEEDS=N` / `STILLPOINT_SEED=S` as in the backup invariant test.

mod common;

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering;

use block::AttachUser;
use block::IoBuf;
use block::NodeGraph;
use block::WriteFlags;
use block::ZeroFlags;
use block::drivers::qcow2;
use common::Rng;
use common::events_until;
use common::first_difference;
use common::options;
use common::seeded_source;
use jobs::JobEvent;
use jobs::JobRegistry;
use jobs::JobStatus;
use jobs::StreamOptions;
use jobs::start_stream;
use serde_json::json;

async fn read_all(graph: &NodeGraph, node: &str, size: u64) -> Vec<u8> {
    let reader = graph
        .attach(node, AttachUser::Other("test reader".into()))
        .unwrap();
    let mut out = Vec::with_capacity(size as usize);
    let mut at = 0;
    while at < size {
        let len = (1 << 20).min(size - at);
        let buf = reader.read(at, IoBuf::zeroed(len as usize)).await.unwrap();
        out.extend_from_slice(&buf);
        at += len;
    }
    out
}

/// Writes seeded data and zeros into `layer` (a qcow2 image over `model`'s content),
/// and into `model`.
async fn fill_layer(layer: &std::path::Path, size: u64, rng: &mut Rng, model: &mut [u8]) {
    let graph = NodeGraph::new();
    graph
        .add(options(json!({"driver":"qcow2","node-name":"layer",
            "file":{"driver":"file","filename":layer}})))
        .await
        .unwrap();
    let writer = graph
        .attach("layer", AttachUser::Other("fill".into()))
        .unwrap();
    for _ in 0..24 {
        let len = 1 + rng.below(96 << 10).min(size - 1);
        let at = rng.below(size - len + 1);
        if rng.below(2) == 0 {
            writer
                .write_zeroes(at, len, ZeroFlags::default())
                .await
                .unwrap();
            model[at as usize..(at + len) as usize].fill(0);
        } else {
            let data = rng.bytes(len as usize);
            writer
                .write(at, IoBuf::from_slice(&data), WriteFlags::default())
                .await
                .unwrap();
            model[at as usize..(at + len) as usize].copy_from_slice(&data);
        }
    }
    drop(writer);
    graph.close_all().await.unwrap();
}

async fn run_seed(seed: u64, keep_base: bool) {
    let mut rng = Rng(seed ^ 0x57_4ea3);
    let size = (1 << 20) + 4096 * rng.below(256);
    let cluster_bits = 12 + rng.below(5) as u32;
    let speed = if rng.below(2) == 0 {
        0
    } else {
        (4 << 20) + rng.below(8 << 20)
    };
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    seeded_source(&base, size, &mut rng);
    let mut content = std::fs::read(&base).unwrap();
    content.resize(size as usize, 0);
    let layer_over = |path: &std::path::Path, below: &std::path::Path, format: &str| {
        qcow2::create_file(
            path,
            &qcow2::header::CreateOptions {
                size,
                cluster_bits,
                backing_file: Some(below.display().to_string()),
                backing_format: Some(format.into()),
                ..Default::default()
            },
        )
        .unwrap();
    };
    let mid = dir.path().join("mid.qcow2");
    let top = dir.path().join("top.qcow2");
    if keep_base {
        layer_over(&mid, &base, "raw");
        fill_layer(&mid, size, &mut rng, &mut content).await;
        layer_over(&top, &mid, "qcow2");
    } else {
        layer_over(&top, &base, "raw");
    }
    let graph = Arc::new(NodeGraph::new());
    graph
        .add(options(json!({"driver":"qcow2","node-name":"top",
            "file":{"driver":"file","filename":top}})))
        .await
        .unwrap();
    let model = Arc::new(Mutex::new(content));

    let registry = JobRegistry::new();
    let mut events = registry.subscribe();
    let mut stream = StreamOptions {
        job_id: "s".into(),
        base_file: keep_base.then(|| base.display().to_string()),
        ..Default::default()
    };
    stream.job.speed = speed;
    start_stream(&graph, &registry, "top", stream)
        .await
        .unwrap();

    let done = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for half in 0..2u64 {
        let guest = graph
            .attach("top", AttachUser::Other(format!("writer {half}")))
            .unwrap();
        let model = model.clone();
        let done = done.clone();
        let mut rng = Rng(seed * 2 + half + 1);
        let (from, to) = (half * size / 2, (half + 1) * size / 2);
        writers.push(tokio::spawn(async move {
            let mut n = 0;
            // Until the job ends, and a few after.
            let mut after = 0;
            while after < 8 {
                if done.load(Ordering::Relaxed) {
                    after += 1;
                }
                let longest = if rng.below(2) == 0 {
                    16 << 10
                } else {
                    128 << 10
                };
                let len = 1 + rng.below(longest);
                let len = len.min(to - from);
                let at = from + rng.below(to - from - len + 1);
                if rng.below(5) == 0 {
                    guest
                        .write_zeroes(at, len, ZeroFlags::default())
                        .await
                        .unwrap();
                    model.lock().unwrap()[at as usize..(at + len) as usize].fill(0);
                } else {
                    let data = rng.bytes(len as usize);
                    guest
                        .write(at, IoBuf::from_slice(&data), WriteFlags::default())
                        .await
                        .unwrap();
                    model.lock().unwrap()[at as usize..(at + len) as usize].copy_from_slice(&data);
                }
                n += 1;
                tokio::task::yield_now().await;
            }
            n
        }));
    }
    // A reader across both halves: its reads go through the stream's copy-on-read
    // filter, which copies clusters in while the writers write them (what it reads is
    // not checked here, racing the writers; the content after is).
    let reader = {
        let guest = graph
            .attach("top", AttachUser::Other("reader".into()))
            .unwrap();
        let done = done.clone();
        let mut rng = Rng(seed * 2 + 7);
        tokio::spawn(async move {
            while !done.load(Ordering::Relaxed) {
                let len = 1 + rng.below(64 << 10);
                let at = rng.below(size - len + 1);
                guest.read(at, IoBuf::zeroed(len as usize)).await.unwrap();
                tokio::task::yield_now().await;
            }
        })
    };
    let seen = events_until(&mut events, "s", JobStatus::Concluded).await;
    done.store(true, Ordering::Relaxed);
    reader.await.unwrap();
    let mut writes = 0;
    for w in writers {
        writes += w.await.unwrap();
    }
    let completed = seen
        .iter()
        .find_map(|e| match e {
            JobEvent::Completed { error, len, .. } => Some((error.clone(), *len)),
            _ => None,
        })
        .expect("BLOCK_JOB_COMPLETED");
    assert_eq!(completed, (None, size), "seed {seed}");
    let node = graph.node("top").unwrap();
    let linked = node.backing().and_then(|b| b.node().filename());
    assert_eq!(
        linked,
        keep_base.then(|| base.clone()),
        "seed {seed}: the link"
    );

    let expect = model.lock().unwrap().clone();
    let got = read_all(&graph, "top", size).await;
    assert!(
        got == expect,
        "seed {seed} ({writes} writes, clusters {}): differs at {:?}",
        1u64 << cluster_bits,
        first_difference(&got, &expect)
    );
    drop(node);
    graph.close_all().await.unwrap();

    // The file alone (or over the base alone): the header says so, same content.
    let header = qcow2::read_file_header(&top).unwrap().unwrap();
    let base_name = base.display().to_string();
    assert_eq!(
        header.backing_file.as_deref(),
        keep_base.then_some(base_name.as_str()),
        "seed {seed}"
    );
    assert_eq!(
        header.backing_format.as_deref(),
        keep_base.then_some("raw"),
        "seed {seed}"
    );
    if keep_base {
        std::fs::remove_file(&mid).unwrap();
    } else {
        std::fs::remove_file(&base).unwrap();
    }
    let fresh = NodeGraph::new();
    fresh
        .add(options(json!({"driver":"qcow2","node-name":"alone",
            "file":{"driver":"file","filename":top}})))
        .await
        .unwrap();
    let again = read_all(&fresh, "alone", size).await;
    assert!(
        again == expect,
        "seed {seed}: reopened differs at {:?}",
        first_difference(&again, &expect)
    );
    fresh.close_all().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_under_guest_writes_leaves_the_image_standing_alone_with_every_write() {
    for seed in common::seeds(12) {
        run_seed(seed, false).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_down_to_a_base_under_guest_writes_leaves_the_image_over_the_base_alone() {
    for seed in common::seeds(12) {
        run_seed(seed, true).await;
    }
}

#[tokio::test]
async fn a_base_without_a_file_name_is_refused_unless_backing_file_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let top = dir.path().join("top.qcow2");
    qcow2::create_file(
        &top,
        &qcow2::header::CreateOptions {
            size: 1 << 20,
            cluster_bits: 16,
            ..Default::default()
        },
    )
    .unwrap();
    let graph = Arc::new(NodeGraph::new());
    graph
        .add(options(
            json!({"driver":"null-co","node-name":"nameless","size":1 << 20}),
        ))
        .await
        .unwrap();
    graph
        .add(options(
            json!({"driver":"qcow2","node-name":"top","backing":"nameless",
            "file":{"driver":"file","filename":top}}),
        ))
        .await
        .unwrap();
    let registry = JobRegistry::new();
    let stream = |backing_file: Option<&str>| StreamOptions {
        job_id: "s".into(),
        base_node: Some("nameless".into()),
        backing_file: backing_file.map(str::to_string),
        ..Default::default()
    };
    let Err(refused) = start_stream(&graph, &registry, "top", stream(None)).await else {
        panic!("a base with no file name was taken");
    };
    assert!(
        refused.to_string().contains("no file name to record"),
        "{refused}"
    );
    // Nothing changed: the image is still linked and its header names nothing new.
    assert!(graph.node("top").unwrap().backing().is_some());
    let mut events = registry.subscribe();
    start_stream(&graph, &registry, "top", stream(Some("nameless.img")))
        .await
        .unwrap();
    events_until(&mut events, "s", JobStatus::Concluded).await;
    graph.close_all().await.unwrap();
    let header = qcow2::read_file_header(&top).unwrap().unwrap();
    assert_eq!(header.backing_file.as_deref(), Some("nameless.img"));
}
