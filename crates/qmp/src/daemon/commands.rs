//! The command table: every command the daemon answers, in one list. `execute` runs
//! only what is here and `query-commands` lists exactly this, so a command cannot be
//! listed and missing, or present and unlisted. The bodies are short; the work is in
//! the family files (`block_commands`, `job_commands`, `nbd_commands`, `transaction`,
//! `bitmaps`, `create`, `snapshot`, `legacy`).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use block::BlockdevOptions;
use block::qapi::Members;
use serde_json::Value;
use serde_json::json;

use super::Daemon;
use super::bitmaps;
use super::block_commands::node_info;
use super::create;
use super::done;
use super::legacy;
use super::snapshot;
use super::version;
use crate::error::QmpError;
use crate::error::Reply;

/// A running command.
pub(super) type CommandFuture = Pin<Box<dyn Future<Output = Reply> + Send>>;

/// One entry of the table: the name, and what runs it (given the daemon, the name, and
/// the arguments).
pub(super) struct Command {
    pub(super) name: &'static str,
    pub(super) run: fn(Arc<Daemon>, &'static str, Members) -> CommandFuture,
}

/// The entry for `name`, if the daemon answers it.
pub(super) fn find(name: &str) -> Option<&'static Command> {
    COMMANDS.iter().find(|c| c.name == name)
}

macro_rules! command {
    ($name:literal, |$d:pat_param, $n:pat_param, $m:pat_param| $body:expr) => {
        Command {
            name: $name,
            run: |$d, $n, $m| Box::pin(async move { $body }),
        }
    };
}

fn bitmap_command(d: &Daemon, name: &str, m: Members) -> Reply {
    let action = bitmaps::parse(name, m)?;
    bitmaps::apply(&d.graph, &action)?;
    Ok(json!({}))
}

fn job_verb(d: &Daemon, name: &str, mut m: Members) -> Reply {
    let id = m.required("id", Members::string)?;
    m.finish()?;
    let job = d
        .jobs
        .get(&id)
        .ok_or_else(|| QmpError::generic("Job not found"))?;
    match name {
        "job-pause" => job.pause()?,
        "job-resume" => job.resume()?,
        "job-cancel" => job.cancel(false)?,
        "job-complete" => job.complete()?,
        "job-finalize" => job.finalize()?,
        _ => job.dismiss()?,
    }
    Ok(json!({}))
}

