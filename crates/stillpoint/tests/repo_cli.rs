//! `stillpoint repo`, `backup --repo` and `restore --repo` from the command line, with
//! qemu-img as the judge of restored images.

mod common;

use common::*;

/// qemu-img's verdict on two raw images (or NBD URIs): identical or not.
fn raw_compare(a: &str, b: &str) -> std::process::Output {
    run(
        "qemu-img",
        &["compare", "-q", "-f", "raw", "-F", "raw", a, b],
    )
}

/// Restores snapshot `id` into a raw file at `restored`, and qemu-img's verdict on it
/// against the qcow2 image `image`: identical or not.
fn restores_as_qcow2(
    repo: &str,
    id: &str,
    image: &std::path::Path,
    restored: &std::path::Path,
) -> bool {
    ours(&["restore", "--repo", repo, id, s(restored)]);
    run(
        "qemu-img",
        &[
            "compare",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "raw",
            s(image),
            s(restored),
        ],
    )
    .status
    .success()
}

/// Writes `data` into the image at `disk` at `offset`, as a guest would between backups.
fn write_at(disk: &std::path::Path, data: &[u8], offset: u64) {
    let f = std::fs::OpenOptions::new().write(true).open(disk).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, data, offset).unwrap();
}

/// `stillpoint backup DISK --repo REPO --disk NAME --json`, which must succeed; its
/// summary.
fn backup_into(repo: &str, disk: &std::path::Path, name: &str) -> serde_json::Value {
    let out = ours(&["backup", s(disk), "--repo", repo, "--disk", name, "--json"]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

#[test]
fn backups_into_a_repository_restore_identical_images_and_damage_fails_verify() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    let repo = s(&repo);
    ours(&["repo", "init", repo, "--chunk-size", "64K"]);
    let refused = stillpoint(&["repo", "init", repo]);
    assert!(!refused.status.success());
    assert!(stderr(&refused).contains("exists"), "{}", stderr(&refused));

    // Several seeded disks (sizes not multiples of the chunk size, holes, zeros), each
    // backed up twice with a change in between, and every snapshot restored.
    let mut snapshots = Vec::new();
    for seed in 0..4u64 {
        let disk = dir.path().join(format!("d{seed}.raw"));
        let size = seeded_image(&disk, seed + 40);
        let copy = dir.path().join(format!("d{seed}-first.raw"));
        std::fs::copy(&disk, &copy).unwrap();
        let first = backup_into(repo, &disk, &format!("d{seed}"));
        assert_eq!(first["size"], sectors(size), "{first}");
        write_at(&disk, b"changed", size / 2);
        let second = backup_into(repo, &disk, &format!("d{seed}"));
        assert_eq!(second["parent"], first["snapshot"]);
        assert!(second["new_chunks"].as_u64().unwrap() <= 1, "{second}");
        snapshots.push((first["snapshot"].as_str().unwrap().to_string(), copy));
        snapshots.push((second["snapshot"].as_str().unwrap().to_string(), disk));
    }
    for (i, (id, image)) in snapshots.iter().enumerate() {
        let restored = dir.path().join(format!("restored{i}.raw"));
        ours(&["restore", "--repo", repo, id, s(&restored)]);
        let same = raw_compare(s(image), s(&restored));
        assert!(
            same.status.success(),
            "snapshot {id} differs from {}",
            image.display()
        );
        // Into qcow2 as well, through the same block-layer copy.
        let qcow2 = dir.path().join(format!("restored{i}.qcow2"));
        let out = ours(&[
            "restore",
            "--repo",
            repo,
            id,
            s(&qcow2),
            "--target-format",
            "qcow2",
        ]);
        assert!(out.contains("(qcow2)"), "{out}");
        let same = std::process::Command::new("qemu-img")
            .args([
                "compare",
                "-q",
                "-f",
                "raw",
                "-F",
                "qcow2",
                s(image),
                s(&qcow2),
            ])
            .status()
            .unwrap();
        assert!(same.success(), "snapshot {id} in qcow2 differs");
        let check = std::process::Command::new("qemu-img")
            .args(["check", "-q", s(&qcow2)])
            .status()
            .unwrap();
        assert!(check.success(), "qemu-img check of the restored qcow2");
        std::fs::remove_file(&qcow2).unwrap();
    }
    // Restoring over an existing file is refused; the file is untouched.
    let existing = dir.path().join("restored1.raw");
    let before = std::fs::read(&existing).unwrap();
    assert!(
        !stillpoint(&["restore", "--repo", repo, "d0", s(&existing)])
            .status
            .success()
    );
    assert_eq!(std::fs::read(&existing).unwrap(), before);

    let listed: serde_json::Value = serde_json::from_str(&ours(&[
        "repo",
        "snapshots",
        repo,
        "--json",
        "--disk",
        "d1",
    ]))
    .unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 2);
    ours(&["repo", "verify", repo]);

    // Stats, then prune to the newest snapshot of each disk.
    let stats: serde_json::Value =
        serde_json::from_str(&ours(&["repo", "stats", repo, "--json"])).unwrap();
    assert_eq!(stats["snapshots"], 8);
    assert!(stats["stored_bytes"].as_u64().unwrap() < stats["logical_bytes"].as_u64().unwrap());
    let dry = ours(&["repo", "prune", repo, "--keep-last", "1", "--dry-run"]);
    assert_eq!(dry.matches("would remove ").count(), 4, "{dry}");
    assert!(
        !stillpoint(&["repo", "prune", repo]).status.success(),
        "no rule, no prune"
    );
    let count = |v: &str| {
        serde_json::from_str::<serde_json::Value>(v)
            .unwrap()
            .as_array()
            .unwrap()
            .len()
    };
    assert_eq!(count(&ours(&["repo", "snapshots", repo, "--json"])), 8);
    ours(&["repo", "prune", repo, "--keep-last", "1"]);
    assert_eq!(count(&ours(&["repo", "snapshots", repo, "--json"])), 4);
    let gc = ours(&["repo", "gc", repo]);
    assert!(gc.starts_with("garbage collection: "), "{gc}");
    snapshots.retain(|(id, _)| stillpoint(&["repo", "verify", repo, id]).status.success());
    assert_eq!(
        snapshots.len(),
        4,
        "the newest of each disk stays, verified"
    );

    // Flip one byte in the middle of one pack: verify names the snapshots that use it
    // and exits 1; restore of such a snapshot fails rather than writing wrong data.
    let packs = dir.path().join("repo/packs");
    let sub = std::fs::read_dir(&packs)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let pack = std::fs::read_dir(&sub)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let mut bytes = std::fs::read(&pack).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x40;
    std::fs::write(&pack, &bytes).unwrap();
    let verify = stillpoint(&["repo", "verify", repo, "--json"]);
    assert!(!verify.status.success());
    assert!(
        stderr(&verify).contains("damaged snapshots"),
        "{}",
        stderr(&verify)
    );
    let report: serde_json::Value = serde_json::from_str(&stdout(&verify)).unwrap();
    let bad: Vec<&str> = report
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["ok"] == false)
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert!(!bad.is_empty());
    let target = dir.path().join("from-damaged.raw");
    let restore = stillpoint(&["restore", "--repo", repo, bad[0], s(&target)]);
    assert!(!restore.status.success());
    assert!(stderr(&restore).contains("damaged"), "{}", stderr(&restore));
    assert!(!target.exists(), "a failed restore leaves no half image");
}

