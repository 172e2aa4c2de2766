//! Pointwise activations and LLaMA's SwiGLU, each derivative under its value.
use super::{exp_f32, f, CpuFloat, MIN_ELEMS_PER_TASK};
use crate::backend::{Act, GateUp};
use crate::error::{check_len, Result};
use crate::kernels::fastmath::erf_f32;
use rayon::prelude::*;
use std::any::TypeId;

/// √(2/π), for the tanh GELU.
const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;
/// 1/√2, for the erf GELU.
const FRAC_1_SQRT_2: f64 = std::f64::consts::FRAC_1_SQRT_2;
/// 1/√(2π), the standard normal density at 0.
const FRAC_1_SQRT_2PI: f64 = 0.398_942_280_401_432_7;
/// CLIP's quick-GELU slope.
const QUICK_GELU_K: f64 = 1.702;

/// `erf(x)`: in f32 the branch-free [`erf_f32`] (vectorizes, like [`exp`]); other
/// float types (f64 for gradient checks) call libm.
#[inline(always)]
fn erf<F: CpuFloat>(x: F) -> F {
    if TypeId::of::<F>() == TypeId::of::<f32>() {
        F::from(erf_f32(x.to_f32().unwrap_or(f32::NAN))).unwrap_or(F::nan())
    } else {
        f(libm::erf(x.to_f64().unwrap_or(f64::NAN)))
    }
}

fn sigmoid<F: CpuFloat>(x: F) -> F {
    F::one() / (F::one() + exp(-x))
}

/// `e^x`.  In f32 a branch-free polynomial instead of a libm call: SiLU and the
/// log-softmax run it millions of times per step, and inline it is several times
/// faster (and vectorizable).  Other float types (f64 for gradient checks) use `exp`.
#[inline(always)]
fn exp<F: CpuFloat>(x: F) -> F {
    if TypeId::of::<F>() == TypeId::of::<f32>() {
        let y = exp_f32(x.to_f32().unwrap_or(f32::NAN));
        F::from(y).unwrap_or(F::nan())
    } else {
        x.exp()
    }
}

#[inline(always)]
fn act_value<F: CpuFloat>(act: Act, x: F) -> F {
    let half: F = f(0.5);
    match act {
        Act::QuickGelu => x * sigmoid(f::<F>(QUICK_GELU_K) * x),
        Act::GeluErf => half * x * (F::one() + erf(x * f(FRAC_1_SQRT_2))),
        Act::GeluTanh => {
            let u = f::<F>(SQRT_2_OVER_PI) * (x + f::<F>(0.044715) * x * x * x);
            half * x * (F::one() + u.tanh())
        }
        Act::Silu => x * sigmoid(x),
        Act::Relu => x.max(F::zero()),
        Act::Sigmoid => sigmoid(x),
    }
}

#[inline(always)]
fn act_deriv<F: CpuFloat>(act: Act, x: F) -> F {
    let half: F = f(0.5);
    match act {
        // d/dx x σ(kx) = σ(kx) + k x σ(kx)(1 − σ(kx))
        Act::QuickGelu => {
            let k: F = f(QUICK_GELU_K);
            let s = sigmoid(k * x);
            s + k * x * s * (F::one() - s)
        }
        // d/dx x Φ(x) = Φ(x) + x φ(x)
        Act::GeluErf => {
            let cdf = half * (F::one() + erf(x * f(FRAC_1_SQRT_2)));
            let pdf = f::<F>(FRAC_1_SQRT_2PI) * exp(-half * x * x);
            cdf + x * pdf
        }
        // d/dx ½x(1+tanh u) = ½(1+tanh u) + ½x(1−tanh²u)·u'
        Act::GeluTanh => {
            let a: F = f(SQRT_2_OVER_PI);
            let b: F = f(0.044715);
            let u = a * (x + b * x * x * x);
            let th = u.tanh();
            let du = a * (F::one() + f::<F>(3.0) * b * x * x);
            half * (F::one() + th) + half * x * (F::one() - th * th) * du
        }
        // d/dx x σ(x) = σ(x)(1 + x(1 − σ(x)))
        Act::Silu => {
            let s = sigmoid(x);
            s * (F::one() + x * (F::one() - s))
        }
        Act::Relu => {
            if x > F::zero() {
                F::one()
            } else {
                F::zero()
            }
        }
        // d/dx σ(x) = σ(x)(1 − σ(x))
        Act::Sigmoid => {
            let s = sigmoid(x);
            s * (F::one() - s)
        }
    }
}

/// Calls `$run(|x, g| $per(Act::X, x, g))` with the activation a constant in each arm, so
/// every element loop is compiled for one activation (a `match` inside the loop kept
/// it from vectorizing: the erf GELU ran at ~10 ns per element).
macro_rules! per_act {
    ($act:expr, $run:expr, $per:ident) => {
        match $act {
            Act::QuickGelu => $run(|x, g| $per(Act::QuickGelu, x, g)),
            Act::GeluErf => $run(|x, g| $per(Act::GeluErf, x, g)),
            Act::GeluTanh => $run(|x, g| $per(Act::GeluTanh, x, g)),
            Act::Silu => $run(|x, g| $per(Act::Silu, x, g)),
            Act::Relu => $run(|x, g| $per(Act::Relu, x, g)),
            Act::Sigmoid => $run(|x, g| $per(Act::Sigmoid, x, g)),
        }
    };
}

