//! One evaluation of a model: images drawn for the dataset's captions, their FID against the
//! dataset's statistics and their CLIP score, with the work split over the ranks.
//!
//! Invariants:
//! - Sample `i` of an evaluation has caption `captions[i mod len]` (balanced over the
//!   dataset's distinct captions) and its own noise seed, derived from (seed, i) alone
//!   ([`flow::generate_per_seed`]): the set of images does not depend on the number of ranks
//!   or the batch size. Rank r draws samples r, r + W, ...; the features' statistics are merged
//!   over ranks (`fid::FeatureAccumulator::merge`), so two ranks give one rank's FID up to
//!   rounding.
//! - A dataset's reference statistics are computed once and stored beside its shards as
//!   `fid-stats.safetensors`, keyed by the sha256 of its `index.json`, of the Inception weights
//!   and the number of real images used; a file that does not match is recomputed.
//! - With per-caption FID on, the same is done per caption: the reference statistics of each
//!   caption are stored under `fid-stats-per-caption/` (its `index.json`, written last, lists
//!   them under the same keys), and each rank's features go to rank 0 labelled by caption.
//!   A caption with fewer than two images on either side gets no FID.
//! - Every rank calls the same collectives in the same order; only rank 0 gets a report.

use std::collections::BTreeMap;
use std::time::Instant;

use burn::prelude::*;
use sha2::{Digest, Sha256};

use super::clip_vision::{ClipScoreConfig, ClipScorer};
use super::fid::{
    frechet_distance, stats_from_bytes, stats_to_bytes, FeatureAccumulator, FeatureStats,
    STATS_FILE_NAME,
};
use super::inception::{FidInception, FEATURES};
use crate::data::shards::{read_index_and_bytes_at, read_shard_at, Sample, ShardIndex};
use crate::dist::Collective;
use crate::error::{Error, Result};
use crate::flow::{generate_per_seed, CaptionContexts, SampleOptions, Sampler};
use crate::model::weights::SafetensorsFile;
use crate::model::TextConditionalDiT;
use crate::storage::Location;

const INDEX_KEY: &str = "dataset_index_sha256";
const INCEPTION_KEY: &str = "inception_sha256";
const REFERENCE_SAMPLES_KEY: &str = "reference_samples";

/// What one evaluation draws.
#[derive(Clone, Debug)]
pub struct EvalPlan {
    pub samples: usize,
    pub cfg: f64,
    pub steps: usize,
    pub seed: u64,
}

/// What rank 0 reports: FID, CLIP score (mean and per caption) and the time it took.
#[derive(Clone, Debug, serde::Serialize)]
pub struct EvalReport {
    pub samples: usize,
    pub cfg: f64,
    pub steps: usize,
    pub seed: u64,
    pub fid: f64,
    /// Images of the dataset behind its reference statistics.
    pub reference_images: u64,
    pub clip_score: Option<f64>,
    pub clip_score_per_caption: BTreeMap<String, f64>,
    /// FID of each caption's samples against that caption's real images (`per_caption_fid`).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub fid_per_caption: BTreeMap<String, f64>,
    pub secs: f64,
}

/// Where the dataset is and how its statistics are made.
#[derive(Clone, Debug)]
pub struct EvalSetup<'a> {
    /// The dataset's shards (path or URL); its statistics are stored beside them.
    pub shards: &'a str,
    /// The FID Inception's weights, any weights location.
    pub inception_weights: &'a str,
    /// Real images behind the statistics; 0 = all.
    pub reference_samples: usize,
    /// Images per forward pass of the Inception.
    pub batch_size: usize,
    /// Also FID per caption (reference statistics per caption, stored beside the shards).
    pub per_caption_fid: bool,
}

/// The networks and the dataset's statistics, loaded once for many evaluations.
pub struct Evaluator<B: Backend> {
    features: FeatureExtractor<B>,
    clip: Option<ClipScorer<B>>,
    reference: Reference,
    captions: Vec<String>,
    per_caption_fid: bool,
}

/// The dataset's statistics: overall on every rank, per caption (index into the captions) on
/// rank 0 when per-caption FID is on.
struct Reference {
    overall: FeatureStats,
    per_caption: Vec<Option<FeatureStats>>,
}

/// The Inception with the batch size and device it runs at.
struct FeatureExtractor<B: Backend> {
    inception: FidInception<B>,
    batch_size: usize,
    device: B::Device,
}

