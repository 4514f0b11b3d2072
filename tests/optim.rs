//! The fused AdamW against burn's AdamW: the same bits step after step, and state records that
//! each loads from the other (checkpoints written before the fused optimizer still resume).
//! Both of ditrun's engines are checked: the host pass (what the CPU backends run) and the flat
//! device engine (what CUDA runs), the latter forced onto the CPU backends here.

use burn::backend::Autodiff;
use burn::module::{AutodiffModule, Module, ParamId};
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

/// The backends' random generators are process-wide and the tests run on parallel threads:
/// seeding and drawing hold this, or another test's draws would interleave with them.
static SEEDED: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn seeded() -> std::sync::MutexGuard<'static, ()> {
    SEEDED
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A small DiT whose every parameter is drawn at random: the DiT's own initialisation zeroes
/// the final projection and the adaLN gates, which zeroes every gradient of `grads_at`'s loss
/// (the optimizers would then only ever apply weight decay, and moments would stay zero).
fn tiny<AB: AutodiffBackend>() -> TextConditionalDiT<AB> {
    struct Randomise;
    impl<AB: AutodiffBackend> burn::module::ModuleMapper<AB> for Randomise {
        fn map_float<const D: usize>(
            &mut self,
            param: burn::module::Param<Tensor<AB, D>>,
        ) -> burn::module::Param<Tensor<AB, D>> {
            let (id, tensor, mapper) = param.consume();
            let drawn = Tensor::random(
                tensor.shape(),
                Distribution::Normal(0.0, 0.2),
                &tensor.device(),
            );
            let drawn = if tensor.is_require_grad() {
                drawn.require_grad()
            } else {
                drawn
            };
            burn::module::Param::from_mapped_value(id, drawn, mapper)
        }
    }
    let _seeded = seeded();
    AB::seed(&Default::default(), 7);
    let config = TextDiTConfig::new()
        .with_image_size(8)
        .with_dim(32)
        .with_depth(2)
        .with_heads(4)
        .with_context_dim(16);
    with_path_ids(config.init::<AB>(&Default::default()).unwrap()).map(&mut Randomise)
}

/// The gradients of a loss that depends on `step`, so moments see changing gradients.
fn grads_at<AB: AutodiffBackend>(model: &TextConditionalDiT<AB>, step: usize) -> GradientsParams {
    let device = Default::default();
    let _seeded = seeded();
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
    assert_eq!(fused.kind(), "host");
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
    no_gradient_no_change(SETTINGS.init::<AB, TextConditionalDiT<AB>>());
}

#[test]
fn parameters_without_a_gradient_keep_their_value_and_state_in_the_device_engine() {
    no_gradient_no_change(SETTINGS.init_device::<AB, TextConditionalDiT<AB>>());
}

fn no_gradient_no_change(
    mut fused: impl Optimizer<
        TextConditionalDiT<AB>,
        AB,
        Record = <burn::optim::adaptor::OptimizerAdaptor<
            burn::optim::AdamW,
            TextConditionalDiT<AB>,
            AB,
        > as Optimizer<TextConditionalDiT<AB>, AB>>::Record,
    >,
) {
    let mut model = tiny::<AB>();
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

/// Takes out the gradients of `ids` (those parameters sit this step out).
fn drop_grads<AB: AutodiffBackend>(
    model: &TextConditionalDiT<AB>,
    grads: &mut GradientsParams,
    ids: &[ParamId],
) {
    struct Drop<'a> {
        grads: &'a mut GradientsParams,
        ids: &'a [ParamId],
        dropped: usize,
    }
    impl<AB: AutodiffBackend> burn::module::ModuleVisitor<AB> for Drop<'_> {
        fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<AB, D>>) {
            if self.ids.contains(&param.id) {
                let removed = self.grads.remove::<AB::InnerBackend, D>(param.id);
                assert!(removed.is_some(), "every parameter has a gradient to drop");
                self.dropped += 1;
            }
        }
    }
    let mut drop = Drop {
        grads,
        ids,
        dropped: 0,
    };
    model.visit(&mut drop);
    assert_eq!(drop.dropped, ids.len());
}

/// Which parameters get no gradient at `step`: the first one for the first three steps (it
/// then joins the others three steps behind, its state placed after theirs) and once more
/// later, one in the middle every fourth step, the last one once.
fn frozen_at(ids: &[ParamId], step: usize) -> Vec<ParamId> {
    let mut frozen = Vec::new();
    if step < 3 || step == 10 {
        frozen.push(ids[0]);
    }
    if step % 4 == 2 {
        frozen.push(ids[ids.len() / 2]);
    }
    if step == 7 {
        frozen.push(ids[ids.len() - 1]);
    }
    frozen
}

/// Every parameter's step count and moments, by id, as f32 values.
fn moments<AB: AutodiffBackend>(
    record: &HashMapRecord<AB>,
) -> std::collections::BTreeMap<u64, (usize, Vec<f32>, Vec<f32>)> {
    fn flat<B: Backend, const D: usize>(
        state: burn::optim::AdamWState<B, D>,
    ) -> (usize, Vec<f32>, Vec<f32>) {
        let m = state.momentum;
        let values = |t: Tensor<B, D>| t.into_data().to_vec::<f32>().unwrap();
        (m.time, values(m.moment_1), values(m.moment_2))
    }
    use burn::optim::record::{AdaptorRecord, AdaptorRecordV1 as V1};
    record
        .iter()
        .map(|(id, record)| {
            let AdaptorRecord::V1(record) = record.clone();
            let state = match record {
                V1::Rank1(s) => flat(s),
                V1::Rank2(s) => flat(s),
                V1::Rank3(s) => flat(s),
                V1::Rank4(s) => flat(s),
                _ => panic!("the DiT's parameters have rank 1 to 4"),
            };
            (id.val(), state)
        })
        .collect()
}

