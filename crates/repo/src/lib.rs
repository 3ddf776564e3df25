//! Stillpoint's backup repository: deduplicated, compressed snapshots of disks.
//!
//! **Status.** Local directories, optional encryption ([`crypto`]), full snapshots
//! written through a pipeline ([`repository::writer`]: ids, dedup, compression and
//! sealing on one worker thread per core, packs stored by a packer thread, with
//! `O_DIRECT`), restore and instant access through parallel, coalesced reads
//! ([`Repository::read_chunks_into`]), listing, verify (all, or only packs new since
//! the last one: [`repository::verify`]), retention ([`retention`]), garbage collection
//! beside running backups with repacking ([`repository::gc`]) and stats. The dedup
//! index is compact, not constant: 48 bytes per stored chunk ([`chunk_index`]; about
//! 500 MB for 10 million chunks, 2.4 TiB of unique data at 256 KiB). Writers take
//! chunks by position, so a live backup (the daemon's `repository` node, in the
//! `stillpoint` crate) hands them over in any order, and an incremental takes unchanged
//! chunks from its parent by id ([`repository::SnapshotWriter::add_known_at`]) and
//! stores a chunk changed in part as a delta of its parent's
//! ([`repository::SnapshotWriter::add_changed_at`]). The same format lives in an S3
//! bucket ([`s3::S3`], with a local cache of indexes and manifests), and
//! [`Repository::sync_to`] copies snapshots between any two places
//! ([`repository::sync`]).
//!
//! # Format, version 1
//!
//! A repository is a set of write-once objects ([`backend::Backend`]):
//!
//! * `config`: JSON: format `version`, `chunk_size` (a power of two, 64 KiB to 4 MiB,
//!   chosen at init), `compression` (`zstd` or `none`), a random `id`.
//! * A disk is cut into chunks of `chunk_size` bytes at fixed offsets (the last may be
//!   short). A chunk's id is the BLAKE3 digest of its bytes; an all-zero chunk has the
//!   all-zero id and is never stored (restore leaves a hole).
//! * `packs/XX/ID`: immutable packs of about 32 MiB: `SPPK`, version byte, the stored
//!   chunks back to back (zstd frames, or plain where zstd does not shrink them), then
//!   the pack's index. ID is the BLAKE3 digest of the whole pack. Readers find chunks
//!   by the index's offsets only: a writer that must not reuse a condemned pack's name
//!   puts zero bytes before the chunks to make another.
//! * `index/ID`: a copy of pack ID's index, so opening a repository reads indexes, not
//!   packs; a lost index object can be rebuilt from the pack's tail. An index is a count,
//!   then per chunk its id, offset, stored length, plain length and codec (49 bytes;
//!   codec bit 0 zstd, bit 1 a delta, followed by its base's 32-byte id), then the
//!   body's length, its BLAKE3 digest and `SPIX`.
//! * A *delta* is a chunk stored as the runs that changed since another chunk, its
//!   base (an incremental's chunk that its dirty bitmap marks only in part): the run
//!   count (u16), each run's offset and length (u32), the runs' bytes, that body
//!   compressed like any blob. Its id is still the digest of the whole chunk, so
//!   manifests, dedup and every check are the same; a reader reads the base first
//!   (chains are at most [`format::MAX_DELTA_DEPTH`] long), a collection keeps a named
//!   delta's base, and a writer never deduplicates against a delta whose base only a
//!   condemned pack holds. Builds before deltas refuse such an index ("unknown
//!   compression").
//! * `snapshots/ID`: a manifest: `SPSN`, version, a JSON header (disk, time, size,
//!   chunk size, parent, bytes stored, tool version, and the dirty bitmap cleared when
//!   it was taken, if any; the time in nanoseconds), one 32-byte chunk id per chunk of
//!   the disk, and the BLAKE3 digest of all that; ID is the first 16 hex digits of the
//!   digest. Every snapshot is full: restore and verify never walk a chain.
//!
//! Encrypted repositories (`config` holds the wrapped master key): a stored chunk is
//! sealed after compression, with its id as associated data; a pack ends with its
//! sealed index, the sealed length and `SPEX` instead of the plain trailer; index
//! objects and manifests are sealed whole; chunk ids are keyed BLAKE3. See [`crypto`].
//!
//! Bookkeeping objects (plain JSON or text; they name only pack ids, which are public):
//!
//! * `leases/T-PID-R`: a snapshot writer at work since T (nanoseconds); see
//!   [`repository::gc`].
//! * `condemned/T-R`: `{"time_ns": T, "packs": [...]}`, packs a collection found dead
//!   (or repacked) at T; a later collection deletes them when no writer that might
//!   depend on them still runs.
//! * `verified/T-R`: `{"time_ns": T, "packs": [...]}`, packs a verify found sound.
//! * `leases-unreadable/T-PID-R`: when a collection first found that lease unreadable
//!   (nanoseconds); see [`repository::gc::UNREADABLE_LEASES`].
//! * `gc`: a collection is running.
//! * `gc-claims/T-PID-R`: where creating an object is not exclusive (an S3 server that
//!   ignores `If-None-Match`), a collection's claim, taken before `gc`; see
//!   [`repository::gc`].
//! * `s3-capabilities`: on S3, `{"conditional_put": BOOL}`, what the server was found to
//!   honour ([`s3::S3::connect`]).
//! * `probe/...`: on S3, the conditional-PUT probe's object, deleted at once.
//!
//! Commit order: a pack, then its index object, and after the last pack the manifest,
//! so a snapshot is visible only when everything it names is durable; a crash leaves at
//! most packs no snapshot names. Every object is written to a temporary name, synced,
//! and linked into place (the local backend), never renamed over or appended to, so an
//! object store can hold the same repository. Every read is checked: index digests,
//! manifest digests, and each chunk's id after decompression. Damage is reported
//! ([`error::Error::Damaged`]), never restored silently.

pub mod backend;
pub mod chunk_index;
pub mod crypto;
pub mod error;
pub mod format;
pub mod hex;
pub mod repository;
pub mod retention;
#[cfg(feature = "s3")]
pub mod s3;

pub use backend::Backend;
pub use backend::LocalDir;
pub use chunk_index::ChunkIndex;
pub use error::Error;
pub use error::Result;
pub use format::ChunkId;
pub use format::Compression;
pub use repository::Repository;
#[cfg(feature = "s3")]
pub use s3::S3;
#[cfg(feature = "s3")]
pub use s3::S3Options;
#[cfg(feature = "s3")]
pub use s3::S3Url;
