//! `stillpoint map`: the allocation map of an image, in qemu-img's words.
//!
//! The JSON output is byte-for-byte what `qemu-img map --output=json` prints for a raw
//! image, so scripts written for one read the other. Two QEMU conventions are kept on
//! purpose:
//!
//! * QEMU sees an image in whole 512-byte sectors, so a 4097-byte file maps as 4608
//!   bytes; the bytes past the end of the file read as zeros (a hole). The `file` node
//!   is already that long (the file driver rounds, as QEMU's does); a node of another
//!   unaligned length, such as a qcow2 image whose header says 4097 bytes, is rounded
//!   here, its tail reported as a zero run with an offset, as QEMU does.
//! * Adjacent runs with the same flags and contiguous host offsets are merged, and a
//!   range with nothing in it (an empty image, or a start past the end) is reported as
//!   one empty, not-present entry.

use std::fmt::Write as _;

use block::Attachment;

/// QEMU's sector size, the unit raw images are measured in.
const SECTOR: u64 = 512;

/// Largest run asked for in one block-status call.
const MAX_QUERY: u64 = 1 << 30;

/// One line of the map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapEntry {
    /// First guest byte.
    pub start: u64,
    /// Length in bytes.
    pub length: u64,
    /// Layer of the backing chain the data comes from (0 = this image).
    pub depth: u32,
    /// Some layer supplies the bytes.
    pub present: bool,
    /// The bytes read as zeros.
    pub zero: bool,
    /// The bytes are stored data.
    pub data: bool,
    /// Stored compressed (qcow2 only).
    pub compressed: bool,
    /// Where the bytes are in the file, when that is meaningful.
    pub offset: Option<u64>,
}

impl MapEntry {
    fn merges_with(&self, next: &MapEntry) -> bool {
        self.start + self.length == next.start
            && (
                self.depth,
                self.present,
                self.zero,
                self.data,
                self.compressed,
            ) == (
                next.depth,
                next.present,
                next.zero,
                next.data,
                next.compressed,
            )
            && match (self.offset, next.offset) {
                (Some(a), Some(b)) => a + self.length == b,
                (None, None) => true,
                _ => false,
            }
    }
}

/// Maps `[start, start + max_length)` of the image (clipped to its sector-rounded
/// length).
pub async fn map(
    node: &Attachment,
    start: u64,
    max_length: Option<u64>,
) -> block::Result<Vec<MapEntry>> {
    let length = node.length();
    let sector_length = length.div_ceil(SECTOR) * SECTOR;
    let end = start
        .saturating_add(max_length.unwrap_or(u64::MAX))
        .min(sector_length);
    let mut entries: Vec<MapEntry> = Vec::new();
    let mut offset = start;
    while offset < end {
        let entry = if offset >= length {
            // The tail of the last sector, past the end of the file: zeros.
            MapEntry {
                start: offset,
                length: end - offset,
                depth: 0,
                present: true,
                zero: true,
                data: false,
                compressed: false,
                offset: Some(offset),
            }
        } else {
            let want = (end.min(length) - offset).min(MAX_QUERY);
            let block::chain::ChainStatus { extent, depth } =
                block::chain::block_status_above(node, offset, want).await?;
            MapEntry {
                start: offset,
                length: extent.length,
                depth,
                present: extent.status.allocated,
                zero: extent.status.zero,
                data: extent.status.data,
                compressed: extent.status.compressed,
                offset: extent.status.host_offset,
            }
        };
        offset += entry.length;
        match entries.last_mut() {
            Some(last) if last.merges_with(&entry) => last.length += entry.length,
            _ => entries.push(entry),
        }
    }
    if entries.is_empty() {
        entries.push(MapEntry {
            start,
            length: 0,
            depth: 0,
            present: false,
            zero: false,
            data: false,
            compressed: false,
            offset: None,
        });
    }
    Ok(entries)
}

/// File names of the layers of the chain under `node`, by depth.
pub fn layer_names(node: &Attachment) -> Vec<String> {
    let mut names = Vec::new();
    let mut current = node.node();
    loop {
        names.push(
            current
                .filename()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
        );
        let Some(below) = current.backing().map(|b| b.node()) else {
            break;
        };
        current = below;
    }
    names
}

