//! Linear layers `y = x W + b` on the `gemm` crate: multi-threaded over the pool and with
//! kernels for the processor's widest vectors, where burn-ndarray calls a single-threaded
//! `matrixmultiply` per product. The backward is two more products (`dx = dy Wᵀ`,
//! `dW = xᵀ dy`) read through strides, so nothing is transposed in memory, and `db = Σ dy`.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::Autodiff;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Shape, TensorMetadata};
use gemm::Parallelism;
use rayon::prelude::*;

use super::cpu::CpuF32;

/// Below this many multiply-adds a product runs on the calling thread: splitting it costs
/// more than it saves.
const PARALLEL_WORK: usize = 1 << 21;

/// A row-major matrix or a transposed view of one: element (i, j) is at
/// `i * row_stride + j * column_stride`.
#[derive(Clone, Copy)]
pub struct Matrix<'a> {
    pub values: &'a [f32],
    pub rows: usize,
    pub columns: usize,
    pub row_stride: usize,
    pub column_stride: usize,
}

impl<'a> Matrix<'a> {
    pub fn row_major(values: &'a [f32], rows: usize, columns: usize) -> Self {
        assert_eq!(values.len(), rows * columns, "a {rows}×{columns} matrix");
        Self {
            values,
            rows,
            columns,
            row_stride: columns,
            column_stride: 1,
        }
    }

    pub fn transposed(self) -> Self {
        Self {
            rows: self.columns,
            columns: self.rows,
            row_stride: self.column_stride,
            column_stride: self.row_stride,
            ..self
        }
    }
}

/// Checks the shapes of `out = lhs · rhs` and settles the empty cases: `None` when there is
/// nothing left to multiply (`out` already holds the result), else `(m, k, n)`.
fn product_sizes(
    lhs: Matrix,
    rhs: Matrix,
    out: &mut [f32],
    accumulate: bool,
) -> Option<(usize, usize, usize)> {
    assert_eq!(lhs.columns, rhs.rows, "inner dimensions of a product");
    let (m, k, n) = (lhs.rows, lhs.columns, rhs.columns);
    assert_eq!(out.len(), m * n, "the product is {m}×{n}");
    if m == 0 || n == 0 || k == 0 {
        if !accumulate {
            out.fill(0.0);
        }
        return None;
    }
    Some((m, k, n))
}

/// `out = lhs · rhs` (or `out += lhs · rhs` when `accumulate`), `out` row-major.
pub fn matmul(lhs: Matrix, rhs: Matrix, out: &mut [f32], accumulate: bool) {
    if product_sizes(lhs, rhs, out, accumulate).is_some() {
        // SAFETY: `out` is an exclusive borrow of the product's size (checked above).
        unsafe { matmul_parallel(lhs, rhs, out.as_mut_ptr(), accumulate) };
    }
}

/// The multi-threaded product into `out`, sizes already checked and non-empty.
///
/// # Safety
/// `out` must be valid for writes (and reads when `accumulate`) of the `lhs.rows ×
/// rhs.columns` row-major product, overlapping neither operand.
unsafe fn matmul_parallel(lhs: Matrix, rhs: Matrix, out: *mut f32, accumulate: bool) {
    let (m, k, n) = (lhs.rows, lhs.columns, rhs.columns);
    if let Some(blas) = super::blas::blas() {
        // SAFETY: the caller's contract.
        if unsafe { blas.matmul(lhs, rhs, out, accumulate) }.is_some() {
            return;
        }
    }
    let parallelism = if m * n * k >= PARALLEL_WORK && rayon::current_num_threads() > 1 {
        Parallelism::Rayon(0)
    } else {
        Parallelism::None
    };
    // SAFETY: the caller's contract.
    unsafe { gemm_raw(lhs, rhs, out, n, accumulate, parallelism) };
}

/// A buffer of `len` values whose memory is not zero-filled first: at the model's sizes that
/// memset was 5 % of a training step, for values the product overwrites anyway.
fn unfilled(len: usize) -> Vec<std::mem::MaybeUninit<f32>> {
    let mut buffer = Vec::with_capacity(len);
    // SAFETY: `MaybeUninit` values need no initialisation.
    unsafe { buffer.set_len(len) };
    buffer
}

/// # Safety
/// Every value of `buffer` must have been written.
unsafe fn assume_filled(buffer: Vec<std::mem::MaybeUninit<f32>>) -> Vec<f32> {
    let mut buffer = std::mem::ManuallyDrop::new(buffer);
    // SAFETY: same allocation, layout and length; the caller vouches that all values are set.
    unsafe {
        Vec::from_raw_parts(
            buffer.as_mut_ptr().cast::<f32>(),
            buffer.len(),
            buffer.capacity(),
        )
    }
}

