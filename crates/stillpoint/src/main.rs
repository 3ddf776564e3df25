//! `stillpoint`: live, point-in-time backups of block devices.
//!
//! This binary is the command-line face of the workspace. Today it takes one-shot live
//! backups of raw images (`backup`) and creates and inspects them (`create`, `info`,
//! `map`); the QMP daemon (`daemon`) and the NBD server (`nbd`) arrive with their
//! crates. Every
//! subcommand reports bad input as one line on stderr and exits 1; none panics.
//!
//! Output formats follow qemu-img where a script may parse them: `map --output json`
//! prints exactly what `qemu-img map --output=json` prints for a raw image.

mod backup;
mod changed_chunks;
mod daemon_cmd;
mod demo;
mod image;
mod info;
mod live_restore;
mod map;
mod nbd_cmd;
mod repo_cmd;
mod repo_location;
mod repo_node;
mod repo_target;
mod signals;
mod size;

use std::path::Path;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use anyhow::bail;
use block::options::SocketAddress;
use clap::Parser;
use clap::Subcommand;
use clap::ValueEnum;

use crate::image::Format;
use crate::image::os_text;

/// Live, point-in-time backups of block devices.
#[derive(Debug, Parser)]
#[command(name = "stillpoint", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// An S3 repository's server (`http://127.0.0.1:8333`); else `AWS_ENDPOINT_URL`,
    /// else AWS. Credentials come from `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY`;
    /// a plain-http endpoint needs `AWS_ALLOW_HTTP=true`.
    #[arg(long, global = true, value_name = "URL")]
    s3_endpoint: Option<String>,
    /// An S3 repository's region; else `AWS_REGION`, else `us-east-1`.
    #[arg(long, global = true, value_name = "REGION")]
    s3_region: Option<String>,
    /// Address S3 buckets as `BUCKET.host` (virtual-hosted style) instead of path-style.
    #[arg(long, global = true)]
    s3_virtual_hosted: bool,
    /// Where S3 repositories' index objects and manifests are cached (deletable at any
    /// time); else `STILLPOINT_CACHE_DIR`, else `~/.cache/stillpoint/s3`.
    #[arg(long, global = true, value_name = "DIR")]
    s3_cache: Option<PathBuf>,
    /// Do not cache S3 repositories' index objects and manifests.
    #[arg(long, global = true)]
    no_s3_cache: bool,
}

/// How to print a report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    /// Readable text, as qemu-img prints it.
    Human,
    /// JSON, as qemu-img prints it.
    Json,
}

/// `--sync` values of `backup`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum SyncArg {
    /// Every cluster.
    Full,
    /// Only clusters allocated in the source's top layer.
    Top,
}

