//! A backup runs while qemu-io writes through our NBD export of the source: the target
//! equals the source as it was when the backup started (qemu-img compare), and the
//! source has every write.

use std::process::Command;
use std::sync::Arc;

use block::AttachUser;
use block::BlockdevOptions;
use block::NodeGraph;
use jobs::BackupOptions;
use jobs::JobEvent;
use jobs::JobRegistry;
use jobs::JobStatus;
use jobs::start_backup;
use nbd::Export;
use nbd::NbdServer;
use serde_json::json;
use testkit::Rng;

const SIZE: u64 = 8 << 20;

fn output_text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_under_qemu_io_writes_through_the_export_keeps_its_point_in_time() {
    let dir = tempfile::tempdir().unwrap();
    let (source, target, snapshot) = (
        dir.path().join("src.img"),
        dir.path().join("tgt.img"),
        dir.path().join("snap.img"),
    );
    std::fs::write(&source, Rng(3).bytes(SIZE as usize)).unwrap();
    std::fs::copy(&source, &snapshot).unwrap();
    std::fs::File::create(&target)
        .unwrap()
        .set_len(SIZE)
        .unwrap();

    let graph = Arc::new(NodeGraph::new());
    for (name, path) in [("src", &source), ("tgt", &target)] {
        let options = json!({"driver":"raw","node-name":name,"discard":"unmap",
            "file":{"driver":"file","filename":path}});
        graph
            .add(BlockdevOptions::from_json(options).unwrap())
            .await
            .unwrap();
    }
    let server = NbdServer::new();
    let disk = graph
        .attach("src", AttachUser::Other("NBD export 'disk'".into()))
        .unwrap();
    server
        .add_export(Export {
            name: "disk".into(),
            description: String::new(),
            disk,
            writable: true,
            bitmaps: Vec::new(),
        })
        .unwrap();
    let socket = dir.path().join("nbd.sock");
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    let serving = tokio::spawn(server.serve_unix(listener));

    let registry = JobRegistry::new();
    let mut events = registry.subscribe();
    let mut options = BackupOptions::new("backup");
    options.job.speed = 4 << 20; // slow enough that the writes race the copy
    let (job, _) = start_backup(&graph, &registry, "src", "tgt", options)
        .await
        .unwrap();

    let uri = format!("nbd+unix:///disk?socket={}", socket.display());
    let writes = [
        "write -P 0x11 1M 64k",
        "write -P 0x22 5M 512k",
        "write -z 3M 1M",
        "discard 7M 256k",
        "write -P 0x33 100k 8k",
        "write -P 0x44 8323072 65536",
        "write -P 0x55 4095 2",
    ];
    let io = {
        let uri = uri.clone();
        tokio::task::spawn_blocking(move || {
            let mut cmd = Command::new("qemu-io");
            cmd.args(["-f", "raw"]);
            for w in writes {
                cmd.args(["-c", w]);
            }
            cmd.arg(&uri).output().expect("qemu-io is required")
        })
        .await
        .unwrap()
    };
    assert!(io.status.success(), "{}", output_text(&io));
    assert!(
        job.progress().0 < SIZE,
        "the writes must land while the backup still runs"
    );
    job.set_speed(0).unwrap();
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
        .args([&snapshot, &target])
        .output()
        .unwrap();
    assert!(
        compare.status.success(),
        "target differs from the snapshot: {}",
        output_text(&compare)
    );

    let verify = Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-r",
            "-c",
            "read -P 0x22 5M 512k",
            "-c",
            "read -P 0 3M 1M",
            "-c",
            "read -P 0x55 4095 2",
        ])
        .arg(&source)
        .output()
        .unwrap();
    let said = output_text(&verify);
    assert!(
        verify.status.success() && !said.contains("verification failed"),
        "{said}"
    );
    serving.abort();
}
