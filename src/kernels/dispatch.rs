//! The model calls these with any backend: on burn's CPU backends (NdArray, Flex; plain or
//! under Autodiff) they run the fused kernels; under Autodiff on CUDA attention is one node
//! with a hand-written backward (`device_attention`); everything else (the other ops on CUDA,
//! Candle, f64) runs burn's own ops. The backend is told apart by the type of its tensor
//! primitive, so model code needs no extra trait bounds.

use std::any::Any;
use std::borrow::Cow;
use std::sync::atomic::{AtomicBool, Ordering};

use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::Autodiff;
use burn::backend::NdArray;
use burn::prelude::*;
use burn::tensor::ops::FloatTensor;
use burn::tensor::TensorPrimitive;

use super::cpu::CpuF32;
use super::elementwise::{self, Activation, GELU, SILU};
use super::{
    adaln, attention as fused_attention, autocast, conv, linear as fused_linear, pool, reference,
    token_attention,
};

static FUSED: AtomicBool = AtomicBool::new(true);

/// Turns the fused kernels off (or back on) for the whole process, so that `ditrun bench
/// --unfused` measures burn's own ops on the same build.
pub fn set_fused(on: bool) {
    FUSED.store(on, Ordering::Relaxed);
}

pub fn fused() -> bool {
    FUSED.load(Ordering::Relaxed)
}

/// Whether the fused f32 CPU kernels may run the products: not under a bf16 autocast scope.
fn cpu_kernels_apply() -> bool {
    fused() && !autocast::casting()
}

/// `Ok(x)` as a `T` when `S` is `T`, else `Err(x)`: resolved per monomorphisation.
fn cast<S: 'static, T: 'static>(x: S) -> Result<T, S> {
    let mut slot = Some(x);
    if let Some(same) = (&mut slot as &mut dyn Any).downcast_mut::<Option<T>>() {
        return Ok(same.take().expect("just filled"));
    }
    Err(slot.expect("just filled"))
}

fn same<S: 'static, T: 'static>(x: S) -> T {
    cast::<S, T>(x).ok().expect("the types were found equal")
}

fn primitive<B: Backend, const D: usize>(x: Tensor<B, D>) -> FloatTensor<B> {
    x.into_primitive().tensor()
}

fn tensor<B: Backend, const D: usize>(p: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(p))
}

/// Tries the fused `autodiff` kernel, then the fused `plain` kernel, on `inputs` (a tuple of
/// primitives of `B`), for the CPU backend `I`.
fn try_backend<
    B: Backend,
    I: CpuF32,
    In: Clone + 'static,
    AdIn: Clone + 'static,
    PlainIn: Clone + 'static,
>(
    inputs: In,
    autodiff: impl FnOnce(AdIn) -> Option<FloatTensor<Autodiff<I>>>,
    plain: impl FnOnce(PlainIn) -> Option<FloatTensor<I>>,
) -> Result<FloatTensor<B>, In> {
    let inputs = match cast::<In, AdIn>(inputs) {
        Ok(lifted) => match autodiff(lifted.clone()) {
            Some(out) => return Ok(same(out)),
            None => return Err(same(lifted)),
        },
        Err(inputs) => inputs,
    };
    match cast::<In, PlainIn>(inputs) {
        Ok(lifted) => match plain(lifted.clone()) {
            Some(out) => Ok(same(out)),
            None => Err(same(lifted)),
        },
        Err(inputs) => Err(inputs),
    }
}

