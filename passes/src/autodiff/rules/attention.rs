//! Softmax and the relative-position terms.

use vitdet_ir::ops::{RelPosBias, RelPosBiasGrad, RelPosGather, RelPosGatherGrad, Softmax, SoftmaxGrad};
use vitdet_ir::Value;

use super::{Ctx, Grads};

/// From the softmax output: `dx = y * (dy - sum(dy * y))`.
pub(super) fn softmax(ctx: &mut Ctx, o: &Softmax, dy: Value) -> Grads {
    let y = ctx.output(0);
    Ok(vec![Some(ctx.emit(SoftmaxGrad { axis: o.axis }, &[y, dy])?)])
}

/// Scatter-add of the gathered embeddings back into the table.
pub(super) fn rel_pos_gather(ctx: &mut Ctx, o: &RelPosGather, dy: Value) -> Grads {
    let table_len = ctx.shape(ctx.input(0))[0];
    let op = RelPosGatherGrad {
        q_size: o.q_size,
        k_size: o.k_size,
        table_len,
    };
    Ok(vec![Some(ctx.emit(op, &[dy])?)])
}

pub(super) fn rel_pos_bias(ctx: &mut Ctx, o: &RelPosBias, dy: Value) -> Grads {
    Ok(vec![Some(ctx.emit(RelPosBiasGrad { window: o.window }, &[dy])?)])
}