/// A backup killed (SIGKILL) at seeded points leaves every earlier snapshot sound and
/// no half snapshot; the rerun succeeds and restores identical.
#[test]
fn a_backup_killed_at_any_point_leaves_the_repository_consistent() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    let repo = s(&repo);
    ours(&["repo", "init", repo, "--chunk-size", "64K"]);
    let disk = dir.path().join("disk.raw");
    let mut rng = Rng(11);
    std::fs::write(&disk, rng.bytes(24 << 20)).unwrap();
    backup_into(repo, &disk, "vm");
    let mut expected = 1;
    for round in 0..6 {
        // New data each round, so the killed backup has packs to write.
        write_at(&disk, &rng.bytes(8 << 20), rng.below(16 << 20));
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_stillpoint"))
            .args(["backup", s(&disk), "--repo", repo, "--disk", "vm"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(rng.below(400)));
        let _ = child.kill();
        let finished = child.wait().unwrap().success();
        // The kill may land after the manifest was written (then the snapshot is
        // complete, and verify below proves it) or before (then there is none).
        let listed: serde_json::Value =
            serde_json::from_str(&ours(&["repo", "snapshots", repo, "--json"])).unwrap();
        let now = listed.as_array().unwrap().len();
        assert!(
            now == expected + 1 || (now == expected && !finished),
            "round {round}: {now} snapshots"
        );
        expected = now;
        ours(&["repo", "verify", repo]);
        let id = backup_into(repo, &disk, "vm")["snapshot"]
            .as_str()
            .unwrap()
            .to_string();
        expected += 1;
        let restored = dir.path().join(format!("r{round}.raw"));
        ours(&["restore", "--repo", repo, &id, s(&restored)]);
        let same = raw_compare(s(&disk), s(&restored));
        assert!(same.status.success(), "round {round}");
        std::fs::remove_file(&restored).unwrap();
    }
}

