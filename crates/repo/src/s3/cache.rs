//! A local cache of an S3 repository's index objects and manifests.
//!
//! Opening a repository reads every index object (the dedup index) and every manifest;
//! on S3 that is one GET each. The cache keeps their bytes in a directory, one file per
//! object (`index/ID`, `snapshots/ID`), headed by the object's ETag, size and the
//! BLAKE3 digest of the bytes.
//!
//! The bucket stays the truth. A cached entry is served only when the latest listing
//! of its prefix in this process shows the object with the same ETag and size (an
//! object deleted, or written anew under the same name, is not served from the cache),
//! and when its bytes still match their digest (a file damaged on this machine is a
//! miss, not damage in the repository). Entries whose objects a listing no longer
//! shows are removed. So a stale cache costs downloads, never a wrong dedup decision:
//! the repository's reader checks what it gets, cached or not, as before. The user may
//! delete the directory at any time, even while a backup runs.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::Path;
use std::path::PathBuf;

use super::S3Url;
use crate::error::Error;
use crate::error::Result;

/// The prefixes whose objects are cached.
const CACHED: [&str; 2] = ["index/", "snapshots/"];

/// The cache of one repository (one `s3://BUCKET/PREFIX` at one endpoint).
#[derive(Debug)]
pub struct Cache {
    dir: PathBuf,
    /// What the latest listings showed: key to (ETag, size).
    listed: HashMap<String, (String, u64)>,
}

impl Cache {
    /// Whether objects under `key` (a key or a prefix) are cached.
    pub fn holds(key: &str) -> bool {
        CACHED.iter().any(|prefix| key.starts_with(prefix))
    }

    /// The cache of `url` at `endpoint` in `root` (a directory of its own per
    /// repository).
    pub fn open(root: &Path, endpoint: &str, url: &S3Url) -> Result<Self> {
        let name = blake3::hash(format!("{endpoint} {url}").as_bytes()).to_hex();
        let dir = root.join(&name[..16]);
        fs::create_dir_all(&dir)
            .map_err(|e| Error::io(format!("creating the S3 cache {}", dir.display()), e))?;
        Ok(Self {
            dir,
            listed: HashMap::new(),
        })
    }

    /// The cached bytes of `key`, if the latest listing shows that very object. A
    /// listing vouches for one read: the next read of `key` without a new listing
    /// asks the bucket ([`Cache::entry`]), so a copy cannot outlive a change that
    /// came after the listing.
    pub fn get(&mut self, key: &str) -> Option<Vec<u8>> {
        let (etag, size) = self.listed.remove(key)?;
        let (cached_etag, bytes) = self.entry(key)?;
        (cached_etag == etag && bytes.len() as u64 == size).then_some(bytes)
    }

    /// The cached copy of `key` and the ETag it was fetched with, if its bytes still
    /// match their digest (a damaged file is removed); for a conditional GET.
    pub fn entry(&self, key: &str) -> Option<(String, Vec<u8>)> {
        let path = self.dir.join(key);
        let file = fs::read(&path).ok()?;
        let entry = parse_entry(&file).filter(|entry| {
            entry.bytes.len() as u64 == entry.size
                && blake3::hash(entry.bytes).to_hex().as_str() == entry.digest
        });
        match entry {
            Some(entry) => Some((entry.etag.to_string(), entry.bytes.to_vec())),
            None => {
                let _ = fs::remove_file(&path);
                None
            }
        }
    }

    /// Keeps `bytes`, the object `key` as fetched with `etag`.
    pub fn put(&mut self, key: &str, etag: &str, size: u64, bytes: &[u8]) -> std::io::Result<()> {
        if etag.is_empty() || etag.contains(char::is_whitespace) {
            return Ok(());
        }
        let path = self.dir.join(key);
        let dir = path.parent().expect("keys have a parent");
        fs::create_dir_all(dir)?;
        let tmp = dir.join(format!(
            ".tmp-{}-{}",
            std::process::id(),
            crate::repository::now_ns()
        ));
        let written = (|| {
            let mut file = fs::File::create(&tmp)?;
            let digest = blake3::hash(bytes).to_hex();
            writeln!(file, "{etag} {size} {digest}")?;
            file.write_all(bytes)?;
            fs::rename(&tmp, &path)
        })();
        if written.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        written
    }

