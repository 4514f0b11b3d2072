//! AdamW as PyTorch's `fused=True` does it: the moments live in one flat buffer per moment,
//! every parameter at its own offset, and a step is a few passes over whole buffers instead of
//! burn's ~10 tensor ops per parameter tensor (thousands of kernel launches per step on a GPU).
//! Three engines, picked by `AdamWSettings::init`:
//! - host (the CPU backends): one vectorised, multi-threaded pass over host buffers.
//! - device (every other backend, i.e. CUDA): the buffers are device tensors and a step is
//!   written in burn's tensor ops: the gradients and the parameters are copied into flat
//!   tensors (one copy per parameter: CubeCL's `cat` is one `slice_assign` per input), AdamW
//!   runs as ~15 elementwise ops on them whatever the number of parameters, and each parameter
//!   gets back a view of its slice of the result. It costs a few model-sized buffers more at the
//!   peak than burn's per-tensor loop (flat parameters, gradients and temporaries at once).
//! - burn (`init_burn`, or any backend while ditrun's fused kernels are off): burn's own
//!   `OptimizerAdaptor<AdamW>`, the reference.
//!
//! Invariants:
//! - The maths is burn's `AdamW`, op for op in f32 (`kernels::adamw` on the host, the same ops
//!   in the same order on whole tensors on the device): a run gives the same bits with any
//!   engine (tested over many steps on the CPU backends).
//! - The bias corrections are scalars per pass, so the device engine runs one pass per
//!   distinct step count among the parameters with a gradient: one pass normally, more only
//!   after steps where some parameters had no gradient (the parameters then sit in several
//!   runs of the buffers, gathered and scattered per run, not per parameter).
//! - Device offsets are padded to `DEVICE_ALIGN_BYTES`, so slicing the flat result is mostly a
//!   view on CUDA: the parameters then share one buffer (burn never writes in place into a
//!   shared buffer). The padding holds whatever the allocator left: only elementwise ops touch
//!   it, and nothing reads it out.
//! - The state's record is burn's `OptimizerAdaptor<AdamW>` record (moments per parameter id,
//!   with their step count) for every engine, so a checkpoint written by any engine (or before
//!   this optimizer existed) loads into any other.
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

    /// The host pass on the CPU backends, the flat device engine on the others, burn's own
    /// `AdamW` when ditrun's fused kernels are off (`ditrun bench --unfused` compares).
    pub fn init<B: AutodiffBackend, M: AutodiffModule<B>>(&self) -> FusedAdamW<M, B> {
        if !crate::kernels::fused() {
            self.init_burn()
        } else if is_host_backend::<B::InnerBackend>() {
            FusedAdamW::new(Engine::Host(HostAdamW {
                settings: *self,
                states: HashMap::new(),
                first: Vec::new(),
                second: Vec::new(),
            }))
        } else {
            self.init_device()
        }
    }

    /// The flat device engine whatever the backend (on the CPU backends: to test it there).
    pub fn init_device<B: AutodiffBackend, M: AutodiffModule<B>>(&self) -> FusedAdamW<M, B> {
        FusedAdamW::new(Engine::Device(DeviceAdamW::new(*self)))
    }

    /// burn's `OptimizerAdaptor<AdamW>`, the reference the others are compared with.
    pub fn init_burn<B: AutodiffBackend, M: AutodiffModule<B>>(&self) -> FusedAdamW<M, B> {
        FusedAdamW::new(Engine::Burn(Box::new(self.burn_config().init::<B, M>())))
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
    Device(DeviceAdamW<B::InnerBackend>),
    Burn(Box<OptimizerAdaptor<AdamW, M, B>>),
}

impl<M: AutodiffModule<B>, B: AutodiffBackend> Clone for FusedAdamW<M, B> {
    fn clone(&self) -> Self {
        let engine = match &self.engine {
            Engine::Host(host) => Engine::Host(host.clone()),
            Engine::Device(device) => Engine::Device(device.clone()),
            Engine::Burn(burn) => Engine::Burn(burn.clone()),
        };
        Self {
            engine,
            _module: PhantomData,
        }
    }
}