#[test]
fn an_encrypted_repository_takes_its_passphrase_from_a_file_or_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    let repo = s(&repo);
    let pass = dir.path().join("pass");
    std::fs::write(&pass, "correct horse battery\n").unwrap();
    let pass = s(&pass);
    let refused = stillpoint(&["repo", "init", repo, "--encrypt"]);
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("--passphrase-file"),
        "{}",
        stderr(&refused)
    );
    ours(&["repo", "init", repo, "--encrypt", "--passphrase-file", pass]);
    let disk = dir.path().join("disk.raw");
    let size = seeded_image(&disk, 5);
    // The environment variable works as the file does (the newline is not part of it).
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_stillpoint"))
        .args(["backup", s(&disk), "--repo", repo, "--disk", "vm", "--json"])
        .env("STILLPOINT_PASSPHRASE", "correct horse battery")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let no = stillpoint(&["repo", "snapshots", repo]);
    assert!(!no.status.success());
    assert!(stderr(&no).contains("encrypted"), "{}", stderr(&no));
    let wrong = dir.path().join("wrong");
    std::fs::write(&wrong, "battery staple").unwrap();
    let bad = stillpoint(&["repo", "verify", repo, "--passphrase-file", s(&wrong)]);
    assert!(!bad.status.success());
    assert!(
        stderr(&bad).contains("wrong passphrase"),
        "{}",
        stderr(&bad)
    );
    ours(&["repo", "verify", repo, "--passphrase-file", pass]);
    let restored = dir.path().join("restored.raw");
    ours(&[
        "restore",
        "--repo",
        repo,
        "--passphrase-file",
        pass,
        "vm",
        s(&restored),
    ]);
    let same = raw_compare(s(&disk), s(&restored));
    assert!(same.status.success());
    assert_eq!(std::fs::metadata(&restored).unwrap().len(), sectors(size));
}

/// A snapshot served read-only over NBD reads as the image did, zero chunks show as
/// holes, and writes are refused.
#[test]
fn a_snapshot_is_served_over_nbd_as_the_image_was() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    let repo = s(&repo);
    ours(&["repo", "init", repo, "--chunk-size", "64K"]);
    let disk = dir.path().join("disk.raw");
    let mut data = Rng(9).bytes(1 << 20);
    data.extend(vec![0u8; 1 << 20]);
    data.extend(Rng(10).bytes(65536 + 4096));
    std::fs::write(&disk, &data).unwrap();
    backup_into(repo, &disk, "vm");
    let socket = dir.path().join("nbd.sock");
    struct Child(std::process::Child);
    impl Drop for Child {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _server = Child(
        std::process::Command::new(env!("CARGO_BIN_EXE_stillpoint"))
            .args([
                "nbd",
                "--repo",
                repo,
                "--snapshot",
                "vm",
                "--socket",
                s(&socket),
            ])
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    for _ in 0..500 {
        if socket.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let uri = format!("nbd+unix:///?socket={}", socket.display());
    let same = run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", s(&disk), &uri],
    );
    assert!(same.status.success(), "{}", stdout(&same));
    let map: serde_json::Value = serde_json::from_str(&ok(
        "qemu-img",
        &["map", "--output=json", "-f", "raw", &uri],
    ))
    .unwrap();
    let holes: Vec<_> = map
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == false)
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect();
    assert_eq!(holes, vec![(1 << 20, 1 << 20)], "{map}");
    // libnbd's view: nbdinfo's map of base:allocation shows the same hole, and nbdcopy
    // pulls the same bytes.
    let nbd_map = ok("nbdinfo", &["--map", &uri]);
    let holes: Vec<(u64, u64)> = nbd_map
        .lines()
        .filter(|l| l.contains("hole"))
        .map(|l| {
            let mut f = l.split_whitespace();
            let start = f.next().unwrap().parse().unwrap();
            (start, f.next().unwrap().parse().unwrap())
        })
        .collect();
    assert_eq!(holes, vec![(1 << 20, 1 << 20)], "{nbd_map}");
    let copied = dir.path().join("nbdcopy.raw");
    ok("nbdcopy", &[&uri, s(&copied)]);
    assert_eq!(
        std::fs::read(&copied).unwrap(),
        std::fs::read(&disk).unwrap()
    );
    let write = run("qemu-io", &["-f", "raw", "-c", "write 0 4k", &uri]);
    assert!(
        !write.status.success()
            || stderr(&write).contains("failed")
            || stdout(&write).contains("failed")
    );
}

