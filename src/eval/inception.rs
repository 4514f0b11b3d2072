//! pytorch-fid's FID Inception v3 (`fid_inception_v3`, the pool3 block), inference only: the
//! network whose 2048 features per image FID's statistics are computed from.
//!
//! Invariants:
//! - Input: `[N, C, H, W]` images with C = 1 or 3, values in [0, 1], any size. Grayscale is
//!   repeated over 3 channels; every image is resized bilinearly to 299×299 with PyTorch's
//!   `align_corners = false` (no antialiasing) and mapped to [-1, 1] by `2x - 1` — pytorch-fid's
//!   `resize_input` and `normalize_input`, so callers pass images as they are.
//! - Output: `[N, 2048]`, the global average of `Mixed_7c`; matches pytorch-fid 0.3.0 to under
//!   1e-5 relative (max abs error / max abs value; tests/eval_inception.rs allows 1e-4).
//! - Weights: pytorch-fid's names (`pt_inception-2015-12-05-6726825d.pth` converted to
//!   safetensors, `fc.*` unused). Every BatchNorm (eps 0.001, running statistics) is folded into
//!   its convolution's weight and a bias at load time, so a layer is one convolution and a ReLU.
//!   The folding happens in f64, leaving only the f32 rounding of the folded values.
//! - Generic over the burn backend; nothing here records gradients. Not a burn `Module`: load it
//!   on the device it is to run on.

use crate::kernels::{avg_pool2d_valid, conv2d_relu, max_pool2d};
use burn::prelude::*;

use crate::error::{Error, Result};
use crate::model::weights::SafetensorsFile;
use crate::storage::weights::resolve_weights;

/// Features per image (the channels of `Mixed_7c`).
pub const FEATURES: usize = 2048;
/// The side images are resized to before the network sees them.
pub const INPUT_SIZE: usize = 299;
/// TensorFlow's BatchNorm epsilon, kept by pytorch-fid.
const BATCH_NORM_EPS: f64 = 1e-3;

/// The FID Inception network with BatchNorm folded into its convolutions.
#[derive(Clone, Debug)]
pub struct FidInception<B: Backend> {
    /// `Conv2d_1a_3x3`, `Conv2d_2a_3x3`, `Conv2d_2b_3x3`, then a max pool.
    stem_a: Branch<B>,
    /// `Conv2d_3b_1x1`, `Conv2d_4a_3x3`, then a max pool.
    stem_b: Branch<B>,
    mixed_5: Vec<InceptionA<B>>,
    mixed_6a: InceptionB<B>,
    mixed_6: Vec<InceptionC<B>>,
    mixed_7a: InceptionD<B>,
    mixed_7b: InceptionE<B>,
    mixed_7c: InceptionE<B>,
    parameters: usize,
}

impl<B: Backend> FidInception<B> {
    /// Loads the weights from any location [`resolve_weights`] accepts (local path, `file://`,
    /// `hf://`, object-store URL).
    pub fn load(weights: &str, device: &B::Device) -> Result<Self> {
        let path = resolve_weights(weights)?;
        Self::from_file(&SafetensorsFile::read(&path)?, device)
    }

