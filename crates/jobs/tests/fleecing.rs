//! Pull-mode backup with a standalone copy-before-write node and a snapshot-access
//! node (QEMU 7.0's fleecing graph), at the block layer:
//!
//! ```text
//!   writers --> [cbw: copy-before-write] --> [src]      readers --> [acc: snapshot-access]
//!                        '--> [tgt] (old data)                            '--fixed--> [cbw]
//! ```
//!
//! The snapshot must read as the source did when `cbw` went in, whatever the writers
//! do, and refuse (EACCES) what is outside it; guest writes must never be lost.
//! The stress test takes `STILLPOINT_SEEDS`, `STILLPOINT_SEED_BASE` and `STILLPOINT_SEED`
//! like the invariant test (24 seeds by default).

mod common;

use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;
use std::time::Instant;

use block::AttachUser;
use block::Attachment;
use block::IoBuf;
use block::WriteFlags;
use block::ZeroFlags;
use common::Rig;
use common::Rng;
use common::first_difference;
use common::options;
use serde_json::Value;
use serde_json::json;

const MIB: u64 = 1 << 20;

async fn add(rig: &Rig, v: Value) -> block::Result<()> {
    rig.graph.add(options(v)).await.map(drop)
}

fn user(rig: &Rig, node: &str, who: &str) -> Attachment {
    rig.graph
        .attach(node, AttachUser::Other(who.into()))
        .unwrap()
}

async fn read(disk: &Attachment, offset: u64, len: u64) -> Result<Vec<u8>, i32> {
    disk.read(offset, IoBuf::zeroed(len as usize))
        .await
        .map(|b| b.to_vec())
        .map_err(|e| e.errno())
}

async fn write(disk: &Attachment, offset: u64, data: &[u8]) -> Result<(), i32> {
    disk.write(offset, IoBuf::from_slice(data), WriteFlags::default())
        .await
        .map(drop)
        .map_err(|e| e.errno())
}

/// What the snapshot must answer for `[offset, offset + len)`: the point-in-time bytes
/// when every cluster touched is readable, EACCES otherwise.
fn expected(
    snapshot: &[u8],
    readable: &[bool],
    cluster: u64,
    offset: u64,
    len: u64,
) -> Result<Vec<u8>, i32> {
    let first = offset / cluster;
    let last = (offset + len - 1) / cluster;
    if (first..=last).all(|c| readable[c as usize]) {
        Ok(snapshot[offset as usize..(offset + len) as usize].to_vec())
    } else {
        Err(libc::EACCES)
    }
}

