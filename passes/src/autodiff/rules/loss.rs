//! Losses: each has a fused gradient op taking the loss's inputs plus `dloss`. Targets, labels,
//! weights and counts get no gradient.

use vitdet_ir::ops::{SigmoidBceLossGrad, SmoothL1LossGrad, SoftmaxCrossEntropyLossGrad};
use vitdet_ir::{Op, Value};

use super::{Ctx, Grads};

pub(super) fn loss(ctx: &mut Ctx, op: &Op, dy: Value) -> Grads {
    let mut inputs: Vec<Value> = (0..3).map(|i| ctx.input(i)).collect();
    inputs.push(dy);
    inputs.extend((3..ctx.num_inputs()).map(|i| ctx.input(i)));
    let grad: Op = match op {
        Op::SigmoidBceLoss(o) => SigmoidBceLossGrad { norm: o.norm }.into(),
        Op::SmoothL1Loss(o) => SmoothL1LossGrad {
            beta: o.beta,
            norm: o.norm,
        }
        .into(),
        Op::SoftmaxCrossEntropyLoss(o) => SoftmaxCrossEntropyLossGrad {
            norm: o.norm,
            labels_in_range: o.labels_in_range,
        }
        .into(),
        other => return Err(format!("`{}` is not a loss", other.name())),
    };
    let mut grads = vec![Some(ctx.emit(grad, &inputs)?)];
    grads.resize(ctx.num_inputs(), None);
    Ok(grads)
}
