//! The plain ViT trunk shared by both families (scope `backbone.net`): patch embedding,
//! absolute position embedding, and `depth` blocks of window or global attention.

use vitdet_ir::ops::{BinaryKind, DropPath, DropPathMask, Init, RelPosBias, ResizeMode};
use vitdet_ir::Value;

use crate::attention::{attention, window_partition, window_unpartition, RelPosTerm};
use crate::builder::{Builder, Result, TRUNC_NORMAL_STD};
use crate::config::{ModelConfig, RelPos};

/// Builds the trunk in the current scope (`backbone.net`) on the NCHW image and returns the
/// NHWC `[B, g, g, C]` output of every block.
pub(crate) fn trunk(b: &mut Builder, cfg: &ModelConfig, image: Value) -> Result<Vec<Value>> {
    let c = cfg.embed_dim;
    let p = cfg.patch_size;
    let x = b.scoped("patch_embed", |b| {
        let y = b.conv2d("proj", image, c, p, p, 0, true)?;
        b.nchw_to_nhwc(y)
    })?;
    let mut x = if cfg.abs_pos { add_abs_pos(b, cfg, x)? } else { x };

    let shared = shared_biases(b, cfg)?;
    let mut outs = Vec::with_capacity(cfg.depth);
    for i in 0..cfg.depth {
        let rel = match cfg.rel_pos_kind() {
            RelPos::Disabled => RelPosTerm::None,
            RelPos::Decomposed => RelPosTerm::Decomposed {
                table_size: cfg.rel_pos_table_size(i),
            },
            RelPos::SharedBias => {
                let v = if cfg.is_global(i) { shared.global } else { shared.window };
                RelPosTerm::Bias(v.expect("shared bias built for every attention kind in use"))
            }
        };
        x = b.scoped(format!("blocks.{i}"), |b| block(b, cfg, i, x, rel))?;
        outs.push(x);
    }
    Ok(outs)
}

/// detectron2's `get_abs_pos` with a class token: `pos_embed [1, 1 + P*P, C]` -> drop the class
/// token -> `[1, P, P, C]` -> bicubic resize (NCHW) to the token grid -> add.
fn add_abs_pos(b: &mut Builder, cfg: &ModelConfig, x: Value) -> Result<Value> {
    let (c, pg, g) = (cfg.embed_dim, cfg.pretrain_grid(), cfg.grid());
    let pos = b.param(
        "pos_embed",
        vec![1, pg * pg + 1, c],
        Init::TruncNormal { std: TRUNC_NORMAL_STD },
    )?;
    let pos = b.slice(pos, 1, 1, pg * pg + 1)?;
    let mut pos = b.reshape(pos, vec![1, pg, pg, c])?;
    if pg != g {
        let t = b.nhwc_to_nchw(pos)?;
        let t = b.resize(t, [g, g], ResizeMode::Bicubic)?;
        pos = b.nchw_to_nhwc(t)?;
    }
    b.add(x, pos)
}

/// The BEiT bias `[heads, N, N]` for window blocks and for global blocks, each built once from
/// its shared table (only for the kinds some block uses).
struct SharedBiases {
    window: Option<Value>,
    global: Option<Value>,
}

fn shared_biases(b: &mut Builder, cfg: &ModelConfig) -> Result<SharedBiases> {
    let mut out = SharedBiases {
        window: None,
        global: None,
    };
    if cfg.rel_pos_kind() != RelPos::SharedBias {
        return Ok(out);
    }
    let any_global = (0..cfg.depth).any(|i| cfg.is_global(i));
    let any_window = (0..cfg.depth).any(|i| !cfg.is_global(i));
    let table = |b: &mut Builder, module: &str, side: usize| {
        b.scoped(module, |b| {
            let op = RelPosBias { window: [side, side] };
            // Zero init (BEiT trunc-normals with std 0.02; zeros is the paper's "zero-init"
            // ablation and what loading pre-trained tables overwrites anyway).
            let t = b.param(
                "relative_position_bias_table",
                vec![op.table_len(), cfg.num_heads],
                Init::Zeros,
            )?;
            b.op(op, &[t])
        })
    };
    if any_window {
        out.window = Some(table(b, "window_rel_pos_bias", cfg.window_size)?);
    }
    if any_global {
        out.global = Some(table(b, "global_rel_pos_bias", cfg.grid())?);
    }
    Ok(out)
}

/// One block (current scope `backbone.net.blocks.{i}`):
/// `x + dp(g1 * attn(norm1 x))`, then `x + dp(g2 * mlp(norm2 x))`.
fn block(b: &mut Builder, cfg: &ModelConfig, i: usize, x: Value, rel: RelPosTerm) -> Result<Value> {
    let c = cfg.embed_dim;
    let eps = cfg.norm_eps;
    let rate = cfg.drop_path_at(i);

    let h = b.layer_norm("norm1", x, 3, eps)?;
    let h = if cfg.is_global(i) {
        b.scoped("attn", |b| attention(b, h, cfg.num_heads, cfg.qkv_bias, rel))?
    } else {
        let (wins, layout) = window_partition(b, h, cfg.window_size)?;
        let a = b.scoped("attn", |b| attention(b, wins, cfg.num_heads, cfg.qkv_bias, rel))?;
        window_unpartition(b, a, layout)?
    };
    let h = residual_branch(b, cfg, h, "gamma_1", rate, drop_path_stream(i, 0))?;
    let x = b.add(x, h)?;

    let h = b.layer_norm("norm2", x, 3, eps)?;
    let h = b.scoped("mlp", |b| {
        let y = b.linear("fc1", h, cfg.mlp_hidden(), true)?;
        let y = b.scoped("act", |b| b.gelu(y))?;
        b.linear("fc2", y, c, true)
    })?;
    let h = residual_branch(b, cfg, h, "gamma_2", rate, drop_path_stream(i, 1))?;
    b.add(x, h)
}

/// The random stream of block `i`'s drop path on branch `branch` (0 attention, 1 MLP): one
/// independent per-sample draw per site and step.
pub(crate) fn drop_path_stream(i: usize, branch: u64) -> u64 {
    2 * i as u64 + branch
}

/// Layer scale (when configured) and drop path (when its rate is positive) on a branch. In
/// training mode drop path is timm's: the branch times a per-sample `DropPathMask` (0, or
/// `1 / (1 - rate)` with probability `1 - rate`) drawn from the seed on `stream`.
fn residual_branch(b: &mut Builder, cfg: &ModelConfig, h: Value, gamma: &str, rate: f64, stream: u64) -> Result<Value> {
    let mut h = h;
    if cfg.layer_scale {
        // Ones: an identity scale until pre-trained (BEiT) values are loaded.
        let g = b.param(gamma, vec![cfg.embed_dim], Init::Ones)?;
        h = b.binary(BinaryKind::Mul, h, g)?;
    }
    if rate > 0.0 {
        let seed = b.training.as_ref().map(|t| t.seed);
        h = b.scoped("drop_path", |b| match seed {
            None => b.op(DropPath { rate }, &[h]),
            Some(seed) => {
                let shape = b.shape(h);
                let batch = shape[0];
                let mask = b.op(DropPathMask { rate, stream, batch }, &[seed])?;
                let mut view = vec![1; shape.len()];
                view[0] = batch;
                let mask = b.reshape(mask, view)?;
                b.binary(BinaryKind::Mul, h, mask)
            }
        })?;
    }
    Ok(h)
}
