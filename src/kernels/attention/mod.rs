//! Biased attention (POPEN Eq. 5 and 6): `O = softmax(Q Kᵀ·scale + γ + mask) V` per head,
//! where `γ` is an additive bias per (batch, key position).
//!
//! Causal or bidirectional, grouped-query heads (`NKV` divides `NH`, head `h` reads kv
//! head `h / (NH/NKV)`), head sizes `1..=128`, optional padding mask.  The forward saves
//! the per-row natural-log log-sum-exp and never stores the `Tq×Tk` score matrix; the
//! backward recomputes the scores from it and returns `dQ, dK, dV` and `dγ`.  A
//! single-query decode reads a KV cache.
//!
//! Three pieces under one name: the CUDA kernels (`kernels/attention.cu`, SIMT, and
//! `kernels/attention_tc.cu`, tensor cores, over `kernels/attention.cuh`), the launch
//! wrappers (`attention_fwd`, ... in `launch.rs`), and the CPU twins
//! (`attention_fwd_cpu`, ... in `cpu.rs`, on the row loops of `cpu_rows.rs`), which are
//! also the CPU backend of the transformer.  This file holds the shapes and their checks.
//!
//! B batch, NH query heads, NKV key/value heads, Tq queries, Tk keys, HS head size.
//!
//! Conventions shared by every function here:
//! - layouts: q (B,NH,Tq,HS), k and v (B,NKV,Tk,HS), bias γ (B,Tk), key_mask (B,Tk) with
//!   1 = attend and 0 = padding, out (B,NH,Tq,HS), lse (B,NH,Tq); the forward also reads
//!   k and v as (B,NKV,kv_stride,HS), the first Tk rows of each block (a preallocated KV
//!   cache in place; [`AttnShape::kv_stride`]); any of q, k, v and out (with its
//!   gradient) may instead be token-major, (B,T,H,HS) ([`AttnLayout`]): a linear layer's
//!   output read in place;
//! - causal: query `i` (0-based in Tq) sees key `j` iff `j <= i + (Tk - Tq)`, i.e. the
//!   queries are the last Tq positions of the key sequence, as with a KV cache;
//! - a row with no visible key (causal cut, padding, or a bias of −inf everywhere) has
//!   `out = 0`, `lse = −inf` and zero gradients;
//! - zero sizes: `B`, `NH`, `Tq` or `Tk` may be 0 (empty outputs; with `Tk = 0` every row
//!   is a row with no visible key); `NKV = 0` and `HS = 0` are errors;
//! - NaN in the inputs is not checked (too costly for the hot path): it propagates.
//!
//! ```
//! use popen::kernels::attention::{attention_fwd_cpu, AttnShape};
//! // one head, two queries over two keys; a large bias on key 1 takes all the weight
//! let s = AttnShape { b: 1, nh: 1, nkv: 1, tq: 2, tk: 2, kv_stride: 2, hs: 1, causal: false, scale: 1.0,
//!     layout: Default::default() };
//! let (q, k, v) = ([0.0f32, 0.0], [0.0f32, 0.0], [1.0f32, 5.0]);
//! let bias = [0.0f32, 50.0];
//! let (mut out, mut lse) = ([0.0f32; 2], [0.0f32; 2]);
//! attention_fwd_cpu(&s, &q, &k, &v, Some(&bias), None, &mut out, &mut lse).unwrap();
//! assert!((out[0] - 5.0).abs() < 1e-5 && (lse[0] - 50.0).abs() < 1e-5);
//! ```
use crate::error::{check_len, Error, Result};

mod cpu;
mod cpu_rows;
mod launch;

pub(crate) use cpu::swap_middle;
pub use cpu::{attention_bwd_cpu, attention_decode_cpu, attention_fwd_cpu};
pub use launch::{
    attention_bwd, attention_bwd_tc, attention_decode, attention_fwd, attention_fwd_bf16,
    attention_fwd_tc, tensor_core_head_size, AttnBwdFn, AttnFwdFn,
};

/// Largest head size the kernels support (one warp holds a row of up to 4×32 values).
pub const MAX_HEAD_SIZE: usize = 128;

/// Which operands of an attention call are token-major: `true`, a token's heads are
/// adjacent, (B,T,H,HS) — the (B·T, H·HS) that a linear layer writes, so the kernels
/// read it (and write its gradient) in place, with no heads split before the call and
/// no merge after; `false` (the default), a head's rows are adjacent, (B,H,T,HS), as
/// `heads_split` writes them and a KV cache holds them.  The arithmetic is the same in
/// both layouts, so the results are bit for bit the same.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AttnLayout {
    /// q, and the backward's dq.
    pub q: bool,
    /// k and dk; token-major k needs packed keys (`kv_stride = tk`).
    pub k: bool,
    /// v and dv; token-major v needs packed keys too.
    pub v: bool,
    /// out, and the backward's dout.
    pub out: bool,
}