/// A repository on a full filesystem: the backup fails with the OS's words, and the
/// snapshot taken before still lists, verifies and restores. Needs root for the tmpfs;
/// without it the test says so and checks nothing.
#[test]
fn a_backup_into_a_full_filesystem_fails_clearly_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let fs = dir.path().join("fs");
    let Some(_tmpfs) = small_tmpfs(&fs, "6m") else {
        return;
    };
    let repo = fs.join("repo");
    let repo = s(&repo);
    ours(&[
        "repo",
        "init",
        repo,
        "--chunk-size",
        "64K",
        "--compression",
        "none",
    ]);
    let small = dir.path().join("small.raw");
    let mut rng = Rng(31);
    std::fs::write(&small, rng.bytes(1 << 20)).unwrap();
    let first = backup_into(repo, &small, "small");
    let big = dir.path().join("big.raw");
    std::fs::write(&big, rng.bytes(16 << 20)).unwrap();
    let failed = stillpoint(&["backup", s(&big), "--repo", repo, "--disk", "big"]);
    assert!(!failed.status.success());
    assert!(
        stderr(&failed).contains("No space left on device"),
        "{}",
        stderr(&failed)
    );
    assert_eq!(stderr(&failed).lines().count(), 1, "{}", stderr(&failed));
    assert_eq!(
        stderr(&failed).matches("No space left").count(),
        1,
        "{}",
        stderr(&failed)
    );
    let listed: serde_json::Value =
        serde_json::from_str(&ours(&["repo", "snapshots", repo, "--json"])).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1);
    ours(&["repo", "verify", repo]);
    let restored = dir.path().join("restored.raw");
    ours(&[
        "restore",
        "--repo",
        repo,
        first["snapshot"].as_str().unwrap(),
        s(&restored),
    ]);
    assert!(raw_compare(s(&small), s(&restored)).status.success());
}

/// `repo gc` killed (SIGKILL) at seeded points while it deletes and repacks: the next
/// collection replaces the marker the dead one left, says so, and finishes; every
/// snapshot still listed verifies and restores identical.
#[test]
fn a_garbage_collection_killed_mid_run_leaves_a_repository_the_next_one_finishes() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    let repo = s(&repo);
    ours(&["repo", "init", repo, "--chunk-size", "64K"]);
    let disk = dir.path().join("disk.raw");
    let mut rng = Rng(61);
    std::fs::write(&disk, rng.bytes(16 << 20)).unwrap();
    let mut kept = Vec::new();
    let mut took_over = 0;
    for round in 0..6 {
        // Most of the disk rewritten, and the older snapshot pruned: its packs become
        // mostly dead, so the collection condemns, deletes and repacks.
        write_at(&disk, &rng.bytes(12 << 20), rng.below(4 << 20));
        let id = backup_into(repo, &disk, "vm")["snapshot"]
            .as_str()
            .unwrap()
            .to_string();
        let copy = dir.path().join(format!("disk{round}.raw"));
        std::fs::copy(&disk, &copy).unwrap();
        kept.push((id, copy));
        ours(&["repo", "prune", repo, "--keep-last", "1"]);
        kept.drain(..kept.len() - 1);

        let marker = dir.path().join("repo/gc");
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_stillpoint"))
            .args(["repo", "gc", repo])
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Killed once it has started, at a seeded point after: at once in the first
        // round, later up to 40 ms in (a debug build's collection here takes 10-40 ms,
        // so some kills land while it deletes or repacks, and some after it ended).
        let started = std::time::Instant::now();
        while !marker.exists() && started.elapsed() < std::time::Duration::from_secs(10) {
            std::hint::spin_loop();
        }
        let wait = if round == 0 { 0 } else { rng.below(40_000) };
        std::thread::sleep(std::time::Duration::from_micros(wait));
        let _ = child.kill();
        child.wait().unwrap();
        let left = marker.exists();

        let next = ours(&["repo", "gc", repo]);
        if left {
            took_over += 1;
            assert!(
                next.contains("died and left its gc marker; replaced it"),
                "round {round}: {next}"
            );
        }
        assert!(!marker.exists(), "round {round}: the marker outlived gc");
        ours(&["repo", "gc", repo]);
        ours(&["repo", "verify", repo]);
        for (id, image) in &kept {
            let restored = dir.path().join("restored.raw");
            ours(&["restore", "--repo", repo, id, s(&restored)]);
            assert!(
                raw_compare(s(image), s(&restored)).status.success(),
                "round {round}: snapshot {id}"
            );
            std::fs::remove_file(&restored).unwrap();
        }
    }
    assert!(took_over > 0, "no kill landed while a collection ran");
}

