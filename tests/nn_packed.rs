//! Packed Linear layers (`Linear::pack`): the same products as the plain layout,
//! forward and backward; the values in one place at a time and back whole on
//! unpacking; a trainable layer refused; values set while packed win.  A packed LLaMA
//! (`Llama::pack_frozen`) is checked in nn_llama.rs.
use popen::backend::Cpu;
use popen::nn::{randn, Linear, Rng, Tensor};
mod common;
use common::close::rel_err;

const BE: Cpu = Cpu;

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
