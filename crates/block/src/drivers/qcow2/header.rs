//! The qcow2 header and its extensions: parsing with every bound checked, and the
//! bytes of a freshly created image.
//!
//! Layout (qcow2 spec, "Header"; all integers big-endian): a fixed part of 72 bytes
//! (version 2) or `header_length` bytes (version 3, at least 104), then extensions
//! `u32 type, u32 length, data padded to 8` up to an end marker, then the backing file
//! name. Everything lives in the first cluster.
//!
//! Parsing refuses, with a "corrupt" error, anything that would make later code read
//! outside the file, allocate without bound or alias metadata: tables past the end of
//! the file, unaligned table offsets, absurd table sizes, extensions that run off the
//! header cluster, overlapping header/L1/refcount tables.

use crate::error::Error;
use crate::error::ErrorKind;
use crate::error::Result;

/// "QFI\xfb".
pub const MAGIC: u32 = 0x5146_49fb;

/// Incompatible feature bits.
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// The image was found corrupt by a writer; read-only use only.
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Guest data lives in an external file.
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// `compression_type` is not deflate.
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// 16-byte L2 entries with subclusters.
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
const INCOMPAT_KNOWN: u64 = 0x1f;

/// Autoclear bit: the bitmaps extension is consistent with the image.
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;

/// Header extension types.
pub const EXT_END: u32 = 0;
/// Backing file format name.
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Feature name table.
pub const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
/// Persistent dirty bitmaps.
pub const EXT_BITMAPS: u32 = 0x2385_2875;

/// Byte offsets of the header fields the driver rewrites in place.
pub const OFFSET_REFCOUNT_TABLE: u64 = 48;
/// incompatible_features (v3).
pub const OFFSET_INCOMPATIBLE: u64 = 72;
/// autoclear_features (v3).
pub const OFFSET_AUTOCLEAR: u64 = 88;

/// Largest L1 table QEMU accepts (32 MiB), so we accept the same and no more.
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// Largest refcount table QEMU accepts (8 MiB).
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Smallest and largest cluster_bits (512 B .. 2 MiB).
pub const MIN_CLUSTER_BITS: u32 = 9;
/// See [`MIN_CLUSTER_BITS`].
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Longest backing file name the format allows.
pub const MAX_BACKING_NAME: u32 = 1023;
/// Largest virtual size we accept (QEMU's limit: 2^63 - 512 would overflow offsets
/// everywhere; 64 PiB is far beyond any real disk and keeps all arithmetic in range).
pub const MAX_VIRTUAL_SIZE: u64 = 1 << 56;

/// Compression algorithm of compressed clusters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompressionType {
    /// Raw deflate (no zlib header), QEMU's "zlib".
    Deflate,
    /// A zstd frame.
    Zstd,
}

impl CompressionType {
    /// The name qemu-img uses.
    pub fn name(self) -> &'static str {
        match self {
            CompressionType::Deflate => "zlib",
            CompressionType::Zstd => "zstd",
        }
    }
}

/// A parsed header, with the extensions the driver understands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual size in bytes.
    pub size: u64,
    /// Active L1 entries.
    pub l1_size: u64,
    /// Byte offset of the L1 table.
    pub l1_table_offset: u64,
    /// Byte offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Length of the refcount table in clusters.
    pub refcount_table_clusters: u64,
    /// Internal snapshots (their tables are preserved, never written).
    pub nb_snapshots: u32,
    /// Incompatible feature bits.
    pub incompatible: u64,
    /// Compatible feature bits.
    pub compatible: u64,
    /// Autoclear feature bits.
    pub autoclear: u64,
    /// refcount width is `1 << refcount_order` bits.
    pub refcount_order: u32,
    /// Bytes of the fixed header.
    pub header_length: u32,
    /// Algorithm of compressed clusters.
    pub compression: CompressionType,
    /// Backing file name as stored (relative names are relative to the image).
    pub backing_file: Option<String>,
    /// Backing file format from the extension.
    pub backing_format: Option<String>,
    /// The bitmaps extension: (number of bitmaps, directory size, directory offset).
    pub bitmaps: Option<(u32, u64, u64)>,
    /// Every extension as found (type, data), in order, so the header can be rewritten
    /// with one of them changed and the others kept.
    pub extensions: Vec<(u32, Vec<u8>)>,
    /// Names of feature bits from the feature name table: (type, bit, name).
    pub feature_names: Vec<(u8, u8, String)>,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

