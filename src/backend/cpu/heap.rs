//! Keeping freed memory in the process, so the next step's buffers reuse it.
//!
//! The CPU backend allocates every intermediate fresh (`Backend::zeros`) and frees it
//! when the step is done.  glibc's defaults return large freed blocks to the kernel:
//! blocks of 128 KiB and more are `mmap`ed (the threshold adapts upwards only to the
//! largest block freed so far), and the heap's top is trimmed above 128 KiB.  Every
//! step then faults in and zeroes the same megabytes again: 11 % of a stage-1 step of
//! the tiny model was the kernel's page clearing.  [`keep_freed_memory`] raises both
//! limits; the process's resident memory then stays at its peak instead of falling
//! between steps.
//!
//! Measured with `cargo bench --bench seg_step` in the README's "Benchmarks".

/// Allocations below this come from the heap and are reused after `free`; glibc caps
/// the threshold at 32 MiB on 64-bit targets (the tiny model's largest buffer, the
/// LLM logits of a micro-batch, is ~6 MiB).
pub const MMAP_THRESHOLD: usize = 32 << 20;

/// Tells glibc's allocator to keep freed memory: blocks below [`MMAP_THRESHOLD`] come
/// from the heap, and the heap is never trimmed.  The `popen` binary calls it first
/// thing; a library user running long CPU training can call it too (or set
/// `GLIBC_TUNABLES=glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=2147483647`).
/// Returns whether glibc took both settings; elsewhere (musl, macOS, Windows) it does
/// nothing and returns false.
pub fn keep_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only sets allocator parameters; it is called before other
        // threads allocate (and glibc serializes it with its own arena lock anyway).
        unsafe {
            let mmap = libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD as libc::c_int);
            let trim = libc::mallopt(libc::M_TRIM_THRESHOLD, libc::c_int::MAX);
            mmap == 1 && trim == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn glibc_takes_both_settings_and_memory_still_works() {
        // mallopt rejects an mmap threshold above its cap (then this fails), and the
        // allocator must keep working after the change
        assert!(keep_freed_memory());
        let v: Vec<f32> = vec![1.5; MMAP_THRESHOLD / 4 - 1024];
        assert_eq!(
            v.iter().map(|&x| x as f64).sum::<f64>(),
            1.5 * v.len() as f64
        );
        drop(v);
        let w: Vec<u8> = vec![7; MMAP_THRESHOLD * 2];
        assert_eq!(w[MMAP_THRESHOLD * 2 - 1], 7);
    }
}
