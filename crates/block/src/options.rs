//! `blockdev-add` options, parsed from exactly the JSON QEMU takes.
//!
//! QMP clients send `{"driver":"raw","node-name":"disk0","file":{"driver":"file",
//! "filename":"disk.img"}}`, or name an existing node: `"file":"file0"`. The parser walks
//! the JSON object by hand instead of deriving serde, because the error texts are part
//! of the interface: a client that sends a wrong member must get QEMU's words
//! ("Parameter 'file.filename' is missing", "Parameter 'bogus' is unexpected",
//! "Invalid parameter type for 'size', expected: integer"). [`BlockdevOptions`] still
//! implements `Deserialize`, through this parser.
//!
//! Supported drivers: `file`, `raw`, `qcow2`, `null-co`, `null-aio`, `nbd`,
//! `copy-before-write`, `snapshot-access` and our test filter `fault`. Options QEMU has that
//! we cannot honour are refused with [`crate::error::ErrorKind::Unsupported`], never ignored.

use std::path::PathBuf;

use serde::Deserialize;
use serde::Deserializer;
use serde_json::Value;

use crate::error::Error;
use crate::error::Result;
use crate::qapi::Members;
use crate::qapi::integer;
use crate::qapi::parse_keyval;

/// Options of one node, as `blockdev-add` takes them.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockdevOptions {
    /// `node-name`: the name other commands use; generated when absent on a child.
    pub node_name: Option<String>,
    /// `read-only`; inherited by inline children when unset.
    pub read_only: Option<bool>,
    /// `auto-read-only`: fall back to read-only when the file cannot be opened for
    /// writing.
    pub auto_read_only: Option<bool>,
    /// `force-share`: accepted with `read-only` only (we take no image locks).
    pub force_share: bool,
    /// `cache.direct` and `cache.no-flush`.
    pub cache: CacheOptions,
    /// `discard`: whether discard requests reach the driver.
    pub discard: Option<DiscardMode>,
    /// `detect-zeroes`: turn all-zero writes into write-zeroes.
    pub detect_zeroes: DetectZeroes,
    /// The driver and its own members.
    pub driver: DriverOptions,
}

/// `cache` member of `BlockdevOptions`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheOptions {
    /// Bypass the host page cache (O_DIRECT).
    pub direct: Option<bool>,
    /// Ignore flush requests (unsafe; for scratch images).
    pub no_flush: Option<bool>,
}

/// `discard` member: `ignore` drops discard requests, `unmap` passes them down.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DiscardMode {
    /// Discard requests succeed without touching the image (QEMU's default).
    #[default]
    Ignore,
    /// Discard requests deallocate space.
    Unmap,
}

/// `detect-zeroes` member.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DetectZeroes {
    /// Writes are written as given.
    #[default]
    Off,
    /// All-zero writes become write-zeroes that keep the allocation.
    On,
    /// All-zero writes become write-zeroes that may deallocate (with `discard=unmap`).
    Unmap,
}

/// The driver-specific half of the options.
#[derive(Debug, Clone, PartialEq)]
pub enum DriverOptions {
    /// `file`: a host file or block device.
    File(FileOptions),
    /// `raw`: the bytes of its child, optionally a window of them.
    Raw(RawOptions),
    /// `null-co` / `null-aio`: a device that stores nothing.
    Null(NullOptions),
    /// `fault`: fails chosen requests of its child (tests).
    Fault(FaultOptions),
    /// `nbd`: an export of a remote NBD server (opened by the `nbd` crate).
    Nbd(NbdOptions),
    /// `qcow2`: QEMU's copy-on-write format over a child.
    Qcow2(Qcow2Options),
    /// `copy-before-write`: a standalone copy-before-write filter (fleecing), built by
    /// the jobs crate through `graph::ExternalDrivers`.
    CopyBeforeWrite(CbwOptions),
    /// `snapshot-access`: reads the point-in-time view of a `copy-before-write` node.
    SnapshotAccess(SnapshotAccessOptions),
    /// `repository`: a snapshot of a backup repository, being written (the target of
    /// a backup) or read (restore, an overlay's backing); opened by the binary.
    Repository(RepositoryOptions),
}

/// Members of the `repository` driver: either `disk` and `size` (a new snapshot, the
/// target of one backup) or `snapshot` (an existing one, read-only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepositoryOptions {
    /// `repository`: the repository's directory.
    pub repository: PathBuf,
    /// `passphrase-file`: the passphrase of an encrypted repository (else the daemon's
    /// `STILLPOINT_PASSPHRASE`).
    pub passphrase_file: Option<PathBuf>,
    /// `s3-endpoint`, `s3-region`, `s3-virtual-hosted`: how to reach a repository
    /// given as `s3://BUCKET/PREFIX` (else the daemon's flags and `AWS_*` environment).
    pub s3: S3Members,
    /// What the node is.
    pub role: RepositoryRole,
}

