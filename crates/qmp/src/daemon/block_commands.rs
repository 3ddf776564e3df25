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
    // The backing file's name, and the chain's depth: as QEMU counts it, a filter's
    // link to the node it filters is a step too (a stream's copy-on-read filter over
    // an image with two backing layers is 3 deep).
    let backing_name = node
        .backing()
        .and_then(|b| b.node().filename())
        .map(|p| p.display().to_string());
    let below = |n: &block::Node| {
        n.backing()
            .map(|b| b.node())
            .or_else(|| n.driver().filtered_child().map(|c| c.node()))
    };
    let mut depth = 0;
    let mut next = below(node);
    while let Some(n) = next {
        depth += 1;
        next = below(&n);
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
