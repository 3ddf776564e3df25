//! The node graph: named nodes, their users, and attachments that follow filters.
//!
//! ```text
//!   export 'exp0' ---Attachment---+            (before a backup)
//!                                 v
//!                           [disk0: raw] --child 'file'--> [#block000: file]
//!
//!   export 'exp0' ---Attachment---+            (after insert_filter above disk0)
//!                                 v
//!                           [cbw0: filter] --fixed child--> [disk0: raw] --> ...
//! ```
//!
//! * Nodes ([`crate::node`]) are created from [`BlockdevOptions`] by the factory
//!   (`open`); inline children get generated names (`#block000`...) and are deleted
//!   with their parent; children named by reference stay.
//! * Users hold [`Attachment`]s ([`crate::node::attach`]); inserting a filter above
//!   node N moves every attachment to N that follows filters to the filter, under a
//!   drain. Attachments made while a filter is in place resolve to the top of the
//!   filter chain, so no writer can bypass a filter.
//! * A node is *in use* while a live attachment targets it; in-use nodes cannot be
//!   deleted, and the error names the user as QEMU does ("Block device file0 is in
//!   use", "Node 'disk0' is busy: block device is in use by block job: backup").
//! * An external snapshot (`external_snapshot`) puts an overlay above a node: every
//!   attachment that follows filters moves to the overlay, the overlay takes the node
//!   as its `backing` child, and the node turns read-only; an overlay's backing node is
//!   busy ("Node 'X' is busy: node is used as backing hd of 'Y'"), as in QEMU.
//! * Structural changes (add, remove, insert or remove a filter) are serialised by one
//!   async lock; the state itself sits behind a short synchronous mutex that is never
//!   held across an await.

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::collections::HashSet;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::RwLock;
use std::sync::Weak;

use crate::error::Error;
use crate::error::ErrorKind;
use crate::error::Result;
use crate::node::driver::BlockDriver;
use crate::options::BlockdevOptions;
use crate::options::CbwOptions;
use crate::options::DetectZeroes;
use crate::options::DiscardMode;
use crate::options::DriverOptions;

#[derive(Default)]
struct GraphState {
    nodes: BTreeMap<String, Arc<Node>>,
    slots: Vec<Weak<Slot>>,
    /// node-name -> name of the filter directly above it.
    filter_above: HashMap<String, String>,
    /// Nodes a filter is going in above right now, with the attachments made to them
    /// meanwhile: those are created held, and move to the filter with the others.
    filtering: HashMap<String, Vec<HeldSlot>>,
    next_implicit: u64,
}

impl GraphState {
    fn live_slots(&mut self) -> Vec<Arc<Slot>> {
        self.slots.retain(|s| s.strong_count() > 0);
        self.slots.iter().filter_map(Weak::upgrade).collect()
    }

    /// The user that attached to `node` last, or `None` when nothing uses it:
    /// `blockdev-del` names it, as QEMU names the newest of a node's blockers (after
    /// `block-stream` with a base, the image relinked to it rather than the layer that
    /// was its parent first).
    fn newest_user(&mut self, node: &Arc<Node>) -> Option<AttachUser> {
        self.live_slots()
            .into_iter()
            .rev()
            .find(|s| Arc::ptr_eq(&s.target.read().unwrap_or_else(|e| e.into_inner()), node))
            .map(|s| s.user.clone())
    }

    /// The node at the top of the filter chain above `name`.
    fn top_of(&self, name: &str) -> Option<Arc<Node>> {
        let mut current = name;
        while let Some(above) = self.filter_above.get(current) {
            current = above;
        }
        self.nodes.get(current).cloned()
    }

    /// Takes filter `name` out of the filter chain above `below`.
    fn splice_out(&mut self, name: &str, below: &Node) {
        match self.filter_above.remove(name) {
            Some(upper) => self.filter_above.insert(below.name.clone(), upper),
            None => self.filter_above.remove(&below.name),
        };
    }

    fn implicit_name(&mut self) -> String {
        loop {
            let name = format!("#block{:03}", self.next_implicit);
            self.next_implicit += 1;
            if !self.nodes.contains_key(&name) {
                return name;
            }
        }
    }

