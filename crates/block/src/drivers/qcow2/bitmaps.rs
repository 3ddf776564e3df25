//! Persistent dirty bitmaps in qcow2's bitmaps extension (spec: "Bitmaps extension").
//!
//! On disk: the extension names a *bitmap directory* (one variable-size entry per
//! bitmap: table offset and size, flags, type, granularity, name); each bitmap's
//! *table* lists the clusters of its data (0 = an all-zero cluster); the data is one
//! bit per granule, least significant bit first.
//!
//! Life cycle, as QEMU does it: opening for writing sets `in_use` on every bitmap in
//! the directory (in place, durably) before any guest write; a clean close writes the
//! current bits to new clusters, then a new directory, then switches the header to it
//! with `in_use` clear, then frees the old clusters. A bitmap found `in_use` at open
//! was not saved (a crash): it is loaded as *inconsistent* and no backup may use it.

use bitmap::Bitmap;

use super::header::corrupt;
use crate::error::Result;

/// Directory entry flag: not saved cleanly.
pub const FLAG_IN_USE: u32 = 1 << 0;
/// Directory entry flag: recording ("enabled").
pub const FLAG_AUTO: u32 = 1 << 1;
/// Largest directory QEMU accepts (64 KiB per bitmap would be absurd; QEMU caps the
/// whole directory at 64 MiB).
const MAX_DIRECTORY: u64 = 64 << 20;

/// One directory entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Offset of the bitmap table.
    pub table_offset: u64,
    /// Entries in the table.
    pub table_size: u32,
    /// FLAG_* bits.
    pub flags: u32,
    /// log2 of the granularity.
    pub granularity_bits: u8,
    /// Name.
    pub name: String,
    /// Offset of this entry's flags field inside the directory.
    pub flags_at: usize,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

/// Checks the extension's directory location before it is read.
pub fn check_directory(nb: u32, size: u64, offset: u64, cs: u64, file_len: u64) -> Result<()> {
    if nb == 0 || nb > 65535 {
        return Err(corrupt(format!("the bitmaps extension lists {nb} bitmaps")));
    }
    if size == 0 || size > MAX_DIRECTORY {
        return Err(corrupt(format!(
            "the bitmap directory size {size} is absurd"
        )));
    }
    if !offset.is_multiple_of(cs) || offset == 0 || offset.saturating_add(size) > file_len {
        return Err(corrupt(format!(
            "the bitmap directory at {offset:#x} is unaligned or beyond the end of the file"
        )));
    }
    Ok(())
}

/// Refuses a bitmap bigger than [`crate::dirty::MAX_BITMAP_BYTES`] before any memory
/// is allocated for it (QEMU refuses it too, "doesn't satisfy the constraints"; a
/// crafted 68 KiB image naming a 512 TiB disk at 512-byte granularity asked for
/// 128 GiB).
pub fn check_size(entry: &Entry, disk_size: u64, cluster_size: u64) -> Result<()> {
    let granularity = 1u64 << entry.granularity_bits;
    let bytes = data_len(disk_size, granularity);
    let stored = u64::from(entry.table_size) * cluster_size;
    if bytes.max(stored) > crate::dirty::MAX_BITMAP_BYTES {
        return Err(crate::error::Error::unsupported(format!(
            "Bitmap '{}' doesn't satisfy the constraints: its bits take {} (a {} disk at \
             {}-byte granularity), more than the {} a bitmap may take",
            entry.name,
            crate::dirty::human_size(bytes.max(stored)),
            crate::dirty::human_size(disk_size),
            granularity,
            crate::dirty::human_size(crate::dirty::MAX_BITMAP_BYTES)
        )));
    }
    Ok(())
}

/// Sets `count` granules of `bits` from granule `first` on (clipped to the bitmap).
pub fn set_granules(bits: &mut Bitmap, first: u64, count: u64) {
    let g = bits.granularity();
    let granules = bits.size().div_ceil(g);
    let last = first.saturating_add(count).min(granules);
    if first < last {
        let start = first * g;
        let end = (last * g).min(bits.size());
        bits.set(start, end - start);
    }
}

