//! SAM's two-way transformer: a few tokens (queries) and a map of image tokens (keys)
//! attend to each other in turn — token self-attention, token→image cross-attention, an
//! MLP on the tokens, image→token cross-attention — with post-norms, then one final
//! token→image attention.  Positional encodings are added to queries and keys before
//! every attention (never to values); the query encoding is the input tokens themselves.
//!
//! B batch (one per target), T tokens, N image tokens, C channels.
use super::conv::{
    push_layernorm, push_linear, CrossActs, CrossAttention,
    CrossIn::{Lend, Own, Same},
    NamedParams,
};
use super::layers::{MlpActs, NormStats};
use super::{LayerNorm, Mlp};
use crate::backend::{Act, Backend};
use crate::error::{check_len, Result};
use num_traits::Float;

/// LayerNorm epsilon of the transformer's norms (PyTorch's default, as in SAM).
const LN_EPS: f32 = 1e-5;
/// SAM halves the channels inside the token↔image attentions.
pub const CROSS_DOWNSAMPLE: usize = 2;

/// A forward's (queries, keys, saved activations).
pub type QueriesKeys<Buf, A> = (Buf, Buf, A);

/// One block of the two-way transformer.
#[derive(Clone, Debug)]
pub struct TwoWayBlock<F: Float = f32, B: Backend<F> = crate::backend::Cpu> {
    /// Token self-attention, full width C.
    pub self_attn: CrossAttention<F, B>,
    /// Post-norm of the tokens after the self-attention.
    pub norm1: LayerNorm<F, B>,
    /// Tokens attend to the image (width C/2 inside); SAM's `cross_attn_token_to_image`.
    pub cross_t2i: CrossAttention<F, B>,
    /// Post-norm of the tokens after the token→image attention.
    pub norm2: LayerNorm<F, B>,
    /// Token MLP C → `mlp_dim` → C with ReLU; SAM's `mlp.lin1`, `mlp.lin2`.
    pub mlp: Mlp<F, B>,
    /// Post-norm of the tokens after the MLP.
    pub norm3: LayerNorm<F, B>,
    /// Image tokens attend to the tokens (width C/2 inside); SAM's
    /// `cross_attn_image_to_token`.
    pub cross_i2t: CrossAttention<F, B>,
    /// Post-norm of the image tokens after the image→token attention.
    pub norm4: LayerNorm<F, B>,
    /// SAM's first block: the self-attention sees the tokens without their encoding and
    /// replaces them (no residual).
    pub skip_first_layer_pe: bool,
}

/// What a [`TwoWayBlock`] forward saves.
#[derive(Clone, Debug)]
pub struct BlockActs<Buf> {
    a1: CrossActs<Buf>,
    q1: Buf,
    n1: NormStats<Buf>,
    a2: CrossActs<Buf>,
    q2: Buf,
    n2: NormStats<Buf>,
    mlp: MlpActs<Buf>,
    q3: Buf,
    n3: NormStats<Buf>,
    a3: CrossActs<Buf>,
    k4: Buf,
    n4: NormStats<Buf>,
}

impl<F: Float, B: Backend<F>> TwoWayBlock<F, B> {
    /// Zero-initialised (norms: weight 1, bias 0): `c` channels, `nh` heads in every
    /// attention, an MLP hidden width of `mlp_dim`.
    pub fn new(
        be: &B,
        c: usize,
        nh: usize,
        mlp_dim: usize,
        skip_first_layer_pe: bool,
    ) -> Result<Self> {
        Ok(TwoWayBlock {
            self_attn: CrossAttention::new(be, c, nh, 1)?,
            norm1: LayerNorm::new(be, c, LN_EPS),
            cross_t2i: CrossAttention::new(be, c, nh, CROSS_DOWNSAMPLE)?,
            norm2: LayerNorm::new(be, c, LN_EPS),
            // SAM's MLPBlock: Linear → ReLU → Linear
            mlp: Mlp::new(be, c, mlp_dim, Act::Relu, true),
            norm3: LayerNorm::new(be, c, LN_EPS),
            cross_i2t: CrossAttention::new(be, c, nh, CROSS_DOWNSAMPLE)?,
            norm4: LayerNorm::new(be, c, LN_EPS),
            skip_first_layer_pe,
        })
    }

