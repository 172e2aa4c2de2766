//! Stage 3: the gradient in the learnable prompt against f64 finite differences.
use super::*;

#[test]
fn stage3_gradient_in_the_prompt_matches_finite_differences() {
    let c = cfg();
    let tok = tokenizer(&c);
    let mut m: SegModel<f64, Cpu> = SegModel::new_tiny(Cpu, c, &tok, 5).unwrap();
    m.set_trainable(Trainable::frozen());
    let mut rng = Rng::new(77);
    let d = refine_data(&m, &tok, &mut rng);
    let hdim = m.llava.cfg.text.hidden_size;
    let prompt: Vec<f64> = (0..3 * hdim).map(|_| 0.5 * rng.normal()).collect();
    let before: Vec<Vec<f64>> = m.params_mut().iter().map(|(_, t)| m_vec(t)).collect();
    let (loss, _) = m.refine_loss(&tok, &d, &prompt, true).unwrap();
    assert!(loss.lti.is_some() && loss.lsi.is_some(), "{loss:?}");
    // each term on its own (each must reach the prompt), and both together: central
    // differences in f64
    for (name, dd) in [
        (
            "text",
            RefineData {
                seg_pairs: vec![],
                ..d.clone()
            },
        ),
        (
            "seg",
            RefineData {
                delta_text: vec![],
                ..d.clone()
            },
        ),
        ("both", d.clone()),
    ] {
        let (_, g) = m.refine_loss(&tok, &dd, &prompt, true).unwrap();
        let g = g.unwrap();
        let eps = 1e-4;
        let mut worst = 0.0f64;
        let gmax = g.iter().fold(0.0f64, |a, x| a.max(x.abs()));
        assert!(gmax > 1e-9, "{name}: no gradient reaches the prompt");
        for i in 0..prompt.len() {
            let mut p = prompt.clone();
            p[i] += eps;
            let (lp, _) = m.refine_loss(&tok, &dd, &p, false).unwrap();
            p[i] -= 2.0 * eps;
            let (lm, _) = m.refine_loss(&tok, &dd, &p, false).unwrap();
            let fd = (lp.total() - lm.total()) / (2.0 * eps);
            worst = worst.max((fd - g[i]).abs() / gmax);
        }
        assert!(
            worst < 2e-5,
            "{name}: worst relative error {worst:e} (max |g| {gmax:e})"
        );
        eprintln!("{name}: worst relative error {worst:e} (max |g| {gmax:e})");
    }
    // the model stayed frozen: no weight moved, no gradient was kept
    let after: Vec<Vec<f64>> = m.params_mut().iter().map(|(_, t)| m_vec(t)).collect();
    assert_eq!(before, after);
    assert!(m.params_mut().iter().all(|(_, t)| t.grad.is_none()));
}

fn m_vec(t: &popen::nn::Tensor<f64, Cpu>) -> Vec<f64> {
    Cpu.to_vec(&t.data)
}
