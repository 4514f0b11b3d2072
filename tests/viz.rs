//! Pictures of what the model learned: the caption-similarity matrix and its heat map.

mod common;

use std::process::Command;

use ditrun::model::ClipTextConfig;
use ditrun::probe::caption_similarity;
use ditrun::text::TextEncoder;
use ditrun::viz::{render_similarity, similarity_canvas_size, SimilarityReport};

use common::TestBackend;

fn tiny_encoder() -> TextEncoder<TestBackend> {
    let config = ClipTextConfig {
        hidden_size: 32,
        intermediate_size: 64,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        ..ClipTextConfig::new()
    };
    TextEncoder::load(None, &config, 5, &Default::default()).unwrap()
}

fn prompts() -> Vec<String> {
    [
        "a photo of a red circle",
        "a photo of a blue square",
        "a photo of a cat",
        "a photo of a red circle",
    ]
    .map(String::from)
    .to_vec()
}

#[test]
fn the_similarity_matrix_is_symmetric_with_ones_on_the_diagonal() {
    let matrix = caption_similarity(&tiny_encoder(), &prompts());
    assert_eq!(matrix.len(), 4);
    for (i, row) in matrix.iter().enumerate() {
        assert_eq!(row.len(), 4);
        assert_eq!(row[i], 1.0);
        for (j, &value) in row.iter().enumerate() {
            assert_eq!(value, matrix[j][i], "symmetric at ({i}, {j})");
            assert!((-1.0..=1.0).contains(&value));
        }
    }
    assert!(
        (matrix[0][3] - 1.0).abs() < 1e-12,
        "identical prompts: {}",
        matrix[0][3]
    );
    assert!(
        matrix[0][1] < 1.0 - 1e-6,
        "different prompts differ: {}",
        matrix[0][1]
    );
}

#[test]
fn the_heat_map_decodes_at_its_documented_size_and_is_not_blank() {
    let prompts = prompts();
    let report = SimilarityReport {
        matrix: caption_similarity(&tiny_encoder(), &prompts),
        prompts,
        encoder: "random initialisation, seed 5".into(),
    };
    let canvas = render_similarity(&report);
    assert!(!canvas.is_blank());
    let png = canvas.to_png().unwrap();
    let decoder = png::Decoder::new(std::io::Cursor::new(png));
    let reader = decoder.read_info().unwrap();
    let info = reader.info();
    assert_eq!(
        (info.width as usize, info.height as usize),
        similarity_canvas_size(&report)
    );
    assert_eq!(
        (canvas.width, canvas.height),
        similarity_canvas_size(&report)
    );
    // Four 96-pixel cells per row and per column fit inside it.
    assert!(canvas.width > 4 * 96 && canvas.height > 4 * 96);
}

#[test]
fn inspect_similarity_prints_the_matrix_as_json_and_writes_the_png() {
    let dir = tempfile::tempdir().unwrap();
    let job = dir.path().join("job.yaml");
    std::fs::write(
        &job,
        "name: sim\nmodel: { context_dim: 32 }\ntext_encoder: { hidden_size: 32, intermediate_size: 64, layers: 2, heads: 2 }\ndata: { shards: unused }\n",
    )
    .unwrap();
    let png = dir.path().join("similarity.png");
    let output = Command::new(env!("CARGO_BIN_EXE_ditrun"))
        .args(["inspect", "similarity", "--job"])
        .arg(&job)
        .args([
            "--prompt",
            "a photo of a dog",
            "--prompt",
            "a photo of a cat",
            "--json",
            "--out",
        ])
        .arg(&png)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        report["prompts"],
        serde_json::json!(["a photo of a dog", "a photo of a cat"])
    );
    assert_eq!(report["matrix"][0][0], 1.0);
    assert_eq!(report["matrix"][0][1], report["matrix"][1][0]);
    assert!(std::fs::read(&png).unwrap().starts_with(b"\x89PNG"));
}

// ---------------------------------------------------------------------------------------------
// CFG sweep
// ---------------------------------------------------------------------------------------------

use burn::prelude::*;
use ditrun::flow::{cfg_sweep, SampleOptions};
use ditrun::model::{TextConditionalDiT, TextDiTConfig};
use ditrun::text::TextEmbeddingCache;

