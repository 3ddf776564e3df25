//! Live backups into the repository through the daemon: `blockdev-add` of a
//! `repository` node, `blockdev-backup` into it, and the snapshot it commits, judged by
//! restoring it and comparing with `qemu-img compare`.

mod common;

use std::path::Path;

use common::daemon::Qmp;
use common::daemon::start;
use common::*;
use serde_json::Value;
use serde_json::json;

fn raw_node(name: &str, path: &Path) -> Value {
    json!({"driver":"raw","node-name":name,
           "file":{"driver":"file","filename":path}})
}

fn repo_node(name: &str, repo: &Path, disk: &str, size: u64, parent: Value) -> Value {
    json!({"driver":"repository","node-name":name,"repository":repo,
           "disk":disk,"size":size,"parent":parent})
}

/// A raw image of `size` bytes: random data, zeros and holes, seeded.
fn mixed_image(path: &Path, size: u64, seed: u64) {
    let mut rng = Rng(seed);
    let mut data = vec![0u8; size as usize];
    let mut at = 0;
    while at < data.len() {
        let len = (4096 + rng.below(300 << 10) as usize).min(data.len() - at);
        if rng.below(3) != 0 {
            data[at..at + len].copy_from_slice(&rng.bytes(len));
        }
        at += len;
    }
    std::fs::write(path, &data).unwrap();
}

fn restored_equals(repo: &Path, snapshot: &str, image: &Path, dir: &Path) {
    let restored = dir.join(format!("restored-{snapshot}.raw"));
    let _ = std::fs::remove_file(&restored);
    ours(&["restore", "--repo", s(repo), snapshot, s(&restored)]);
    let same = run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", s(image), s(&restored)],
    );
    assert!(
        same.status.success(),
        "snapshot {snapshot} differs from {}: {}",
        image.display(),
        stdout(&same)
    );
}

/// The repository node as `query-named-block-nodes` shows it.
fn node_state(q: &mut Qmp, name: &str) -> Value {
    let nodes = q.cmd("query-named-block-nodes", json!({}));
    let node = nodes["return"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == name)
        .unwrap_or_else(|| panic!("no node {name}: {nodes}"))
        .clone();
    node["image"]["format-specific"]["data"].clone()
}

/// Runs a backup and returns its BLOCK_JOB_COMPLETED data.
fn backup(q: &mut Qmp, args: Value) -> Value {
    let job = args["job-id"].as_str().unwrap().to_string();
    let r = q.cmd("blockdev-backup", args);
    assert!(r.get("return").is_some(), "{r}");
    loop {
        let e = q.wait_event("BLOCK_JOB_COMPLETED");
        q.events.retain(|x| x != &e);
        if e["data"]["device"] == job.as_str() {
            return e["data"].clone();
        }
    }
}

/// A full backup of `src` into `target` in one `transaction` with a new persistent
/// bitmap `b0` on `src`, waited for.
fn full_with_new_bitmap(q: &mut Qmp, job: &str, target: &str) {
    let r = q.cmd(
        "transaction",
        json!({"actions": [
            {"type": "block-dirty-bitmap-add",
             "data": {"node": "src", "name": "b0", "persistent": true}},
            {"type": "blockdev-backup", "data":
                {"job-id": job, "device": "src", "target": target, "sync": "full"}}]}),
    );
    assert!(r.get("return").is_some(), "{r}");
    let done = q.wait_event("BLOCK_JOB_COMPLETED")["data"].clone();
    assert!(done.get("error").is_none(), "{done}");
}

fn snapshots(repo: &Path) -> Vec<Value> {
    let out = ours(&["repo", "snapshots", s(repo), "--json"]);
    serde_json::from_str::<Vec<Value>>(&out).unwrap()
}

