//! Direct access to the f32 buffers of burn's CPU backends, for the fused kernels.

use std::borrow::Cow;

use burn::backend::ndarray::{NdArray, NdArrayTensor};
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Shape, TensorData};

/// A CPU backend whose f32 tensors the kernels read and build directly.
pub trait CpuF32: Backend {
    /// Runs `f` on `t`'s values in row-major order: no copy when `t` is contiguous, one copy
    /// when it is a strided view (permuted, narrowed). `None` when `t` is not f32.
    fn with_f32<R>(t: &FloatTensor<Self>, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
        Self::values_f32(t).map(|values| f(&values))
    }
    /// A tensor owning `values` (row-major), without a copy.
    fn from_f32(values: Vec<f32>, shape: Shape) -> FloatTensor<Self>;
    /// `t`'s values in row-major order, borrowed when `t` is contiguous, else copied (for
    /// callers that hold many tensors' values at once). `None` when `t` is not f32.
    fn values_f32(t: &FloatTensor<Self>) -> Option<Cow<'_, [f32]>>;
}

impl CpuF32 for NdArray {
    fn from_f32(values: Vec<f32>, shape: Shape) -> NdArrayTensor {
        NdArrayTensor::from_data(TensorData::new(values, shape))
    }

    fn values_f32(t: &NdArrayTensor) -> Option<Cow<'_, [f32]>> {
        let NdArrayTensor::F32(storage) = t else {
            return None;
        };
        let view = storage.view();
        Some(match view.to_slice() {
            Some(values) => Cow::Borrowed(values),
            None => Cow::Owned(view.iter().copied().collect()),
        })
    }
}

#[cfg(feature = "flex")]
mod flex {
    use burn::backend::flex::{Flex, FlexTensor, Layout};
    use burn::tensor::{Bytes, DType, Shape};

    impl super::CpuF32 for Flex {
        fn from_f32(values: Vec<f32>, shape: Shape) -> FlexTensor {
            FlexTensor::new(
                Bytes::from_elems(values),
                Layout::contiguous(shape),
                DType::F32,
            )
        }

        fn values_f32(t: &FlexTensor) -> Option<std::borrow::Cow<'_, [f32]>> {
            if t.dtype() != DType::F32 {
                return None;
            }
            Some(match t.as_slice::<f32>() {
                Some(values) => std::borrow::Cow::Borrowed(values),
                // `storage()` of a view is its whole buffer, whatever the layout: copy instead
                // (the contiguous copy's bytes become the vector without another).
                None => {
                    std::borrow::Cow::Owned(t.to_contiguous().into_data().into_vec::<f32>().ok()?)
                }
            })
        }
    }
}
