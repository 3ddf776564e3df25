//! The bytes of repository objects (format version 1): chunk ids, blobs, packs with
//! their own index, and snapshot manifests. Every parser checks lengths and digests
//! before it trusts a field, so a damaged or hostile file is an error, never a panic
//! and never wrong data.

use serde::Deserialize;
use serde::Serialize;

use crate::crypto::Keys;
use crate::error::Error;
use crate::error::Result;
use crate::hex::hex;

/// The repository format this code writes and reads.
pub const FORMAT_VERSION: u32 = 1;

const PACK_MAGIC: &[u8; 4] = b"SPPK";
const INDEX_MAGIC: &[u8; 4] = b"SPIX";
const MANIFEST_MAGIC: &[u8; 4] = b"SPSN";
/// Ends a pack whose index is sealed: the sealed index, its length, this magic.
const SEALED_INDEX_MAGIC: &[u8; 4] = b"SPEX";
const INDEX_ENTRY: usize = 32 + 8 + 4 + 4 + 1;
/// A delta's index entry adds its base's id.
const DELTA_ENTRY_EXTRA: usize = 32;
/// The codec byte of an index entry: bit 0, a zstd frame; bit 1, a delta (the base's
/// id follows the byte).
const CODEC_ZSTD: u8 = 1;
const CODEC_DELTA: u8 = 2;

/// The longest chain of deltas: reading a chunk reads at most this many bases first.
/// Writers make a delta only of a base with a shorter chain; readers refuse a longer
/// one as damage (a loop in a hostile index ends here too).
pub const MAX_DELTA_DEPTH: usize = 4;

/// The most changed runs one delta holds (a chunk changed in more pieces is stored
/// whole): bounds the header a reader allocates for.
pub const MAX_DELTA_RUNS: usize = 128;

/// The largest chunk a repository holds (its largest chunk size).
pub const MAX_CHUNK: u64 = 4 << 20;

/// A chunk's id: the BLAKE3 digest of its plaintext. The all-zero id stands for an
/// all-zero chunk, which is never stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId(pub [u8; 32]);

impl ChunkId {
    /// The id of an all-zero chunk (a hole on restore).
    pub const ZERO: ChunkId = ChunkId([0; 32]);

    /// The id of `data`, or [`ChunkId::ZERO`] when every byte is zero.
    pub fn of(data: &[u8]) -> ChunkId {
        ChunkId::keyed(None, data)
    }

    /// The id of `data` in a repository with `keys` (keyed BLAKE3), or without.
    pub fn keyed(keys: Option<&Keys>, data: &[u8]) -> ChunkId {
        if is_zero(data) {
            ChunkId::ZERO
        } else if let Some(keys) = keys {
            ChunkId(keys.chunk_id(data))
        } else {
            ChunkId(*blake3::hash(data).as_bytes())
        }
    }

    /// Lower-case hex.
    pub fn hex(&self) -> String {
        hex(&self.0)
    }
}

/// Whether every byte is zero.
pub fn is_zero(data: &[u8]) -> bool {
    let words = data.chunks_exact(8);
    let tail = words.remainder();
    tail.iter().all(|&b| b == 0)
        && words
            .into_iter()
            .all(|w| u64::from_ne_bytes(w.try_into().unwrap()) == 0)
}

/// How a blob is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// Stored as it is.
    None,
    /// A zstd frame.
    Zstd,
}

/// Where a chunk is: its pack, and its stored bytes in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobRef {
    /// Offset of the stored bytes in the pack.
    pub offset: u64,
    /// Stored length.
    pub stored_len: u32,
    /// Plaintext length.
    pub raw_len: u32,
    /// How the bytes are stored.
    pub codec: Compression,
    /// For a delta, the chunk it changes: the blob holds only the changed runs
    /// ([`encode_delta`]), and the chunk is that base with them written over it.
    pub base: Option<ChunkId>,
}

/// Compresses `data` when that shrinks it.
pub fn encode_blob(data: &[u8], compression: Compression) -> (Vec<u8>, Compression) {
    if compression == Compression::Zstd
        && let Ok(packed) = zstd::bulk::compress(data, 1)
        && packed.len() < data.len()
    {
        return (packed, Compression::Zstd);
    }
    (data.to_vec(), Compression::None)
}