#[test]
fn a_full_then_an_incremental_backup_commit_snapshots_that_restore_identically() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    ours(&["repo", "init", s(&repo), "--chunk-size", "128K"]);
    let image = dir.path().join("disk.raw");
    // Not a whole number of chunks: the last one is short.
    let size = (4 << 20) + 12288;
    mixed_image(&image, size, 7);
    let at_first = dir.path().join("first.raw");
    std::fs::copy(&image, &at_first).unwrap();

    let (_daemon, qmp) = start(dir.path(), &[]);
    let (mut q, _) = Qmp::connect(&qmp);
    q.cmd("qmp_capabilities", json!({}));
    assert!(
        q.cmd("blockdev-add", raw_node("src", &image))
            .get("return")
            .is_some()
    );
    let r = q.cmd(
        "blockdev-add",
        repo_node("r0", &repo, "vm1", size, Value::Null),
    );
    assert!(r.get("return").is_some(), "{r}");
    let state = node_state(&mut q, "r0");
    assert_eq!(
        (state["state"].as_str(), state["chunk-size"].as_u64()),
        (Some("writing"), Some(128 << 10)),
        "{state}"
    );

    // The full backup and the bitmap for the next one, at one instant.
    let r = q.cmd(
        "transaction",
        json!({"actions": [
            {"type": "block-dirty-bitmap-add", "data": {"node": "src", "name": "b0"}},
            {"type": "blockdev-backup", "data":
                {"job-id": "full", "device": "src", "target": "r0", "sync": "full"}}]}),
    );
    assert!(r.get("return").is_some(), "{r}");
    let done = q.wait_event("BLOCK_JOB_COMPLETED")["data"].clone();
    q.events.clear();
    assert!(done.get("error").is_none(), "{done}");
    // Completed means committed and listed.
    let state = node_state(&mut q, "r0");
    assert_eq!(state["state"], "committed", "{state}");
    let first = state["snapshot"].as_str().unwrap().to_string();
    let listed = snapshots(&repo);
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["id"], first.as_str());
    assert_eq!(listed[0]["disk"], "vm1");
    restored_equals(&repo, &first, &at_first, dir.path());

    // The node is spent: a second backup into it is refused.
    let again = q.cmd(
        "blockdev-backup",
        json!({"job-id": "again", "device": "src", "target": "r0", "sync": "full"}),
    );
    let error = again["error"]["desc"].as_str().unwrap_or_default();
    assert!(
        error.contains("committed") && error.contains("new repository node"),
        "{again}"
    );
    assert_eq!(snapshots(&repo).len(), 1);

    // Guest writes through an NBD export of the running disk: two 128 KiB chunks.
    let nbd = dir.path().join("nbd.sock");
    q.cmd(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": nbd}}}),
    );
    let r = q.cmd(
        "block-export-add",
        json!({"type": "nbd", "id": "e0", "node-name": "src", "name": "disk", "writable": true}),
    );
    assert!(r.get("return").is_some(), "{r}");
    let uri = format!("nbd+unix:///disk?socket={}", nbd.display());
    let out = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            &uri,
            "-c",
            "write -P 0x5a 1M 64k",
            "-c",
            &format!("write -P 0x33 {} 4k", (3 << 20) + (100 << 10)),
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));

    // The incremental: only the bitmap's chunks are read, the rest come from the parent.
    let r = q.cmd(
        "blockdev-add",
        repo_node("r1", &repo, "vm1", size, json!("latest")),
    );
    assert!(r.get("return").is_some(), "{r}");
    assert_eq!(node_state(&mut q, "r1")["parent"], first.as_str());
    let done = backup(
        &mut q,
        json!({"job-id": "inc", "device": "src", "target": "r1",
               "sync": "incremental", "bitmap": "b0"}),
    );
    assert!(done.get("error").is_none(), "{done}");
    assert_eq!(done["len"], 2 * (128 << 10), "two chunks read: {done}");
    let second = node_state(&mut q, "r1")["snapshot"]
        .as_str()
        .unwrap()
        .to_string();
    let listed = snapshots(&repo);
    assert_eq!(listed.len(), 2);
    let entry = listed.iter().find(|s| s["id"] == second.as_str()).unwrap();
    assert_eq!(entry["parent"], first.as_str());
    restored_equals(&repo, &second, &image, dir.path());
    restored_equals(&repo, &first, &at_first, dir.path());
    let verify = stillpoint(&["repo", "verify", s(&repo)]);
    assert!(verify.status.success(), "{}", stderr(&verify));
    // The bitmap (64 KiB granules) marks half of each of the two chunks: each is
    // stored as that half over the first snapshot's chunk, where that one is stored
    // (not all zeros).
    let old = std::fs::read(&at_first).unwrap();
    let stored_before = |offset: usize| old[offset..offset + (128 << 10)].iter().any(|&b| b != 0);
    let expect = [1 << 20, 3 << 20]
        .into_iter()
        .filter(|&o| stored_before(o))
        .count();
    assert!(expect > 0, "the seed makes at least one delta");
    let stats: Value = serde_json::from_str(&ours(&["repo", "stats", s(&repo), "--json"])).unwrap();
    assert_eq!(stats["delta_chunks"], expect, "{stats}");

    // The first snapshot forgotten and collected: the deltas' bases stay.
    ours(&["repo", "forget", s(&repo), &first]);
    ours(&["repo", "gc", s(&repo)]);
    ours(&["repo", "gc", s(&repo)]);
    restored_equals(&repo, &second, &image, dir.path());
    let verify = stillpoint(&["repo", "verify", s(&repo)]);
    assert!(verify.status.success(), "{}", stderr(&verify));
    q.cmd("quit", json!({}));
}

