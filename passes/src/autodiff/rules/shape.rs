//! Data movement, reductions, pooling and resizing.

use vitdet_ir::ops::{MaxPool2d, MaxPool2dGrad, Pad, PadRows, Permute, ReduceSum, Resize, ResizeGrad, Slice};
use vitdet_ir::{Op, Value};

use super::{Ctx, Grads};

/// Layout ops: each gradient is the inverse movement of `dy`.
pub(super) fn shape_op(ctx: &mut Ctx, op: &Op, dy: Value) -> Grads {
    let x = ctx.input(0);
    let xs = ctx.shape(x);
    let g = match op {
        Op::Reshape(_) => ctx.reshape(dy, xs)?,
        Op::Permute(p) => {
            let mut inverse = vec![0; p.perm.len()];
            for (k, &src) in p.perm.iter().enumerate() {
                inverse[src] = k;
            }
            ctx.emit(Permute { perm: inverse }, &[dy])?
        }
        Op::Pad(p) => {
            let mut g = dy;
            for (axis, &[before, _]) in p.pads.iter().enumerate() {
                if ctx.shape(g)[axis] != xs[axis] {
                    g = ctx.emit(
                        Slice {
                            axis,
                            start: before,
                            end: before + xs[axis],
                        },
                        &[g],
                    )?;
                }
            }
            g
        }
        Op::Slice(s) => {
            let mut pads = vec![[0, 0]; xs.len()];
            pads[s.axis] = [s.start, xs[s.axis] - s.end];
            ctx.emit(Pad { pads }, &[dy])?
        }
        Op::Expand(_) => ctx.sum_to(dy, &xs)?,
        Op::Concat(c) => {
            let mut grads = Vec::with_capacity(ctx.num_inputs());
            let mut start = 0;
            for i in 0..ctx.num_inputs() {
                let len = ctx.shape(ctx.input(i))[c.axis];
                grads.push(if ctx.needs(i) {
                    Some(ctx.emit(
                        Slice {
                            axis: c.axis,
                            start,
                            end: start + len,
                        },
                        &[dy],
                    )?)
                } else {
                    None
                });
                start += len;
            }
            return Ok(grads);
        }
        other => return Err(format!("`{}` is not a layout op", other.name())),
    };
    Ok(vec![Some(g)])
}

/// The prefix's gradient is `dy` padded back to the input's rows with zero rows (the count is an
/// integer: no gradient).
pub(super) fn dynamic_prefix(ctx: &mut Ctx, dy: Value) -> Grads {
    let rows = ctx.shape(ctx.input(0))[0];
    Ok(vec![Some(ctx.emit(PadRows { rows }, &[dy])?), None])
}

/// The padding's gradient is `dy`'s first rows, as many as the input holds: the prefix that made
/// the input's rows, applied to `dy` (the graph's dynamic values share one count, and equal
/// bounds mean equal rows).
pub(super) fn pad_rows(ctx: &mut Ctx, dy: Value) -> Grads {
    let bound = ctx.shape(ctx.input(0))[0];
    let (prefix, count) = ctx
        .dynamic_prefix(bound)
        .ok_or_else(|| format!("no dynamic_prefix of bound {bound} gives the rows of the padded value"))?;
    Ok(vec![Some(ctx.emit(prefix, &[dy, count])?)])
}

/// The sum's gradient is `dy` broadcast back over the summed axes.
pub(super) fn reduce_sum(ctx: &mut Ctx, o: &ReduceSum, dy: Value) -> Grads {
    let xs = ctx.shape(ctx.input(0));
    let mut kept = xs.clone();
    for &a in &o.axes {
        kept[a] = 1;
    }
    let g = ctx.reshape(dy, kept)?;
    Ok(vec![Some(ctx.expand(g, xs)?)])
}

pub(super) fn max_pool2d(ctx: &mut Ctx, o: &MaxPool2d, dy: Value) -> Grads {
    let x = ctx.input(0);
    let op = MaxPool2dGrad {
        kernel: o.kernel,
        stride: o.stride,
        padding: o.padding,
    };
    Ok(vec![Some(ctx.emit(op, &[x, dy])?)])
}

pub(super) fn resize(ctx: &mut Ctx, o: &Resize, dy: Value) -> Grads {
    let xs = ctx.shape(ctx.input(0));
    let op = ResizeGrad {
        input_size: [xs[2], xs[3]],
        mode: o.mode,
        align_corners: o.align_corners,
    };
    Ok(vec![Some(ctx.emit(op, &[dy])?)])
}
