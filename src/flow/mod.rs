//! Flow matching: the training objective, the samplers that integrate the learned velocity
//! field from noise (t = 1) to data (t = 0) with classifier-free guidance, and image
//! generation from prompts on top of them.
//!
//! Sits below `config`, `text`, `sample` and `train`: it names the model and nothing above it,
//! and takes captions' contexts through [`CaptionContexts`].

mod generate;
mod loss;
mod sampler;

pub use generate::{
    cfg_sweep, generate, generate_per_seed, generate_recording, CaptionContexts, GeneratedImage,
    SampleOptions,
};
pub use loss::{drop_captions, flow_matching_loss, FlowBatch};
pub use sampler::{
    sample, sample_recording, steps_for_times, CrossAttentionAtStep, Guidance, Sampler,
};
