//! AdamW against a step computed by hand, frozen tensors untouched, and the
//! warmup-then-decay schedule's shape.
use popen::backend::Cpu;
use popen::nn::{Llama, LlamaConfig, Tensor};
use popen::train::{AdamW, AdamWConfig, WarmupDecayLR};

const BE: Cpu = Cpu;

#[test]
fn adamw_first_two_steps_match_hand_computation() {
    // constants exact in f32 (the step's hyper-parameters are f32), so f64 math is exact
    const LR: f64 = 0.125;
    const EPS: f64 = 1.0 / 1024.0;
    let cfg = AdamWConfig {
        lr: 0.125,
        beta1: 0.875,
        beta2: 0.9375,
        eps: EPS as f32,
        weight_decay: 0.5,
    };
    let mut p: Tensor<f64, Cpu> = Tensor::zeros(&BE, &[2]);
    p.data = vec![1.0, -2.0];
    p.grad = Some(vec![0.5, 0.25]);
    let mut opt = AdamW::<f64, Cpu>::new(cfg);
    opt.step(&BE, &mut [("p".into(), &mut p)], LR as f32)
        .unwrap();
    // step 1: m̂ = g, v̂ = g², so the Adam term is g/(|g|+ε) ≈ ±1 and
    // p ← p − lr·(g/(|g|+ε) + wd·p)
    let want1 = [
        1.0 - LR * (0.5 / (0.5 + EPS) + 0.5 * 1.0),
        -2.0 - LR * (0.25 / (0.25 + EPS) + 0.5 * -2.0),
    ];
    for (a, b) in p.data.iter().zip(&want1) {
        assert!((a - b).abs() < 1e-12, "step 1: {a} vs {b}");
    }
    // step 2 with gradient g2 = (−0.5, 0.25)
    p.grad = Some(vec![-0.5, 0.25]);
    opt.step(&BE, &mut [("p".into(), &mut p)], LR as f32)
        .unwrap();
    let (b1, b2): (f64, f64) = (0.875, 0.9375);
    for i in 0..2 {
        let (g1, g2) = ([0.5, 0.25][i], [-0.5, 0.25][i]);
        let m = b1 * (1.0 - b1) * g1 + (1.0 - b1) * g2;
        let v = b2 * (1.0 - b2) * g1 * g1 + (1.0 - b2) * g2 * g2;
        let mh = m / (1.0 - b1 * b1);
        let vh = v / (1.0 - b2 * b2);
        let p1 = want1[i];
        let want = p1 - LR * (mh / (vh.sqrt() + EPS) + 0.5 * p1);
        assert!(
            (p.data[i] - want).abs() < 1e-12,
            "step 2 [{i}]: {} vs {want}",
            p.data[i]
        );
    }
    assert_eq!(opt.t, 2);
}

#[test]
fn frozen_parameters_are_bit_identical_after_a_step() {
    let cfg = LlamaConfig {
        vocab_size: 11,
        hidden_size: 8,
        intermediate_size: 5,
        num_hidden_layers: 1,
        num_attention_heads: 2,
        num_key_value_heads: Some(1),
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        max_position_embeddings: 16,
        tie_word_embeddings: false,
    };
    let mut m: Llama = Llama::new(Cpu, cfg, 1).unwrap();
    // freeze everything but the MLP of layer 0
    for (name, t) in m.params_mut() {
        t.set_trainable(&BE, name.contains(".mlp."));
    }
    let before: Vec<(String, Vec<f32>)> = m
        .params_mut()
        .into_iter()
        .map(|(n, t)| (n, t.data.clone()))
        .collect();
    let ids = [1u32, 5, 7, 2, 9, 3];
    let (logits, acts) = m.forward(&ids, 2, None, None).unwrap();
    let dl: Vec<f32> = logits.iter().map(|x| x * 0.1 + 0.01).collect();
    m.backward(&acts, &dl).unwrap();
    let mut opt = AdamW::<f32, Cpu>::new(AdamWConfig {
        weight_decay: 0.1,
        ..Default::default()
    });
    let mut params = m.params_mut();
    opt.step(&BE, &mut params, 3e-4).unwrap();
    for ((name, t), (_, old)) in params.iter().zip(&before) {
        let same = t
            .data
            .iter()
            .zip(old)
            .all(|(a, b)| a.to_bits() == b.to_bits());
        assert_eq!(
            same,
            !name.contains(".mlp."),
            "{name}: frozen must be bit-identical, trainable must move"
        );
    }
}