    /// queries, qpe (B·T, C), keys, kpe (B·N, C) → (queries, keys) of the same shapes.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        be: &B,
        q: &B::Buf,
        k: &B::Buf,
        qpe: &B::Buf,
        kpe: &B::Buf,
        b: usize,
        t: usize,
        n: usize,
    ) -> Result<QueriesKeys<B::Buf, BlockActs<B::Buf>>> {
        // the attentions keep their inputs: temporaries are handed over, the rest copied
        // each residual add is one op with the post-norm after it
        let (q1, q1n, n1, a1) = if self.skip_first_layer_pe {
            let (q1, a1) = self.self_attn.forward(be, Lend(q), Same, Same, b, t, t)?;
            let (q1n, n1) = self.norm1.forward(be, &q1)?;
            (q1, q1n, n1, a1)
        } else {
            let qp = be.add_new(&[q, qpe])?;
            let (a, a1) = self
                .self_attn
                .forward(be, Own(qp), Same, Lend(q), b, t, t)?;
            let (q1, q1n, n1) = self.norm1.forward_added(be, q, &a)?;
            (q1, q1n, n1, a1)
        };
        let kp = be.add_new(&[k, kpe])?;
        let qp = be.add_new(&[&q1n, qpe])?;
        let (a, a2) = self
            .cross_t2i
            .forward(be, Own(qp), Lend(&kp), Lend(k), b, t, n)?;
        let (q2, q2n, n2) = self.norm2.forward_added(be, &q1n, &a)?;
        let (m, mlp) = self.mlp.forward(be, q2n)?;
        // mlp.x is q2n, which the MLP keeps
        let (q3, q3n, n3) = self.norm3.forward_added(be, &mlp.x, &m)?;
        // image tokens query the tokens
        let qp = be.add_new(&[&q3n, qpe])?;
        let (a, a3) = self
            .cross_i2t
            .forward(be, Own(kp), Own(qp), Lend(&q3n), b, n, t)?;
        let (k4, k4n, n4) = self.norm4.forward_added(be, k, &a)?;
        let acts = BlockActs {
            a1,
            q1,
            n1,
            a2,
            q2,
            n2,
            mlp,
            q3,
            n3,
            a3,
            k4,
            n4,
        };
        Ok((q3n, k4n, acts))
    }

    /// Returns (dqueries, dkeys, dqpe), overwritten; the key encoding is constant.
    pub fn backward(
        &mut self,
        be: &B,
        a: &BlockActs<B::Buf>,
        dq_out: &B::Buf,
        dk_out: &B::Buf,
    ) -> Result<(B::Buf, B::Buf, B::Buf)> {
        // forward: k4n = norm4(k + i2t(k + kpe, q3n + qpe, q3n))
        // Each gradient's terms are added in one op, when the last of them is known.
        let dk4 = self.norm4.backward(be, &a.k4, &a.n4, dk_out)?;
        let (dkp, dqp3, dv3) = self.cross_i2t.backward(be, &a.a3, &dk4)?;
        let dq3n = be.add_new(&[dq_out, &dv3, &dqp3])?;
        // forward: q3n = norm3(q2n + mlp(q2n))
        let dq3 = self.norm3.backward(be, &a.q3, &a.n3, &dq3n)?;
        let mut dq2n = self.mlp.backward(be, &a.mlp, &dq3)?;
        be.add_into(&mut dq2n, &[&dq3])?;
        // forward: q2n = norm2(q1n + t2i(q1n + qpe, k + kpe, k))
        let dq2 = self.norm2.backward(be, &a.q2, &a.n2, &dq2n)?;
        let (dqp2, dkp2, dv2) = self.cross_t2i.backward(be, &a.a2, &dq2)?;
        let dq1n = be.add_new(&[&dq2, &dqp2])?;
        let dk = be.add_new(&[&dk4, &dkp, &dkp2, &dv2])?;
        // forward: q1n = norm1(q1)
        let dq1 = self.norm1.backward(be, &a.q1, &a.n1, &dq1n)?;
        // forward: q1 = attn(q, q, q)                      (first block)
        //      or: q1 = q + attn(q + qpe, q + qpe, q)      (the others)
        let (dqq, dqk, dqv) = self.self_attn.backward(be, &a.a1, &dq1)?;
        let mut dqpe = dqp3;
        let dq = if self.skip_first_layer_pe {
            be.add_into(&mut dqpe, &[&dqp2])?;
            be.add_new(&[&dqq, &dqk, &dqv])?
        } else {
            be.add_into(&mut dqpe, &[&dqp2, &dqq, &dqk])?;
            be.add_new(&[&dqq, &dqk, &dqv, &dq1])?
        };
        Ok((dq, dk, dqpe))
    }

    fn push_params<'a>(&'a mut self, out: &mut NamedParams<'a, F, B>, p: &str) {
        self.self_attn.push_params(out, &format!("{p}.self_attn"));
        push_layernorm(out, &format!("{p}.norm1"), &mut self.norm1);
        self.cross_t2i
            .push_params(out, &format!("{p}.cross_attn_token_to_image"));
        push_layernorm(out, &format!("{p}.norm2"), &mut self.norm2);
        push_linear(out, &format!("{p}.mlp.lin1"), &mut self.mlp.fc1);
        push_linear(out, &format!("{p}.mlp.lin2"), &mut self.mlp.fc2);
        push_layernorm(out, &format!("{p}.norm3"), &mut self.norm3);
        self.cross_i2t
            .push_params(out, &format!("{p}.cross_attn_image_to_token"));
        push_layernorm(out, &format!("{p}.norm4"), &mut self.norm4);
    }
}