impl<M: AutodiffModule<B>, B: AutodiffBackend> FusedAdamW<M, B> {
    fn new(engine: Engine<M, B>) -> Self {
        Self {
            engine,
            _module: PhantomData,
        }
    }

    /// Whether one of ditrun's flat engines runs (false: burn's AdamW).
    pub fn is_fused(&self) -> bool {
        !matches!(self.engine, Engine::Burn(_))
    }

    /// The engine that runs: `"host"`, `"device"` or `"burn"`.
    pub fn kind(&self) -> &'static str {
        match self.engine {
            Engine::Host(_) => "host",
            Engine::Device(_) => "device",
            Engine::Burn(_) => "burn",
        }
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
                let tensor = |values: &[f32]| {
                    let data = TensorData::new(values.to_vec(), [values.len()]);
                    Tensor::<B::InnerBackend, 1>::from_data(data, &device)
                };
                let (first, second) = (
                    tensor(&self.first[range.clone()]),
                    tensor(&self.second[range]),
                );
                (id, record_of::<B>(state.time, first, second, &state.dims))
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
            let FlatRecord {
                time,
                dims,
                first,
                second,
            } = flatten_record::<B>(record);
            let offset = self.first.len();
            self.first.extend(tensor_values(first));
            self.second.extend(tensor_values(second));
            self.states.insert(id, ParamState { offset, dims, time });
        }
    }
}

/// Bytes every parameter's slice of the device engine's flat buffers starts at a multiple of.
/// CubeCL's CUDA runtime allocates at 512 bytes and slices a buffer without a copy only where
/// both ends of the slice fall on that alignment: with this padding, handing a parameter its
/// slice is a view whenever its length is a multiple of 128 f32 (almost all of the DiT's, its
/// widths being multiples of 128), a one-launch copy otherwise. Other runtimes align to a
/// divisor of 512.
const DEVICE_ALIGN_BYTES: usize = 512;

/// First and second moment, flat.
type Moments<B> = (Tensor<B, 1>, Tensor<B, 1>);

/// The device engine: both moments as flat tensors on the parameters' device, each parameter
/// at its own (aligned) offset, updated by whole-buffer tensor ops.
#[derive(Clone)]
struct DeviceAdamW<B: Backend> {
    settings: AdamWSettings,
    /// `offset` is in elements of the flat buffers; each parameter spans `span(len)` of them.
    states: HashMap<ParamId, ParamState>,
    /// First and second moment, `len` elements each; `None` while no parameter has state.
    moments: Option<Moments<B>>,
    len: usize,
    /// Elements per alignment unit, set by the dtype of the first parameter placed.
    align: usize,
}

/// A parameter with a gradient, both flattened, on the inner backend.
struct DeviceEntry<B: Backend> {
    id: ParamId,
    dims: Vec<usize>,
    value: Tensor<B, 1>,
    grad: Tensor<B, 1>,
}

/// The parameters updated together: all had taken `time` steps before this one.
struct Group<B: Backend> {
    time: usize,
    /// (global offset, local offset, entry), in global offset order.
    members: Vec<(usize, usize, DeviceEntry<B>)>,
    len: usize,
}

impl<B: Backend> DeviceAdamW<B> {
    fn new(settings: AdamWSettings) -> Self {
        Self {
            settings,
            states: HashMap::new(),
            moments: None,
            len: 0,
            align: 0,
        }
    }

    /// Elements a parameter of `len` values takes in the flat buffers.
    fn span(&self, len: usize) -> usize {
        len.div_ceil(self.align) * self.align
    }

    fn set_align(&mut self, dtype: burn::tensor::DType) {
        if self.align == 0 {
            self.align = (DEVICE_ALIGN_BYTES / dtype.size()).max(1);
        }
    }

    /// The state of `id`, placed at the end of the buffers when new (its moments are only
    /// read from the buffers once it has taken a step, so nothing is written there now).
    fn state_of(&mut self, id: ParamId, dims: &[usize]) -> ParamState {
        let len: usize = dims.iter().product();
        let state = match self.states.get(&id) {
            Some(state) => state.clone(),
            None => {
                let state = ParamState {
                    offset: self.len,
                    dims: dims.to_vec(),
                    time: 0,
                };
                self.len += self.span(len);
                self.states.insert(id, state.clone());
                state
            }
        };
        assert_eq!(
            state.len(),
            len,
            "the optimizer state of parameter {id} has another size than the parameter"
        );
        state
    }

