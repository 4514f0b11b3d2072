//! `ditrun inspect`: what a job file, a checkpoint or a shard folder holds, as JSON.

use std::path::Path;

use serde_json::{json, Value};

use crate::data::shards::{read_index_at, INDEX_FILE};
use crate::error::{Error, Result};
use crate::storage::Location;

pub fn inspect(target: &str) -> Result<Value> {
    let path = Path::new(target);
    let is_yaml = matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml")
    );
    if is_yaml && path.is_file() {
        let job = crate::config::load_job(Some(path), &[])?;
        return Ok(json!({
            "kind": "job",
            "file": target,
            "hash": job.hash(),
            "effective": serde_json::to_value(&job).expect("a job serialises"),
        }));
    }
    let location = Location::parse(target)?;
    if location.join(INDEX_FILE)?.exists()? {
        let index = read_index_at(&location)?;
        return Ok(json!({ "kind": "shards", "url": location.url(), "index": index }));
    }
    match crate::checkpoint::load_location(&location) {
        Ok(checkpoint) => Ok(json!({
            "kind": "checkpoint",
            "url": checkpoint.url,
            "state": checkpoint.state,
            "files": checkpoint.files.iter().map(|(name, bytes)| (name.clone(), json!(bytes.len()))).collect::<serde_json::Map<_, _>>(),
        })),
        Err(error) => Err(Error::Config(format!(
            "`{target}` is neither a job file (.yaml), a shard folder (no index.json) nor a \
             checkpoint: {error}"
        ))),
    }
}