impl AttnLayout {
    /// Every operand head-major.
    pub const HEADS: AttnLayout = AttnLayout {
        q: false,
        k: false,
        v: false,
        out: false,
    };
    /// Every operand token-major.
    pub const TOKENS: AttnLayout = AttnLayout {
        q: true,
        k: true,
        v: true,
        out: true,
    };

    /// The kernels' `lay` argument: one bit per token-major operand (`ATT_LAY_*` in
    /// `kernels/attention.cuh`).
    pub fn bits(&self) -> i32 {
        i32::from(self.q)
            | i32::from(self.k) << 1
            | i32::from(self.v) << 2
            | i32::from(self.out) << 3
    }
}

/// Sizes and flags of one attention call.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttnShape {
    /// Batch size B.
    pub b: usize,
    /// Query heads NH.
    pub nh: usize,
    /// Key/value heads NKV (divides NH).
    pub nkv: usize,
    /// Queries per sequence Tq.
    pub tq: usize,
    /// Keys per sequence Tk.
    pub tk: usize,
    /// Rows from the start of one (batch, kv head) block of `k` and `v` to the next:
    /// `tk` for packed buffers, a preallocated KV cache's capacity (≥ `tk`, of which
    /// the first `tk` rows are read) for a cache.  The backward takes packed buffers only.
    pub kv_stride: usize,
    /// Head size HS, `1..=128`.
    pub hs: usize,
    /// Query `i` sees key `j` iff `j <= i + (Tk - Tq)`.
    pub causal: bool,
    /// Multiplies `Q Kᵀ` (usually `1/sqrt(HS)`); must be finite.
    pub scale: f32,
    /// Which operands are token-major (default: none).
    pub layout: AttnLayout,
}

impl AttnShape {
    /// Query heads per key/value head (`NH / NKV`).
    pub fn group(&self) -> usize {
        self.nh / self.nkv.max(1)
    }

    /// Keys `0..n` that query `i` may see before padding and bias are applied.
    pub fn visible_keys(&self, i: usize) -> usize {
        if self.causal {
            // j <= i + Tk - Tq  <=>  j < i + 1 + Tk - Tq, clamped to [0, Tk]
            (i + 1 + self.tk).saturating_sub(self.tq).min(self.tk)
        } else {
            self.tk
        }
    }

    /// Number of (query, key) pairs per head that the causal rule lets through; the
    /// forward costs `4·B·NH·pairs·HS` flops (two matrix products), the backward 2.5×.
    pub fn score_pairs(&self) -> usize {
        (0..self.tq).map(|i| self.visible_keys(i)).sum()
    }

    /// Forward flops (`Q Kᵀ` and `P V`), counting only visible pairs.
    pub fn fwd_flops(&self) -> f64 {
        4.0 * (self.b * self.nh * self.hs) as f64 * self.score_pairs() as f64
    }

    /// Backward flops (`P` recomputed, then `dV, dP, dQ, dK`: five products).
    pub fn bwd_flops(&self) -> f64 {
        2.5 * self.fwd_flops()
    }

    /// Checks the sizes and flags; `op` names the caller in the error.
    pub fn validate(&self, op: &'static str) -> Result<()> {
        if self.nkv == 0 {
            return Err(Error::arg(op, "nkv (key/value heads) must be at least 1"));
        }
        if !self.nh.is_multiple_of(self.nkv) {
            return Err(Error::arg(
                op,
                format!("nh = {} is not a multiple of nkv = {}", self.nh, self.nkv),
            ));
        }
        if self.hs == 0 || self.hs > MAX_HEAD_SIZE {
            return Err(Error::arg(
                op,
                format!("head size hs = {} is outside 1..={MAX_HEAD_SIZE}", self.hs),
            ));
        }
        if self.kv_stride < self.tk {
            return Err(Error::arg(
                op,
                format!(
                    "kv_stride = {} rows per key block is less than tk = {}",
                    self.kv_stride, self.tk
                ),
            ));
        }
        if (self.layout.k || self.layout.v) && self.kv_stride != self.tk {
            return Err(Error::arg(
                op,
                format!(
                    "token-major keys or values are packed: kv_stride = {} must equal tk = {}",
                    self.kv_stride, self.tk
                ),
            ));
        }
        if !self.scale.is_finite() {
            return Err(Error::arg(
                op,
                format!("scale = {} is not finite", self.scale),
            ));
        }
        // Every length below must fit in usize, and the kernels index with i32 rows.
        let big = [
            self.q_len(),
            self.kv_len(),
            self.b.checked_mul(self.tk),
            self.lse_len(),
        ];
        if big.iter().any(|x| x.is_none_or(|n| n > i32::MAX as usize)) {
            return Err(Error::shape(op, format!("sizes too large: {self:?}")));
        }
        Ok(())
    }

    fn q_len(&self) -> Option<usize> {
        self.b
            .checked_mul(self.nh)?
            .checked_mul(self.tq)?
            .checked_mul(self.hs)
    }
    fn kv_len(&self) -> Option<usize> {
        self.b
            .checked_mul(self.nkv)?
            .checked_mul(self.kv_stride)?
            .checked_mul(self.hs)
    }
    fn lse_len(&self) -> Option<usize> {
        self.b.checked_mul(self.nh)?.checked_mul(self.tq)
    }

