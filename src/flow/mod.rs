//! Flow matching: the training objective and the samplers that integrate the learned velocity
//! field from noise (t = 1) to data (t = 0), with classifier-free guidance.

mod loss;
mod sampler;

pub use loss::{drop_captions, flow_matching_loss, FlowBatch};
pub use sampler::{sample, sample_recording, CrossAttentionAtStep, Guidance, Sampler};