#[derive(Debug, Subcommand)]
enum RepoCommand {
    /// Create a repository in DIR (created if missing, refused if it holds one).
    Init {
        /// The directory.
        dir: PathBuf,
        /// The passphrase of an encrypted repository: this file's first line (else
        /// the STILLPOINT_PASSPHRASE environment variable).
        #[arg(long)]
        passphrase_file: Option<PathBuf>,
        /// Chunk size: a power of two from 64K to 4M.
        #[arg(long, default_value = "256K")]
        chunk_size: String,
        /// How chunks are stored.
        #[arg(long, value_enum, default_value = "zstd")]
        compression: CompressionArg,
        /// Encrypt everything stored (XChaCha20-Poly1305, keyed ids; the master key is
        /// wrapped with the passphrase by Argon2id).
        #[arg(long)]
        encrypt: bool,
    },
    /// List snapshots, oldest first.
    Snapshots {
        /// The repository.
        dir: PathBuf,
        /// The passphrase of an encrypted repository: this file's first line (else
        /// the STILLPOINT_PASSPHRASE environment variable).
        #[arg(long)]
        passphrase_file: Option<PathBuf>,
        /// Only this disk's.
        #[arg(long)]
        disk: Option<String>,
        /// One JSON array of {id, disk, time, size, stored, parent, bitmap}.
        #[arg(long)]
        json: bool,
    },
    /// Delete the snapshots no --keep-* rule keeps, per disk (UTC periods).
    Prune {
        /// The repository.
        dir: PathBuf,
        /// The passphrase of an encrypted repository: this file's first line (else
        /// the STILLPOINT_PASSPHRASE environment variable).
        #[arg(long)]
        passphrase_file: Option<PathBuf>,
        /// Only this disk's snapshots.
        #[arg(long)]
        disk: Option<String>,
        /// Keep the newest N.
        #[arg(long, default_value_t = 0)]
        keep_last: usize,
        /// Keep the newest snapshot of each of the last N hours that have one.
        #[arg(long, default_value_t = 0)]
        keep_hourly: usize,
        /// ... days.
        #[arg(long, default_value_t = 0)]
        keep_daily: usize,
        /// ... ISO weeks.
        #[arg(long, default_value_t = 0)]
        keep_weekly: usize,
        /// ... months.
        #[arg(long, default_value_t = 0)]
        keep_monthly: usize,
        /// ... years.
        #[arg(long, default_value_t = 0)]
        keep_yearly: usize,
        /// Say what would go, delete nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Delete these snapshots (exact ids, as `repo snapshots` lists them); `repo gc` then
    /// frees the space only they used.
    Forget {
        /// The repository.
        dir: PathBuf,
        /// The snapshots' ids.
        #[arg(required = true)]
        ids: Vec<String>,
        /// The passphrase of an encrypted repository: this file's first line (else
        /// the STILLPOINT_PASSPHRASE environment variable).
        #[arg(long)]
        passphrase_file: Option<PathBuf>,
    },
    /// Delete the packs no snapshot names: condemned now, deleted by a later collection once
    /// no backup that started before still runs (safe beside running backups).
    Gc {
        /// The repository.
        dir: PathBuf,
        /// The passphrase of an encrypted repository: this file's first line (else
        /// the STILLPOINT_PASSPHRASE environment variable).
        #[arg(long)]
        passphrase_file: Option<PathBuf>,
    },
    /// Copy snapshots to another repository (an off-site copy: local to S3, S3 to
    /// local, bucket to bucket): only the chunks DST lacks travel, each checked before
    /// it does, still compressed and sealed (an encrypted repository stays encrypted,
    /// with the same passphrase). DST is created as a copy of SRC if it holds nothing.
    /// Rerun after an interruption, it resumes.
    Sync {
        /// The repository to copy from.
        src: PathBuf,
        /// The repository to copy into.
        dst: PathBuf,
        /// Only this disk's snapshots.
        #[arg(long)]
        disk: Option<String>,
        /// The passphrase of an encrypted repository (both have the same): this file's
        /// first line (else the STILLPOINT_PASSPHRASE environment variable).
        #[arg(long)]
        passphrase_file: Option<PathBuf>,
        /// One JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Logical bytes against stored bytes, chunks, packs.
    Stats {
        /// The repository.
        dir: PathBuf,
        /// The passphrase of an encrypted repository: this file's first line (else
        /// the STILLPOINT_PASSPHRASE environment variable).
        #[arg(long)]
        passphrase_file: Option<PathBuf>,
        /// One JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Read and check every chunk of the snapshots (all when none is named); exit 1
    /// naming every damaged one.
    Verify {
        /// The repository.
        dir: PathBuf,
        /// The passphrase of an encrypted repository: this file's first line (else
        /// the STILLPOINT_PASSPHRASE environment variable).
        #[arg(long)]
        passphrase_file: Option<PathBuf>,
        /// Snapshot ids or disk names (a disk's latest).
        snapshots: Vec<String>,
        /// Read only packs written since the last verify (manifests and chunk lists
        /// are still all checked); without it every pack is read again.
        #[arg(long)]
        new: bool,
        /// One JSON array of {id, ok, problems}.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum CompressionArg {
    Zstd,
    None,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Back up SOURCE to TARGET as SOURCE is at this instant (a live, point-in-time copy).
    Backup {
        /// The image to back up.
        source: PathBuf,
        /// Where to write the backup; created sparse with the source's size if missing.
        #[arg(required_unless_present = "repo", conflicts_with = "repo")]
        target: Option<PathBuf>,
        /// Back up into this repository (a snapshot; with --bitmap, read only what
        /// changed since the last one) instead of a target image.
        #[arg(long, requires = "disk")]
        repo: Option<PathBuf>,
        /// With --repo: the disk's name in the repository.
        #[arg(long, requires = "repo")]
        disk: Option<String>,
        /// The passphrase of an encrypted repository: this file's first line (else
        /// the STILLPOINT_PASSPHRASE environment variable).
        #[arg(long)]
        passphrase_file: Option<PathBuf>,
        /// Source format (probed when omitted).
        #[arg(long, value_enum)]
        source_format: Option<Format>,
        /// Target format (probed when the target exists, else raw).
        #[arg(long, value_enum)]
        target_format: Option<Format>,
        /// What to copy.
        #[arg(long, value_enum, default_value = "full")]
        sync: SyncArg,
        /// Speed limit in bytes/s (size suffixes allowed; 0 = unlimited).
        #[arg(long, default_value = "0", allow_hyphen_values = true)]
        speed: String,
        /// Copy granularity lower bound (a power of two, at least 64K is used).
        #[arg(long)]
        cluster_size: Option<String>,
        /// Parallel background requests.
        #[arg(long, default_value_t = jobs::backup::DEFAULT_WORKERS)]
        workers: usize,
        /// Print the summary as one JSON object.
        #[arg(long)]
        json: bool,
        /// Store the target's clusters compressed (qcow2 targets only).
        #[arg(long)]
        compress: bool,
        /// Largest background request (default 2M; at least the copy cluster size).
        #[arg(long)]
        chunk_size: Option<String>,
        /// Persistent dirty bitmap of the source (in a qcow2 image, or in the file
        /// `IMAGE.stillpoint-bitmaps` beside a raw one): a full backup creates it (the
        /// start of an incremental chain); on success it is reset to "no changes since
        /// this backup". With --repo: created by the first backup, which reads the
        /// whole disk; later ones read only what it marks, the rest is taken from the
        /// disk's latest snapshot (a missing or inconsistent bitmap means a whole read).
        #[arg(long)]
        bitmap: Option<String>,
        /// Copy only what --bitmap marks as changed since the previous backup (not
        /// with --repo, where --bitmap alone decides).
        #[arg(long)]
        incremental: bool,
        /// Granularity of a bitmap this backup creates (default 64K).
        #[arg(long)]
        granularity: Option<String>,
        /// Backing file of the qcow2 target this backup creates: the previous backup
        /// (relative to the target's directory, as qemu-img stores it).
        #[arg(long)]
        backing: Option<PathBuf>,
    },
    /// Rebuild a full image from a backup chain: copy what CHAIN_TOP reads (through
    /// its backing files) to OUTPUT.
    Restore {
        /// The newest backup of the chain (read as qcow2, its backing files followed);
        /// with --repo, the snapshot: an id, or a disk name for its latest.
        chain_top: PathBuf,
        /// The image to write (created raw when missing, or --target-format qcow2).
        output: PathBuf,
        /// Output format.
        #[arg(long, value_enum)]
        target_format: Option<Format>,
        /// Restore a snapshot of this repository (into a new raw or qcow2 image).
        #[arg(long)]
        repo: Option<PathBuf>,
        /// The passphrase of an encrypted repository: this file's first line (else
        /// the STILLPOINT_PASSPHRASE environment variable).
        #[arg(long)]
        passphrase_file: Option<PathBuf>,
        /// With --repo: make OUTPUT a qcow2 image usable at once, served over NBD on
        /// --socket while the snapshot streams into it (rerun to resume an interrupted
        /// one); it stands alone when the stream ends, and serving goes on until
        /// SIGINT/SIGTERM.
        #[arg(long, requires_all = ["repo", "socket"])]
        live: bool,
        /// With --live: the UNIX socket to serve the restoring disk on.
        #[arg(long, requires = "live")]
        socket: Option<PathBuf>,
        /// With --live: the NBD export name.
        #[arg(long, requires = "live", default_value = "")]
        name: String,
        /// With --live: limit the stream to this many bytes per second (the guest's
        /// own reads and writes are not limited).
        #[arg(long, requires = "live")]
        speed: Option<String>,
    },
    /// The backup repository: create, list, prune, collect garbage, stats, verify.
    Repo {
        #[command(subcommand)]
        command: RepoCommand,
    },
    /// Create an image of SIZE bytes (512, 64K, 1M, 10G, 2T...); replaces an existing file.
    Create {
        /// Image format.
        #[arg(short = 'f', long = "format", value_enum, default_value = "raw")]
        format: Format,
        /// qcow2 options, comma separated: cluster_size=64k, backing_file=PATH,
        /// backing_fmt=qcow2|raw, compression_type=zlib|zstd, refcount_bits=16.
        #[arg(short = 'o')]
        options: Vec<String>,
        /// Backing file (qcow2 only), as `-o backing_file=`.
        #[arg(short = 'b')]
        backing_file: Option<String>,
        /// Backing file format, as `-o backing_fmt=`.
        #[arg(short = 'F')]
        backing_format: Option<String>,
        /// Path of the image to create.
        file: PathBuf,
        /// Virtual size, with an optional K/M/G/T/P/E suffix (powers of 1024); a qcow2
        /// image with a backing file defaults to the backing file's size.
        #[arg(allow_hyphen_values = true)]
        size: Option<String>,
    },
    /// Run a live backup end to end on a sample disk, with writes through NBD, and check it.
    Demo {
        /// Where to make the temporary demo directory (default: the system temp dir).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Size of the sample disk in MiB.
        #[arg(long, default_value_t = 256)]
        size: u64,
        /// Seed of the sample data and the writes.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Run the storage daemon, controlled over QMP (like qemu-storage-daemon).
    Daemon {
        /// Listen for QMP clients on this UNIX socket (repeatable).
        #[arg(long)]
        qmp: Vec<PathBuf>,
        /// A node, as JSON or QEMU's dotted key=value form (repeatable).
        #[arg(long)]
        blockdev: Vec<String>,
        /// Start the NBD server: addr.type=unix,addr.path=P or addr.type=inet,addr.host=H,addr.port=N.
        #[arg(long = "nbd-server")]
        nbd_server: Option<String>,
        /// An NBD export: type=nbd,id=ID,node-name=N[,name=NAME][,writable=on] (repeatable).
        #[arg(long)]
        export: Vec<String>,
        /// A socket chardev for --monitor: socket,id=ID,path=PATH,server=on,wait=off.
        #[arg(long)]
        chardev: Vec<String>,
        /// A QMP monitor on a chardev: chardev=ID.
        #[arg(long)]
        monitor: Vec<String>,
        /// Write the daemon's pid here once it is ready; removed on exit.
        #[arg(long)]
        pidfile: Option<PathBuf>,
        /// Keep raw images' persistent dirty bitmaps here (created if missing)
        /// instead of in a file beside each image.
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
    /// Serve an image over NBD until SIGINT/SIGTERM (like qemu-nbd).
    Nbd {
        /// The image.
        #[arg(required_unless_present = "repo", conflicts_with = "repo")]
        image: Option<PathBuf>,
        /// Serve a snapshot of this repository, read-only, instead of an image.
        #[arg(long, requires = "snapshot")]
        repo: Option<PathBuf>,
        /// With --repo: the snapshot (an id, or a disk name for its latest).
        #[arg(long, requires = "repo")]
        snapshot: Option<String>,
        /// The passphrase of an encrypted repository: this file's first line (else
        /// the STILLPOINT_PASSPHRASE environment variable).
        #[arg(long)]
        passphrase_file: Option<PathBuf>,
        /// Listen on this UNIX socket.
        #[arg(long, conflicts_with = "bind", required_unless_present = "bind")]
        socket: Option<PathBuf>,
        /// Listen on HOST:PORT (port 10809 if omitted).
        #[arg(long)]
        bind: Option<String>,
        /// Image format (probed when omitted).
        #[arg(short = 'f', long = "format", value_enum)]
        format: Option<Format>,
        /// Export name (qemu-nbd's default is the empty name).
        #[arg(long, default_value = "")]
        name: String,
        /// Let clients write (read-only otherwise).
        #[arg(long)]
        writable: bool,
        /// Clients served at once, 0 for no limit; more wait, not greeted, until one
        /// leaves (qemu-nbd's --shared; its default is 1).
        #[arg(short = 'e', long, default_value_t = 0)]
        shared: u32,
        /// Seconds a client may take to finish its handshake, 0 for no limit.
        #[arg(long = "handshake-limit", default_value_t = 10)]
        handshake_limit: u32,
    },
    /// Show an image's format, virtual size and disk usage.
    Info {
        /// Image format (probed when omitted).
        #[arg(short = 'f', long = "format", value_enum)]
        format: Option<Format>,
        /// Output format.
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
        /// The image.
        file: PathBuf,
    },
    /// Show which ranges of an image hold data, zeros or nothing.
    Map {
        /// Image format (probed when omitted).
        #[arg(short = 'f', long = "format", value_enum)]
        format: Option<Format>,
        /// Output format.
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
        /// First byte to map (size suffixes allowed).
        #[arg(long = "start-offset", allow_hyphen_values = true)]
        start_offset: Option<String>,
        /// Bytes to map from the start offset (size suffixes allowed).
        #[arg(long = "max-length", allow_hyphen_values = true)]
        max_length: Option<String>,
        /// The image.
        file: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    repo_location::set_flags(repo_location::S3Flags {
        endpoint: cli.s3_endpoint,
        region: cli.s3_region,
        virtual_hosted: cli.s3_virtual_hosted,
        cache_dir: cli.s3_cache,
        no_cache: cli.no_s3_cache,
    });
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("stillpoint: failed to start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("stillpoint: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Backup {
            source,
            repo: Some(repo),
            disk: Some(disk),
            source_format,
            json,
            passphrase_file,
            bitmap,
            granularity,
            incremental,
            target_format,
            compress,
            backing,
            sync,
            ..
        } => {
            let refused = [
                (incremental, "--incremental (--bitmap alone decides)"),
                (target_format.is_some(), "--target-format"),
                (compress, "--compress (the repository compresses)"),
                (backing.is_some(), "--backing"),
                (matches!(sync, SyncArg::Top), "--sync top"),
            ];
            if let Some((_, what)) = refused.iter().find(|(given, _)| *given) {
                bail!("{what} does not apply to a backup into a repository");
            }
            let granularity = granularity
                .map(|g| size::parse_size(&g).context("invalid --granularity"))
                .transpose()?;
            repo_cmd::backup(repo_cmd::RepoBackup {
                source: &source,
                source_format,
                dir: &repo,
                pass_file: passphrase_file.as_deref(),
                disk: &disk,
                bitmap: bitmap.as_deref(),
                granularity,
                json,
            })
            .await
        }
        Command::Backup {
            source,
            target,
            repo: _,
            disk: _,
            passphrase_file: _,
            source_format,
            target_format,
            sync,
            speed,
            cluster_size,
            workers,
            json,
            compress,
            chunk_size,
            bitmap,
            incremental,
            granularity,
            backing,
        } => {
            let granularity = granularity
                .map(|g| size::parse_size(&g).context("invalid --granularity"))
                .transpose()?;
            let chunk_size = chunk_size
                .map(|c| size::parse_size(&c).context("invalid --chunk-size"))
                .transpose()?;
            let speed = size::parse_size(&speed).context("invalid --speed")?;
            let cluster_size = cluster_size
                .map(|c| size::parse_size(&c).context("invalid --cluster-size"))
                .transpose()?;
            let Some(target) = target else {
                bail!("give a TARGET image, or --repo DIR --disk NAME");
            };
            let sync = match sync {
                SyncArg::Full => jobs::SyncMode::Full,
                SyncArg::Top => jobs::SyncMode::Top,
            };
            let args = backup::BackupArgs {
                source,
                target,
                source_format,
                target_format,
                sync,
                speed,
                cluster_size,
                workers,
                json,
                compress,
                chunk_size,
                bitmap,
                granularity,
                incremental,
                backing,
            };
            backup::run(args).await
        }
        Command::Demo { dir, size, seed } => demo::run(dir, size, seed).await,
        Command::Daemon {
            qmp,
            blockdev,
            nbd_server,
            export,
            chardev,
            monitor,
            pidfile,
            state_dir,
        } => {
            let args = daemon_cmd::DaemonArgs {
                state_dir,
                qmp,
                blockdev,
                nbd_server,
                export,
                chardev,
                monitor,
                pidfile,
            };
            daemon_cmd::run(args).await
        }
        Command::Nbd {
            image,
            repo,
            snapshot,
            passphrase_file,
            socket,
            bind,
            format,
            name,
            writable,
            shared,
            handshake_limit,
        } => {
            let listen = match (socket, bind) {
                (Some(path), _) => SocketAddress::Unix(path),
                // HOST:PORT, or HOST alone for NBD's port 10809.
                (None, Some(addr)) => match addr.rsplit_once(':') {
                    Some((host, port)) => SocketAddress::Inet {
                        host: host.to_string(),
                        port: port.to_string(),
                    },
                    None => SocketAddress::Inet {
                        host: addr,
                        port: "10809".to_string(),
                    },
                },
                (None, None) => bail!("give --socket PATH or --bind HOST:PORT"),
            };
            let limits = nbd::ServerLimits {
                max_connections: shared,
                handshake: std::time::Duration::from_secs(handshake_limit.into()),
            };
            let options = nbd_cmd::ServeOptions {
                listen,
                format,
                name,
                writable,
                limits,
            };
            match (image, repo, snapshot) {
                (_, Some(repo), Some(snapshot)) => {
                    if options.writable {
                        bail!("a repository snapshot is served read-only (no --writable)");
                    }
                    let repo = repo_cmd::open(&repo, passphrase_file.as_deref())?;
                    let id = repo.find_snapshot(&snapshot)?.id;
                    let driver = repo_node::SnapshotDriver::open(std::sync::Arc::new(repo), &id)?;
                    nbd_cmd::run_driver(&format!("snapshot {id}"), Box::new(driver), options).await
                }
                (Some(image), _, _) => nbd_cmd::run(&image, options).await,
                _ => bail!("give an IMAGE, or --repo DIR --snapshot SNAPSHOT"),
            }
        }
        Command::Restore {
            chain_top,
            output,
            target_format,
            repo: Some(repo),
            passphrase_file,
            live: true,
            socket: Some(socket),
            name,
            speed,
        } => {
            if target_format == Some(Format::Raw) {
                bail!("a live restore writes a qcow2 image (its backing is the snapshot)");
            }
            let speed = match speed {
                Some(s) => size::parse_size(&s).context("invalid --speed")?,
                None => 0,
            };
            live_restore::run(live_restore::LiveRestore {
                repo: &repo,
                pass_file: passphrase_file.as_deref(),
                snapshot: &chain_top.to_string_lossy(),
                target: &output,
                listen: SocketAddress::Unix(socket),
                name,
                speed,
            })
            .await
        }
        Command::Restore {
            chain_top,
            output,
            target_format,
            repo: Some(repo),
            passphrase_file,
            ..
        } => {
            repo_cmd::restore(
                &repo,
                passphrase_file.as_deref(),
                &chain_top.to_string_lossy(),
                &output,
                target_format,
            )
            .await
        }
        Command::Repo { command } => match command {
            RepoCommand::Init {
                dir,
                passphrase_file,
                chunk_size,
                compression,
                encrypt,
            } => {
                let chunk_size = size::parse_size(&chunk_size).context("invalid --chunk-size")?;
                let compression = match compression {
                    CompressionArg::Zstd => repo::Compression::Zstd,
                    CompressionArg::None => repo::Compression::None,
                };
                repo_cmd::init(
                    &dir,
                    chunk_size,
                    compression,
                    encrypt,
                    passphrase_file.as_deref(),
                )
            }
            RepoCommand::Snapshots {
                dir,
                passphrase_file,
                disk,
                json,
            } => repo_cmd::snapshots(&dir, passphrase_file.as_deref(), disk.as_deref(), json),
            RepoCommand::Prune {
                dir,
                passphrase_file,
                disk,
                keep_last,
                keep_hourly,
                keep_daily,
                keep_weekly,
                keep_monthly,
                keep_yearly,
                dry_run,
            } => {
                let policy = repo::retention::Policy {
                    last: keep_last,
                    hourly: keep_hourly,
                    daily: keep_daily,
                    weekly: keep_weekly,
                    monthly: keep_monthly,
                    yearly: keep_yearly,
                };
                repo_cmd::prune(
                    &dir,
                    passphrase_file.as_deref(),
                    disk.as_deref(),
                    &policy,
                    dry_run,
                )
            }
            RepoCommand::Forget {
                dir,
                ids,
                passphrase_file,
            } => repo_cmd::forget(&dir, passphrase_file.as_deref(), &ids),
            RepoCommand::Gc {
                dir,
                passphrase_file,
            } => repo_cmd::gc(&dir, passphrase_file.as_deref()),
            RepoCommand::Sync {
                src,
                dst,
                disk,
                passphrase_file,
                json,
            } => repo_cmd::sync(
                &src,
                &dst,
                disk.as_deref(),
                passphrase_file.as_deref(),
                json,
            ),
            RepoCommand::Stats {
                dir,
                passphrase_file,
                json,
            } => repo_cmd::stats(&dir, passphrase_file.as_deref(), json),
            RepoCommand::Verify {
                dir,
                passphrase_file,
                snapshots,
                new,
                json,
            } => repo_cmd::verify(&dir, passphrase_file.as_deref(), &snapshots, new, json),
        },
        Command::Restore {
            chain_top,
            output,
            target_format,
            repo: None,
            passphrase_file: _,
            ..
        } => {
            // The input is a qcow2 backup chain by definition of the command, so its
            // format is given, not probed, and its backing files are followed.
            let args = backup::BackupArgs {
                source_format: Some(Format::Qcow2),
                target_format,
                ..backup::BackupArgs::new(chain_top, output)
            };
            backup::run(args).await
        }
        Command::Create {
            format,
            options,
            backing_file,
            backing_format,
            file,
            size,
        } => create(
            format,
            &file,
            size.as_deref(),
            &options,
            backing_file,
            backing_format,
        ),
        Command::Info {
            format,
            output,
            file,
        } => info(format, output, &file).await,
        Command::Map {
            format,
            output,
            start_offset,
            max_length,
            file,
        } => {
            let parse = |flag: &str, value: Option<String>| -> anyhow::Result<Option<u64>> {
                value
                    .map(|v| size::parse_size(&v).with_context(|| format!("invalid {flag}")))
                    .transpose()
            };
            let start = parse("--start-offset", start_offset)?.unwrap_or(0);
            let max_length = parse("--max-length", max_length)?;
            map(format, output, &file, start, max_length).await
        }
    }
}

fn create(
    format: Format,
    file: &Path,
    size: Option<&str>,
    options: &[String],
    backing_file: Option<String>,
    backing_format: Option<String>,
) -> anyhow::Result<()> {
    if format == Format::Raw {
        if !options.is_empty() || backing_file.is_some() || backing_format.is_some() {
            bail!("raw images take no options (-o, -b, -F are for qcow2)");
        }
        let Some(size) = size else {
            bail!("Image creation needs a size parameter");
        };
        let size = size::parse_size(size)?;
        let handle = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(file)
            .map_err(|e| {
                anyhow::anyhow!("Could not create '{}': {}", file.display(), os_text(&e))
            })?;
        // Whole sectors, as qemu-img creates them; its message names the size asked for.
        handle
            .set_len(block::drivers::file::round_to_sectors(size))
            .map_err(|e| {
                anyhow::anyhow!("Could not resize '{}': {}", file.display(), os_text(&e))
            })?;
        println!("Formatting '{}', fmt=raw size={size}", file.display());
        return Ok(());
    }
    use block::drivers::qcow2;
    use block::drivers::qcow2::header::CompressionType;
    let mut create = qcow2::header::CreateOptions {
        backing_file,
        backing_format,
        ..Default::default()
    };
    for list in options {
        for item in list.split(',').filter(|i| !i.is_empty()) {
            let (key, value) = item
                .split_once('=')
                .ok_or_else(|| anyhow::anyhow!("Invalid option '{item}': expected key=value"))?;
            match key {
                "cluster_size" => {
                    let bytes = size::parse_size(value)?;
                    if !bytes.is_power_of_two() || !(512..=2 << 20).contains(&bytes) {
                        bail!("Cluster size must be a power of two between 512 and 2048k");
                    }
                    create.cluster_bits = bytes.trailing_zeros();
                }
                "backing_file" => create.backing_file = Some(value.to_string()),
                "backing_fmt" => create.backing_format = Some(value.to_string()),
                "compression_type" => {
                    create.compression = match value {
                        "zlib" => CompressionType::Deflate,
                        "zstd" => CompressionType::Zstd,
                        other => {
                            bail!("Parameter 'compression_type' does not accept value '{other}'")
                        }
                    }
                }
                "refcount_bits" => {
                    let bits: u64 = value
                        .parse()
                        .map_err(|_| anyhow::anyhow!("Invalid refcount_bits '{value}'"))?;
                    if !bits.is_power_of_two() || bits > 64 {
                        bail!("Refcount width must be a power of two and may not exceed 64 bits");
                    }
                    create.refcount_order = bits.trailing_zeros();
                }
                "size" => {
                    if size.is_some() {
                        bail!("size given twice");
                    }
                    create.size = size::parse_size(value)?;
                }
                other => bail!(
                    "Invalid parameter '{other}' for qcow2 (supported: cluster_size, backing_file, backing_fmt, compression_type, refcount_bits)"
                ),
            }
        }
    }
    if let Some(format) = &create.backing_format
        && format != "qcow2"
        && format != "raw"
    {
        bail!("backing format '{format}' is not supported (qcow2 or raw)");
    }
    match (size, &create.backing_file) {
        (Some(size), _) => create.size = size::parse_size(size)?,
        (None, Some(backing)) if create.size == 0 => {
            // Like qemu-img: the backing file's size, and its format when not given.
            let path = qcow2::resolve_backing(Some(file), backing);
            create.size = qcow2::image_size(&path)?;
            if create.backing_format.is_none() {
                create.backing_format = Some(
                    if image::probe(&path)? == Format::Qcow2 {
                        "qcow2"
                    } else {
                        "raw"
                    }
                    .into(),
                );
            }
        }
        (None, None) if create.size == 0 => bail!("Image creation needs a size parameter"),
        _ => {}
    }
    if let Some(backing) = &create.backing_file {
        let path = qcow2::resolve_backing(Some(file), backing);
        if !path.exists() {
            bail!(
                "Could not open backing file '{}': No such file or directory",
                path.display()
            );
        }
    }
    qcow2::create_file(file, &create).map_err(|e| {
        // qemu-img's message ends before our parenthesised detail; the block error
        // already left out the OS error number.
        let message = e.to_string();
        anyhow::anyhow!("{}", message.split(" (").next().unwrap_or(&message))
    })?;
    // qemu-img prints the size asked for (the image holds whole sectors of it).
    let size = create.size;
    let mut line = format!(
        "Formatting '{}', fmt=qcow2 cluster_size={} compression_type={} size={size}",
        file.display(),
        1u64 << create.cluster_bits,
        create.compression.name()
    );
    if let Some(b) = &create.backing_file {
        line.push_str(&format!(" backing_file={b}"));
    }
    if let Some(f) = &create.backing_format {
        line.push_str(&format!(" backing_fmt={f}"));
    }
    println!("{line} refcount_bits={}", 1u64 << create.refcount_order);
    Ok(())
}

async fn info(format: Option<Format>, output: Output, file: &Path) -> anyhow::Result<()> {
    let image = image::open_read_only(file, format).await?;
    let header = match image.format {
        Format::Qcow2 => block::drivers::qcow2::read_file_header(file)?,
        Format::Raw => None,
    };
    let report = info::ImageInfo {
        virtual_size: image.node.length(),
        filename: file.display().to_string(),
        format: match image.format {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        },
        actual_size: info::allocated_bytes(file)
            .map_err(|e| anyhow::anyhow!("Could not stat '{}': {}", file.display(), os_text(&e)))?,
        cluster_size: header.as_ref().map(|h| h.cluster_size()),
        backing_filename: header.as_ref().and_then(|h| h.backing_file.clone()),
        backing_filename_format: header.as_ref().and_then(|h| h.backing_format.clone()),
        dirty_flag: header
            .as_ref()
            .is_some_and(|h| h.incompatible & block::drivers::qcow2::header::INCOMPAT_DIRTY != 0),
    };
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        Output::Human => print!("{}", info::to_human(&report)),
    }
    Ok(())
}

async fn map(
    format: Option<Format>,
    output: Output,
    file: &Path,
    start: u64,
    max_length: Option<u64>,
) -> anyhow::Result<()> {
    let image = image::open_read_only(file, format).await?;
    let entries = map::map(&image.node, start, max_length).await?;
    match output {
        Output::Json => print!("{}", map::to_json(&entries)),
        Output::Human => {
            let mut files = map::layer_names(&image.node);
            files[0] = file.display().to_string();
            match map::to_human(&entries, &files) {
                Ok(table) => print!("{table}"),
                Err(partial) => {
                    // The rows before the compressed data, then qemu-img's error.
                    let (table, message) = partial.split_once('\u{0}').unwrap_or(("", &partial));
                    print!("{table}");
                    bail!("{message}");
                }
            }
        }
    }
    Ok(())
}