fn activation<B: Backend, const D: usize>(
    op: Activation,
    x: Tensor<B, D>,
) -> Result<Tensor<B, D>, Tensor<B, D>> {
    if !fused() {
        return Err(x);
    }
    let x = primitive(x);
    let x = match try_backend::<B, NdArray, _, FloatTensor<Autodiff<NdArray>>, FloatTensor<NdArray>>(
        x,
        |x| elementwise::forward_autodiff::<NdArray, NoCheckpointing>(op, x),
        |x| elementwise::forward::<NdArray>(op, &x),
    ) {
        Ok(y) => return Ok(tensor(y)),
        Err(x) => x,
    };
    #[cfg(feature = "flex")]
    let x = match try_backend::<
        B,
        burn::backend::Flex,
        _,
        FloatTensor<Autodiff<burn::backend::Flex>>,
        FloatTensor<burn::backend::Flex>,
    >(
        x,
        |x| elementwise::forward_autodiff::<burn::backend::Flex, NoCheckpointing>(op, x),
        |x| elementwise::forward::<burn::backend::Flex>(op, &x),
    ) {
        Ok(y) => return Ok(tensor(y)),
        Err(x) => x,
    };
    Err(tensor(x))
}

/// Exact GELU, `x Φ(x)`.
pub fn gelu<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    activation(GELU, x).unwrap_or_else(burn::tensor::activation::gelu)
}

/// SiLU, `x σ(x)`.
pub fn silu<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    activation(SILU, x).unwrap_or_else(burn::tensor::activation::silu)
}

/// `t`'s f32 values when `B` is one of the CPU backends the kernels run on (borrowed when
/// contiguous), else `None`: host-side passes (the fused AdamW) read tensors through this.
pub fn host_values<B: Backend>(t: &FloatTensor<B>) -> Option<Cow<'_, [f32]>> {
    let any = t as &dyn Any;
    if let Some(t) = any.downcast_ref::<FloatTensor<NdArray>>() {
        return NdArray::values_f32(t);
    }
    #[cfg(feature = "flex")]
    if let Some(t) = any.downcast_ref::<FloatTensor<burn::backend::Flex>>() {
        return burn::backend::Flex::values_f32(t);
    }
    None
}

/// A tensor of `B` owning `values`, when `B` is one of the kernels' CPU backends.
pub fn host_tensor<B: Backend>(
    values: Vec<f32>,
    shape: burn::tensor::Shape,
) -> Option<FloatTensor<B>> {
    let id = std::any::TypeId::of::<FloatTensor<B>>();
    if id == std::any::TypeId::of::<FloatTensor<NdArray>>() {
        return cast::<FloatTensor<NdArray>, FloatTensor<B>>(NdArray::from_f32(values, shape)).ok();
    }
    #[cfg(feature = "flex")]
    if id == std::any::TypeId::of::<FloatTensor<burn::backend::Flex>>() {
        use burn::backend::Flex;
        return cast::<FloatTensor<Flex>, FloatTensor<B>>(Flex::from_f32(values, shape)).ok();
    }
    None
}

/// Whether `B`'s tensors are ones [`host_values`] reads.
pub fn is_host_backend<B: Backend>() -> bool {
    let id = std::any::TypeId::of::<FloatTensor<B>>();
    #[cfg(feature = "flex")]
    if id == std::any::TypeId::of::<FloatTensor<burn::backend::Flex>>() {
        return true;
    }
    id == std::any::TypeId::of::<FloatTensor<NdArray>>()
}

type Triple<B> = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>);

/// `LayerNorm(x) (1 + scale) + shift` without affine parameters, over the last axis of
/// `x` `[B, N, D]`, with `scale` and `shift` `[B, 1, D]`.
pub fn adaln_modulate<B: Backend>(
    x: Tensor<B, 3>,
    scale: Tensor<B, 3>,
    shift: Tensor<B, 3>,
    eps: f64,
) -> Tensor<B, 3> {
    if !fused() {
        return adaln_unfused(x, scale, shift, eps);
    }
    let inputs: Triple<B> = (primitive(x), primitive(scale), primitive(shift));
    let eps32 = eps as f32;
    let inputs = match try_backend::<B, NdArray, _, Triple<Autodiff<NdArray>>, Triple<NdArray>>(
        inputs,
        |(x, s, t)| adaln::forward_autodiff::<NdArray, NoCheckpointing>(x, s, t, eps32),
        |(x, s, t)| adaln::forward_tensors::<NdArray>(&x, &s, &t, eps32).map(|(y, _)| y),
    ) {
        Ok(y) => return tensor(y),
        Err(inputs) => inputs,
    };
    #[cfg(feature = "flex")]
    let inputs = {
        use burn::backend::Flex;
        match try_backend::<B, Flex, _, Triple<Autodiff<Flex>>, Triple<Flex>>(
            inputs,
            |(x, s, t)| adaln::forward_autodiff::<Flex, NoCheckpointing>(x, s, t, eps32),
            |(x, s, t)| adaln::forward_tensors::<Flex>(&x, &s, &t, eps32).map(|(y, _)| y),
        ) {
            Ok(y) => return tensor(y),
            Err(inputs) => inputs,
        }
    };
    let (x, scale, shift) = inputs;
    adaln_unfused(tensor(x), tensor(scale), tensor(shift), eps)
}

