use std::sync::atomic::AtomicBool;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;

use async_trait::async_trait;
use serde_json::Value;
use serde_json::json;

use super::*;
use crate::buf::IoBuf;
use crate::node::driver::WriteFlags;

fn opts(v: Value) -> BlockdevOptions {
    BlockdevOptions::from_json(v).unwrap()
}

fn image(dir: &tempfile::TempDir, len: u64) -> String {
    let path = dir.path().join(format!("img-{len}"));
    std::fs::File::create(&path).unwrap().set_len(len).unwrap();
    path.to_str().unwrap().to_string()
}

/// A filter that counts the writes it forwards.
#[derive(Debug)]
struct CountingFilter {
    child: Attachment,
    writes: Arc<AtomicU64>,
}

#[async_trait]
impl BlockDriver for CountingFilter {
    fn driver_name(&self) -> &'static str {
        "counting-filter"
    }
    fn length(&self) -> u64 {
        self.child.length()
    }
    fn filtered_child(&self) -> Option<&Attachment> {
        Some(&self.child)
    }
    async fn read(&self, offset: u64, buf: IoBuf) -> Result<IoBuf> {
        self.child.read(offset, buf).await
    }
    async fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> Result<IoBuf> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        self.child.write(offset, buf, flags).await
    }
}

async fn insert_counter(graph: &NodeGraph, above: &str, name: &str) -> Arc<AtomicU64> {
    let writes = Arc::new(AtomicU64::new(0));
    let counter = writes.clone();
    graph
        .insert_filter(above, Some(name.into()), move |child| {
            Ok(Box::new(CountingFilter {
                child,
                writes: counter,
            }) as Box<dyn BlockDriver>)
        })
        .await
        .unwrap();
    writes
}

#[tokio::test]
async fn raw_over_an_inline_file_gets_a_generated_child_name() {
    let dir = tempfile::tempdir().unwrap();
    let graph = NodeGraph::new();
    let disk = graph
        .add(opts(json!({"driver":"raw","node-name":"disk0",
            "file":{"driver":"file","filename":image(&dir, 65536)}})))
        .await
        .unwrap();
    assert_eq!(disk.length(), 65536);
    assert_eq!(graph.node_names(), vec!["#block000", "disk0"]);
    assert!(graph.node("#block000").unwrap().is_implicit());
}

#[tokio::test]
async fn bad_adds_are_refused_and_leave_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let graph = NodeGraph::new();
    let file = image(&dir, 4096);
    let e = graph
        .add(opts(json!({"driver":"file","filename":file})))
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("'node-name' must be specified"),
        "{e}"
    );
    let e = graph
        .add(opts(
            json!({"driver":"file","node-name":"1bad","filename":file}),
        ))
        .await
        .unwrap_err();
    assert_eq!(e.to_string(), "Invalid node-name: '1bad'");
    let e = graph
        .add(opts(
            json!({"driver":"raw","node-name":"d","file":"nosuch"}),
        ))
        .await
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "Cannot find device='nosuch' nor node-name='nosuch'"
    );
    // The inline child opens, then the parent fails: the child must go too.
    let e = graph
        .add(opts(json!({"driver":"raw","node-name":"d","size":8192,
            "file":{"driver":"file","node-name":"f","filename":file}})))
        .await
        .unwrap_err();
    assert!(
        e.to_string()
            .starts_with("The sum of offset (0) and size (8192)"),
        "{e}"
    );
    assert!(graph.node_names().is_empty(), "{:?}", graph.node_names());

    graph
        .add(opts(json!({"driver":"null-co","node-name":"n"})))
        .await
        .unwrap();
    let e = graph
        .add(opts(json!({"driver":"null-co","node-name":"n"})))
        .await
        .unwrap_err();
    assert_eq!(e.to_string(), "Duplicate nodes with node-name='n'");
}

