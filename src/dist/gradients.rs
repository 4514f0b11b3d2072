//! Averaging gradients over ranks as PyTorch DDP does: flattened into buckets of a fixed size
//! (default 25 MB), each bucket one collective, in the module's parameter order, which is the
//! same on every rank. With NCCL the buckets stay on the GPU; otherwise they go through host
//! memory.

use std::collections::HashMap;
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
    let mut take = TakeFlat::<AB::InnerBackend> {
        grads,
        flat: Vec::new(),
    };
    inner.visit(&mut take);
    let flat = std::mem::take(&mut take.flat);

    let bucket_len = (bucket_bytes / std::mem::size_of::<f32>()).max(1);
    let mut reduced: HashMap<ParamId, Tensor<AB::InnerBackend, 1>> =
        HashMap::with_capacity(flat.len());
    let mut in_collectives = Duration::ZERO;
    let mut pending = flat.into_iter().peekable();
    let mut bucket_number = 0;
    while pending.peek().is_some() {
        // A bucket holds whole parameters, at least one, and at most `bucket_len` values
        // unless a single parameter is larger.
        let mut ids = Vec::new();
        let mut parts = Vec::new();
        let mut len = 0;
        while let Some((_, next)) = pending.peek() {
            let n = next.dims()[0];
            if !parts.is_empty() && len + n > bucket_len {
                break;
            }
            let (id, tensor) = pending.next().expect("peeked");
            ids.push(id);
            parts.push(tensor);
            len += n;
        }
        let what = format!("gradient all-reduce (bucket {bucket_number}, {len} values)");
        let began = Instant::now();
        let averaged = reduce_bucket(parts, collective, &what)?;
        in_collectives += began.elapsed();
        reduced.extend(ids.into_iter().zip(averaged));
        bucket_number += 1;
    }
    inner.visit(&mut PutBack::<AB::InnerBackend> {
        grads: take.grads,
        reduced,
    });
    Ok(in_collectives)
}

/// The mean over ranks of one bucket of flat tensors, returned in the same pieces: in place
/// on the GPU when the transport and backend allow (one buffer per bucket), else gathered
/// into one host buffer. Each piece is read once, while this function owns it: a tensor
/// that shares its storage would be copied element by element first.
pub fn reduce_bucket<B: Backend>(
    parts: Vec<Tensor<B, 1>>,
    collective: &dyn Collective,
    what: &str,
) -> Result<Vec<Tensor<B, 1>>> {
    let lens: Vec<usize> = parts.iter().map(|t| t.dims()[0]).collect();
    let Some(device) = parts.first().map(Tensor::device) else {
        return Ok(parts);
    };
    #[cfg(feature = "cuda")]
    if let Some(device_reduce) = collective.device() {
        let bucket = Tensor::cat(parts, 0);
        // `cat` wrote a fresh buffer that nothing else uses; NCCL must see it finished.
        B::sync(&device).map_err(|e| crate::Error::Distributed(format!("{what}: {e:?}")))?;
        if let Some((address, _keep_alive)) = super::nccl::device_address(&bucket) {
            unsafe { device_reduce.all_reduce_mean_device(address, bucket.dims()[0], what)? };
            return Ok(split_like(bucket, &lens));
        }
        return reduce_on_host(split_like(bucket, &lens), &lens, &device, collective, what);
    }
    reduce_on_host(parts, &lens, &device, collective, what)
}

fn reduce_on_host<B: Backend>(
    parts: Vec<Tensor<B, 1>>,
    lens: &[usize],
    device: &B::Device,
    collective: &dyn Collective,
    what: &str,
) -> Result<Vec<Tensor<B, 1>>> {
    let mut values = Vec::with_capacity(lens.iter().sum());
    for part in parts {
        values.extend(
            part.into_data()
                .convert::<f32>()
                .into_vec::<f32>()
                .expect("f32 data"),
        );
    }
    collective.all_reduce_mean(&mut values, what)?;
    let mut offset = 0;
    Ok(lens
        .iter()
        .map(|&n| {
            let piece = values[offset..offset + n].to_vec();
            offset += n;
            Tensor::from_data(TensorData::new(piece, [n]), device)
        })
        .collect())
}

/// The bucket cut back into pieces of `lens` values (views, no copies).
#[cfg(feature = "cuda")]
fn split_like<B: Backend>(bucket: Tensor<B, 1>, lens: &[usize]) -> Vec<Tensor<B, 1>> {
    let mut offset = 0;
    lens.iter()
        .map(|&n| {
            let piece = bucket.clone().narrow(0, offset, n);
            offset += n;
            piece
        })
        .collect()
}

struct TakeFlat<'a, B: Backend> {
    grads: &'a mut GradientsParams,
    flat: Vec<(ParamId, Tensor<B, 1>)>,
}

impl<B: Backend> ModuleVisitor<B> for TakeFlat<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let count = param.shape().num_elements();
        let flat = match self.grads.remove::<B, D>(param.id) {
            Some(grad) => grad.reshape([count]),
            None => Tensor::zeros([count], &param.device()),
        };
        self.flat.push((param.id, flat));
    }
}

struct PutBack<'a, B: Backend> {
    grads: &'a mut GradientsParams,
    reduced: HashMap<ParamId, Tensor<B, 1>>,
}

impl<B: Backend> ModuleVisitor<B> for PutBack<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let flat = self
            .reduced
            .remove(&param.id)
            .expect("every parameter was reduced");
        self.grads
            .register::<B, D>(param.id, flat.reshape(param.shape()));
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
