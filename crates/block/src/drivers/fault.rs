//! `fault`: a filter that fails chosen requests, for testing error paths (in the role of
//! QEMU's blkdebug, with a simpler, range-based rule language).
//!
//! ```json
//! {"driver": "fault", "node-name": "bad", "image": "disk0",
//!  "rules": [{"op": "write", "offset": 1048576, "length": 65536,
//!             "errno": "ENOSPC", "once": true, "after": 2}]}
//! ```
//!
//! A rule matches a request whose operation is `op` (`read`, `write` — which covers
//! write-zeroes and discard —, `flush` or `any`, the default) and whose byte range
//! overlaps `[offset, offset + length)` (the whole device by default). The first
//! `after` matching requests pass (default 0); the next fails with `errno` (`EIO` by
//! default; a number or one of `EIO`, `ENOSPC`, `EPERM`, `EINVAL`, `ENOTSUP`). With
//! `once` the rule then retires; otherwise it keeps failing. Rules are checked in order;
//! the first that fires decides. A rule with `delay-ms` does not fail: the request it
//! fires on waits that long, then proceeds (slow disks, timeouts, races made
//! deterministic).

use std::io;
use std::sync::Mutex;

use async_trait::async_trait;

use crate::buf::IoBuf;
use crate::error::Error;
use crate::error::Result;
use crate::node::Attachment;
use crate::node::driver::BlockDriver;
use crate::node::driver::Extent;
use crate::node::driver::Limits;
use crate::node::driver::WriteFlags;
use crate::node::driver::ZeroFlags;
use crate::options::FaultOp;
use crate::options::FaultRule;

#[derive(Debug)]
struct RuleState {
    rule: FaultRule,
    seen: u64,
    retired: bool,
}

/// The fault filter.
#[derive(Debug)]
pub struct FaultDriver {
    child: Attachment,
    rules: Mutex<Vec<RuleState>>,
}

impl FaultDriver {
    /// A fault filter over `child`.
    pub fn new(child: Attachment, rules: Vec<FaultRule>) -> Self {
        let rules = rules
            .into_iter()
            .map(|rule| RuleState {
                rule,
                seen: 0,
                retired: false,
            })
            .collect();
        Self {
            child,
            rules: Mutex::new(rules),
        }
    }

    /// Applies the first rule that fires: fails the request, or delays it.
    async fn check(&self, op: FaultOp, offset: u64, len: u64) -> Result<()> {
        let delay = self.fire(op, offset, len)?;
        if let Some(delay) = delay {
            tokio::time::sleep(delay).await;
        }
        Ok(())
    }

    fn fire(&self, op: FaultOp, offset: u64, len: u64) -> Result<Option<std::time::Duration>> {
        let mut rules = self.rules.lock().unwrap_or_else(|e| e.into_inner());
        for state in rules.iter_mut() {
            let rule = &state.rule;
            let op_matches = rule.op == FaultOp::Any || rule.op == op;
            let end = offset.saturating_add(len.max(1));
            let overlaps = offset < rule.offset.saturating_add(rule.length) && rule.offset < end;
            if state.retired || !op_matches || !(overlaps || op == FaultOp::Flush) {
                continue;
            }
            if state.seen < rule.after {
                state.seen += 1;
                continue;
            }
            if rule.once {
                state.retired = true;
            }
            if let Some(ms) = rule.delay_ms {
                return Ok(Some(std::time::Duration::from_millis(ms)));
            }
            return Err(Error::from_io(
                format!("injected fault at offset {offset}"),
                io::Error::from_raw_os_error(rule.errno),
            ));
        }
        Ok(None)
    }
}