/// A "corrupt image" error.
pub fn corrupt(message: impl std::fmt::Display) -> Error {
    Error::new(
        ErrorKind::Corrupt,
        format!("corrupt qcow2 image: {message}"),
    )
}

impl Header {
    /// Bytes per cluster.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// L1 entries needed to map `size` bytes with clusters of `1 << cluster_bits`.
    pub fn l1_entries_for(size: u64, cluster_bits: u32) -> u64 {
        let l2_span = (1u64 << cluster_bits) * ((1u64 << cluster_bits) / 8);
        size.div_ceil(l2_span)
    }

    /// How many bytes of the file the header needs to see: the fixed part first, then
    /// the first cluster (extensions and the backing name live there).
    pub const PROBE_LEN: usize = 112;

    /// Parses the header from the start of the file. `first` must hold at least
    /// min(file length, cluster size) bytes; `file_len` bounds every table.
    pub fn parse(first: &[u8], file_len: u64) -> Result<Self> {
        // A file shorter than the magic reads as zeros past its end, as in QEMU: an
        // empty file is "not in qcow2 format", not a corrupt image.
        if first.len() < 4 || be32(first, 0) != MAGIC {
            return Err(Error::invalid("Image is not in qcow2 format"));
        }
        if first.len() < 72 {
            return Err(corrupt("the file is too short for a qcow2 header"));
        }
        let version = be32(first, 4);
        if version != 2 && version != 3 {
            return Err(Error::unsupported(format!(
                "qcow2 version {version} is not supported (only 2 and 3)"
            )));
        }
        let backing_file_offset = be64(first, 8);
        let backing_file_size = be32(first, 16);
        let cluster_bits = be32(first, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(corrupt(format!(
                "cluster size 2^{cluster_bits} is outside 512 B .. 2 MiB"
            )));
        }
        let cluster_size = 1u64 << cluster_bits;
        let size = be64(first, 24);
        let crypt_method = be32(first, 32);
        let l1_size = u64::from(be32(first, 36));
        let l1_table_offset = be64(first, 40);
        let refcount_table_offset = be64(first, 48);
        let refcount_table_clusters = u64::from(be32(first, 56));
        let nb_snapshots = be32(first, 60);
        let (incompatible, compatible, autoclear, refcount_order, header_length) = if version == 3 {
            if first.len() < 104 {
                return Err(corrupt("the file is too short for a version 3 header"));
            }
            let header_length = be32(first, 100);
            if header_length < 104 || u64::from(header_length) > cluster_size {
                return Err(corrupt(format!(
                    "header length {header_length} is not between 104 and the cluster size"
                )));
            }
            (
                be64(first, 72),
                be64(first, 80),
                be64(first, 88),
                be32(first, 96),
                header_length,
            )
        } else {
            (0, 0, 0, 4, 72)
        };
        if first.len() < (header_length as usize).min(cluster_size as usize) {
            return Err(corrupt("the header is cut short by the end of the file"));
        }
        let compression_byte = if header_length >= 105 { first[104] } else { 0 };
        let compression = match (compression_byte, incompatible & INCOMPAT_COMPRESSION != 0) {
            (0, false) => CompressionType::Deflate,
            (1, true) => CompressionType::Zstd,
            (0, true) => {
                return Err(corrupt(
                    "the compression-type feature bit is set but the type is deflate",
                ));
            }
            (1, false) => {
                return Err(corrupt(
                    "compression type zstd without the compression-type feature bit",
                ));
            }
            (other, _) => {
                return Err(Error::unsupported(format!(
                    "unknown qcow2 compression type {other}"
                )));
            }
        };

        let mut header = Header {
            version,
            cluster_bits,
            size,
            l1_size,
            l1_table_offset,
            refcount_table_offset,
            refcount_table_clusters,
            nb_snapshots,
            incompatible,
            compatible,
            autoclear,
            refcount_order,
            header_length,
            compression,
            backing_file: None,
            backing_format: None,
            bitmaps: None,
            extensions: Vec::new(),
            feature_names: Vec::new(),
        };
        let header_area = &first[..first.len().min(cluster_size as usize)];
        header.parse_extensions(header_area, backing_file_offset)?;

        let unknown = incompatible & !INCOMPAT_KNOWN;
        if unknown != 0 {
            return Err(Error::unsupported(format!(
                "Unsupported qcow2 feature(s): {}",
                header.feature_list(0, unknown)
            )));
        }
        if incompatible & INCOMPAT_DATA_FILE != 0 {
            return Err(Error::unsupported(
                "qcow2 images with an external data file are not supported",
            ));
        }
        if incompatible & INCOMPAT_EXTL2 != 0 {
            return Err(Error::unsupported(
                "qcow2 images with extended L2 entries (subclusters) are not supported",
            ));
        }
        if crypt_method != 0 {
            return Err(Error::unsupported(
                "encrypted qcow2 images are not supported",
            ));
        }
        if refcount_order > 6 {
            return Err(corrupt(format!(
                "refcount width 2^{refcount_order} bits is more than 64"
            )));
        }
        if size > MAX_VIRTUAL_SIZE {
            return Err(corrupt(format!("virtual size {size} is too large")));
        }

        if backing_file_offset != 0 {
            if backing_file_size == 0 || backing_file_size > MAX_BACKING_NAME {
                return Err(corrupt(format!(
                    "backing file name length {backing_file_size} is not 1..1023"
                )));
            }
            let end = backing_file_offset
                .checked_add(u64::from(backing_file_size))
                .filter(|&end| end <= header_area.len() as u64)
                .ok_or_else(|| corrupt("the backing file name lies outside the header"))?;
            let name = &header_area[backing_file_offset as usize..end as usize];
            let name = std::str::from_utf8(name)
                .map_err(|_| Error::unsupported("the backing file name is not UTF-8"))?;
            header.backing_file = Some(name.to_string());
        }

        // The L1 table: large enough for the disk, within QEMU's limit, in the file.
        if l1_size * 8 > MAX_L1_BYTES {
            return Err(corrupt(format!(
                "the L1 table ({l1_size} entries) is larger than 32 MiB"
            )));
        }
        if l1_size < Self::l1_entries_for(size, cluster_bits) {
            return Err(corrupt(format!(
                "the L1 table ({l1_size} entries) is too small for the virtual size {size}"
            )));
        }
        let check_table = |what: &str, offset: u64, bytes: u64| -> Result<()> {
            if bytes == 0 {
                return Ok(());
            }
            if !offset.is_multiple_of(cluster_size) {
                return Err(corrupt(format!(
                    "the {what} offset {offset:#x} is not cluster aligned"
                )));
            }
            if offset == 0 {
                return Err(corrupt(format!("the {what} overlaps the header")));
            }
            match offset.checked_add(bytes) {
                Some(end) if end <= file_len => Ok(()),
                _ => Err(corrupt(format!(
                    "the {what} at offset {offset:#x} ({bytes} bytes) lies beyond the end \
                     of the file ({file_len} bytes)"
                ))),
            }
        };
        check_table("L1 table", l1_table_offset, l1_size * 8)?;
        if refcount_table_clusters == 0 {
            return Err(corrupt("the refcount table is empty"));
        }
        if refcount_table_clusters * cluster_size > MAX_REFTABLE_BYTES {
            return Err(corrupt(format!(
                "the refcount table ({refcount_table_clusters} clusters) is larger than 8 MiB"
            )));
        }
        check_table(
            "refcount table",
            refcount_table_offset,
            refcount_table_clusters * cluster_size,
        )?;
        let l1_clusters = (l1_size * 8).div_ceil(cluster_size);
        if l1_size > 0
            && ranges_overlap(
                l1_table_offset,
                l1_clusters * cluster_size,
                refcount_table_offset,
                refcount_table_clusters * cluster_size,
            )
        {
            return Err(corrupt("the L1 table overlaps the refcount table"));
        }
        Ok(header)
    }