/// How a `repository` node reaches S3, where its members say.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct S3Members {
    /// `s3-endpoint`: the server's URL.
    pub endpoint: Option<String>,
    /// `s3-region`.
    pub region: Option<String>,
    /// `s3-virtual-hosted`: `BUCKET.host` requests instead of path-style.
    pub virtual_hosted: Option<bool>,
}

/// A repository node writes one new snapshot or reads one existing snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RepositoryRole {
    /// A new snapshot of `disk`, `size` bytes, committed when a backup into it ends.
    Write {
        /// `disk`: the disk's name in the repository.
        disk: String,
        /// `size`: the disk's size in bytes.
        size: u64,
        /// `parent`: the snapshot unchanged chunks are taken from.
        parent: ParentSnapshot,
        /// `bitmap`: the source's persistent dirty bitmap created or cleared at the
        /// backup's instant (in its `transaction`), recorded in the snapshot so a later
        /// `stillpoint backup --bitmap NAME` of the disk reads only what it marks.
        bitmap: Option<String>,
    },
    /// `snapshot`: an id, or a disk name for its latest snapshot.
    Read {
        /// The snapshot.
        snapshot: String,
    },
}

/// The `parent` member: whose chunks a backup that skips unchanged ranges inherits.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ParentSnapshot {
    /// `null` or absent: none (every chunk must be written).
    #[default]
    None,
    /// `"latest"`: the disk's newest snapshot.
    Latest,
    /// A snapshot id.
    Id(String),
}

/// What a copy-before-write does when it cannot save the old data (`on-cbw-error`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnCbwError {
    /// The guest write fails with the errno of the failed read or staging.
    #[default]
    BreakGuestWrite,
    /// The guest write goes through; the snapshot is broken (the job fails, snapshot
    /// reads are refused).
    BreakSnapshot,
}

/// A dirty bitmap named by node and bitmap name (`BlockDirtyBitmap`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapRef {
    /// Node holding the bitmap.
    pub node: String,
    /// Bitmap name.
    pub name: String,
}

/// Members of the `copy-before-write` driver.
#[derive(Debug, Clone, PartialEq)]
pub struct CbwOptions {
    /// `file`: the node whose old data is saved (the filtered child).
    pub file: BlockdevRef,
    /// `target`: where old data goes.
    pub target: BlockdevRef,
    /// `bitmap`: only its dirty clusters are protected (and readable in the snapshot).
    pub bitmap: Option<BitmapRef>,
    /// `on-cbw-error`.
    pub on_cbw_error: OnCbwError,
    /// `cbw-timeout`: seconds a copy-before-write may take (0: no limit).
    pub cbw_timeout: u64,
    /// `min-cluster-size`: lower bound of the copy granularity (a power of two).
    pub min_cluster_size: Option<u64>,
}

/// Members of the `snapshot-access` driver.
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotAccessOptions {
    /// `file`: the `copy-before-write` node whose snapshot is read.
    pub file: BlockdevRef,
}

/// Members of the `nbd` driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdOptions {
    /// `server`: where to connect.
    pub server: SocketAddress,
    /// `export`: the export name ("" by default).
    pub export: String,
}

/// QEMU's flat `SocketAddress`: where an NBD server listens or a client connects. The
/// one address type of the daemon, the CLI and the NBD client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SocketAddress {
    /// `{"type":"unix","path":...}`
    Unix(PathBuf),
    /// `{"type":"inet","host":...,"port":...}`
    Inet {
        /// Host name or address.
        host: String,
        /// Port, a string in QEMU's schema.
        port: String,
    },
}

impl SocketAddress {
    /// The members after `type` (`unix`: `path`; `inet`: `host`, `port`, a number or a
    /// string), as `blockdev-add`'s `server`, `nbd-server-start`'s `addr` and
    /// `--nbd-server addr.*` spell them.
    pub fn parse(kind: &str, data: &mut Members) -> Result<Self> {
        if kind == "unix" {
            return Ok(SocketAddress::Unix(PathBuf::from(
                data.required("path", Members::string)?,
            )));
        }
        let host = data.required("host", Members::string)?;
        let port = data.required("port", |m, k, v| match v {
            Value::Number(n) => Ok(n.to_string()),
            other => m.string(k, other),
        })?;
        Ok(SocketAddress::Inet { host, port })
    }
}