#[async_trait]
impl BlockDriver for FaultDriver {
    fn driver_name(&self) -> &'static str {
        "fault"
    }

    fn length(&self) -> u64 {
        self.child.length()
    }

    fn limits(&self) -> Limits {
        self.child.limits()
    }

    fn make_growable(&self) -> bool {
        // A filter over the file of a format that allocates (qcow2 over fault over
        // file) must let it grow like the file itself would.
        self.child.node().make_growable()
    }

    fn filename(&self) -> Option<std::path::PathBuf> {
        self.child.node().filename()
    }

    fn filtered_child(&self) -> Option<&Attachment> {
        Some(&self.child)
    }

    async fn read(&self, offset: u64, buf: IoBuf) -> Result<IoBuf> {
        self.check(FaultOp::Read, offset, buf.len() as u64).await?;
        self.child.read(offset, buf).await
    }

    async fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> Result<IoBuf> {
        self.check(FaultOp::Write, offset, buf.len() as u64).await?;
        self.child.write(offset, buf, flags).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.check(FaultOp::Write, offset, len).await?;
        self.child.write_zeroes(offset, len, flags).await
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check(FaultOp::Write, offset, len).await?;
        self.child.discard(offset, len).await
    }

    async fn flush(&self) -> Result<()> {
        self.check(FaultOp::Flush, 0, 0).await?;
        self.child.flush().await
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        self.child.block_status(offset, len).await
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use crate::buf::IoBuf;
    use crate::graph::NodeGraph;
    use crate::node::driver::WriteFlags;
    use crate::options::BlockdevOptions;

    async fn faulty(rules: serde_json::Value) -> (NodeGraph, std::sync::Arc<crate::node::Node>) {
        let graph = NodeGraph::new();
        let options = BlockdevOptions::from_json(json!({"driver":"fault","node-name":"f",
            "image":{"driver":"null-co","size":1048576,"read-zeroes":true},"rules":rules}))
        .unwrap();
        let node = graph.add(options).await.unwrap();
        (graph, node)
    }

    async fn read(node: &crate::node::Node, offset: u64) -> Result<(), i32> {
        node.read(offset, IoBuf::zeroed(512))
            .await
            .map(drop)
            .map_err(|e| e.errno())
    }

    #[tokio::test]
    async fn a_rule_fails_only_overlapping_requests_of_its_kind() {
        let (_g, node) =
            faulty(json!([{"op":"read","offset":4096,"length":4096,"errno":"ENOSPC"}])).await;
        assert_eq!(read(&node, 0).await, Ok(()));
        assert_eq!(
            read(&node, 4000).await,
            Err(libc::ENOSPC),
            "overlaps the range"
        );
        assert_eq!(read(&node, 8192).await, Ok(()));
        let w = node
            .write(4096, IoBuf::zeroed(512), WriteFlags::default())
            .await;
        assert!(w.is_ok(), "writes are not covered by a read rule");
        assert_eq!(
            read(&node, 4096).await,
            Err(libc::ENOSPC),
            "without once it keeps failing"
        );
    }

    #[tokio::test]
    async fn once_and_after_count_matching_requests() {
        let (_g, node) = faulty(json!([{"op":"any","once":true,"after":2,"errno":5}])).await;
        assert_eq!(read(&node, 0).await, Ok(()));
        assert_eq!(read(&node, 0).await, Ok(()));
        assert_eq!(read(&node, 0).await, Err(libc::EIO));
        assert_eq!(read(&node, 0).await, Ok(()), "retired after firing once");
    }

    #[tokio::test(start_paused = true)]
    async fn a_delay_rule_slows_a_request_down_without_failing_it() {
        let (_g, node) = faulty(json!([{"op":"read","delay-ms":5000,"once":true}])).await;
        let started = tokio::time::Instant::now();
        assert_eq!(read(&node, 0).await, Ok(()));
        assert!(started.elapsed() >= std::time::Duration::from_secs(5));
        let started = tokio::time::Instant::now();
        assert_eq!(read(&node, 0).await, Ok(()));
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
    }

    #[tokio::test]
    async fn flush_rules_and_bad_options() {
        let (_g, node) = faulty(json!([{"op":"flush"}])).await;
        assert_eq!(node.flush().await.unwrap_err().errno(), libc::EIO);
        let bad = BlockdevOptions::from_json(json!({"driver":"fault","image":"x",
            "rules":[{"errno":"EWHAT"}]}))
        .unwrap_err();
        assert_eq!(
            bad.to_string(),
            "Parameter 'rules[0].errno' does not accept value 'EWHAT'"
        );
        let bad = BlockdevOptions::from_json(json!({"driver":"fault","image":"x",
            "rules":[{"op":"sideways"}]}))
        .unwrap_err();
        assert_eq!(
            bad.to_string(),
            "Parameter 'rules[0].op' does not accept value 'sideways'"
        );
    }
}
