//! Preference scores of a sampled answer (Sec. 3.3): `τ` per token (Eq. 5), `η` per
//! sentence (Eq. 6), both in [−1, 1], and the attention bias `γ = σ(score) − 0.5`.
use crate::data::tokenizer::Tok;
use serde::{Deserialize, Serialize};

/// What `τ` sums (Table 6's last two rows).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum TauMode {
    /// The token's likelihood only: `τ = 2p − 1`.
    Token,
    /// Its sentence's mean likelihood only: `τ = 2p̄ − 1`.
    Sentence,
    /// Both, the paper's: `τ = p + p̄ − 1`.
    #[default]
    Both,
}

impl std::str::FromStr for TauMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "token" => Ok(TauMode::Token),
            "sentence" => Ok(TauMode::Sentence),
            "both" => Ok(TauMode::Both),
            _ => Err(format!("`{s}`: expected token, sentence or both")),
        }
    }
}

/// Per vocabulary id: does a sentence end after it (its text holds `.`, `!` or `?`)?
pub fn sentence_ends(tok: &Tok) -> Vec<bool> {
    (0..tok.vocab_size() as u32)
        .map(|id| {
            tok.decode(&[id])
                .map(|s| s.contains(['.', '!', '?']))
                .unwrap_or(false)
        })
        .collect()
}

/// The sentence of each id: 0 until the first sentence end (inclusive), then 1, ….
pub fn sentence_index(ids: &[u32], ends: &[bool]) -> Vec<usize> {
    let mut s = 0;
    ids.iter()
        .map(|&id| {
            let here = s;
            if ends.get(id as usize).copied().unwrap_or(false) {
                s += 1;
            }
            here
        })
        .collect()
}

/// Mean likelihood `p̄ = mean(exp(log p))` of each sentence, indexed by sentence.
pub fn sentence_means(logps: &[f32], sent: &[usize]) -> Vec<f32> {
    let n = sent.iter().copied().max().map_or(0, |m| m + 1);
    let (mut sum, mut cnt) = (vec![0f64; n], vec![0usize; n]);
    for (&lp, &s) in logps.iter().zip(sent) {
        sum[s] += f64::from(lp).exp();
        cnt[s] += 1;
    }
    sum.iter()
        .zip(&cnt)
        .map(|(&a, &c)| if c == 0 { 0.0 } else { (a / c as f64) as f32 })
        .collect()
}

/// `τ` of each token (Eq. 5) from its log-probability and its sentence, in [−1, 1].
pub fn token_scores(logps: &[f32], sent: &[usize], mode: TauMode) -> Vec<f32> {
    let means = sentence_means(logps, sent);
    logps
        .iter()
        .zip(sent)
        .map(|(&lp, &s)| {
            let p = lp.exp().clamp(0.0, 1.0);
            let pbar = means[s].clamp(0.0, 1.0);
            match mode {
                TauMode::Token => 2.0 * p - 1.0,
                TauMode::Sentence => 2.0 * pbar - 1.0,
                TauMode::Both => p + pbar - 1.0,
            }
        })
        .collect()
}

/// `η` of each sentence (Eq. 6): `2·p̄ − 1`, in [−1, 1].
pub fn sentence_scores(logps: &[f32], sent: &[usize]) -> Vec<f32> {
    sentence_means(logps, sent)
        .into_iter()
        .map(|m| 2.0 * m.clamp(0.0, 1.0) - 1.0)
        .collect()
}

/// The attention bias of a key with preference score `s`: `σ(s) − 0.5`, in
/// (−0.232, 0.232) for `s` in [−1, 1].
pub fn gamma(s: f32) -> f32 {
    1.0 / (1.0 + (-s).exp()) - 0.5
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scores_by_hand() {
        // sentence 0: p = 1, 0.5; sentence 1: p = 0.25
        let lp = [0.0f32, 0.5f32.ln(), 0.25f32.ln()];
        let sent = [0, 0, 1];
        let both = token_scores(&lp, &sent, TauMode::Both);
        let want = [1.0 + 0.75 - 1.0, 0.5 + 0.75 - 1.0, 0.25 + 0.25 - 1.0];
        for (a, b) in both.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
        assert!((token_scores(&lp, &sent, TauMode::Token)[1] - 0.0).abs() < 1e-6);
        assert!((token_scores(&lp, &sent, TauMode::Sentence)[0] - 0.5).abs() < 1e-6);
        let eta = sentence_scores(&lp, &sent);
        assert!((eta[0] - 0.5).abs() < 1e-6 && (eta[1] + 0.5).abs() < 1e-6);
        assert_eq!(gamma(0.0), 0.0);
        assert!((gamma(1.0) - 0.231_058_6).abs() < 1e-6);
        assert!((gamma(-1.0) + 0.231_058_6).abs() < 1e-6);
    }

    #[test]
    fn sentences_end_after_their_stop() {
        let ends = [false, true, false];
        assert_eq!(
            sentence_index(&[0, 0, 1, 2, 1, 0], &ends),
            [0, 0, 0, 1, 1, 2]
        );
        // an id outside the table ends nothing
        assert_eq!(sentence_index(&[7, 1, 7], &ends), [0, 0, 1]);
    }
}
