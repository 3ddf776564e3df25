//! The repository in an S3 bucket: [`S3`], a [`Backend`] over the `object_store`
//! crate's S3 client.
//!
//! The repository's format needs nothing S3 lacks: objects are written whole, once,
//! read whole or by range, listed by prefix and deleted. What this module adds:
//!
//! * **Its own runtime.** `object_store` is async; the repository is called from plain
//!   threads (the writer's packer and workers, restore's readers) and from the daemon's
//!   single-threaded runtime. Each call is spawned onto a small multi-threaded runtime
//!   this backend owns and waited for on a channel, which works from any thread.
//! * **Write-once without trusting the server.** [`Backend::put_if_absent`] is a PUT with
//!   `If-None-Match: *` where the server honours it. [`S3::connect`] finds out once
//!   (a probe PUTs one object twice) and records the answer in the bucket
//!   (`s3-capabilities`); where it is not honoured (Garage), the backend asks first
//!   (HEAD) and then PUTs. Every object the repository writes more than once under
//!   one name has the same bytes each time (packs, indexes and manifests are named by
//!   their digest), so an overwrite is harmless; the one exclusive object, the
//!   collection's `gc` marker, is taken with a claim-and-list protocol there
//!   ([`Backend::honours_put_if_absent`] and `repository::gc`).
//! * **Multipart uploads for packs**: objects of [`MULTIPART_MIN`] or more go up in parts
//!   of [`PART_SIZE`], all parts of a pack in flight at once (memory: the pack, which
//!   the writer holds anyway).
//! * **Retries with backoff** for connection errors, 5xx answers and timeouts
//!   (`object_store`'s [`RetryConfig`]), bounded by [`S3Options::retry_timeout`]; after
//!   that an operation fails with one line naming the object.
//! * **A local cache** of index objects and manifests ([`cache`]), so opening the
//!   repository again downloads only what is new. A cached entry is trusted only if the
//!   bucket's listing shows the same object (its ETag and size) and its bytes still
//!   hash to what was cached.

pub mod cache;

use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::AtomicU8;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use object_store::GetOptions;
use object_store::GetRange;
use object_store::ObjectStore;
use object_store::ObjectStoreExt;
use object_store::PutMode;
use object_store::PutOptions;
use object_store::PutPayload;
use object_store::RetryConfig;
use object_store::aws::AmazonS3;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjectPath;

use crate::backend::Backend;
use crate::backend::check_key;
use crate::error::Error;
use crate::error::Result;
use cache::Cache;

/// Objects at least this large are uploaded in parts.
pub const MULTIPART_MIN: usize = 16 << 20;

/// A multipart upload's part size (S3 needs at least 5 MiB but for the last).
pub const PART_SIZE: usize = 8 << 20;

/// Packs a writer uploads at once (each in parts, all in flight).
pub const UPLOADS_IN_FLIGHT: usize = 3;

/// Small objects (index objects) a reader fetches at once.
pub const READS_IN_FLIGHT: usize = 8;

/// How long an operation keeps retrying by default.
pub const RETRY_TIMEOUT: Duration = Duration::from_secs(60);

/// Environment variables that give `object_store` credentials (or allow the EC2
/// metadata service: `STILLPOINT_S3_INSTANCE_CREDENTIALS`).
const CREDENTIALS_FROM: [&str; 5] = [
    "AWS_ACCESS_KEY_ID",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "STILLPOINT_S3_INSTANCE_CREDENTIALS",
];

/// [`S3::conditional_put`]'s states.
const UNKNOWN: u8 = 0;
const HONOURED: u8 = 1;
const IGNORED: u8 = 2;

/// The object recording what the server was found to honour.
const CAPABILITIES: &str = "s3-capabilities";

