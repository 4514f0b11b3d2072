//! `ditrun prepare`: turns a dataset (synthetic, CIFAR-10, Fashion-MNIST) into caption shards
//! under any storage URL. Sits above the dataset readers: they know nothing of `prepare` (the
//! [`Split`] they read is in `split`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::cifar10::{self, ArchiveSpec};
use super::fashion_mnist;
use super::shards::{Sample, ShardIndex, ShardWriter};
use super::split::Split;
use super::synthetic::synthetic;
use crate::error::{Error, Result};

pub const DEFAULT_SAMPLES_PER_SHARD: usize = 1000;
pub const DEFAULT_SYNTHETIC_IMAGE_SIZE: usize = 32;
pub const DEFAULT_SYNTHETIC_CHANNELS: usize = 3;
pub const DEFAULT_SYNTHETIC_TRAIN_SAMPLES: usize = 10_000;
pub const DEFAULT_SYNTHETIC_TEST_SAMPLES: usize = 1_000;
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[value(rename_all = "kebab-case")]
pub enum DatasetKind {
    Synthetic,
    Cifar10,
    FashionMnist,
}

impl DatasetKind {
    pub fn name(self) -> &'static str {
        match self {
            DatasetKind::Synthetic => "synthetic",
            DatasetKind::Cifar10 => "cifar10",
            DatasetKind::FashionMnist => "fashion-mnist",
        }
    }
}

impl std::fmt::Display for DatasetKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Everything `prepare` can be told; [`PrepareOptions::new`] fills in the defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct PrepareOptions {
    pub kind: DatasetKind,
    /// Storage URL or local path of the folder that receives the shards and `index.json`.
    pub out: String,
    /// CIFAR-10: archive path or URL (default: download). Fashion-MNIST: IDX folder (default
    /// [`fashion_mnist::DEFAULT_DIR`]). Synthetic: unused.
    pub source: Option<String>,
    pub split: Split,
    /// At most this many samples (the first ones); all of them by default, and for synthetic
    /// data 10,000 (train) or 1,000 (test).
    pub samples: Option<usize>,
    pub samples_per_shard: usize,
    /// Synthetic only (CIFAR-10 and Fashion-MNIST are 32): image side in pixels.
    pub image_size: Option<usize>,
    /// Synthetic only: 1 to 4 channels (default 3).
    pub channels: Option<usize>,
    /// Synthetic only: the train split uses `seed`, the test split a different stream.
    pub seed: u64,
    /// CIFAR-10: which archive to expect.
    pub archive: ArchiveSpec,
    /// CIFAR-10: where downloads are cached.
    pub cache_dir: PathBuf,
}

impl PrepareOptions {
    pub fn new(kind: DatasetKind, out: &str) -> Self {
        Self {
            kind,
            out: out.to_string(),
            source: None,
            split: Split::Train,
            samples: None,
            samples_per_shard: DEFAULT_SAMPLES_PER_SHARD,
            image_size: None,
            channels: None,
            seed: 0,
            archive: ArchiveSpec::official(),
            cache_dir: crate::storage::cache_dir().join("datasets"),
        }
    }
}

/// Writes `kind`'s `split` as shards under `out_url` and returns the index written last.
/// `image_size` and `seed` matter for synthetic data only (CIFAR-10 and Fashion-MNIST are
/// 32×32; asking for another size is an error).
#[allow(clippy::too_many_arguments)]
pub fn prepare(
    kind: DatasetKind,
    out_url: &str,
    source: Option<&str>,
    split: Split,
    samples: Option<usize>,
    samples_per_shard: usize,
    image_size: Option<usize>,
    seed: u64,
) -> Result<ShardIndex> {
    prepare_with(&PrepareOptions {
        source: source.map(str::to_string),
        split,
        samples,
        samples_per_shard,
        image_size,
        seed,
        ..PrepareOptions::new(kind, out_url)
    })
}