/// SAM's `TwoWayTransformer`: `depth` blocks, then a final token→image attention with
/// a residual and a norm on the tokens.
#[derive(Clone, Debug)]
pub struct TwoWayTransformer<F: Float = f32, B: Backend<F> = crate::backend::Cpu> {
    /// The `depth` blocks; only the first has `skip_first_layer_pe` set.
    pub layers: Vec<TwoWayBlock<F, B>>,
    /// Final token→image attention (width C/2 inside); SAM's `final_attn_token_to_image`.
    pub final_attn: CrossAttention<F, B>,
    /// Norm on the tokens after the final attention; SAM's `norm_final_attn`.
    pub norm_final: LayerNorm<F, B>,
}

/// What a [`TwoWayTransformer`] forward saves.
#[derive(Clone, Debug)]
pub struct TwoWayActs<Buf> {
    blocks: Vec<BlockActs<Buf>>,
    fa: CrossActs<Buf>,
    qf: Buf,
    nf: NormStats<Buf>,
    b: usize,
    t: usize,
    n: usize,
}

impl<F: Float, B: Backend<F>> TwoWayTransformer<F, B> {
    /// Zero-initialised (norms: weight 1, bias 0).
    pub fn new(be: &B, depth: usize, c: usize, nh: usize, mlp_dim: usize) -> Result<Self> {
        Ok(TwoWayTransformer {
            layers: (0..depth)
                .map(|i| TwoWayBlock::new(be, c, nh, mlp_dim, i == 0))
                .collect::<Result<_>>()?,
            final_attn: CrossAttention::new(be, c, nh, CROSS_DOWNSAMPLE)?,
            norm_final: LayerNorm::new(be, c, LN_EPS),
        })
    }

    fn c(&self) -> usize {
        self.norm_final.weight.numel()
    }

