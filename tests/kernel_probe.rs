//! The throughput probes (`kernels/probe.cu`) against their CPU twin, exactly: every
//! value is a small integer.
use popen::kernels::probe::{probe, probe_cpu, Probe};
use popen::kernels::Device;

#[test]
fn probes_match_their_twin_exactly() {
    for dev in Device::test_devices() {
        for which in [Probe::MmaTf32, Probe::Ffma] {
            for (blocks, threads, iters) in [(3u32, 64u32, 5usize), (1, 32, 0), (2, 96, 1)] {
                let n = (blocks * threads) as usize;
                let mut out = dev.zeros::<f32>(n).unwrap();
                probe(&dev, which, blocks, threads, iters, &mut out).unwrap();
                let want = probe_cpu(which, n, threads, iters).unwrap();
                let got = dev.download(&out).unwrap();
                assert_eq!(
                    got, want,
                    "{dev:?} {which:?} {blocks}×{threads}, {iters} steps"
                );
            }
        }
    }
}

#[test]
fn probe_rejects_partial_warps_and_wrong_lengths() {
    let dev = Device::emulator();
    let mut out = dev.zeros::<f32>(48).unwrap();
    let e = probe(&dev, Probe::MmaTf32, 1, 48, 1, &mut out).unwrap_err();
    assert!(e.to_string().contains("whole warps"), "{e}");
    let e = probe(&dev, Probe::Ffma, 2, 32, 1, &mut out).unwrap_err();
    assert!(e.to_string().contains("out"), "{e}");
    assert!(probe_cpu(Probe::Ffma, 4, 0, 1).is_err());
}

/// The twin's values are the ones the docs give: a chain of the FFMA probe ends at its
/// index + steps, and an HMMA step adds C = A B, whose lane-0 entries are fixed here by
/// hand.
#[test]
fn twin_values_are_the_documented_ones() {
    let iters = 7;
    let f = probe_cpu(Probe::Ffma, 1, 32, iters).unwrap();
    let chains: f32 = (0..8).map(|j| (j + iters) as f32).sum();
    assert_eq!(f, [chains]);
    // lane 0 (g = t = 0): C[0][0] = Σ_k (k mod 3)(k mod 5) = 0+1+4+0+4+0+0+2 = 11,
    // C[0][1] = Σ_k (k mod 3)((k + 2) mod 5) = 0+3+8+0+1+4+0+4 = 20,
    // C[8][0] = Σ_k ((8 + k) mod 3)(k mod 5) = 0+0+2+6+0+0+2+0 = 10,
    // C[8][1] = Σ_k ((8 + k) mod 3)((k + 2) mod 5) = 4+0+4+0+0+2+6+0 = 16
    let m = probe_cpu(Probe::MmaTf32, 1, 32, 1).unwrap();
    let per_chain = 11.0 + 20.0 + 10.0 + 16.0;
    let want: f32 = (0..8).map(|j| 4.0 * j as f32 + per_chain).sum();
    assert_eq!(m, [want]);
}
