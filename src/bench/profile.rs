//! `ditrun bench --profile`: where a training step of the seed model spends its time, by kind
//! of operation. Each kind is timed alone at the seed's exact shapes (forward, then backward
//! of its output's sum), multiplied by its calls per step, and set against a whole measured
//! step: what the kinds do not add up to is the autodiff graph's own work and the copies
//! between ops.

use std::time::Instant;

use burn::nn::{Linear, LinearConfig};
use burn::optim::{GradientsParams, Optimizer};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::Distribution;
use serde::Serialize;

use crate::model::layers::key_padding_bias;
use crate::model::TextDiTConfig;

#[derive(Clone, Debug, Serialize)]
pub struct OpProfile {
    pub kind: &'static str,
    /// The shapes timed, as a reader would write them.
    pub shape: String,
    pub calls_per_step: usize,
    /// Median of the timed repeats, one call.
    pub forward_ms: f64,
    pub backward_ms: f64,
    /// `(forward + backward) × calls`.
    pub step_ms: f64,
}

#[derive(Debug, Serialize)]
pub struct StepProfile {
    pub ops: Vec<OpProfile>,
    pub ops_total_ms: f64,
    /// The whole step's median, measured by `ditrun bench` just before.
    pub step_ms: f64,
    /// `step_ms − ops_total_ms`: graph bookkeeping, copies, everything not timed alone.
    pub unaccounted_ms: f64,
}

const REPEATS: usize = 5;

