//! `blockdev-create`: formats an image as a job, as QEMU does.
//!
//! The command checks its arguments and returns at once; the work runs as a job of
//! type `create` that reports only JOB_STATUS_CHANGE events and waits in `concluded`
//! for `job-dismiss`. A failure (an unknown `file` node, a bad cluster size) fails the
//! job, not the command: it shows in query-jobs' `error`, QEMU's behaviour.
//!
//! Drivers: `file` (creates or truncates a host file to `size`) and `qcow2` (writes a
//! fresh image into an existing, writable node, usually a `file` node created and
//! added just before).

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use block::IoBuf;
use block::NodeGraph;
use block::WriteFlags;
use block::drivers::qcow2::header::CompressionType;
use block::drivers::qcow2::header::CreateOptions;
use block::drivers::qcow2::header::new_image;
use block::qapi::Members;
use jobs::JobRegistry;
use jobs::job::Job;
use jobs::job::JobDriver;
use jobs::job::JobFailure;
use jobs::job::JobOptions;
use jobs::job::JobType;

use crate::error::QmpError;

/// What to create.
enum Target {
    File {
        filename: PathBuf,
        size: u64,
    },
    Qcow2 {
        node: String,
        options: CreateOptions,
    },
}

/// Parses `blockdev-create` arguments and starts the job.
pub fn blockdev_create(
    graph: &Arc<NodeGraph>,
    registry: &JobRegistry,
    mut m: Members,
) -> Result<(), QmpError> {
    let job_id = m.required("job-id", Members::string)?;
    let mut o = m.required("options", Members::object)?;
    m.finish()?;
    let driver = o.required("driver", Members::string)?;
    let target = match driver.as_str() {
        "file" => {
            let filename = PathBuf::from(o.required("filename", Members::string)?);
            let size = o.required("size", Members::unsigned)?;
            let prealloc = o.optional("preallocation", |m, k, v| {
                m.enumeration(k, v, &["off", "metadata", "falloc", "full"])
            })?;
            if prealloc.is_some_and(|p| p != "off") {
                return Err(QmpError::generic(
                    "Unsupported preallocation mode: only 'off' is supported",
                ));
            }
            o.optional("nocow", Members::boolean)?;
            o.optional("extent-size-hint", Members::unsigned)?;
            Target::File { filename, size }
        }
        "qcow2" => {
            let node = o.required("file", Members::string)?;
            let size = o.required("size", Members::unsigned)?;
            let mut options = CreateOptions {
                size,
                ..CreateOptions::default()
            };
            if let Some(version) =
                o.optional("version", |m, k, v| m.enumeration(k, v, &["v2", "v3"]))?
                && version == "v2"
            {
                return Err(QmpError::generic(
                    "Creating qcow2 version 2 images is not supported (use v3)",
                ));
            }
            options.backing_file = o.optional("backing-file", Members::string)?;
            options.backing_format = o.optional("backing-fmt", Members::string)?;
            if options.backing_format.is_some() && options.backing_file.is_none() {
                return Err(QmpError::generic(
                    "Backing format cannot be used without backing file",
                ));
            }
            if let Some(cs) = o.optional("cluster-size", Members::unsigned)? {
                // A bad size fails the job (below), as in QEMU.
                options.cluster_bits = if cs.is_power_of_two() {
                    cs.trailing_zeros()
                } else {
                    0
                };
            }
            if let Some(bits) = o.optional("refcount-bits", Members::unsigned)? {
                if !bits.is_power_of_two() || bits > 64 {
                    return Err(QmpError::generic(
                        "Refcount width must be a power of two and may not exceed 64 bits",
                    ));
                }
                options.refcount_order = bits.trailing_zeros();
            }
            if let Some(c) = o.optional("compression-type", |m, k, v| {
                m.enumeration(k, v, &["zlib", "zstd"])
            })? {
                options.compression = if c == "zstd" {
                    CompressionType::Zstd
                } else {
                    CompressionType::Deflate
                };
            }
            let prealloc = o.optional("preallocation", |m, k, v| {
                m.enumeration(k, v, &["off", "metadata", "falloc", "full"])
            })?;
            if prealloc.is_some_and(|p| p != "off") {
                return Err(QmpError::generic(
                    "Unsupported preallocation mode: only 'off' is supported",
                ));
            }
            for (key, what) in [
                ("lazy-refcounts", "lazy refcounts"),
                ("extended-l2", "extended L2 entries"),
                ("data-file-raw", "raw external data files"),
            ] {
                if o.optional(key, Members::boolean)? == Some(true) {
                    return Err(QmpError::generic(format!(
                        "{what} are not supported by stillpoint's qcow2 driver"
                    )));
                }
            }
            for key in ["encrypt", "data-file"] {
                if o.optional(key, |_, _, v| Ok(v))?.is_some() {
                    return Err(QmpError::generic(format!(
                        "'{key}' is not supported by stillpoint's qcow2 driver"
                    )));
                }
            }
            Target::Qcow2 { node, options }
        }
        other => {
            return Err(QmpError::generic(format!(
                "Driver '{other}' does not support blockdev-create in stillpoint \
                 (file and qcow2 do)"
            )));
        }
    };
    o.finish()?;
    let job = registry.create(
        &job_id,
        JobType::Create,
        JobOptions {
            auto_finalize: true,
            auto_dismiss: false,
            speed: 0,
        },
    )?;
    job.progress_meter().set_total(1);
    let driver = Arc::new(CreateJob {
        graph: graph.clone(),
        target: std::sync::Mutex::new(Some(target)),
    });
    job.start(driver);
    Ok(())
}

struct CreateJob {
    graph: Arc<NodeGraph>,
    target: std::sync::Mutex<Option<Target>>,
}

#[async_trait]
impl JobDriver for CreateJob {
    async fn run(&self, job: &Arc<Job>) -> Result<(), JobFailure> {
        let target = self
            .target
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or_else(|| JobFailure::Failed("the job ran twice".into()))?;
        let result = match target {
            Target::File { filename, size } => tokio::task::spawn_blocking(move || {
                let file = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(&filename)
                    .and_then(|f| f.set_len(size).map(|()| f))
                    .and_then(|f| f.sync_all());
                file.map_err(|e| {
                    let text = block::error::os_error_text(&e);
                    format!("Could not create '{}': {text}", filename.display())
                })
            })
            .await
            .map_err(|e| format!("create task failed: {e}"))
            .and_then(|r| r),
            Target::Qcow2 { node, options } => self.format_qcow2(&node, &options).await,
        };
        job.progress_meter().add_done(1);
        result.map_err(JobFailure::Failed)
    }
}

impl CreateJob {
    async fn format_qcow2(&self, node: &str, options: &CreateOptions) -> Result<(), String> {
        let node = self
            .graph
            .node(node)
            .ok_or_else(|| format!("Cannot find device='{node}' nor node-name='{node}'"))?;
        // QMP creates exactly the size asked for (qemu-img rounds up to whole sectors
        // before it gets here), and a qcow2 image holds whole sectors.
        if !options.size.is_multiple_of(512) {
            return Err("Image size must be a multiple of 512 bytes".into());
        }
        let pieces = new_image(options).map_err(|e| e.message().to_string())?;
        node.make_growable();
        for (offset, bytes) in pieces {
            node.write(offset, IoBuf::from_slice(&bytes), WriteFlags::default())
                .await
                .map_err(|e| format!("Could not write qcow2 header: {e}"))?;
        }
        node.flush()
            .await
            .map_err(|e| format!("Could not flush the new image: {e}"))
    }
}
