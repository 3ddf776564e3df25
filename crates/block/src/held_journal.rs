//! The journal of held guest writes: what makes a write a backup holds in memory
//! (`jobs`, `block_copy::redirect`) survive the daemon being killed.
//!
//! A backup may acknowledge a guest write before it reaches the source image, because
//! the source must keep its old data until the backup has read it. Before the write is
//! acknowledged, its data is appended to this journal, beside the image
//! ([`journal_path`]), through the page cache: a process killed at any moment leaves
//! every acknowledged write in the journal, as the old path left it in the image's
//! page cache. When a held block reaches the source, a release record says so. The
//! next time a node of the same driver over the same file is opened read-write, the
//! blocks still held are written into it and the journal is deleted ([`replay`]); a
//! read-only open is refused, naming the journal, because it would read stale data.
//! A live journal is `flock`ed by its writer, and a replay leaves a locked one alone:
//! a second node opened over the image of a running backup does not take the
//! backup's held blocks.
//!
//! # Format (version 2, little-endian; version 1 is read too)
//!
//! ```text
//!   header (64 bytes): "STLPHELD" | version u32 | 0 u32 | node length u64
//!                      | driver name, 32 bytes NUL-padded | crc32c of bytes 0..56 u32 | 0 u32
//!   record (32 bytes): kind u8 (1 write, 2 release, 3 synced) | 0 [3] | blocks u32
//!                      | offset u64 | seq u64 | crc32c of bytes 0..24 and the payload u32 | 0 u32
//!     write:   payload = blocks x 4096 bytes of data; block i has sequence seq + i
//!     release: payload = blocks x u64, the sequence each block had when it was
//!              written to the source (the record's seq field is 0)
//!     synced:  no payload, blocks and seq 0, offset = the record's own position:
//!              appended after a sync returned, so every byte before it was durable
//!              (version 2; version 1 has none)
//! ```
//!
//! Records are appended one at a time, in the order the engine changes its set of
//! held blocks, so replaying them in file order rebuilds that set: a write record sets
//! each block's data and sequence, a release removes a block whose sequence is still
//! the one released (a newer write of it stays).
//!
//! A record cut short or failing its checksum ends the journal, unless a `synced`
//! record lies beyond it. A killed process can only leave its last append
//! unfinished, and that write was never acknowledged. After a power loss, blocks past
//! the last guest flush may be missing as from any volatile cache (a flush syncs the
//! journal), and the file may be damaged anywhere past its last sync, which is why
//! the sync is marked: a bad record *before* a `synced` record is damage to bytes
//! that were durable, and the journal is refused (an error naming the byte), never
//! replayed in part. What cannot be told from a kill's unfinished append is damage
//! that also took every later `synced` record (the file cut short, say). A header that
//! is all zeros or missing is a journal created but never written (nothing to
//! replay); any other bad header is an error, never ignored.

use std::collections::BTreeMap;
use std::fs::File;
use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::path::PathBuf;

use crate::buf::IoBuf;
use crate::error::Error;
use crate::error::ErrorKind;
use crate::error::Result;
use crate::node::driver::BlockDriver;
use crate::node::driver::WriteFlags;

/// The unit held: guests write whole 4 KiB pages.
pub const BLOCK: u64 = 4096;
/// Appended to the image's file name.
pub const SUFFIX: &str = ".stillpoint-held";

const MAGIC: &[u8; 8] = b"STLPHELD";
const VERSION: u32 = 2;
/// The oldest version read (the same records, without `synced` ones).
const OLDEST_VERSION: u32 = 1;
const HEADER_LEN: u64 = 64;
const RECORD_LEN: usize = 32;
const KIND_WRITE: u8 = 1;
const KIND_RELEASE: u8 = 2;
const KIND_SYNCED: u8 = 3;
/// Largest record a reader accepts (blocks): 64 MiB of data, more than any engine
/// holds in one write.
const MAX_RECORD_BLOCKS: u32 = 16384;

/// Where the journal of `image` lives.
pub fn journal_path(image: &Path) -> PathBuf {
    let mut name = image.as_os_str().to_owned();
    name.push(SUFFIX);
    PathBuf::from(name)
}

const fn crc32c_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = i as u32;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82f6_3b78
            } else {
                crc >> 1
            };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
}

static CRC32C: [u32; 256] = crc32c_table();

/// CRC-32C (Castagnoli) of the concatenation of `parts`.
fn crc32c(parts: &[&[u8]]) -> u32 {
    let mut crc = !0u32;
    for part in parts {
        for &byte in *part {
            crc = CRC32C[((crc ^ byte as u32) & 0xff) as usize] ^ (crc >> 8);
        }
    }
    !crc
}

