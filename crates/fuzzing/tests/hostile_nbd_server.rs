//! The NBD client against a scripted, hostile server: every bad reply fails its
//! request (and the connection) with an error, no request ever hangs, no reply makes
//! the client panic or hold unbounded memory, and a read never succeeds with bytes the
//! server did not send.

use std::time::Duration;

use block::BlockDriver;
use block::ErrorKind;
use block::IoBuf;
use nbd::client::NbdClient;
use nbd::client::NbdDriver;
use nbd::proto::*;
use tokio::io::AsyncReadExt;
use tokio::io::AsyncWriteExt;
use tokio::io::DuplexStream;

const SIZE: u64 = fuzzing::CLIENT_EXPORT_SIZE;
/// A guard for waits that must end.
const HANG: Duration = Duration::from_secs(20);

async fn next_request(s: &mut DuplexStream) -> Option<Request> {
    let mut header = [0u8; REQUEST_LEN];
    s.read_exact(&mut header).await.ok()?;
    Request::parse(&header).ok()
}

/// A client driver whose server answers the first request with `reply(request)` and
/// then keeps reading requests without answering them.
async fn against(
    reply: impl FnOnce(&Request) -> Vec<u8> + Send + 'static,
) -> (NbdDriver, tokio::task::JoinHandle<()>) {
    let (client_end, mut server_end) = tokio::io::duplex(1 << 16);
    let server = tokio::spawn(async move {
        fuzzing::negotiate_as_server(&mut server_end).await.unwrap();
        let Some(request) = next_request(&mut server_end).await else {
            return;
        };
        let bytes = reply(&request);
        if server_end.write_all(&bytes).await.is_err() {
            return;
        }
        while next_request(&mut server_end).await.is_some() {}
    });
    let client = NbdClient::over(client_end, "").await.unwrap();
    (NbdDriver::new(client), server)
}

fn data_chunk(cookie: u64, offset: u64, data: &[u8], done: bool) -> Vec<u8> {
    let flags = if done { REPLY_FLAG_DONE } else { 0 };
    let mut out = chunk_header(flags, REPLY_TYPE_OFFSET_DATA, cookie, 8 + data.len() as u32);
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// A read of 4 KiB at 0 must fail with EIO, and so must the next request, both
/// promptly.
async fn read_fails_then_connection_is_gone(driver: &NbdDriver) {
    let first = tokio::time::timeout(HANG, driver.read(0, IoBuf::zeroed(4096)))
        .await
        .expect("the read hung");
    let err = first.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Io, "{err}");
    let second = tokio::time::timeout(HANG, driver.read(0, IoBuf::zeroed(512)))
        .await
        .expect("a later request hung");
    assert!(second.is_err());
}

#[tokio::test]
async fn a_data_chunk_whose_offset_wraps_fails_the_read_without_a_panic_or_a_hang() {
    let (driver, _server) =
        against(|r| data_chunk(r.cookie, u64::MAX - 3, &[0xee; 512], true)).await;
    read_fails_then_connection_is_gone(&driver).await;
}

#[tokio::test]
async fn a_hole_chunk_past_the_request_fails_the_read() {
    let (driver, _server) = against(|r| {
        let mut out = chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_HOLE, r.cookie, 12);
        out.extend_from_slice(&4000u64.to_be_bytes());
        out.extend_from_slice(&u32::MAX.to_be_bytes());
        out
    })
    .await;
    read_fails_then_connection_is_gone(&driver).await;
}

#[tokio::test]
async fn a_read_reply_that_leaves_bytes_unsent_is_not_a_success() {
    let (driver, _server) = against(|r| {
        let mut out = data_chunk(r.cookie, 0, &[0x11; 2048], false);
        out.extend(chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_NONE, r.cookie, 0));
        out
    })
    .await;
    read_fails_then_connection_is_gone(&driver).await;
}

#[tokio::test]
async fn overlapping_read_chunks_are_refused() {
    let (driver, _server) = against(|r| {
        let mut out = data_chunk(r.cookie, 0, &[0x11; 3072], false);
        out.extend(data_chunk(r.cookie, 2048, &[0x22; 2048], true));
        out
    })
    .await;
    read_fails_then_connection_is_gone(&driver).await;
}

#[tokio::test]
async fn a_simple_reply_to_a_read_after_structured_replies_is_refused() {
    let (driver, _server) = against(|r| simple_reply(0, r.cookie)).await;
    read_fails_then_connection_is_gone(&driver).await;
}

#[tokio::test]
async fn a_reply_to_a_cookie_never_sent_closes_the_connection() {
    let (driver, _server) = against(|r| data_chunk(r.cookie + 77, 0, &[0; 4096], true)).await;
    read_fails_then_connection_is_gone(&driver).await;
}

#[tokio::test]
async fn a_complete_read_in_two_chunks_and_a_hole_succeeds() {
    let (driver, _server) = against(|r| {
        let mut out = data_chunk(r.cookie, 1024, &[0x22; 1024], false);
        let mut hole = chunk_header(0, REPLY_TYPE_OFFSET_HOLE, r.cookie, 12);
        hole.extend_from_slice(&2048u64.to_be_bytes());
        hole.extend_from_slice(&2048u32.to_be_bytes());
        out.extend(hole);
        out.extend(data_chunk(r.cookie, 0, &[0x11; 1024], true));
        out
    })
    .await;
    let buf = tokio::time::timeout(HANG, driver.read(0, IoBuf::from_slice(&[0xff; 4096])))
        .await
        .unwrap()
        .unwrap();
    assert!(buf[..1024].iter().all(|&b| b == 0x11));
    assert!(buf[1024..2048].iter().all(|&b| b == 0x22));
    assert!(buf[2048..].iter().all(|&b| b == 0));
}

/// The most resident memory this process has had, in bytes (the extents are freed
/// when the request completes, so only the peak shows what was kept).
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib << 10
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_block_status_extents_is_not_kept() {
    // 16 chunks of a million extents each (128 MiB of extents), then the end.
    const CHUNKS: usize = 16;
    const PER_CHUNK: usize = 1 << 20;
    let (client_end, mut server_end) = tokio::io::duplex(1 << 20);
    let server = tokio::spawn(async move {
        fuzzing::negotiate_as_server(&mut server_end).await.unwrap();
        let request = next_request(&mut server_end).await.unwrap();
        let mut body = vec![0u8; 4 + 8 * PER_CHUNK];
        body[..4].copy_from_slice(&1u32.to_be_bytes());
        for extent in body[4..].chunks_exact_mut(8) {
            extent[..4].copy_from_slice(&512u32.to_be_bytes());
        }
        for i in 0..CHUNKS {
            let flags = if i + 1 == CHUNKS { REPLY_FLAG_DONE } else { 0 };
            let head = chunk_header(
                flags,
                REPLY_TYPE_BLOCK_STATUS,
                request.cookie,
                body.len() as u32,
            );
            server_end.write_all(&head).await.unwrap();
            server_end.write_all(&body).await.unwrap();
        }
        while next_request(&mut server_end).await.is_some() {}
    });
    let driver = NbdDriver::new(NbdClient::over(client_end, "").await.unwrap());
    let before = peak_rss();
    let extent = tokio::time::timeout(HANG, driver.block_status(0, SIZE))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(extent.length, 512);
    let grown = peak_rss().saturating_sub(before);
    // The server's own 8 MiB chunk buffer is in this process too.
    assert!(
        grown < 48 << 20,
        "the client kept {} MiB of block-status extents",
        grown >> 20
    );
    drop(driver);
    server.abort();
}