#[test]
fn warmup_decay_schedule_shape() {
    let s = WarmupDecayLR::new(3e-4, 100, 1000).unwrap();
    assert_eq!(s.lr(0), 0.0);
    assert!((s.lr(50) - 1.5e-4).abs() < 1e-10);
    assert!(
        (s.lr(100) - 3e-4).abs() < 1e-10,
        "peak at the end of warmup"
    );
    assert!((s.lr(550) - 1.5e-4).abs() < 1e-10, "halfway down the decay");
    assert_eq!(s.lr(1000), 0.0);
    assert_eq!(s.lr(5000), 0.0);
    // monotone up then down
    let lrs: Vec<f32> = (0..=1000).map(|t| s.lr(t)).collect();
    assert!(lrs[..=100].windows(2).all(|w| w[0] < w[1]));
    assert!(lrs[100..].windows(2).all(|w| w[0] > w[1]));
    assert!(WarmupDecayLR::new(1e-3, 10, 5).is_err());
    assert!(WarmupDecayLR::new(f32::NAN, 1, 5).is_err());
}

#[test]
fn default_hyperparameters_are_the_papers() {
    let c = AdamWConfig::default();
    assert_eq!(
        (c.lr, c.beta1, c.beta2, c.weight_decay),
        (3e-4, 0.9, 0.95, 0.0)
    );
}

#[test]
fn adamw_with_schedule_overfits_one_batch() {
    // a tiny LLaMA trained on one fixed batch must drive its loss well down: the
    // forward, backward, optimizer and schedule work together
    let cfg = LlamaConfig {
        vocab_size: 17,
        hidden_size: 16,
        intermediate_size: 24,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: Some(2),
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        max_position_embeddings: 32,
        tie_word_embeddings: true,
    };
    let mut m: Llama = Llama::new(Cpu, cfg, 3).unwrap();
    let (b, t, v) = (2, 8, 17);
    let ids: Vec<u32> = (0..b * t).map(|i| ((i * 7 + 1) % v) as u32).collect();
    let targets: Vec<i32> = (0..b * t).map(|i| ((i * 3 + 2) % v) as i32).collect();
    let sched = WarmupDecayLR::new(1e-2, 5, 60).unwrap();
    let mut opt = AdamW::<f32, Cpu>::new(AdamWConfig::default());
    let mut losses = vec![];
    for step in 1..=60 {
        m.zero_grad();
        let (logits, acts) = m.forward(&ids, b, None, None).unwrap();
        let n = b * t;
        let (mut lp, mut lse) = (vec![0.0f32; n], vec![0.0f32; n]);
        popen::backend::Backend::logprob_fwd(&BE, &logits, &targets, v, &mut lp, &mut lse).unwrap();
        losses.push(-lp.iter().sum::<f32>() / n as f32);
        let mut dl = vec![0.0f32; n * v];
        popen::backend::Backend::logprob_bwd(
            &BE,
            &logits,
            &targets,
            v,
            &lse,
            &vec![-1.0 / n as f32; n],
            &mut dl,
        )
        .unwrap();
        m.backward(&acts, &dl).unwrap();
        let mut params = m.params_mut();
        opt.step(&BE, &mut params, sched.lr(step)).unwrap();
    }
    let (first, last) = (losses[0], *losses.last().unwrap());
    assert!(
        (first - (v as f32).ln()).abs() < 0.1,
        "untrained loss ≈ ln V, got {first}"
    );
    assert!(
        last < 0.25 * first,
        "loss {first} → {last}: did not learn the batch"
    );
}

#[test]
fn clip_grad_norm_scales_to_the_limit_and_skips_frozen() {
    let mut a: Tensor<f64, Cpu> = Tensor::zeros(&BE, &[2]);
    a.grad = Some(vec![3.0, 0.0]);
    let mut b: Tensor<f64, Cpu> = Tensor::zeros(&BE, &[1]);
    b.grad = Some(vec![4.0]);
    let mut frozen: Tensor<f64, Cpu> = Tensor::zeros(&BE, &[1]);
    frozen.grad = None;
    let mut ps = [
        ("a".to_string(), &mut a),
        ("b".to_string(), &mut b),
        ("f".to_string(), &mut frozen),
    ];
    let n = popen::train::clip_grad_norm(&BE, &mut ps, 1.0).unwrap();
    assert!((n - 5.0).abs() < 1e-6);
    let ga = a.grad.clone().unwrap();
    assert!((ga[0] - 0.6).abs() < 1e-12 && ga[1] == 0.0);
    assert!((b.grad.as_ref().unwrap()[0] - 0.8).abs() < 1e-12);
    // under the limit: untouched
    let mut ps = [("a".to_string(), &mut a)];
    popen::train::clip_grad_norm(&BE, &mut ps, 10.0).unwrap();
    assert_eq!(a.grad.as_ref().unwrap(), &ga);
    a.grad = Some(vec![f64::NAN, 0.0]);
    let mut ps = [("a".to_string(), &mut a)];
    assert!(popen::train::clip_grad_norm(&BE, &mut ps, 1.0).is_err());
}