/// Parses `nb` directory entries.
pub fn parse_directory(bytes: &[u8], nb: u32) -> Result<Vec<Entry>> {
    let mut entries = Vec::new();
    let mut at = 0usize;
    for i in 0..nb {
        if at + 24 > bytes.len() {
            return Err(corrupt(format!("bitmap directory entry {i} is cut short")));
        }
        let name_size = u16::from_be_bytes([bytes[at + 18], bytes[at + 19]]) as usize;
        let extra = be32(bytes, at + 20) as usize;
        let end = at + 24 + extra + name_size;
        if name_size == 0 || name_size > 1023 || end > bytes.len() {
            return Err(corrupt(format!("bitmap directory entry {i} is malformed")));
        }
        let kind = bytes[at + 16];
        let granularity_bits = bytes[at + 17];
        if kind != 1 || !(9..=31).contains(&granularity_bits) {
            return Err(corrupt(format!(
                "bitmap directory entry {i} has type {kind} or granularity 2^{granularity_bits}"
            )));
        }
        let name = std::str::from_utf8(&bytes[at + 24 + extra..end])
            .map_err(|_| corrupt(format!("bitmap {i}'s name is not UTF-8")))?
            .to_string();
        entries.push(Entry {
            table_offset: be64(bytes, at),
            table_size: be32(bytes, at + 8),
            flags: be32(bytes, at + 12),
            granularity_bits,
            name,
            flags_at: at + 12,
        });
        at = end.div_ceil(8) * 8;
    }
    Ok(entries)
}

/// Encodes directory entries (no extra data) and returns the bytes.
pub fn encode_directory(entries: &[Entry]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        out.extend_from_slice(&e.table_offset.to_be_bytes());
        out.extend_from_slice(&e.table_size.to_be_bytes());
        out.extend_from_slice(&e.flags.to_be_bytes());
        out.push(1);
        out.push(e.granularity_bits);
        out.extend_from_slice(&(e.name.len() as u16).to_be_bytes());
        out.extend_from_slice(&0u32.to_be_bytes());
        out.extend_from_slice(e.name.as_bytes());
        out.resize(out.len().div_ceil(8) * 8, 0);
    }
    out
}

/// Bytes of bitmap data for a disk of `size` bytes at `granularity`.
pub fn data_len(size: u64, granularity: u64) -> u64 {
    size.div_ceil(granularity).div_ceil(8)
}

/// The on-disk bytes of `bits` (bit i of byte j = granule 8j + i).
pub fn encode_bits(bits: &Bitmap) -> Vec<u8> {
    let g = bits.granularity();
    let mut out = vec![0u8; data_len(bits.size(), g) as usize];
    for (offset, len) in bits.dirty_areas() {
        let first = offset / g;
        let last = (offset + len - 1) / g;
        for granule in first..=last {
            out[(granule / 8) as usize] |= 1 << (granule % 8);
        }
    }
    out
}

/// Sets in `bits` every granule marked in `data`, which starts at granule `first`.
pub fn decode_into(bits: &mut Bitmap, data: &[u8], first: u64) {
    let g = bits.granularity();
    let granules = bits.size().div_ceil(g);
    for (i, &byte) in data.iter().enumerate() {
        if byte == 0 {
            continue;
        }
        for bit in 0..8 {
            let granule = first + i as u64 * 8 + bit;
            if byte & (1 << bit) != 0 && granule < granules {
                bits.set(granule * g, g);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directory_and_bits_round_trip() {
        let entries = vec![
            Entry {
                table_offset: 0x30000,
                table_size: 1,
                flags: FLAG_AUTO,
                granularity_bits: 16,
                name: "bm0".into(),
                flags_at: 12,
            },
            Entry {
                table_offset: 0x40000,
                table_size: 2,
                flags: FLAG_IN_USE,
                granularity_bits: 9,
                name: "a longer bitmap name".into(),
                flags_at: 32 + 12,
            },
        ];
        let bytes = encode_directory(&entries);
        assert_eq!(parse_directory(&bytes, 2).unwrap(), entries);
        assert!(parse_directory(&bytes[..30], 2).is_err());

        let mut bits = Bitmap::new(10 << 20, 65536).unwrap();
        bits.set(0, 1);
        bits.set(3 << 20, 200_000);
        let data = encode_bits(&bits);
        assert_eq!(data.len(), 20);
        let mut back = Bitmap::new(10 << 20, 65536).unwrap();
        decode_into(&mut back, &data, 0);
        assert!(back == bits);
    }
}
