//! The job commands: `blockdev-backup` (QEMU's argument checks), `query-jobs`,
//! `query-block-jobs`, and the `block-job-*` and `job-*` verbs.

use super::Daemon;
use crate::error::QmpError;
use crate::error::Reply;
use block::qapi::Members;
use jobs::BackupOptions;
use jobs::SyncMode;
use jobs::job::ErrorPolicy;
use serde_json::Value;
use serde_json::json;

/// A job's `speed`: bytes per second, refused when negative (QEMU's words).
fn job_speed(m: &Members, k: &str, v: Value) -> block::Result<u64> {
    match v.as_i64() {
        Some(n) if n < 0 => Err(block::Error::invalid(
            "Parameter 'speed' expects a non-negative value",
        )),
        Some(n) => Ok(n as u64),
        None => Err(m.type_error(k, "integer")),
    }
}

/// `on-error`, `on-source-error`, `on-target-error` (QEMU's `BlockdevOnError`).
fn error_policy(m: &Members, k: &str, v: Value) -> block::Result<ErrorPolicy> {
    Ok(
        match m
            .enumeration(k, v, &["report", "ignore", "enospc", "stop", "auto"])?
            .as_str()
        {
            "ignore" => ErrorPolicy::Ignore,
            "enospc" => ErrorPolicy::Enospc,
            "stop" => ErrorPolicy::Stop,
            "auto" => ErrorPolicy::Auto,
            _ => ErrorPolicy::Report,
        },
    )
}

/// Parses `blockdev-backup` arguments, applying QEMU's rules and refusing what
/// Stillpoint cannot do yet.
pub(super) fn parse_backup(mut m: Members) -> Result<jobs::BackupRequest, QmpError> {
    let device = m.required("device", Members::string)?;
    let target = m.required("target", Members::string)?;
    let sync = m.required("sync", |m, k, v| {
        m.enumeration(k, v, &["top", "full", "none", "incremental", "bitmap"])
    })?;
    // QEMU names a job after its device's block backend when no id is given;
    // qemu-storage-daemon has none, so an id-less job is refused ("Invalid job ID ''")
    // when it is created, after the other checks, and so is ours.
    let job_id = m.optional("job-id", Members::string)?.unwrap_or_default();
    let speed = m.optional("speed", job_speed)?;
    let bitmap = m.optional("bitmap", Members::string)?;
    let bitmap_mode = m.optional("bitmap-mode", |m, k, v| {
        m.enumeration(k, v, &["on-success", "never", "always"])
    })?;
    let compress = m.optional("compress", Members::boolean)?.unwrap_or(false);
    let on_source_error = m
        .optional("on-source-error", error_policy)?
        .unwrap_or_default();
    let on_target_error = m
        .optional("on-target-error", error_policy)?
        .unwrap_or_default();
    let auto_finalize = m
        .optional("auto-finalize", Members::boolean)?
        .unwrap_or(true);
    let auto_dismiss = m
        .optional("auto-dismiss", Members::boolean)?
        .unwrap_or(true);
    let filter_node_name = m.optional("filter-node-name", Members::string)?;
    let discard_source = m
        .optional("discard-source", Members::boolean)?
        .unwrap_or(false);
    let mut perf = (false, None, None, None);
    if let Some(mut p) = m.optional("x-perf", Members::object)? {
        perf.0 = p
            .optional("use-copy-range", Members::boolean)?
            .unwrap_or(false);
        perf.1 = p.optional("max-workers", Members::unsigned)?;
        perf.2 = p.optional("max-chunk", Members::unsigned)?;
        perf.3 = p.optional("min-cluster-size", Members::unsigned)?;
        p.finish()?;
    }
    m.finish()?;

    // `incremental` is `bitmap` with mode on-success; the other bitmap rules need the
    // graph and are checked when the job is prepared, in QEMU's order.
    let mut sync = sync;
    let mut bitmap_mode = bitmap_mode;
    if sync == "incremental" {
        if bitmap.is_none() {
            return Err(QmpError::generic(
                "must provide a valid bitmap name for 'incremental' sync mode",
            ));
        }
        if bitmap_mode.as_deref().is_some_and(|m| m != "on-success") {
            return Err(QmpError::generic(
                "Bitmap sync mode must be 'on-success' when using sync mode 'incremental'",
            ));
        }
        sync = "bitmap".into();
        bitmap_mode = Some("on-success".into());
    }
    if discard_source {
        return Err(QmpError::generic(
            "discard-source is not supported by stillpoint yet",
        ));
    }
    if perf.0 {
        return Err(QmpError::generic(
            "x-perf.use-copy-range is not supported by stillpoint yet",
        ));
    }
    let mut options = BackupOptions::new(job_id);
    options.sync = match sync.as_str() {
        "top" => SyncMode::Top,
        "none" => SyncMode::None,
        "bitmap" => SyncMode::Bitmap,
        _ => SyncMode::Full,
    };
    options.bitmap = bitmap;
    options.bitmap_mode = bitmap_mode.map(|m| match m.as_str() {
        "never" => jobs::BitmapMode::Never,
        "always" => jobs::BitmapMode::Always,
        _ => jobs::BitmapMode::OnSuccess,
    });
    options.job.speed = speed.unwrap_or(0);
    options.job.auto_finalize = auto_finalize;
    options.job.auto_dismiss = auto_dismiss;
    options.on_source_error = on_source_error;
    options.on_target_error = on_target_error;
    options.filter_node_name = filter_node_name;
    options.compress = compress;
    if let Some(w) = perf.1 {
        options.max_workers = usize::try_from(w).unwrap_or(0);
    }
    if let Some(c) = perf.2 {
        options.max_chunk = c;
    }
    options.min_cluster_size = perf.3;
    Ok(jobs::BackupRequest {
        device,
        target,
        options,
    })
}