/// One seed: writers hammer the disk through the filter while one reader reads,
/// checks block status and discards in the upper half of the snapshot, and another
/// reads the lower half. Half the seeds protect only the clusters of a bitmap.
async fn run_seed(seed: u64) {
    let mut rng = Rng(seed ^ 0xf1ee);
    let size = match rng.below(3) {
        0 => MIB,
        1 => 2 * MIB + 4096 * rng.below(16),
        _ => 3 * MIB + 1 + rng.below(60_000), // a short last cluster
    };
    let rig = Rig::new(size, seed).await;
    // The node: the file's size rounded up to whole sectors.
    let size = rig.size;
    let snapshot = rig.source_bytes();
    let model = Arc::new(Mutex::new(snapshot.clone()));
    let min_cluster = [64 << 10, 128 << 10][rng.below(2) as usize];
    let cluster = min_cluster.max(64 << 10);
    let clusters = size.div_ceil(cluster) as usize;
    let mut cbw = json!({"driver":"copy-before-write","node-name":"cbw","file":"src",
        "target":"tgt","min-cluster-size":min_cluster});
    let mut readable = vec![true; clusters];
    if seed % 2 == 1 {
        let node = rig.graph.node("src").unwrap();
        let bitmap = node.add_bitmap("bm", Some(4096), false, false).unwrap();
        readable = vec![false; clusters];
        for _ in 0..1 + rng.below(6) {
            let offset = rng.below(size);
            let len = (1 + rng.below(300_000)).min(size - offset);
            bitmap.mark(offset, len);
            for c in offset / cluster..=(offset + len - 1) / cluster {
                readable[c as usize] = true;
            }
        }
        cbw["bitmap"] = json!({"node":"src","name":"bm"});
    }
    // Writers attached before the filter goes in must end up behind it.
    let early = user(&rig, "src", "early user");
    let mut early_writer = Some(user(&rig, "src", "early writer"));
    add(&rig, cbw).await.unwrap();
    assert_eq!(early.node().name(), "cbw");
    add(
        &rig,
        json!({"driver":"snapshot-access","node-name":"acc","file":"cbw","discard":"unmap"}),
    )
    .await
    .unwrap();
    let readable = Arc::new(Mutex::new(readable));

    let mut writers = Vec::new();
    for w in 0..3u64 {
        let disk = match early_writer.take() {
            Some(disk) => disk,
            None => user(&rig, "src", &format!("writer {w}")),
        };
        let model = model.clone();
        let mut rng = Rng(seed.wrapping_mul(77).wrapping_add(w));
        writers.push(tokio::spawn(async move {
            for _ in 0..10 {
                // Writers own disjoint thirds of the disk, so the model is exact.
                let third = size / 3;
                let base = w * third;
                let offset = base + rng.below(third);
                let len = (512 + rng.below(400_000)).min(base + third - offset);
                let end = (offset + len) as usize;
                match rng.below(4) {
                    0 => {
                        let flags = ZeroFlags {
                            may_unmap: rng.below(2) == 0,
                            ..ZeroFlags::default()
                        };
                        disk.write_zeroes(offset, len, flags).await.unwrap();
                        model.lock().unwrap()[offset as usize..end].fill(0);
                    }
                    1 => {
                        disk.discard(offset, len).await.unwrap();
                        model.lock().unwrap()[offset as usize..end].fill(0);
                    }
                    _ => {
                        let data = rng.bytes(len as usize);
                        write(&disk, offset, &data).await.unwrap();
                        model.lock().unwrap()[offset as usize..end].copy_from_slice(&data);
                    }
                }
                if rng.below(2) == 0 {
                    tokio::task::yield_now().await;
                }
            }
        }));
    }

    let upper = {
        let access = user(&rig, "acc", "reader");
        let snapshot = snapshot.clone();
        let readable = readable.clone();
        let mut rng = Rng(seed.wrapping_mul(13));
        tokio::spawn(async move {
            let half = size / 2;
            for i in 0..30 {
                let offset = half + rng.below(size - half);
                let len = (1 + rng.below(300_000)).min(size - offset);
                let want = expected(&snapshot, &readable.lock().unwrap(), cluster, offset, len);
                let got = read(&access, offset, len).await;
                if let Some(at) = match (&got, &want) {
                    (Ok(g), Ok(w)) => first_difference(g, w),
                    (g, w) => (g.is_ok() != w.is_ok() || g.as_ref().err() != w.as_ref().err())
                        .then_some(0),
                } {
                    panic!(
                        "seed {seed}: snapshot read {offset}+{len} wrong near {at}: got {:?}, want {:?}",
                        got.as_ref().map(|_| "data"),
                        want.as_ref().map(|_| "data")
                    );
                }
                if let Ok(extent) = access.block_status(offset, len).await
                    && extent.status.zero
                {
                    let end = (offset + extent.length) as usize;
                    assert!(
                        snapshot[offset as usize..end].iter().all(|b| *b == 0),
                        "seed {seed}: status says zero at {offset}+{} but the snapshot has data",
                        extent.length
                    );
                }
                if i % 7 == 6 {
                    // The reader is done with a range: whole clusters inside it go.
                    let at = half + rng.below(size - half);
                    let len = (1 + rng.below(400_000)).min(size - at);
                    access.discard(at, len).await.unwrap();
                    let first = at.div_ceil(cluster);
                    let end = if at + len == size {
                        clusters as u64
                    } else {
                        (at + len) / cluster
                    };
                    let mut readable = readable.lock().unwrap();
                    for c in first..end.max(first) {
                        readable[c as usize] = false;
                    }
                }
            }
        })
    };
    let lower = {
        let access = user(&rig, "acc", "second reader");
        let snapshot = snapshot.clone();
        let readable = readable.lock().unwrap().clone();
        let mut rng = Rng(seed.wrapping_mul(17));
        tokio::spawn(async move {
            let half = size / 2;
            for _ in 0..30 {
                let offset = rng.below(half);
                // Stay below the first cluster the other reader may discard.
                let limit = half / cluster * cluster;
                if offset >= limit {
                    continue;
                }
                let len = (1 + rng.below(200_000)).min(limit - offset);
                let want = expected(&snapshot, &readable, cluster, offset, len);
                let got = read(&access, offset, len).await;
                assert!(
                    got == want,
                    "seed {seed}: snapshot read {offset}+{len} (lower half) is wrong"
                );
            }
        })
    };
    for task in writers.into_iter().chain([upper, lower]) {
        task.await.unwrap();
    }

    // Every cluster still readable reads as the point in time, in one request too.
    let access = user(&rig, "acc", "final reader");
    let readable_now = readable.lock().unwrap().clone();
    for (c, ok) in readable_now.iter().enumerate() {
        let offset = c as u64 * cluster;
        let len = cluster.min(size - offset);
        let got = read(&access, offset, len).await;
        let want = expected(&snapshot, &readable_now, cluster, offset, len);
        assert!(got == want, "seed {seed}: cluster {c} at the end");
        if !ok {
            assert_eq!(got, Err(libc::EACCES));
        }
    }
    drop(access);

    // Teardown: the reader goes, then the filter; the writers fall back to the disk.
    assert_eq!(
        rig.graph.remove("cbw").await.unwrap_err().to_string(),
        "Block device cbw is in use",
        "seed {seed}: the snapshot reader pins the filter"
    );
    rig.graph.remove("acc").await.unwrap();
    rig.graph.remove("cbw").await.unwrap();
    assert_eq!(early.node().name(), "src");
    write(&early, 0, &[0xee; 512]).await.unwrap();
    model.lock().unwrap()[..512].fill(0xee);
    let source = rig.source_bytes();
    if let Some(at) = first_difference(&source, &model.lock().unwrap()) {
        panic!("seed {seed}: the disk lost a write at byte {at}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_snapshot_reads_the_point_in_time_while_writers_hammer_the_disk() {
    let seeds = common::seeds(24);
    for seed in seeds {
        tokio::spawn(run_seed(seed)).await.unwrap();
    }
}

/// Adds the fleecing graph over "src": copy-before-write "cbw" (target "tgt") and
/// snapshot-access "acc", each with extra members; returns a guest writer (behind the
/// filter) and a snapshot reader.
async fn fleece(rig: &Rig, cbw: Value, access: Value) -> (Attachment, Attachment) {
    let mut options = json!({"driver":"copy-before-write","node-name":"cbw","file":"src",
        "target":"tgt"});
    options
        .as_object_mut()
        .unwrap()
        .extend(cbw.as_object().unwrap().clone());
    add(rig, options).await.unwrap();
    let mut options = json!({"driver":"snapshot-access","node-name":"acc","file":"cbw"});
    options
        .as_object_mut()
        .unwrap()
        .extend(access.as_object().unwrap().clone());
    add(rig, options).await.unwrap();
    (user(rig, "src", "guest"), user(rig, "acc", "reader"))
}

/// Source "src" as a fault filter over the raw disk, so tests can slow requests down.
async fn rig_with_faulty(side: &str, rules: Value) -> Rig {
    let rig = Rig::new(MIB, 7).await;
    let (name, file) = if side == "src" {
        ("src", rig.source.clone())
    } else {
        ("tgt", rig.target.clone())
    };
    rig.graph.remove(name).await.unwrap();
    add(
        &rig,
        json!({"driver":"fault","node-name":name,"rules":rules,
            "image":{"driver":"raw","discard":"unmap","file":{"driver":"file","filename":file}}}),
    )
    .await
    .unwrap();
    rig
}

#[tokio::test]
async fn a_guest_write_waits_for_a_snapshot_read_of_the_source() {
    // The first read of the source (the snapshot read) takes 600 ms.
    let rig = rig_with_faulty("src", json!([{"op":"read","delay-ms":600,"once":true}])).await;
    let old = rig.source_bytes();
    let (guest, access) = fleece(&rig, json!({}), json!({})).await;
    let reader = tokio::spawn(async move { read(&access, 0, 64 << 10).await });
    tokio::time::sleep(Duration::from_millis(150)).await;
    // Saving the old data is fast (the delay rule is spent), but the write must not
    // reach the disk while the snapshot read is still reading it.
    write(&guest, 0, &[0x5a; 4096]).await.unwrap();
    assert!(
        reader.is_finished(),
        "the write finished before the snapshot read"
    );
    let got = reader.await.unwrap().unwrap();
    assert!(
        got == old[..64 << 10],
        "the snapshot read saw the guest write"
    );
    assert_eq!(rig.source_bytes()[..4096], [0x5a; 4096]);
}

#[tokio::test]
async fn break_guest_write_fails_the_write_and_keeps_the_snapshot() {
    let rig = rig_with_faulty("tgt", json!([{"op":"write","once":true}])).await;
    let old = rig.source_bytes();
    let (guest, access) =
        fleece(&rig, json!({"on-cbw-error":"break-guest-write"}), json!({})).await;
    assert_eq!(write(&guest, 0, &[1; 65536]).await, Err(libc::EIO));
    assert!(
        rig.source_bytes() == old,
        "a failed guest write reached the disk"
    );
    assert!(read(&access, 0, MIB).await.unwrap() == old);
    // The fault is spent: the next write saves the old data and goes through.
    write(&guest, 0, &[2; 65536]).await.unwrap();
    assert!(read(&access, 0, MIB).await.unwrap() == old);
    assert_eq!(rig.source_bytes()[..65536], [2; 65536]);
}

#[tokio::test]
async fn break_snapshot_lets_the_write_through_and_refuses_snapshot_reads() {
    let rig = rig_with_faulty("tgt", json!([{"op":"write","once":true}])).await;
    let (guest, access) = fleece(&rig, json!({"on-cbw-error":"break-snapshot"}), json!({})).await;
    write(&guest, 0, &[1; 65536]).await.unwrap();
    assert_eq!(rig.source_bytes()[..65536], [1; 65536]);
    assert_eq!(read(&access, 0, MIB).await, Err(libc::EACCES));
    assert_eq!(read(&access, 512 << 10, 4096).await, Err(libc::EACCES));
}

#[tokio::test]
async fn cbw_timeout_fails_or_breaks_at_the_limit() {
    for mode in ["break-guest-write", "break-snapshot"] {
        // Saving old data to the target takes 2.5 s; the limit is 1 s (the margin keeps
        // a loaded machine from blurring the two).
        let rig = rig_with_faulty("tgt", json!([{"op":"write","delay-ms":2500,"once":true}])).await;
        let old = rig.source_bytes();
        let (guest, access) = fleece(
            &rig,
            json!({"on-cbw-error":mode,"cbw-timeout":1}),
            json!({}),
        )
        .await;
        let started = Instant::now();
        let result = write(&guest, 0, &[1; 65536]).await;
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(950),
            "{mode}: gave up after {took:?}"
        );
        assert!(
            took < Duration::from_millis(2000),
            "{mode}: waited for the copy: {took:?}"
        );
        if mode == "break-guest-write" {
            assert_eq!(result, Err(libc::ETIMEDOUT));
            // The copy finishes in the background; the snapshot stays whole.
            assert!(read(&access, 0, MIB).await.unwrap() == old);
            assert!(rig.source_bytes() == old);
        } else {
            assert_eq!(result, Ok(()));
            assert_eq!(read(&access, 0, 4096).await, Err(libc::EACCES));
        }
    }
}

#[tokio::test]
async fn a_discarded_range_is_unreadable_unprotected_and_freed_on_the_target() {
    let rig = Rig::new(MIB, 3).await;
    let (guest, access) = fleece(&rig, json!({}), json!({"discard":"unmap"})).await;
    let target = rig.graph.node("tgt").unwrap();
    write(&guest, 0, &[1; 4096]).await.unwrap();
    assert!(target.block_status(0, 65536).await.unwrap().status.data);
    // Inward to whole clusters: [64K, 256K) is discarded, 0..64K and 256K.. are kept.
    access.discard(4096, 300 << 10).await.unwrap();
    access.discard(0, 4096).await.unwrap();
    assert!(read(&access, 0, 65536).await.is_ok());
    assert_eq!(read(&access, 65536, 512).await, Err(libc::EACCES));
    assert_eq!(read(&access, 200 << 10, 100 << 10).await, Err(libc::EACCES));
    assert!(read(&access, 256 << 10, 65536).await.is_ok());
    access.discard(0, 65536).await.unwrap();
    assert!(
        !target.block_status(0, 65536).await.unwrap().status.data,
        "the saved cluster was not given back"
    );
    // No longer protected: a guest write there copies nothing to the target.
    write(&guest, 128 << 10, &[3; 65536]).await.unwrap();
    assert!(
        !target
            .block_status(128 << 10, 65536)
            .await
            .unwrap()
            .status
            .data
    );
}

#[tokio::test]
async fn bad_fleecing_graphs_are_refused_in_clear_words() {
    let rig = Rig::new(MIB, 5).await;
    let small = rig.dir.path().join("small.img");
    std::fs::File::create(&small)
        .unwrap()
        .set_len(MIB / 2)
        .unwrap();
    add(
        &rig,
        json!({"driver":"file","node-name":"small","filename":small}),
    )
    .await
    .unwrap();
    add(
        &rig,
        json!({"driver":"file","node-name":"ro","read-only":true,"filename":rig.target}),
    )
    .await
    .unwrap();
    let cases = [
        (
            json!({"driver":"copy-before-write","node-name":"c","file":"src","target":"small"}),
            "The target 'small' (524288 bytes) is smaller than the node it protects (1048576 bytes)",
        ),
        (
            json!({"driver":"copy-before-write","node-name":"c","file":"src","target":"src"}),
            "Source and target cannot be the same",
        ),
        (
            json!({"driver":"copy-before-write","node-name":"c","file":"src","target":"ro"}),
            "Block node is read-only",
        ),
        (
            json!({"driver":"copy-before-write","node-name":"c","file":"nope","target":"tgt"}),
            "Cannot find device='nope' nor node-name='nope'",
        ),
        (
            json!({"driver":"copy-before-write","node-name":"c","file":"src","target":"tgt",
                "bitmap":{"node":"src","name":"nope"}}),
            "Dirty bitmap 'nope' not found",
        ),
        (
            json!({"driver":"copy-before-write","node-name":"c","file":"src","target":"tgt",
                "bitmap":{"node":"nowhere","name":"b"}}),
            "Node 'nowhere' not found",
        ),
        (
            json!({"driver":"copy-before-write","node-name":"c","file":"src","target":"tgt",
                "min-cluster-size":1u64 << 31}),
            "min-cluster-size must be at most 1073741824 (1 GiB): every copy-before-write \
             holds a whole cluster in memory",
        ),
        (
            json!({"driver":"snapshot-access","node-name":"a","file":"src"}),
            "Node 'src' is not a copy-before-write node: snapshot-access reads the snapshot one keeps",
        ),
        (
            json!({"driver":"snapshot-access","node-name":"a",
                "file":{"driver":"copy-before-write","file":"src","target":"tgt"}}),
            "a copy-before-write node must be added on its own, with a node-name, not as an inline child",
        ),
    ];
    for (options, message) in cases {
        let e = add(&rig, options.clone()).await.unwrap_err();
        assert_eq!(e.to_string(), message, "{options}");
        assert_eq!(
            rig.graph.node_names().len(),
            6,
            "{options} left something behind"
        );
    }
    let e = block::BlockdevOptions::from_json(json!({"driver":"copy-before-write",
        "file":"src","target":"tgt","min-cluster-size":3000}))
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "Cannot create block-copy-state: min-cluster-size needs to be a power of 2"
    );
    let e = block::BlockdevOptions::from_json(json!({"driver":"copy-before-write",
        "file":"src","target":"tgt","cbw-timeout":-1}))
    .unwrap_err();
    assert_eq!(e.to_string(), "Parameter 'cbw-timeout' expects uint32_t");
    // The dotted form (`--blockdev`) spells numbers as text.
    let dotted = block::BlockdevOptions::from_keyval(
        "driver=copy-before-write,node-name=c,file=src,target=tgt,cbw-timeout=30,\
         min-cluster-size=131072,on-cbw-error=break-snapshot",
    )
    .unwrap();
    let block::options::DriverOptions::CopyBeforeWrite(cbw) = dotted.driver else {
        panic!("not a copy-before-write node: {dotted:?}");
    };
    assert_eq!(
        (cbw.cbw_timeout, cbw.min_cluster_size, cbw.on_cbw_error),
        (30, Some(131072), block::options::OnCbwError::BreakSnapshot)
    );
    // Nothing was inserted: writers still write the disk directly.
    assert_eq!(user(&rig, "src", "guest").node().name(), "src");
}