/// Where the repository is and how to reach it. Unset fields come from the usual
/// `AWS_*` environment (`AWS_ENDPOINT_URL`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`,
/// `AWS_SECRET_ACCESS_KEY`, `AWS_ALLOW_HTTP`, ...), as `object_store` reads it.
#[derive(Debug, Clone, Default)]
pub struct S3Options {
    /// The server's URL (`http://127.0.0.1:8333`); AWS when unset.
    pub endpoint: Option<String>,
    /// The region (`us-east-1` when neither this nor `AWS_REGION` is set).
    pub region: Option<String>,
    /// Virtual-hosted-style requests (`BUCKET.host`) instead of path-style
    /// (`host/BUCKET`). Path-style is what SeaweedFS, Ceph RGW, MinIO and Garage take.
    pub virtual_hosted: bool,
    /// Plain `http://` endpoints (otherwise refused; `AWS_ALLOW_HTTP=true` too).
    pub allow_http: bool,
    /// How long one operation keeps retrying ([`RETRY_TIMEOUT`] when unset).
    pub retry_timeout: Option<Duration>,
    /// The local cache's directory; `None` for no cache.
    pub cache_dir: Option<PathBuf>,
    /// An access key id and secret (else `AWS_ACCESS_KEY_ID` and
    /// `AWS_SECRET_ACCESS_KEY`, or the other ways `object_store` finds credentials).
    pub credentials: Option<(String, String)>,
    /// The repository is being created here: find out what the server honours and
    /// record it in the bucket ([`S3::connect`]).
    pub create: bool,
}

/// An `s3://BUCKET/PREFIX` location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Url {
    /// The bucket.
    pub bucket: String,
    /// The repository's prefix in the bucket, without slashes at either end; may be empty.
    pub prefix: String,
}

impl S3Url {
    /// Parses `s3://BUCKET[/PREFIX]`; `None` if `location` is not an S3 URL.
    pub fn parse(location: &str) -> Option<Result<Self>> {
        let rest = location.strip_prefix("s3://")?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let prefix = prefix.trim_matches('/').to_string();
        let bucket_ok = (3..=63).contains(&bucket.len())
            && bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
        if !bucket_ok {
            return Some(Err(Error::Invalid(format!(
                "'{location}': the bucket name must be 3 to 63 lower-case letters, digits, \
                 dots or hyphens"
            ))));
        }
        if !prefix.is_empty() && check_key(&prefix).is_err() {
            return Some(Err(Error::Invalid(format!(
                "'{location}': the prefix may hold letters, digits, '-', '_', '.' and '/'"
            ))));
        }
        Some(Ok(Self {
            bucket: bucket.to_string(),
            prefix,
        }))
    }
}

impl std::fmt::Display for S3Url {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.prefix.is_empty() {
            write!(f, "s3://{}", self.bucket)
        } else {
            write!(f, "s3://{}/{}", self.bucket, self.prefix)
        }
    }
}

/// A repository in an S3 bucket.
#[derive(Debug)]
pub struct S3 {
    store: Arc<AmazonS3>,
    url: S3Url,
    /// `Some` until drop, which shuts it down without waiting (a backend may be
    /// dropped inside the daemon's runtime, where waiting is not allowed).
    runtime: Option<tokio::runtime::Runtime>,
    /// Whether the server refuses a PUT with `If-None-Match: *` over an existing object:
    /// [`HONOURED`], [`IGNORED`], or [`UNKNOWN`] until found out.
    conditional_put: AtomicU8,
    cache: Option<Mutex<Cache>>,
    /// Requests made, for `requests()` and `STILLPOINT_S3_STATS`.
    requests: Requests,
}

/// Requests an [`S3`] backend made (retries inside `object_store` not counted), and
/// the bytes they carried.
#[derive(Debug, Default)]
pub struct Requests {
    /// GETs, ranged or whole, conditional ones included.
    pub gets: AtomicU64,
    /// GETs a cache entry answered without a request.
    pub cache_hits: AtomicU64,
    /// Conditional GETs answered "not modified".
    pub not_modified: AtomicU64,
    /// PUTs (a multipart upload's parts each count, and its start and completion).
    pub puts: AtomicU64,
    /// HEADs.
    pub heads: AtomicU64,
    /// LIST pages' worth of listings (one per call; a call may page).
    pub lists: AtomicU64,
    /// DELETEs.
    pub deletes: AtomicU64,
    /// Bytes received in GET bodies.
    pub bytes_down: AtomicU64,
    /// Bytes sent in PUT bodies.
    pub bytes_up: AtomicU64,
}

impl Requests {
    fn count(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// The counts as JSON.
    pub fn to_json(&self) -> serde_json::Value {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        serde_json::json!({
            "gets": get(&self.gets), "cache_hits": get(&self.cache_hits),
            "not_modified": get(&self.not_modified), "puts": get(&self.puts),
            "heads": get(&self.heads), "lists": get(&self.lists),
            "deletes": get(&self.deletes), "bytes_down": get(&self.bytes_down),
            "bytes_up": get(&self.bytes_up),
        })
    }
}

impl Drop for S3 {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
        if std::env::var_os("STILLPOINT_S3_STATS").is_some() {
            eprintln!("s3 requests: {}", self.requests.to_json());
        }
    }
}

