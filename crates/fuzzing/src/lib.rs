//! Fuzz harnesses: one function per parser of untrusted bytes, each taking the bytes
//! and returning normally whatever they are. A panic, a hang or unbounded memory is a
//! bug in the code under test (or an invariant the harness checks failing).
//!
//! | target | the untrusted bytes |
//! |---|---|
//! | `nbd_server` | an NBD client's stream: negotiation, then requests |
//! | `nbd_client_replies` | an NBD server's replies to the client driver's requests (after a valid negotiation) |
//! | `qcow2_open` | a qcow2 image, opened read-only and read-write, read, written, flushed |
//! | `qcow2_bitmap_directory` | a qcow2 bitmap directory: parsed, size-checked, re-encoded |
//! | `qmp` | a QMP client's stream: the decoder, then command dispatch |
//! | `blockdev_options` | `blockdev-add` options, as QEMU's dotted key=value text and as JSON |
//! | `repo_files` | repository objects: pack indexes, snapshot manifests, stored chunks (the harness seals its input with a valid digest, so the parsers behind the checksums are reached) |
//! | `held_journal` | a journal of held guest writes: raw bytes, and journals the writer makes from the input's operations (syncs included), then cut, flipped or zeroed as a power loss would at a point the input picks (the reader's held set must match a model of the operations; damage before a sync is refused) |
//!
//! Two users: the `cargo fuzz` targets under `fuzz/` (one line each, run by
//! `scripts/fuzz.sh` with libFuzzer and AddressSanitizer), and the replay test of this
//! crate, which runs every committed seed (`fuzz/corpus/TARGET/`) and every saved
//! crash (`fuzz/regressions/TARGET/`) through the same functions in an ordinary test
//! build, so a crash found once stays fixed.
//!
//! The QMP harness runs commands against a fresh in-memory daemon, and never the ones
//! that reach the host: a message naming a file, socket or address anywhere in its
//! arguments, `blockdev-create`, `nbd-server-start` and `quit` are skipped (the
//! decoder and the argument checks still see them).

use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::time::Duration;

use block::AttachUser;
use block::BlockDriver;
use block::BlockdevOptions;
use block::IoBuf;
use block::NodeGraph;
use block::WriteFlags;
use block::ZeroFlags;
use nbd::proto::*;
use serde_json::Value;
use tokio::io::AsyncReadExt;
use tokio::io::AsyncWriteExt;

/// A harness: takes one input, returns normally whatever it is.
pub type Harness = fn(&[u8]);

/// Every harness, by target name.
pub const TARGETS: &[(&str, Harness)] = &[
    ("nbd_server", nbd_server),
    ("nbd_client_replies", nbd_client_replies),
    ("qcow2_open", qcow2_open),
    ("qcow2_bitmap_directory", qcow2_bitmap_directory),
    ("qmp", qmp),
    ("blockdev_options", blockdev_options),
    ("repo_files", repo_files),
    ("held_journal", held_journal),
];

/// A fresh single-threaded runtime per input: whatever an input leaves running (a
/// job, a connection task) ends with it.
fn run<F: Future<Output = ()>>(work: F) {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
        .block_on(work);
}

/// Upper bound on one input's work; a slow input ends early, a hang is caught by the
/// fuzzer's own timeout.
const INPUT_TIME: Duration = Duration::from_secs(3);

/// The NBD server with `data` as everything a client sends.
pub fn nbd_server(data: &[u8]) {
    run(async {
        let graph = NodeGraph::new();
        let options = BlockdevOptions::from_json(serde_json::json!(
            {"driver": "null-co", "node-name": "n", "size": 1048576, "read-zeroes": true}))
        .expect("valid options");
        graph.add(options).await.expect("a null node");
        let disk = graph
            .attach("n", AttachUser::Other("fuzz".into()))
            .expect("an attachment");
        let server = nbd::NbdServer::new();
        server
            .add_export(nbd::Export {
                name: String::new(),
                description: String::new(),
                disk,
                writable: true,
                bitmaps: Vec::new(),
            })
            .expect("a fresh export");
        let (client, server_side) = tokio::io::duplex(1 << 20);
        let serving = tokio::spawn(server.serve_connection(server_side));
        let (mut rd, mut wr) = tokio::io::split(client);
        let _ = wr.write_all(data).await;
        let _ = wr.shutdown().await;
        let mut sink = Vec::new();
        let _ = tokio::time::timeout(INPUT_TIME, rd.read_to_end(&mut sink)).await;
        let _ = tokio::time::timeout(INPUT_TIME, serving).await;
    });
}