/// A restore stopped by Ctrl-C or SIGTERM says so, exits 1 and removes its image: a
/// half-written raw image would look like a whole one.
#[test]
fn an_interrupted_restore_removes_its_half_written_image() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    let repo = s(&repo);
    ours(&["repo", "init", repo]);
    let disk = dir.path().join("disk.raw");
    std::fs::write(&disk, Rng(23).bytes(64 << 20)).unwrap();
    backup_into(repo, &disk, "vm");
    for (signal, words) in [(libc::SIGINT, "interrupted"), (libc::SIGTERM, "terminated")] {
        let target = dir.path().join(format!("restored-{words}.raw"));
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_stillpoint"))
            .args(["restore", "--repo", repo, "vm", s(&target)])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        for _ in 0..5000 {
            if target.exists() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert!(target.exists(), "the restore never created its image");
        // SAFETY: kill(2) on the child's pid with an integer signal number.
        assert_eq!(unsafe { libc::kill(child.id() as i32, signal) }, 0);
        let out = child.wait_with_output().unwrap();
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{words}: {err}");
        assert!(
            err.contains(&format!("restore {words}")) && err.contains("was removed"),
            "{err}"
        );
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            !target.exists(),
            "{words}: the half-written image is still there"
        );
    }
}

/// `qemu-io` on a qcow2 image (offline, between backups).
fn qemu_io(image: &std::path::Path, commands: &[&str]) {
    let mut args = vec!["-f", "qcow2", s(image)];
    for c in commands {
        args.extend(["-c", c]);
    }
    let out = run("qemu-io", &args);
    assert!(out.status.success(), "qemu-io: {}", stderr(&out));
}