/// One line for an `object_store` error: its message can span lines and carry the
/// server's XML answer, of which the code and message are kept.
fn one_line(error: &object_store::Error) -> String {
    let text = error.to_string();
    let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    let Some(xml) = text.find("<?xml") else {
        return text;
    };
    let element = |name: &str| {
        let open = format!("<{name}>");
        let start = text[xml..].find(&open)? + xml + open.len();
        let end = text[start..].find('<')? + start;
        Some(text[start..end].to_string())
    };
    let head = text[..xml].trim_end().trim_end_matches(':');
    match (element("Code"), element("Message")) {
        (Some(code), Some(message)) => format!("{head} ({code}: {message})"),
        (Some(code), None) => format!("{head} ({code})"),
        _ => head.to_string(),
    }
}

impl S3 {
    /// Connects to the repository at `url`. Reads what the server was found to honour,
    /// or finds it out (probing with one small object) and records it.
    pub fn connect(url: S3Url, options: &S3Options) -> Result<Self> {
        let mut builder = AmazonS3Builder::from_env().with_bucket_name(&url.bucket);
        if let Some(endpoint) = &options.endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        if let Some(region) = &options.region {
            builder = builder.with_region(region);
        } else if std::env::var_os("AWS_REGION").is_none()
            && std::env::var_os("AWS_DEFAULT_REGION").is_none()
        {
            builder = builder.with_region("us-east-1");
        }
        if options.allow_http {
            builder = builder.with_allow_http(true);
        }
        if let Some((key_id, secret)) = &options.credentials {
            builder = builder
                .with_access_key_id(key_id)
                .with_secret_access_key(secret);
        } else if !CREDENTIALS_FROM
            .iter()
            .any(|v| std::env::var_os(v).is_some())
        {
            // Without any, object_store would ask the EC2 metadata service, which off
            // EC2 means a minute of retries before an unhelpful error.
            return Err(Error::Invalid(format!(
                "{url}: no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY \
                 (or AWS_WEB_IDENTITY_TOKEN_FILE; on EC2, STILLPOINT_S3_INSTANCE_CREDENTIALS=1 \
                 for the instance's role)"
            )));
        }
        let retry = RetryConfig {
            retry_timeout: options.retry_timeout.unwrap_or(RETRY_TIMEOUT),
            ..RetryConfig::default()
        };
        let store = builder
            .with_virtual_hosted_style_request(options.virtual_hosted)
            .with_retry(retry)
            .build()
            .map_err(|e| Error::Invalid(format!("{url}: {}", one_line(&e))))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("s3")
            .enable_all()
            .build()
            .map_err(|e| Error::io("starting the S3 client's threads", e))?;
        let cache = match &options.cache_dir {
            Some(dir) => {
                // The endpoint the client uses, so two servers' buckets of one name
                // never share a cache directory.
                let endpoint = options
                    .endpoint
                    .clone()
                    .or_else(|| std::env::var("AWS_ENDPOINT_URL").ok())
                    .unwrap_or_default();
                Some(Mutex::new(Cache::open(dir, &endpoint, &url)?))
            }
            None => None,
        };
        let backend = Self {
            store: Arc::new(store),
            url,
            runtime: Some(runtime),
            conditional_put: AtomicU8::new(UNKNOWN),
            cache,
            requests: Requests::default(),
        };
        match backend.get(CAPABILITIES, None) {
            Ok(bytes) => {
                let honoured = serde_json::from_slice::<serde_json::Value>(&bytes)
                    .ok()
                    .and_then(|v| v["conditional_put"].as_bool())
                    .ok_or_else(|| Error::damaged(CAPABILITIES, "not the JSON this writes"))?;
                backend.set_conditional_put(honoured);
            }
            // A new repository: found out and recorded now. Opening one that has no
            // record (made by another tool, or not there at all) writes nothing: the
            // first creation of an object finds out ([`S3::conditional_put`]).
            Err(Error::NotFound(_)) if options.create => {
                let honoured = backend.probe_conditional_put()?;
                let record = serde_json::json!({ "conditional_put": honoured });
                backend.put(CAPABILITIES, record.to_string().into_bytes())?;
                backend.set_conditional_put(honoured);
            }
            Err(Error::NotFound(_)) => {}
            Err(e) => return Err(e),
        }
        Ok(backend)
    }