impl std::fmt::Display for SocketAddress {
    /// `unix:PATH` or `HOST:PORT`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SocketAddress::Unix(path) => write!(f, "unix:{}", path.display()),
            SocketAddress::Inet { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

/// Which requests a rule applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultOp {
    /// Reads.
    Read,
    /// Writes, write-zeroes and discards.
    Write,
    /// Flushes.
    Flush,
    /// All of them.
    Any,
}

/// One injection rule; see the module documentation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FaultRule {
    /// Which requests.
    pub op: FaultOp,
    /// First byte of the range.
    pub offset: u64,
    /// Length of the range.
    pub length: u64,
    /// The errno to fail with.
    pub errno: i32,
    /// Retire after firing once.
    pub once: bool,
    /// Matching requests to let through first.
    pub after: u64,
    /// Delay the request by this many milliseconds instead of failing it.
    pub delay_ms: Option<u64>,
}

/// Parses an errno given by name or number.
pub fn parse_errno(name: &str) -> Option<i32> {
    match name {
        "EIO" => Some(libc::EIO),
        "ENOSPC" => Some(libc::ENOSPC),
        "EPERM" => Some(libc::EPERM),
        "EINVAL" => Some(libc::EINVAL),
        "ENOTSUP" | "EOPNOTSUPP" => Some(libc::ENOTSUP),
        other => other.parse().ok().filter(|n| *n > 0),
    }
}

/// Members of the `fault` driver (see `drivers::fault`).
#[derive(Debug, Clone, PartialEq)]
pub struct FaultOptions {
    /// `image`: the child whose requests may fail.
    pub image: BlockdevRef,
    /// `rules`: which requests fail, and how.
    pub rules: Vec<FaultRule>,
}

/// Members of the `file` driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileOptions {
    /// `filename`: path of the host file or block device.
    pub filename: PathBuf,
}

/// Members of the `raw` driver.
#[derive(Debug, Clone, PartialEq)]
pub struct RawOptions {
    /// `file`: the child holding the bytes.
    pub file: BlockdevRef,
    /// `offset`: first byte of the child that is byte 0 of this node.
    pub offset: Option<u64>,
    /// `size`: length of the window; the rest of the child by default.
    pub size: Option<u64>,
    /// The format was guessed, not given (command line only, never a QMP member):
    /// writes that would make the first sector probe as another format are refused,
    /// as QEMU does for probed raw images.
    pub probed: bool,
}

/// Members of the `qcow2` driver.
#[derive(Debug, Clone, PartialEq)]
pub struct Qcow2Options {
    /// `file`: the child holding the image.
    pub file: BlockdevRef,
    /// `backing`: which backing node to use.
    pub backing: BackingRef,
    /// `l2-cache-size`: bytes of L2 tables kept in memory.
    pub l2_cache_size: Option<u64>,
}

/// The `backing` member of a format with backing files.
#[derive(Debug, Clone, PartialEq)]
pub enum BackingRef {
    /// Absent: open the backing file the image header names.
    FromHeader,
    /// `null`: no backing node, even if the header names one.
    None,
    /// A node or an inline definition.
    Node(BlockdevRef),
}

/// Members of the `null-co` / `null-aio` drivers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NullOptions {
    /// Which of the two names was used (they behave the same here).
    pub name: &'static str,
    /// `size` in bytes (default 1 GiB).
    pub size: u64,
    /// `latency-ns`: delay added to every request.
    pub latency_ns: u64,
    /// `read-zeroes`: fill read buffers with zeros (else leave them as passed).
    pub read_zeroes: bool,
}

/// A child reference: inline options or the name of an existing node.
#[derive(Debug, Clone, PartialEq)]
pub enum BlockdevRef {
    /// A new node described inline.
    Inline(Box<BlockdevOptions>),
    /// An existing node, by node-name.
    Node(String),
}

/// Drivers QEMU has that this build does not, named so the error says "not yet"
/// instead of "no such thing".
const KNOWN_UNSUPPORTED: &[&str] = &["blkdebug", "throttle", "qcow"];

impl BlockdevOptions {
    /// Parses the dotted key=value form `--blockdev` takes.
    pub fn from_keyval(text: &str) -> Result<Self> {
        Self::from_members(Members::keyval(parse_keyval(text, Some("driver"))?))
    }

    /// Parses `blockdev-add` arguments.
    pub fn from_json(value: Value) -> Result<Self> {
        match value {
            Value::Object(map) => Self::from_members(Members::new(map, String::new())),
            _ => Err(Error::invalid(
                "Invalid parameter type for 'arguments', expected: object",
            )),
        }
    }