    /// Builds the network from an opened weights file; errors name the file and the first
    /// missing or mis-shaped tensor.
    pub fn from_file(file: &SafetensorsFile, device: &B::Device) -> Result<Self> {
        let mut weights = Weights::<B> {
            file,
            device,
            parameters: 0,
        };
        let w = &mut weights;
        let stem_a = Branch::load(
            w,
            "",
            &[
                ("Conv2d_1a_3x3", conv(3, 32, 3).strided()),
                ("Conv2d_2a_3x3", conv(32, 32, 3)),
                ("Conv2d_2b_3x3", conv(32, 64, 3).same()),
            ],
        )?;
        let stem_b = Branch::load(
            w,
            "",
            &[
                ("Conv2d_3b_1x1", conv(64, 80, 1)),
                ("Conv2d_4a_3x3", conv(80, 192, 3)),
            ],
        )?;
        let mixed_5 = vec![
            InceptionA::load(w, "Mixed_5b", 192, 32)?,
            InceptionA::load(w, "Mixed_5c", 256, 64)?,
            InceptionA::load(w, "Mixed_5d", 288, 64)?,
        ];
        let mixed_6a = InceptionB::load(w, "Mixed_6a", 288)?;
        let mixed_6 = vec![
            InceptionC::load(w, "Mixed_6b", 128)?,
            InceptionC::load(w, "Mixed_6c", 160)?,
            InceptionC::load(w, "Mixed_6d", 160)?,
            InceptionC::load(w, "Mixed_6e", 192)?,
        ];
        let mixed_7a = InceptionD::load(w, "Mixed_7a")?;
        let mixed_7b = InceptionE::load(w, "Mixed_7b", 1280, PoolKind::AverageValid)?;
        let mixed_7c = InceptionE::load(w, "Mixed_7c", 2048, PoolKind::Max)?;
        Ok(Self {
            stem_a,
            stem_b,
            mixed_5,
            mixed_6a,
            mixed_6,
            mixed_7a,
            mixed_7b,
            mixed_7c,
            parameters: weights.parameters,
        })
    }

    /// The PyTorch model's parameters that were loaded: convolution weights and BatchNorm
    /// scales and shifts (not the running statistics, not `fc`). 21,785,568 for FID Inception.
    pub fn parameter_count(&self) -> usize {
        self.parameters
    }

    /// pool3 features: `[N, C, H, W]` images (C = 1 or 3, values in [0, 1], any size) →
    /// `[N, 2048]`.
    ///
    /// # Panics
    /// If C is neither 1 nor 3.
    pub fn features(&self, images: Tensor<B, 4>) -> Tensor<B, 2> {
        let x = preprocess(images);
        let x = max_pool_3x3_stride_2(self.stem_a.forward(x));
        let mut x = max_pool_3x3_stride_2(self.stem_b.forward(x));
        for block in &self.mixed_5 {
            x = block.forward(x);
        }
        x = self.mixed_6a.forward(x);
        for block in &self.mixed_6 {
            x = block.forward(x);
        }
        x = self.mixed_7a.forward(x);
        x = self.mixed_7b.forward(x);
        x = self.mixed_7c.forward(x);
        let [batch, channels, _, _] = x.dims();
        x.flatten::<3>(2, 3).mean_dim(2).reshape([batch, channels])
    }
}

/// pytorch-fid's input transform: grayscale to RGB, bilinear resize to 299×299, `2x - 1`.
fn preprocess<B: Backend>(images: Tensor<B, 4>) -> Tensor<B, 4> {
    let channels = images.dims()[1];
    let rgb = match channels {
        3 => images,
        1 => images.repeat_dim(1, 3),
        _ => panic!("FID Inception takes images with 1 or 3 channels, got {channels}"),
    };
    resize_bilinear(rgb, INPUT_SIZE, INPUT_SIZE) * 2.0 - 1.0
}

/// `F.interpolate(mode="bilinear", align_corners=False)` (no antialiasing) as two matrix
/// products, `out = Ry · image · Rxᵀ`: PyTorch's sampling on every backend, whatever corner
/// convention a backend's own interpolation kernel has. Images must be at least 1×1.
pub fn resize_bilinear<B: Backend>(
    images: Tensor<B, 4>,
    height: usize,
    width: usize,
) -> Tensor<B, 4> {
    let [batch, channels, in_height, in_width] = images.dims();
    let device = images.device();
    let rows = interpolation_matrix::<B>(in_height, height, &device);
    let columns = interpolation_matrix::<B>(in_width, width, &device);
    let planes = batch * channels;
    // Along x: [planes·H, W] · Rxᵀ → [planes·H, width].
    let x = images
        .reshape([planes * in_height, in_width])
        .matmul(columns.transpose());
    // Along y on the transposed planes: [planes·width, H] · Ryᵀ → [planes·width, height].
    let y = x
        .reshape([planes, in_height, width])
        .swap_dims(1, 2)
        .reshape([planes * width, in_height])
        .matmul(rows.transpose());
    y.reshape([planes, width, height])
        .swap_dims(1, 2)
        .reshape([batch, channels, height, width])
}