fn median(mut times: Vec<f64>) -> f64 {
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

fn round(ms: f64) -> f64 {
    (ms * 100.0).round() / 100.0
}

/// Times `op` on fresh graphs: the forward call, then the backward of its output's sum.
fn time<AB: AutodiffBackend, const D: usize>(op: impl Fn() -> Tensor<AB, D>) -> (f64, f64) {
    let device = AB::Device::default();
    let (mut forward, mut backward) = (Vec::new(), Vec::new());
    for repeat in 0..=REPEATS {
        let started = Instant::now();
        let out = op();
        AB::sync(&device).ok();
        let forward_s = started.elapsed().as_secs_f64();
        let loss = (out.clone() * out.ones_like().mul_scalar(0.5)).sum();
        let started = Instant::now();
        let grads = loss.backward();
        AB::sync(&device).ok();
        let backward_s = started.elapsed().as_secs_f64();
        drop(grads);
        // The first repeat warms allocators and caches.
        if repeat > 0 {
            forward.push(forward_s * 1e3);
            backward.push(backward_s * 1e3);
        }
    }
    (median(forward), median(backward))
}

fn normal<AB: AutodiffBackend, const D: usize>(shape: [usize; D]) -> Tensor<AB, D> {
    Tensor::random(
        shape,
        Distribution::Normal(0.0, 1.0),
        &AB::Device::default(),
    )
    .require_grad()
}

struct Profiler {
    ops: Vec<OpProfile>,
}

impl Profiler {
    fn add(
        &mut self,
        kind: &'static str,
        shape: String,
        calls: usize,
        (forward_ms, backward_ms): (f64, f64),
    ) {
        self.ops.push(OpProfile {
            kind,
            shape,
            calls_per_step: calls,
            forward_ms: round(forward_ms),
            backward_ms: round(backward_ms),
            step_ms: round((forward_ms + backward_ms) * calls as f64),
        });
    }
}

/// Profiles one training step of `config` at `batch` with `context_tokens` text tokens;
/// `step_ms` is the measured whole step to compare against.
pub fn profile<AB: AutodiffBackend>(
    config: &TextDiTConfig,
    batch: usize,
    context_tokens: usize,
    step_ms: f64,
) -> StepProfile {
    let shapes = Shapes::of(config, batch, context_tokens);
    let mut profiler = Profiler { ops: Vec::new() };
    profiler.linears::<AB>(&shapes);
    profiler.attention::<AB>(&shapes);
    profiler.elementwise::<AB>(&shapes);
    profiler.optimizer::<AB>(config);
    let ops_total_ms = round(profiler.ops.iter().map(|op| op.step_ms).sum());
    StepProfile {
        ops: profiler.ops,
        ops_total_ms,
        step_ms: round(step_ms),
        unaccounted_ms: round(step_ms - ops_total_ms),
    }
}

/// The sizes a training step of the model works on.
struct Shapes {
    batch: usize,
    dim: usize,
    heads: usize,
    depth: usize,
    /// Image tokens per sample, and over the batch.
    tokens: usize,
    rows: usize,
    cond: usize,
    hidden: usize,
    patch: usize,
    context_tokens: usize,
    context_dim: usize,
    text_rows: usize,
}

impl Shapes {
    fn of(config: &TextDiTConfig, batch: usize, context_tokens: usize) -> Self {
        let tokens = config.grid() * config.grid();
        Self {
            batch,
            dim: config.dim,
            heads: config.heads,
            depth: config.depth,
            tokens,
            rows: batch * tokens,
            cond: 4 * config.dim,
            hidden: (config.dim as f64 * config.mlp_ratio) as usize,
            patch: config.patch_size * config.patch_size * config.channels,
            context_tokens,
            context_dim: config.context_dim,
            text_rows: batch * context_tokens,
        }
    }
}

impl Profiler {
    fn linears<AB: AutodiffBackend>(&mut self, shapes: &Shapes) {
        let Shapes {
            batch,
            dim,
            depth,
            rows,
            cond,
            hidden,
            patch,
            context_dim,
            text_rows,
            ..
        } = *shapes;
        let device = AB::Device::default();
        // Linear layers (matmul + bias), by distinct shape: (rows, in, out, calls per step).
        let linears = [
            (rows, dim, 3 * dim, depth, "self-attention qkv"),
            (rows, dim, dim, 3 * depth, "attention outputs, cross q"),
            (rows, dim, hidden, depth, "MLP fc1"),
            (rows, hidden, dim, depth, "MLP fc2"),
            (text_rows, context_dim, dim, 2 * depth, "cross k, v"),
            (batch, cond, 2 * dim, 3 * depth, "adaLN projections"),
            (rows, patch, dim, 1, "patch embedding"),
            (rows, dim, patch, 1, "output head"),
            (text_rows, context_dim, context_dim, 1, "text projection"),
            (batch, dim, cond, 1, "time MLP 1"),
            (batch, cond, cond, 1, "time MLP 2"),
        ];
        for (m, k, n, calls, what) in linears {
            let layer: Linear<AB> = LinearConfig::new(k, n).init(&device);
            let x = normal::<AB, 2>([m, k]);
            self.add(
                "matmul (linear)",
                format!("{what}: [{m}, {k}] x [{k}, {n}]"),
                calls,
                time(|| crate::kernels::linear_layer(&layer, x.clone())),
            );
        }
    }

    fn attention<AB: AutodiffBackend>(&mut self, shapes: &Shapes) {
        let Shapes {
            batch,
            dim,
            heads,
            depth,
            tokens,
            context_tokens,
            ..
        } = *shapes;
        let device = AB::Device::default();
        // Attention as the model runs it: heads read from and written to the token-major rows of
        // the projections (no split or merge copies).
        let qkv = normal::<AB, 3>([batch, tokens, 3 * dim]);
        self.add(
            "attention core",
            format!(
                "self: packed qkv [{batch}, {tokens}, {}], {heads} heads",
                3 * dim
            ),
            depth,
            time(|| crate::kernels::packed_self_attention(qkv.clone(), heads)),
        );
        let q = normal::<AB, 3>([batch, tokens, dim]);
        let kv_cross = normal::<AB, 3>([batch, context_tokens, dim]);
        let mask = Tensor::<AB, 2, Int>::ones([batch, context_tokens], &device).equal_elem(1);
        let bias = key_padding_bias(mask);
        self.add(
            "attention core",
            format!("cross: [{batch}, {tokens}, {dim}] over [{batch}, {context_tokens}, {dim}], padding mask"),
            depth,
            time(|| crate::kernels::multi_head_attention(q.clone(), kv_cross.clone(), kv_cross.clone(), heads, Some(bias.clone()))),
        );
    }

    fn elementwise<AB: AutodiffBackend>(&mut self, shapes: &Shapes) {
        let Shapes {
            batch,
            dim,
            depth,
            tokens,
            cond,
            hidden,
            ..
        } = *shapes;
        // Element-wise and normalisation.
        let wide = normal::<AB, 3>([batch, tokens, hidden]);
        self.add(
            "GELU (erf)",
            format!("[{batch}, {tokens}, {hidden}]"),
            depth,
            time(|| crate::kernels::gelu(wide.clone())),
        );
        let x = normal::<AB, 3>([batch, tokens, dim]);
        let (scale, shift) = (
            normal::<AB, 3>([batch, 1, dim]),
            normal::<AB, 3>([batch, 1, dim]),
        );
        self.add(
            "LayerNorm + adaLN modulation",
            format!("[{batch}, {tokens}, {dim}]"),
            3 * depth,
            time(|| crate::kernels::adaln_modulate(x.clone(), scale.clone(), shift.clone(), 1e-5)),
        );
        let y = normal::<AB, 3>([batch, tokens, dim]);
        self.add(
            "residual add",
            format!("[{batch}, {tokens}, {dim}]"),
            3 * depth,
            time(|| x.clone() + y.clone()),
        );
        let small = normal::<AB, 2>([batch, cond]);
        self.add(
            "SiLU",
            format!("[{batch}, {cond}]"),
            1,
            time(|| crate::kernels::silu(small.clone())),
        );
    }

    fn optimizer<AB: AutodiffBackend>(&mut self, config: &TextDiTConfig) {
        let device = AB::Device::default();
        // AdamW over every parameter of the model, with gradients of the right shapes.
        let model = config
            .init::<AB>(&device)
            .expect("the seed config is valid");
        let params = model.num_params();
        let mut optimizer =
            crate::optim::AdamWSettings::bench().init::<AB, crate::model::TextConditionalDiT<AB>>();
        let mut model = Some(model);
        let mut times = Vec::new();
        for repeat in 0..=REPEATS {
            let current = model.take().expect("the model comes back from each step");
            let grads = GradientsParams::from_grads(gradients_of_ones(&current), &current);
            let started = Instant::now();
            let next = optimizer.step(1e-4, current, grads);
            AB::sync(&device).ok();
            if repeat > 0 {
                times.push(started.elapsed().as_secs_f64() * 1e3);
            }
            model = Some(next);
        }
        self.add(
            "optimizer (AdamW)",
            format!("{params} parameters"),
            1,
            (median(times), 0.0),
        );
    }
}

/// A gradient of ones for every parameter, by a backward pass through the parameters' sums.
fn gradients_of_ones<AB: AutodiffBackend>(
    model: &crate::model::TextConditionalDiT<AB>,
) -> AB::Gradients {
    let mut total: Option<Tensor<AB, 1>> = None;
    let mut add = |t: Tensor<AB, 1>| {
        total = Some(match total.take() {
            Some(sum) => sum + t,
            None => t,
        })
    };
    struct Summer<'a, AB: AutodiffBackend>(&'a mut dyn FnMut(Tensor<AB, 1>));
    impl<AB: AutodiffBackend> burn::module::ModuleVisitor<AB> for Summer<'_, AB> {
        fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<AB, D>>) {
            (self.0)(param.val().sum());
        }
    }
    model.visit(&mut Summer(&mut add));
    total.expect("the model has parameters").backward()
}

