//! One launch over many buffers: the optimizer step's per-parameter ops (zeroing the
//! gradients, their norm and clipping, AdamW) on every parameter tensor at once, as
//! PyTorch's `foreach` and fused optimizers do.  A model has a few hundred tensors, and
//! one launch per tensor per op made these ops about 1 300 driver calls of a tiny
//! model's training step.
//!
//! The launch reads a table of the buffers (`TAB_WORDS` words per buffer, laid out in
//! `kernels/elementwise.cu`), uploaded once per distinct list of buffers and kept
//! ([`super::model_ops::HostInputs::tables`]): parameters, gradients and moments keep
//! their addresses from step to step, so after the first step no table is uploaded.
//! Each buffer gets [`blocks_of`] its length, a grid of its own inside the launch.  An
//! element of `fill_many`, `scale_many` and `adamw_many` is computed as the one-buffer
//! kernel computes it (their bodies are shared), and a buffer's Σ x² adds in an order
//! set by its length alone, so it does not depend on the other buffers of the batch
//! (`sum_sq` is a batch of one).  AdamW checks every tensor before the launch, so a bad
//! one leaves every weight as it was.
use super::{DeviceBackend, BLOCK, MAX_BLOCKS};
use crate::backend::{AdamWSlot, AdamWStep};
use crate::error::{check_len, Error, Result};
use crate::kernels::{DeviceBuf, KArg, LaunchCfg};

/// Words per table entry (`TAB_WORDS` in `kernels/elementwise.cu`): four addresses,
/// the element count, the entry's first block, its block count and one unused word.
const TAB_WORDS: usize = 8;

/// Blocks of a buffer of `n` elements in a launch over many: each thread takes at least
/// 32 elements (a Σ x²'s order, so its result, depends on this grid).
fn blocks_of(n: usize) -> usize {
    n.div_ceil(32 * BLOCK as usize).clamp(1, MAX_BLOCKS)
}

/// The table of one launch: per buffer its operands' addresses (unused ones 0), and the
/// total number of blocks.
struct Table {
    words: Vec<u64>,
    entries: usize,
    blocks: usize,
}

impl Table {
    fn new(op: &'static str, bufs: impl IntoIterator<Item = ([KArg; 4], usize)>) -> Result<Table> {
        let mut t = Table {
            words: Vec::new(),
            entries: 0,
            blocks: 0,
        };
        for (ptrs, n) in bufs {
            let b = blocks_of(n);
            let [p0, p1, p2, p3] = ptrs.map(addr);
            let entry: [u64; TAB_WORDS] = [p0, p1, p2, p3, n as u64, t.blocks as u64, b as u64, 0];
            t.words.extend(entry);
            t.entries += 1;
            t.blocks += b;
        }
        if t.blocks > i32::MAX as usize {
            return Err(Error::shape(
                op,
                format!(
                    "{} blocks over {} buffers is past a grid",
                    t.blocks, t.entries
                ),
            ));
        }
        Ok(t)
    }

    /// `f` with the table on the device and the launch over every entry's blocks.
    fn launch(
        &self,
        be: &DeviceBackend,
        f: impl FnOnce(&DeviceBuf<u64>, LaunchCfg) -> Result<()>,
    ) -> Result<()> {
        if self.entries == 0 {
            return Ok(());
        }
        let cfg = LaunchCfg::new([self.blocks as u32, 1, 1], [BLOCK, 1, 1], 0);
        be.inputs
            .tables
            .with(be.device(), &self.words, |tab| f(tab, cfg))
    }
}

fn addr(a: KArg) -> u64 {
    match a {
        KArg::Ptr(p) => p,
        _ => 0,
    }
}

const NONE: KArg = KArg::Ptr(0);

/// `kernel` (`fill_many_f32`, `scale_many_f32`: one buffer per entry and a scalar) over
/// every buffer of `xs`, in one launch.
pub(super) fn each_in_place(
    be: &DeviceBackend,
    kernel: &'static str,
    xs: &mut [&mut DeviceBuf<f32>],
    scalar: f32,
) -> Result<()> {
    let t = Table::new(
        kernel,
        xs.iter_mut()
            .map(|x| ([x.arg_mut(), NONE, NONE, NONE], x.len())),
    )?;
    t.launch(be, |tab, cfg| {
        be.device().launch(
            kernel,
            cfg,
            &[tab.arg(), KArg::I32(t.entries as i32), KArg::F32(scalar)],
        )
    })
}

/// Σ x² of each buffer, in two launches and one download: each buffer's partial sums
/// on its own grid ([`blocks_of`]), then each buffer's parts added in order by a block
/// of its own.  The results equal each buffer's `sum_sq`.
pub(super) fn sum_sq_many(be: &DeviceBackend, xs: &[&DeviceBuf<f32>]) -> Result<Vec<f32>> {
    if xs.is_empty() {
        return Ok(Vec::new());
    }
    let dev = be.device();
    let t = Table::new(
        "sum_sq_many",
        xs.iter().map(|x| ([x.arg(), NONE, NONE, NONE], x.len())),
    )?;
    let mut out = dev.uninit::<f32>(t.entries)?;
    let mut part = dev.uninit::<f32>(t.blocks)?;
    t.launch(be, |tab, cfg| {
        dev.launch(
            "sum_sq_part_many_f32",
            cfg,
            &[part.arg_mut(), tab.arg(), KArg::I32(t.entries as i32)],
        )?;
        dev.launch(
            "sum_parts_many_f32",
            LaunchCfg::new([t.entries as u32, 1, 1], [BLOCK, 1, 1], 0),
            &[out.arg_mut(), part.arg(), tab.arg()],
        )
    })?;
    dev.download(&out)
}

/// [`crate::backend::Backend::adamw_step`] of each (param, grad, m, v), in one launch.
pub(super) fn adamw_many(
    be: &DeviceBackend,
    h: &AdamWStep,
    slots: &mut [AdamWSlot<DeviceBuf<f32>>],
) -> Result<()> {
    let op = "adamw_step_many";
    if h.step == 0 {
        return Err(Error::arg(op, "step numbers start at 1"));
    }
    for (i, s) in slots.iter().enumerate() {
        let n = s.param.len();
        check_len(op, &format!("grad {i}"), s.grad.len(), n)?;
        check_len(op, &format!("m {i}"), s.m.len(), n)?;
        check_len(op, &format!("v {i}"), s.v.len(), n)?;
    }
    let t = Table::new(
        op,
        slots.iter_mut().map(|s| {
            let n = s.param.len();
            (
                [
                    s.param.arg_mut(),
                    s.m.arg_mut(),
                    s.v.arg_mut(),
                    s.grad.arg(),
                ],
                n,
            )
        }),
    )?;
    let mut args = vec![KArg::I32(t.entries as i32)];
    args.extend(super::elementwise::adamw_args(h));
    t.launch(be, |tab, cfg| {
        args.insert(0, tab.arg());
        be.device().launch("adamw_many_f32", cfg, &args)
    })
}