/// `[output, input]` weights of PyTorch's bilinear (align_corners = false) sampling along one
/// axis, computed in f32 as PyTorch's CPU kernel does so the weights round the same way.
fn interpolation_matrix<B: Backend>(
    input: usize,
    output: usize,
    device: &B::Device,
) -> Tensor<B, 2> {
    assert!(input > 0, "cannot resize an empty image");
    let scale = input as f32 / output as f32;
    let mut weights = vec![0f32; output * input];
    for (dst, row) in weights.chunks_mut(input).enumerate() {
        // Pixel centres: the source of the first output pixels would lie before pixel 0, and
        // PyTorch clamps it there.
        let source = (scale * (dst as f32 + 0.5) - 0.5).max(0.0);
        let lower = (source as usize).min(input - 1);
        let upper = (lower + 1).min(input - 1);
        let upper_weight = (source - lower as f32).clamp(0.0, 1.0);
        row[lower] += 1.0 - upper_weight;
        row[upper] += upper_weight;
    }
    Tensor::from_data(TensorData::new(weights, [output, input]), device)
}

fn max_pool_3x3_stride_2<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    max_pool2d(x, [3, 3], [2, 2], [0, 0])
}

/// The pool branches of the FID blocks: TensorFlow's average pool leaves the zero padding out of
/// its count, and `Mixed_7c` max-pools (the 2015 graph's quirk, kept for comparable scores).
#[derive(Clone, Copy, Debug)]
enum PoolKind {
    AverageValid,
    Max,
}

impl PoolKind {
    fn apply<B: Backend>(self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        match self {
            PoolKind::AverageValid => avg_pool2d_valid(x, [3, 3], [1, 1], [1, 1]),
            // Inputs are ReLU outputs (≥ 0), so padding never wins the max.
            PoolKind::Max => max_pool2d(x, [3, 3], [1, 1], [1, 1]),
        }
    }
}

/// The geometry of one `BasicConv2d`, checked against the weights file.
#[derive(Clone, Copy, Debug)]
struct ConvShape {
    in_channels: usize,
    out_channels: usize,
    kernel: [usize; 2],
    stride: usize,
    padding: [usize; 2],
}

/// A square, stride-1, unpadded convolution.
fn conv(in_channels: usize, out_channels: usize, kernel: usize) -> ConvShape {
    ConvShape {
        in_channels,
        out_channels,
        kernel: [kernel, kernel],
        stride: 1,
        padding: [0, 0],
    }
}

/// A 1×k convolution keeping the size (torchvision's `(1, 7)` with padding `(0, 3)`).
fn conv_row(in_channels: usize, out_channels: usize, kernel: usize) -> ConvShape {
    ConvShape {
        kernel: [1, kernel],
        ..conv(in_channels, out_channels, 1)
    }
    .same()
}

/// A k×1 convolution keeping the size.
fn conv_column(in_channels: usize, out_channels: usize, kernel: usize) -> ConvShape {
    ConvShape {
        kernel: [kernel, 1],
        ..conv(in_channels, out_channels, 1)
    }
    .same()
}

impl ConvShape {
    /// Padding that keeps the spatial size at stride 1.
    fn same(self) -> Self {
        Self {
            padding: self.kernel.map(|k| k / 2),
            ..self
        }
    }

    fn strided(self) -> Self {
        Self { stride: 2, ..self }
    }

    fn weight_dims(&self) -> [usize; 4] {
        let [kh, kw] = self.kernel;
        [self.out_channels, self.in_channels, kh, kw]
    }
}

/// `BasicConv2d` (conv without bias, BatchNorm, ReLU) with the BatchNorm folded in.
#[derive(Clone, Debug)]
struct ConvBnRelu<B: Backend> {
    weight: Tensor<B, 4>,
    bias: Tensor<B, 1>,
    stride: [usize; 2],
    padding: [usize; 2],
}

impl<B: Backend> ConvBnRelu<B> {
    /// On the CPU backends one matrix product per group of images (`kernels::conv2d_relu`):
    /// burn-ndarray's direct convolution runs on one thread at a tenth of the product's speed.
    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        conv2d_relu(
            x,
            self.weight.clone(),
            self.bias.clone(),
            self.stride,
            self.padding,
        )
    }
}

