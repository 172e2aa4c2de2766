//! Heads split (with RoPE) and merged, the KV-cache append, embeddings and image patches:
//! launches of `kernels/layout.cu`.  CPU twins: `src/backend/cpu/{heads,embed}.rs`.
//!
//! B batch, T tokens, NH heads, HS head size, C channels, V vocabulary.
use super::{i32_arg, i64_arg, linear, rows_of, BLOCK};
use crate::backend::Cols;
use crate::error::{check_len, Error, Result};
use crate::kernels::{Device, DeviceBuf, KArg, LaunchCfg};

/// The shape of one heads layout call.
#[derive(Clone, Copy)]
pub(super) struct Heads {
    pub b: usize,
    pub t: usize,
    pub nh: usize,
    pub hs: usize,
    pub pos0: usize,
    pub theta: Option<f32>,
}

impl Heads {
    pub fn new(b: usize, t: usize, nh: usize, hs: usize, pos0: usize, theta: Option<f32>) -> Self {
        Heads {
            b,
            t,
            nh,
            hs,
            pos0,
            theta,
        }
    }
    fn check(&self, op: &'static str) -> Result<usize> {
        if self.theta.is_some() && !self.hs.is_multiple_of(2) {
            return Err(Error::arg(
                op,
                format!("RoPE needs an even head size, got {}", self.hs),
            ));
        }
        Ok(self.b * self.t * self.nh * self.hs)
    }
    fn args(&self, op: &'static str) -> Result<[KArg; 7]> {
        Ok([
            i32_arg(op, "B", self.b)?,
            i32_arg(op, "T", self.t)?,
            i32_arg(op, "NH", self.nh)?,
            i32_arg(op, "HS", self.hs)?,
            // positions pos0..pos0 + T must all fit the kernel's int
            i32_arg(op, "pos0 + T", self.pos0 + self.t).and(i32_arg(op, "pos0", self.pos0))?,
            KArg::F32(self.theta.unwrap_or(0.0)),
            KArg::I32(i32::from(self.theta.is_some())),
        ])
    }
}

/// Where the heads-major side of a heads layout call lies: time rows `at..at + T` of
/// (B,NH,`ht`,HS).
#[derive(Clone, Copy)]
pub(super) struct Place {
    pub ht: usize,
    pub at: usize,
}

/// Which way a heads layout call goes: token-major to heads-major (`heads_split_f32`)
/// or back (`heads_merge_f32`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Way {
    Split,
    Merge,
}

/// A heads layout call from `x` into `out`.  The token-major side (x for the split, out
/// for the merge) lies at `tok[0]` in its buffer; the heads-major one is the heads' size
/// (`place` None), or lies at `place`.  A `second` pair (x2, out2) of the same sizes, its
/// token-major side at `tok[1]` (the same row stride), goes the same way, unrotated, in
/// the same launch (grid.y = 2).
#[allow(clippy::too_many_arguments)]
fn launch_heads(
    dev: &Device,
    op: &'static str,
    way: Way,
    h: &Heads,
    place: Option<Place>,
    tok: [Cols; 2],
    (x, out): (&DeviceBuf<f32>, &mut DeviceBuf<f32>),
    second: Option<(&DeviceBuf<f32>, &mut DeviceBuf<f32>)>,
) -> Result<()> {
    let n = h.check(op)?;
    let (rows, w) = (h.b * h.t, h.nh * h.hs);
    let p = place.unwrap_or(Place { ht: h.t, at: 0 });
    if p.at + h.t > p.ht {
        return Err(Error::shape(
            op,
            format!(
                "time rows {}..{} do not fit {} rows per head",
                p.at,
                p.at + h.t,
                p.ht
            ),
        ));
    }
    let heads_major = h.b * h.nh * p.ht * h.hs;
    // each side checked: a token-major one at its columns, a heads-major one whole
    let side = |what: &str, len: usize, at: Cols, token_major: bool| {
        if token_major {
            at.check(op, what, len, rows, w)
        } else {
            check_len(op, what, len, heads_major)
        }
    };
    let kernel = match way {
        Way::Split => "heads_split_f32",
        Way::Merge => "heads_merge_f32",
    };
    let split = way == Way::Split;
    side("input", x.len(), tok[0], split)?;
    side("output", out.len(), tok[0], !split)?;
    if let Some((x2, out2)) = &second {
        side("second input", x2.len(), tok[1], split)?;
        side("second output", out2.len(), tok[1], !split)?;
        if tok[1].ld != tok[0].ld {
            return Err(Error::shape(
                op,
                format!(
                    "a pair's token rows with strides {} and {}: one launch reads one",
                    tok[0].ld, tok[1].ld
                ),
            ));
        }
    }
    if n == 0 {
        return Ok(());
    }
    // the token-major side's pointer starts at its columns; the heads-major one at 0
    let offs = |c: Cols| if split { (c.off, 0) } else { (0, c.off) };
    let ((x0, o0), (x1, o1)) = (offs(tok[0]), offs(tok[1]));
    let [b, t, nh, hs, pos0, theta, rope] = h.args(op)?;
    let (ht, at) = (
        i32_arg(op, "rows per head", p.ht)?,
        i32_arg(op, "at", p.at)?,
    );
    // one thread per (token, lane): a rotation pair with RoPE, a dimension without (the
    // unrotated second pair's lanes set the grid when there is one)
    let rotated = h.theta.is_some() && second.is_none();
    let lanes = if rotated { h.hs / 2 } else { h.hs };
    let mut cfg = linear(h.b * h.t * lanes);
    let (out2, x2) = match second {
        Some((x2, out2)) => {
            cfg.grid[1] = 2;
            (out2.arg_mut_at(o1), x2.arg_at(x1))
        }
        None => (KArg::Ptr(0), KArg::Ptr(0)),
    };
    dev.launch(
        kernel,
        cfg,
        &[
            out.arg_mut_at(o0),
            x.arg_at(x0),
            out2,
            x2,
            b,
            t,
            nh,
            hs,
            pos0,
            theta,
            rope,
            ht,
            at,
            i64_arg(tok[0].ld),
        ],
    )
}

