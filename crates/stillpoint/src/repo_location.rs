//! Where a repository is: a local directory, or `s3://BUCKET/PREFIX`.
//!
//! Every command that takes a repository (`repo ...`, `backup --repo`, `restore
//! --repo`, `nbd --repo`, the daemon's `repository` node) takes either; this module
//! turns the location into the repository crate's [`Backend`]. S3's endpoint, region
//! and addressing come from the `--s3-*` flags (or the node's `s3-*` members), else
//! from the usual `AWS_*` environment, which also carries the credentials.

use std::path::Path;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::Context;
use repo::Backend;
use repo::LocalDir;
use repo::S3;
use repo::S3Options;
use repo::S3Url;

/// How to reach an S3 repository, beside its URL.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct S3Flags {
    /// `--s3-endpoint`: the server's URL (else `AWS_ENDPOINT_URL`, else AWS).
    pub endpoint: Option<String>,
    /// `--s3-region` (else `AWS_REGION`, else `us-east-1`).
    pub region: Option<String>,
    /// `--s3-virtual-hosted`: `BUCKET.host` requests instead of path-style.
    pub virtual_hosted: bool,
    /// `--s3-cache DIR`: the cache of index objects and manifests.
    pub cache_dir: Option<PathBuf>,
    /// `--no-s3-cache`.
    pub no_cache: bool,
}

/// The command line's flags, set once by `main`.
static FLAGS: OnceLock<S3Flags> = OnceLock::new();

/// Records the command line's `--s3-*` flags for every repository the process opens.
pub fn set_flags(flags: S3Flags) {
    let _ = FLAGS.set(flags);
}

/// The command line's `--s3-*` flags.
pub fn flags() -> S3Flags {
    FLAGS.get().cloned().unwrap_or_default()
}

/// The cache directory: `--s3-cache`, else `STILLPOINT_CACHE_DIR`, else the user's
/// cache directory; none with `--no-s3-cache`.
fn cache_dir(flags: &S3Flags) -> Option<PathBuf> {
    if flags.no_cache {
        return None;
    }
    if let Some(dir) = &flags.cache_dir {
        return Some(dir.clone());
    }
    if let Some(dir) = std::env::var_os("STILLPOINT_CACHE_DIR") {
        return Some(PathBuf::from(dir));
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("stillpoint").join("s3"))
}

/// The storage at `location`. A local directory must exist unless `create` is set.
pub fn backend(location: &Path, flags: &S3Flags, create: bool) -> anyhow::Result<Box<dyn Backend>> {
    let Some(text) = location.to_str().filter(|s| s.starts_with("s3://")) else {
        if create {
            std::fs::create_dir_all(location)
                .with_context(|| format!("cannot create {}", location.display()))?;
        }
        return Ok(Box::new(LocalDir::new(location)));
    };
    let url = S3Url::parse(text).expect("an s3:// location")?;
    let retry_timeout = match std::env::var("STILLPOINT_S3_RETRY_TIMEOUT") {
        Ok(secs) => Some(Duration::from_secs_f64(secs.parse().with_context(
            || format!("STILLPOINT_S3_RETRY_TIMEOUT={secs}: seconds, as a number"),
        )?)),
        Err(_) => None,
    };
    let options = S3Options {
        endpoint: flags.endpoint.clone(),
        region: flags.region.clone(),
        virtual_hosted: flags.virtual_hosted,
        allow_http: false,
        retry_timeout,
        cache_dir: cache_dir(flags),
        credentials: None,
        create,
    };
    Ok(Box::new(S3::connect(url, &options)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_directory_follows_flags_then_environment() {
        let flags = S3Flags {
            cache_dir: Some("/c".into()),
            ..S3Flags::default()
        };
        assert_eq!(cache_dir(&flags), Some(PathBuf::from("/c")));
        let off = S3Flags {
            cache_dir: Some("/c".into()),
            no_cache: true,
            ..S3Flags::default()
        };
        assert_eq!(cache_dir(&off), None);
    }
}
