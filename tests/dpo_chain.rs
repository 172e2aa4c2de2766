//! Stage 2's text preference chain end to end on a tiny LLaMA: token diff → Eq. 3
//! weights → fused log-probs (the kernels' CPU twins) → DPO (Eq. 2).  At the start the
//! policy is the reference, so the loss is ln 2; its gradient, carried back through
//! the log-prob backward and the model, matches f64 central finite differences.
use popen::backend::Cpu;
use popen::data::diff::changed_positions;
use popen::kernels::logprob::{logprob_bwd_cpu, logprob_fwd_cpu, seq_weighted_sum_cpu};
use popen::method::losses::{dpo_loss, BETA_T, LAMBDA};
use popen::nn::{randn, Llama, LlamaConfig, Rng};

const V: usize = 13;
const PAD: u32 = 0;
const IGNORE: i32 = -100;

fn tiny() -> LlamaConfig {
    LlamaConfig {
        vocab_size: V,
        hidden_size: 12,
        intermediate_size: 9,
        num_hidden_layers: 2,
        num_attention_heads: 3,
        num_key_value_heads: Some(1),
        rms_norm_eps: 1e-5,
        rope_theta: 50.0,
        max_position_embeddings: 64,
        tie_word_embeddings: false,
    }
}

/// One batch of the two responses to one prompt: ids, targets (shifted by one, the
/// padding and the last position ignored) and Eq. 3's weights per row.
struct Pair {
    ids: Vec<u32>,
    targets: Vec<i32>,
    w: Vec<f64>,
    t: usize,
}

/// Rows `[chosen yc, rejected y]`: prompt, then the response; row r predicts token
/// r + 1, weighted λ where the diff marks the token changed, 1 on the other response
/// tokens, 0 on the prompt.
fn pair(prompt: &[u32], y: &[u32], yc: &[u32]) -> Pair {
    let (ly, lyc) = changed_positions(y, yc);
    let t = prompt.len() + y.len().max(yc.len());
    let (mut ids, mut targets, mut w) = (Vec::new(), Vec::new(), Vec::new());
    for (resp, changed) in [(yc, &lyc), (y, &ly)] {
        let mut seq: Vec<u32> = prompt.iter().chain(resp).copied().collect();
        let len = seq.len();
        seq.resize(t, PAD);
        for r in 0..t {
            let next = r + 1;
            let in_resp = next >= prompt.len() && next < len;
            targets.push(if in_resp { seq[next] as i32 } else { IGNORE });
            w.push(match in_resp {
                false => 0.0,
                true if changed.contains(&(next - prompt.len())) => LAMBDA,
                true => 1.0,
            });
        }
        ids.extend(seq);
    }
    Pair { ids, targets, w, t }
}

/// Sequence log-probs (Eq. 3, length-normalized) of the two rows under `m`, with what
/// the backward needs.
fn seq_logprobs(m: &Llama<f64, Cpu>, p: &Pair) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
    let (logits, _) = m.forward(&p.ids, 2, None, None).unwrap();
    let (lp, lse) = logprob_fwd_cpu(&logits, &p.targets, V).unwrap();
    let (seq, scale) = seq_weighted_sum_cpu(&lp, &p.w, &p.targets, V, 2, p.t, true).unwrap();
    (seq, scale, lse, logits)
}

fn dpo(policy: &Llama<f64, Cpu>, reference: &[f64], p: &Pair) -> f64 {
    let (s, ..) = seq_logprobs(policy, p);
    dpo_loss(&[s[0]], &[s[1]], &[reference[0]], &[reference[1]], BETA_T)
        .unwrap()
        .loss
}

