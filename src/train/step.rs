//! Running the compiled training step ([`crate::compile::compile_train`]: fusion, autocast,
//! autodiff, checkpointing, schedule) over a batch on a device: one graph run per image,
//! gradients averaged.

use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};
use vitdet_models::{ModelConfig, TrainingConfig, SAMPLE_STAT_NAMES};
use vitdet_passes::autodiff::{BACKWARD_SCOPE, GRAD_PREFIX};
use vitdet_passes::{Precision, RECOMPUTE_SCOPE};
use vitdet_runtime::{CandleDType as DType, Device, Tensor};
use vitdet_runtime::{ParamStore, Program};

use super::StepOptions;
use crate::compile::{self, compile_train, LOSS, LOSS_SCALE_INPUT};
use crate::data::rng::{Domain, Stream};
use crate::data::{collate, TrainSample};
use crate::report::add_times;

/// Prefix of the outputs carrying new values of buffers (BatchNorm running statistics).
pub const UPDATE_PREFIX: &str = "update/";

/// A training step compiled once and run every iteration.
pub struct TrainStep {
    compiled: compile::TrainStep,
    /// Loss outputs (`loss` and its terms), in graph order.
    losses: Vec<String>,
    /// Sampling statistics among the outputs ([`SAMPLE_STAT_NAMES`]).
    sample_stats: Vec<String>,
}

/// One iteration's losses (averaged over the batch), gradients and buffer updates.
pub struct StepResult {
    pub losses: BTreeMap<String, f64>,
    /// Sampled anchors and RoIs per image (detectron2's event names), averaged over the batch.
    pub sample_stats: BTreeMap<String, f64>,
    /// Averaged over the batch; with a loss scale, still multiplied by it.
    pub gradients: Vec<(String, Tensor)>,
    pub buffer_updates: Vec<(String, Tensor)>,
    /// Ground-truth instances beyond the graph's capacity, left out.
    pub truncated: usize,
    /// Kernel time per op name over the batch.
    pub op_seconds: BTreeMap<String, f64>,
    /// The same time per scope (`RunOutput::scope_seconds`).
    pub scope_seconds: BTreeMap<String, f64>,
}

impl StepResult {
    /// Describes the first non-finite loss, if any.
    pub fn non_finite_loss(&self) -> Option<String> {
        let (name, v) = self.losses.iter().find(|(_, v)| !v.is_finite())?;
        Some(format!("loss `{name}` is {v}"))
    }

    /// Describes the non-finite gradients, if any.
    pub fn non_finite_gradients(&self) -> Result<Option<String>> {
        let bad = vitdet_runtime::optim::non_finite_gradients(&self.gradients)?;
        Ok(bad
            .first()
            .map(|first| format!("non-finite gradients in {} tensors (first: `{first}`)", bad.len())))
    }
}

/// Node counts of the compiled graph, by role.
pub struct NodeCounts {
    pub forward: usize,
    pub backward: usize,
    pub recompute: usize,
}

impl TrainStep {
    /// Compiles the step of `model` (heads trained with `heads`) for its square input size with
    /// room for `max_instances` ground-truth instances and `batch` images per optimizer step.
    /// Float16 steps take a loss scale (see [`TrainStep::run_batch`]).
    pub fn compile(
        model: &ModelConfig,
        max_instances: usize,
        heads: &TrainingConfig,
        batch: usize,
        options: &StepOptions,
    ) -> Result<Self> {
        let precision = options.precision()?;
        let compiled = compile_train(
            model.clone(),
            &compile::TrainOptions {
                max_instances,
                attention: None,
                fuse_attention: options.fuse_attention,
                checkpoint: options.checkpoint,
                budget_bytes: options.budget_bytes,
                batch,
                precision,
                heads: heads.clone(),
                loss_scale_input: precision == Precision::F16,
            },
        )?;
        if !compiled.unreached.is_empty() {
            bail!(
                "the loss does not depend on {} trainable parameters (first: `{}`)",
                compiled.unreached.len(),
                compiled.unreached[0]
            );
        }
        debug_assert!(compiled.gradients.iter().all(|(_, o)| o.starts_with(GRAD_PREFIX)));
        let outputs = |keep: &dyn Fn(&str) -> bool| -> Vec<String> {
            let names = compiled.graph.outputs.iter().map(|o| o.name.as_str());
            names.filter(|n| keep(n)).map(str::to_string).collect()
        };
        let losses = outputs(&|n| n.starts_with(LOSS));
        let sample_stats = outputs(&|n| SAMPLE_STAT_NAMES.contains(&n));
        Ok(TrainStep {
            compiled,
            losses,
            sample_stats,
        })
    }

