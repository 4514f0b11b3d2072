//! `train.precision: bf16` (kernels::autocast) on the CPU backend that has bf16 tensors
//! (Flex): the products run in bf16, gradients come back f32 and close to the f32 step's,
//! training in bf16 writes f32 checkpoints that resume in f32, and a backend without bf16 is
//! refused with the key named.
#![cfg(feature = "flex")]

mod common;

use std::path::Path;

use burn::backend::{Autodiff, Flex};
use burn::module::{AutodiffModule, Module, ModuleVisitor, Param};
use burn::prelude::*;
use burn::tensor::{DType, Distribution};
use ditrun::config::JobSpec;
use ditrun::flow::{flow_matching_loss, FlowBatch};
use ditrun::kernels::autocast::{with_precision, Precision};
use ditrun::model::TextDiTConfig;
use ditrun::train::{train, Resume};

type AB = Autodiff<Flex>;

/// Every parameter's gradient, flattened in visiting order, with its dtype.
fn gradients(
    model: &ditrun::model::TextConditionalDiT<AB>,
    loss: Tensor<AB, 1>,
) -> (Vec<f32>, Vec<DType>) {
    struct Collect<'a> {
        grads: &'a <AB as burn::tensor::backend::AutodiffBackend>::Gradients,
        values: Vec<f32>,
        dtypes: Vec<DType>,
    }
    impl ModuleVisitor<AB> for Collect<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<AB, D>>) {
            let grad = param
                .val()
                .grad(self.grads)
                .expect("every parameter takes part in the loss");
            self.dtypes.push(grad.dtype());
            self.values.extend(common::values(grad));
        }
    }
    let grads = loss.backward();
    let mut collect = Collect {
        grads: &grads,
        values: Vec::new(),
        dtypes: Vec::new(),
    };
    model.visit(&mut collect);
    (collect.values, collect.dtypes)
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let norm = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (norm(a) * norm(b))
}

#[test]
fn a_bf16_step_gives_f32_gradients_close_to_the_f32_step() {
    let device = Default::default();
    AB::seed(&device, 3);
    let config = TextDiTConfig::new()
        .with_image_size(8)
        .with_patch_size(2)
        .with_dim(32)
        .with_depth(2)
        .with_heads(4)
        .with_context_dim(16);
    let mut model = config.init::<AB>(&device).unwrap();
    // The output head starts at zero, which would leave most gradients zero: give it weights.
    model.final_proj.weight = Param::from_tensor(Tensor::random(
        [32, 12],
        Distribution::Normal(0.0, 0.05),
        &device,
    ));
    let x0 = Tensor::<AB, 4>::random([4, 3, 8, 8], Distribution::Normal(0.0, 1.0), &device);
    let context = Tensor::<AB, 3>::random([4, 5, 16], Distribution::Normal(0.0, 1.0), &device);
    let mask = Tensor::<AB, 2, Bool>::from_data(
        TensorData::new(
            (0..20).map(|i| i % 5 < 3 + i / 10).collect::<Vec<bool>>(),
            [4, 5],
        ),
        &device,
    );
    let batch = FlowBatch::draw_on_device(x0);
    let run = |precision: Precision| {
        let batch = FlowBatch {
            x0: batch.x0.clone(),
            x1: batch.x1.clone(),
            t: batch.t.clone(),
        };
        let loss = with_precision(precision, || {
            flow_matching_loss(&model, batch, context.clone(), Some(mask.clone()))
        });
        assert_eq!(loss.dtype(), DType::F32, "{precision:?}: the loss is f32");
        let value = loss.clone().into_scalar().elem::<f64>();
        let (grads, dtypes) = gradients(&model, loss);
        (value, grads, dtypes)
    };
    let (loss32, grads32, _) = run(Precision::F32);
    let (loss16, grads16, dtypes16) = run(Precision::Bf16);
    assert!(
        dtypes16.iter().all(|&d| d == DType::F32),
        "bf16 step's gradient dtypes: {dtypes16:?}"
    );
    let relative = (loss16 - loss32).abs() / loss32;
    assert!(relative < 1e-2, "loss f32 {loss32} vs bf16 {loss16}");
    assert!(
        relative > 0.0,
        "the bf16 step computed in f32: its loss is bit-identical"
    );
    let similarity = cosine(&grads16, &grads32);
    assert!(similarity > 0.99, "gradient cosine similarity {similarity}");
    // The scope ended: the same forward is f32 again.
    let again = flow_matching_loss(&model, batch, context, Some(mask))
        .into_scalar()
        .elem::<f64>();
    assert!(
        (again - loss32).abs() <= 1e-6 * loss32,
        "f32 after the scope: {again} vs {loss32}"
    );
    model = model.no_grad();
    assert_eq!(
        model.valid().final_proj.weight.val().dtype(),
        DType::F32,
        "parameters stay f32"
    );
}

fn tiny_job(root: &Path, steps: u64, precision: &str) -> JobSpec {
    let yaml = format!(
        r#"
name: tiny-bf16
model: {{ image_size: 8, patch_size: 4, channels: 3, dim: 16, depth: 1, heads: 2, mlp_ratio: 2.0, context_dim: 32 }}
text_encoder: {{ hidden_size: 32, intermediate_size: 64, layers: 2, heads: 2 }}
data:
  shards: {root}/shards
  prepare: {{ dataset: synthetic, samples: 64, samples_per_shard: 16 }}
train: {{ steps: {steps}, batch_size: 8, lr: 1.0e-3, warmup_steps: 2, ema_decay: 0.9, seed: 7, backend: flex, precision: {precision}, threads: 2 }}
checkpoint: {{ url: {root}/checkpoints, every_steps: 2, keep_last: 2 }}
sample: {{ every_steps: 0, at_end: false }}
"#,
        root = root.display()
    );
    JobSpec::from_yaml(&yaml, "tiny-bf16.yaml").expect("the test job is valid")
}

#[test]
fn a_bf16_run_tracks_the_f32_run_and_its_checkpoint_resumes_in_f32() {
    let f32_dir = tempfile::tempdir().unwrap();
    let f32_run = train(&tiny_job(f32_dir.path(), 6, "f32"), &Resume::Never).unwrap();
    let bf16_dir = tempfile::tempdir().unwrap();
    let bf16_run = train(&tiny_job(bf16_dir.path(), 6, "bf16"), &Resume::Never).unwrap();
    assert_ne!(
        bf16_run.params_sha256, f32_run.params_sha256,
        "bf16 changed the products"
    );
    let relative = (bf16_run.final_loss - f32_run.final_loss).abs() / f32_run.final_loss;
    assert!(
        relative < 0.05,
        "final loss f32 {} vs bf16 {}",
        f32_run.final_loss,
        bf16_run.final_loss
    );

    // The checkpoint holds f32 weights: an f32 run continues from it.
    let resumed = train(&tiny_job(bf16_dir.path(), 8, "f32"), &Resume::Auto).unwrap();
    assert_eq!(resumed.resumed_from, Some(6));
    assert!(resumed.final_loss.is_finite());
}

#[test]
fn bf16_on_a_backend_without_bf16_names_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let mut job = tiny_job(dir.path(), 2, "bf16");
    job.train.backend = ditrun::config::BackendChoice::Ndarray;
    let error = train(&job, &Resume::Never).unwrap_err().to_string();
    assert!(
        error.contains("train.precision") && error.contains("ndarray"),
        "{error}"
    );
}