/// `out[i] = op(x[i], y[i])` in parallel chunks with plain loops over equal-length
/// slices: no bounds checks, so the loop (exp and erf included) vectorizes.
fn zip_map<F: CpuFloat>(x: &[F], y: &[F], out: &mut [F], op: impl Fn(F, F) -> F + Sync) {
    out.par_chunks_mut(MIN_ELEMS_PER_TASK)
        .zip(x.par_chunks(MIN_ELEMS_PER_TASK))
        .zip(y.par_chunks(MIN_ELEMS_PER_TASK))
        .for_each(|((o, x), y)| {
            let (x, y) = (&x[..o.len()], &y[..o.len()]);
            for i in 0..o.len() {
                o[i] = op(x[i], y[i]);
            }
        });
}

#[inline(always)]
fn value_of<F: CpuFloat>(act: Act, x: F, _: F) -> F {
    act_value(act, x)
}

#[inline(always)]
fn grad_of<F: CpuFloat>(act: Act, x: F, g: F) -> F {
    act_deriv(act, x) * g
}

pub(super) fn act_fwd<F: CpuFloat>(act: Act, x: &[F], out: &mut [F]) -> Result<()> {
    check_len("act_fwd", "out", out.len(), x.len())?;
    per_act!(act, |op| zip_map(x, x, out, op), value_of);
    Ok(())
}

pub(super) fn act_bwd<F: CpuFloat>(act: Act, x: &[F], dout: &[F], dx: &mut [F]) -> Result<()> {
    // forward: out = act(x)  so: dx = act'(x)·dout
    check_len("act_bwd", "dout", dout.len(), x.len())?;
    check_len("act_bwd", "dx", dx.len(), x.len())?;
    per_act!(act, |op| zip_map(x, dout, dx, op), grad_of);
    Ok(())
}

/// o = silu(g)·u over one span.
fn swiglu_span<F: CpuFloat>(o: &mut [F], g: &[F], u: &[F]) {
    let (g, u) = (&g[..o.len()], &u[..o.len()]);
    for i in 0..o.len() {
        o[i] = g[i] * sigmoid(g[i]) * u[i];
    }
}

pub(super) fn swiglu_fwd<F: CpuFloat>(
    gate: &[F],
    up: &[F],
    at: GateUp,
    out: &mut [F],
) -> Result<()> {
    at.rows("swiglu_fwd", gate.len(), up.len(), out.len())?;
    if at == GateUp::apart(at.w) {
        out.par_chunks_mut(MIN_ELEMS_PER_TASK)
            .zip(gate.par_chunks(MIN_ELEMS_PER_TASK))
            .zip(up.par_chunks(MIN_ELEMS_PER_TASK))
            .for_each(|((o, g), u)| swiglu_span(o, g, u));
    } else {
        // out row r ← its gate's and up's rows where they lie
        let (g, u) = (at.gate, at.up);
        out.par_chunks_mut(at.w).enumerate().for_each(|(r, o)| {
            swiglu_span(o, &gate[g.off + r * g.ld..], &up[u.off + r * u.ld..]);
        });
    }
    Ok(())
}

pub(super) fn swiglu_bwd<F: CpuFloat>(
    gate: &[F],
    up: &[F],
    dout: &[F],
    dgate: &mut [F],
    dup: &mut [F],
) -> Result<()> {
    // forward: out = silu(g)·u  so: du = silu(g)·dout,  dg = silu'(g)·u·dout
    let n = gate.len();
    check_len("swiglu_bwd", "up", up.len(), n)?;
    check_len("swiglu_bwd", "dout", dout.len(), n)?;
    check_len("swiglu_bwd", "dgate", dgate.len(), n)?;
    check_len("swiglu_bwd", "dup", dup.len(), n)?;
    dgate
        .par_chunks_mut(MIN_ELEMS_PER_TASK)
        .zip(dup.par_chunks_mut(MIN_ELEMS_PER_TASK))
        .zip(gate.par_chunks(MIN_ELEMS_PER_TASK))
        .zip(up.par_chunks(MIN_ELEMS_PER_TASK))
        .zip(dout.par_chunks(MIN_ELEMS_PER_TASK))
        .for_each(|((((dg, du), g), u), d)| {
            let n = dg.len();
            let (du, g, u, d) = (&mut du[..n], &g[..n], &u[..n], &d[..n]);
            for i in 0..n {
                let s = sigmoid(g[i]);
                du[i] = g[i] * s * d[i];
                dg[i] = s * (F::one() + g[i] * (F::one() - s)) * u[i] * d[i];
            }
        });
    Ok(())
}