    /// The step's graph and order, checked once for the steps [`TrainStep::run_batch`] runs.
    pub fn program(&self) -> Result<Program<'_>> {
        Program::new(&self.compiled.graph, &self.compiled.order).context("checking the training step")
    }

    /// The compiled step: graph, order, memory plan and the compiler's decisions.
    pub fn compiled(&self) -> &compile::TrainStep {
        &self.compiled
    }

    pub fn graph(&self) -> &vitdet_ir::Graph {
        &self.compiled.graph
    }

    pub fn node_counts(&self) -> NodeCounts {
        let g = &self.compiled.graph;
        let mut c = NodeCounts {
            forward: 0,
            backward: 0,
            recompute: 0,
        };
        for n in g.graph.node_indices() {
            let scope = &g.node(n).scope;
            if scope.starts_with(BACKWARD_SCOPE) {
                c.backward += 1;
            } else if scope.starts_with(RECOMPUTE_SCOPE) {
                c.recompute += 1;
            } else {
                c.forward += 1;
            }
        }
        c
    }

    pub fn gradients(&self) -> &[(String, String)] {
        &self.compiled.gradients
    }

    /// Whether [`TrainStep::run_batch`] needs a loss scale (float16).
    pub fn takes_loss_scale(&self) -> bool {
        self.compiled.loss_scale_input
    }

    /// The one-element `value` shaped as the graph's input `name` declares (host memory; the
    /// executor places it on the run's device).
    fn scalar_input(&self, name: &str, value: Tensor) -> Result<Tensor> {
        let (_, _, ty) = self
            .compiled
            .graph
            .inputs()
            .find(|(_, n, _)| *n == name)
            .with_context(|| format!("the training graph has no `{name}` input"))?;
        Ok(value.reshape(ty.shape.as_slice())?)
    }

    /// The graph's `seed` input for image `slot` of `iteration`.
    fn seed_tensor(&self, seed: u64, iteration: u64, slot: usize) -> Result<Tensor> {
        let value = Stream::new(seed, Domain::Model, iteration, slot as u64).next_u64() as i64;
        self.scalar_input("seed", Tensor::new(value, &Device::Cpu)?)
    }

    /// Runs the step on every sample on `device` (where `params` live) and averages losses and
    /// gradients over them. `program` is this step's ([`TrainStep::program`]). A step compiled
    /// for float16 takes the `loss_scale` its gradients come out multiplied by; others take
    /// `None`.
    #[allow(clippy::too_many_arguments)]
    pub fn run_batch(
        &self,
        program: &Program,
        params: &ParamStore,
        samples: &[TrainSample],
        seed: u64,
        iteration: u64,
        max_instances: usize,
        loss_scale: Option<f32>,
        device: &Device,
    ) -> Result<StepResult> {
        if !std::ptr::eq(program.graph(), &self.compiled.graph) {
            bail!("run_batch was given the program of another graph");
        }
        let scale = match (loss_scale, self.takes_loss_scale()) {
            (Some(s), true) => Some(self.scalar_input(LOSS_SCALE_INPUT, Tensor::new(s, &Device::Cpu)?)?),
            (None, false) => None,
            (Some(_), false) => bail!("this training step was compiled without a loss-scale input"),
            (None, true) => bail!("this training step takes a loss scale (float16) and none was given"),
        };
        let batch = collate(samples, max_instances)?;
        let image_size = self.compiled.config.image_size;
        if batch.images.dims()[2] != image_size {
            bail!(
                "samples are {}x{}, the model takes {}",
                batch.images.dims()[2],
                batch.images.dims()[3],
                image_size
            );
        }
        let gradients = &self.compiled.gradients;
        let n = samples.len();
        let mut losses: BTreeMap<String, f64> = BTreeMap::new();
        let mut sample_stats: BTreeMap<String, f64> = BTreeMap::new();
        let mut grads: Vec<Option<Tensor>> = vec![None; gradients.len()];
        let mut updates: BTreeMap<String, Tensor> = BTreeMap::new();
        let mut op_seconds: BTreeMap<String, f64> = BTreeMap::new();
        let mut scope_seconds: BTreeMap<String, f64> = BTreeMap::new();
        for b in 0..n {
            let mut inputs = vec![
                ("image", batch.images.narrow(0, b, 1)?),
                ("gt_boxes", batch.gt_boxes.get(b)?),
                ("gt_classes", batch.gt_classes.get(b)?),
                ("gt_masks", batch.gt_masks.get(b)?),
                ("gt_valid", batch.gt_valid.get(b)?),
                ("seed", self.seed_tensor(seed, iteration, b)?),
            ];
            if let Some(s) = &scale {
                inputs.push((LOSS_SCALE_INPUT, s.clone()));
            }
            let out = program
                .run(params, &inputs, device)
                .with_context(|| format!("iteration {}, image {b}", iteration + 1))?;
            add_times(&mut op_seconds, &out.op_seconds);
            add_times(&mut scope_seconds, &out.scope_seconds);
            for (names, into) in [(&self.losses, &mut losses), (&self.sample_stats, &mut sample_stats)] {
                for name in names {
                    let v = out.get(name).expect("named outputs exist").to_dtype(DType::F64)?;
                    *into.entry(name.clone()).or_default() += v.flatten_all()?.to_vec1::<f64>()?[0] / n as f64;
                }
            }
            for (slot, (_, output)) in grads.iter_mut().zip(gradients) {
                let g = out.get(output).expect("gradient outputs exist");
                *slot = Some(match slot.take() {
                    None => g.clone(),
                    Some(acc) => (acc + g)?,
                });
            }
            for (name, t) in &out.outputs {
                if let Some(buffer) = name.strip_prefix(UPDATE_PREFIX) {
                    let t = (t / n as f64)?;
                    let acc = match updates.remove(buffer) {
                        None => t,
                        Some(acc) => (acc + t)?,
                    };
                    updates.insert(buffer.to_string(), acc);
                }
            }
        }
        let mut averaged = Vec::with_capacity(grads.len());
        for (g, (param, _)) in grads.into_iter().zip(gradients) {
            let g = g.expect("at least one sample");
            let g = if n > 1 { (g / n as f64)? } else { g };
            averaged.push((param.clone(), g));
        }
        Ok(StepResult {
            losses,
            sample_stats,
            gradients: averaged,
            buffer_updates: updates.into_iter().collect(),
            truncated: batch.truncated,
            op_seconds,
            scope_seconds,
        })
    }
}