#[test]
fn repository_nodes_refuse_bad_options_and_modes_with_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    ours(&["repo", "init", s(&repo), "--chunk-size", "64K"]);
    let image = dir.path().join("disk.raw");
    mixed_image(&image, 1 << 20, 3);
    let (_daemon, qmp) = start(dir.path(), &[]);
    let (mut q, _) = Qmp::connect(&qmp);
    q.cmd("qmp_capabilities", json!({}));
    q.cmd("blockdev-add", raw_node("src", &image));
    let error = |q: &mut Qmp, args: Value| -> String {
        let r = q.cmd("blockdev-add", args);
        r["error"]["desc"]
            .as_str()
            .unwrap_or_else(|| panic!("accepted: {r}"))
            .to_string()
    };
    let e = error(
        &mut q,
        repo_node("r", &repo, "vm1", 1 << 20, json!("latest")),
    );
    assert!(e.contains("has no snapshot") && e.contains("null"), "{e}");
    let e = error(
        &mut q,
        repo_node("r", &dir.path().join("nosuch"), "vm1", 1 << 20, Value::Null),
    );
    assert!(e.contains("nosuch"), "{e}");
    let e = error(
        &mut q,
        json!({"driver":"repository","node-name":"r","repository":repo,"disk":"vm1"}),
    );
    assert!(e.contains("size"), "{e}");
    let e = error(
        &mut q,
        json!({"driver":"repository","node-name":"r","repository":repo,
               "snapshot":"x","disk":"vm1"}),
    );
    assert!(e.contains("snapshot"), "{e}");
    let e = error(
        &mut q,
        json!({"driver":"repository","node-name":"r","repository":repo,"snapshot":"nosuch"}),
    );
    assert!(e.contains("no snapshot"), "{e}");

    // sync=none and sync=top are refused: neither finishes a snapshot.
    assert!(
        q.cmd(
            "blockdev-add",
            repo_node("r", &repo, "vm1", 1 << 20, Value::Null)
        )
        .get("return")
        .is_some()
    );
    for sync in ["none", "top"] {
        let r = q.cmd(
            "blockdev-backup",
            json!({"job-id": "j", "device": "src", "target": "r", "sync": sync}),
        );
        let desc = r["error"]["desc"].as_str().unwrap_or_default();
        assert!(desc.contains("full, incremental or bitmap"), "{sync}: {r}");
    }
    // A cancelled backup commits nothing; the node is deleted and its packs stay for
    // a collection (or the next backup's dedup).
    let r = q.cmd(
        "blockdev-backup",
        json!({"job-id": "slow", "device": "src", "target": "r", "sync": "full",
               "speed": 65536}),
    );
    assert!(r.get("return").is_some(), "{r}");
    q.cmd("block-job-cancel", json!({"device": "slow", "force": true}));
    let e = q.wait_event("BLOCK_JOB_CANCELLED");
    assert_eq!(e["data"]["device"], "slow");
    assert!(
        q.cmd("blockdev-del", json!({"node-name": "r"}))
            .get("return")
            .is_some()
    );
    assert!(snapshots(&repo).is_empty());
    // An incremental into a node without a parent cannot take the chunks it skips
    // from anywhere: refused at the commit, nothing made.
    q.cmd(
        "block-dirty-bitmap-add",
        json!({"node": "src", "name": "b"}),
    );
    q.cmd(
        "blockdev-add",
        repo_node("r", &repo, "vm1", 1 << 20, Value::Null),
    );
    let done = backup(
        &mut q,
        json!({"job-id": "inc", "device": "src", "target": "r", "sync": "incremental",
               "bitmap": "b"}),
    );
    let error = done["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("never written") && error.contains("no parent"),
        "{done}"
    );
    assert!(snapshots(&repo).is_empty());
    q.cmd("quit", json!({}));
}