/// x (B,T,NH,HS) at `x_at` → out (B,NH,T,HS), RoPE at positions pos0 + t when theta is
/// Some.
pub(super) fn heads_split(
    dev: &Device,
    h: &Heads,
    (x, x_at): (&DeviceBuf<f32>, Cols),
    out: &mut DeviceBuf<f32>,
) -> Result<()> {
    let tok = [x_at; 2];
    launch_heads(dev, "heads_split", Way::Split, h, None, tok, (x, out), None)
}

/// A KV cache's new keys k (rotated when theta is Some) and values v, (B,T,NKV,HS)
/// each at its columns, split into time rows `at..at + T` of kc and vc (B,NKV,`cap`,HS),
/// the rest untouched: one launch.
pub(super) fn append_kv(
    dev: &Device,
    h: &Heads,
    place: Place,
    (k, k_at, kc): (&DeviceBuf<f32>, Cols, &mut DeviceBuf<f32>),
    (v, v_at, vc): (&DeviceBuf<f32>, Cols, &mut DeviceBuf<f32>),
) -> Result<()> {
    let (kv, place) = ((v, vc), Some(place));
    let tok = [k_at, v_at];
    launch_heads(
        dev,
        "append_kv",
        Way::Split,
        h,
        place,
        tok,
        (k, kc),
        Some(kv),
    )
}

/// dout (B,NH,T,HS) → dx (B,T,NH,HS) at `dx_at`, overwritten: the merge with the inverse
/// rotation.
pub(super) fn heads_split_bwd(
    dev: &Device,
    h: &Heads,
    dout: &DeviceBuf<f32>,
    (dx, dx_at): (&mut DeviceBuf<f32>, Cols),
) -> Result<()> {
    let tok = [dx_at; 2];
    let op = "heads_split_bwd";
    launch_heads(dev, op, Way::Merge, h, None, tok, (dout, dx), None)
}

/// x (B,NH,T,HS) → out (B,T,NH,HS).
pub(super) fn heads_merge(
    dev: &Device,
    h: &Heads,
    x: &DeviceBuf<f32>,
    out: &mut DeviceBuf<f32>,
) -> Result<()> {
    let plain = Heads {
        theta: None,
        pos0: 0,
        ..*h
    };
    let tok = [Cols::whole(h.nh * h.hs); 2];
    launch_heads(
        dev,
        "heads_merge",
        Way::Merge,
        &plain,
        None,
        tok,
        (x, out),
        None,
    )
}

/// Token ids checked against a table of V rows (the contract hands them over on the host).
fn check_ids(op: &'static str, ids: &[u32], v: usize) -> Result<()> {
    match ids.iter().enumerate().find(|(_, &id)| id as usize >= v) {
        Some((pos, &id)) => Err(Error::arg(
            op,
            format!("token id {id} at position {pos} is outside the table of {v} rows"),
        )),
        None => Ok(()),
    }
}

/// Token ids checked against V, then uploaded.
fn upload_ids(dev: &Device, op: &'static str, ids: &[u32], v: usize) -> Result<DeviceBuf<u32>> {
    check_ids(op, ids, v)?;
    dev.upload(ids)
}