    /// tokens (B·T, C) (also the query encoding), keys, kpe (B·N, C) → (tokens, keys).
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        be: &B,
        tokens: &B::Buf,
        keys: &B::Buf,
        kpe: &B::Buf,
        b: usize,
        t: usize,
        n: usize,
    ) -> Result<QueriesKeys<B::Buf, TwoWayActs<B::Buf>>> {
        let c = self.c();
        check_len(
            "TwoWayTransformer::forward",
            "tokens",
            be.len(tokens),
            b * t * c,
        )?;
        check_len(
            "TwoWayTransformer::forward",
            "keys",
            be.len(keys),
            b * n * c,
        )?;
        check_len(
            "TwoWayTransformer::forward",
            "key encoding",
            be.len(kpe),
            b * n * c,
        )?;
        // each block's outputs are the next one's inputs; the first reads the call's
        let mut qk: Option<(B::Buf, B::Buf)> = None;
        let mut blocks = Vec::with_capacity(self.layers.len());
        for l in &self.layers {
            let (q, k) = qk.as_ref().map_or((tokens, keys), |(q, k)| (q, k));
            let (q2, k2, a) = l.forward(be, q, k, tokens, kpe, b, t, n)?;
            qk = Some((q2, k2));
            blocks.push(a);
        }
        let (q, k) = qk.unwrap_or_else(|| (tokens.clone(), keys.clone()));
        let (qp, kp) = (be.add_new(&[&q, tokens])?, be.add_new(&[&k, kpe])?);
        let (a, fa) = self
            .final_attn
            .forward(be, Own(qp), Own(kp), Lend(&k), b, t, n)?;
        let (qf, qn, nf) = self.norm_final.forward_added(be, &q, &a)?;
        Ok((
            qn,
            k,
            TwoWayActs {
                blocks,
                fa,
                qf,
                nf,
                b,
                t,
                n,
            },
        ))
    }

    /// Returns (dtokens, dkeys), overwritten.
    pub fn backward(
        &mut self,
        be: &B,
        a: &TwoWayActs<B::Buf>,
        dq_out: &B::Buf,
        dk_out: &B::Buf,
    ) -> Result<(B::Buf, B::Buf)> {
        let c = self.c();
        check_len(
            "TwoWayTransformer::backward",
            "dtokens",
            be.len(dq_out),
            a.b * a.t * c,
        )?;
        check_len(
            "TwoWayTransformer::backward",
            "dkeys",
            be.len(dk_out),
            a.b * a.n * c,
        )?;
        // forward: out = norm_final(q + final(q + qpe, k + kpe, k))
        let dqf = self.norm_final.backward(be, &a.qf, &a.nf, dq_out)?;
        let (dqp, dkp, dv) = self.final_attn.backward(be, &a.fa, &dqf)?;
        let mut dq = be.add_new(&[&dqf, &dqp])?;
        let mut dqpe = dqp;
        let mut dk = be.add_new(&[dk_out, &dkp, &dv])?;
        for (l, acts) in self.layers.iter_mut().zip(&a.blocks).rev() {
            let (dq2, dk2, dqpe2) = l.backward(be, acts, &dq, &dk)?;
            (dq, dk) = (dq2, dk2);
            be.add_into(&mut dqpe, &[&dqpe2])?;
        }
        // the query encoding is the input tokens themselves
        be.add_into(&mut dq, &[&dqpe])?;
        Ok((dq, dk))
    }

    /// SAM's names under `prefix`: `layers.{i}.…`, `final_attn_token_to_image.…`,
    /// `norm_final_attn.…`.
    pub fn push_params<'a>(&'a mut self, out: &mut NamedParams<'a, F, B>, prefix: &str) {
        for (i, l) in self.layers.iter_mut().enumerate() {
            l.push_params(out, &format!("{prefix}.layers.{i}"));
        }
        self.final_attn
            .push_params(out, &format!("{prefix}.final_attn_token_to_image"));
        push_layernorm(
            out,
            &format!("{prefix}.norm_final_attn"),
            &mut self.norm_final,
        );
    }
}