impl<B: Backend> FeatureExtractor<B> {
    /// pool3 features of images in [0, 1], row after row.
    fn of_tensor(&self, images: Tensor<B, 4>) -> Vec<f32> {
        self.inception
            .features(images)
            .into_data()
            .convert::<f32>()
            .into_vec()
            .expect("f32 features")
    }

    /// pool3 features of one batch of 8-bit images (channels last, as shards hold them).
    fn of_images(&self, images: &[&[u8]], size: usize, channels: usize) -> Vec<f32> {
        self.of_tensor(images_from_bytes::<B>(images, size, channels, &self.device))
    }

    /// Adds the features of 8-bit images, batch by batch, to `into`.
    fn add_images(
        &self,
        images: &[&[u8]],
        size: usize,
        channels: usize,
        into: &mut FeatureAccumulator,
    ) -> Result<()> {
        for batch in images.chunks(self.batch_size) {
            into.add_rows(&self.of_images(batch, size, channels))?;
        }
        Ok(())
    }
}

impl<B: Backend> Evaluator<B> {
    /// Loads the Inception (and CLIP, when `clip` is given) and the dataset's reference
    /// statistics from `<shards>/fid-stats.safetensors`, computing and storing them first when
    /// that file is missing or was made from other data or weights (every rank takes its share
    /// of the images; rank 0 writes the file).
    pub fn open(
        setup: &EvalSetup<'_>,
        clip: Option<ClipScorer<B>>,
        collective: &dyn Collective,
        device: &B::Device,
    ) -> Result<Self> {
        let inception_path = crate::storage::resolve_weights(setup.inception_weights)?;
        let inception_sha256 = crate::storage::weights::digest_file::<Sha256>(&inception_path)?;
        let features = FeatureExtractor {
            inception: FidInception::<B>::load(&inception_path.display().to_string(), device)?,
            batch_size: setup.batch_size,
            device: device.clone(),
        };
        let prefix = Location::parse(setup.shards)?;
        let (index, index_bytes) = read_index_and_bytes_at(&prefix)?;
        let keys = ReferenceKeys {
            index_sha256: hex::encode(Sha256::digest(&index_bytes)),
            inception_sha256,
            reference_samples: setup.reference_samples.to_string(),
        };
        let reference = reference_stats(&features, &prefix, &index, &keys, setup, collective)?;
        Ok(Self {
            features,
            clip,
            reference,
            captions: index.captions,
            per_caption_fid: setup.per_caption_fid,
        })
    }

    /// Draws `plan.samples` images with `model` (this rank's share), and on rank 0 returns
    /// their FID and CLIP score.
    pub fn evaluate<C: CaptionContexts>(
        &self,
        model: &TextConditionalDiT<B>,
        contexts: &mut C,
        plan: &EvalPlan,
        collective: &dyn Collective,
    ) -> Result<Option<EvalReport>> {
        let started = Instant::now();
        let options = SampleOptions {
            cfg: plan.cfg,
            steps: plan.steps,
            sampler: Sampler::Euler,
            per_prompt: 1,
            seed: plan.seed,
        };
        let mine: Vec<usize> = (collective.rank()..plan.samples)
            .step_by(collective.world_size())
            .collect();
        let mut features = FeatureAccumulator::new(FEATURES);
        let mut labelled = CaptionRows::default();
        let mut clip_sums = vec![0.0f64; 2 * self.captions.len()];
        for batch in mine.chunks(self.features.batch_size) {
            let captions: Vec<&str> = batch.iter().map(|&i| self.caption_of(i)).collect();
            let seeds: Vec<u64> = batch.iter().map(|&i| sample_seed(plan.seed, i)).collect();
            let images = generate_per_seed(model, contexts, &captions, &seeds, &options);
            if let Some(clip) = &self.clip {
                for (&i, score) in batch.iter().zip(clip.clip_score(images.clone(), &captions)) {
                    let caption = i % self.captions.len();
                    clip_sums[2 * caption] += score as f64;
                    clip_sums[2 * caption + 1] += 1.0;
                }
            }
            let rows = self.features.of_tensor(images);
            features.add_rows(&rows)?;
            if self.per_caption_fid {
                labelled.add(batch.iter().map(|&i| i % self.captions.len()), &rows);
            }
        }
        let stats = merged_over_ranks(features, collective, "FID features of the samples")?;
        let clip_sums = summed_over_ranks(&clip_sums, collective)?;
        let per_caption = if self.per_caption_fid {
            let what = "FID features of the samples by caption";
            per_caption_over_ranks(labelled, self.captions.len(), collective, what)?
        } else {
            None
        };
        if collective.rank() != 0 {
            return Ok(None);
        }
        let fid = frechet_distance(&stats, &self.reference.overall)?;
        let fid_per_caption = per_caption
            .map(|samples| self.fid_per_caption(&samples))
            .transpose()?
            .unwrap_or_default();
        let per_caption: BTreeMap<String, f64> = self
            .captions
            .iter()
            .enumerate()
            .filter(|(c, _)| clip_sums[2 * c + 1] > 0.0)
            .map(|(c, caption)| (caption.clone(), clip_sums[2 * c] / clip_sums[2 * c + 1]))
            .collect();
        let (total, count) = clip_sums
            .chunks(2)
            .fold((0.0, 0.0), |(t, n), pair| (t + pair[0], n + pair[1]));
        Ok(Some(EvalReport {
            samples: plan.samples,
            cfg: plan.cfg,
            steps: plan.steps,
            seed: plan.seed,
            fid,
            reference_images: self.reference.overall.count(),
            clip_score: (self.clip.is_some() && count > 0.0).then(|| total / count),
            clip_score_per_caption: per_caption,
            fid_per_caption,
            secs: started.elapsed().as_secs_f64(),
        }))
    }