fn header(driver: &str, length: u64) -> [u8; HEADER_LEN as usize] {
    let mut h = [0u8; HEADER_LEN as usize];
    h[0..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[16..24].copy_from_slice(&length.to_le_bytes());
    let name = driver.as_bytes();
    let n = name.len().min(32);
    h[24..24 + n].copy_from_slice(&name[..n]);
    let crc = crc32c(&[&h[0..56]]);
    h[56..60].copy_from_slice(&crc.to_le_bytes());
    h
}

fn record_header(kind: u8, blocks: u32, offset: u64, seq: u64, payload: &[u8]) -> [u8; RECORD_LEN] {
    let mut r = [0u8; RECORD_LEN];
    r[0] = kind;
    r[4..8].copy_from_slice(&blocks.to_le_bytes());
    r[8..16].copy_from_slice(&offset.to_le_bytes());
    r[16..24].copy_from_slice(&seq.to_le_bytes());
    let crc = crc32c(&[&r[0..24], payload]);
    r[24..28].copy_from_slice(&crc.to_le_bytes());
    r
}

/// An open journal being appended to by one engine. The caller serialises appends (a
/// mutex around it) in the order it changes its held set.
#[derive(Debug)]
pub struct HeldJournal {
    path: PathBuf,
    file: File,
    /// Bytes of whole records written (the next append goes here; a failed append's
    /// partial record is overwritten by the next).
    len: u64,
    /// Written or cut since the last sync.
    unsynced: bool,
    /// Holds a write or release record (`synced` records do not count).
    has_records: bool,
}

impl HeldJournal {
    /// Creates the journal of `image` for a node of `driver` and `length` bytes. Fails
    /// with `AlreadyExists` when one is there: another engine's, or one left by a
    /// killed daemon that no open has replayed.
    ///
    /// The journal is locked (`flock`) for as long as this lives, so a replay by
    /// another open of the same image, in this process or another, leaves it alone. It
    /// is made whole and locked with no name (`O_TMPFILE`; a temporary name where the
    /// filesystem lacks it) and then linked in place, so nobody sees it unlocked.
    pub fn create(image: &Path, driver: &str, length: u64) -> io::Result<Self> {
        let path = journal_path(image);
        let header = header(driver, length);
        let file = match create_unnamed(&path, &header) {
            Ok(file) => file,
            Err(Unnamed::Failed(e)) => return Err(e),
            Err(Unnamed::Unsupported) => create_named(&path, &header)?,
        };
        Ok(Self {
            path,
            file,
            len: HEADER_LEN,
            unsynced: true,
            has_records: false,
        })
    }

    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes in the journal.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether it holds no write or release record.
    pub fn is_empty(&self) -> bool {
        !self.has_records
    }

    fn append(&mut self, record: &[u8; RECORD_LEN], payload: &[u8]) -> io::Result<()> {
        let iov = [
            libc::iovec {
                iov_base: record.as_ptr() as *mut libc::c_void,
                iov_len: record.len(),
            },
            libc::iovec {
                iov_base: payload.as_ptr() as *mut libc::c_void,
                iov_len: payload.len(),
            },
        ];
        let total = record.len() + payload.len();
        // SAFETY: both iovecs point into live buffers of the lengths given, which the
        // kernel only reads.
        let written = unsafe {
            libc::pwritev(
                std::os::fd::AsRawFd::as_raw_fd(&self.file),
                iov.as_ptr(),
                2,
                self.len as libc::off_t,
            )
        };
        if written < 0 {
            return Err(io::Error::last_os_error());
        }
        let written = written as usize;
        if written < total {
            // A short write (a full disk): finish it, or fail with the reason.
            let mut whole = Vec::with_capacity(total);
            whole.extend_from_slice(record);
            whole.extend_from_slice(payload);
            self.file
                .write_all_at(&whole[written..], self.len + written as u64)?;
        }
        self.len += total as u64;
        self.unsynced = true;
        Ok(())
    }

    /// Records a held write of whole blocks at `offset`; block i has sequence
    /// `first_seq + i`.
    pub fn append_write(&mut self, offset: u64, first_seq: u64, data: &[u8]) -> io::Result<()> {
        debug_assert!((data.len() as u64).is_multiple_of(BLOCK) && !data.is_empty());
        let blocks = (data.len() as u64 / BLOCK) as u32;
        let record = record_header(KIND_WRITE, blocks, offset, first_seq, data);
        self.append(&record, data)?;
        self.has_records = true;
        Ok(())
    }

    /// Records that the blocks from `offset` on, with the sequences `seqs`, are on the
    /// source.
    pub fn append_release(&mut self, offset: u64, seqs: &[u64]) -> io::Result<()> {
        let payload: Vec<u8> = seqs.iter().flat_map(|s| s.to_le_bytes()).collect();
        let record = record_header(KIND_RELEASE, seqs.len() as u32, offset, 0, &payload);
        self.append(&record, &payload)?;
        self.has_records = true;
        Ok(())
    }

    /// Drops every record (nothing is held).
    pub fn clear(&mut self) -> io::Result<()> {
        self.file.set_len(HEADER_LEN)?;
        self.len = HEADER_LEN;
        self.unsynced = true;
        self.has_records = false;
        Ok(())
    }

    /// Makes what was appended (or cut) durable, then says so in a `synced` record,
    /// so a reader after a power loss can tell damage to durable bytes from an
    /// unsynced tail. That record is not synced itself (the next sync carries it):
    /// losing it only loses the reader's proof for this sync, never a write.
    pub fn sync(&mut self) -> io::Result<()> {
        if self.unsynced {
            self.file.sync_data()?;
            self.unsynced = false;
            let mark = record_header(KIND_SYNCED, 0, self.len, 0, &[]);
            // Best effort, for the reason above; a failed append leaves `len` where
            // it was, and the next append overwrites whatever part of it was written.
            let _ = self.append(&mark, &[]);
            // The mark's append set this again; the mark alone needs no sync.
            self.unsynced = false;
        }
        Ok(())
    }

    /// Deletes the journal (nothing is held and the image has every block), durably,
    /// so a power loss cannot bring back records a later write made stale.
    pub fn remove(self) -> io::Result<()> {
        std::fs::remove_file(&self.path)?;
        sync_parent(&self.path)
    }
}

/// Why the journal was not made without a name.
enum Unnamed {
    /// The filesystem (or a missing `/proc`) does not allow it: use a named temporary.
    Unsupported,
    Failed(io::Error),
}

/// Makes the journal as a file with no name (`O_TMPFILE`), locks it, writes its
/// header and only then links it in at `path`: a process killed on the way leaves
/// nothing behind.
fn create_unnamed(path: &Path, header: &[u8]) -> std::result::Result<File, Unnamed> {
    let dir = parent_dir(path);
    let unsupported = |e: &io::Error| {
        matches!(
            e.raw_os_error(),
            Some(libc::EOPNOTSUPP | libc::EISDIR | libc::EINVAL | libc::ENOENT)
        )
    };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_TMPFILE)
        .mode(0o600)
        .open(dir)
        .map_err(|e| {
            if unsupported(&e) {
                Unnamed::Unsupported
            } else {
                Unnamed::Failed(e)
            }
        })?;
    lock(&file)
        .and_then(|()| file.write_all_at(header, 0))
        .map_err(Unnamed::Failed)?;
    let proc_path = format!("/proc/self/fd/{}\0", std::os::fd::AsRawFd::as_raw_fd(&file));
    let target = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| Unnamed::Failed(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
    // SAFETY: both paths are NUL-terminated and outlive the call.
    let rc = unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            proc_path.as_ptr().cast(),
            libc::AT_FDCWD,
            target.as_ptr(),
            libc::AT_SYMLINK_FOLLOW,
        )
    };
    if rc != 0 {
        let e = io::Error::last_os_error();
        // No /proc to name the file by: the named way still works.
        return Err(if e.raw_os_error() == Some(libc::ENOENT) {
            Unnamed::Unsupported
        } else {
            Unnamed::Failed(e)
        });
    }
    Ok(file)
}

