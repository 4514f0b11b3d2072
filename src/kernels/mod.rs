//! Fused CPU kernels for the DiT's hot paths, each with its backward: linear layers on a
//! multi-threaded GEMM, exact GELU, SiLU, LayerNorm fused with the adaLN modulation, and
//! attention's scale + mask + softmax. burn
//! 0.21's CPU backends compose these from many small ops under autodiff (each a full pass over
//! memory, several single-threaded); here each is one vectorised pass split over the thread
//! pool. On other backends the same functions run burn's own ops (see `dispatch`).

mod adaln;
pub mod adamw;
pub mod blas;
mod attention;
pub mod autocast;
mod cpu;
mod device_attention;
mod dispatch;
mod elementwise;
mod linear;
mod token_attention;
pub mod math;

pub use dispatch::{
    adaln_modulate, attention, fused, multi_head_attention, packed_self_attention, gelu, host_tensor, host_values, is_host_backend, linear, linear_layer, set_fused, silu,
};
pub use device_attention::attention_autodiff;
pub use linear::{matmul, Matrix};