    /// An image's backing link from `overlay` to `below`: to `below` itself, not to
    /// filters above it.
    fn backing_link(&mut self, overlay: &Node, below: Arc<Node>) -> Attachment {
        self.attach(
            below,
            AttachUser::Parent {
                parent: overlay.name().to_string(),
                role: "backing",
            },
            false,
        )
    }

    fn attach(&mut self, target: Arc<Node>, user: AttachUser, follows_filters: bool) -> Attachment {
        let held = follows_filters
            .then(|| self.filtering.get_mut(&target.name))
            .flatten();
        let slot = Arc::new(Slot {
            user,
            follows_filters,
            target: RwLock::new(target),
            gate: Arc::new(tokio::sync::RwLock::new(())),
        });
        if let Some(held) = held {
            let guard = slot
                .gate
                .clone()
                .try_write_owned()
                .expect("a new gate is free");
            held.push((slot.clone(), guard));
        }
        self.slots.retain(|s| s.strong_count() > 0);
        self.slots.push(Arc::downgrade(&slot));
        Attachment { slot }
    }
}

/// Checks QEMU's node-name rules: a letter first, then letters, digits, `-`, `.`,
/// `_`; at most 31 characters.
pub fn validate_node_name(name: &str) -> Result<()> {
    let mut chars = name.chars();
    let valid = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
        && name.len() <= 31;
    if valid {
        Ok(())
    } else {
        Err(Error::invalid(format!("Invalid node-name: '{name}'")))
    }
}

fn not_found(name: &str) -> Error {
    Error::new(
        ErrorKind::NotFound,
        format!("Cannot find device='{name}' nor node-name='{name}'"),
    )
}

/// Opens drivers that live in crates above this one (the NBD client), so the graph
/// can create them from `blockdev-add` options without depending on those crates.
#[async_trait::async_trait]
pub trait ExternalDrivers: Send + Sync {
    /// Opens `options` (a driver this crate does not implement).
    async fn open(&self, options: &DriverOptions) -> Result<Box<dyn BlockDriver>>;

    /// Builds a standalone copy-before-write filter over `file` saving old data to
    /// `target`, protecting every cluster or only those `initial` marks. Called while
    /// every request to the filtered node is drained: that instant is the snapshot's.
    fn copy_before_write(
        &self,
        _options: &CbwOptions,
        _file: Attachment,
        _target: Attachment,
        _initial: Option<bitmap::Bitmap>,
    ) -> Result<Box<dyn BlockDriver>> {
        Err(Error::unsupported(
            "the copy-before-write driver is not available here",
        ))
    }
}

/// Work done at a filter insertion's instant (see [`NodeGraph::insert_filters_at`]).
pub type AtInstant = Box<dyn FnOnce() -> Result<()> + Send>;

/// Builds a filter driver from its fixed link to the filtered node.
pub type FilterBuild = Box<dyn FnOnce(Attachment) -> Result<Box<dyn BlockDriver>> + Send>;

/// A filter to insert: where, its name, and how to build its driver from its link to
/// the filtered node.
pub struct FilterSpec {
    /// The node to filter (the top of any filters already above it is used).
    pub above: String,
    /// The filter's node-name (generated when absent).
    pub name: Option<String>,
    /// Builds the filter driver from its fixed child attachment. It runs while every
    /// request to the filtered node is drained, so what it captures (a bitmap's bits)
    /// belongs to the same instant as the switch.
    pub build: FilterBuild,
    /// The job that owns the filter (it alone removes it); `None` for a filter the
    /// monitor added, which `blockdev-del` removes.
    pub owner: Option<AttachUser>,
    /// Inline children created for the filter, deleted with it.
    pub implicit_children: Vec<String>,
    /// The filter's `discard` mode, when it is not the filtered node's.
    pub discard: Option<DiscardMode>,
}

/// The set of nodes of one daemon (or one CLI invocation).
#[derive(Default)]
pub struct NodeGraph {
    state: Mutex<GraphState>,
    reconfigure: tokio::sync::Mutex<()>,
    external: Option<Arc<dyn ExternalDrivers>>,
    /// Where raw images' bitmap files go (beside each image when unset).
    state_dir: Mutex<Option<PathBuf>>,
}

impl fmt::Debug for NodeGraph {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeGraph")
            .field("nodes", &self.node_names())
            .finish()
    }
}

