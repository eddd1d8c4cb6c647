//! Training data: COCO-format datasets, a synthetic instance-segmentation dataset, and
//! detectron2 ViTDet's large-scale-jitter augmentation with per-iteration determinism.
//!
//! * [`dataset`]: [`CocoDataset::load`] reads a COCO instances JSON and its image folder
//!   (polygons, compressed and uncompressed RLE), maps category ids to contiguous classes and
//!   decodes an image's ground truth into [`GtInstance`]s.
//! * [`synthetic`]: [`synthetic::generate`] writes a dataset of colored shapes with exact masks in
//!   COCO layout (`vitdet data synth`).
//! * [`lsj`]: flip, `ResizeScale(0.1, 2.0)` and `FixedSizeCrop` as detectron2's ViTDet trains,
//!   plus the plain resize used for validation; both produce a normalized, zero-padded
//!   [`TrainSample`].
//! * [`batch`]: [`TrainLoader`] picks the images of any iteration (shuffled epochs) and their
//!   augmentation from counter-based random streams ([`rng`]), so iteration `i` can be rebuilt
//!   alone, bit for bit, when training resumes; [`collate`] stacks samples into tensors.

pub mod batch;
pub mod dataset;
pub mod lsj;
pub mod rng;
pub mod synthetic;

use std::path::PathBuf;

pub use batch::{collate, Batch, TrainLoader, TrainSampler};
pub use dataset::{CocoDataset, TrainFilterReport};
pub use lsj::{eval_sample, EvalSample, LsjConfig, LsjParams, TrainSample};

/// One ground-truth instance of an image: its contiguous class index and its mask (row-major,
/// the image's `height x width`, 1 inside and 0 outside).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GtInstance {
    pub class: usize,
    pub mask: Vec<u8>,
}

/// Tight box of a row-major `height x width` mask as `(x0, y0, x1, y1)` with exclusive ends
/// (detectron2's `BitMasks.get_bounding_boxes`: `x1 = last column + 1`), or `None` when the
/// mask is empty.
pub fn mask_box(mask: &[u8], height: usize, width: usize) -> Option<(usize, usize, usize, usize)> {
    debug_assert_eq!(mask.len(), height * width);
    let (mut x0, mut y0, mut x1, mut y1) = (usize::MAX, usize::MAX, 0, 0);
    for y in 0..height {
        let row = &mask[y * width..(y + 1) * width];
        let Some(first) = row.iter().position(|&v| v != 0) else {
            continue;
        };
        let last = row.iter().rposition(|&v| v != 0).expect("row has a set pixel");
        x0 = x0.min(first);
        x1 = x1.max(last + 1);
        y0 = y0.min(y);
        y1 = y + 1;
    }
    (x0 != usize::MAX).then_some((x0, y0, x1, y1))
}

/// `vitdet data ...` subcommands.
#[derive(clap::Subcommand)]
pub enum DataCommand {
    /// Write a synthetic instance-segmentation dataset (shapes with exact masks) in COCO layout:
    /// DIR/{train,val}/*.png and DIR/annotations/instances_{train,val}.json.
    Synth {
        #[arg(long)]
        out: PathBuf,
        /// Training images.
        #[arg(long, default_value_t = 500)]
        train: usize,
        /// Validation images.
        #[arg(long, default_value_t = 100)]
        val: usize,
        /// Image side in pixels (the tiny presets take 128).
        #[arg(long, default_value_t = 128)]
        size: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Runs a `vitdet data` subcommand.
pub fn run_cli(command: DataCommand) -> anyhow::Result<()> {
    match command {
        DataCommand::Synth {
            out,
            train,
            val,
            size,
            seed,
            json,
        } => {
            let summary = synthetic::generate(&synthetic::SynthOptions {
                out,
                train,
                val,
                size,
                seed,
            })?;
            if json {
                println!("{}", serde_json::to_string_pretty(&summary)?);
            } else {
                print!("{}", summary.to_text());
            }
        }
    }
    Ok(())
}