/// Parses `block-stream` arguments, QEMU's names and all.
fn parse_stream(mut m: Members) -> Result<(String, jobs::StreamOptions), QmpError> {
    let device = m.required("device", Members::string)?;
    let job_id = m.optional("job-id", Members::string)?.unwrap_or_default();
    let base = m.optional("base", Members::string)?;
    let base_node = m.optional("base-node", Members::string)?;
    let bottom = m.optional("bottom", Members::string)?;
    let backing_file = m.optional("backing-file", Members::string)?;
    let _mask = m.optional("backing-mask-protocol", Members::boolean)?;
    let speed = m.optional("speed", job_speed)?;
    let on_error = m.optional("on-error", error_policy)?;
    let filter_node_name = m.optional("filter-node-name", Members::string)?;
    let auto_finalize = m
        .optional("auto-finalize", Members::boolean)?
        .unwrap_or(true);
    let auto_dismiss = m
        .optional("auto-dismiss", Members::boolean)?
        .unwrap_or(true);
    m.finish()?;
    if base.is_some() && base_node.is_some() {
        return Err(QmpError::generic(
            "'base' and 'base-node' cannot be specified at the same time",
        ));
    }
    if bottom.is_some() && base.is_some() {
        return Err(QmpError::generic(
            "'base' and 'bottom' cannot be specified at the same time",
        ));
    }
    if bottom.is_some() && base_node.is_some() {
        return Err(QmpError::generic(
            "'bottom' and 'base-node' cannot be specified at the same time",
        ));
    }
    let options = jobs::StreamOptions {
        job_id,
        base_node,
        base_file: base,
        // `bottom` names the lowest node to copy from; the top itself means nothing
        // to copy, as QEMU does (a job of length 0).
        bottom,
        backing_file,
        filter_node_name,
        on_error: on_error.unwrap_or_default(),
        job: jobs::job::JobOptions {
            auto_finalize,
            auto_dismiss,
            speed: speed.unwrap_or(0),
        },
    };
    Ok((device, options))
}

pub(super) fn block_job_missing(id: &str) -> QmpError {
    QmpError {
        class: "DeviceNotActive",
        desc: format!("Block job '{id}' not found"),
    }
}

impl Daemon {
    pub(super) fn block_job_verb(&self, name: &str, mut m: Members) -> Reply {
        let key = if matches!(name, "block-job-finalize" | "block-job-dismiss") {
            "id"
        } else {
            "device"
        };
        let id = m.required(key, Members::string)?;
        let speed = if name == "block-job-set-speed" {
            Some(m.required("speed", |m, k, v| match v.as_i64() {
                Some(n) => Ok(n),
                None => Err(m.type_error(k, "integer")),
            })?)
        } else {
            None
        };
        let force = if name == "block-job-cancel" {
            m.optional("force", Members::boolean)?.unwrap_or(false)
        } else {
            false
        };
        m.finish()?;
        let job = self
            .jobs
            .get(&id)
            .filter(|j| j.job_type().is_block_job())
            .ok_or_else(|| block_job_missing(&id))?;
        match name {
            "block-job-set-speed" => job.set_speed(speed.unwrap_or(0))?,
            "block-job-cancel" => {
                if !force && job.is_user_paused() {
                    return Err(QmpError::generic(format!(
                        "The block job for device '{id}' is currently paused"
                    )));
                }
                job.cancel(force)?;
            }
            "block-job-pause" => job.pause()?,
            "block-job-resume" => job.resume()?,
            "block-job-complete" => job.complete()?,
            "block-job-finalize" => job.finalize()?,
            _ => job.dismiss()?,
        }
        Ok(json!({}))
    }

    pub(crate) async fn block_stream(&self, m: Members) -> Reply {
        let (device, options) = parse_stream(m)?;
        jobs::start_stream(&self.graph, &self.jobs, &device, options).await?;
        Ok(json!({}))
    }

    pub(crate) async fn blockdev_backup(&self, m: Members) -> Reply {
        let request = parse_backup(m)?;
        jobs::start_backup(
            &self.graph,
            &self.jobs,
            &request.device,
            &request.target,
            request.options,
        )
        .await?;
        Ok(json!({}))
    }
}
