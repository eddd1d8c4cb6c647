//! Elementwise ops.

use vitdet_ir::ops::{Affine, Binary, BinaryKind, Cast, CompareKind, CompareScalar, Unary, UnaryGrad};
use vitdet_ir::{DType, Value};

use super::{Ctx, Grads};

pub(super) fn unary(ctx: &mut Ctx, o: &Unary, dy: Value) -> Grads {
    let x = ctx.input(0);
    Ok(vec![Some(ctx.emit(UnaryGrad { kind: o.kind }, &[x, dy])?)])
}

pub(super) fn affine(ctx: &mut Ctx, o: &Affine, dy: Value) -> Grads {
    Ok(vec![Some(ctx.emit(Affine { mul: o.mul, add: 0.0 }, &[dy])?)])
}

pub(super) fn cast(ctx: &mut Ctx, dy: Value) -> Grads {
    let dtype = ctx.ty(ctx.input(0)).dtype;
    Ok(vec![Some(ctx.emit(Cast { dtype }, &[dy])?)])
}

fn bin(ctx: &mut Ctx, kind: BinaryKind, a: Value, b: Value) -> Result<Value, String> {
    ctx.emit(Binary { kind }, &[a, b])
}

/// Gradients of `a (op) b`, each summed back over the axes broadcasting added.
pub(super) fn binary(ctx: &mut Ctx, o: &Binary, dy: Value) -> Grads {
    let (a, b) = (ctx.input(0), ctx.input(1));
    let (sa, sb) = (ctx.shape(a), ctx.shape(b));
    let (ga, gb) = match o.kind {
        BinaryKind::Add => (dy, dy),
        BinaryKind::Sub => {
            let nb = if ctx.needs(1) {
                ctx.emit(Affine { mul: -1.0, add: 0.0 }, &[dy])?
            } else {
                dy
            };
            (dy, nb)
        }
        BinaryKind::Mul => {
            let ga = if ctx.needs(0) {
                bin(ctx, BinaryKind::Mul, dy, b)?
            } else {
                dy
            };
            let gb = if ctx.needs(1) {
                bin(ctx, BinaryKind::Mul, dy, a)?
            } else {
                dy
            };
            (ga, gb)
        }
        BinaryKind::Div => {
            let ga = if ctx.needs(0) {
                bin(ctx, BinaryKind::Div, dy, b)?
            } else {
                dy
            };
            // d(a/b)/db = -(a/b)/b = -y/b
            let gb = if ctx.needs(1) {
                let y = ctx.output(0);
                let t = bin(ctx, BinaryKind::Mul, dy, y)?;
                let t = bin(ctx, BinaryKind::Div, t, b)?;
                ctx.emit(Affine { mul: -1.0, add: 0.0 }, &[t])?
            } else {
                dy
            };
            (ga, gb)
        }
        BinaryKind::Maximum | BinaryKind::Minimum => {
            // PyTorch's rule: the larger (smaller) operand takes the gradient; ties split it
            // in half.
            let wins = if o.kind == BinaryKind::Maximum {
                CompareKind::Gt
            } else {
                CompareKind::Lt
            };
            let diff = bin(ctx, BinaryKind::Sub, a, b)?;
            let dtype = ctx.ty(dy).dtype;
            let win = indicator(ctx, diff, wins, dtype)?;
            let tie = indicator(ctx, diff, CompareKind::Eq, dtype)?;
            let half_tie = ctx.emit(Affine { mul: 0.5, add: 0.0 }, &[tie])?;
            let wa = bin(ctx, BinaryKind::Add, win, half_tie)?;
            let wb = ctx.emit(Affine { mul: -1.0, add: 1.0 }, &[wa])?;
            (bin(ctx, BinaryKind::Mul, dy, wa)?, bin(ctx, BinaryKind::Mul, dy, wb)?)
        }
    };
    let ga = if ctx.needs(0) { Some(ctx.sum_to(ga, &sa)?) } else { None };
    let gb = if ctx.needs(1) { Some(ctx.sum_to(gb, &sb)?) } else { None };
    Ok(vec![ga, gb])
}

/// `1.0` where `x (kind) 0`, else `0.0`, in `dtype`.
fn indicator(ctx: &mut Ctx, x: Value, kind: CompareKind, dtype: DType) -> Result<Value, String> {
    let m = ctx.emit(CompareScalar { kind, value: 0.0 }, &[x])?;
    ctx.emit(Cast { dtype }, &[m])
}
