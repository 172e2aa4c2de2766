//! The arguments of [`Backend`]'s ops: where their operands lie, their geometry and
//! their hyper-parameters, each with the checks its ops share.
#[cfg(doc)]
use super::Backend;
use crate::error::{Error, Result};

/// Whether an op overwrites its output or adds into it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accum {
    /// `out = result`; the old contents are ignored.
    Replace,
    /// `out += result`.
    Add,
}

/// Every term of an n-ary add ([`Backend::add_new`], [`Backend::add_into`]) has `n`
/// elements, or an error naming the first that has not.
pub(crate) fn check_terms(
    op: &'static str,
    n: usize,
    lens: impl Iterator<Item = usize>,
) -> Result<()> {
    for (i, len) in lens.enumerate() {
        if len != n {
            return Err(Error::shape(
                op,
                format!("term {i} has {len} elements, expected {n}"),
            ));
        }
    }
    Ok(())
}

/// The shape of one matrix product `out (M,N) = op(a) · op(b)`.
///
/// `a` is stored (M,K), or (K,M) when `ta`; `b` is stored (K,N), or (N,K) when `tb`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MatmulSpec {
    /// Rows of `out` and of `op(a)`.
    pub m: usize,
    /// The contracted dimension: columns of `op(a)`, rows of `op(b)`.
    pub k: usize,
    /// Columns of `out` and of `op(b)`.
    pub n: usize,
    /// `a` is stored transposed, (K,M).
    pub ta: bool,
    /// `b` is stored transposed, (N,K).
    pub tb: bool,
}

/// Pointwise activations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act {
    /// `x · σ(1.702 x)` (CLIP).
    QuickGelu,
    /// `0.5 x (1 + erf(x/√2))` (BERT, HF "gelu").
    GeluErf,
    /// `0.5 x (1 + tanh(√(2/π)(x + 0.044715 x³)))` (HF "gelu_pytorch_tanh").
    GeluTanh,
    /// `x · σ(x)` (LLaMA's gate).
    Silu,
    /// `max(x, 0)`.
    Relu,
    /// `σ(x) = 1/(1 + e^{−x})` (the pixel decoder's mask gate).
    Sigmoid,
}

/// Geometry of one stride-1 convolution on channels-last maps: input (B,H,W,C), square
/// kernel K, zero padding `pad` on every side.  Its im2col matrix is (B,Ho,Wo,K·K·C)
/// with Ho = H + 2·pad − K + 1 (and Wo alike), each row ordered (ky, kx, c).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv2dGeom {
    /// Batch size B.
    pub b: usize,
    /// Input height H, before padding.
    pub h: usize,
    /// Input width W, before padding.
    pub w: usize,
    /// Input channels C.
    pub c: usize,
    /// Side K of the square kernel.
    pub k: usize,
    /// Zero rows/columns added on every side of the input.
    pub pad: usize,
}

impl Conv2dGeom {
    /// (Ho, Wo); an error when the kernel is empty or larger than the padded input.
    pub fn out_hw(&self) -> Result<(usize, usize)> {
        let (ph, pw) = (self.h + 2 * self.pad, self.w + 2 * self.pad);
        if self.k == 0 || self.k > ph || self.k > pw {
            return Err(Error::arg(
                "Conv2dGeom",
                format!(
                    "kernel {k}x{k} does not fit the {h}x{w} input padded by {p} (= {ph}x{pw})",
                    k = self.k,
                    h = self.h,
                    w = self.w,
                    p = self.pad
                ),
            ));
        }
        Ok((ph - self.k + 1, pw - self.k + 1))
    }
    /// Width of one im2col row, K·K·C.
    pub fn col_width(&self) -> usize {
        self.k * self.k * self.c
    }
}

/// One [`Backend::copy_time`]: `n` time rows of each of `bh` blocks of `hs` values, from
/// rows `src_at..` of `src` (BH, `src_t`, HS) to rows `dst_at..` of `dst` (BH, `dst_t`, HS).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimeCopy {
    /// Number of blocks BH (B·NKV for a KV cache).
    pub bh: usize,
    /// Values per time row, HS.
    pub hs: usize,
    /// Time rows per block of `dst` (a cache's capacity).
    pub dst_t: usize,
    /// First time row written in each block of `dst`.
    pub dst_at: usize,
    /// Time rows per block of `src`.
    pub src_t: usize,
    /// First time row read in each block of `src`.
    pub src_at: usize,
    /// Time rows copied per block.
    pub n: usize,
}