/// [`adaln_modulate`] composed of burn ops.
fn adaln_unfused<B: Backend>(
    x: Tensor<B, 3>,
    scale: Tensor<B, 3>,
    shift: Tensor<B, 3>,
    eps: f64,
) -> Tensor<B, 3> {
    reference::normalize_last(x, eps) * (scale + 1.0) + shift
}

/// Scaled dot-product attention, as [`reference::attention_unfused`] computes it.
pub fn attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    score_bias: Option<Tensor<B, 4>>,
) -> Tensor<B, 4> {
    if !fused() {
        return attention_composed(q, k, v, score_bias);
    }
    let bias = score_bias.as_ref().map(|b| primitive(b.clone()));
    let inputs: Triple<B> = (primitive(q), primitive(k), primitive(v));
    let inputs = if cpu_kernels_apply() {
        let inputs = match attention_on::<B, NdArray>(inputs, bias.clone()) {
            Ok(out) => return tensor(out),
            Err(inputs) => inputs,
        };
        #[cfg(feature = "flex")]
        let inputs = match attention_on::<B, burn::backend::Flex>(inputs, bias.clone()) {
            Ok(out) => return tensor(out),
            Err(inputs) => inputs,
        };
        inputs
    } else {
        inputs
    };
    #[cfg(feature = "cuda")]
    let inputs = {
        type Fused = burn::backend::Cuda;
        type Plain = burn_cubecl::CubeBackend<cubecl_cuda::CudaRuntime, f32, i32, u8>;
        let inputs = match device_attention_on::<B, Fused>(inputs, bias.clone()) {
            Ok(out) => return tensor(out),
            Err(inputs) => inputs,
        };
        // Without burn's `fusion` feature the two are one type, already tried.
        if std::any::TypeId::of::<Fused>() == std::any::TypeId::of::<Plain>() {
            inputs
        } else {
            match device_attention_on::<B, Plain>(inputs, bias.clone()) {
                Ok(out) => return tensor(out),
                Err(inputs) => inputs,
            }
        }
    };
    let (q, k, v) = inputs;
    attention_composed(tensor(q), tensor(k), tensor(v), score_bias)
}

/// [`attention`] of burn's ops, its products in the autocast dtype.
fn attention_composed<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    score_bias: Option<Tensor<B, 4>>,
) -> Tensor<B, 4> {
    if autocast::casting() {
        autocast::attention(q, k, v, score_bias)
    } else {
        reference::attention_unfused(q, k, v, score_bias)
    }
}

/// [`attention`] as one autodiff node on the GPU backend `I` (`super::device_attention`), when
/// `B` is `Autodiff<I>` and the bias is a constant.
#[cfg(feature = "cuda")]
fn device_attention_on<B: Backend, I: Backend>(
    inputs: Triple<B>,
    bias: Option<FloatTensor<B>>,
) -> Result<FloatTensor<B>, Triple<B>> {
    use super::device_attention::attention_autodiff;
    let inputs = cast::<Triple<B>, Triple<Autodiff<I>>>(inputs)?;
    let bias = match bias.map(cast::<FloatTensor<B>, FloatTensor<Autodiff<I>>>) {
        None => None,
        Some(Ok(bias)) if !bias.is_tracked() => Some(bias.primitive),
        Some(_) => return Err(same(inputs)),
    };
    let (q, k, v) = inputs.clone();
    match attention_autodiff::<I, NoCheckpointing>(q, k, v, bias, autocast::product_dtype()) {
        Some(out) => Ok(same(out)),
        None => Err(same(inputs)),
    }
}