/// A delta: the chunk `data` is its base with `runs` (offset, length, sorted, apart)
/// changed, and every other byte as the base has it. Stored as the run count (u16),
/// each run's offset and length (u32 each), then the runs' bytes back to back, that
/// whole body compressed when that shrinks it. `None` when the runs are not a valid
/// set for `data` (unsorted, overlapping, empty, past its end, more than
/// [`MAX_DELTA_RUNS`]).
pub fn encode_delta(
    data: &[u8],
    runs: &[(u32, u32)],
    compression: Compression,
) -> Option<(Vec<u8>, Compression)> {
    if runs.is_empty() || runs.len() > MAX_DELTA_RUNS {
        return None;
    }
    let mut body = Vec::with_capacity(2 + 8 * runs.len());
    body.extend_from_slice(&(runs.len() as u16).to_le_bytes());
    let mut end = 0u64;
    for (n, &(at, len)) in runs.iter().enumerate() {
        let run_end = u64::from(at) + u64::from(len);
        if len == 0 || (n > 0 && u64::from(at) <= end) || run_end > data.len() as u64 {
            return None;
        }
        end = run_end;
        body.extend_from_slice(&at.to_le_bytes());
        body.extend_from_slice(&len.to_le_bytes());
    }
    for &(at, len) in runs {
        body.extend_from_slice(&data[at as usize..(at + len) as usize]);
    }
    Some(encode_blob(&body, compression))
}

/// The plaintext of a stored blob (opened first when `keys` is given), checked against
/// the id it is filed under.
pub fn decode_blob(
    key: &str,
    keys: Option<&Keys>,
    id: &ChunkId,
    blob: &BlobRef,
    stored: &[u8],
) -> Result<Vec<u8>> {
    // No chunk is larger than the largest chunk size: a bigger plain length is damage,
    // not a reason to allocate it.
    if u64::from(blob.raw_len) > MAX_CHUNK {
        return Err(Error::damaged(
            key,
            format!("chunk {} claims {} bytes", id.hex(), blob.raw_len),
        ));
    }
    let mut stored = stored.to_vec();
    let mut out = vec![0; blob.raw_len as usize];
    decode_blob_into(key, keys, id, blob, &mut stored, &mut out)?;
    Ok(out)
}

/// [`decode_blob`] into the chunk's place: `stored` is opened where it lies (so it is
/// changed) and the plaintext lands in `out`, which must be the chunk's length. No
/// allocation: what restore and large reads use. A delta needs its base: see
/// [`decode_delta_into`].
pub fn decode_blob_into(
    key: &str,
    keys: Option<&Keys>,
    id: &ChunkId,
    blob: &BlobRef,
    stored: &mut [u8],
    out: &mut [u8],
) -> Result<()> {
    decode_delta_into(key, keys, id, blob, stored, None, out)
}

/// [`decode_blob_into`] for any blob: a delta's `base` is its base chunk's plaintext
/// (read and checked by the caller), `None` for a whole blob.
pub fn decode_delta_into(
    key: &str,
    keys: Option<&Keys>,
    id: &ChunkId,
    blob: &BlobRef,
    stored: &mut [u8],
    base: Option<&[u8]>,
    out: &mut [u8],
) -> Result<()> {
    let stored: &[u8] = match keys {
        Some(keys) => keys.open_in_place(key, &id.0, stored)?,
        None => stored,
    };
    let bad = |why: String| Error::damaged(key, format!("chunk {} {why}", id.hex()));
    if out.len() != blob.raw_len as usize {
        return Err(bad(format!(
            "holds {} bytes where {} are wanted",
            blob.raw_len,
            out.len()
        )));
    }
    match (blob.base, base) {
        (None, None) => {}
        (Some(_), Some(base)) => {
            apply_delta(blob, stored, base, out).map_err(|why| bad(why.to_string()))?;
            if ChunkId::keyed(keys, out) != *id {
                return Err(bad("does not match its id".into()));
            }
            return Ok(());
        }
        (Some(b), None) => {
            return Err(Error::Invalid(format!(
                "chunk {} is a delta of chunk {}, which was not read",
                id.hex(),
                b.hex()
            )));
        }
        (None, Some(_)) => return Err(Error::Invalid(format!("chunk {} is no delta", id.hex()))),
    }
    match blob.codec {
        Compression::None if stored.len() == out.len() => out.copy_from_slice(stored),
        Compression::None => return Err(bad("does not match its id".into())),
        Compression::Zstd => match zstd::bulk::decompress_to_buffer(stored, out) {
            Ok(n) if n == out.len() => {}
            Ok(_) => return Err(bad("does not match its id".into())),
            Err(e) => return Err(bad(format!("does not decompress: {e}"))),
        },
    }
    if ChunkId::keyed(keys, out) != *id {
        return Err(bad("does not match its id".into()));
    }
    Ok(())
}

