//! The factory: `blockdev-add` options to drivers, and child references to nodes.
//!
//! The only place that knows the drivers. Options a child does not set are inherited
//! from its parent ([`Inherited`]: read-only, cache, discard); a child named by
//! reference resolves to the top of the filters above it (or, for `snapshot-access`,
//! to that very node), an inline child is opened here and named `#blockNNN`. Opening
//! happens under the graph's reconfiguration lock, and every node it creates is listed
//! so a failure removes them all. A `copy-before-write` node is opened and then
//! inserted like a job's filter.

use super::duplicate;
use super::not_found;
use crate::dirty::DirtyBitmap;
use crate::drivers::fault::FaultDriver;
use crate::drivers::file::FileDriver;
use crate::drivers::null::NullDriver;
use crate::drivers::qcow2;
use crate::drivers::qcow2::Qcow2Driver;
use crate::drivers::raw::RawDriver;
use crate::drivers::snapshot_access::SnapshotAccessDriver;
use crate::error::Error;
use crate::error::ErrorKind;
use crate::error::Result;
use crate::graph::FilterSpec;
use crate::graph::NodeGraph;
use crate::graph::validate_node_name;
use crate::node::Node;
use crate::node::NodePolicy;
use crate::node::attach::AttachUser;
use crate::node::attach::Attachment;
use crate::node::driver::BlockDriver;
use crate::options::BackingRef;
use crate::options::BlockdevOptions;
use crate::options::BlockdevRef;
use crate::options::CbwOptions;
use crate::options::DiscardMode;
use crate::options::DriverOptions;
use crate::options::RepositoryRole;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::Mutex;

/// How a parent names an existing child node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ChildLink {
    /// The top of the filters above it (an ordinary child).
    FollowsFilters,
    /// That very node (snapshot-access reading one copy-before-write node).
    Fixed,
}

/// Options a child inherits from its parent when it does not set them.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Inherited {
    pub(super) read_only: Option<bool>,
    pub(super) auto_read_only: Option<bool>,
    pub(super) direct: Option<bool>,
    pub(super) no_flush: Option<bool>,
    pub(super) discard: Option<DiscardMode>,
    /// Opened as a child of another node in the same `blockdev-add`.
    pub(super) nested: bool,
}

pub(super) type OpenFuture<'a> = Pin<Box<dyn Future<Output = Result<Arc<Node>>> + Send + 'a>>;

/// A writable parent needs a writable child (or falls back with auto-read-only).
pub(super) fn check_child_writable(
    child: &Attachment,
    policy: &mut NodePolicy,
    auto_read_only: bool,
) -> Result<()> {
    if !policy.read_only && child.node().policy.read_only {
        if auto_read_only {
            policy.read_only = true;
        } else {
            return Err(Error::new(
                ErrorKind::PermissionDenied,
                "Block node is read-only",
            ));
        }
    }
    Ok(())
}

impl NodeGraph {
    /// Adds a node named `name` over a driver built elsewhere (a read-only view of a
    /// repository snapshot, say), with the default policy and `read_only`.
    pub async fn add_driver(
        &self,
        name: &str,
        driver: Box<dyn BlockDriver>,
        read_only: bool,
    ) -> Result<Arc<Node>> {
        validate_node_name(name)?;
        let _reconfigure = self.reconfigure.lock().await;
        let node = Arc::new(Node {
            name: name.to_string(),
            implicit: false,
            implicit_children: Default::default(),
            policy: NodePolicy {
                read_only,
                ..NodePolicy::default()
            },
            growable: Default::default(),
            bitmaps: Mutex::new(Vec::new()),
            filter_owner: None,
            demoted: Default::default(),
            driver,
        });
        let mut state = self.state();
        if state.nodes.contains_key(name) {
            return Err(duplicate(name));
        }
        state.nodes.insert(name.to_string(), node.clone());
        Ok(node)
    }

