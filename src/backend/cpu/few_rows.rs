//! `out (+)= a · wᵀ` for a few rows of `a` (decoding: one row per answer being
//! generated), f32.  gemm packs `w` into panels on every call, which for a handful of
//! rows costs more than the product itself; here each output is a dot product of two
//! contiguous rows, `w` is read once per call and stays in cache across the rows of `a`.
//!
//! Every output is summed in the same order whatever the SIMD level or thread count:
//! 16 lanes over `k` (two AVX2 vectors or one AVX-512 vector), the lanes added in a fixed
//! tree, then the tail of `k` in order.  Column blocks are fixed in size, so results do
//! not depend on how rayon shares them.
use rayon::prelude::*;

/// Rows of `a` up to which [`matmul_few_rows`] runs instead of gemm.  Measured on the
/// tiny model's decoding shapes (k × n = 192 × 192, 192 × 512, 512 × 192, 192 × 804) on
/// a 2-core AVX2 machine: at 3–8 rows 1.1–2× faster than gemm, at 12–16 rows as often
/// slower as faster; at 1 row gemm's own vector path is faster, so `matmul` keeps it.
pub(crate) const FEW_ROWS: usize = 8;
/// Lanes of the partial sums.
const LANES: usize = 16;
/// Rows of `w` per pass: each chunk of a row of `a` is loaded once for 4 dot products.
const WB: usize = 4;
/// Output columns per rayon task.
const COLS: usize = 64;
/// Multiply-adds below which the product runs on one thread.
const SERIAL: usize = 1 << 18;

/// Sum of 16 lanes in a fixed tree.
#[inline(always)]
fn hsum(l: &[f32; LANES]) -> f32 {
    let mut h = [0f32; 8];
    for i in 0..8 {
        h[i] = l[i] + l[i + 8];
    }
    let q = [h[0] + h[4], h[1] + h[5], h[2] + h[6], h[3] + h[7]];
    (q[0] + q[2]) + (q[1] + q[3])
}

/// Dot products of `x` with four rows of `w` (16 lanes each, tails of `k` in order).
#[inline(always)]
fn dot4(x: &[f32], w0: &[f32], w1: &[f32], w2: &[f32], w3: &[f32]) -> [f32; WB] {
    let k = x.len();
    let body = k - k % LANES;
    let (mut a0, mut a1, mut a2, mut a3) =
        ([0f32; LANES], [0f32; LANES], [0f32; LANES], [0f32; LANES]);
    for c in (0..body).step_by(LANES) {
        let xs: &[f32; LANES] = x[c..c + LANES].try_into().unwrap();
        let y0: &[f32; LANES] = w0[c..c + LANES].try_into().unwrap();
        let y1: &[f32; LANES] = w1[c..c + LANES].try_into().unwrap();
        let y2: &[f32; LANES] = w2[c..c + LANES].try_into().unwrap();
        let y3: &[f32; LANES] = w3[c..c + LANES].try_into().unwrap();
        for l in 0..LANES {
            a0[l] += xs[l] * y0[l];
            a1[l] += xs[l] * y1[l];
            a2[l] += xs[l] * y2[l];
            a3[l] += xs[l] * y3[l];
        }
    }
    let mut s = [hsum(&a0), hsum(&a1), hsum(&a2), hsum(&a3)];
    for c in body..k {
        s[0] += x[c] * w0[c];
        s[1] += x[c] * w1[c];
        s[2] += x[c] * w2[c];
        s[3] += x[c] * w3[c];
    }
    s
}

/// Columns `j0..j0 + nb` of `a (m×k) · wᵀ` into `blk` (m × nb, row-major).  Four rows
/// of `w` at a time against every row of `a`: `w` is read once, `a` stays in L1.
#[inline(always)]
fn block(a: &[f32], w: &[f32], k: usize, j0: usize, blk: &mut [f32]) {
    let m = a.len() / k;
    let nb = blk.len() / m;
    let row = |j: usize| &w[j * k..(j + 1) * k];
    let mut j = 0;
    while j < nb {
        let r = (nb - j).min(WB);
        // a short last pass repeats its last row and drops the extra sums
        let q = |d: usize| row(j0 + j + d.min(r - 1));
        let (w0, w1, w2, w3) = (q(0), q(1), q(2), q(3));
        for (i, x) in a.chunks_exact(k).enumerate() {
            let s = dot4(x, w0, w1, w2, w3);
            blk[i * nb + j..i * nb + j + r].copy_from_slice(&s[..r]);
        }
        j += r;
    }
}