    /// New flat values for every entry, the moments updated.
    fn update(&mut self, lr: f64, entries: Vec<DeviceEntry<B>>) -> HashMap<ParamId, Tensor<B, 1>> {
        let Some(first) = entries.first() else {
            return HashMap::new();
        };
        let device = first.grad.device();
        let dtype = first.grad.dtype();
        self.set_align(dtype);
        // burn's adaptor moves each state to its gradient's device: so do the flat buffers.
        let old = self.moments.take().map(|(m, v)| {
            if m.device() == device {
                (m, v)
            } else {
                (m.to_device(&device), v.to_device(&device))
            }
        });

        // Normally every parameter has a gradient and all have taken the same number of steps:
        // one group, one pass. Otherwise one pass per distinct step count (the bias corrections
        // are scalars per pass), parameters without a gradient left out (burn's semantics).
        let by_time = self.groups_by_time(entries);
        let mut values = HashMap::new();
        // Where each updated parameter's new moments are: (group, local offset) by global offset.
        let mut updated: HashMap<usize, (usize, usize)> = HashMap::new();
        let mut new_moments = Vec::with_capacity(by_time.len());
        for (index, group) in by_time.into_iter().enumerate() {
            let previous = (group.time > 0).then(|| {
                let (m, v) = old
                    .as_ref()
                    .expect("parameters that took steps have moments");
                let runs = self.runs(
                    group
                        .members
                        .iter()
                        .map(|(g, l, e)| (*g, *l, e.value.dims()[0])),
                );
                let gather = |buffer: &Tensor<B, 1>| {
                    let pieces = runs
                        .iter()
                        .map(|&(global, local, len)| (local, part(buffer, global, len)))
                        .collect();
                    assemble(pieces, group.len, &device, dtype)
                };
                (gather(m), gather(v))
            });
            let mut grads = Vec::with_capacity(group.members.len());
            let mut params = Vec::with_capacity(group.members.len());
            let mut slots = Vec::with_capacity(group.members.len());
            for (global, local, entry) in group.members {
                let id = entry.id;
                let len = entry.value.dims()[0];
                grads.push((local, entry.grad));
                params.push((local, entry.value));
                slots.push((id, local, len));
                updated.insert(global, (index, local));
                let state = self.states.get_mut(&id).expect("placed above");
                state.time += 1;
            }
            let grad = assemble(grads, group.len, &device, dtype);
            let param = assemble(params, group.len, &device, dtype);
            let (param, m, v) = self.adamw(lr, group.time + 1, param, grad, previous);
            for (id, local, len) in slots {
                values.insert(id, part(&param, local, len));
            }
            new_moments.push((m, v));
        }

        self.moments =
            Some(self.rebuild_moments(&updated, &new_moments, old.as_ref(), &device, dtype));
        values
    }

    /// The entries grouped by the steps their parameters took, in offset order.
    fn groups_by_time(&mut self, entries: Vec<DeviceEntry<B>>) -> Vec<Group<B>> {
        let mut by_time: Vec<Group<B>> = Vec::new();
        let mut placed: Vec<(ParamState, DeviceEntry<B>)> = entries
            .into_iter()
            .map(|entry| (self.state_of(entry.id, &entry.dims), entry))
            .collect();
        placed.sort_by_key(|(state, _)| state.offset);
        for (state, entry) in placed {
            let index = match by_time.iter().position(|g| g.time == state.time) {
                Some(index) => index,
                None => {
                    by_time.push(Group {
                        time: state.time,
                        members: Vec::new(),
                        len: 0,
                    });
                    by_time.len() - 1
                }
            };
            let span = self.span(state.len());
            let group = &mut by_time[index];
            group.members.push((state.offset, group.len, entry));
            group.len += span;
        }

        by_time
    }

