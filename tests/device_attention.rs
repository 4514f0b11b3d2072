//! The GPU path's attention node (`kernels::attention_autodiff`, a hand-written backward of
//! burn ops) against burn's own differentiation of the composed maths
//! (`model::layers::attention_unfused`), run here on the CPU backends: output and the
//! gradients of q, k and v, with and without a key padding bias, for every combination of
//! tracked inputs that matters, in f32 and (on Flex, which has bf16) with bf16 products.

mod common;

use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::Autodiff;
use burn::prelude::*;
use burn::tensor::{DType, Distribution, FloatDType, TensorPrimitive};
use common::{assert_close, values};

use ditrun::kernels;
use ditrun::model::layers::{attention_unfused, key_padding_bias};

/// Largest |a − b| over the largest |b|: the error of a low-precision result on the scale of
/// the whole tensor (bf16's error is relative to the terms summed, not to each result).
fn assert_close_to_scale<B: Backend, const D: usize>(
    what: &str,
    actual: Tensor<B, D>,
    expected: Tensor<B, D>,
    tolerance: f32,
) {
    assert_eq!(actual.dims(), expected.dims(), "{what}: shapes");
    let (a, e) = (values(actual), values(expected));
    assert!(a.iter().all(|v| v.is_finite()), "{what}: non-finite values");
    let scale = e.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    assert!(scale > 0.0, "{what}: an all-zero reference checks nothing");
    let error = common::relative_error(&a, &e);
    assert!(
        error <= tolerance as f64,
        "{what}: {error:e} of a scale of {scale:e}"
    );
}

fn random<B: Backend, const D: usize>(shape: [usize; D], std: f64) -> Tensor<B, D> {
    Tensor::random(shape, Distribution::Normal(0.0, std), &Default::default())
}

/// A `[B, 1, 1, M]` key padding bias: batch element `b` keeps its first `M − 2b` keys (at
/// least one), so that masked and unmasked rows both occur.
fn padding_bias<B: Backend>(batch: usize, keys: usize) -> Tensor<B, 4> {
    let mask: Vec<bool> = (0..batch)
        .flat_map(|b| (0..keys).map(move |j| j < keys.saturating_sub(2 * b).max(1)))
        .collect();
    let mask =
        Tensor::<B, 1, Bool>::from_bool(TensorData::new(mask, [batch * keys]), &Default::default());
    key_padding_bias(mask.reshape([batch, keys]))
}

