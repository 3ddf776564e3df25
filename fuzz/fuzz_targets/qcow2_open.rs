//! Fuzzes opening and using a qcow2 image: whatever the bytes, opening must fail with
//! an error or succeed, and reads, block status, writes and close must never panic,
//! hang or allocate without bound.
//!
//! Seed it with a real image, e.g. `qemu-img create -f qcow2 -o cluster_size=4k s 1M`
//! and a few `qemu-io -c 'write ...'`, then (from this folder's parent):
//! `cargo fuzz run qcow2_open -s none fuzz/corpus/qcow2_open -- -max_total_time=60`

#![no_main]

use std::sync::OnceLock;

use block::AttachUser;
use block::BlockdevOptions;
use block::IoBuf;
use block::NodeGraph;
use block::WriteFlags;
use block::ZeroFlags;
use libfuzzer_sys::fuzz_target;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap())
}

fn image_path() -> std::path::PathBuf {
    let dir = if std::path::Path::new("/dev/shm").is_dir() { "/dev/shm" } else { "/tmp" };
    std::path::PathBuf::from(format!("{dir}/stillpoint-fuzz-{}.qcow2", std::process::id()))
}

async fn exercise(path: &std::path::Path, writable: bool) {
    let graph = NodeGraph::new();
    let options = BlockdevOptions::from_json(serde_json::json!({
        "driver": "qcow2", "node-name": "q", "read-only": !writable,
        // No backing file: the header may name anything on this machine.
        "backing": null,
        "file": {"driver": "file", "filename": path.to_str().unwrap()},
    }))
    .unwrap();
    if graph.add(options).await.is_err() {
        return;
    }
    let node = graph.attach("q", AttachUser::Other("fuzz".into())).unwrap();
    let len = node.length();
    let mut at = 0;
    for _ in 0..64 {
        if at >= len {
            break;
        }
        match node.block_status(at, (len - at).min(1 << 30)).await {
            Ok(extent) => at += extent.length,
            Err(_) => break,
        }
    }
    for offset in [0, len / 3, len.saturating_sub(70_000)] {
        let n = (len - offset.min(len)).min(65536 + 4096) as usize;
        if n > 0 {
            let _ = node.read(offset, IoBuf::zeroed(n)).await;
        }
    }
    if writable && len > 8192 {
        let _ = node.write(1000, IoBuf::from_slice(&[7; 5000]), WriteFlags::default()).await;
        let _ = node.write_zeroes(len / 2 & !4095, 4096, ZeroFlags::default()).await;
        let _ = node.flush().await;
    }
    drop(node);
    let _ = graph.remove("q").await;
}

fuzz_target!(|data: &[u8]| {
    let path = image_path();
    std::fs::write(&path, data).unwrap();
    runtime().block_on(async {
        exercise(&path, false).await;
        exercise(&path, true).await;
    });
    let _ = std::fs::remove_file(&path);
});