/// Export size the scripted server of [`nbd_client_replies`] announces.
pub const CLIENT_EXPORT_SIZE: u64 = 1 << 20;

/// The server side of a valid fixed-newstyle negotiation: structured replies,
/// `base:allocation` (context id 1), GO of a writable export of
/// [`CLIENT_EXPORT_SIZE`] bytes. Scripted servers (this crate's hostile-server tests)
/// start with it.
pub async fn negotiate_as_server(s: &mut tokio::io::DuplexStream) -> std::io::Result<()> {
    s.write_u64(NBDMAGIC).await?;
    s.write_u64(IHAVEOPT).await?;
    s.write_u16(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).await?;
    s.read_u32().await?;
    loop {
        if s.read_u64().await? != IHAVEOPT {
            return Err(std::io::ErrorKind::InvalidData.into());
        }
        let option = s.read_u32().await?;
        let len = s.read_u32().await?;
        let mut data = vec![0; len.min(1 << 16) as usize];
        s.read_exact(&mut data).await?;
        if option == OPT_SET_META_CONTEXT {
            let mut payload = 1u32.to_be_bytes().to_vec();
            payload.extend_from_slice(b"base:allocation");
            s.write_all(&option_reply(
                option,
                REP_META_CONTEXT,
                payload.len() as u32,
            ))
            .await?;
            s.write_all(&payload).await?;
        }
        if option == OPT_GO {
            let mut info = INFO_EXPORT.to_be_bytes().to_vec();
            info.extend_from_slice(&CLIENT_EXPORT_SIZE.to_be_bytes());
            let flags =
                TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA | TF_SEND_TRIM | TF_SEND_WRITE_ZEROES;
            info.extend_from_slice(&flags.to_be_bytes());
            s.write_all(&option_reply(option, REP_INFO, info.len() as u32))
                .await?;
            s.write_all(&info).await?;
        }
        s.write_all(&option_reply(option, REP_ACK, 0)).await?;
        if option == OPT_GO {
            return Ok(());
        }
    }
}

/// The NBD client driver, with `data` as everything the server sends after a valid
/// negotiation. The client's requests get cookies 1, 2, 3... in this order: a read of
/// 4 KiB at 0, a read of 64 KiB at 64 KiB, block status at 0, a write of 4 KiB at 8 KiB,
/// a flush; all in flight at once.
pub fn nbd_client_replies(data: &[u8]) {
    run(async {
        let (client_end, mut server_end) = tokio::io::duplex(1 << 20);
        let replies = data.to_vec();
        let server = tokio::spawn(async move {
            if negotiate_as_server(&mut server_end).await.is_err() {
                return;
            }
            let _ = server_end.write_all(&replies).await;
            // Then the server hangs up: whatever was not answered fails.
            let _ = server_end.shutdown().await;
            let mut sink = [0u8; 1 << 16];
            while matches!(server_end.read(&mut sink).await, Ok(n) if n > 0) {}
        });
        let Ok(Ok(client)) =
            tokio::time::timeout(INPUT_TIME, nbd::client::NbdClient::over(client_end, "")).await
        else {
            return;
        };
        let driver = nbd::client::NbdDriver::new(client);
        let requests = async {
            let read = driver.read(0, IoBuf::zeroed(4096));
            let read_big = driver.read(65536, IoBuf::zeroed(65536));
            let status = driver.block_status(0, CLIENT_EXPORT_SIZE);
            let write = driver.write(8192, IoBuf::from_slice(&[9; 4096]), WriteFlags::default());
            let flush = driver.flush();
            let (read, read_big, status, _, _) = tokio::join!(read, read_big, status, write, flush);
            // A successful read has exactly the length asked for.
            if let Ok(buf) = read {
                assert_eq!(buf.len(), 4096);
            }
            if let Ok(buf) = read_big {
                assert_eq!(buf.len(), 65536);
            }
            if let Ok(extent) = status {
                assert!(extent.length >= 1 && extent.length <= CLIENT_EXPORT_SIZE);
            }
        };
        let _ = tokio::time::timeout(INPUT_TIME, requests).await;
        drop(driver);
        let _ = tokio::time::timeout(INPUT_TIME, server).await;
    });
}

