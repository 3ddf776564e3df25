//! External snapshots (QMP `blockdev-snapshot`, `blockdev-snapshot-sync`): an overlay
//! takes a node's place, with the node as its backing node.
//!
//! ```text
//!   export --> node            export --> overlay --backing--> node (read-only now)
//! ```
//!
//! Every user that follows the node (exports, the guest's attachments) moves to the
//! overlay at one instant, under the same drain as a filter insertion, so each write
//! lands either in the node before the snapshot or in the overlay after it. The node's
//! parents (a format over it) do not move. The node is read-only from then on: it is a
//! backing node, and writing it would change what the overlay shows (QEMU reopens it
//! read-only the same way).

use std::sync::Arc;

use super::AttachUser;
use super::Node;
use super::NodeGraph;
use super::drain;
use super::not_found;
use super::slots_targeting;
use crate::error::Error;
use crate::error::ErrorKind;
use crate::error::Result;

fn busy(node: &str, why: impl std::fmt::Display) -> Error {
    Error::new(ErrorKind::Busy, format!("Node '{node}' is busy: {why}"))
}

impl NodeGraph {
    /// Whether `node` may take an overlay: it exists, is not another node's backing
    /// node already (QEMU: "node is used as backing hd of ..."), and no job's filter
    /// sits above it.
    pub fn check_snapshot_base(&self, node: &str) -> Result<()> {
        let mut state = self.state();
        let below = state
            .nodes
            .get(node)
            .cloned()
            .ok_or_else(|| not_found(node))?;
        if state.filter_above.contains_key(node) {
            return Err(busy(node, "a block job is using it"));
        }
        let backing_of = state.live_slots().into_iter().find_map(|slot| {
            let targets = Arc::ptr_eq(
                &slot.target.read().unwrap_or_else(|e| e.into_inner()),
                &below,
            );
            match &slot.user {
                AttachUser::Parent {
                    parent,
                    role: "backing",
                } if targets => Some(parent.clone()),
                _ => None,
            }
        });
        match backing_of {
            Some(parent) => Err(busy(
                node,
                format_args!("node is used as backing hd of '{parent}'"),
            )),
            None => Ok(()),
        }
    }

    /// `blockdev-snapshot`: `overlay` (opened without a backing node, used by nobody)
    /// takes `node` as its backing node and its place (see the module note).
    pub async fn snapshot_onto(&self, node: &str, overlay: &str) -> Result<()> {
        // One structural change from the checks to the move: a filter (a backup
        // starting) cannot go in above the node between them.
        let _reconfigure = self.reconfigure.lock().await;
        self.check_snapshot_base(node)?;
        let (below, top) = {
            let mut state = self.state();
            let below = state
                .nodes
                .get(node)
                .cloned()
                .ok_or_else(|| not_found(node))?;
            let top = state
                .nodes
                .get(overlay)
                .cloned()
                .ok_or_else(|| not_found(overlay))?;
            let in_use = state.live_slots().into_iter().any(|slot| {
                Arc::ptr_eq(&slot.target.read().unwrap_or_else(|e| e.into_inner()), &top)
            });
            if in_use {
                return Err(Error::invalid("The overlay is already in use"));
            }
            if top.backing().is_some() {
                return Err(Error::invalid("The overlay already has a backing image"));
            }
            let link = state.backing_link(&top, below.clone());
            top.driver()
                .backing_file()
                .ok_or_else(|| Error::unsupported("The overlay does not support backing images"))?
                .set_backing(link)?;
            (below, top)
        };
        self.append(&top, &below).await;
        Ok(())
    }

    /// Moves every user that follows `below` to `top` (already backed by `below`),
    /// drained, and makes `below` read-only. The caller holds the reconfiguration lock.
    async fn append(&self, top: &Arc<Node>, below: &Arc<Node>) {
        // Everything that follows `below` moves, the overlay's own link to it excepted
        // (QEMU's bdrv_append moves every other parent too).
        let own_link = |slot: &super::Slot| matches!(&slot.user, AttachUser::Parent { parent, .. } if parent == top.name());
        let slots: Vec<_> = {
            let mut state = self.state();
            state.filtering.insert(below.name.clone(), Vec::new());
            slots_targeting(&mut state, below, true)
                .into_iter()
                .filter(|slot| !own_link(slot))
                .collect()
        };
        let drained = drain(&slots).await;
        let held = {
            let mut state = self.state();
            let held = state.filtering.remove(&below.name).unwrap_or_default();
            let moving = slots.iter().chain(held.iter().map(|(slot, _)| slot));
            for slot in moving.filter(|slot| !own_link(slot)) {
                let mut target = slot.target.write().unwrap_or_else(|e| e.into_inner());
                if Arc::ptr_eq(&target, below) {
                    *target = top.clone();
                }
            }
            below
                .demoted
                .store(true, std::sync::atomic::Ordering::Release);
            held
        };
        drop(drained);
        drop(held);
    }
}