fn bitmap_state(q: &mut Qmp, node: &str, name: &str) -> Value {
    let nodes = q.cmd("query-named-block-nodes", json!({}));
    nodes["return"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == node)
        .and_then(|n| n["dirty-bitmaps"].as_array())
        .and_then(|b| b.iter().find(|b| b["name"] == name))
        .cloned()
        .unwrap_or(Value::Null)
}

fn nbd_write(q: &mut Qmp, dir: &Path, commands: &[&str]) {
    nbd_write_to(q, dir, "src", commands);
}

/// Writes through a writable NBD export of `node`, as a guest would.
fn nbd_write_to(q: &mut Qmp, dir: &Path, node: &str, commands: &[&str]) {
    let nbd = dir.join("nbd.sock");
    let _ = std::fs::remove_file(&nbd);
    q.cmd(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": nbd}}}),
    );
    q.cmd(
        "block-export-add",
        json!({"type": "nbd", "id": "e0", "node-name": node, "name": "disk", "writable": true}),
    );
    let uri = format!("nbd+unix:///disk?socket={}", nbd.display());
    let mut args = vec!["-f", "raw", &uri];
    for c in commands {
        args.extend(["-c", c]);
    }
    let out = run("qemu-io", &args);
    assert!(out.status.success(), "{}", stderr(&out));
    q.cmd("block-export-del", json!({"id": "e0"}));
    q.cmd("nbd-server-stop", json!({}));
}

