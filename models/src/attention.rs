//! Multi-head self-attention on `[B, H, W, C]` tokens (detectron2's `Attention.forward`) and
//! the window partition / unpartition around it.

use vitdet_ir::ops::{Init, RelPosGather};
use vitdet_ir::Value;

use crate::builder::{Builder, Result};

/// The relative-position term of one attention module.
#[derive(Clone, Copy, Debug)]
pub(crate) enum RelPosTerm {
    None,
    /// detectron2's decomposed rel pos: this module owns `rel_pos_h`, `rel_pos_w`, each
    /// `[2 * table_size - 1, head_dim]`.
    Decomposed {
        table_size: usize,
    },
    /// A shared BEiT bias `[heads, N, N]` added to the scaled logits.
    Bias(Value),
}

/// `Attention.forward` in the current scope (the `attn` module): `x [B, H, W, C]` ->
/// `[B, H, W, C]`.
pub(crate) fn attention(b: &mut Builder, x: Value, heads: usize, qkv_bias: bool, rel: RelPosTerm) -> Result<Value> {
    let s = b.shape(x);
    let (bsz, h, w, c) = (s[0], s[1], s[2], s[3]);
    let (n, hd, bh) = (h * w, c / heads, s[0] * heads);

    // qkv: [B, H, W, 3C] -> [B, N, 3, heads, hd] -> [3, B, heads, N, hd] -> [3, B*heads, N, hd]
    let qkv = b.linear("qkv", x, 3 * c, qkv_bias)?;
    let qkv = b.reshape(qkv, vec![bsz, n, 3, heads, hd])?;
    let qkv = b.permute(qkv, vec![2, 0, 3, 1, 4])?;
    let qkv = b.reshape(qkv, vec![3, bh, n, hd])?;
    let mut qkv3 = Vec::with_capacity(3);
    for i in 0..3 {
        let t = b.slice(qkv, 0, i, i + 1)?;
        qkv3.push(b.reshape(t, vec![bh, n, hd])?);
    }
    let (q, k, v) = (qkv3[0], qkv3[1], qkv3[2]);

    // attn = (q * scale) @ k^T : [B*heads, N, N]
    let qs = b.scale(q, (hd as f64).powf(-0.5))?;
    let mut attn = b.matmul(qs, k, true)?;

    match rel {
        RelPosTerm::None => {}
        RelPosTerm::Decomposed { table_size } => {
            attn = add_decomposed_rel_pos(b, attn, q, [h, w], table_size)?;
        }
        RelPosTerm::Bias(bias) => {
            let a = b.reshape(attn, vec![bsz, heads, n, n])?;
            let a = b.add(a, bias)?;
            attn = b.reshape(a, vec![bh, n, n])?;
        }
    }

    let attn = b.softmax(attn, 2)?;
    let out = b.matmul(attn, v, false)?; // [B*heads, N, hd]
                                         // view(B, heads, H, W, hd).permute(0, 2, 3, 1, 4).reshape(B, H, W, C)
    let out = b.reshape(out, vec![bsz, heads, h, w, hd])?;
    let out = b.permute(out, vec![0, 2, 3, 1, 4])?;
    let out = b.reshape(out, vec![bsz, h, w, c])?;
    b.linear("proj", out, c, true)
}