/// Pages of the file at `path` the page cache holds, per `mincore`.
fn cached_pages(path: &std::path::Path) -> Vec<bool> {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(path).unwrap();
    let len = file.metadata().unwrap().len() as usize;
    // SAFETY: a read-only mapping of a file we hold open, unmapped below;
    // mincore writes one byte per page of it into a buffer of that many bytes.
    unsafe {
        let map = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        );
        assert_ne!(map, libc::MAP_FAILED);
        let page = libc::sysconf(libc::_SC_PAGESIZE) as usize;
        let mut vec = vec![0u8; len.div_ceil(page)];
        assert_eq!(libc::mincore(map, len, vec.as_mut_ptr()), 0);
        libc::munmap(map, len);
        vec.into_iter().map(|b| b & 1 == 1).collect()
    }
}

#[tokio::test]
async fn snapshot_reads_of_the_source_start_no_readahead() {
    // A puller streams the whole snapshot; with the host's readahead each read of a
    // data extent read (or, in a hole, zeroed) megabytes past it, which made pulls up
    // to twice as slow (bench/RESULTS.md). So the source is read as a bulk read.
    let rig = Rig::new(4 * MIB, 3).await;
    let mut rng = Rng(3);
    let data = rng.bytes(4 * MIB as usize);
    std::fs::write(&rig.source, &data).unwrap();
    let file = std::fs::File::open(&rig.source).unwrap();
    file.sync_all().unwrap();
    // SAFETY: fadvise on a descriptor we own; integer arguments only.
    let rc = unsafe {
        libc::posix_fadvise(
            std::os::fd::AsRawFd::as_raw_fd(&file),
            0,
            0,
            libc::POSIX_FADV_DONTNEED,
        )
    };
    assert_eq!(rc, 0);
    if cached_pages(&rig.source).iter().any(|&c| c) {
        eprintln!("this filesystem keeps the file's pages cached (tmpfs?): nothing to test");
        return;
    }
    let (_guest, access) = fleece(&rig, json!({}), json!({})).await;
    let got = read(&access, 0, 64 << 10).await.unwrap();
    assert!(got == data[..64 << 10]);
    let cached = cached_pages(&rig.source);
    let first = (64 << 10) * cached.len() / (4 * MIB as usize);
    let past = cached[first..].iter().filter(|&&c| c).count();
    assert_eq!(past, 0, "{past} pages past the 64 KiB read were read ahead");
}
