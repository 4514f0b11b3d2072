//! Parity against the independent reference vectors in `DITRUN_REFERENCE_DIR`
//! (default `../shared/reference`). Every size comes from the folder's config files.

mod common;

use burn::prelude::*;
use common::*;
use ditrun::flow::{flow_matching_loss, sample, FlowBatch, Guidance, Sampler};
use ditrun::model::weights::load_module;
use ditrun::model::{ClipTextConfig, ClipTokenizer, TextConditionalDiT, TextDiTConfig};
use ditrun::text::load_clip_text;

fn reference_dit() -> TextConditionalDiT<TestBackend> {
    let config = read_json("dit_tiny/config.json");
    let size = |key: &str| {
        config[key]
            .as_u64()
            .unwrap_or_else(|| panic!("config.json: {key}")) as usize
    };
    let config = TextDiTConfig {
        image_size: size("img_size"),
        patch_size: size("patch"),
        channels: size("channels"),
        dim: size("dim"),
        depth: size("depth"),
        heads: size("heads"),
        mlp_ratio: config["mlp_ratio"].as_f64().unwrap(),
        context_dim: size("ctx_dim"),
    };
    let model = config.init::<TestBackend>(&Default::default()).unwrap();
    load_module(model, &reference_file("dit_tiny/weights.safetensors"), "").unwrap()
}

#[test]
fn parity_dit_velocity_masked() {
    let model = reference_dit();
    let e = reference_file("dit_tiny/expected.safetensors");
    let v = model.forward(
        float(&e, "x"),
        float(&e, "t"),
        float(&e, "context"),
        Some(mask(&e, "mask")),
    );
    let err = relative_error(&values(v), &values(float::<4>(&e, "velocity")));
    assert!(err < 1e-5, "velocity relative error {err:e}");
}

#[test]
fn parity_dit_velocity_without_mask() {
    let model = reference_dit();
    let e = reference_file("dit_tiny/expected.safetensors");
    let v = model.forward(float(&e, "x"), float(&e, "t"), float(&e, "context"), None);
    let err = relative_error(&values(v), &values(float::<4>(&e, "velocity_no_mask")));
    assert!(err < 1e-5, "velocity (no mask) relative error {err:e}");
}

#[test]
fn parity_flow_matching_loss() {
    let model = reference_dit();
    let e = reference_file("dit_tiny/expected.safetensors");
    let batch = FlowBatch {
        x0: float(&e, "loss_x0"),
        x1: float(&e, "loss_x1"),
        t: float(&e, "loss_t"),
    };
    let loss = flow_matching_loss(&model, batch, float(&e, "context"), Some(mask(&e, "mask")));
    let err = relative_error(&values(loss), &[scalar(&e, "loss") as f32]);
    assert!(err < 1e-5, "loss relative error {err:e}");
}

#[test]
fn parity_euler_sampler_with_guidance() {
    let model = reference_dit();
    let e = reference_file("dit_tiny/expected.safetensors");
    let guidance = Guidance {
        context: float(&e, "context"),
        mask: mask(&e, "mask"),
        null_context: float(&e, "sample_null_context"),
        null_mask: mask(&e, "sample_null_mask"),
        scale: scalar(&e, "sample_cfg"),
    };
    let steps = scalar(&e, "sample_steps") as usize;
    let out = sample(
        &model,
        float(&e, "sample_x_init"),
        &guidance,
        steps,
        Sampler::Euler,
    );
    let err = relative_error(&values(out), &values(float::<4>(&e, "sample_out")));
    assert!(err < 1e-4, "sampler relative error {err:e}");
}

fn reference_clip() -> ditrun::model::ClipTextModel<TestBackend> {
    let config = ClipTextConfig::from_hf_json(&read_json("clip_tiny/config.json"));
    load_clip_text(
        &reference_file("clip_tiny/model.safetensors"),
        &config,
        &Default::default(),
    )
    .unwrap()
}

#[test]
fn parity_clip_text_encoder() {
    let model = reference_clip();
    let e = reference_file("clip_tiny/expected.safetensors");
    let ids_data = e.tensor("input_ids").unwrap();
    let ids =
        Tensor::<TestBackend, 2, Int>::from_data(ids_data.convert::<i64>(), &Default::default());
    let out = model.forward(ids);
    let hidden = values(out.last_hidden_state);
    let expected = values(float::<3>(&e, "last_hidden_state"));
    let attention: Vec<i64> = e
        .tensor("attention_mask")
        .unwrap()
        .convert::<i64>()
        .into_vec()
        .unwrap();
    let width = model.width();
    // Padded positions are masked out downstream; only real tokens are compared.
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for (position, &real) in attention.iter().enumerate() {
        if real != 0 {
            ours.extend_from_slice(&hidden[position * width..(position + 1) * width]);
            theirs.extend_from_slice(&expected[position * width..(position + 1) * width]);
        }
    }
    assert!(!ours.is_empty());
    let err = relative_error(&ours, &theirs);
    assert!(err < 1e-4, "last_hidden_state relative error {err:e}");
    let err = relative_error(
        &values(out.pooler_output),
        &values(float::<2>(&e, "pooler_output")),
    );
    assert!(err < 1e-4, "pooler_output relative error {err:e}");
}

#[test]
fn parity_tokenizer_ids() {
    let tokenizer = ClipTokenizer::default();
    let rows = read_json("tokenizer.json");
    let rows = rows.as_array().expect("tokenizer.json is a list");
    assert!(!rows.is_empty());
    for row in rows {
        let text = row["text"].as_str().unwrap();
        let ids = |key: &str| -> Vec<u32> {
            row[key]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect()
        };
        let ours = tokenizer.encode(text);
        if row["agree"].as_bool().unwrap() {
            assert_eq!(ours, ids("ids"), "text {text:?}");
        } else {
            assert!(
                ours == ids("ids") || ours == ids("hf_ids"),
                "text {text:?}: {ours:?}"
            );
        }
    }
}

#[test]
fn parity_tokenizer_padding_and_mask() {
    let tokenizer = ClipTokenizer::default();
    let prompts = read_json("clip_tiny/prompts.json");
    let e = reference_file("clip_tiny/expected.safetensors");
    let ids: Vec<i64> = e
        .tensor("input_ids")
        .unwrap()
        .convert::<i64>()
        .into_vec()
        .unwrap();
    let attention: Vec<i64> = e
        .tensor("attention_mask")
        .unwrap()
        .convert::<i64>()
        .into_vec()
        .unwrap();
    let len = tokenizer.context_length();
    for (i, prompt) in prompts.as_array().unwrap().iter().enumerate() {
        let caption = tokenizer.tokenize(prompt.as_str().unwrap());
        let expected_ids: Vec<u32> = ids[i * len..(i + 1) * len]
            .iter()
            .map(|&v| v as u32)
            .collect();
        let expected_mask: Vec<bool> = attention[i * len..(i + 1) * len]
            .iter()
            .map(|&v| v != 0)
            .collect();
        assert_eq!(caption.ids, expected_ids, "prompt {i}");
        assert_eq!(caption.mask(), expected_mask, "prompt {i}");
    }
}
