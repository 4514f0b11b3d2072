//! Which burn backend runs the tensors. CPU backends are cargo features (see the README's
//! measurements for why ndarray is the default); CUDA is behind the `cuda` feature so that CPU
//! builds carry no GPU code.

use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// burn-flex: burn 0.21's native CPU backend (gemm crate matmuls).
    Flex,
    /// burn-ndarray (matrixmultiply, or OpenBLAS with the `blas` feature).
    Ndarray,
    /// burn-candle on the CPU.
    Candle,
    /// burn-cuda with burn's op fusion and autotuned kernels, on this rank's GPU.
    Cuda,
    /// burn-cuda without op fusion (the plain CubeCL backend): every op its own kernel. For
    /// comparison, and a fallback should a fused graph go wrong.
    #[value(name = "cuda-nofusion")]
    #[serde(rename = "cuda-nofusion")]
    CudaNoFusion,
}

impl BackendKind {
    pub fn compiled_in(self) -> bool {
        match self {
            BackendKind::Flex => cfg!(feature = "flex"),
            BackendKind::Ndarray => cfg!(feature = "ndarray"),
            BackendKind::Candle => cfg!(feature = "candle"),
            BackendKind::Cuda | BackendKind::CudaNoFusion => cfg!(feature = "cuda"),
        }
    }

    /// Whether the tensors live on a GPU (one rank per GPU, NCCL for gradients).
    pub fn is_gpu(self) -> bool {
        matches!(self, BackendKind::Cuda | BackendKind::CudaNoFusion)
    }

    /// The GPU when built with one, else the fastest CPU backend measured on the seed's
    /// training step (README, "Performance").
    pub fn preferred() -> Self {
        [
            BackendKind::Cuda,
            BackendKind::Ndarray,
            BackendKind::Flex,
            BackendKind::Candle,
        ]
        .into_iter()
        .find(|kind| kind.compiled_in() && (*kind != BackendKind::Cuda || cuda_driver_present()))
        .unwrap_or(BackendKind::Ndarray)
    }

    /// Whether its tensors can hold bf16 (`train.precision: bf16`); burn-ndarray's cannot.
    pub fn has_bf16(self) -> bool {
        matches!(
            self,
            BackendKind::Flex | BackendKind::Cuda | BackendKind::CudaNoFusion
        )
    }

    /// The cargo feature that compiles this backend in.
    pub fn cargo_feature(self) -> &'static str {
        if self.is_gpu() {
            "cuda"
        } else {
            self.name()
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Flex => "flex",
            BackendKind::Ndarray => "ndarray",
            BackendKind::Candle => "candle",
            BackendKind::Cuda => "cuda",
            BackendKind::CudaNoFusion => "cuda-nofusion",
        }
    }
}

/// burn's CUDA backend without the fusion layer (`burn::backend::Cuda` is
/// `Fusion<CubeBackend<..>>` in this build).
#[cfg(feature = "cuda")]
pub type CudaNoFusion = burn_cubecl::CubeBackend<cubecl_cuda::CudaRuntime, f32, i32, u8>;

/// Whether this machine has an NVIDIA driver (`libcuda`): a CUDA build on a machine without
/// one then runs on the CPU under `auto`, and `cuda` asked for by name fails with a message,
/// where the CUDA runtime would panic at its first call.
pub fn cuda_driver_present() -> bool {
    #[cfg(feature = "cuda")]
    {
        static PRESENT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *PRESENT.get_or_init(|| {
            // SAFETY: loading the driver library runs only its own initialisers.
            ["libcuda.so.1", "libcuda.so"]
                .iter()
                .any(|name| unsafe { libloading::Library::new(name) }.is_ok())
        })
    }
    #[cfg(not(feature = "cuda"))]
    false
}