impl StepProfile {
    /// A Markdown table, grouped by kind.
    pub fn table(&self) -> String {
        let mut out = String::from("| kind | shape | calls/step | forward ms | backward ms | ms/step | share |\n|---|---|---|---|---|---|---|\n");
        for op in &self.ops {
            out += &format!(
                "| {} | {} | {} | {:.2} | {:.2} | {:.1} | {:.1}% |\n",
                op.kind,
                op.shape,
                op.calls_per_step,
                op.forward_ms,
                op.backward_ms,
                op.step_ms,
                100.0 * op.step_ms / self.step_ms
            );
        }
        let mut kinds: Vec<(&str, f64)> = Vec::new();
        for op in &self.ops {
            match kinds.iter_mut().find(|(kind, _)| *kind == op.kind) {
                Some((_, total)) => *total += op.step_ms,
                None => kinds.push((op.kind, op.step_ms)),
            }
        }
        out += "\n| kind | ms/step | share of the step |\n|---|---|---|\n";
        for (kind, total) in kinds {
            out += &format!(
                "| {kind} | {total:.1} | {:.1}% |\n",
                100.0 * total / self.step_ms
            );
        }
        out += &format!(
            "| not timed alone (graph, copies, loss, embedding lookup) | {:.1} | {:.1}% |\n| **whole step (measured)** | **{:.1}** | 100% |\n",
            self.unaccounted_ms,
            100.0 * self.unaccounted_ms / self.step_ms,
            self.step_ms
        );
        out
    }
}