impl TimeCopy {
    /// The copy as runs: each block's `n` rows are contiguous in both buffers, so a block
    /// is one run of `n·hs` values.
    pub fn runs(&self) -> RowCopy {
        RowCopy {
            rows: self.bh,
            width: self.n * self.hs,
            dst_off: self.dst_at * self.hs,
            dst_stride: self.dst_t * self.hs,
            src_off: self.src_at * self.hs,
            src_stride: self.src_t * self.hs,
        }
    }
    /// The rows fit both buffers and the buffers have their stated lengths.
    pub fn check(&self, op: &'static str, dst: usize, src: usize) -> Result<()> {
        let len = |t: usize| self.bh.checked_mul(t).and_then(|x| x.checked_mul(self.hs));
        let fits = |at: usize, t: usize| at.checked_add(self.n).is_some_and(|e| e <= t);
        if !fits(self.dst_at, self.dst_t) || !fits(self.src_at, self.src_t) {
            return Err(Error::shape(
                op,
                format!(
                    "rows {}..+{n} of a block of {} ← rows {}..+{n} of a block of {}",
                    self.dst_at,
                    self.dst_t,
                    self.src_at,
                    self.src_t,
                    n = self.n
                ),
            ));
        }
        let want = |t| len(t).ok_or_else(|| Error::shape(op, format!("{self:?} overflows")));
        crate::error::check_len(op, "dst (BH,dst_t,HS)", dst, want(self.dst_t)?)?;
        crate::error::check_len(op, "src (BH,src_t,HS)", src, want(self.src_t)?)
    }
}

/// Where a call's new keys and values go ([`Backend::append_kv`]): B rows of T new
/// positions, NKV heads of HS; the keys rotated by RoPE at positions `pos0 + t` when
/// `theta` is Some; written at time rows `at..at + T` of caches of `cap` rows per head.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct KvAppend {
    /// Batch rows.
    pub b: usize,
    /// New positions per row.
    pub t: usize,
    /// Key/value heads.
    pub nkv: usize,
    /// Head size.
    pub hs: usize,
    /// Position of the first new key (RoPE's angle).
    pub pos0: usize,
    /// RoPE's base for the keys; None leaves them as they are.
    pub theta: Option<f32>,
    /// Time rows per head of the caches.
    pub cap: usize,
    /// The first time row written.
    pub at: usize,
    /// Where the keys' rows lie in their buffer (NKV·HS values each).
    pub k_cols: Cols,
    /// Where the values' rows lie in theirs; the same row stride as the keys'.
    pub v_cols: Cols,
}

/// Where [`Backend::swiglu_fwd`]'s operands lie: rows of `w` values, the gate's at
/// `gate` and up's at `up` in their buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GateUp {
    /// Values per row W (LLaMA's intermediate size).
    pub w: usize,
    /// Where the gate's rows lie.
    pub gate: Cols,
    /// Where up's rows lie.
    pub up: Cols,
}

impl GateUp {
    /// Gate and up in buffers of their own, rows of `w`.
    pub fn apart(w: usize) -> GateUp {
        GateUp {
            w,
            gate: Cols::whole(w),
            up: Cols::whole(w),
        }
    }
    /// Gate and up as the halves of each row of one (N, 2W) product
    /// ([`crate::nn::SwiGluMlp::fuse`]): `[gate | up]`.
    pub fn fused(w: usize) -> GateUp {
        GateUp {
            w,
            gate: Cols { off: 0, ld: 2 * w },
            up: Cols { off: w, ld: 2 * w },
        }
    }
    /// Rows N of `out` (its length over W), checked against both operands' buffers
    /// (an error naming `op`).
    pub fn rows(&self, op: &'static str, gate: usize, up: usize, out: usize) -> Result<usize> {
        if self.w == 0 || !out.is_multiple_of(self.w) {
            return Err(Error::shape(
                op,
                format!(
                    "out of {out} values is not a whole number of rows of {}",
                    self.w
                ),
            ));
        }
        let n = out / self.w;
        self.gate.check(op, "gate", gate, n, self.w)?;
        self.up.check(op, "up", up, n, self.w)?;
        Ok(n)
    }
}

/// Where the rows of a token-major operand (N rows of W values) lie in its buffer:
/// row r at `off + r·ld`.  A buffer of its own is [`Cols::whole`]; one projection's
/// columns of a fused product's wider rows (the query, key and value of one product:
/// [`crate::nn::Attention::fuse`]) start at the columns before them, `ld` the full width.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cols {
    /// Where row 0 starts.
    pub off: usize,
    /// From one row to the next, at least W.
    pub ld: usize,
}

