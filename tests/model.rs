//! Model construction, weight files and the text cache.

mod common;

use std::collections::BTreeMap;

use burn::module::Module;
use burn::prelude::*;
use common::*;
use ditrun::flow::{sample, Guidance, Sampler};
use ditrun::model::weights::{load_module, module_to_safetensors, named_tensors, SafetensorsFile};
use ditrun::model::{ClipTextConfig, TextDiTConfig};
use ditrun::text::{load_clip_text, TextEmbeddingCache, TextEncoder};
use ditrun::Error;
use safetensors::tensor::{Dtype, TensorView};

type B = TestBackend;

#[test]
fn seed_dit_has_the_seeds_parameter_count() {
    let model = TextDiTConfig::new().init::<B>(&Default::default()).unwrap();
    assert_eq!(model.num_params(), 18_145_072);
    assert_eq!(model.num_params(), ditrun::bench::SEED_MODEL_PARAMS);
}

#[test]
fn vit_b32_text_encoder_has_clips_parameter_count() {
    let model = ClipTextConfig::new().init::<B>(&Default::default());
    assert_eq!(model.num_params(), 63_165_952);
}

#[test]
fn impossible_model_sizes_are_rejected_with_the_field() {
    let bad_patch = TextDiTConfig::new()
        .with_patch_size(5)
        .init::<B>(&Default::default());
    assert!(bad_patch
        .unwrap_err()
        .to_string()
        .contains("model.patch_size"));
    let bad_heads = TextDiTConfig::new()
        .with_heads(7)
        .init::<B>(&Default::default());
    assert!(bad_heads.unwrap_err().to_string().contains("model.heads"));
}

fn tiny_dit_config() -> TextDiTConfig {
    TextDiTConfig::new()
        .with_image_size(16)
        .with_dim(64)
        .with_depth(2)
        .with_heads(4)
        .with_context_dim(32)
}

#[test]
fn safetensors_round_trip_keeps_every_weight() {
    let device = Default::default();
    let model = tiny_dit_config().init::<B>(&device).unwrap();
    let bytes = module_to_safetensors::<B, _>(&model).unwrap();
    let file = SafetensorsFile::from_bytes("round-trip".into(), bytes).unwrap();
    let fresh = tiny_dit_config().init::<B>(&device).unwrap();
    let loaded = load_module(fresh, &file, "").unwrap();
    let before = named_tensors::<B, _>(&model);
    let after = named_tensors::<B, _>(&loaded);
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        after.keys().collect::<Vec<_>>()
    );
    for (name, data) in &before {
        assert_eq!(data, &after[name], "{name}");
    }
    // PyTorch layout on disk: a Linear weight is [out, in].
    assert_eq!(
        before["blocks.0.attn.qkv.weight"].shape.to_vec(),
        vec![192, 64]
    );
}

#[test]
fn a_mis_shaped_weights_file_names_the_tensor_and_both_shapes() {
    let model = tiny_dit_config()
        .with_dim(32)
        .with_heads(4)
        .init::<B>(&Default::default())
        .unwrap();
    let error =
        load_module(model, &reference_file("dit_tiny/weights.safetensors"), "").unwrap_err();
    let message = error.to_string();
    assert!(message.contains("weights.safetensors"), "{message}");
    assert!(message.contains("patch_embed.weight"), "{message}");
    assert!(
        message.contains("[64, 3, 4, 4]") && message.contains("[32, 3, 4, 4]"),
        "{message}"
    );
}

fn write_safetensors(tensors: &BTreeMap<String, burn::tensor::TensorData>) -> Vec<u8> {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(name, data)| {
            (
                name.clone(),
                TensorView::new(Dtype::F32, data.shape.to_vec(), data.as_bytes()).unwrap(),
            )
        })
        .collect();
    safetensors::serialize(views, None).unwrap()
}