crate::simd_fn!(fn block_f32(a: &[f32], w: &[f32], k: usize, j0: usize, blk: &mut [f32]) => block);

/// `out (m×n) (+)= a (m×k) · wᵀ` with `w` (n×k) row-major; lengths already checked.
pub(crate) fn matmul_few_rows(
    a: &[f32],
    w: &[f32],
    out: &mut [f32],
    m: usize,
    k: usize,
    n: usize,
    add: bool,
) {
    by_column_blocks(out, m, n, m * n * k, add, |j0, blk| {
        block_f32(a, w, k, j0, blk)
    });
}

/// `out (m×n) (+)=` the column blocks `block(j0, blk)` computes (`blk`: m × the block's
/// width, row-major), `COLS` columns each, over rayon from `SERIAL` multiply-adds
/// (`work`); the blocks are the same at any thread count, so are the bits.
fn by_column_blocks(
    out: &mut [f32],
    m: usize,
    n: usize,
    work: usize,
    add: bool,
    block: impl Fn(usize, &mut [f32]) + Sync,
) {
    let nblk = n.div_ceil(COLS);
    let run = |b: usize| {
        let j0 = b * COLS;
        let nb = COLS.min(n - j0);
        let mut blk = vec![0f32; m * nb];
        block(j0, &mut blk);
        blk
    };
    let blocks: Vec<Vec<f32>> = if work < SERIAL {
        (0..nblk).map(run).collect()
    } else {
        (0..nblk).into_par_iter().map(run).collect()
    };
    for (b, blk) in blocks.iter().enumerate() {
        let j0 = b * COLS;
        let nb = COLS.min(n - j0);
        for i in 0..m {
            let o = &mut out[i * n + j0..i * n + j0 + nb];
            let s = &blk[i * nb..(i + 1) * nb];
            if add {
                o.iter_mut().zip(s).for_each(|(o, s)| *o += s);
            } else {
                o.copy_from_slice(s);
            }
        }
    }
}

/// Output columns one pass of [`rows_block`] keeps in its sums (four AVX-512 vectors).
const ROW_COLS: usize = 64;
/// Rows of `a` up to which [`matmul_rows_packed`] runs (its sums: `ROW_COLS` × this).
pub(crate) const PACKED_ROWS: usize = 2;

/// Columns `j0..j0 + nb` of `a (M×k) · w` with `w` (k×n) row-major into `blk` (M × nb),
/// `nb = blk.len() / M`: each row of `w` is read once for all `M` rows of `a`, and each
/// output is the sum over `k` in order.
#[inline(always)]
fn rows_block<const M: usize>(a: &[f32], w: &[f32], n: usize, j0: usize, blk: &mut [f32]) {
    let k = a.len() / M;
    let width = blk.len() / M;
    let mut c = 0;
    while c < width {
        let nb = (width - c).min(ROW_COLS);
        let mut acc = [[0f32; ROW_COLS]; M];
        for kk in 0..k {
            let at = kk * n + j0 + c;
            if nb == ROW_COLS {
                let r: &[f32; ROW_COLS] = w[at..at + ROW_COLS].try_into().unwrap();
                for (i, acc) in acc.iter_mut().enumerate() {
                    let xv = a[i * k + kk];
                    for l in 0..ROW_COLS {
                        acc[l] += xv * r[l];
                    }
                }
            } else {
                let r = &w[at..at + nb];
                for (i, acc) in acc.iter_mut().enumerate() {
                    let xv = a[i * k + kk];
                    for (s, &v) in acc.iter_mut().zip(r) {
                        *s += xv * v;
                    }
                }
            }
        }
        for (i, acc) in acc.iter().enumerate() {
            blk[i * width + c..i * width + c + nb].copy_from_slice(&acc[..nb]);
        }
        c += nb;
    }
}

