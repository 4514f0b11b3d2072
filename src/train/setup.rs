//! What a run sets up once, before its first step: the shards (prepared on first use by rank
//! 0), the text embedding cache, and the starting state (fresh, resumed, or rank 0's sent to
//! every rank).
//!
//! Invariants: every rank checks that all ranks hold the same effective config, the same
//! dataset index and the same starting parameters (sha256 compared across ranks) before the
//! first step; only rank 0 reads checkpoints and prepares shards, the others wait for it.

use std::sync::Arc;

use burn::optim::Optimizer;
use burn::tensor::backend::AutodiffBackend;
use sha2::{Digest, Sha256};

use crate::checkpoint::{CheckpointStore, LoadedCheckpoint};
use crate::config::JobSpec;
use crate::data::stream::{ObjectStoreShards, ShardSource};
use crate::data::{prepare_with, DatasetKind, PrepareOptions};
use crate::dist::{ensure_same_on_all_ranks, parameter_digest, Collective, World};
use crate::error::{Error, Result};
use crate::model::TextConditionalDiT;
use crate::storage::Location;
use crate::text::TextEmbeddingCache;
use crate::training_state::{
    restore_optimizer, snapshot_from_bytes, snapshot_to_bytes, with_path_ids, JobRecord,
    TrainingState, OPTIMIZER_FILE,
};

/// Where a run starts from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resume {
    /// The newest committed checkpoint with matching checksums under `checkpoint.url`, if any.
    Auto,
    /// From scratch, even when checkpoints exist.
    Never,
    /// This checkpoint (`<url>/step-000000123`, or a checkpoint folder for its latest).
    From(String),
}

impl std::str::FromStr for Resume {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        Ok(match s {
            "auto" => Resume::Auto,
            "never" => Resume::Never,
            url => Resume::From(url.to_string()),
        })
    }
}

/// The job's shards, prepared by rank 0 when missing, checked against the model's image size
/// and identical on every rank.
pub fn open_shards(
    job: &JobSpec,
    world: &World,
    collective: &dyn Collective,
) -> Result<Arc<ObjectStoreShards>> {
    let shards = Location::parse(&job.data.shards)?;
    let shards_url = shards.url().to_string();
    // One rank writes missing shards; the others wait for it instead of racing it.
    if world.is_primary() {
        prepare_if_missing(&shards, job)?;
    }
    collective.barrier("waiting for rank 0 to prepare the shards")?;
    let source = Arc::new(ObjectStoreShards::at(shards)?);
    check_data_fits_model(&shards_url, source.index(), job)?;
    let index_digest = hex::encode(Sha256::digest(
        serde_json::to_vec(source.index()).unwrap_or_default(),
    ));
    ensure_same_on_all_ranks(
        collective,
        &format!("dataset ({shards_url}/index.json, sha256)"),
        &index_digest,
    )?;
    Ok(source)
}

/// `data.prepare` makes a job self-contained (the quickstart): its shards are written on first
/// use, and an existing `index.json` (written last by the shard writer) means they are complete.
fn prepare_if_missing(shards: &Location, job: &JobSpec) -> Result<()> {
    let Some(spec) = &job.data.prepare else {
        return Ok(());
    };
    if shards.join("index.json")?.exists()? {
        return Ok(());
    }
    tracing::info!(dataset = ?spec.dataset, shards = shards.url(), "no shards yet: preparing them");
    let mut options = PrepareOptions::new(spec.dataset, shards.url());
    options.source = spec.source.clone();
    options.split = spec.split;
    options.samples = spec.samples;
    options.samples_per_shard = spec.samples_per_shard;
    options.image_size = Some(job.model.image_size);
    // Real datasets fix their channels (and `check_data_fits_model` compares them with the
    // model's); only generated data is drawn with the model's.
    if spec.dataset == DatasetKind::Synthetic {
        options.channels = Some(job.model.channels);
    }
    options.seed = job.train.seed;
    prepare_with(&options)?;
    Ok(())
}

fn check_data_fits_model(
    shards_url: &str,
    index: &crate::data::ShardIndex,
    job: &JobSpec,
) -> Result<()> {
    if index.image_size != job.model.image_size || index.channels != job.model.channels {
        return Err(Error::Config(format!(
            "{shards_url}/index.json holds {}×{} images with {} channel(s), but model.image_size \
             is {} and model.channels {}",
            index.image_size,
            index.image_size,
            index.channels,
            job.model.image_size,
            job.model.channels
        )));
    }
    Ok(())
}

