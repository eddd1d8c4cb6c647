//! detectron2's `SimpleFeaturePyramid` (vitdet family): p2..p5 from the last trunk map by
//! deconvolutions / max-pool, each followed by a 1x1 and a 3x3 conv with channel LayerNorm;
//! p6 by `LastLevelMaxPool`.

use vitdet_ir::Value;

use crate::builder::{Builder, Norm, Result};
use crate::config::ModelConfig;

/// Epsilon of detectron2's channel `LayerNorm` in the pyramid.
pub const PYRAMID_LN_EPS: f64 = 1e-6;

/// Builds the pyramid in the current scope (`backbone`) on the NCHW trunk output `x [B, C, g, g]`
/// and returns `[p2, p3, p4, p5, p6]`.
pub(crate) fn simple_pyramid(b: &mut Builder, cfg: &ModelConfig, x: Value) -> Result<Vec<Value>> {
    let c = cfg.embed_dim;
    let ln = Norm::ChannelLayerNorm { eps: PYRAMID_LN_EPS };
    // The shared tail: 1x1 conv + LN, 3x3 conv + LN, as children `first` and `first + 1`.
    let tail = |b: &mut Builder, y: Value, first: usize| -> Result<Value> {
        let y = b.conv_norm(&first.to_string(), y, cfg.out_channels, 1, ln)?;
        b.conv_norm(&(first + 1).to_string(), y, cfg.out_channels, 3, ln)
    };

    let p2 = b.scoped("simfp_2", |b| {
        let y = b.conv_transpose("0", x, c / 2, 2)?;
        let y = b.layer_norm("1", y, 1, PYRAMID_LN_EPS)?;
        let y = b.scoped("2", |b| b.gelu(y))?;
        let y = b.conv_transpose("3", y, c / 4, 2)?;
        tail(b, y, 4)
    })?;
    let p3 = b.scoped("simfp_3", |b| {
        let y = b.conv_transpose("0", x, c / 2, 2)?;
        tail(b, y, 1)
    })?;
    let p4 = b.scoped("simfp_4", |b| tail(b, x, 0))?;
    let p5 = b.scoped("simfp_5", |b| {
        let y = b.scoped("0", |b| b.max_pool(x, 2, 2))?;
        tail(b, y, 1)
    })?;
    let p6 = b.scoped("top_block", |b| b.max_pool(p5, 1, 2))?;
    Ok(vec![p2, p3, p4, p5, p6])
}
