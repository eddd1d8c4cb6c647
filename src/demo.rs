//! `vitdet demo`: the whole pipeline on a CPU in minutes, with nothing to download. It writes a
//! synthetic shapes dataset, compiles and trains a tiny detector on it, evaluates it on the
//! held-out split (COCO AP and TIDE) and draws its detections on a held-out image.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use vitdet_models::{ModelConfig, TrainingConfig};

use crate::data::synthetic::{generate, SynthOptions};
use crate::detect::{write_png, Runner};
use crate::detections::{draw, Detection};
use crate::train::cli::{describe_losses, Bar};
use crate::train::validate::evaluate_split;
use crate::train::{self, TrainOptions};
use image::RgbImage;

/// `vitdet demo`.
#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Output folder: data/, run/, eval.json, detections.png.
    #[arg(long, default_value = "vitdet-demo")]
    pub out: PathBuf,
    /// Model preset or config file.
    #[arg(long, default_value = "vitdet-tiny")]
    pub model: String,
    /// Training iterations (one image each).
    #[arg(long, default_value_t = 6500)]
    pub iters: u64,
    #[arg(long, default_value_t = 400)]
    pub train_images: usize,
    #[arg(long, default_value_t = 50)]
    pub val_images: usize,
    #[arg(long, default_value_t = 2e-3)]
    pub lr: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Large-scale jitter's scale range: narrower than detectron2's 0.1..2.0, which at 128
    /// pixels shrinks most shapes below the smallest anchor.
    #[arg(skip = [0.5, 1.5])]
    pub scale_range: [f64; 2],
    /// RoIs sampled per image for the heads (detectron2: 512).
    #[arg(long, default_value_t = 128)]
    pub roi_batch: usize,
}

/// Runs the demo; prints what each stage did.
pub fn run(args: DemoArgs) -> Result<()> {
    let model = ModelConfig::load(&args.model)?;
    let data = args.out.join("data");
    let run_dir = args.out.join("run");
    if run_dir.exists() {
        anyhow::bail!(
            "{} already holds a demo run; remove it or pass another --out",
            run_dir.display()
        );
    }
    println!("1/4 writing a synthetic dataset to {}", data.display());
    let synth = generate(&SynthOptions {
        out: data.clone(),
        train: args.train_images,
        val: args.val_images,
        size: model.image_size,
        seed: args.seed,
    })?;
    for s in &synth.splits {
        println!("    {:?}: {} images, {} instances", s.split, s.images, s.instances);
    }

    println!(
        "2/4 compiling and training {} for {} iterations",
        args.model, args.iters
    );
    let options = TrainOptions {
        model: model.clone(),
        data: data.clone(),
        weights: None,
        iterations: args.iters,
        batch_size: 1,
        base_lr: args.lr,
        weight_decay: 0.1,
        // Layer-wise decay protects pre-trained blocks; trained from scratch, every block learns
        // at the full rate.
        lr_decay: Some(1.0),
        warmup_iters: (args.iters / 20).max(1).min(args.iters),
        seed: args.seed,
        checkpoint_period: 500,
        max_instances: 16,
        scale_range: args.scale_range,
        heads: TrainingConfig {
            roi_batch_size_per_image: args.roi_batch,
            ..TrainingConfig::default()
        },
        step: Default::default(),
    };
    let summary = train::train(options, &run_dir, None, &vitdet_runtime::Device::Cpu, &mut Bar::new())?;
    println!(
        "    {} iterations in {:.0} s ({:.1} it/s)",
        summary.iterations,
        summary.seconds,
        summary.iterations as f64 / summary.seconds.max(1e-9)
    );
    if let Some(last) = &summary.last {
        println!("    last iteration: {}", describe_losses(last));
    }

    println!("3/4 evaluating on the held-out split");
    let eval = evaluate_split(
        &model,
        &summary.checkpoint,
        &data,
        "val",
        &Runner::cpu(),
        &mut |_, _| {},
    )?;
    print!("{}", indent(&eval.report.to_text()));
    let eval_path = args.out.join("eval.json");
    write_json(&eval_path, &serde_json::to_value(&eval.report)?)?;
    println!(
        "    box AP {:.3}, AP50 {:.3}; mask AP {:.3} ({} images in {:.1} s) -> {}",
        eval.report.bbox[0],
        eval.report.bbox[1],
        eval.report.segm.map(|s| s[0]).unwrap_or(f64::NAN),
        eval.dataset.images.len(),
        eval.seconds,
        eval_path.display()
    );

    println!("4/4 drawing detections on a held-out image");
    let picture = args.out.join("detections.png");
    let rgb = eval.dataset.load_image(0)?;
    let dets: Vec<_> = eval.detections[0].iter().filter(|d| d.score >= 0.5).cloned().collect();
    let (rgb, dets) = enlarge(&rgb, &dets, PICTURE_SCALE);
    write_png(&picture, &draw(&rgb, &dets, &eval.categories))?;
    println!(
        "    {} detections with score >= 0.5 -> {}",
        dets.len(),
        picture.display()
    );
    Ok(())
}

/// The demo's images are small (128 px): the picture is drawn at this multiple so labels fit.
const PICTURE_SCALE: u32 = 4;

/// `image` and `dets` enlarged `k` times (nearest neighbour, so masks stay exact).
fn enlarge(image: &RgbImage, dets: &[Detection], k: u32) -> (RgbImage, Vec<Detection>) {
    let (w, h) = (image.width(), image.height());
    let big = image::imageops::resize(image, w * k, h * k, image::imageops::FilterType::Nearest);
    let (bw, k) = ((w * k) as usize, k as usize);
    let dets = dets
        .iter()
        .map(|d| Detection {
            bbox: d.bbox.map(|v| v * k as f32),
            mask: d.mask.as_ref().map(|m| {
                let mut out = vec![0u8; bw * h as usize * k];
                for (i, v) in out.iter_mut().enumerate() {
                    let (y, x) = (i / bw / k, (i % bw) / k);
                    *v = m[y * w as usize + x];
                }
                out
            }),
            ..d.clone()
        })
        .collect();
    (big, dets)
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("    {l}\n")).collect()
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    vitdet_runtime::write_atomic(path, text.as_bytes()).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enlarge_scales_boxes_and_masks() {
        let img = RgbImage::from_fn(3, 2, |x, y| image::Rgb([x as u8, y as u8, 0]));
        let det = Detection {
            bbox: [1.0, 0.0, 2.0, 1.0],
            score: 0.9,
            class: 0,
            mask: Some(vec![0, 1, 0, 0, 0, 1]),
        };
        let (big, dets) = enlarge(&img, &[det], 2);
        assert_eq!((big.width(), big.height()), (6, 4));
        assert_eq!(big.get_pixel(5, 3).0, [2, 1, 0]);
        assert_eq!(dets[0].bbox, [2.0, 0.0, 4.0, 2.0]);
        let m = dets[0].mask.as_ref().unwrap();
        let on: Vec<usize> = (0..m.len()).filter(|&i| m[i] == 1).collect();
        // (1, 0) -> x 2..4, y 0..2; (2, 1) -> x 4..6, y 2..4; rows of 6.
        assert_eq!(on, vec![2, 3, 8, 9, 16, 17, 22, 23]);
    }
}
