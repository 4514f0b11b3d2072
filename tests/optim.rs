//! The fused AdamW against burn's AdamW: the same bits step after step, and state records that
//! each loads from the other (checkpoints written before the fused optimizer still resume).

use burn::backend::Autodiff;
use burn::module::{AutodiffModule, Module};
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::Distribution;
use ditrun::model::{TextConditionalDiT, TextDiTConfig};
use ditrun::optim::AdamWSettings;
use ditrun::train::with_path_ids;

const SETTINGS: AdamWSettings = AdamWSettings {
    beta_1: 0.9,
    beta_2: 0.99,
    epsilon: 1e-8,
    weight_decay: 0.03,
};

fn burn_adamw() -> AdamWConfig {
    AdamWConfig::new()
        .with_beta_1(SETTINGS.beta_1)
        .with_beta_2(SETTINGS.beta_2)
        .with_epsilon(SETTINGS.epsilon)
        .with_weight_decay(SETTINGS.weight_decay)
}

fn tiny<AB: AutodiffBackend>() -> TextConditionalDiT<AB> {
    AB::seed(&Default::default(), 7);
    let config = TextDiTConfig::new()
        .with_image_size(8)
        .with_dim(32)
        .with_depth(2)
        .with_heads(4)
        .with_context_dim(16);
    with_path_ids(config.init::<AB>(&Default::default()).unwrap())
}

/// The gradients of a loss that depends on `step`, so moments see changing gradients.
fn grads_at<AB: AutodiffBackend>(model: &TextConditionalDiT<AB>, step: usize) -> GradientsParams {
    let device = Default::default();
    AB::seed(&device, 100 + step as u64);
    let x = Tensor::<AB, 4>::random([2, 3, 8, 8], Distribution::Normal(0.0, 1.0), &device);
    let t = Tensor::<AB, 1>::random([2], Distribution::Uniform(0.0, 1.0), &device);
    let context = Tensor::<AB, 3>::random([2, 3, 16], Distribution::Normal(0.0, 1.0), &device);
    let loss = model.forward(x, t, context, None).powf_scalar(2.0).mean();
    GradientsParams::from_grads(loss.backward(), model)
}

fn values<AB: AutodiffBackend>(model: &TextConditionalDiT<AB>) -> Vec<Vec<f32>> {
    let mut out = Vec::new();
    struct Collect<'a>(&'a mut Vec<Vec<f32>>);
    impl<B: Backend> burn::module::ModuleVisitor<B> for Collect<'_> {
        fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<B, D>>) {
            self.0
                .push(param.val().into_data().to_vec::<f32>().unwrap());
        }
    }
    model.valid().visit(&mut Collect(&mut out));
    out
}

fn assert_same_bits(a: &[Vec<f32>], b: &[Vec<f32>], what: &str) {
    assert_eq!(a.len(), b.len());
    for (i, (a, b)) in a.iter().zip(b).enumerate() {
        let differing = a
            .iter()
            .zip(b)
            .filter(|(x, y)| x.to_bits() != y.to_bits())
            .count();
        assert_eq!(
            differing,
            0,
            "{what}: parameter {i} differs in {differing} of {} values",
            a.len()
        );
    }
}

fn same_bits_as_burn<AB: AutodiffBackend>() {
    let mut fused_model = tiny::<AB>();
    let mut burn_model = tiny::<AB>();
    let mut fused = SETTINGS.init::<AB, TextConditionalDiT<AB>>();
    assert!(fused.is_fused(), "the CPU backends take the fused pass");
    let mut reference = burn_adamw().init::<AB, TextConditionalDiT<AB>>();
    for step in 0..25 {
        // A schedule that moves, as warm-up and cosine decay do.
        let lr = 1e-3 * (1.0 + (step as f64 * 0.3).sin()) / 2.0 + 1e-5;
        let grads = grads_at(&fused_model, step);
        fused_model = fused.step(lr, fused_model, grads);
        let grads = grads_at(&burn_model, step);
        burn_model = reference.step(lr, burn_model, grads);
        assert_same_bits(
            &values(&fused_model),
            &values(&burn_model),
            &format!("after step {}", step + 1),
        );
    }
    let before = values(&tiny::<AB>());
    assert_ne!(before, values(&fused_model), "the parameters moved");
}

#[test]
fn fused_adamw_gives_burns_bits_over_many_steps_on_ndarray() {
    same_bits_as_burn::<Autodiff<burn::backend::NdArray>>();
}

#[cfg(feature = "flex")]
#[test]
fn fused_adamw_gives_burns_bits_over_many_steps_on_flex() {
    same_bits_as_burn::<Autodiff<burn::backend::Flex>>();
}

type AB = Autodiff<burn::backend::NdArray>;

/// Steps `steps` times from `start` with `optimizer`, the gradients numbered from `first`.
fn run<O: Optimizer<TextConditionalDiT<AB>, AB>>(
    mut model: TextConditionalDiT<AB>,
    optimizer: &mut O,
    first: usize,
    steps: usize,
) -> TextConditionalDiT<AB> {
    for step in first..first + steps {
        let grads = grads_at(&model, step);
        model = optimizer.step(2e-3, model, grads);
    }
    model
}

#[test]
fn a_state_saved_by_burns_adamw_resumes_in_the_fused_one_and_back() {
    // Uninterrupted: 10 steps of burn's AdamW.
    let mut reference = burn_adamw().init::<AB, TextConditionalDiT<AB>>();
    let straight = run(tiny(), &mut reference, 0, 10);

    // 4 steps of burn's, its record into the fused one (an old checkpoint), 3 fused steps, the
    // fused record back into burn's (a new checkpoint read by an older ditrun), 3 more.
    let mut old = burn_adamw().init::<AB, TextConditionalDiT<AB>>();
    let model = run(tiny(), &mut old, 0, 4);
    let mut fused = SETTINGS
        .init::<AB, TextConditionalDiT<AB>>()
        .load_record(old.to_record());
    let model = run(model, &mut fused, 4, 3);
    let mut back = burn_adamw()
        .init::<AB, TextConditionalDiT<AB>>()
        .load_record(fused.to_record());
    let resumed = run(model, &mut back, 7, 3);

    assert_same_bits(
        &values(&straight),
        &values(&resumed),
        "resumed across both optimizers",
    );
}

#[test]
fn parameters_without_a_gradient_keep_their_value_and_state() {
    let mut model = tiny::<AB>();
    let mut fused = SETTINGS.init::<AB, TextConditionalDiT<AB>>();
    model = run(model, &mut fused, 0, 2);
    let before = values(&model);
    let mut grads = grads_at(&model, 2);
    let frozen = model.final_proj.weight.id;
    grads
        .remove::<burn::backend::NdArray, 2>(frozen)
        .expect("the final projection has a gradient");
    let record_before = fused.to_record();
    model = fused.step(1e-3, model, grads);
    let after = values(&model);
    let index = burn::module::list_param_ids(&model)
        .iter()
        .position(|id| *id == frozen)
        .unwrap();
    assert_eq!(before[index], after[index], "no gradient, no change");
    assert_ne!(before[0], after[0], "the others moved");
    let record_after = fused.to_record();
    let time = |record: &burn::optim::record::AdaptorRecord<burn::optim::AdamW, AB>| {
        record.clone().into_state::<2>().momentum.time
    };
    assert_eq!(
        time(&record_before[&frozen]),
        time(&record_after[&frozen]),
        "its step count stays"
    );
    let _ = model.valid().num_params();
}