#[tokio::test]
async fn nodes_in_use_cannot_be_deleted_and_say_by_whom() {
    let dir = tempfile::tempdir().unwrap();
    let graph = NodeGraph::new();
    let file = image(&dir, 4096);
    graph
        .add(opts(
            json!({"driver":"file","node-name":"file0","filename":file}),
        ))
        .await
        .unwrap();
    graph
        .add(opts(
            json!({"driver":"raw","node-name":"disk0","file":"file0"}),
        ))
        .await
        .unwrap();
    graph
        .add(opts(
            json!({"driver":"raw","node-name":"disk1","file":{"driver":"file","filename":file}}),
        ))
        .await
        .unwrap();

    let e = graph.remove("file0").await.unwrap_err();
    assert_eq!(e.to_string(), "Block device file0 is in use");
    assert_eq!(e.kind(), ErrorKind::Busy);
    let e = graph.remove("nosuch").await.unwrap_err();
    assert_eq!(e.to_string(), "Failed to find node with node-name='nosuch'");
    let e = graph.remove("#block000").await.unwrap_err();
    assert_eq!(e.to_string(), "Node #block000 is not owned by the monitor");

    let job = graph
        .attach(
            "disk0",
            AttachUser::Job {
                job_type: "backup".into(),
            },
        )
        .unwrap();
    let e = graph.remove("disk0").await.unwrap_err();
    assert_eq!(
        e.to_string(),
        "Node 'disk0' is busy: block device is in use by block job: backup"
    );
    drop(job);
    let export = graph
        .attach("disk0", AttachUser::Other("export 'exp0'".into()))
        .unwrap();
    let e = graph.remove("disk0").await.unwrap_err();
    assert_eq!(e.to_string(), "Node disk0 is in use");
    drop(export);

    graph.remove("disk0").await.unwrap();
    graph.remove("file0").await.unwrap();
    graph.remove("disk1").await.unwrap();
    assert!(
        graph.node_names().is_empty(),
        "implicit children go with their parent"
    );
}

#[tokio::test]
async fn read_only_is_inherited_and_enforced() {
    let dir = tempfile::tempdir().unwrap();
    let graph = NodeGraph::new();
    let disk = graph
        .add(opts(
            json!({"driver":"raw","node-name":"disk0","read-only":true,
            "file":{"driver":"file","filename":image(&dir, 4096)}}),
        ))
        .await
        .unwrap();
    assert!(graph.node("#block000").unwrap().policy().read_only);
    let e = disk
        .write(0, IoBuf::zeroed(512), WriteFlags::default())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionDenied);
    assert_eq!(e.nbd_errno(), 1);
    assert_eq!(disk.read(0, IoBuf::zeroed(512)).await.unwrap().len(), 512);

    let e = graph
        .add(opts(
            json!({"driver":"raw","node-name":"rw","file":"#block000"}),
        ))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("read-only"), "{e}");
}

#[tokio::test]
async fn a_raw_window_maps_onto_its_offset_in_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let graph = NodeGraph::new();
    let path = image(&dir, 65536);
    let window = graph
        .add(opts(
            json!({"driver":"raw","node-name":"part","offset":4096,"size":8192,
            "file":{"driver":"file","filename":path}}),
        ))
        .await
        .unwrap();
    assert_eq!(window.length(), 8192);
    window
        .write(0, IoBuf::from_slice(&[7; 512]), WriteFlags::default())
        .await
        .unwrap();
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(&bytes[4096..4608], &[7; 512]);
    assert!(bytes[..4096].iter().all(|b| *b == 0));
    let e = window.read(8000, IoBuf::zeroed(512)).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::OutOfBounds);
    let status = window.block_status(0, 8192).await.unwrap();
    assert_eq!(status.offset, 0);
    assert_eq!(status.status.host_offset, Some(4096));
}

#[tokio::test]
async fn detect_zeroes_and_discard_follow_the_node_options() {
    let dir = tempfile::tempdir().unwrap();
    let graph = NodeGraph::new();
    let path = image(&dir, 1 << 20);
    let unmap = graph
        .add(opts(
            json!({"driver":"raw","node-name":"unmap","detect-zeroes":"unmap",
            "discard":"unmap","file":{"driver":"file","filename":path}}),
        ))
        .await
        .unwrap();
    unmap
        .write(0, IoBuf::from_slice(&[1; 65536]), WriteFlags::default())
        .await
        .unwrap();
    unmap.flush().await.unwrap();
    assert!(unmap.block_status(0, 65536).await.unwrap().status.data);
    unmap
        .write(0, IoBuf::zeroed(65536), WriteFlags::default())
        .await
        .unwrap();
    assert!(
        unmap.block_status(0, 65536).await.unwrap().status.zero,
        "zero write punched"
    );

    let ignore = graph
        .add(opts(
            json!({"driver":"raw","node-name":"ignore","file":{"driver":"file","filename":path}}),
        ))
        .await
        .unwrap();
    ignore
        .write(0, IoBuf::from_slice(&[1; 65536]), WriteFlags::default())
        .await
        .unwrap();
    ignore.discard(0, 65536).await.unwrap();
    assert!(
        ignore.block_status(0, 65536).await.unwrap().status.data,
        "discard=ignore keeps data"
    );
}

