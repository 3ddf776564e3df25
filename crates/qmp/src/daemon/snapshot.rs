//! External snapshots over QMP, the first step of QEMU's documented backup flow
//! (live-block-operations.rst): `blockdev-snapshot-sync` creates a qcow2 overlay
//! backed by a node and puts it in the node's place; `blockdev-snapshot` does the same
//! with an overlay already added (`backing: null`). The graph does the switch (see
//! `block::graph` external snapshots); this module parses QEMU's arguments and makes
//! the overlay image.

use std::path::PathBuf;

use block::BlockdevOptions;
use block::NodeGraph;
use block::qapi::Members;
use serde_json::json;

use crate::error::QmpError;
use crate::error::Reply;

/// `blockdev-snapshot-sync`: device or node-name, snapshot-file, snapshot-node-name,
/// format (qcow2, the only format with backing files here), mode. The checks come in
/// QEMU's order: the node, the new name, then the image is made (absolute-paths) and
/// opened, then it takes the node's place.
pub async fn blockdev_snapshot_sync(graph: &NodeGraph, mut m: Members) -> Reply {
    let device = m.optional("device", Members::string)?;
    let node_name = m.optional("node-name", Members::string)?;
    let file = PathBuf::from(m.required("snapshot-file", Members::string)?);
    let snapshot_node = m.optional("snapshot-node-name", Members::string)?;
    let format = m
        .optional("format", Members::string)?
        .unwrap_or_else(|| "qcow2".into());
    let mode = m
        .optional("mode", |m, k, v| {
            m.enumeration(k, v, &["existing", "absolute-paths"])
        })?
        .unwrap_or_else(|| "absolute-paths".into());
    m.finish()?;
    // `device` names a block backend, and qemu-storage-daemon (like stillpoint) has
    // none: only `node-name` can find the node.
    let node = node_name
        .as_deref()
        .and_then(|name| graph.node(name))
        .ok_or_else(|| {
            QmpError::generic(format!(
                "Cannot find device='{}' nor node-name='{}'",
                device.as_deref().unwrap_or_default(),
                node_name.as_deref().unwrap_or_default()
            ))
        })?;
    let Some(snapshot_node) = snapshot_node else {
        return Err(QmpError::generic("New overlay node-name missing"));
    };
    if graph.node(&snapshot_node).is_some() {
        return Err(QmpError::generic("New overlay node-name already in use"));
    }
    graph.check_snapshot_base(node.name())?;
    if mode == "absolute-paths" {
        match format.as_str() {
            "qcow2" => {
                let options = block::drivers::qcow2::header::CreateOptions {
                    size: node.length(),
                    backing_file: node.filename().map(|p| p.display().to_string()),
                    backing_format: Some(node.driver_name().to_string()),
                    ..Default::default()
                };
                block::drivers::qcow2::create_file(&file, &options)?;
            }
            "raw" => {
                return Err(QmpError::generic(
                    "Backing file not supported for file format 'raw'",
                ));
            }
            other => return Err(crate::daemon::legacy::unknown_format(other)),
        }
    }
    // Opened with no backing of its own (an existing image may name one): the node
    // becomes its backing as the overlay takes its place.
    let mut options = json!({
        "driver": format,
        "node-name": snapshot_node,
        "file": {"driver": "file", "filename": file},
    });
    if format == "qcow2" {
        options["backing"] = serde_json::Value::Null;
    }
    let overlay = graph.open(BlockdevOptions::from_json(options)?).await?;
    drop(overlay);
    if let Err(e) = graph.snapshot_onto(node.name(), &snapshot_node).await {
        if let Err(removal) = graph.remove(&snapshot_node).await {
            tracing::warn!(
                "removing the overlay {snapshot_node} after a failed snapshot: {removal}"
            );
        }
        return Err(e.into());
    }
    Ok(json!({}))
}

/// `blockdev-snapshot`: node, overlay.
pub async fn blockdev_snapshot(graph: &NodeGraph, mut m: Members) -> Reply {
    let node = m.required("node", Members::string)?;
    let overlay = m.required("overlay", Members::string)?;
    m.finish()?;
    graph.snapshot_onto(&node, &overlay).await?;
    Ok(json!({}))
}
