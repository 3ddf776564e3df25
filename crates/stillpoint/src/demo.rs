//! `stillpoint demo`: a live backup, end to end, on a sample disk.
//!
//! It creates a sample disk (random data, zeros and holes) in a temp dir (or `--dir`),
//! starts the daemon's machinery in process with an NBD export of the disk on a UNIX
//! socket, starts a throttled backup through the daemon's `blockdev-backup`, and while
//! it runs writes to the disk *through NBD* (our client, over the socket). Afterwards it
//! checks that the backup equals the disk as it was when the backup started and that
//! the disk holds every write, prints a short report, and removes what it made. It exits
//! non-zero when a check fails.

use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use anyhow::bail;
use block::IoBuf;
use block::WriteFlags;
use block::options::SocketAddress;
use jobs::JobEvent;
use jobs::JobStatus;
use nbd::client::NbdClient;
use nbd::client::NbdDriver;
use qmp::Daemon;
use serde_json::json;
use testkit::Rng;

const MIB: u64 = 1 << 20;

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    if a.len() != b.len() {
        return Some(a.len().min(b.len()));
    }
    a.iter().zip(b).position(|(x, y)| x != y)
}

/// Runs the demo on a disk of `size_mib` MiB.
pub async fn run(dir: Option<PathBuf>, size_mib: u64, seed: u64) -> anyhow::Result<()> {
    use block::node::driver::BlockDriver as _;
    let size = size_mib.max(8) * MIB;
    let temp = match &dir {
        Some(parent) => tempfile::Builder::new()
            .prefix("stillpoint-demo-")
            .tempdir_in(parent),
        None => tempfile::Builder::new()
            .prefix("stillpoint-demo-")
            .tempdir(),
    }
    .context("cannot create the demo directory")?;
    let (disk, backup, socket) = (
        temp.path().join("disk.img"),
        temp.path().join("backup.img"),
        temp.path().join("nbd.sock"),
    );

    // A sample disk: per 4 MiB, 2 MiB of random data, 1 MiB of zeros, 1 MiB of hole.
    let mut rng = Rng(seed);
    let file = std::fs::File::create(&disk)?;
    file.set_len(size)?;
    let mut chunk = vec![0u8; 2 * MIB as usize];
    for segment in 0..size / (4 * MIB) {
        chunk.iter_mut().for_each(|b| *b = rng.next_u64() as u8);
        file.write_all_at(&chunk, segment * 4 * MIB)?;
        file.write_all_at(&vec![0; MIB as usize], segment * 4 * MIB + 2 * MIB)?;
    }
    file.sync_all()?;
    std::fs::File::create(&backup)?.set_len(size)?;
    let snapshot = std::fs::read(&disk)?;
    println!(
        "demo: {size_mib} MiB sample disk in {}",
        temp.path().display()
    );

    let daemon = Daemon::new();
    let run = |name: &'static str, args: serde_json::Value| {
        let daemon = daemon.clone();
        async move {
            daemon
                .execute(name, args)
                .await
                .map_err(|e| anyhow::anyhow!("{name}: {}", e.desc))
        }
    };
    run(
        "blockdev-add",
        json!({"driver":"raw","node-name":"disk","discard":"unmap",
        "file":{"driver":"file","filename":disk}}),
    )
    .await?;
    run(
        "blockdev-add",
        json!({"driver":"raw","node-name":"backup","discard":"unmap",
        "file":{"driver":"file","filename":backup}}),
    )
    .await?;
    run(
        "nbd-server-start",
        json!({"addr":{"type":"unix","data":{"path":socket}}}),
    )
    .await?;
    run(
        "block-export-add",
        json!({"type":"nbd","id":"exp0","node-name":"disk","name":"disk","writable":true}),
    )
    .await?;
    let guest =
        NbdDriver::new(NbdClient::connect(&SocketAddress::Unix(socket.clone()), "disk").await?);

    let mut events = daemon.jobs.subscribe();
    let started = Instant::now();
    // Throttled so the backup takes about two seconds and the writes race it.
    let speed = (size / 2).max(4 * MIB);
    run(
        "blockdev-backup",
        json!({"job-id":"demo","device":"disk","target":"backup",
        "sync":"full","speed":speed}),
    )
    .await?;
    let mut expected = snapshot.clone();
    let mut writes = 0u64;
    let mut written = 0u64;
    let mut outcome = None;
    let writer = Arc::new(guest);
    while outcome.is_none() {
        let len = 4096 * (1 + rng.next_u64() % 16);
        let offset = (rng.next_u64() % ((size - len) / 4096)) * 4096;
        let data: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
        writer
            .write(offset, IoBuf::from_slice(&data), WriteFlags::default())
            .await?;
        expected[offset as usize..(offset + len) as usize].copy_from_slice(&data);
        writes += 1;
        written += len;
        while let Ok(event) = events.try_recv() {
            match event {
                JobEvent::Completed { error, .. } => outcome = Some(error),
                JobEvent::StatusChange {
                    status: JobStatus::Null,
                    ..
                } if outcome.is_none() => {
                    outcome = Some(Some("the job ended without completing".into()));
                }
                _ => {}
            }
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    writer.flush().await?;
    // The guest leaves first: an export with a client connected is not removed.
    writer.close().await?;
    run("block-export-del", json!({"id":"exp0"})).await?;
    run("nbd-server-stop", json!({})).await?;
    daemon.shutdown().await;

    if let Some(Some(error)) = outcome {
        bail!("demo: the backup failed: {error}");
    }
    let backup_bytes = std::fs::read(&backup)?;
    let disk_bytes = std::fs::read(&disk)?;
    let backup_ok = first_difference(&backup_bytes, &snapshot);
    let disk_ok = first_difference(&disk_bytes, &expected);
    println!(
        "demo: backed up {size_mib} MiB in {seconds:.2} s ({:.1} MB/s, throttled to {} MiB/s)",
        size as f64 / 1e6 / seconds,
        speed / MIB
    );
    println!(
        "demo: {writes} guest writes ({} KiB) went through NBD while the backup ran",
        written / 1024
    );
    match (backup_ok, disk_ok) {
        (None, None) => {
            println!("demo: PASS: the backup equals the disk as it was when the backup started,");
            println!("demo:       and the disk holds every write made during the backup");
            Ok(())
        }
        (Some(at), _) => {
            bail!("demo: FAIL: the backup differs from the start-time disk at byte {at}")
        }
        (None, Some(at)) => bail!("demo: FAIL: the disk lost a write at byte {at}"),
    }
}