#[test]
fn a_missing_tensor_is_named() {
    let reference = reference_file("dit_tiny/weights.safetensors");
    let mut tensors: BTreeMap<String, _> = reference
        .names()
        .into_iter()
        .map(|n| (n.clone(), reference.tensor(&n).unwrap()))
        .collect();
    tensors.remove("blocks.1.cross.k.weight");
    let file =
        SafetensorsFile::from_bytes("partial.safetensors".into(), write_safetensors(&tensors))
            .unwrap();
    let model = tiny_dit_config().init::<B>(&Default::default()).unwrap();
    match load_module(model, &file, "") {
        Err(Error::MissingTensor { file, name, .. }) => {
            assert_eq!(file, "partial.safetensors");
            assert_eq!(name, "blocks.1.cross.k.weight");
        }
        other => panic!("expected a missing-tensor error, got {other:?}"),
    }
}

#[test]
fn clip_loads_from_a_full_clip_model_file_with_text_model_prefix() {
    let reference = reference_file("clip_tiny/model.safetensors");
    let mut tensors: BTreeMap<String, _> = reference
        .names()
        .into_iter()
        .map(|n| (format!("text_model.{n}"), reference.tensor(&n).unwrap()))
        .collect();
    // A vision tensor, as a CLIPModel file has; the text loader must ignore it.
    tensors.insert(
        "vision_model.embeddings.class_embedding".into(),
        burn::tensor::TensorData::new(vec![0.5f32; 8], [8]),
    );
    let full =
        SafetensorsFile::from_bytes("clip-full.safetensors".into(), write_safetensors(&tensors))
            .unwrap();
    let config = ClipTextConfig::from_hf_json(&read_json("clip_tiny/config.json"));
    let device = Default::default();
    let from_full = load_clip_text::<B>(&full, &config, &device).unwrap();
    let from_bare = load_clip_text::<B>(&reference, &config, &device).unwrap();
    let ids = Tensor::<B, 2, Int>::from_data(
        TensorData::new(vec![49406i64, 320, 1125, 49407], [1, 4]),
        &device,
    );
    let a = values(from_full.forward(ids.clone()).last_hidden_state);
    let b = values(from_bare.forward(ids).last_hidden_state);
    assert_eq!(a, b);
}

fn tiny_cache() -> TextEmbeddingCache<B> {
    let config = ClipTextConfig::from_hf_json(&read_json("clip_tiny/config.json"));
    let path = reference_dir().join("clip_tiny/model.safetensors");
    let encoder = TextEncoder::<B>::load(
        Some(path.to_str().unwrap()),
        &config,
        0,
        &Default::default(),
    )
    .unwrap();
    TextEmbeddingCache::new(encoder)
}

#[test]
fn cached_context_is_trimmed_to_the_longest_caption_and_matches_the_full_encoding() {
    let mut cache = tiny_cache();
    let captions = ["a photo of a cat", "", "a photo of a cat on a ship"];
    let (context, mask) = cache.batch::<B>(&captions, &Default::default());
    let tokenizer = &cache.encoder().tokenizer;
    let longest = captions
        .iter()
        .map(|c| tokenizer.tokenize(c).len)
        .max()
        .unwrap();
    assert_eq!(context.dims(), [3, longest, cache.width()]);
    let mask_values: Vec<bool> = mask.into_data().into_vec().unwrap();
    for (i, caption) in captions.iter().enumerate() {
        let real = tokenizer.tokenize(caption).len;
        let row = &mask_values[i * longest..(i + 1) * longest];
        assert_eq!(row.iter().filter(|&&m| m).count(), real, "{caption:?}");
    }
    // The cache's rows equal a full 77-token encoding at the real positions.
    let ids: Vec<i64> = captions
        .iter()
        .flat_map(|c| tokenizer.tokenize(c).ids.into_iter().map(i64::from))
        .collect();
    let full = cache.encoder().model.forward(Tensor::from_data(
        TensorData::new(ids, [3, 77]),
        &Default::default(),
    ));
    let full = values(full.last_hidden_state);
    let trimmed = values(context);
    let width = cache.width();
    for (i, caption) in captions.iter().enumerate() {
        let real = tokenizer.tokenize(caption).len;
        let ours = &trimmed[i * longest * width..(i * longest + real) * width];
        let theirs = &full[i * 77 * width..(i * 77 + real) * width];
        assert!(relative_error(ours, theirs) < 1e-5, "{caption:?}");
    }
    assert_eq!(cache.len(), 3);
    cache.batch::<B>(&["a photo of a cat"], &Default::default());
    assert_eq!(cache.len(), 3, "a cached caption is not encoded again");
}