/// The frozen encoder's embeddings of every caption of the dataset (and the empty caption).
/// The first rank of each node fills the weights' download cache; the node's other ranks then
/// read it instead of downloading the same file into the same place at once.
pub fn text_cache<AB: AutodiffBackend>(
    job: &JobSpec,
    captions: &[String],
    world: &World,
    collective: &dyn Collective,
    device: &AB::Device,
) -> Result<TextEmbeddingCache<AB::InnerBackend>> {
    let build = || -> Result<TextEmbeddingCache<AB::InnerBackend>> {
        // Seeded by `train.seed`, so that training and sampling draw the same random encoder.
        let encoder = &job.text_encoder;
        let mut cache = TextEmbeddingCache::<AB::InnerBackend>::load(
            encoder.weights.as_deref(),
            &encoder.config,
            job.train.seed,
            device,
        )?;
        cache.warm(captions.iter().map(String::as_str).chain([""]));
        Ok(cache)
    };
    if world.local_rank == 0 {
        let cache = build()?;
        collective.barrier("waiting for the text encoder weights")?;
        Ok(cache)
    } else {
        collective.barrier("waiting for the text encoder weights")?;
        build()
    }
}

/// Rank 0's checkpoint to resume from, if any (`None` on the other ranks).
pub fn checkpoint_to_resume(
    resume: &Resume,
    store: Option<&CheckpointStore>,
    world: &World,
    config_hash: &str,
) -> Result<Option<LoadedCheckpoint>> {
    if !world.is_primary() {
        return Ok(None);
    }
    let loaded = match (resume, store) {
        (Resume::Never, _) | (Resume::Auto, None) => None,
        (Resume::Auto, Some(store)) => store.latest_valid()?,
        (Resume::From(url), _) => Some(crate::checkpoint::load_url(url)?),
    };
    if let Some(checkpoint) = &loaded {
        if checkpoint.state.config_hash != config_hash {
            tracing::warn!(
                checkpoint = checkpoint.state.config_hash,
                now = config_hash,
                "resuming under a different effective config than the checkpoint was written with"
            );
        }
    }
    Ok(loaded)
}

/// The state the first step starts from, and the optimizer with its moments restored. On
/// several ranks rank 0's state (its checkpoint, or its fresh weights) is every rank's start,
/// so the ranks begin bit-identical whatever each one initialised or could read.
pub fn starting_state<AB: AutodiffBackend, O: Optimizer<TextConditionalDiT<AB>, AB>>(
    job: &JobSpec,
    loaded: Option<LoadedCheckpoint>,
    mut optimizer: O,
    world: &World,
    collective: &dyn Collective,
    device: &AB::Device,
) -> Result<(TrainingState<AB>, O)> {
    let fresh = crate::backend::seeded::<AB, _>(device, job.train.seed, || {
        job.model.init::<AB>(device).map(with_path_ids)
    })?;
    if !world.is_distributed() {
        return Ok(match &loaded {
            Some(checkpoint) => {
                let optimizer = restore_optimizer(optimizer, checkpoint, device)?;
                (TrainingState::restore(fresh, checkpoint)?, optimizer)
            }
            None => (TrainingState::start(fresh), optimizer),
        });
    }
    let snapshot = if world.is_primary() {
        let snapshot = match loaded {
            Some(checkpoint) => checkpoint,
            None => {
                let start = TrainingState::<AB>::start(fresh.clone());
                let (state, files) = TrainingState::pack(
                    &start.model,
                    &start.ema,
                    &optimizer,
                    0,
                    start.position,
                    &JobRecord::of(job),
                )?;
                LoadedCheckpoint {
                    url: "rank 0's initial weights".into(),
                    state,
                    files: files.into_iter().collect(),
                }
            }
        };
        snapshot_to_bytes(&snapshot)
    } else {
        Vec::new()
    };
    let snapshot =
        snapshot_from_bytes(&collective.broadcast(0, snapshot, "starting state from rank 0")?)?;
    optimizer = restore_optimizer(optimizer, &snapshot, device)?;
    let state = TrainingState::restore(fresh, &snapshot)?;
    // The optimizer's moments are compared too: ranks that started from different moments
    // would drift apart from the first step on.
    let optimizer_bytes = snapshot
        .files
        .get(OPTIMIZER_FILE)
        .map_or(&[][..], |bytes| &bytes[..]);
    let digest = format!(
        "{}{}{}",
        parameter_digest(&state.model),
        parameter_digest(&state.ema),
        hex::encode(Sha256::digest(optimizer_bytes))
    );
    let digest = hex::encode(Sha256::digest(digest.as_bytes()));
    ensure_same_on_all_ranks(
        collective,
        "starting state (sha256 of model, EMA and optimizer moments)",
        &digest,
    )?;
    Ok((state, optimizer))
}