    /// Records a listing of `prefix` (keys with their ETags and sizes) and drops
    /// entries of objects it no longer shows.
    pub fn listed(&mut self, prefix: &str, objects: &[(String, Option<String>, u64)]) {
        self.listed.retain(|key, _| !key.starts_with(prefix));
        for (key, etag, size) in objects {
            if let Some(etag) = etag {
                self.listed.insert(key.clone(), (etag.clone(), *size));
            }
        }
        let Ok(entries) = fs::read_dir(self.dir.join(prefix.trim_end_matches('/'))) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let key = format!("{prefix}{name}");
            if !self.listed.contains_key(&key) {
                let _ = fs::remove_file(entry.path());
            }
        }
    }
}

struct Entry<'a> {
    etag: &'a str,
    size: u64,
    digest: &'a str,
    bytes: &'a [u8],
}

fn parse_entry(file: &[u8]) -> Option<Entry<'_>> {
    let newline = file.iter().position(|&b| b == b'\n')?;
    let head = std::str::from_utf8(&file[..newline]).ok()?;
    let mut fields = head.split(' ');
    let etag = fields.next()?;
    let size = fields.next()?.parse().ok()?;
    let digest = fields.next()?;
    Some(Entry {
        etag,
        size,
        digest,
        bytes: &file[newline + 1..],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(dir: &Path) -> Cache {
        let url = S3Url::parse("s3://bucket/repo").unwrap().unwrap();
        Cache::open(dir, "http://127.0.0.1:1", &url).unwrap()
    }

    #[test]
    fn an_entry_is_served_only_while_a_listing_shows_the_same_object() {
        let dir = tempfile::tempdir().unwrap();
        let mut cache = cache(dir.path());
        cache.put("index/aa", "\"e1\"", 3, b"abc").unwrap();
        // Not listed yet: not trusted.
        assert_eq!(cache.get("index/aa"), None);
        cache.put("index/aa", "\"e1\"", 3, b"abc").unwrap();
        let listing = |etag: &str| vec![("index/aa".to_string(), Some(etag.to_string()), 3)];
        cache.listed("index/", &listing("\"e1\""));
        assert_eq!(cache.get("index/aa").as_deref(), Some(&b"abc"[..]));
        // A listing vouches for one read only; the copy stays for a conditional GET.
        assert_eq!(cache.get("index/aa"), None);
        assert_eq!(cache.entry("index/aa").unwrap().0, "\"e1\"");
        // The bucket now holds another object of that name: a miss.
        cache.listed("index/", &listing("\"e2\""));
        assert_eq!(cache.get("index/aa"), None);
    }

    #[test]
    fn damaged_or_deleted_entries_are_misses_and_unlisted_objects_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let mut cache = cache(dir.path());
        cache.put("snapshots/s1", "e", 5, b"hello").unwrap();
        cache.put("snapshots/s2", "e", 5, b"world").unwrap();
        cache.listed(
            "snapshots/",
            &[("snapshots/s1".into(), Some("e".into()), 5)],
        );
        // s2 is gone from the bucket: gone from the cache.
        assert!(!cache.dir.join("snapshots/s2").exists());
        // A byte flipped on this machine: not served.
        let path = cache.dir.join("snapshots/s1");
        let mut file = fs::read(&path).unwrap();
        let last = file.len() - 1;
        file[last] ^= 1;
        fs::write(&path, file).unwrap();
        assert_eq!(cache.get("snapshots/s1"), None);
        // The directory deleted by the user: a miss.
        cache.put("snapshots/s1", "e", 5, b"hello").unwrap();
        fs::remove_dir_all(dir.path()).unwrap();
        assert_eq!(cache.get("snapshots/s1"), None);
        assert!(Cache::holds("index/x") && Cache::holds("snapshots/") && !Cache::holds("packs/a"));
    }
}