/// A path for one qcow2 input, unique in the process (the replay test and the fuzzer
/// write one image at a time, but tests run in parallel threads under `cargo test`).
fn scratch_image() -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let dir = if std::path::Path::new("/dev/shm").is_dir() {
        "/dev/shm"
    } else {
        "/tmp"
    };
    PathBuf::from(format!(
        "{dir}/stillpoint-fuzz-{}-{}.qcow2",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
}

async fn exercise_qcow2(path: &std::path::Path, writable: bool) {
    let graph = NodeGraph::new();
    let options = BlockdevOptions::from_json(serde_json::json!({
        "driver": "qcow2", "node-name": "q", "read-only": !writable,
        // No backing file: the header may name anything on this machine.
        "backing": null,
        "file": {"driver": "file", "filename": path.to_str().expect("a UTF-8 path")},
    }))
    .expect("valid options");
    if graph.add(options).await.is_err() {
        return;
    }
    let node = graph
        .attach("q", AttachUser::Other("fuzz".into()))
        .expect("an attachment");
    let len = node.length();
    let mut at = 0;
    for _ in 0..64 {
        if at >= len {
            break;
        }
        match node.block_status(at, (len - at).min(1 << 30)).await {
            Ok(extent) => {
                assert!(extent.length > 0, "block status made no progress at {at}");
                at += extent.length;
            }
            Err(_) => break,
        }
    }
    for offset in [0, len / 3, len.saturating_sub(70_000)] {
        let n = (len - offset.min(len)).min(65536 + 4096) as usize;
        if n > 0
            && let Ok(buf) = node.read(offset, IoBuf::zeroed(n)).await
        {
            assert_eq!(buf.len(), n);
        }
    }
    if writable && len > 8192 {
        let _ = node
            .write(1000, IoBuf::from_slice(&[7; 5000]), WriteFlags::default())
            .await;
        let _ = node
            .write_zeroes((len / 2) & !4095, 4096, ZeroFlags::default())
            .await;
        let _ = node.flush().await;
    }
    drop(node);
    let _ = graph.remove("q").await;
}

/// A qcow2 image of `data`: opened read-only and read-write, read, written, flushed.
pub fn qcow2_open(data: &[u8]) {
    let path = scratch_image();
    std::fs::write(&path, data).expect("a scratch file");
    run(async {
        let work = async {
            exercise_qcow2(&path, false).await;
            exercise_qcow2(&path, true).await;
        };
        let _ = tokio::time::timeout(INPUT_TIME * 2, work).await;
    });
    let _ = std::fs::remove_file(&path);
}

/// A raw image's sidecar bitmap file (`block::drivers::sidecar_bitmaps`), for an image
/// of the size its header names: what parses re-encodes to a file that parses the same.
pub fn sidecar_bitmaps(data: &[u8]) {
    use block::drivers::sidecar_bitmaps::decode;
    use block::drivers::sidecar_bitmaps::encode;
    let Some(size) = data.get(12..20) else {
        return;
    };
    let size = u64::from_le_bytes(size.try_into().unwrap());
    let path = std::path::Path::new("fuzz.stillpoint-bitmaps");
    let Ok(bitmaps) = decode(path, data, size) else {
        return;
    };
    let again = decode(path, &encode(size, &bitmaps), size)
        .expect("our own encoding of a parsed file parses");
    assert_eq!(again.len(), bitmaps.len());
    for (a, b) in again.iter().zip(&bitmaps) {
        assert_eq!(
            (&a.name, a.recording, a.inconsistent, a.bits.serialize()),
            (&b.name, b.recording, b.inconsistent, b.bits.serialize())
        );
    }
}

/// A qcow2 bitmap directory: the first two bytes (LE) are the number of entries the
/// header would claim, the rest the directory. What parses must pass or fail the size
/// check without allocating, and re-encode to a directory that parses the same.
pub fn qcow2_bitmap_directory(data: &[u8]) {
    use block::drivers::qcow2::bitmaps;
    let Some((count, dir)) = data.split_first_chunk::<2>() else {
        return;
    };
    let nb = u32::from(u16::from_le_bytes(*count));
    let Ok(entries) = bitmaps::parse_directory(dir, nb) else {
        return;
    };
    let again = bitmaps::parse_directory(&bitmaps::encode_directory(&entries), nb)
        .expect("our own encoding of a parsed directory parses");
    let fields = |e: &bitmaps::Entry| {
        (
            e.table_offset,
            e.table_size,
            e.flags,
            e.granularity_bits,
            e.name.clone(),
        )
    };
    assert_eq!(
        entries.iter().map(fields).collect::<Vec<_>>(),
        again.iter().map(fields).collect::<Vec<_>>()
    );
    for e in &entries {
        // A 1 TiB disk with 64 KiB clusters: some entries fit, some are refused.
        if bitmaps::check_size(e, 1 << 40, 65536).is_ok() {
            let granularity = 1u64 << e.granularity_bits;
            let mut bits = bitmap::Bitmap::new(1 << 20, granularity).expect("a small bitmap");
            bitmaps::decode_into(&mut bits, dir, u64::from(e.table_size) % 64);
            bitmaps::set_granules(&mut bits, e.table_offset % 4096, u64::from(e.flags));
        }
    }
}

/// QMP commands the harness never runs (they reach the host).
const HOST_COMMANDS: &[&str] = &["blockdev-create", "nbd-server-start", "quit"];
/// Argument names that point at the host: files, sockets, addresses.
const HOST_KEYS: &[&str] = &["filename", "server", "path", "addr", "host", "dir"];

/// Whether a message names something on the host anywhere (see the module note).
fn reaches_host(value: &Value) -> bool {
    match value {
        Value::Object(map) => map.iter().any(|(key, v)| {
            HOST_KEYS.iter().any(|k| key.contains(k))
                || (key == "execute" && v.as_str().is_some_and(|c| HOST_COMMANDS.contains(&c)))
                || reaches_host(v)
        }),
        Value::Array(items) => items.iter().any(reaches_host),
        // Keyval forms inside strings ("file.filename=...") count too.
        Value::String(text) => HOST_KEYS.iter().any(|k| text.contains(k)),
        _ => false,
    }
}

/// A QMP client's stream (in two reads, split where the first byte says), decoded and
/// dispatched to a fresh daemon. Every reply is a `return` or an `error` object.
pub fn qmp(data: &[u8]) {
    run(async {
        let daemon = qmp::Daemon::new();
        let work = async {
            let mut decoder = qmp::wire::Decoder::default();
            let mut session = qmp::server::Session::default();
            let split = data.first().map_or(0, |&b| usize::from(b) % data.len());
            for piece in [&data[..split], &data[split..]] {
                decoder.feed(piece);
                while let Some(incoming) = decoder.next_message() {
                    if let qmp::wire::Incoming::Value(message) = &incoming
                        && reaches_host(message)
                    {
                        continue;
                    }
                    let reply = qmp::server::respond(&daemon, &mut session, incoming).await;
                    assert!(
                        reply.get("return").is_some() ^ reply.get("error").is_some(),
                        "a reply is a return or an error: {reply}"
                    );
                }
            }
        };
        let _ = tokio::time::timeout(INPUT_TIME, work).await;
        let _ = tokio::time::timeout(INPUT_TIME, daemon.shutdown()).await;
    });
}

/// `blockdev-add` options: QEMU's dotted key=value text, and JSON.
pub fn blockdev_options(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = BlockdevOptions::from_keyval(text);
        let _ = block::qapi::parse_keyval(text, Some("driver"));
    }
    if let Ok(value) = serde_json::from_slice::<Value>(data) {
        let _ = BlockdevOptions::from_json(value);
    }
}

