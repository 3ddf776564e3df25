//! Fuzzes the NBD server with arbitrary client bytes: negotiation and transmission
//! (request parser, option parser) must never panic, whatever arrives.
//!
//! Run on stable: `cargo fuzz run nbd_server -s none -- -max_total_time=60`
//! (from this folder's parent; installs with `cargo install cargo-fuzz`).

#![no_main]

use std::sync::OnceLock;

use block::AttachUser;
use block::BlockdevOptions;
use block::NodeGraph;
use libfuzzer_sys::fuzz_target;
use nbd::Export;
use nbd::NbdServer;
use tokio::io::AsyncReadExt;
use tokio::io::AsyncWriteExt;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap())
}

fuzz_target!(|data: &[u8]| {
    runtime().block_on(async {
        let graph = NodeGraph::new();
        let options = BlockdevOptions::from_json(serde_json::json!(
            {"driver":"null-co","node-name":"n","size":1048576,"read-zeroes":true})).unwrap();
        graph.add(options).await.unwrap();
        let disk = graph.attach("n", AttachUser::Other("fuzz".into())).unwrap();
        let server = NbdServer::new();
        server.add_export(Export { name: String::new(), description: String::new(), disk, writable: true, bitmaps: Vec::new() }).unwrap();
        let (client, server_side) = tokio::io::duplex(1 << 20);
        let serving = tokio::spawn(server.serve_connection(server_side));
        let (mut rd, mut wr) = tokio::io::split(client);
        let _ = wr.write_all(data).await;
        let _ = wr.shutdown().await;
        let mut sink = Vec::new();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), rd.read_to_end(&mut sink)).await;
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), serving).await;
    });
});
