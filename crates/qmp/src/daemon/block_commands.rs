//! The node commands: `blockdev-add`, `blockdev-del`, `query-named-block-nodes`
//! (QEMU's shape, bitmaps included) and `query-block`.

use block::options::DetectZeroes;
use serde_json::Value;
use serde_json::json;

pub(super) fn node_info(node: &block::Node) -> Value {
    let policy = node.policy();
    let filename = node
        .filename()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let detect = match policy.detect_zeroes {
        DetectZeroes::Off => "off",
        DetectZeroes::On => "on",
        DetectZeroes::Unmap => "unmap",
    };
    // The backing chain: its depth and the first backing file's name.
    let mut depth = 0;
    let mut backing_name = None;
    let mut below = node.backing().map(|b| b.node());
    while let Some(b) = below {
        depth += 1;
        if backing_name.is_none() {
            backing_name = b.filename().map(|p| p.display().to_string());
        }
        below = b.backing().map(|a| a.node());
    }
    let mut image = json!({
        "filename": filename, "format": node.driver_name(), "virtual-size": node.length(),
        "dirty-flag": false,
    });
    if let Some(cs) = node.limits().cluster_size {
        image["cluster-size"] = json!(cs);
    }
    if let Some(specific) = node.driver().format_specific() {
        image["format-specific"] = specific;
    }
    let mut info = json!({
        "node-name": node.name(), "drv": node.driver_name(), "ro": policy.read_only, "file": filename,
        "backing_file_depth": depth, "encrypted": false, "detect_zeroes": detect, "active": true,
        "bps": 0, "bps_rd": 0, "bps_wr": 0, "iops": 0, "iops_rd": 0, "iops_wr": 0,
        "write_threshold": 0,
        "cache": {"writeback": true, "direct": policy.direct, "no-flush": policy.no_flush},
        "image": image,
    });
    if let Some(name) = backing_name {
        info["image"]["backing-filename"] = json!(name);
        info["backing_file"] = json!(name);
    }
    if let Some(bitmaps) = crate::daemon::bitmaps::node_bitmaps(node) {
        info["dirty-bitmaps"] = bitmaps;
    }
    info
}