    /// Parses options from already-split members (used for nested objects).
    pub fn from_members(mut m: Members) -> Result<Self> {
        let driver_name = m.required("driver", Members::string)?;
        let node_name = m.optional("node-name", Members::string)?;
        let read_only = m.optional("read-only", Members::boolean)?;
        let auto_read_only = m.optional("auto-read-only", Members::boolean)?;
        let force_share = m
            .optional("force-share", Members::boolean)?
            .unwrap_or(false);
        let cache = match m.optional("cache", Members::object)? {
            Some(mut c) => {
                let cache = CacheOptions {
                    direct: c.optional("direct", Members::boolean)?,
                    no_flush: c.optional("no-flush", Members::boolean)?,
                };
                c.finish()?;
                cache
            }
            None => CacheOptions::default(),
        };
        let discard = m
            .optional("discard", |m, k, v| {
                m.enumeration(k, v, &["ignore", "off", "unmap", "on"])
            })?
            .map(|d| match d.as_str() {
                "unmap" | "on" => DiscardMode::Unmap,
                _ => DiscardMode::Ignore,
            });
        let detect_zeroes = match m
            .optional("detect-zeroes", |m, k, v| {
                m.enumeration(k, v, &["off", "on", "unmap"])
            })?
            .as_deref()
        {
            Some("on") => DetectZeroes::On,
            Some("unmap") => DetectZeroes::Unmap,
            _ => DetectZeroes::Off,
        };
        if force_share && read_only != Some(true) {
            return Err(Error::invalid(
                "force-share=on can only be used with read-only images",
            ));
        }
        let driver = match driver_name.as_str() {
            "file" => DriverOptions::File(parse_file(&mut m)?),
            "raw" => DriverOptions::Raw(parse_raw(&mut m)?),
            "qcow2" => DriverOptions::Qcow2(parse_qcow2(&mut m)?),
            "fault" => DriverOptions::Fault(parse_fault(&mut m)?),
            "nbd" => DriverOptions::Nbd(parse_nbd(&mut m)?),
            "repository" => DriverOptions::Repository(parse_repository(&mut m)?),
            "copy-before-write" => DriverOptions::CopyBeforeWrite(parse_cbw(&mut m)?),
            "snapshot-access" => DriverOptions::SnapshotAccess(SnapshotAccessOptions {
                file: m.required("file", blockdev_ref)?,
            }),
            "null-co" | "null-aio" => {
                let name = if driver_name == "null-co" {
                    "null-co"
                } else {
                    "null-aio"
                };
                DriverOptions::Null(parse_null(&mut m, name)?)
            }
            other if KNOWN_UNSUPPORTED.contains(&other) => {
                return Err(Error::unsupported(format!(
                    "Driver '{other}' is not supported by this build of stillpoint yet"
                )));
            }
            other => {
                return Err(Error::invalid(format!(
                    "Parameter '{}driver' does not accept value '{other}'",
                    m.prefix()
                )));
            }
        };
        m.finish()?;
        Ok(Self {
            node_name,
            read_only,
            auto_read_only,
            force_share,
            cache,
            discard,
            detect_zeroes,
            driver,
        })
    }

    /// Options for a raw image over a file, the shape the CLI opens images with.
    pub fn raw_file(path: impl Into<PathBuf>, read_only: bool) -> Self {
        let file = Self::plain(DriverOptions::File(FileOptions {
            filename: path.into(),
        }));
        let mut raw = Self::plain(DriverOptions::Raw(RawOptions {
            file: BlockdevRef::Inline(Box::new(file)),
            offset: None,
            size: None,
            probed: false,
        }));
        raw.read_only = Some(read_only);
        raw
    }

    /// Options with every common member at its default.
    pub fn plain(driver: DriverOptions) -> Self {
        Self {
            node_name: None,
            read_only: None,
            auto_read_only: None,
            force_share: false,
            cache: CacheOptions::default(),
            discard: None,
            detect_zeroes: DetectZeroes::Off,
            driver,
        }
    }

    /// The name of the driver these options select.
    pub fn driver_name(&self) -> &'static str {
        match &self.driver {
            DriverOptions::File(_) => "file",
            DriverOptions::Raw(_) => "raw",
            DriverOptions::Qcow2(_) => "qcow2",
            DriverOptions::Null(n) => n.name,
            DriverOptions::Fault(_) => "fault",
            DriverOptions::Nbd(_) => "nbd",
            DriverOptions::CopyBeforeWrite(_) => "copy-before-write",
            DriverOptions::SnapshotAccess(_) => "snapshot-access",
            DriverOptions::Repository(_) => "repository",
        }
    }
}

impl<'de> Deserialize<'de> for BlockdevOptions {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        let value = Value::deserialize(deserializer)?;
        Self::from_json(value).map_err(serde::de::Error::custom)
    }
}

