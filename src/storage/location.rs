//! [`Location`]: one place in one object store, parsed once from a local path or a URL, with
//! the blocking operations every component uses on it (shards, checkpoints, TensorBoard,
//! weights, inspect).
//!
//! Invariants:
//! - the URL a location holds is canonical (see [`location_url`](super::location_url)) and
//!   names the same object as its store and path, so errors can name the URL alone;
//! - [`join`](Location::join) and [`parent`](Location::parent) reuse the store: a folder's
//!   objects are reached through one client, built once when the folder was parsed;
//! - every failure is an [`Error::ObjectStore`] naming the location's URL, with the store's
//!   own error as its source (what retrying callers classify).

use std::fmt;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use object_store::path::Path;
use object_store::{GetOptions, GetRange, ObjectMeta, ObjectStore, ObjectStoreExt, PutPayload};

use super::runtime::block_on;
use super::scheme::{location_url, open_store, trim_trailing_slashes};
use crate::error::{Error, Result};

/// A file or folder in an object store (the local file system included): the store, the path
/// inside it and the URL that names both.
#[derive(Clone)]
pub struct Location {
    store: Arc<dyn ObjectStore>,
    path: Path,
    url: String,
}

/// What [`Location::list`] finds directly inside a folder, by name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Listing {
    pub files: Vec<String>,
    pub folders: Vec<String>,
}

impl Location {
    /// Opens a local path (relative to the working directory) or a URL of one of
    /// [`STORE_SCHEMES`](super::STORE_SCHEMES). Builds the store client; nothing is read yet.
    pub fn parse(location: &str) -> Result<Self> {
        let url = location_url(location)?;
        let (store, path) = open_store(&url)?;
        Ok(Self { store, path, url })
    }

    /// `path` inside an already built store (custom client options, a wrapper such as a
    /// throttled store); `url` only names it in messages.
    pub fn new(store: Arc<dyn ObjectStore>, path: Path, url: &str) -> Self {
        Self {
            store,
            path,
            url: trim_trailing_slashes(url).to_string(),
        }
    }

    /// The canonical URL, without a trailing `/`.
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// The last segment of the path; `None` at the root of a store.
    pub fn name(&self) -> Option<&str> {
        self.path.filename()
    }

    /// The location `relative` (one name, or several separated by `/`) below this one. `.`, `..`
    /// and control characters are refused, so a joined name never leaves this folder.
    pub fn join(&self, relative: &str) -> Result<Self> {
        let relative = relative.trim_matches('/');
        if relative.is_empty() {
            return Ok(self.clone());
        }
        let separator = if self.url.ends_with('/') { "" } else { "/" };
        let url = format!("{}{separator}{relative}", self.url);
        let path = Path::parse(format!("{}/{relative}", self.path));
        match path {
            Ok(path) => Ok(Self {
                store: self.store.clone(),
                path,
                url,
            }),
            Err(e) => Err(Error::ObjectStore {
                url,
                source: e.into(),
            }),
        }
    }

    /// The folder holding this location; `None` at the root of a store.
    pub fn parent(&self) -> Option<Self> {
        let path = self.path.parent()?;
        let (head, last) = self.url.rsplit_once('/')?;
        // `memory://a`: the parent is the store's root, `memory://`, not `memory:/`.
        let url = if head.ends_with(':') || head.ends_with(":/") {
            &self.url[..self.url.len() - last.len()]
        } else {
            head
        };
        Some(Self {
            store: self.store.clone(),
            path,
            url: url.to_string(),
        })
    }

    fn error(&self, source: object_store::Error) -> Error {
        Error::ObjectStore {
            url: self.url.clone(),
            source,
        }
    }

    /// The object's size and version; a missing object is an error.
    pub fn head(&self) -> Result<ObjectMeta> {
        block_on(self.store.head(&self.path)).map_err(|e| self.error(e))
    }

    /// Whether the object exists (a missing object is `Ok(false)`, other failures errors).
    pub fn exists(&self) -> Result<bool> {
        match block_on(self.store.head(&self.path)) {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(source) => Err(self.error(source)),
        }
    }

    /// The object's bytes, or `None` when the store has no such object.
    pub fn get(&self) -> Result<Option<Bytes>> {
        let found = block_on(async {
            match self.store.get(&self.path).await {
                Ok(found) => found.bytes().await.map(Some),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(other) => Err(other),
            }
        });
        found.map_err(|e| self.error(e))
    }

    /// Bytes `range` of the object; with `if_match` (an etag), only of that version of it.
    pub fn get_range(&self, range: Range<u64>, if_match: Option<String>) -> Result<Bytes> {
        let options = GetOptions {
            range: Some(GetRange::Bounded(range)),
            if_match,
            ..Default::default()
        };
        block_on(async {
            self.store
                .get_opts(&self.path, options)
                .await?
                .bytes()
                .await
        })
        .map_err(|e| self.error(e))
    }

    /// Writes the object in one put: readers see all of it or nothing.
    pub fn put(&self, bytes: impl Into<Bytes>) -> Result<()> {
        let payload = PutPayload::from(bytes.into());
        block_on(self.store.put(&self.path, payload))
            .map(|_| ())
            .map_err(|e| self.error(e))
    }