/// The same under a temporary name, for filesystems without `O_TMPFILE`. A process
/// killed between the two steps leaves `JOURNAL.PID.N.tmp` behind (never read).
fn create_named(path: &Path, header: &[u8]) -> io::Result<File> {
    // Unique to this call: two engines of one process over the same image must not
    // share (and truncate) one temporary file.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(format!(".{}.{n}.tmp", std::process::id()));
    let temporary = PathBuf::from(temporary);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temporary)?;
    let made = lock(&file)
        .and_then(|()| file.write_all_at(header, 0))
        .and_then(|()| std::fs::hard_link(&temporary, path));
    let _ = std::fs::remove_file(&temporary);
    made?;
    Ok(file)
}

/// An exclusive `flock` of `file`, or `WouldBlock` when someone has it.
fn lock(file: &File) -> io::Result<()> {
    // SAFETY: flock on a descriptor we own.
    let rc = unsafe {
        libc::flock(
            std::os::fd::AsRawFd::as_raw_fd(file),
            libc::LOCK_EX | libc::LOCK_NB,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The directory `path` is in (`.` for a bare file name).
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

fn sync_parent(path: &Path) -> io::Result<()> {
    File::open(parent_dir(path))?.sync_all()
}

/// What a journal still holds.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Pending {
    /// The driver of the node it was written for ("raw", "qcow2", "file"...).
    pub driver: String,
    /// That node's length.
    pub length: u64,
    /// Held blocks, as runs of neighbouring blocks in offset order.
    pub runs: Vec<(u64, Vec<u8>)>,
    /// Bytes after the last whole record (an append cut short, or not yet synced
    /// when the power went).
    pub torn_bytes: u64,
}

impl Pending {
    /// Blocks held.
    pub fn blocks(&self) -> u64 {
        self.runs.iter().map(|(_, d)| d.len() as u64 / BLOCK).sum()
    }
}

fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes(b[..4].try_into().unwrap())
}

fn le_u64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b[..8].try_into().unwrap())
}