#[test]
fn diff_weights_logprobs_dpo_is_ln2_at_start_and_its_gradient_is_right() {
    // the corrector swapped one object word (token 8 → 3) and dropped the last token
    let prompt = [1u32, 4, 12];
    let y = [5u32, 6, 7, 8, 9, 10, 11, 2];
    let yc = [5u32, 6, 7, 3, 9, 10, 11];
    let p = pair(&prompt, &y, &yc);
    let (ly, lyc) = changed_positions(&y, &yc);
    assert_eq!((ly, lyc), (vec![3, 7], vec![3]));
    let lam = p.w.iter().filter(|&&w| w == LAMBDA).count();
    assert_eq!(lam, 3, "{:?}", p.w);
    // ignored: the prompt rows, the padded row's pad and each row's last position
    assert_eq!(p.targets.iter().filter(|&&t| t == IGNORE).count(), 4 + 3);
    assert!(p
        .targets
        .iter()
        .zip(&p.w)
        .all(|(&t, &w)| (t == IGNORE) == (w == 0.0)));

    let mut policy: Llama<f64, Cpu> = Llama::new(Cpu, tiny(), 5).unwrap();
    // larger weights than the 0.02 init so that every path carries a visible gradient
    let mut rng = Rng::new(8);
    for (name, t) in policy.params_mut() {
        let base = if name.ends_with("norm.weight") {
            1.0
        } else {
            0.0
        };
        let r: Vec<f64> = randn(&mut rng, t.numel(), 0.3);
        t.data = r.iter().map(|x| base + x).collect();
    }
    let reference = policy.clone();
    let (ref_seq, ..) = seq_logprobs(&reference, &p);

    // at the start the policy is the reference: ln 2 exactly
    let (pol_seq, scale, lse, logits) = seq_logprobs(&policy, &p);
    let out = dpo_loss(
        &[pol_seq[0]],
        &[pol_seq[1]],
        &[ref_seq[0]],
        &[ref_seq[1]],
        BETA_T,
    )
    .unwrap();
    assert!(
        (out.loss - std::f64::consts::LN_2).abs() < 1e-15,
        "{}",
        out.loss
    );
    // Eq. 3's |y|: 7 and 8 response tokens
    assert_eq!(scale, vec![1.0 / 7.0, 1.0 / 8.0]);

    // backward: DPO → sequence log-probs → logits → every parameter
    let d_out = [out.d_policy_chosen[0], out.d_policy_rejected[0]];
    assert!((d_out[0] + BETA_T / 2.0).abs() < 1e-15 && (d_out[1] - BETA_T / 2.0).abs() < 1e-15);
    let mut dlogits = vec![0.0; logits.len()];
    logprob_bwd_cpu(
        &logits,
        &lse,
        &p.targets,
        &p.w,
        &d_out,
        &scale,
        p.t,
        V,
        &mut dlogits,
    )
    .unwrap();
    let (_, acts) = policy.forward(&p.ids, 2, None, None).unwrap();
    let mut g = policy.clone();
    g.zero_grad();
    g.backward(&acts, &dlogits).unwrap();

    const H: f64 = 1e-5;
    let names: Vec<String> = policy.params_mut().into_iter().map(|(n, _)| n).collect();
    let gp = g.params_mut();
    let mut checked = 0;
    for (pi, name) in names.iter().enumerate() {
        let analytic = gp[pi].1.grad.clone().unwrap();
        assert!(
            analytic.iter().any(|x| x.abs() > 1e-8),
            "{name}: zero gradient"
        );
        for k in (pi % 4..analytic.len()).step_by(4) {
            let at = |d: f64| {
                let mut m = policy.clone();
                m.params_mut()[pi].1.data[k] += d;
                dpo(&m, &ref_seq, &p)
            };
            let num = (at(H) - at(-H)) / (2.0 * H);
            let a = analytic[k];
            assert!(
                (a - num).abs() <= 1e-8 + 1e-5 * a.abs().max(num.abs()),
                "{name}[{k}]: analytic {a} vs numeric {num}"
            );
            checked += 1;
        }
    }
    assert!(checked > 200, "{checked}");
}