crate::simd_fn!(fn rows_block_1(a: &[f32], w: &[f32], n: usize, j0: usize, blk: &mut [f32]) => rows_block::<1>);
crate::simd_fn!(fn rows_block_2(a: &[f32], w: &[f32], n: usize, j0: usize, blk: &mut [f32]) => rows_block::<2>);

/// `out (m×n) (+)= a (m×k) · w` with `w` (k×n) row-major and `1 ≤ m ≤ PACKED_ROWS`, as
/// a packed Linear's decoding step multiplies (`crate::nn::Linear::pack`).  gemm takes
/// it as a matrix-vector product with a column-major matrix; here `w` streams once for
/// all rows.  Measured on the tiny model's shapes (192 × 192 … 192 × 804, the 2-core AMD
/// EPYC with AVX-512): one row at 0.76–1.0× gemm on the plain layout (both stream `w`
/// at cache speed), two rows 1.1–1.4× it; gemm on this layout was slower at these
/// sizes (up to 2× for 804 columns).  From 3 rows gemm on this layout wins again.
/// Lengths already checked.
pub(crate) fn matmul_rows_packed(
    a: &[f32],
    w: &[f32],
    out: &mut [f32],
    m: usize,
    k: usize,
    n: usize,
    add: bool,
) {
    let block = match m {
        1 => rows_block_1,
        _ => rows_block_2,
    };
    debug_assert!((1..=PACKED_ROWS).contains(&m));
    by_column_blocks(out, m, n, m * n * k, add, |j0, blk| block(a, w, n, j0, blk));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::Rng;

    /// `kernel(a, w, out, m, k, n, add)` against an f64 reference on each (m, k, n),
    /// replacing and adding; `w_at(j, c, k, n)` is where `w` holds element (c, j) of
    /// the right operand.
    #[allow(clippy::type_complexity)]
    fn check_against_f64(
        seed: u64,
        shapes: &[(usize, usize, usize)],
        w_at: fn(usize, usize, usize, usize) -> usize,
        kernel: fn(&[f32], &[f32], &mut [f32], usize, usize, usize, bool),
    ) {
        let mut rng = Rng::new(seed);
        for &(m, k, n) in shapes {
            let a: Vec<f32> = (0..m * k).map(|_| rng.normal() as f32).collect();
            let w: Vec<f32> = (0..n * k).map(|_| rng.normal() as f32).collect();
            let init: Vec<f32> = (0..m * n).map(|_| rng.normal() as f32).collect();
            for add in [false, true] {
                let mut out = init.clone();
                kernel(&a, &w, &mut out, m, k, n, add);
                for i in 0..m {
                    for j in 0..n {
                        let mut want: f64 = (0..k)
                            .map(|c| a[i * k + c] as f64 * w[w_at(j, c, k, n)] as f64)
                            .sum();
                        if add {
                            want += init[i * n + j] as f64;
                        }
                        let got = out[i * n + j] as f64;
                        assert!(
                            (got - want).abs() <= 1e-5 * (1.0 + want.abs()) * (k as f64).sqrt(),
                            "({m},{k},{n}) add {add} at ({i},{j}): {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    /// `a · wᵀ` with `w` (n×k), at odd sizes (tails of `k`, of the 4-row passes and of
    /// the column blocks).
    #[test]
    fn matches_f64_products() {
        let shapes = [
            (1, 1, 1),
            (1, 17, 5),
            (3, 192, 130),
            (7, 33, 67),
            (16, 512, 193),
            (2, 100, 804),
        ];
        check_against_f64(3, &shapes, |j, c, k, _| j * k + c, matmul_few_rows);
    }

    /// 1–2 rows times `w` (k×n) row-major, at odd sizes (tails of the 64-column blocks
    /// and of the rayon blocks, a product large enough to split over rayon).
    #[test]
    fn packed_rows_match_f64_products() {
        let shapes = [
            (1, 1, 1),
            (2, 17, 5),
            (1, 192, 130),
            (2, 33, 67),
            (1, 512, 193),
            (2, 100, 804),
            (2, 700, 901),
        ];
        check_against_f64(5, &shapes, |j, c, _, n| c * n + j, matmul_rows_packed);
    }
}