impl Cols {
    /// Rows of `width` values, one after the other from the buffer's start.
    pub fn whole(width: usize) -> Cols {
        Cols { off: 0, ld: width }
    }
    /// The length a buffer of `rows` rows of `width` values laid out so must have at
    /// least (0 without rows), checked: an `ld` below `width` is an error naming `op`.
    pub fn need(&self, op: &'static str, rows: usize, width: usize) -> Result<usize> {
        if self.ld < width {
            return Err(Error::shape(
                op,
                format!("rows of {width} values with a row stride of {}", self.ld),
            ));
        }
        if rows == 0 {
            return Ok(0);
        }
        (rows - 1)
            .checked_mul(self.ld)
            .and_then(|x| x.checked_add(self.off))
            .and_then(|x| x.checked_add(width))
            .ok_or_else(|| Error::shape(op, format!("{rows} rows at {self:?} overflow")))
    }
    /// `buf_len` holds `rows` rows of `width` values laid out so (an error naming `op`
    /// and `what` otherwise); a buffer longer than needed is fine only when the rows are
    /// not [`Cols::whole`] (a whole buffer must be exactly its rows).
    pub fn check(
        &self,
        op: &'static str,
        what: &str,
        buf_len: usize,
        rows: usize,
        width: usize,
    ) -> Result<()> {
        let need = self.need(op, rows, width)?;
        if *self == Cols::whole(width) {
            return crate::error::check_len(op, what, buf_len, rows * width);
        }
        if buf_len < need {
            return Err(Error::shape(
                op,
                format!(
                    "{what}: {rows} rows of {width} at {self:?} need {need} values, the \
                     buffer holds {buf_len}"
                ),
            ));
        }
        Ok(())
    }
}

/// One [`Backend::copy_rows`]: `rows` runs of `width` values, run r from
/// `src[src_off + r·src_stride ..]` to `dst[dst_off + r·dst_stride ..]` (a crop out of a
/// wider map, or back into it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowCopy {
    /// Number of runs.
    pub rows: usize,
    /// Values per run.
    pub width: usize,
    /// Where the first run goes in `dst`.
    pub dst_off: usize,
    /// From one run to the next in `dst`.
    pub dst_stride: usize,
    /// Where the first run comes from in `src`.
    pub src_off: usize,
    /// From one run to the next in `src`.
    pub src_stride: usize,
}

