//! A FLUSH of a qcow2 node is acknowledged only when everything written before it is
//! durable: a metadata write that fails is retried by the next flush, a failed sync of
//! the file is never retried into a success, and concurrent flushes each wait for a
//! sync that started after their writes. The `fault` driver sits between the qcow2
//! node and its file to fail or slow the requests of one stage; qemu-io and qemu-img
//! judge what reached the file.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use block::BlockdevOptions;
use block::IoBuf;
use block::NodeGraph;
use block::WriteFlags;
use block::drivers::qcow2;
use block::node::AttachUser;
use block::node::Attachment;
use common::ok;
use common::s;
use serde_json::Value;
use serde_json::json;

/// Syncs a qcow2 open for writing makes before it returns (setting the dirty bit).
const OPEN_SYNCS: u64 = 1;

/// A fresh 64 MiB qcow2 image (64 KiB clusters) made by qemu-img.
fn fresh_image(dir: &Path) -> std::path::PathBuf {
    let img = dir.join("disk.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", s(&img), "64M"]);
    img
}

/// Opens `img` as qcow2 over a `fault` filter with `rules` over the file.
async fn open_with_faults(img: &Path, rules: Value) -> (Arc<NodeGraph>, Attachment) {
    let graph = Arc::new(NodeGraph::new());
    let options = BlockdevOptions::from_json(json!({
        "driver": "qcow2",
        "node-name": "img",
        "file": {
            "driver": "fault",
            "rules": rules,
            "image": {"driver": "file", "filename": s(img)},
        },
    }))
    .unwrap();
    graph.add(options).await.unwrap();
    let node = graph
        .attach("img", AttachUser::Other("test".into()))
        .unwrap();
    (graph, node)
}

async fn close(graph: Arc<NodeGraph>, node: Attachment) {
    drop(node);
    graph.remove("img").await.unwrap();
}

/// qemu-io's verdict on whether `[offset, offset + len)` holds `pattern`.
fn holds_pattern(img: &Path, offset: u64, len: u64, pattern: u8) -> bool {
    let out = Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            &format!("read -P {pattern} {offset} {len}"),
            s(img),
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    out.status.success() && !text.contains("Pattern verification failed")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_l1_write_is_retried_by_the_next_flush_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let img = fresh_image(dir.path());
    let l1 = qcow2::read_file_header(&img)
        .unwrap()
        .unwrap()
        .l1_table_offset;
    let rules = json!([{"op": "write", "offset": l1, "length": 512, "errno": "ENOSPC",
                        "once": true}]);
    let (graph, node) = open_with_faults(&img, rules).await;

    node.write(
        1 << 20,
        IoBuf::from_slice(&[0x5a; 65536]),
        WriteFlags::default(),
    )
    .await
    .unwrap();
    let first = node.flush().await;
    assert!(
        first.is_err(),
        "the L1 write failed, so the flush must fail"
    );
    // The next flush writes the L1 table again; only then may it succeed.
    node.flush().await.unwrap();
    close(graph, node).await;

    assert!(
        holds_pattern(&img, 1 << 20, 65536, 0x5a),
        "an acknowledged write and flush were lost"
    );
    let check: Value =
        serde_json::from_str(&ok("qemu-img", &["check", "--output=json", s(&img)])).unwrap();
    assert!(check.get("leaks").is_none(), "{check}");
    assert!(check.get("corruptions").is_none(), "{check}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_l2_write_keeps_failing_flushes_until_it_is_rewritten() {
    let dir = tempfile::tempdir().unwrap();
    let img = fresh_image(dir.path());
    // A fresh image holds the header, refcount table, one refcount block and L1 in its
    // first four clusters; everything after them is new: the L2 table and the data.
    let rules = json!([{"op": "write", "offset": 4 * 65536, "length": 1 << 30,
                        "errno": "EIO", "after": 2, "once": true}]);
    let (graph, node) = open_with_faults(&img, rules).await;
    // The new L2 table's first (empty) write when it is allocated and the data write
    // pass; the flush's write of the filled-in L2 table fails.
    node.write(
        8 << 20,
        IoBuf::from_slice(&[0x33; 4096]),
        WriteFlags::default(),
    )
    .await
    .unwrap();
    assert!(node.flush().await.is_err());
    node.flush().await.unwrap();
    close(graph, node).await;
    assert!(holds_pattern(&img, 8 << 20, 4096, 0x33));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_sync_is_never_retried_into_a_success() {
    let dir = tempfile::tempdir().unwrap();
    let img = fresh_image(dir.path());
    // Opening for writing syncs twice (dirty bit, then the header's other changes at
    // most once more); count from the first flush the test asks for.
    let rules = json!([{"op": "flush", "errno": "EIO", "once": true, "after": OPEN_SYNCS}]);
    let (graph, node) = open_with_faults(&img, rules).await;
    node.write(0, IoBuf::from_slice(&[7; 65536]), WriteFlags::default())
        .await
        .unwrap();
    let first = node.flush().await.unwrap_err();
    // The pages that sync was writing may be gone: nothing later may claim they are
    // durable, even though the file's next sync would succeed.
    node.write(65536, IoBuf::from_slice(&[8; 4096]), WriteFlags::default())
        .await
        .unwrap();
    let second = node.flush().await.unwrap_err();
    assert!(
        second.to_string().contains("earlier flush"),
        "first: {first}; second: {second}"
    );
    assert!(node.flush().await.is_err());
    drop(node);
    // Closing cannot succeed either (its final flush fails); the image keeps its dirty
    // bit, so qemu-img knows it was not closed cleanly.
    let _ = graph.remove("img").await;
    let info: Value =
        serde_json::from_str(&ok("qemu-img", &["info", "--output=json", "-U", s(&img)])).unwrap();
    assert_eq!(
        info["dirty-flag"], true,
        "a failed close left the image looking clean: {info}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_flush_waits_for_a_sync_that_started_after_its_writes() {
    let dir = tempfile::tempdir().unwrap();
    let img = fresh_image(dir.path());
    let (graph, node) = open_with_faults(&img, json!([])).await;
    // Allocate the clusters and make the metadata durable first, so the writes below
    // are plain overwrites that need only a sync of the file.
    node.write(0, IoBuf::from_slice(&[1; 131072]), WriteFlags::default())
        .await
        .unwrap();
    node.flush().await.unwrap();
    drop(node);
    graph.remove("img").await.unwrap();

    let rules = json!([{"op": "flush", "delay-ms": 600, "once": true, "after": OPEN_SYNCS}]);
    let (graph, node) = open_with_faults(&img, rules).await;
    let node = Arc::new(node);
    node.write(0, IoBuf::from_slice(&[2; 65536]), WriteFlags::default())
        .await
        .unwrap();
    let slow_sync = std::time::Duration::from_millis(600);
    let started = std::time::Instant::now();
    let first = {
        let node = node.clone();
        tokio::spawn(async move { node.flush().await })
    };
    // Let the first flush reach its (slow) sync, then write more and flush again.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    node.write(65536, IoBuf::from_slice(&[3; 65536]), WriteFlags::default())
        .await
        .unwrap();
    node.flush().await.unwrap();
    // The only sync that could cover the second write started after it, so after the
    // slow one ended: the second flush cannot have returned sooner.
    assert!(
        started.elapsed() >= slow_sync,
        "the second flush returned after {:?}, while the sync covering its write was \
         still running",
        started.elapsed()
    );
    first.await.unwrap().unwrap();
    close(graph, Arc::into_inner(node).unwrap()).await;
}