/// Repository objects. The first byte picks the parser; the rest is the object, sealed
/// by the harness with the digest its format wants (so the fuzzer does not have to
/// forge BLAKE3 to reach the fields behind it), then parsed. Whatever parses must
/// re-encode to the same bytes.
pub fn repo_files(data: &[u8]) {
    use repo::format;
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    // The JSON lists a collection and a verify keep (first byte 0xF0 and up; one
    // format for both): what parses must name only well-formed pack ids and encode
    // back to a list that parses.
    if which >= 0xF0 {
        use repo::repository::pack_list::decode_pack_list;
        if let Ok(list) = decode_pack_list("fuzz", body) {
            assert!(list.packs.iter().all(|p| p.len() == 64));
            let again = serde_json::to_vec(&list).expect("serializes");
            assert_eq!(decode_pack_list("fuzz", &again).ok(), Some(list));
        }
        return;
    }
    match which % 4 {
        // An index (object, or a pack's tail): count and entries, then length,
        // digest and magic.
        0 | 1 => {
            let mut sealed = body.to_vec();
            sealed.extend_from_slice(&(body.len() as u32).to_le_bytes());
            sealed.extend_from_slice(blake3::hash(body).as_bytes());
            sealed.extend_from_slice(b"SPIX");
            let blobs_end = (which % 4 == 1).then(|| 5 + u64::from(which));
            let _ = format::decode_index("fuzz", &sealed, blobs_end);
            let _ = format::pack_tail("fuzz", body, None);
            let _ = format::decode_index("fuzz", body, None);
        }
        // A manifest: magic, version, header length, header, chunk table; then digest.
        2 => {
            let mut sealed = body.to_vec();
            let digest = blake3::hash(&sealed);
            sealed.extend_from_slice(digest.as_bytes());
            let id = repo::hex::hex(&digest.as_bytes()[..8]);
            if let Ok((info, chunks)) = format::decode_manifest("fuzz", &id, &sealed) {
                let (again, bytes) = format::encode_manifest(&info, &chunks);
                let (info2, chunks2) = format::decode_manifest("fuzz", &again, &bytes)
                    .expect("a manifest we encode parses");
                assert_eq!((info2.disk, chunks2), (info.disk, chunks));
            }
        }
        // A stored chunk: zstd or plain bytes claiming some plain length, whole or a
        // delta.
        _ => {
            let raw_len = body.first().map_or(0, |&b| u32::from(b) << 12);
            let blob = format::BlobRef {
                offset: 5,
                stored_len: body.len() as u32,
                raw_len,
                codec: if which & 4 == 0 {
                    format::Compression::Zstd
                } else {
                    format::Compression::None
                },
                // Bit 3: a delta (its header and runs come from the body), over a
                // base of the claimed length.
                base: (which & 8 != 0).then(|| format::ChunkId::of(b"base")),
            };
            let id = format::ChunkId::of(body);
            if blob.base.is_some() {
                let base = vec![0xa5; raw_len as usize];
                let mut out = vec![0; raw_len as usize];
                let mut stored = body.to_vec();
                let _ = format::decode_delta_into(
                    "fuzz",
                    None,
                    &id,
                    &blob,
                    &mut stored,
                    Some(&base),
                    &mut out,
                );
            } else {
                let _ = format::decode_blob("fuzz", None, &id, &blob, body);
            }
        }
    }
}

