//! Persistent dirty bitmaps of a raw image, in a sidecar file: raw images have no
//! place for them, so in QEMU their incrementals die with every restart. The sidecar
//! lives beside the image (`disk.raw` → `disk.raw.stillpoint-bitmaps`), or in the
//! graph's state directory when it has one (named by the image's canonical path,
//! escaped), and follows qcow2's life cycle exactly:
//!
//! * opened for writing, the file is marked *in use* on disk before anything is
//!   written to the image (one byte, synced); a persistent bitmap added to an image
//!   that had none creates the file, marked in use, before the add succeeds;
//! * a clean close writes the bitmaps with the mark clear (a temporary file, synced,
//!   renamed over the old one, the directory synced), or removes the file when no
//!   bitmap is left;
//! * a file found marked in use at open (the process died) loads every bitmap as
//!   inconsistent: its bits cannot be trusted, and only removal is allowed, as QEMU
//!   does with qcow2's `in_use` flag. So is a bitmap of an image whose size changed.
//!
//! Format (little endian): `SPBM`, version (u32), the in-use byte and three zero bytes,
//! the image size (u64), the bitmap count (u32); per bitmap its name's length (u16) and
//! name, flags (u32: 1 recording, 2 inconsistent) and the length (u64) and bytes of the
//! bitmap crate's serialization; then an FNV-1a 64 digest of everything but the in-use
//! byte. A damaged file fails the open, saying which file: damage is never taken for
//! "no changes".

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::path::PathBuf;
use std::sync::Mutex;

use async_trait::async_trait;

use crate::dirty::PersistentBitmap;
use crate::error::Error;
use crate::error::ErrorKind;
use crate::error::Result;
use crate::node::driver::BitmapStore;

const MAGIC: &[u8; 4] = b"SPBM";
const VERSION: u32 = 1;
/// Offset of the in-use byte.
const IN_USE_AT: usize = 8;
const HEADER_LEN: usize = 24;
const FLAG_RECORDING: u32 = 1;
const FLAG_INCONSISTENT: u32 = 2;

/// Where the sidecar of the image at `image` is: beside it, or in `state_dir`.
pub fn sidecar_path(image: &Path, state_dir: Option<&Path>) -> PathBuf {
    match state_dir {
        None => {
            let mut name = image.as_os_str().to_owned();
            name.push(".stillpoint-bitmaps");
            PathBuf::from(name)
        }
        Some(dir) => {
            let full = std::fs::canonicalize(image).unwrap_or_else(|_| image.to_path_buf());
            let mut escaped = String::new();
            for c in full.to_string_lossy().chars() {
                match c {
                    '%' => escaped.push_str("%25"),
                    '/' => escaped.push_str("%2F"),
                    c => escaped.push(c),
                }
            }
            dir.join(format!("{escaped}.stillpoint-bitmaps"))
        }
    }
}

fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    for part in parts {
        for &b in *part {
            hash ^= u64::from(b);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    }
    hash
}

fn damaged(path: &Path, why: impl std::fmt::Display) -> Error {
    Error::new(
        ErrorKind::InvalidArgument,
        format!(
            "the dirty bitmap file {} is damaged ({why}); remove it to open the image \
             without its bitmaps",
            path.display()
        ),
    )
}

fn io_error(path: &Path, what: &str, e: std::io::Error) -> Error {
    Error::new(
        ErrorKind::Io,
        format!(
            "cannot {what} the dirty bitmap file {}: {e}",
            path.display()
        ),
    )
}

