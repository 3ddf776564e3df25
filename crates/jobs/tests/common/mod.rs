//! Test rig: a graph with a seeded source image and a sparse target, plus helpers to
//! follow a job's events.

#![allow(dead_code)]

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use block::BlockdevOptions;
use block::NodeGraph;
use jobs::JobEvent;
use jobs::JobRegistry;
use jobs::JobStatus;
use serde_json::Value;
use serde_json::json;
pub use testkit::Rng;
use tokio::sync::broadcast;

pub struct Rig {
    pub dir: tempfile::TempDir,
    pub graph: Arc<NodeGraph>,
    pub registry: JobRegistry,
    pub source: PathBuf,
    pub target: PathBuf,
    pub size: u64,
}

fn punch(file: &File, offset: u64, len: u64) {
    // SAFETY: fallocate on a descriptor we own, integer arguments only.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as i64,
            len as i64,
        )
    };
    assert_eq!(rc, 0);
}

/// Writes a source of `size` bytes: random data, runs of zero bytes, and holes.
pub fn seeded_source(path: &PathBuf, size: u64, rng: &mut Rng) {
    let file = File::create(path).unwrap();
    file.set_len(size).unwrap();
    let mut at = 0;
    while at < size {
        let len = (4096 * (1 + rng.below(48))).min(size - at);
        match rng.below(4) {
            0 | 1 => file.write_all_at(&rng.bytes(len as usize), at).unwrap(),
            2 => file.write_all_at(&vec![0; len as usize], at).unwrap(),
            _ => {} // hole
        }
        at += len;
    }
    if rng.below(2) == 0 {
        let off = rng.below(size);
        punch(&file, off, rng.below(size - off) + 1);
    }
    file.sync_all().unwrap();
}

impl Rig {
    /// Source "src" and target "tgt", raw over file, `discard=unmap` on both, files of
    /// `size` bytes. The nodes are `size` rounded up to whole sectors (QEMU's rule;
    /// `Rig::size` is that length), and the bytes helpers read as the nodes do.
    pub async fn new(size: u64, seed: u64) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("source.img");
        let target = dir.path().join("target.img");
        seeded_source(&source, size, &mut Rng(seed));
        File::create(&target).unwrap().set_len(size).unwrap();
        let graph = Arc::new(NodeGraph::with_external(Arc::new(
            jobs::copy_before_write::CbwDrivers,
        )));
        for (name, path) in [("src", &source), ("tgt", &target)] {
            graph
                .add(options(
                    json!({"driver":"raw","node-name":name,"discard":"unmap",
                    "file":{"driver":"file","filename":path}}),
                ))
                .await
                .unwrap();
        }
        Rig {
            dir,
            graph,
            registry: JobRegistry::new(),
            source,
            target,
            size: block::drivers::file::round_to_sectors(size),
        }
    }

    /// The file's bytes as its node reads them: zeros past the end of the file, up to
    /// the node's length.
    fn node_bytes(&self, path: &Path) -> Vec<u8> {
        let mut bytes = std::fs::read(path).unwrap();
        bytes.resize(self.size as usize, 0);
        bytes
    }

    pub fn source_bytes(&self) -> Vec<u8> {
        self.node_bytes(&self.source)
    }

    pub fn target_bytes(&self) -> Vec<u8> {
        self.node_bytes(&self.target)
    }
}

pub fn options(v: Value) -> BlockdevOptions {
    BlockdevOptions::from_json(v).unwrap()
}

/// Collects events of `job` until it reaches `last`.
pub async fn events_until(
    rx: &mut broadcast::Receiver<JobEvent>,
    job: &str,
    last: JobStatus,
) -> Vec<JobEvent> {
    let mut events = Vec::new();
    loop {
        let event = tokio::time::timeout(Duration::from_secs(30), rx.recv())
            .await
            .unwrap_or_else(|_| panic!("job {job} did not reach {last:?}; saw {events:?}"))
            .unwrap();
        let id = match &event {
            JobEvent::StatusChange { id, .. } | JobEvent::Pending { id, .. } => id.clone(),
            JobEvent::Completed { device, .. }
            | JobEvent::Cancelled { device, .. }
            | JobEvent::Error { device, .. } => device.clone(),
        };
        if id != job {
            continue;
        }
        let done = matches!(&event, JobEvent::StatusChange { status, .. } if *status == last);
        events.push(event);
        if done {
            return events;
        }
    }
}

/// The seeds a randomized test runs: `STILLPOINT_SEED=S` runs just S; otherwise
/// `STILLPOINT_SEEDS=N` of them (default `default`) starting at `STILLPOINT_SEED_BASE`
/// (default 0).
pub fn seeds(default: u64) -> Vec<u64> {
    let number = |name: &str| {
        std::env::var(name).ok().map(|v| {
            v.parse::<u64>()
                .unwrap_or_else(|_| panic!("{name} is a number"))
        })
    };
    if let Some(seed) = number("STILLPOINT_SEED") {
        return vec![seed];
    }
    let base = number("STILLPOINT_SEED_BASE").unwrap_or(0);
    (base..base + number("STILLPOINT_SEEDS").unwrap_or(default)).collect()
}

/// First offset where two images differ, for readable failures.
pub fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    if a.len() != b.len() {
        return Some(a.len().min(b.len()));
    }
    a.iter().zip(b).position(|(x, y)| x != y)
}

/// Short names of events: statuses and event names.
pub fn names(events: &[JobEvent]) -> Vec<String> {
    events
        .iter()
        .map(|e| match e {
            JobEvent::StatusChange { status, .. } => status.as_str().to_string(),
            other => other.name().to_string(),
        })
        .collect()
}