    /// Validates and checks every buffer length of a forward call.
    #[allow(clippy::too_many_arguments)]
    fn check_fwd(
        &self,
        op: &'static str,
        q: usize,
        k: usize,
        v: usize,
        bias: Option<usize>,
        mask: Option<usize>,
        out: usize,
        lse: usize,
    ) -> Result<()> {
        self.validate(op)?;
        let (ql, kvl, bl, ll) = (
            self.b * self.nh * self.tq * self.hs,
            self.b * self.nkv * self.kv_stride * self.hs,
            self.b * self.tk,
            self.b * self.nh * self.tq,
        );
        let l = self.layout;
        operand(op, "q", dims(l.q, "NH", "Tq"), q, ql)?;
        let t = if self.kv_stride == self.tk {
            "Tk"
        } else {
            "kv_stride"
        };
        operand(op, "k", dims(l.k, "NKV", t), k, kvl)?;
        operand(op, "v", dims(l.v, "NKV", t), v, kvl)?;
        if let Some(n) = bias {
            check_len(op, "bias (B,Tk)", n, bl)?;
        }
        if let Some(n) = mask {
            check_len(op, "key_mask (B,Tk)", n, bl)?;
        }
        operand(op, "out", dims(l.out, "NH", "Tq"), out, ql)?;
        check_len(op, "lse (B,NH,Tq)", lse, ll)
    }

    /// The backward's gradient sizes, given q, k, v lengths already checked by
    /// [`AttnShape::check_fwd`]: dout and dq like q, dk like k, dv like v, dbias (B,Tk).
    fn check_grads(
        &self,
        op: &'static str,
        [q, k, v]: [usize; 3],
        [dout, dq, dk, dv]: [usize; 4],
        dbias: Option<usize>,
    ) -> Result<()> {
        if self.kv_stride != self.tk {
            return Err(Error::arg(
                op,
                format!(
                    "the backward takes packed keys (kv_stride = tk), not kv_stride = {} with tk = {}",
                    self.kv_stride, self.tk
                ),
            ));
        }
        let l = self.layout;
        operand(op, "dout", dims(l.out, "NH", "Tq"), dout, q)?;
        operand(op, "dq", dims(l.q, "NH", "Tq"), dq, q)?;
        operand(op, "dk", dims(l.k, "NKV", "Tk"), dk, k)?;
        operand(op, "dv", dims(l.v, "NKV", "Tk"), dv, v)?;
        if let Some(n) = dbias {
            check_len(op, "dbias (B,Tk)", n, self.b * self.tk)?;
        }
        Ok(())
    }
}

/// An operand's dimensions for an error label: (B,H,T,HS) or, token-major, (B,T,H,HS).
fn dims<'a>(tokens: bool, heads: &'a str, t: &'a str) -> [&'a str; 4] {
    if tokens {
        ["B", t, heads, "HS"]
    } else {
        ["B", heads, t, "HS"]
    }
}

/// [`check_len`] of one operand, its label (`q (B,NH,Tq,HS)`) formed only for the error.
fn operand(op: &'static str, name: &str, dims: [&str; 4], got: usize, want: usize) -> Result<()> {
    if got == want {
        return Ok(());
    }
    check_len(op, &format!("{name} ({})", dims.join(",")), got, want)
}

/// Shape, scale, `len` and buffer sizes of a decode step: q (B,NH,HS),
/// k_cache and v_cache (B,NKV,Tmax,HS), out (B,NH,HS), bias (B,len): one value per
/// valid key, as [`AttnShape`]'s bias (B,Tk).
fn check_decode(
    op: &'static str,
    [b, nh, nkv, tmax, len, hs]: [usize; 6],
    scale: f32,
    [q, k_cache, v_cache, out]: [usize; 4],
    bias: Option<usize>,
) -> Result<()> {
    let s = AttnShape {
        b,
        nh,
        nkv,
        tq: 1,
        tk: len,
        kv_stride: tmax,
        hs,
        causal: false,
        scale,
        layout: AttnLayout::HEADS,
    };
    if len > tmax {
        return Err(Error::arg(
            op,
            format!("len = {len} valid cache positions exceed Tmax = {tmax}"),
        ));
    }
    s.validate(op)?;
    check_len(op, "q (B,NH,HS)", q, b * nh * hs)?;
    check_len(op, "k_cache (B,NKV,Tmax,HS)", k_cache, b * nkv * tmax * hs)?;
    check_len(op, "v_cache (B,NKV,Tmax,HS)", v_cache, b * nkv * tmax * hs)?;
    if let Some(n) = bias {
        check_len(op, "bias (B,len)", n, b * len)?;
    }
    check_len(op, "out (B,NH,HS)", out, b * nh * hs)?;
    Ok(())
}