    /// FID of real images (`[N, C, H, W]` 8-bit, channels last, as shards hold them) against
    /// the reference: how far another split, or noise, is from the dataset.
    pub fn fid_of_images(&self, images: &[&[u8]], size: usize, channels: usize) -> Result<f64> {
        let mut features = FeatureAccumulator::new(FEATURES);
        self.features
            .add_images(images, size, channels, &mut features)?;
        frechet_distance(&features.finish()?, &self.reference.overall)
    }

    /// Images behind the dataset's reference statistics.
    pub fn reference_images(&self) -> u64 {
        self.reference.overall.count()
    }

    /// Each caption's FID, for the captions with statistics on both sides.
    fn fid_per_caption(&self, samples: &[Option<FeatureStats>]) -> Result<BTreeMap<String, f64>> {
        let mut fids = BTreeMap::new();
        for (c, (sample, real)) in samples.iter().zip(&self.reference.per_caption).enumerate() {
            if let (Some(sample), Some(real)) = (sample, real) {
                fids.insert(self.captions[c].clone(), frechet_distance(sample, real)?);
            }
        }
        Ok(fids)
    }

    fn caption_of(&self, sample: usize) -> &str {
        &self.captions[sample % self.captions.len()]
    }
}

/// The dataset's statistics: stored ones when their keys match (and, with per-caption FID,
/// every caption's too), else computed (every rank takes its share of the images) and stored
/// by rank 0.
fn reference_stats<B: Backend>(
    features: &FeatureExtractor<B>,
    prefix: &Location,
    index: &ShardIndex,
    keys: &ReferenceKeys,
    setup: &EvalSetup<'_>,
    collective: &dyn Collective,
) -> Result<Reference> {
    let file = prefix.join(STATS_FILE_NAME)?;
    let expected = keys.entries();
    // Rank 0 decides for everyone whether the stored files serve, so that no rank computes
    // alone while the others wait.
    let mut stored = Vec::new();
    let mut parsed = None;
    let mut stored_per_caption = None;
    if collective.rank() == 0 {
        if let Some(bytes) = file.get()? {
            match stats_from_bytes(file.url(), &bytes, &expected) {
                Ok(read) => {
                    stored = bytes.to_vec();
                    parsed = Some(read.stats);
                }
                Err(mismatch) => {
                    tracing::warn!("{mismatch}: computing the dataset's FID statistics again")
                }
            }
        }
        if setup.per_caption_fid && parsed.is_some() {
            stored_per_caption = load_per_caption(prefix, index, &expected)?;
            if stored_per_caption.is_none() {
                stored.clear();
                parsed = None;
            }
        }
    }
    let stored = collective.broadcast(0, stored, "stored FID statistics")?;
    if !stored.is_empty() {
        // Rank 0 parsed the file already; the others read the bytes it sent.
        let overall = match parsed {
            Some(stats) => stats,
            None => stats_from_bytes(file.url(), &stored, &expected)?.stats,
        };
        return Ok(Reference {
            overall,
            per_caption: stored_per_caption.unwrap_or_default(),
        });
    }
    let started = Instant::now();
    let caption_numbers: BTreeMap<&str, usize> = index
        .captions
        .iter()
        .enumerate()
        .map(|(n, caption)| (caption.as_str(), n))
        .collect();
    let limit = setup.reference_samples;
    let mut mine = FeatureAccumulator::new(FEATURES);
    let mut labelled = CaptionRows::default();
    let mut seen = 0usize;
    for shard in 0..index.shards.len() {
        if limit > 0 && seen >= limit {
            break;
        }
        let samples = read_shard_at(prefix, index, shard)?;
        let wanted: Vec<&Sample> = samples
            .iter()
            .enumerate()
            .map(|(i, sample)| (seen + i, sample))
            .filter(|(n, _)| limit == 0 || *n < limit)
            .filter(|(n, _)| n % collective.world_size() == collective.rank())
            .map(|(_, sample)| sample)
            .collect();
        seen += samples.len();
        for batch in wanted.chunks(features.batch_size) {
            let pixels: Vec<&[u8]> = batch.iter().map(|s| s.pixels.as_slice()).collect();
            let rows = features.of_images(&pixels, index.image_size, index.channels);
            mine.add_rows(&rows)?;
            if setup.per_caption_fid {
                // A caption the index does not list is counted overall only.
                let numbers = batch
                    .iter()
                    .map(|s| caption_numbers.get(s.caption.as_str()).copied());
                labelled.add_known(numbers, &rows);
            }
        }
    }
    let stats = merged_over_ranks(mine, collective, "FID reference features")?;
    let per_caption = if setup.per_caption_fid {
        let what = "FID reference features by caption";
        per_caption_over_ranks(labelled, index.captions.len(), collective, what)?
    } else {
        None
    };
    tracing::info!(
        images = stats.count(),
        secs = started.elapsed().as_secs_f64(),
        file = file.url(),
        "computed the dataset's FID statistics"
    );
    if collective.rank() == 0 {
        if let Some(per_caption) = &per_caption {
            store_per_caption(prefix, index, &expected, per_caption)?;
        }
        file.put(stats_to_bytes(&stats, &expected)?)?;
    }
    Ok(Reference {
        overall: stats,
        per_caption: per_caption.unwrap_or_default(),
    })
}

