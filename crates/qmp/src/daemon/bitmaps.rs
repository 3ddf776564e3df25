//! The `block-dirty-bitmap-*` commands, alone and as `transaction` actions.
//!
//! Each command is parsed into a [`BitmapAction`] first, then applied; applying returns
//! an [`Undo`] so a transaction can put everything back when a later action (a
//! backup) fails to start. Messages are QEMU's.
//!
//! In a transaction with backups, bitmap changes must happen at the backups' instant,
//! or a write landing between them would be in the backup but missing from the bitmap
//! meant to track everything after it (or the other way round). So [`BitmapAction::Add`]
//! is applied at once (the backups may name the new bitmap) and cleared again at the
//! instant, remove is applied at once, and clear, enable, disable and merge are only
//! checked at once and applied at the instant, in order, while the sources are drained
//! (see `jobs::start_backups_at`).

use std::sync::Arc;

use block::NodeGraph;
use block::dirty::DirtyBitmap;
use block::qapi::Members;
use serde_json::Value;
use serde_json::json;

use crate::error::QmpError;

/// Names of the commands this module handles.
pub const COMMANDS: &[&str] = &[
    "block-dirty-bitmap-add",
    "block-dirty-bitmap-remove",
    "block-dirty-bitmap-clear",
    "block-dirty-bitmap-enable",
    "block-dirty-bitmap-disable",
    "block-dirty-bitmap-merge",
];

/// One parsed bitmap command; the fields are the QMP arguments of the same names.
#[allow(missing_docs)]
#[derive(Debug)]
pub enum BitmapAction {
    /// `block-dirty-bitmap-add`.
    Add {
        node: String,
        name: String,
        granularity: Option<u64>,
        persistent: bool,
        disabled: bool,
    },
    /// `block-dirty-bitmap-remove`.
    Remove { node: String, name: String },
    /// `block-dirty-bitmap-clear`.
    Clear { node: String, name: String },
    /// `block-dirty-bitmap-enable` / `-disable`.
    Record {
        node: String,
        name: String,
        recording: bool,
    },
    /// `block-dirty-bitmap-merge`.
    Merge {
        node: String,
        target: String,
        sources: Vec<(String, String)>,
    },
}

/// How to take an applied action back.
pub enum Undo {
    /// Remove the bitmap that was added.
    Added(String, String),
    /// Put back a removed bitmap.
    Removed(String, Arc<DirtyBitmap>),
    /// Restore bits and recording state.
    Restore(Arc<DirtyBitmap>, bitmap::Bitmap, bool),
}

/// Parses the arguments of bitmap command `command`.
pub fn parse(command: &str, mut m: Members) -> Result<BitmapAction, QmpError> {
    let node = m.required("node", Members::string)?;
    let action = match command {
        "block-dirty-bitmap-add" => {
            let name = m.required("name", Members::string)?;
            let granularity = m.optional("granularity", Members::unsigned)?;
            let persistent = m.optional("persistent", Members::boolean)?.unwrap_or(false);
            let disabled = m.optional("disabled", Members::boolean)?.unwrap_or(false);
            BitmapAction::Add {
                node,
                name,
                granularity,
                persistent,
                disabled,
            }
        }
        "block-dirty-bitmap-merge" => {
            let target = m.required("target", Members::string)?;
            let list = m.required("bitmaps", |m, k, v| match v {
                Value::Array(items) => Ok(items),
                _ => Err(m.type_error(k, "array")),
            })?;
            let mut sources = Vec::new();
            for (i, item) in list.into_iter().enumerate() {
                match item {
                    Value::String(name) => sources.push((node.clone(), name)),
                    Value::Object(map) => {
                        let mut s = Members::new(map, format!("bitmaps[{i}]."));
                        let n = s.required("node", Members::string)?;
                        let name = s.required("name", Members::string)?;
                        s.finish()?;
                        sources.push((n, name));
                    }
                    _ => {
                        return Err(QmpError::generic(format!(
                            "Invalid parameter type for 'bitmaps[{i}]', expected: \
                             BlockDirtyBitmapOrStr"
                        )));
                    }
                }
            }
            BitmapAction::Merge {
                node,
                target,
                sources,
            }
        }
        _ => {
            let name = m.required("name", Members::string)?;
            match command {
                "block-dirty-bitmap-remove" => BitmapAction::Remove { node, name },
                "block-dirty-bitmap-clear" => BitmapAction::Clear { node, name },
                "block-dirty-bitmap-enable" => BitmapAction::Record {
                    node,
                    name,
                    recording: true,
                },
                _ => BitmapAction::Record {
                    node,
                    name,
                    recording: false,
                },
            }
        }
    };
    m.finish()?;
    Ok(action)
}

fn node(graph: &NodeGraph, name: &str) -> Result<Arc<block::Node>, QmpError> {
    graph
        .node(name)
        .ok_or_else(|| QmpError::generic(format!("Node '{name}' not found")))
}

fn bitmap(graph: &NodeGraph, node_name: &str, name: &str) -> Result<Arc<DirtyBitmap>, QmpError> {
    node(graph, node_name)?
        .bitmap(name)
        .map_err(|e| QmpError::generic(e.message()))
}

impl BitmapAction {
    /// Whether a transaction applies this action at the backups' instant: clear,
    /// enable, disable and merge do; add happens at once (and is cleared at the
    /// instant), remove at once (a backup in the same transaction cannot use it then,
    /// as in QEMU).
    pub fn waits_for_instant(&self) -> bool {
        !matches!(self, BitmapAction::Add { .. } | BitmapAction::Remove { .. })
    }
}

