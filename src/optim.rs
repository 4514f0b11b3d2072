//! AdamW as PyTorch's `fused=True` does it: on the CPU backends every parameter's update is one
//! vectorised, multi-threaded pass over contiguous moment buffers (one for each moment, every
//! parameter at its own offset) instead of burn's ~10 tensor ops per parameter tensor. Other
//! backends keep burn's `AdamW`.
//!
//! Invariants:
//! - The maths is burn's `AdamW`, op for op in f32 (`kernels::adamw`): a run gives the same
//!   bits with either (tested over many steps).
//! - The state's record is burn's `OptimizerAdaptor<AdamW>` record (moments per parameter id,
//!   with their step count), so checkpoints written before this optimizer load into it, and
//!   its checkpoints load into burn's.
//! - A parameter without a gradient in a step keeps its value and its state, as with burn.

use std::collections::HashMap;
use std::marker::PhantomData;

use burn::module::{AutodiffModule, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::record::AdaptorRecord;
use burn::optim::{
    AdamW, AdamWConfig, AdamWState, AdaptiveMomentumState, GradientsParams, MultiGradientsParams,
    Optimizer,
};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Shape, TensorMetadata, TensorPrimitive};
use rayon::prelude::*;

use crate::kernels::adamw::{adamw_update, AdamWStep};
use crate::kernels::{host_tensor, host_values, is_host_backend};

/// Elements per parallel task.
const CHUNK: usize = 64 * 1024;

/// AdamW's hyper-parameters (burn's defaults are not PyTorch's: every field is set by callers).
#[derive(Clone, Copy, Debug)]
pub struct AdamWSettings {
    pub beta_1: f32,
    pub beta_2: f32,
    pub epsilon: f32,
    pub weight_decay: f32,
}

impl AdamWSettings {
    /// PyTorch's `AdamW(lr, weight_decay=0.01)` defaults, which `torch_baseline.py` uses.
    pub fn bench() -> Self {
        Self {
            beta_1: 0.9,
            beta_2: 0.999,
            epsilon: 1e-8,
            weight_decay: 0.01,
        }
    }

    fn burn_config(&self) -> AdamWConfig {
        AdamWConfig::new()
            .with_beta_1(self.beta_1)
            .with_beta_2(self.beta_2)
            .with_epsilon(self.epsilon)
            .with_weight_decay(self.weight_decay)
    }

    /// The fused optimizer on the CPU backends, burn's elsewhere.
    pub fn init<B: AutodiffBackend, M: AutodiffModule<B>>(&self) -> FusedAdamW<M, B> {
        let engine = if is_host_backend::<B::InnerBackend>() {
            Engine::Host(HostAdamW {
                settings: *self,
                states: HashMap::new(),
                first: Vec::new(),
                second: Vec::new(),
            })
        } else {
            Engine::Burn(Box::new(self.burn_config().init::<B, M>()))
        };
        FusedAdamW {
            engine,
            _module: PhantomData,
        }
    }
}

/// burn's own AdamW record (a hashbrown map of parameter id to moments).
type BurnRecord<M, B> = <OptimizerAdaptor<AdamW, M, B> as Optimizer<M, B>>::Record;

pub struct FusedAdamW<M: AutodiffModule<B>, B: AutodiffBackend> {
    engine: Engine<M, B>,
    _module: PhantomData<M>,
}

enum Engine<M: AutodiffModule<B>, B: AutodiffBackend> {
    Host(HostAdamW),
    Burn(Box<OptimizerAdaptor<AdamW, M, B>>),
}

impl<M: AutodiffModule<B>, B: AutodiffBackend> Clone for FusedAdamW<M, B> {
    fn clone(&self) -> Self {
        let engine = match &self.engine {
            Engine::Host(host) => Engine::Host(host.clone()),
            Engine::Burn(burn) => Engine::Burn(burn.clone()),
        };
        Self {
            engine,
            _module: PhantomData,
        }
    }
}