/// `lhs · rhs` as a new row-major buffer.
pub fn product(lhs: Matrix, rhs: Matrix) -> Vec<f32> {
    assert_eq!(lhs.columns, rhs.rows, "inner dimensions of a product");
    let (m, k, n) = (lhs.rows, lhs.columns, rhs.columns);
    if m == 0 || n == 0 || k == 0 {
        return vec![0.0; m * n];
    }
    let mut out = unfilled(m * n);
    // SAFETY: a fresh buffer of the product's size, written in full (no accumulate).
    unsafe {
        matmul_parallel(lhs, rhs, out.as_mut_ptr().cast::<f32>(), false);
        assume_filled(out)
    }
}

/// The `gemm` crate's product, shapes checked by the callers.
///
/// # Safety
/// `out` must be valid for writes (and reads when `accumulate`) of `lhs.rows` rows of
/// `rhs.columns` values, `out_row_stride` apart, overlapping neither operand.
unsafe fn gemm_raw(
    lhs: Matrix,
    rhs: Matrix,
    out: *mut f32,
    out_row_stride: usize,
    accumulate: bool,
    parallelism: Parallelism,
) {
    let (m, k, n) = (lhs.rows, lhs.columns, rhs.columns);
    // SAFETY: the operands' strides describe matrices inside their slices (`Matrix`), and the
    // caller vouches for `out`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out,
            1,
            out_row_stride as isize,
            accumulate,
            lhs.values.as_ptr(),
            lhs.column_stride as isize,
            lhs.row_stride as isize,
            rhs.values.as_ptr(),
            rhs.column_stride as isize,
            rhs.row_stride as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// [`matmul`] on the calling thread alone, for small products inside parallel loops.
pub fn matmul_serial(lhs: Matrix, rhs: Matrix, out: &mut [f32], accumulate: bool) {
    if product_sizes(lhs, rhs, out, accumulate).is_some() {
        // SAFETY: `out` is an exclusive borrow of the product's size (checked above).
        unsafe {
            gemm_raw(
                lhs,
                rhs,
                out.as_mut_ptr(),
                rhs.columns,
                accumulate,
                Parallelism::None,
            )
        }
    }
}

/// `out = lhs · rhs` (or `out += lhs · rhs`) on the calling thread, into a row-major matrix
/// whose rows are `out_row_stride` apart (a block of columns of a wider matrix).
///
/// # Safety
/// `out` must be valid for writes of `lhs.rows` rows of `rhs.columns` values, `out_row_stride`
/// apart, that no other thread touches meanwhile and that do not overlap `lhs` or `rhs`.
pub unsafe fn matmul_raw(
    lhs: Matrix,
    rhs: Matrix,
    out: *mut f32,
    out_row_stride: usize,
    accumulate: bool,
) {
    assert_eq!(lhs.columns, rhs.rows, "inner dimensions of a product");
    let (m, k, n) = (lhs.rows, lhs.columns, rhs.columns);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for row in 0..m {
                // SAFETY: inside the caller's rows.
                unsafe { std::ptr::write_bytes(out.add(row * out_row_stride), 0, n) };
            }
        }
        return;
    }
    // SAFETY: the caller's contract.
    unsafe { gemm_raw(lhs, rhs, out, out_row_stride, accumulate, Parallelism::None) }
}

/// `x [rows, k] · weight [k, n] + bias [n]`.
pub fn forward(x: &[f32], weight: &[f32], bias: Option<&[f32]>, k: usize, n: usize) -> Vec<f32> {
    let rows = x.len() / k;
    let (x, weight) = (
        Matrix::row_major(x, rows, k),
        Matrix::row_major(weight, k, n),
    );
    let Some(bias) = bias else {
        return product(x, weight);
    };
    let mut y = unfilled(rows * n);
    y.par_chunks_mut(n.max(1)).with_min_len(64).for_each(|row| {
        for (y, &b) in row.iter_mut().zip(bias) {
            y.write(b);
        }
    });
    // SAFETY: every row was set to the bias above.
    let mut y = unsafe { assume_filled(y) };
    matmul(x, weight, &mut y, true);
    y
}

#[derive(Debug)]
pub struct LinearBackward;

