//! A tiny LLaMA on the device: KV-cache decoding, cache rows, training steps.
use super::*;
use popen::kernels::device::{DOWNLOAD, UPLOAD};

/// The tiny LLaMA of the training tests, on backend `be`.
fn tiny_llama<B: Backend<f32>>(be: B) -> popen::nn::llama::Llama<f32, B> {
    tiny_llama_heads(be, (4, 2))
}

/// The tiny LLaMA with (query heads, kv heads) of its 16 dimensions: (4, 2) gives head
/// size 4, (2, 1) head size 8 (which the tensor-core attention kernels take).
fn tiny_llama_heads<B: Backend<f32>>(
    be: B,
    (nh, nkv): (usize, usize),
) -> popen::nn::llama::Llama<f32, B> {
    let cfg = popen::nn::llama::LlamaConfig {
        vocab_size: 17,
        hidden_size: 16,
        intermediate_size: 24,
        num_hidden_layers: 2,
        num_attention_heads: nh,
        num_key_value_heads: Some(nkv),
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        max_position_embeddings: 32,
        tie_word_embeddings: true,
    };
    popen::nn::llama::Llama::new(be, cfg, 3).unwrap()
}

/// The logits of a prefill of 5 tokens, then of each later token fed one at a time
/// through the KV cache, with a per-key bias on the prefill's keys that grows by 0 for
/// each new key (as the ensemble's refinement decodes).
fn cached_logits<B: Backend<f32>>(
    m: &popen::nn::llama::Llama<f32, B>,
    ids: &[u32],
) -> Vec<Vec<f32>> {
    let be = &m.be;
    let mut bias: Vec<f32> = (0..5).map(|i| 0.4 * i as f32 - 0.7).collect();
    let mut cache = m.new_cache(1);
    let (lg, _) = m
        .forward_embeds(
            m.embed(&ids[..5]).unwrap(),
            1,
            5,
            None,
            Some(&be.from_slice(&bias)),
            Some(&mut cache),
        )
        .unwrap();
    let mut out = vec![be.to_vec(&lg)];
    for t in 5..ids.len() {
        bias.push(0.0);
        let (lg, _) = m
            .forward_embeds(
                m.embed(&ids[t..t + 1]).unwrap(),
                1,
                1,
                None,
                Some(&be.from_slice(&bias)),
                Some(&mut cache),
            )
            .unwrap();
        out.push(be.to_vec(&lg));
    }
    out
}

#[test]
fn kv_cache_decoding_on_the_device_equals_the_cpu() {
    // every decoding step runs the decode kernel on the device
    let ids: Vec<u32> = (0..24).map(|i| (i * 7 + 3) % 17).collect();
    let want = cached_logits(&tiny_llama(Cpu), &ids);
    assert_eq!(want.len(), 20);
    for d in backends() {
        let got = cached_logits(&tiny_llama(d.clone()), &ids);
        for (t, (g, w)) in got.iter().zip(&want).enumerate() {
            close(&format!("{:?} logits at step {t}", d.device().kind()), g, w);
        }
    }
}

#[test]
fn selected_cache_rows_are_copies_of_the_rows_named() {
    // a cache of 3 rows; selections in order, reordered, repeated (runs of source
    // stride 0), and mixed: each selected row is its source row, bit for bit
    let ids: Vec<u32> = (0..12).map(|i| (i * 5 + 2) % 17).collect();
    for d in backends() {
        let m = tiny_llama(d.clone());
        let be = &m.be;
        let mut cache = m.new_cache(3);
        m.forward_embeds(m.embed(&ids).unwrap(), 3, 4, None, None, Some(&mut cache))
            .unwrap();
        for rows in [
            &[0, 1, 2][..],
            &[2, 2, 2, 0],
            &[1, 0],
            &[0, 0, 1, 1, 2],
            &[2, 0, 1, 2],
        ] {
            let sel = m.select_cache_rows(&cache, rows).unwrap();
            assert_eq!((sel.b, sel.len()), (rows.len(), cache.len()));
            for (l, ls) in cache.layers.iter().zip(&sel.layers) {
                for (src, dst) in [(&l.k, &ls.k), (&l.v, &ls.v)] {
                    let (src, dst) = (be.to_vec(src), be.to_vec(dst));
                    let n = src.len() / 3;
                    for (i, &r) in rows.iter().enumerate() {
                        assert!(
                            dst[i * n..(i + 1) * n] == src[r * n..(r + 1) * n],
                            "{:?}, rows {rows:?}: row {i} is not row {r}",
                            d.device().kind()
                        );
                    }
                }
            }
        }
        assert!(m.select_cache_rows(&cache, &[0, 3]).is_err());
        assert!(m.select_cache_rows(&cache, &[]).is_err());
    }
}

/// What `train_steps` returns: the loss of each step, every parameter after the steps
/// (by name), and the host↔device copies each step made (by `copies`).
type Trained = (Vec<f32>, Vec<(String, Vec<f32>)>, Vec<u64>);