    /// [`put`](Self::put) that stops waiting after `timeout`: `None` when the store has not
    /// answered by then (the put is abandoned; whether it landed is unknown).
    pub fn put_within(&self, bytes: impl Into<Bytes>, timeout: Duration) -> Option<Result<()>> {
        let put = self.store.put(&self.path, PutPayload::from(bytes.into()));
        let answer = block_on(async { tokio::time::timeout(timeout, put).await }).ok()?;
        Some(answer.map(|_| ()).map_err(|e| self.error(e)))
    }

    /// Deletes the object; `Ok(false)` when the store reports it was not there (S3 never does).
    pub fn delete(&self) -> Result<bool> {
        match block_on(self.store.delete(&self.path)) {
            Ok(()) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(source) => Err(self.error(source)),
        }
    }

    /// The objects and folders directly inside this folder.
    pub fn list(&self) -> Result<Listing> {
        let prefix = (!self.path.is_root()).then_some(&self.path);
        let listing =
            block_on(self.store.list_with_delimiter(prefix)).map_err(|e| self.error(e))?;
        let name = |path: &Path| path.filename().map(str::to_string);
        Ok(Listing {
            files: listing
                .objects
                .iter()
                .filter_map(|object| name(&object.location))
                .collect(),
            folders: listing.common_prefixes.iter().filter_map(name).collect(),
        })
    }

    /// The local file system keeps a folder after its last file is deleted, object stores do
    /// not; removes it when this is an empty local folder. Best effort: a leftover empty folder
    /// is harmless.
    pub fn remove_empty_folder(&self) {
        let folder = url::Url::parse(&self.url)
            .ok()
            .filter(|url| url.scheme() == "file")
            .and_then(|url| url.to_file_path().ok());
        if let Some(folder) = folder {
            let _ = std::fs::remove_dir(folder);
        }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.url)
    }
}

impl fmt::Debug for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Location").field(&self.url).finish()
    }
}

/// Whether the object at `location` (a path or URL) exists.
pub fn exists(location: &str) -> Result<bool> {
    Location::parse(location)?.exists()
}

/// Writes `bytes` as the object at `location` (a path or URL), in one put.
pub fn put_bytes(location: &str, bytes: Vec<u8>) -> Result<()> {
    Location::parse(location)?.put(bytes)
}

/// The store and object path of `location`, for code that drives `object_store` itself.
pub fn object_store_for(location: &str) -> Result<(Arc<dyn ObjectStore>, Path)> {
    let Location { store, path, .. } = Location::parse(location)?;
    Ok((store, path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(location: &str) -> Location {
        Location::parse(location).unwrap()
    }

    #[test]
    fn join_and_parent_keep_url_and_path_together() {
        let folder = parse("memory://location-tests/folder/");
        assert_eq!(folder.url(), "memory://location-tests/folder");
        let file = folder.join("sub/file.bin").unwrap();
        assert_eq!(file.url(), "memory://location-tests/folder/sub/file.bin");
        assert_eq!(file.path().as_ref(), "location-tests/folder/sub/file.bin");
        assert_eq!(file.name(), Some("file.bin"));
        let parent = file.parent().unwrap();
        assert_eq!(parent.url(), "memory://location-tests/folder/sub");
        assert_eq!(parent.path().as_ref(), "location-tests/folder/sub");

        let top = parse("memory://step-000000004");
        let root = top.parent().unwrap();
        assert_eq!((root.url(), root.path().as_ref()), ("memory://", ""));
        assert!(root.parent().is_none());
        assert_eq!(root.join("a").unwrap().url(), "memory://a");
    }

    #[test]
    fn joined_names_cannot_leave_the_folder() {
        let folder = parse("memory://location-tests/escape");
        for bad in ["..", "a/../b", "."] {
            let message = folder.join(bad).unwrap_err().to_string();
            assert!(
                message.contains("memory://location-tests/escape/"),
                "{message}"
            );
        }
    }

    #[test]
    fn objects_round_trip_and_list_by_name() {
        let folder = parse("memory://location-tests/ops");
        let file = folder.join("a.bin").unwrap();
        assert_eq!(file.get().unwrap(), None);
        assert!(!file.exists().unwrap());
        file.put(b"abc".to_vec()).unwrap();
        folder.join("sub/b.bin").unwrap().put(Bytes::new()).unwrap();
        assert_eq!(file.get().unwrap().as_deref(), Some(&b"abc"[..]));
        assert_eq!(file.head().unwrap().size, 3);
        assert_eq!(&file.get_range(1..3, None).unwrap()[..], b"bc");
        let listing = folder.list().unwrap();
        assert_eq!(listing.files, ["a.bin"]);
        assert_eq!(listing.folders, ["sub"]);
        assert!(file.delete().unwrap());
        assert!(!file.exists().unwrap());
        assert_eq!(
            file.put_within(b"x".to_vec(), Duration::from_secs(5))
                .map(|r| r.is_ok()),
            Some(true)
        );
    }
}
