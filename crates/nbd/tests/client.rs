//! The NBD client driver against real servers: qemu-nbd, qemu-storage-daemon's export,
//! and our own server. A backup writes to a remote target through it.

use std::path::Path;
use std::process::Child;
use std::process::Command;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use block::AttachUser;
use block::BlockdevOptions;
use block::IoBuf;
use block::NodeGraph;
use block::WriteFlags;
use block::ZeroFlags;
use jobs::BackupOptions;
use jobs::JobEvent;
use jobs::JobRegistry;
use jobs::JobStatus;
use jobs::start_backup;
use nbd::NbdDrivers;
use serde_json::json;
use testkit::Rng;

/// Kills and reaps a peer process when the test ends, pass or fail.
struct Peer(Child);

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until something accepts connections on the socket. The file alone is not enough:
/// a server binds (the file appears) before it listens, and a connect in between is
/// refused. The probe connection is closed at once; the servers here take more than one
/// client (qemu-nbd is started with `--persistent` for that).
fn wait_for(path: &Path) {
    for _ in 0..500 {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("nothing listens on {}", path.display());
}

fn graph() -> Arc<NodeGraph> {
    Arc::new(NodeGraph::with_external(Arc::new(NbdDrivers)))
}

async fn add(graph: &NodeGraph, v: serde_json::Value) {
    graph
        .add(BlockdevOptions::from_json(v).unwrap())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_writes_and_block_status_through_qemu_nbd() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    let mut content = Rng(5).bytes(4 << 20);
    content[1 << 20..2 << 20].fill(0);
    std::fs::write(&image, &content).unwrap();
    // Punch the zero MiB so block status has a hole to report.
    Command::new("fallocate")
        .args(["-p", "-o", "1048576", "-l", "1048576"])
        .arg(&image)
        .status()
        .unwrap();
    let socket = dir.path().join("qemu-nbd.sock");
    let _peer = Peer(
        Command::new("qemu-nbd")
            .args(["-f", "raw", "--persistent", "-k"])
            .arg(&socket)
            .arg(&image)
            .stderr(Stdio::null())
            .spawn()
            .expect("qemu-nbd is required"),
    );
    wait_for(&socket);
    let graph = graph();
    add(
        &graph,
        json!({"driver":"raw","node-name":"remote",
        "file":{"driver":"nbd","server":{"type":"unix","path":socket},"export":""}}),
    )
    .await;
    let disk = graph
        .attach("remote", AttachUser::Other("test".into()))
        .unwrap();
    assert_eq!(disk.length(), 4 << 20);
    let back = disk.read(0, IoBuf::zeroed(4 << 20)).await.unwrap();
    assert!(back[..] == content[..], "remote read differs");

    let hole = disk.block_status(1 << 20, 1 << 20).await.unwrap();
    assert!(hole.status.zero && !hole.status.data, "{hole:?}");
    let data = disk.block_status(0, 1 << 20).await.unwrap();
    assert!(data.status.data, "{data:?}");

    disk.write(
        4096,
        IoBuf::from_slice(&[0x5a; 8192]),
        WriteFlags {
            fua: true,
            ..WriteFlags::default()
        },
    )
    .await
    .unwrap();
    disk.write_zeroes(
        3 << 20,
        65536,
        ZeroFlags {
            may_unmap: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    disk.flush().await.unwrap();
    let on_disk = std::fs::read(&image).unwrap();
    assert_eq!(&on_disk[4096..4096 + 8192], &[0x5a; 8192]);
    assert!(on_disk[3 << 20..(3 << 20) + 65536].iter().all(|b| *b == 0));

    let e = disk.read(4 << 20, IoBuf::zeroed(512)).await.unwrap_err();
    assert_eq!(e.kind(), block::ErrorKind::OutOfBounds);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_writes_to_a_qemu_storage_daemon_export() {
    let dir = tempfile::tempdir().unwrap();
    let (source, target) = (dir.path().join("src.img"), dir.path().join("tgt.img"));
    let mut content = Rng(6).bytes(6 << 20);
    content[2 << 20..3 << 20].fill(0);
    std::fs::write(&source, &content).unwrap();
    std::fs::File::create(&target)
        .unwrap()
        .set_len(6 << 20)
        .unwrap();
    let socket = dir.path().join("qsd.sock");
    let _peer = Peer(
        Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=f,filename={}",
                target.display()
            ))
            .args(["--blockdev", "driver=raw,node-name=t,file=f"])
            .arg("--nbd-server")
            .arg(format!("addr.type=unix,addr.path={}", socket.display()))
            .args([
                "--export",
                "type=nbd,id=e,node-name=t,name=backup,writable=on",
            ])
            .stderr(Stdio::null())
            .spawn()
            .expect("qemu-storage-daemon is required"),
    );
    wait_for(&socket);
    let graph = graph();
    add(
        &graph,
        json!({"driver":"raw","node-name":"src","file":{"driver":"file","filename":source}}),
    )
    .await;
    add(
        &graph,
        json!({"driver":"raw","node-name":"remote",
        "file":{"driver":"nbd","server":{"type":"unix","path":socket},"export":"backup"}}),
    )
    .await;
    let registry = JobRegistry::new();
    let mut events = registry.subscribe();
    let (_job, _) = start_backup(
        &graph,
        &registry,
        "src",
        "remote",
        BackupOptions::new("push"),
    )
    .await
    .unwrap();
    loop {
        match events.recv().await.unwrap() {
            JobEvent::Completed { error, .. } => assert_eq!(error, None),
            JobEvent::StatusChange {
                status: JobStatus::Null,
                ..
            } => break,
            _ => {}
        }
    }
    let compare = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .args([&source, &target])
        .output()
        .unwrap();
    assert!(
        compare.status.success(),
        "{}",
        String::from_utf8_lossy(&compare.stdout)
    );

    let e = graph
        .add(
            BlockdevOptions::from_json(json!({"driver":"nbd","node-name":"x",
            "server":{"type":"unix","path":socket},"export":"nosuch"}))
            .unwrap(),
        )
        .await
        .unwrap_err();
    assert!(e.to_string().contains("nosuch"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_client_and_server_agree_including_split_reads() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    let content = Rng(7).bytes(40 << 20);
    std::fs::write(&image, &content).unwrap();
    let local = NodeGraph::new();
    local
        .add(
            BlockdevOptions::from_json(json!({"driver":"raw","node-name":"disk",
            "file":{"driver":"file","filename":image}}))
            .unwrap(),
        )
        .await
        .unwrap();
    let server = nbd::NbdServer::new();
    let disk = local
        .attach("disk", AttachUser::Other("export".into()))
        .unwrap();
    server
        .add_export(nbd::Export {
            name: "d".into(),
            description: String::new(),
            disk,
            writable: false,
            bitmaps: Vec::new(),
        })
        .unwrap();
    let socket = dir.path().join("ours.sock");
    let serving = tokio::spawn(server.serve_unix(tokio::net::UnixListener::bind(&socket).unwrap()));
    let graph = graph();
    add(&graph, json!({"driver":"nbd","node-name":"remote","server":{"type":"unix","path":socket},"export":"d"})).await;
    let remote = graph
        .attach("remote", AttachUser::Other("test".into()))
        .unwrap();
    let back = remote.read(0, IoBuf::zeroed(40 << 20)).await.unwrap();
    assert!(
        back[..] == content[..],
        "a 40 MiB read split into 32 MiB requests"
    );
    let e = remote
        .write(0, IoBuf::zeroed(512), WriteFlags::default())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), block::ErrorKind::PermissionDenied);
    serving.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inet_addresses_reach_qemu_nbd_over_tcp() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    let content = Rng(8).bytes(1 << 20);
    std::fs::write(&image, &content).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let _peer = Peer(
        Command::new("qemu-nbd")
            .args([
                "-f",
                "raw",
                "-b",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-x",
                "tcp",
                "-r",
            ])
            .arg(&image)
            .stderr(Stdio::null())
            .spawn()
            .expect("qemu-nbd is required"),
    );
    let graph = graph();
    let options = json!({"driver":"nbd","node-name":"remote","export":"tcp",
        "server":{"type":"inet","host":"127.0.0.1","port":port.to_string()}});
    let mut opened = None;
    for _ in 0..200 {
        match graph
            .add(BlockdevOptions::from_json(options.clone()).unwrap())
            .await
        {
            Ok(node) => {
                opened = Some(node);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    let node = opened.expect("qemu-nbd never accepted a connection");
    let back = node.read(0, IoBuf::zeroed(1 << 20)).await.unwrap();
    assert!(back[..] == content[..]);
    let e = node
        .write(0, IoBuf::zeroed(512), WriteFlags::default())
        .await
        .unwrap_err();
    assert_eq!(
        e.kind(),
        block::ErrorKind::PermissionDenied,
        "qemu-nbd -r exports read-only"
    );
}

#[tokio::test]
async fn a_server_that_never_answers_the_handshake_fails_the_connect_in_time() {
    // It accepts (the kernel queues the connection) and never says a word: without a
    // limit, blockdev-add of such a node held the node graph, and the daemon's
    // shutdown, forever.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("silent.sock");
    let _silent = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let address = block::options::SocketAddress::Unix(path);
    let started = std::time::Instant::now();
    let limit = Duration::from_millis(300);
    let err = match nbd::client::NbdClient::connect_within(&address, "x", limit).await {
        Ok(_) => panic!("connected to a server that never answered"),
        Err(e) => e.to_string(),
    };
    assert!(started.elapsed() < Duration::from_secs(5), "{err}");
    assert!(
        err.contains("no answer to the handshake within 0.3 s") && err.contains("silent.sock"),
        "{err}"
    );
}
