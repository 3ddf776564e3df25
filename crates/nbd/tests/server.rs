//! The server against hand-written clients: the protocol's happy path, and bad input
//! of every kind, each answered by the spec or a clean close while another client keeps
//! being served.

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

const SIZE: u64 = 1 << 20;

struct Rig {
    _dir: tempfile::TempDir,
    socket: std::path::PathBuf,
    _graph: NodeGraph,
}

/// A server with a writable export "disk" (a 1 MiB file) and a read-only "ro".
async fn rig() -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(SIZE)
        .unwrap();
    let graph = NodeGraph::new();
    graph
        .add(
            BlockdevOptions::from_json(json!({"driver":"raw","node-name":"disk","discard":"unmap",
                "file":{"driver":"file","filename":image}}))
            .unwrap(),
        )
        .await
        .unwrap();
    let server = NbdServer::new();
    for (name, writable) in [("disk", true), ("ro", false)] {
        let disk = graph
            .attach("disk", AttachUser::Other(format!("export {name}")))
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
    tokio::spawn(server.serve_unix(listener));
    Rig {
        _dir: dir,
        socket,
        _graph: graph,
    }
}

struct Client {
    stream: UnixStream,
}

impl Client {
    /// Connects and completes the greeting (fixed newstyle, no zeroes).
    async fn connect(rig: &Rig) -> Client {
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

    async fn option(&mut self, option: u32, data: &[u8]) {
        self.stream.write_u64(IHAVEOPT).await.unwrap();
        self.stream.write_u32(option).await.unwrap();
        self.stream.write_u32(data.len() as u32).await.unwrap();
        self.stream.write_all(data).await.unwrap();
    }

    /// Reads one option reply: (type, data).
    async fn reply(&mut self) -> (u32, Vec<u8>) {
        assert_eq!(self.stream.read_u64().await.unwrap(), OPT_REPLY_MAGIC);
        let _option = self.stream.read_u32().await.unwrap();
        let kind = self.stream.read_u32().await.unwrap();
        let len = self.stream.read_u32().await.unwrap();
        let mut data = vec![0; len as usize];
        self.stream.read_exact(&mut data).await.unwrap();
        (kind, data)
    }

    /// Replies up to and including ACK or an error.
    async fn replies(&mut self) -> Vec<(u32, Vec<u8>)> {
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
    async fn go(rig: &Rig, name: &str, structured: bool) -> Client {
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

    async fn send(
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
    async fn simple(&mut self) -> (u32, u64) {
        assert_eq!(self.stream.read_u32().await.unwrap(), SIMPLE_REPLY_MAGIC);
        (
            self.stream.read_u32().await.unwrap(),
            self.stream.read_u64().await.unwrap(),
        )
    }

    /// Reads a structured chunk: (flags, type, cookie, payload).
    async fn chunk(&mut self) -> (u16, u16, u64, Vec<u8>) {
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
    async fn closed(&mut self) -> bool {
        let mut byte = [0u8; 1];
        matches!(self.stream.read(&mut byte).await, Ok(0) | Err(_))
    }
}

/// A second client doing a write and a read, to show the server still serves.
async fn still_serves(rig: &Rig) {
    let mut client = Client::go(rig, "disk", false).await;
    client.send(CMD_WRITE, 0, 1, 8192, 4, b"live").await;
    assert_eq!(client.simple().await, (0, 1));
    client.send(CMD_READ, 0, 2, 8192, 4, &[]).await;
    assert_eq!(client.simple().await, (0, 2));
    let mut data = [0u8; 4];
    client.stream.read_exact(&mut data).await.unwrap();
    assert_eq!(&data, b"live");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_all_answered_by_cookie() {
    let rig = rig().await;
    let mut client = Client::go(&rig, "disk", true).await;
    for i in 0..32u64 {
        client
            .send(
                CMD_WRITE,
                CMD_FLAG_FUA,
                100 + i,
                i * 4096,
                4096,
                &[i as u8; 4096],
            )
            .await;
    }
    let mut seen = Vec::new();
    for _ in 0..32 {
        let (error, cookie) = client.simple().await;
        assert_eq!(error, 0);
        seen.push(cookie);
    }
    seen.sort_unstable();
    assert_eq!(seen, (100..132).collect::<Vec<_>>());
    for i in 0..32u64 {
        client.send(CMD_READ, 0, i, i * 4096, 4096, &[]).await;
    }
    for _ in 0..32 {
        let (flags, kind, cookie, data) = client.chunk().await;
        assert_eq!((flags, kind), (REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA));
        assert_eq!(
            u64::from_be_bytes(data[..8].try_into().unwrap()),
            cookie * 4096
        );
        assert!(
            data[8..].iter().all(|b| *b == cookie as u8),
            "cookie {cookie}"
        );
    }
    client
        .send(CMD_BLOCK_STATUS, 0, 7, 0, SIZE as u32, &[])
        .await;
    let (flags, kind, cookie, data) = client.chunk().await;
    assert_eq!(
        (flags, kind, cookie),
        (REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, 7)
    );
    assert_eq!(
        u32::from_be_bytes(data[..4].try_into().unwrap()),
        1,
        "context id"
    );
    let first = (
        u32::from_be_bytes(data[4..8].try_into().unwrap()),
        u32::from_be_bytes(data[8..12].try_into().unwrap()),
    );
    assert_eq!(first, (32 * 4096, 0), "written data first");
    client.send(CMD_DISC, 0, 0, 0, 0, &[]).await;
    assert!(client.closed().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_the_specs_errors() {
    let rig = rig().await;
    let mut client = Client::go(&rig, "disk", false).await;
    let cases: [(u16, u16, u64, u32, u32); 8] = [
        (CMD_READ, 0, 0, 0, errno::EINVAL),               // zero length
        (CMD_READ, 0, 0, u32::MAX, errno::EINVAL),        // 4 GiB
        (CMD_READ, 0, SIZE, 512, errno::EINVAL),          // past the end
        (CMD_READ, 0, u64::MAX - 10, 512, errno::EINVAL), // overflowing offset
        (CMD_TRIM, 0, SIZE - 512, 1024, errno::EINVAL),   // trim past the end
        (99, 0, 0, 512, errno::EINVAL),                   // unknown command
        (CMD_READ, 1 << 9, 0, 512, errno::EINVAL),        // unknown flag
        (CMD_BLOCK_STATUS, 0, 0, 512, errno::EINVAL),     // no context negotiated
    ];
    for (i, (command, flags, offset, length, expected)) in cases.into_iter().enumerate() {
        client
            .send(command, flags, i as u64, offset, length, &[])
            .await;
        assert_eq!(client.simple().await, (expected, i as u64), "case {i}");
    }
    client.send(CMD_WRITE, 0, 50, SIZE - 2, 4, b"abcd").await;
    assert_eq!(
        client.simple().await,
        (errno::ENOSPC, 50),
        "write past the end"
    );

    let mut ro = Client::go(&rig, "ro", false).await;
    ro.send(CMD_WRITE, 0, 1, 0, 4, b"nope").await;
    assert_eq!(ro.simple().await, (errno::EPERM, 1));
    ro.send(CMD_WRITE_ZEROES, 0, 2, 0, 512, &[]).await;
    assert_eq!(ro.simple().await, (errno::EPERM, 2));
    still_serves(&rig).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_streams_close_only_their_connection() {
    let rig = rig().await;

    // A truncated greeting reply.
    let mut stream = UnixStream::connect(&rig.socket).await.unwrap();
    stream.write_all(&[0, 0]).await.unwrap();
    drop(stream);

    // Unknown client flags.
    let mut stream = UnixStream::connect(&rig.socket).await.unwrap();
    let mut hello = [0u8; 18];
    stream.read_exact(&mut hello).await.unwrap();
    stream
        .write_u32(1 << 7 | CLIENT_FIXED_NEWSTYLE)
        .await
        .unwrap();
    let mut client = Client { stream };
    assert!(client.closed().await);

    // A wrong option magic.
    let mut client = Client::connect(&rig).await;
    // The server may close as soon as it has read the bad magic, so a failed write
    // is fine; what matters is that the connection ends.
    let mut bad = 0xdead_beef_u64.to_be_bytes().to_vec();
    bad.extend_from_slice(&[0; 8]);
    let _ = client.stream.write_all(&bad).await;
    assert!(client.closed().await);

    // An unknown option is refused, negotiation goes on; unknown export, then LIST.
    let mut client = Client::connect(&rig).await;
    client.option(42, b"").await;
    assert_eq!(client.replies().await[0].0, REP_ERR_UNSUP);
    let mut data = 5u32.to_be_bytes().to_vec();
    data.extend_from_slice(b"nosuc");
    data.extend_from_slice(&0u16.to_be_bytes());
    client.option(OPT_INFO, &data).await;
    assert_eq!(client.replies().await[0].0, REP_ERR_UNKNOWN);
    client.option(OPT_GO, &[0, 0, 0]).await; // truncated GO data
    assert_eq!(client.replies().await[0].0, REP_ERR_INVALID);
    client.option(OPT_LIST, &[]).await;
    let names: Vec<Vec<u8>> = client
        .replies()
        .await
        .into_iter()
        .filter(|r| r.0 == REP_SERVER)
        .map(|r| r.1[4..].to_vec())
        .collect();
    assert_eq!(names, [b"disk".to_vec(), b"ro".to_vec()]);
    client.option(OPT_EXPORT_NAME, b"nosuch").await;
    assert!(
        client.closed().await,
        "EXPORT_NAME of an unknown export closes"
    );

    // An oversized option.
    let mut client = Client::connect(&rig).await;
    client.stream.write_u64(IHAVEOPT).await.unwrap();
    client.stream.write_u32(OPT_GO).await.unwrap();
    client.stream.write_u32(1 << 30).await.unwrap();
    assert_eq!(client.reply().await.0, REP_ERR_TOO_BIG);
    assert!(client.closed().await);

    // A bad request magic in transmission.
    let mut client = Client::go(&rig, "disk", false).await;
    client.stream.write_all(&[0xff; REQUEST_LEN]).await.unwrap();
    assert!(client.closed().await);

    // A write announcing more than the maximum payload.
    let mut client = Client::go(&rig, "disk", false).await;
    client.send(CMD_WRITE, 0, 1, 0, MAX_PAYLOAD + 1, &[]).await;
    assert!(client.closed().await);

    // A client that disconnects in the middle of a write payload.
    let mut client = Client::go(&rig, "disk", false).await;
    client.send(CMD_WRITE, 0, 1, 0, 65536, &[1; 1000]).await;
    drop(client);

    still_serves(&rig).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_name_negotiation_and_zero_padding() {
    let rig = rig().await;
    let mut stream = UnixStream::connect(&rig.socket).await.unwrap();
    let mut hello = [0u8; 18];
    stream.read_exact(&mut hello).await.unwrap();
    stream.write_u32(CLIENT_FIXED_NEWSTYLE).await.unwrap(); // zeroes wanted
    let mut client = Client { stream };
    client.option(OPT_EXPORT_NAME, b"ro").await;
    assert_eq!(client.stream.read_u64().await.unwrap(), SIZE);
    let flags = client.stream.read_u16().await.unwrap();
    assert_ne!(flags & TF_READ_ONLY, 0);
    let mut zeros = [1u8; 124];
    client.stream.read_exact(&mut zeros).await.unwrap();
    assert_eq!(zeros, [0; 124]);
    client.send(CMD_FLUSH, 0, 9, 0, 0, &[]).await;
    assert_eq!(client.simple().await, (0, 9));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_an_export_waits_for_running_requests_then_refuses_more() {
    let dir = tempfile::tempdir().unwrap();
    let graph = NodeGraph::new();
    graph
        .add(
            BlockdevOptions::from_json(json!({"driver":"null-co","node-name":"slow","size":SIZE,
                "read-zeroes":true,"latency-ns":300_000_000u64}))
            .unwrap(),
        )
        .await
        .unwrap();
    let server = NbdServer::new();
    let disk = graph
        .attach("slow", AttachUser::Other("export".into()))
        .unwrap();
    server
        .add_export(Export {
            name: "slow".into(),
            description: String::new(),
            disk,
            writable: false,
            bitmaps: Vec::new(),
        })
        .unwrap();
    let socket = dir.path().join("nbd.sock");
    tokio::spawn(
        server
            .clone()
            .serve_unix(tokio::net::UnixListener::bind(&socket).unwrap()),
    );
    let rig = Rig {
        _dir: dir,
        socket,
        _graph: graph,
    };

    let mut client = Client::go(&rig, "slow", false).await;
    client.send(CMD_READ, 0, 1, 0, 512, &[]).await;
    tokio::time::sleep(std::time::Duration::from_millis(150)).await; // the read is running (300 ms)
    let removal = tokio::spawn({
        let server = server.clone();
        async move { server.remove_export("slow").await }
    });
    assert_eq!(
        client.simple().await,
        (0, 1),
        "the running read still answers"
    );
    let mut data = [1u8; 512];
    client.stream.read_exact(&mut data).await.unwrap();
    assert!(
        removal.await.unwrap(),
        "removal returns once the read has answered"
    );
    client.send(CMD_READ, 0, 2, 0, 512, &[]).await;
    assert_eq!(client.simple().await, (errno::ESHUTDOWN, 2));
    assert!(client.closed().await);

    let mut late = Client::connect(&rig).await;
    let mut go = 4u32.to_be_bytes().to_vec();
    go.extend_from_slice(b"slow");
    go.extend_from_slice(&0u16.to_be_bytes());
    late.option(OPT_GO, &go).await;
    assert_eq!(late.replies().await[0].0, REP_ERR_UNKNOWN);
    assert!(!server.remove_export("slow").await);
}
