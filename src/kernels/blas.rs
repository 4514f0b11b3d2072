//! OpenBLAS's `cblas_sgemm`, loaded at run time when the system has it (Debian:
//! `libopenblas0`). On this project's machines it multiplies 3–4× faster than the `gemm` crate
//! (about 135 GFLOP/s per core against 40), but only once told the processor: OpenBLAS 0.3.21
//! does not recognise the virtual CPU's model and falls back to kernels without AVX-512.
//! Loading it ourselves lets [`prepare`] set `OPENBLAS_CORETYPE` before the library reads it
//! (at load), and a machine without OpenBLAS still runs, on the `gemm` crate.

use std::sync::OnceLock;

const ROW_MAJOR: i32 = 101;
const NO_TRANSPOSE: i32 = 111;
const TRANSPOSE: i32 = 112;

type SgemmFn = unsafe extern "C" fn(i32, i32, i32, i32, i32, i32, f32, *const f32, i32, *const f32, i32, f32, *mut f32, i32);
type SetThreadsFn = unsafe extern "C" fn(i32);

pub struct OpenBlas {
    sgemm: SgemmFn,
    set_threads: SetThreadsFn,
    /// Keeps the functions above loaded.
    _library: libloading::Library,
}

static OPENBLAS: OnceLock<Option<OpenBlas>> = OnceLock::new();

/// Names the processor for OpenBLAS (unless the user did) and loads it with `threads`
/// threads. Call once at start-up, before other threads read the environment.
pub fn prepare(threads: usize) {
    if std::env::var_os("OPENBLAS_CORETYPE").is_none() && has_avx512() {
        // SAFETY: start-up, before any other thread exists (see `backend::set_cpu_threads`).
        unsafe { std::env::set_var("OPENBLAS_CORETYPE", "SKYLAKEX") };
    }
    if std::env::var_os("OPENBLAS_THREAD_TIMEOUT").is_none() {
        // OpenBLAS's idle threads otherwise spin for ~2^28 cycles after each product, taking
        // the cores from the fused kernels that run next on the other pool.
        // SAFETY: as above.
        unsafe { std::env::set_var("OPENBLAS_THREAD_TIMEOUT", "4") };
    }
    if let Some(blas) = openblas() {
        // SAFETY: a plain setter of the library's thread count.
        unsafe { (blas.set_threads)(threads.max(1) as i32) };
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

/// The loaded library, or `None` when the system has none or `DITRUN_BLAS=off`.
pub fn openblas() -> Option<&'static OpenBlas> {
    OPENBLAS
        .get_or_init(|| {
            if std::env::var("DITRUN_BLAS").is_ok_and(|v| v == "off") {
                return None;
            }
            let loaded = ["libopenblas.so.0", "libopenblas.so"].iter().find_map(|name| {
                // SAFETY: OpenBLAS's initialisers only set up its own state.
                let library = unsafe { libloading::Library::new(name) }.ok()?;
                // SAFETY: the symbols have these C signatures (cblas.h).
                let sgemm = unsafe { *library.get::<SgemmFn>(b"cblas_sgemm\0").ok()? };
                let set_threads = unsafe { *library.get::<SetThreadsFn>(b"openblas_set_num_threads\0").ok()? };
                Some(OpenBlas { sgemm, set_threads, _library: library })
            });
            match &loaded {
                Some(_) => tracing::debug!(coretype = ?std::env::var("OPENBLAS_CORETYPE").ok(), "matrix products on OpenBLAS"),
                None => tracing::debug!("OpenBLAS not found: matrix products on the gemm crate"),
            }
            loaded
        })
        .as_ref()
}

impl OpenBlas {
    /// `out = lhs · rhs (+ out when accumulate)`, each operand row-major or a transposed view
    /// of a row-major matrix (one of its strides is 1). `None` when a layout does not fit.
    pub fn matmul(&self, lhs: super::Matrix, rhs: super::Matrix, out: &mut [f32], accumulate: bool) -> Option<()> {
        let layout = |m: &super::Matrix| -> Option<(i32, i32)> {
            if m.column_stride == 1 {
                Some((NO_TRANSPOSE, m.row_stride.max(m.columns.max(1)) as i32))
            } else if m.row_stride == 1 {
                Some((TRANSPOSE, m.column_stride.max(m.rows.max(1)) as i32))
            } else {
                None
            }
        };
        let ((trans_a, lda), (trans_b, ldb)) = (layout(&lhs)?, layout(&rhs)?);
        let (m, k, n) = (lhs.rows as i32, lhs.columns as i32, rhs.columns as i32);
        let beta = if accumulate { 1.0 } else { 0.0 };
        // SAFETY: the shapes and leading dimensions describe matrices inside the slices (the
        // caller checked their lengths), and `out` is an exclusive borrow.
        unsafe {
            (self.sgemm)(
                ROW_MAJOR,
                trans_a,
                trans_b,
                m,
                n,
                k,
                1.0,
                lhs.values.as_ptr(),
                lda,
                rhs.values.as_ptr(),
                ldb,
                beta,
                out.as_mut_ptr(),
                n.max(1),
            )
        };
        Some(())
    }
}