/// Two training steps (forward, mean token log-prob loss, backward, AdamW); `copies`
/// reads the device's running count of host↔device copies.
fn train_steps<B: Backend<f32>>(be: B, heads: (usize, usize), copies: impl Fn() -> u64) -> Trained {
    use popen::train::adamw::{AdamW, AdamWConfig};
    let mut m = tiny_llama_heads(be.clone(), heads);
    let (b, t, v) = (2, 7, 17);
    let ids: Vec<u32> = (0..b * t).map(|i| ((i * 7 + 1) % v) as u32).collect();
    let targets: Vec<i32> = (0..b * t).map(|i| ((i * 3 + 2) % v) as i32).collect();
    let n = b * t;
    let mut opt = AdamW::<f32, B>::new(AdamWConfig::default());
    let (mut losses, mut per_step) = (vec![], vec![]);
    for _ in 0..2 {
        let before = copies();
        m.zero_grad();
        let (logits, acts) = m.forward(&ids, b, None, None).unwrap();
        let (mut lp, mut lse) = (be.zeros(n), be.zeros(n));
        be.logprob_fwd(&logits, &targets, v, &mut lp, &mut lse)
            .unwrap();
        losses.push(-be.to_vec(&lp).iter().sum::<f32>() / n as f32);
        let dlogp = be.from_slice(&vec![-1.0 / n as f32; n]);
        let mut dl = be.zeros(n * v);
        be.logprob_bwd(&logits, &targets, v, &lse, &dlogp, &mut dl)
            .unwrap();
        m.backward(&acts, &dl).unwrap();
        let mut params = m.params_mut();
        opt.step(&be, &mut params, 1e-2).unwrap();
        per_step.push(copies() - before);
    }
    let params = m
        .params_mut()
        .into_iter()
        .map(|(name, p)| (name, be.to_vec(&p.data)))
        .collect();
    (losses, params, per_step)
}

/// On every test device (the emulator; GPU 0 too under `POPEN_TEST_CUDA=1`), and with
/// attention on the tensor-core kernels (head size 8).
#[test]
fn tiny_llama_training_step_on_the_device_equals_cpu() {
    for (heads, tc) in [((4, 2), false), ((2, 1), true)] {
        training_step_equals_cpu(heads, tc);
    }
}

fn training_step_equals_cpu(heads: (usize, usize), tc: bool) {
    let (loss_cpu, p_cpu, _) = train_steps(Cpu, heads, || 0);
    for d in backends() {
        let d = d.with_tensor_core_attention(tc);
        assert_eq!(d.tensor_core_attention(16 / heads.0), tc, "heads {heads:?}");
        let kind = d.device().kind();
        let dev = d.clone();
        let count = move || {
            let c = dev.device().copies();
            c.htod + c.dtoh
        };
        d.device().set_profiling(true);
        let before = d.device().copies();
        let (loss_dev, p_dev, copies) = train_steps(d.clone(), heads, count);
        let after = d.device().copies();
        let profile = d.device().take_profile().unwrap();
        d.device().set_profiling(false);
        // the profile's copy rows count every copy the device counted
        let calls = |name: &str| {
            profile
                .iter()
                .find(|k| k.name == name)
                .map_or(0, |k| k.calls)
        };
        assert_eq!(
            (calls(UPLOAD) as u64, calls(DOWNLOAD) as u64),
            (after.htod - before.htod, after.dtoh - before.dtoh),
            "{kind:?}: the profile's copies"
        );
        assert!(calls(UPLOAD) > 0 && calls(DOWNLOAD) > 0, "{kind:?}");
        // the attention kernels that ran are the ones asked for
        let ran: Vec<String> = profile.into_iter().map(|k| k.name).collect();
        for k in [
            "attention_fwd_tc_f32",
            "attention_bwd_dq_tc_f32",
            "attention_bwd_dkv_tc_f32",
        ] {
            assert_eq!(ran.iter().any(|n| n == k), tc, "{kind:?}: {k} in {ran:?}");
        }
        assert_eq!(ran.iter().any(|n| n == "attention_fwd_f32"), !tc, "{ran:?}");
        for (a, b) in loss_dev.iter().zip(&loss_cpu) {
            assert!(
                (a - b).abs() <= 1e-4 * b.abs(),
                "loss {kind:?} tc {tc} {a} vs cpu {b}"
            );
        }
        assert_eq!(p_cpu.len(), p_dev.len());
        for ((name, e), (_, c)) in p_dev.iter().zip(&p_cpu) {
            let scale = c.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (i, (x, y)) in e.iter().zip(c).enumerate() {
                assert!(
                    (x - y).abs() <= 1e-4 * scale,
                    "{name}[{i}]: {kind:?} tc {tc} {x} vs cpu {y}"
                );
            }
        }
        // the steps did something: the loss went down on the fixed batch
        assert!(loss_dev[1] < loss_dev[0], "losses {loss_dev:?}");
        // buffers stay on the device: per step only the host data the contract hands
        // over (token ids twice, targets twice, the unit d_out of the log-prob
        // backward), the loss read back and dlogp uploaded by this test; none per layer
        // or per tensor.  The first step uploads two buffer tables more, for the
        // gradients' zeroing and the AdamW step over every tensor; later steps reuse them.
        assert!(
            copies[0] <= MAX_COPIES_PER_STEP + 2
                && copies[1..].iter().all(|&c| c <= MAX_COPIES_PER_STEP),
            "{kind:?}: host<->device copies per step: {copies:?}"
        );
    }
}

/// Host↔device copies one training step of the tiny LLaMA may make (see the test).
const MAX_COPIES_PER_STEP: u64 = 7;