/// Raw images keep persistent bitmaps in a file beside them (or in --state-dir): the
/// bitmap is back after `quit` and a restart, so the incremental reads only what
/// changed; after a SIGKILL it is inconsistent, like qcow2's, and cannot be used.
#[test]
fn a_raw_disks_bitmap_survives_a_restart_and_a_crash_makes_it_inconsistent() {
    for state_dir in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let repo = dir.path().join("repo");
        ours(&["repo", "init", s(&repo), "--chunk-size", "64K"]);
        let image = dir.path().join("disk.raw");
        let size = 4 << 20;
        mixed_image(&image, size, 11);
        let state = dir.path().join("state");
        let extra: Vec<String> = if state_dir {
            vec!["--state-dir".into(), state.display().to_string()]
        } else {
            Vec::new()
        };
        let sidecar = || -> Vec<std::path::PathBuf> {
            let beside = dir.path().join("disk.raw.stillpoint-bitmaps");
            let mut found: Vec<_> = std::fs::read_dir(&state)
                .map(|d| d.map(|e| e.unwrap().path()).collect())
                .unwrap_or_default();
            if beside.exists() {
                found.push(beside);
            }
            found
        };

        let (daemon, qmp) = start(dir.path(), &extra);
        let (mut q, _) = Qmp::connect(&qmp);
        q.cmd("qmp_capabilities", json!({}));
        q.cmd("blockdev-add", raw_node("src", &image));
        q.cmd(
            "blockdev-add",
            repo_node("r0", &repo, "vm", size, Value::Null),
        );
        full_with_new_bitmap(&mut q, "full", "r0");
        let files = sidecar();
        assert_eq!(files.len(), 1, "state dir {state_dir}: {files:?}");
        assert_eq!(files[0].starts_with(&state), state_dir, "{files:?}");
        nbd_write(&mut q, dir.path(), &["write -P 0x5a 1M 64k"]);
        q.cmd("quit", json!({}));
        drop(q);
        let mut daemon = daemon;
        daemon.0.wait().unwrap();
        std::fs::remove_file(&qmp).ok();

        // Restarted: the node added again has its bitmap, and the incremental reads
        // one chunk.
        let (daemon, qmp) = start(dir.path(), &extra);
        let (mut q, _) = Qmp::connect(&qmp);
        q.cmd("qmp_capabilities", json!({}));
        q.cmd("blockdev-add", raw_node("src", &image));
        let b0 = bitmap_state(&mut q, "src", "b0");
        assert_eq!(
            (b0["count"].as_u64(), b0["persistent"].as_bool()),
            (Some(65536), Some(true)),
            "{b0}"
        );
        q.cmd(
            "blockdev-add",
            repo_node("r1", &repo, "vm", size, json!("latest")),
        );
        let done = backup(
            &mut q,
            json!({"job-id": "inc", "device": "src", "target": "r1",
                   "sync": "incremental", "bitmap": "b0"}),
        );
        assert!(done.get("error").is_none(), "{done}");
        assert_eq!(done["len"], 65536, "one chunk read: {done}");
        let second = node_state(&mut q, "r1")["snapshot"]
            .as_str()
            .unwrap()
            .to_string();
        restored_equals(&repo, &second, &image, dir.path());

        // Killed while open: the bitmap cannot be trusted any more.
        nbd_write(&mut q, dir.path(), &["write -P 0x77 2M 4k"]);
        drop(daemon); // SIGKILL
        std::fs::remove_file(&qmp).ok();
        let (_daemon, qmp) = start(dir.path(), &extra);
        let (mut q, _) = Qmp::connect(&qmp);
        q.cmd("qmp_capabilities", json!({}));
        q.cmd("blockdev-add", raw_node("src", &image));
        assert_eq!(
            bitmap_state(&mut q, "src", "b0")["inconsistent"],
            true,
            "state dir {state_dir}"
        );
        q.cmd(
            "blockdev-add",
            repo_node("r2", &repo, "vm", size, json!("latest")),
        );
        let r = q.cmd(
            "blockdev-backup",
            json!({"job-id": "inc2", "device": "src", "target": "r2",
                   "sync": "incremental", "bitmap": "b0"}),
        );
        let desc = r["error"]["desc"].as_str().unwrap_or_default();
        assert!(desc.contains("inconsistent"), "{r}");
        // The way on: a full read (dedup stores only what changed) and a new bitmap.
        q.cmd(
            "block-dirty-bitmap-remove",
            json!({"node": "src", "name": "b0"}),
        );
        full_with_new_bitmap(&mut q, "full2", "r2");
        let third = node_state(&mut q, "r2")["snapshot"]
            .as_str()
            .unwrap()
            .to_string();
        restored_equals(&repo, &third, &image, dir.path());
        q.cmd("quit", json!({}));
    }
}