    fn parse_extensions(&mut self, area: &[u8], backing_file_offset: u64) -> Result<()> {
        let mut at = if self.version == 3 {
            self.header_length as usize
        } else {
            72
        };
        // Extensions end at the backing file name when there is one.
        let limit = if backing_file_offset != 0 && (backing_file_offset as usize) < area.len() {
            backing_file_offset as usize
        } else {
            area.len()
        };
        let mut seen = Vec::new();
        loop {
            if at + 8 > limit {
                // Version 2 images may end their header without an end marker.
                if self.version == 2 {
                    return Ok(());
                }
                return Err(corrupt("header extensions run past the header cluster"));
            }
            let kind = be32(area, at);
            let len = be32(area, at + 4) as usize;
            at += 8;
            if kind == EXT_END {
                return Ok(());
            }
            if len > limit - at {
                return Err(corrupt(format!(
                    "header extension {kind:#x} ({len} bytes) runs past the header cluster"
                )));
            }
            if seen.contains(&kind) {
                return Err(corrupt(format!("header extension {kind:#x} appears twice")));
            }
            seen.push(kind);
            let data = &area[at..at + len];
            self.extensions.push((kind, data.to_vec()));
            match kind {
                EXT_BACKING_FORMAT => {
                    let name = std::str::from_utf8(data)
                        .map_err(|_| corrupt("the backing format name is not UTF-8"))?;
                    self.backing_format = Some(name.trim_end_matches('\0').to_string());
                }
                EXT_FEATURE_TABLE => {
                    for entry in data.chunks_exact(48) {
                        let name = &entry[2..];
                        let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
                        let name = String::from_utf8_lossy(&name[..end]).into_owned();
                        self.feature_names.push((entry[0], entry[1], name));
                    }
                }
                EXT_BITMAPS if data.len() >= 24 => {
                    self.bitmaps = Some((be32(data, 0), be64(data, 8), be64(data, 16)));
                }
                _ => {} // skippable by definition
            }
            at += len.div_ceil(8) * 8;
        }
    }

