//! The server against hand-written clients: the protocol's happy path, and bad input
//! of every kind, each answered by the spec or a clean close while another client keeps
//! being served.

use nbd::proto::*;
use tokio::io::AsyncReadExt;
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;

mod common;

use common::*;

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