fn tiny_dit() -> TextConditionalDiT<TestBackend> {
    let config = TextDiTConfig {
        image_size: 8,
        patch_size: 4,
        channels: 3,
        dim: 16,
        depth: 1,
        heads: 2,
        mlp_ratio: 2.0,
        context_dim: 32,
    };
    // The zero-initialised head would make every velocity 0; random weights make the
    // guidance scale matter.
    ditrun::backend::seeded::<TestBackend, _>(&Default::default(), 9, || {
        let model = config.init::<TestBackend>(&Default::default()).unwrap();
        randomize_head(model)
    })
}

fn randomize_head(mut model: TextConditionalDiT<TestBackend>) -> TextConditionalDiT<TestBackend> {
    let dims = model.final_proj.weight.val().dims();
    let device = Default::default();
    model.final_proj.weight = burn::module::Param::from_tensor(Tensor::random(
        dims,
        burn::tensor::Distribution::Normal(0.0, 0.5),
        &device,
    ));
    model
}

/// Euler steps of the conditional velocity alone: the sampler without guidance, written
/// here independently of `flow::sample`.
fn plain_conditional(
    model: &TextConditionalDiT<TestBackend>,
    cache: &mut TextEmbeddingCache<TestBackend>,
    prompts: &[String],
    steps: usize,
    seed: u64,
) -> Vec<Vec<u8>> {
    use rand::SeedableRng;
    let device = Default::default();
    let captions: Vec<&str> = prompts.iter().map(String::as_str).collect();
    let (context, mask) = cache.batch::<TestBackend>(&captions, &device);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n = prompts.len() * 3 * 8 * 8;
    let noise: Vec<f32> = (0..n)
        .map(|_| rand::Rng::sample::<f32, _>(&mut rng, rand_distr::StandardNormal))
        .collect();
    let mut x = Tensor::<TestBackend, 4>::from_data(
        TensorData::new(noise, [prompts.len(), 3, 8, 8]),
        &device,
    );
    let dt = 1.0 / steps as f64;
    for i in 0..steps {
        let t = Tensor::full([prompts.len()], 1.0 - i as f64 * dt, &device);
        let v = model.forward(x.clone(), t, context.clone(), Some(mask.clone()));
        x = x - v.mul_scalar(dt);
    }
    let values: Vec<f32> = x.into_data().convert::<f32>().into_vec().unwrap();
    values
        .chunks(3 * 64)
        .map(|chw| {
            (0..64)
                .flat_map(|p| (0..3).map(move |c| chw[c * 64 + p]))
                .map(|v| ((v + 1.0) * 127.5).round().clamp(0.0, 255.0) as u8)
                .collect()
        })
        .collect()
}

#[test]
fn the_sweep_at_scale_one_is_the_plain_conditional_sampler_and_scales_differ() {
    let model = tiny_dit();
    let mut cache = TextEmbeddingCache::new(tiny_encoder());
    let prompts: Vec<String> = ["a photo of a red circle", "a photo of a cat"]
        .map(String::from)
        .to_vec();
    let options = SampleOptions {
        cfg: 7.5,
        steps: 4,
        sampler: ditrun::flow::Sampler::Euler,
        per_prompt: 4,
        seed: 11,
    };
    let columns = cfg_sweep(&model, &mut cache, &prompts, &[1.0, 7.5], &options);
    assert_eq!(columns.len(), 2);
    assert!(
        columns.iter().all(|c| c.len() == 2),
        "one image per prompt in each column"
    );
    let plain = plain_conditional(&model, &mut cache, &prompts, 4, 11);
    for (image, expected) in columns[0].iter().zip(&plain) {
        assert_eq!(
            &image.pixels, expected,
            "scale 1 = conditional sampler, same seed"
        );
    }
    assert_ne!(
        columns[0][0].pixels, columns[1][0].pixels,
        "guidance changes the image"
    );
}

