//! The training input stream: which images each iteration takes (shuffled epochs, as
//! detectron2's `TrainingSampler`), their augmentation, and batching into static-shape tensors.
//!
//! Every random choice is a pure function of `(seed, iteration, slot)` through counter-based
//! streams ([`super::rng`]): epoch `e`'s order is a Fisher-Yates shuffle drawn from the stream
//! `(seed, Sampler, e)`, and slot `j` of iteration `i` is augmented from `(seed, Lsj, i, j)`.
//! Nothing depends on the iterations before, so a resumed run rebuilds iteration `i` exactly.

use anyhow::{bail, Context, Result};
use vitdet_runtime::{Device, Tensor};

use super::dataset::{CocoDataset, TrainFilterReport};
use super::lsj::{LsjConfig, TrainSample};
use super::rng::{Domain, Stream};

/// An endless sequence of indices `0..len`: each epoch a fresh permutation.
#[derive(Clone, Debug)]
pub struct TrainSampler {
    len: usize,
    seed: u64,
}

impl TrainSampler {
    pub fn new(len: usize, seed: u64) -> Result<Self> {
        if len == 0 {
            bail!("cannot sample from an empty training set");
        }
        Ok(TrainSampler { len, seed })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Epoch `epoch`'s order of `0..len` (Fisher-Yates).
    pub fn permutation(&self, epoch: u64) -> Vec<usize> {
        let mut rng = Stream::new(self.seed, Domain::Sampler, epoch, 0);
        let mut p: Vec<usize> = (0..self.len).collect();
        for i in (1..self.len).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            p.swap(i, j);
        }
        p
    }

    /// Positions `start .. start + count` of the endless sequence (epochs concatenated).
    pub fn indices(&self, start: u64, count: usize) -> Vec<usize> {
        let n = self.len as u64;
        let mut out = Vec::with_capacity(count);
        let mut cached: Option<(u64, Vec<usize>)> = None;
        for pos in start..start + count as u64 {
            let epoch = pos / n;
            if cached.as_ref().map(|c| c.0) != Some(epoch) {
                cached = Some((epoch, self.permutation(epoch)));
            }
            out.push(cached.as_ref().expect("just set").1[(pos % n) as usize]);
        }
        out
    }
}

/// Augmented training batches from a COCO dataset.
pub struct TrainLoader {
    dataset: CocoDataset,
    /// Dataset indices of the images used for training.
    images: Vec<usize>,
    report: TrainFilterReport,
    sampler: TrainSampler,
    lsj: LsjConfig,
    batch_size: usize,
    seed: u64,
}

impl TrainLoader {
    /// Uses the dataset's training images ([`CocoDataset::training_images`]: crowd
    /// annotations dropped, images without any other annotation skipped).
    pub fn new(dataset: CocoDataset, lsj: LsjConfig, batch_size: usize, seed: u64) -> Result<Self> {
        lsj.validate()?;
        if batch_size == 0 {
            bail!("batch size must be positive");
        }
        let (images, report) = dataset.training_images();
        let sampler = TrainSampler::new(images.len(), seed).with_context(|| {
            format!(
                "{} has no image with a non-crowd annotation",
                dataset.source().display()
            )
        })?;
        Ok(TrainLoader {
            dataset,
            images,
            report,
            sampler,
            lsj,
            batch_size,
            seed,
        })
    }

    pub fn dataset(&self) -> &CocoDataset {
        &self.dataset
    }

    /// What was left out of training and why.
    pub fn report(&self) -> &TrainFilterReport {
        &self.report
    }

    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    /// Training images per epoch.
    pub fn epoch_len(&self) -> usize {
        self.images.len()
    }

    /// Dataset image indices of iteration `iteration`'s batch.
    pub fn batch_images(&self, iteration: u64) -> Vec<usize> {
        let start = iteration * self.batch_size as u64;
        self.sampler
            .indices(start, self.batch_size)
            .into_iter()
            .map(|k| self.images[k])
            .collect()
    }

    /// Slot `slot` of iteration `iteration`, loaded and augmented.
    pub fn sample(&self, iteration: u64, slot: usize) -> Result<TrainSample> {
        if slot >= self.batch_size {
            bail!("slot {slot} is outside the batch of {}", self.batch_size);
        }
        let image = self.batch_images(iteration)[slot];
        self.augment(image, iteration, slot)
    }