/// Checks that an action a transaction defers ([`BitmapAction::waits_for_instant`])
/// could be applied now, without changing anything. `apply` runs the same checks.
pub fn check(graph: &NodeGraph, action: &BitmapAction) -> Result<(), QmpError> {
    let usable = |b: &DirtyBitmap| b.check_usable().map_err(|e| QmpError::generic(e.message()));
    match action {
        // Never deferred: applying them checks them.
        BitmapAction::Add { .. } | BitmapAction::Remove { .. } => Ok(()),
        BitmapAction::Clear { node: n, name } | BitmapAction::Record { node: n, name, .. } => {
            usable(bitmap(graph, n, name)?.as_ref())
        }
        BitmapAction::Merge {
            node: n,
            target,
            sources,
        } => {
            let dest = bitmap(graph, n, target)?;
            usable(&dest)?;
            // Each source in order, as QEMU checks them: busy (a backup froze it) and
            // inconsistent (not saved cleanly) bitmaps cannot be read either.
            for (sn, sname) in sources {
                let source = bitmap(graph, sn, sname)?;
                usable(&source)?;
                if source.size() != dest.size() {
                    return Err(QmpError::generic(format!(
                        "Bitmap '{sname}' has a different size than '{target}'"
                    )));
                }
            }
            Ok(())
        }
    }
}

/// At the backups' instant: a bitmap added earlier by the same transaction starts
/// empty here (what it recorded until now happened before the backups' point in time).
pub fn start_at_instant(graph: &NodeGraph, action: &BitmapAction) -> Result<(), QmpError> {
    if let BitmapAction::Add { node: n, name, .. } = action {
        bitmap(graph, n, name)?
            .clear()
            .map_err(|e| QmpError::generic(e.message()))?;
    }
    Ok(())
}

/// Applies one action; the returned undo takes it back.
pub fn apply(graph: &NodeGraph, action: &BitmapAction) -> Result<Undo, QmpError> {
    match action {
        BitmapAction::Add {
            node: n,
            name,
            granularity,
            persistent,
            disabled,
        } => {
            // add looks the node up like blockdev commands do, the others by node name.
            graph
                .node(n)
                .ok_or_else(|| {
                    QmpError::generic(format!("Cannot find device='{n}' nor node-name='{n}'"))
                })?
                .add_bitmap(name, *granularity, *persistent, *disabled)
                .map_err(|e| QmpError::generic(e.message()))?;
            Ok(Undo::Added(n.clone(), name.clone()))
        }
        BitmapAction::Remove { node: n, name } => {
            let removed = node(graph, n)?
                .remove_bitmap(name)
                .map_err(|e| QmpError::generic(e.message()))?;
            Ok(Undo::Removed(n.clone(), removed))
        }
        BitmapAction::Clear { node: n, name } => {
            let b = bitmap(graph, n, name)?;
            let before = (b.snapshot(), b.info().recording);
            b.clear().map_err(|e| QmpError::generic(e.message()))?;
            Ok(Undo::Restore(b, before.0, before.1))
        }
        BitmapAction::Record {
            node: n,
            name,
            recording,
        } => {
            let b = bitmap(graph, n, name)?;
            let before = (b.snapshot(), b.info().recording);
            b.set_recording(*recording)
                .map_err(|e| QmpError::generic(e.message()))?;
            Ok(Undo::Restore(b, before.0, before.1))
        }
        BitmapAction::Merge {
            node: n,
            target,
            sources,
        } => {
            // Check everything first: an error leaves the target unchanged.
            check(graph, action)?;
            let dest = bitmap(graph, n, target)?;
            let mut bits = Vec::new();
            for (sn, sname) in sources {
                bits.push(bitmap(graph, sn, sname)?.snapshot());
            }
            let before = (dest.snapshot(), dest.info().recording);
            for b in &bits {
                dest.merge_from(b)
                    .map_err(|e| QmpError::generic(e.message()))?;
            }
            Ok(Undo::Restore(dest, before.0, before.1))
        }
    }
}

/// Takes an applied action back (transaction rollback).
pub fn undo(graph: &NodeGraph, undo: Undo) {
    match undo {
        Undo::Added(n, name) => {
            if let Some(node) = graph.node(&n) {
                let _ = node.remove_bitmap(&name);
            }
        }
        Undo::Removed(n, bitmap) => {
            if let Some(node) = graph.node(&n) {
                node.restore_bitmap(bitmap);
            }
        }
        Undo::Restore(bitmap, bits, recording) => bitmap.restore(bits, recording),
    }
}

/// The `dirty-bitmaps` member of query-named-block-nodes for a node.
pub fn node_bitmaps(node: &block::Node) -> Option<Value> {
    let mut list: Vec<Value> = Vec::new();
    // Newest first, as QEMU lists them; a frozen bitmap's successor is newer still.
    for b in node.bitmaps().iter().rev() {
        if let Some((granularity, count, recording)) = b.successor_info() {
            list.push(json!({
                "recording": recording, "persistent": false, "busy": false,
                "granularity": granularity, "count": count,
            }));
        }
        let i = b.info();
        let mut v = json!({
            "name": i.name, "recording": i.recording, "persistent": i.persistent,
            "busy": i.busy, "granularity": i.granularity, "count": i.count,
        });
        if i.inconsistent {
            v["inconsistent"] = json!(true);
        }
        list.push(v);
    }
    (!list.is_empty()).then_some(Value::Array(list))
}