fn backup_by_bitmap(repo: &str, disk: &std::path::Path) -> serde_json::Value {
    let out = ours(&[
        "backup",
        s(disk),
        "--repo",
        repo,
        "--disk",
        "vm",
        "--bitmap",
        "daily",
        "--json",
    ]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

#[test]
fn backups_by_bitmap_read_only_what_changed_and_every_snapshot_restores_whole() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    let repo = s(&repo);
    ours(&["repo", "init", repo, "--chunk-size", "64K"]);
    let disk = dir.path().join("disk.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", s(&disk), "8M"]);
    qemu_io(&disk, &["write -P 0x11 0 3M", "write -P 0x22 5M 1M"]);

    // A chain: the first reads the whole disk and creates the bitmap; each later one
    // reads the chunks written since, and is still a whole snapshot.
    let mut taken = Vec::new();
    let first = backup_by_bitmap(repo, &disk);
    assert_eq!(first["incremental"], false, "{first}");
    assert!(
        first["whole_read_because"]
            .as_str()
            .unwrap()
            .contains("created"),
        "{first}"
    );
    let copy = |n: usize| {
        let c = dir.path().join(format!("at{n}.qcow2"));
        std::fs::copy(&disk, &c).unwrap();
        c
    };
    taken.push((first["snapshot"].as_str().unwrap().to_string(), copy(0)));
    let writes = [
        &["write -P 0x33 64k 64k", "write -P 0x44 7M 4k"][..],
        &["write -z 0 64k", "write -P 0x55 2M 200k"][..],
        &["discard 5M 512k"][..],
    ];
    // Chunks read: the two written; the four the 200k write touched (the zeroed one
    // is marked but reads as zeros, so it is not read); none for a discard.
    let expected_reads = [2 * 65536, 4 * 65536, 0];
    for (n, (commands, reads)) in writes.iter().zip(expected_reads).enumerate() {
        qemu_io(&disk, commands);
        let next = backup_by_bitmap(repo, &disk);
        assert_eq!(next["incremental"], true, "{next}");
        assert_eq!(next["parent"], taken.last().unwrap().0.as_str(), "{next}");
        assert_eq!(next["read"].as_u64(), Some(reads), "{n}: {next}");
        taken.push((next["snapshot"].as_str().unwrap().to_string(), copy(n + 1)));
    }
    // Nothing changed: nothing read.
    let idle = backup_by_bitmap(repo, &disk);
    assert_eq!(
        (idle["incremental"].as_bool(), idle["read"].as_u64()),
        (Some(true), Some(0))
    );

    // A snapshot taken without the bitmap in between: the next one by bitmap cannot
    // rely on it, and says so.
    ours(&["backup", s(&disk), "--repo", repo, "--disk", "vm"]);
    let after = backup_by_bitmap(repo, &disk);
    assert_eq!(after["incremental"], false, "{after}");
    let why = after["whole_read_because"].as_str().unwrap();
    assert!(why.contains("not taken with bitmap daily"), "{why}");

    for (i, (id, image)) in taken.iter().enumerate() {
        let restored = dir.path().join(format!("restored{i}.raw"));
        assert!(
            restores_as_qcow2(repo, id, image, &restored),
            "snapshot {i} ({id}) differs"
        );
    }
    let listed: serde_json::Value =
        serde_json::from_str(&ours(&["repo", "snapshots", repo, "--json"])).unwrap();
    assert_eq!(listed[0]["bitmap"], "daily", "{listed}");
    let verify = stillpoint(&["repo", "verify", repo]);
    assert!(verify.status.success(), "{}", stderr(&verify));
}

#[test]
fn a_bitmap_left_inconsistent_by_a_crash_means_a_whole_read_not_a_wrong_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    let repo = s(&repo);
    ours(&["repo", "init", repo, "--chunk-size", "64K"]);
    let disk = dir.path().join("disk.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", s(&disk), "4M"]);
    qemu_io(&disk, &["write -P 0x11 0 1M"]);
    backup_by_bitmap(repo, &disk);
    // A daemon writes the disk and is killed: the bitmap is marked in use on disk,
    // and what the daemon wrote is not recorded in it.
    {
        let (_daemon, qmp) = common::daemon::start(dir.path(), &[]);
        let (mut q, _) = common::daemon::Qmp::connect(&qmp);
        q.cmd("qmp_capabilities", serde_json::json!({}));
        let r = q.cmd(
            "blockdev-add",
            serde_json::json!({"driver":"qcow2","node-name":"d",
                "file":{"driver":"file","filename":disk}}),
        );
        assert!(r.get("return").is_some(), "{r}");
        let nbd = dir.path().join("nbd.sock");
        q.cmd(
            "nbd-server-start",
            serde_json::json!({"addr":{"type":"unix","data":{"path":nbd}}}),
        );
        q.cmd(
            "block-export-add",
            serde_json::json!({"type":"nbd","id":"e","node-name":"d","name":"d",
                               "writable":true}),
        );
        let uri = format!("nbd+unix:///d?socket={}", nbd.display());
        let out = run(
            "qemu-io",
            &["-f", "raw", &uri, "-c", "write -P 0x66 2M 64k"],
        );
        assert!(out.status.success(), "{}", stderr(&out));
    } // SIGKILL
    let after = backup_by_bitmap(repo, &disk);
    assert_eq!(after["incremental"], false, "{after}");
    let why = after["whole_read_because"].as_str().unwrap();
    assert!(why.contains("inconsistent"), "{why}");
    let restored = dir.path().join("restored.raw");
    let id = after["snapshot"].as_str().unwrap();
    assert!(
        restores_as_qcow2(repo, id, &disk, &restored),
        "the write the crash hid is in the snapshot"
    );
    // The bitmap was made anew: the next backup is incremental again.
    qemu_io(&disk, &["write -P 0x77 3M 4k"]);
    let next = backup_by_bitmap(repo, &disk);
    assert_eq!(
        (next["incremental"].as_bool(), next["read"].as_u64()),
        (Some(true), Some(65536)),
        "{next}"
    );
}