/// Reads tensors by pytorch-fid's names and counts the parameters taken.
struct Weights<'a, B: Backend> {
    file: &'a SafetensorsFile,
    device: &'a B::Device,
    parameters: usize,
}

impl<B: Backend> Weights<'_, B> {
    /// `name` as f32 values, which must have exactly `shape`.
    fn values(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let data = self.file.tensor(name)?;
        if data.shape.as_slice() != shape {
            return Err(Error::TensorShape {
                file: self.file.name.clone(),
                name: name.to_string(),
                expected: shape.to_vec(),
                found: data.shape.to_vec(),
            });
        }
        data.convert::<f32>()
            .into_vec::<f32>()
            .map_err(|e| Error::Safetensors {
                file: self.file.name.clone(),
                reason: format!("tensor `{name}`: {e:?}"),
            })
    }

    /// `{name}.conv.weight` and `{name}.bn.*`, folded: `w' = w·γ/√(σ²+ε)`,
    /// `b' = β − μ·γ/√(σ²+ε)`.
    fn conv(&mut self, name: &str, shape: ConvShape) -> Result<ConvBnRelu<B>> {
        let channels = [shape.out_channels];
        let weight = self.values(&format!("{name}.conv.weight"), &shape.weight_dims())?;
        let gamma = self.values(&format!("{name}.bn.weight"), &channels)?;
        let beta = self.values(&format!("{name}.bn.bias"), &channels)?;
        let mean = self.values(&format!("{name}.bn.running_mean"), &channels)?;
        let variance = self.values(&format!("{name}.bn.running_var"), &channels)?;
        self.parameters += weight.len() + gamma.len() + beta.len();

        let scale: Vec<f64> = gamma
            .iter()
            .zip(&variance)
            .map(|(&g, &v)| g as f64 / (v as f64 + BATCH_NORM_EPS).sqrt())
            .collect();
        let per_output = weight.len() / shape.out_channels;
        let folded_weight: Vec<f32> = weight
            .chunks(per_output)
            .zip(&scale)
            .flat_map(|(kernel, &s)| kernel.iter().map(move |&w| (w as f64 * s) as f32))
            .collect();
        let folded_bias: Vec<f32> = (0..shape.out_channels)
            .map(|c| (beta[c] as f64 - mean[c] as f64 * scale[c]) as f32)
            .collect();
        Ok(ConvBnRelu {
            weight: Tensor::from_data(
                TensorData::new(folded_weight, shape.weight_dims()),
                self.device,
            ),
            bias: Tensor::from_data(TensorData::new(folded_bias, channels), self.device),
            stride: [shape.stride; 2],
            padding: shape.padding,
        })
    }
}

/// Convolutions applied one after the other.
#[derive(Clone, Debug)]
struct Branch<B: Backend>(Vec<ConvBnRelu<B>>);

impl<B: Backend> Branch<B> {
    /// Loads `{prefix}.{name}` for each layer (`name` alone when `prefix` is empty).
    fn load(weights: &mut Weights<B>, prefix: &str, layers: &[(&str, ConvShape)]) -> Result<Self> {
        layers
            .iter()
            .map(|&(name, shape)| {
                let full = if prefix.is_empty() {
                    name.to_string()
                } else {
                    format!("{prefix}.{name}")
                };
                weights.conv(&full, shape)
            })
            .collect::<Result<_>>()
            .map(Self)
    }

    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        self.0.iter().fold(x, |x, layer| layer.forward(x))
    }
}

/// `Mixed_5b..5d` (FIDInceptionA): 35×35 blocks with 1×1, 5×5, double 3×3 and pool branches.
#[derive(Clone, Debug)]
struct InceptionA<B: Backend> {
    branch1x1: Branch<B>,
    branch5x5: Branch<B>,
    branch3x3dbl: Branch<B>,
    branch_pool: Branch<B>,
}