#[tokio::test]
async fn attachments_follow_a_filter_in_and_out() {
    let graph = NodeGraph::new();
    graph
        .add(opts(
            json!({"driver":"null-co","node-name":"disk0","size":1048576}),
        ))
        .await
        .unwrap();
    let export = graph
        .attach("disk0", AttachUser::Other("export".into()))
        .unwrap();

    let writes = insert_counter(&graph, "disk0", "cbw0").await;
    assert_eq!(export.node().name(), "cbw0");
    export
        .write(0, IoBuf::zeroed(512), WriteFlags::default())
        .await
        .unwrap();
    assert_eq!(writes.load(Ordering::SeqCst), 1);

    // Attaching by the filtered node's name while the filter is in place cannot bypass it.
    let late = graph
        .attach("disk0", AttachUser::Other("late export".into()))
        .unwrap();
    late.write(0, IoBuf::zeroed(512), WriteFlags::default())
        .await
        .unwrap();
    assert_eq!(writes.load(Ordering::SeqCst), 2);

    // The filtered node is in use by the filter.
    drop((export, late));
    assert_eq!(
        graph.remove("disk0").await.unwrap_err().to_string(),
        "Block device disk0 is in use"
    );

    let export = graph
        .attach("disk0", AttachUser::Other("export".into()))
        .unwrap();
    graph.remove_filter("cbw0").await.unwrap();
    assert_eq!(export.node().name(), "disk0");
    export
        .write(0, IoBuf::zeroed(512), WriteFlags::default())
        .await
        .unwrap();
    assert_eq!(
        writes.load(Ordering::SeqCst),
        2,
        "the removed filter sees nothing more"
    );
    assert_eq!(graph.node_names(), vec!["disk0"]);
}

#[tokio::test]
async fn stacked_filters_splice_out_in_any_order() {
    let graph = NodeGraph::new();
    graph
        .add(opts(
            json!({"driver":"null-co","node-name":"disk0","size":4096}),
        ))
        .await
        .unwrap();
    let export = graph
        .attach("disk0", AttachUser::Other("export".into()))
        .unwrap();
    let lower = insert_counter(&graph, "disk0", "lower").await;
    let upper = insert_counter(&graph, "disk0", "upper").await;
    assert_eq!(export.node().name(), "upper");
    graph.remove_filter("lower").await.unwrap();
    export
        .write(0, IoBuf::zeroed(512), WriteFlags::default())
        .await
        .unwrap();
    assert_eq!(
        (lower.load(Ordering::SeqCst), upper.load(Ordering::SeqCst)),
        (0, 1)
    );
    graph.remove_filter("upper").await.unwrap();
    assert_eq!(export.node().name(), "disk0");
    assert_eq!(graph.node_names(), vec!["disk0"]);
}

/// A graph with a slow node "slow" (50 ms per request) and an export whose write to it
/// is in flight: (graph, export, set when the write finished, the writing task).
async fn write_in_flight() -> (
    Arc<NodeGraph>,
    Arc<Attachment>,
    Arc<AtomicBool>,
    tokio::task::JoinHandle<()>,
) {
    let graph = Arc::new(NodeGraph::new());
    graph
        .add(opts(
            json!({"driver":"null-co","node-name":"slow","size":4096,"latency-ns":50_000_000u64}),
        ))
        .await
        .unwrap();
    let export = Arc::new(
        graph
            .attach("slow", AttachUser::Other("export".into()))
            .unwrap(),
    );
    let finished = Arc::new(AtomicBool::new(false));
    let in_flight = {
        let (export, finished) = (export.clone(), finished.clone());
        tokio::spawn(async move {
            export
                .write(0, IoBuf::zeroed(512), WriteFlags::default())
                .await
                .unwrap();
            finished.store(true, Ordering::SeqCst);
        })
    };
    tokio::task::yield_now().await; // let the write enter the driver
    (graph, export, finished, in_flight)
}

