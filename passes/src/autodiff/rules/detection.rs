//! Selections and RoIAlign. Boxes and indices get no gradient: detectron2 detaches proposals.

use vitdet_ir::ops::{GatherRows, GatherRowsGrad, IndexSelect, IndexSelectGrad, RoiAlign, RoiAlignGrad};
use vitdet_ir::Value;

use super::{Ctx, Grads};

pub(super) fn index_select(ctx: &mut Ctx, o: &IndexSelect, dy: Value) -> Grads {
    let (x, idx) = (ctx.input(0), ctx.input(1));
    let size = ctx.shape(x)[o.axis];
    // The same indices: in range if the forward's are.
    let grad = IndexSelectGrad {
        axis: o.axis,
        size,
        indices_in_range: o.indices_in_range,
    };
    Ok(vec![Some(ctx.emit(grad, &[idx, dy])?), None])
}

pub(super) fn gather_rows(ctx: &mut Ctx, o: &GatherRows, dy: Value) -> Grads {
    let (x, idx) = (ctx.input(0), ctx.input(1));
    let grad = GatherRowsGrad {
        rows: ctx.shape(x)[1],
        indices_in_range: o.indices_in_range,
    };
    Ok(vec![Some(ctx.emit(grad, &[idx, dy])?), None])
}

/// One feature-map gradient per level; the boxes (last input) get none.
pub(super) fn roi_align(ctx: &mut Ctx, o: &RoiAlign, dy: Value) -> Grads {
    let levels = ctx.num_inputs() - 1;
    let boxes = ctx.input(levels);
    let mut feature_shapes = Vec::with_capacity(levels);
    for l in 0..levels {
        let s = ctx.shape(ctx.input(l));
        feature_shapes.push([s[0], s[1], s[2], s[3]]);
    }
    let op = RoiAlignGrad {
        roi: o.clone(),
        feature_shapes,
    };
    let outs = ctx.emit_multi(op, &[boxes, dy])?;
    let mut grads: Vec<Option<Value>> = (0..levels).map(|l| ctx.needs(l).then_some(outs[l])).collect();
    grads.push(None);
    Ok(grads)
}
