//! The CLIP score against a tiny Hugging Face `CLIPModel` (`clip_score_tiny/`): vision tower,
//! projections, cosines and scores; plus what can be checked of CLIP's image preprocessing
//! without a reference (sizes, constants, the bicubic kernel's exactness on quadratics).

mod common;

use std::time::Instant;

use burn::prelude::*;
use burn::tensor::Distribution;
use common::*;
use ditrun::eval::clip_vision::{
    bicubic_resize_matrix, clip_pixel_values, clip_score_of_cosine, cosine_matrix, ClipScoreConfig,
    ClipScorer, ClipVisionConfig, CLIP_IMAGE_MEAN, CLIP_IMAGE_STD,
};
use ditrun::model::weights::materialize;
use safetensors::SafeTensors;

const MODEL: &str = "clip_score_tiny/model.safetensors";
const EXPECTED: &str = "clip_score_tiny/expected.safetensors";

fn tiny_config() -> ClipScoreConfig {
    ClipScoreConfig::from_hf_json(&read_json("clip_score_tiny/config.json"))
}

fn tiny_scorer() -> ClipScorer<TestBackend> {
    let path = reference_dir().join(MODEL);
    ClipScorer::load(path.to_str().unwrap(), &tiny_config(), &Default::default()).unwrap()
}

fn assert_matches<const D: usize>(what: &str, actual: Tensor<TestBackend, D>, expected: &str) {
    let expected = float::<D>(&reference_file(EXPECTED), expected);
    assert_eq!(actual.dims(), expected.dims(), "{what}: shape");
    let error = relative_error(&values(actual), &values(expected));
    assert!(error < 1e-4, "{what}: relative error {error:e}");
}

/// Compares directions, both sides scaled to unit length. The reference's `image_embeds` and
/// `text_embeds` are `CLIPModel`'s outputs, which it normalises (their rows have norm 1,
/// whatever the folder's README says); only their direction enters the score.
fn assert_direction_matches(what: &str, actual: Tensor<TestBackend, 2>, expected: &str) {
    let unit = |x: Tensor<TestBackend, 2>| x.clone() / x.powi_scalar(2).sum_dim(1).sqrt();
    let reference = float::<2>(&reference_file(EXPECTED), expected);
    let error = relative_error(&values(unit(actual)), &values(unit(reference)));
    assert!(error < 1e-4, "{what}: relative error {error:e}");
}

fn reference_image_embeds(scorer: &ClipScorer<TestBackend>) -> Tensor<TestBackend, 2> {
    let pixel_values = float::<4>(&reference_file(EXPECTED), "pixel_values");
    scorer.model.image_embeds(pixel_values)
}

fn reference_text_embeds(scorer: &ClipScorer<TestBackend>) -> Tensor<TestBackend, 2> {
    let ids = reference_file(EXPECTED).tensor("input_ids").unwrap();
    let ids = Tensor::<TestBackend, 2, Int>::from_data(ids.convert::<i64>(), &Default::default());
    scorer.model.text_embeds(scorer.model.text_pooled(ids))
}

#[test]
fn vision_tower_matches_hugging_face() {
    let scorer = tiny_scorer();
    let pixel_values = float::<4>(&reference_file(EXPECTED), "pixel_values");
    let output = scorer.model.vision_model.forward(pixel_values);
    assert_matches(
        "vision_pooler_output",
        output.pooler_output,
        "vision_pooler_output",
    );
    assert_direction_matches(
        "image_embeds",
        reference_image_embeds(&scorer),
        "image_embeds",
    );
}

#[test]
fn text_projection_matches_hugging_face() {
    let scorer = tiny_scorer();
    assert_direction_matches("text_embeds", reference_text_embeds(&scorer), "text_embeds");
    // The same embeddings from the prompts themselves, through ditrun's tokenizer.
    let prompts: Vec<String> =
        serde_json::from_value(read_json("clip_score_tiny/prompts.json")).unwrap();
    let prompts: Vec<&str> = prompts.iter().map(String::as_str).collect();
    assert_direction_matches(
        "prompt_embeds",
        scorer.prompt_embeds(&prompts),
        "text_embeds",
    );
}