/// The JSON qemu-img prints: one object per line, in its spacing.
pub fn to_json(entries: &[MapEntry]) -> String {
    let mut out = String::from("[");
    for (i, e) in entries.iter().enumerate() {
        if i > 0 {
            out.push_str(",\n");
        }
        write!(
            out,
            "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \
             \"data\": {}, \"compressed\": {}",
            e.start, e.length, e.depth, e.present, e.zero, e.data, e.compressed
        )
        .unwrap();
        if let Some(offset) = e.offset {
            write!(out, ", \"offset\": {offset}").unwrap();
        }
        out.push('}');
    }
    out.push_str("]\n");
    out
}

/// C's `%#x`: `0` for zero, `0x...` otherwise.
fn c_hex(v: u64) -> String {
    if v == 0 {
        "0".into()
    } else {
        format!("{v:#x}")
    }
}

/// The human table qemu-img prints: only runs stored as data in a file, named by the
/// layer (`files[depth]`) they come from. Like qemu-img, it cannot show compressed
/// data: the table stops there with an error.
pub fn to_human(entries: &[MapEntry], files: &[String]) -> Result<String, String> {
    let mut out = format!(
        "{:<16}{:<16}{:<16}{}\n",
        "Offset", "Length", "Mapped to", "File"
    );
    let mut rows: Vec<(u64, u64, u64, u32)> = Vec::new();
    let mut failure = None;
    for e in entries.iter().filter(|e| e.data) {
        if e.compressed {
            failure = Some("File contains external, encrypted or compressed clusters.");
            break;
        }
        let Some(host) = e.offset else { continue };
        match rows.last_mut() {
            Some(last)
                if last.0 + last.1 == e.start && last.2 + last.1 == host && last.3 == e.depth =>
            {
                last.1 += e.length;
            }
            _ => rows.push((e.start, e.length, host, e.depth)),
        }
    }
    for (start, length, host, depth) in rows {
        let filename = files.get(depth as usize).map(String::as_str).unwrap_or("");
        writeln!(
            out,
            "{:<16}{:<16}{:<16}{filename}",
            c_hex(start),
            c_hex(length),
            c_hex(host)
        )
        .unwrap();
    }
    match failure {
        Some(message) => Err(format!("{out}\u{0}{message}")),
        None => Ok(out),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(start: u64, length: u64, data: bool) -> MapEntry {
        MapEntry {
            start,
            length,
            depth: 0,
            present: true,
            zero: !data,
            data,
            compressed: false,
            offset: Some(start),
        }
    }

    #[test]
    fn json_matches_qemu_img_spacing() {
        let json = to_json(&[entry(0, 4096, true), entry(4096, 512, false)]);
        assert_eq!(
            json,
            "[{ \"start\": 0, \"length\": 4096, \"depth\": 0, \"present\": true, \"zero\": false, \"data\": true, \"compressed\": false, \"offset\": 0},\n\
             { \"start\": 4096, \"length\": 512, \"depth\": 0, \"present\": true, \"zero\": true, \"data\": false, \"compressed\": false, \"offset\": 4096}]\n"
        );
    }

    #[test]
    fn human_table_lists_data_runs_like_qemu_img() {
        let table = to_human(
            &[entry(0, 4096, false), entry(0x40000000, 0x1000, true)],
            &["b.img".to_string()],
        )
        .unwrap();
        assert_eq!(
            table,
            "Offset          Length          Mapped to       File\n\
             0x40000000      0x1000          0x40000000      b.img\n"
        );
    }

    #[test]
    fn runs_merge_only_when_flags_and_offsets_line_up() {
        let a = entry(0, 10, true);
        assert!(a.merges_with(&entry(10, 5, true)));
        assert!(!a.merges_with(&entry(10, 5, false)));
        assert!(!a.merges_with(&entry(11, 5, true)));
        let mut moved = entry(10, 5, true);
        moved.offset = Some(99);
        assert!(!a.merges_with(&moved));
    }
}
