//! One URL syntax for every place the trainer reads or writes objects (weights, shards,
//! checkpoints), plus the single tokio runtime that drives `object_store` from blocking code.

use std::future::Future;
use std::sync::{Arc, OnceLock};

use object_store::aws::AmazonS3Builder;
use object_store::azure::MicrosoftAzureBuilder;
use object_store::gcp::GoogleCloudStorageBuilder;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use url::Url;

use crate::error::{Error, Result};

/// Maps a storage URL to its store and the object's path inside that store.
///
/// - `file:///abs/path` → the local file system (the path need not exist yet, so checkpoints can
///   be written there);
/// - `s3://bucket/key` → S3 configured from `AWS_*` env vars (`AWS_ENDPOINT_URL`,
///   `AWS_ALLOW_HTTP`, … so S3-compatible servers such as MinIO or moto work);
/// - `gs://bucket/key` → GCS from `GOOGLE_*` env vars;
/// - `az://container/key` or `azure://container/key` → Azure Blob from `AZURE_*` env vars;
/// - `memory://key` → one in-memory store shared by the whole process, so that what one
///   component writes another can read back (tests, dry runs).
pub fn object_store_for(url: &str) -> Result<(Arc<dyn ObjectStore>, Path)> {
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
        other => {
            return Err(Error::Config(format!(
                "`{url}`: unsupported storage scheme `{other}://`, expected file://, s3://, gs://, az://, azure:// or memory://"
            )))
        }
    };
    let path = Path::from_url_path(parsed.path()).map_err(|e| store_error(e.into()))?;
    Ok((store, path))
}

/// Runs a future to completion from blocking code on one lazily created, process-wide
/// multi-thread runtime.
///
/// Sharing the runtime keeps the HTTP connection pools of the object stores alive between
/// calls. Do not call it from inside an async context (it would panic, as nested runtimes do).
pub fn block_on<F: Future>(future: F) -> F::Output {
    runtime().block_on(future)
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .thread_name("ditrun-io")
            .build()
            // Without a runtime no storage works at all, and the cause (out of threads or file
            // descriptors) is not something the caller can recover from.
            .expect("cannot start the tokio runtime for storage I/O")
    })
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

/// Whether the object at `url` exists (a missing object is `Ok(false)`, other failures errors).
pub fn exists(url: &str) -> Result<bool> {
    let (store, path) = object_store_for(url)?;
    match block_on(store.head(&path)) {
        Ok(_) => Ok(true),
        Err(object_store::Error::NotFound { .. }) => Ok(false),
        Err(source) => Err(Error::ObjectStore { url: url.to_string(), source }),
    }
}

/// Writes `bytes` as the object at `url` (one put: readers see all of it or nothing).
pub fn put_bytes(url: &str, bytes: Vec<u8>) -> Result<()> {
    let (store, path) = object_store_for(url)?;
    block_on(store.put(&path, bytes.into()))
        .map(|_| ())
        .map_err(|source| Error::ObjectStore { url: url.to_string(), source })
}