/// detectron2's `add_decomposed_rel_pos` with `q_size == k_size == [h, w]`: declares
/// `rel_pos_h`, `rel_pos_w` in the current scope and returns
/// `(attn.view(B, h, w, h, w) + rel_h[..., None] + rel_w[..., None, :]).view(B, N, N)`, where
/// `rel_h[b,y,x,k] = sum_c q[b,y,x,c] Rh[y,k,c]` and `rel_w[b,y,x,k] = sum_c q[b,y,x,c] Rw[x,k,c]`
/// (q unscaled). The contractions run as matmuls batched over the indexed axis (`y` or `x`).
fn add_decomposed_rel_pos(
    b: &mut Builder,
    attn: Value,
    q: Value,
    [h, w]: [usize; 2],
    table_size: usize,
) -> Result<Value> {
    let qs = b.shape(q);
    let (bh, hd) = (qs[0], qs[2]);
    let table = vec![2 * table_size - 1, hd];
    // detectron2 zero-initializes the tables by default (`rel_pos_zero_init=True`).
    let table_h = b.param("rel_pos_h", table.clone(), Init::Zeros)?;
    let table_w = b.param("rel_pos_w", table, Init::Zeros)?;
    let rh = b.op(RelPosGather { q_size: h, k_size: h }, &[table_h])?; // [h, h, hd]
    let rw = b.op(RelPosGather { q_size: w, k_size: w }, &[table_w])?; // [w, w, hd]

    let rq = b.reshape(q, vec![bh, h, w, hd])?;
    // rel_h: [h, B*w, hd] @ Rh[h, k, hd]^T -> [h, B*w, k] -> [B, h, w, k]
    let qh = b.permute(rq, vec![1, 0, 2, 3])?;
    let qh = b.reshape(qh, vec![h, bh * w, hd])?;
    let rel_h = b.matmul(qh, rh, true)?;
    let rel_h = b.reshape(rel_h, vec![h, bh, w, h])?;
    let rel_h = b.permute(rel_h, vec![1, 0, 2, 3])?;
    let rel_h = b.reshape(rel_h, vec![bh, h, w, h, 1])?;
    // rel_w: [w, B*h, hd] @ Rw[w, k, hd]^T -> [w, B*h, k] -> [B, h, w, k]
    let qw = b.permute(rq, vec![2, 0, 1, 3])?;
    let qw = b.reshape(qw, vec![w, bh * h, hd])?;
    let rel_w = b.matmul(qw, rw, true)?;
    let rel_w = b.reshape(rel_w, vec![w, bh, h, w])?;
    let rel_w = b.permute(rel_w, vec![1, 2, 0, 3])?;
    let rel_w = b.reshape(rel_w, vec![bh, h, w, 1, w])?;

    let a = b.reshape(attn, vec![bh, h, w, h, w])?;
    let a = b.add(a, rel_h)?;
    let a = b.add(a, rel_w)?;
    b.reshape(a, vec![bh, h * w, h * w])
}

/// Where a window partition came from, for [`window_unpartition`].
#[derive(Clone, Copy, Debug)]
pub(crate) struct Windows {
    batch: usize,
    hw: [usize; 2],
    padded: [usize; 2],
    ws: usize,
}

/// detectron2's `window_partition`: `[B, H, W, C]` -> zero-pad H, W to multiples of `ws` ->
/// `[B * nW, ws, ws, C]`.
pub(crate) fn window_partition(b: &mut Builder, x: Value, ws: usize) -> Result<(Value, Windows)> {
    let s = b.shape(x);
    let (bsz, h, w, c) = (s[0], s[1], s[2], s[3]);
    let (ph, pw) = ((ws - h % ws) % ws, (ws - w % ws) % ws);
    let (hp, wp) = (h + ph, w + pw);
    let x = if ph > 0 || pw > 0 {
        b.pad(x, vec![[0, 0], [0, ph], [0, pw], [0, 0]])?
    } else {
        x
    };
    let x = b.reshape(x, vec![bsz, hp / ws, ws, wp / ws, ws, c])?;
    let x = b.permute(x, vec![0, 1, 3, 2, 4, 5])?;
    let x = b.reshape(x, vec![bsz * (hp / ws) * (wp / ws), ws, ws, c])?;
    let win = Windows {
        batch: bsz,
        hw: [h, w],
        padded: [hp, wp],
        ws,
    };
    Ok((x, win))
}

/// detectron2's `window_unpartition`: `[B * nW, ws, ws, C]` -> `[B, Hp, Wp, C]` -> crop to
/// `[B, H, W, C]`.
pub(crate) fn window_unpartition(b: &mut Builder, x: Value, win: Windows) -> Result<Value> {
    let c = b.shape(x)[3];
    let Windows { batch, hw, padded, ws } = win;
    let x = b.reshape(x, vec![batch, padded[0] / ws, padded[1] / ws, ws, ws, c])?;
    let x = b.permute(x, vec![0, 1, 3, 2, 4, 5])?;
    let mut x = b.reshape(x, vec![batch, padded[0], padded[1], c])?;
    if padded[0] != hw[0] {
        x = b.slice(x, 1, 0, hw[0])?;
    }
    if padded[1] != hw[1] {
        x = b.slice(x, 2, 0, hw[1])?;
    }
    Ok(x)
}