    /// Names the set bits of a feature mask ("dirty bit, bit 17").
    fn feature_list(&self, kind: u8, mask: u64) -> String {
        let mut names = Vec::new();
        for bit in 0..64 {
            if mask & (1 << bit) == 0 {
                continue;
            }
            match self
                .feature_names
                .iter()
                .find(|(t, b, _)| *t == kind && u32::from(*b) == bit)
            {
                Some((_, _, name)) => names.push(name.clone()),
                None => names.push(format!("Unknown incompatible feature: {:x}", 1u64 << bit)),
            }
        }
        names.join(", ")
    }
}

/// Rebuilds the extension area of header cluster `cluster0` (the fixed header stays):
/// `extensions` in order, the end marker, then the backing file name, whose offset is
/// updated in the fixed header.
pub fn rewrite_extensions(
    cluster0: &mut [u8],
    header_length: usize,
    extensions: &[(u32, Vec<u8>)],
    backing_file: Option<&str>,
) -> Result<()> {
    let mut at = header_length;
    let area_len = cluster0.len();
    let mut out = Vec::new();
    for (kind, data) in extensions {
        out.extend_from_slice(&kind.to_be_bytes());
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(8) * 8, 0);
    }
    out.extend_from_slice(&[0; 8]);
    let name = backing_file.map(str::as_bytes).unwrap_or_default();
    if at + out.len() + name.len() > area_len {
        return Err(Error::new(
            ErrorKind::NoSpace,
            "the qcow2 header extensions do not fit in the first cluster",
        ));
    }
    cluster0[at..].fill(0);
    cluster0[at..at + out.len()].copy_from_slice(&out);
    at += out.len();
    if !name.is_empty() {
        cluster0[at..at + name.len()].copy_from_slice(name);
        cluster0[8..16].copy_from_slice(&(at as u64).to_be_bytes());
        cluster0[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
    }
    Ok(())
}