impl<M: AutodiffModule<B>, B: AutodiffBackend> FusedAdamW<M, B> {
    /// Whether the fused host pass runs (false: burn's AdamW).
    pub fn is_fused(&self) -> bool {
        matches!(self.engine, Engine::Host(_))
    }
}

/// One parameter's place in the moment buffers.
#[derive(Clone, Debug)]
struct ParamState {
    offset: usize,
    /// The parameter's shape: its record keeps the parameter's rank, as burn's does.
    dims: Vec<usize>,
    /// Steps taken (burn's `time`).
    time: usize,
}

impl ParamState {
    fn len(&self) -> usize {
        self.dims.iter().product()
    }
}

#[derive(Clone)]
struct HostAdamW {
    settings: AdamWSettings,
    states: HashMap<ParamId, ParamState>,
    first: Vec<f32>,
    second: Vec<f32>,
}

/// A parameter and its gradient, flattened, on the inner backend.
struct Entry<B: Backend> {
    id: ParamId,
    value: FloatTensor<B>,
    grad: Option<FloatTensor<B>>,
}

impl HostAdamW {
    /// The state of `id` (`len` values), placed at the end of the buffers when new.
    fn state_of(&mut self, id: ParamId, dims: Vec<usize>) -> ParamState {
        let offset = self.first.len();
        let len: usize = dims.iter().product();
        let state = self
            .states
            .entry(id)
            .or_insert_with(|| ParamState {
                offset,
                dims,
                time: 0,
            })
            .clone();
        assert_eq!(
            state.len(),
            len,
            "the optimizer state of parameter {id} has another size than the parameter"
        );
        if state.offset == offset {
            self.first.resize(offset + len, 0.0);
            self.second.resize(offset + len, 0.0);
        }
        state
    }

    /// New values for every entry with a gradient (in entry order), the moments updated.
    fn update<B: Backend>(&mut self, lr: f64, entries: &[Entry<B>]) -> Vec<Option<Vec<f32>>> {
        let settings = self.settings;
        let mut work = Vec::new();
        for entry in entries {
            let Some(grad) = &entry.grad else { continue };
            let mut state = self.state_of(entry.id, entry.value.shape().as_slice().to_vec());
            state.time += 1;
            self.states.insert(entry.id, state.clone());
            let step = AdamWStep::new(
                settings.beta_1,
                settings.beta_2,
                settings.epsilon,
                settings.weight_decay,
                lr,
                state.time,
            );
            let value = primitive_values::<B>(&entry.value);
            let grad = primitive_values::<B>(grad);
            work.push((state, step, value, grad));
        }
        // Parameters in offset order, so the moment buffers split into disjoint slices.
        let mut order: Vec<usize> = (0..work.len()).collect();
        order.sort_by_key(|&i| work[i].0.offset);
        let mut outputs: Vec<Vec<f32>> = work
            .iter()
            .map(|(state, ..)| vec![0.0f32; state.len()])
            .collect();
        {
            let mut tasks = Vec::new();
            let (mut first, mut second) = (&mut self.first[..], &mut self.second[..]);
            let mut consumed = 0;
            let mut out_slots: Vec<Option<&mut Vec<f32>>> = outputs.iter_mut().map(Some).collect();
            for &i in &order {
                let (state, step, value, grad) = &work[i];
                let skip = state.offset - consumed;
                let (_, rest) = std::mem::take(&mut first).split_at_mut(skip);
                let (mine_first, rest) = rest.split_at_mut(state.len());
                first = rest;
                let (_, rest) = std::mem::take(&mut second).split_at_mut(skip);
                let (mine_second, rest) = rest.split_at_mut(state.len());
                second = rest;
                consumed = state.offset + state.len();
                let out = out_slots[i].take().expect("each entry once");
                for ((((out, value), grad), m), v) in out
                    .chunks_mut(CHUNK)
                    .zip(value.chunks(CHUNK))
                    .zip(grad.chunks(CHUNK))
                    .zip(mine_first.chunks_mut(CHUNK))
                    .zip(mine_second.chunks_mut(CHUNK))
                {
                    tasks.push((step, value, grad, m, v, out));
                }
            }
            tasks
                .into_par_iter()
                .for_each(|(step, value, grad, m, v, out)| {
                    adamw_update(step, value, grad, m, v, out)
                });
        }
        let mut outputs = outputs.into_iter();
        entries
            .iter()
            .map(|entry| {
                entry
                    .grad
                    .as_ref()
                    .map(|_| outputs.next().expect("one output per gradient"))
            })
            .collect()
    }

