//! Throughput probes (`kernels/probe.cu`), for `benches/gpu.rs`: tensor-core products
//! (`probe_mma_tf32`, one `mma.sync` m16n8k8 TF32 each) and FFMAs (`probe_ffma`) in
//! [`CHAINS`] independent chains per thread, in registers.  Timed on a GPU they give the
//! rates an SM reaches when nothing else binds it; against the instruction counts of
//! `tools/sass_mix.sh` they say whether the attention kernels' loops wait on issue or on
//! the pipe.  The CPU twin [`probe_cpu`] gives each thread's result exactly (small
//! integers throughout), which the tests hold the kernels to.
use crate::error::{check_len, Error, Result};
use crate::kernels::{Device, DeviceBuf, KArg, LaunchCfg};

/// Independent chains per thread (`PROBE_CHAINS` in `probe.cu`).
pub const CHAINS: usize = 8;

/// Which probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Probe {
    /// `c += A B` by `mma.sync.m16n8k8` TF32, one HMMA per step and chain.
    MmaTf32,
    /// `x = fma(x, 1, 1)`, one FFMA per step and chain.
    Ffma,
}

impl Probe {
    /// The kernel's name.
    pub fn kernel(self) -> &'static str {
        match self {
            Probe::MmaTf32 => "probe_mma_tf32",
            Probe::Ffma => "probe_ffma",
        }
    }

    /// Floating-point operations (a multiply-add is 2) that one thread's share of
    /// `iters` steps does: an m16n8k8 product is 16·8·8 multiply-adds over 32 lanes.
    pub fn flops_per_thread(self, iters: usize) -> f64 {
        let per_step = match self {
            Probe::MmaTf32 => 2.0 * 16.0 * 8.0 * 8.0 / 32.0,
            Probe::Ffma => 2.0,
        };
        per_step * (CHAINS * iters) as f64
    }
}

fn check(op: &'static str, threads: u32, iters: usize) -> Result<()> {
    if threads == 0 || !threads.is_multiple_of(32) || threads > 1024 {
        return Err(Error::arg(
            op,
            format!("{threads} threads per block (whole warps, ≤ 1024)"),
        ));
    }
    if iters > i32::MAX as usize {
        return Err(Error::arg(op, format!("{iters} steps")));
    }
    Ok(())
}

/// Run probe `which` on `blocks` × `threads` threads (whole warps) for `iters` steps;
/// `out` (blocks·threads) gets each thread's sum over its chains.
pub fn probe(
    dev: &Device,
    which: Probe,
    blocks: u32,
    threads: u32,
    iters: usize,
    out: &mut DeviceBuf<f32>,
) -> Result<()> {
    const OP: &str = "probe";
    check(OP, threads, iters)?;
    check_len(OP, "out", out.len(), blocks as usize * threads as usize)?;
    if blocks == 0 {
        return Ok(());
    }
    let cfg = LaunchCfg::new([blocks, 1, 1], [threads, 1, 1], 0);
    let iters = KArg::I32(iters as i32);
    match which {
        Probe::MmaTf32 => dev.launch(which.kernel(), cfg, &[out.arg_mut(), iters]),
        Probe::Ffma => dev.launch(
            which.kernel(),
            cfg,
            &[out.arg_mut(), iters, KArg::F32(1.0), KArg::F32(1.0)],
        ),
    }
}

/// The CPU twin of [`probe`]: what each of `n` threads (`threads` per block) writes.
/// Thread lane `4g + t` of a warp holds, for the product, entries (g, 2t), (g, 2t + 1),
/// (g + 8, 2t), (g + 8, 2t + 1) of C = A B with `A[r][k] = (r + k) mod 3` and
/// `B[k][n] = (k + 2n) mod 5`; each chain starts at its index.  Summed in the kernel's
/// order.
pub fn probe_cpu(which: Probe, n: usize, threads: u32, iters: usize) -> Result<Vec<f32>> {
    check("probe_cpu", threads, iters)?;
    let c_entry = |r: usize, col: usize| -> f32 {
        (0..8)
            .map(|k| ((r + k) % 3 * ((k + 2 * col) % 5)) as f32)
            .sum()
    };
    Ok((0..n)
        .map(|i| {
            let lane = i % 32;
            let (g, t) = (lane / 4, lane % 4);
            let mut s = 0.0f32;
            for j in 0..CHAINS {
                let start = j as f32;
                match which {
                    Probe::MmaTf32 => {
                        for (r, col) in [
                            (g, 2 * t),
                            (g, 2 * t + 1),
                            (g + 8, 2 * t),
                            (g + 8, 2 * t + 1),
                        ] {
                            let (step, mut c) = (c_entry(r, col), start);
                            for _ in 0..iters {
                                c += step;
                            }
                            s += c;
                        }
                    }
                    Probe::Ffma => {
                        let mut x = start;
                        for _ in 0..iters {
                            x = x.mul_add(1.0, 1.0);
                        }
                        s += x;
                    }
                }
            }
            s
        })
        .collect())
}