    fn set_conditional_put(&self, honoured: bool) {
        let value = if honoured { HONOURED } else { IGNORED };
        self.conditional_put.store(value, Ordering::Relaxed);
    }

    /// The repository's location.
    pub fn url(&self) -> &S3Url {
        &self.url
    }

    /// The requests made so far.
    pub fn requests(&self) -> &Requests {
        &self.requests
    }

    /// Whether the server refuses to overwrite an object on `If-None-Match: *`: as
    /// recorded in the bucket, else probed now (once).
    pub fn conditional_put(&self) -> Result<bool> {
        match self.conditional_put.load(Ordering::Relaxed) {
            HONOURED => Ok(true),
            IGNORED => Ok(false),
            _ => {
                let honoured = self.probe_conditional_put()?;
                self.set_conditional_put(honoured);
                Ok(honoured)
            }
        }
    }

    fn path(&self, key: &str) -> Result<ObjectPath> {
        check_key(key)?;
        Ok(if self.url.prefix.is_empty() {
            ObjectPath::from(key)
        } else {
            ObjectPath::from(format!("{}/{key}", self.url.prefix))
        })
    }

    /// Runs `work` on the backend's runtime and waits for it, from any thread.
    fn run<T: Send + 'static>(&self, work: impl Future<Output = T> + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.runtime
            .as_ref()
            .expect("the runtime lives as long as the backend")
            .spawn(async move {
                let _ = tx.send(work.await);
            });
        rx.recv()
            .expect("the S3 runtime runs every task it is given to the end")
    }

    fn failed(&self, what: String, error: &object_store::Error) -> Error {
        Error::io(
            format!("{what} in {}", self.url),
            std::io::Error::other(one_line(error)),
        )
    }

    /// PUTs twice with `If-None-Match: *` and reports whether the second was refused.
    fn probe_conditional_put(&self) -> Result<bool> {
        let key = format!(
            "probe/{}-{}",
            std::process::id(),
            crate::repository::now_ns()
        );
        let path = self.path(&key)?;
        let store = self.store.clone();
        let outcome = self.run(async move {
            let create = || PutOptions {
                mode: PutMode::Create,
                ..PutOptions::default()
            };
            store
                .put_opts(&path, PutPayload::from_static(b"1"), create())
                .await?;
            let second = store
                .put_opts(&path, PutPayload::from_static(b"2"), create())
                .await;
            let _ = store.delete(&path).await;
            match second {
                Ok(_) => Ok(false),
                Err(object_store::Error::AlreadyExists { .. }) => Ok(true),
                Err(e) => Err(e),
            }
        });
        outcome.map_err(|e| self.failed("probing conditional PUT".into(), &e))
    }

    /// PUTs `data` under `key` whatever is there.
    fn put(&self, key: &str, data: Vec<u8>) -> Result<()> {
        let path = self.path(key)?;
        Requests::count(&self.requests.puts, 1);
        Requests::count(&self.requests.bytes_up, data.len() as u64);
        let store = self.store.clone();
        let payload = PutPayload::from(data.clone());
        let written = self
            .run(async move { store.put(&path, payload).await })
            .map_err(|e| self.failed(format!("writing {key}"), &e))?;
        self.cache_written(key, written.e_tag, &data);
        Ok(())
    }

    /// Keeps what this backend wrote under a cached prefix, as the bucket answered
    /// (its ETag), so reading it back later costs no download.
    fn cache_written(&self, key: &str, etag: Option<String>, data: &[u8]) {
        if let (true, Some(cache), Some(etag)) = (Cache::holds(key), &self.cache, etag) {
            // A cache that cannot be written only costs downloads.
            let _ = cache.lock().unwrap_or_else(|e| e.into_inner()).put(
                key,
                &etag,
                data.len() as u64,
                data,
            );
        }
    }

    /// Whether `key` exists.
    fn exists(&self, key: &str) -> Result<bool> {
        let path = self.path(key)?;
        Requests::count(&self.requests.heads, 1);
        let store = self.store.clone();
        match self.run(async move { store.head(&path).await }) {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.failed(format!("looking for {key}"), &e)),
        }
    }

    /// Uploads a large object in parts, every part in flight at once.
    fn put_multipart(&self, key: &str, data: &[u8]) -> Result<()> {
        let path = self.path(key)?;
        Requests::count(
            &self.requests.puts,
            2 + data.len().div_ceil(PART_SIZE) as u64,
        );
        Requests::count(&self.requests.bytes_up, data.len() as u64);
        let store = self.store.clone();
        let data = Bytes::copy_from_slice(data);
        let outcome = self.run(async move {
            let mut upload = store.put_multipart(&path).await?;
            let parts: Vec<_> = (0..data.len())
                .step_by(PART_SIZE)
                .map(|at| {
                    let part = data.slice(at..(at + PART_SIZE).min(data.len()));
                    tokio::spawn(upload.put_part(PutPayload::from(part)))
                })
                .collect();
            let mut failure = None;
            for part in parts {
                let result = part.await.unwrap_or_else(|e| {
                    Err(object_store::Error::Generic {
                        store: "S3",
                        source: Box::new(e),
                    })
                });
                if let Err(e) = result {
                    failure.get_or_insert(e);
                }
            }
            if let Some(e) = failure {
                let _ = upload.abort().await;
                return Err(e);
            }
            upload.complete().await.map(|_| ())
        });
        outcome.map_err(|e| self.failed(format!("writing {key}"), &e))
    }

    /// The object's bytes (or a range of them) and its ETag. With `unless_etag`, `None`
    /// if the object still has that ETag (a conditional GET: no bytes sent).
    fn fetch(
        &self,
        key: &str,
        range: Option<Range<u64>>,
        unless_etag: Option<String>,
    ) -> Result<Option<(Vec<u8>, Option<String>)>> {
        let path = self.path(key)?;
        Requests::count(&self.requests.gets, 1);
        let store = self.store.clone();
        let wanted = range.clone();
        let outcome = self.run(async move {
            let options = GetOptions {
                range: wanted.map(GetRange::Bounded),
                if_none_match: unless_etag,
                ..GetOptions::default()
            };
            let result = store.get_opts(&path, options).await?;
            let etag = result.meta.e_tag.clone();
            let bytes = result.bytes().await?;
            Ok::<_, object_store::Error>((bytes.to_vec(), etag))
        });
        let (bytes, etag) = match outcome {
            Ok(found) => found,
            Err(object_store::Error::NotModified { .. }) => {
                Requests::count(&self.requests.not_modified, 1);
                return Ok(None);
            }
            Err(object_store::Error::NotFound { .. }) => {
                return Err(Error::NotFound(format!("{key} is missing")));
            }
            Err(e) => return Err(self.failed(format!("reading {key}"), &e)),
        };
        Requests::count(&self.requests.bytes_down, bytes.len() as u64);
        if let Some(range) = range
            && (bytes.len() as u64) < range.end - range.start
        {
            return Err(Error::damaged(
                key,
                format!(
                    "shorter than the {}..{} it should hold",
                    range.start, range.end
                ),
            ));
        }
        Ok(Some((bytes, etag)))
    }

    /// An index object or manifest, through the cache: served from it when this
    /// backend's latest listing shows the same object, else fetched unless unchanged
    /// since it was cached (a conditional GET), and cached.
    fn get_cached(&self, key: &str, cache: &Mutex<Cache>) -> Result<Vec<u8>> {
        let lock = || cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(bytes) = lock().get(key) {
            Requests::count(&self.requests.cache_hits, 1);
            return Ok(bytes);
        }
        let entry = lock().entry(key);
        let unless = entry.as_ref().map(|(etag, _)| etag.clone());
        match self.fetch(key, None, unless)? {
            None => Ok(entry.expect("a conditional GET had an ETag").1),
            Some((bytes, etag)) => {
                if let Some(etag) = etag {
                    // A cache that cannot be written only costs downloads.
                    let _ = lock().put(key, &etag, bytes.len() as u64, &bytes);
                }
                Ok(bytes)
            }
        }
    }
}