    /// The whole batch of iteration `iteration`.
    pub fn samples(&self, iteration: u64) -> Result<Vec<TrainSample>> {
        self.batch_images(iteration)
            .into_iter()
            .enumerate()
            .map(|(slot, image)| self.augment(image, iteration, slot))
            .collect()
    }

    fn augment(&self, index: usize, iteration: u64, slot: usize) -> Result<TrainSample> {
        let img = self.dataset.load_image(index)?;
        let instances = self.dataset.instances(index)?;
        let mut rng = Stream::new(self.seed, Domain::Lsj, iteration, slot as u64);
        let params = self.lsj.draw(&mut rng);
        self.lsj
            .apply(&img, &instances, &params)
            .with_context(|| format!("augmenting {}", self.dataset.image_path(index).display()))
    }
}

/// Samples stacked into static-shape tensors, ground truth padded to `G` instances (the
/// layout the training-target ops take).
#[derive(Clone, Debug)]
pub struct Batch {
    /// `f32 [B, 3, S, S]`.
    pub images: Tensor,
    /// Valid `[h, w]` of each image.
    pub image_hw: Vec<[usize; 2]>,
    /// `f32 [B, G, 4]` xyxy, zero in padding rows.
    pub gt_boxes: Tensor,
    /// `i64 [B, G]` contiguous class indices, zero in padding rows.
    pub gt_classes: Tensor,
    /// `u8 [B, G, S, S]`.
    pub gt_masks: Tensor,
    /// `u8 [B, G]`: 1 for a real instance.
    pub gt_valid: Tensor,
    /// Real instances per image (after truncation to `G`).
    pub num_instances: Vec<usize>,
    /// Instances beyond `G` that were left out (the first `G` of each image are kept).
    pub truncated: usize,
}

/// Stacks samples of one input size; each image keeps its first `max_instances` instances.
pub fn collate(samples: &[TrainSample], max_instances: usize) -> Result<Batch> {
    let Some(first) = samples.first() else {
        bail!("cannot collate an empty batch");
    };
    let dims = first.image.dims().to_vec();
    let [3, s, s2] = dims[..] else {
        bail!("sample images must be [3, S, S], found {dims:?}");
    };
    if s != s2 {
        bail!("sample images must be square, found {dims:?}");
    }
    let (b, g) = (samples.len(), max_instances);
    let mut boxes = vec![0f32; b * g * 4];
    let mut classes = vec![0i64; b * g];
    let mut masks = vec![0u8; b * g * s * s];
    let mut valid = vec![0u8; b * g];
    let mut num_instances = Vec::with_capacity(b);
    let mut truncated = 0;
    let mut images = Vec::with_capacity(b);
    for (i, smp) in samples.iter().enumerate() {
        if smp.image.dims() != dims.as_slice() {
            bail!(
                "sample {i} has image shape {:?}, sample 0 has {dims:?}",
                smp.image.dims()
            );
        }
        let n = smp.classes.len();
        if smp.boxes.len() != n || smp.masks.len() != n {
            bail!(
                "sample {i}: {} classes, {} boxes, {} masks",
                n,
                smp.boxes.len(),
                smp.masks.len()
            );
        }
        let keep = n.min(g);
        truncated += n - keep;
        for k in 0..keep {
            if smp.masks[k].len() != s * s {
                bail!("sample {i}: mask {k} has {} pixels, not {s}x{s}", smp.masks[k].len());
            }
            let row = i * g + k;
            boxes[row * 4..row * 4 + 4].copy_from_slice(&smp.boxes[k]);
            classes[row] = smp.classes[k] as i64;
            masks[row * s * s..(row + 1) * s * s].copy_from_slice(&smp.masks[k]);
            valid[row] = 1;
        }
        num_instances.push(keep);
        images.push(smp.image.unsqueeze(0)?);
    }
    let dev = Device::Cpu;
    Ok(Batch {
        images: Tensor::cat(&images, 0)?,
        image_hw: samples.iter().map(|s| s.image_hw).collect(),
        gt_boxes: Tensor::from_vec(boxes, (b, g, 4), &dev)?,
        gt_classes: Tensor::from_vec(classes, (b, g), &dev)?,
        gt_masks: Tensor::from_vec(masks, (b, g, s, s), &dev)?,
        gt_valid: Tensor::from_vec(valid, (b, g), &dev)?,
        num_instances,
        truncated,
    })
}
