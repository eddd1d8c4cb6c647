//! The paper's multi-scale adapter and detectron2's FPN with BatchNorm (vit family).

use vitdet_ir::ops::ResizeMode;
use vitdet_ir::Value;

use crate::builder::{Builder, Norm, Result};
use crate::config::ModelConfig;

/// GroupNorm epsilon in the 4x adapter branch (PyTorch default).
pub const ADAPTER_GN_EPS: f64 = 1e-5;
/// BatchNorm epsilon in the FPN (PyTorch default).
pub const FPN_BN_EPS: f64 = 1e-5;

/// The adapter (scope `backbone.adapter`) on four NCHW trunk maps `[B, C, g, g]` (outputs of
/// blocks d/4, d/2, 3d/4, d): returns `[c2, c3, c4, c5]` at strides 4, 8, 16, 32, all with
/// C channels.
pub(crate) fn adapter(b: &mut Builder, cfg: &ModelConfig, taps: [Value; 4]) -> Result<[Value; 4]> {
    let c = cfg.embed_dim;
    b.scoped("adapter", |b| {
        let c2 = b.scoped("up4", |b| {
            let y = b.conv_transpose("0", taps[0], c, 2)?;
            let y = b.group_norm("1", y, cfg.group_norm_groups, ADAPTER_GN_EPS)?;
            let y = b.scoped("2", |b| b.gelu(y))?;
            b.conv_transpose("3", y, c, 2)
        })?;
        let c3 = b.scoped("up2", |b| b.conv_transpose("0", taps[1], c, 2))?;
        let c4 = taps[2];
        let c5 = b.max_pool(taps[3], 2, 2)?;
        Ok([c2, c3, c4, c5])
    })
}

/// detectron2's `FPN` (current scope `backbone`) with BN, `LastLevelMaxPool` top block:
/// returns `[p2, p3, p4, p5, p6]`.
pub(crate) fn fpn(b: &mut Builder, cfg: &ModelConfig, c: [Value; 4]) -> Result<Vec<Value>> {
    let o = cfg.out_channels;
    let bn = Norm::BatchNorm { eps: FPN_BN_EPS };
    let mut prev = b.conv_norm("fpn_lateral5", c[3], o, 1, bn)?;
    let mut ps = vec![b.conv_norm("fpn_output5", prev, o, 3, bn)?];
    for level in (2..=4).rev() {
        let lateral = b.conv_norm(&format!("fpn_lateral{level}"), c[level - 2], o, 1, bn)?;
        let s = b.shape(prev);
        let up = b.resize(prev, [2 * s[2], 2 * s[3]], ResizeMode::Nearest)?;
        prev = b.add(lateral, up)?;
        ps.push(b.conv_norm(&format!("fpn_output{level}"), prev, o, 3, bn)?);
    }
    ps.reverse(); // p2, p3, p4, p5
    let p6 = b.scoped("top_block", |b| b.max_pool(ps[3], 1, 2))?;
    ps.push(p6);
    Ok(ps)
}