#[test]
fn cosines_and_scores_match_torchmetrics() {
    let scorer = tiny_scorer();
    let cosine = cosine_matrix(
        reference_image_embeds(&scorer),
        reference_text_embeds(&scorer),
    );
    assert_matches("cosine", cosine.clone(), "cosine");
    assert_matches("clip_score", clip_score_of_cosine(cosine), "clip_score");
}

/// Per pair, from images in [0, 1]: the matrix's diagonal, through the preprocessing.
#[test]
fn clip_score_per_pair_is_the_diagonal() {
    let scorer = tiny_scorer();
    let device = Default::default();
    let images = Tensor::<TestBackend, 4>::random([3, 3, 20, 28], Distribution::Default, &device);
    let prompts = ["a photo of a cat", "a photo of an airplane", "a red circle"];
    let scores = scorer.clip_score(images.clone(), &prompts);
    let matrix = clip_score_of_cosine(cosine_matrix(
        scorer.image_embeds(images),
        scorer.prompt_embeds(&prompts),
    ));
    let diagonal: Vec<f32> = (0..3)
        .map(|i| values(matrix.clone().slice([i..i + 1, i..i + 1]))[0])
        .collect();
    // Scores are 100 · cosine: compare on the cosine's own scale (unit vectors), since these
    // random images score near zero.
    let worst = scores
        .iter()
        .zip(&diagonal)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(worst < 1e-4, "{scores:?} vs {diagonal:?}");
}

#[test]
fn a_missing_vision_tensor_names_the_file_and_key() {
    let missing = "vision_model.post_layernorm.weight";
    let bytes = std::fs::read(reference_dir().join(MODEL)).unwrap();
    let tensors = SafeTensors::deserialize(&bytes).unwrap();
    let kept: Vec<_> = tensors
        .tensors()
        .into_iter()
        .filter(|(name, _)| name != missing)
        .collect();
    let folder = tempfile::tempdir().unwrap();
    let path = folder
        .path()
        .join("clip-without-post-layernorm.safetensors");
    std::fs::write(&path, safetensors::serialize(kept, None).unwrap()).unwrap();
    let error = ClipScorer::<TestBackend>::load(
        path.to_str().unwrap(),
        &tiny_config(),
        &Default::default(),
    )
    .err()
    .expect("a tensor is missing");
    let message = error.to_string();
    assert!(message.contains(missing), "{message}");
    assert!(message.contains(path.to_str().unwrap()), "{message}");
}

#[test]
fn config_defaults_are_vit_b_32() {
    let config = ClipScoreConfig::from_hf_json(&serde_json::json!({}));
    assert_eq!(config, ClipScoreConfig::default());
    let vision = &config.vision;
    assert_eq!(
        (vision.image_size, vision.patch_size, vision.hidden_size),
        (224, 32, 768)
    );
    assert_eq!(
        (vision.num_hidden_layers, vision.num_attention_heads),
        (12, 12)
    );
    assert_eq!(
        (vision.intermediate_size, config.projection_dim),
        (3072, 512)
    );
    // The tiny model's projection width is the top-level one, not the towers' own entries.
    assert_eq!(tiny_config().projection_dim, 24);
}

fn images(dims: [usize; 4], value: impl Fn([usize; 4]) -> f32) -> Tensor<TestBackend, 4> {
    let [n, c, h, w] = dims;
    let mut data = Vec::with_capacity(n * c * h * w);
    for index in 0..n * c * h * w {
        let (rest, x) = (index / w, index % w);
        let (rest, y) = (rest / h, rest % h);
        data.push(value([rest / c, rest % c, y, x]));
    }
    Tensor::from_data(TensorData::new(data, dims), &Default::default())
}

fn normalised(value: f32, channel: usize) -> f32 {
    ((value as f64 - CLIP_IMAGE_MEAN[channel]) / CLIP_IMAGE_STD[channel]) as f32
}

#[test]
fn preprocessing_at_the_model_size_only_normalises() {
    let dims = [2, 3, 32, 32];
    let value = |[n, c, y, x]: [usize; 4]| ((n * 7 + c * 5 + y * 3 + x) % 11) as f32 / 10.0;
    let pixels = values(clip_pixel_values(images(dims, value), 32));
    let expected = values(images(dims, |i| normalised(value(i), i[1])));
    assert!(relative_error(&pixels, &expected) < 1e-6);
}