/// A record that is whole and passes its checksum.
struct Record<'a> {
    kind: u8,
    blocks: u32,
    offset: u64,
    seq: u64,
    payload: &'a [u8],
}

/// The record at `at`, if one is there whole and sound; `None` where the journal
/// ends, is cut short or is damaged.
fn whole_record(bytes: &[u8], at: usize) -> Option<Record<'_>> {
    let r = bytes.get(at..at.checked_add(RECORD_LEN)?)?;
    if r[1..4] != [0; 3] || r[28..32] != [0; 4] {
        return None;
    }
    let kind = r[0];
    let blocks = le_u32(&r[4..8]);
    let offset = le_u64(&r[8..16]);
    let seq = le_u64(&r[16..24]);
    let unit = match kind {
        KIND_WRITE => BLOCK as usize,
        KIND_RELEASE => 8,
        // Its position is its whole content: a copy of it anywhere else is no mark.
        KIND_SYNCED if blocks == 0 && seq == 0 && offset == at as u64 => 0,
        _ => return None,
    };
    if kind != KIND_SYNCED && (blocks == 0 || blocks > MAX_RECORD_BLOCKS) {
        return None;
    }
    let payload = bytes.get(at + RECORD_LEN..at + RECORD_LEN + blocks as usize * unit)?;
    if le_u32(&r[24..28]) != crc32c(&[&r[0..24], payload]) {
        return None;
    }
    Some(Record {
        kind,
        blocks,
        offset,
        seq,
        payload,
    })
}

/// The position of a sound `synced` record past `at`, if there is one: proof that
/// the bytes at `at` were durable. Records start at multiples of 8, and a mark names
/// its own position, so random bytes (or a guest's data) pass for one only by a
/// checksum collision at exactly the right place.
fn synced_record_after(bytes: &[u8], at: usize) -> Option<usize> {
    (at + 8..bytes.len().saturating_sub(RECORD_LEN - 1))
        .step_by(8)
        .find(|&p| bytes[p] == KIND_SYNCED && whole_record(bytes, p).is_some())
}

/// Reads a journal's bytes: `Ok(None)` for one created but never written (empty or
/// an all-zero header). A damaged header, a whole record naming blocks outside the
/// node, or a damaged record with a sync mark after it, is an error.
pub fn parse(bytes: &[u8]) -> std::result::Result<Option<Pending>, String> {
    if bytes.len() < HEADER_LEN as usize {
        if bytes.iter().all(|&b| b == 0) {
            return Ok(None);
        }
        return Err(format!("its header is cut short ({} bytes)", bytes.len()));
    }
    let h = &bytes[..HEADER_LEN as usize];
    if h.iter().all(|&b| b == 0) {
        return Ok(None);
    }
    if &h[0..8] != MAGIC {
        return Err("it is not a held-write journal (bad magic)".into());
    }
    if le_u32(&h[56..60]) != crc32c(&[&h[0..56]]) {
        return Err("its header fails its checksum".into());
    }
    let version = le_u32(&h[8..12]);
    if !(OLDEST_VERSION..=VERSION).contains(&version) {
        return Err(format!(
            "it has version {version}; this build reads {OLDEST_VERSION} to {VERSION}"
        ));
    }
    let length = le_u64(&h[16..24]);
    let name = &h[24..56];
    let name_len = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    let driver = String::from_utf8_lossy(&name[..name_len]).into_owned();

    // Block -> (sequence, where its data is in `bytes`).
    let mut held: BTreeMap<u64, (u64, usize)> = BTreeMap::new();
    let mut at = HEADER_LEN as usize;
    while let Some(record) = whole_record(bytes, at) {
        let Record {
            kind,
            blocks,
            offset,
            seq,
            payload,
        } = record;
        if kind == KIND_SYNCED {
            at += RECORD_LEN;
            continue;
        }
        let end = u64::from(blocks)
            .checked_mul(BLOCK)
            .and_then(|len| offset.checked_add(len));
        if !offset.is_multiple_of(BLOCK) || end.is_none_or(|end| end > length) {
            return Err(format!(
                "a record at byte {at} names blocks outside the {length}-byte node (offset {offset})"
            ));
        }
        for i in 0..u64::from(blocks) {
            let block = offset + i * BLOCK;
            if kind == KIND_WRITE {
                let data_at = at + RECORD_LEN + (i * BLOCK) as usize;
                held.insert(block, (seq + i, data_at));
            } else {
                let released = le_u64(&payload[i as usize * 8..]);
                if held.get(&block).is_some_and(|&(s, _)| s == released) {
                    held.remove(&block);
                }
            }
        }
        at += RECORD_LEN + payload.len();
    }
    if let Some(synced) = synced_record_after(bytes, at) {
        return Err(format!(
            "the record at byte {at} is damaged, yet the journal was synced past it (a \
             sync mark at byte {synced}): bytes that were durable have changed"
        ));
    }
    let mut runs: Vec<(u64, Vec<u8>)> = Vec::new();
    for (&block, &(_, data_at)) in &held {
        let data = &bytes[data_at..data_at + BLOCK as usize];
        match runs.last_mut() {
            Some((start, run)) if *start + run.len() as u64 == block => run.extend_from_slice(data),
            _ => runs.push((block, data.to_vec())),
        }
    }
    Ok(Some(Pending {
        driver,
        length,
        runs,
        torn_bytes: (bytes.len() - at) as u64,
    }))
}