/// The padding bias as the fused kernels take it: `Ok(None)` without one, `Err(())` when it
/// cannot be used (tracked, or not a CPU tensor of `I`).
fn score_bias_on<B: Backend, I: CpuF32>(
    bias: Option<FloatTensor<B>>,
) -> Result<Option<fused_attention::ScoreBias>, ()> {
    // The bias must be a constant (a padding mask): its gradient is not computed here.
    let Some(bias) = bias else { return Ok(None) };
    let bias = match cast::<FloatTensor<B>, FloatTensor<Autodiff<I>>>(bias) {
        Ok(bias) if bias.is_tracked() => return Err(()),
        Ok(bias) => fused_attention::ScoreBias::from_tensor::<I>(&bias.primitive),
        Err(bias) => match cast::<FloatTensor<B>, FloatTensor<I>>(bias) {
            Ok(bias) => fused_attention::ScoreBias::from_tensor::<I>(&bias),
            Err(_) => return Err(()),
        },
    };
    bias.map(Some).ok_or(())
}

fn attention_on<B: Backend, I: CpuF32>(
    inputs: Triple<B>,
    bias: Option<FloatTensor<B>>,
) -> Result<FloatTensor<B>, Triple<B>> {
    let Ok(score_bias) = score_bias_on::<B, I>(bias) else {
        return Err(inputs);
    };
    try_backend::<B, I, _, Triple<Autodiff<I>>, Triple<I>>(
        inputs,
        |(q, k, v)| {
            fused_attention::forward_autodiff::<I, NoCheckpointing>(q, k, v, score_bias.as_ref())
        },
        |(q, k, v)| fused_attention::forward::<I>(q, k, v, score_bias.as_ref()),
    )
}

/// Self-attention of the packed projection `qkv` `[B, N, 3·dim]` (q, k, v blocks, heads inside
/// each, as the seed splits it) → `[B, N, dim]` with the heads merged. On the CPU backends one
/// op that reads q, k and v where they lie; elsewhere heads are split and merged by burn ops.
pub fn packed_self_attention<B: Backend>(qkv: Tensor<B, 3>, heads: usize) -> Tensor<B, 3> {
    let qkv = if cpu_kernels_apply() {
        let x = primitive(qkv);
        let x = match try_backend::<
            B,
            NdArray,
            _,
            FloatTensor<Autodiff<NdArray>>,
            FloatTensor<NdArray>,
        >(
            x,
            |x| token_attention::packed_autodiff::<NdArray, NoCheckpointing>(x, heads),
            |x| token_attention::packed_forward::<NdArray>(&x, heads),
        ) {
            Ok(y) => return tensor(y),
            Err(x) => x,
        };
        #[cfg(feature = "flex")]
        let x = {
            use burn::backend::Flex;
            match try_backend::<B, Flex, _, FloatTensor<Autodiff<Flex>>, FloatTensor<Flex>>(
                x,
                |x| token_attention::packed_autodiff::<Flex, NoCheckpointing>(x, heads),
                |x| token_attention::packed_forward::<Flex>(&x, heads),
            ) {
                Ok(y) => return tensor(y),
                Err(x) => x,
            }
        };
        tensor(x)
    } else {
        qkv
    };
    let [b, n, width] = qkv.dims();
    let head_dim = width / 3 / heads;
    // [B, N, 3, H, d] → [3, B, H, N, d].
    let qkv = qkv
        .reshape([b, n, 3, heads, head_dim])
        .permute([2, 0, 3, 1, 4]);
    let part = |i: usize| qkv.clone().narrow(0, i, 1).reshape([b, heads, n, head_dim]);
    reference::merge_heads(attention(part(0), part(1), part(2), None))
}