#[test]
fn trimming_the_context_does_not_change_the_velocity() {
    let device = Default::default();
    let mut cache = tiny_cache();
    let model = tiny_dit_config().init::<B>(&device).unwrap();
    let captions = ["a photo of a dog", "a furry cat sitting"];
    let (context, mask) = cache.batch::<B>(&captions, &device);
    let [b, m, w] = context.dims();
    let padded = Tensor::cat(
        vec![context.clone(), Tensor::ones([b, 77 - m, w], &device)],
        1,
    );
    let padded_mask = Tensor::cat(vec![mask.clone(), Tensor::zeros([b, 77 - m], &device)], 1);
    let x = Tensor::<B, 4>::random(
        [b, 3, 16, 16],
        burn::tensor::Distribution::Normal(0.0, 1.0),
        &device,
    );
    let t = Tensor::<B, 1>::from_floats([0.3, 0.8], &device);
    // A zero-initialised head would make every velocity zero: give it weights first.
    let mut model = model;
    model.final_proj.weight = burn::module::Param::from_tensor(Tensor::random(
        [64, 48],
        burn::tensor::Distribution::Normal(0.0, 0.1),
        &device,
    ));
    let trimmed = values(model.forward(x.clone(), t.clone(), context, Some(mask)));
    let full = values(model.forward(x, t, padded, Some(padded_mask)));
    assert!(relative_error(&trimmed, &full) < 1e-5);
}

#[test]
fn heun_takes_the_trapezoid_of_two_guided_velocities() {
    let device = Default::default();
    let e = reference_file("dit_tiny/expected.safetensors");
    let model = load_module(
        tiny_dit_config().init::<B>(&device).unwrap(),
        &reference_file("dit_tiny/weights.safetensors"),
        "",
    )
    .unwrap();
    let guidance = Guidance {
        context: float(&e, "context"),
        mask: mask(&e, "mask"),
        null_context: float(&e, "sample_null_context"),
        null_mask: mask(&e, "sample_null_mask"),
        scale: 3.0,
    };
    let x: Tensor<B, 4> = float(&e, "sample_x_init");
    let heun = values(sample(&model, x.clone(), &guidance, 2, Sampler::Heun));
    // The same two steps composed from plain model calls, branches evaluated separately.
    let batch = x.dims()[0];
    let guided = |x: Tensor<B, 4>, t: f64| {
        let times = Tensor::<B, 1>::full([batch], t, &device);
        let cond = model.forward(
            x.clone(),
            times.clone(),
            guidance.context.clone(),
            Some(guidance.mask.clone()),
        );
        let m0 = guidance.null_context.dims()[1];
        let null_ctx = guidance.null_context.clone().expand([batch, m0, 32]);
        let null_mask = guidance.null_mask.clone().expand([batch, m0]);
        let null = model.forward(x, times, null_ctx, Some(null_mask));
        null.clone() + (cond - null) * 3.0
    };
    let mut expected = x;
    for (t, dt) in [(1.0, 0.5), (0.5, 0.5)] {
        let v1 = guided(expected.clone(), t);
        let v2 = guided(expected.clone() - v1.clone() * dt, t - dt);
        expected = expected - (v1 + v2) * (dt / 2.0);
    }
    assert!(relative_error(&heun, &values(expected)) < 1e-5);
}