/// Encodes bitmaps with the in-use byte clear.
pub fn encode(size: u64, bitmaps: &[PersistentBitmap]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&size.to_le_bytes());
    out.extend_from_slice(&(bitmaps.len() as u32).to_le_bytes());
    for b in bitmaps {
        out.extend_from_slice(&(b.name.len() as u16).to_le_bytes());
        out.extend_from_slice(b.name.as_bytes());
        let mut flags = 0;
        if b.recording {
            flags |= FLAG_RECORDING;
        }
        if b.inconsistent {
            flags |= FLAG_INCONSISTENT;
        }
        out.extend_from_slice(&flags.to_le_bytes());
        let bits = b.bits.serialize();
        out.extend_from_slice(&(bits.len() as u64).to_le_bytes());
        out.extend_from_slice(&bits);
    }
    let digest = fnv1a(&[&out[..IN_USE_AT], &out[IN_USE_AT + 1..]]);
    out.extend_from_slice(&digest.to_le_bytes());
    out
}

/// Parses a sidecar; bitmaps of a file marked in use, or of an image of another
/// size, come back inconsistent (with empty bits).
pub fn decode(path: &Path, bytes: &[u8], size: u64) -> Result<Vec<PersistentBitmap>> {
    if bytes.len() < HEADER_LEN + 8 || &bytes[..4] != MAGIC {
        return Err(damaged(path, "not a bitmap file"));
    }
    let (body, digest) = bytes.split_at(bytes.len() - 8);
    let expected = fnv1a(&[&body[..IN_USE_AT], &body[IN_USE_AT + 1..]]);
    if digest != expected.to_le_bytes() {
        return Err(damaged(path, "checksum mismatch"));
    }
    let u32_at = |at: usize| u32::from_le_bytes(body[at..at + 4].try_into().unwrap());
    let version = u32_at(4);
    if version != VERSION {
        return Err(damaged(
            path,
            format!("version {version}, this reads {VERSION}"),
        ));
    }
    let in_use = body[IN_USE_AT] != 0;
    let stored_size = u64::from_le_bytes(body[12..20].try_into().unwrap());
    let count = u32_at(20);
    let mut at = HEADER_LEN;
    let mut take = |n: usize| -> Result<&[u8]> {
        let piece = body
            .get(at..at.saturating_add(n))
            .ok_or_else(|| damaged(path, "truncated"))?;
        at += n;
        Ok(piece)
    };
    let mut out = Vec::new();
    for _ in 0..count {
        let name_len = u16::from_le_bytes(take(2)?.try_into().unwrap()) as usize;
        let name = std::str::from_utf8(take(name_len)?)
            .map_err(|_| damaged(path, "a name is not UTF-8"))?
            .to_string();
        let flags = u32::from_le_bytes(take(4)?.try_into().unwrap());
        let len = u64::from_le_bytes(take(8)?.try_into().unwrap());
        let bits = take(usize::try_from(len).unwrap_or(usize::MAX))?;
        let bits = bitmap::Bitmap::deserialize(bits)
            .map_err(|e| damaged(path, format!("bitmap '{name}': {e}")))?;
        let trusted = !in_use && flags & FLAG_INCONSISTENT == 0 && stored_size == size;
        let bits = if trusted {
            bits
        } else {
            bitmap::Bitmap::new(size, bits.granularity())
                .map_err(|e| damaged(path, format!("bitmap '{name}': {e}")))?
        };
        out.push(PersistentBitmap {
            name,
            bits,
            recording: trusted && flags & FLAG_RECORDING != 0,
            inconsistent: !trusted,
        });
    }
    if at != body.len() {
        return Err(damaged(path, "bytes after the last bitmap"));
    }
    Ok(out)
}

/// Writes `bytes` as `path` atomically and durably: a temporary file, synced, renamed,
/// the directory synced.
fn replace(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir.unwrap_or(Path::new(".")))?.sync_all()
}

/// The sidecar store of one raw node.
#[derive(Debug)]
pub struct SidecarBitmaps {
    path: PathBuf,
    size: u64,
    writable: bool,
    found: Mutex<Vec<PersistentBitmap>>,
    /// The file exists, marked in use (so a crash from now on is detected).
    marked: Mutex<bool>,
}