/// Attention of q `[B, N, H·d]` over k `[B, M, H·d]` and v `[B, M, H·dv]` (token-major, as the
/// linear layers give them) → `[B, N, H·dv]`, heads merged; `score_bias` as [`attention`]'s.
pub fn multi_head_attention<B: Backend>(
    q: Tensor<B, 3>,
    k: Tensor<B, 3>,
    v: Tensor<B, 3>,
    heads: usize,
    score_bias: Option<Tensor<B, 4>>,
) -> Tensor<B, 3> {
    let (q, k, v) = if cpu_kernels_apply() {
        let bias = score_bias.as_ref().map(|b| primitive(b.clone()));
        let inputs: Triple<B> = (primitive(q), primitive(k), primitive(v));
        let inputs = match separate_on::<B, NdArray>(inputs, bias.clone(), heads) {
            Ok(out) => return tensor(out),
            Err(inputs) => inputs,
        };
        #[cfg(feature = "flex")]
        let inputs = match separate_on::<B, burn::backend::Flex>(inputs, bias.clone(), heads) {
            Ok(out) => return tensor(out),
            Err(inputs) => inputs,
        };
        (tensor(inputs.0), tensor(inputs.1), tensor(inputs.2))
    } else {
        (q, k, v)
    };
    use reference::{merge_heads, split_heads};
    merge_heads(attention(
        split_heads(q, heads),
        split_heads(k, heads),
        split_heads(v, heads),
        score_bias,
    ))
}

fn separate_on<B: Backend, I: CpuF32>(
    inputs: Triple<B>,
    bias: Option<FloatTensor<B>>,
    heads: usize,
) -> Result<FloatTensor<B>, Triple<B>> {
    let Ok(score_bias) = score_bias_on::<B, I>(bias) else {
        return Err(inputs);
    };
    try_backend::<B, I, _, Triple<Autodiff<I>>, Triple<I>>(
        inputs,
        |(q, k, v)| {
            token_attention::separate_autodiff::<I, NoCheckpointing>(
                q,
                k,
                v,
                heads,
                score_bias.as_ref(),
            )
        },
        |(q, k, v)| token_attention::separate_forward::<I>(&q, &k, &v, heads, score_bias.as_ref()),
    )
}

type LinearInputs<B> = (FloatTensor<B>, FloatTensor<B>, Option<FloatTensor<B>>);

/// `x · weight + bias` over the last axis of `x`, as `burn::tensor::module::linear` (weight
/// `[d_in, d_out]`).
pub fn linear<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    weight: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
) -> Tensor<B, D> {
    if autocast::casting() {
        return autocast::linear(x, weight, bias);
    }
    if !fused() {
        return burn::tensor::module::linear(x, weight, bias);
    }
    let inputs: LinearInputs<B> = (primitive(x), primitive(weight), bias.map(primitive));
    let inputs =
        match try_backend::<B, NdArray, _, LinearInputs<Autodiff<NdArray>>, LinearInputs<NdArray>>(
            inputs,
            |(x, w, b)| fused_linear::forward_autodiff::<NdArray, NoCheckpointing>(x, w, b),
            |(x, w, b)| fused_linear::forward_tensors::<NdArray>(&x, &w, b.as_ref()),
        ) {
            Ok(y) => return tensor(y),
            Err(inputs) => inputs,
        };
    #[cfg(feature = "flex")]
    let inputs = {
        use burn::backend::Flex;
        match try_backend::<B, Flex, _, LinearInputs<Autodiff<Flex>>, LinearInputs<Flex>>(
            inputs,
            |(x, w, b)| fused_linear::forward_autodiff::<Flex, NoCheckpointing>(x, w, b),
            |(x, w, b)| fused_linear::forward_tensors::<Flex>(&x, &w, b.as_ref()),
        ) {
            Ok(y) => return tensor(y),
            Err(inputs) => inputs,
        }
    };
    let (x, weight, bias) = inputs;
    burn::tensor::module::linear(tensor(x), tensor(weight), bias.map(tensor))
}

/// A `burn::nn::Linear` layer through [`linear`].
pub fn linear_layer<B: Backend, const D: usize>(
    layer: &burn::nn::Linear<B>,
    x: Tensor<B, D>,
) -> Tensor<B, D> {
    linear(x, layer.weight.val(), layer.bias.as_ref().map(|b| b.val()))
}

