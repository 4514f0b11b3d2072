//! Which locations are URLs, which URL schemes name an object store, and how a location becomes
//! its canonical URL and then a store plus an object path.
//!
//! Invariants:
//! - [`scheme_of`] is the crate's one test of "is this a URL": anything else is a local path,
//!   relative to the working directory when the location is read;
//! - a canonical URL (what [`location_url`] returns and a [`Location`](super::Location) holds)
//!   has a scheme of [`STORE_SCHEMES`] and no trailing `/` (a bare `memory://` stays whole), and
//!   a local path is an absolute `file://` URL, so it keeps naming the same place if the
//!   working directory changes later;
//! - a location that [`scheme_problem`] accepts is one that [`location_url`] accepts.

use std::sync::{Arc, OnceLock};

use object_store::aws::AmazonS3Builder;
use object_store::azure::MicrosoftAzureBuilder;
use object_store::gcp::GoogleCloudStorageBuilder;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::ObjectStore;
use url::Url;

use crate::error::{Error, Result};

/// The schemes a [`Location`](super::Location) opens, in the order messages list them.
pub const STORE_SCHEMES: &[&str] = &[
    "file", "s3", "s3a", "gs", "az", "azure", "abfs", "abfss", "memory",
];

/// The URL scheme of `location`, if it looks like a URL at all; anything else is a local path
/// (so `./odd://name` still names a file).
pub fn scheme_of(location: &str) -> Option<&str> {
    let (scheme, _) = location.split_once("://")?;
    let mut chars = scheme.chars();
    let valid = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    valid.then_some(scheme)
}

/// Why `location` cannot name a place in an object store, or `None` when it can (a local path
/// or a URL of one of [`STORE_SCHEMES`]). Nothing is opened: this is the check for job files.
pub fn scheme_problem(location: &str) -> Option<String> {
    unsupported_scheme(location, STORE_SCHEMES)
}

/// The message for a URL whose scheme is not among `accepted`; `None` for paths and accepted
/// URLs.
pub(crate) fn unsupported_scheme(location: &str, accepted: &[&str]) -> Option<String> {
    let scheme = scheme_of(location)?;
    (!accepted.contains(&scheme)).then(|| unsupported_message(location, scheme, accepted))
}

fn unsupported_message(location: &str, scheme: &str, accepted: &[&str]) -> String {
    let expected: Vec<String> = accepted.iter().map(|s| format!("{s}://")).collect();
    format!(
        "`{location}`: unsupported scheme `{scheme}://`, expected a path or one of {}",
        expected.join(", ")
    )
}

/// The canonical URL of a location from a job or the command line: URLs of a supported scheme
/// lose their trailing `/`, local paths become absolute `file://` URLs. Nothing is opened.
pub fn location_url(location: &str) -> Result<String> {
    if scheme_of(location).is_some() {
        return match scheme_problem(location) {
            Some(problem) => Err(Error::Config(problem)),
            None => Ok(trim_trailing_slashes(location).to_string()),
        };
    }
    if location.is_empty() {
        return Err(Error::Config(
            "the location is empty: expected a local path or a URL (file://, s3://, gs://, az://, memory://)".into(),
        ));
    }
    let absolute = std::path::absolute(location).map_err(|e| Error::io(location, e))?;
    let url = Url::from_file_path(&absolute)
        .map_err(|()| Error::Config(format!("`{location}` cannot be written as a file:// URL")))?;
    Ok(trim_trailing_slashes(url.as_str()).to_string())
}

/// `s3://b/ckpt/` → `s3://b/ckpt`, but `memory://` stays whole.
pub(crate) fn trim_trailing_slashes(url: &str) -> &str {
    let after_scheme = url.find("://").map_or(0, |i| i + 3);
    let (scheme, rest) = url.split_at(after_scheme);
    &url[..scheme.len() + rest.trim_end_matches('/').len()]
}

/// The store and object path a canonical URL names.
///
/// - `file:///abs/path` → the local file system (the path need not exist yet, so checkpoints
///   can be written there);
/// - `s3://bucket/key` → S3 configured from `AWS_*` env vars (`AWS_ENDPOINT_URL`,
///   `AWS_ALLOW_HTTP`, … so S3-compatible servers such as MinIO or moto work);
/// - `gs://bucket/key` → GCS from `GOOGLE_*` env vars;
/// - `az://container/key` or `azure://container/key` → Azure Blob from `AZURE_*` env vars;
/// - `memory://key` → one in-memory store shared by the whole process, so that what one
///   component writes another can read back (tests, dry runs).
pub(crate) fn open_store(url: &str) -> Result<(Arc<dyn ObjectStore>, Path)> {
    let parsed = Url::parse(url)
        .map_err(|e| Error::Config(format!("`{url}` is not a valid storage URL: {e}")))?;
    let store_error = |source| Error::ObjectStore {
        url: url.to_string(),
        source,
    };
    let store: Arc<dyn ObjectStore> = match parsed.scheme() {
        // Host-less `memory:///a/b` and host-ful `memory://a/b` should name the same object,
        // which the generic URL path split would not give.
        "memory" => return Ok((memory_store(), memory_path(url)?)),
        "file" => Arc::new(LocalFileSystem::new()),
        "s3" | "s3a" => Arc::new(
            AmazonS3Builder::from_env()
                .with_url(url)
                .build()
                .map_err(store_error)?,
        ),
        "gs" => Arc::new(
            GoogleCloudStorageBuilder::from_env()
                .with_url(url)
                .build()
                .map_err(store_error)?,
        ),
        "az" | "azure" | "abfs" | "abfss" => Arc::new(
            MicrosoftAzureBuilder::from_env()
                .with_url(url)
                .build()
                .map_err(store_error)?,
        ),
        // Canonical URLs never get here; a URL built by hand might.
        other => {
            let problem = unsupported_message(url, other, STORE_SCHEMES);
            return Err(Error::Config(problem));
        }
    };
    let path = Path::from_url_path(parsed.path()).map_err(|e| store_error(e.into()))?;
    Ok((store, path))
}

fn memory_store() -> Arc<dyn ObjectStore> {
    static MEMORY: OnceLock<Arc<InMemory>> = OnceLock::new();
    MEMORY.get_or_init(|| Arc::new(InMemory::new())).clone()
}

fn memory_path(url: &str) -> Result<Path> {
    let key = url.strip_prefix("memory://").unwrap_or(url);
    Path::from_url_path(key).map_err(|e| Error::ObjectStore {
        url: url.to_string(),
        source: e.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_paths_become_absolute_file_urls() {
        let url = location_url("some dir/ckpt").unwrap();
        assert!(url.starts_with("file:///"), "{url}");
        assert!(url.ends_with("/some%20dir/ckpt"), "{url}");
        assert_eq!(location_url("memory://x/").unwrap(), "memory://x");
        assert_eq!(location_url("memory://").unwrap(), "memory://");
    }

    #[test]
    fn only_store_schemes_are_urls_the_rest_is_named() {
        assert_eq!(scheme_of("./odd://name"), None);
        assert_eq!(scheme_of("s3://b/k"), Some("s3"));
        assert_eq!(scheme_problem("runs/ckpt"), None);
        assert_eq!(scheme_problem("gs://b/k"), None);
        let problem = scheme_problem("ftp://host/c").unwrap();
        assert!(problem.contains("`ftp://host/c`"), "{problem}");
        assert!(problem.contains("`ftp://`"), "{problem}");
        let message = location_url("ftp://host/c").unwrap_err().to_string();
        assert!(message.contains(&problem), "{message}");
        assert!(location_url("").is_err());
    }
}
