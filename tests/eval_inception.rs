//! FID Inception v3 against pytorch-fid 0.3.0 on the reference's seeded weights
//! (`inception_fid/` in `DITRUN_REFERENCE_DIR`, default `../shared/reference`).

mod common;

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::prelude::*;
use common::*;
use ditrun::eval::inception::{resize_bilinear, FidInception, FEATURES};
use safetensors::tensor::TensorView;
use safetensors::SafeTensors;

const TOLERANCE: f64 = 1e-4;

fn model_path() -> PathBuf {
    reference_dir().join("inception_fid/model.safetensors")
}

fn reference_model() -> FidInception<TestBackend> {
    let path = model_path();
    FidInception::load(path.to_str().expect("UTF-8 path"), &Default::default())
        .unwrap_or_else(|e| panic!("reference model: {e}"))
}

fn assert_features_match(model: &FidInception<TestBackend>, images: &str, features: &str) {
    let expected = reference_file("inception_fid/expected.safetensors");
    let input: Tensor<TestBackend, 4> = float(&expected, images);
    let batch = input.dims()[0];
    let actual = model.features(input);
    assert_eq!(actual.dims(), [batch, FEATURES], "{features}: shape");
    let error = relative_error(&values(actual), &values(float::<2>(&expected, features)));
    println!("{features}: relative error {error:.2e}");
    assert!(error < TOLERANCE, "{features}: relative error {error:.2e}");
}

/// One test for both inputs, so the two forward passes do not compete for the cores.
#[test]
fn features_match_pytorch_fid_for_rgb_and_grayscale() {
    let model = reference_model();
    assert_features_match(&model, "images", "features");
    assert_features_match(&model, "gray_images", "gray_features");
}

#[test]
fn parameter_count_matches_the_reference() {
    let expected = read_json("inception_fid/config.json")["parameters"]
        .as_u64()
        .expect("config.json: parameters") as usize;
    assert_eq!(reference_model().parameter_count(), expected);
}

/// Writes the reference weights to `dir/name` with `missing` left out and `reshaped` given a
/// different shape (its values unchanged, in another order of dimensions).
fn modified_copy(
    dir: &Path,
    name: &str,
    missing: Option<&str>,
    reshaped: Option<(&str, Vec<usize>)>,
) -> PathBuf {
    let bytes = std::fs::read(model_path()).unwrap();
    let tensors = SafeTensors::deserialize(&bytes).unwrap();
    let views: Vec<(String, TensorView<'_>)> = tensors
        .tensors()
        .into_iter()
        .filter(|(key, _)| Some(key.as_str()) != missing)
        .map(|(key, view)| match &reshaped {
            Some((target, shape)) if key == *target => {
                let view = TensorView::new(view.dtype(), shape.clone(), view.data()).unwrap();
                (key, view)
            }
            _ => (key, view),
        })
        .collect();
    let path = dir.join(name);
    safetensors::serialize_to_file(views, None, &path).unwrap();
    path
}

#[test]
fn a_missing_or_misshaped_tensor_is_named_with_its_file() {
    let dir = tempfile::tempdir().unwrap();
    let key = "Mixed_7c.branch_pool.bn.running_var";
    let path = modified_copy(dir.path(), "missing.safetensors", Some(key), None);
    let error = FidInception::<TestBackend>::load(path.to_str().unwrap(), &Default::default())
        .expect_err("a file without a tensor must not load")
        .to_string();
    assert!(
        error.contains(key) && error.contains(&path.display().to_string()),
        "{error}"
    );

    let key = "Mixed_6b.branch7x7_2.conv.weight";
    let path = modified_copy(
        dir.path(),
        "reshaped.safetensors",
        None,
        Some((key, vec![128, 128, 7, 1])),
    );
    let error = FidInception::<TestBackend>::load(path.to_str().unwrap(), &Default::default())
        .expect_err("a file with a mis-shaped tensor must not load")
        .to_string();
    assert!(
        error.contains(key)
            && error.contains("[128, 128, 1, 7]")
            && error.contains("[128, 128, 7, 1]"),
        "{error}"
    );
}

/// The resize's defining cases, independent of the reference: same size is the identity, and
/// halving with align_corners = false samples halfway between pixel pairs (2×2 means).
#[test]
fn resize_is_the_identity_at_the_same_size_and_averages_when_halving() {
    let device = Default::default();
    let images = Tensor::<TestBackend, 4>::random(
        [2, 3, 6, 10],
        burn::tensor::Distribution::Uniform(0.0, 1.0),
        &device,
    );
    let same = resize_bilinear(images.clone(), 6, 10);
    assert!(relative_error(&values(same), &values(images.clone())) < 1e-6);

    let halved = resize_bilinear(images.clone(), 3, 5);
    let block_means = burn::tensor::module::avg_pool2d(images, [2, 2], [2, 2], [0, 0], true, false);
    assert!(relative_error(&values(halved), &values(block_means)) < 1e-6);
}

/// Seconds per image at a few batch sizes (`cargo test --test eval_inception -- --ignored
/// --nocapture`); not a check, so not run by default.
#[test]
#[ignore]
fn time_features_per_image() {
    let model = reference_model();
    let device = Default::default();
    for batch in [4, 32] {
        let images = Tensor::<TestBackend, 4>::random(
            [batch, 3, 32, 32],
            burn::tensor::Distribution::Uniform(0.0, 1.0),
            &device,
        );
        let (start, cpu_start) = (Instant::now(), process_cpu_seconds());
        let features = model.features(images);
        let _ = values(features);
        let seconds = start.elapsed().as_secs_f64();
        let cpu = process_cpu_seconds()
            .zip(cpu_start)
            .map_or(f64::NAN, |(end, start)| end - start);
        println!(
            "batch {batch}: {:.3} s per image, {:.3} CPU s per image",
            seconds / batch as f64,
            cpu / batch as f64
        );
    }
}