impl NodeGraph {
    /// An empty graph.
    pub fn new() -> Self {
        Self::default()
    }

    /// Keeps raw images' persistent dirty bitmaps in `dir` instead of beside each image
    /// (see [`crate::drivers::sidecar_bitmaps`]); for nodes opened from now on.
    pub fn set_state_dir(&self, dir: Option<PathBuf>) {
        *self.state_dir.lock().unwrap_or_else(|e| e.into_inner()) = dir;
    }

    pub(crate) fn state_dir(&self) -> Option<PathBuf> {
        self.state_dir
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// An empty graph that opens `external` drivers (such as `nbd`) through `drivers`.
    pub fn with_external(drivers: Arc<dyn ExternalDrivers>) -> Self {
        Self {
            external: Some(drivers),
            ..Self::default()
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, GraphState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `blockdev-add`: creates a node (and its inline children). The top node must be
    /// named; on failure nothing is left behind.
    pub async fn add(&self, options: BlockdevOptions) -> Result<Arc<Node>> {
        if options.node_name.is_none() {
            return Err(Error::invalid(
                "'node-name' must be specified for the root node",
            ));
        }
        self.open(options).await
    }

    /// Creates a node, generating a name for it when it has none (CLI use).
    pub async fn open(&self, options: BlockdevOptions) -> Result<Arc<Node>> {
        let _reconfigure = self.reconfigure.lock().await;
        let mut created = Vec::new();
        let result = self
            .open_node(options, Inherited::default(), &mut created)
            .await;
        if result.is_err() {
            // Roll back in reverse creation order: parents before their children.
            let mut state = self.state();
            for name in created.iter().rev() {
                state.nodes.remove(name);
            }
        }
        result
    }

    /// Attaches a user to the node `name` (or to the top of the filters above it).
    pub fn attach(&self, name: &str, user: AttachUser) -> Result<Attachment> {
        let mut state = self.state();
        let target = state.top_of(name).ok_or_else(|| not_found(name))?;
        Ok(state.attach(target, user, true))
    }

    /// A new backing link from `overlay` to `below` (`block-stream` with a base). The
    /// link is to `below` itself, not to filters above it, as an image's own backing
    /// link is; and an implicit `below` becomes the overlay's to close with it.
    pub fn attach_backing(&self, overlay: &Node, below: &Arc<Node>) -> Attachment {
        let link = self.state().backing_link(overlay, below.clone());
        if below.implicit {
            let mut adopted = overlay
                .implicit_children
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if !adopted.contains(&below.name) {
                adopted.push(below.name.clone());
            }
        }
        link
    }

    /// The node named `name`, if any.
    pub fn node(&self, name: &str) -> Option<Arc<Node>> {
        self.state().nodes.get(name).cloned()
    }

    /// Every node, ordered by name.
    pub fn nodes(&self) -> Vec<Arc<Node>> {
        self.state().nodes.values().cloned().collect()
    }

    /// Every node-name, sorted.
    pub fn node_names(&self) -> Vec<String> {
        self.state().nodes.keys().cloned().collect()
    }

    /// Every user of a node, including the users of the filters above it (a job on
    /// the node under a backup filter shows up here).
    pub fn users_of(&self, name: &str) -> Vec<AttachUser> {
        let mut state = self.state();
        let mut chain = Vec::new();
        let mut current = name.to_string();
        while let Some(node) = state.nodes.get(&current).cloned() {
            chain.push(node);
            match state.filter_above.get(&current) {
                Some(above) => current = above.clone(),
                None => break,
            }
        }
        state
            .live_slots()
            .into_iter()
            .filter(|s| {
                let target = s.target.read().unwrap_or_else(|e| e.into_inner());
                chain.iter().any(|n| Arc::ptr_eq(n, &target))
            })
            .map(|s| s.user.clone())
            .collect()
    }

    /// Closes every node for shutdown, parents before their children, so a format
    /// driver writes its metadata (and clears its dirty bit) while its file is still
    /// open. Nodes stay in the graph; drivers that track it refuse I/O afterwards.
    /// Returns the first error after trying every node.
    pub async fn close_all(&self) -> Result<()> {
        let _reconfigure = self.reconfigure.lock().await;
        let mut remaining = self.nodes();
        let mut first_error = None;
        while !remaining.is_empty() {
            let names: HashSet<String> = remaining.iter().map(|n| n.name.clone()).collect();
            let parents_open = |node: &Arc<Node>| {
                self.users_of(&node.name).iter().any(|user| match user {
                    AttachUser::Parent { parent, .. } => names.contains(parent),
                    AttachUser::FilterChild { filter } => names.contains(filter),
                    _ => false,
                })
            };
            let (mut ready, rest): (Vec<_>, Vec<_>) =
                remaining.into_iter().partition(|n| !parents_open(n));
            if ready.is_empty() {
                // Cannot happen in a tree; close the rest in any order rather than hang.
                ready = rest;
                remaining = Vec::new();
            } else {
                remaining = rest;
            }
            for node in ready {
                if let Err(e) = node.close().await {
                    first_error.get_or_insert(e);
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// `blockdev-del`: removes an unused, monitor-owned node, then the inline children
    /// it created. Nodes are flushed as they are closed.
    ///
    /// A filter the monitor added (`copy-before-write`) is spliced out: attachments
    /// that follow filters go back to the node below it, drained like an insertion.
    /// Only users pinned to the filter itself (a `snapshot-access` node, a filter above
    /// it) keep it in use. A job's filter belongs to the job.
    pub async fn remove(&self, name: &str) -> Result<()> {
        self.remove_node(name, false).await
    }

    /// Removes a node a command created under a generated name (`drive-backup`'s
    /// target), which `blockdev-del` may not remove, once nothing uses it.
    pub async fn remove_unnamed(&self, name: &str) -> Result<()> {
        self.remove_node(name, true).await
    }

    async fn remove_node(&self, name: &str, unnamed: bool) -> Result<()> {
        let _reconfigure = self.reconfigure.lock().await;
        let (node, moves) = {
            let mut state = self.state();
            let node = state.nodes.get(name).cloned().ok_or_else(|| {
                Error::new(
                    ErrorKind::NotFound,
                    format!("Failed to find node with node-name='{name}'"),
                )
            })?;
            if node.implicit != unnamed {
                return Err(Error::invalid(format!(
                    "Node {name} is not owned by the monitor"
                )));
            }
            if let Some(owner) = &node.filter_owner {
                return Err(owner.busy_error(name));
            }
            let mut moves = Vec::new();
            if state.filter_above.values().any(|f| f == name) {
                let users = slots_targeting(&mut state, &node, false);
                if let Some(pinned) = users.iter().find(|s| !s.follows_filters) {
                    return Err(pinned.user.busy_error(name));
                }
                let below = node
                    .driver
                    .filtered_child()
                    .expect("a filter has a filtered child")
                    .node();
                state.splice_out(name, &below);
                moves = users.into_iter().map(|s| (s, below.clone())).collect();
            } else if let Some(user) = state.newest_user(&node) {
                return Err(user.busy_error(name));
            }
            state.nodes.remove(name);
            (node, moves)
        };
        retarget_each(moves).await;
        self.close_tree(node).await;
        Ok(())
    }

    /// Closes node `name` if the graph opened it implicitly (a backing file the header
    /// named, an inline child) and nothing uses it any more, with its own implicit
    /// children: what a parent that dropped its link (`block-stream`'s end) leaves.
    /// Monitor-owned nodes stay.
    pub async fn close_if_unused_implicit(&self, name: &str) {
        let _reconfigure = self.reconfigure.lock().await;
        let node = {
            let mut state = self.state();
            let Some(node) = state.nodes.get(name).cloned() else {
                return;
            };
            if !node.implicit || state.newest_user(&node).is_some() {
                return;
            }
            state.nodes.remove(name);
            node
        };
        self.close_tree(node).await;
    }

    /// Closes a node already out of the map, then its implicit children that nobody
    /// else uses.
    async fn close_tree(&self, node: Arc<Node>) {
        let mut pending = vec![node];
        while let Some(node) = pending.pop() {
            // Failures are logged by close; removal goes on regardless.
            let _ = node.close().await;
            let children = node
                .implicit_children
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            // Dropping the node drops its driver and with it the child attachments.
            drop(node);
            let mut state = self.state();
            for child in children {
                let Some(child_node) = state.nodes.get(&child).cloned() else {
                    continue;
                };
                if state.newest_user(&child_node).is_none() {
                    state.nodes.remove(&child);
                    pending.push(child_node);
                }
            }
        }
    }

    /// Inserts a filter above the node `above` (or above the filters already there).
    /// `build` receives the filter's fixed link to the filtered node and returns the
    /// filter driver. Every attachment that followed `above` is retargeted to the filter
    /// once its in-flight requests have finished; new requests wait meanwhile.
    pub async fn insert_filter(
        &self,
        above: &str,
        filter_name: Option<String>,
        build: impl FnOnce(Attachment) -> Result<Box<dyn BlockDriver>> + Send + 'static,
    ) -> Result<Arc<Node>> {
        let spec = FilterSpec {
            above: above.to_string(),
            name: filter_name,
            build: Box::new(build),
            owner: None,
            implicit_children: Vec::new(),
            discard: None,
        };
        Ok(self.insert_filters(vec![spec]).await?.remove(0))
    }

    /// Inserts several filters at one instant: every attachment of every filtered node
    /// is drained together, the filters are built, all attachments are retargeted, then
    /// all resume. This is what lets a transaction capture several disks at one point in
    /// time. All or nothing: if a filter cannot be built, none is inserted.
    pub async fn insert_filters(&self, specs: Vec<FilterSpec>) -> Result<Vec<Arc<Node>>> {
        let _reconfigure = self.reconfigure.lock().await;
        self.insert_filters_locked(specs, None).await
    }

    /// [`NodeGraph::insert_filters`], running `at_instant` while the filtered nodes are
    /// drained, before the filters are built: what it changes (a transaction's dirty
    /// bitmaps) changes at the filters' instant. If it fails, nothing is inserted.
    pub async fn insert_filters_at(
        &self,
        specs: Vec<FilterSpec>,
        at_instant: AtInstant,
    ) -> Result<Vec<Arc<Node>>> {
        let _reconfigure = self.reconfigure.lock().await;
        self.insert_filters_locked(specs, Some(at_instant)).await
    }

    /// [`NodeGraph::insert_filters`] for a caller holding the reconfiguration lock.
    ///
    /// 1. Under the state lock: resolve each filtered node, collect the attachments
    ///    that follow it, and mark it as being filtered, so attachments made from now
    ///    on are created held (see [`GraphState::attach`]) and cannot slip past.
    /// 2. Drain the collected attachments (wait for their requests in flight).
    /// 3. Build the filters: whatever they capture belongs to this instant.
    /// 4. Under the state lock: insert the filters and point every drained or held
    ///    attachment at its filter; then let requests resume.
    async fn insert_filters_locked(
        &self,
        specs: Vec<FilterSpec>,
        at_instant: Option<AtInstant>,
    ) -> Result<Vec<Arc<Node>>> {
        struct Plan {
            below: Arc<Node>,
            name: String,
            implicit: bool,
            build: Option<FilterBuild>,
            owner: Option<AttachUser>,
            implicit_children: Vec<String>,
            discard: Option<DiscardMode>,
        }
        let mut plans: Vec<Plan> = Vec::with_capacity(specs.len());
        let slots = {
            let mut state = self.state();
            for spec in specs {
                let below = state
                    .top_of(&spec.above)
                    .ok_or_else(|| not_found(&spec.above))?;
                if plans.iter().any(|p| Arc::ptr_eq(&p.below, &below)) {
                    return Err(Error::invalid(format!(
                        "Node '{}' cannot take two filters at the same instant",
                        spec.above
                    )));
                }
                let (name, implicit) = match &spec.name {
                    Some(name) => {
                        validate_node_name(name)?;
                        if state.nodes.contains_key(name) || plans.iter().any(|p| &p.name == name) {
                            return Err(duplicate(name));
                        }
                        (name.clone(), false)
                    }
                    None => (state.implicit_name(), true),
                };
                plans.push(Plan {
                    below,
                    name,
                    implicit,
                    build: Some(spec.build),
                    owner: spec.owner,
                    implicit_children: spec.implicit_children,
                    discard: spec.discard,
                });
            }
            let mut slots = Vec::new();
            for plan in &plans {
                state.filtering.insert(plan.below.name.clone(), Vec::new());
                slots.extend(slots_targeting(&mut state, &plan.below, true));
            }
            slots
        };
        let drained = drain(&slots).await;
        let mut built: Vec<(Arc<Node>, Arc<Node>)> = Vec::with_capacity(plans.len());
        let mut failure = at_instant.and_then(|f| f().err());
        for plan in plans.iter_mut() {
            if failure.is_some() {
                break;
            }
            let child = self.state().attach(
                plan.below.clone(),
                AttachUser::FilterChild {
                    filter: plan.name.clone(),
                },
                false,
            );
            let build = plan.build.take().expect("each filter is built once");
            match build(child) {
                Ok(driver) => {
                    let policy = NodePolicy {
                        detect_zeroes: DetectZeroes::Off,
                        discard: plan.discard.unwrap_or(plan.below.policy.discard),
                        ..plan.below.policy
                    };
                    let filter = Arc::new(Node {
                        name: plan.name.clone(),
                        implicit: plan.implicit,
                        implicit_children: Mutex::new(std::mem::take(&mut plan.implicit_children)),
                        policy,
                        growable: Default::default(),
                        bitmaps: Default::default(),
                        filter_owner: plan.owner.clone(),
                        demoted: Default::default(),
                        driver,
                    });
                    built.push((plan.below.clone(), filter));
                }
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        let held = {
            let mut state = self.state();
            let mut held = Vec::new();
            for plan in &plans {
                held.extend(state.filtering.remove(&plan.below.name).unwrap_or_default());
            }
            if failure.is_none() {
                for (below, filter) in &built {
                    state.nodes.insert(filter.name.clone(), filter.clone());
                    state
                        .filter_above
                        .insert(below.name.clone(), filter.name.clone());
                }
                let moving = slots.iter().chain(held.iter().map(|(slot, _)| slot));
                for slot in moving {
                    let mut target = slot.target.write().unwrap_or_else(|e| e.into_inner());
                    if let Some((_, filter)) = built.iter().find(|(b, _)| Arc::ptr_eq(b, &target)) {
                        *target = filter.clone();
                    }
                }
            }
            held
        };
        drop(drained);
        drop(held);
        match failure {
            Some(e) => Err(e),
            None => Ok(built.into_iter().map(|(_, filter)| filter).collect()),
        }
    }

    /// Removes a filter inserted by [`NodeGraph::insert_filter`]: its users go back to
    /// the node below it, drained the same way.
    pub async fn remove_filter(&self, name: &str) -> Result<()> {
        let _reconfigure = self.reconfigure.lock().await;
        let (filter, below, slots) = {
            let mut state = self.state();
            let filter = state
                .nodes
                .get(name)
                .cloned()
                .ok_or_else(|| not_found(name))?;
            let below = filter
                .driver
                .filtered_child()
                .ok_or_else(|| Error::invalid(format!("Node '{name}' is not a filter")))?
                .node();
            state.splice_out(name, &below);
            let slots = slots_targeting(&mut state, &filter, false);
            (filter, below, slots)
        };
        retarget_each(
            slots
                .into_iter()
                .map(|slot| (slot, below.clone()))
                .collect(),
        )
        .await;
        self.state().nodes.remove(name);
        drop(filter);
        Ok(())
    }
}

fn duplicate(name: &str) -> Error {
    Error::new(
        ErrorKind::InvalidArgument,
        format!("Duplicate nodes with node-name='{name}'"),
    )
}

/// Live slots pointing at `node`; only those that follow filters when `following`.
fn slots_targeting(state: &mut GraphState, node: &Arc<Node>, following: bool) -> Vec<Arc<Slot>> {
    state
        .live_slots()
        .into_iter()
        .filter(|s| !following || s.follows_filters)
        .filter(|s| Arc::ptr_eq(&s.target.read().unwrap_or_else(|e| e.into_inner()), node))
        .collect()
}

mod external_snapshot;
mod open;

use self::open::Inherited;
use crate::node::Node;
use crate::node::NodePolicy;
use crate::node::attach::AttachUser;
use crate::node::attach::Attachment;
use crate::node::attach::HeldSlot;
use crate::node::attach::Slot;
use crate::node::attach::drain;
use crate::node::attach::retarget_each;

#[cfg(test)]
mod tests;
