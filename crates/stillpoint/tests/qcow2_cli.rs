//! qcow2 from the command line, judged by qemu-img: `map` output equals qemu-img's
//! (backing chains included), `create` makes images qemu-img accepts, backups to
//! qcow2 (with and without compression) check clean and compare identical, and a
//! writer killed at random points never leaves a corrupt image.

mod common;

use std::path::Path;
use std::process::Command;
use std::process::Stdio;
use std::time::Duration;

use common::*;

/// `qemu-img check` exit code and report: 0 clean, 3 leaks only, 2 corruption.
fn check(image: &Path) -> (i32, serde_json::Value) {
    let out = run("qemu-img", &["check", "--output=json", s(image)]);
    let report = serde_json::from_str(&stdout(&out)).unwrap_or_else(|e| {
        panic!(
            "qemu-img check printed no report ({e}): {}{}",
            stdout(&out),
            stderr(&out)
        )
    });
    (out.status.code().unwrap_or(-1), report)
}

fn assert_clean(image: &Path) {
    let (code, report) = check(image);
    assert_eq!(code, 0, "{}: {report}", image.display());
    assert_eq!(report["check-errors"], 0, "{report}");
}

/// Our map of a qcow2 image equals qemu-img's (the format given: a probed image with
/// a backing file is refused, where qemu-img follows it).
fn assert_same_map(image: &Path) {
    let theirs = ok(
        "qemu-img",
        &["map", "--output=json", "-f", "qcow2", s(image)],
    );
    let mine = ours(&["map", "--output", "json", "-f", "qcow2", s(image)]);
    assert_eq!(mine, theirs, "map of {}", image.display());
}

#[test]
fn map_equals_qemu_img_on_qemu_images_and_chains() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let mid = dir.path().join("mid.qcow2");
    let top = dir.path().join("top.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", s(&base), "8M"]);
    ok(
        "qemu-io",
        &[
            "-c",
            "write -P 1 0 1M",
            "-c",
            "write -z 2M 128k",
            "-c",
            "write -P 2 3M 20k",
            "-c",
            "write -c -P 3 5M 256k",
            s(&base),
        ],
    );
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            s(&mid),
        ],
    );
    ok(
        "qemu-io",
        &[
            "-c",
            "write -P 4 512k 1M",
            "-c",
            "write -z -u 3M 64k",
            s(&mid),
        ],
    );
    // Our own image on top of qemu's chain.
    ours(&["create", "-f", "qcow2", "-b", "mid.qcow2", s(&top)]);
    ok(
        "qemu-io",
        &[
            "-c",
            "write -P 5 100k 10k",
            "-c",
            "discard 6M 128k",
            s(&top),
        ],
    );
    for image in [&base, &mid, &top] {
        assert_same_map(image);
        // Windows of the map too.
        let theirs = ok(
            "qemu-img",
            &[
                "map",
                "--output=json",
                "-f",
                "qcow2",
                "--start-offset=1M",
                "--max-length=3M",
                s(image),
            ],
        );
        let mine = ours(&[
            "map",
            "--output",
            "json",
            "-f",
            "qcow2",
            "--start-offset",
            "1M",
            "--max-length",
            "3M",
            s(image),
        ]);
        assert_eq!(mine, theirs, "window of {}", image.display());
    }
    // qemu-img reads our create/chain the same as the chain's own contents.
    let out = run("qemu-img", &["compare", s(&top), s(&top)]);
    assert!(out.status.success());
}

#[test]
fn map_equals_qemu_img_on_images_we_wrote() {
    let dir = tempfile::tempdir().unwrap();
    for seed in 0..6 {
        let source = dir.path().join(format!("src{seed}.img"));
        let size = seeded_image(&source, seed);
        if !size.is_multiple_of(512) {
            continue; // qcow2 sizes are whole sectors
        }
        let target = dir.path().join(format!("t{seed}.qcow2"));
        ours(&["backup", "--target-format", "qcow2", s(&source), s(&target)]);
        assert_clean(&target);
        assert_same_map(&target);
        let out = run("qemu-img", &["compare", s(&source), s(&target)]);
        assert!(out.status.success(), "seed {seed}: {}", stdout(&out));
    }
}

#[test]
fn create_and_info_agree_with_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.qcow2");
    let out = ours(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=128k,compression_type=zstd",
        s(&img),
        "3G",
    ]);
    assert!(out.contains("fmt=qcow2 cluster_size=131072"), "{out}");
    assert_clean(&img);
    let info: serde_json::Value =
        serde_json::from_str(&ok("qemu-img", &["info", "--output=json", s(&img)])).unwrap();
    assert_eq!(info["virtual-size"], 3u64 << 30);
    assert_eq!(info["cluster-size"], 131072);
    assert_eq!(info["format-specific"]["data"]["compression-type"], "zstd");
    let mine: serde_json::Value =
        serde_json::from_str(&ours(&["info", "--output", "json", s(&img)])).unwrap();
    for key in ["virtual-size", "cluster-size", "format", "dirty-flag"] {
        assert_eq!(mine[key], info[key], "{key}");
    }
    // A backing file: size and format come from it when not given.
    let top = dir.path().join("b.qcow2");
    ours(&["create", "-f", "qcow2", "-b", "a.qcow2", s(&top)]);
    let info: serde_json::Value =
        serde_json::from_str(&ok("qemu-img", &["info", "--output=json", s(&top)])).unwrap();
    assert_eq!(info["backing-filename"], "a.qcow2");
    assert_eq!(info["backing-filename-format"], "qcow2");
    assert_eq!(info["virtual-size"], 3u64 << 30);
    assert_clean(&top);
}