/// The folder of per-caption statistics beside the shards.
const PER_CAPTION_DIR: &str = "fid-stats-per-caption";

/// What `fid-stats-per-caption/index.json` holds: the keys of the statistics and, per caption
/// with statistics, its number and file.
#[derive(serde::Serialize, serde::Deserialize, PartialEq)]
struct PerCaptionIndex {
    keys: BTreeMap<String, String>,
    captions: Vec<(usize, String, String)>,
}

fn per_caption_index(expected: &[(&str, &str)]) -> BTreeMap<String, String> {
    expected
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Writes each caption's statistics, then the folder's `index.json` (last, so a partial write
/// is never taken for a complete one).
fn store_per_caption(
    prefix: &Location,
    index: &ShardIndex,
    expected: &[(&str, &str)],
    per_caption: &[Option<FeatureStats>],
) -> Result<()> {
    let folder = prefix.join(PER_CAPTION_DIR)?;
    let mut listed = Vec::new();
    for (n, stats) in per_caption.iter().enumerate() {
        let Some(stats) = stats else { continue };
        let name = format!("caption-{n:04}.safetensors");
        let caption = index.captions[n].as_str();
        let mut metadata = expected.to_vec();
        metadata.push(("caption", caption));
        folder.join(&name)?.put(stats_to_bytes(stats, &metadata)?)?;
        listed.push((n, caption.to_string(), name));
    }
    let record = PerCaptionIndex {
        keys: per_caption_index(expected),
        captions: listed,
    };
    let json = serde_json::to_vec_pretty(&record).expect("strings and numbers serialise");
    folder.join("index.json")?.put(bytes::Bytes::from(json))
}

/// Every caption's stored statistics, or `None` when they are missing or were made from other
/// data or weights.
fn load_per_caption(
    prefix: &Location,
    index: &ShardIndex,
    expected: &[(&str, &str)],
) -> Result<Option<Vec<Option<FeatureStats>>>> {
    let folder = prefix.join(PER_CAPTION_DIR)?;
    let index_file = folder.join("index.json")?;
    let Some(bytes) = index_file.get()? else {
        return Ok(None);
    };
    let record: PerCaptionIndex = match serde_json::from_slice(&bytes) {
        Ok(record) => record,
        Err(e) => {
            tracing::warn!(
                "{}: {e}: computing the statistics per caption again",
                index_file.url()
            );
            return Ok(None);
        }
    };
    if record.keys != per_caption_index(expected) {
        tracing::warn!(
            "{}: made from other data or weights: computing the statistics per caption again",
            index_file.url()
        );
        return Ok(None);
    }
    let mut per_caption = vec![None; index.captions.len()];
    for (n, caption, name) in &record.captions {
        if index.captions.get(*n) != Some(caption) {
            return Ok(None);
        }
        let file = folder.join(name)?;
        let Some(bytes) = file.get()? else {
            return Ok(None);
        };
        let mut metadata = expected.to_vec();
        metadata.push(("caption", caption.as_str()));
        per_caption[*n] = Some(stats_from_bytes(file.url(), &bytes, &metadata)?.stats);
    }
    Ok(Some(per_caption))
}

/// Feature rows labelled by their caption's number, gathered to rank 0 for statistics per
/// caption: 8 KB per image, where an accumulator per caption would be 32 MB each.
#[derive(Default)]
struct CaptionRows {
    captions: Vec<u32>,
    rows: Vec<f32>,
}

impl CaptionRows {
    fn add(&mut self, captions: impl IntoIterator<Item = usize>, rows: &[f32]) {
        self.add_known(captions.into_iter().map(Some), rows);
    }

    /// Adds the rows whose caption is known.
    fn add_known(&mut self, captions: impl IntoIterator<Item = Option<usize>>, rows: &[f32]) {
        for (caption, row) in captions.into_iter().zip(rows.chunks_exact(FEATURES)) {
            if let Some(caption) = caption {
                self.captions.push(caption as u32);
                self.rows.extend_from_slice(row);
            }
        }
    }

    fn to_bytes(&self) -> Vec<u8> {
        let mut bytes = (self.captions.len() as u64).to_le_bytes().to_vec();
        bytes.extend(self.captions.iter().flat_map(|c| c.to_le_bytes()));
        bytes.extend(self.rows.iter().flat_map(|v| v.to_le_bytes()));
        bytes
    }

    fn from_bytes(what: &str, bytes: &[u8]) -> Result<Self> {
        let malformed = || Error::FidStats {
            what: what.to_string(),
            reason: format!("{} bytes are not labelled feature rows", bytes.len()),
        };
        let (count, rest) = bytes.split_first_chunk::<8>().ok_or_else(malformed)?;
        let count = u64::from_le_bytes(*count) as usize;
        if rest.len() != count * 4 * (1 + FEATURES) {
            return Err(malformed());
        }
        let (labels, values) = rest.split_at(count * 4);
        let word = |b: &[u8]| <[u8; 4]>::try_from(b).expect("4-byte chunks");
        Ok(Self {
            captions: labels
                .chunks_exact(4)
                .map(|b| u32::from_le_bytes(word(b)))
                .collect(),
            rows: values
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(word(b)))
                .collect(),
        })
    }
}

/// On rank 0, each caption's statistics from every rank's rows (`None` for a caption with
/// fewer than two); `None` on the other ranks.
fn per_caption_over_ranks(
    mine: CaptionRows,
    captions: usize,
    collective: &dyn Collective,
    what: &str,
) -> Result<Option<Vec<Option<FeatureStats>>>> {
    let all = if collective.world_size() == 1 {
        vec![mine]
    } else {
        let gathered = collective.all_gather(&mine.to_bytes(), what)?;
        if collective.rank() != 0 {
            return Ok(None);
        }
        gathered
            .iter()
            .enumerate()
            .map(|(rank, bytes)| CaptionRows::from_bytes(&format!("rank {rank}'s {what}"), bytes))
            .collect::<Result<_>>()?
    };
    let mut accumulators: Vec<FeatureAccumulator> = (0..captions)
        .map(|_| FeatureAccumulator::new(FEATURES))
        .collect();
    for part in &all {
        for (&caption, row) in part.captions.iter().zip(part.rows.chunks_exact(FEATURES)) {
            let accumulator =
                accumulators
                    .get_mut(caption as usize)
                    .ok_or_else(|| Error::FidStats {
                        what: what.to_string(),
                        reason: format!("caption number {caption} of {captions}"),
                    })?;
            accumulator.add_rows(row)?;
        }
    }
    Ok(Some(
        accumulators
            .iter()
            .map(|a| (a.count() >= 2).then(|| a.finish()).transpose())
            .collect::<Result<_>>()?,
    ))
}

struct ReferenceKeys {
    index_sha256: String,
    inception_sha256: String,
    reference_samples: String,
}

impl ReferenceKeys {
    fn entries(&self) -> Vec<(&str, &str)> {
        vec![
            (INDEX_KEY, self.index_sha256.as_str()),
            (INCEPTION_KEY, self.inception_sha256.as_str()),
            (REFERENCE_SAMPLES_KEY, self.reference_samples.as_str()),
        ]
    }
}

/// The noise seed of sample `i` of an evaluation seeded `seed` (splitmix64 of both).
fn sample_seed(seed: u64, sample: usize) -> u64 {
    let mut z = seed ^ (sample as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// 8-bit images, channels last, as a `[N, C, H, W]` tensor in [0, 1].
pub fn images_from_bytes<B: Backend>(
    images: &[&[u8]],
    size: usize,
    channels: usize,
    device: &B::Device,
) -> Tensor<B, 4> {
    let mut values = vec![0f32; images.len() * channels * size * size];
    for (n, image) in images.iter().enumerate() {
        for p in 0..size * size {
            for c in 0..channels {
                values[((n * channels + c) * size * size) + p] =
                    image[p * channels + c] as f32 / 255.0;
            }
        }
    }
    Tensor::from_data(
        TensorData::new(values, [images.len(), channels, size, size]),
        device,
    )
}

/// Every rank's accumulator merged (each rank's bytes have the same size for one dimension).
fn merged_over_ranks(
    mine: FeatureAccumulator,
    collective: &dyn Collective,
    what: &str,
) -> Result<FeatureStats> {
    if collective.world_size() == 1 {
        return mine.finish();
    }
    let all = collective.all_gather(&mine.to_bytes()?, what)?;
    let mut merged = FeatureAccumulator::new(mine.dim());
    for (rank, bytes) in all.iter().enumerate() {
        merged.merge(FeatureAccumulator::from_bytes(
            &format!("rank {rank}'s {what}"),
            bytes,
        )?)?;
    }
    merged.finish()
}

fn summed_over_ranks(values: &[f64], collective: &dyn Collective) -> Result<Vec<f64>> {
    if collective.world_size() == 1 {
        return Ok(values.to_vec());
    }
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let all = collective.all_gather(&bytes, "CLIP score sums")?;
    let mut sums = vec![0.0; values.len()];
    for rank_bytes in all {
        for (sum, chunk) in sums.iter_mut().zip(rank_bytes.chunks_exact(8)) {
            *sum += f64::from_le_bytes(chunk.try_into().expect("8 bytes"));
        }
    }
    Ok(sums)
}

/// CLIP for the score, from `weights` (`None`: no score). A Hugging Face `config.json` beside
/// a local weights file gives the sizes; without one they are openai/clip-vit-base-patch32's.
pub fn clip_scorer<B: Backend>(
    weights: Option<&str>,
    device: &B::Device,
) -> Result<Option<ClipScorer<B>>> {
    let Some(weights) = weights else {
        return Ok(None);
    };
    let path = crate::storage::resolve_weights(weights)?;
    let config_path = path.with_file_name("config.json");
    let config = match std::fs::read_to_string(&config_path) {
        Ok(text) => {
            let json = serde_json::from_str(&text).map_err(|e| {
                Error::Config(format!(
                    "{}: not a Hugging Face CLIP config: {e}",
                    config_path.display()
                ))
            })?;
            ClipScoreConfig::from_hf_json(&json)
        }
        Err(_) => ClipScoreConfig::default(),
    };
    let file = SafetensorsFile::read(&path)?;
    ClipScorer::from_file(&file, &config, device).map(Some)
}