fn parse_file(m: &mut Members) -> Result<FileOptions> {
    let filename = m.required("filename", Members::string)?;
    let locking = m.optional("locking", |m, k, v| {
        m.enumeration(k, v, &["auto", "on", "off"])
    })?;
    if locking.as_deref() == Some("on") {
        return Err(Error::unsupported(
            "locking=on is not supported yet: stillpoint takes no image locks \
             (use locking=off or auto)",
        ));
    }
    let aio = m.optional("aio", |m, k, v| {
        m.enumeration(k, v, &["threads", "native", "io_uring"])
    })?;
    if let Some(aio) = aio.filter(|a| a != "threads") {
        return Err(Error::unsupported(format!(
            "aio={aio} is not supported yet: the file driver uses a thread pool (aio=threads)"
        )));
    }
    Ok(FileOptions {
        filename: PathBuf::from(filename),
    })
}

fn blockdev_ref(m: &Members, key: &str, value: Value) -> Result<BlockdevRef> {
    match value {
        Value::String(name) => Ok(BlockdevRef::Node(name)),
        Value::Object(map) => {
            let child = m.object(key, Value::Object(map))?;
            Ok(BlockdevRef::Inline(Box::new(
                BlockdevOptions::from_members(child)?,
            )))
        }
        _ => Err(m.type_error(key, "BlockdevRef")),
    }
}

fn parse_fault_rule(r: &mut Members) -> Result<FaultRule> {
    let op = match r
        .optional("op", |r, k, v| {
            r.enumeration(k, v, &["read", "write", "flush", "any"])
        })?
        .as_deref()
    {
        Some("read") => FaultOp::Read,
        Some("write") => FaultOp::Write,
        Some("flush") => FaultOp::Flush,
        _ => FaultOp::Any,
    };
    let bad_errno = |r: &Members, what: &str| {
        Error::invalid(format!(
            "Parameter '{}errno' does not accept value '{what}'",
            r.prefix()
        ))
    };
    let errno = match r.optional("errno", |_, _, v| Ok(v))? {
        None => libc::EIO,
        Some(Value::String(name)) => parse_errno(&name).ok_or_else(|| bad_errno(r, &name))?,
        Some(v) => {
            let n = r.unsigned("errno", v)?;
            i32::try_from(n)
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| bad_errno(r, &n.to_string()))?
        }
    };
    Ok(FaultRule {
        op,
        offset: r.optional("offset", Members::unsigned)?.unwrap_or(0),
        length: r.optional("length", Members::unsigned)?.unwrap_or(u64::MAX),
        errno,
        once: r.optional("once", Members::boolean)?.unwrap_or(false),
        after: r.optional("after", Members::unsigned)?.unwrap_or(0),
        delay_ms: r.optional("delay-ms", Members::unsigned)?,
    })
}

fn parse_fault(m: &mut Members) -> Result<FaultOptions> {
    let image = m.required("image", blockdev_ref)?;
    let rules = m.optional("rules", |m, key, value| {
        let Value::Array(items) = value else {
            return Err(m.type_error(key, "array"));
        };
        let mut rules = Vec::with_capacity(items.len());
        for (i, item) in items.into_iter().enumerate() {
            let mut r = m.object(&format!("{key}[{i}]"), item)?;
            rules.push(parse_fault_rule(&mut r)?);
            r.finish()?;
        }
        Ok(rules)
    })?;
    Ok(FaultOptions {
        image,
        rules: rules.unwrap_or_default(),
    })
}

fn parse_nbd(m: &mut Members) -> Result<NbdOptions> {
    let server = m.required("server", |m, key, value| {
        let mut a = m.object(key, value)?;
        let kind = a.required("type", |a, k, v| a.enumeration(k, v, &["unix", "inet"]))?;
        let address = SocketAddress::parse(&kind, &mut a)?;
        a.finish()?;
        Ok(address)
    })?;
    let export = m.optional("export", Members::string)?.unwrap_or_default();
    for key in ["reconnect-delay", "open-timeout"] {
        if m.optional(key, Members::unsigned)?.unwrap_or(0) != 0 {
            return Err(Error::unsupported(format!(
                "{key} is not supported yet by the nbd driver"
            )));
        }
    }
    for key in ["tls-creds", "tls-hostname", "x-dirty-bitmap"] {
        if m.optional(key, |_, _, v| Ok(v))?.is_some() {
            return Err(Error::unsupported(format!(
                "{key} is not supported yet by the nbd driver"
            )));
        }
    }
    Ok(NbdOptions { server, export })
}

