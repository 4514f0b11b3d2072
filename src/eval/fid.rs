//! FID maths: feature statistics (mean and sample covariance, in f64), the Fréchet distance
//! between two of them, and their storage as safetensors (a dataset's `fid-stats.safetensors`
//! beside its shards).
//!
//! Invariants:
//! - features are summed in f64 whatever their type. A [`FeatureAccumulator`] keeps the running
//!   mean and the centred scatter matrix Σ(x − mean)(x − mean)ᵀ, combined batch by batch with
//!   Chan, Golub and LeVeque's pairwise update: merging the accumulators of several ranks gives
//!   the one-pass statistics up to rounding, in any order, and a large common offset in the
//!   features does not cancel the covariance away as Σxxᵀ − n·mean·meanᵀ would;
//! - a [`FeatureStats`] holds `dim` finite means and a finite, exactly symmetric `dim × dim`
//!   sample covariance (divisor n − 1), so its row-major and column-major layouts coincide;
//! - [`frechet_distance`] equals pytorch-fid's `calculate_frechet_distance` for positive
//!   semi-definite covariances, singular ones included (fewer features than dimensions is the
//!   normal case), without a general matrix square root;
//! - a statistics file holds `mu` [dim] and `sigma` [dim, dim] as F64 and string metadata:
//!   `count` plus the keys its writer chose. A reader names the entries it expects and gets an
//!   error naming the file and the first key that does not match.

use std::collections::{BTreeMap, HashMap};

use nalgebra::{DMatrix, DVector};
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;

use crate::error::{Error, Result};
use crate::storage::Location;

/// A dataset's statistics file, stored beside its shards.
pub const STATS_FILE_NAME: &str = "fid-stats.safetensors";
/// Metadata key of the number of features behind the statistics; written by this module.
pub const COUNT_KEY: &str = "count";
/// Asymmetry tolerated in a covariance given from outside, relative to its largest entry:
/// rounding in whoever computed it, not a different matrix.
const SYMMETRY_TOLERANCE: f64 = 1e-9;

/// Running mean and centred scatter of feature rows, in f64; see the module invariants.
#[derive(Clone, Debug)]
pub struct FeatureAccumulator {
    dim: usize,
    count: u64,
    mean: DVector<f64>,
    /// Σ (x − mean)(x − mean)ᵀ over the rows seen.
    scatter: DMatrix<f64>,
}