/// A delta's body (decompressed) written over its base into `out`.
fn apply_delta(
    blob: &BlobRef,
    stored: &[u8],
    base: &[u8],
    out: &mut [u8],
) -> std::result::Result<(), &'static str> {
    if base.len() != out.len() {
        return Err("is a delta of a chunk of another length");
    }
    let unpacked;
    let body: &[u8] = match blob.codec {
        Compression::None => stored,
        Compression::Zstd => {
            // The body is the runs' bytes (at most the chunk) and their header.
            let most = out.len() + 2 + 8 * MAX_DELTA_RUNS;
            unpacked = zstd::bulk::decompress(stored, most).map_err(|_| "does not decompress")?;
            &unpacked
        }
    };
    let count = body
        .get(..2)
        .map(|b| u16::from_le_bytes([b[0], b[1]]) as usize)
        .ok_or("has a truncated delta")?;
    if count == 0 || count > MAX_DELTA_RUNS || body.len() < 2 + 8 * count {
        return Err("has a bad delta header");
    }
    let (header, mut bytes) = body[2..].split_at(8 * count);
    out.copy_from_slice(base);
    let mut end = 0usize;
    for (n, run) in header.chunks_exact(8).enumerate() {
        let at = u32::from_le_bytes(run[..4].try_into().unwrap()) as usize;
        let len = u32::from_le_bytes(run[4..].try_into().unwrap()) as usize;
        if len == 0 || (n > 0 && at <= end) || at + len > out.len() || len > bytes.len() {
            return Err("has a bad delta run");
        }
        out[at..at + len].copy_from_slice(&bytes[..len]);
        bytes = &bytes[len..];
        end = at + len;
    }
    if !bytes.is_empty() {
        return Err("has bytes past its delta runs");
    }
    Ok(())
}

/// Builds one pack: blobs appended, then the index of what it holds.
#[derive(Debug, Default)]
pub struct PackBuilder {
    bytes: Vec<u8>,
    entries: Vec<(ChunkId, BlobRef)>,
}

impl PackBuilder {
    /// An empty pack.
    pub fn new() -> Self {
        Self::reusing(Vec::new())
    }

    /// The same blobs as `finished`, after `pad` zero bytes: the same content under
    /// another name (packs are named by their digest), for when that name is taken by
    /// a pack about to be deleted. Readers find blobs by their offsets, so the padding
    /// is never read.
    pub fn padded(finished: &FinishedPack, pad: usize) -> Self {
        let mut again = Self::new();
        again.bytes.resize(again.bytes.len() + pad, 0);
        for (id, blob) in &finished.entries {
            let at = blob.offset as usize;
            let stored = &finished.bytes[at..at + blob.stored_len as usize];
            again.add_blob(*id, stored, blob.raw_len, blob.codec, blob.base);
        }
        again
    }

    /// An empty pack in the buffer of a finished one: its pages are already mapped, so
    /// filling it again costs no page faults.
    pub fn reusing(mut bytes: Vec<u8>) -> Self {
        bytes.clear();
        bytes.extend_from_slice(PACK_MAGIC);
        bytes.push(FORMAT_VERSION as u8);
        Self {
            bytes,
            entries: Vec::new(),
        }
    }

