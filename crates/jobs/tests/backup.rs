//! Backup job behaviour: error policies with the fault driver, copy-before-write
//! failures, cancel, pause, speed, sync=none, and QEMU's argument checks.

mod common;

use std::sync::Arc;
use std::time::Duration;

use block::AttachUser;
use block::Attachment;
use block::ErrorKind;
use block::IoBuf;
use block::WriteFlags;
use block::held_journal::journal_path;
use common::Rig;
use common::events_until;
use common::names;
use common::options;
use jobs::BackupOptions;
use jobs::Job;
use jobs::JobEvent;
use jobs::JobStatus;
use jobs::SyncMode;
use jobs::block_copy::CopyStats;
use jobs::block_copy::OnCbwError;
use jobs::job::ErrorPolicy;
use jobs::job::IoStatus;
use jobs::start_backup;
use serde_json::Value;
use serde_json::json;
use tokio::sync::broadcast::Receiver;

const MIB: u64 = 1 << 20;

/// Adds a `fault` node named `name` over `image` with `rules`.
async fn fault(rig: &Rig, name: &str, image: &str, rules: Value) {
    rig.graph
        .add(options(
            json!({"driver":"fault","node-name":name,"image":image,"rules":rules}),
        ))
        .await
        .unwrap();
}

async fn wait_status(job: &Job, status: JobStatus) {
    for _ in 0..3000 {
        if job.status() == status {
            return;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    panic!("job never reached {status:?}, is {:?}", job.status());
}

fn completed(events: &[JobEvent]) -> Option<Value> {
    events
        .iter()
        .find(|e| matches!(e, JobEvent::Completed { .. }))
        .map(JobEvent::data)
}

fn error_events(events: &[JobEvent]) -> Vec<Value> {
    events
        .iter()
        .filter(|e| matches!(e, JobEvent::Error { .. }))
        .map(JobEvent::data)
        .collect()
}

#[tokio::test]
async fn report_on_a_target_error_fails_the_job_and_removes_the_filter() {
    let rig = Rig::new(4 * MIB, 1).await;
    fault(
        &rig,
        "bad",
        "tgt",
        json!([{"op":"write","offset":MIB,"length":65536,"errno":"EIO"}]),
    )
    .await;
    let mut rx = rig.registry.subscribe();
    let (job, _) = start_backup(
        &rig.graph,
        &rig.registry,
        "src",
        "bad",
        BackupOptions::new("j"),
    )
    .await
    .unwrap();
    let events = events_until(&mut rx, job.id(), JobStatus::Null).await;
    assert_eq!(
        error_events(&events),
        [json!({"device":"j","operation":"write","action":"report"})]
    );
    let done = completed(&events).unwrap();
    assert_eq!(done["error"], "Input/output error");
    assert!(done["offset"].as_u64().unwrap() < done["len"].as_u64().unwrap());
    let tail = names(&events);
    assert_eq!(
        tail[tail.len() - 4..],
        ["aborting", "BLOCK_JOB_COMPLETED", "concluded", "null"]
    );
    assert_eq!(
        rig.graph.node_names().len(),
        5,
        "filter removed: {:?}",
        rig.graph.node_names()
    );
    // The nodes are free again.
    rig.graph.remove("bad").await.unwrap();
}

#[tokio::test]
async fn stop_pauses_with_io_status_and_resume_retries_to_completion() {
    let rig = Rig::new(4 * MIB, 2).await;
    fault(
        &rig,
        "bad",
        "tgt",
        json!([{"op":"write","once":true,"after":1}]),
    )
    .await;
    let mut rx = rig.registry.subscribe();
    let mut opts = BackupOptions::new("j");
    opts.on_target_error = ErrorPolicy::Stop;
    let (job, _) = start_backup(&rig.graph, &rig.registry, "src", "bad", opts)
        .await
        .unwrap();
    wait_status(&job, JobStatus::Paused).await;
    let info = job.block_job_info();
    assert!(info.paused);
    assert_eq!(info.io_status, IoStatus::Failed);
    job.resume().unwrap();
    let events = events_until(&mut rx, job.id(), JobStatus::Null).await;
    assert_eq!(
        error_events(&events),
        [json!({"device":"j","operation":"write","action":"stop"})]
    );
    assert!(
        names(&events)
            .windows(2)
            .any(|w| w == ["paused", "running"])
    );
    assert!(completed(&events).unwrap().get("error").is_none());
    assert_eq!(rig.target_bytes(), rig.source_bytes());
}

#[tokio::test]
async fn ignore_reports_and_retries() {
    let rig = Rig::new(2 * MIB, 3).await;
    fault(
        &rig,
        "bad",
        "tgt",
        json!([{"op":"write","once":true,"after":3}]),
    )
    .await;
    let mut rx = rig.registry.subscribe();
    let mut opts = BackupOptions::new("j");
    opts.on_target_error = ErrorPolicy::Ignore;
    let (job, _) = start_backup(&rig.graph, &rig.registry, "src", "bad", opts)
        .await
        .unwrap();
    let events = events_until(&mut rx, job.id(), JobStatus::Null).await;
    assert_eq!(
        error_events(&events),
        [json!({"device":"j","operation":"write","action":"ignore"})]
    );
    assert!(completed(&events).unwrap().get("error").is_none());
    assert_eq!(rig.target_bytes(), rig.source_bytes());
}

#[tokio::test]
async fn enospc_stops_on_enospc_and_reports_eio() {
    let rig = Rig::new(2 * MIB, 4).await;
    fault(
        &rig,
        "full",
        "tgt",
        json!([{"op":"write","errno":"ENOSPC","once":true}]),
    )
    .await;
    let mut rx = rig.registry.subscribe();
    let mut opts = BackupOptions::new("nospace");
    opts.on_target_error = ErrorPolicy::Enospc;
    let (job, _) = start_backup(&rig.graph, &rig.registry, "src", "full", opts)
        .await
        .unwrap();
    wait_status(&job, JobStatus::Paused).await;
    assert_eq!(job.block_job_info().io_status, IoStatus::Nospace);
    job.resume().unwrap();
    let events = events_until(&mut rx, job.id(), JobStatus::Null).await;
    assert_eq!(error_events(&events)[0]["action"], "stop");
    assert!(completed(&events).unwrap().get("error").is_none());
    assert_eq!(rig.target_bytes(), rig.source_bytes());

    rig.graph.remove("full").await.unwrap();
    fault(&rig, "eio", "tgt", json!([{"op":"write","errno":"EIO"}])).await;
    let mut opts = BackupOptions::new("eio");
    opts.on_target_error = ErrorPolicy::Enospc;
    let (job, _) = start_backup(&rig.graph, &rig.registry, "src", "eio", opts)
        .await
        .unwrap();
    let events = events_until(&mut rx, job.id(), JobStatus::Null).await;
    assert_eq!(error_events(&events)[0]["action"], "report");
    assert_eq!(completed(&events).unwrap()["error"], "Input/output error");
}

#[tokio::test]
async fn a_source_read_error_is_a_read_operation() {
    let rig = Rig::new(2 * MIB, 5).await;
    fault(&rig, "badsrc", "src", json!([{"op":"read"}])).await;
    let mut rx = rig.registry.subscribe();
    let (job, _) = start_backup(
        &rig.graph,
        &rig.registry,
        "badsrc",
        "tgt",
        BackupOptions::new("r"),
    )
    .await
    .unwrap();
    let events = events_until(&mut rx, job.id(), JobStatus::Null).await;
    assert_eq!(
        error_events(&events),
        [json!({"device":"r","operation":"read","action":"report"})]
    );
    assert_eq!(completed(&events).unwrap()["error"], "Input/output error");
}

/// A slow backup of `badsrc` whose reads of the last MiB fail once: a guest write there
/// must copy-before-write before the background copy gets there.
type CbwOutcome = (
    Rig,
    Arc<Job>,
    Result<(), block::Error>,
    Vec<u8>,
    Receiver<JobEvent>,
);

async fn cbw_failure(mode: OnCbwError) -> CbwOutcome {
    let rig = Rig::new(4 * MIB, 6).await;
    let at = 3 * MIB + 4096;
    fault(
        &rig,
        "badsrc",
        "src",
        json!([{"op":"read","offset":at,"length":1,"once":true}]),
    )
    .await;
    let snapshot = rig.source_bytes();
    let rx = rig.registry.subscribe();
    let mut opts = BackupOptions::new("cbw");
    opts.job.speed = 256 << 10;
    opts.on_cbw_error = mode;
    let (job, _) = start_backup(&rig.graph, &rig.registry, "badsrc", "tgt", opts)
        .await
        .unwrap();
    let guest = rig
        .graph
        .attach("badsrc", AttachUser::Other("guest".into()))
        .unwrap();
    let result = guest
        .write(at, IoBuf::from_slice(&[0xee; 512]), WriteFlags::default())
        .await
        .map(drop);
    (rig, job, result, snapshot, rx)
}

#[tokio::test]
async fn break_guest_write_fails_the_write_and_keeps_the_snapshot() {
    let (rig, job, result, snapshot, mut rx) = cbw_failure(OnCbwError::BreakGuestWrite).await;
    let err = result.unwrap_err();
    assert_eq!(err.errno(), libc::EIO, "{err}");
    assert_eq!(
        rig.source_bytes(),
        snapshot,
        "the failed guest write must not reach the source"
    );
    job.set_speed(0).unwrap();
    let events = events_until(&mut rx, job.id(), JobStatus::Null).await;
    assert!(
        completed(&events).unwrap().get("error").is_none(),
        "{events:?}"
    );
    assert_eq!(rig.target_bytes(), snapshot);
}

#[tokio::test]
async fn break_snapshot_lets_the_write_through_and_fails_the_job() {
    let (rig, job, result, snapshot, mut rx) = cbw_failure(OnCbwError::BreakSnapshot).await;
    result.unwrap();
    assert_ne!(rig.source_bytes(), snapshot, "the guest write stands");
    // The job may already be failing; lifting the limit just speeds up the check.
    let _ = job.set_speed(0);
    let events = events_until(&mut rx, job.id(), JobStatus::Null).await;
    let error = completed(&events).unwrap()["error"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(error.contains("snapshot is broken"), "{error}");
}

#[tokio::test]
async fn cancel_mid_way_leaves_the_source_intact() {
    let rig = Rig::new(8 * MIB, 7).await;
    let before = rig.source_bytes();
    let mut rx = rig.registry.subscribe();
    let mut opts = BackupOptions::new("c");
    opts.job.speed = 2 * MIB;
    let (job, _) = start_backup(&rig.graph, &rig.registry, "src", "tgt", opts)
        .await
        .unwrap();
    while job.progress().0 == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    job.cancel(false).unwrap();
    let events = events_until(&mut rx, job.id(), JobStatus::Null).await;
    let cancelled = events
        .iter()
        .find(|e| matches!(e, JobEvent::Cancelled { .. }))
        .unwrap()
        .data();
    assert!(
        cancelled["offset"].as_u64().unwrap() < cancelled["len"].as_u64().unwrap(),
        "{cancelled}"
    );
    assert_eq!(rig.source_bytes(), before);
    assert_eq!(rig.graph.node_names().len(), 4, "filter removed");
}

#[tokio::test]
async fn pause_freezes_progress_and_speed_changes_apply_at_once() {
    let rig = Rig::new(8 * MIB, 8).await;
    let mut rx = rig.registry.subscribe();
    let mut opts = BackupOptions::new("p");
    opts.job.speed = MIB;
    let (job, _) = start_backup(&rig.graph, &rig.registry, "src", "tgt", opts)
        .await
        .unwrap();
    job.pause().unwrap();
    wait_status(&job, JobStatus::Paused).await;
    let frozen = job.progress();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(job.progress(), frozen, "progress moved while paused");
    job.resume().unwrap();
    // At 1 MiB/s the 8 MiB would take ~8 s; with the limit lifted the job completes
    // (events_until gives up after 30 s).
    job.set_speed(0).unwrap();
    let events = events_until(&mut rx, job.id(), JobStatus::Null).await;
    assert!(completed(&events).unwrap().get("error").is_none());
    assert_eq!(rig.target_bytes(), rig.source_bytes());
}

#[tokio::test]
async fn sync_none_copies_only_what_guests_overwrite() {
    let rig = Rig::new(4 * MIB, 9).await;
    let snapshot = rig.source_bytes();
    let mut rx = rig.registry.subscribe();
    let mut opts = BackupOptions::new("none");
    opts.sync = SyncMode::None;
    let (job, _) = start_backup(&rig.graph, &rig.registry, "src", "tgt", opts)
        .await
        .unwrap();
    let guest = rig
        .graph
        .attach("src", AttachUser::Other("guest".into()))
        .unwrap();
    guest
        .write(
            MIB + 100,
            IoBuf::from_slice(&[0x77; 1000]),
            WriteFlags::default(),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        job.status(),
        JobStatus::Running,
        "sync=none runs until cancelled"
    );
    job.cancel(false).unwrap();
    events_until(&mut rx, job.id(), JobStatus::Null).await;
    drop(guest);
    let target = rig.target_bytes();
    let cluster = 64 << 10;
    let (lo, hi) = (MIB as usize, MIB as usize + cluster);
    assert_eq!(
        &target[lo..hi],
        &snapshot[lo..hi],
        "the overwritten cluster's old data"
    );
    assert!(target[..lo].iter().all(|b| *b == 0) && target[hi..].iter().all(|b| *b == 0));
}

#[tokio::test]
async fn arguments_are_checked_in_qemus_words() {
    let rig = Rig::new(MIB, 10).await;
    rig.graph
        .add(options(
            json!({"driver":"null-co","node-name":"small","size":4096}),
        ))
        .await
        .unwrap();
    let start = |device: &'static str, target: &'static str, id: &'static str| {
        let (graph, registry) = (rig.graph.clone(), rig.registry.clone());
        async move { start_backup(&graph, &registry, device, target, BackupOptions::new(id)).await }
    };
    let desc = |r: Result<_, jobs::job::JobError>| r.map(|_| ()).unwrap_err().desc;
    assert_eq!(
        desc(start("src", "src", "j").await),
        "Source and target cannot be the same"
    );
    assert_eq!(
        desc(start("src", "small", "j").await),
        "Source and target image have different sizes"
    );
    assert_eq!(
        desc(start("nosuch", "tgt", "j").await),
        "Cannot find device='nosuch' nor node-name='nosuch'"
    );
    let mut huge = BackupOptions::new("j");
    huge.min_cluster_size = Some(1 << 31);
    assert_eq!(
        desc(start_backup(&rig.graph, &rig.registry, "src", "tgt", huge).await),
        "min-cluster-size must be at most 1073741824 (1 GiB): every copy-before-write holds \
         a whole cluster in memory"
    );
    assert_eq!(
        desc(start("src", "nosuch", "j").await),
        "Cannot find device='nosuch' nor node-name='nosuch'"
    );
    assert_eq!(desc(start("src", "tgt", "1j").await), "Invalid job ID '1j'");

    rig.graph
        .add(options(
            json!({"driver":"null-co","node-name":"sink","size":MIB}),
        ))
        .await
        .unwrap();
    let mut slow = BackupOptions::new("first");
    slow.job.speed = 1;
    let (first, _) = start_backup(&rig.graph, &rig.registry, "src", "tgt", slow)
        .await
        .unwrap();
    assert_eq!(
        desc(start("src", "sink", "first").await),
        "Job ID 'first' already in use"
    );
    assert_eq!(
        desc(start("sink", "tgt", "second").await),
        "Node 'tgt' is busy: block device is in use by block job: backup"
    );
    let e = rig.graph.remove("tgt").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Busy);
    assert_eq!(
        e.to_string(),
        "Node 'tgt' is busy: block device is in use by block job: backup"
    );
    assert_eq!(
        rig.graph.remove("src").await.unwrap_err().to_string(),
        "Block device src is in use"
    );
    let mut rx = rig.registry.subscribe();
    first.cancel(true).unwrap();
    events_until(&mut rx, "first", JobStatus::Null).await;
    rig.graph.remove("tgt").await.unwrap();
    rig.graph.remove("src").await.unwrap();
}

/// `bitmap-mode: always` counts a cluster as copied only once the target made it
/// durable: here every write reaches the target but its flush fails (a full disk that
/// cannot take the metadata, a dead device), so the failed job keeps every bit.
#[tokio::test]
async fn always_mode_keeps_every_bit_when_the_target_cannot_make_its_writes_durable() {
    const K64: u64 = 64 << 10;
    let rig = Rig::new(8 * MIB, 12).await;
    fault(
        &rig,
        "badtgt",
        "tgt",
        json!([{"op":"flush","errno":"ENOSPC"}]),
    )
    .await;
    let src = rig.graph.node("src").unwrap();
    let bitmap = src.add_bitmap("bm0", Some(K64), false, false).unwrap();
    let guest = rig
        .graph
        .attach("src", AttachUser::Other("guest".into()))
        .unwrap();
    guest
        .write(
            0,
            IoBuf::from_slice(&vec![5; 4 * MIB as usize]),
            WriteFlags::default(),
        )
        .await
        .unwrap();
    let mut options = BackupOptions::new("j");
    options.sync = SyncMode::Bitmap;
    options.bitmap = Some("bm0".into());
    options.bitmap_mode = Some(jobs::BitmapMode::Always);
    let mut events = rig.registry.subscribe();
    let (job, _) = start_backup(&rig.graph, &rig.registry, "src", "badtgt", options)
        .await
        .unwrap();
    let history = events_until(&mut events, job.id(), JobStatus::Null).await;
    assert!(
        completed(&history).unwrap()["error"]
            .as_str()
            .unwrap()
            .contains("failed to flush the target"),
        "{history:?}"
    );
    assert_eq!(
        bitmap.info().count,
        4 * MIB,
        "bits of undurable copies were dropped"
    );
}

/// iotest 257's failure outcomes: a `sync=bitmap` backup whose target fails part-way,
/// with a guest write during the job. on-success and never keep every bit plus the new
/// write; always keeps what was not copied (including the chunk whose target write
/// failed) plus the new write.
#[tokio::test]
async fn a_failed_bitmap_backup_leaves_the_bitmap_qemu_leaves() {
    const K64: u64 = 64 << 10;
    for (mode, want) in [
        (
            jobs::BitmapMode::OnSuccess,
            vec![K64, 2 * MIB, 2 * MIB + K64, 6 * MIB],
        ),
        (
            jobs::BitmapMode::Never,
            vec![K64, 2 * MIB, 2 * MIB + K64, 6 * MIB],
        ),
        (
            jobs::BitmapMode::Always,
            vec![2 * MIB, 2 * MIB + K64, 6 * MIB],
        ),
    ] {
        let rig = Rig::new(8 * MIB, 11).await;
        // The first chunk (64K) reaches the target slowly; the second (2M) fails.
        fault(
            &rig,
            "badtgt",
            "tgt",
            json!([{"op":"write","offset":K64,"length":K64,"delay-ms":300,"once":true},
                   {"op":"write","offset":2 * MIB,"length":2 * K64}]),
        )
        .await;
        let src = rig.graph.node("src").unwrap();
        let bitmap = src.add_bitmap("bm0", Some(K64), false, false).unwrap();
        let guest = rig
            .graph
            .attach("src", AttachUser::Other("guest".into()))
            .unwrap();
        for (at, len) in [(K64, K64), (2 * MIB, 2 * K64)] {
            guest
                .write(
                    at,
                    IoBuf::from_slice(&vec![5; len as usize]),
                    WriteFlags::default(),
                )
                .await
                .unwrap();
        }
        let mut options = BackupOptions::new("j");
        options.sync = SyncMode::Bitmap;
        options.bitmap = Some("bm0".into());
        options.bitmap_mode = Some(mode);
        options.max_workers = 1;
        let mut events = rig.registry.subscribe();
        let (job, _) = start_backup(&rig.graph, &rig.registry, "src", "badtgt", options)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        guest
            .write(
                6 * MIB,
                IoBuf::from_slice(&[6; 4096]),
                WriteFlags::default(),
            )
            .await
            .unwrap();
        let history = events_until(&mut events, job.id(), JobStatus::Null).await;
        assert_eq!(
            completed(&history).unwrap()["error"],
            "Input/output error",
            "{mode:?}"
        );
        let bits = bitmap.snapshot();
        let got: Vec<u64> = (0..8 * MIB / K64)
            .map(|c| c * K64)
            .filter(|&at| bits.get(at))
            .collect();
        assert_eq!(got, want, "{mode:?}: clusters left in the bitmap");
        assert!(!bitmap.info().busy, "{mode:?}");
    }
}

/// The bytes of `path` at `[offset, offset + len)`, as the file holds them (not through
/// the graph).
fn file_bytes(path: &std::path::Path, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut out = vec![0; len];
    std::fs::File::open(path)
        .unwrap()
        .read_exact_at(&mut out, offset)
        .unwrap();
    out
}

/// A backup of `device` into "tgt" throttled to 256 KiB/s, so the background pass stays
/// near the start of a 4 MiB disk while a test writes to its end, with a guest attached
/// to `device` and the registry's events from before the start.
async fn throttled_backup(
    rig: &Rig,
    id: &str,
    device: &str,
) -> (Arc<Job>, Arc<CopyStats>, Attachment, Receiver<JobEvent>) {
    let rx = rig.registry.subscribe();
    let mut opts = BackupOptions::new(id);
    opts.job.speed = 256 << 10;
    let (job, stats) = start_backup(&rig.graph, &rig.registry, device, "tgt", opts)
        .await
        .unwrap();
    let guest = rig
        .graph
        .attach(device, AttachUser::Other("guest".into()))
        .unwrap();
    (job, stats, guest, rx)
}

/// Lifts the speed limit and waits for the job to end; it must have succeeded.
async fn finish_unthrottled(job: &Job, rx: &mut Receiver<JobEvent>) {
    job.set_speed(0).unwrap();
    let events = events_until(rx, job.id(), JobStatus::Null).await;
    assert!(
        completed(&events).unwrap().get("error").is_none(),
        "{events:?}"
    );
}

#[tokio::test]
async fn an_aligned_guest_write_is_held_until_its_cluster_is_copied_and_a_flush_puts_it_on_disk() {
    let rig = Rig::new(4 * MIB, 11).await;
    // Near the end: the throttled background pass is nowhere near it.
    let at = 3 * MIB + 8192;
    fault(
        &rig,
        "slowsrc",
        "src",
        json!([{"op":"write","offset":at,"length":1,"delay-ms":300,"once":true}]),
    )
    .await;
    let snapshot = rig.source_bytes();
    let (job, stats, guest, mut rx) = throttled_backup(&rig, "held", "slowsrc").await;
    let guest = Arc::new(guest);
    let old = file_bytes(&rig.source, at, 8192);
    guest
        .write(at, IoBuf::from_slice(&[0xa5; 8192]), WriteFlags::default())
        .await
        .unwrap();
    assert_eq!(
        stats
            .redirected_bytes
            .load(std::sync::atomic::Ordering::Relaxed),
        8192,
        "an aligned write to an uncopied cluster is held"
    );
    assert_eq!(
        file_bytes(&rig.source, at, 8192),
        old,
        "held: the source keeps its old data (no copy-before-write happened)"
    );
    // Reads and block status through the filter see the held write, also in part.
    let read = guest.read(at - 512, IoBuf::zeroed(4096)).await.unwrap();
    assert_eq!(&read[..512], &snapshot[(at - 512) as usize..at as usize]);
    assert!(read[512..].iter().all(|&b| b == 0xa5));
    let status = guest.block_status(at, 8192).await.unwrap();
    assert!(status.status.data && !status.status.zero, "{status:?}");
    assert_eq!(status.length, 8192, "{status:?}");
    // A run that reaches a held block ends where it begins, whatever the source says.
    let before = guest.block_status(at - 4096, 65536).await.unwrap();
    assert!(before.length <= 4096, "{before:?}");
    // A flush writes the held blocks back; the first write-back of `at` is slowed
    // down (the fault rule), and a guest write to that block lands while it is on its
    // way. The newer data must win, on the source and in reads meanwhile.
    let flush = tokio::spawn({
        let guest = guest.clone();
        async move { guest.flush().await.unwrap() }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    guest
        .write(at, IoBuf::from_slice(&[0x5b; 4096]), WriteFlags::default())
        .await
        .unwrap();
    let read = guest.read(at, IoBuf::zeroed(4096)).await.unwrap();
    assert!(
        read.iter().all(|&b| b == 0x5b),
        "a read during the write-back"
    );
    flush.await.unwrap();
    assert_eq!(
        file_bytes(&rig.source, at, 4096),
        vec![0x5b; 4096],
        "after the flush: the write made during the write-back"
    );
    assert_eq!(file_bytes(&rig.source, at + 4096, 4096), vec![0xa5; 4096]);
    finish_unthrottled(&job, &mut rx).await;
    assert_eq!(rig.target_bytes(), snapshot, "the snapshot is intact");
}

/// What a daemon killed now would leave: the image and its journal as the page cache
/// has them (no request is in flight), copied under a new name.
fn as_left_by_a_kill(rig: &Rig, name: &str) -> std::path::PathBuf {
    let image = rig.dir.path().join(name);
    std::fs::copy(&rig.source, &image).unwrap();
    std::fs::copy(journal_path(&rig.source), journal_path(&image)).unwrap();
    image
}

#[tokio::test]
async fn held_writes_survive_a_killed_daemon_in_the_journal_and_the_next_open_writes_them() {
    let rig = Rig::new(4 * MIB, 15).await;
    let (job, _, guest, mut rx) = throttled_backup(&rig, "held-kill", "src").await;
    assert!(
        journal_path(&rig.source).exists(),
        "the journal is made at the start"
    );
    let write =
        |at: u64, data: Vec<u8>| guest.write(at, IoBuf::from_slice(&data), WriteFlags::default());
    // Two pages, the second written again; a page elsewhere, then part of it written
    // unaligned (not held): that page goes to the source first, and its release must
    // keep a replay from putting the older page back over the newer bytes.
    let (a, c) = (3 * MIB, 2 * MIB + 65536);
    write(a, vec![0xa1; 8192]).await.unwrap();
    write(a + 4096, vec![0xb2; 4096]).await.unwrap();
    write(c, vec![0xc3; 4096]).await.unwrap();
    write(c + 100, vec![0xd4; 512]).await.unwrap();
    let mut expected_a = vec![0xa1; 4096];
    expected_a.extend([0xb2; 4096]);
    let mut expected_c = vec![0xc3; 4096];
    expected_c[100..612].fill(0xd4);
    assert!(
        file_bytes(&rig.source, a, 8192) != expected_a,
        "held, not on the source"
    );
    assert!(
        file_bytes(&rig.source, c, 4096) == expected_c,
        "written back, then written"
    );

    let image = as_left_by_a_kill(&rig, "killed.img");
    let open_of = |path: &std::path::Path, read_only: bool, name: &str| {
        options(
            json!({"driver":"raw","node-name":name,"read-only":read_only,
                       "file":{"driver":"file","filename":path}}),
        )
    };
    let open = |read_only: bool, name: &str| open_of(&image, read_only, name);
    // A second node over the running backup's image: the live journal is locked, so
    // this open neither refuses nor takes the held blocks.
    rig.graph
        .add(open_of(&rig.source, true, "peek"))
        .await
        .unwrap();
    assert!(journal_path(&rig.source).exists(), "the live journal stays");
    rig.graph.remove("peek").await.unwrap();
    let err = rig.graph.add(open(true, "ro")).await.unwrap_err();
    assert!(
        err.to_string().contains("stillpoint-held") && err.to_string().contains("read-write"),
        "a read-only open would read stale data: {err}"
    );
    assert!(
        file_bytes(&image, a, 8192) != expected_a,
        "a refused open writes nothing"
    );
    rig.graph.add(open(false, "rw")).await.unwrap();
    assert!(
        file_bytes(&image, a, 8192) == expected_a,
        "the held writes are in the image"
    );
    assert!(
        file_bytes(&image, c, 4096) == expected_c,
        "the later direct write stands"
    );
    assert!(
        !journal_path(&image).exists(),
        "an applied journal is deleted"
    );

    finish_unthrottled(&job, &mut rx).await;
    assert!(
        !journal_path(&rig.source).exists(),
        "the job's end deletes its journal"
    );
    assert!(file_bytes(&rig.source, a, 8192) == expected_a);
}

#[tokio::test]
async fn once_the_guest_has_flushed_held_writes_reach_the_source_between_background_copies() {
    // 64 MiB, throttled to 256 KiB/s: the background's first sweep (which skips ahead
    // where block status splits a chunk) needs tens of seconds to reach 60 MiB.
    let rig = Rig::new(64 * MIB, 17).await;
    let snapshot = rig.source_bytes();
    let (job, stats, guest, mut rx) = throttled_backup(&rig, "held-early", "src").await;
    let held = || {
        stats
            .redirected_bytes
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    // `second` in a cluster whose first pages hold data, so the target shows whether
    // the cluster was copied.
    let cluster = (40 * MIB / 65536..62 * MIB / 65536)
        .map(|c| c * 65536)
        .find(|&c| {
            snapshot[c as usize..c as usize + 8192]
                .iter()
                .any(|&b| b != 0)
        })
        .expect("the seeded image has data there");
    let (first, second) = (63 * MIB + 4096, cluster + 8192);
    let old_first = file_bytes(&rig.source, first, 4096);
    guest
        .write(
            first,
            IoBuf::from_slice(&[0x3c; 4096]),
            WriteFlags::default(),
        )
        .await
        .unwrap();
    assert_eq!(held(), 4096);
    // A guest that has never flushed: its write waits for its cluster's copy, which
    // needs no read of its own, however many copies the background makes meanwhile.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(
        file_bytes(&rig.source, first, 4096),
        old_first,
        "no flush yet: still held"
    );
    guest.flush().await.unwrap();
    assert_eq!(file_bytes(&rig.source, first, 4096), vec![0x3c; 4096]);
    // Now the guest flushes: a held write goes to the source between two background
    // copies, without waiting for a flush or for its cluster's copy.
    guest
        .write(
            second,
            IoBuf::from_slice(&[0xc3; 4096]),
            WriteFlags::default(),
        )
        .await
        .unwrap();
    assert_eq!(held(), 8192, "the second write is held too");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while file_bytes(&rig.source, second, 4096) != vec![0xc3; 4096] {
        assert!(
            std::time::Instant::now() < deadline,
            "the held write never reached the source"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Only its own page's old data went to the target: the rest of its cluster is
    // not copied yet.
    assert!(
        file_bytes(&rig.target, cluster, 8192)
            .iter()
            .all(|&b| b == 0),
        "the background had not copied the cluster"
    );
    finish_unthrottled(&job, &mut rx).await;
    assert_eq!(
        rig.target_bytes(),
        snapshot,
        "the old data was saved before the write went to the source"
    );
}

#[tokio::test]
async fn writes_held_when_a_backup_is_cancelled_reach_the_source() {
    let rig = Rig::new(4 * MIB, 12).await;
    let (job, stats, guest, mut rx) = throttled_backup(&rig, "held-cancel", "src").await;
    let at = 2 * MIB;
    guest
        .write(at, IoBuf::from_slice(&[0x3c; 65536]), WriteFlags::default())
        .await
        .unwrap();
    assert!(
        stats
            .redirected_bytes
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    );
    job.cancel(false).unwrap();
    events_until(&mut rx, job.id(), JobStatus::Null).await;
    assert_eq!(rig.graph.node_names().len(), 4, "filter removed");
    assert_eq!(file_bytes(&rig.source, at, 65536), vec![0x3c; 65536]);
    assert!(
        !journal_path(&rig.source).exists(),
        "and the journal with it"
    );
}

#[tokio::test]
async fn a_held_write_that_cannot_reach_the_source_fails_the_flush_and_is_kept_for_the_next() {
    let rig = Rig::new(4 * MIB, 13).await;
    let at = 3 * MIB;
    fault(
        &rig,
        "flaky",
        "src",
        json!([{"op":"write","offset":at,"length":1,"once":true}]),
    )
    .await;
    let snapshot = rig.source_bytes();
    let (job, stats, guest, mut rx) = throttled_backup(&rig, "held-eio", "flaky").await;
    // Paused, so no background copy runs: after the failed flush the guest has
    // flushed, and an early save between two copies could otherwise write the block
    // before this test looks.
    job.pause().unwrap();
    wait_status(&job, JobStatus::Paused).await;
    guest
        .write(at, IoBuf::from_slice(&[0x77; 4096]), WriteFlags::default())
        .await
        .unwrap();
    assert_eq!(
        stats
            .redirected_bytes
            .load(std::sync::atomic::Ordering::Relaxed),
        4096,
        "held"
    );
    let err = guest.flush().await.unwrap_err();
    assert_eq!(err.errno(), libc::EIO, "{err}");
    assert_eq!(
        &rig.source_bytes()[at as usize..at as usize + 4096],
        &snapshot[at as usize..at as usize + 4096],
        "the write did not reach the source"
    );
    let read = guest.read(at, IoBuf::zeroed(4096)).await.unwrap();
    assert!(read.iter().all(|&b| b == 0x77), "still held, still read");
    guest.flush().await.unwrap();
    assert_eq!(
        &rig.source_bytes()[at as usize..at as usize + 4096],
        &[0x77; 4096][..],
        "the next flush wrote it"
    );
    job.resume().unwrap();
    finish_unthrottled(&job, &mut rx).await;
    assert_eq!(rig.target_bytes(), snapshot);
}

#[tokio::test]
async fn only_whole_pages_into_uncopied_clusters_are_held() {
    let rig = Rig::new(4 * MIB, 14).await;
    let (job, stats, guest, mut rx) = throttled_backup(&rig, "held-rules", "src").await;
    let held = || {
        stats
            .redirected_bytes
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let reaches_source = |at: u64, data: &[u8]| file_bytes(&rig.source, at, data.len()) == data;
    // Not held: part of a page, a FUA write, and a page of a cluster already copied.
    let partial = [0x11; 1024];
    guest
        .write(
            3 * MIB + 512,
            IoBuf::from_slice(&partial),
            WriteFlags::default(),
        )
        .await
        .unwrap();
    assert!(reaches_source(3 * MIB + 512, &partial));
    let fua = [0x22; 4096];
    let flags = WriteFlags {
        fua: true,
        ..WriteFlags::default()
    };
    guest
        .write(3 * MIB + (256 << 10), IoBuf::from_slice(&fua), flags)
        .await
        .unwrap();
    assert!(reaches_source(3 * MIB + (256 << 10), &fua));
    while job.progress().0 < 256 << 10 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let copied = [0x33; 4096];
    guest
        .write(0, IoBuf::from_slice(&copied), WriteFlags::default())
        .await
        .unwrap();
    assert!(reaches_source(0, &copied));
    assert_eq!(held(), 0, "none of these was held");
    // Held: a whole page into a cluster not copied yet.
    let page = [0x44; 4096];
    guest
        .write(
            3 * MIB + (512 << 10),
            IoBuf::from_slice(&page),
            WriteFlags::default(),
        )
        .await
        .unwrap();
    assert_eq!(held(), 4096);
    assert!(!reaches_source(3 * MIB + (512 << 10), &page));
    job.set_speed(0).unwrap();
    events_until(&mut rx, job.id(), JobStatus::Null).await;
    assert!(
        reaches_source(3 * MIB + (512 << 10), &page),
        "written back by the end"
    );
}
