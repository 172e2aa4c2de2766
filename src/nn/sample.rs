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
    /// A stream starting from `seed` (any value, 0 included).
    pub fn new(seed: u64) -> Self {
        Rng { state: seed }
    }
    /// The whole generator state: `Rng::new(r.state())` continues exactly where `r`
    /// is (SplitMix64's state is its seed), so checkpoints store this one number.
    pub fn state(&self) -> u64 {
        self.state
    }
    /// The next 64 random bits; advances the state by one step.
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
    /// Seed of the [`Rng`] a generation draws from; unused when greedy.
    pub seed: u64,
}

impl SamplingCfg {
    /// Argmax decoding: temperature 0, no top-p cut, seed 0.
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
/// The same as [`TokenDist::new`] then [`TokenDist::draw`].
pub fn sample_token(logits: &[f32], cfg: &SamplingCfg, rng: &mut Rng) -> Result<(u32, f32)> {
    Ok(TokenDist::new(logits, cfg)?.draw(rng))
}

/// Tokens sorted first when drawing from a nucleus; the whole vocabulary is sorted only
/// when their mass falls short of `top_p`.
const NUCLEUS_HEAD: usize = 64;

/// The distribution [`sample_token`] draws from, made once for a row of logits, so
/// that several streams with the same logits (samples of one answer that have drawn
/// the same tokens so far) sort and normalise them once.
#[derive(Clone, Debug)]
pub struct TokenDist {
    /// log_softmax of the raw logits (V): the score of whichever token is drawn.
    logp: Vec<f64>,
    /// Greedy: the argmax (the lowest index among equals); no stream is read.
    greedy: Option<usize>,
    /// The nucleus: token ids by descending tempered probability (ties by index), and
    /// their unnormalised tempered weights.
    order: Vec<usize>,
    w: Vec<f64>,
    /// The nucleus's total weight.
    kept: f64,
}

impl TokenDist {
    /// The distribution of `logits (V)` under `cfg` (its seed unused).  Empty or NaN
    /// logits, a negative temperature or a `top_p` outside (0, 1] are errors.
    pub fn new(logits: &[f32], cfg: &SamplingCfg) -> Result<Self> {
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
        if cfg.temperature == 0.0 {
            let argmax = (0..logits.len())
                .max_by(|&a, &b| logits[a].total_cmp(&logits[b]).then(b.cmp(&a)))
                .unwrap_or(0);
            return Ok(TokenDist {
                logp,
                greedy: Some(argmax),
                order: Vec::new(),
                w: Vec::new(),
                kept: 0.0,
            });
        }
        // tempered probabilities, sorted descending (ties by index, for determinism)
        let t = cfg.temperature as f64;
        let desc = |a: &usize, b: &usize| logits[*b].total_cmp(&logits[*a]).then(a.cmp(b));
        let mx = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64 / t;
        let weight = |i: usize| (logits[i] as f64 / t - mx).exp();
        let total: f64 = (0..logits.len()).map(weight).sum();
        // nucleus: the shortest prefix whose mass reaches top_p (at least one token).  The
        // order is total, so the first m of a full sort are the m largest, sorted: sort
        // those first and the rest only when they fall short of top_p
        let mut order: Vec<usize> = (0..logits.len()).collect();
        let head = NUCLEUS_HEAD.min(order.len());
        if head < order.len() {
            order.select_nth_unstable_by(head - 1, desc);
        }
        order[..head].sort_unstable_by(desc);
        let nucleus = |order: &[usize]| {
            let (mut keep, mut mass) = (0, 0.0);
            while keep < order.len() {
                mass += weight(order[keep]) / total;
                keep += 1;
                if mass >= cfg.top_p as f64 {
                    return Some(keep);
                }
            }
            None
        };
        let keep = match nucleus(&order[..head]) {
            Some(keep) => keep,
            None => {
                order.sort_unstable_by(desc);
                nucleus(&order).unwrap_or(order.len())
            }
        };
        order.truncate(keep);
        let w: Vec<f64> = order.iter().map(|&i| weight(i)).collect();
        let kept: f64 = w.iter().sum();
        Ok(TokenDist {
            logp,
            greedy: None,
            order,
            w,
            kept,
        })
    }

    /// One token and its log-probability under the model; reads one uniform from `rng`
    /// unless greedy.
    pub fn draw(&self, rng: &mut Rng) -> (u32, f32) {
        let pick = match self.greedy {
            Some(i) => i,
            None => {
                let mut u = rng.uniform() * self.kept;
                let mut pick = self.order[self.order.len() - 1];
                for (r, &i) in self.order.iter().enumerate() {
                    if u < self.w[r] {
                        pick = i;
                        break;
                    }
                    u -= self.w[r];
                }
                pick
            }
        };
        (pick as u32, self.logp[pick] as f32)
    }
}
