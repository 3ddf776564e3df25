//! Older commands that QEMU's documentation and many scripts still use, each mapped
//! onto the command that replaced it, with QEMU's arguments and messages:
//!
//! * `drive-backup`: `blockdev-backup` to a target given by file name. With `mode:
//!   absolute-paths` (the default) the target image is created: the source's size and
//!   format (or `format`), backed by the source for `sync: none` and by the source's
//!   backing node for `sync: top`; with `mode: existing` the file is opened as it is.
//!   The target node is anonymous and removed when the job ends.
//! * `nbd-server-add` / `nbd-server-remove`: `block-export-add` / `block-export-del`
//!   of an NBD export whose id is its name (the device's name unless given).
//! * `query-block`: qemu-storage-daemon has no block backends, so `[]`.

use std::path::Path;
use std::sync::Arc;

use block::BlockdevOptions;
use block::qapi::Members;
use serde_json::Map;
use serde_json::Value;
use serde_json::json;

use crate::daemon::Daemon;
use crate::error::QmpError;
use crate::error::Reply;

/// The members of `m` not yet taken, as a map for another command's parser.
fn rest(m: Members) -> Map<String, Value> {
    m.into_map()
}

/// Whether `path` starts with the qcow2 magic ("QFI\xfb"): `mode: existing` without a
/// `format` opens what the file is.
fn looks_qcow2(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok_and(|()| magic == *b"QFI\xfb")
}

/// The error for an image format stillpoint cannot create: QEMU's words for a name
/// no QEMU driver has, a plain refusal for QEMU formats stillpoint does not write.
pub(crate) fn unknown_format(format: &str) -> QmpError {
    const QEMU_ONLY: &[&str] = &[
        "vmdk",
        "vdi",
        "vhdx",
        "vpc",
        "qed",
        "luks",
        "parallels",
        "dmg",
        "bochs",
        "cloop",
    ];
    if QEMU_ONLY.contains(&format) {
        QmpError::generic(format!(
            "Format '{format}' is not supported by stillpoint (qcow2 and raw are)"
        ))
    } else {
        QmpError::generic(format!("Unknown file format '{format}'"))
    }
}

/// `drive-backup`.
pub async fn drive_backup(daemon: &Arc<Daemon>, mut m: Members) -> Reply {
    let target = m.required("target", Members::string)?;
    let format = m.optional("format", Members::string)?;
    let mode = m
        .optional("mode", |m, k, v| {
            m.enumeration(k, v, &["existing", "absolute-paths"])
        })?
        .unwrap_or_else(|| "absolute-paths".into());
    let mut args = rest(m);
    let device = match args.get("device") {
        Some(Value::String(device)) => device.clone(),
        _ => return Err(QmpError::generic("Parameter 'device' is missing")),
    };
    let sync = args
        .get("sync")
        .and_then(Value::as_str)
        .unwrap_or("full")
        .to_string();
    let source = daemon.graph.node(&device).ok_or_else(|| {
        QmpError::generic(format!(
            "Cannot find device='{device}' nor node-name='{device}'"
        ))
    })?;
    // What the new image reads through to: the source for sync=none, its backing node
    // for sync=top (a source without one makes top a full copy, as in QEMU).
    let backing = match sync.as_str() {
        "none" => Some(source.clone()),
        "top" => source.backing().map(|b| b.node()),
        _ => None,
    };
    if sync == "top" && backing.is_none() {
        args.insert("sync".into(), json!("full"));
    }
    let path = Path::new(&target);
    let format = match (&format, mode.as_str()) {
        (Some(f), _) => f.clone(),
        (None, "existing") => if looks_qcow2(path) { "qcow2" } else { "raw" }.to_string(),
        (None, _) => source.driver_name().to_string(),
    };
    if mode == "absolute-paths" {
        match format.as_str() {
            "qcow2" => {
                let options = block::drivers::qcow2::header::CreateOptions {
                    size: source.length(),
                    backing_file: backing
                        .as_ref()
                        .and_then(|b| b.filename())
                        .map(|p| p.display().to_string()),
                    backing_format: backing.as_ref().map(|b| b.driver_name().to_string()),
                    ..Default::default()
                };
                block::drivers::qcow2::create_file(path, &options)?;
            }
            "raw" if backing.is_some() => {
                return Err(QmpError::generic(
                    "Backing file not supported for file format 'raw'",
                ));
            }
            "raw" => {
                let file = std::fs::File::create(path)
                    .map_err(|e| QmpError::generic(format!("Could not create '{target}': {e}")))?;
                file.set_len(block::drivers::file::round_to_sectors(source.length()))
                    .map_err(|e| QmpError::generic(format!("Could not resize '{target}': {e}")))?;
            }
            other => return Err(unknown_format(other)),
        }
    }
    let mut options = json!({"driver": format, "file": {"driver": "file", "filename": target}});
    if format == "qcow2" {
        // Linked to the existing node, never a second opening of its file.
        options["backing"] = match &backing {
            Some(b) => json!(b.name()),
            None => Value::Null,
        };
    }
    let node = daemon
        .graph
        .open(BlockdevOptions::from_json(options)?)
        .await?;
    let target_name = node.name().to_string();
    drop(node);
    args.insert("target".into(), json!(target_name));
    let job_id = args
        .get("job-id")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let mut events = daemon.jobs.subscribe();
    if let Err(e) = daemon
        .blockdev_backup(Members::new(args, String::new()))
        .await
    {
        let _ = daemon.graph.remove_unnamed(&target_name).await;
        return Err(e);
    }
    // The target goes with the job, as QEMU drops its reference when the job ends.
    let graph = daemon.graph.clone();
    tokio::spawn(async move {
        loop {
            match events.recv().await {
                Ok(jobs::JobEvent::StatusChange { id, status })
                    if id == job_id && status == jobs::JobStatus::Null =>
                {
                    break;
                }
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
            }
        }
        if let Err(e) = graph.remove_unnamed(&target_name).await {
            tracing::warn!("removing drive-backup's target {target_name} failed: {e}");
        }
    });
    Ok(json!({}))
}

/// `nbd-server-add`: device, name, description, writable, bitmap.
pub async fn nbd_server_add(daemon: &Arc<Daemon>, mut m: Members) -> Reply {
    let device = m.required("device", Members::string)?;
    let name = m
        .optional("name", Members::string)?
        .unwrap_or_else(|| device.clone());
    let description = m.optional("description", Members::string)?;
    let writable = m.optional("writable", Members::boolean)?.unwrap_or(false);
    let bitmap = m.optional("bitmap", Members::string)?;
    m.finish()?;
    let mut export = json!({"type": "nbd", "id": name, "node-name": device, "name": name,
                            "writable": writable});
    if let Some(description) = description {
        export["description"] = json!(description);
    }
    if let Some(bitmap) = bitmap {
        export["bitmaps"] = json!([bitmap]);
    }
    let Value::Object(map) = export else {
        unreachable!("built as an object")
    };
    daemon
        .block_export_add(Members::new(map, String::new()))
        .await
}

/// `nbd-server-remove`: name, mode.
pub async fn nbd_server_remove(daemon: &Arc<Daemon>, mut m: Members) -> Reply {
    let name = m.required("name", Members::string)?;
    let mode = m.optional("mode", |m, k, v| m.enumeration(k, v, &["safe", "hard"]))?;
    m.finish()?;
    daemon.block_export_del(&name, mode.as_deref()).await
}
