//! FID maths against pytorch-fid's `calculate_frechet_distance` on the reference sets
//! (`inception_fid/`), plus the properties the statistics must keep: merging ranks' shares,
//! storage round trips, metadata checks and singular covariances.

mod common;

use std::time::Instant;

use common::{read_json, reference_dir};
use ditrun::eval::fid::{
    frechet_distance, load_stats, save_stats, stats_from_bytes, stats_to_bytes, FeatureAccumulator,
    FeatureStats, STATS_FILE_NAME,
};
use ditrun::Error;
use nalgebra::{DMatrix, DVector};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use safetensors::tensor::Dtype;
use safetensors::SafeTensors;

/// A float64 matrix of `inception_fid/expected.safetensors`: its rows and their width.
fn reference_set(name: &str) -> (Vec<f64>, usize) {
    let path = reference_dir().join("inception_fid/expected.safetensors");
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let tensors = SafeTensors::deserialize(&bytes).unwrap();
    let view = tensors.tensor(name).unwrap();
    assert_eq!(view.dtype(), Dtype::F64, "{name}");
    assert_eq!(view.shape().len(), 2, "{name}");
    let values = view
        .data()
        .chunks_exact(8)
        .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
        .collect();
    (values, view.shape()[1])
}

fn stats_of(rows: &[f64], dim: usize) -> FeatureStats {
    let mut accumulator = FeatureAccumulator::new(dim);
    accumulator.add_rows(rows).unwrap();
    accumulator.finish().unwrap()
}

