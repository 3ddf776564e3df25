//! The repository on a real S3 server (SeaweedFS, started by each test on 127.0.0.1)
//! from the command line: every repository command on an `s3://` URL, a server that
//! stops in the middle of a backup, a server that answers 500 or is slow for a while
//! (through a fault-injecting proxy), backups killed mid-upload, and several writer
//! processes with collections beside them. qemu-img is the judge of restored images.

mod common;

use std::path::Path;
use std::process::Command;
use std::process::Output;
use std::time::Duration;
use std::time::Instant;

use common::*;
use testkit::s3::Fault;
use testkit::s3::FaultProxy;
use testkit::s3::SeaweedFs;

/// A SeaweedFS with a bucket, and how the tests' `stillpoint` reaches it.
struct S3 {
    server: SeaweedFs,
    dir: tempfile::TempDir,
    /// The endpoint the commands use (the server's, or a proxy's in front of it).
    endpoint: String,
}

impl S3 {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let server = SeaweedFs::start(&dir.path().join("seaweedfs"));
        server.create_bucket("backups");
        let endpoint = server.endpoint.clone();
        Self {
            server,
            dir,
            endpoint,
        }
    }

    /// The environment of the tests' `stillpoint`: the server's credentials, a cache
    /// in the test's directory and a short retry budget (3 s).
    fn env(&self) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = self
            .server
            .env()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        env.push(("AWS_ENDPOINT_URL".into(), self.endpoint.clone()));
        let cache = self.dir.path().join("cache");
        env.push(("STILLPOINT_CACHE_DIR".into(), s(&cache).to_string()));
        env.push(("STILLPOINT_S3_RETRY_TIMEOUT".into(), "3".into()));
        env
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_stillpoint"));
        command.args(args).envs(self.env());
        command
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    /// Runs a command that must succeed; its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "stillpoint {args:?}: {}",
            stderr(&out)
        );
        stdout(&out)
    }

    fn backup(&self, repo: &str, disk: &Path, name: &str) -> serde_json::Value {
        let out = self.ok(&["backup", s(disk), "--repo", repo, "--disk", name, "--json"]);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
    }

    /// Restores `snapshot` and asks qemu-img whether it equals the raw image `disk`.
    fn restores_as(&self, repo: &str, snapshot: &str, disk: &Path) -> bool {
        let restored = self.dir.path().join("restored.raw");
        let _ = std::fs::remove_file(&restored);
        self.ok(&["restore", "--repo", repo, snapshot, s(&restored)]);
        let same = qemu_img(&[
            "compare",
            "-q",
            "-f",
            "raw",
            "-F",
            "raw",
            s(disk),
            s(&restored),
        ]);
        std::fs::remove_file(&restored).unwrap();
        same.status.success()
    }

    fn snapshots(&self, repo: &str) -> Vec<serde_json::Value> {
        let out = self.ok(&["repo", "snapshots", repo, "--json"]);
        serde_json::from_str::<serde_json::Value>(&out)
            .unwrap()
            .as_array()
            .unwrap()
            .clone()
    }
}

/// A raw image of `mib` MiB of seeded random data (incompressible: every chunk is a
/// real upload).
fn random_disk(path: &Path, mib: usize, seed: u64) {
    std::fs::write(path, Rng(seed).bytes(mib << 20)).unwrap();
}

