//! Normalizations: fused backward ops recompute the statistics from the input.

use vitdet_ir::ops::{
    Affine, BatchNorm, BatchNormTrain, BatchNormTrainGrad, Binary, BinaryKind, GroupNorm, GroupNormGrad, LayerNorm,
    LayerNormGrad, ReduceSum, Unary, UnaryKind,
};
use vitdet_ir::Value;

use super::{Ctx, Grads};

/// `(dx, dweight, dbias)` from a fused op, keeping only what is needed.
fn fused(ctx: &mut Ctx, outs: Vec<Value>) -> Grads {
    Ok((0..3).map(|i| ctx.needs(i).then_some(outs[i])).collect())
}

pub(super) fn layer_norm(ctx: &mut Ctx, o: &LayerNorm, dy: Value) -> Grads {
    let (x, w) = (ctx.input(0), ctx.input(1));
    let outs = ctx.emit_multi(
        LayerNormGrad {
            axis: o.axis,
            eps: o.eps,
        },
        &[x, w, dy],
    )?;
    fused(ctx, outs)
}

pub(super) fn group_norm(ctx: &mut Ctx, o: &GroupNorm, dy: Value) -> Grads {
    let (x, w) = (ctx.input(0), ctx.input(1));
    let outs = ctx.emit_multi(
        GroupNormGrad {
            groups: o.groups,
            eps: o.eps,
        },
        &[x, w, dy],
    )?;
    fused(ctx, outs)
}

pub(super) fn batch_norm_train(ctx: &mut Ctx, o: &BatchNormTrain, dy: Value) -> Grads {
    let (x, w) = (ctx.input(0), ctx.input(1));
    let outs = ctx.emit_multi(BatchNormTrainGrad { eps: o.eps }, &[x, w, dy])?;
    let mut grads = fused(ctx, outs)?;
    grads.extend([None, None]); // running statistics
    Ok(grads)
}

/// Inference-form (frozen statistics) batch norm `y = (x - mean) / sqrt(var + eps) * w + b`:
/// an affine map per channel, composed from elementwise ops.
pub(super) fn batch_norm(ctx: &mut Ctx, o: &BatchNorm, dy: Value) -> Grads {
    let (x, w, mean, var) = (ctx.input(0), ctx.input(1), ctx.input(3), ctx.input(4));
    let c = ctx.shape(w)[0];
    let per_channel = vec![1, c, 1, 1];
    let var_eps = ctx.emit(Affine { mul: 1.0, add: o.eps }, &[var])?;
    let std = ctx.emit(Unary { kind: UnaryKind::Sqrt }, &[var_eps])?;
    let std4 = ctx.reshape(std, per_channel.clone())?;
    let dx = if ctx.needs(0) {
        let scale = ctx.emit(Binary { kind: BinaryKind::Div }, &[w, std])?;
        let scale4 = ctx.reshape(scale, per_channel.clone())?;
        Some(ctx.emit(Binary { kind: BinaryKind::Mul }, &[dy, scale4])?)
    } else {
        None
    };
    let dw = if ctx.needs(1) {
        let mean4 = ctx.reshape(mean, per_channel.clone())?;
        let centered = ctx.emit(Binary { kind: BinaryKind::Sub }, &[x, mean4])?;
        let xhat = ctx.emit(Binary { kind: BinaryKind::Div }, &[centered, std4])?;
        let t = ctx.emit(Binary { kind: BinaryKind::Mul }, &[dy, xhat])?;
        Some(ctx.emit(
            ReduceSum {
                axes: vec![0, 2, 3],
                keepdim: false,
            },
            &[t],
        )?)
    } else {
        None
    };
    let db = if ctx.needs(2) {
        Some(ctx.emit(
            ReduceSum {
                axes: vec![0, 2, 3],
                keepdim: false,
            },
            &[dy],
        )?)
    } else {
        None
    };
    Ok(vec![dx, dw, db, None, None])
}
