//! Parameter bookkeeping of a step: global gradient norm and clipping, and the EMA of the
//! weights.

use burn::module::{AutodiffModule, Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;

/// Every parameter's id, in visiting order.
fn param_ids<B: Backend, M: Module<B>>(module: &M) -> Vec<ParamId> {
    burn::module::list_param_ids(module)
}

/// The L2 norm of all gradients together, as PyTorch's `clip_grad_norm_` computes it.
pub fn global_grad_norm<AB: AutodiffBackend, M: AutodiffModule<AB>>(
    module: &M,
    grads: &GradientsParams,
) -> f64 {
    struct SquareSum<'a, B: Backend> {
        grads: &'a GradientsParams,
        total: Option<Tensor<B, 1>>,
    }
    impl<B: Backend> ModuleVisitor<B> for SquareSum<'_, B> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if let Some(grad) = self.grads.get::<B, D>(param.id) {
                let sum = grad.square().sum();
                self.total = Some(match self.total.take() {
                    Some(total) => total + sum,
                    None => sum,
                });
            }
        }
    }
    let inner = module.valid();
    let mut visitor = SquareSum::<AB::InnerBackend> { grads, total: None };
    inner.visit(&mut visitor);
    visitor
        .total
        .map(|t| t.into_scalar().elem::<f64>().sqrt())
        .unwrap_or(0.0)
}

/// Scales every gradient by `factor` (global-norm clipping).
pub fn scale_grads<AB: AutodiffBackend, M: AutodiffModule<AB>>(
    module: &M,
    grads: &mut GradientsParams,
    factor: f64,
) {
    struct Scaler<'a> {
        grads: &'a mut GradientsParams,
        factor: f64,
    }
    impl<B: Backend> ModuleVisitor<B> for Scaler<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if let Some(grad) = self.grads.remove::<B, D>(param.id) {
                self.grads
                    .register::<B, D>(param.id, grad.mul_scalar(self.factor));
            }
        }
    }
    module.valid().visit(&mut Scaler { grads, factor });
}

/// `ema ← decay · ema + (1 − decay) · weights`, parameter by parameter (matched by id, which
/// [`with_path_ids`] makes equal in both).
pub fn update_ema<B: Backend, M: Module<B>>(ema: M, weights: &M, decay: f64) -> M {
    struct Collect<B: Backend>(std::collections::HashMap<ParamId, Tensor<B, 1>>);
    impl<B: Backend> ModuleVisitor<B> for Collect<B> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let value = param.val();
            let count = value.shape().num_elements();
            self.0.insert(param.id, value.reshape([count]));
        }
    }
    struct Blend<B: Backend> {
        weights: std::collections::HashMap<ParamId, Tensor<B, 1>>,
        decay: f64,
    }
    impl<B: Backend> ModuleMapper<B> for Blend<B> {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            let (id, ema, mapper) = param.consume();
            let weights = self
                .weights
                .remove(&id)
                .expect("EMA and model have the same parameters");
            let blended = ema.clone().mul_scalar(self.decay)
                + weights.reshape(ema.shape()).mul_scalar(1.0 - self.decay);
            Param::from_mapped_value(id, blended, mapper)
        }
    }
    let mut collect = Collect(Default::default());
    weights.visit(&mut collect);
    debug_assert_eq!(param_ids(weights).len(), collect.0.len());
    ema.map(&mut Blend {
        weights: collect.0,
        decay,
    })
}