fn parse_repository(m: &mut Members) -> Result<RepositoryOptions> {
    let repository = PathBuf::from(m.required("repository", Members::string)?);
    let passphrase_file = m
        .optional("passphrase-file", Members::string)?
        .map(PathBuf::from);
    let s3 = S3Members {
        endpoint: m.optional("s3-endpoint", Members::string)?,
        region: m.optional("s3-region", Members::string)?,
        virtual_hosted: m.optional("s3-virtual-hosted", Members::boolean)?,
    };
    let snapshot = m.optional("snapshot", Members::string)?;
    let disk = m.optional("disk", Members::string)?;
    let size = m.optional("size", Members::unsigned)?;
    let parent = m.optional("parent", |m, key, value| match value {
        Value::Null => Ok(ParentSnapshot::None),
        Value::String(s) if s == "latest" => Ok(ParentSnapshot::Latest),
        Value::String(s) => Ok(ParentSnapshot::Id(s)),
        _ => Err(m.type_error(key, "string or null")),
    })?;
    let bitmap = m.optional("bitmap", Members::string)?;
    let prefix = m.prefix().to_string();
    let role = match (snapshot, disk, size) {
        (Some(snapshot), None, None) if parent.is_none() && bitmap.is_none() => {
            RepositoryRole::Read { snapshot }
        }
        (None, Some(disk), Some(size)) => {
            if size == 0 {
                return Err(Error::invalid(format!(
                    "Parameter '{prefix}size' must be positive"
                )));
            }
            RepositoryRole::Write {
                disk,
                size,
                parent: parent.unwrap_or_default(),
                bitmap,
            }
        }
        (Some(_), _, _) => {
            return Err(Error::invalid(format!(
                "Parameter '{prefix}snapshot' reads an existing snapshot and cannot be \
                 given with 'disk', 'size', 'parent' or 'bitmap'"
            )));
        }
        (None, None, _) => {
            return Err(Error::invalid(format!(
                "Parameter '{prefix}disk' is missing (or give 'snapshot' to read one)"
            )));
        }
        (None, Some(_), None) => {
            return Err(Error::invalid(format!(
                "Parameter '{prefix}size' is missing"
            )));
        }
    };
    Ok(RepositoryOptions {
        repository,
        passphrase_file,
        s3,
        role,
    })
}

fn parse_cbw(m: &mut Members) -> Result<CbwOptions> {
    let file = m.required("file", blockdev_ref)?;
    let target = m.required("target", blockdev_ref)?;
    let bitmap = m.optional("bitmap", |m, key, value| {
        let mut b = m.object(key, value)?;
        let bitmap = BitmapRef {
            node: b.required("node", Members::string)?,
            name: b.required("name", Members::string)?,
        };
        b.finish()?;
        Ok(bitmap)
    })?;
    let on_cbw_error = match m
        .optional("on-cbw-error", |m, k, v| {
            m.enumeration(k, v, &["break-guest-write", "break-snapshot"])
        })?
        .as_deref()
    {
        Some("break-snapshot") => OnCbwError::BreakSnapshot,
        _ => OnCbwError::BreakGuestWrite,
    };
    // QEMU parses this driver's options with another visitor than the other drivers':
    // the messages for bad numbers differ.
    let cbw_timeout = m
        .optional("cbw-timeout", Members::uint32)?
        .map_or(0, u64::from);
    let min_cluster_size = m.optional("min-cluster-size", |m, k, v| {
        integer(m, &v)
            .and_then(|n| u64::try_from(n).ok())
            .ok_or_else(|| Error::invalid(format!("Parameter '{}{k}' expects uint64", m.prefix())))
    })?;
    if let Some(size) = min_cluster_size
        && size != 0
        && !size.is_power_of_two()
    {
        return Err(Error::invalid(
            "Cannot create block-copy-state: min-cluster-size needs to be a power of 2",
        ));
    }
    Ok(CbwOptions {
        file,
        target,
        bitmap,
        on_cbw_error,
        cbw_timeout,
        min_cluster_size,
    })
}

fn parse_raw(m: &mut Members) -> Result<RawOptions> {
    let file = m.required("file", blockdev_ref)?;
    let offset = m.optional("offset", Members::unsigned)?;
    let size = m.optional("size", Members::unsigned)?;
    Ok(RawOptions {
        file,
        offset,
        size,
        probed: false,
    })
}