/// Every command, in the order `query-commands` lists them.
pub(super) static COMMANDS: &[Command] = &[
    command!("qmp_capabilities", |_, _, _| Err(QmpError {
        class: "CommandNotFound",
        desc: "Capabilities negotiation is already complete, command ignored".into(),
    })),
    command!("query-version", |_, _, m| done(m, version())),
    command!("query-commands", |_, _, m| {
        let list: Vec<Value> = COMMANDS.iter().map(|c| json!({"name": c.name})).collect();
        done(m, Value::Array(list))
    }),
    command!("quit", |d, _, m| {
        m.finish()?;
        d.quitting.store(true, Ordering::SeqCst);
        d.quit.notify_waiters();
        Ok(json!({}))
    }),
    command!("blockdev-add", |d, _, m| {
        let options = BlockdevOptions::from_members(m)?;
        d.graph.add(options).await?;
        Ok(json!({}))
    }),
    command!("blockdev-del", |d, _, mut m| {
        let name = m.required("node-name", Members::string)?;
        m.finish()?;
        d.graph.remove(&name).await?;
        Ok(json!({}))
    }),
    command!("query-named-block-nodes", |d, _, mut m| {
        m.optional("flat", Members::boolean)?;
        m.finish()?;
        Ok(Value::Array(
            d.graph.nodes().iter().map(|n| node_info(n)).collect(),
        ))
    }),
    command!("blockdev-backup", |d, _, m| d.blockdev_backup(m).await),
    command!("block-stream", |d, _, m| d.block_stream(m).await),
    command!("query-block-jobs", |d, _, m| {
        m.finish()?;
        Ok(Value::Array(
            d.jobs
                .list()
                .iter()
                .filter(|j| j.job_type().is_block_job())
                .map(|j| serde_json::to_value(j.block_job_info()).unwrap())
                .collect(),
        ))
    }),
    command!("blockdev-create", |d, _, m| {
        create::blockdev_create(&d.graph, &d.jobs, m)?;
        Ok(json!({}))
    }),
    command!("block-dirty-bitmap-add", |d, n, m| bitmap_command(&d, n, m)),
    command!("block-dirty-bitmap-remove", |d, n, m| bitmap_command(
        &d, n, m
    )),
    command!("block-dirty-bitmap-clear", |d, n, m| bitmap_command(
        &d, n, m
    )),
    command!("block-dirty-bitmap-enable", |d, n, m| bitmap_command(
        &d, n, m
    )),
    command!("block-dirty-bitmap-disable", |d, n, m| bitmap_command(
        &d, n, m
    )),
    command!("block-dirty-bitmap-merge", |d, n, m| bitmap_command(
        &d, n, m
    )),
    command!("query-jobs", |d, _, m| {
        m.finish()?;
        Ok(Value::Array(
            d.jobs
                .list()
                .iter()
                .map(|j| serde_json::to_value(j.job_info()).unwrap())
                .collect(),
        ))
    }),
    command!("block-job-set-speed", |d, n, m| d.block_job_verb(n, m)),
    command!("block-job-cancel", |d, n, m| d.block_job_verb(n, m)),
    command!("block-job-pause", |d, n, m| d.block_job_verb(n, m)),
    command!("block-job-resume", |d, n, m| d.block_job_verb(n, m)),
    command!("block-job-complete", |d, n, m| d.block_job_verb(n, m)),
    command!("block-job-finalize", |d, n, m| d.block_job_verb(n, m)),
    command!("block-job-dismiss", |d, n, m| d.block_job_verb(n, m)),
    command!("job-pause", |d, n, m| job_verb(&d, n, m)),
    command!("job-resume", |d, n, m| job_verb(&d, n, m)),
    command!("job-cancel", |d, n, m| job_verb(&d, n, m)),
    command!("job-complete", |d, n, m| job_verb(&d, n, m)),
    command!("job-finalize", |d, n, m| job_verb(&d, n, m)),
    command!("job-dismiss", |d, n, m| job_verb(&d, n, m)),
    command!("nbd-server-start", |d, _, m| d.nbd_server_start(m).await),
    command!("nbd-server-stop", |d, _, m| {
        m.finish()?;
        let running = d
            .nbd
            .lock()
            .await
            .take()
            .ok_or_else(|| QmpError::generic("NBD server not running"))?;
        d.stop_nbd(running).await;
        Ok(json!({}))
    }),
    command!("block-export-add", |d, _, m| d.block_export_add(m).await),
    command!("block-export-del", |d, _, mut m| {
        let id = m.required("id", Members::string)?;
        let mode = m.optional("mode", |m, k, v| m.enumeration(k, v, &["safe", "hard"]))?;
        m.finish()?;
        d.block_export_del(&id, mode.as_deref()).await
    }),
    command!("query-block-exports", |d, _, m| {
        m.finish()?;
        let exports = d.exports.lock().unwrap();
        let list = exports.iter().map(|(id, e)| {
            let node_name = e.attached.node().map(|n| n.name().to_owned());
            let node_name = node_name.unwrap_or_else(|| e.node_name.clone());
            json!({"id": id, "type": "nbd", "node-name": node_name,
                   "shutting-down": e.shutting_down})
        });
        Ok(Value::Array(list.collect()))
    }),
    command!("transaction", |d, _, m| d.transaction(m).await),
    command!("blockdev-snapshot-sync", |d, _, m| {
        snapshot::blockdev_snapshot_sync(&d.graph, m).await
    }),
    command!("blockdev-snapshot", |d, _, m| {
        snapshot::blockdev_snapshot(&d.graph, m).await
    }),
    command!("drive-backup", |d, _, m| legacy::drive_backup(&d, m).await),
    command!("nbd-server-add", |d, _, m| legacy::nbd_server_add(&d, m)
        .await),
    command!("nbd-server-remove", |d, _, m| legacy::nbd_server_remove(
        &d, m
    )
    .await),
    command!("query-block", |_, _, m| done(m, json!([]))),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_command_is_in_the_table_once_and_every_bitmap_action_is_a_command() {
        let mut names: Vec<&str> = COMMANDS.iter().map(|c| c.name).collect();
        let count = names.len();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), count, "a command is listed twice");
        for action in bitmaps::COMMANDS {
            assert!(
                find(action).is_some(),
                "{action} is a transaction action but no command"
            );
        }
    }
}
