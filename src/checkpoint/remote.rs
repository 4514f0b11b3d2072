//! The checkpoint folder in its object store: get/put/delete/list of the objects under
//! `<url>/step-NNNNNNNNN/`, each through the folder's [`Location`], retried by the
//! [`RetryPolicy`] and reported against the step folder's URL.

use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;

use super::layout::{parse_step_dir, step_dir_name, COMMIT_FILE};
use super::retry::RetryPolicy;
use crate::error::Result;
use crate::storage::Location;

/// One step folder found in the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepFolder {
    pub step: u64,
    pub committed: bool,
}

pub(crate) struct Remote {
    root: Location,
    retry: RetryPolicy,
    transient_failures: AtomicU64,
}

impl Remote {
    pub fn new(root: Location, retry: RetryPolicy) -> Self {
        Self {
            root,
            retry,
            transient_failures: AtomicU64::new(0),
        }
    }

    /// The checkpoint folder's URL, without a trailing `/`.
    pub fn url(&self) -> &str {
        self.root.url()
    }

    pub fn transient_failures(&self) -> u64 {
        self.transient_failures.load(Ordering::Relaxed)
    }

    pub fn step_url(&self, step: u64) -> String {
        self.step_folder(step).url().to_string()
    }

    fn step_folder(&self, step: u64) -> Location {
        self.root
            .join(&step_dir_name(step))
            .expect("a step folder's name is one plain path segment")
    }

    /// `file` of the step folder; file names are checked before a save and before a load uses
    /// them, so this fails only for names that never reach it.
    fn object(&self, step: u64, file: &str) -> Result<Location> {
        self.step_folder(step).join(file)
    }

    pub fn put(&self, step: u64, file: &str, bytes: Bytes) -> Result<()> {
        let object = self.object(step, file)?;
        self.retrying(step, &format!("writing `{file}`"), || {
            object.put(bytes.clone())
        })
    }

    /// The object's bytes, or `None` when it does not exist.
    pub fn get(&self, step: u64, file: &str) -> Result<Option<Bytes>> {
        let object = self.object(step, file)?;
        self.retrying(step, &format!("reading `{file}`"), || object.get())
    }

    pub fn exists(&self, step: u64, file: &str) -> Result<bool> {
        let object = self.object(step, file)?;
        self.retrying(step, &format!("looking for `{file}`"), || object.exists())
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
        let object = self.object(step, file)?;
        self.retrying(step, action, || object.delete().map(|_existed| ()))
    }

    /// Deletes a whole step folder, `COMMIT` first: a folder half deleted by a crash must not
    /// look like a checkpoint.
    pub fn delete_step(&self, step: u64) -> Result<()> {
        self.delete(step, COMMIT_FILE)?;
        let folder = self.step_folder(step);
        let listing = self.retrying(step, "listing the step folder", || folder.list())?;
        for file in listing.files {
            self.delete(step, &file)?;
        }
        folder.remove_empty_folder();
        Ok(())
    }

    /// Every step folder under the checkpoint URL, with whether it holds `COMMIT`, by step.
    pub fn step_folders(&self) -> Result<Vec<StepFolder>> {
        let listing = self.retrying_root("listing the step folders", || self.root.list())?;
        let mut steps: Vec<u64> = listing
            .folders
            .iter()
            .filter_map(|name| parse_step_dir(name))
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

    /// `file` directly in the checkpoint folder (beside the step folders), `None` when absent.
    pub fn get_root(&self, file: &str) -> Result<Option<Bytes>> {
        let object = self.root.join(file)?;
        self.retrying_root(&format!("reading `{file}`"), || object.get())
    }

    pub fn put_root(&self, file: &str, bytes: Bytes) -> Result<()> {
        let object = self.root.join(file)?;
        self.retrying_root(&format!("writing `{file}`"), || object.put(bytes.clone()))
    }

    /// Deletes `file` in the checkpoint folder; one already gone is not an error.
    pub fn delete_root(&self, file: &str) -> Result<()> {
        let object = self.root.join(file)?;
        self.retrying_root(&format!("deleting `{file}`"), || {
            object.delete().map(|_existed| ())
        })
    }

    fn retrying_root<T>(&self, action: &str, operation: impl FnMut() -> Result<T>) -> Result<T> {
        self.retry
            .run(&self.transient_failures, self.url(), action, operation)
    }

    fn retrying<T>(
        &self,
        step: u64,
        action: &str,
        operation: impl FnMut() -> Result<T>,
    ) -> Result<T> {
        self.retry.run(
            &self.transient_failures,
            &self.step_url(step),
            action,
            operation,
        )
    }
}