fn journal_error(path: &Path, why: impl std::fmt::Display) -> Error {
    Error::new(
        ErrorKind::Io,
        format!(
            "the journal of held guest writes '{}' cannot be used: {why}; the image \
             lacks the writes a stopped backup held in it. To open the image without \
             them, move the journal away (and keep it: it holds their data)",
            path.display()
        ),
    )
}

/// Run by every open before the node is used: if the image under `driver` has a
/// journal written for a node of this driver, writes its held blocks into `driver`
/// and deletes it. A read-only node with held blocks pending is refused.
pub async fn replay(driver: &dyn BlockDriver, read_only: bool) -> Result<()> {
    let Some(image) = driver.filename() else {
        return Ok(());
    };
    let path = journal_path(&image);
    let read_path = path.clone();
    // Read under the journal's lock, kept until it is deleted: a journal locked by
    // someone else belongs to a backup running now, whose filter serves its blocks.
    let read = tokio::task::spawn_blocking(move || {
        let file = match File::open(&read_path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        match lock(&file) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) => return Err(e),
        }
        let mut bytes = Vec::new();
        io::Read::read_to_end(&mut &file, &mut bytes)?;
        Ok(Some((file, parse(&bytes))))
    })
    .await
    .map_err(|e| Error::new(ErrorKind::Io, format!("journal read task failed: {e}")))?;
    let (locked, pending) = match read {
        Ok(None) => return Ok(()),
        Err(e) => return Err(journal_error(&path, e)),
        Ok(Some((_, Err(why)))) => return Err(journal_error(&path, why)),
        Ok(Some((locked, Ok(None)))) => (locked, None),
        Ok(Some((locked, Ok(Some(pending))))) => (locked, Some(pending)),
    };
    let name = driver.driver_name();
    if let Some(p) = &pending {
        if p.driver != name {
            // Another layer over the same file (the qcow2 node above this file node):
            // that layer's open replays it. Said aloud, because a node of another
            // driver over the file reads it without those writes.
            if p.blocks() > 0 {
                tracing::warn!(
                    "'{}' holds guest writes for a {} node over '{}'; they are written \
                     when such a node opens it read-write (this {name} node does not \
                     see them)",
                    path.display(),
                    p.driver,
                    image.display()
                );
            }
            return Ok(());
        }
        if p.length != driver.length() {
            return Err(journal_error(
                &path,
                format!(
                    "it was written for a {}-byte node, this one has {} bytes",
                    p.length,
                    driver.length()
                ),
            ));
        }
    }
    let blocks = pending.as_ref().map_or(0, Pending::blocks);
    if blocks > 0 && read_only {
        return Err(Error::new(
            ErrorKind::Io,
            format!(
                "'{}' has {blocks} guest write block(s) of 4 KiB that a backup held \
                 when its daemon stopped, in '{}': open it read-write once to write \
                 them into the image",
                image.display(),
                path.display()
            ),
        ));
    }
    if read_only {
        return Ok(());
    }
    if let Some(p) = pending {
        for (offset, data) in &p.runs {
            driver
                .write(*offset, IoBuf::from_slice(data), WriteFlags::default())
                .await
                .map_err(|e| e.context(format!("applying '{}'", path.display())))?;
        }
        if blocks > 0 {
            driver
                .flush()
                .await
                .map_err(|e| e.context(format!("applying '{}'", path.display())))?;
            tracing::warn!(
                "wrote {blocks} held guest write block(s) of 4 KiB from '{}' into '{}': a \
                 backup's daemon stopped before it could{}",
                path.display(),
                image.display(),
                if p.torn_bytes > 0 {
                    format!(
                        " (the last {} bytes, an append cut short or never synced, ignored)",
                        p.torn_bytes
                    )
                } else {
                    String::new()
                }
            );
        }
    }
    let remove_path = path.clone();
    tokio::task::spawn_blocking(move || {
        std::fs::remove_file(&remove_path)?;
        drop(locked);
        sync_parent(&remove_path)
    })
    .await
    .map_err(|e| Error::new(ErrorKind::Io, format!("journal removal task failed: {e}")))?
    .map_err(|e| {
        Error::new(
            ErrorKind::Io,
            format!(
                "the held guest writes in '{}' are in the image now, but the journal \
                 cannot be deleted: {e}; delete it before the image is written again \
                 (a later open would write its stale blocks over newer data)",
                path.display()
            ),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn journal(dir: &Path) -> (PathBuf, HeldJournal) {
        let image = dir.join("disk.img");
        let j = HeldJournal::create(&image, "raw", 1 << 20).unwrap();
        (image, j)
    }

    fn read(image: &Path) -> Pending {
        parse(&std::fs::read(journal_path(image)).unwrap())
            .unwrap()
            .unwrap()
    }

    fn page(byte: u8) -> Vec<u8> {
        vec![byte; BLOCK as usize]
    }

    #[test]
    fn a_release_drops_only_the_sequence_it_names() {
        let dir = tempfile::tempdir().unwrap();
        let (image, mut j) = journal(dir.path());
        let mut two = page(1);
        two.extend(page(2));
        j.append_write(0, 1, &two).unwrap(); // blocks 0 (seq 1) and 1 (seq 2)
        j.append_write(BLOCK, 3, &page(3)).unwrap(); // block 1 again (seq 3)
        j.append_write(8 * BLOCK, 4, &page(4)).unwrap();
        // Blocks 0 and 1 reached the source as seq 1 and 2: block 1 was written again
        // meanwhile, so it stays with its newer data.
        j.append_release(0, &[1, 2]).unwrap();
        let p = read(&image);
        assert_eq!(p.driver, "raw");
        assert_eq!(p.length, 1 << 20);
        assert_eq!(p.runs, vec![(BLOCK, page(3)), (8 * BLOCK, page(4))]);
        assert_eq!(p.torn_bytes, 0);
        j.append_release(BLOCK, &[3]).unwrap();
        j.append_release(8 * BLOCK, &[4]).unwrap();
        assert_eq!(read(&image).runs, vec![]);
    }

    #[test]
    fn neighbouring_blocks_come_back_as_one_run() {
        let dir = tempfile::tempdir().unwrap();
        let (image, mut j) = journal(dir.path());
        j.append_write(2 * BLOCK, 1, &page(7)).unwrap();
        j.append_write(BLOCK, 2, &page(6)).unwrap();
        let mut run = page(6);
        run.extend(page(7));
        assert_eq!(read(&image).runs, vec![(BLOCK, run)]);
    }

    #[test]
    fn an_unfinished_or_damaged_last_record_ends_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        let (image, mut j) = journal(dir.path());
        j.append_write(0, 1, &page(1)).unwrap();
        j.append_write(BLOCK, 2, &page(2)).unwrap();
        let path = journal_path(&image);
        let whole = std::fs::read(&path).unwrap();
        // Cut in the second record's data.
        let cut = &whole[..whole.len() - 100];
        let p = parse(cut).unwrap().unwrap();
        assert_eq!(p.runs, vec![(0, page(1))]);
        assert_eq!(p.torn_bytes, (RECORD_LEN + BLOCK as usize - 100) as u64);
        // A flipped byte in the second record's data.
        let mut flipped = whole.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        let p = parse(&flipped).unwrap().unwrap();
        assert_eq!(p.runs, vec![(0, page(1))]);
        assert_eq!(p.torn_bytes, (RECORD_LEN + BLOCK as usize) as u64);
    }

    #[test]
    fn a_bad_header_is_an_error_and_a_blank_one_is_nothing() {
        assert_eq!(parse(&[]), Ok(None));
        assert_eq!(parse(&[0; 200]), Ok(None));
        let mut h = header("raw", 4096).to_vec();
        assert!(parse(&h).unwrap().is_some());
        h[20] ^= 1;
        assert!(
            parse(&h).unwrap_err().contains("checksum"),
            "{:?}",
            parse(&h)
        );
        h[0] = b'X';
        assert!(parse(&h).unwrap_err().contains("magic"));
        assert!(parse(&[1, 2, 3]).unwrap_err().contains("cut short"));
    }

    #[test]
    fn a_record_outside_the_node_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let (image, mut j) = journal(dir.path());
        j.append_write(1 << 20, 1, &page(1)).unwrap();
        let err = parse(&std::fs::read(journal_path(&image)).unwrap()).unwrap_err();
        assert!(err.contains("outside"), "{err}");
    }

    #[test]
    fn clear_drops_records_and_create_refuses_a_second_journal() {
        let dir = tempfile::tempdir().unwrap();
        let (image, mut j) = journal(dir.path());
        j.append_write(0, 1, &page(1)).unwrap();
        assert!(!j.is_empty());
        j.clear().unwrap();
        assert!(j.is_empty());
        j.append_write(BLOCK, 2, &page(2)).unwrap();
        assert_eq!(read(&image).runs, vec![(BLOCK, page(2))]);
        let again = HeldJournal::create(&image, "raw", 1 << 20).unwrap_err();
        assert_eq!(again.kind(), io::ErrorKind::AlreadyExists);
        j.remove().unwrap();
        assert!(!journal_path(&image).exists());
    }

    #[test]
    fn a_damaged_record_before_a_sync_is_refused_and_one_after_it_ends_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        let (image, mut j) = journal(dir.path());
        j.append_write(0, 1, &page(1)).unwrap();
        j.sync().unwrap();
        let synced_at = j.len() as usize - RECORD_LEN;
        j.append_write(BLOCK, 2, &page(2)).unwrap();
        let whole = std::fs::read(journal_path(&image)).unwrap();
        assert_eq!(
            read(&image).runs.len(),
            1,
            "two neighbouring blocks, one run"
        );

        // The first record was durable (the sync mark after it says so): damage to it
        // is refused, naming the byte, rather than replaying what follows it.
        let mut early = whole.clone();
        early[HEADER_LEN as usize + RECORD_LEN + 10] ^= 4;
        let err = parse(&early).unwrap_err();
        assert!(
            err.contains("byte 64") && err.contains(&format!("byte {synced_at}")),
            "{err}"
        );
        // The second was never synced: damage to it is an unfinished tail.
        let mut late = whole.clone();
        let last = late.len() - 1;
        late[last] ^= 4;
        let p = parse(&late).unwrap().unwrap();
        assert_eq!(p.runs, vec![(0, page(1))]);
        assert_eq!(p.torn_bytes, (RECORD_LEN + BLOCK as usize) as u64);
        // A damaged mark is only the loss of its proof.
        let mut mark = whole.clone();
        mark[synced_at + 8] ^= 1;
        let p = parse(&mark).unwrap().unwrap();
        assert_eq!(p.runs, vec![(0, page(1))]);
    }

    #[test]
    fn a_sync_with_nothing_new_writes_no_mark_and_an_empty_journal_stays_empty() {
        let dir = tempfile::tempdir().unwrap();
        let (_, mut j) = journal(dir.path());
        j.append_write(0, 1, &page(1)).unwrap();
        j.clear().unwrap();
        j.sync().unwrap();
        assert!(j.is_empty(), "a mark is not a record");
        let len = j.len();
        j.sync().unwrap();
        assert_eq!(j.len(), len, "nothing new, no mark");
    }

    #[test]
    fn a_journal_is_made_without_a_temporary_name_where_the_filesystem_allows() {
        let dir = tempfile::tempdir().unwrap();
        let (image, _j) = journal(dir.path());
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            names,
            vec![journal_path(&image).file_name().unwrap().to_owned()]
        );
        // The named way (for filesystems without O_TMPFILE) makes the same journal.
        let other = dir.path().join("other.img");
        let file = create_named(&journal_path(&other), &header("raw", 4096)).unwrap();
        drop(file);
        assert_eq!(
            parse(&std::fs::read(journal_path(&other)).unwrap()),
            Ok(Some(Pending {
                driver: "raw".into(),
                length: 4096,
                ..Pending::default()
            }))
        );
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
    }

    /// One step of the power-loss property: write a block a value, release a block
    /// (what it was last written as), empty the journal, or sync it.
    #[derive(Debug, Clone)]
    enum Step {
        Write(u8, u8),
        Release(u8),
        Clear,
        Sync,
    }

    fn step() -> impl proptest::strategy::Strategy<Value = Step> {
        use proptest::prelude::*;
        prop_oneof![
            6 => (0u8..16, 1u8..=255).prop_map(|(b, v)| Step::Write(b, v)),
            3 => (0u8..16).prop_map(Step::Release),
            1 => Just(Step::Clear),
            2 => Just(Step::Sync),
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// A power loss keeps every byte up to the last sync and may lose or zero any
        /// page written after it, or cut the file anywhere past it. The journal must
        /// then read as the held set at some moment since that sync (never an error,
        /// never a state older than the sync, never a mix).
        #[test]
        fn after_a_power_loss_the_journal_reads_as_some_moment_since_the_last_sync(
            steps in proptest::collection::vec(step(), 1..60),
            lost_pages in proptest::collection::vec(proptest::prelude::any::<u16>(), 0..4),
            cut in proptest::prelude::any::<u32>(),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let (image, mut j) = journal(dir.path());
            let mut model: BTreeMap<u64, (u64, u8)> = BTreeMap::new();
            let mut seq = 0;
            // The held sets since the last sync (the first is the one synced), and the
            // journal's length when that sync returned.
            let mut since_sync: Vec<BTreeMap<u64, u8>> = vec![BTreeMap::new()];
            let mut durable = HEADER_LEN as usize;
            let view = |m: &BTreeMap<u64, (u64, u8)>| m.iter().map(|(&b, &(_, v))| (b, v)).collect();
            for step in &steps {
                match *step {
                    Step::Write(b, v) => {
                        seq += 1;
                        j.append_write(u64::from(b) * BLOCK, seq, &page(v)).unwrap();
                        model.insert(u64::from(b) * BLOCK, (seq, v));
                    }
                    Step::Release(b) => {
                        let at = u64::from(b) * BLOCK;
                        let s = model.get(&at).map_or(0, |m| m.0);
                        j.append_release(at, &[s]).unwrap();
                        if model.get(&at).is_some_and(|m| m.0 == s) {
                            model.remove(&at);
                        }
                    }
                    Step::Clear => {
                        // The engine empties only a journal holding nothing, and a
                        // truncation is made durable by the sync that follows it.
                        if model.is_empty() {
                            j.clear().unwrap();
                            j.sync().unwrap();
                            durable = j.len() as usize - RECORD_LEN;
                            since_sync = vec![BTreeMap::new()];
                        }
                        continue;
                    }
                    Step::Sync => {
                        let before = j.len() as usize;
                        j.sync().unwrap();
                        if j.len() as usize > before {
                            durable = before;
                            since_sync = vec![view(&model)];
                        }
                        continue;
                    }
                }
                since_sync.push(view(&model));
            }
            let mut bytes = std::fs::read(journal_path(&image)).unwrap();
            // The damage, all past the durable bytes.
            let tail = bytes.len() - durable;
            for lost in &lost_pages {
                let page_start = (durable + *lost as usize % (tail + 1)) / BLOCK as usize * BLOCK as usize;
                let from = page_start.max(durable);
                let to = (page_start + BLOCK as usize).min(bytes.len());
                bytes[from..to].fill(0);
            }
            bytes.truncate(durable + cut as usize % (tail + 1));
            let read = parse(&bytes).expect("a power loss is no damage").expect("a header");
            let mut got = BTreeMap::new();
            for (start, run) in &read.runs {
                for (i, block) in run.chunks(BLOCK as usize).enumerate() {
                    got.insert(start + (i as u64) * BLOCK, block[0]);
                }
            }
            proptest::prop_assert!(
                since_sync.contains(&got),
                "read {got:?}, none of the states since the last sync {since_sync:?}"
            );
        }
    }

    #[test]
    fn a_version_1_journal_still_reads() {
        let dir = tempfile::tempdir().unwrap();
        let (image, mut j) = journal(dir.path());
        j.append_write(0, 1, &page(5)).unwrap();
        let mut bytes = std::fs::read(journal_path(&image)).unwrap();
        bytes[8..12].copy_from_slice(&1u32.to_le_bytes());
        let crc = crc32c(&[&bytes[0..56]]);
        bytes[56..60].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(parse(&bytes).unwrap().unwrap().runs, vec![(0, page(5))]);
        bytes[8..12].copy_from_slice(&3u32.to_le_bytes());
        let crc = crc32c(&[&bytes[0..56]]);
        bytes[56..60].copy_from_slice(&crc.to_le_bytes());
        assert!(parse(&bytes).unwrap_err().contains("version 3"));
    }

    #[tokio::test]
    async fn an_open_refuses_a_journal_damaged_before_a_sync_and_keeps_it() {
        use crate::drivers::file::FileDriver;
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.img");
        std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
        let mut j = HeldJournal::create(&image, "file", 1 << 20).unwrap();
        j.append_write(0, 1, &page(1)).unwrap();
        j.sync().unwrap();
        j.append_write(BLOCK, 2, &page(2)).unwrap();
        drop(j);
        let path = journal_path(&image);
        let whole = std::fs::read(&path).unwrap();
        let mut damaged = whole.clone();
        damaged[HEADER_LEN as usize + RECORD_LEN] ^= 1;
        std::fs::write(&path, &damaged).unwrap();

        let node = FileDriver::open(&image, false, false, false).unwrap();
        let err = replay(&node, false).await.unwrap_err().to_string();
        assert!(
            err.contains(&path.display().to_string()) && err.contains("move the journal away"),
            "{err}"
        );
        assert!(path.exists(), "a refused journal is kept");
        assert!(
            std::fs::read(&image).unwrap().iter().all(|&b| b == 0),
            "nothing applied"
        );

        // Sound again, the same open writes both blocks and deletes it.
        std::fs::write(&path, &whole).unwrap();
        replay(&node, false).await.unwrap();
        assert!(!path.exists());
        let data = std::fs::read(&image).unwrap();
        assert_eq!(&data[..2 * BLOCK as usize], [page(1), page(2)].concat());
    }
}