#[test]
fn a_daemon_killed_during_a_backup_into_the_repository_leaves_every_snapshot_whole() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    ours(&["repo", "init", s(&repo), "--chunk-size", "64K"]);
    let image = dir.path().join("disk.raw");
    // Past two packs (32 MiB each) of the second backup's data, so its first pack is
    // stored seconds before its end at the speed below (at 48 MiB the first pack came
    // moments before the commit, and a loaded CI machine saw it only after).
    let size = 96 << 20;
    mixed_image(&image, size, 5);
    let at_first = dir.path().join("first.raw");
    std::fs::copy(&image, &at_first).unwrap();
    let (daemon, qmp) = start(dir.path(), &[]);
    let (mut q, _) = Qmp::connect(&qmp);
    q.cmd("qmp_capabilities", json!({}));
    q.cmd("blockdev-add", raw_node("src", &image));
    q.cmd(
        "blockdev-add",
        repo_node("r0", &repo, "vm", size, Value::Null),
    );
    let done = backup(
        &mut q,
        json!({"job-id": "full", "device": "src", "target": "r0", "sync": "full"}),
    );
    assert!(done.get("error").is_none(), "{done}");
    // Different data, so the second backup stores packs of its own before the kill.
    mixed_image(&image, size, 6);
    q.cmd(
        "blockdev-add",
        repo_node("r1", &repo, "vm", size, json!("latest")),
    );
    let packs = || walk_files(&repo.join("packs"));
    let before = packs();
    let r = q.cmd(
        "blockdev-backup",
        json!({"job-id": "slow", "device": "src", "target": "r1", "sync": "full",
               "speed": 12 << 20}),
    );
    assert!(r.get("return").is_some(), "{r}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while packs() == before && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(
        packs() > before,
        "the second backup stored a pack before the kill"
    );
    drop(daemon); // SIGKILL, half way
    let listed = snapshots(&repo);
    assert_eq!(listed.len(), 1, "nothing half-made is listed: {listed:?}");
    let verify = stillpoint(&["repo", "verify", s(&repo)]);
    assert!(verify.status.success(), "{}", stderr(&verify));
    restored_equals(
        &repo,
        listed[0]["id"].as_str().unwrap(),
        &at_first,
        dir.path(),
    );
    // And the next attempt succeeds.
    std::fs::remove_file(&qmp).ok();
    let (_daemon, qmp) = start(dir.path(), &[]);
    let (mut q, _) = Qmp::connect(&qmp);
    q.cmd("qmp_capabilities", json!({}));
    q.cmd("blockdev-add", raw_node("src", &image));
    q.cmd(
        "blockdev-add",
        repo_node("r1", &repo, "vm", size, json!("latest")),
    );
    let done = backup(
        &mut q,
        json!({"job-id": "again", "device": "src", "target": "r1", "sync": "full"}),
    );
    assert!(done.get("error").is_none(), "{done}");
    let second = node_state(&mut q, "r1")["snapshot"]
        .as_str()
        .unwrap()
        .to_string();
    restored_equals(&repo, &second, &image, dir.path());
    q.cmd("quit", json!({}));
}

fn walk_files(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .map(|e| {
                    let path = e.unwrap().path();
                    if path.is_dir() { walk_files(&path) } else { 1 }
                })
                .sum()
        })
        .unwrap_or(0)
}

/// Waits for the BLOCK_JOB_COMPLETED of each of `jobs` (any order); returns their data.
fn wait_completed(q: &mut Qmp, jobs: &[String]) -> Vec<Value> {
    let mut done: Vec<Value> = Vec::new();
    while done.len() < jobs.len() {
        let e = q.wait_event("BLOCK_JOB_COMPLETED");
        q.events.retain(|x| x != &e);
        if jobs.iter().any(|j| e["data"]["device"] == j.as_str()) {
            done.push(e["data"].clone());
        }
    }
    jobs.iter()
        .map(|j| {
            done.iter()
                .find(|d| d["device"] == j.as_str())
                .unwrap()
                .clone()
        })
        .collect()
}

fn stored_bytes(repo: &Path) -> u64 {
    let stats: Value = serde_json::from_str(&ours(&["repo", "stats", s(repo), "--json"])).unwrap();
    stats["stored_bytes"].as_u64().unwrap()
}

