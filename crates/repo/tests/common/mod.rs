//! Where a test's repository lives: a local directory or a bucket on a real S3 server
//! (SeaweedFS, started for the test), so one test body runs against both.

#![allow(dead_code)]

use repo::Backend;
use repo::LocalDir;
use repo::S3;
use repo::S3Options;
use repo::S3Url;
use testkit::s3::ACCESS_KEY;
use testkit::s3::SECRET_KEY;
use testkit::s3::SeaweedFs;

/// A repository's storage for one test.
pub struct Store {
    dir: tempfile::TempDir,
    s3: Option<std::rc::Rc<SeaweedFs>>,
    bucket: String,
}

impl Store {
    /// A local directory.
    pub fn local() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
            s3: None,
            bucket: String::new(),
        }
    }

    /// Another empty store of the same kind (on S3: another bucket of the same server).
    pub fn another(&self) -> Self {
        let Some(server) = &self.s3 else {
            return Self::local();
        };
        static BUCKETS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);
        let n = BUCKETS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let bucket = format!("repo-{n}");
        server.create_bucket(&bucket);
        Self {
            dir: tempfile::tempdir().unwrap(),
            s3: Some(server.clone()),
            bucket,
        }
    }

    /// A bucket on a SeaweedFS of this test's own, with a local cache.
    pub fn s3() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let server = SeaweedFs::start(&dir.path().join("seaweedfs"));
        server.create_bucket("repo");
        Self {
            dir,
            s3: Some(std::rc::Rc::new(server)),
            bucket: "repo".into(),
        }
    }

    /// The S3 options of this store's bucket (`cache`: with the local cache).
    pub fn s3_options(&self, cache: bool) -> S3Options {
        let server = self.s3.as_ref().expect("an S3 store");
        S3Options {
            endpoint: Some(server.endpoint.clone()),
            allow_http: true,
            retry_timeout: Some(std::time::Duration::from_secs(5)),
            cache_dir: cache.then(|| self.dir.path().join("cache")),
            credentials: Some((ACCESS_KEY.into(), SECRET_KEY.into())),
            create: true,
            ..S3Options::default()
        }
    }

    /// A new handle on the storage (each with its own S3 client and cache state).
    pub fn backend(&self) -> Box<dyn Backend> {
        match &self.s3 {
            None => Box::new(LocalDir::new(self.dir.path())),
            Some(_) => {
                let url = S3Url::parse(&format!("s3://{}/stillpoint", self.bucket))
                    .unwrap()
                    .unwrap();
                Box::new(S3::connect(url, &self.s3_options(true)).unwrap())
            }
        }
    }

    /// The local store's directory.
    pub fn path(&self) -> &std::path::Path {
        assert!(self.s3.is_none(), "a local store");
        self.dir.path()
    }

    /// Whether this is the S3 store.
    pub fn is_s3(&self) -> bool {
        self.s3.is_some()
    }

    /// Replaces the object `key` with `bytes`, as damage would (not through the
    /// repository: on S3 a delete and a new object, so its ETag changes).
    pub fn overwrite(&self, key: &str, bytes: &[u8]) {
        match &self.s3 {
            None => std::fs::write(self.dir.path().join(key), bytes).unwrap(),
            Some(_) => {
                let backend = self.backend();
                backend.delete(key).unwrap();
                assert!(backend.put_if_absent(key, bytes).unwrap());
            }
        }
    }

    /// The keys under `prefix` (`packs/`).
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        let mut keys = self.backend().list(prefix).unwrap();
        keys.sort();
        keys
    }

    /// The object `key`.
    pub fn read(&self, key: &str) -> Vec<u8> {
        self.backend().get(key, None).unwrap()
    }
}
