//! Averaging gradients over ranks as PyTorch DDP does: flattened into buckets of a fixed size
//! (default 25 MB), each bucket one collective, in the module's parameter order, which is the
//! same on every rank.

use std::time::{Duration, Instant};

use burn::module::{AutodiffModule, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;

use super::collective::Collective;
use crate::error::Result;

/// Replaces every gradient in `grads` by its mean over the ranks and returns the time spent
/// in the collectives. A parameter without a gradient on this rank contributes zeros, so the
/// buckets line up on every rank.
pub fn average_gradients<AB: AutodiffBackend, M: AutodiffModule<AB>>(
    module: &M,
    grads: &mut GradientsParams,
    collective: &dyn Collective,
    bucket_bytes: usize,
) -> Result<Duration> {
    if collective.world_size() == 1 {
        return Ok(Duration::ZERO);
    }
    let inner = module.valid();
    let mut take = TakeFlat::<AB::InnerBackend> { grads, flat: Vec::new(), backend: std::marker::PhantomData };
    inner.visit(&mut take);
    let flat = take.flat;

    let bucket_len = (bucket_bytes / std::mem::size_of::<f32>()).max(1);
    let mut reduced: Vec<Vec<f32>> = Vec::with_capacity(flat.len());
    let mut in_collectives = Duration::ZERO;
    let mut start = 0;
    let mut bucket_number = 0;
    while start < flat.len() {
        // A bucket holds whole parameters, at least one, and at most `bucket_len` values
        // unless a single parameter is larger.
        let mut end = start + 1;
        let mut len = flat[start].1.len();
        while end < flat.len() && len + flat[end].1.len() <= bucket_len {
            len += flat[end].1.len();
            end += 1;
        }
        let mut bucket = Vec::with_capacity(len);
        for (_, values) in &flat[start..end] {
            bucket.extend_from_slice(values);
        }
        let began = Instant::now();
        collective.all_reduce_mean(&mut bucket, &format!("gradient all-reduce (bucket {bucket_number})"))?;
        in_collectives += began.elapsed();
        let mut offset = 0;
        for (_, values) in &flat[start..end] {
            reduced.push(bucket[offset..offset + values.len()].to_vec());
            offset += values.len();
        }
        start = end;
        bucket_number += 1;
    }

    let device = inner.devices().into_iter().next().unwrap_or_default();
    let mut put = PutBack::<AB::InnerBackend> {
        grads: take.grads,
        reduced: flat.iter().map(|(id, _)| *id).zip(reduced).collect(),
        device,
    };
    inner.visit(&mut put);
    Ok(in_collectives)
}

struct TakeFlat<'a, B: Backend> {
    grads: &'a mut GradientsParams,
    flat: Vec<(ParamId, Vec<f32>)>,
    backend: std::marker::PhantomData<B>,
}

impl<B: Backend> ModuleVisitor<B> for TakeFlat<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let values = match self.grads.remove::<B, D>(param.id) {
            Some(grad) => grad.into_data().convert::<f32>().into_vec::<f32>().expect("f32 data"),
            None => vec![0.0; param.shape().num_elements()],
        };
        self.flat.push((param.id, values));
    }
}

struct PutBack<'a, B: Backend> {
    grads: &'a mut GradientsParams,
    reduced: std::collections::HashMap<ParamId, Vec<f32>>,
    device: B::Device,
}

impl<B: Backend> ModuleVisitor<B> for PutBack<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let values = self.reduced.remove(&param.id).expect("every parameter was reduced");
        let grad = Tensor::<B, D>::from_data(TensorData::new(values, param.shape()), &self.device);
        self.grads.register::<B, D>(param.id, grad);
    }
}

/// sha256 (hex) of every parameter's bits in visiting order: equal on two ranks exactly when
/// their parameters are bit-identical.
pub fn parameter_digest<B: Backend, M: burn::module::Module<B>>(module: &M) -> String {
    use sha2::{Digest, Sha256};
    struct Hash(Sha256);
    impl<B: Backend> ModuleVisitor<B> for Hash {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let data = param.val().into_data().convert::<f32>();
            for value in data.as_slice::<f32>().expect("f32 data") {
                self.0.update(value.to_bits().to_le_bytes());
            }
        }
    }
    let mut hash = Hash(Sha256::new());
    module.visit(&mut hash);
    hex::encode(hash.0.finalize())
}