    /// Appends a chunk's stored bytes.
    pub fn add(&mut self, id: ChunkId, stored: &[u8], raw_len: u32, codec: Compression) {
        self.add_blob(id, stored, raw_len, codec, None);
    }

    /// Appends a chunk's stored bytes, a delta of `base` when given ([`encode_delta`]).
    pub fn add_blob(
        &mut self,
        id: ChunkId,
        stored: &[u8],
        raw_len: u32,
        codec: Compression,
        base: Option<ChunkId>,
    ) {
        let blob = BlobRef {
            offset: self.bytes.len() as u64,
            stored_len: stored.len() as u32,
            raw_len,
            codec,
            base,
        };
        self.bytes.extend_from_slice(stored);
        self.entries.push((id, blob));
    }

    /// Bytes so far.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Whether no chunk was added.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The finished pack, with its id and index object.
    pub fn finish(mut self, keys: Option<&Keys>) -> FinishedPack {
        let mut index = encode_index(&self.entries);
        match keys {
            None => self.bytes.extend_from_slice(&index),
            Some(keys) => {
                index = keys.seal(b"index", &index);
                self.bytes.extend_from_slice(&index);
                self.bytes
                    .extend_from_slice(&(index.len() as u32).to_le_bytes());
                self.bytes.extend_from_slice(SEALED_INDEX_MAGIC);
            }
        }
        FinishedPack {
            id: hex(blake3::hash(&self.bytes).as_bytes()),
            bytes: self.bytes,
            index,
            entries: self.entries,
        }
    }
}

/// A pack ready to store.
#[derive(Debug)]
pub struct FinishedPack {
    /// The BLAKE3 digest of the pack, in hex.
    pub id: String,
    /// The pack.
    pub bytes: Vec<u8>,
    /// Its index object: the same index bytes the pack ends with, so a lost index
    /// object can be rebuilt from the pack.
    pub index: Vec<u8>,
    /// What it holds.
    pub entries: Vec<(ChunkId, BlobRef)>,
}

fn encode_index(entries: &[(ChunkId, BlobRef)]) -> Vec<u8> {
    let mut body = Vec::with_capacity(4 + entries.len() * INDEX_ENTRY);
    body.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for (id, b) in entries {
        body.extend_from_slice(&id.0);
        body.extend_from_slice(&b.offset.to_le_bytes());
        body.extend_from_slice(&b.stored_len.to_le_bytes());
        body.extend_from_slice(&b.raw_len.to_le_bytes());
        let zstd = match b.codec {
            Compression::None => 0,
            Compression::Zstd => CODEC_ZSTD,
        };
        match b.base {
            None => body.push(zstd),
            Some(base) => {
                body.push(zstd | CODEC_DELTA);
                body.extend_from_slice(&base.0);
            }
        }
    }
    let digest = blake3::hash(&body);
    let mut out = body;
    let len = out.len() as u32;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(digest.as_bytes());
    out.extend_from_slice(INDEX_MAGIC);
    out
}

/// A pack's own index (opened when `keys` is given) and where its blobs end.
pub fn pack_tail(key: &str, pack: &[u8], keys: Option<&Keys>) -> Result<(Vec<u8>, u64)> {
    let bad = |why: &str| Error::damaged(key, why.to_string());
    match keys {
        None => {
            if pack.len() < 45 {
                return Err(bad("too short for a pack"));
            }
            let tail = pack.len() - 40;
            let body_len = u32::from_le_bytes(pack[tail..tail + 4].try_into().unwrap()) as usize;
            let start = tail
                .checked_sub(body_len)
                .filter(|&s| s >= 5)
                .ok_or_else(|| bad("index length past the start of the pack"))?;
            Ok((pack[start..].to_vec(), start as u64))
        }
        Some(keys) => {
            if pack.len() < 13 || &pack[pack.len() - 4..] != SEALED_INDEX_MAGIC {
                return Err(bad("no sealed index trailer"));
            }
            let end = pack.len() - 8;
            let sealed_len = u32::from_le_bytes(pack[end..end + 4].try_into().unwrap()) as usize;
            let start = end
                .checked_sub(sealed_len)
                .filter(|&s| s >= 5)
                .ok_or_else(|| bad("index length past the start of the pack"))?;
            Ok((keys.open(key, b"index", &pack[start..end])?, start as u64))
        }
    }
}