impl<B: Backend> InceptionA<B> {
    fn load(w: &mut Weights<B>, prefix: &str, inputs: usize, pool_features: usize) -> Result<Self> {
        Ok(Self {
            branch1x1: Branch::load(w, prefix, &[("branch1x1", conv(inputs, 64, 1))])?,
            branch5x5: Branch::load(
                w,
                prefix,
                &[
                    ("branch5x5_1", conv(inputs, 48, 1)),
                    ("branch5x5_2", conv(48, 64, 5).same()),
                ],
            )?,
            branch3x3dbl: Branch::load(
                w,
                prefix,
                &[
                    ("branch3x3dbl_1", conv(inputs, 64, 1)),
                    ("branch3x3dbl_2", conv(64, 96, 3).same()),
                    ("branch3x3dbl_3", conv(96, 96, 3).same()),
                ],
            )?,
            branch_pool: Branch::load(
                w,
                prefix,
                &[("branch_pool", conv(inputs, pool_features, 1))],
            )?,
        })
    }

    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let pooled = PoolKind::AverageValid.apply(x.clone());
        Tensor::cat(
            vec![
                self.branch1x1.forward(x.clone()),
                self.branch5x5.forward(x.clone()),
                self.branch3x3dbl.forward(x),
                self.branch_pool.forward(pooled),
            ],
            1,
        )
    }
}

/// `Mixed_6a` (InceptionB): 35×35 → 17×17 by strided 3×3 branches and a max pool.
#[derive(Clone, Debug)]
struct InceptionB<B: Backend> {
    branch3x3: Branch<B>,
    branch3x3dbl: Branch<B>,
}

impl<B: Backend> InceptionB<B> {
    fn load(w: &mut Weights<B>, prefix: &str, inputs: usize) -> Result<Self> {
        Ok(Self {
            branch3x3: Branch::load(w, prefix, &[("branch3x3", conv(inputs, 384, 3).strided())])?,
            branch3x3dbl: Branch::load(
                w,
                prefix,
                &[
                    ("branch3x3dbl_1", conv(inputs, 64, 1)),
                    ("branch3x3dbl_2", conv(64, 96, 3).same()),
                    ("branch3x3dbl_3", conv(96, 96, 3).strided()),
                ],
            )?,
        })
    }

    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        Tensor::cat(
            vec![
                self.branch3x3.forward(x.clone()),
                self.branch3x3dbl.forward(x.clone()),
                max_pool_3x3_stride_2(x),
            ],
            1,
        )
    }
}

/// `Mixed_6b..6e` (FIDInceptionC): 17×17 blocks with factorised 7×7 branches of `c7` channels.
#[derive(Clone, Debug)]
struct InceptionC<B: Backend> {
    branch1x1: Branch<B>,
    branch7x7: Branch<B>,
    branch7x7dbl: Branch<B>,
    branch_pool: Branch<B>,
}

impl<B: Backend> InceptionC<B> {
    const INPUTS: usize = 768;

    fn load(w: &mut Weights<B>, prefix: &str, c7: usize) -> Result<Self> {
        let inputs = Self::INPUTS;
        Ok(Self {
            branch1x1: Branch::load(w, prefix, &[("branch1x1", conv(inputs, 192, 1))])?,
            branch7x7: Branch::load(
                w,
                prefix,
                &[
                    ("branch7x7_1", conv(inputs, c7, 1)),
                    ("branch7x7_2", conv_row(c7, c7, 7)),
                    ("branch7x7_3", conv_column(c7, 192, 7)),
                ],
            )?,
            branch7x7dbl: Branch::load(
                w,
                prefix,
                &[
                    ("branch7x7dbl_1", conv(inputs, c7, 1)),
                    ("branch7x7dbl_2", conv_column(c7, c7, 7)),
                    ("branch7x7dbl_3", conv_row(c7, c7, 7)),
                    ("branch7x7dbl_4", conv_column(c7, c7, 7)),
                    ("branch7x7dbl_5", conv_row(c7, 192, 7)),
                ],
            )?,
            branch_pool: Branch::load(w, prefix, &[("branch_pool", conv(inputs, 192, 1))])?,
        })
    }

    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let pooled = PoolKind::AverageValid.apply(x.clone());
        Tensor::cat(
            vec![
                self.branch1x1.forward(x.clone()),
                self.branch7x7.forward(x.clone()),
                self.branch7x7dbl.forward(x),
                self.branch_pool.forward(pooled),
            ],
            1,
        )
    }
}