fn max_abs_difference(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

fn max_abs(values: &[f64]) -> f64 {
    values.iter().map(|v| v.abs()).fold(0.0, f64::max)
}

#[test]
fn frechet_distance_matches_pytorch_fid_on_the_reference_sets() {
    let (set_a, dim) = reference_set("set_a");
    let (set_b, dim_b) = reference_set("set_b");
    assert_eq!(dim, dim_b);
    let expected = read_json("inception_fid/config.json")["fid_small"]
        .as_f64()
        .expect("config.json: fid_small");
    let fid = frechet_distance(&stats_of(&set_a, dim), &stats_of(&set_b, dim)).unwrap();
    let error = (fid - expected).abs() / expected.abs();
    println!("FID {fid} vs pytorch-fid {expected}: relative error {error:e}");
    assert!(
        error < 1e-6,
        "FID {fid} vs pytorch-fid {expected}: {error:e}"
    );
}

#[test]
fn statistics_are_the_mean_and_sample_covariance() {
    let (set_a, dim) = reference_set("set_a");
    let stats = stats_of(&set_a, dim);
    let rows: Vec<&[f64]> = set_a.chunks(dim).collect();
    let n = rows.len() as f64;
    let mean: Vec<f64> = (0..dim)
        .map(|j| rows.iter().map(|r| r[j]).sum::<f64>() / n)
        .collect();
    let covariance: Vec<f64> = (0..dim * dim)
        .map(|ij| {
            let (i, j) = (ij / dim, ij % dim);
            let products = rows.iter().map(|r| (r[i] - mean[i]) * (r[j] - mean[j]));
            products.sum::<f64>() / (n - 1.0)
        })
        .collect();
    assert_eq!(stats.count(), rows.len() as u64);
    assert!(max_abs_difference(stats.mean(), &mean) <= 1e-12 * max_abs(&mean));
    assert!(max_abs_difference(stats.covariance(), &covariance) <= 1e-12 * max_abs(&covariance));
}

#[test]
fn distance_of_a_set_to_itself_is_zero() {
    let (set_a, dim) = reference_set("set_a");
    let stats = stats_of(&set_a, dim);
    let fid = frechet_distance(&stats, &stats).unwrap();
    let trace: f64 = (0..dim).map(|i| stats.covariance()[i * dim + i]).sum();
    assert!(fid.abs() < 1e-10 * trace, "FID(a, a) = {fid:e}");
}

/// Ranks accumulate uneven shares, ship them as bytes and merge: the one-pass result.
#[test]
fn merged_accumulators_equal_one_pass() {
    let (set_a, dim) = reference_set("set_a");
    let one_pass = stats_of(&set_a, dim);
    let shares = [0..37, 37..38, 38..120, 120..200];
    let mut merged = FeatureAccumulator::new(dim);
    for (rank, rows) in shares.iter().enumerate() {
        let mut share = FeatureAccumulator::new(dim);
        // Several batches per rank, as an evaluation loop feeds them.
        for batch in set_a[rows.start * dim..rows.end * dim].chunks(16 * dim) {
            share.add_rows(batch).unwrap();
        }
        let shipped =
            FeatureAccumulator::from_bytes(&format!("rank {rank}"), &share.to_bytes().unwrap());
        merged.merge(shipped.unwrap()).unwrap();
    }
    let merged = merged.finish().unwrap();
    assert_eq!(merged.count(), one_pass.count());
    let mean_scale = max_abs(one_pass.mean());
    let covariance_scale = max_abs(one_pass.covariance());
    assert!(max_abs_difference(merged.mean(), one_pass.mean()) <= 1e-13 * mean_scale);
    assert!(
        max_abs_difference(merged.covariance(), one_pass.covariance()) <= 1e-13 * covariance_scale
    );
}

/// With covariances sharing eigenvectors (here singular: fewer dimensions than the space),
/// the distance has a closed form: |Δμ|² + Σ (√a_i − √b_i)².
#[test]
fn singular_covariances_give_the_closed_form() {
    let dim = 24;
    let mut random = StdRng::seed_from_u64(7);
    let rotation = DMatrix::from_fn(dim, dim, |_, _| random.random_range(-1.0..1.0))
        .qr()
        .q();
    // Zero eigenvalues in both, at different places.
    let spectrum = |random: &mut StdRng, zeros: std::ops::Range<usize>| {
        DVector::from_fn(dim, |i, _| match zeros.contains(&i) {
            true => 0.0,
            false => random.random_range(0.1..3.0),
        })
    };
    let (eigen_a, eigen_b) = (spectrum(&mut random, 0..10), spectrum(&mut random, 6..20));
    let covariance = |eigen: &DVector<f64>| {
        let matrix = &rotation * DMatrix::from_diagonal(eigen) * rotation.transpose();
        matrix.transpose().as_slice().to_vec()
    };
    let mean_a: Vec<f64> = (0..dim).map(|_| random.random_range(-1.0..1.0)).collect();
    let mean_b: Vec<f64> = (0..dim).map(|_| random.random_range(-1.0..1.0)).collect();
    let a = FeatureStats::new(10, mean_a.clone(), covariance(&eigen_a)).unwrap();
    let b = FeatureStats::new(10, mean_b.clone(), covariance(&eigen_b)).unwrap();
    let mean_term: f64 = mean_a
        .iter()
        .zip(&mean_b)
        .map(|(x, y)| (x - y).powi(2))
        .sum();
    let spectrum_term: f64 = eigen_a
        .iter()
        .zip(eigen_b.iter())
        .map(|(x, y)| (x.sqrt() - y.sqrt()).powi(2))
        .sum();
    let expected = mean_term + spectrum_term;
    for fid in [
        frechet_distance(&a, &b).unwrap(),
        frechet_distance(&b, &a).unwrap(),
    ] {
        let error = (fid - expected).abs() / expected;
        assert!(
            error < 1e-9,
            "FID {fid} vs closed form {expected}: {error:e}"
        );
    }
}

/// The textbook symmetric route, independent of the library's: S_a^½ from an
/// eigendecomposition, then Σ√λ(S_a^½ S_b S_a^½), negative rounding clamped to zero.
fn symmetric_route(a: &FeatureStats, b: &FeatureStats) -> f64 {
    let dim = a.dim();
    let matrix = |stats: &FeatureStats| DMatrix::from_row_slice(dim, dim, stats.covariance());
    let (sigma_a, sigma_b) = (matrix(a), matrix(b));
    let eigen = sigma_a.clone().symmetric_eigen();
    let roots = eigen.eigenvalues.map(|l| l.max(0.0).sqrt());
    let root_a =
        &eigen.eigenvectors * DMatrix::from_diagonal(&roots) * eigen.eigenvectors.transpose();
    let inner = &root_a * &sigma_b * &root_a;
    let inner = (&inner + inner.transpose()) * 0.5;
    let cross: f64 = inner
        .symmetric_eigenvalues()
        .iter()
        .map(|l| l.max(0.0).sqrt())
        .sum();
    let mean_term: f64 = a
        .mean()
        .iter()
        .zip(b.mean())
        .map(|(x, y)| (x - y).powi(2))
        .sum();
    mean_term + sigma_a.trace() + sigma_b.trace() - 2.0 * cross
}

fn random_stats(random: &mut StdRng, rows: usize, dim: usize, offset: f64) -> FeatureStats {
    let features: Vec<f64> = (0..rows * dim)
        .map(|_| offset + random.random_range(0.0f64..1.0).powi(3))
        .collect();
    stats_of(&features, dim)
}

/// Full-rank and singular covariances (fewer rows than dimensions), in either order.
#[test]
fn agrees_with_the_symmetric_square_root_route() {
    let dim = 48;
    let mut random = StdRng::seed_from_u64(5);
    for (rows_a, rows_b) in [(300, 200), (30, 200), (200, 20), (25, 40)] {
        let a = random_stats(&mut random, rows_a, dim, 0.0);
        let b = random_stats(&mut random, rows_b, dim, 0.02);
        let expected = symmetric_route(&a, &b);
        let fid = frechet_distance(&a, &b).unwrap();
        let error = (fid - expected).abs() / expected;
        assert!(
            error < 1e-6,
            "{rows_a} and {rows_b} rows: {fid} vs {expected}: {error:e}"
        );
    }
}

#[test]
fn stats_survive_a_save_and_load() {
    let (set_b, dim) = reference_set("set_b");
    let stats = stats_of(&set_b, dim);
    let folder = tempfile::tempdir().unwrap();
    let location = folder.path().join(STATS_FILE_NAME);
    let location = location.to_str().unwrap();
    let metadata = [
        ("dataset_index_sha256", "ab12"),
        ("inception_sha256", "cd34"),
    ];
    save_stats(location, &stats, &metadata).unwrap();
    let stored = load_stats(location, &metadata).unwrap();
    assert_eq!(stored.stats, stats);
    assert_eq!(stored.metadata["count"], (set_b.len() / dim).to_string());
    assert_eq!(stored.metadata["inception_sha256"], "cd34");
}

#[test]
fn metadata_that_does_not_match_names_the_file_and_key() {
    let (set_b, dim) = reference_set("set_b");
    let bytes = stats_to_bytes(&stats_of(&set_b, dim), &[("inception_sha256", "cd34")]).unwrap();
    let file = "gs://bucket/data/fid-stats.safetensors";
    for (expected, found) in [
        (("inception_sha256", "ffff"), "`cd34`"),
        (("dataset_index_sha256", "ab12"), "missing"),
    ] {
        let error = stats_from_bytes(file, &bytes, &[expected]).unwrap_err();
        let message = error.to_string();
        assert!(
            matches!(&error, Error::StatsMetadata { key, .. } if key == expected.0),
            "{message}"
        );
        for part in [file, expected.0, expected.1, found] {
            assert!(message.contains(part), "`{part}` not in: {message}");
        }
    }
}

#[test]
fn a_missing_stats_file_is_named() {
    let folder = tempfile::tempdir().unwrap();
    let location = folder.path().join(STATS_FILE_NAME);
    let message = load_stats(location.to_str().unwrap(), &[])
        .unwrap_err()
        .to_string();
    assert!(message.contains(STATS_FILE_NAME), "{message}");
}

/// Inception's 2048 features: how long statistics and the distance take, and how far the
/// distance is from the symmetric route's (printed; run with `--ignored --nocapture`).
/// Ignored by default: a minute of CPU on a busy two-core machine.
#[test]
#[ignore]
fn timing_at_inception_width() {
    let (dim, rows) = (2048, 5000);
    let mut random = StdRng::seed_from_u64(11);
    let features: Vec<f32> = (0..rows * dim)
        .map(|_| random.random_range(0.0f32..1.0).powi(3))
        .collect();
    let started = Instant::now();
    let mut accumulator = FeatureAccumulator::new(dim);
    for batch in features.chunks(256 * dim) {
        accumulator.add_rows(batch).unwrap();
    }
    let a = accumulator.finish().unwrap();
    println!(
        "dim {dim}: {rows} rows accumulated in {:.2?}",
        started.elapsed()
    );
    for rows_b in [rows, 1000] {
        let b = random_stats(&mut random, rows_b, dim, 0.05);
        let started = Instant::now();
        let fid = frechet_distance(&a, &b).unwrap();
        let took = started.elapsed();
        let started = Instant::now();
        let expected = symmetric_route(&a, &b);
        println!(
            "dim {dim}, {rows} vs {rows_b} rows: Fréchet distance {fid} in {took:.2?}; symmetric \
             route {expected} in {:.2?}, relative difference {:e}",
            started.elapsed(),
            (fid - expected).abs() / expected
        );
    }
}