#[test]
fn the_sweep_grid_has_its_documented_size_and_is_not_blank() {
    let model = tiny_dit();
    let mut cache = TextEmbeddingCache::new(tiny_encoder());
    let prompts: Vec<String> = ["a photo of a red circle", "a photo of a blue square"]
        .map(String::from)
        .to_vec();
    let scales = [1.0, 3.0, 7.5];
    let options = SampleOptions {
        cfg: 1.0,
        steps: 2,
        sampler: ditrun::flow::Sampler::Euler,
        per_prompt: 1,
        seed: 0,
    };
    let columns = cfg_sweep(&model, &mut cache, &prompts, &scales, &options);
    let canvas = ditrun::viz::render_sweep(&prompts, &scales, &columns, 8, 3);
    assert_eq!(
        (canvas.width, canvas.height),
        ditrun::viz::sweep_canvas_size(&prompts, 3, 8)
    );
    // 8-pixel images are drawn 16 times larger: three 128-pixel columns and two rows fit.
    assert_eq!(ditrun::viz::upscale_factor(8), 16);
    assert!(canvas.width > 3 * 128 && canvas.height > 2 * 128);
    assert!(!canvas.is_blank());
    let png = canvas.to_png().unwrap();
    let reader = png::Decoder::new(std::io::Cursor::new(png))
        .read_info()
        .unwrap();
    assert_eq!(
        (reader.info().width as usize, reader.info().height as usize),
        (canvas.width, canvas.height)
    );
}

// ---------------------------------------------------------------------------------------------
// Cross-attention maps
// ---------------------------------------------------------------------------------------------

use ditrun::flow::generate_recording;
use ditrun::model::ClipTokenizer;
use ditrun::probe::cross_attention_maps;
use ditrun::viz::{cross_attention_canvas_size, render_cross_attention, BlockChoice};

fn two_block_dit() -> TextConditionalDiT<TestBackend> {
    let config = TextDiTConfig {
        image_size: 8,
        patch_size: 2,
        channels: 3,
        dim: 16,
        depth: 2,
        heads: 2,
        mlp_ratio: 2.0,
        context_dim: 32,
    };
    ditrun::backend::seeded::<TestBackend, _>(&Default::default(), 21, || {
        config.init::<TestBackend>(&Default::default()).unwrap()
    })
}

/// Every weight map `[B, N, M]` against the real token counts of its batch rows.
fn assert_distributions_over_real_tokens(weights: &Tensor<TestBackend, 3>, real_tokens: &[usize]) {
    let [batch, patches, m] = weights.dims();
    assert_eq!(batch, real_tokens.len());
    let values: Vec<f32> = weights
        .clone()
        .into_data()
        .convert::<f32>()
        .into_vec()
        .unwrap();
    for (b, &real) in real_tokens.iter().enumerate() {
        for n in 0..patches {
            let row = &values[(b * patches + n) * m..(b * patches + n + 1) * m];
            let sum: f64 = row[..real].iter().map(|&w| w as f64).sum();
            assert!(
                (sum - 1.0).abs() < 1e-5,
                "row {b}, patch {n}: real tokens sum to {sum}"
            );
            assert!(
                row[real..].iter().all(|&w| w == 0.0),
                "row {b}, patch {n}: padded weights {:?}",
                &row[real..]
            );
        }
    }
}

#[test]
fn cross_attention_weights_sum_to_one_over_real_tokens_and_are_exactly_zero_on_padding() {
    let model = two_block_dit();
    let mut cache = TextEmbeddingCache::new(tiny_encoder());
    let captions = [
        "a photo of a cat",
        "a photo of a very small red circle on a blue square",
    ];
    let real: Vec<usize> = captions
        .iter()
        .map(|c| ClipTokenizer::default().tokenize(c).len)
        .collect();
    assert!(real[0] < real[1], "the shorter caption is padded");
    let device = Default::default();
    let (context, mask) = cache.batch::<TestBackend>(&captions, &device);
    let x = Tensor::<TestBackend, 4>::random(
        [2, 3, 8, 8],
        burn::tensor::Distribution::Normal(0.0, 1.0),
        &device,
    );
    let t = Tensor::<TestBackend, 1>::from_floats([0.3, 0.9], &device);
    let (velocity, per_block) = model.forward_with_cross_attention(
        x.clone(),
        t.clone(),
        context.clone(),
        Some(mask.clone()),
    );
    assert_eq!(per_block.len(), 2, "one map per block");
    for weights in &per_block {
        assert_eq!(weights.dims(), [2, 16, real[1]]);
        assert_distributions_over_real_tokens(weights, &real);
    }
    let plain = model.forward(x, t, context, Some(mask));
    assert_eq!(
        velocity
            .into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .unwrap(),
        plain
            .into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .unwrap(),
        "recording does not change the velocity"
    );

    // Through the guided sampler: the conditional half of a batch padded to the null caption.
    let prompts: Vec<String> = captions.map(String::from).to_vec();
    let options = SampleOptions {
        cfg: 3.0,
        steps: 4,
        sampler: ditrun::flow::Sampler::Euler,
        per_prompt: 1,
        seed: 2,
    };
    let (images, recorded) = generate_recording(&model, &mut cache, &prompts, &options, &[0, 3]);
    assert_eq!(images.len(), 2);
    assert_eq!(
        recorded.iter().map(|r| (r.step, r.t)).collect::<Vec<_>>(),
        [(0, 1.0), (3, 0.25)]
    );
    for at_step in &recorded {
        for weights in &at_step.per_block {
            assert_distributions_over_real_tokens(weights, &real);
        }
    }
    let unrecorded = ditrun::flow::generate(&model, &mut cache, &prompts, &options);
    let pixels = |images: &[ditrun::flow::GeneratedImage]| {
        images.iter().map(|i| i.pixels.clone()).collect::<Vec<_>>()
    };
    assert_eq!(
        pixels(&images),
        pixels(&unrecorded),
        "recording does not change the samples"
    );
}