impl RowCopy {
    /// The same runs copied back: `dst` and `src` exchanged.
    pub fn swapped(self) -> RowCopy {
        RowCopy {
            dst_off: self.src_off,
            dst_stride: self.src_stride,
            src_off: self.dst_off,
            src_stride: self.dst_stride,
            ..self
        }
    }
    /// Row pairs (dst row, src row) of `width` values as runs: consecutive pairs that
    /// step by one dst stride (forward) and one src stride (forward or 0) join one run.
    /// A sequence's image tokens are one run, a mask's token rows one, and the masks of
    /// one image one run of src stride 0.
    pub fn from_rows(pairs: impl IntoIterator<Item = (usize, usize)>, width: usize) -> Vec<Self> {
        // (first dst row, first src row, rows, dst step, src step), in rows
        let mut runs: Vec<(usize, usize, usize, usize, usize)> = Vec::new();
        for (d, s) in pairs {
            match runs.last_mut() {
                Some((d0, s0, n @ 1, ds, ss)) if d > *d0 && s >= *s0 => {
                    (*ds, *ss, *n) = (d - *d0, s - *s0, 2);
                }
                Some((d0, s0, n, ds, ss))
                    if *n > 1 && d == *d0 + *n * *ds && s == *s0 + *n * *ss =>
                {
                    *n += 1;
                }
                _ => runs.push((d, s, 1, 1, 1)),
            }
        }
        runs.into_iter()
            .map(|(d, s, rows, ds, ss)| RowCopy {
                rows,
                width,
                dst_off: d * width,
                dst_stride: ds * width,
                src_off: s * width,
                src_stride: ss * width,
            })
            .collect()
    }
    /// Every run lies inside both buffers, and no two runs write the same place of
    /// `dst` (a device writes the runs at once, in no order).
    pub fn check(&self, op: &'static str, dst: usize, src: usize) -> Result<()> {
        if self.rows == 0 || self.width == 0 {
            return Ok(());
        }
        if self.rows > 1 && self.dst_stride < self.width {
            return Err(Error::shape(
                op,
                format!(
                    "runs of {} every {} overlap in dst",
                    self.width, self.dst_stride
                ),
            ));
        }
        let end = |off: usize, stride: usize| {
            (self.rows - 1)
                .checked_mul(stride)
                .and_then(|x| x.checked_add(off))
                .and_then(|x| x.checked_add(self.width))
        };
        for (what, len, off, stride) in [
            ("dst", dst, self.dst_off, self.dst_stride),
            ("src", src, self.src_off, self.src_stride),
        ] {
            if end(off, stride).is_none_or(|e| e > len) {
                return Err(Error::shape(
                    op,
                    format!(
                        "{} runs of {} at {what} {off} every {stride} pass its length {len}",
                        self.rows, self.width
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// What [`Backend::mask_loss_fwd`] returns for M masks.
#[derive(Debug, Clone)]
pub struct MaskLosses<F, Buf> {
    /// Per mask: (BCE averaged over its pixels, Dice loss).
    pub losses: Vec<(F, F)>,
    /// Per mask, the four sums both losses are made of (M, 4): Σ of the BCE terms,
    /// Σ σ/s·t, Σ σ/s and Σ t/s (s = [`DICE_SCALE`](crate::backend::image::DICE_SCALE)).
    /// Hand them to [`Backend::mask_loss_bwd`] with the same logits and target.
    pub sums: Buf,
}

/// One parameter tensor's buffers in [`Backend::adamw_step_many`].
#[derive(Debug)]
pub struct AdamWSlot<'a, Buf> {
    /// the weights, updated in place
    pub param: &'a mut Buf,
    /// their gradient
    pub grad: &'a Buf,
    /// the first-moment average, updated
    pub m: &'a mut Buf,
    /// the second-moment average, updated
    pub v: &'a mut Buf,
}

/// Hyper-parameters of one AdamW step (with the bias corrections already folded in by
/// the caller through `step`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWStep {
    /// Learning rate; it also scales the decoupled weight decay.
    pub lr: f32,
    /// Decay of the first-moment (mean) estimate `m`.
    pub beta1: f32,
    /// Decay of the second-moment estimate `v`.
    pub beta2: f32,
    /// Added to `√v̂` in the denominator.
    pub eps: f32,
    /// Decoupled weight decay: the step subtracts `lr · weight_decay · param`.
    pub weight_decay: f32,
    /// 1-based step number, for the bias corrections `1 − βᵗ`.
    pub step: u64,
}

#[cfg(test)]
mod tests {
    use super::{Cols, GateUp};

    #[test]
    fn columns_of_wider_rows_need_what_their_last_row_reaches() {
        const OP: &str = "test";
        // a buffer of its own: exactly its rows
        let whole = Cols::whole(5);
        assert_eq!(whole.need(OP, 3, 5).unwrap(), 15);
        assert!(whole.check(OP, "x", 15, 3, 5).is_ok());
        assert!(whole.check(OP, "x", 16, 3, 5).is_err());
        // rows of 4 at column 2 of rows of 7: the last row ends at 2 + 2·7 + 4
        let cols = Cols { off: 2, ld: 7 };
        assert_eq!(cols.need(OP, 3, 4).unwrap(), 20);
        assert!(cols.check(OP, "x", 20, 3, 4).is_ok());
        assert!(cols.check(OP, "x", 25, 3, 4).is_ok());
        let e = cols.check(OP, "x", 19, 3, 4).unwrap_err().to_string();
        assert!(e.contains("need 20") && e.contains("holds 19"), "{e}");
        assert_eq!(cols.need(OP, 0, 4).unwrap(), 0);
        // a stride below the width, and rows past the address space, are errors
        let e = Cols { off: 0, ld: 3 }
            .need(OP, 2, 4)
            .unwrap_err()
            .to_string();
        assert!(e.contains("row stride of 3"), "{e}");
        let far = Cols {
            off: usize::MAX,
            ld: 1,
        };
        assert!(far
            .need(OP, 2, 1)
            .unwrap_err()
            .to_string()
            .contains("overflow"));
    }

    #[test]
    fn gate_and_up_halves_are_checked_against_their_buffers() {
        const OP: &str = "test";
        let f = GateUp::fused(3);
        assert_eq!((f.gate.off, f.up.off, f.up.ld), (0, 3, 6));
        assert_eq!(f.rows(OP, 12, 12, 6).unwrap(), 2);
        // the gate's half of 2 rows ends at 6 + 3, up's at 3 + 6 + 3
        assert!(f.rows(OP, 9, 12, 6).is_ok());
        assert!(f.rows(OP, 8, 12, 6).is_err(), "gate one value short");
        assert!(f.rows(OP, 12, 11, 6).is_err(), "up one value short");
        assert!(f.rows(OP, 12, 12, 7).is_err(), "out not whole rows");
        assert!(
            GateUp::fused(0).rows(OP, 0, 0, 0).is_err(),
            "rows of nothing"
        );
        assert_eq!(GateUp::apart(3).rows(OP, 6, 6, 6).unwrap(), 2);
        assert!(
            GateUp::apart(3).rows(OP, 6, 9, 6).is_err(),
            "up of another length"
        );
    }
}