/// An index object's plain bytes (opened when `keys` is given).
pub fn open_index_object(key: &str, bytes: &[u8], keys: Option<&Keys>) -> Result<Vec<u8>> {
    match keys {
        None => Ok(bytes.to_vec()),
        Some(keys) => keys.open(key, b"index", bytes),
    }
}

/// Parses an index; its blobs must end by `blobs_end` (a pack's blob area) if given.
pub fn decode_index(
    key: &str,
    bytes: &[u8],
    blobs_end: Option<u64>,
) -> Result<Vec<(ChunkId, BlobRef)>> {
    let bad = |why: &str| Error::damaged(key, why.to_string());
    if bytes.len() < 40 || &bytes[bytes.len() - 4..] != INDEX_MAGIC {
        return Err(bad("no index trailer"));
    }
    let tail = bytes.len() - 40;
    let body_len = u32::from_le_bytes(bytes[tail..tail + 4].try_into().unwrap()) as usize;
    if body_len > tail {
        return Err(bad("index length past the start of the file"));
    }
    let body = &bytes[tail - body_len..tail];
    if blake3::hash(body).as_bytes() != &bytes[tail + 4..tail + 36] {
        return Err(bad("index checksum mismatch"));
    }
    if body.len() < 4 {
        return Err(bad("index too short"));
    }
    let count = u32::from_le_bytes(body[..4].try_into().unwrap()) as usize;
    let short = || bad("index entry count does not match its length");
    // Entries are 49 bytes, a delta's 32 more: the count bounds the allocation.
    if body.len() < 4 + count.checked_mul(INDEX_ENTRY).ok_or_else(short)? {
        return Err(short());
    }
    let mut out = Vec::with_capacity(count);
    let mut rest = &body[4..];
    for _ in 0..count {
        let e = rest.get(..INDEX_ENTRY).ok_or_else(short)?;
        let id = ChunkId(e[..32].try_into().unwrap());
        let codec_byte = e[48];
        if codec_byte & !(CODEC_ZSTD | CODEC_DELTA) != 0 {
            return Err(bad("unknown compression"));
        }
        rest = &rest[INDEX_ENTRY..];
        let base = if codec_byte & CODEC_DELTA != 0 {
            let b = rest.get(..DELTA_ENTRY_EXTRA).ok_or_else(short)?;
            rest = &rest[DELTA_ENTRY_EXTRA..];
            let base = ChunkId(b.try_into().unwrap());
            if base == ChunkId::ZERO || base == id {
                return Err(bad("a delta of the zero chunk or of itself"));
            }
            Some(base)
        } else {
            None
        };
        let blob = BlobRef {
            offset: u64::from_le_bytes(e[32..40].try_into().unwrap()),
            stored_len: u32::from_le_bytes(e[40..44].try_into().unwrap()),
            raw_len: u32::from_le_bytes(e[44..48].try_into().unwrap()),
            codec: if codec_byte & CODEC_ZSTD != 0 {
                Compression::Zstd
            } else {
                Compression::None
            },
            base,
        };
        let end = blob.offset.checked_add(u64::from(blob.stored_len));
        if blob.offset < 5 || end.is_none() || blobs_end.is_some_and(|limit| end.unwrap() > limit) {
            return Err(bad("blob outside the pack"));
        }
        out.push((id, blob));
    }
    if !rest.is_empty() {
        return Err(short());
    }
    Ok(out)
}