    fn to_record<M: AutodiffModule<B>, B: AutodiffBackend>(&self) -> BurnRecord<M, B> {
        let device = Default::default();
        self.states
            .iter()
            .map(|(&id, state)| {
                let range = state.offset..state.offset + state.len();
                let moments = FlatMoments {
                    time: state.time,
                    first: self.first[range.clone()].to_vec(),
                    second: self.second[range].to_vec(),
                };
                (id, record_of::<B>(moments, &state.dims, &device))
            })
            .collect()
    }

    /// Takes burn's record: every parameter's moments, whatever their rank, flattened.
    fn load_record<M: AutodiffModule<B>, B: AutodiffBackend>(&mut self, record: BurnRecord<M, B>) {
        self.states.clear();
        self.first.clear();
        self.second.clear();
        let mut entries: Vec<_> = record.into_iter().collect();
        entries.sort_by_key(|(id, _)| id.val());
        for (id, record) in entries {
            let (time, dims, first, second) = flatten_record::<B>(record);
            let offset = self.first.len();
            self.first.extend_from_slice(&first);
            self.second.extend_from_slice(&second);
            self.states.insert(id, ParamState { offset, dims, time });
        }
    }
}

/// One parameter's state, flattened.
struct FlatMoments {
    time: usize,
    first: Vec<f32>,
    second: Vec<f32>,
}

/// burn's record of one parameter of shape `dims`.
fn record_of<B: AutodiffBackend>(
    moments: FlatMoments,
    dims: &[usize],
    device: &burn::tensor::Device<B::InnerBackend>,
) -> AdaptorRecord<AdamW, B> {
    fn at_rank<B: AutodiffBackend, const D: usize>(
        FlatMoments {
            time,
            first,
            second,
        }: FlatMoments,
        dims: &[usize],
        device: &burn::tensor::Device<B::InnerBackend>,
    ) -> AdaptorRecord<AdamW, B> {
        let tensor = |values: Vec<f32>| {
            Tensor::<B::InnerBackend, D>::from_data(TensorData::new(values, dims.to_vec()), device)
        };
        let momentum = AdaptiveMomentumState {
            time,
            moment_1: tensor(first),
            moment_2: tensor(second),
            max_moment_2: None,
        };
        AdaptorRecord::from_state(AdamWState { momentum })
    }
    match dims.len() {
        0 => at_rank::<B, 0>(moments, dims, device),
        1 => at_rank::<B, 1>(moments, dims, device),
        2 => at_rank::<B, 2>(moments, dims, device),
        3 => at_rank::<B, 3>(moments, dims, device),
        4 => at_rank::<B, 4>(moments, dims, device),
        5 => at_rank::<B, 5>(moments, dims, device),
        6 => at_rank::<B, 6>(moments, dims, device),
        7 => at_rank::<B, 7>(moments, dims, device),
        8 => at_rank::<B, 8>(moments, dims, device),
        rank => panic!("burn's optimizer records hold parameters of rank 8 at most, not {rank}"),
    }
}

