//! Fused CPU kernels for the DiT's hot paths, each with its backward: linear layers on a
//! multi-threaded GEMM, exact GELU, SiLU, LayerNorm fused with the adaLN modulation, and
//! attention's scale + mask + softmax. burn
//! 0.21's CPU backends compose these from many small ops under autodiff (each a full pass over
//! memory, several single-threaded); here each is one vectorised pass split over the thread
//! pool. On other backends the same functions run burn's own ops (see `dispatch`), composed
//! in `reference`, which is also what the kernels are tested against. This module sits below
//! the model: it takes tensors and never names the model's types.

mod adaln;
pub mod adamw;
mod attention;
pub mod autocast;
pub mod blas;
mod conv;
mod cpu;
mod device_attention;
mod dispatch;
mod elementwise;
mod linear;
pub mod math;
mod pool;
pub mod reference;
mod token_attention;

pub use device_attention::attention_autodiff;
pub use dispatch::{
    adaln_modulate, attention, avg_pool2d_valid, conv2d_relu, fused, gelu, host_tensor,
    host_values, is_host_backend, linear, linear_layer, max_pool2d, multi_head_attention,
    packed_self_attention, set_fused, silu,
};
pub use linear::{matmul, Matrix};