#[test]
fn a_constant_image_stays_constant() {
    let levels = [0.2, 0.5, 0.9];
    for (height, width) in [(32, 32), (28, 40), (300, 260)] {
        let pixels = clip_pixel_values(images([1, 3, height, width], |i| levels[i[1]]), 224);
        assert_eq!(pixels.dims(), [1, 3, 224, 224]);
        let pixels = values(pixels);
        for (channel, plane) in pixels.chunks(224 * 224).enumerate() {
            let expected = normalised(levels[channel], channel);
            let worst = plane
                .iter()
                .map(|v| (v - expected).abs())
                .fold(0.0, f32::max);
            assert!(
                worst < 1e-5,
                "{height}×{width}, channel {channel}: {worst:e}"
            );
        }
    }
}

#[test]
fn grayscale_is_repeated_to_rgb() {
    let value = |[_, _, y, x]: [usize; 4]| (y * 32 + x) as f32 / 1024.0;
    let gray = clip_pixel_values(images([1, 1, 32, 32], value), 32);
    let rgb = clip_pixel_values(images([1, 3, 32, 32], value), 32);
    assert!(relative_error(&values(gray), &values(rgb)) < 1e-7);
}

/// Keys' cubic with a = −0.5 on pixel centres reproduces quadratics exactly wherever all four
/// taps are inside the image; a = −0.75 (PyTorch's bicubic) or another alignment would not.
#[test]
fn upsampling_reproduces_quadratics_away_from_the_border() {
    let (input, output) = (32, 224);
    let matrix = bicubic_resize_matrix(input, output);
    let quadratic = |x: f64| 0.3 + 0.02 * x - 0.001 * x * x;
    let scale = input as f64 / output as f64;
    for (i, row) in matrix.chunks(input).enumerate() {
        assert!(
            (row.iter().sum::<f64>() - 1.0).abs() < 1e-12,
            "row {i} sums to 1"
        );
        // The output sample's position on the input's pixel-index axis.
        let position = (i as f64 + 0.5) * scale - 0.5;
        if position < 2.0 || position > input as f64 - 3.0 {
            continue;
        }
        let resized: f64 = row
            .iter()
            .enumerate()
            .map(|(j, w)| w * quadratic(j as f64))
            .sum();
        let error = (resized - quadratic(position)).abs();
        assert!(
            error < 1e-12,
            "output {i}: {resized} vs {}",
            quadratic(position)
        );
    }
}

/// Shrinking averages every input sample: rows sum to 1 and together weigh each input equally.
#[test]
fn downsampling_weighs_every_input() {
    let (input, output) = (448, 224);
    let matrix = bicubic_resize_matrix(input, output);
    for column in 8..input - 8 {
        let weight: f64 = (0..output).map(|row| matrix[row * input + column]).sum();
        assert!(
            (weight - 0.5).abs() < 1e-12,
            "input {column} weighs {weight}"
        );
    }
}

/// ViT-B/32's vision tower (random weights) at a few batch sizes, on the test backend
/// (printed; run with `--ignored --nocapture`). Ignored by default: a minute of CPU.
#[test]
#[ignore]
fn timing_vit_b_32_vision_tower() {
    let config = ClipVisionConfig::default();
    let device = Default::default();
    // Draw the lazily initialised weights now, outside the timings.
    let tower = materialize(config.init::<TestBackend>(&device));
    let side = config.image_size;
    for batch in [1, 8, 32] {
        let images =
            Tensor::<TestBackend, 4>::random([batch, 3, 32, 32], Distribution::Default, &device);
        let started = Instant::now();
        let pixel_values = clip_pixel_values(images, side);
        let pooled = values(tower.forward(pixel_values).pooler_output);
        let seconds = started.elapsed().as_secs_f64();
        assert!(pooled.iter().all(|v| v.is_finite()));
        println!(
            "ViT-B/32 vision tower, batch {batch}: {seconds:.2} s ({:.1} images/s)",
            batch as f64 / seconds
        );
    }
}