    /// The new moment buffers: updated spans from their group's, the others as they were.
    fn rebuild_moments(
        &self,
        updated: &HashMap<usize, (usize, usize)>,
        new_moments: &[Moments<B>],
        old: Option<&Moments<B>>,
        device: &B::Device,
        dtype: burn::tensor::DType,
    ) -> Moments<B> {
        // The new buffers: updated spans from their group, the others as they were.
        let mut order: Vec<(usize, usize)> = self
            .states
            .values()
            .map(|state| (state.offset, state.len()))
            .collect();
        order.sort_unstable();
        let mut runs: Vec<(Option<usize>, usize, usize, usize)> = Vec::new();
        for (global, len) in order {
            let span = self.span(len);
            let (source, local) = match updated.get(&global) {
                Some(&(group, local)) => (Some(group), local),
                None => (None, global),
            };
            match runs.last_mut() {
                Some((s, g, l, n)) if *s == source && *g + *n == global && *l + *n == local => {
                    *n += span;
                }
                _ => runs.push((source, global, local, span)),
            }
        }
        let rebuild = |pick: fn(&Moments<B>) -> &Tensor<B, 1>| {
            let pieces = runs
                .iter()
                .map(|&(source, global, local, len)| {
                    let buffer = match source {
                        Some(group) => pick(&new_moments[group]),
                        None => pick(old.expect("parameters kept from earlier steps")),
                    };
                    (global, part(buffer, local, len))
                })
                .collect();
            assemble(pieces, self.len, device, dtype)
        };
        let m = rebuild(|(m, _)| m);
        let v = rebuild(|(_, v)| v);
        (m, v)
    }

    /// Contiguous runs (global offset, local offset, elements) of a group's members.
    fn runs(
        &self,
        members: impl Iterator<Item = (usize, usize, usize)>,
    ) -> Vec<(usize, usize, usize)> {
        let mut runs: Vec<(usize, usize, usize)> = Vec::new();
        for (global, local, len) in members {
            let span = self.span(len);
            match runs.last_mut() {
                Some((g, l, n)) if *g + *n == global && *l + *n == local => *n += span,
                _ => runs.push((global, local, span)),
            }
        }
        runs
    }

    /// burn's `AdamW` step (`AdaptiveMomentumW::transform`, then the decoupled decay), op for
    /// op with the same scalar types, on whole flat buffers: the bits of `kernels::adamw`.
    fn adamw(
        &self,
        lr: f64,
        time: usize,
        param: Tensor<B, 1>,
        grad: Tensor<B, 1>,
        previous: Option<Moments<B>>,
    ) -> (Tensor<B, 1>, Tensor<B, 1>, Tensor<B, 1>) {
        let s = self.settings;
        let (factor_1, factor_2) = (1.0 - s.beta_1, 1.0 - s.beta_2);
        let (m, v) = match previous {
            None => (
                grad.clone().mul_scalar(factor_1),
                grad.square().mul_scalar(factor_2),
            ),
            Some((m, v)) => (
                m.mul_scalar(s.beta_1)
                    .add(grad.clone().mul_scalar(factor_1)),
                v.mul_scalar(s.beta_2)
                    .add(grad.square().mul_scalar(factor_2)),
            ),
        };
        let time = time as i32;
        let m_hat = m.clone().div_scalar(1f32 - s.beta_1.powi(time));
        let v_hat = v.clone().div_scalar(1f32 - s.beta_2.powi(time));
        let delta = m_hat.div(v_hat.sqrt().add_scalar(s.epsilon));
        let decay_rate = lr * s.weight_decay as f64;
        let decayed = if decay_rate == 0.0 {
            param
        } else {
            param.mul_scalar(1.0 - decay_rate)
        };
        (decayed - delta.mul_scalar(lr), m, v)
    }

    fn to_record<M: AutodiffModule<AB>, AB: AutodiffBackend<InnerBackend = B>>(
        &self,
    ) -> BurnRecord<M, AB> {
        let Some((m, v)) = &self.moments else {
            return Default::default();
        };
        self.states
            .iter()
            .map(|(&id, state)| {
                let (first, second) = (
                    part(m, state.offset, state.len()),
                    part(v, state.offset, state.len()),
                );
                (id, record_of::<AB>(state.time, first, second, &state.dims))
            })
            .collect()
    }

