//! Packed Linear layers (`Linear::pack`, `Llama::pack_frozen`): the same products as
//! the plain layout, forward and backward; the values in one place at a time and back
//! whole on unpacking; a trainable layer refused; values set while packed win.
use popen::backend::Cpu;
use popen::nn::{randn, Linear, Llama, LlamaConfig, Rng, Tensor};

const BE: Cpu = Cpu;

/// Largest |a − b| over the scale of `b` (1 at least).
fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(1f32, |m, v| m.max(v.abs()));
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
        / scale
}

/// A frozen layer `fan_in → fan_out` with random weights and bias.
fn frozen_linear(rng: &mut Rng, fan_in: usize, fan_out: usize) -> Linear {
    let mut l = Linear::new(&BE, fan_in, fan_out, true);
    l.weight.data = randn(rng, fan_in * fan_out, 0.3);
    l.weight.grad = None;
    let b = l.bias.as_mut().unwrap();
    b.data = randn(rng, fan_out, 0.3);
    b.grad = None;
    l
}

#[test]
fn packed_linear_gives_the_plain_products_and_unpacks_whole() {
    let mut rng = Rng::new(11);
    // odd sizes; 1 row (the one-row kernel), 3 (few rows when plain), 9 and 40 (gemm)
    for (fan_in, fan_out) in [(37, 53), (64, 19), (5, 130)] {
        let plain = frozen_linear(&mut rng, fan_in, fan_out);
        let mut packed = plain.clone();
        assert!(!packed.is_packed());
        assert!(packed.pack(&BE).unwrap(), "a frozen layer on the CPU packs");
        assert!(packed.is_packed());
        assert!(
            packed.weight.data.is_empty(),
            "the values live in one place"
        );
        assert!(!packed.pack(&BE).unwrap(), "packing twice is a no-op");
        for rows in [1, 3, 9, 40] {
            let x: Vec<f32> = randn(&mut rng, rows * fan_in, 1.0);
            let want = plain.forward(&BE, &x).unwrap();
            let got = packed.forward(&BE, &x).unwrap();
            let e = rel_err(&got, &want);
            assert!(
                e <= 1e-5,
                "{fan_in}→{fan_out}, {rows} rows: forward off by {e}"
            );
            // the backward's dx = dy · W reads the packed copy transposed
            let dy: Vec<f32> = randn(&mut rng, rows * fan_out, 1.0);
            let want = plain.clone().backward(&BE, &x, &dy, true).unwrap().unwrap();
            let got = packed.backward(&BE, &x, &dy, true).unwrap().unwrap();
            let e = rel_err(&got, &want);
            assert!(e <= 1e-5, "{fan_in}→{fan_out}, {rows} rows: dx off by {e}");
        }
        // a shape error still names the layer's input width
        let e = packed.forward(&BE, &vec![0.0; 7]).unwrap_err().to_string();
        assert!(
            e.contains("Linear::forward"),
            "wrong-size input to a packed layer: {e}"
        );
        packed.unpack(&BE);
        assert!(!packed.is_packed());
        assert_eq!(packed.weight.data, plain.weight.data, "unpacking is exact");
    }
}

#[test]
fn a_trainable_layer_is_not_packed_and_values_set_while_packed_win() {
    let mut rng = Rng::new(12);
    let mut l = Linear::new(&BE, 6, 4, false);
    l.weight.data = randn(&mut rng, 24, 1.0);
    let e = l.pack(&BE).unwrap_err().to_string();
    assert!(e.contains("trainable"), "{e}");
    assert!(!l.is_packed() && l.weight.data.len() == 24);
    // frozen, packed, then given new values through the public field: they are used
    l.weight.grad = None;
    assert!(l.pack(&BE).unwrap());
    let fresh: Vec<f32> = randn(&mut rng, 24, 1.0);
    l.weight.data = fresh.clone();
    let plain = Linear::from_parts(
        Tensor {
            shape: vec![4, 6],
            data: fresh.clone(),
            grad: None,
        },
        None,
    );
    let x: Vec<f32> = randn(&mut rng, 2 * 6, 1.0);
    assert_eq!(
        l.forward(&BE, &x).unwrap(),
        plain.forward(&BE, &x).unwrap(),
        "the packed copy was read after new values were set"
    );
    // and unpacking keeps those values, dropping the stale copy
    l.unpack(&BE);
    assert!(!l.is_packed());
    assert_eq!(l.weight.data, fresh);
}

fn tiny() -> LlamaConfig {
    LlamaConfig {
        vocab_size: 17,
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

#[test]
fn a_packed_llama_gives_the_same_logits_and_params_mut_unpacks() {
    let mut m: Llama = Llama::new(Cpu, tiny(), 3).unwrap();
    let mut rng = Rng::new(13);
    for (name, t) in m.params_mut() {
        if !name.ends_with("norm.weight") {
            t.data = randn(&mut rng, t.numel(), 0.3);
        }
    }
    // trainable: nothing packs
    assert_eq!(m.pack_frozen().unwrap(), 0);
    m.set_trainable(false);
    let before: Vec<Vec<f32>> = m
        .params_mut()
        .into_iter()
        .map(|(_, t)| t.data.clone())
        .collect();
    let ids = [1u32, 4, 9, 16, 2, 7];
    let (want, _) = m.forward(&ids, 2, None, None).unwrap();
    // 7 projections per block and the head
    assert_eq!(m.pack_frozen().unwrap(), 2 * 7 + 1);
    assert!(m.layers[1].mlp.down.is_packed() && m.lm_head.as_ref().unwrap().is_packed());
    let (got, _) = m.forward(&ids, 2, None, None).unwrap();
    let e = rel_err(&got, &want);
    assert!(e <= 1e-5, "packed logits off by {e}");
    // decoding one row at a time through the cache (the one-row product)
    let mut cache = m.new_cache(1);
    let mut last = Vec::new();
    for &id in &ids[..3] {
        last = m.forward_cached(&[id], &mut cache, None, None).unwrap();
    }
    let v = m.cfg.vocab_size;
    let e = rel_err(&last, &want[2 * v..3 * v]);
    assert!(e <= 1e-5, "packed cached decoding off by {e}");
    // every tensor whole again, with its values, once listed for change
    let after: Vec<Vec<f32>> = m
        .params_mut()
        .into_iter()
        .map(|(_, t)| t.data.clone())
        .collect();
    assert!(
        before == after,
        "params_mut did not restore the packed values"
    );
    assert!(!m.layers[0].self_attn.q.is_packed());
}