    pub(super) fn open_node<'a>(
        &'a self,
        options: BlockdevOptions,
        inherited: Inherited,
        created: &'a mut Vec<String>,
    ) -> OpenFuture<'a> {
        Box::pin(async move {
            let (name, implicit) = match &options.node_name {
                Some(name) => {
                    validate_node_name(name)?;
                    if self.state().nodes.contains_key(name) {
                        return Err(duplicate(name));
                    }
                    (name.clone(), false)
                }
                None => (self.state().implicit_name(), true),
            };
            let mut policy = NodePolicy {
                read_only: options.read_only.or(inherited.read_only).unwrap_or(false),
                direct: options.cache.direct.or(inherited.direct).unwrap_or(false),
                no_flush: options
                    .cache
                    .no_flush
                    .or(inherited.no_flush)
                    .unwrap_or(false),
                discard: options.discard.or(inherited.discard).unwrap_or_default(),
                detect_zeroes: options.detect_zeroes,
            };
            let auto_read_only = options
                .auto_read_only
                .or(inherited.auto_read_only)
                .unwrap_or(false);
            let inherit = Inherited {
                read_only: Some(policy.read_only),
                auto_read_only: Some(auto_read_only),
                direct: Some(policy.direct),
                no_flush: Some(policy.no_flush),
                discard: Some(policy.discard),
                nested: true,
            };
            let mut implicit_children = Vec::new();
            let driver: Box<dyn BlockDriver> = match options.driver {
                DriverOptions::CopyBeforeWrite(cbw) => {
                    if implicit || inherited.nested {
                        return Err(Error::unsupported(
                            "a copy-before-write node must be added on its own, with a \
                             node-name, not as an inline child",
                        ));
                    }
                    return self
                        .open_cbw(name, cbw, options.discard, inherit, created)
                        .await;
                }
                DriverOptions::SnapshotAccess(access) => {
                    let user = AttachUser::Parent {
                        parent: name.clone(),
                        role: "file",
                    };
                    // A fixed link to that very node: a filter inserted above it later
                    // must not come between the reader and the snapshot.
                    let node = self
                        .resolve_child(
                            access.file,
                            ChildLink::Fixed,
                            inherit,
                            created,
                            &mut implicit_children,
                        )
                        .await?;
                    let child = self.state().attach(node, user, false);
                    if child.node().driver().snapshot().is_none() {
                        return Err(Error::invalid(format!(
                            "Node '{}' is not a copy-before-write node: snapshot-access \
                             reads the snapshot one keeps",
                            child.node().name()
                        )));
                    }
                    Box::new(SnapshotAccessDriver::new(child))
                }
                DriverOptions::File(file) => {
                    let (read_only, direct) = (policy.read_only, policy.direct);
                    let driver = tokio::task::spawn_blocking(move || {
                        FileDriver::open(&file.filename, read_only, direct, auto_read_only)
                    })
                    .await
                    .map_err(|e| Error::new(ErrorKind::Io, format!("open task failed: {e}")))??;
                    policy.read_only = driver.is_read_only();
                    Box::new(driver)
                }
                DriverOptions::Null(null) => Box::new(NullDriver::new(&null)),
                DriverOptions::Raw(raw) => {
                    let child = self
                        .open_child(
                            raw.file,
                            &name,
                            "file",
                            inherit,
                            created,
                            &mut implicit_children,
                        )
                        .await?;
                    check_child_writable(&child, &mut policy, auto_read_only)?;
                    let over_file = (child.node().driver_name() == "file")
                        .then(|| child.node().filename())
                        .flatten();
                    let mut driver =
                        RawDriver::new(child, raw.offset, raw.size)?.probed(raw.probed);
                    // A raw image over a host file keeps its persistent bitmaps beside it.
                    if driver.is_whole_child()
                        && let Some(image) = over_file
                    {
                        let path = crate::drivers::sidecar_bitmaps::sidecar_path(
                            &image,
                            self.state_dir().as_deref(),
                        );
                        let store = crate::drivers::sidecar_bitmaps::SidecarBitmaps::open(
                            path,
                            driver.length(),
                            !policy.read_only,
                        )?;
                        driver = driver.with_bitmaps(store);
                    }
                    Box::new(driver)
                }
                DriverOptions::Qcow2(q) => {
                    let child = self
                        .open_child(
                            q.file,
                            &name,
                            "file",
                            inherit,
                            created,
                            &mut implicit_children,
                        )
                        .await?;
                    check_child_writable(&child, &mut policy, auto_read_only)?;
                    let header = Qcow2Driver::read_header(&child).await?;
                    let backing_options = match q.backing {
                        BackingRef::None => None,
                        BackingRef::Node(reference) => Some(reference),
                        BackingRef::FromHeader => match &header.backing_file {
                            None => None,
                            Some(stored) => {
                                let image = child.node().filename();
                                let options =
                                    qcow2::backing_options(image.as_deref(), stored, &header)?;
                                Some(BlockdevRef::Inline(Box::new(options)))
                            }
                        },
                    };
                    let backing = match backing_options {
                        None => None,
                        Some(reference) => {
                            let backing_inherit = Inherited {
                                read_only: Some(true),
                                ..inherit
                            };
                            Some(
                                self.open_child(
                                    reference,
                                    &name,
                                    "backing",
                                    backing_inherit,
                                    created,
                                    &mut implicit_children,
                                )
                                .await?,
                            )
                        }
                    };
                    Box::new(
                        Qcow2Driver::open(
                            child,
                            header,
                            backing,
                            policy.read_only,
                            q.l2_cache_size,
                        )
                        .await?,
                    )
                }
                DriverOptions::Nbd(_) => match &self.external {
                    Some(external) => external.open(&options.driver).await?,
                    None => {
                        return Err(Error::unsupported(
                            "the nbd driver is not available in this graph",
                        ));
                    }
                },
                DriverOptions::Repository(ref repo) => {
                    match (&repo.role, options.read_only) {
                        // A snapshot is read-only whatever the parent would pass down.
                        (RepositoryRole::Read { .. }, Some(false)) => {
                            return Err(Error::new(
                                ErrorKind::PermissionDenied,
                                "a repository snapshot is read-only: set read-only to true",
                            ));
                        }
                        (RepositoryRole::Read { .. }, _) => policy.read_only = true,
                        (RepositoryRole::Write { .. }, _) if policy.read_only => {
                            return Err(Error::new(
                                ErrorKind::PermissionDenied,
                                "the repository node a backup writes into cannot be read-only",
                            ));
                        }
                        (RepositoryRole::Write { .. }, _) => {}
                    }
                    match &self.external {
                        Some(external) => external.open(&options.driver).await?,
                        None => {
                            return Err(Error::unsupported(
                                "the repository driver is not available in this graph",
                            ));
                        }
                    }
                }
                DriverOptions::Fault(fault) => {
                    let child = self
                        .open_child(
                            fault.image,
                            &name,
                            "image",
                            inherit,
                            created,
                            &mut implicit_children,
                        )
                        .await?;
                    check_child_writable(&child, &mut policy, auto_read_only)?;
                    Box::new(FaultDriver::new(child, fault.rules))
                }
            };
            // Guest writes a killed daemon's backup held go into the image before
            // anyone reads it (or the open fails, saying where they are).
            crate::held_journal::replay(&*driver, policy.read_only).await?;
            let stored: Vec<Arc<DirtyBitmap>> = driver
                .bitmap_store()
                .map(|store| store.take_persistent_bitmaps())
                .unwrap_or_default()
                .into_iter()
                .map(DirtyBitmap::from_stored)
                .collect();
            let node = Arc::new(Node {
                name: name.clone(),
                implicit,
                implicit_children: Mutex::new(implicit_children),
                policy,
                growable: Default::default(),
                bitmaps: Mutex::new(stored),
                filter_owner: None,
                demoted: Default::default(),
                driver,
            });
            let mut state = self.state();
            if state.nodes.contains_key(&name) {
                return Err(duplicate(&name));
            }
            state.nodes.insert(name.clone(), node.clone());
            created.push(name);
            Ok(node)
        })
    }

    /// `blockdev-add` of a `copy-before-write` node: opens its target (and its file when
    /// given inline), then inserts it above the file like a job's filter, so every
    /// writer of the file goes through it from that instant on; the snapshot is the
    /// file as it was then.
    pub(super) async fn open_cbw(
        &self,
        name: String,
        options: CbwOptions,
        discard: Option<DiscardMode>,
        inherit: Inherited,
        created: &mut Vec<String>,
    ) -> Result<Arc<Node>> {
        let external = self.external.clone().ok_or_else(|| {
            Error::unsupported("the copy-before-write driver is not available here")
        })?;
        let mut implicit_children = Vec::new();
        let below = self
            .resolve_child(
                options.file.clone(),
                ChildLink::FollowsFilters,
                inherit,
                created,
                &mut implicit_children,
            )
            .await?
            .name
            .clone();
        let target = self
            .open_child(
                options.target.clone(),
                &name,
                "target",
                inherit,
                created,
                &mut implicit_children,
            )
            .await?;
        if target.node().policy.read_only {
            return Err(Error::new(
                ErrorKind::PermissionDenied,
                "Block node is read-only",
            ));
        }
        let bitmap = match &options.bitmap {
            Some(bitmap) => {
                let node = self.node(&bitmap.node).ok_or_else(|| {
                    Error::new(
                        ErrorKind::NotFound,
                        format!("Node '{}' not found", bitmap.node),
                    )
                })?;
                Some(node.bitmap(&bitmap.name)?)
            }
            None => None,
        };
        let spec = FilterSpec {
            above: below,
            name: Some(name),
            build: Box::new(move |file| {
                let initial = match &bitmap {
                    Some(bitmap) => {
                        if bitmap.info().inconsistent {
                            return Err(Error::invalid(format!(
                                "Bitmap '{}' is inconsistent and cannot be used",
                                bitmap.name()
                            )));
                        }
                        Some(bitmap.snapshot())
                    }
                    None => None,
                };
                external.copy_before_write(&options, file, target, initial)
            }),
            owner: None,
            implicit_children,
            discard,
        };
        // Not recorded in `created`: the node is complete, and a copy-before-write
        // node is never an inline child, so nothing can fail after this.
        Ok(self
            .insert_filters_locked(vec![spec], None)
            .await?
            .remove(0))
    }

    /// Opens or finds a child and attaches the parent to it.
    pub(super) async fn open_child(
        &self,
        reference: BlockdevRef,
        parent: &str,
        role: &'static str,
        inherit: Inherited,
        created: &mut Vec<String>,
        implicit_children: &mut Vec<String>,
    ) -> Result<Attachment> {
        let user = AttachUser::Parent {
            parent: parent.to_string(),
            role,
        };
        let child = self
            .resolve_child(
                reference,
                ChildLink::FollowsFilters,
                inherit,
                created,
                implicit_children,
            )
            .await?;
        Ok(self.state().attach(child, user, true))
    }

    /// The node a child reference means: an existing node by name (the top of the
    /// filters above it, unless the link is fixed), or a new one opened inline and
    /// recorded as the parent's implicit child.
    pub(super) async fn resolve_child(
        &self,
        reference: BlockdevRef,
        link: ChildLink,
        inherit: Inherited,
        created: &mut Vec<String>,
        implicit_children: &mut Vec<String>,
    ) -> Result<Arc<Node>> {
        match reference {
            BlockdevRef::Node(child_name) => {
                let state = self.state();
                let node = match link {
                    ChildLink::FollowsFilters => state.top_of(&child_name),
                    ChildLink::Fixed => state.nodes.get(&child_name).cloned(),
                };
                node.ok_or_else(|| not_found(&child_name))
            }
            BlockdevRef::Inline(child_options) => {
                let child = self.open_node(*child_options, inherit, created).await?;
                if child.implicit {
                    implicit_children.push(child.name.clone());
                }
                Ok(child)
            }
        }
    }
}
