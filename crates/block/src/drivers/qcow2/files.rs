//! Helpers over host files, for the CLI and the graph's format probing: reading a
//! header without a node, resolving backing names, creating images.

use super::MAX_CHAIN_DEPTH;
use super::header;
use super::header::Header;
use super::header::corrupt;
use crate::error::Error;
use crate::error::Result;
use crate::options::BlockdevOptions;
use crate::options::BlockdevRef;
use crate::options::DriverOptions;
use crate::options::FileOptions;
use crate::options::Qcow2Options;
use crate::options::RawOptions;
use std::path::Path;
use std::path::PathBuf;

/// Where a stored backing file name points: relative names are relative to the
/// directory of the image that names them, as QEMU resolves them.
pub fn resolve_backing(image: Option<&Path>, stored: &str) -> PathBuf {
    let stored = Path::new(stored);
    match image.and_then(Path::parent) {
        Some(dir) if stored.is_relative() => dir.join(stored),
        _ => stored.to_path_buf(),
    }
}

/// Reads just enough of a file to tell qcow2 from raw and parse a qcow2 header.
pub fn read_file_header(path: &Path) -> Result<Option<Header>> {
    use std::io::Read;
    let open_error = |e: std::io::Error| {
        Error::from_io(
            format!("Could not open backing file '{}'", path.display()),
            e,
        )
    };
    let mut file = std::fs::File::open(path).map_err(open_error)?;
    let file_len = file.metadata().map_err(open_error)?.len();
    // The header, then the rest of the first cluster (extensions live there) and no
    // more: reading data clusters changes what SEEK_DATA reports for unwritten extents
    // (ext4 counts cached pages as data), so a probe must not touch them.
    let mut first = vec![0u8; (Header::PROBE_LEN as u64).min(file_len) as usize];
    file.read_exact(&mut first).map_err(open_error)?;
    if first.len() < 4 || first[..4] != header::MAGIC.to_be_bytes() {
        return Ok(None);
    }
    if first.len() >= 24 {
        let bits = u32::from_be_bytes(first[20..24].try_into().unwrap());
        if (header::MIN_CLUSTER_BITS..=header::MAX_CLUSTER_BITS).contains(&bits) {
            let cluster = (1u64 << bits).min(file_len) as usize;
            let have = first.len();
            if cluster > have {
                first.resize(cluster, 0);
                file.read_exact(&mut first[have..]).map_err(open_error)?;
            }
        }
    }
    Header::parse(&first, file_len).map(Some)
}

/// The node options of the backing file an image header names (read-only, format from
/// the header or probed), after checking that the chain below ends and does not loop.
pub fn backing_options(
    image: Option<&Path>,
    stored: &str,
    top: &Header,
) -> Result<BlockdevOptions> {
    let path = resolve_backing(image, stored);
    // Walk the whole chain by headers first: a loop must be refused before any node is
    // opened, or opening would recurse forever.
    let mut seen: Vec<PathBuf> = image
        .and_then(|p| std::fs::canonicalize(p).ok())
        .into_iter()
        .collect();
    let mut current = path.clone();
    let mut format = top.backing_format.clone();
    let mut first_format = None;
    for depth in 1.. {
        if depth > MAX_CHAIN_DEPTH {
            return Err(corrupt(format!(
                "the backing chain is deeper than {MAX_CHAIN_DEPTH} images"
            )));
        }
        let canonical = std::fs::canonicalize(&current).map_err(|e| {
            Error::from_io(
                format!("Could not open backing file '{}'", current.display()),
                e,
            )
        })?;
        if seen.contains(&canonical) {
            return Err(corrupt(format!(
                "the backing chain loops: '{}' is its own backing file",
                canonical.display()
            )));
        }
        seen.push(canonical);
        let header = read_file_header(&current)?;
        let probed = if header.is_some() { "qcow2" } else { "raw" };
        let this_format = format.clone().unwrap_or_else(|| probed.to_string());
        if first_format.is_none() {
            first_format = Some(this_format.clone());
        }
        match (this_format.as_str(), header) {
            ("qcow2", Some(h)) => match h.backing_file.clone() {
                Some(next) => {
                    current = resolve_backing(Some(&current), &next);
                    format = h.backing_format.clone();
                }
                None => break,
            },
            ("qcow2", None) => {
                return Err(Error::invalid(format!(
                    "backing file '{}' is not a qcow2 image",
                    current.display()
                )));
            }
            ("raw", _) => break,
            (other, _) => {
                return Err(Error::unsupported(format!(
                    "backing file format '{other}' is not supported"
                )));
            }
        }
    }
    let file = BlockdevOptions::plain(DriverOptions::File(FileOptions { filename: path }));
    let file = BlockdevRef::Inline(Box::new(file));
    let driver = match first_format.as_deref() {
        Some("qcow2") => DriverOptions::Qcow2(Qcow2Options {
            file,
            backing: crate::options::BackingRef::FromHeader,
            l2_cache_size: None,
        }),
        _ => DriverOptions::Raw(RawOptions {
            file,
            offset: None,
            size: None,
            probed: false,
        }),
    };
    let mut options = BlockdevOptions::plain(driver);
    options.read_only = Some(true);
    Ok(options)
}

/// Creates (or replaces) `path` as an empty qcow2 image. Blocking.
pub fn create_file(path: &Path, options: &header::CreateOptions) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let pieces = header::new_image(options)?;
    let create_error =
        |e: std::io::Error| Error::from_io(format!("Could not create '{}'", path.display()), e);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(create_error)?;
    for (offset, bytes) in pieces {
        file.write_all_at(&bytes, offset).map_err(create_error)?;
    }
    file.sync_all().map_err(create_error)?;
    Ok(())
}

/// Virtual size of an image file: the qcow2 header's, or a raw file's length.
pub fn image_size(path: &Path) -> Result<u64> {
    match read_file_header(path)? {
        Some(h) => Ok(h.size),
        None => std::fs::metadata(path)
            .map(|m| m.len())
            .map_err(|e| Error::from_io(format!("Could not open '{}'", path.display()), e)),
    }
}
