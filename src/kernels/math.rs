//! Vectorisable `exp` and `erf` in f32, and reductions written so that the compiler keeps
//! several partial sums (a plain `iter().sum()` of floats must add in order, which forbids
//! SIMD). Everything here is `#[inline(always)]` so that it is compiled with the target
//! features of the kernel calling it (see [`multiversion`]).

/// Below this, `exp` underflows to 0 in f32: masked attention scores (−1e9) land here and get
/// a weight of exactly 0, as with the library's `exp`.
const EXP_MIN: f32 = -87.336_55;
const EXP_MAX: f32 = 88.722_83;

/// `e^x` with a relative error of about 2e-7 (Cephes' `expf`: x = n ln 2 + r, a degree-6
/// polynomial for `e^r`, and 2^n built in the exponent bits).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let clamped = x.clamp(EXP_MIN, EXP_MAX);
    // Round to nearest by the 1.5 · 2^23 trick: branch-free and vectorisable.
    const ROUND: f32 = 12_582_912.0;
    let n = (clamped * std::f32::consts::LOG2_E + ROUND) - ROUND;
    let r = clamped - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let r2 = r * r;
    let p = 1.987_569_1e-4_f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 5e-1;
    let y = p * r2 + r + 1.0;
    // Wrapping: the dev profile checks overflow, and that check kept loops calling `exp` from
    // vectorising (n + 127 stays in 0..=255 after the clamp).
    let scale = f32::from_bits(((n as i32).wrapping_add(127) as u32) << 23);
    if x < EXP_MIN {
        0.0
    } else {
        y * scale
    }
}

/// The error function with an absolute error below 1e-6 (a rational approximation in x²,
/// odd numerator of degree 13 over even denominator of degree 8, as Eigen and XLA use; erf is
/// ±1 in f32 beyond |x| = 4).
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let p = -2.726_142_3e-10_f32;
    let p = p * x2 + 2.770_681_4e-8;
    let p = p * x2 + -2.101_024e-6;
    let p = p * x2 + -5.692_506_4e-5;
    let p = p * x2 + -7.349_906_3e-4;
    let p = p * x2 + -2.954_600_1e-3;
    let p = p * x2 + -1.609_603_3e-2;
    let q = -1.456_607_2e-5_f32;
    let q = q * x2 + -2.133_740_6e-4;
    let q = q * x2 + -1.682_827e-3;
    let q = q * x2 + -7.373_329e-3;
    let q = q * x2 + -1.426_474e-2;
    x * p / q
}

const LANES: usize = 16;

/// Σ x, in 16 interleaved partial sums.
#[inline(always)]
pub fn sum(x: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().sum();
    for chunk in chunks {
        for (a, &v) in acc.iter_mut().zip(chunk) {
            *a += v;
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Σ a·b, in 16 interleaved partial sums.
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// The maximum of `x` (−∞ when empty).
#[inline(always)]
pub fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks
        .remainder()
        .iter()
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    for chunk in chunks {
        for (a, &v) in acc.iter_mut().zip(chunk) {
            *a = if v > *a { v } else { *a };
        }
    }
    acc.iter().copied().fold(tail, f32::max)
}

/// Defines `pub fn $name(args)` that runs `$body` compiled for AVX-512 or AVX2+FMA when the
/// processor has them (checked at run time, once per call), else for the build's baseline: one
/// portable source, vectorised by the compiler for each.
macro_rules! multiversion {
    ($(#[$meta:meta])* pub fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$meta])*
        pub fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                if std::arch::is_x86_feature_detected!("avx512f") {
                    #[target_feature(enable = "avx512f,avx2,fma")]
                    unsafe fn avx512($($arg: $ty),*) $body
                    // SAFETY: the processor has the features this copy was compiled for.
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    #[target_feature(enable = "avx2,fma")]
                    unsafe fn avx2($($arg: $ty),*) $body
                    // SAFETY: as above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            fn portable($($arg: $ty),*) $body
            portable($($arg),*)
        }
    };
}
pub(crate) use multiversion;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erf_is_within_1e_6_of_libm_everywhere_it_matters() {
        let mut worst = (0.0f64, 0.0f32);
        for i in -600_000..=600_000 {
            let x = i as f32 * 1e-5;
            let error = (erf(x) as f64 - libm::erf(x as f64)).abs();
            if error > worst.0 {
                worst = (error, x);
            }
        }
        assert!(worst.0 <= 1e-6, "erf error {} at x = {}", worst.0, worst.1);
        assert!((erf(50.0) - 1.0).abs() <= 1e-6 && (erf(-50.0) + 1.0).abs() <= 1e-6);
    }

    #[test]
    fn exp_is_within_4e_7_relative_and_underflows_to_exactly_zero() {
        for i in -87_000..=88_000 {
            let x = i as f32 * 1e-3;
            let expected = (x as f64).exp();
            let error = ((exp(x) as f64 - expected) / expected).abs();
            assert!(error < 4e-7, "exp({x}) relative error {error}");
        }
        assert_eq!(exp(-1.0e9), 0.0);
        assert_eq!(exp(-100.0), 0.0);
    }

    #[test]
    fn reductions_match_sequential_sums() {
        let x: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin()).collect();
        let y: Vec<f32> = (0..37).map(|i| (i as f32 * 0.11).cos()).collect();
        let sequential: f64 = x.iter().map(|&v| v as f64).sum();
        assert!((sum(&x) as f64 - sequential).abs() < 1e-5);
        let dot_sequential: f64 = x.iter().zip(&y).map(|(&a, &b)| a as f64 * b as f64).sum();
        assert!((dot(&x, &y) as f64 - dot_sequential).abs() < 1e-5);
        assert_eq!(max(&x), x.iter().copied().fold(f32::NEG_INFINITY, f32::max));
    }
}