/// The op under test, through tensors of the autodiff backend.
fn device_attention<I: Backend>(
    q: Tensor<Autodiff<I>, 4>,
    k: Tensor<Autodiff<I>, 4>,
    v: Tensor<Autodiff<I>, 4>,
    bias: Option<Tensor<I, 4>>,
    compute: FloatDType,
) -> Tensor<Autodiff<I>, 4> {
    let p = |t: Tensor<Autodiff<I>, 4>| t.into_primitive().tensor();
    let bias = bias.map(|b| b.into_primitive().tensor());
    let out = kernels::attention_autodiff::<I, NoCheckpointing>(p(q), p(k), p(v), bias, compute)
        .expect("shapes fit");
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

struct Run<I: Backend> {
    out: Tensor<I, 4>,
    /// q's, k's and v's gradients, `None` where that input was not tracked.
    grads: [Option<Tensor<I, 4>>; 3],
}

/// Output and gradients (of `Σ out ⊙ upstream`) of either the op under test (`Some(compute)`)
/// or the burn-composed reference (`None`). The reference runs on the same values in f64 and
/// its results come back as f32: burn-ndarray's f32 softmax gradient is itself off by a few
/// 1e-5 (see tests/kernels.rs), more than the f32 rounding this comparison allows.
fn run<I: Backend>(
    inputs: [&Tensor<I, 4>; 3],
    bias: Option<&Tensor<I, 4>>,
    upstream: &Tensor<I, 4>,
    tracked: [bool; 3],
    compute: Option<FloatDType>,
) -> Run<I> {
    let precision = if compute.is_some() {
        FloatDType::F32
    } else {
        FloatDType::F64
    };
    let lift = |t: &Tensor<I, 4>| Tensor::<Autodiff<I>, 4>::from_inner(t.clone().cast(precision));
    let [q, k, v] = inputs.map(lift);
    let track = |t: Tensor<Autodiff<I>, 4>, on: bool| if on { t.require_grad() } else { t };
    let (q, k, v) = (
        track(q, tracked[0]),
        track(k, tracked[1]),
        track(v, tracked[2]),
    );
    let out = match compute {
        Some(compute) => device_attention(q.clone(), k.clone(), v.clone(), bias.cloned(), compute),
        None => attention_unfused(q.clone(), k.clone(), v.clone(), bias.map(lift)),
    };
    let grads = (out.clone() * lift(upstream)).sum().backward();
    let grad = |t: &Tensor<Autodiff<I>, 4>, on: bool| {
        on.then(|| t.grad(&grads).expect("a tracked input has a gradient"))
    };
    let back = |t: Tensor<I, 4>| {
        if compute.is_some() {
            t
        } else {
            t.cast(FloatDType::F32)
        }
    };
    Run {
        out: back(out.inner()),
        grads: [
            grad(&q, tracked[0]),
            grad(&k, tracked[1]),
            grad(&v, tracked[2]),
        ]
        .map(|g| g.map(back)),
    }
}

/// `[B, H, N, M, d, dv]`: non-square scores and a value width unlike the key width.
const SHAPES: [[usize; 6]; 2] = [[2, 3, 5, 7, 4, 6], [3, 2, 9, 4, 8, 3]];

/// f32 products: the same maths as burn's composition, so agreement to f32 rounding.
fn check_f32<I: Backend>() {
    for [b, h, n, m, d, dv] in SHAPES {
        let q = random::<I, 4>([b, h, n, d], 1.0);
        let k = random::<I, 4>([b, h, m, d], 1.0);
        let v = random::<I, 4>([b, h, m, dv], 1.0);
        let upstream = random::<I, 4>([b, h, n, dv], 1.0);
        for bias in [None, Some(padding_bias::<I>(b, m))] {
            for tracked in [
                [true, true, true],
                [true, false, false],
                [false, true, false],
                [false, false, true],
                [false, true, true],
            ] {
                let what = format!(
                    "f32 {:?} bias {} tracked {tracked:?}",
                    [b, h, n, m, d, dv],
                    bias.is_some()
                );
                let ours = run(
                    [&q, &k, &v],
                    bias.as_ref(),
                    &upstream,
                    tracked,
                    Some(FloatDType::F32),
                );
                let reference = run([&q, &k, &v], bias.as_ref(), &upstream, tracked, None);
                assert_eq!(ours.out.dtype(), DType::F32, "{what}: output dtype");
                assert_close(&format!("{what} forward"), ours.out, reference.out, 1e-5);
                for (name, (g, g_ref)) in ["dq", "dk", "dv"]
                    .iter()
                    .zip(ours.grads.into_iter().zip(reference.grads))
                {
                    match (g, g_ref) {
                        (Some(g), Some(g_ref)) => {
                            assert_eq!(g.dtype(), DType::F32, "{what} {name}: dtype");
                            assert_close(&format!("{what} {name}"), g, g_ref, 1e-5);
                        }
                        (None, None) => {}
                        _ => panic!("{what} {name}: tracked in one run only"),
                    }
                }
            }
        }
    }
}

/// Masked keys get no weight: their value rows do not move the output, and get no gradient.
fn check_masked_keys<I: Backend>() {
    let [b, h, n, m, d, dv] = SHAPES[0];
    let q = random::<I, 4>([b, h, n, d], 1.0);
    let k = random::<I, 4>([b, h, m, d], 1.0);
    let v = random::<I, 4>([b, h, m, dv], 1.0);
    let upstream = random::<I, 4>([b, h, n, dv], 1.0);
    let bias = padding_bias::<I>(b, m);
    let ours = run(
        [&q, &k, &v],
        Some(&bias),
        &upstream,
        [true, true, true],
        Some(FloatDType::F32),
    );
    let [_, _, Some(dv_grad)] = ours.grads else {
        panic!("v is tracked")
    };
    // Batch element 1 keeps its first m − 2 keys: the last two value rows have zero gradient,
    // the others do not.
    let dv_grad = values(dv_grad.narrow(0, 1, 1));
    let row = |head: usize, key: usize| &dv_grad[(head * m + key) * dv..(head * m + key + 1) * dv];
    for head in 0..h {
        for key in 0..m {
            let any = row(head, key).iter().any(|&x| x != 0.0);
            assert_eq!(
                any,
                key < m - 2,
                "head {head} key {key}: {:?}",
                row(head, key)
            );
        }
    }
}

#[test]
fn device_attention_matches_burn_autodiff_on_ndarray() {
    check_f32::<burn::backend::NdArray>();
    check_masked_keys::<burn::backend::NdArray>();
}

#[cfg(feature = "flex")]
#[test]
fn device_attention_matches_burn_autodiff_on_flex() {
    check_f32::<burn::backend::Flex>();
    check_masked_keys::<burn::backend::Flex>();
}

/// bf16 products on Flex against the f32 reference: within bf16's rounding (8 bits of
/// mantissa, ~4e-3 per cast, a few casts deep), and every result back in f32.
#[cfg(feature = "flex")]
#[test]
fn device_attention_with_bf16_products_on_flex() {
    type I = burn::backend::Flex;
    for [b, h, n, m, d, dv] in SHAPES {
        let q = random::<I, 4>([b, h, n, d], 1.0);
        let k = random::<I, 4>([b, h, m, d], 1.0);
        let v = random::<I, 4>([b, h, m, dv], 1.0);
        let upstream = random::<I, 4>([b, h, n, dv], 1.0);
        for bias in [None, Some(padding_bias::<I>(b, m))] {
            let what = format!("bf16 {:?} bias {}", [b, h, n, m, d, dv], bias.is_some());
            let tracked = [true, true, true];
            let ours = run(
                [&q, &k, &v],
                bias.as_ref(),
                &upstream,
                tracked,
                Some(FloatDType::BF16),
            );
            let reference = run([&q, &k, &v], bias.as_ref(), &upstream, tracked, None);
            assert_eq!(ours.out.dtype(), DType::F32, "{what}: output dtype");
            assert_close_to_scale(&format!("{what} forward"), ours.out, reference.out, 2e-2);
            for (name, (g, g_ref)) in ["dq", "dk", "dv"]
                .iter()
                .zip(ours.grads.into_iter().zip(reference.grads))
            {
                let (g, g_ref) = (g.expect("tracked"), g_ref.expect("tracked"));
                assert_eq!(g.dtype(), DType::F32, "{what} {name}: dtype");
                assert_close_to_scale(&format!("{what} {name}"), g, g_ref, 2e-2);
            }
        }
    }
}

/// The bf16 path really rounds: its output differs from the f32 one (else the casts were
/// skipped and the test above would pass vacuously).
#[cfg(feature = "flex")]
#[test]
fn bf16_products_differ_from_f32_on_flex() {
    type I = burn::backend::Flex;
    let [b, h, n, m, d, dv] = SHAPES[0];
    let q = random::<I, 4>([b, h, n, d], 1.0);
    let k = random::<I, 4>([b, h, m, d], 1.0);
    let v = random::<I, 4>([b, h, m, dv], 1.0);
    let upstream = random::<I, 4>([b, h, n, dv], 1.0);
    let f32_run = run(
        [&q, &k, &v],
        None,
        &upstream,
        [true, true, true],
        Some(FloatDType::F32),
    );
    let bf16_run = run(
        [&q, &k, &v],
        None,
        &upstream,
        [true, true, true],
        Some(FloatDType::BF16),
    );
    let difference = values(f32_run.out)
        .iter()
        .zip(values(bf16_run.out))
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(
        difference > 1e-5,
        "bf16 products gave f32's output (largest difference {difference:e})"
    );
}

/// Shapes the node does not handle (heads broadcast) are refused, for the caller to fall back.
#[test]
fn broadcast_shapes_are_refused() {
    type I = burn::backend::NdArray;
    let p = |t: Tensor<I, 4>| {
        Tensor::<Autodiff<I>, 4>::from_inner(t)
            .into_primitive()
            .tensor()
    };
    let (q, k, v) = (
        random::<I, 4>([2, 3, 5, 4], 1.0),
        random::<I, 4>([2, 1, 7, 4], 1.0),
        random::<I, 4>([2, 1, 7, 4], 1.0),
    );
    assert!(kernels::attention_autodiff::<I, NoCheckpointing>(
        p(q),
        p(k),
        p(v),
        None,
        FloatDType::F32
    )
    .is_none());
}
