//! Stillpoint's live backup engine: jobs, the block-copy engine, the copy-before-write
//! filter and the backup job.
//!
//! # Files
//!
//! * [`job`]: the generic job (QEMU's state machine, verbs, events, the registry, grouped
//!   completion); [`ratelimit`]: the speed limit.
//! * [`block_copy`]: the engine that copies each cluster exactly once (state in
//!   `mod.rs`, the copy-before-write path and staging area in `staging`, old data saved
//!   for part of a cluster in `fragments`, guest writes held until their cluster is
//!   copied in `redirect`, the background pass in `worker` and how it gives way to the
//!   guest in `guest`, snapshot reads in `snapshot_reads`).
//! * [`copy_before_write`]: the filter that calls the engine before every guest write,
//!   for backups and standalone (fleecing); [`cluster_size`]: the copy granularity both
//!   use.
//! * [`backup`]: the backup job (sync modes, bitmaps, completion), built from the above.
//! * [`stream`]: the stream job (`block-stream`): a qcow2 image's backing chain copied
//!   into it while it is in use, then the link dropped (live restore is built on it),
//!   with the copy-on-read filter it puts above the image meanwhile (`copy_on_read`);
//!   both copy through `chain_copy`.
//!
//! # The invariant
//!
//! Every byte of the target equals the source as it was at the instant the job
//! started, whatever is written to the source meanwhile; no write to the source is
//! lost, reordered, or acknowledged before the old data it overwrites is safe.
//!
//! # How it holds
//!
//! ```text
//!   guest write ──> [CbwFilter] ── 0. whole pages over uncopied clusters: held in
//!                       │             memory, written to the source once the
//!                       │             cluster's old data is in hand (or at a flush,
//!                       │             or early, between copies, for a guest that
//!                       │             flushes)
//!                       │          ── 1. before_write: claim dirty clusters, read their
//!                       │             old data into the staging area (memory, then a
//!                       │             scratch file), wait for overlapping source reads
//!                       │          ── 2. forward the write to the source
//!                       v
//!                   [source] <── background workers: claim, read, write to target
//!                                          │
//!                   [target] <─────────────┴── staged chunks first, then background
//! ```
//!
//! * The point in time is the filter's insertion: the graph drains in-flight requests,
//!   retargets every attachment of the source to the filter, and the copy bitmap starts
//!   all dirty. Every later write passes the filter.
//! * A cluster leaves the bitmap exactly once for good (its claim); only a failed source
//!   read puts it back, and a partial copy-before-write, which saves just the guest's
//!   blocks of it (a fragment, never written over later) and leaves the rest to copy.
//! * A guest write of whole pages over clusters not yet copied waits for nothing: it is
//!   recorded in a journal beside the image (`block::held_journal`, so a killed
//!   daemon loses none: the next read-write open writes them in), held in memory
//!   (bounded), read back from there, and written to the source only once the
//!   cluster's old data has been read (`block_copy::redirect`); a flush puts every
//!   held write into the image first (once the guest has flushed, the background
//!   saves a few held pages' old data between its copies, so a flush finds few), and
//!   the job writes back the rest before its filter goes. Any other write first writes back the held writes it overlaps, so
//!   the source sees a range's writes in order.
//! * Otherwise a guest write waits only for source *reads* of its clusters (its own
//!   or a background one in flight), never for the target: old data it displaces is
//!   parked in the bounded staging area and written by the job's workers, ahead of the
//!   background copy (see [`block_copy`]).
//! * Staged data reaches the target before the job completes, and the target is
//!   flushed before the job reports success. If a target write fails after the guest
//!   write that staged it was acknowledged, the data stays staged and the job's
//!   `on-target-error` decides: `report` fails the job (the snapshot is broken, the
//!   guest write stands), `stop`/`ignore` retry.
//! * If saving old data fails (source read error, scratch file full), `on-cbw-error`
//!   decides: `break-guest-write` fails the guest write with that errno and leaves the
//!   cluster dirty; `break-snapshot` lets the guest write through and fails the job.
//!
//! # Locking
//!
//! Each engine has one synchronous mutex over its bitmap, in-flight reads and queues,
//! never held across an await. Jobs have one mutex over their state. Waiting uses
//! `tokio::sync::Notify` with the future enabled under the lock, so wake-ups are never
//! lost.
//!
//! Compression (`compress`) writes through the target's compressed-write path (qcow2),
//! in whole target clusters: the engine's zero detection then works per target
//! cluster rather than per 4 KiB, since a partial-cluster write would make the format
//! allocate and copy the cluster anyway.
//!
//! # Fleecing: the standalone filter
//!
//! `blockdev-add copy-before-write` builds the same filter without a job
//! ([`copy_before_write::standalone`]). Nothing would drain a staging area, so its engine writes old
//! data straight to the target before the guest write proceeds (the claim lasts until
//! then), and it keeps an access bitmap for readers. Its snapshot API serves a
//! `snapshot-access` node: a run still dirty is read from the source under a *frozen
//! read* that overlapping guest writes wait for (after saving their old data); a run
//! already saved is read from the target; a run with a copy in flight waits for it.
//! Reads outside the access bitmap, or after a `break-snapshot` failure, fail with
//! EACCES; a read that raced with the break is failed too rather than returned torn.
//!
//! Out of scope for now: copy offload
//! (`copy_file_range`).

pub mod backup;
pub mod block_copy;
mod chain_copy;
pub mod cluster_size;
pub mod copy_before_write;
mod copy_on_read;
pub mod job;
pub mod ratelimit;
pub mod stream;

pub use backup::BackupOptions;
pub use backup::BackupRequest;
pub use backup::BitmapMode;
pub use backup::SyncMode;
pub use backup::start_backup;
pub use backup::start_backups;
pub use backup::start_backups_at;
pub use job::CompletionGroup;
pub use job::Job;
pub use job::JobEvent;
pub use job::JobRegistry;
pub use job::JobStatus;
pub use stream::StreamOptions;
pub use stream::start_stream;