fn parse_qcow2(m: &mut Members) -> Result<Qcow2Options> {
    let file = m.required("file", blockdev_ref)?;
    let backing = m
        .optional("backing", |m, k, v| match v {
            Value::Null => Ok(BackingRef::None),
            v => blockdev_ref(m, k, v).map(BackingRef::Node),
        })?
        .unwrap_or(BackingRef::FromHeader);
    let l2_cache_size = m.optional("l2-cache-size", Members::unsigned)?;
    // Tuning knobs QEMU accepts that change nothing observable here.
    for key in ["cache-clean-interval", "refcount-cache-size", "cache-size"] {
        m.optional(key, Members::unsigned)?;
    }
    for key in [
        "pass-discard-request",
        "pass-discard-snapshot",
        "pass-discard-other",
        "discard-no-unref",
    ] {
        m.optional(key, Members::boolean)?;
    }
    if m.optional("lazy-refcounts", Members::boolean)? == Some(true) {
        return Err(Error::unsupported(
            "lazy-refcounts is not supported: stillpoint keeps refcounts exact",
        ));
    }
    if m.optional("data-file", |_, _, v| Ok(v))?.is_some() {
        return Err(Error::unsupported(
            "qcow2 external data files are not supported",
        ));
    }
    if m.optional("encrypt", |_, _, v| Ok(v))?.is_some() {
        return Err(Error::unsupported(
            "encrypted qcow2 images are not supported",
        ));
    }
    Ok(Qcow2Options {
        file,
        backing,
        l2_cache_size,
    })
}