#[test]
fn token_labels_are_the_real_tokens_without_the_end_of_word_marker() {
    let reference = common::read_json("tokenizer.json");
    let reference = reference.as_array().unwrap();
    let tokenizer = ClipTokenizer::default();
    for row in reference {
        let text = row["text"].as_str().unwrap();
        let ids = row["ids"].as_array().unwrap();
        let labels = tokenizer.token_labels(text);
        assert_eq!(
            labels.len(),
            ids.len(),
            "{text:?}: one label per reference token"
        );
        assert_eq!(
            (labels[0].as_str(), labels[labels.len() - 1].as_str()),
            ("<start>", "<end>"),
            "{text:?}"
        );
        assert!(
            labels.iter().all(|l| !l.contains("</w>") && !l.is_empty()),
            "{text:?}: {labels:?}"
        );
    }
    // Whole words read as themselves: the pieces join back into the caption.
    let caption = "a photo of an airplane";
    let labels = tokenizer.token_labels(caption);
    assert_eq!(labels[1..labels.len() - 1].join(" "), caption);
}

#[test]
fn the_cross_attention_picture_has_one_map_per_token_and_time_at_its_documented_size() {
    let model = two_block_dit();
    let mut cache = TextEmbeddingCache::new(tiny_encoder());
    let options = SampleOptions {
        cfg: 3.0,
        steps: 10,
        sampler: ditrun::flow::Sampler::Euler,
        per_prompt: 1,
        seed: 4,
    };
    let prompt = "a photo of a red circle";
    let report = cross_attention_maps(
        &model,
        &mut cache,
        prompt,
        &options,
        BlockChoice::All,
        &[1.0, 0.5, 0.1],
    )
    .unwrap();
    assert_eq!(
        report.tokens.len(),
        ClipTokenizer::default().tokenize(prompt).len
    );
    assert_eq!(
        report.rows.iter().map(|r| r.step).collect::<Vec<_>>(),
        [0, 5, 9]
    );
    for row in &report.rows {
        assert_eq!(row.maps.len(), report.tokens.len());
        assert!(row.maps.iter().all(|m| m.len() == 16), "a 4×4 patch grid");
        let total: f64 = row.shares().iter().sum();
        assert!((total - 1.0).abs() < 1e-5, "the shares sum to {total}");
    }
    let canvas = render_cross_attention(&report);
    assert!(!canvas.is_blank());
    assert_eq!(
        (canvas.width, canvas.height),
        cross_attention_canvas_size(&report)
    );
    // An image column and one 128-pixel map per token; three rows of maps.
    assert!(canvas.width > (report.tokens.len() + 1) * 128 && canvas.height > 3 * 128);
    let png = canvas.to_png().unwrap();
    let reader = png::Decoder::new(std::io::Cursor::new(png))
        .read_info()
        .unwrap();
    assert_eq!(
        (reader.info().width as usize, reader.info().height as usize),
        (canvas.width, canvas.height)
    );

    let one_block = cross_attention_maps(
        &model,
        &mut cache,
        prompt,
        &options,
        BlockChoice::Block(1),
        &[0.5],
    )
    .unwrap();
    assert_ne!(
        one_block.rows[0].maps, report.rows[1].maps,
        "block 1 alone is not the mean of both"
    );
    let error = cross_attention_maps(
        &model,
        &mut cache,
        prompt,
        &options,
        BlockChoice::Block(2),
        &[0.5],
    )
    .unwrap_err();
    assert!(error.to_string().contains("2 blocks"), "{error}");
}