#[test]
fn every_repository_command_takes_an_s3_url() {
    let s3 = S3::start();
    let repo = "s3://backups/site-a/vms";
    let created = s3.ok(&["repo", "init", repo, "--chunk-size", "64K"]);
    assert!(created.contains(repo), "{created}");
    let again = s3.run(&["repo", "init", repo]);
    assert!(!again.status.success());
    assert!(
        stderr(&again).contains("a repository exists there already"),
        "{}",
        stderr(&again)
    );

    // A qcow2 disk with data, zeros and holes; a full backup, then an incremental by
    // its persistent bitmap.
    let raw = s3.dir.path().join("disk.raw");
    seeded_image(&raw, 5);
    let disk = s3.dir.path().join("disk.qcow2");
    ok(
        "qemu-img",
        &["convert", "-f", "raw", "-O", "qcow2", s(&raw), s(&disk)],
    );
    let backup_by_bitmap = || -> serde_json::Value {
        let args = ["backup", s(&disk), "--repo", repo, "--disk", "vm1"];
        let out = s3.ok(&[&args[..], &["--bitmap", "b0", "--json"]].concat());
        serde_json::from_str(&out).unwrap()
    };
    let full = backup_by_bitmap();
    ok(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x5a 1M 100k", s(&disk)],
    );
    let incremental = backup_by_bitmap();
    assert_eq!(incremental["incremental"], true, "{incremental}");
    assert!(
        incremental["read"].as_u64().unwrap() < 1 << 20,
        "{incremental}"
    );
    let list = s3.snapshots(repo);
    assert_eq!(list.len(), 2);
    assert_eq!(list[1]["parent"], full["snapshot"]);

    // Restore: as qcow2, compared with the disk by qemu-img.
    let restores_as_qcow2 = || {
        let restored = s3.dir.path().join("restored.qcow2");
        let _ = std::fs::remove_file(&restored);
        let args = ["restore", "--repo", repo, "vm1", s(&restored)];
        s3.ok(&[&args[..], &["--target-format", "qcow2"]].concat());
        ok("qemu-img", &["compare", "-q", s(&disk), s(&restored)]);
    };
    restores_as_qcow2();

    // The snapshot served over NBD, read by qemu-img.
    let socket = s3.dir.path().join("nbd.sock");
    let args = [
        "nbd",
        "--repo",
        repo,
        "--snapshot",
        "vm1",
        "--socket",
        s(&socket),
    ];
    let server = Running::start(&args, &socket, |c| {
        c.envs(s3.env());
    });
    let uri = format!("nbd+unix:///?socket={}", s(&socket));
    ok("qemu-img", &["compare", "-q", "-F", "raw", s(&disk), &uri]);
    drop(server);

    // Another disk shares the data: nothing new is stored.
    let second = s3.ok(&[
        "backup",
        s(&disk),
        "--repo",
        repo,
        "--disk",
        "vm2",
        "--json",
    ]);
    let second: serde_json::Value = serde_json::from_str(&second).unwrap();
    assert_eq!(second["new_chunks"], 0, "{second}");

    // With a warm cache, opening the repository fetches no index object or manifest:
    // the listing vouches for the cached copies (config and the capability record are
    // the two GETs).
    let counted = s3
        .command(&["repo", "stats", repo])
        .env("STILLPOINT_S3_STATS", "1")
        .output()
        .unwrap();
    let line = stderr(&counted);
    let counts: serde_json::Value =
        serde_json::from_str(line.trim().trim_start_matches("s3 requests: ")).unwrap();
    assert_eq!(counts["gets"], 2, "{counts}");
    assert!(counts["cache_hits"].as_u64().unwrap() >= 4, "{counts}");

    // Verify, stats, prune, gc, with the cache deleted in between: it is only a cache.
    let verified = s3.ok(&["repo", "verify", repo, "--json"]);
    assert!(
        verified.contains("\"ok\":true") && !verified.contains("\"ok\":false"),
        "{verified}"
    );
    std::fs::remove_dir_all(s3.dir.path().join("cache")).unwrap();
    let stats: serde_json::Value =
        serde_json::from_str(&s3.ok(&["repo", "stats", repo, "--json"])).unwrap();
    assert_eq!(stats["snapshots"], 3, "{stats}");
    s3.ok(&["repo", "prune", repo, "--disk", "vm1", "--keep-last", "1"]);
    let left: Vec<_> = s3.snapshots(repo).iter().map(|s| s["id"].clone()).collect();
    assert_eq!(
        left,
        vec![incremental["snapshot"].clone(), second["snapshot"].clone()]
    );
    let gc = s3.ok(&["repo", "gc", repo]);
    assert!(gc.contains("garbage collection"), "{gc}");
    restores_as_qcow2();
    s3.ok(&["repo", "verify", repo]);

    // A bad URL and a missing repository: one clear line each.
    let bad = s3.run(&["repo", "snapshots", "s3://NO_SUCH"]);
    assert!(!bad.status.success());
    assert!(stderr(&bad).contains("bucket name"), "{}", stderr(&bad));
    let missing = s3.run(&["repo", "snapshots", "s3://backups/nothing-here"]);
    assert!(!missing.status.success());
    assert_eq!(stderr(&missing).lines().count(), 1, "{}", stderr(&missing));
    assert!(
        stderr(&missing).contains("no repository there"),
        "{}",
        stderr(&missing)
    );
    // No credentials: said at once, not after a minute of asking EC2's metadata service.
    let started = Instant::now();
    let anonymous = s3
        .command(&["repo", "snapshots", repo])
        .env_remove("AWS_ACCESS_KEY_ID")
        .output()
        .unwrap();
    assert!(!anonymous.status.success());
    assert!(
        stderr(&anonymous).contains("no S3 credentials"),
        "{}",
        stderr(&anonymous)
    );
    assert!(started.elapsed() < Duration::from_secs(30));
    // Reading a place with no repository wrote nothing there (no capability record).
    assert!(objects_in(&s3, "nothing-here", "").is_empty());
}