    /// Takes burn's record, every parameter's moments laid out in id order where they are.
    fn load_record<M: AutodiffModule<AB>, AB: AutodiffBackend<InnerBackend = B>>(
        &mut self,
        record: BurnRecord<M, AB>,
    ) {
        self.states.clear();
        self.moments = None;
        self.len = 0;
        let mut entries: Vec<_> = record.into_iter().collect();
        entries.sort_by_key(|(id, _)| id.val());
        let (mut firsts, mut seconds) = (Vec::new(), Vec::new());
        let mut placement = None;
        for (id, record) in entries {
            let flat = flatten_record::<AB>(record);
            let (device, dtype) = (flat.first.device(), flat.first.dtype());
            placement.get_or_insert((device, dtype));
            self.set_align(dtype);
            let offset = self.len;
            self.len += self.span(flat.first.dims()[0]);
            firsts.push((offset, flat.first));
            seconds.push((offset, flat.second));
            self.states.insert(
                id,
                ParamState {
                    offset,
                    dims: flat.dims,
                    time: flat.time,
                },
            );
        }
        if let Some((device, dtype)) = placement {
            self.moments = Some((
                assemble(firsts, self.len, &device, dtype),
                assemble(seconds, self.len, &device, dtype),
            ));
        }
    }
}

/// `len` elements of `buffer` from `offset` (a view where the backend can; no op at all for
/// the whole buffer, the common case of the moments).
fn part<B: Backend>(buffer: &Tensor<B, 1>, offset: usize, len: usize) -> Tensor<B, 1> {
    if offset == 0 && len == buffer.dims()[0] {
        return buffer.clone();
    }
    buffer.clone().slice(offset..offset + len)
}

/// A flat buffer of `len` elements holding each piece at its offset: the pieces themselves
/// when one covers it all, else one copy per piece. The padding between pieces is left
/// unwritten: only elementwise ops ever touch it and nothing reads it back.
fn assemble<B: Backend>(
    mut pieces: Vec<(usize, Tensor<B, 1>)>,
    len: usize,
    device: &B::Device,
    dtype: burn::tensor::DType,
) -> Tensor<B, 1> {
    if let [(0, piece)] = pieces.as_slice() {
        if piece.dims()[0] == len {
            return pieces.pop().expect("one piece").1;
        }
    }
    let mut out = Tensor::<B, 1>::empty([len], (device, dtype));
    for (offset, piece) in pieces {
        let n = piece.dims()[0];
        out = out.slice_assign(offset..offset + n, piece);
    }
    out
}

/// burn's record of one parameter of shape `dims`, from its flattened moments.
fn record_of<B: AutodiffBackend>(
    time: usize,
    first: Tensor<B::InnerBackend, 1>,
    second: Tensor<B::InnerBackend, 1>,
    dims: &[usize],
) -> AdaptorRecord<AdamW, B> {
    fn at_rank<B: AutodiffBackend, const D: usize>(
        time: usize,
        first: Tensor<B::InnerBackend, 1>,
        second: Tensor<B::InnerBackend, 1>,
        dims: &[usize],
    ) -> AdaptorRecord<AdamW, B> {
        let shape = Shape::from(dims.to_vec());
        let momentum = AdaptiveMomentumState {
            time,
            moment_1: first.reshape::<D, _>(shape.clone()),
            moment_2: second.reshape::<D, _>(shape),
            max_moment_2: None,
        };
        AdaptorRecord::from_state(AdamWState { momentum })
    }
    match dims.len() {
        0 => at_rank::<B, 0>(time, first, second, dims),
        1 => at_rank::<B, 1>(time, first, second, dims),
        2 => at_rank::<B, 2>(time, first, second, dims),
        3 => at_rank::<B, 3>(time, first, second, dims),
        4 => at_rank::<B, 4>(time, first, second, dims),
        5 => at_rank::<B, 5>(time, first, second, dims),
        6 => at_rank::<B, 6>(time, first, second, dims),
        7 => at_rank::<B, 7>(time, first, second, dims),
        8 => at_rank::<B, 8>(time, first, second, dims),
        rank => panic!("burn's optimizer records hold parameters of rank 8 at most, not {rank}"),
    }
}