/// [`prepare`] with every option.
pub fn prepare_with(options: &PrepareOptions) -> Result<ShardIndex> {
    check_options(options)?;
    let out = crate::storage::location_url(&options.out)?;
    let dataset = format!("{}/{}", options.kind, options.split);
    let (samples, image_size, channels) = open_dataset(options)?;
    info!(
        dataset,
        out,
        samples = ?options.samples,
        samples_per_shard = options.samples_per_shard,
        "preparing shards"
    );
    let mut writer = ShardWriter::new(
        &out,
        &dataset,
        image_size,
        channels,
        options.samples_per_shard,
    )?;
    let started = Instant::now();
    let mut last_log = started;
    for (done, sample) in samples
        .take(options.samples.unwrap_or(usize::MAX))
        .enumerate()
    {
        writer.write(sample)?;
        if last_log.elapsed() >= PROGRESS_EVERY {
            last_log = Instant::now();
            info!(dataset, done = done + 1, "preparing shards");
        }
    }
    let index = writer.finish()?;
    if let Some(requested) = options.samples.filter(|&n| n > index.total_samples) {
        warn!(
            dataset,
            requested,
            available = index.total_samples,
            "the dataset has fewer samples than requested; wrote all of them"
        );
    }
    info!(
        dataset,
        out,
        samples = index.total_samples,
        shards = index.shards.len(),
        seconds = format_args!("{:.1}", started.elapsed().as_secs_f64()),
        "dataset prepared"
    );
    Ok(index)
}

fn check_options(options: &PrepareOptions) -> Result<()> {
    if options.samples_per_shard == 0 {
        return Err(Error::Config("samples per shard must be at least 1".into()));
    }
    if options.samples == Some(0) {
        return Err(Error::Config("samples must be at least 1".into()));
    }
    let fixed_size = options.kind != DatasetKind::Synthetic;
    if let Some(size) = options
        .image_size
        .filter(|&s| fixed_size && s != cifar10::IMAGE_SIZE)
    {
        return Err(Error::Config(format!(
            "{} images are 32×32; an image size of {size} is not supported",
            options.kind,
        )));
    }
    if fixed_size && options.channels.is_some() {
        return Err(Error::Config(format!(
            "{}: the number of channels is fixed by the dataset",
            options.kind
        )));
    }
    if options.image_size == Some(0) {
        return Err(Error::Config("image size must be at least 1".into()));
    }
    if let Some(channels) = options.channels.filter(|c| !(1..=4).contains(c)) {
        return Err(Error::Config(format!(
            "{channels} channels: expected 1 to 4"
        )));
    }
    if options.kind == DatasetKind::Synthetic && options.source.is_some() {
        warn!("synthetic data is generated; --source is ignored");
    }
    Ok(())
}

type Samples = Box<dyn Iterator<Item = Sample>>;

/// The dataset's samples, image size and channels.
fn open_dataset(options: &PrepareOptions) -> Result<(Samples, usize, usize)> {
    match options.kind {
        DatasetKind::Synthetic => {
            let size = options.image_size.unwrap_or(DEFAULT_SYNTHETIC_IMAGE_SIZE);
            let channels = options.channels.unwrap_or(DEFAULT_SYNTHETIC_CHANNELS);
            let count = options.samples.unwrap_or(match options.split {
                Split::Train => DEFAULT_SYNTHETIC_TRAIN_SAMPLES,
                Split::Test => DEFAULT_SYNTHETIC_TEST_SAMPLES,
            });
            // The test split must not repeat training images.
            let seed = match options.split {
                Split::Train => options.seed,
                Split::Test => options.seed ^ 0x7E57_7E57_7E57_7E57,
            };
            Ok((
                Box::new(synthetic(count, size, channels, seed)),
                size,
                channels,
            ))
        }
        DatasetKind::Cifar10 => {
            let archive = cifar10::locate_archive(
                options.source.as_deref(),
                &options.archive,
                &options.cache_dir,
            )?;
            let samples = cifar10::cifar10(&archive, options.split)?;
            Ok((Box::new(samples), cifar10::IMAGE_SIZE, cifar10::CHANNELS))
        }
        DatasetKind::FashionMnist => {
            let dir = fashion_mnist_dir(options.source.as_deref())?;
            let samples = fashion_mnist::fashion_mnist(&dir, options.split)?;
            Ok((
                Box::new(samples),
                fashion_mnist::IMAGE_SIZE,
                fashion_mnist::CHANNELS,
            ))
        }
    }
}

fn fashion_mnist_dir(source: Option<&str>) -> Result<PathBuf> {
    let Some(source) = source else {
        return Ok(PathBuf::from(fashion_mnist::DEFAULT_DIR));
    };
    if source.starts_with("file://") {
        return url::Url::parse(source)
            .ok()
            .and_then(|url| url.to_file_path().ok())
            .ok_or_else(|| Error::Config(format!("`{source}` is not a valid file:// URL")));
    }
    if source.contains("://") {
        return Err(Error::Config(format!(
            "Fashion-MNIST source `{source}`: expected a local folder holding the IDX files"
        )));
    }
    Ok(Path::new(source).to_path_buf())
}
