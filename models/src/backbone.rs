//! [`build_backbone`]: image in, pyramid p2..p6 out, for either family.

use vitdet_ir::{Graph, Value};

use crate::adapter_fpn::{adapter, fpn};
use crate::builder::{Builder, Result};
use crate::config::{Family, ModelConfig};
use crate::simple_pyramid::simple_pyramid;
use crate::vit::trunk;

/// Name of the graph input: the normalized, padded image `[B, 3, S, S]` f32.
pub const INPUT_NAME: &str = "image";
/// Names of the graph outputs, strides 4, 8, 16, 32, 64.
pub const OUTPUT_NAMES: [&str; 5] = ["p2", "p3", "p4", "p5", "p6"];
/// Strides of [`OUTPUT_NAMES`] w.r.t. the input image.
pub const OUTPUT_STRIDES: [usize; 5] = [4, 8, 16, 32, 64];

/// The backbone graph for batch size 1: input `image [1, 3, S, S]`, outputs `p2`..`p6`
/// (NCHW f32, `out_channels` channels). The config is validated first.
pub fn build_backbone(cfg: &ModelConfig) -> Result<Graph> {
    build_backbone_batched(cfg, 1)
}

/// [`build_backbone`] with input `image [batch, 3, S, S]`.
pub fn build_backbone_batched(cfg: &ModelConfig, batch: usize) -> Result<Graph> {
    cfg.validate()?;
    if batch == 0 {
        return Err(crate::ModelError::Invalid("batch size must be positive".into()));
    }
    let mut b = Builder::new();
    let image = b.input(INPUT_NAME, vec![batch, 3, cfg.image_size, cfg.image_size])?;
    let pyramid = pyramid(&mut b, cfg, image)?;
    let mut graph = b.finish();
    for (name, v) in OUTPUT_NAMES.iter().zip(pyramid) {
        graph.set_output(name, v);
    }
    Ok(graph)
}

/// Emits the backbone (scope `backbone`) on `image [B, 3, S, S]` and returns `[p2, .., p6]`.
pub(crate) fn pyramid(b: &mut Builder, cfg: &ModelConfig, image: Value) -> Result<Vec<Value>> {
    b.scoped("backbone", |b| {
        let blocks = b.scoped("net", |b| trunk(b, cfg, image))?;
        match cfg.family {
            Family::Vitdet => {
                let last = *blocks.last().expect("depth > 0");
                let x = b.scoped("net", |b| b.nhwc_to_nchw(last))?;
                simple_pyramid(b, cfg, x)
            }
            Family::Vit => {
                let taps = cfg.pyramid_taps();
                let mut maps: Vec<Value> = Vec::with_capacity(4);
                for t in taps {
                    maps.push(b.scoped("net", |b| b.nhwc_to_nchw(blocks[t]))?);
                }
                let c = adapter(b, cfg, [maps[0], maps[1], maps[2], maps[3]])?;
                fpn(b, cfg, c)
            }
        }
    })
}
