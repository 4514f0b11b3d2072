//! Collectives between GPU ranks over NCCL (loaded at run time by cudarc). A host collective
//! (MPI between ranks; none for one process) carries NCCL's unique id from rank 0, the
//! arrival checks that name a missing rank, and the small host-side collectives; gradients
//! are averaged by NCCL on device memory.

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaStream};
use cudarc::nccl::{result as nccl, sys};

use super::collective::{Collective, DeviceAllReduce};
use crate::error::{Error, Result};

pub struct NcclCollective {
    communicator: sys::ncclComm_t,
    stream: Arc<CudaStream>,
    host: Box<dyn Collective>,
}

fn cuda_error(what: &str, error: impl std::fmt::Debug) -> Error {
    Error::Distributed(format!("{what}: {error:?}"))
}

impl NcclCollective {
    /// Joins the NCCL communicator of all ranks on GPU `ordinal`.
    pub fn init(host: Box<dyn Collective>, ordinal: usize) -> Result<Self> {
        let context = CudaContext::new(ordinal)
            .map_err(|e| cuda_error(&format!("CUDA device {ordinal}"), e))?;
        let stream = context
            .new_stream()
            .map_err(|e| cuda_error("creating the NCCL stream", e))?;
        let id = if host.rank() == 0 {
            let id = nccl::get_uniqueid().map_err(|e| {
                cuda_error(
                    "ncclGetUniqueId (is libnccl.so.2 installed and on the library path?)",
                    e,
                )
            })?;
            id.internal.iter().map(|&c| c as u8).collect()
        } else {
            Vec::new()
        };
        let id = host.broadcast(0, id, "NCCL unique id from rank 0")?;
        let mut internal = [0 as std::ffi::c_char; 128];
        for (slot, byte) in internal.iter_mut().zip(&id) {
            *slot = *byte as std::ffi::c_char;
        }
        let mut communicator = std::mem::MaybeUninit::uninit();
        let communicator = unsafe {
            nccl::comm_init_rank(
                communicator.as_mut_ptr(),
                host.world_size() as std::ffi::c_int,
                sys::ncclUniqueId { internal },
                host.rank() as std::ffi::c_int,
            )
            .map_err(|e| cuda_error("ncclCommInitRank", e))?;
            communicator.assume_init()
        };
        tracing::info!(rank = host.rank(), gpu = ordinal, "NCCL communicator ready");
        Ok(Self {
            communicator,
            stream,
            host,
        })
    }
}

impl Drop for NcclCollective {
    fn drop(&mut self) {
        unsafe {
            let _ = nccl::comm_destroy(self.communicator);
        }
    }
}

impl DeviceAllReduce for NcclCollective {
    unsafe fn all_reduce_mean_device(&self, address: u64, len: usize, what: &str) -> Result<()> {
        // Every rank arrives first (a missing one is named when the deadline passes); NCCL
        // itself would wait for it forever.
        self.host.barrier(what)?;
        let raw_stream = self.stream.cu_stream() as sys::cudaStream_t;
        nccl::all_reduce(
            address as *const std::ffi::c_void,
            address as *mut std::ffi::c_void,
            len,
            sys::ncclDataType_t::ncclFloat32,
            sys::ncclRedOp_t::ncclAvg,
            self.communicator,
            raw_stream,
        )
        .map_err(|e| cuda_error(&format!("{what}: ncclAllReduce"), e))?;
        self.stream
            .synchronize()
            .map_err(|e| cuda_error(&format!("{what}: waiting for NCCL"), e))
    }
}

impl Collective for NcclCollective {
    fn rank(&self) -> usize {
        self.host.rank()
    }
    fn world_size(&self) -> usize {
        self.host.world_size()
    }
    fn transport(&self) -> &'static str {
        "NCCL (bootstrapped over MPI)"
    }
    fn all_reduce_mean(&self, values: &mut [f32], what: &str) -> Result<()> {
        self.host.all_reduce_mean(values, what)
    }
    fn broadcast(&self, root: usize, bytes: Vec<u8>, what: &str) -> Result<Vec<u8>> {
        self.host.broadcast(root, bytes, what)
    }
    fn all_gather(&self, mine: &[u8], what: &str) -> Result<Vec<Vec<u8>>> {
        self.host.all_gather(mine, what)
    }
    fn barrier(&self, what: &str) -> Result<()> {
        self.host.barrier(what)
    }
    fn abort(&self, code: i32) -> ! {
        unsafe {
            let _ = nccl::comm_abort(self.communicator);
        }
        self.host.abort(code)
    }
    fn device(&self) -> Option<&dyn DeviceAllReduce> {
        Some(self)
    }
}

/// The device address of a CUDA tensor's data and the guard that keeps it allocated; `None`
/// for tensors of other backends. A fused tensor is first resolved to the buffer it stands
/// for: the fusion server runs what is queued for it and hands out its handle, shared with
/// the fused tensor, so NCCL's in-place writes are what the next fused op reads.
pub fn device_address<B: burn::prelude::Backend>(
    tensor: &burn::prelude::Tensor<B, 1>,
) -> Option<(u64, impl Sized)> {
    use burn::tensor::TensorPrimitive;
    type Cube = burn_cubecl::tensor::CubeTensor<cubecl_cuda::CudaRuntime>;
    type Fused =
        burn_fusion::FusionTensor<burn_cubecl::fusion::FusionCubeRuntime<cubecl_cuda::CudaRuntime>>;
    let TensorPrimitive::Float(primitive) = tensor.clone().into_primitive() else {
        return None;
    };
    let any = &primitive as &dyn std::any::Any;
    let cube: Cube = if let Some(cube) = any.downcast_ref::<Cube>() {
        cube.clone()
    } else {
        let fused = any.downcast_ref::<Fused>()?;
        // `primitive` is a second reference to the fused tensor, so resolving it leaves the
        // buffer registered for `tensor`.
        fused
            .client
            .clone()
            .resolve_tensor_float::<crate::backend::CudaNoFusion>(fused.clone())
    };
    let resource = cube.client.get_resource(cube.handle.clone()).ok()?;
    let address = resource.resource().ptr;
    Some((address, (resource, cube, primitive)))
}