/// Two disks of one machine, five rounds: each round backs both up in one
/// `transaction` (the first full, then incrementals by bitmap from the latest
/// snapshot), with guest writes through NBD between rounds. Every snapshot restores as
/// its disk was at its round; the middle rounds are then forgotten, collected (their
/// space is given back), and the first and last still verify and restore identically.
#[test]
fn five_incremental_rounds_of_two_disks_restore_each_and_survive_forget_and_gc() {
    const CHUNK: u64 = 64 << 10;
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    ours(&["repo", "init", s(&repo), "--chunk-size", "64K"]);
    let size: u64 = 3 << 20;
    let disks = ["vm1-disk0", "vm1-disk1"];
    let images: Vec<_> = disks
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let path = dir.path().join(format!("{d}.raw"));
            mixed_image(&path, size, 40 + i as u64);
            path
        })
        .collect();
    let (_daemon, qmp) = start(dir.path(), &[]);
    let (mut q, _) = Qmp::connect(&qmp);
    q.cmd("qmp_capabilities", json!({}));
    for (i, image) in images.iter().enumerate() {
        let r = q.cmd("blockdev-add", raw_node(&format!("src{i}"), image));
        assert!(r.get("return").is_some(), "{r}");
    }

    let mut rng = Rng(0x5eed_0016);
    // rounds[k][i]: (snapshot id, a copy of disk i as it was at round k).
    let mut rounds: Vec<Vec<(String, std::path::PathBuf)>> = Vec::new();
    for round in 0..5 {
        // What the guest writes since the last round, and which chunks that dirties.
        let mut dirty = vec![std::collections::BTreeSet::new(); disks.len()];
        if round > 0 {
            for (i, touched) in dirty.iter_mut().enumerate() {
                let mut commands = Vec::new();
                // Many writes in the middle rounds (data the last round no longer
                // names, for gc to free), few in the last.
                let writes = if round == 4 { 3 } else { 12 };
                for _ in 0..writes {
                    let offset = rng.below((size - CHUNK) / 4096) * 4096;
                    let pattern = 1 + rng.below(254);
                    commands.push(format!("write -P {pattern} {offset} 64k"));
                    let last_byte = offset + CHUNK - 1;
                    touched.insert(offset / CHUNK);
                    touched.insert(last_byte / CHUNK);
                }
                let commands: Vec<&str> = commands.iter().map(String::as_str).collect();
                nbd_write_to(&mut q, dir.path(), &format!("src{i}"), &commands);
            }
        }
        let mut actions = Vec::new();
        let mut jobs = Vec::new();
        for (i, disk) in disks.iter().enumerate() {
            let target = format!("r{round}-{i}");
            let parent = if round == 0 {
                Value::Null
            } else {
                json!("latest")
            };
            let r = q.cmd(
                "blockdev-add",
                repo_node(&target, &repo, disk, size, parent),
            );
            assert!(r.get("return").is_some(), "{r}");
            let job = format!("b{round}-{i}");
            if round == 0 {
                actions.push(json!({"type": "block-dirty-bitmap-add",
                    "data": {"node": format!("src{i}"), "name": "daily"}}));
                actions.push(json!({"type": "blockdev-backup", "data":
                    {"job-id": job, "device": format!("src{i}"), "target": target,
                     "sync": "full"}}));
            } else {
                actions.push(json!({"type": "blockdev-backup", "data":
                    {"job-id": job, "device": format!("src{i}"), "target": target,
                     "sync": "incremental", "bitmap": "daily"}}));
            }
            jobs.push(job);
        }
        // The point-in-time copies: nothing writes between here and the transaction.
        let copies: Vec<_> = images
            .iter()
            .enumerate()
            .map(|(i, image)| {
                let copy = dir.path().join(format!("round{round}-{i}.raw"));
                std::fs::copy(image, &copy).unwrap();
                copy
            })
            .collect();
        let r = q.cmd("transaction", json!({ "actions": actions }));
        assert!(r.get("return").is_some(), "round {round}: {r}");
        let done = wait_completed(&mut q, &jobs);
        let mut this_round = Vec::new();
        for (i, d) in done.iter().enumerate() {
            assert!(d.get("error").is_none(), "round {round}: {d}");
            let expect = if round == 0 {
                size
            } else {
                dirty[i].len() as u64 * CHUNK
            };
            assert_eq!(d["len"], expect, "round {round}, disk {i} read: {d}");
            let state = node_state(&mut q, &format!("r{round}-{i}"));
            assert_eq!(state["state"], "committed", "{state}");
            let id = state["snapshot"].as_str().unwrap().to_string();
            if round > 0 {
                assert_eq!(state["parent"], rounds[round - 1][i].0.as_str(), "{state}");
            }
            this_round.push((id, copies[i].clone()));
        }
        rounds.push(this_round);
    }
    q.cmd("quit", json!({}));

    for (k, round) in rounds.iter().enumerate() {
        for (id, copy) in round {
            restored_equals(&repo, id, copy, dir.path());
        }
        assert_eq!(round.len(), 2, "round {k}");
    }
    assert_eq!(snapshots(&repo).len(), 10);

    // Forget the middle rounds; a mistyped id among them deletes nothing.
    let middle: Vec<&str> = rounds[1..4]
        .iter()
        .flatten()
        .map(|(id, _)| id.as_str())
        .collect();
    let mut bad = vec!["repo", "forget", s(&repo), "no-such-id"];
    bad.extend(&middle);
    let out = stillpoint(&bad);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("no-such-id"), "{}", stderr(&out));
    assert_eq!(snapshots(&repo).len(), 10);
    let mut forget = vec!["repo", "forget", s(&repo)];
    forget.extend(&middle);
    ours(&forget);
    assert_eq!(snapshots(&repo).len(), 4);

    // The first collection condemns, the second deletes (no backup is running).
    let before = stored_bytes(&repo);
    ours(&["repo", "gc", s(&repo)]);
    ours(&["repo", "gc", s(&repo)]);
    let after = stored_bytes(&repo);
    assert!(after < before, "gc freed nothing: {before} -> {after}");
    let verify = stillpoint(&["repo", "verify", s(&repo)]);
    assert!(verify.status.success(), "{}", stderr(&verify));
    for round in [&rounds[0], &rounds[4]] {
        for (id, copy) in round {
            restored_equals(&repo, id, copy, dir.path());
        }
    }
}