impl SidecarBitmaps {
    /// Loads the sidecar at `path` of an image of `size` bytes; for writing, marks it
    /// in use on disk first.
    pub fn open(path: PathBuf, size: u64, writable: bool) -> Result<Self> {
        let found = match std::fs::read(&path) {
            Ok(bytes) => decode(&path, &bytes, size)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io_error(&path, "read", e)),
        };
        let exists = path.exists();
        if writable && exists {
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(|e| io_error(&path, "open", e))?;
            file.write_all_at(&[1], IN_USE_AT as u64)
                .and_then(|()| file.sync_data())
                .map_err(|e| io_error(&path, "mark in use", e))?;
        }
        Ok(Self {
            path,
            size,
            writable,
            found: Mutex::new(found),
            marked: Mutex::new(writable && exists),
        })
    }
}

#[async_trait]
impl BitmapStore for SidecarBitmaps {
    fn writable(&self) -> bool {
        self.writable
    }

    fn take_persistent_bitmaps(&self) -> Vec<PersistentBitmap> {
        std::mem::take(&mut *self.found.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn prepare_persistent(&self) -> Result<()> {
        let mut marked = self.marked.lock().unwrap_or_else(|e| e.into_inner());
        if !*marked {
            let mut bytes = encode(self.size, &[]);
            bytes[IN_USE_AT] = 1;
            replace(&self.path, &bytes).map_err(|e| io_error(&self.path, "create", e))?;
            *marked = true;
        }
        Ok(())
    }

    async fn store_persistent_bitmaps(&self, bitmaps: Vec<PersistentBitmap>) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        let marked = *self.marked.lock().unwrap_or_else(|e| e.into_inner());
        if bitmaps.is_empty() {
            if marked {
                std::fs::remove_file(&self.path)
                    .or_else(|e| match e.kind() {
                        std::io::ErrorKind::NotFound => Ok(()),
                        _ => Err(e),
                    })
                    .map_err(|e| io_error(&self.path, "remove", e))?;
            }
            return Ok(());
        }
        let bytes = encode(self.size, &bitmaps);
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || replace(&path, &bytes))
            .await
            .map_err(|e| Error::new(ErrorKind::Io, format!("the store task failed: {e}")))?
            .map_err(|e| io_error(&self.path, "write", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bitmap(name: &str, size: u64, set: &[(u64, u64)]) -> PersistentBitmap {
        let mut bits = bitmap::Bitmap::new(size, 65536).unwrap();
        for &(at, len) in set {
            bits.set(at, len);
        }
        PersistentBitmap {
            name: name.into(),
            bits,
            recording: true,
            inconsistent: false,
        }
    }

    #[test]
    fn bitmaps_round_trip_and_every_flipped_byte_but_the_mark_is_damage() {
        let size = 10 << 20;
        let stored = vec![
            bitmap("a", size, &[(0, 4096), (5 << 20, 1 << 20)]),
            bitmap("b", size, &[]),
        ];
        let bytes = encode(size, &stored);
        let path = Path::new("x");
        let back = decode(path, &bytes, size).unwrap();
        assert_eq!(back.len(), 2);
        assert_eq!(back[0].bits.serialize(), stored[0].bits.serialize());
        assert!(back.iter().all(|b| b.recording && !b.inconsistent));
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x10;
            let result = decode(path, &bad, size);
            if i == IN_USE_AT {
                // The mark: the bitmaps load, untrusted.
                assert!(
                    result
                        .unwrap()
                        .iter()
                        .all(|b| b.inconsistent && !b.recording)
                );
            } else {
                let e = result
                    .err()
                    .unwrap_or_else(|| panic!("byte {i} flipped passed"));
                assert!(e.to_string().contains("damaged"), "{e}");
            }
        }
        // Another image size: untrusted.
        assert!(
            decode(path, &bytes, size + 512)
                .unwrap()
                .iter()
                .all(|b| b.inconsistent)
        );
    }
}