impl FeatureAccumulator {
    /// An empty accumulator of `dim`-wide features. Panics if `dim` is 0.
    pub fn new(dim: usize) -> Self {
        assert!(dim > 0, "features need at least one dimension");
        Self {
            dim,
            count: 0,
            mean: DVector::zeros(dim),
            scatter: DMatrix::zeros(dim, dim),
        }
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Rows seen so far (merged ones included).
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Adds a batch of feature rows, row-major (`rows.len()` a multiple of `dim`).
    pub fn add_rows<T: Copy + Into<f64>>(&mut self, rows: &[T]) -> Result<()> {
        if !rows.len().is_multiple_of(self.dim) {
            return Err(Error::FidStats {
                what: "feature batch".into(),
                reason: format!(
                    "{} values are not whole rows of {} features",
                    rows.len(),
                    self.dim
                ),
            });
        }
        let count = rows.len() / self.dim;
        if count == 0 {
            return Ok(());
        }
        let mut batch = DMatrix::from_row_iterator(count, self.dim, rows.iter().map(|&v| v.into()));
        if let Some(position) = batch.iter().position(|v| !v.is_finite()) {
            // Column-major position: the row is the remainder.
            return Err(Error::FidStats {
                what: "feature batch".into(),
                reason: format!("row {} holds a non-finite feature", position % count),
            });
        }
        let mean = batch.row_mean().transpose();
        for (column, mut values) in batch.column_iter_mut().enumerate() {
            values.add_scalar_mut(-mean[column]);
        }
        let scatter = batch.transpose() * &batch;
        self.combine(count as u64, mean, scatter);
        Ok(())
    }

    /// Folds in another accumulator's rows (another rank's share) as if they had been added here.
    pub fn merge(&mut self, other: FeatureAccumulator) -> Result<()> {
        if other.dim != self.dim {
            return Err(Error::FidStats {
                what: "merge".into(),
                reason: format!("{} features cannot join {}", other.dim, self.dim),
            });
        }
        self.combine(other.count, other.mean, other.scatter);
        Ok(())
    }

    /// Chan et al.: the scatter of a union is the parts' scatters plus the spread of their
    /// means, `δδᵀ · n_a n_b / n`.
    fn combine(&mut self, count: u64, mean: DVector<f64>, scatter: DMatrix<f64>) {
        if count == 0 {
            return;
        }
        if self.count == 0 {
            (self.count, self.mean, self.scatter) = (count, mean, scatter);
            return;
        }
        let (mine, theirs) = (self.count as f64, count as f64);
        let total = mine + theirs;
        let delta = mean - &self.mean;
        self.mean.axpy(theirs / total, &delta, 1.0);
        self.scatter += scatter;
        self.scatter.ger(mine * theirs / total, &delta, &delta, 1.0);
        self.count += count;
    }

    /// Mean and sample covariance (n − 1) of every row seen; needs two rows at least.
    pub fn finish(&self) -> Result<FeatureStats> {
        if self.count < 2 {
            return Err(Error::FidStats {
                what: "accumulator".into(),
                reason: format!("{} feature rows, a covariance needs at least 2", self.count),
            });
        }
        let covariance = &self.scatter / (self.count - 1) as f64;
        FeatureStats::from_matrices(self.count, self.mean.clone(), covariance, "accumulator")
    }

    /// The running state as safetensors bytes (`mean`, `scatter`, metadata `count`), for
    /// gathering every rank's share before [`merge`](Self::merge).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let metadata = HashMap::from([(COUNT_KEY.to_string(), self.count.to_string())]);
        // Row-major on file; the scatter is symmetric only up to rounding, so lay it out truly.
        let scatter_rows = self.scatter.transpose();
        serialize_f64(
            &[
                ("mean", vec![self.dim], self.mean.as_slice()),
                ("scatter", vec![self.dim, self.dim], scatter_rows.as_slice()),
            ],
            metadata,
        )
    }

    /// Reads [`to_bytes`](Self::to_bytes)'s output; `name` says where it came from (a rank).
    pub fn from_bytes(name: &str, bytes: &[u8]) -> Result<Self> {
        let tensors = parse_safetensors(name, bytes)?;
        let metadata = read_metadata(name, bytes)?;
        let count = parse_count(name, &metadata)?;
        let (mean, scatter) = read_mean_and_square(name, &tensors, "mean", "scatter")?;
        Ok(Self {
            dim: mean.len(),
            count,
            mean,
            scatter,
        })
    }
}

/// Mean and sample covariance of a feature set; see the module invariants.
#[derive(Clone, Debug, PartialEq)]
pub struct FeatureStats {
    count: u64,
    mean: DVector<f64>,
    covariance: DMatrix<f64>,
}

impl FeatureStats {
    /// Statistics computed elsewhere (pytorch-fid's `.npz`, another tool): `covariance` is
    /// `dim × dim`, row-major, symmetric up to rounding.
    pub fn new(count: u64, mean: Vec<f64>, covariance: Vec<f64>) -> Result<Self> {
        let dim = mean.len();
        if covariance.len() != dim * dim {
            return Err(Error::FidStats {
                what: "given covariance".into(),
                reason: format!(
                    "{} values, expected {dim} × {dim} for {dim} means",
                    covariance.len()
                ),
            });
        }
        let covariance = DMatrix::from_row_slice(dim, dim, &covariance);
        Self::from_matrices(count, DVector::from_vec(mean), covariance, "given")
    }

    /// Checks the invariants and makes the covariance exactly symmetric.
    fn from_matrices(
        count: u64,
        mean: DVector<f64>,
        covariance: DMatrix<f64>,
        what: &str,
    ) -> Result<Self> {
        let invalid = |reason: String| Error::FidStats {
            what: what.to_string(),
            reason,
        };
        if mean.is_empty() {
            return Err(invalid("no features".into()));
        }
        if !mean.iter().chain(covariance.iter()).all(|v| v.is_finite()) {
            return Err(invalid("non-finite mean or covariance".into()));
        }
        let transposed = covariance.transpose();
        let asymmetry = (&covariance - &transposed).amax();
        if asymmetry > SYMMETRY_TOLERANCE * covariance.amax() {
            return Err(invalid(format!(
                "covariance is not symmetric (entries differ by {asymmetry:e})"
            )));
        }
        let covariance = (covariance + transposed) * 0.5;
        Ok(Self {
            count,
            mean,
            covariance,
        })
    }