#[test]
fn a_daemon_snapshot_that_records_its_bitmap_lets_the_cli_read_only_what_changed() {
    for record in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let repo = dir.path().join("repo");
        ours(&["repo", "init", s(&repo), "--chunk-size", "64K"]);
        let image = dir.path().join("disk.raw");
        let size = 4 << 20;
        mixed_image(&image, size, 21);

        let (daemon, qmp) = start(dir.path(), &[]);
        let (mut q, _) = Qmp::connect(&qmp);
        q.cmd("qmp_capabilities", json!({}));
        q.cmd("blockdev-add", raw_node("src", &image));
        let mut node = repo_node("r0", &repo, "vm", size, Value::Null);
        if record {
            node["bitmap"] = json!("b0");
        }
        q.cmd("blockdev-add", node);
        full_with_new_bitmap(&mut q, "full", "r0");
        nbd_write(&mut q, dir.path(), &["write -P 0x5a 1M 64k"]);
        q.cmd("quit", json!({}));
        drop(q);
        let mut daemon = daemon;
        daemon.0.wait().unwrap();

        // The CLI takes over the disk and its bitmap from the daemon.
        let out = ours(&[
            "backup",
            s(&image),
            "--repo",
            s(&repo),
            "--disk",
            "vm",
            "--bitmap",
            "b0",
            "--json",
        ]);
        let summary: Value = serde_json::from_str(&out).unwrap();
        if record {
            assert_eq!(summary["incremental"], true, "{summary}");
            assert_eq!(summary["read"], 65536, "one chunk read: {summary}");
        } else {
            assert_eq!(summary["incremental"], false, "{summary}");
            let why = summary["whole_read_because"].as_str().unwrap_or_default();
            assert!(why.contains("was not taken with bitmap b0"), "{summary}");
        }
        let snapshot = summary["snapshot"].as_str().unwrap().to_string();
        restored_equals(&repo, &snapshot, &image, dir.path());
    }
}
