//! The qcow2 driver judged by QEMU: images qemu-img and qemu-io make are read byte for
//! byte as qemu-img reads them, and images we write pass `qemu-img check` (no errors,
//! no leaks) and compare equal to a model of the writes.

mod common;

use std::path::Path;
use std::path::PathBuf;

use block::BlockdevOptions;
use block::ErrorKind;
use block::IoBuf;
use block::NodeGraph;
use block::WriteFlags;
use block::ZeroFlags;
use block::drivers::qcow2;
use block::drivers::qcow2::header::CompressionType;
use block::drivers::qcow2::header::CreateOptions;
use block::node::AttachUser;
use block::node::Attachment;
use common::ok;
use common::run;
use common::s;
use serde_json::json;
use testkit::Rng;

/// The bytes qemu-img reads from an image (converted to raw).
fn qemu_bytes(image: &Path, dir: &Path) -> Vec<u8> {
    let raw = dir.join("qemu-view.raw");
    ok("qemu-img", &["convert", "-O", "raw", s(image), s(&raw)]);
    let bytes = std::fs::read(&raw).unwrap();
    std::fs::remove_file(raw).unwrap();
    bytes
}

/// `qemu-img check` must find no errors and no leaks.
fn assert_clean(image: &Path) {
    let out = run("qemu-img", &["check", "--output=json", s(image)]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "qemu-img check {} exited {:?}: {text}{}",
        image.display(),
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(report["check-errors"], 0, "{text}");
    assert!(report.get("leaks").is_none(), "{text}");
    assert!(report.get("corruptions").is_none(), "{text}");
}

struct Image {
    node: Attachment,
    graph: std::sync::Arc<NodeGraph>,
}

async fn open(path: &Path, read_only: bool) -> block::Result<Image> {
    let graph = std::sync::Arc::new(NodeGraph::new());
    let options = BlockdevOptions::from_json(json!({
        "driver": "qcow2",
        "node-name": "img",
        "read-only": read_only,
        "file": {"driver": "file", "filename": s(path)},
    }))?;
    graph.add(options).await?;
    let node = graph.attach("img", AttachUser::Other("test".into()))?;
    Ok(Image { node, graph })
}

impl Image {
    async fn read_all(&self) -> Vec<u8> {
        let len = self.node.length();
        let mut out = Vec::with_capacity(len as usize);
        let mut at = 0;
        while at < len {
            let n = (len - at).min(3 << 20);
            let buf = self.node.read(at, IoBuf::zeroed(n as usize)).await.unwrap();
            out.extend_from_slice(&buf);
            at += n;
        }
        out
    }

    async fn close(self) {
        let Image { node, graph } = self;
        drop(node);
        graph.remove("img").await.unwrap();
    }
}

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_made_by_qemu_read_identically() {
    let dir = tempdir();
    for (cluster, compression) in [
        ("512", "zlib"),
        ("4k", "zlib"),
        ("64k", "zlib"),
        ("64k", "zstd"),
        ("2M", "zlib"),
    ] {
        let img = dir.path().join(format!("q-{cluster}-{compression}.qcow2"));
        ok(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                &format!("cluster_size={cluster},compression_type={compression}"),
                s(&img),
                "9M",
            ],
        );
        ok(
            "qemu-io",
            &[
                "-c",
                "write -P 0x11 0 300k",
                "-c",
                "write -z 64k 64k",
                "-c",
                "write -z -u 128k 4k",
                "-c",
                "write -P 0x22 1000k 10k",
                "-c",
                "write -c -P 0x33 4M 2M",
                "-c",
                "discard 200k 64k",
                "-c",
                "write -P 0x44 8M 1M",
                s(&img),
            ],
        );
        let expected = qemu_bytes(&img, dir.path());
        let image = open(&img, true).await.unwrap();
        let ours = image.read_all().await;
        assert!(ours == expected, "{cluster} {compression}: contents differ");
        image.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_2_and_converted_images_read_identically() {
    let dir = tempdir();
    // A raw image of mixed content, converted by qemu-img: plain, compressed, and as a
    // version 2 (compat=0.10) image.
    let raw = dir.path().join("src.raw");
    let mut rng = Rng(5);
    let mut data = vec![0u8; 6 << 20];
    for chunk in data.chunks_mut(256 << 10) {
        match rng.below(3) {
            0 => chunk.copy_from_slice(&rng.bytes(chunk.len())),
            1 => chunk.fill(b'q'),
            _ => {}
        }
    }
    std::fs::write(&raw, &data).unwrap();
    for (name, extra) in [
        ("plain", vec![]),
        ("compressed", vec!["-c"]),
        ("v2", vec!["-o", "compat=0.10"]),
        ("v2-small", vec!["-o", "compat=0.10,cluster_size=4k", "-c"]),
    ] {
        let img = dir.path().join(format!("{name}.qcow2"));
        let mut args = vec!["convert", "-O", "qcow2"];
        args.extend(extra.iter().copied());
        args.extend([s(&raw), s(&img)]);
        ok("qemu-img", &args);
        let image = open(&img, true).await.unwrap();
        assert!(image.read_all().await == data, "{name}: contents differ");
        image.close().await;
    }
    // Writing to a version 2 image: no zero flag, so zeros deallocate (no backing).
    let img = dir.path().join("v2.qcow2");
    let image = open(&img, false).await.unwrap();
    image
        .node
        .write(
            100_000,
            IoBuf::from_slice(&[9; 300_000]),
            WriteFlags::default(),
        )
        .await
        .unwrap();
    image
        .node
        .write_zeroes(1 << 20, 1 << 20, ZeroFlags::default())
        .await
        .unwrap();
    image.close().await;
    data[100_000..400_000].fill(9);
    data[1 << 20..2 << 20].fill(0);
    assert_clean(&img);
    assert!(qemu_bytes(&img, dir.path()) == data, "v2 after writes");
    let info = ok("qemu-img", &["info", "--output=json", s(&img)]);
    assert!(info.contains("\"compat\": \"0.10\""), "{info}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backing_chain_reads_through_and_writes_copy_on_write() {
    let dir = tempdir();
    let base = dir.path().join("base.qcow2");
    let top = dir.path().join("top.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", s(&base), "4M"]);
    ok(
        "qemu-io",
        &[
            "-c",
            "write -P 0x5a 0 1M",
            "-c",
            "write -P 0x6b 2M 1M",
            s(&base),
        ],
    );
    qcow2::create_file(
        &top,
        &CreateOptions {
            size: 4 << 20,
            backing_file: Some("base.qcow2".into()),
            backing_format: Some("qcow2".into()),
            ..CreateOptions::default()
        },
    )
    .unwrap();
    let image = open(&top, false).await.unwrap();
    // Partial-cluster writes must keep the backing bytes around them.
    image
        .node
        .write(
            1000,
            IoBuf::from_slice(&[0xee; 3000]),
            WriteFlags::default(),
        )
        .await
        .unwrap();
    // Zeros over backing data must hide it.
    image
        .node
        .write_zeroes(2 << 20, 128 << 10, ZeroFlags::default())
        .await
        .unwrap();
    image
        .node
        .write_zeroes((2 << 20) + 300_000, 5000, ZeroFlags::default())
        .await
        .unwrap();
    let ours = image.read_all().await;
    image.close().await;
    let mut expected = vec![0u8; 4 << 20];
    expected[..1 << 20].fill(0x5a);
    expected[2 << 20..3 << 20].fill(0x6b);
    expected[1000..4000].fill(0xee);
    expected[2 << 20..(2 << 20) + (128 << 10)].fill(0);
    expected[(2 << 20) + 300_000..(2 << 20) + 305_000].fill(0);
    assert!(ours == expected, "our view differs from the model");
    assert!(
        qemu_bytes(&top, dir.path()) == expected,
        "qemu's view differs"
    );
    assert_clean(&top);
}

/// Writes, zero writes and discards at random offsets and sizes; after a clean close,
/// qemu-img check finds nothing and qemu-img reads exactly the model.
async fn random_ops(seed: u64, cluster_bits: u32, size: u64, ops: usize, backing: bool) {
    let dir = tempdir();
    let mut rng = Rng(seed);
    let img = dir.path().join("r.qcow2");
    let mut model = vec![0u8; size as usize];
    let mut options = CreateOptions {
        size,
        cluster_bits,
        ..CreateOptions::default()
    };
    if backing {
        let base = dir.path().join("base.raw");
        let data = rng.bytes(size as usize);
        std::fs::write(&base, &data).unwrap();
        model.copy_from_slice(&data);
        options.backing_file = Some("base.raw".into());
        options.backing_format = Some("raw".into());
    }
    qcow2::create_file(&img, &options).unwrap();
    let image = open(&img, false).await.unwrap();
    let cs = 1u64 << cluster_bits;
    for _ in 0..ops {
        // Sizes from a few bytes to several clusters, offsets often cluster aligned.
        let len = match rng.below(3) {
            0 => 1 + rng.below(cs),
            1 => cs * (1 + rng.below(4)),
            _ => 1 + rng.below(cs * 6),
        }
        .min(size);
        let mut offset = rng.below(size - len + 1);
        if rng.below(2) == 0 {
            offset = offset / cs * cs;
            offset = offset.min(size - len);
        }
        let end = (offset + len) as usize;
        match rng.below(10) {
            0..=5 => {
                let data = rng.bytes(len as usize);
                image
                    .node
                    .write(offset, IoBuf::from_slice(&data), WriteFlags::default())
                    .await
                    .unwrap();
                model[offset as usize..end].copy_from_slice(&data);
            }
            6..=8 => {
                let flags = ZeroFlags {
                    may_unmap: rng.below(2) == 0,
                    ..ZeroFlags::default()
                };
                image.node.write_zeroes(offset, len, flags).await.unwrap();
                model[offset as usize..end].fill(0);
            }
            _ => {
                // Discard is advisory: the driver only drops whole clusters, which
                // then read as zeros.
                image
                    .node
                    .node()
                    .driver()
                    .discard(offset, len)
                    .await
                    .unwrap();
                let first = offset.div_ceil(cs) * cs;
                let last = if offset + len == size {
                    size
                } else {
                    (offset + len) / cs * cs
                };
                if first < last {
                    model[first as usize..last as usize].fill(0);
                }
            }
        }
        if rng.below(20) == 0 {
            image.node.flush().await.unwrap();
        }
    }
    let ours = image.read_all().await;
    image.close().await;
    assert!(
        ours == model,
        "seed {seed}: our reads differ from the model"
    );
    assert_clean(&img);
    assert!(
        qemu_bytes(&img, dir.path()) == model,
        "seed {seed}: qemu-img reads differ from the model"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_writes_zeroes_and_discards_pass_qemu_img_check() {
    for seed in 0..4 {
        random_ops(seed, 16, 8 << 20, 300, false).await;
    }
    for seed in 10..13 {
        random_ops(seed, 9, 1 << 20, 300, false).await;
    }
    for seed in 20..23 {
        random_ops(seed, 12, (3 << 20) + 1536, 300, true).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_keep_the_image_consistent() {
    let dir = tempdir();
    let img = dir.path().join("c.qcow2");
    let size = 16u64 << 20;
    qcow2::create_file(
        &img,
        &CreateOptions {
            size,
            cluster_bits: 16,
            ..CreateOptions::default()
        },
    )
    .unwrap();
    let image = open(&img, false).await.unwrap();
    // Each writer owns interleaved 4 KiB stripes, so their requests share clusters
    // (allocation races) but never bytes.
    let mut tasks = Vec::new();
    for w in 0..4u64 {
        let node = image
            .graph
            .attach("img", AttachUser::Other(format!("writer {w}")))
            .unwrap();
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng(w);
            let mut written: Vec<(u64, Vec<u8>)> = Vec::new();
            for _ in 0..400 {
                let stripe = rng.below(size / 4096 / 4) * 4 + w;
                let data = rng.bytes(4096);
                node.write(
                    stripe * 4096,
                    IoBuf::from_slice(&data),
                    WriteFlags::default(),
                )
                .await
                .unwrap();
                written.push((stripe, data));
            }
            written
        }));
    }
    let mut model = vec![0u8; size as usize];
    for t in tasks {
        for (stripe, data) in t.await.unwrap() {
            model[(stripe * 4096) as usize..(stripe * 4096 + 4096) as usize].copy_from_slice(&data);
        }
    }
    let ours = image.read_all().await;
    image.close().await;
    assert!(ours == model, "concurrent writes lost data");
    assert_clean(&img);
    assert!(qemu_bytes(&img, dir.path()) == model);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_refcount_table_grows_when_the_file_outgrows_it() {
    // 512-byte clusters: one refcount-table cluster covers 64 blocks of 256 clusters,
    // 8 MiB of file; writing 12 MiB of data must grow the table.
    let dir = tempdir();
    let img = dir.path().join("g.qcow2");
    let size = 12u64 << 20;
    qcow2::create_file(
        &img,
        &CreateOptions {
            size,
            cluster_bits: 9,
            ..CreateOptions::default()
        },
    )
    .unwrap();
    let image = open(&img, false).await.unwrap();
    let mut rng = Rng(7);
    let data = rng.bytes(size as usize);
    for (i, chunk) in data.chunks(1 << 20).enumerate() {
        image
            .node
            .write(
                (i as u64) << 20,
                IoBuf::from_slice(chunk),
                WriteFlags::default(),
            )
            .await
            .unwrap();
    }
    image.close().await;
    assert_clean(&img);
    let info = ok("qemu-img", &["info", "--output=json", s(&img)]);
    assert!(info.contains("\"format\": \"qcow2\""), "{info}");
    assert!(qemu_bytes(&img, dir.path()) == data);
    // The header now names a longer table somewhere else.
    let raw = std::fs::read(&img).unwrap();
    let clusters = u32::from_be_bytes(raw[56..60].try_into().unwrap());
    assert!(clusters > 1, "the refcount table did not grow");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_writes_round_trip_in_both_algorithms() {
    let dir = tempdir();
    for compression in [CompressionType::Deflate, CompressionType::Zstd] {
        let img = dir.path().join("z.qcow2");
        let size = 4u64 << 20;
        qcow2::create_file(
            &img,
            &CreateOptions {
                size,
                compression,
                ..CreateOptions::default()
            },
        )
        .unwrap();
        let image = open(&img, false).await.unwrap();
        let mut rng = Rng(3);
        let mut model = vec![0u8; size as usize];
        // Compressible text-like clusters, one incompressible cluster, and an
        // overwrite of a compressed cluster (plain and compressed again).
        for (i, cluster) in model.chunks_mut(65536).enumerate() {
            if i % 3 == 0 {
                continue;
            }
            for (j, b) in cluster.iter_mut().enumerate() {
                *b = b"stillpoint "[(j + i) % 11];
            }
        }
        model[65536 * 5..65536 * 6].copy_from_slice(&rng.bytes(65536));
        let flags = WriteFlags {
            compressed: true,
            ..WriteFlags::default()
        };
        image
            .node
            .write(0, IoBuf::from_slice(&model), flags)
            .await
            .unwrap();
        model[70_000..71_000].fill(0x99);
        image
            .node
            .write(
                70_000,
                IoBuf::from_slice(&[0x99; 1000]),
                WriteFlags::default(),
            )
            .await
            .unwrap();
        image
            .node
            .write(
                2 * 65536,
                IoBuf::from_slice(&model[2 * 65536..3 * 65536]),
                flags,
            )
            .await
            .unwrap();
        let ours = image.read_all().await;
        image.close().await;
        assert!(ours == model, "{compression:?}: our reads differ");
        assert_clean(&img);
        assert!(
            qemu_bytes(&img, dir.path()) == model,
            "{compression:?}: qemu differs"
        );
        let check = ok("qemu-img", &["check", "--output=json", s(&img)]);
        let report: serde_json::Value = serde_json::from_str(&check).unwrap();
        assert!(
            report["compressed-clusters"].as_u64().unwrap() > 20,
            "{compression:?}: {check}"
        );
        std::fs::remove_file(&img).unwrap();
    }
}

/// A hostile image must fail to open (or to read) with a clear error, never panic and
/// never write.
async fn expect_refused(path: &Path, what: &str) {
    let before = std::fs::read(path).unwrap();
    // Opening for writing either fails before it writes anything, or (when the damage
    // is only in an L2 table) succeeds; the read-only checks below cover that case.
    match open(path, false).await {
        Err(e) => {
            assert!(
                matches!(e.kind(), ErrorKind::Corrupt | ErrorKind::Unsupported),
                "{what} (read-write): {e}"
            );
            assert!(
                std::fs::read(path).unwrap() == before,
                "{what}: a refused read-write open changed the file"
            );
        }
        Ok(image) => {
            drop(image);
            std::fs::write(path, &before).unwrap();
        }
    }
    match open(path, true).await {
        Err(e) => assert!(
            matches!(e.kind(), ErrorKind::Corrupt | ErrorKind::Unsupported),
            "{what}: {e}"
        ),
        Ok(image) => {
            // Opening may succeed when the damage is in an L2 table; reading it fails.
            let len = image.node.length();
            let mut failed = false;
            let mut at = 0;
            while at < len {
                let n = (len - at).min(1 << 20);
                if let Err(e) = image.node.read(at, IoBuf::zeroed(n as usize)).await {
                    assert_eq!(e.kind(), ErrorKind::Corrupt, "{what}: {e}");
                    failed = true;
                    break;
                }
                at += n;
            }
            assert!(failed, "{what}: the damage went unnoticed");
            drop(image);
            return;
        }
    }
    assert!(
        std::fs::read(path).unwrap() == before,
        "{what}: the file changed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_images_are_refused_without_panics_or_writes() {
    let dir = tempdir();
    let good = dir.path().join("good.qcow2");
    ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", s(&good), "64M"],
    );
    ok("qemu-io", &["-c", "write -P 1 0 128k", s(&good)]);
    let original = std::fs::read(&good).unwrap();
    let patch = |name: &str, at: usize, bytes: &[u8]| -> PathBuf {
        let mut data = original.clone();
        data[at..at + bytes.len()].copy_from_slice(bytes);
        let path = dir.path().join(name);
        std::fs::write(&path, data).unwrap();
        path
    };
    // Header fields.
    let l1 = u64::from_be_bytes(original[40..48].try_into().unwrap()) as usize;
    for (name, at, bytes) in [
        ("l1-beyond", 40, (1u64 << 44).to_be_bytes().to_vec()),
        ("l1-huge", 36, u32::MAX.to_be_bytes().to_vec()),
        ("reftable-huge", 56, 0x0100_0000u32.to_be_bytes().to_vec()),
        ("reftable-beyond", 48, (1u64 << 44).to_be_bytes().to_vec()),
        ("l1-on-reftable", 40, 0x10000u64.to_be_bytes().to_vec()),
        ("cluster-bits", 20, 40u32.to_be_bytes().to_vec()),
        // An L1 entry pointing past the end of the file, and into the header.
        (
            "l2-beyond",
            l1,
            ((1u64 << 40) | (1 << 63)).to_be_bytes().to_vec(),
        ),
        (
            "l2-on-l1",
            l1,
            ((l1 as u64) | (1 << 63)).to_be_bytes().to_vec(),
        ),
        (
            "l2-on-reftable",
            l1,
            (0x10000u64 | (1 << 63)).to_be_bytes().to_vec(),
        ),
    ] {
        let path = patch(name, at, &bytes);
        expect_refused(&path, name).await;
    }
    // An L2 entry pointing past the end of the file.
    let l1_entry = u64::from_be_bytes(original[l1..l1 + 8].try_into().unwrap());
    let l2 = (l1_entry & 0x00ff_ffff_ffff_fe00) as usize;
    let path = patch("data-beyond", l2, &((1u64 << 45) | (1 << 63)).to_be_bytes());
    expect_refused(&path, "data-beyond").await;
    // An L2 entry pointing at the L1 table.
    let path = patch("data-on-l1", l2, &((l1 as u64) | (1 << 63)).to_be_bytes());
    expect_refused(&path, "data-on-l1").await;

    // A bitmaps extension whose directory lies beyond the end of the file, and one
    // claiming 70000 bitmaps.
    let with_bitmap = dir.path().join("bitmap.qcow2");
    ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", s(&with_bitmap), "16M"],
    );
    ok("qemu-img", &["bitmap", "--add", s(&with_bitmap), "b0"]);
    let bytes = std::fs::read(&with_bitmap).unwrap();
    let ext = bytes[..65536]
        .windows(4)
        .position(|w| w == [0x23, 0x85, 0x28, 0x75])
        .expect("a bitmaps extension");
    for (name, at, value) in [
        (
            "bitmap-dir-beyond",
            ext + 8 + 16,
            (1u64 << 40).to_be_bytes().to_vec(),
        ),
        ("bitmap-count", ext + 8, 70000u32.to_be_bytes().to_vec()),
        (
            "bitmap-dir-size",
            ext + 8 + 8,
            (1u64 << 40).to_be_bytes().to_vec(),
        ),
    ] {
        let mut data = bytes.clone();
        data[at..at + value.len()].copy_from_slice(&value);
        let path = dir.path().join(name);
        std::fs::write(&path, data).unwrap();
        expect_refused(&path, name).await;
    }

    // A backing chain that loops: a -> b -> a.
    let a = dir.path().join("a.qcow2");
    let b = dir.path().join("b.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", s(&a), "1M"]);
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "a.qcow2",
            "-F",
            "qcow2",
            s(&b),
        ],
    );
    ok(
        "qemu-img",
        &[
            "rebase",
            "-u",
            "-f",
            "qcow2",
            "-b",
            "b.qcow2",
            "-F",
            "qcow2",
            s(&a),
        ],
    );
    let Err(err) = open(&b, true).await else {
        panic!("a looping chain opened");
    };
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
    assert!(err.to_string().contains("loops"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_bitmaps_are_loaded_kept_up_to_date_and_stored() {
    let dir = tempdir();
    let img = dir.path().join("bm.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", s(&img), "16M"]);
    ok(
        "qemu-img",
        &["bitmap", "--add", "-g", "32768", s(&img), "b0"],
    );
    ok("qemu-io", &["-c", "write -P 1 0 1M", s(&img)]);
    // Reading changes nothing.
    let before = std::fs::read(&img).unwrap();
    let image = open(&img, true).await.unwrap();
    let b0 = image.node.node().bitmap("b0").unwrap().info();
    assert_eq!(
        (b0.count, b0.granularity, b0.recording),
        (1 << 20, 32768, true)
    );
    image.close().await;
    assert!(
        std::fs::read(&img).unwrap() == before,
        "a read-only open wrote"
    );
    // Writing marks the bitmap; while open it is in use on disk; a clean close stores
    // it with the new bits and qemu-img sees a clean image.
    let image = open(&img, false).await.unwrap();
    image
        .node
        .write(
            4 << 20,
            IoBuf::from_slice(&[2; 4096]),
            WriteFlags::default(),
        )
        .await
        .unwrap();
    let info = run("qemu-img", &["info", "-U", s(&img)]);
    assert!(
        String::from_utf8_lossy(&info.stdout).contains("in-use"),
        "{}",
        String::from_utf8_lossy(&info.stdout)
    );
    image.close().await;
    assert_clean(&img);
    let info = run("qemu-img", &["info", "--output=json", s(&img)]);
    let text = String::from_utf8_lossy(&info.stdout);
    assert!(
        text.contains("\"b0\"") && !text.contains("in-use"),
        "{text}"
    );
    assert!(
        info.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&info.stderr)
    );
    let image = open(&img, true).await.unwrap();
    let b0 = image.node.node().bitmap("b0").unwrap().info();
    assert_eq!(
        b0.count,
        (1 << 20) + 32768,
        "the write was not stored in the bitmap"
    );
    assert!(!b0.inconsistent);
    image.close().await;
}

/// Rewrites the directory entry of the image's only bitmap to `granularity_bits` and
/// the table size that granularity needs, growing the file (sparsely) so the table
/// "fits": a crafted image whose bitmap asks for any amount of memory.
fn retarget_bitmap(img: &Path, granularity_bits: u8) {
    use block::drivers::qcow2::bitmaps;
    use std::os::unix::fs::FileExt;
    let header = qcow2::read_file_header(img).unwrap().unwrap();
    let (nb, dir_size, dir_offset) = header.bitmaps.unwrap();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(img)
        .unwrap();
    let mut dir = vec![0u8; dir_size as usize];
    file.read_exact_at(&mut dir, dir_offset).unwrap();
    let mut entries = bitmaps::parse_directory(&dir, nb).unwrap();
    let cs = header.cluster_size();
    let data = bitmaps::data_len(header.size, 1 << granularity_bits);
    entries[0].granularity_bits = granularity_bits;
    entries[0].table_size = data.div_ceil(cs) as u32;
    file.write_all_at(&bitmaps::encode_directory(&entries), dir_offset)
        .unwrap();
    let table_end = entries[0].table_offset + u64::from(entries[0].table_size) * 8;
    if file.metadata().unwrap().len() < table_end {
        file.set_len(table_end).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bitmap_too_big_for_memory_is_refused_before_it_is_allocated() {
    let dir = tempdir();
    let img = dir.path().join("bomb.qcow2");
    ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", s(&img), "512T"],
    );
    ok(
        "qemu-img",
        &["bitmap", "--add", "-g", "2147483648", s(&img), "b0"],
    );
    // 512 TiB at 512-byte granularity: 128 GiB of bits.
    retarget_bitmap(&img, 9);
    let qemu = run("qemu-img", &["info", s(&img)]);
    assert!(!qemu.status.success(), "qemu-img refuses it too");
    for read_only in [true, false] {
        let err = open(&img, read_only).await.err().expect("the image opened");
        assert_eq!(err.kind(), ErrorKind::Unsupported, "{err}");
        assert!(
            err.to_string()
                .contains("Bitmap 'b0' doesn't satisfy the constraints: its bits take 128 GiB"),
            "{err}"
        );
    }
    // One step inside the limit (granularity 128 KiB: 512 MiB) opens.
    retarget_bitmap(&img, 17);
    open(&img, true).await.unwrap().close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_ones_bitmap_table_entries_load_as_full_ranges() {
    use std::os::unix::fs::FileExt;
    let dir = tempdir();
    let img = dir.path().join("ones.qcow2");
    // 16 GiB at 512-byte granularity: 4 MiB of bits, a table of 64 clusters.
    ok("qemu-img", &["create", "-q", "-f", "qcow2", s(&img), "16G"]);
    ok("qemu-img", &["bitmap", "--add", "-g", "512", s(&img), "b0"]);
    let header = qcow2::read_file_header(&img).unwrap().unwrap();
    let (nb, dir_size, dir_offset) = header.bitmaps.unwrap();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img)
        .unwrap();
    let mut dir = vec![0u8; dir_size as usize];
    file.read_exact_at(&mut dir, dir_offset).unwrap();
    let entries = qcow2::bitmaps::parse_directory(&dir, nb).unwrap();
    assert_eq!(entries[0].table_size, 64);
    // Every table entry "all ones" (offset 0, bit 0 set).
    let table: Vec<u8> = (0..64).flat_map(|_| 1u64.to_be_bytes()).collect();
    file.write_all_at(&table, entries[0].table_offset).unwrap();
    drop(file);
    let image = open(&img, true).await.unwrap();
    let b0 = image.node.node().bitmap("b0").unwrap().info();
    assert_eq!(b0.count, 16 << 30, "every granule is dirty");
    image.close().await;
}
