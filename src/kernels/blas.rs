//! The linear layers' matrix products on a system BLAS, loaded at run time so that a machine
//! without one still runs (on the `gemm` crate, about half as fast end to end). Three are
//! known; `DITRUN_BLAS` picks one (`openblas`, `mkl`, `onednn`, or `off` for the `gemm`
//! crate), else the first found in this order, chosen by measuring whole training steps of the
//! seed model on the 2-core development machine (README, Performance):
//! - **OpenBLAS** (`libopenblas.so.0`; Debian `libopenblas0`, installed by the scripts).
//!   0.3.21 does not recognise this project's virtual CPU and falls back to kernels without
//!   AVX-512 unless told the processor, which [`prepare`] does through `OPENBLAS_CORETYPE`
//!   before the library is loaded.
//! - **Intel MKL** (`libmkl_rt.so.*` on the loader's path: oneAPI, or `pip install mkl` with
//!   its `lib` folder on `LD_LIBRARY_PATH`): what PyTorch's wheels use. 10–20 % faster than
//!   OpenBLAS on the seed's products alone, the same on whole steps within this machine's noise.
//! - **oneDNN** (`libdnnl.so.2`; Debian `libdnnl2`): `dnnl_sgemm`, as fast as MKL on the
//!   products alone but 3–5 % slower on whole steps (its OpenMP threads wake late for the
//!   next product, or spin and take the cores from the fused kernels).

use std::sync::OnceLock;

const ROW_MAJOR: i32 = 101;
const NO_TRANSPOSE: i32 = 111;
const TRANSPOSE: i32 = 112;

type CblasSgemmFn = unsafe extern "C" fn(
    i32,
    i32,
    i32,
    i32,
    i32,
    i32,
    f32,
    *const f32,
    i32,
    *const f32,
    i32,
    f32,
    *mut f32,
    i32,
);
/// `dnnl_sgemm(transa, transb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc)`, row-major.
type DnnlSgemmFn = unsafe extern "C" fn(
    i8,
    i8,
    i64,
    i64,
    i64,
    f32,
    *const f32,
    i64,
    *const f32,
    i64,
    f32,
    *mut f32,
    i64,
) -> i32;
type SetThreadsFn = unsafe extern "C" fn(i32);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlasKind {
    OneDnn,
    Mkl,
    OpenBlas,
}

impl BlasKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::OneDnn => "onednn",
            Self::Mkl => "mkl",
            Self::OpenBlas => "openblas",
        }
    }

    /// The shared-object names tried, in order.
    fn libraries(self) -> &'static [&'static str] {
        match self {
            Self::OneDnn => &["libdnnl.so.3", "libdnnl.so.2", "libdnnl.so"],
            Self::Mkl => &["libmkl_rt.so.3", "libmkl_rt.so.2", "libmkl_rt.so"],
            Self::OpenBlas => &["libopenblas.so.0", "libopenblas.so"],
        }
    }
}

const PREFERENCE: [BlasKind; 3] = [BlasKind::OpenBlas, BlasKind::Mkl, BlasKind::OneDnn];

enum Sgemm {
    Cblas(CblasSgemmFn),
    Dnnl(DnnlSgemmFn),
}

pub struct Blas {
    pub kind: BlasKind,
    sgemm: Sgemm,
    set_threads: Option<SetThreadsFn>,
    /// Keeps the functions above loaded.
    _library: libloading::Library,
}

static BLAS: OnceLock<Option<Blas>> = OnceLock::new();

/// Sets what the libraries read from the environment when they load (unless the user did),
/// then loads one with `threads` threads. Call once at start-up, before other threads read
/// the environment.
pub fn prepare(threads: usize) {
    let threads_text = threads.max(1).to_string();
    let defaults = [
        // OpenBLAS 0.3.21 does not recognise the virtual CPU (see the module docs).
        ("OPENBLAS_CORETYPE", has_avx512().then_some("SKYLAKEX")),
        // OpenBLAS's idle threads otherwise spin for ~2^28 cycles after each product, taking
        // the cores from the fused kernels that run next on the other pool.
        ("OPENBLAS_THREAD_TIMEOUT", Some("4")),
        // oneDNN and MKL run on OpenMP, whose idle threads spin likewise between products.
        ("OMP_WAIT_POLICY", Some("PASSIVE")),
        ("OMP_NUM_THREADS", Some(threads_text.as_str())),
        ("MKL_NUM_THREADS", Some(threads_text.as_str())),
    ];
    for (variable, value) in defaults {
        if let (None, Some(value)) = (std::env::var_os(variable), value) {
            // SAFETY: start-up, before any other thread exists (see `backend::set_cpu_threads`).
            unsafe { std::env::set_var(variable, value) };
        }
    }
    if let Some(blas) = blas() {
        if let Some(set_threads) = blas.set_threads {
            // SAFETY: a plain setter of the library's thread count.
            unsafe { set_threads(threads.max(1) as i32) };
        }
    }
}

fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512dq")
            && std::arch::is_x86_feature_detected!("avx512vl")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// The loaded library, or `None` when the system has none (or `DITRUN_BLAS=off`): the
