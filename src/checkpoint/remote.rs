//! The checkpoint folder in its object store: blocking get/put/delete/list of the objects
//! under `<url>/`, each retried by the [`RetryPolicy`] and reported against the checkpoint URL.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

use super::layout::{parse_step_dir, step_dir_name, trim_trailing_slashes, COMMIT_FILE};
use super::retry::RetryPolicy;
use crate::error::Result;
use crate::storage::block_on;

/// One step folder found in the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepFolder {
    pub step: u64,
    pub committed: bool,
}

pub(crate) struct Remote {
    store: Arc<dyn ObjectStore>,
    root: Path,
    /// The checkpoint folder's URL without a trailing `/`, for messages.
    url: String,
    retry: RetryPolicy,
    transient_failures: AtomicU64,
}

impl Remote {
    pub fn new(store: Arc<dyn ObjectStore>, root: Path, url: &str, retry: RetryPolicy) -> Self {
        Self {
            store,
            root,
            url: trim_trailing_slashes(url).to_string(),
            retry,
            transient_failures: AtomicU64::new(0),
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn transient_failures(&self) -> u64 {
        self.transient_failures.load(Ordering::Relaxed)
    }

    pub fn step_url(&self, step: u64) -> String {
        let separator = if self.url.ends_with('/') { "" } else { "/" };
        format!("{}{separator}{}", self.url, step_dir_name(step))
    }

    pub fn object(&self, step: u64, file: &str) -> Path {
        self.step_path(step).join(file)
    }

    fn step_path(&self, step: u64) -> Path {
        self.root.clone().join(step_dir_name(step).as_str())
    }

    pub fn put(&self, step: u64, file: &str, bytes: Bytes) -> Result<()> {
        let location = self.object(step, file);
        self.retrying(step, &format!("writing `{file}`"), || {
            block_on(self.store.put(&location, PutPayload::from(bytes.clone()))).map(|_| ())
        })
    }

    /// The object's bytes, or `None` when it does not exist.
    pub fn get(&self, step: u64, file: &str) -> Result<Option<Bytes>> {
        let location = self.object(step, file);
        self.retrying(step, &format!("reading `{file}`"), || {
            block_on(async {
                match self.store.get(&location).await {
                    Ok(found) => found.bytes().await.map(Some),
                    Err(object_store::Error::NotFound { .. }) => Ok(None),
                    Err(other) => Err(other),
                }
            })
        })
    }

    pub fn exists(&self, step: u64, file: &str) -> Result<bool> {
        let location = self.object(step, file);
        self.retrying(step, &format!("looking for `{file}`"), || {
            match block_on(self.store.head(&location)) {
                Ok(_) => Ok(true),
                Err(object_store::Error::NotFound { .. }) => Ok(false),
                Err(other) => Err(other),
            }
        })
    }

    /// Deletes one object; one that is already gone is not an error.
    pub fn delete(&self, step: u64, file: &str) -> Result<()> {
        self.delete_as(step, file, &format!("deleting `{file}`"))
    }

    /// Deletes `COMMIT` before (re)writing a step folder; its own action name, because it is
    /// the first thing a save touches and so what a store that is down fails on.
    pub fn uncommit(&self, step: u64) -> Result<()> {
        self.delete_as(
            step,
            COMMIT_FILE,
            &format!("starting the save (clearing any earlier `{COMMIT_FILE}`)"),
        )
    }

    fn delete_as(&self, step: u64, file: &str, action: &str) -> Result<()> {
        let location = self.object(step, file);
        self.retrying(step, action, || {
            match block_on(self.store.delete(&location)) {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(other) => Err(other),
            }
        })
    }

    /// Deletes a whole step folder, `COMMIT` first: a folder half deleted by a crash must not
    /// look like a checkpoint.
    pub fn delete_step(&self, step: u64) -> Result<()> {
        self.delete(step, COMMIT_FILE)?;
        for file in self.files_of(step)? {
            self.delete(step, &file)?;
        }
        self.remove_empty_local_dir(step);
        Ok(())
    }

    /// The names of the objects directly inside a step folder.
    fn files_of(&self, step: u64) -> Result<Vec<String>> {
        let folder = self.step_path(step);
        let listing = self.retrying(step, "listing the step folder", || {
            block_on(self.store.list_with_delimiter(Some(&folder)))
        })?;
        Ok(listing
            .objects
            .iter()
            .filter_map(|object| object.location.filename().map(str::to_string))
            .collect())
    }

    /// The local file system keeps empty directories after their files are deleted; remove
    /// them so retention leaves no clutter. Best effort: a leftover empty folder is harmless.
    fn remove_empty_local_dir(&self, step: u64) {
        let Some(folder) = url::Url::parse(&self.step_url(step))
            .ok()
            .filter(|url| url.scheme() == "file")
            .and_then(|url| url.to_file_path().ok())
        else {
            return;
        };
        let _ = std::fs::remove_dir(folder);
    }

    /// Every step folder under the checkpoint URL, with whether it holds `COMMIT`, by step.
    pub fn step_folders(&self) -> Result<Vec<StepFolder>> {
        let prefix = (!self.root.as_ref().is_empty()).then_some(&self.root);
        let listing = self.retry.run(
            &self.transient_failures,
            &self.url,
            "listing the step folders",
            || block_on(self.store.list_with_delimiter(prefix)),
        )?;
        let mut steps: Vec<u64> = listing
            .common_prefixes
            .iter()
            .filter_map(|folder| folder.filename().and_then(parse_step_dir))
            .collect();
        steps.sort_unstable();
        steps
            .into_iter()
            .map(|step| {
                Ok(StepFolder {
                    step,
                    committed: self.exists(step, COMMIT_FILE)?,
                })
            })
            .collect()
    }

    fn retrying<T>(
        &self,
        step: u64,
        action: &str,
        operation: impl FnMut() -> object_store::Result<T>,
    ) -> Result<T> {
        self.retry.run(
            &self.transient_failures,
            &self.step_url(step),
            action,
            operation,
        )
    }
}