fn ranges_overlap(a: u64, a_len: u64, b: u64, b_len: u64) -> bool {
    a < b.saturating_add(b_len) && b < a.saturating_add(a_len)
}

/// What a new image looks like.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Virtual size in bytes (rounded up to 512, as QEMU does).
    pub size: u64,
    /// log2 of the cluster size (9..=21).
    pub cluster_bits: u32,
    /// Backing file name to record.
    pub backing_file: Option<String>,
    /// Backing format to record.
    pub backing_format: Option<String>,
    /// Compression algorithm.
    pub compression: CompressionType,
    /// refcount width 2^order bits (QEMU default 4).
    pub refcount_order: u32,
}

impl Default for CreateOptions {
    fn default() -> Self {
        Self {
            size: 0,
            cluster_bits: 16,
            backing_file: None,
            backing_format: None,
            compression: CompressionType::Deflate,
            refcount_order: 4,
        }
    }
}

/// The feature name table we write: every feature this driver knows by name.
const FEATURE_NAMES: &[(u8, u8, &str)] = &[
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
];

/// The metadata of a new, empty image: `(offset, bytes)` pieces to write, in order.
///
/// Layout, as qemu-img lays it out: cluster 0 header, cluster 1 refcount table,
/// cluster 2 the first refcount block, then the L1 table (whole clusters). The
/// refcount block covers those clusters; for tiny cluster sizes the metadata may need
/// more refcount blocks and a longer table, which the loop below sizes.
pub fn new_image(options: &CreateOptions) -> Result<Vec<(u64, Vec<u8>)>> {
    let bits = options.cluster_bits;
    if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&bits) {
        return Err(Error::invalid(
            "Cluster size must be a power of two between 512 and 2048k",
        ));
    }
    if options.refcount_order > 6 {
        return Err(Error::invalid(
            "Refcount width must be a power of two and may not exceed 64 bits",
        ));
    }
    let cs = 1u64 << bits;
    let size = options.size.div_ceil(512) * 512;
    if size > MAX_VIRTUAL_SIZE {
        return Err(Error::invalid(format!("Image size {size} is too large")));
    }
    let l1_size = Header::l1_entries_for(size, bits);
    if l1_size * 8 > MAX_L1_BYTES {
        return Err(Error::invalid(format!(
            "Image size {size} needs an L1 table larger than 32 MiB at this cluster size"
        )));
    }
    let l1_clusters = (l1_size * 8).div_ceil(cs).max(1);
    let rb_entries = (cs * 8) >> options.refcount_order;
    // Find table/block counts that cover every metadata cluster, themselves included.
    let mut rt_clusters = 1u64;
    let mut rb_count = 1u64;
    loop {
        let total = 1 + rt_clusters + rb_count + l1_clusters;
        let need_rb = total.div_ceil(rb_entries);
        let need_rt = (need_rb * 8).div_ceil(cs);
        if need_rb <= rb_count && need_rt <= rt_clusters {
            break;
        }
        rb_count = rb_count.max(need_rb);
        rt_clusters = rt_clusters.max(need_rt);
    }
    if rt_clusters * cs > MAX_REFTABLE_BYTES {
        return Err(Error::invalid("the refcount table would exceed 8 MiB"));
    }
    let rt_offset = cs;
    let rb_offset = rt_offset + rt_clusters * cs;
    let l1_offset = rb_offset + rb_count * cs;
    let total_clusters = 1 + rt_clusters + rb_count + l1_clusters;

    // Header cluster.
    let mut h = vec![0u8; cs as usize];
    let put32 =
        |h: &mut Vec<u8>, at: usize, v: u32| h[at..at + 4].copy_from_slice(&v.to_be_bytes());
    let put64 =
        |h: &mut Vec<u8>, at: usize, v: u64| h[at..at + 8].copy_from_slice(&v.to_be_bytes());
    put32(&mut h, 0, MAGIC);
    put32(&mut h, 4, 3);
    put32(&mut h, 20, bits);
    put64(&mut h, 24, size);
    put32(&mut h, 36, l1_size as u32);
    put64(&mut h, 40, l1_offset);
    put64(&mut h, 48, rt_offset);
    put32(&mut h, 56, rt_clusters as u32);
    let incompatible = match options.compression {
        CompressionType::Deflate => 0,
        CompressionType::Zstd => INCOMPAT_COMPRESSION,
    };
    put64(&mut h, 72, incompatible);
    put32(&mut h, 96, options.refcount_order);
    put32(&mut h, 100, 112);
    h[104] = match options.compression {
        CompressionType::Deflate => 0,
        CompressionType::Zstd => 1,
    };
    let mut at = 112usize;
    let ext = |h: &mut Vec<u8>, at: &mut usize, kind: u32, data: &[u8]| -> Result<()> {
        let padded = data.len().div_ceil(8) * 8;
        if *at + 8 + padded + 8 > h.len() {
            return Err(Error::invalid(
                "the header extensions do not fit in one cluster",
            ));
        }
        put32(h, *at, kind);
        put32(h, *at + 4, data.len() as u32);
        h[*at + 8..*at + 8 + data.len()].copy_from_slice(data);
        *at += 8 + padded;
        Ok(())
    };
    if let Some(format) = &options.backing_format {
        ext(&mut h, &mut at, EXT_BACKING_FORMAT, format.as_bytes())?;
    }
    let mut table = Vec::with_capacity(FEATURE_NAMES.len() * 48);
    for (kind, bit, name) in FEATURE_NAMES {
        let mut entry = [0u8; 48];
        entry[0] = *kind;
        entry[1] = *bit;
        entry[2..2 + name.len()].copy_from_slice(name.as_bytes());
        table.extend_from_slice(&entry);
    }
    ext(&mut h, &mut at, EXT_FEATURE_TABLE, &table)?;
    at += 8; // end marker (zeros)
    if let Some(name) = &options.backing_file {
        if name.is_empty() || name.len() > MAX_BACKING_NAME as usize {
            return Err(Error::invalid(
                "the backing file name must be 1 to 1023 bytes long",
            ));
        }
        if at + name.len() > h.len() {
            return Err(Error::invalid(
                "the backing file name does not fit in the header",
            ));
        }
        h[at..at + name.len()].copy_from_slice(name.as_bytes());
        put64(&mut h, 8, at as u64);
        put32(&mut h, 16, name.len() as u32);
    }

    // Refcount table: one entry per block.
    let mut rt = vec![0u8; (rt_clusters * cs) as usize];
    for i in 0..rb_count {
        let off = rb_offset + i * cs;
        rt[(i * 8) as usize..(i * 8 + 8) as usize].copy_from_slice(&off.to_be_bytes());
    }
    // Refcount blocks: refcount 1 for each metadata cluster.
    let mut rb = vec![0u8; (rb_count * cs) as usize];
    for cluster in 0..total_clusters {
        super::refcount::set(&mut rb, options.refcount_order, cluster, 1);
    }
    // The L1 table: written as whole clusters of zeros.
    let l1 = vec![0u8; (l1_clusters * cs) as usize];
    Ok(vec![
        (0, h),
        (rt_offset, rt),
        (rb_offset, rb),
        (l1_offset, l1),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(options: &CreateOptions) -> Vec<u8> {
        let mut file = Vec::new();
        for (offset, bytes) in new_image(options).unwrap() {
            let end = offset as usize + bytes.len();
            if file.len() < end {
                file.resize(end, 0);
            }
            file[offset as usize..end].copy_from_slice(&bytes);
        }
        file
    }

    #[test]
    fn a_new_image_parses_back() {
        let options = CreateOptions {
            size: 64 << 20,
            backing_file: Some("base.qcow2".into()),
            backing_format: Some("qcow2".into()),
            ..CreateOptions::default()
        };
        let file = image(&options);
        let header = Header::parse(&file[..65536], file.len() as u64).unwrap();
        assert_eq!(header.version, 3);
        assert_eq!(header.size, 64 << 20);
        assert_eq!(header.cluster_size(), 65536);
        assert_eq!(header.l1_size, 1);
        assert_eq!(header.refcount_table_offset, 65536);
        assert_eq!(header.backing_file.as_deref(), Some("base.qcow2"));
        assert_eq!(header.backing_format.as_deref(), Some("qcow2"));
        assert_eq!(header.feature_names.len(), FEATURE_NAMES.len());
    }

    #[test]
    fn an_empty_or_foreign_file_is_not_qcow2_and_a_cut_header_is_corrupt() {
        for first in [&b""[..], b"QF", b"\0\0\0\0 raw data, not an image"] {
            let e = Header::parse(first, first.len() as u64).unwrap_err();
            assert_eq!(e.to_string(), "Image is not in qcow2 format");
        }
        let cut = &image(&CreateOptions::default())[..40];
        let e = Header::parse(cut, 40).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    }

    #[test]
    fn hostile_headers_are_refused_as_corrupt() {
        let file = image(&CreateOptions {
            size: 1 << 30,
            ..CreateOptions::default()
        });
        let parse = |f: &[u8]| Header::parse(&f[..f.len().min(65536)], f.len() as u64);
        let mutate = |at: usize, bytes: &[u8]| {
            let mut f = file.clone();
            f[at..at + bytes.len()].copy_from_slice(bytes);
            parse(&f).unwrap_err()
        };
        // L1 table past the end of the file.
        let e = mutate(40, &(1u64 << 40).to_be_bytes());
        assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
        // Absurd L1 size.
        let e = mutate(36, &u32::MAX.to_be_bytes());
        assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
        assert!(e.to_string().contains("32 MiB"), "{e}");
        // Absurd refcount table.
        let e = mutate(56, &u32::MAX.to_be_bytes());
        assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
        // L1 over the refcount table.
        let e = mutate(40, &65536u64.to_be_bytes());
        assert!(e.to_string().contains("overlaps"), "{e}");
        // L1 on the header.
        let e = mutate(40, &0u64.to_be_bytes());
        assert!(e.to_string().contains("header"), "{e}");
        // Unaligned refcount table.
        let e = mutate(48, &65537u64.to_be_bytes());
        assert!(e.to_string().contains("aligned"), "{e}");
        // Cluster bits out of range.
        let e = mutate(20, &30u32.to_be_bytes());
        assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
        // Unknown incompatible feature.
        let e = mutate(72, &(1u64 << 20).to_be_bytes());
        assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
        // Extended L2.
        let e = mutate(72, &INCOMPAT_EXTL2.to_be_bytes());
        assert!(e.to_string().contains("extended L2"), "{e}");
        // An extension claiming to be longer than the cluster.
        let e = mutate(116, &u32::MAX.to_be_bytes());
        assert!(e.to_string().contains("extension"), "{e}");
        // Truncated file.
        assert!(parse(&file[..50]).is_err());
    }
}