/// `Mixed_7a` (InceptionD): 17×17 → 8×8.
#[derive(Clone, Debug)]
struct InceptionD<B: Backend> {
    branch3x3: Branch<B>,
    branch7x7x3: Branch<B>,
}

impl<B: Backend> InceptionD<B> {
    fn load(w: &mut Weights<B>, prefix: &str) -> Result<Self> {
        let inputs = InceptionC::<B>::INPUTS;
        Ok(Self {
            branch3x3: Branch::load(
                w,
                prefix,
                &[
                    ("branch3x3_1", conv(inputs, 192, 1)),
                    ("branch3x3_2", conv(192, 320, 3).strided()),
                ],
            )?,
            branch7x7x3: Branch::load(
                w,
                prefix,
                &[
                    ("branch7x7x3_1", conv(inputs, 192, 1)),
                    ("branch7x7x3_2", conv_row(192, 192, 7)),
                    ("branch7x7x3_3", conv_column(192, 192, 7)),
                    ("branch7x7x3_4", conv(192, 192, 3).strided()),
                ],
            )?,
        })
    }

    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        Tensor::cat(
            vec![
                self.branch3x3.forward(x.clone()),
                self.branch7x7x3.forward(x.clone()),
                max_pool_3x3_stride_2(x),
            ],
            1,
        )
    }
}

/// `Mixed_7b` (FIDInceptionE_1) and `Mixed_7c` (FIDInceptionE_2): 8×8 blocks whose 3×3
/// branches split into 1×3 and 3×1 halves; they differ only in their pool.
#[derive(Clone, Debug)]
struct InceptionE<B: Backend> {
    branch1x1: Branch<B>,
    branch3x3_1: Branch<B>,
    branch3x3_2: [Branch<B>; 2],
    branch3x3dbl_12: Branch<B>,
    branch3x3dbl_3: [Branch<B>; 2],
    branch_pool: Branch<B>,
    pool: PoolKind,
}

impl<B: Backend> InceptionE<B> {
    fn load(w: &mut Weights<B>, prefix: &str, inputs: usize, pool: PoolKind) -> Result<Self> {
        let one = |w: &mut Weights<B>, name: &str, shape| Branch::load(w, prefix, &[(name, shape)]);
        Ok(Self {
            branch1x1: one(w, "branch1x1", conv(inputs, 320, 1))?,
            branch3x3_1: one(w, "branch3x3_1", conv(inputs, 384, 1))?,
            branch3x3_2: [
                one(w, "branch3x3_2a", conv_row(384, 384, 3))?,
                one(w, "branch3x3_2b", conv_column(384, 384, 3))?,
            ],
            branch3x3dbl_12: Branch::load(
                w,
                prefix,
                &[
                    ("branch3x3dbl_1", conv(inputs, 448, 1)),
                    ("branch3x3dbl_2", conv(448, 384, 3).same()),
                ],
            )?,
            branch3x3dbl_3: [
                one(w, "branch3x3dbl_3a", conv_row(384, 384, 3))?,
                one(w, "branch3x3dbl_3b", conv_column(384, 384, 3))?,
            ],
            branch_pool: one(w, "branch_pool", conv(inputs, 192, 1))?,
            pool,
        })
    }

    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let split = |halves: &[Branch<B>; 2], x: Tensor<B, 4>| {
            Tensor::cat(vec![halves[0].forward(x.clone()), halves[1].forward(x)], 1)
        };
        let branch3x3 = split(&self.branch3x3_2, self.branch3x3_1.forward(x.clone()));
        let branch3x3dbl = split(
            &self.branch3x3dbl_3,
            self.branch3x3dbl_12.forward(x.clone()),
        );
        let pooled = self.pool.apply(x.clone());
        Tensor::cat(
            vec![
                self.branch1x1.forward(x),
                branch3x3,
                branch3x3dbl,
                self.branch_pool.forward(pooled),
            ],
            1,
        )
    }
}