    /// How many feature rows the statistics describe.
    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn dim(&self) -> usize {
        self.mean.len()
    }

    pub fn mean(&self) -> &[f64] {
        self.mean.as_slice()
    }

    /// `dim × dim`; symmetric, so row-major and column-major alike.
    pub fn covariance(&self) -> &[f64] {
        self.covariance.as_slice()
    }
}

/// `|mu_a − mu_b|² + tr(S_a + S_b − 2 (S_a S_b)^½)`: the Fréchet distance between Gaussians
/// with these statistics, the FID when they are Inception pool3 features.
pub fn frechet_distance(a: &FeatureStats, b: &FeatureStats) -> Result<f64> {
    if a.dim() != b.dim() {
        return Err(Error::FidStats {
            what: "Fréchet distance".into(),
            reason: format!("{} features against {}", a.dim(), b.dim()),
        });
    }
    let mean_term = (&a.mean - &b.mean).norm_squared();
    let cross = trace_sqrt_product(a, b);
    Ok(mean_term + a.covariance.trace() + b.covariance.trace() - 2.0 * cross)
}

/// tr((S_a S_b)^½) for positive semi-definite S_a, S_b. With S_b = F Fᵀ (F: dim × rank), S_a S_b
/// has the nonzero eigenvalues of the symmetric PSD Fᵀ S_a F (rank × rank), so the trace of its
/// principal square root is Σ√λ over that matrix's eigenvalues: one pivoted Cholesky and one
/// eigenvalue-only decomposition, where scipy's `sqrtm` needs a complex Schur form and the
/// symmetric route S_a^½ S_b S_a^½ a full eigendecomposition with vectors (twice the time at
/// dim 2048). The set with fewer rows is factored: its rank, and so the eigenproblem, is
/// smaller when it has fewer rows than dimensions.
fn trace_sqrt_product(a: &FeatureStats, b: &FeatureStats) -> f64 {
    let (other, factored) = match a.count < b.count {
        true => (b, a),
        false => (a, b),
    };
    let factor = psd_factor(&factored.covariance);
    if factor.ncols() == 0 {
        return 0.0;
    }
    let product = factor.transpose() * (&other.covariance * &factor);
    // Products round differently on either side of the diagonal; the eigensolver reads one.
    let product = (&product + product.transpose()) * 0.5;
    psd_roots(&product.symmetric_eigenvalues()).sum()
}

/// F (dim × rank) with F Fᵀ = S for a positive semi-definite S: Cholesky with diagonal
/// pivoting (stable for PSD matrices), stopped once every remaining diagonal entry is below
/// `dim · ε · max diag`, where what is left of a singular matrix is rounding.
fn psd_factor(matrix: &DMatrix<f64>) -> DMatrix<f64> {
    let dim = matrix.nrows();
    // Row i of F by original index, row-major: the prefixes dotted below are contiguous.
    let mut rows = vec![0.0; dim * dim];
    let mut remaining: Vec<f64> = matrix.diagonal().iter().copied().collect();
    let tolerance = remaining.iter().fold(0.0, |m: f64, &d| m.max(d)) * dim as f64 * f64::EPSILON;
    let mut order: Vec<usize> = (0..dim).collect();
    let mut rank = 0;
    while rank < dim {
        let (offset, largest) = order[rank..]
            .iter()
            .map(|&i| remaining[i])
            .enumerate()
            .fold(
                (0, f64::MIN),
                |best, (k, d)| if d > best.1 { (k, d) } else { best },
            );
        if largest <= tolerance {
            break;
        }
        order.swap(rank, rank + offset);
        let pivot = order[rank];
        let root = largest.sqrt();
        let pivot_prefix = rows[pivot * dim..pivot * dim + rank].to_vec();
        rows[pivot * dim + rank] = root;
        let pivot_column = matrix.column(pivot);
        for &i in &order[rank + 1..] {
            let row = &mut rows[i * dim..i * dim + rank + 1];
            let value = (pivot_column[i] - dot(&row[..rank], &pivot_prefix)) / root;
            row[rank] = value;
            remaining[i] -= value * value;
        }
        rank += 1;
    }
    DMatrix::from_fn(dim, rank, |i, k| rows[i * dim + k])
}

