//! What one NBD client can hold and for how long, and how an export is removed under
//! connected clients: the data budget holds until replies are on the socket, the
//! connection limit and the handshake time limit hold, and removal never waits for a
//! client to read.

use std::time::Duration;

use nbd::RemoveMode;
use nbd::ServerLimits;
use nbd::proto::*;
use nbd::server::RemoveError;
use serde_json::json;
use tokio::io::AsyncReadExt;

mod common;

use common::*;

/// A guard for waits that must end: generous, so a loaded machine never trips it.
const HANG: Duration = Duration::from_secs(20);

/// Resident memory of this process, in bytes.
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib << 10
}

/// A 64 MiB file of non-zero bytes (reads of it fill every page of their buffer).
fn data_file(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("data.img");
    std::fs::write(&path, vec![0xa5u8; 64 << 20]).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_its_replies_holds_no_more_than_the_budget() {
    let files = tempfile::tempdir().unwrap();
    let image = data_file(files.path());
    let (rig, _server) = serve_one(
        ServerLimits::default(),
        json!({"driver": "raw", "node-name": "img",
               "file": {"driver": "file", "filename": image}}),
        false,
    )
    .await;
    let mut client = Client::go(&rig, "disk", false).await;
    let before = rss();
    // 24 reads of 32 MiB (768 MiB of replies), and not one byte of them read.
    for cookie in 0..24 {
        client.send(CMD_READ, 0, cookie, 0, MAX_PAYLOAD, &[]).await;
    }
    // Wait for the server to do all it will do: memory stops growing.
    let mut last = rss();
    let mut steady = 0;
    while steady < 5 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = rss();
        steady = if now.abs_diff(last) < 4 << 20 {
            steady + 1
        } else {
            0
        };
        last = now;
    }
    let grown = last.saturating_sub(before);
    // The budget (128 MiB) and the idle buffer pool (8 MiB), with room for the rest.
    let allowed = (nbd::server::DATA_BUDGET_BYTES as u64) + (64 << 20);
    assert!(
        grown <= allowed,
        "a client that reads nothing made the server hold {} MiB (allowed {} MiB)",
        grown >> 20,
        allowed >> 20
    );
    // Reading the replies lets every request through, in full.
    for _ in 0..24 {
        let (error, _cookie) = client.simple().await;
        assert_eq!(error, 0);
        let mut data = vec![0u8; MAX_PAYLOAD as usize];
        client.stream.read_exact(&mut data).await.unwrap();
        assert!(data.iter().all(|&b| b == 0xa5));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn safe_removal_is_refused_while_a_client_is_connected() {
    let (rig, server) = serve_one(
        ServerLimits::default(),
        json!({"driver": "null-co", "node-name": "img", "size": SIZE, "read-zeroes": true}),
        false,
    )
    .await;
    let mut client = Client::go(&rig, "disk", false).await;
    assert_eq!(server.connections("disk"), 1);
    assert_eq!(
        server.remove_export("disk", RemoveMode::Safe).unwrap_err(),
        RemoveError::InUse
    );
    // Still served.
    client.send(CMD_READ, 0, 1, 0, 512, &[]).await;
    assert_eq!(client.simple().await, (0, 1));
    let mut data = [1u8; 512];
    client.stream.read_exact(&mut data).await.unwrap();
    // Once the client has left, safe removal goes through and releases the node.
    client.send(CMD_DISC, 0, 2, 0, 0, &[]).await;
    assert!(client.closed().await);
    let removal = loop {
        match server.remove_export("disk", RemoveMode::Safe) {
            Ok(removal) => break removal,
            // The server notices the disconnection a moment later.
            Err(RemoveError::InUse) => tokio::time::sleep(Duration::from_millis(10)).await,
            Err(e) => panic!("{e:?}"),
        }
    };
    tokio::time::timeout(HANG, removal).await.unwrap();
    rig._graph.remove("img").await.unwrap();
    assert_eq!(
        server.remove_export("disk", RemoveMode::Hard).unwrap_err(),
        RemoveError::NotFound
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hard_removal_closes_a_client_that_never_reads_and_waits_only_for_running_io() {
    let files = tempfile::tempdir().unwrap();
    let image = data_file(files.path());
    let (rig, server) = serve_one(
        ServerLimits::default(),
        json!({"driver": "raw", "node-name": "img",
               "file": {"driver": "file", "filename": image}}),
        false,
    )
    .await;
    let mut stuck = Client::go(&rig, "disk", false).await;
    for cookie in 0..16 {
        stuck.send(CMD_READ, 0, cookie, 0, MAX_PAYLOAD, &[]).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let removal = server.remove_export("disk", RemoveMode::Hard).unwrap();
    tokio::time::timeout(HANG, removal)
        .await
        .expect("hard removal waited for a client that does not read");
    assert_eq!(server.connections("disk"), 0);
    // The node is free again, and the client finds its connection closed (after
    // whatever the socket had buffered).
    rig._graph.remove("img").await.unwrap();
    let mut sink = vec![0u8; 1 << 20];
    let drained = tokio::time::timeout(HANG, async {
        loop {
            match stuck.stream.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(drained.is_ok(), "the connection was not closed");
    // New clients no longer find the export.
    let mut late = Client::connect(&rig).await;
    let mut go = 4u32.to_be_bytes().to_vec();
    go.extend_from_slice(b"disk");
    go.extend_from_slice(&0u16.to_be_bytes());
    late.option(OPT_GO, &go).await;
    assert_eq!(late.replies().await[0].0, REP_ERR_UNKNOWN);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hard_removal_lets_a_running_request_finish_before_it_completes() {
    let (rig, server) = serve_one(
        ServerLimits::default(),
        json!({"driver": "null-co", "node-name": "img", "size": SIZE, "read-zeroes": true,
               "latency-ns": 300_000_000u64}),
        false,
    )
    .await;
    let mut client = Client::go(&rig, "disk", false).await;
    client.send(CMD_READ, 0, 1, 0, 512, &[]).await;
    tokio::time::sleep(Duration::from_millis(100)).await; // the read is running (300 ms)
    let removal = server.remove_export("disk", RemoveMode::Hard).unwrap();
    // The connection closes at once; the node stays in use until the read is done.
    assert!(client.closed().await);
    assert!(rig._graph.remove("img").await.is_err());
    tokio::time::timeout(HANG, removal).await.unwrap();
    rig._graph.remove("img").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_beyond_max_connections_wait_ungreeted_until_one_leaves() {
    let limits = ServerLimits {
        max_connections: 1,
        ..ServerLimits::default()
    };
    let (rig, _server) = serve_one(
        limits,
        json!({"driver": "null-co", "node-name": "img", "size": SIZE}),
        false,
    )
    .await;
    let mut first = Client::go(&rig, "disk", false).await;
    let mut second = tokio::net::UnixStream::connect(&rig.socket).await.unwrap();
    let mut greeting = [0u8; 18];
    let early =
        tokio::time::timeout(Duration::from_millis(500), second.read_exact(&mut greeting)).await;
    assert!(
        early.is_err(),
        "a second client was greeted past max-connections"
    );
    first.send(CMD_DISC, 0, 1, 0, 0, &[]).await;
    assert!(first.closed().await);
    tokio::time::timeout(HANG, second.read_exact(&mut greeting))
        .await
        .expect("the waiting client was not served after the first left")
        .unwrap();
    assert_eq!(&greeting[..8], &NBDMAGIC.to_be_bytes());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_that_takes_too_long_is_dropped_but_an_idle_client_is_not() {
    let limits = ServerLimits {
        handshake: Duration::from_secs(1),
        ..ServerLimits::default()
    };
    let (rig, _server) = serve_one(
        limits,
        json!({"driver": "null-co", "node-name": "img", "size": SIZE, "read-zeroes": true}),
        false,
    )
    .await;
    let mut served = Client::go(&rig, "disk", false).await;
    // Connects, takes the greeting, then says nothing.
    let mut silent = Client::connect(&rig).await;
    let closed = tokio::time::timeout(HANG, silent.closed()).await;
    assert_eq!(
        closed,
        Ok(true),
        "a silent client was kept past the handshake limit"
    );
    // The limit is for the handshake only: a client idle in transmission stays.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    served.send(CMD_READ, 0, 7, 0, 512, &[]).await;
    assert_eq!(served.simple().await, (0, 7));
}