#[test]
fn backups_to_qcow2_check_clean_and_compare_identical_with_and_without_compress() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("src.raw");
    // Mixed content: compressible text, random data, zeros.
    let mut rng = Rng(42);
    let mut data = Vec::new();
    for i in 0..96 {
        match rng.below(3) {
            0 => data.extend(rng.bytes(65536)),
            1 => data.extend(
                format!("cluster {i} of a compressible disk ")
                    .bytes()
                    .cycle()
                    .take(65536),
            ),
            _ => data.extend(std::iter::repeat_n(0u8, 65536)),
        }
    }
    std::fs::write(&source, &data).unwrap();
    let plain = dir.path().join("plain.qcow2");
    let packed = dir.path().join("packed.qcow2");
    ours(&["backup", "--target-format", "qcow2", s(&source), s(&plain)]);
    ours(&[
        "backup",
        "--target-format",
        "qcow2",
        "--compress",
        s(&source),
        s(&packed),
    ]);
    for target in [&plain, &packed] {
        assert_clean(target);
        let out = run("qemu-img", &["compare", s(&source), s(target)]);
        assert!(
            out.status.success(),
            "{}: {}",
            target.display(),
            stdout(&out)
        );
    }
    let (_, report) = check(&packed);
    assert!(
        report["compressed-clusters"].as_u64().unwrap() > 10,
        "{report}"
    );
    assert!(std::fs::metadata(&packed).unwrap().len() < std::fs::metadata(&plain).unwrap().len());
    // And back: a qcow2 source to a raw target.
    let back = dir.path().join("back.raw");
    ours(&["backup", s(&packed), s(&back)]);
    assert!(std::fs::read(&back).unwrap() == data);
}

/// `stillpoint nbd` serving `image` as a writable qcow2 export on `socket`.
fn serve(image: &Path, socket: &Path) -> Running {
    // A killed server leaves its socket behind.
    let _ = std::fs::remove_file(socket);
    Running::start(
        &[
            "nbd",
            s(image),
            "--format",
            "qcow2",
            "--writable",
            "--socket",
            s(socket),
        ],
        socket,
        |_| {},
    )
}

#[test]
fn nbd_writes_to_a_qcow2_image_survive_a_clean_stop() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("n.qcow2");
    let socket = dir.path().join("n.sock");
    ours(&["create", "-f", "qcow2", s(&img), "32M"]);
    let server = serve(&img, &socket);
    let uri = format!("nbd+unix:///?socket={}", socket.display());
    ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x61 1000 70000",
            "-c",
            "write -z 4M 1M",
            "-c",
            "write -P 0x62 31M 1M",
            "-c",
            "discard 0 64k",
            &uri,
        ],
    );
    // While it runs, the image is marked dirty.
    let info = ok("qemu-img", &["info", "-U", "--output=json", s(&img)]);
    assert!(info.contains("\"dirty-flag\": true"), "{info}");
    assert_eq!(server.stop(), Some(0));
    assert_clean(&img);
    let info = ok("qemu-img", &["info", "--output=json", s(&img)]);
    assert!(info.contains("\"dirty-flag\": false"), "{info}");
    let out = run(
        "qemu-io",
        &[
            "-r",
            "-c",
            "read -P 0x61 65536 5464",
            "-c",
            "read -P 0x62 31M 1M",
            s(&img),
        ],
    );
    assert!(
        !stdout(&out).contains("Pattern verification failed"),
        "{}",
        stdout(&out)
    );
    assert!(out.status.success());
}

#[test]
fn a_writer_killed_at_random_points_never_corrupts_the_image() {
    let dir = tempfile::tempdir().unwrap();
    let mut leaks_seen = 0;
    for round in 0..6u64 {
        let mut rng = Rng(1000 + round);
        let cluster = ["512", "4k", "64k"][(round % 3) as usize];
        let img = dir.path().join(format!("k{round}.qcow2"));
        let socket = dir.path().join(format!("k{round}.sock"));
        ours(&[
            "create",
            "-f",
            "qcow2",
            "-o",
            &format!("cluster_size={cluster}"),
            s(&img),
            "64M",
        ]);
        let server = serve(&img, &socket);
        // A stream of writes, zero writes, discards and flushes.
        let mut commands = Vec::new();
        for i in 0..400 {
            let offset = rng.below(60 << 10) << 10;
            let len = (1 + rng.below(96)) << 10;
            commands.push("-c".to_string());
            commands.push(match rng.below(8) {
                0 => format!("write -z {offset} {len}"),
                1 => format!("discard {offset} {len}"),
                2 => "flush".to_string(),
                _ => format!("write -P {} {offset} {len}", i % 250),
            });
        }
        let uri = format!("nbd+unix:///?socket={}", socket.display());
        let mut writer = Command::new("qemu-io")
            .args(["-f", "raw"])
            .args(&commands)
            .arg(&uri)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(50 + rng.below(400)));
        drop(server); // SIGKILL: no flush, no close
        let _ = writer.kill();
        let _ = writer.wait();
        let (code, report) = check(&img);
        assert!(
            code == 0 || code == 3,
            "round {round} ({cluster}): qemu-img check exited {code}: {report}"
        );
        assert_eq!(report["check-errors"], 0, "round {round}: {report}");
        assert!(
            report.get("corruptions").is_none(),
            "round {round}: {report}"
        );
        if code == 3 {
            leaks_seen += 1;
        }
        // We can open it again, write, and close it cleanly (leaks stay leaks).
        let server = serve(&img, &socket);
        ok("qemu-io", &["-f", "raw", "-c", "write -P 7 0 128k", &uri]);
        drop(server);
        let (code, report) = check(&img);
        assert!(code == 0 || code == 3, "round {round} reopen: {report}");
    }
    eprintln!("{leaks_seen} of 6 killed images had leaked clusters (allowed)");
}