/// Four running sums, so the compiler can keep them in one vector register.
fn dot(a: &[f64], b: &[f64]) -> f64 {
    let mut sums = [0.0; 4];
    let (a_chunks, b_chunks) = (a.chunks_exact(4), b.chunks_exact(4));
    let tail: f64 = a_chunks
        .remainder()
        .iter()
        .zip(b_chunks.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in a_chunks.zip(b_chunks) {
        for ((sum, x), y) in sums.iter_mut().zip(x).zip(y) {
            *sum += x * y;
        }
    }
    sums.iter().sum::<f64>() + tail
}

/// Square roots of a PSD matrix's computed eigenvalues. An eigenvalue is only known to within
/// about `n · ε · λ_max`; below that (rounding's negatives included, which pytorch-fid's real
/// part of `sqrtm` also drops) it counts as 0, since its root, up to 1e-8·√λ_max each, would
/// otherwise add noise for every direction a singular covariance lacks.
fn psd_roots(eigenvalues: &DVector<f64>) -> DVector<f64> {
    let largest = eigenvalues.max().max(0.0);
    let cutoff = largest * eigenvalues.len() as f64 * f64::EPSILON;
    eigenvalues.map(|l| if l > cutoff { l.sqrt() } else { 0.0 })
}

/// A statistics file as read back: the statistics and every metadata entry (`count` included).
#[derive(Clone, Debug)]
pub struct StoredStats {
    pub stats: FeatureStats,
    pub metadata: BTreeMap<String, String>,
}

/// `stats` as a statistics file's bytes, with `metadata` (e.g. `dataset_index_sha256`,
/// `inception_sha256`) beside the `count` this module writes.
pub fn stats_to_bytes(stats: &FeatureStats, metadata: &[(&str, &str)]) -> Result<Vec<u8>> {
    if metadata.iter().any(|(key, _)| *key == COUNT_KEY) {
        return Err(Error::FidStats {
            what: format!("metadata `{COUNT_KEY}`"),
            reason: "is written from the statistics themselves".into(),
        });
    }
    let mut entries: HashMap<String, String> = metadata
        .iter()
        .map(|(key, value)| (key.to_string(), value.to_string()))
        .collect();
    entries.insert(COUNT_KEY.into(), stats.count.to_string());
    let dim = stats.dim();
    serialize_f64(
        &[
            ("mu", vec![dim], stats.mean.as_slice()),
            ("sigma", vec![dim, dim], stats.covariance.as_slice()),
        ],
        entries,
    )
}

/// Reads a statistics file's bytes (`file` names it in errors) and checks that each `expected`
/// metadata entry is there with that value.
pub fn stats_from_bytes(
    file: &str,
    bytes: &[u8],
    expected: &[(&str, &str)],
) -> Result<StoredStats> {
    let tensors = parse_safetensors(file, bytes)?;
    let metadata = read_metadata(file, bytes)?;
    for &(key, value) in expected {
        let found = metadata.get(key);
        if found.map(String::as_str) != Some(value) {
            return Err(Error::StatsMetadata {
                file: file.to_string(),
                key: key.to_string(),
                expected: value.to_string(),
                found: found.map_or("missing".into(), |v| format!("`{v}`")),
            });
        }
    }
    let count = parse_count(file, &metadata)?;
    let (mean, covariance) = read_mean_and_square(file, &tensors, "mu", "sigma")?;
    let stats = FeatureStats::from_matrices(count, mean, covariance, file)?;
    Ok(StoredStats { stats, metadata })
}

/// Writes a statistics file at `location` (a path or a store URL), in one put.
pub fn save_stats(location: &str, stats: &FeatureStats, metadata: &[(&str, &str)]) -> Result<()> {
    Location::parse(location)?.put(stats_to_bytes(stats, metadata)?)
}

/// Reads the statistics file at `location` (a path or a store URL); see [`stats_from_bytes`].
pub fn load_stats(location: &str, expected: &[(&str, &str)]) -> Result<StoredStats> {
    let place = Location::parse(location)?;
    let bytes = place.get()?.ok_or_else(|| Error::FidStats {
        what: place.url().to_string(),
        reason: "no such file".into(),
    })?;
    stats_from_bytes(place.url(), &bytes, expected)
}

fn serialize_f64(
    tensors: &[(&str, Vec<usize>, &[f64])],
    metadata: HashMap<String, String>,
) -> Result<Vec<u8>> {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, values)| values.iter().flat_map(|v| v.to_le_bytes()).collect())
        .collect();
    let views = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, shape, _), data)| {
            let view = TensorView::new(Dtype::F64, shape.clone(), data)
                .expect("f64 values fill their shape");
            (*name, view)
        })
        .collect::<Vec<_>>();
    safetensors::serialize(views, Some(metadata)).map_err(|e| Error::Safetensors {
        file: "<FID statistics>".into(),
        reason: e.to_string(),
    })
}