/// The journal of held guest writes (`block::held_journal`). Bytes 0..2 pick a damage
/// point and kind; the rest, 4 bytes per operation, drive the writer over a 1 MiB node
/// (write `count` blocks of one byte value, release `count` blocks at their current or
/// a stale sequence, empty it when nothing is held, or sync it). The journal read back
/// must give exactly the model's held blocks. Then the same bytes, damaged, must read
/// without a panic and never invent data (every block read back was written with that
/// value at some point), and:
/// * a byte flipped before the last sync's mark is refused as damage, one flipped
///   after it is not (it is an unsynced tail);
/// * cut anywhere past the last sync, or with a page past it zeroed (what a power
///   loss may do), the journal reads as the held set at some moment since that sync.
///
/// Raw input bytes go through the reader too.
pub fn held_journal(data: &[u8]) {
    use block::held_journal::BLOCK;
    use block::held_journal::HeldJournal;
    use block::held_journal::journal_path;
    use block::held_journal::parse;
    use std::collections::BTreeMap;
    use std::collections::BTreeSet;

    let _ = parse(data);
    let Some((damage, ops)) = data.split_at_checked(2) else {
        return;
    };
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "stillpoint-fuzz-held-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).expect("a temp dir");
    let image = dir.join("disk");
    const NODE: u64 = 1 << 20;
    const HEADER: usize = 64;
    let mut journal = HeldJournal::create(&image, "raw", NODE).expect("a new journal");
    // Block -> (sequence, byte value); every (block, value) ever written.
    let mut model: BTreeMap<u64, (u64, u8)> = BTreeMap::new();
    let mut ever: BTreeSet<(u64, u8)> = BTreeSet::new();
    let view = |m: &BTreeMap<u64, (u64, u8)>| -> BTreeMap<u64, u8> {
        m.iter().map(|(&b, &(_, v))| (b, v)).collect()
    };
    // The journal's length when the last sync returned (where its mark is), and the
    // held sets since then.
    let mut durable = HEADER;
    let mut since_sync = vec![BTreeMap::new()];
    let mut seq = 0u64;
    for op in ops.chunks_exact(4) {
        let block = u64::from(op[1]) * BLOCK;
        let count = 1 + u64::from(op[2] % 8).min((NODE - block) / BLOCK - 1);
        match op[0] % 6 {
            0..=2 => {
                let data = vec![op[3]; (count * BLOCK) as usize];
                journal.append_write(block, seq + 1, &data).expect("append");
                for i in 0..count {
                    model.insert(block + i * BLOCK, (seq + 1 + i, op[3]));
                    ever.insert((block + i * BLOCK, op[3]));
                }
                seq += count;
            }
            3 => {
                let stale = u64::from(op[3] % 3);
                let seqs: Vec<u64> = (0..count)
                    .map(|i| {
                        model
                            .get(&(block + i * BLOCK))
                            .map_or(0, |m| m.0)
                            .saturating_sub(stale.min(1))
                    })
                    .collect();
                journal.append_release(block, &seqs).expect("append");
                for (i, s) in seqs.iter().enumerate() {
                    let at = block + i as u64 * BLOCK;
                    if model.get(&at).is_some_and(|m| m.0 == *s) {
                        model.remove(&at);
                    }
                }
            }
            4 => {
                // As the engine does: only a journal holding nothing is emptied.
                // The file then holds only what follows (how a power loss treats an
                // unsynced truncation is the filesystem's and is not modelled).
                if model.is_empty() {
                    journal.clear().expect("clear");
                    durable = HEADER;
                    since_sync = vec![BTreeMap::new()];
                }
                continue;
            }
            _ => {
                let before = journal.len() as usize;
                journal.sync().expect("sync");
                if journal.len() as usize > before {
                    durable = before;
                    since_sync = vec![view(&model)];
                }
                continue;
            }
        }
        since_sync.push(view(&model));
    }
    let path = journal_path(&image);
    let bytes = std::fs::read(&path).expect("the journal reads");
    let _ = std::fs::remove_dir_all(&dir);
    let read = parse(&bytes)
        .expect("a journal we wrote parses")
        .expect("not blank");
    assert_eq!(read.torn_bytes, 0);
    let blocks_of = |read: &block::held_journal::Pending| -> BTreeMap<u64, u8> {
        let mut got = BTreeMap::new();
        for (start, run) in &read.runs {
            for (i, block) in run.chunks(BLOCK as usize).enumerate() {
                let at = start + i as u64 * BLOCK;
                assert!(
                    ever.contains(&(at, block[0])) && block.iter().all(|&b| b == block[0]),
                    "a journal must never invent data (block {at})"
                );
                got.insert(at, block[0]);
            }
        }
        got
    };
    assert_eq!(
        blocks_of(&read),
        view(&model),
        "the journal gives back the held set"
    );

    let point = usize::from(u16::from_le_bytes([damage[0], damage[1]])) % (bytes.len() + 1);
    let mut damaged = bytes.clone();
    match damage[0] % 3 {
        0 => {
            damaged.truncate(point);
            if let Ok(Some(read)) = parse(&damaged) {
                blocks_of(&read);
            }
        }
        1 if point < damaged.len() => {
            damaged[point] ^= 1 << (damage[1] % 8);
            let parsed = parse(&damaged);
            if (HEADER..durable).contains(&point) {
                assert!(
                    parsed.is_err(),
                    "damage to synced bytes (at {point}) is refused"
                );
            } else if point >= durable {
                let read = parsed.expect("an unsynced tail's damage is no error");
                blocks_of(&read.expect("a header"));
            }
        }
        1 => {}
        _ => {
            // A power loss: every byte up to the last sync stays; past it, the file may
            // be cut, and a page written since may read as zeros.
            let tail = damaged.len() - durable;
            let page = (durable + point % (tail + 1)) / BLOCK as usize * BLOCK as usize;
            let to = (page + BLOCK as usize).min(damaged.len());
            damaged[page.max(durable)..to].fill(0);
            damaged.truncate(durable + usize::from(damage[1]) * 97 % (tail + 1));
            let read = parse(&damaged)
                .expect("a power loss is no damage")
                .expect("a header");
            let got = blocks_of(&read);
            assert!(
                since_sync.contains(&got),
                "after a power loss the journal reads {got:?}, no moment since the last sync"
            );
        }
    }
}
