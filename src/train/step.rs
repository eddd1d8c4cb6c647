//! The compiled training step: the training forward graph, its gradient graph and schedule,
//! and running it over a batch (one graph run per image, gradients averaged).

use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};
use vitdet_ir::{Graph, NodeIndex};
use vitdet_models::{ModelConfig, TrainingConfig};
use vitdet_passes::autodiff::GRAD_PREFIX;
use vitdet_runtime::{run_with_order, ParamStore};
use vitdet_runtime::{CandleDType as DType, Device, Tensor};

use crate::data::rng::{Domain, Stream};
use crate::data::{collate, TrainSample};

/// Name of the differentiated output (the sum of the loss terms).
pub const LOSS: &str = "loss";
/// Prefix of the outputs carrying new values of buffers (BatchNorm running statistics).
pub const UPDATE_PREFIX: &str = "update/";

/// A training step compiled once and run every iteration.
pub struct TrainStep {
    graph: Graph,
    order: Vec<NodeIndex>,
    forward_nodes: usize,
    /// `(parameter, gradient output)`.
    gradients: Vec<(String, String)>,
    /// Loss outputs (`loss` and its terms), in graph order.
    losses: Vec<String>,
    image_size: usize,
}

/// One iteration's losses (averaged over the batch), gradients and buffer updates.
pub struct StepResult {
    pub losses: BTreeMap<String, f64>,
    pub gradients: Vec<(String, Tensor)>,
    pub buffer_updates: Vec<(String, Tensor)>,
    /// Ground-truth instances beyond the graph's capacity, left out.
    pub truncated: usize,
    /// Kernel time per op name over the batch.
    pub op_seconds: BTreeMap<String, f64>,
}

impl StepResult {
    /// Describes the first non-finite loss or gradient, if any.
    pub fn non_finite(&self) -> Option<String> {
        if let Some((name, v)) = self.losses.iter().find(|(_, v)| !v.is_finite()) {
            return Some(format!("loss `{name}` is {v}"));
        }
        match vitdet_runtime::optim::non_finite_gradients(&self.gradients) {
            Ok(bad) if bad.is_empty() => None,
            Ok(bad) => Some(format!(
                "non-finite gradients in {} tensors (first: `{}`)",
                bad.len(),
                bad[0]
            )),
            Err(e) => Some(format!("cannot check gradients: {e}")),
        }
    }
}

impl TrainStep {
    /// Builds the training forward graph of `model` (heads trained with `heads`) for its square
    /// input size with room for `max_instances` ground-truth instances, differentiates its
    /// `loss` and schedules it.
    pub fn compile(model: &ModelConfig, max_instances: usize, heads: &TrainingConfig) -> Result<Self> {
        let s = model.image_size;
        let forward = vitdet_models::build_detector_training_with(model, [s, s], max_instances, heads)
            .context("building the training graph")?;
        let diff = vitdet_passes::differentiate(&forward, LOSS).context("differentiating the training graph")?;
        if !diff.unreached.is_empty() {
            bail!(
                "the loss does not depend on {} trainable parameters (first: `{}`)",
                diff.unreached.len(),
                diff.unreached[0]
            );
        }
        let order = vitdet_passes::schedule(&diff.graph)?;
        let losses = forward
            .outputs
            .iter()
            .filter(|o| o.name.starts_with("loss"))
            .map(|o| o.name.clone())
            .collect();
        Ok(TrainStep {
            graph: diff.graph,
            order,
            forward_nodes: diff.forward_nodes,
            gradients: diff.gradients,
            losses,
            image_size: s,
        })
    }

    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    pub fn forward_nodes(&self) -> usize {
        self.forward_nodes
    }

    pub fn backward_nodes(&self) -> usize {
        self.graph.graph.node_count() - self.forward_nodes
    }

    pub fn gradients(&self) -> &[(String, String)] {
        &self.gradients
    }

    /// The graph's `seed` input for image `slot` of `iteration`.
    fn seed_tensor(&self, seed: u64, iteration: u64, slot: usize) -> Result<Tensor> {
        let value = Stream::new(seed, Domain::Model, iteration, slot as u64).next_u64() as i64;
        let (_, _, ty) = self
            .graph
            .inputs()
            .find(|(_, name, _)| *name == "seed")
            .context("the training graph has no `seed` input")?;
        Ok(Tensor::from_vec(vec![value], ty.shape.as_slice(), &Device::Cpu)?)
    }

    /// Runs the step on every sample and averages losses and gradients over them.
    pub fn run_batch(
        &self,
        params: &ParamStore,
        samples: &[TrainSample],
        seed: u64,
        iteration: u64,
        max_instances: usize,
    ) -> Result<StepResult> {
        let batch = collate(samples, max_instances)?;
        if batch.images.dims()[2] != self.image_size {
            bail!(
                "samples are {}x{}, the model takes {}",
                batch.images.dims()[2],
                batch.images.dims()[3],
                self.image_size
            );
        }
        let n = samples.len();
        let mut losses: BTreeMap<String, f64> = BTreeMap::new();
        let mut grads: Vec<Option<Tensor>> = vec![None; self.gradients.len()];
        let mut updates: BTreeMap<String, Tensor> = BTreeMap::new();
        let mut op_seconds: BTreeMap<String, f64> = BTreeMap::new();
        for b in 0..n {
            let inputs = [
                ("image", batch.images.narrow(0, b, 1)?),
                ("gt_boxes", batch.gt_boxes.get(b)?),
                ("gt_classes", batch.gt_classes.get(b)?),
                ("gt_masks", batch.gt_masks.get(b)?),
                ("gt_valid", batch.gt_valid.get(b)?),
                ("seed", self.seed_tensor(seed, iteration, b)?),
            ];
            let out = run_with_order(&self.graph, params, &inputs, &Device::Cpu, &self.order)
                .with_context(|| format!("iteration {}, image {b}", iteration + 1))?;
            for (op, t) in &out.op_seconds {
                *op_seconds.entry(op.clone()).or_default() += t;
            }
            for name in &self.losses {
                let v = out.get(name).expect("loss outputs exist").to_dtype(DType::F64)?;
                *losses.entry(name.clone()).or_default() += v.flatten_all()?.to_vec1::<f64>()?[0] / n as f64;
            }
            for (slot, (_, output)) in grads.iter_mut().zip(&self.gradients) {
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
        let mut gradients = Vec::with_capacity(grads.len());
        for (g, (param, _)) in grads.into_iter().zip(&self.gradients) {
            let g = g.expect("at least one sample");
            let g = if n > 1 { (g / n as f64)? } else { g };
            gradients.push((param.clone(), g));
        }
        debug_assert!(self.gradients.iter().all(|(_, o)| o.starts_with(GRAD_PREFIX)));
        Ok(StepResult {
            losses,
            gradients,
            buffer_updates: updates.into_iter().collect(),
            truncated: batch.truncated,
            op_seconds,
        })
    }
}