/// A snapshot's header: everything but its chunk list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    /// The snapshot's id (derived from its contents; set on read).
    #[serde(skip)]
    pub id: String,
    /// The disk it is a snapshot of.
    pub disk: String,
    /// When the backup started, nanoseconds since the epoch (UTC): snapshots of one
    /// disk in the same second still sort in the order they were taken.
    pub time_ns: u64,
    /// The disk's size in bytes.
    pub size: u64,
    /// Chunk size in bytes.
    pub chunk_size: u64,
    /// The snapshot it was based on, if any.
    pub parent: Option<String>,
    /// Bytes this snapshot added to the repository (compressed), when it was taken.
    pub stored: u64,
    /// The program that wrote it.
    pub tool: String,
    /// The dirty bitmap of the disk that was cleared when this snapshot was taken: it
    /// records every change since, so the next backup by that bitmap may read only what
    /// it marks and take the rest from this snapshot. Absent (and not written) when none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bitmap: Option<String>,
}

/// A snapshot manifest: magic, header length, the JSON header, then one 32-byte id per
/// chunk of the disk (the zero id for an all-zero chunk), then the BLAKE3 digest of all
/// of the above. The snapshot's id is the first 16 hex digits of that digest.
pub fn encode_manifest(info: &SnapshotInfo, chunks: &[ChunkId]) -> (String, Vec<u8>) {
    let header = serde_json::to_vec(info).expect("a header serializes");
    let mut out = Vec::with_capacity(12 + header.len() + chunks.len() * 32 + 32);
    out.extend_from_slice(MANIFEST_MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(header.len() as u32).to_le_bytes());
    out.extend_from_slice(&header);
    for c in chunks {
        out.extend_from_slice(&c.0);
    }
    let digest = blake3::hash(&out);
    out.extend_from_slice(digest.as_bytes());
    (hex(&digest.as_bytes()[..8]), out)
}

/// A manifest object's bytes: the manifest, sealed when `keys` is given.
pub fn seal_manifest(manifest: Vec<u8>, keys: Option<&Keys>) -> Vec<u8> {
    match keys {
        None => manifest,
        Some(keys) => keys.seal(b"snapshot", &manifest),
    }
}

/// Parses a manifest object filed under `id` (opened first when `keys` is given).
pub fn open_manifest(
    key: &str,
    id: &str,
    bytes: &[u8],
    keys: Option<&Keys>,
) -> Result<(SnapshotInfo, Vec<ChunkId>)> {
    match keys {
        None => decode_manifest(key, id, bytes),
        Some(keys) => decode_manifest(key, id, &keys.open(key, b"snapshot", bytes)?),
    }
}

/// Parses a manifest filed under `id`.
pub fn decode_manifest(key: &str, id: &str, bytes: &[u8]) -> Result<(SnapshotInfo, Vec<ChunkId>)> {
    let bad = |why: String| Error::damaged(key, why);
    if bytes.len() < 12 + 32 || &bytes[..4] != MANIFEST_MAGIC {
        return Err(bad("not a snapshot manifest".into()));
    }
    let (body, digest) = bytes.split_at(bytes.len() - 32);
    let actual = blake3::hash(body);
    if actual.as_bytes() != digest || hex(&actual.as_bytes()[..8]) != id {
        return Err(bad("checksum mismatch".into()));
    }
    let version = u32::from_le_bytes(body[4..8].try_into().unwrap());
    if version != FORMAT_VERSION {
        return Err(bad(format!(
            "format version {version}, this stillpoint reads {FORMAT_VERSION}"
        )));
    }
    let header_len = u32::from_le_bytes(body[8..12].try_into().unwrap()) as usize;
    let header = body
        .get(12..12 + header_len)
        .ok_or_else(|| bad("header past the end".into()))?;
    let mut info: SnapshotInfo =
        serde_json::from_slice(header).map_err(|e| bad(format!("bad header: {e}")))?;
    info.id = id.to_string();
    let table = &body[12 + header_len..];
    if !table.len().is_multiple_of(32)
        || info.chunk_size == 0
        || (table.len() / 32) as u64 != info.size.div_ceil(info.chunk_size)
    {
        return Err(bad("chunk list does not match the disk size".into()));
    }
    let chunks = table
        .chunks_exact(32)
        .map(|c| ChunkId(c.try_into().unwrap()))
        .collect();
    Ok((info, chunks))
}