impl<B: CpuF32> Backward<B, 3> for LinearBackward {
    /// (x, weight): shared with the graph, not copied.
    type State = (FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [x_node, weight_node, bias_node] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (x, weight) = ops.state;
        let x_shape = x.shape();
        let [k, n] = weight.shape().dims::<2>();
        let rows = x_shape.num_elements() / k.max(1);
        B::with_f32(&grad, |dy| {
            let dy_matrix = Matrix::row_major(dy, rows, n);
            if let Some(node) = x_node {
                let dx = B::with_f32(&weight, |w| {
                    product(dy_matrix, Matrix::row_major(w, k, n).transposed())
                })
                .expect("the forward pass ran on f32");
                grads.register::<B>(node.id, B::from_f32(dx, x_shape.clone()));
            }
            if let Some(node) = weight_node {
                let dw = B::with_f32(&x, |x| {
                    product(Matrix::row_major(x, rows, k).transposed(), dy_matrix)
                })
                .expect("the forward pass ran on f32");
                grads.register::<B>(node.id, B::from_f32(dw, Shape::new([k, n])));
            }
            if let Some(node) = bias_node {
                grads.register::<B>(node.id, B::from_f32(column_sums(dy, n), Shape::new([n])));
            }
        })
        .expect("the gradient is f32");
    }
}

/// Σ over rows of a row-major `[rows, n]` matrix: blocks of rows in parallel, their partial
/// sums added in block order, so the result does not depend on how the pool split the work
/// (exact resume needs bit-identical gradients).
fn column_sums(values: &[f32], n: usize) -> Vec<f32> {
    let partials: Vec<Vec<f32>> = values
        .par_chunks(n * 256)
        .map(|block| {
            let mut sums = vec![0.0f32; n];
            for row in block.chunks(n) {
                for (s, &v) in sums.iter_mut().zip(row) {
                    *s += v;
                }
            }
            sums
        })
        .collect();
    let mut total = vec![0.0f32; n];
    for partial in partials {
        total.iter_mut().zip(partial).for_each(|(t, p)| *t += p);
    }
    total
}

/// `x · weight + bias` of plain tensors, `x` of any rank (the last axis is `k`).
pub fn forward_tensors<B: CpuF32>(
    x: &FloatTensor<B>,
    weight: &FloatTensor<B>,
    bias: Option<&FloatTensor<B>>,
) -> Option<FloatTensor<B>> {
    let [k, n] = weight.shape().dims::<2>();
    let mut shape = x.shape();
    let last = shape.num_dims() - 1;
    if shape[last] != k || bias.is_some_and(|b| b.shape().as_slice() != [n]) {
        return None;
    }
    let bias = match bias {
        Some(b) => Some(B::with_f32(b, |b| b.to_vec())?),
        None => None,
    };
    let y = B::with_f32(x, |x| {
        B::with_f32(weight, |w| forward(x, w, bias.as_deref(), k, n))
    })??;
    shape[last] = n;
    Some(B::from_f32(y, shape))
}

pub fn forward_autodiff<B: CpuF32, C: CheckpointStrategy>(
    x: FloatTensor<Autodiff<B, C>>,
    weight: FloatTensor<Autodiff<B, C>>,
    bias: Option<FloatTensor<Autodiff<B, C>>>,
) -> Option<FloatTensor<Autodiff<B, C>>> {
    let y = forward_tensors::<B>(
        &x.primitive,
        &weight.primitive,
        bias.as_ref().map(|b| &b.primitive),
    )?;
    let Some(bias) = bias else {
        return Some(
            match LinearNoBiasBackward
                .prepare::<C>([x.node.clone(), weight.node.clone()])
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => prep.finish((x.primitive, weight.primitive), y),
                OpsKind::UnTracked(prep) => prep.finish(y),
            },
        );
    };
    let nodes = [x.node.clone(), weight.node.clone(), bias.node.clone()];
    Some(
        match LinearBackward
            .prepare::<C>(nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish((x.primitive, weight.primitive), y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        },
    )
}

/// [`LinearBackward`] for a layer without bias.
#[derive(Debug)]
pub struct LinearNoBiasBackward;

impl<B: CpuF32> Backward<B, 2> for LinearNoBiasBackward {
    type State = (FloatTensor<B>, FloatTensor<B>);

    fn backward(
        self,
        ops: Ops<Self::State, 2>,
        grads: &mut Gradients,
        checkpointer: &mut Checkpointer,
    ) {
        let [x_node, weight_node] = ops.parents;
        let with_bias = Ops {
            parents: [x_node, weight_node, None],
            node: ops.node,
            state: ops.state,
        };
        <LinearBackward as Backward<B, 3>>::backward(
            LinearBackward,
            with_bias,
            grads,
            checkpointer,
        );
    }
}