impl Backend for S3 {
    fn put_if_absent(&self, key: &str, data: &[u8]) -> Result<bool> {
        if data.len() >= MULTIPART_MIN {
            // A multipart upload cannot be conditional; only digest-named packs are
            // this large, and writing one twice writes the same bytes.
            if self.exists(key)? {
                return Ok(false);
            }
            self.put_multipart(key, data)?;
            return Ok(true);
        }
        if !self.conditional_put()? {
            if self.exists(key)? {
                return Ok(false);
            }
            self.put(key, data.to_vec())?;
            return Ok(true);
        }
        let path = self.path(key)?;
        Requests::count(&self.requests.puts, 1);
        Requests::count(&self.requests.bytes_up, data.len() as u64);
        let store = self.store.clone();
        let payload = PutPayload::from(data.to_vec());
        let outcome = self.run(async move {
            let options = PutOptions {
                mode: PutMode::Create,
                ..PutOptions::default()
            };
            store.put_opts(&path, payload, options).await
        });
        match outcome {
            Ok(written) => {
                self.cache_written(key, written.e_tag, data);
                Ok(true)
            }
            Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
            Err(e) => Err(self.failed(format!("writing {key}"), &e)),
        }
    }

    fn get(&self, key: &str, range: Option<Range<u64>>) -> Result<Vec<u8>> {
        if range.is_none()
            && Cache::holds(key)
            && let Some(cache) = &self.cache
        {
            return self.get_cached(key, cache);
        }
        let (bytes, _) = self
            .fetch(key, range, None)?
            .expect("an unconditional GET has bytes");
        Ok(bytes)
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>> {
        // An empty prefix lists the whole repository (its prefix in the bucket).
        let path = match prefix.trim_end_matches('/') {
            "" if self.url.prefix.is_empty() => None,
            "" => Some(ObjectPath::from(self.url.prefix.as_str())),
            under => Some(self.path(under)?),
        };
        Requests::count(&self.requests.lists, 1);
        let store = self.store.clone();
        let outcome = self.run(async move {
            let mut listing = store.list(path.as_ref());
            let mut out = Vec::new();
            while let Some(meta) = listing.next().await {
                out.push(meta?);
            }
            Ok::<_, object_store::Error>(out)
        });
        let metas = outcome.map_err(|e| self.failed(format!("listing {prefix}"), &e))?;
        let strip = if self.url.prefix.is_empty() {
            0
        } else {
            self.url.prefix.len() + 1
        };
        let keys: Vec<(String, Option<String>, u64)> = metas
            .into_iter()
            .map(|m| (m.location.as_ref()[strip..].to_string(), m.e_tag, m.size))
            .collect();
        if Cache::holds(prefix)
            && let Some(cache) = &self.cache
        {
            cache
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .listed(prefix, &keys);
        }
        Ok(keys.into_iter().map(|(key, _, _)| key).collect())
    }

    fn delete(&self, key: &str) -> Result<()> {
        let path = self.path(key)?;
        Requests::count(&self.requests.deletes, 1);
        let store = self.store.clone();
        match self.run(async move { store.delete(&path).await }) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.failed(format!("deleting {key}"), &e)),
        }
    }

    fn honours_put_if_absent(&self) -> bool {
        // Unknown until a probe: a probe that fails here counts as "not honoured",
        // which only makes the caller more careful.
        self.conditional_put().unwrap_or(false)
    }

    fn uploads_in_flight(&self) -> usize {
        UPLOADS_IN_FLIGHT
    }

    fn reads_in_flight(&self) -> usize {
        READS_IN_FLIGHT
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_error_is_one_line_with_its_code_and_message() {
        let error = object_store::Error::Generic {
            store: "S3",
            source: "Error performing PUT http://h/b/k after 10 retries - Server returned \
                     non-2xx status code: 500 Internal Server Error: <?xml version=\"1.0\"?>\n\
                     <Error><Code>InternalError</Code><Message>Try again.</Message>\
                     <Resource>/b/k</Resource></Error>"
                .into(),
        };
        let line = one_line(&error);
        assert!(
            !line.contains('\n') && !line.contains("<Resource>"),
            "{line}"
        );
        assert!(
            line.ends_with("500 Internal Server Error (InternalError: Try again.)"),
            "{line}"
        );
    }

    #[test]
    fn urls_name_a_bucket_and_an_optional_prefix() {
        let url = S3Url::parse("s3://backups/site-a/vms").unwrap().unwrap();
        assert_eq!(url.bucket, "backups");
        assert_eq!(url.prefix, "site-a/vms");
        assert_eq!(url.to_string(), "s3://backups/site-a/vms");
        let bare = S3Url::parse("s3://backups/").unwrap().unwrap();
        assert_eq!(bare.prefix, "");
        assert_eq!(bare.to_string(), "s3://backups");
        assert!(S3Url::parse("/var/backups").is_none());
        for bad in [
            "s3://",
            "s3://UPPER",
            "s3://ab",
            "s3://bucket/a/../b",
            "s3://b_c/x",
        ] {
            let err = S3Url::parse(bad).unwrap().unwrap_err().to_string();
            assert!(err.contains(bad), "{bad}: {err}");
        }
    }
}