fn parse_null(m: &mut Members, name: &'static str) -> Result<NullOptions> {
    Ok(NullOptions {
        name,
        size: m.optional("size", Members::unsigned)?.unwrap_or(1 << 30),
        latency_ns: m.optional("latency-ns", Members::unsigned)?.unwrap_or(0),
        read_zeroes: m
            .optional("read-zeroes", Members::boolean)?
            .unwrap_or(false),
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::error::ErrorKind;

    fn parse(v: Value) -> Result<BlockdevOptions> {
        BlockdevOptions::from_json(v)
    }

    fn err(v: Value) -> String {
        parse(v).unwrap_err().to_string()
    }

    #[test]
    fn raw_over_inline_file_parses_like_qemu() {
        let opts = parse(json!({"driver":"raw","node-name":"disk0",
            "file":{"driver":"file","filename":"disk.img"}}))
        .unwrap();
        assert_eq!(opts.node_name.as_deref(), Some("disk0"));
        let DriverOptions::Raw(raw) = &opts.driver else {
            panic!("{opts:?}")
        };
        let BlockdevRef::Inline(file) = &raw.file else {
            panic!("{raw:?}")
        };
        assert_eq!(
            file.driver,
            DriverOptions::File(FileOptions {
                filename: "disk.img".into()
            })
        );
    }

    #[test]
    fn a_repository_node_writes_a_snapshot_with_a_bitmap_or_reads_one_without() {
        let opts = parse(
            json!({"driver":"repository","node-name":"r","repository":"/srv/r",
            "disk":"vm1","size":1048576,"parent":"latest","bitmap":"daily"}),
        )
        .unwrap();
        let DriverOptions::Repository(repo) = opts.driver else {
            panic!()
        };
        assert_eq!(
            repo.role,
            RepositoryRole::Write {
                disk: "vm1".into(),
                size: 1048576,
                parent: ParentSnapshot::Latest,
                bitmap: Some("daily".into()),
            }
        );
        let refused = err(
            json!({"driver":"repository","node-name":"r","repository":"/srv/r",
            "snapshot":"vm1","bitmap":"daily"}),
        );
        assert!(
            refused.contains("cannot be given with 'disk', 'size', 'parent' or 'bitmap'"),
            "{refused}"
        );
        let refused = err(
            json!({"driver":"repository","node-name":"r","repository":"/srv/r",
            "disk":"vm1","size":1048576,"bitmap":7}),
        );
        assert!(refused.contains("bitmap"), "{refused}");
    }

    #[test]
    fn a_child_may_name_an_existing_node() {
        let opts =
            parse(json!({"driver":"raw","node-name":"d","file":"file0","offset":512})).unwrap();
        let DriverOptions::Raw(raw) = opts.driver else {
            panic!()
        };
        assert_eq!(raw.file, BlockdevRef::Node("file0".into()));
        assert_eq!(raw.offset, Some(512));
    }

    #[test]
    fn errors_use_qemus_words_and_paths() {
        assert_eq!(
            err(json!({"node-name":"x"})),
            "Parameter 'driver' is missing"
        );
        assert_eq!(
            err(json!({"driver":"raw","file":{"driver":"file"}})),
            "Parameter 'file.filename' is missing"
        );
        assert_eq!(
            err(json!({"driver":"raw","file":"f","bogus":1})),
            "Parameter 'bogus' is unexpected"
        );
        assert_eq!(
            err(json!({"driver":"raw","file":{"driver":"file","filename":"a","bogus":1}})),
            "Parameter 'file.bogus' is unexpected"
        );
        assert_eq!(
            err(json!({"driver":"null-co","size":"x"})),
            "Invalid parameter type for 'size', expected: integer"
        );
        assert_eq!(
            err(json!({"driver":"file","filename":"a","detect-zeroes":"maybe"})),
            "Parameter 'detect-zeroes' does not accept value 'maybe'"
        );
        assert_eq!(
            err(json!({"driver":"bogus"})),
            "Parameter 'driver' does not accept value 'bogus'"
        );
        assert!(err(json!({"driver":"null-co","size":-1})).contains("non-negative"));
        assert!(err(json!("raw")).contains("expected: object"));
    }

    #[test]
    fn options_we_cannot_honour_are_refused_not_ignored() {
        let e = parse(json!({"driver":"file","filename":"a","aio":"io_uring"})).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        let e = parse(json!({"driver":"file","filename":"a","locking":"on"})).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        let e = parse(json!({"driver":"qcow2","file":"f","lazy-refcounts":true})).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        let e = parse(json!({"driver":"qcow2","file":"f","data-file":"d"})).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        assert!(parse(json!({"driver":"qcow2","file":"f","backing":null})).is_ok());
        let e = parse(json!({"driver":"file","filename":"a","force-share":true})).unwrap_err();
        assert!(e.to_string().contains("read-only"), "{e}");
    }

    #[test]
    fn common_members_are_read() {
        let opts = parse(json!({"driver":"null-co","node-name":"n","size":4096,
            "read-zeroes":true,"cache":{"direct":true,"no-flush":true},"discard":"unmap",
            "detect-zeroes":"unmap","read-only":true,"force-share":true}))
        .unwrap();
        assert_eq!(
            opts.cache,
            CacheOptions {
                direct: Some(true),
                no_flush: Some(true)
            }
        );
        assert_eq!(opts.discard, Some(DiscardMode::Unmap));
        assert_eq!(opts.detect_zeroes, DetectZeroes::Unmap);
        assert_eq!(
            opts.driver,
            DriverOptions::Null(NullOptions {
                name: "null-co",
                size: 4096,
                latency_ns: 0,
                read_zeroes: true
            })
        );
    }

    #[test]
    fn the_dotted_form_means_the_same_as_json() {
        let dotted = BlockdevOptions::from_keyval(
            "driver=raw,node-name=src,offset=512,read-only=on,file.driver=file,file.filename=a,,b.img",
        )
        .unwrap();
        let json = parse(
            json!({"driver":"raw","node-name":"src","offset":512,"read-only":true,
            "file":{"driver":"file","filename":"a,b.img"}}),
        )
        .unwrap();
        assert_eq!(dotted, json);
        let by_name = BlockdevOptions::from_keyval("raw,node-name=x,file=src-file").unwrap();
        assert_eq!(by_name.driver_name(), "raw");
        let e = BlockdevOptions::from_keyval("driver=null-co,size=big").unwrap_err();
        assert_eq!(
            e.to_string(),
            "Invalid parameter type for 'size', expected: integer"
        );
        assert!(BlockdevOptions::from_keyval("driver=raw,nonsense").is_err());
    }

    #[test]
    fn deserialize_goes_through_the_same_parser() {
        let opts: BlockdevOptions =
            serde_json::from_str(r#"{"driver":"null-aio","node-name":"n"}"#).unwrap();
        assert_eq!(opts.driver_name(), "null-aio");
        let e = serde_json::from_str::<BlockdevOptions>(r#"{"driver":"raw"}"#).unwrap_err();
        assert!(e.to_string().contains("Parameter 'file' is missing"), "{e}");
    }

    fn json_value() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let key = prop::sample::select(vec![
            "driver",
            "node-name",
            "file",
            "filename",
            "size",
            "offset",
            "cache",
            "direct",
            "read-only",
            "discard",
            "detect-zeroes",
            "latency-ns",
            "read-zeroes",
            "x",
        ]);
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            prop::sample::select(vec!["raw", "file", "null-co", "on", "unmap", "a", ""])
                .prop_map(|s| json!(s)),
        ];
        leaf.prop_recursive(3, 24, 6, move |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..3).prop_map(Value::Array),
                prop::collection::btree_map(key.clone(), inner, 0..6).prop_map(|m| Value::Object(
                    m.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
                )),
            ]
        })
    }

    proptest::proptest! {
        /// Whatever a QMP client sends, the parser answers with options or an error.
        #[test]
        fn arbitrary_json_never_panics_the_parser(value in json_value()) {
            let _ = BlockdevOptions::from_json(value);
        }
    }
}