type HashMapRecord<AB> = <burn::optim::adaptor::OptimizerAdaptor<
    burn::optim::AdamW,
    TextConditionalDiT<AB>,
    AB,
> as Optimizer<TextConditionalDiT<AB>, AB>>::Record;

fn assert_same_moments<AB: AutodiffBackend>(a: &HashMapRecord<AB>, b: &HashMapRecord<AB>) {
    let (a, b) = (moments(a), moments(b));
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "the same parameters have state"
    );
    for (id, (time, m, v)) in &a {
        let (other_time, other_m, other_v) = &b[id];
        assert_eq!(time, other_time, "parameter {id}: step count");
        let bits = |x: &[f32]| x.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert!(bits(m) == bits(other_m), "parameter {id}: first moment");
        assert!(bits(v) == bits(other_v), "parameter {id}: second moment");
    }
}

/// 20 steps of the device engine and of burn's AdamW, some parameters without a gradient on
/// some steps (so step counts differ between parameters and the engine updates them in
/// several passes): the same bits in the parameters and in the moments after every step.
fn device_engine_gives_burns_bits<AB: AutodiffBackend>() {
    let mut device_model = tiny::<AB>();
    let mut burn_model = tiny::<AB>();
    let ids = burn::module::list_param_ids(&device_model);
    assert!(
        ids.len() > 20,
        "a model with many parameters: {}",
        ids.len()
    );
    let mut device = SETTINGS.init_device::<AB, TextConditionalDiT<AB>>();
    assert_eq!(device.kind(), "device");
    assert!(device.is_fused());
    let mut reference = SETTINGS.init_burn::<AB, TextConditionalDiT<AB>>();
    assert_eq!(reference.kind(), "burn");
    assert!(!reference.is_fused());
    for step in 0..20 {
        let lr = 1e-3 * (1.0 + (step as f64 * 0.3).sin()) / 2.0 + 1e-5;
        let frozen = frozen_at(&ids, step);
        let before = values(&device_model);
        let mut grads = grads_at(&device_model, step);
        drop_grads(&device_model, &mut grads, &frozen);
        device_model = device.step(lr, device_model, grads);
        let mut grads = grads_at(&burn_model, step);
        drop_grads(&burn_model, &mut grads, &frozen);
        burn_model = reference.step(lr, burn_model, grads);

        let after = values(&device_model);
        assert_same_bits(
            &after,
            &values(&burn_model),
            &format!("after step {}", step + 1),
        );
        assert_same_moments(&device.to_record(), &reference.to_record());
        for (index, id) in ids.iter().enumerate() {
            assert_eq!(
                before[index] != after[index],
                !frozen.contains(id),
                "step {step}: parameter {index} moves exactly when it has a gradient"
            );
        }
        assert_eq!(
            burn::module::list_param_ids(&device_model),
            ids,
            "the parameters keep their ids"
        );
    }
    let state = moments(&device.to_record());
    assert!(
        state
            .values()
            .all(|(_, m, v)| m.iter().any(|x| *x != 0.0) && v.iter().all(|x| *x > 0.0)),
        "real gradients went into every moment"
    );
    let times: std::collections::BTreeSet<usize> = state.values().map(|(time, ..)| *time).collect();
    assert_eq!(
        times,
        [15, 16, 19, 20].into_iter().collect(),
        "the parameters' step counts diverged"
    );
}

#[test]
fn device_engine_gives_burns_bits_with_missing_gradients_on_ndarray() {
    device_engine_gives_burns_bits::<Autodiff<burn::backend::NdArray>>();
}

#[cfg(feature = "flex")]
#[test]
fn device_engine_gives_burns_bits_with_missing_gradients_on_flex() {
    device_engine_gives_burns_bits::<Autodiff<burn::backend::Flex>>();
}

#[test]
fn a_state_moves_between_all_three_engines_and_resumes() {
    // Uninterrupted: 16 steps of burn's AdamW.
    let mut reference = SETTINGS.init_burn::<AB, TextConditionalDiT<AB>>();
    let straight = run(tiny(), &mut reference, 0, 16);

    // burn → device → host → device → burn, each taking the previous one's record (as a
    // checkpoint written by one engine and resumed by another), training 3 or 4 steps each.
    let mut burn = SETTINGS.init_burn::<AB, TextConditionalDiT<AB>>();
    let model = run(tiny(), &mut burn, 0, 4);
    let mut device = SETTINGS
        .init_device::<AB, TextConditionalDiT<AB>>()
        .load_record(burn.to_record());
    assert_same_moments::<AB>(&device.to_record(), &burn.to_record());
    let model = run(model, &mut device, 4, 3);
    let mut host = SETTINGS
        .init::<AB, TextConditionalDiT<AB>>()
        .load_record(device.to_record());
    assert_eq!(host.kind(), "host");
    assert_same_moments::<AB>(&host.to_record(), &device.to_record());
    let model = run(model, &mut host, 7, 3);
    let mut device = SETTINGS
        .init_device::<AB, TextConditionalDiT<AB>>()
        .load_record(host.to_record());
    let model = run(model, &mut device, 10, 3);
    let mut back = burn_adamw()
        .init::<AB, TextConditionalDiT<AB>>()
        .load_record(device.to_record());
    let resumed = run(model, &mut back, 13, 3);

    assert_same_bits(
        &values(&straight),
        &values(&resumed),
        "resumed across the three engines",
    );
    assert_same_moments::<AB>(&reference.to_record(), &back.to_record());
}