/// The step count, shape and both moments of one parameter's record, flattened.
fn flatten_record<B: AutodiffBackend>(
    record: AdaptorRecord<AdamW, B>,
) -> (usize, Vec<usize>, Vec<f32>, Vec<f32>) {
    fn flat<B: Backend, const D: usize>(
        state: AdamWState<B, D>,
    ) -> (usize, Vec<usize>, Vec<f32>, Vec<f32>) {
        let m = state.momentum;
        let dims = m.moment_1.dims().to_vec();
        let values = |t: Tensor<B, D>| {
            t.into_data()
                .convert::<f32>()
                .into_vec::<f32>()
                .expect("f32 moments")
        };
        (m.time, dims, values(m.moment_1), values(m.moment_2))
    }
    use burn::optim::record::AdaptorRecordV1 as V1;
    let AdaptorRecord::V1(record) = record;
    match record {
        V1::Rank0(s) => flat(s),
        V1::Rank1(s) => flat(s),
        V1::Rank2(s) => flat(s),
        V1::Rank3(s) => flat(s),
        V1::Rank4(s) => flat(s),
        V1::Rank5(s) => flat(s),
        V1::Rank6(s) => flat(s),
        V1::Rank7(s) => flat(s),
        V1::Rank8(s) => flat(s),
    }
}

fn primitive_values<B: Backend>(t: &FloatTensor<B>) -> std::borrow::Cow<'_, [f32]> {
    host_values::<B>(t).expect("the fused AdamW runs on f32 CPU tensors")
}

impl<M: AutodiffModule<B>, B: AutodiffBackend> Optimizer<M, B> for FusedAdamW<M, B> {
    type Record = BurnRecord<M, B>;

    fn step(&mut self, lr: f64, module: M, mut grads: GradientsParams) -> M {
        let host = match &mut self.engine {
            Engine::Burn(burn) => return burn.step(lr, module, grads),
            Engine::Host(host) => host,
        };
        let mut collect = Collect::<B> {
            grads: &mut grads,
            entries: Vec::new(),
        };
        module.visit(&mut collect);
        let entries = collect.entries;
        let updated = host.update(lr, &entries);
        let values = entries
            .into_iter()
            .zip(updated)
            .map(|(e, v)| (e.id, v))
            .collect();
        let mut replace = Replace::<B> {
            values,
            _backend: PhantomData,
        };
        module.map(&mut replace)
    }

    fn step_multi(&mut self, lr: f64, module: M, grads: MultiGradientsParams) -> M {
        match &mut self.engine {
            Engine::Burn(burn) => burn.step_multi(lr, module, grads),
            Engine::Host(_) => {
                panic!("the fused AdamW takes one device's gradients (ditrun averages them itself)")
            }
        }
    }

    fn to_record(&self) -> Self::Record {
        match &self.engine {
            Engine::Host(host) => host.to_record::<M, B>(),
            Engine::Burn(burn) => burn.to_record(),
        }
    }

    fn load_record(mut self, record: Self::Record) -> Self {
        self.engine = match self.engine {
            Engine::Host(mut host) => {
                host.load_record::<M, B>(record);
                Engine::Host(host)
            }
            Engine::Burn(burn) => Engine::Burn(Box::new(burn.load_record(record))),
        };
        self
    }
}

/// Every float parameter, flattened, with its gradient taken out of `grads`.
struct Collect<'a, B: AutodiffBackend> {
    grads: &'a mut GradientsParams,
    entries: Vec<Entry<B::InnerBackend>>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Collect<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let value = param.val().inner().into_primitive().tensor();
        let grad = self
            .grads
            .remove::<B::InnerBackend, D>(param.id)
            .map(|g| g.into_primitive().tensor());
        self.entries.push(Entry {
            id: param.id,
            value,
            grad,
        });
    }
}

/// Puts the updated values in place, keeping ids and `require_grad`.
struct Replace<B: AutodiffBackend> {
    values: HashMap<ParamId, Option<Vec<f32>>>,
    _backend: PhantomData<B>,
}

impl<B: AutodiffBackend> ModuleMapper<B> for Replace<B> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        let Some(Some(values)) = self.values.remove(&id) else {
            return Param::from_mapped_value(id, tensor, mapper);
        };
        let shape: Shape = tensor.shape();
        let require_grad = tensor.is_require_grad();
        let inner = host_tensor::<B::InnerBackend>(values, shape).expect("a CPU backend");
        let mut updated =
            Tensor::<B, D>::from_inner(Tensor::from_primitive(TensorPrimitive::Float(inner)));
        if require_grad {
            updated = updated.require_grad();
        }
        Param::from_mapped_value(id, updated, mapper)
    }
}
