//! The crate's one SIMD dispatch.
//!
//! The crate builds for baseline x86-64 (4-lane SSE2), where the attention softmax's
//! `exp` took a third of the forward's time on an AVX-512 machine.  The CPU twins' hot row loops
//! are written once as `#[inline(always)]` generic Rust; [`simd_fn!`](crate::simd_fn)
//! compiles each into copies for AVX-512 and AVX2 and picks one at run time from
//! [`level`], detected once per process.  Only the instruction width changes: the loops
//! fix their own accumulation order, and Rust never contracts `a·b + c` into an FMA, so
//! every level gives bit-identical results.

use std::sync::OnceLock;

/// The widest instruction set the row loops may use on this CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    /// Whatever the build targets (SSE2 on x86-64, NEON on aarch64).
    Portable,
    /// 8 f32 lanes.
    Avx2,
    /// 16 f32 lanes.
    Avx512,
}

/// The level of this CPU, detected on the first call.
pub fn level() -> Level {
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(detect)
}

#[cfg(target_arch = "x86_64")]
fn detect() -> Level {
    use std::arch::is_x86_feature_detected as has;
    if has!("avx512f") && has!("avx2") && has!("fma") {
        Level::Avx512
    } else if has!("avx2") && has!("fma") {
        Level::Avx2
    } else {
        Level::Portable
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> Level {
    Level::Portable
}

/// Defines `fn $name(args) -> R` that runs `$body` (an `#[inline(always)]` function of
/// the same arguments) compiled for the widest [`Level`] of this CPU.
///
/// ```ignore
/// simd_fn!(pub(crate) fn row_max_f32(x: &[f32]) -> f32 => row_max::<f32>);
/// ```
#[macro_export]
#[doc(hidden)]
macro_rules! simd_fn {
    ($vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? => $body:path) => {
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                fn avx512($($arg: $ty),*) $(-> $ret)? {
                    $body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                fn avx2($($arg: $ty),*) $(-> $ret)? {
                    $body($($arg),*)
                }
                match $crate::kernels::simd::level() {
                    // SAFETY: `level` reported these features on this CPU.
                    $crate::kernels::simd::Level::Avx512 => return unsafe { avx512($($arg),*) },
                    // SAFETY: as above.
                    $crate::kernels::simd::Level::Avx2 => return unsafe { avx2($($arg),*) },
                    $crate::kernels::simd::Level::Portable => {}
                }
            }
            $body($($arg),*)
        }
    };
}
