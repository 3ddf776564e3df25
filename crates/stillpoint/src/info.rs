//! `stillpoint info`: format, virtual size and space used, as qemu-img info reports them.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use serde::Serialize;

/// What `info` reports about an image.
#[derive(Debug, Serialize)]
pub struct ImageInfo {
    /// Guest-visible size in bytes.
    #[serde(rename = "virtual-size")]
    pub virtual_size: u64,
    /// The path as given.
    pub filename: String,
    /// Format name ("raw").
    pub format: &'static str,
    /// Bytes the file occupies on the host filesystem.
    #[serde(rename = "actual-size")]
    pub actual_size: u64,
    /// qcow2 cluster size.
    #[serde(rename = "cluster-size", skip_serializing_if = "Option::is_none")]
    pub cluster_size: Option<u64>,
    /// Backing file name as stored in the image.
    #[serde(rename = "backing-filename", skip_serializing_if = "Option::is_none")]
    pub backing_filename: Option<String>,
    /// Backing file format as stored in the image.
    #[serde(
        rename = "backing-filename-format",
        skip_serializing_if = "Option::is_none"
    )]
    pub backing_filename_format: Option<String>,
    /// Whether the image is marked as not cleanly closed (never, for raw).
    #[serde(rename = "dirty-flag")]
    pub dirty_flag: bool,
}

/// Space the file occupies on disk (st_blocks is in 512-byte units).
pub fn allocated_bytes(path: &Path) -> std::io::Result<u64> {
    Ok(std::fs::metadata(path)?.blocks() * 512)
}

/// qemu's size text: three significant digits and a binary unit ("1 MiB", "4.5 KiB").
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut unit = 0;
    let mut value = bytes as f64;
    while value >= 1000.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    let text = if value >= 100.0 || unit == 0 {
        format!("{value:.0}")
    } else if value >= 10.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.2}")
    };
    let text = if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        text
    };
    format!("{text} {}", UNITS[unit])
}

/// The human form of `info`.
pub fn to_human(info: &ImageInfo) -> String {
    let mut out = format!(
        "image: {}\nfile format: {}\nvirtual size: {} ({} bytes)\ndisk size: {}\n",
        info.filename,
        info.format,
        human_size(info.virtual_size),
        info.virtual_size,
        human_size(info.actual_size)
    );
    if let Some(cs) = info.cluster_size {
        out.push_str(&format!("cluster_size: {cs}\n"));
    }
    if let Some(b) = &info.backing_filename {
        out.push_str(&format!("backing file: {b}\n"));
    }
    if let Some(f) = &info.backing_filename_format {
        out.push_str(&format!("backing file format: {f}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_like_qemu() {
        assert_eq!(human_size(0), "0 B");
        assert_eq!(human_size(512), "512 B");
        assert_eq!(human_size(1 << 20), "1 MiB");
        assert_eq!(human_size(73728), "72 KiB");
        assert_eq!(human_size(4608), "4.5 KiB");
        assert_eq!(human_size(10 << 30), "10 GiB");
    }
}