/// `max(conv2d(x, weight) + bias, 0)` for inference, with no autodiff graph (zero padding, no
/// dilation, one group): on the kernels' CPU backends one multi-threaded matrix product per
/// group of images (`conv`), elsewhere burn's `conv2d`.
pub fn conv2d_relu<B: Backend>(
    x: Tensor<B, 4>,
    weight: Tensor<B, 4>,
    bias: Tensor<B, 1>,
    stride: [usize; 2],
    padding: [usize; 2],
) -> Tensor<B, 4> {
    let [batch, in_channels, height, width] = x.dims();
    let [out_channels, _, kh, kw] = weight.dims();
    let shape = conv::ConvShape {
        batch,
        in_channels,
        height,
        width,
        out_channels,
        kernel: [kh, kw],
        stride,
        padding,
    };
    let (x, weight, bias) = (primitive(x), primitive(weight), primitive(bias));
    if fused() && is_host_backend::<B>() {
        let output = match (
            host_values::<B>(&x),
            host_values::<B>(&weight),
            host_values::<B>(&bias),
        ) {
            (Some(x), Some(w), Some(b)) => Some(conv::forward(&x, &w, Some(&b), shape, true)),
            _ => None,
        };
        let [out_h, out_w] = shape.output_size();
        let dims = burn::tensor::Shape::new([batch, out_channels, out_h, out_w]);
        if let Some(y) = output.and_then(|values| host_tensor::<B>(values, dims)) {
            return tensor(y);
        }
    }
    let options = burn::tensor::ops::ConvOptions::new(stride, padding, [1, 1], 1);
    let y = burn::tensor::module::conv2d(tensor(x), tensor(weight), Some(tensor(bias)), options);
    burn::tensor::activation::relu(y)
}

/// `max_pool2d` (no dilation): on the kernels' CPU backends one plane per thread-pool task.
pub fn max_pool2d<B: Backend>(
    x: Tensor<B, 4>,
    kernel: [usize; 2],
    stride: [usize; 2],
    padding: [usize; 2],
) -> Tensor<B, 4> {
    host_pool(x, kernel, stride, padding, pool::Pool::Max).unwrap_or_else(|x| {
        burn::tensor::module::max_pool2d(x, kernel, stride, padding, [1, 1], false)
    })
}

/// `avg_pool2d` with `count_include_pad=False`: the mean of each window's cells inside the
/// image (TensorFlow's and pytorch-fid's pool branches).
pub fn avg_pool2d_valid<B: Backend>(
    x: Tensor<B, 4>,
    kernel: [usize; 2],
    stride: [usize; 2],
    padding: [usize; 2],
) -> Tensor<B, 4> {
    host_pool(x, kernel, stride, padding, pool::Pool::AverageValid).unwrap_or_else(|x| {
        burn::tensor::module::avg_pool2d(x, kernel, stride, padding, false, false)
    })
}

/// The host kernel's pooling, or `Err(x)` back when `B` is not one of its backends.
fn host_pool<B: Backend>(
    x: Tensor<B, 4>,
    kernel: [usize; 2],
    stride: [usize; 2],
    padding: [usize; 2],
    kind: pool::Pool,
) -> Result<Tensor<B, 4>, Tensor<B, 4>> {
    if !(fused() && is_host_backend::<B>()) {
        return Err(x);
    }
    let [batch, channels, height, width] = x.dims();
    let shape = pool::PoolShape {
        planes: batch * channels,
        height,
        width,
        kernel,
        stride,
        padding,
    };
    let x = primitive(x);
    let Some(values) = host_values::<B>(&x).map(|v| pool::forward(&v, shape, kind)) else {
        return Err(tensor(x));
    };
    let [out_h, out_w] = shape.output_size();
    let dims = burn::tensor::Shape::new([batch, channels, out_h, out_w]);
    host_tensor::<B>(values, dims)
        .map(tensor)
        .ok_or_else(|| tensor(x))
}