#[tokio::test(start_paused = true)]
async fn inserting_a_filter_waits_for_requests_in_flight() {
    let (graph, export, finished, in_flight) = write_in_flight().await;
    let writes = insert_counter(&graph, "slow", "filter").await;
    assert!(
        finished.load(Ordering::SeqCst),
        "insert returned while a write was in flight"
    );
    assert_eq!(
        writes.load(Ordering::SeqCst),
        0,
        "the old write did not pass the filter"
    );
    in_flight.await.unwrap();
    export
        .write(0, IoBuf::zeroed(512), WriteFlags::default())
        .await
        .unwrap();
    assert_eq!(writes.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn a_filter_is_built_while_requests_are_drained_and_late_users_cannot_slip_past() {
    let (graph, _export, finished, in_flight) = write_in_flight().await;
    let writes = Arc::new(AtomicU64::new(0));
    let (counter, seen_finished, builder_graph) = (writes.clone(), finished.clone(), graph.clone());
    let late = Arc::new(Mutex::new(None));
    let late_slot = late.clone();
    graph
        .insert_filter("slow", Some("filter".into()), move |child| {
            // What a filter captures at build time belongs to the switch's instant: the
            // write in flight has finished.
            assert!(
                seen_finished.load(Ordering::SeqCst),
                "built before the drain"
            );
            // A user arriving now must end up behind the filter too.
            let attachment = builder_graph
                .attach("slow", AttachUser::Other("late export".into()))
                .unwrap();
            *late_slot.lock().unwrap() = Some(attachment);
            Ok(Box::new(CountingFilter {
                child,
                writes: counter,
            }) as Box<dyn BlockDriver>)
        })
        .await
        .unwrap();
    in_flight.await.unwrap();
    let late = late.lock().unwrap().take().unwrap();
    assert_eq!(late.node().name(), "filter");
    late.write(0, IoBuf::zeroed(512), WriteFlags::default())
        .await
        .unwrap();
    assert_eq!(writes.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_filter_that_cannot_be_built_leaves_users_where_they_were() {
    let graph = NodeGraph::new();
    graph
        .add(opts(
            json!({"driver":"null-co","node-name":"disk0","size":4096}),
        ))
        .await
        .unwrap();
    let export = graph
        .attach("disk0", AttachUser::Other("export".into()))
        .unwrap();
    let e = graph
        .insert_filter("disk0", Some("f".into()), |_| {
            Err(Error::invalid("no filter today"))
        })
        .await
        .unwrap_err();
    assert_eq!(e.to_string(), "no filter today");
    assert_eq!(export.node().name(), "disk0");
    assert_eq!(graph.node_names(), vec!["disk0"]);
    export
        .write(0, IoBuf::zeroed(512), WriteFlags::default())
        .await
        .unwrap();
    // A later filter goes in normally.
    insert_counter(&graph, "disk0", "f").await;
    assert_eq!(export.node().name(), "f");
}

#[tokio::test]
async fn null_co_reads_zeroes_only_when_asked() {
    let graph = NodeGraph::new();
    let zeroes = graph
        .add(opts(
            json!({"driver":"null-co","node-name":"z","size":4096,"read-zeroes":true}),
        ))
        .await
        .unwrap();
    let back = zeroes.read(0, IoBuf::from_slice(&[5; 512])).await.unwrap();
    assert!(back.is_zero());
    assert!(zeroes.block_status(0, 4096).await.unwrap().status.zero);
    let e = zeroes.read(4000, IoBuf::zeroed(512)).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::OutOfBounds);
}

#[test]
fn node_names_follow_qemus_rules() {
    for good in ["a", "disk0", "a.b-c_d", "x234567890123456789012345678901"] {
        validate_node_name(good).unwrap();
    }
    for bad in [
        "",
        "1a",
        "#block0",
        "a b",
        "x2345678901234567890123456789012",
    ] {
        assert!(validate_node_name(bad).is_err(), "{bad}");
    }
}
