//! A training step on the device backend (the emulator, and a GPU when present)
//! against the CPU.
use super::*;

/// On every test device (the emulator; GPU 0 too under `POPEN_TEST_CUDA=1`, see
/// `Device::test_devices`): one training step's loss and every gradient equal the CPU's
/// (the category losses on, so their heads run on the device too), and the step makes
/// a bounded number of host↔device copies.
#[test]
fn a_training_step_on_the_device_backend_equals_the_cpu() {
    let (cfg, tok, b, w) = with_categories();
    device_step_equals_cpu(&cfg, &tok, &b, w, SEG_STEP_COPIES);
}

/// The same with the presence token, which adds one read-back of the patch head's
/// logits and one upload of the evidence per step (`popen::model::seg::evidence`).
#[test]
fn a_training_step_with_the_presence_tokens_on_the_device_backend_equals_the_cpu() {
    for kind in [PresenceTokens::One, PresenceTokens::PerCategory] {
        let (mut cfg, tok, b, w) = with_categories();
        cfg.presence_tokens = kind;
        device_step_equals_cpu(&cfg, &tok, &b, w, SEG_STEP_COPIES + 2);
    }
}

fn device_step_equals_cpu(
    cfg: &SegModelConfig,
    tok: &SegTokenizer,
    b: &[Example],
    w: LossWeights,
    max_copies: u64,
) {
    use popen::backend::DeviceBackend;
    let mut c: SegModel<f32, Cpu> = SegModel::new_tiny(Cpu, cfg.clone(), tok, 6).unwrap();
    let lc = c.step(b, w, 1.0, true).unwrap();
    assert!(lc.patch_class > 0.0 && lc.seg_class > 0.0, "{lc:?}");
    let gc: Vec<(String, Vec<f32>)> = c
        .params_mut()
        .into_iter()
        .map(|(n, t)| (n, t.grad.clone().unwrap()))
        .collect();
    for device in popen::kernels::Device::test_devices() {
        let kind = device.kind();
        let dev = DeviceBackend::new(device);
        let mut d: SegModel<f32, DeviceBackend> =
            SegModel::new_tiny(dev.clone(), cfg.clone(), tok, 6).unwrap();
        let before = dev.device().copies();
        let ld = d.step(b, w, 1.0, true).unwrap();
        let after = dev.device().copies();
        // per step, not per layer or per mask (the batch has 3 masks of one size); with
        // the pixel decoder's ops staged through the host, one read-back per mask and the
        // key mask uploaded per layer this step made 97
        let copies = (after.htod - before.htod) + (after.dtoh - before.dtoh);
        assert!(
            copies <= max_copies,
            "{kind:?}: {copies} host<->device copies in one step ({} up, {} down)",
            after.htod - before.htod,
            after.dtoh - before.dtoh
        );
        assert!(
            (lc.total - ld.total).abs() <= 1e-4 * lc.total.abs(),
            "{kind:?}: {lc:?} vs {ld:?}"
        );
        let gd: Vec<Vec<f32>> = d
            .params_mut()
            .into_iter()
            .map(|(_, t)| dev.to_vec(t.grad.as_ref().unwrap()))
            .collect();
        assert_eq!(gc.len(), gd.len());
        for ((n, a), b) in gc.iter().zip(&gd) {
            let scale = a.iter().fold(1e-6f32, |m, x| m.max(x.abs()));
            let err = a.iter().zip(b).fold(0f32, |m, (x, y)| {
                common::close::sticky_max(m, (x - y).abs())
            });
            // (+1e-7: the decoder's key biases get a gradient that is zero up to rounding)
            assert!(
                err <= 1e-4 * scale + 1e-7,
                "{kind:?} {n}: gradients differ by {err} (scale {scale})"
            );
        }
    }
}

/// Host↔device copies one segmentation training step may make, none per layer or per
/// mask: up, the ids (embedding forward and backward, the codebook rows), the pixels,
/// the labels and the heads' labels, the positional encodings (one per scale), the mask
/// targets (one upload), d log p; down, the log-probs, the mask losses (one per image
/// size), the pair losses of instance matching's alike targets (one per image size) and
/// the three head losses (the place loss twice: once more when matching reorders its
/// labels).  Measured: 21 up, 6 down, on a batch whose examples run the LLM as one
/// group of lengths (`popen::model::seg::layout`); each further group adds its own
/// uploads (ids, targets, d log p) and its download of log-probs.
const SEG_STEP_COPIES: u64 = 27;
