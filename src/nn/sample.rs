//! Token sampling (greedy, temperature, top-p) with a seeded generator, returning each
//! sampled token's log-probability under the model.
use crate::error::{Error, Result};
use crate::rng::{splitmix64, GOLDEN_GAMMA};

/// A SplitMix64 stream ([`crate::rng`]): tiny, seedable, and the same sequence on
/// every platform.
#[derive(Clone, Debug)]
pub struct Rng {
    state: u64,
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng { state: seed }
    }
    /// The whole generator state: `Rng::new(r.state())` continues exactly where `r`
    /// is (SplitMix64's state is its seed), so checkpoints store this one number.
    pub fn state(&self) -> u64 {
        self.state
    }
    pub fn next_u64(&mut self) -> u64 {
        let out = splitmix64(self.state);
        self.state = self.state.wrapping_add(GOLDEN_GAMMA);
        out
    }
    /// Uniform in [0, 1) with 53 random bits.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(f64::MIN_POSITIVE);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

/// How to pick the next token.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplingCfg {
    /// 0 = greedy (argmax); otherwise logits are divided by it before sampling.
    pub temperature: f32,
    /// Nucleus: sample only among the most probable tokens whose mass reaches `top_p`
    /// (1.0 = no cut).
    pub top_p: f32,
    pub seed: u64,
}

impl SamplingCfg {
    pub fn greedy() -> Self {
        SamplingCfg {
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

/// Log-softmax of one row, in f64 for a stable sum.
pub fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let mx = logits
        .iter()
        .fold(f64::NEG_INFINITY, |a, &x| a.max(x as f64));
    let lse = mx
        + logits
            .iter()
            .map(|&x| (x as f64 - mx).exp())
            .sum::<f64>()
            .ln();
    logits.iter().map(|&x| x as f64 - lse).collect()
}

/// Pick one token from `logits (V)`.  Returns the token and its log-probability under
/// the model (log_softmax of the raw logits: temperature and top-p change which token
/// is drawn, not the score, so the log-probs can feed DPO and the token scores τ).
pub fn sample_token(logits: &[f32], cfg: &SamplingCfg, rng: &mut Rng) -> Result<(u32, f32)> {
    if logits.is_empty() {
        return Err(Error::arg("sample_token", "empty logits"));
    }
    if let Some(i) = logits.iter().position(|x| x.is_nan()) {
        return Err(Error::NonFinite {
            what: format!("logit {i} is NaN"),
        });
    }
    let temperature_ok = cfg.temperature >= 0.0; // false for NaN
    let top_p_ok = cfg.top_p > 0.0 && cfg.top_p <= 1.0;
    if !temperature_ok || !top_p_ok {
        return Err(Error::arg(
            "sample_token",
            format!(
                "temperature {} must be ≥ 0 and top_p {} in (0, 1]",
                cfg.temperature, cfg.top_p
            ),
        ));
    }
    let logp = log_softmax(logits);
    let argmax = (0..logits.len())
        .max_by(|&a, &b| logits[a].total_cmp(&logits[b]).then(b.cmp(&a)))
        .unwrap();
    if cfg.temperature == 0.0 {
        return Ok((argmax as u32, logp[argmax] as f32));
    }
    // tempered probabilities, sorted descending (ties by index, for determinism)
    let t = cfg.temperature as f64;
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    let mx = logits[order[0]] as f64 / t;
    let w: Vec<f64> = order
        .iter()
        .map(|&i| (logits[i] as f64 / t - mx).exp())
        .collect();
    let total: f64 = w.iter().sum();
    // nucleus: the shortest prefix whose mass reaches top_p (at least one token)
    let mut keep = 0;
    let mut mass = 0.0;
    while keep < order.len() {
        mass += w[keep] / total;
        keep += 1;
        if mass >= cfg.top_p as f64 {
            break;
        }
    }
    let kept: f64 = w[..keep].iter().sum();
    let mut u = rng.uniform() * kept;
    let mut pick = order[keep - 1];
    for (r, &i) in order[..keep].iter().enumerate() {
        if u < w[r] {
            pick = i;
            break;
        }
        u -= w[r];
    }
    Ok((pick as u32, logp[pick] as f32))
}