/// products then run on the `gemm` crate.
pub fn blas() -> Option<&'static Blas> {
    BLAS.get_or_init(|| {
        let wanted = std::env::var("DITRUN_BLAS").unwrap_or_default();
        let candidates: Vec<BlasKind> = match wanted.as_str() {
            "" | "auto" => PREFERENCE.to_vec(),
            "off" | "gemm" => Vec::new(),
            name => match PREFERENCE.iter().find(|kind| kind.name() == name) {
                Some(&kind) => vec![kind],
                None => {
                    tracing::warn!(
                        DITRUN_BLAS = name,
                        "unknown BLAS (openblas, mkl, onednn, off): using auto"
                    );
                    PREFERENCE.to_vec()
                }
            },
        };
        let loaded = candidates.into_iter().find_map(load);
        match &loaded {
            Some(blas) => {
                tracing::debug!(blas = blas.kind.name(), "matrix products on a system BLAS")
            }
            None => tracing::debug!("no system BLAS: matrix products on the gemm crate"),
        }
        loaded
    })
    .as_ref()
}

/// The name of the library the products run on, for reports.
pub fn backend_name() -> &'static str {
    blas().map_or("gemm-crate", |blas| blas.kind.name())
}

fn load(kind: BlasKind) -> Option<Blas> {
    kind.libraries().iter().find_map(|name| {
        // SAFETY: these libraries' initialisers only set up their own state.
        let library = unsafe { libloading::Library::new(name) }.ok()?;
        // SAFETY (each `get`): the symbols have these C signatures (cblas.h, dnnl.h, omp.h,
        // mkl_service.h, openblas_config.h).
        let (sgemm, set_threads) = unsafe {
            match kind {
                BlasKind::OneDnn => (
                    Sgemm::Dnnl(*library.get::<DnnlSgemmFn>(b"dnnl_sgemm\0").ok()?),
                    library
                        .get::<SetThreadsFn>(b"omp_set_num_threads\0")
                        .ok()
                        .map(|f| *f),
                ),
                BlasKind::Mkl => (
                    Sgemm::Cblas(*library.get::<CblasSgemmFn>(b"cblas_sgemm\0").ok()?),
                    library
                        .get::<SetThreadsFn>(b"MKL_Set_Num_Threads\0")
                        .ok()
                        .map(|f| *f),
                ),
                BlasKind::OpenBlas => (
                    Sgemm::Cblas(*library.get::<CblasSgemmFn>(b"cblas_sgemm\0").ok()?),
                    Some(
                        *library
                            .get::<SetThreadsFn>(b"openblas_set_num_threads\0")
                            .ok()?,
                    ),
                ),
            }
        };
        Some(Blas {
            kind,
            sgemm,
            set_threads,
            _library: library,
        })
    })
}

impl Blas {
    /// `out = lhs · rhs (+ out when accumulate)`, each operand row-major or a transposed view
    /// of a row-major matrix (one of its strides is 1). `None` when a layout does not fit.
    /// Without `accumulate`, `out` is only written.
    ///
    /// # Safety
    /// `out` must be valid for writes (and reads when `accumulate`) of a row-major
    /// `lhs.rows × rhs.columns` matrix that overlaps neither operand.
    pub unsafe fn matmul(
        &self,
        lhs: super::Matrix,
        rhs: super::Matrix,
        out: *mut f32,
        accumulate: bool,
    ) -> Option<()> {
        let layout = |m: &super::Matrix| -> Option<(bool, usize)> {
            if m.column_stride == 1 {
                Some((false, m.row_stride.max(m.columns.max(1))))
            } else if m.row_stride == 1 {
                Some((true, m.column_stride.max(m.rows.max(1))))
            } else {
                None
            }
        };
        let ((transpose_a, lda), (transpose_b, ldb)) = (layout(&lhs)?, layout(&rhs)?);
        let (m, k, n) = (lhs.rows, lhs.columns, rhs.columns);
        let beta = if accumulate { 1.0 } else { 0.0 };
        // SAFETY: the shapes and leading dimensions describe matrices inside the slices (the
        // caller checked their lengths), and the caller vouches for `out`.
        unsafe {
            match self.sgemm {
                Sgemm::Cblas(sgemm) => {
                    let flag = |t: bool| if t { TRANSPOSE } else { NO_TRANSPOSE };
                    sgemm(
                        ROW_MAJOR,
                        flag(transpose_a),
                        flag(transpose_b),
                        m as i32,
                        n as i32,
                        k as i32,
                        1.0,
                        lhs.values.as_ptr(),
                        lda as i32,
                        rhs.values.as_ptr(),
                        ldb as i32,
                        beta,
                        out,
                        n.max(1) as i32,
                    )
                }
                Sgemm::Dnnl(sgemm) => {
                    let flag = |t: bool| if t { b'T' as i8 } else { b'N' as i8 };
                    let status = sgemm(
                        flag(transpose_a),
                        flag(transpose_b),
                        m as i64,
                        n as i64,
                        k as i64,
                        1.0,
                        lhs.values.as_ptr(),
                        lda as i64,
                        rhs.values.as_ptr(),
                        ldb as i64,
                        beta,
                        out,
                        n.max(1) as i64,
                    );
                    if status != 0 {
                        return None;
                    }
                }
            }
        };
        Some(())
    }
}
