//! What the NBD server tests share: a rig serving a small file, and a hand-written
//! client that speaks the protocol byte by byte (so tests can also misbehave).

#![allow(dead_code)] // each test file uses a different part

use block::AttachUser;
use block::BlockdevOptions;
use block::NodeGraph;
use nbd::Export;
use nbd::NbdServer;
use nbd::proto::*;
use serde_json::json;
use tokio::io::AsyncReadExt;
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;

pub const SIZE: u64 = 1 << 20;

pub struct Rig {
    pub _dir: tempfile::TempDir,
    pub socket: std::path::PathBuf,
    pub _graph: NodeGraph,
}

/// A server with a writable export "disk" (a 1 MiB file) and a read-only "ro" of it.
pub async fn rig() -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(SIZE)
        .unwrap();
    let node = json!({"driver":"raw","node-name":"disk","discard":"unmap",
        "file":{"driver":"file","filename":image}});
    let exports = [("disk", true), ("ro", false)];
    serve(dir, nbd::ServerLimits::default(), node, &exports)
        .await
        .0
}

/// A server with `limits` exporting one node made from `node` (blockdev-add JSON) as
/// "disk", on a UNIX socket in a temp dir.
pub async fn serve_one(
    limits: nbd::ServerLimits,
    node: serde_json::Value,
    writable: bool,
) -> (Rig, std::sync::Arc<NbdServer>) {
    let dir = tempfile::tempdir().unwrap();
    serve(dir, limits, node, &[("disk", writable)]).await
}

/// A server with `limits` exporting the node made from `node` under each of `exports`
/// (name, writable), listening on `nbd.sock` in `dir`.
async fn serve(
    dir: tempfile::TempDir,
    limits: nbd::ServerLimits,
    node: serde_json::Value,
    exports: &[(&str, bool)],
) -> (Rig, std::sync::Arc<NbdServer>) {
    let graph = NodeGraph::new();
    let node_name = node["node-name"].as_str().unwrap().to_string();
    graph
        .add(BlockdevOptions::from_json(node).unwrap())
        .await
        .unwrap();
    let server = NbdServer::with_limits(limits);
    for &(name, writable) in exports {
        let disk = graph
            .attach(&node_name, AttachUser::Other(format!("export {name}")))
            .unwrap();
        server
            .add_export(Export {
                name: name.into(),
                description: "test".into(),
                disk,
                writable,
                bitmaps: Vec::new(),
            })
            .unwrap();
    }
    let socket = dir.path().join("nbd.sock");
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    tokio::spawn(server.clone().serve_unix(listener));
    let rig = Rig {
        _dir: dir,
        socket,
        _graph: graph,
    };
    (rig, server)
}

pub struct Client {
    pub stream: UnixStream,
}

impl Client {
    /// Connects and completes the greeting (fixed newstyle, no zeroes).
    pub async fn connect(rig: &Rig) -> Client {
        let mut stream = UnixStream::connect(&rig.socket).await.unwrap();
        assert_eq!(stream.read_u64().await.unwrap(), NBDMAGIC);
        assert_eq!(stream.read_u64().await.unwrap(), IHAVEOPT);
        assert_eq!(
            stream.read_u16().await.unwrap(),
            FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES
        );
        stream
            .write_u32(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES)
            .await
            .unwrap();
        Client { stream }
    }

    pub async fn option(&mut self, option: u32, data: &[u8]) {
        self.stream.write_u64(IHAVEOPT).await.unwrap();
        self.stream.write_u32(option).await.unwrap();
        self.stream.write_u32(data.len() as u32).await.unwrap();
        self.stream.write_all(data).await.unwrap();
    }

    /// Reads one option reply: (type, data).
    pub async fn reply(&mut self) -> (u32, Vec<u8>) {
        assert_eq!(self.stream.read_u64().await.unwrap(), OPT_REPLY_MAGIC);
        let _option = self.stream.read_u32().await.unwrap();
        let kind = self.stream.read_u32().await.unwrap();
        let len = self.stream.read_u32().await.unwrap();
        let mut data = vec![0; len as usize];
        self.stream.read_exact(&mut data).await.unwrap();
        (kind, data)
    }

    /// Replies up to and including ACK or an error.
    pub async fn replies(&mut self) -> Vec<(u32, Vec<u8>)> {
        let mut out = Vec::new();
        loop {
            let reply = self.reply().await;
            let last = reply.0 == REP_ACK || reply.0 & (1 << 31) != 0;
            out.push(reply);
            if last {
                return out;
            }
        }
    }

    /// STRUCTURED_REPLY (optionally), SET_META_CONTEXT base:allocation, GO `name`.
    pub async fn go(rig: &Rig, name: &str, structured: bool) -> Client {
        let mut client = Client::connect(rig).await;
        if structured {
            client.option(OPT_STRUCTURED_REPLY, &[]).await;
            assert_eq!(client.replies().await.last().unwrap().0, REP_ACK);
            let mut data = (name.len() as u32).to_be_bytes().to_vec();
            data.extend_from_slice(name.as_bytes());
            data.extend_from_slice(&1u32.to_be_bytes());
            data.extend_from_slice(&15u32.to_be_bytes());
            data.extend_from_slice(b"base:allocation");
            client.option(OPT_SET_META_CONTEXT, &data).await;
            let replies = client.replies().await;
            assert_eq!(replies[0].0, REP_META_CONTEXT);
            assert_eq!(&replies[0].1[4..], b"base:allocation");
        }
        let mut data = (name.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(name.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        client.option(OPT_GO, &data).await;
        let replies = client.replies().await;
        assert_eq!(replies.last().unwrap().0, REP_ACK, "{replies:?}");
        client
    }

    pub async fn send(
        &mut self,
        command: u16,
        flags: u16,
        cookie: u64,
        offset: u64,
        length: u32,
        data: &[u8],
    ) {
        let request = Request {
            flags,
            command,
            cookie,
            offset,
            length,
        };
        self.stream.write_all(&request.encode()).await.unwrap();
        self.stream.write_all(data).await.unwrap();
    }

    /// Reads a simple reply: (error, cookie).
    pub async fn simple(&mut self) -> (u32, u64) {
        assert_eq!(self.stream.read_u32().await.unwrap(), SIMPLE_REPLY_MAGIC);
        (
            self.stream.read_u32().await.unwrap(),
            self.stream.read_u64().await.unwrap(),
        )
    }

    /// Reads a structured chunk: (flags, type, cookie, payload).
    pub async fn chunk(&mut self) -> (u16, u16, u64, Vec<u8>) {
        assert_eq!(
            self.stream.read_u32().await.unwrap(),
            STRUCTURED_REPLY_MAGIC
        );
        let flags = self.stream.read_u16().await.unwrap();
        let kind = self.stream.read_u16().await.unwrap();
        let cookie = self.stream.read_u64().await.unwrap();
        let len = self.stream.read_u32().await.unwrap();
        let mut data = vec![0; len as usize];
        self.stream.read_exact(&mut data).await.unwrap();
        (flags, kind, cookie, data)
    }

    /// True when the server has closed the connection.
    pub async fn closed(&mut self) -> bool {
        let mut byte = [0u8; 1];
        matches!(self.stream.read(&mut byte).await, Ok(0) | Err(_))
    }
}