/// out (N,C) = table (V,C)[ids (N)]
pub(super) fn embedding_fwd(
    dev: &Device,
    ids: &[u32],
    table: &DeviceBuf<f32>,
    c: usize,
    out: &mut DeviceBuf<f32>,
) -> Result<()> {
    const OP: &str = "embedding_fwd";
    let v = rows_of(OP, table.len(), c)?;
    check_len(OP, "out", out.len(), ids.len() * c)?;
    let idd = upload_ids(dev, OP, ids, v)?;
    if ids.is_empty() {
        return Ok(());
    }
    dev.launch(
        "embedding_fwd_f32",
        linear(ids.len() * c),
        &[
            out.arg_mut(),
            table.arg(),
            idd.arg(),
            i64_arg(ids.len()),
            i32_arg(OP, "C", c)?,
        ],
    )
}

/// The rows of `ids` grouped by id for `embedding_bwd_f32`: `[start (U + 1), id (U),
/// order (N)]`, groups sorted by id, rows ascending within a group; and U.
fn id_groups(ids: &[u32]) -> (Vec<u32>, usize) {
    let mut order: Vec<u32> = (0..ids.len() as u32).collect();
    order.sort_by_key(|&r| (ids[r as usize], r));
    let mut start = Vec::new();
    let mut uid = Vec::new();
    for (k, &r) in order.iter().enumerate() {
        let id = ids[r as usize];
        if uid.last() != Some(&id) {
            uid.push(id);
            start.push(k as u32);
        }
    }
    start.push(order.len() as u32);
    let u = uid.len();
    let mut out = start;
    out.extend(uid);
    out.extend(order);
    (out, u)
}

/// dtable (V,C) += scatter of dout (N,C) by ids: one block per distinct id (and column
/// block), adding its rows in order, so each entry is the CPU twin's sequential sum.
pub(super) fn embedding_bwd(
    dev: &Device,
    ids: &[u32],
    dout: &DeviceBuf<f32>,
    c: usize,
    dtable: &mut DeviceBuf<f32>,
) -> Result<()> {
    const OP: &str = "embedding_bwd";
    let v = rows_of(OP, dtable.len(), c)?;
    check_len(OP, "dout", dout.len(), ids.len() * c)?;
    check_ids(OP, ids, v)?;
    if ids.is_empty() || c == 0 {
        return Ok(());
    }
    // (U + 1) + U + N ≤ 3N + 1 entries, each index a u32
    if ids.len() >= u32::MAX as usize / 3 {
        return Err(Error::shape(
            OP,
            format!("{} ids do not fit one launch", ids.len()),
        ));
    }
    let (groups, u) = id_groups(ids);
    let cb = u32::try_from(c.div_ceil(BLOCK as usize))
        .ok()
        .filter(|&g| g <= 65_535)
        .ok_or_else(|| Error::shape(OP, format!("C = {c} too large")))?;
    let gd = dev.upload(&groups)?;
    dev.launch(
        "embedding_bwd_f32",
        LaunchCfg::new([u as u32, cb, 1], [BLOCK, 1, 1], 0),
        &[
            dtable.arg_mut(),
            dout.arg(),
            gd.arg(),
            i32_arg(OP, "U", u)?,
            i32_arg(OP, "C", c)?,
        ],
    )
}

/// pixels (B,CH,H,W) ↔ patch rows (B, (H/P)(W/P), CH·P·P): `kernel` is
/// patchify_fwd_f32 (dst = rows) or patchify_bwd_f32 (dst = pixels, overwritten).
pub(super) fn patchify(
    dev: &Device,
    op: &'static str,
    kernel: &str,
    src: &DeviceBuf<f32>,
    [b, ch, h, w, p]: [usize; 5],
    dst: &mut DeviceBuf<f32>,
) -> Result<()> {
    if p == 0 || !h.is_multiple_of(p) || !w.is_multiple_of(p) {
        return Err(Error::arg(
            op,
            format!("image {h}x{w} is not a whole number of {p}x{p} patches"),
        ));
    }
    let n = b * ch * h * w;
    check_len(op, "input", src.len(), n)?;
    check_len(op, "output", dst.len(), n)?;
    if n == 0 {
        return Ok(());
    }
    dev.launch(
        kernel,
        linear(n),
        &[
            dst.arg_mut(),
            src.arg(),
            i64_arg(n),
            i32_arg(op, "CH", ch)?,
            i32_arg(op, "H", h)?,
            i32_arg(op, "W", w)?,
            i32_arg(op, "P", p)?,
        ],
    )
}