/// One parameter's record, its moments flattened (where they are: no copy to the host).
struct FlatRecord<B: Backend> {
    time: usize,
    dims: Vec<usize>,
    first: Tensor<B, 1>,
    second: Tensor<B, 1>,
}

fn flatten_record<B: AutodiffBackend>(
    record: AdaptorRecord<AdamW, B>,
) -> FlatRecord<B::InnerBackend> {
    fn flat<B: Backend, const D: usize>(state: AdamWState<B, D>) -> FlatRecord<B> {
        let m = state.momentum;
        let dims = m.moment_1.dims().to_vec();
        let len = dims.iter().product::<usize>();
        FlatRecord {
            time: m.time,
            dims,
            first: m.moment_1.reshape([len]),
            second: m.moment_2.reshape([len]),
        }
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

/// A flat tensor's values on the host, as f32.
fn tensor_values<B: Backend>(t: Tensor<B, 1>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .expect("f32 moments")
}

fn primitive_values<B: Backend>(t: &FloatTensor<B>) -> std::borrow::Cow<'_, [f32]> {
    host_values::<B>(t).expect("the fused AdamW runs on f32 CPU tensors")
}

impl<M: AutodiffModule<B>, B: AutodiffBackend> Optimizer<M, B> for FusedAdamW<M, B> {
    type Record = BurnRecord<M, B>;

    fn step(&mut self, lr: f64, module: M, mut grads: GradientsParams) -> M {
        let host = match &mut self.engine {
            Engine::Burn(burn) => return burn.step(lr, module, grads),
            Engine::Device(device) => {
                let mut collect = CollectDevice::<B> {
                    grads: &mut grads,
                    entries: Vec::new(),
                };
                module.visit(&mut collect);
                let values = device.update(lr, collect.entries);
                return module.map(&mut ReplaceDevice::<B> { values });
            }
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
            Engine::Host(_) | Engine::Device(_) => {
                panic!("the fused AdamW takes one device's gradients (ditrun averages them itself)")
            }
        }
    }

    fn to_record(&self) -> Self::Record {
        match &self.engine {
            Engine::Host(host) => host.to_record::<M, B>(),
            Engine::Device(device) => device.to_record::<M, B>(),
            Engine::Burn(burn) => burn.to_record(),
        }
    }

    fn load_record(mut self, record: Self::Record) -> Self {
        self.engine = match self.engine {
            Engine::Host(mut host) => {
                host.load_record::<M, B>(record);
                Engine::Host(host)
            }
            Engine::Device(mut device) => {
                device.load_record::<M, B>(record);
                Engine::Device(device)
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

/// Every float parameter that has a gradient, both flattened, on the gradient's device.
struct CollectDevice<'a, B: AutodiffBackend> {
    grads: &'a mut GradientsParams,
    entries: Vec<DeviceEntry<B::InnerBackend>>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for CollectDevice<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let Some(grad) = self.grads.remove::<B::InnerBackend, D>(param.id) else {
            return;
        };
        let mut value = param.val().inner();
        let dims = value.dims().to_vec();
        let len = dims.iter().product::<usize>();
        let device = grad.device();
        if value.device() != device {
            value = value.to_device(&device);
        }
        self.entries.push(DeviceEntry {
            id: param.id,
            dims,
            value: value.reshape([len]),
            grad: grad.reshape([len]),
        });
    }
}

/// Gives each updated parameter its slice of the flat result, keeping ids and `require_grad`.
struct ReplaceDevice<B: AutodiffBackend> {
    values: HashMap<ParamId, Tensor<B::InnerBackend, 1>>,
}

impl<B: AutodiffBackend> ModuleMapper<B> for ReplaceDevice<B> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        let Some(flat) = self.values.remove(&id) else {
            return Param::from_mapped_value(id, tensor, mapper);
        };
        let require_grad = tensor.is_require_grad();
        let mut updated = Tensor::<B, D>::from_inner(flat.reshape::<D, _>(tensor.shape()));
        if require_grad {
            updated = updated.require_grad();
        }
        Param::from_mapped_value(id, updated, mapper)
    }
}