fn parse_safetensors<'a>(file: &str, bytes: &'a [u8]) -> Result<SafeTensors<'a>> {
    SafeTensors::deserialize(bytes).map_err(|e| Error::Safetensors {
        file: file.to_string(),
        reason: e.to_string(),
    })
}

fn read_metadata(file: &str, bytes: &[u8]) -> Result<BTreeMap<String, String>> {
    let (_, header) = SafeTensors::read_metadata(bytes).map_err(|e| Error::Safetensors {
        file: file.to_string(),
        reason: e.to_string(),
    })?;
    Ok(header
        .metadata()
        .iter()
        .flatten()
        .map(|(key, value)| (key.clone(), value.clone()))
        .collect())
}

fn parse_count(file: &str, metadata: &BTreeMap<String, String>) -> Result<u64> {
    let raw = metadata.get(COUNT_KEY);
    raw.and_then(|v| v.parse().ok())
        .ok_or_else(|| Error::FidStats {
            what: format!("{file}, metadata `{COUNT_KEY}`"),
            reason: match raw {
                Some(value) => format!("`{value}` is not a number of feature rows"),
                None => "missing".into(),
            },
        })
}

/// The `[dim]` tensor `mean_name` and the `[dim, dim]` tensor `square_name`, both F64.
fn read_mean_and_square(
    file: &str,
    tensors: &SafeTensors<'_>,
    mean_name: &str,
    square_name: &str,
) -> Result<(DVector<f64>, DMatrix<f64>)> {
    let (mean, mean_shape) = read_f64(file, tensors, mean_name)?;
    let dim = match mean_shape.as_slice() {
        [dim] if *dim > 0 => *dim,
        found => {
            return Err(Error::FidStats {
                what: format!("{file}, tensor `{mean_name}`"),
                reason: format!("shape {found:?}, expected one non-empty dimension"),
            })
        }
    };
    let (square, square_shape) = read_f64(file, tensors, square_name)?;
    if square_shape != [dim, dim] {
        return Err(Error::TensorShape {
            file: file.to_string(),
            name: square_name.to_string(),
            expected: vec![dim, dim],
            found: square_shape,
        });
    }
    Ok((
        DVector::from_vec(mean),
        DMatrix::from_row_slice(dim, dim, &square),
    ))
}

fn read_f64(file: &str, tensors: &SafeTensors<'_>, name: &str) -> Result<(Vec<f64>, Vec<usize>)> {
    let view = tensors.tensor(name).map_err(|_| Error::MissingTensor {
        file: file.to_string(),
        name: name.to_string(),
        hint: String::new(),
    })?;
    if view.dtype() != Dtype::F64 {
        return Err(Error::FidStats {
            what: format!("{file}, tensor `{name}`"),
            reason: format!("dtype {:?}, expected F64", view.dtype()),
        });
    }
    let values = view
        .data()
        .chunks_exact(8)
        .map(|b| f64::from_le_bytes(b.try_into().expect("8-byte chunks")))
        .collect();
    Ok((values, view.shape().to_vec()))
}