#[test]
fn a_raw_source_keeps_its_bitmap_beside_it_and_backs_up_by_it() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    let repo = s(&repo);
    ours(&["repo", "init", repo, "--chunk-size", "64K"]);
    let disk = dir.path().join("disk.raw");
    seeded_image(&disk, 77);
    write_at(&disk, &vec![1u8; 3 << 20], 0);
    let first = backup_by_bitmap(repo, &disk);
    assert_eq!(first["incremental"], false, "{first}");
    assert!(dir.path().join("disk.raw.stillpoint-bitmaps").exists());
    // A write the bitmap cannot see (nothing had the image open): the bitmap is only
    // as good as the writers that go through stillpoint, as with qcow2 and qemu-img.
    // Writes through the daemon are covered by repo_daemon_cli; here, that an unchanged
    // disk reads nothing and the snapshot is still whole.
    let second = backup_by_bitmap(repo, &disk);
    assert_eq!(
        (second["incremental"].as_bool(), second["read"].as_u64()),
        (Some(true), Some(0)),
        "{second}"
    );
    let restored = dir.path().join("restored.raw");
    ours(&[
        "restore",
        "--repo",
        repo,
        second["snapshot"].as_str().unwrap(),
        s(&restored),
    ]);
    assert!(raw_compare(s(&disk), s(&restored)).status.success());
}

/// With 256 KiB chunks and a 64 KiB bitmap, a write makes its chunk a delta of the
/// parent's: the backup stores the write's granule, not the chunk, says so, and every
/// snapshot of the chain restores whole, also once the first is forgotten.
#[test]
fn a_chunk_changed_in_part_is_stored_as_a_delta_of_its_parents() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    let repo = s(&repo);
    ours(&["repo", "init", repo, "--chunk-size", "256K"]);
    let disk = dir.path().join("disk.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", s(&disk), "4M"]);
    // Data that does not compress, so what is stored shows what was taken.
    let noise = dir.path().join("noise");
    std::fs::write(&noise, testkit::Rng(5).bytes(4 << 20)).unwrap();
    ok(
        "qemu-img",
        &[
            "dd",
            "-f",
            "raw",
            "-O",
            "qcow2",
            &format!("if={}", s(&noise)),
            &format!("of={}", s(&disk)),
            "bs=1M",
            "count=4",
        ],
    );
    let mut taken = vec![backup_by_bitmap(repo, &disk)];
    for commands in [
        &["write -P 0x33 512k 64k"][..],
        &["write -P 0x44 704k 4k"][..],
    ] {
        qemu_io(&disk, commands);
        let next = backup_by_bitmap(repo, &disk);
        assert_eq!(next["incremental"], true, "{next}");
        assert_eq!(next["read"].as_u64(), Some(256 << 10), "{next}");
        assert_eq!(next["delta_chunks"].as_u64(), Some(1), "{next}");
        // At most its 64 KiB granule of noise; the chunk whole would be 192 KiB.
        assert!(next["stored"].as_u64().unwrap() < 70 << 10, "{next}");
        let copy = dir.path().join(format!("at{}.qcow2", taken.len()));
        std::fs::copy(&disk, &copy).unwrap();
        taken.push(next);
        let id = taken.last().unwrap()["snapshot"]
            .as_str()
            .unwrap()
            .to_string();
        let restored = dir.path().join(format!("restored{}.raw", taken.len()));
        assert!(
            restores_as_qcow2(repo, &id, &copy, &restored),
            "snapshot {id} differs"
        );
    }
    let text = ours(&["repo", "stats", repo]);
    assert!(text.contains("2 of them deltas"), "{text}");
    let first = taken[0]["snapshot"].as_str().unwrap();
    ours(&["repo", "forget", repo, first]);
    ours(&["repo", "gc", repo]);
    ours(&["repo", "gc", repo]);
    let last = taken.last().unwrap()["snapshot"].as_str().unwrap();
    let restored = dir.path().join("last.raw");
    let copy = dir.path().join("at2.qcow2");
    assert!(
        restores_as_qcow2(repo, last, &copy, &restored),
        "the last snapshot differs after the collection"
    );
    let verify = stillpoint(&["repo", "verify", repo]);
    assert!(verify.status.success(), "{}", stderr(&verify));
}