/// Runs `$body` with the type alias `$B` bound to the backend selected by `$kind` (a
/// [`BackendKind`]); a backend that is not compiled in yields a `crate::Error::Config`.
#[macro_export]
macro_rules! with_backend {
    ($kind:expr, $B:ident => $body:expr) => {{
        #[allow(unreachable_patterns)]
        match $kind {
            #[cfg(feature = "flex")]
            $crate::backend::BackendKind::Flex => {
                type $B = burn::backend::Flex;
                $body
            }
            #[cfg(feature = "ndarray")]
            $crate::backend::BackendKind::Ndarray => {
                type $B = burn::backend::NdArray;
                $body
            }
            #[cfg(feature = "candle")]
            $crate::backend::BackendKind::Candle => {
                type $B = burn::backend::Candle;
                $body
            }
            #[cfg(feature = "cuda")]
            $crate::backend::BackendKind::Cuda => {
                type $B = burn::backend::Cuda;
                $body
            }
            #[cfg(feature = "cuda")]
            $crate::backend::BackendKind::CudaNoFusion => {
                type $B = $crate::backend::CudaNoFusion;
                $body
            }
            other => Err($crate::Error::Config(format!(
                "backend `{}` is not compiled into this binary (cargo feature `{}`)",
                other.name(),
                other.cargo_feature()
            ))),
        }
    }};
}

/// Sizes the thread pools the CPU backends use (rayon for flex and ndarray; candle's gemm reads
/// RAYON_NUM_THREADS too). Must run before the first tensor operation.
pub fn set_cpu_threads(threads: usize) {
    // SAFETY: called at start-up before any other thread exists.
    unsafe { std::env::set_var("RAYON_NUM_THREADS", threads.to_string()) };
    crate::kernels::blas::prepare(threads);
    keep_large_buffers_on_the_heap();
    flush_subnormals_to_zero();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .start_handler(|_| flush_subnormals_to_zero());
    if let Err(error) = pool.build_global() {
        tracing::warn!(%error, "the CPU thread pool was already set up; --threads ignored");
    }
}

/// A training step allocates and frees the same few hundred activation and gradient buffers of
/// 1–17 MB each. glibc serves those above its mmap threshold with fresh mappings and returns
/// freed heap tops to the kernel, so every step page-faults hundreds of megabytes of zeroed
/// pages again (`exc_page_fault` and `clear_page` in a profile). Keeping them on the heap (32
/// MB is the largest threshold glibc accepts) lets the next step reuse the pages.
fn keep_large_buffers_on_the_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before other threads allocate.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

/// Runs `init` right after seeding the backend's random generator, with no other seeded
/// initialisation of this process in between. burn's generator is global: two runs in one
/// process (tests, a sampler beside a trainer) could otherwise interleave their draws and get
/// different weights from the same seed.
pub fn seeded<B: burn::tensor::backend::Backend, T>(
    device: &B::Device,
    seed: u64,
    init: impl FnOnce() -> T,
) -> T {
    let _exclusive = RANDOM_INIT
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    B::seed(device, seed);
    init()
}

/// Runs an initialisation whose random values do not matter (a template about to be
/// overwritten by loaded weights) without drawing from the generator while a [`seeded`]
/// initialisation runs in another thread: that would change the seeded model.
pub fn unseeded<T>(init: impl FnOnce() -> T) -> T {
    let _exclusive = RANDOM_INIT
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    init()
}

/// Held by every initialisation that draws from burn's global generator.
static RANDOM_INIT: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Tiny gradients and optimiser moments decay into subnormal floats during training, and x86
/// computes on those through a microcode slow path: the quickstart's step time doubled over
/// its run. Flushing them to zero (as PyTorch's `set_flush_denormal` does) costs nothing
/// measurable in accuracy. Per thread: the setting lives in each thread's MXCSR register.
pub fn flush_subnormals_to_zero() {
    #[cfg(target_arch = "x86_64")]
    #[allow(deprecated)]
    // SAFETY: only sets the FTZ and DAZ bits of this thread's floating-point control register.
    unsafe {
        use std::arch::x86_64::{_mm_getcsr, _mm_setcsr};
        const FLUSH_TO_ZERO: u32 = 1 << 15;
        const DENORMALS_ARE_ZERO: u32 = 1 << 6;
        _mm_setcsr(_mm_getcsr() | FLUSH_TO_ZERO | DENORMALS_ARE_ZERO);
    }
}

/// Local rank i takes the i-th visible GPU; CPU backends have one device.
pub fn rank_device<B: burn::tensor::backend::Backend>(
    world: &crate::dist::World,
    gpu: bool,
) -> crate::error::Result<B::Device> {
    use burn::tensor::backend::{Device as _, DeviceId};
    let default = B::Device::default();
    if !gpu {
        return Ok(default);
    }
    let id = default.to_id();
    let ordinal = world.gpu_ordinal(B::device_count(id.type_id))?;
    Ok(B::Device::from_id(DeviceId {
        type_id: id.type_id,
        index_id: ordinal as u16,
    }))
}