/// How many packs the bucket's repository `prefix` holds with their index objects (a
/// pack is known to later writers once its index is up), listed directly.
fn packs_in(s3: &S3, prefix: &str) -> usize {
    objects_in(s3, prefix, "index/").len()
}

/// The keys under `under` of the bucket's repository `prefix`, listed directly.
fn objects_in(s3: &S3, prefix: &str, under: &str) -> Vec<String> {
    use repo::Backend;
    let options = repo::S3Options {
        endpoint: Some(s3.server.endpoint.clone()),
        allow_http: true,
        retry_timeout: Some(Duration::from_secs(2)),
        credentials: Some((
            testkit::s3::ACCESS_KEY.into(),
            testkit::s3::SECRET_KEY.into(),
        )),
        ..repo::S3Options::default()
    };
    let url = repo::S3Url::parse(&format!("s3://backups/{prefix}"))
        .unwrap()
        .unwrap();
    repo::S3::connect(url, &options)
        .and_then(|b| b.list(under))
        .unwrap_or_default()
}

#[test]
fn a_server_stopped_mid_backup_fails_it_with_one_line_and_the_rerun_reuses_what_uploaded() {
    let mut s3 = S3::start();
    let repo = "s3://backups/r";
    s3.ok(&["repo", "init", repo]);
    let small = s3.dir.path().join("small.raw");
    random_disk(&small, 4, 1);
    let earlier = s3.backup(repo, &small, "small");
    let before = packs_in(&s3, "r");

    // 160 MiB of random data: five packs. Stop the server once two are up.
    let disk = s3.dir.path().join("disk.raw");
    random_disk(&disk, 160, 2);
    let child = s3
        .command(&["backup", s(&disk), "--repo", repo, "--disk", "big"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while packs_in(&s3, "r") < before + 2 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no packs uploaded"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    s3.server.stop();
    let out = child.wait_with_output().unwrap();
    let err = stderr(&out);
    assert!(
        !out.status.success(),
        "the backup succeeded without its server"
    );
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(
        err.starts_with("stillpoint: ") && err.contains(repo),
        "{err}"
    );
    eprintln!("the backup whose server stopped said: {err}");

    // Back up: the earlier snapshot is whole, no new one appeared, and the rerun
    // stores only what did not upload.
    s3.server.restart();
    let list = s3.snapshots(repo);
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["id"], earlier["snapshot"]);
    s3.ok(&["repo", "verify", repo]);
    let rerun = s3.backup(repo, &disk, "big");
    let reused = rerun["deduplicated_chunks"].as_u64().unwrap();
    assert!(
        reused >= 2 * 128,
        "the uploaded packs' chunks are reused: {rerun}"
    );
    assert!(s3.restores_as(repo, "big", &disk));
    assert!(s3.restores_as(repo, "small", &small));
    s3.ok(&["repo", "verify", repo]);
}

#[test]
fn answers_of_500_and_a_slow_server_for_a_while_are_ridden_out() {
    let mut s3 = S3::start();
    let proxy = FaultProxy::start(s3.server.port());
    s3.endpoint = proxy.endpoint();
    let repo = "s3://backups/flaky";
    s3.ok(&["repo", "init", repo]);
    let disk = s3.dir.path().join("disk.raw");
    random_disk(&disk, 48, 3);

    // Every request fails for 1.5 s, then every answer is slow for 1.5 s.
    proxy.set(Fault::Error500);
    let faults = std::thread::scope(|scope| {
        scope.spawn(|| {
            std::thread::sleep(Duration::from_millis(1500));
            proxy.set(Fault::Slow(30));
            std::thread::sleep(Duration::from_millis(1500));
            proxy.set(Fault::None);
        });
        let out = s3
            .command(&["backup", s(&disk), "--repo", repo, "--disk", "vm", "--json"])
            .env("STILLPOINT_S3_RETRY_TIMEOUT", "30")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        proxy.errors.load(std::sync::atomic::Ordering::Relaxed)
    });
    assert!(faults > 0, "the proxy answered 500 to some requests");
    assert!(s3.restores_as(repo, "vm", &disk));
    s3.ok(&["repo", "verify", repo]);
}

#[test]
fn a_backup_killed_mid_upload_leaves_the_bucket_consistent_and_the_rerun_succeeds() {
    let s3 = S3::start();
    let repo = "s3://backups/killed";
    s3.ok(&["repo", "init", repo, "--chunk-size", "64K"]);
    let disk = s3.dir.path().join("disk.raw");
    random_disk(&disk, 48, 4);
    let mut rng = Rng(4);
    let mut expected = 0;
    for round in 0..3 {
        let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &rng.bytes(8 << 20), rng.below(40 << 20))
            .unwrap();
        let mut child = s3
            .command(&["backup", s(&disk), "--repo", repo, "--disk", "vm"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(100 + rng.below(700)));
        let _ = child.kill();
        let finished = child.wait().unwrap().success();
        let now = s3.snapshots(repo).len();
        assert!(
            now == expected + 1 || (now == expected && !finished),
            "round {round}: {now} snapshots"
        );
        s3.ok(&["repo", "verify", repo]);
        let id = s3.backup(repo, &disk, "vm")["snapshot"]
            .as_str()
            .unwrap()
            .to_string();
        expected = now + 1;
        assert!(s3.restores_as(repo, &id, &disk), "round {round}");
    }
}

#[test]
fn several_writer_processes_and_collections_share_one_bucket() {
    let s3 = S3::start();
    let repo = "s3://backups/shared";
    s3.ok(&["repo", "init", repo, "--chunk-size", "64K"]);
    let disks: Vec<_> = (0..3)
        .map(|i| {
            let disk = s3.dir.path().join(format!("disk{i}.raw"));
            random_disk(&disk, 24, 10 + i);
            disk
        })
        .collect();
    // A first round, pruned away while the second round runs beside collections.
    for (i, disk) in disks.iter().enumerate() {
        s3.backup(repo, disk, &format!("vm{i}"));
    }
    for (i, disk) in disks.iter().enumerate() {
        let f = std::fs::OpenOptions::new().write(true).open(disk).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &Rng(20 + i as u64).bytes(4 << 20), 0)
            .unwrap();
    }
    let writers: Vec<_> = disks
        .iter()
        .enumerate()
        .map(|(i, disk)| {
            s3.command(&[
                "backup",
                s(disk),
                "--repo",
                repo,
                "--disk",
                &format!("vm{i}"),
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
        })
        .collect();
    let mut collections = 0;
    while collections < 3 {
        for i in 0..3 {
            s3.ok(&[
                "repo",
                "prune",
                repo,
                "--disk",
                &format!("vm{i}"),
                "--keep-last",
                "1",
            ]);
        }
        // A collection may find another one running (the marker): that is its answer.
        let gc = s3.run(&["repo", "gc", repo]);
        assert!(
            gc.status.success() || stderr(&gc).contains("another garbage collection"),
            "{}",
            stderr(&gc)
        );
        collections += 1;
    }
    for writer in writers {
        let out = writer.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
    }
    for (i, disk) in disks.iter().enumerate() {
        assert!(s3.restores_as(repo, &format!("vm{i}"), disk), "vm{i}");
    }
    s3.ok(&["repo", "gc", repo]);
    s3.ok(&["repo", "verify", repo]);
    for (i, disk) in disks.iter().enumerate() {
        assert!(
            s3.restores_as(repo, &format!("vm{i}"), disk),
            "vm{i} after gc"
        );
    }
}

#[test]
fn sync_copies_local_to_s3_and_back_and_resumes_after_a_kill() {
    let s3 = S3::start();
    let local = s3.dir.path().join("local");
    let local = s(&local);
    s3.ok(&["repo", "init", local]);
    let big = s3.dir.path().join("big.raw");
    random_disk(&big, 96, 30);
    let small = s3.dir.path().join("small.raw");
    random_disk(&small, 2, 31);
    let big_id = s3.backup(local, &big, "big")["snapshot"].clone();
    s3.backup(local, &small, "small");

    // Killed once a pack is up: the rerun copies only the rest.
    let offsite = "s3://backups/offsite";
    let mut child = s3
        .command(&["repo", "sync", local, offsite, "--disk", "big"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while packs_in(&s3, "offsite") < 1 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no pack uploaded"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let killed_after_commit = child.wait().unwrap().success();
    let summary: serde_json::Value =
        serde_json::from_str(&s3.ok(&["repo", "sync", local, offsite, "--json"])).unwrap();
    let total = 96 * 4 + 2 * 4;
    let copied = summary["chunks_copied"].as_u64().unwrap();
    assert!(
        killed_after_commit || copied < total,
        "the rerun copied {copied} of {total} chunks: {summary}"
    );
    let list = s3.snapshots(offsite);
    assert_eq!(list.len(), 2);
    assert!(list.iter().any(|s| s["id"] == big_id));
    let again: serde_json::Value =
        serde_json::from_str(&s3.ok(&["repo", "sync", local, offsite, "--json"])).unwrap();
    assert_eq!(again["chunks_copied"], 0, "{again}");
    assert_eq!(again["snapshots_present"], 2, "{again}");

    // Back from S3 into a new local directory: restores as the disks were.
    let back = s3.dir.path().join("back");
    let back = s(&back);
    s3.ok(&["repo", "sync", offsite, back]);
    s3.ok(&["repo", "verify", back]);
    s3.ok(&["repo", "verify", offsite]);
    assert!(s3.restores_as(back, "big", &big));
    assert!(s3.restores_as(back, "small", &small));
    assert!(s3.restores_as(offsite, "big", &big));
}

#[test]
fn the_daemons_repository_node_takes_a_bucket_and_its_endpoint_as_members() {
    use common::daemon::Qmp;
    use serde_json::json;
    let s3 = S3::start();
    let repo = "s3://backups/live";
    s3.ok(&["repo", "init", repo, "--chunk-size", "128K"]);
    let disk = s3.dir.path().join("disk.raw");
    random_disk(&disk, 6, 40);
    let size = std::fs::metadata(&disk).unwrap().len();

    // The daemon has the credentials but not the endpoint: the node's member names it.
    let qmp = s3.dir.path().join("qmp.sock");
    let daemon = Running::start(&["daemon", "--qmp", s(&qmp)], &qmp, |c| {
        c.envs(s3.env()).env_remove("AWS_ENDPOINT_URL");
    });
    let (mut q, _) = Qmp::connect(&qmp);
    q.cmd("qmp_capabilities", json!({}));
    let r = q.cmd(
        "blockdev-add",
        json!({"driver":"raw","node-name":"src","file":{"driver":"file","filename":disk}}),
    );
    assert!(r.get("return").is_some(), "{r}");
    let unreachable = q.cmd(
        "blockdev-add",
        json!({"driver":"repository","node-name":"bad","repository":repo,
               "s3-endpoint":"http://127.0.0.1:9","disk":"vm","size":size}),
    );
    let error = unreachable["error"]["desc"].as_str().unwrap_or_default();
    assert!(error.contains(repo), "{unreachable}");
    let r = q.cmd(
        "blockdev-add",
        json!({"driver":"repository","node-name":"r0","repository":repo,
               "s3-endpoint":s3.server.endpoint,"disk":"vm","size":size}),
    );
    assert!(r.get("return").is_some(), "{r}");
    let r = q.cmd(
        "blockdev-backup",
        json!({"job-id":"full","device":"src","target":"r0","sync":"full"}),
    );
    assert!(r.get("return").is_some(), "{r}");
    let done = q.wait_event("BLOCK_JOB_COMPLETED")["data"].clone();
    assert!(done.get("error").is_none(), "{done}");
    drop(daemon);
    assert_eq!(s3.snapshots(repo).len(), 1);
    assert!(s3.restores_as(repo, "vm", &disk));
}
